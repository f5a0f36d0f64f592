//! The README's first command, end to end: `local up --detach` brings up three regions, a
//! cross-region write and read-your-writes work, the link can be cut and healed, `local down`
//! stops everything; each edge's JSON log names the traces of forwarded writes and never a
//! session id or token.

use std::process::Command;

use crate::helpers::{cli, local_up, three_free_ports, LOCAL_TEST_PORTS};

/// One HTTP request to a local cluster edge (plain HTTP/1.1): (status, JSON body or null).
pub(crate) async fn http(
    url: &str,
    method: &str,
    headers: &[(&str, String)],
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, json, _) = http_with_headers(url, method, headers, body).await;
    (status, json)
}

/// Like [`http`], with the answer's headers.
async fn http_with_headers(
    url: &str,
    method: &str,
    headers: &[(&str, String)],
    body: Option<&str>,
) -> (u16, serde_json::Value, http::HeaderMap) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.unwrap_or("").to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        parts.headers,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_detach_serves_three_regions_and_local_down_stops_them() {
    let started = local_up("local", LOCAL_TEST_PORTS, &[]);
    let dir = started.cluster.dir.clone();
    let (dir_arg, edge_port, admin_port) =
        (started.dir.clone(), started.edge_port, started.admin_port);
    let stdout = started.stdout.clone();
    assert!(
        stdout.contains(&format!("http://127.0.0.1:{edge_port}/api/v1/cart")),
        "{stdout}"
    );
    assert!(stdout.contains("token --sub"), "{stdout}");
    assert!(stdout.contains("local partition sg th"), "{stdout}");

    let cluster_file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    let regions = cluster_file["regions"].as_array().unwrap();
    let ids: Vec<&str> = regions.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sg", "id", "th"]);
    for (offset, (region, currency)) in regions.iter().zip(["SGD", "IDR", "THB"]).enumerate() {
        let offset = offset as u16;
        assert_eq!(region["currency"], currency);
        assert_eq!(
            region["edge_url"],
            format!("http://127.0.0.1:{}", edge_port + offset)
        );
        assert_eq!(
            region["admin_url"],
            format!("http://127.0.0.1:{}", admin_port + offset)
        );
        assert!(region["redis_url"]
            .as_str()
            .unwrap()
            .starts_with("redis://127.0.0.1:"));
        let postgres = region["postgres"].as_array().unwrap();
        let roles: Vec<&str> = postgres
            .iter()
            .map(|p| p["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["primary", "replica", "replica"]);
        assert_eq!(
            postgres[0]["shards"][0],
            format!("{}-1", region["id"].as_str().unwrap())
        );
        assert!(postgres
            .iter()
            .all(|p| p["dsn"].as_str().unwrap().contains("dbname=cartedge")));
    }

    // Every region sells from its own catalog: the demo items in its primary, priced in its
    // currency only, stock 1000; its region file reads the others' through its replicas.
    for region in regions {
        let id = region["id"].as_str().unwrap();
        let dsn = region["postgres"][0]["dsn"].as_str().unwrap();
        let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        let priced: Vec<(String, i64)> = client
            .query(
                "SELECT currency, count(*) FROM catalog_prices GROUP BY currency",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(
            priced,
            [(region["currency"].as_str().unwrap().to_string(), 10_000)],
            "{id}"
        );
        let stock: i32 = client
            .query_one(
                "SELECT stock FROM catalog_items WHERE item_id = 'sku-10000'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(stock, 1000, "{id}");
        drop(client);
        let _ = driver.await;
        let file: toml::Table = toml::from_str(
            &std::fs::read_to_string(dir.join(format!("regions/{id}.toml"))).unwrap(),
        )
        .unwrap();
        let database = file["database"].as_table().unwrap();
        assert_eq!(database["catalog_primary"].as_str(), Some(dsn), "{id}");
        let mut peers: Vec<&String> = database["peer_catalogs"]
            .as_table()
            .unwrap()
            .keys()
            .collect();
        peers.sort();
        let mut others: Vec<String> = ["id", "sg", "th"]
            .into_iter()
            .filter(|other| *other != id)
            .map(str::to_string)
            .collect();
        others.sort();
        assert_eq!(peers, others.iter().collect::<Vec<_>>(), "{id}");
    }

    // Region files and secrets.json hold the JWT and session secrets: owner-only.
    {
        use std::os::unix::fs::PermissionsExt;
        for file in [
            "regions/sg.toml",
            "regions/id.toml",
            "regions/th.toml",
            "secrets.json",
        ] {
            let mode = std::fs::metadata(dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file} has mode {:o}", mode & 0o777);
        }
    }

    let sg_config = dir.join("regions/sg.toml");
    let token = cli(&[
        "--config",
        sg_config.to_str().unwrap(),
        "token",
        "--sub",
        "alice",
    ]);
    assert!(token.status.success());
    let bearer = vec![(
        "authorization",
        format!("Bearer {}", String::from_utf8(token.stdout).unwrap().trim()),
    )];

    let sg = format!("http://127.0.0.1:{edge_port}");
    let th = format!("http://127.0.0.1:{}", edge_port + 2);
    for item in ["sku-00001", "sku-10000"] {
        let body = format!(r#"{{"item_id":"{item}","quantity":2}}"#);
        let (status, cart) = http(
            &format!("{sg}/api/v1/cart/items"),
            "POST",
            &bearer,
            Some(&body),
        )
        .await;
        assert_eq!(status, 200, "{cart}");
    }
    let (status, cart) = http(&format!("{sg}/api/v1/cart"), "GET", &bearer, None).await;
    assert_eq!(status, 200);
    assert_eq!(cart["total_items"], 4);
    let (status, _) = http(
        &format!("{sg}/api/v1/cart/items/sku-10001"),
        "PUT",
        &bearer,
        Some(r#"{"quantity":1}"#),
    )
    .await;
    assert_eq!(status, 404, "the demo catalog ends at sku-10000");

    // Through th, whichever region is alice's home: the write lands there once, and a read at th
    // carrying the returned version is never older.
    let (status, via_th) = http(
        &format!("{th}/api/v1/cart/items/sku-00001"),
        "PUT",
        &bearer,
        Some(r#"{"quantity":5}"#),
    )
    .await;
    assert_eq!(status, 200, "{via_th}");
    assert_eq!(via_th["total_items"], 7);
    let mut with_version = bearer.clone();
    with_version.push(("cart-min-version", via_th["version"].to_string()));
    let (status, read_at_th) = http(&format!("{th}/api/v1/cart"), "GET", &with_version, None).await;
    assert_eq!(status, 200);
    assert_eq!(read_at_th["version"], via_th["version"]);
    assert_eq!(read_at_th["total_items"], 7);

    // One write per region, each with its own known trace: the two that were forwarded (every
    // region but alice's home) leave their trace id in both the receiving and the home edge's
    // JSON log. A guest write and its session id and the bearer token never reach a log.
    let edge_urls: Vec<String> = (0..3)
        .map(|offset| format!("http://127.0.0.1:{}", edge_port + offset))
        .collect();
    let mut forwarded = Vec::new();
    for (index, (region, url)) in ["sg", "id", "th"].iter().zip(&edge_urls).enumerate() {
        let trace_id = format!("{:032x}", 0x7ace_0000_u128 + index as u128 + 1);
        let mut headers = bearer.clone();
        headers.push(("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01")));
        let (status, _, answer_headers) = http_with_headers(
            &format!("{url}/api/v1/cart/items/sku-00001"),
            "PUT",
            &headers,
            Some(r#"{"quantity":5}"#),
        )
        .await;
        assert_eq!(status, 200);
        let traceresponse = answer_headers["traceresponse"].to_str().unwrap();
        assert!(traceresponse.contains(&trace_id), "{traceresponse}");
        let home = answer_headers["cart-home-region"]
            .to_str()
            .unwrap()
            .to_string();
        if home != *region {
            forwarded.push((region.to_string(), home, trace_id));
        }
    }
    assert_eq!(forwarded.len(), 2, "alice has one home: {forwarded:?}");
    let (status, guest, guest_headers) = http_with_headers(
        &format!("{}/api/v1/cart/items", edge_urls[1]),
        "POST",
        &[],
        Some(r#"{"item_id":"sku-00003","quantity":1}"#),
    )
    .await;
    assert_eq!(status, 200, "{guest}");
    let session = guest_headers["cart-session"].to_str().unwrap().to_string();
    let log_of = |region: &str| -> String {
        let entry = regions.iter().find(|r| r["id"] == region).unwrap();
        std::fs::read_to_string(entry["log"].as_str().expect("cluster.json names the log")).unwrap()
    };
    for (received, home, trace_id) in &forwarded {
        // The home edge logs when its answer is sent: poll its file, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = (false, false);
        for _ in 0..200 {
            let lines_with = |region: &str| {
                log_of(region)
                    .lines()
                    .filter(|line| line.contains(trace_id.as_str()))
                    .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
                    .any(|line| line["message"] == "request" && line["trace_id"] == *trace_id)
            };
            found = (lines_with(received), lines_with(home));
            if found == (true, true) || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(
            found,
            (true, true),
            "trace {trace_id} in the logs of {received} (received) and {home} (home)"
        );
    }
    let token = bearer[0].1.trim_start_matches("Bearer ");
    for region in ["sg", "id", "th"] {
        let log = log_of(region);
        assert!(!log.contains(&session), "{region}'s log holds a session id");
        assert!(!log.contains(token), "{region}'s log holds a token");
        for line in log.lines().filter(|line| line.starts_with('{')) {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(
                line["timestamp"].is_string() && line["level"].is_string(),
                "{line}"
            );
        }
    }

    // SIGHUP applies a new read sampling rate: with every read sampled, a read's line appears.
    let sg_file = dir.join("regions/sg.toml");
    let text = std::fs::read_to_string(&sg_file).unwrap();
    assert!(text.contains("[log]\n"), "{text}");
    std::fs::write(
        &sg_file,
        text.replace("[log]\n", "[log]\nread_sample_rate = 1.0\n"),
    )
    .unwrap();
    let pids: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("pids.json")).unwrap()).unwrap();
    let sg_pid = pids["edges"][0].as_u64().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &sg_pid])
        .status()
        .unwrap()
        .success());
    let read_trace = "0000000000000000000000007eadbeef";
    let mut read_logged = false;
    for _ in 0..100 {
        if log_of("sg").contains("log settings reloaded") {
            let mut headers = bearer.clone();
            headers.push((
                "traceparent",
                format!("00-{read_trace}-00f067aa0ba902b7-01"),
            ));
            let (status, _) = http(&format!("{sg}/api/v1/cart"), "GET", &headers, None).await;
            assert_eq!(status, 200);
            for _ in 0..100 {
                read_logged = log_of("sg").contains(read_trace);
                if read_logged {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(read_logged, "a read after the reload to rate 1 is logged");

    let partition = cli(&["local", "partition", "sg", "th", "--dir", &dir_arg]);
    assert!(
        partition.status.success(),
        "{}",
        String::from_utf8_lossy(&partition.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&partition.stdout).trim(),
        "partitioned sg <-> th"
    );
    let heal = cli(&["local", "heal", "sg", "th", "--dir", &dir_arg]);
    assert!(heal.status.success());
    let unknown = cli(&["local", "partition", "sg", "xx", "--dir", &dir_arg]);
    assert!(!unknown.status.success());

    // `/health` answers from a status probed about once a second: after the heal it turns `ok`
    // within a few probes (bounded wait), and stays 200 throughout.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (status, health) = http(
            &format!("http://127.0.0.1:{admin_port}/health"),
            "GET",
            &[],
            None,
        )
        .await;
        assert_eq!(status, 200, "{health}");
        if health["status"] == "ok" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health did not recover after the heal: {health}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (status, _) = http(
        &format!("http://127.0.0.1:{admin_port}/api/v1/cart"),
        "GET",
        &bearer,
        None,
    )
    .await;
    assert_eq!(status, 404, "the admin listener serves no cart API");

    one_region_down_stops_only_its_own_shoppers(&dir, &dir_arg, edge_port).await;

    let again = cli(&[
        "local",
        "up",
        "--detach",
        "--dir",
        &dir_arg,
        "--edge-port",
        &three_free_ports(0, LOCAL_TEST_PORTS).to_string(),
        "--admin-port",
        &three_free_ports(edge_port + 3, LOCAL_TEST_PORTS).to_string(),
    ]);
    assert!(
        !again.status.success(),
        "a second up in the same dir is refused"
    );

    let down = cli(&["local", "down", "--dir", &dir_arg]);
    assert!(down.status.success());
    assert!(
        !dir.join("cluster.json").exists(),
        "cluster.json describes only a running cluster"
    );
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", edge_port))
        .await
        .is_err());
    drop(started);
}

/// A bearer header for `sub` whose token homes it in `region` (minted by `cartedge token`).
fn homed_bearer(dir: &std::path::Path, sub: &str, region: &str) -> (&'static str, String) {
    let config = dir.join("regions/sg.toml");
    let token = cli(&[
        "--config",
        config.to_str().unwrap(),
        "token",
        "--sub",
        sub,
        "--region",
        region,
    ]);
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    (
        "authorization",
        format!("Bearer {}", String::from_utf8(token.stdout).unwrap().trim()),
    )
}

/// A request of the drill: method, URL, body, extra headers.
type Step<'a> = (&'a str, String, Option<&'a str>, Vec<(&'a str, String)>);

/// The issue's fault-isolation drill: with `sg` cut from every other region, shoppers homed in
/// `id` and `th` add, update, merge and check out at their home edges without one failed
/// request; a shopper homed in `sg` adding at `th` has the add parked there (202), any other
/// write of theirs at `th` is refused fast with 503 `home_region_unavailable`; reads keep
/// working everywhere.
async fn one_region_down_stops_only_its_own_shoppers(
    dir: &std::path::Path,
    dir_arg: &str,
    edge_port: u16,
) {
    let edge = |region: &str| {
        let offset = ["sg", "id", "th"]
            .iter()
            .position(|r| *r == region)
            .unwrap();
        format!("http://127.0.0.1:{}", edge_port + offset as u16)
    };
    // Before the cut: each shopper's guest cart, started at their home edge, and a cart of a
    // shopper homed in sg.
    let mut guests = Vec::new();
    for region in ["id", "th"] {
        let (status, guest, headers) = http_with_headers(
            &format!("{}/api/v1/cart/items", edge(region)),
            "POST",
            &[],
            Some(r#"{"item_id":"sku-00007","quantity":2}"#),
        )
        .await;
        assert_eq!(status, 200, "{guest}");
        assert_eq!(headers["cart-home-region"], region);
        guests.push(headers["cart-session"].to_str().unwrap().to_string());
    }
    let singaporean = vec![homed_bearer(dir, "isolation-sg", "sg")];
    let (status, cart) = http(
        &format!("{}/api/v1/cart/items", edge("sg")),
        "POST",
        &singaporean,
        Some(r#"{"item_id":"sku-00005","quantity":1}"#),
    )
    .await;
    assert_eq!(status, 200, "{cart}");

    for other in ["id", "th"] {
        let cut = cli(&["local", "partition", "sg", other, "--dir", dir_arg]);
        assert!(cut.status.success());
    }

    for (region, session) in ["id", "th"].into_iter().zip(&guests) {
        let url = edge(region);
        let bearer = vec![homed_bearer(dir, &format!("isolation-{region}"), region)];
        let steps: [Step; 4] = [
            (
                "POST",
                format!("{url}/api/v1/cart/items"),
                Some(r#"{"item_id":"sku-00001","quantity":2}"#),
                vec![],
            ),
            (
                "PUT",
                format!("{url}/api/v1/cart/items/sku-00001"),
                Some(r#"{"quantity":3}"#),
                vec![],
            ),
            (
                "POST",
                format!("{url}/api/v1/cart/merge"),
                None,
                vec![("cart-session", session.clone())],
            ),
            (
                "POST",
                format!("{url}/api/v1/cart/checkout"),
                None,
                vec![("idempotency-key", format!("isolation-{region}"))],
            ),
        ];
        for (method, target, body, extra) in steps {
            let mut headers = bearer.clone();
            headers.extend(extra);
            let (status, answer, answer_headers) =
                http_with_headers(&target, method, &headers, body).await;
            assert!(
                (200..300).contains(&status),
                "{method} {target} for a shopper homed in {region}, sg cut off: {status} {answer}"
            );
            assert_eq!(
                answer_headers["cart-home-region"], region,
                "{method} {target}"
            );
        }
    }

    // The shopper homed in sg, at th: an add is parked there (issue 16) and shown back; a
    // quantity update is refused fast, with a retry hint; reads still answer.
    let (status, parked, headers) = http_with_headers(
        &format!("{}/api/v1/cart/items", edge("th")),
        "POST",
        &singaporean,
        Some(r#"{"item_id":"sku-00005","quantity":1}"#),
    )
    .await;
    assert_eq!(status, 202, "{parked}");
    assert_eq!(headers["cart-write-pending"], "1");
    assert!(
        parked["warnings"].as_array().is_some_and(|all| all
            .iter()
            .any(|w| w["code"] == "write_pending" && w["item_id"] == "sku-00005")),
        "{parked}"
    );
    let (status, refused, headers) = http_with_headers(
        &format!("{}/api/v1/cart/items/sku-00005", edge("th")),
        "PUT",
        &singaporean,
        Some(r#"{"quantity":3}"#),
    )
    .await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"]["code"], "home_region_unavailable");
    assert!(headers.contains_key("retry-after"));
    for region in ["sg", "id", "th"] {
        let (status, cart) = http(
            &format!("{}/api/v1/cart", edge(region)),
            "GET",
            &singaporean,
            None,
        )
        .await;
        assert_eq!(status, 200, "read at {region}: {cart}");
    }
    for other in ["id", "th"] {
        let heal = cli(&["local", "heal", "sg", other, "--dir", dir_arg]);
        assert!(heal.status.success());
    }
}
