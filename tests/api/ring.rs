//! Ring placement is pinned by a golden file, and the CLI reads the same ring.

use std::path::Path;
use std::process::Command;

use cartedge::domain::ring::sample_owner_keys;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn placement_of_10000_owner_keys_matches_the_golden_file() {
    let ring = cartedge::topology::load_ring(&root().join("config/ring.toml")).unwrap();
    let mut actual = format!("# ring fingerprint {}\n", ring.fingerprint());
    for key in sample_owner_keys(10_000) {
        actual.push_str(&format!("{key} {}\n", ring.locate(&key).shard));
    }
    let golden = root().join("tests/golden/ring-placement.txt");
    if std::env::var_os("CARTEDGE_BLESS_GOLDEN").is_some() {
        std::fs::write(&golden, &actual).unwrap();
    }
    let expected =
        std::fs::read_to_string(&golden).expect("golden file (bless with CARTEDGE_BLESS_GOLDEN=1)");
    let differing = expected
        .lines()
        .zip(actual.lines())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(expected.lines().count(), actual.lines().count());
    assert_eq!(
        differing, 0,
        "{differing} owners would move: placement changed"
    );
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
