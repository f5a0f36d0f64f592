//! The operations kit in `ops/`: the alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), every alert names its severity, summary and runbook line, and
//! `local up --with-prometheus` runs a Prometheus that scrapes every edge and answers every
//! expression of the Grafana dashboard with data after a short load.
//!
//! promtool and prometheus come from the Debian package `prometheus`, which `scripts/test`
//! installs. Without them (plain `cargo test` on a machine lacking the package) the tests that
//! need them say so and pass, except under continuous integration (`CI` set), where a missing
//! tool fails them instead of letting the suite report a pass for checks that never ran.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::helpers::{cli, local_up, OPS_TEST_PORTS};
use crate::schemathesis::running_in_ci;

const RULES: &str = "ops/prometheus/alerts.yml";
const RULE_TESTS: &str = "ops/prometheus/alerts_test.yml";
const DASHBOARD: &str = "ops/grafana/cartedge.json";

/// The window put in place of Grafana's `$__rate_interval` and `$__interval`: long enough to
/// hold the whole load and the polling after it.
const QUERY_WINDOW: &str = "5m";
/// The regions of the local cluster, as the dashboard's `$region` sees them under "All".
const REGIONS: [&str; 3] = ["sg", "id", "th"];
/// Bound on waiting for every target to be up, and then for every expression to have data
/// (scrapes and rule evaluations run every second; the business gauges refresh on their own
/// period).
const TARGETS_UP_LIMIT: Duration = Duration::from_secs(30);
const DATA_LIMIT: Duration = Duration::from_secs(60);

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A Debian `prometheus` binary (`promtool` or `prometheus`): `/usr/bin/<name>` or on PATH.
fn tool(name: &str) -> Option<PathBuf> {
    let default = Path::new("/usr/bin").join(name);
    if default.is_file() {
        return Some(default);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The tool, or `None` after saying it was skipped; panics under CI, where skipping hides a check.
fn tool_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    let found = tool(name);
    if found.is_none() {
        let ci = std::env::var("CI").ok();
        assert!(
            !running_in_ci(ci.as_deref()),
            "{test} did not run: {name} is missing and CI={ci:?} (under CI it may not be skipped; \
             scripts/test installs the Debian package prometheus)"
        );
        eprintln!(
            "{test}: skipped, {name} is missing (scripts/test installs the package prometheus)"
        );
    }
    found
}

fn run(tool: &Path, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|err| panic!("running {}: {err}", tool.display()))
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = tool_or_skip("promtool", "promtool rules") else {
        return;
    };
    let check = run(&promtool, &["check", "rules", RULES]);
    assert_success("promtool check rules", &check);
    let tests = run(&promtool, &["test", "rules", RULE_TESTS]);
    assert_success("promtool test rules", &tests);
    // promtool only tests the alerts a test names: every alert must have a firing case.
    let rules = std::fs::read_to_string(repo_file(RULES)).unwrap();
    let unit_tests = std::fs::read_to_string(repo_file(RULE_TESTS)).unwrap();
    for alert in alerts(&rules) {
        let named = format!("alertname: {}", alert.name);
        let cases = unit_tests.matches(&named).count();
        assert!(
            cases >= 2,
            "{} has {cases} promtool cases; it needs one where it fires and one where it does not",
            alert.name
        );
    }
}

/// One `- alert:` block of the rules file, read line by line (the file is plain, two-space
/// indented YAML; promtool checks its syntax).
struct Alert {
    name: String,
    block: String,
}

fn alerts(rules: &str) -> Vec<Alert> {
    let mut alerts: Vec<Alert> = Vec::new();
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alerts.push(Alert {
                name: name.trim().to_string(),
                block: String::new(),
            });
        } else if trimmed.starts_with("- record:") || trimmed.starts_with("- name:") {
            // A recording rule or a new group ends the alert before it.
            alerts.push(Alert {
                name: String::new(),
                block: String::new(),
            });
        } else if let Some(last) = alerts.last_mut() {
            last.block.push_str(line);
            last.block.push('\n');
        }
    }
    alerts.retain(|alert| !alert.name.is_empty());
    alerts
}

#[test]
fn every_alert_has_a_severity_a_summary_and_a_runbook_line_in_the_readme() {
    let rules = std::fs::read_to_string(repo_file(RULES)).unwrap();
    let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
    let alerts = alerts(&rules);
    let names: Vec<&str> = alerts.iter().map(|a| a.name.as_str()).collect();
    for expected in [
        "CartedgeHighLatencyP99",
        "CartedgeCacheHitRateLow",
        "CartedgeReplicaLagHigh",
        "CartedgeHighErrorRate",
        "CartedgeForwardFailures",
        "CartedgeForwardBreakerOpen",
        "CartedgeOutboxBacklogGrowing",
        "CartedgeParkedWritesBacklogGrowing",
        "CartedgeErrorBudgetBurnFast",
        "CartedgeErrorBudgetBurnSlow",
    ] {
        assert!(names.contains(&expected), "no alert {expected} in {RULES}");
    }
    for alert in &alerts {
        let severity = alert
            .block
            .lines()
            .find_map(|line| line.trim().strip_prefix("severity:"))
            .map(str::trim);
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{}: severity {severity:?}",
            alert.name
        );
        assert!(
            alert
                .block
                .lines()
                .any(|l| l.trim().starts_with("summary:")),
            "{}: no summary",
            alert.name
        );
        let anchor = format!("runbook-{}", alert.name.to_lowercase());
        assert!(
            alert
                .block
                .contains(&format!("runbook: \"README.md#{anchor}\"")),
            "{}: no runbook annotation naming README.md#{anchor}",
            alert.name
        );
        assert!(
            readme.contains(&format!("<a id=\"{anchor}\"></a>")),
            "README.md has no runbook line for {} (anchor {anchor})",
            alert.name
        );
    }
}

