//! `cartedge loadgen` against a live edge: the real binary runs a short open-loop schedule with
//! every operation in its mix at a modest rate against a test edge described by a minimal
//! cluster directory (`cluster.json` and the region file the tokens are minted with). It must
//! exit 0, write the JSON contract with figures the schedule implies, have really sent what it
//! says (the edge's own request counter grew at least that much) and draw the SVG plot; then a
//! second, HTTP/2 run with a baseline reports the ratios to it. No assertion is about speed.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{cli, shared, test_config_text, TestApp};

/// The edge's `cartedge_http_requests_total` over the cart routes, summed over their labels
/// (admin `/metrics`; its own scrapes, counted under `/metrics`, are left out).
async fn requests_total(admin: std::net::SocketAddr) -> f64 {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the admin listener answered within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer)
        .lines()
        .filter(|line| line.starts_with("cartedge_http_requests_total{route=\"/cart"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_sends_the_scheduled_mix_and_reports_the_json_contract_and_a_plot() {
    let app = TestApp::spawn().await;
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_address = admin.local_addr().unwrap();
    let admin_server = tokio::spawn(cartedge::server::run_admin(
        admin,
        app.app.clone(),
        std::future::pending::<()>(),
    ));

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("regions")).unwrap();
    std::fs::write(
        dir.path().join("regions/sg.toml"),
        test_config_text(&app.dsn, &shared().redis.url(), "loadgen-unused:", ""),
    )
    .unwrap();
    let cluster = json!({"regions": [{
        "id": "sg",
        "edge_url": format!("http://{}", app.address),
        "admin_url": format!("http://{admin_address}"),
        "currency": "SGD",
        "redis_url": shared().redis.url(),
        "postgres": [],
    }]});
    std::fs::write(dir.path().join("cluster.json"), cluster.to_string()).unwrap();

    let before = requests_total(admin_address).await;
    let json_path = dir.path().join("run.json");
    let plot_path = dir.path().join("run.svg");
    let (rate, seconds) = (100.0, 2.0);
    let mix = [
        ("view", 6.0),
        ("add", 2.0),
        ("update", 1.0),
        ("remove", 1.0),
        ("merge", 1.0),
        ("checkout", 1.0),
    ];
    let arguments: Vec<String> = vec![
        "loadgen".into(),
        "--cluster".into(),
        dir.path().display().to_string(),
        "--rate".into(),
        rate.to_string(),
        "--duration".into(),
        "2s".into(),
        "--warmup".into(),
        "500ms".into(),
        "--mix".into(),
        "view=6,add=2,update=1,remove=1,merge=1,checkout=1".into(),
        "--owners".into(),
        "20".into(),
        // The test catalog holds sku-00001 … sku-00200.
        "--items".into(),
        "200".into(),
        "--json".into(),
        json_path.display().to_string(),
        "--plot".into(),
        plot_path.display().to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        cli(&arguments)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loadgen failed: {stderr}\n{stdout}"
    );
    assert!(stdout.contains("p99"), "the final table: {stdout}");
    assert!(
        stderr.contains("req/s answered"),
        "a progress line: {stderr}"
    );

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap())
        .expect("the --json file is JSON");
    let requests = report["requests"].as_f64().expect("requests");
    let expected = rate * seconds;
    assert!(
        (requests - expected).abs() <= 0.1 * expected,
        "requests {requests}, expected about {expected}: {report:#}"
    );
    assert!(report["errors"].is_u64(), "{report:#}");
    assert!(
        report["achieved_rate"].as_f64().expect("achieved_rate") > 0.0,
        "{report:#}"
    );
    let status = report["status"].as_object().expect("status");
    assert!(
        status.get("200").and_then(Value::as_u64).unwrap_or(0) > 0,
        "{report:#}"
    );
    for (code, _) in status {
        assert!(!code.starts_with('5'), "no server errors: {report:#}");
    }
    for kind in ["timeout", "connect", "transport", "in_flight_limit"] {
        assert!(
            report["overall"]["errors_by_kind"].get(kind).is_none(),
            "no {kind} at a modest rate: {report:#}"
        );
    }
    let total_weight: f64 = mix.iter().map(|(_, weight)| weight).sum();
    for (op, weight) in mix {
        let figures = &report["operations"][op];
        let count = figures["count"]
            .as_f64()
            .unwrap_or_else(|| panic!("{op}: {report:#}"));
        let share = requests * weight / total_weight;
        assert!(
            (count - share).abs() <= 2.0,
            "{op}: {count} requests, the mix gives {share}: {report:#}"
        );
        let percentiles: Vec<f64> = ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"]
            .iter()
            .map(|key| {
                figures[*key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{op}.{key}"))
            })
            .collect();
        assert!(percentiles[0] > 0.0, "{op}: {figures}");
        assert!(
            percentiles.windows(2).all(|pair| pair[0] <= pair[1]),
            "{op}: percentiles not monotone: {figures}"
        );
    }

    // The edge counted at least every HTTP request the generator says it sent (warm-up and a
    // merge's guest add included); the counter may trail the last answer by a moment.
    let sent = report["http_requests"].as_f64().expect("http_requests");
    assert!(sent >= requests, "{report:#}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut grown = requests_total(admin_address).await - before;
    while grown < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        grown = requests_total(admin_address).await - before;
    }
    assert!(
        grown >= sent,
        "the edge counted {grown} requests, the generator says it sent {sent}"
    );

    let svg = std::fs::read_to_string(&plot_path).expect("the --plot file");
    assert!(
        svg.trim_start().starts_with("<svg"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    for op in ["view", "checkout"] {
        assert!(svg.contains(op), "the plot names the {op} series");
    }

    // HTTP/2 with prior knowledge, and a baseline measured in the same run (here the edge's
    // own `/ready`): the document carries the baseline's figures and the ratios to them.
    let json_path = dir.path().join("h2.json");
    let arguments: Vec<String> = vec![
        "loadgen".into(),
        "--cluster".into(),
        dir.path().display().to_string(),
        "--rate".into(),
        "50".into(),
        "--duration".into(),
        "1s".into(),
        "--mix".into(),
        "view=1".into(),
        "--http2".into(),
        "--baseline".into(),
        format!("http://{}/ready", app.address),
        "--json".into(),
        json_path.display().to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        cli(&arguments)
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "loadgen --http2 --baseline failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap())
        .expect("the --json file is JSON");
    for document in [&report, &report["baseline"]] {
        let requests = document["requests"].as_f64().expect("requests");
        assert!((requests - 50.0).abs() <= 5.0, "{report:#}");
        assert_eq!(document["errors"], 0, "{report:#}");
        assert_eq!(
            document["status"]["200"].as_f64(),
            Some(requests),
            "{report:#}"
        );
    }
    assert!(
        report["ratio_to_baseline"]["achieved_rate"]
            .as_f64()
            .expect("a rate ratio")
            > 0.0,
        "{report:#}"
    );
    assert!(
        report["ratio_to_baseline"]["operations"]["view"]["p99"]
            .as_f64()
            .is_some(),
        "{report:#}"
    );
    admin_server.abort();
}
