//! Architecture invariants that a grep can hold.

use std::path::Path;

fn sources_under(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources_under(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
}

#[test]
fn the_domain_does_no_io_and_reads_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain");
    let mut files = Vec::new();
    sources_under(&root, &mut files);
    assert!(files.len() >= 4);
    let forbidden = [
        "tokio",
        "hyper",
        "redis",
        "postgres",
        "deadpool",
        "std::fs",
        "std::net",
        "std::env",
        "SystemTime",
        "Instant",
        "Utc::now",
        "Local::now",
        "rand::",
    ];
    for (path, text) in files {
        let code: String = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for word in forbidden {
            assert!(!code.contains(word), "{path} uses {word}");
        }
    }
}

#[test]
fn only_the_store_and_the_tools_talk_to_postgres_and_redis() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources_under(&root, &mut files);
    for (path, text) in files {
        // `preflight` only parses connection strings and URLs; it connects to nothing.
        let allowed = ["/store/", "/local/", "/cli.rs", "/preflight.rs"]
            .iter()
            .any(|p| path.contains(p));
        let code: String = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        if !allowed {
            let text = code;
            assert!(
                !text.contains("tokio_postgres") && !text.contains("redis::"),
                "{path} talks to a store directly"
            );
        }
    }
}

#[test]
fn the_service_library_uses_no_developer_tooling() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources_under(&root, &mut files);
    // The binary's own modules: the command line and the local cluster launcher.
    let binary = ["/src/main.rs", "/src/cli.rs", "/src/local/"];
    let library: Vec<_> = files
        .into_iter()
        .filter(|(path, _)| !binary.iter().any(|p| path.contains(p)))
        .collect();
    assert!(library
        .iter()
        .any(|(path, _)| path.ends_with("/src/lib.rs")));
    for (path, text) in library {
        let code: String = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!code.contains("cartedge_dev"), "{path} uses cartedge_dev");
        for line in code.lines() {
            let declared = line
                .trim()
                .trim_start_matches("pub ")
                .strip_prefix("mod ")
                .map(|rest| rest.trim_end_matches([';', '{', ' ']));
            assert!(
                !matches!(declared, Some("cli" | "local")),
                "{path} declares a module of the binary: {line}"
            );
        }
    }
}
