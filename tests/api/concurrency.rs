//! Concurrent writers: adds sum exactly; one idempotency key executes once.

use crate::helpers::{h, TestApp};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_concurrent_adds_of_one_give_exactly_one_hundred() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.add("alice", "sku-00001", 1).await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let cart = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(cart.quantity_of("sku-00001"), 100);
    assert_eq!(cart.version(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_sent_concurrently_executes_exactly_once() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let response = app
                .send(
                    "POST",
                    "/api/v1/cart/items",
                    &[app.bearer("alice"), h("idempotency-key", "double-click-1")],
                    Some(r#"{"item_id":"sku-00001","quantity":2}"#),
                )
                .await;
            (
                response.status,
                response.header("idempotent-replayed").is_some(),
                response.body.clone(),
            )
        }));
    }
    let mut executed = Vec::new();
    let mut in_progress = 0;
    for task in tasks {
        let (status, replayed, body) = task.await.unwrap();
        match status {
            StatusCode::OK => executed.push((replayed, body)),
            StatusCode::CONFLICT => in_progress += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(!executed.is_empty());
    assert_eq!(executed.len() + in_progress, 20);
    assert_eq!(
        executed.iter().filter(|(replayed, _)| !replayed).count(),
        1,
        "exactly one execution"
    );
    assert!(
        executed.windows(2).all(|pair| pair[0].1 == pair[1].1),
        "every success carries the same body"
    );
    let cart = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(cart.quantity_of("sku-00001"), 2);
    assert_eq!(cart.version(), 1);
}
