//! schemathesis (a property-based API tester from PyPI) against a live edge: it generates
//! requests from `openapi.json`, valid and invalid, sends them, and checks every answer
//! against the document. The test finds the tool through `CARTEDGE_SCHEMATHESIS`, which
//! `scripts/test` sets after installing a pinned version; without it (plain `cargo test` on a
//! machine without Python) it says so and passes, except under continuous integration
//! (`CI` set, as every CI service does), where a missing tool fails the test instead of
//! letting the suite report a pass for a check that never ran.

use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;

use crate::helpers::TestApp;

/// The variable `scripts/test` exports: the path of the `schemathesis` executable.
const TOOL_VARIABLE: &str = "CARTEDGE_SCHEMATHESIS";

/// What must hold for every generated request: no 5xx, and status code, content type and
/// body as the document says.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance";

/// Fixed so a failure reproduces; set `CARTEDGE_SCHEMATHESIS_SEED` to explore other cases.
const DEFAULT_SEED: &str = "20250501";

/// Bound on one schemathesis run; its own `--max-time` stops it well before.
const RUN_LIMIT: Duration = Duration::from_secs(100);

/// Runs schemathesis against `app` with `extra` arguments; returns its output after asserting
/// it found nothing.
async fn schemathesis(tool: &OsString, app: &TestApp, extra: &[&str]) -> String {
    let document = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let seed = std::env::var("CARTEDGE_SCHEMATHESIS_SEED").unwrap_or(DEFAULT_SEED.into());
    // Reports and caches go to a scratch directory, never into the repository.
    let scratch = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(tool);
    command
        .current_dir(scratch.path())
        .args(["run", document, "--url"])
        .arg(format!("http://{}", app.address))
        .args(["--checks", CHECKS, "--seed", &seed])
        // One worker: schemathesis' generator is not safe on this Python with several.
        .args(["--workers", "1", "--request-timeout", "10"])
        .args(["--generation-database", "none", "--no-color"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .expect("schemathesis finished within its bound")
        .expect("schemathesis runs");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems (exit {:?}):\n{report}",
        output.status.code()
    );
    report
}

/// The summary lines worth keeping in the test log.
fn summary(report: &str) -> String {
    report
        .lines()
        .filter(|line| {
            let line = line.trim();
            line.starts_with("Tested:")
                || line.contains(" generated, ")
                || line.starts_with("Seed:")
        })
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether the environment is a CI run, where skipping is not allowed: `CI` set to anything
/// but empty, `0` or `false` (CI services set `CI=true`).
pub(crate) fn running_in_ci(ci: Option<&str>) -> bool {
    ci.is_some_and(|value| {
        let value = value.trim();
        !(value.is_empty() || value == "0" || value.eq_ignore_ascii_case("false"))
    })
}

#[test]
fn ci_is_recognised_from_its_variable() {
    for on in ["true", "1", "yes", "TRUE"] {
        assert!(running_in_ci(Some(on)), "{on}");
    }
    for off in [None, Some(""), Some("0"), Some("false"), Some("False")] {
        assert!(!running_in_ci(off), "{off:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let Some(tool) = std::env::var_os(TOOL_VARIABLE) else {
        let ci = std::env::var("CI").ok();
        assert!(
            !running_in_ci(ci.as_deref()),
            "schemathesis did not run: {TOOL_VARIABLE} is not set and CI={ci:?} (under CI the \
             contract check may not be skipped; run scripts/test, which installs the tool and \
             sets {TOOL_VARIABLE})"
        );
        eprintln!(
            "schemathesis: skipped, {TOOL_VARIABLE} is not set (scripts/test installs the tool and sets it)"
        );
        return;
    };
    let app = TestApp::spawn().await;
    // A signed-in shopper with a cart to read and change; the token goes with every request.
    assert_eq!(app.add("schema-user", "sku-00001", 2).await.status, 200);
    let authorization = format!("Authorization: Bearer {}", app.token("schema-user"));
    let user = schemathesis(
        &tool,
        &app,
        &[
            "--header",
            &authorization,
            "--max-examples",
            "25",
            "--max-time",
            "50",
        ],
    )
    .await;
    println!("schemathesis, user: {}", summary(&user));
    // Without credentials: anonymous reads, and writes that each mint a guest session.
    let guest = schemathesis(
        &tool,
        &app,
        &[
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "10",
            "--max-time",
            "20",
        ],
    )
    .await;
    println!("schemathesis, guest: {}", summary(&guest));
}
