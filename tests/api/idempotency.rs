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