/// Every `expr` of the dashboard's panels (rows included), in order.
fn dashboard_expressions(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_string());
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard expression as Prometheus runs it: the region variable set to every region, the
/// Grafana intervals to [`QUERY_WINDOW`].
fn substituted(expr: &str) -> String {
    expr.replace("$region", &REGIONS.join("|"))
        .replace("$__rate_interval", QUERY_WINDOW)
        .replace("$__interval", QUERY_WINDOW)
}

#[test]
fn the_dashboard_uses_a_datasource_input_a_region_variable_and_only_known_variables() {
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_file(DASHBOARD)).unwrap()).unwrap();
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let region = variables
        .iter()
        .find(|v| v["name"] == "region")
        .expect("a region variable");
    assert_eq!(
        region["definition"],
        "label_values(cartedge_build_info, region)"
    );
    let expressions = dashboard_expressions(&dashboard);
    assert!(expressions.len() >= 20, "{expressions:?}");
    for expr in &expressions {
        assert!(expr.contains("$region"), "not filtered by region: {expr}");
        assert!(
            !substituted(expr).contains('$'),
            "an unknown variable: {expr}"
        );
    }
    // Every panel queries the Prometheus input.
    let text = std::fs::read_to_string(repo_file(DASHBOARD)).unwrap();
    assert!(
        !text.contains("\"uid\": \"prometheus\""),
        "a hard-wired datasource"
    );
}

/// Percent-encodes a query parameter value (everything but RFC 3986's unreserved characters).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn http(
    client: &Client,
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or("").to_string(),
        )))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {url} answered within 10 s"))
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// `GET <prometheus>/api/v1/<path>`; the `data` of a `success` answer.
async fn prometheus_api(client: &Client, base: &str, path: &str) -> serde_json::Value {
    let (status, body) = http(client, &format!("{base}/api/v1/{path}"), "GET", &[], None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("success")),
        "{path}: {body}"
    );
    body["data"].clone()
}

