//! Ring placement is pinned by a golden file, and the CLI reads the same ring.

use std::path::Path;
use std::process::Command;

use cartedge::domain::ring::sample_owner_keys;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compares `actual` with the golden file `name` (rewritten when CARTEDGE_BLESS_GOLDEN is set).
fn assert_golden(name: &str, actual: &str) {
    let golden = root().join("tests/golden").join(name);
    if std::env::var_os("CARTEDGE_BLESS_GOLDEN").is_some() {
        std::fs::write(&golden, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&golden)
        .unwrap_or_else(|_| panic!("golden file {name} (bless with CARTEDGE_BLESS_GOLDEN=1)"));
    let differing = expected
        .lines()
        .zip(actual.lines())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(expected.lines().count(), actual.lines().count(), "{name}");
    assert_eq!(
        differing, 0,
        "{name}: {differing} lines differ: placement changed"
    );
}

#[test]
fn placement_of_10000_owner_keys_matches_the_golden_file() {
    let ring = cartedge::topology::load_ring(&root().join("config/ring.toml")).unwrap();
    let mut actual = format!("# ring fingerprint {}\n", ring.fingerprint());
    for key in sample_owner_keys(10_000) {
        actual.push_str(&format!("{key} {}\n", ring.locate(&key).shard));
    }
    assert_golden("ring-placement.txt", &actual);
}

/// Owners with a home region are placed on that region's ring: one golden file per region that
/// homes shards, so a change to any regional ring's hashing shows as moved owners.
#[test]
fn placement_on_every_regional_ring_matches_its_golden_file() {
    let ring = cartedge::topology::load_ring(&root().join("config/ring.toml")).unwrap();
    let homes: std::collections::BTreeSet<String> = ring
        .spec()
        .shards
        .iter()
        .map(|s| s.home.to_string())
        .collect();
    assert_eq!(
        homes.len(),
        6,
        "the shipped ring homes shards in six regions"
    );
    for home in homes {
        let mut actual = format!("# ring fingerprint {} region {home}\n", ring.fingerprint());
        for key in sample_owner_keys(2_000) {
            let placement = ring.locate_in(&key, &home).unwrap();
            assert_eq!(*placement.home, home);
            actual.push_str(&format!("{key} {}\n", placement.shard));
        }
        assert_golden(&format!("ring-placement-{home}.txt"), &actual);
    }
}

#[test]
fn ring_locate_prints_one_line_with_shard_and_home() {
    let output = Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .current_dir(root())
        .args(["ring", "locate", "u:alice"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let ring = cartedge::topology::load_ring(&root().join("config/ring.toml")).unwrap();
    let placement = ring.locate("u:alice");
    assert_eq!(
        text,
        format!("shard={} home={}\n", placement.shard, placement.home)
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .current_dir(root())
        .args(["ring", "locate", "alice"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn ring_locate_with_a_region_places_the_owner_on_that_regions_ring() {
    let ring = cartedge::topology::load_ring(&root().join("config/ring.toml")).unwrap();
    let locate = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cartedge"))
            .current_dir(root())
            .args(["ring", "locate"])
            .args(args)
            .output()
            .unwrap()
    };
    // A user the global ring homes outside Indonesia, placed as an Indonesian token would be.
    let user = (0..1000)
        .map(|n| format!("u:traveller-{n}"))
        .find(|key| ring.locate(key).home != "id")
        .unwrap();
    let output = locate(&[&user, "--region", "id"]);
    assert!(output.status.success());
    let expected = ring.locate_in(&user, "id").unwrap();
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("shard={} home=id\n", expected.shard)
    );
    // A region homing no shard, and --region for a guest (whose session names its home), fail.
    assert!(!locate(&[&user, "--region", "zz"]).status.success());
    assert!(!locate(&["g:abc", "--region", "id"]).status.success());
}

#[test]
fn ring_plan_counts_owners_moving_only_onto_the_added_shard() {
    let output = Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .current_dir(root())
        .args([
            "ring",
            "plan",
            "--add-shard",
            "sg-3@sg",
            "--owners",
            "20000",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let first = text.lines().next().unwrap();
    let moved: usize = first
        .split(": ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // 8 shards -> 9: about 1/9 of owners move.
    assert!((1600..=2900).contains(&moved), "{first}");
    assert!(
        text.lines().skip(1).all(|line| line.contains("-> sg-3:")),
        "{text}"
    );
}
