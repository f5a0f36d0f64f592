//! Idempotency keys: replay byte for byte, reuse detection, owner scoping, validation.

use crate::helpers::{h, TestApp};
use http::StatusCode;

const ADD: &str = r#"{"item_id":"sku-00001","quantity":2}"#;

#[tokio::test]
async fn a_retried_request_is_replayed_byte_for_byte_and_applied_once() {
    let app = TestApp::spawn().await;
    let headers = [app.bearer("alice"), h("idempotency-key", "key-1")];
    let first = app
        .send("POST", "/api/v1/cart/items", &headers, Some(ADD))
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.header("idempotent-replayed").is_none());
    let again = app
        .send("POST", "/api/v1/cart/items", &headers, Some(ADD))
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("etag"), first.header("etag"));
    assert_eq!(again.header("cart-version"), first.header("cart-version"));
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00001"),
        2
    );
}

#[tokio::test]
async fn the_same_key_with_a_different_request_returns_422() {
    let app = TestApp::spawn().await;
    let headers = [app.bearer("alice"), h("idempotency-key", "key-2")];
    app.send("POST", "/api/v1/cart/items", &headers, Some(ADD))
        .await;
    let different = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &headers,
            Some(r#"{"item_id":"sku-00001","quantity":3}"#),
        )
        .await;
    assert_eq!(
        (different.status, different.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );
    let other_route = app.send("DELETE", "/api/v1/cart", &headers, None).await;
    assert_eq!(other_route.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00001"),
        2
    );
}

#[tokio::test]
async fn keys_are_scoped_per_owner() {
    let app = TestApp::spawn().await;
    let alice = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[app.bearer("alice"), h("idempotency-key", "shared")],
            Some(ADD),
        )
        .await;
    let bob = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[app.bearer("bob"), h("idempotency-key", "shared")],
            Some(ADD),
        )
        .await;
    assert_eq!(alice.status, StatusCode::OK);
    assert_eq!(bob.status, StatusCode::OK);
    assert!(bob.header("idempotent-replayed").is_none());
    assert_eq!(bob.json()["owner"], "u:bob");
    assert_eq!(
        app.user("bob", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00001"),
        2
    );
}

#[tokio::test]
async fn updates_removes_and_clears_are_idempotent_too() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    app.add("alice", "sku-00002", 1).await;
    for (method, path, body, key) in [
        (
            "PUT",
            "/api/v1/cart/items/sku-00001",
            Some(r#"{"quantity":5}"#),
            "put-1",
        ),
        ("DELETE", "/api/v1/cart/items/sku-00002", None, "delete-1"),
        ("DELETE", "/api/v1/cart", None, "clear-1"),
    ] {
        let headers = [app.bearer("alice"), h("idempotency-key", key)];
        let first = app.send(method, path, &headers, body).await;
        assert_eq!(first.status, StatusCode::OK, "{method} {path}");
        let again = app.send(method, path, &headers, body).await;
        assert_eq!(
            again.status,
            StatusCode::OK,
            "{method} {path}: a replay, not item_not_in_cart"
        );
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.body, first.body);
    }
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .version(),
        5
    );
}

#[tokio::test]
async fn keys_are_recorded_in_the_write_transaction_and_failed_requests_record_none() {
    let app = TestApp::spawn().await;
    let headers = [app.bearer("alice"), h("idempotency-key", "k-fail")];
    let failed = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &headers,
            Some(r#"{"item_id":"sku-zero","quantity":1}"#),
        )
        .await;
    assert_eq!(failed.status, StatusCode::CONFLICT);
    assert_eq!(
        app.query_i64("SELECT count(*) FROM idempotency_keys").await,
        0
    );
    let ok = app
        .send("POST", "/api/v1/cart/items", &headers, Some(ADD))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        app.query_i64(
            "SELECT count(*) FROM idempotency_keys WHERE owner = 'u:alice' AND key = 'k-fail'"
        )
        .await,
        1
    );
}

/// The key's record goes to the server in one round trip with `COMMIT` (`store::tx`): a
/// record the server refuses must take the whole write with it, never let the `COMMIT` behind
/// it keep the cart's change without its answer (a retry would then apply it twice).
#[tokio::test]
async fn a_refused_record_rolls_back_the_write_it_answers_and_a_retry_applies_it_once() {
    let app = TestApp::spawn_keeping_events().await;
    let add = |key: &'static str, item: &'static str| {
        let app = &app;
        async move {
            let body = format!(r#"{{"item_id":"{item}","quantity":1}}"#);
            app.send(
                "POST",
                "/api/v1/cart/items",
                &[app.bearer("alice"), h("idempotency-key", key)],
                Some(&body),
            )
            .await
        }
    };
    let first = add("k-first", "sku-00001").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.version(), 1);

    // The server now refuses this one key's record (after the cart's change ran).
    app.sql("ALTER TABLE idempotency_keys ADD CONSTRAINT refuse_poison CHECK (key <> 'k-poison')")
        .await;
    let refused = add("k-poison", "sku-00002").await;
    assert!(refused.status.is_server_error(), "{:?}", refused.body);
    let state = "SELECT (SELECT version FROM carts WHERE owner = 'u:alice') * 100 \
                 + (SELECT count(*) FROM cart_items WHERE owner = 'u:alice') * 10 \
                 + (SELECT count(*) FROM cart_events WHERE owner = 'u:alice')";
    assert_eq!(
        app.query_i64(state).await,
        111,
        "version 1, one line, one event: the refused write left nothing"
    );

    app.sql("ALTER TABLE idempotency_keys DROP CONSTRAINT refuse_poison")
        .await;
    let retried = add("k-poison", "sku-00002").await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_eq!(retried.version(), 2);
    assert_eq!(retried.quantity_of("sku-00002"), 1);
    assert_eq!(app.query_i64(state).await, 222);
}

#[tokio::test]
async fn malformed_keys_are_rejected_with_400() {
    let app = TestApp::spawn().await;
    for key in ["has space", &"k".repeat(256), "tab\tkey"] {
        let response = app
            .send(
                "POST",
                "/api/v1/cart/items",
                &[app.bearer("alice"), h("idempotency-key", key)],
                Some(ADD),
            )
            .await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(response.error_code(), "invalid_request");
    }
    let longest = "k".repeat(255);
    let ok = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[app.bearer("alice"), h("idempotency-key", &longest)],
            Some(ADD),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
}