/// A short bounded load on every region: signed-in writes (some forwarded to their home
/// region), reads that miss and then hit the cache, an unknown item (404), and a burst of reads
/// past one user's read limit (429).
async fn load(client: &Client, dir: &Path, edges: &[String]) -> usize {
    let config = dir.join("regions/sg.toml");
    let mut requests = 0;
    for (n, user) in [
        "ops-ann", "ops-ben", "ops-cat", "ops-dan", "ops-eve", "ops-fay",
    ]
    .iter()
    .enumerate()
    {
        let token = cli(&["--config", config.to_str().unwrap(), "token", "--sub", user]);
        assert!(token.status.success());
        let bearer = format!("Bearer {}", String::from_utf8(token.stdout).unwrap().trim());
        let auth = [("authorization", bearer.as_str())];
        for (offset, edge) in edges.iter().enumerate() {
            let item = format!("sku-{:05}", 1 + n * 3 + offset);
            let body = format!(r#"{{"item_id":"{item}","quantity":1}}"#);
            let (status, cart) = http(
                client,
                &format!("{edge}/api/v1/cart/items"),
                "POST",
                &auth,
                Some(&body),
            )
            .await;
            assert_eq!(status, 200, "{cart}");
            requests += 1;
            // The version makes every region's read wait for (or fetch) this write.
            let version = cart["version"].to_string();
            let with_version = [
                ("authorization", bearer.as_str()),
                ("cart-min-version", version.as_str()),
            ];
            for _ in 0..8 {
                let (status, _) = http(
                    client,
                    &format!("{edge}/api/v1/cart"),
                    "GET",
                    &with_version,
                    None,
                )
                .await;
                assert_eq!(status, 200);
                requests += 1;
            }
        }
        let (status, _) = http(
            client,
            &format!("{}/api/v1/cart/items/sku-10001", edges[0]),
            "PUT",
            &auth,
            Some(r#"{"quantity":1}"#),
        )
        .await;
        assert_eq!(status, 404, "the demo catalog ends at sku-10000");
        requests += 1;
    }
    // One user reads past the read burst (40) on one edge: some answers are 429.
    let token = cli(&[
        "--config",
        config.to_str().unwrap(),
        "token",
        "--sub",
        "ops-burst",
    ]);
    let bearer = format!("Bearer {}", String::from_utf8(token.stdout).unwrap().trim());
    let mut limited = 0;
    for _ in 0..60 {
        let (status, _) = http(
            client,
            &format!("{}/api/v1/cart", edges[1]),
            "GET",
            &[("authorization", bearer.as_str())],
            None,
        )
        .await;
        assert!(status == 200 || status == 429, "{status}");
        limited += usize::from(status == 429);
        requests += 1;
    }
    assert!(limited > 0, "60 quick reads by one user were never limited");
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_prometheus_scrapes_every_edge_and_answers_every_dashboard_expression() {
    if tool_or_skip("prometheus", "local prometheus").is_none() {
        return;
    }
    let started = local_up("ops", OPS_TEST_PORTS, &["--with-prometheus"]);
    let dir = started.cluster.dir.clone();
    let (dir_arg, edge_port, admin_port) =
        (started.dir.clone(), started.edge_port, started.admin_port);
    let cluster_file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    let prometheus = cluster_file["prometheus_url"]
        .as_str()
        .expect("cluster.json names prometheus_url")
        .to_string();
    assert!(prometheus.starts_with("http://127.0.0.1:"), "{prometheus}");
    let client = client();

    // Every edge's admin listener is a target, labelled with its region, and up.
    let deadline = Instant::now() + TARGETS_UP_LIMIT;
    loop {
        let targets = prometheus_api(&client, &prometheus, "targets?state=active").await;
        let active = targets["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut up: Vec<(String, String)> = active
            .iter()
            .filter(|t| t["health"] == "up")
            .map(|t| {
                (
                    t["labels"]["region"].as_str().unwrap_or("").to_string(),
                    t["scrapeUrl"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        up.sort();
        let mut expected: Vec<(String, String)> = REGIONS
            .iter()
            .zip(0u16..)
            .map(|(region, offset)| {
                (
                    region.to_string(),
                    format!("http://127.0.0.1:{}/metrics", admin_port + offset),
                )
            })
            .collect();
        expected.sort();
        if up == expected && active.len() == REGIONS.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "targets not all up after {TARGETS_UP_LIMIT:?}: {active:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The alert rules are loaded and evaluate without error.
    let rules_text = std::fs::read_to_string(repo_file(RULES)).unwrap();
    let expected_alerts: Vec<String> = alerts(&rules_text).into_iter().map(|a| a.name).collect();
    let deadline = Instant::now() + TARGETS_UP_LIMIT;
    loop {
        let rules = prometheus_api(&client, &prometheus, "rules").await;
        let loaded: Vec<&serde_json::Value> = rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .collect();
        let mut alert_names: Vec<String> = loaded
            .iter()
            .filter(|rule| rule["type"] == "alerting")
            .filter_map(|rule| rule["name"].as_str().map(String::from))
            .collect();
        alert_names.sort();
        let mut wanted = expected_alerts.clone();
        wanted.sort();
        assert_eq!(alert_names, wanted, "the loaded alerting rules");
        let evaluated = loaded
            .iter()
            .all(|rule| rule["health"] == "ok" && rule["lastEvaluation"] != "0001-01-01T00:00:00Z");
        if evaluated {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated without error: {loaded:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let edges: Vec<String> = (0..3)
        .map(|offset| format!("http://127.0.0.1:{}", edge_port + offset))
        .collect();
    let requests = load(&client, &dir, &edges).await;
    println!("ops: {requests} requests of load");

    // Every expression of the dashboard, and its region variable, answers with data.
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_file(DASHBOARD)).unwrap()).unwrap();
    let expressions: Vec<String> = dashboard_expressions(&dashboard)
        .iter()
        .map(|expr| substituted(expr))
        .collect();
    let deadline = Instant::now() + DATA_LIMIT;
    loop {
        let mut empty = Vec::new();
        for expr in &expressions {
            let data = prometheus_api(
                &client,
                &prometheus,
                &format!("query?query={}", encode(expr)),
            )
            .await;
            if data["result"].as_array().is_none_or(Vec::is_empty) {
                empty.push(expr.clone());
            }
        }
        let regions = prometheus_api(
            &client,
            &prometheus,
            &format!(
                "label/region/values?match[]={}",
                encode("cartedge_build_info")
            ),
        )
        .await;
        let mut listed: Vec<&str> = regions
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        listed.sort_unstable();
        let mut all = REGIONS.to_vec();
        all.sort_unstable();
        if listed != all {
            empty.push(format!(
                "label_values(cartedge_build_info, region) (the region variable): {listed:?}"
            ));
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} dashboard expressions returned no data after {DATA_LIMIT:?} of polling:\n  {}",
            empty.len(),
            expressions.len() + 1,
            empty.join("\n  ")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let port: u16 = prometheus
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    let down = cli(&["local", "down", "--dir", &dir_arg]);
    assert!(down.status.success());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "local down stops Prometheus"
    );
    drop(started);
}
