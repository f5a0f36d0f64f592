//! Every committed fuzz corpus file (`fuzz/corpus/<target>/`) replays through the same entry
//! point its cargo-fuzz target calls, so the ordinary suite keeps fixed crashes fixed without
//! nightly Rust. Compiled only with the `fuzzing` feature (`scripts/test` turns it on), which is
//! what exposes `cartedge::fuzzing`.

use std::path::Path;

type Target = fn(&[u8]);

fn replay(name: &str, target: Target) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    for file in files {
        let input = std::fs::read(&file).unwrap();
        // A panic names the input that caused it.
        let outcome = std::panic::catch_unwind(|| target(&input));
        assert!(outcome.is_ok(), "{} panics", file.display());
    }
}

#[test]
fn the_request_corpus_replays_without_a_finding() {
    replay("request", cartedge::fuzzing::request);
}

#[test]
fn the_session_id_corpus_replays_without_a_finding() {
    replay("session_id", cartedge::fuzzing::session_id);
}

#[test]
fn the_token_corpus_replays_without_a_finding() {
    replay("token", cartedge::fuzzing::token);
}

#[test]
fn the_config_corpus_replays_without_a_finding() {
    replay("config", cartedge::fuzzing::config);
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_seeds_reach_the_accepting_paths_too() {
    // Valid configurations load, so the fuzzer starts from inputs past validation.
    for name in [
        "minimal",
        "minimal-env",
        "region-sg",
        "durations",
        "listen-v6",
        "peer-urls",
    ] {
        let loaded = cartedge::fuzzing::load_config(&seed("config", name));
        assert!(loaded.is_ok(), "config/{name}: {}", loaded.unwrap_err());
    }
    let with_env = cartedge::fuzzing::load_config(&seed("config", "minimal-env")).unwrap();
    assert_eq!(with_env.cart.max_lines, 7);
    // Sessions minted with the fuzz key verify; their tampered copies do not.
    let auth = cartedge::fuzzing::authenticator();
    for name in ["valid-1", "valid-2", "valid-3"] {
        let session = String::from_utf8(seed("session_id", name)).unwrap();
        assert!(auth.verify_session(&session).is_ok(), "session_id/{name}");
    }
    for name in [
        "tampered-tag",
        "tampered-random",
        "truncated",
        "padded",
        "tampered-v2-time",
        "unknown-version",
    ] {
        let session = String::from_utf8(seed("session_id", name)).unwrap();
        assert!(auth.verify_session(&session).is_err(), "session_id/{name}");
    }
    // The v2 seed is live at the fuzz clock and expired a lifetime later.
    let v2 = String::from_utf8(seed("session_id", "valid-v2")).unwrap();
    let clock = cartedge::fuzzing::SESSION_CLOCK;
    assert!(matches!(
        auth.verify_session_at(&v2, clock),
        Ok(cartedge::auth::Session::Live(_))
    ));
    let later = clock + cartedge::fuzzing::SESSION_LIFETIME.as_secs() + 1;
    assert_eq!(
        auth.verify_session_at(&v2, later),
        Ok(cartedge::auth::Session::Expired)
    );
}
