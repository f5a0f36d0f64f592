//! Hostile HTTP on raw sockets: too many headers, conflicting framing, slow clients, floods.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, TestOptions};

/// Sends raw bytes and reads until the server closes or `limit` passes.
async fn exchange(app: &TestApp, request: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).to_string()
}

#[tokio::test]
async fn a_request_with_101_headers_gets_431() {
    let app = TestApp::spawn().await;
    let mut request = String::from("GET /api/v1/cart HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for n in 0..101 {
        request.push_str(&format!("X-Filler-{n}: y\r\n"));
    }
    request.push_str("\r\n");
    let answer = exchange(&app, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

/// A signed-in add of one `sku-00001`, framed by `framing` (header lines) and `body`.
fn add_request(token: &str, framing: &str, body: &str) -> String {
    format!(
        "POST /api/v1/cart/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\n{framing}\r\n{body}"
    )
}

const ADD_ONE: &str = r#"{"item_id":"sku-00001","quantity":1}"#;

/// `ADD_ONE` as a valid chunked body: two chunks and the last chunk.
fn chunked_add_one() -> String {
    let (first, second) = ADD_ONE.split_at(10);
    format!(
        "{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
        first.len(),
        second.len()
    )
}

#[tokio::test]
async fn content_length_with_a_valid_chunked_body_gets_400_and_nothing_pipelined_behind_it_runs() {
    let app = TestApp::spawn().await;
    let token = app.token("alice");
    let conflicting = add_request(
        &token,
        &format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            ADD_ONE.len()
        ),
        &chunked_add_one(),
    );
    let pipelined = add_request(
        &token,
        &format!("Content-Length: {}\r\nConnection: close\r\n", ADD_ONE.len()),
        ADD_ONE,
    );
    let answer = exchange(
        &app,
        format!("{conflicting}{pipelined}").as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"invalid_request\""), "{answer}");
    assert_eq!(
        answer.matches("HTTP/1.1 ").count(),
        1,
        "one answer: {answer}"
    );
    assert_eq!(app.query_i64("SELECT count(*) FROM cart_items").await, 0);

    // The control: the same chunked body without Content-Length is a valid add, and so is the
    // request pipelined behind it, so the refusal above is the framing's.
    let chunked = add_request(&token, "Transfer-Encoding: chunked\r\n", &chunked_add_one());
    let answer = exchange(
        &app,
        format!("{chunked}{pipelined}").as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    assert_eq!(
        app.query_i64("SELECT quantity::bigint FROM cart_items WHERE owner = 'u:alice'")
            .await,
        2
    );
}

#[tokio::test]
async fn a_client_sending_its_head_a_byte_at_a_time_is_closed_at_the_header_timeout() {
    let app = TestApp::spawn_with(TestOptions {
        overlay: "[server]\nheader_read_timeout = \"1s\"\n".into(),
        ..TestOptions::default()
    })
    .await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let head = b"GET /api/v1/cart HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut closed = false;
    // Bounded: at most 20 bytes, 500 ms apart (10 s), far past the 1 s timeout.
    for byte in head.iter().cycle().take(20) {
        if stream.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buffer = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {
                // A 408 answer before closing is fine too.
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the slow client was disconnected");
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let app = TestApp::spawn_with(TestOptions {
        overlay: "[server]\nmax_connections = 3\n".into(),
        ..TestOptions::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        stream
            .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    // The fourth connection is not served while three are open…
    let mut waiting = TcpStream::connect(app.address).await.unwrap();
    waiting
        .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buffer)).await;
    assert!(early.is_err(), "served past the connection cap");
    // …and is served once one closes.
    drop(held.pop());
    let read = tokio::time::timeout(Duration::from_secs(10), waiting.read(&mut buffer))
        .await
        .expect("served after a slot freed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
}
