//! The README's first command, end to end: `local up --detach`, curl-like calls, `local down`.

use std::path::PathBuf;
use std::process::Command;

use crate::helpers::defaults_path;
use cartedge::local::procs::free_port;

struct Cluster {
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Detached servers outlive the test process: always stop them.
        let _ = Command::new(env!("CARGO_BIN_EXE_cartedge"))
            .args(["local", "down", "--dir"])
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn http(
    url: &str,
    method: &str,
    token: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let mut request = http::Request::builder().method(method).uri(url);
    if !token.is_empty() {
        request = request.header("authorization", format!("Bearer {token}"));
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
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn local_up_detach_serves_the_demo_catalog_and_local_down_stops_it() {
    let dir = std::env::temp_dir().join(format!("cartedge-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = Cluster { dir: dir.clone() };
    let (edge_port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let up = Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .arg("--defaults")
        .arg(defaults_path())
        .args(["local", "up", "--detach", "--dir"])
        .arg(&dir)
        .args([
            "--edge-port",
            &edge_port.to_string(),
            "--admin-port",
            &admin_port.to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(
        stdout.contains(&format!("http://127.0.0.1:{edge_port}/api/v1/cart")),
        "{stdout}"
    );
    assert!(stdout.contains("token --sub alice"), "{stdout}");

    let cluster_file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    let region = &cluster_file["regions"][0];
    assert_eq!(region["id"], "sg");
    assert_eq!(region["currency"], "SGD");
    assert_eq!(region["edge_url"], format!("http://127.0.0.1:{edge_port}"));
    assert_eq!(
        region["admin_url"],
        format!("http://127.0.0.1:{admin_port}")
    );
    assert!(region["redis_url"]
        .as_str()
        .unwrap()
        .starts_with("redis://127.0.0.1:"));
    assert_eq!(region["postgres"][0]["role"], "primary");
    assert!(region["postgres"][0]["shards"].is_array());
    assert!(region["postgres"][0]["dsn"]
        .as_str()
        .unwrap()
        .contains("dbname=cartedge"));

    let token = Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .arg("--defaults")
        .arg(defaults_path())
        .arg("--config")
        .arg(dir.join("regions/sg.toml"))
        .args(["token", "--sub", "alice"])
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();

    let edge = format!("http://127.0.0.1:{edge_port}");
    for item in ["sku-00001", "sku-10000"] {
        let body = format!(r#"{{"item_id":"{item}","quantity":2}}"#);
        let (status, cart) = http(
            &format!("{edge}/api/v1/cart/items"),
            "POST",
            &token,
            Some(&body),
        )
        .await;
        assert_eq!(status, 200, "{cart}");
    }
    let (status, cart) = http(&format!("{edge}/api/v1/cart"), "GET", &token, None).await;
    assert_eq!(status, 200);
    assert_eq!(cart["total_items"], 4);
    assert_eq!(cart["currency"], "SGD");
    let (status, _) = http(
        &format!("{edge}/api/v1/cart/items/sku-10001"),
        "PUT",
        &token,
        Some(r#"{"quantity":1}"#),
    )
    .await;
    assert_eq!(status, 404, "the demo catalog ends at sku-10000");
    let (status, health) = http(
        &format!("http://127.0.0.1:{admin_port}/health"),
        "GET",
        "",
        None,
    )
    .await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, _) = http(
        &format!("http://127.0.0.1:{admin_port}/api/v1/cart"),
        "GET",
        &token,
        None,
    )
    .await;
    assert_eq!(status, 404, "the admin listener serves no cart API");

    let again = Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .args(["local", "up", "--detach", "--dir"])
        .arg(&dir)
        .args([
            "--edge-port",
            &free_port().unwrap().to_string(),
            "--admin-port",
            &free_port().unwrap().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "a second up in the same dir is refused"
    );

    let down = Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .args(["local", "down", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(down.status.success());
    assert!(
        !dir.join("cluster.json").exists(),
        "cluster.json describes only a running cluster"
    );
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", edge_port))
        .await
        .is_err());
    drop(cluster);
}
