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

/// A moving ring (`moving_from`) built from the shipped ring plus `sg-3`, with the shipped ring
/// kept beside it as `ring.v1.toml`: (temp dir, path of the moving ring file).
fn moving_ring_files() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(root().join("config/ring.toml")).unwrap();
    std::fs::write(dir.path().join("ring.v1.toml"), &shipped).unwrap();
    let moving = shipped.replace("version = 1\n", "version = 2\nmoving_from = 1\n")
        + "\n[[shards]]\nid = \"sg-3\"\nhome = \"sg\"\n";
    let path = dir.path().join("ring.toml");
    std::fs::write(&path, moving).unwrap();
    (dir, path)
}

/// While a ring moves, the previous placement of every owner is the old ring's, as its golden
/// file pins it: an owner whose shard changed knows where its cart was, on the global ring and
/// on every regional ring.
#[test]
fn a_moving_rings_previous_placement_is_the_old_rings_golden_placement() {
    let (_dir, path) = moving_ring_files();
    let moving = cartedge::topology::load_ring(&path).unwrap();
    let old = cartedge::topology::load_ring(&root().join("config/ring.toml")).unwrap();
    assert_eq!(moving.previous().unwrap().fingerprint(), old.fingerprint());
    let golden = std::fs::read_to_string(root().join("tests/golden/ring-placement.txt")).unwrap();
    let mut moved = 0;
    for line in golden.lines().skip(1) {
        let (key, old_shard) = line.split_once(' ').unwrap();
        let now = moving.locate(key).shard.to_string();
        match moving.previous_placement(key, None) {
            Some(before) => {
                moved += 1;
                assert_eq!(before.shard, old_shard, "{key}");
                assert_eq!(now, "sg-3", "{key}");
            }
            None => assert_eq!(now, old_shard, "{key}"),
        }
    }
    // 8 shards -> 9: about 1/9 of 10 000.
    assert!((800..=1500).contains(&moved), "{moved}");
    for home in ["sg", "id", "th"] {
        for key in sample_owner_keys(2_000) {
            let before = old.locate_in(&key, home).unwrap();
            let now = moving.locate_in(&key, home).unwrap();
            let expected = (before.shard != now.shard).then_some(before.shard.to_string());
            let previous = moving
                .previous_placement(&key, Some(home))
                .map(|p| p.shard.to_string());
            assert_eq!(previous, expected, "{key} in {home}");
        }
    }
}

#[test]
fn ring_plan_of_a_moving_ring_shows_the_move_under_way_and_refuses_another() {
    let (_dir, path) = moving_ring_files();
    let plan = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cartedge"))
            .current_dir(root())
            .args(["ring", "plan", "--owners", "20000", "--ring"])
            .arg(&path)
            .args(extra)
            .output()
            .unwrap()
    };
    let output = plan(&[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.lines().next().unwrap().contains("owners move ("),
        "{text}"
    );
    assert!(
        text.lines().skip(1).all(|line| line.contains("-> sg-3:")),
        "{text}"
    );
    let refused = plan(&["--add-shard", "sg-4@sg"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("finish that move"));
    // The previous ring file must be there, of the version named.
    std::fs::remove_file(path.with_file_name("ring.v1.toml")).unwrap();
    assert!(cartedge::topology::load_ring(&path).is_err());
}
