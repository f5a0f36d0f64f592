//! Architecture invariants that a scan of the source can hold: the layers ARCHITECTURE.md
//! declares (checked against every `crate::…` import of the library), no import cycle, a pure
//! domain, and no developer tooling in the service library.

use std::collections::{BTreeMap, BTreeSet};
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
    // The binary's own modules: the command line, the local cluster launcher, the load
    // generator and the failure drills.
    let binary = [
        "/src/main.rs",
        "/src/cli.rs",
        "/src/local/",
        "/src/loadgen/",
        "/src/drill/",
    ];
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
                !matches!(declared, Some("cli" | "local" | "loadgen" | "drill")),
                "{path} declares a module of the binary: {line}"
            );
        }
    }
}

/// The top-level library modules each file of `src/` imports through `crate::…` paths (grouped
/// imports such as `use crate::{a::B, c};` included), keyed by the importing top-level module.
fn import_edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources_under(src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in files {
        let relative = Path::new(&path).strip_prefix(src).unwrap();
        let first = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        let targets = edges.entry(module.clone()).or_default();
        let code = strip_comments(&text);
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            let preceded_by_ident = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            rest = &rest[at + "crate::".len()..];
            if preceded_by_ident {
                continue;
            }
            for target in path_heads(rest) {
                if target != module {
                    targets.insert(target);
                }
            }
        }
    }
    edges
}

/// The first segments named right after `crate::`: one identifier, or each item of a brace group.
fn path_heads(after: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    if let Some(group) = after.strip_prefix('{') {
        let mut heads = Vec::new();
        let mut depth = 0usize;
        let mut item_start = true;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if item_start && !c.is_whitespace() => {
                    item_start = false;
                    let head = ident(&group[i..]);
                    if !head.is_empty() {
                        heads.push(head);
                    }
                }
                _ => {}
            }
        }
        heads
    } else {
        vec![ident(after)]
    }
}

/// Source without `//` comments (line and doc comments), keeping string literals intact enough
/// for the scan: a `//` inside a string literal on the same line is kept.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut previous = ' ';
        let mut cut = line.len();
        for (i, c) in line.char_indices() {
            if c == '"' && previous != '\\' {
                in_string = !in_string;
            }
            if !in_string && c == '/' && previous == '/' {
                cut = i - 1;
                break;
            }
            previous = c;
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// The layers ARCHITECTURE.md declares, lowest first: the fenced `text` block under its
/// `## Layers` heading, one layer a line, the modules of a layer separated by spaces.
fn declared_layers() -> Vec<Vec<String>> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .unwrap();
    let section = doc
        .split("\n## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Layers` section");
    let block = section
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Layers section has a ```text block");
    block
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|layer| !layer.is_empty())
        .collect()
}

fn library_edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = import_edges(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The crate roots declare modules; `main`, `cli`, `local`, `loadgen` and `drill` are the
    // binary, above the whole library (the library cannot name them:
    // `the_service_library_uses_no_developer_tooling`).
    for not_library in ["lib", "main", "cli", "local", "loadgen", "drill"] {
        edges.remove(not_library);
    }
    edges
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let layers = declared_layers();
    let level = |module: &str| {
        layers
            .iter()
            .position(|layer| layer.iter().any(|m| m == module))
    };
    let edges = library_edges();
    let mut problems = Vec::new();
    for module in edges.keys() {
        if level(module).is_none() {
            problems.push(format!(
                "src/{module} is not declared in ARCHITECTURE.md's layers"
            ));
        }
    }
    for layer in &layers {
        for module in layer {
            if !edges.contains_key(module) {
                problems.push(format!(
                    "ARCHITECTURE.md declares `{module}`, which src/ lacks"
                ));
            }
        }
    }
    for (from, targets) in &edges {
        for to in targets {
            if let (Some(a), Some(b)) = (level(from), level(to)) {
                if b >= a {
                    problems.push(format!("{from} imports {to}, which is not below it"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    fn visit(
        module: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|m| m == module) {
            let mut cycle = path[start..].to_vec();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_string());
        for next in edges.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(module.to_string());
        None
    }
    let edges = library_edges();
    let mut done = BTreeSet::new();
    for module in edges.keys() {
        if let Some(cycle) = visit(module, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_edge_scanner_sees_grouped_and_nested_imports() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("api")).unwrap();
    std::fs::write(
        dir.path().join("api/mod.rs"),
        "use crate::{store::Store, domain::{ids::X, cart}};\n// use crate::cli;\nfn f() { crate::app::go(); let _ = \"not // a comment\"; }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("store.rs"), "use crate::domain::ids;\n").unwrap();
    let edges = import_edges(dir.path());
    let names = |m: &str| edges[m].iter().cloned().collect::<Vec<_>>();
    assert_eq!(names("api"), ["app", "domain", "store"]);
    assert_eq!(names("store"), ["domain"]);
}
