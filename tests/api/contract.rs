//! The contract's edges: health checks that cost nothing per call, and requests whose meaning
//! is ambiguous or whose answer used to mislead (a stalled body, repeated parameters, missing
//! credentials on order settlement, serde's vocabulary in messages, encoded bodies, HEAD).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{h, TestApp, TestOptions};

#[tokio::test]
async fn health_answers_from_a_status_probed_in_the_background_at_most_once_a_second() {
    let app = TestApp::spawn().await;
    let started = Instant::now();
    let mut probes_seen = HashSet::new();
    for _ in 0..40 {
        let health = app.send("GET", "/health", &[], None).await;
        assert_eq!(health.status, StatusCode::OK);
        assert_eq!(health.json()["database"], "ok");
        probes_seen.insert(health.json()["timestamp"].as_str().unwrap().to_string());
    }
    let seconds = started.elapsed().as_secs();
    assert!(
        probes_seen.len() as u64 <= seconds + 2,
        "40 calls in {seconds} s saw {} distinct probes: each call queried the databases",
        probes_seen.len()
    );
}

#[tokio::test]
async fn public_health_and_ready_are_limited_per_client_ip_but_the_admin_listeners_are_not() {
    let app = TestApp::spawn_with(TestOptions {
        overlay: "[rate_limit]\nenabled = true\nanonymous = { per_second = 1, burst = 3 }\n".into(),
        ..TestOptions::default()
    })
    .await;
    for path in ["/health", "/ready", "/health"] {
        assert_eq!(
            app.send("GET", path, &[], None).await.status,
            StatusCode::OK
        );
    }
    for path in ["/health", "/ready"] {
        let limited = app.send("GET", path, &[], None).await;
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert_eq!(limited.error_code(), "rate_limited");
        assert!(limited.header("retry-after").is_some());
    }

    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = admin.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cartedge::server::run_admin(admin, app.app.clone(), async {
        let _ = stopped.await;
    }));
    for _ in 0..10 {
        let answer = raw(
            address,
            b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let _ = stop.send(());
    let _ = server.await;
}

/// Sends raw bytes and reads until the server closes (bounded).
async fn raw(address: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_408_request_timeout_not_a_dependency_outage() {
    let app = TestApp::spawn_with(TestOptions {
        overlay: "[server]\nrequest_timeout = \"1s\"\n".into(),
        ..TestOptions::default()
    })
    .await;
    let token = app.token("alice");
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/cart/items HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"item_id\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );
}

/// A request: method, path, headers, body.
type Case<'a> = (&'a str, &'a str, Vec<(String, String)>, Option<&'a str>);

#[tokio::test]
async fn repeated_parameters_and_headers_are_400_never_first_wins() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    let token = format!("Bearer {}", app.token("alice"));
    let body = r#"{"item_id":"sku-00001","quantity":1}"#;
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/api/v1/cart?user_id=alice&user_id=bob",
            vec![h("authorization", &token)],
            None,
        ),
        (
            "POST",
            "/api/v1/cart/items?user_id=bob",
            vec![h("authorization", &token)],
            Some(r#"{"item_id":"sku-00001","quantity":1,"user_id":"alice"}"#),
        ),
        (
            "POST",
            "/api/v1/cart/items",
            vec![
                h("authorization", &token),
                h("idempotency-key", "k1"),
                h("idempotency-key", "k2"),
            ],
            Some(body),
        ),
        (
            "GET",
            "/api/v1/cart",
            vec![h("authorization", &token), h("authorization", &token)],
            None,
        ),
        (
            "GET",
            "/api/v1/cart",
            vec![
                h("authorization", &token),
                h("cart-min-version", "1"),
                h("cart-min-version", "2"),
            ],
            None,
        ),
        (
            "DELETE",
            "/api/v1/cart",
            vec![
                h("authorization", &token),
                h("if-match", "\"1\""),
                h("if-match", "\"2\""),
            ],
            None,
        ),
        (
            "GET",
            "/api/v1/cart",
            vec![h("cart-session", "a"), h("cart-session", "b")],
            None,
        ),
    ];
    for (method, path, headers, body) in cases {
        let answer = app.send(method, path, &headers, body).await;
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{method} {path} {headers:?}"
        );
    }
    // Nothing was applied by any of them.
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .version(),
        1
    );
    // Agreeing body and query are fine.
    let agreeing = app
        .send(
            "POST",
            "/api/v1/cart/items?user_id=alice",
            &[h("authorization", &token)],
            Some(r#"{"item_id":"sku-00001","quantity":1,"user_id":"alice"}"#),
        )
        .await;
    assert_eq!(agreeing.status, StatusCode::OK);
}

#[tokio::test]
async fn settling_an_order_without_a_token_is_401_with_a_challenge() {
    let app = TestApp::spawn().await;
    for action in ["confirm", "cancel"] {
        let answer = app
            .send(
                "POST",
                &format!("/api/v1/orders/sg-1.x/{action}"),
                &[],
                None,
            )
            .await;
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (StatusCode::UNAUTHORIZED, "unauthenticated"),
            "{action}"
        );
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
    }
}

#[tokio::test]
async fn body_errors_name_the_field_in_the_apis_words() {
    let app = TestApp::spawn().await;
    let token = h("authorization", &format!("Bearer {}", app.token("alice")));
    let cases = [
        (
            r#"["sku-00001",1,null,null,null]"#,
            "body must be a JSON object",
        ),
        (
            r#"{"item_id":"sku-00001","quantity":1,"price":{"amount_minor":"1"}}"#,
            "field `price`",
        ),
        (
            r#"{"item_id":"sku-00001","quantity":true}"#,
            "field `quantity`: expected an integer from 1 to 999",
        ),
    ];
    for (body, expected) in cases {
        let answer = app
            .send(
                "POST",
                "/api/v1/cart/items",
                std::slice::from_ref(&token),
                Some(body),
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        let message = answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains(expected), "{body}: {message}");
        assert!(
            !message.contains("struct") && !message.contains("i64"),
            "{body}: {message}"
        );
    }
}

#[tokio::test]
async fn an_encoded_body_is_415_and_head_answers_like_get_without_the_body() {
    let app = TestApp::spawn().await;
    let token = h("authorization", &format!("Bearer {}", app.token("alice")));
    let gzip = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[token.clone(), h("content-encoding", "gzip")],
            Some(r#"{"item_id":"sku-00001","quantity":1}"#),
        )
        .await;
    assert_eq!(
        (gzip.status, gzip.error_code().as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    assert!(gzip.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("content-encoded"));
    let identity = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[token.clone(), h("content-encoding", "identity")],
            Some(r#"{"item_id":"sku-00001","quantity":1}"#),
        )
        .await;
    assert_eq!(identity.status, StatusCode::OK);

    let get = app
        .send("GET", "/api/v1/cart", std::slice::from_ref(&token), None)
        .await;
    let head = app
        .send("HEAD", "/api/v1/cart", std::slice::from_ref(&token), None)
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("etag"), get.header("etag"));
    assert_eq!(head.header("cart-version"), Some("1"));
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    let health = app.send("HEAD", "/health", &[], None).await;
    assert_eq!(health.status, StatusCode::OK);
    let wrong = app.send("POST", "/api/v1/cart", &[token], None).await;
    assert_eq!(wrong.header("allow"), Some("GET, HEAD, DELETE"));
}
