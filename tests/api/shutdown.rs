//! Graceful shutdown: readiness turns off, in-flight requests finish, the process exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    defaults_path, fresh_database, shared, test_config_text, TestApp, TestOptions,
};
use http::StatusCode;

#[tokio::test]
async fn shutdown_turns_readiness_off_and_lets_in_flight_requests_finish() {
    let mut app = TestApp::spawn_with(TestOptions {
        overlay: "[server]\ndrain_grace = \"1500ms\"\n".into(),
        ..TestOptions::default()
    })
    .await;
    let body = r#"{"item_id":"sku-00001","quantity":3}"#;
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    // `Expect: 100-continue`: the server answers `100 Continue` when the handler starts reading
    // the body, which tells the test the request is in flight before shutdown begins.
    let head = format!(
        "POST /api/v1/cart/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        app.token("alice"),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut interim))
        .await
        .expect("the handler started reading the body")
        .unwrap();
    let interim = String::from_utf8_lossy(&interim[..read]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(&body.as_bytes()[..10]).await.unwrap();

    app.trigger_shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    let ready = loop {
        let ready = app.send("GET", "/ready", &[], None).await;
        if ready.status != StatusCode::OK || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "readiness is off while draining"
    );

    stream.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("in-flight request answered")
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"quantity\":3"), "{response}");
    app.join_server().await;
    assert!(
        tokio::net::TcpStream::connect(app.address).await.is_err(),
        "listener closed after draining"
    );
}

#[tokio::test]
async fn the_binary_exits_zero_on_sigterm() {
    let shared = shared();
    let (database, dsn) = fresh_database().await;
    let port = cartedge_dev::procs::free_port().unwrap();
    let overlay = format!("[server]\nlisten = \"127.0.0.1:{port}\"\ndrain_grace = \"100ms\"\n");
    let text = test_config_text(
        &dsn,
        &shared.redis.url(),
        &format!("{database}:cart:"),
        &overlay,
    );
    let file = shared.dir.path().join(format!("{database}.toml"));
    std::fs::write(&file, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .arg("--defaults")
        .arg(defaults_path())
        .arg("--config")
        .arg(&file)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut up = false;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "edge came up");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "edge did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
