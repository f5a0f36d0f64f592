//! The cart API's success paths and every client error code.

use crate::helpers::{h, TestApp, TestOptions, TestResponse};
use cartedge::metrics::Format;
use http::StatusCode;

#[tokio::test]
async fn a_new_user_sees_an_empty_cart_at_version_0_with_contract_headers() {
    let app = TestApp::spawn().await;
    let response = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(response.status, StatusCode::OK);
    let body = response.json();
    assert_eq!(body["owner"], "u:alice");
    assert_eq!(body["version"], 0);
    assert_eq!(body["items"], serde_json::json!([]));
    assert_eq!(body["currency"], "SGD");
    assert_eq!(body["total_items"], 0);
    assert_eq!(
        body["total_price"],
        serde_json::json!({"amount_minor": 0, "currency": "SGD"})
    );
    assert_eq!(response.header("etag"), Some("\"0\""));
    assert_eq!(response.header("cart-version"), Some("0"));
    assert_eq!(response.header("cart-region"), Some("sg"));
    assert!(matches!(
        response.header("cart-source"),
        Some("cache" | "replica" | "primary")
    ));
    assert_eq!(response.header("cache-control"), Some("no-store"));
    assert_eq!(app.query_i64("SELECT count(*) FROM carts").await, 0);
}

#[tokio::test]
async fn add_item_captures_the_catalog_price_and_totals_the_cart() {
    let app = TestApp::spawn().await;
    let price = app
        .query_i64("SELECT amount_minor FROM catalog_prices WHERE item_id = 'sku-00001' AND currency = 'SGD'")
        .await;
    let response = app
        .user(
            "alice",
            "POST",
            "/api/v1/cart/items",
            Some(r#"{"item_id":"sku-00001","quantity":2,"variant":{"size":"M"}}"#),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    let body = response.json();
    assert_eq!(body["version"], 1);
    assert_eq!(response.header("cart-version"), Some("1"));
    assert_eq!(response.header("etag"), Some("\"1\""));
    let line = &body["items"][0];
    assert_eq!(line["item_id"], "sku-00001");
    assert_eq!(line["quantity"], 2);
    assert_eq!(line["variant"], serde_json::json!({"size": "M"}));
    assert_eq!(line["unit_price"]["amount_minor"], price);
    assert_eq!(line["unit_price"]["currency"], "SGD");
    assert_eq!(line["current_price"]["amount_minor"], price);
    assert_eq!(line["price_changed"], false);
    assert!(line["added_at"].is_string() && line["updated_at"].is_string());
    assert_eq!(body["total_items"], 2);
    assert_eq!(body["total_price"]["amount_minor"], price * 2);
    assert_eq!(body["warnings"], serde_json::json!([]));
    assert_eq!(response.header("cart-home-region"), Some("sg"));
    let bound = app.app.auth.load().min_version_cookie("u:alice", 1);
    assert_eq!(
        response.cookie("cart_min_version"),
        Some(format!("cart_min_version={bound}; Path=/; SameSite=Lax"))
    );

    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(view.json()["items"], body["items"]);
}

#[tokio::test]
async fn two_adds_of_one_to_a_line_holding_two_give_four() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00002", 2).await;
    app.add("alice", "sku-00002", 1).await;
    let response = app.add("alice", "sku-00002", 1).await;
    assert_eq!(response.quantity_of("sku-00002"), 4);
    assert_eq!(response.version(), 3);
}

#[tokio::test]
async fn update_remove_and_clear_change_the_cart_and_bump_its_version() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    app.add("alice", "sku-00002", 1).await;
    let updated = app
        .user(
            "alice",
            "PUT",
            "/api/v1/cart/items/sku-00001",
            Some(r#"{"quantity":7}"#),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.quantity_of("sku-00001"), 7);
    assert_eq!(updated.version(), 3);
    let removed = app
        .user("alice", "DELETE", "/api/v1/cart/items/sku-00002", None)
        .await;
    assert_eq!(removed.status, StatusCode::OK);
    assert_eq!(removed.quantity_of("sku-00002"), 0);
    assert_eq!(removed.json()["items"].as_array().unwrap().len(), 1);
    let cleared = app.user("alice", "DELETE", "/api/v1/cart", None).await;
    assert_eq!(cleared.status, StatusCode::OK);
    assert_eq!(cleared.json()["items"], serde_json::json!([]));
    assert_eq!(cleared.version(), 5);
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(view.version(), 5);
    assert_eq!(view.json()["total_items"], 0);
}

#[tokio::test]
async fn the_seed_paths_reach_the_same_handlers() {
    let app = TestApp::spawn().await;
    let added = app
        .user(
            "alice",
            "POST",
            "/cart/items",
            Some(r#"{"item_id":"sku-00003","quantity":1}"#),
        )
        .await;
    assert_eq!(added.status, StatusCode::OK);
    let updated = app
        .user(
            "alice",
            "PUT",
            "/cart/items/sku-00003",
            Some(r#"{"quantity":3}"#),
        )
        .await;
    assert_eq!(updated.quantity_of("sku-00003"), 3);
    let prefixed = app.user("alice", "GET", "/api/v1/cart", None).await;
    let seed = app.user("alice", "GET", "/cart", None).await;
    assert_eq!(prefixed.json()["items"], seed.json()["items"]);
    let removed = app
        .user("alice", "DELETE", "/cart/items/sku-00003", None)
        .await;
    assert_eq!(removed.quantity_of("sku-00003"), 0);
    let cleared = app.user("alice", "DELETE", "/cart", None).await;
    assert_eq!(cleared.status, StatusCode::OK);
}

#[tokio::test]
async fn update_and_remove_of_an_absent_line_return_404_item_not_in_cart() {
    let app = TestApp::spawn().await;
    let put = app
        .user(
            "alice",
            "PUT",
            "/api/v1/cart/items/sku-00001",
            Some(r#"{"quantity":1}"#),
        )
        .await;
    assert_eq!(
        (put.status, put.error_code().as_str()),
        (StatusCode::NOT_FOUND, "item_not_in_cart")
    );
    app.add("alice", "sku-00001", 1).await;
    let delete = app
        .user("alice", "DELETE", "/api/v1/cart/items/sku-00002", None)
        .await;
    assert_eq!(
        (delete.status, delete.error_code().as_str()),
        (StatusCode::NOT_FOUND, "item_not_in_cart")
    );
    // Nothing was half-applied: the failed writes did not bump the version.
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .version(),
        1
    );
}

#[tokio::test]
async fn unknown_and_inactive_items_return_404_unknown_item() {
    let app = TestApp::spawn().await;
    for item in ["sku-99999", "sku-inactive"] {
        let response = app.add("alice", item, 1).await;
        assert_eq!(
            (response.status, response.error_code().as_str()),
            (StatusCode::NOT_FOUND, "unknown_item"),
            "{item}"
        );
    }
    assert_eq!(app.query_i64("SELECT count(*) FROM cart_items").await, 0);
}

#[tokio::test]
async fn a_tampered_client_price_returns_409_price_mismatch_with_the_current_price() {
    let app = TestApp::spawn().await;
    let price = app
        .query_i64("SELECT amount_minor FROM catalog_prices WHERE item_id = 'sku-00004' AND currency = 'SGD'")
        .await;
    let body =
        r#"{"item_id":"sku-00004","quantity":1,"price":{"amount_minor":1,"currency":"SGD"}}"#;
    let response = app
        .user("alice", "POST", "/api/v1/cart/items", Some(body))
        .await;
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (StatusCode::CONFLICT, "price_mismatch")
    );
    assert_eq!(
        response.json()["error"]["details"]["current_price"],
        serde_json::json!({"amount_minor": price, "currency": "SGD"})
    );
    assert_eq!(app.query_i64("SELECT count(*) FROM cart_items").await, 0);
    let honest = format!(
        r#"{{"item_id":"sku-00004","quantity":1,"price":{{"amount_minor":{price},"currency":"SGD"}}}}"#
    );
    let ok = app
        .user("alice", "POST", "/api/v1/cart/items", Some(&honest))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn sold_out_items_are_refused_and_low_stock_is_a_warning() {
    let app = TestApp::spawn().await;
    let zero = app.add("alice", "sku-zero", 1).await;
    assert_eq!(
        (zero.status, zero.error_code().as_str()),
        (StatusCode::CONFLICT, "out_of_stock")
    );
    let low = app.add("alice", "sku-low", 5).await;
    assert_eq!(low.status, StatusCode::OK);
    assert_eq!(low.quantity_of("sku-low"), 5);
    let warnings = low.json()["warnings"].clone();
    assert_eq!(warnings[0]["code"], "low_stock");
    assert_eq!(warnings[0]["item_id"], "sku-low");
}

#[tokio::test]
async fn a_line_never_passes_999_units() {
    let app = TestApp::spawn().await;
    assert_eq!(
        app.add("alice", "sku-00001", 999).await.status,
        StatusCode::OK
    );
    let over = app.add("alice", "sku-00001", 1).await;
    assert_eq!(
        (over.status, over.error_code().as_str()),
        (StatusCode::CONFLICT, "quantity_limit")
    );
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00001"),
        999
    );
}

#[tokio::test]
async fn a_cart_holds_at_most_max_lines_lines() {
    let app = TestApp::spawn_with(TestOptions {
        overlay: "[cart]\nmax_lines = 2\n".into(),
        ..TestOptions::default()
    })
    .await;
    app.add("alice", "sku-00001", 1).await;
    app.add("alice", "sku-00002", 1).await;
    let third = app.add("alice", "sku-00003", 1).await;
    assert_eq!(
        (third.status, third.error_code().as_str()),
        (StatusCode::CONFLICT, "cart_full")
    );
    assert_eq!(third.json()["error"]["details"]["max_lines"], 2);
    // Adding to an existing line is still fine.
    assert_eq!(
        app.add("alice", "sku-00002", 1).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_item_without_a_price_in_the_cart_currency_returns_409_currency_mismatch() {
    let app = TestApp::spawn().await;
    let response = app.add("alice", "sku-thb-only", 1).await;
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (StatusCode::CONFLICT, "currency_mismatch")
    );
}

#[tokio::test]
async fn malformed_bodies_return_400_invalid_request() {
    let app = TestApp::spawn().await;
    let deep = r#"{"item_id":"sku-00001","quantity":1,"variant":{"a":{"b":{"c":{"d":{}}}}}}"#;
    let large = format!(
        r#"{{"item_id":"sku-00001","quantity":1,"variant":{{"a":"{}"}}}}"#,
        "x".repeat(1100)
    );
    let cases: Vec<(&str, String)> = vec![
        ("malformed", "{\"item_id\":".into()),
        (
            "unknown field",
            r#"{"item_id":"sku-00001","quantity":1,"colour":"red"}"#.into(),
        ),
        (
            "wrong type",
            r#"{"item_id":"sku-00001","quantity":"1"}"#.into(),
        ),
        (
            "fractional",
            r#"{"item_id":"sku-00001","quantity":1.5}"#.into(),
        ),
        ("zero", r#"{"item_id":"sku-00001","quantity":0}"#.into()),
        (
            "too many",
            r#"{"item_id":"sku-00001","quantity":1000}"#.into(),
        ),
        (
            "negative",
            r#"{"item_id":"sku-00001","quantity":-1}"#.into(),
        ),
        (
            "bad item id",
            r#"{"item_id":"sku 1/..","quantity":1}"#.into(),
        ),
        ("missing item", r#"{"quantity":1}"#.into()),
        (
            "variant not object",
            r#"{"item_id":"sku-00001","quantity":1,"variant":"M"}"#.into(),
        ),
        ("variant too deep", deep.into()),
        ("variant too large", large),
        // PostgreSQL's jsonb cannot hold U+0000: refused up front, never a 500.
        (
            "variant string with NUL",
            r#"{"item_id":"sku-00001","quantity":1,"variant":{"size":"M\u0000"}}"#.into(),
        ),
        (
            "variant key with NUL",
            r#"{"item_id":"sku-00001","quantity":1,"variant":{"a\u0000":{"b":1}}}"#.into(),
        ),
        ("empty", "".into()),
    ];
    for (name, body) in cases {
        let response = app
            .user("alice", "POST", "/api/v1/cart/items", Some(&body))
            .await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(response.error_code(), "invalid_request", "{name}");
        assert!(response.json()["error"]["message"].is_string(), "{name}");
    }
    let put = app
        .user(
            "alice",
            "PUT",
            "/api/v1/cart/items/sku-00001",
            Some(r#"{"quantity":0}"#),
        )
        .await;
    assert_eq!(put.status, StatusCode::BAD_REQUEST);
    let bad_path = app
        .user("alice", "DELETE", "/api/v1/cart/items/sku%201", None)
        .await;
    assert_eq!(bad_path.status, StatusCode::BAD_REQUEST);
    let bad_escape = app
        .user("alice", "DELETE", "/api/v1/cart/items/sku%zz", None)
        .await;
    assert_eq!(bad_escape.error_code(), "invalid_request");
    assert_eq!(app.query_i64("SELECT count(*) FROM carts").await, 0);
}

#[tokio::test]
async fn an_item_id_in_the_path_may_be_percent_encoded() {
    let app = TestApp::spawn().await;
    app.sql(
        "INSERT INTO catalog_items (item_id, name, stock, active) VALUES ('sku:red', 'Red', 50, true);
         INSERT INTO catalog_prices (item_id, currency, amount_minor) VALUES ('sku:red', 'SGD', 100);",
    )
    .await;
    assert_eq!(app.add("alice", "sku:red", 1).await.status, StatusCode::OK);
    // What encodeURIComponent("sku:red") gives, in either case of hex digit.
    let set = app
        .user(
            "alice",
            "PUT",
            "/api/v1/cart/items/sku%3Ared",
            Some(r#"{"quantity":4}"#),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    assert_eq!(set.quantity_of("sku:red"), 4);
    let removed = app
        .user("alice", "DELETE", "/cart/items/sku%3ared", None)
        .await;
    assert_eq!(removed.status, StatusCode::OK);
    assert_eq!(removed.quantity_of("sku:red"), 0);
}

#[tokio::test]
async fn oversized_bodies_get_413_and_non_json_bodies_get_415() {
    let app = TestApp::spawn().await;
    let huge = format!(
        r#"{{"item_id":"sku-00001","quantity":1,"pad":"{}"}}"#,
        "x".repeat(17 * 1024)
    );
    let response = app
        .user("alice", "POST", "/api/v1/cart/items", Some(&huge))
        .await;
    assert_eq!(
        (response.status, response.error_code().as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    let text = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[app.bearer("alice"), h("content-type", "text/plain")],
            Some(r#"{"item_id":"sku-00001","quantity":1}"#),
        )
        .await;
    assert_eq!(
        (text.status, text.error_code().as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
}

#[tokio::test]
async fn if_none_match_with_the_current_version_returns_304() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    let fresh = app
        .send(
            "GET",
            "/api/v1/cart",
            &[app.bearer("alice"), h("if-none-match", "\"1\"")],
            None,
        )
        .await;
    assert_eq!(fresh.status, StatusCode::NOT_MODIFIED);
    assert!(fresh.body.is_empty());
    assert_eq!(fresh.header("etag"), Some("\"1\""));
    let stale = app
        .send(
            "GET",
            "/api/v1/cart",
            &[app.bearer("alice"), h("if-none-match", "\"0\"")],
            None,
        )
        .await;
    assert_eq!(stale.status, StatusCode::OK);
}

#[tokio::test]
async fn a_stale_if_match_returns_412_version_mismatch_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    app.add("alice", "sku-00002", 1).await;
    for (method, path, body) in [
        (
            "PUT",
            "/api/v1/cart/items/sku-00001",
            Some(r#"{"quantity":4}"#),
        ),
        ("DELETE", "/api/v1/cart/items/sku-00001", None),
        ("DELETE", "/api/v1/cart", None),
    ] {
        let stale = app
            .send(
                method,
                path,
                &[app.bearer("alice"), h("if-match", "\"1\"")],
                body,
            )
            .await;
        assert_eq!(
            stale.status,
            StatusCode::PRECONDITION_FAILED,
            "{method} {path}"
        );
        assert_eq!(stale.error_code(), "version_mismatch");
        assert_eq!(stale.json()["error"]["details"]["current_version"], 2);
    }
    let current = app
        .send(
            "PUT",
            "/api/v1/cart/items/sku-00001",
            &[app.bearer("alice"), h("if-match", "\"2\"")],
            Some(r#"{"quantity":4}"#),
        )
        .await;
    assert_eq!(current.status, StatusCode::OK);
    assert_eq!(current.version(), 3);
}

#[tokio::test]
async fn a_price_change_is_reported_per_line_while_the_captured_price_stays() {
    let app = TestApp::spawn().await;
    let added = app.add("alice", "sku-00005", 2).await;
    let captured = added.json()["items"][0]["unit_price"]["amount_minor"]
        .as_i64()
        .unwrap();
    app.sql("UPDATE catalog_prices SET amount_minor = amount_minor + 100 WHERE item_id = 'sku-00005' AND currency = 'SGD'")
        .await;
    let view = app.user("alice", "GET", "/api/v1/cart", None).await.json();
    let line = &view["items"][0];
    assert_eq!(line["unit_price"]["amount_minor"], captured);
    assert_eq!(line["current_price"]["amount_minor"], captured + 100);
    assert_eq!(line["price_changed"], true);
    assert_eq!(view["total_price"]["amount_minor"], captured * 2);
}

#[tokio::test]
async fn cart_min_version_skips_a_cache_entry_older_than_the_callers_last_write() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    // A write the cache never heard of (as if its invalidation were lost).
    app.sql("UPDATE carts SET version = 2 WHERE owner = 'u:alice'; UPDATE cart_items SET quantity = 9 WHERE owner = 'u:alice'")
        .await;
    let cached = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(
        (cached.version(), cached.header("cart-source")),
        (1, Some("cache"))
    );
    let fresh = app
        .send(
            "GET",
            "/api/v1/cart",
            &[app.bearer("alice"), h("cart-min-version", "2")],
            None,
        )
        .await;
    assert_eq!(fresh.version(), 2);
    assert_eq!(fresh.quantity_of("sku-00001"), 9);
    assert_ne!(fresh.header("cart-source"), Some("cache"));
    let bound = app.app.auth.load().min_version_cookie("u:alice", 2);
    let cookie = app
        .send(
            "GET",
            "/api/v1/cart",
            &[
                app.bearer("alice"),
                h("cookie", &format!("cart_min_version={bound}")),
            ],
            None,
        )
        .await;
    assert_eq!(cookie.version(), 2);
    let bad = app
        .send(
            "GET",
            "/api/v1/cart",
            &[app.bearer("alice"), h("cart-min-version", "soon")],
            None,
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn health_reports_dependencies_and_ready_is_200_while_serving() {
    let app = TestApp::spawn().await;
    let health = app.send("GET", "/health", &[], None).await;
    assert_eq!(health.status, StatusCode::OK);
    let body = health.json();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["region"], "sg");
    assert_eq!(body["database"], "ok");
    assert_eq!(body["redis"], "ok");
    assert_eq!(
        body["shards"],
        serde_json::json!([{"id": "sg-1", "primary": "ok", "replica": "ok"}])
    );
    assert_eq!(body["peers"], serde_json::json!([]));
    assert!(body["timestamp"].is_string());
    let ready = app.send("GET", "/ready", &[], None).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["status"], "ready");
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let app = TestApp::spawn().await;
    let missing = app.user("alice", "GET", "/api/v1/carts", None).await;
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let wrong = app.user("alice", "PATCH", "/api/v1/cart", None).await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.header("allow"), Some("GET, HEAD, DELETE"));
}

#[tokio::test]
async fn health_is_503_when_postgres_is_unreachable_and_degraded_without_redis() {
    let options = TestOptions {
        redis_url: Some("redis://127.0.0.1:1/".into()),
        overlay: String::new(),
    };
    let app = TestApp::spawn_with(options).await;
    let degraded = app.send("GET", "/health", &[], None).await;
    assert_eq!(degraded.status, StatusCode::OK);
    assert_eq!(degraded.json()["status"], "degraded");
    assert_eq!(degraded.json()["redis"], "unavailable");
    // Reads and writes still work without Redis.
    assert_eq!(
        app.add("alice", "sku-00001", 1).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00001"),
        1
    );

    let no_db = TestApp::spawn_with(TestOptions {
        overlay: "[database]\ncatalog = \"host=127.0.0.1 port=1 user=postgres dbname=x\"\n\
                  [[database.shards]]\nid = \"sg-1\"\nprimary = \"host=127.0.0.1 port=1 user=postgres dbname=x\"\n\
                  replica = \"host=127.0.0.1 port=1 user=postgres dbname=x\"\n"
            .into(),
        ..TestOptions::default()
    })
    .await;
    let down = no_db.send("GET", "/health", &[], None).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.json()["database"], "unavailable");
    assert_eq!(
        down.json()["shards"],
        serde_json::json!([{"id": "sg-1", "primary": "unavailable", "replica": "unavailable"}])
    );
    // Its Redis still answers, so it can serve cached reads: a load balancer keeps it.
    assert_eq!(
        no_db.send("GET", "/ready", &[], None).await.status,
        StatusCode::OK
    );
    let write = no_db.add("alice", "sku-00001", 1).await;
    assert_eq!(
        (write.status, write.error_code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    assert!(write.header("retry-after").is_some());
    let message = write.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !message.contains("127.0.0.1") && !message.contains("connect"),
        "{message}"
    );

    // Neither Redis nor any replica: nothing can be read here, so the edge is not ready.
    let nothing = TestApp::spawn_with(TestOptions {
        redis_url: Some("redis://127.0.0.1:1/".into()),
        overlay: "[database]\ncatalog = \"host=127.0.0.1 port=1 user=postgres dbname=x\"\n\
                  [[database.shards]]\nid = \"sg-1\"\nprimary = \"host=127.0.0.1 port=1 user=postgres dbname=x\"\n\
                  replica = \"host=127.0.0.1 port=1 user=postgres dbname=x\"\n"
            .into(),
    })
    .await;
    let unready = nothing.send("GET", "/ready", &[], None).await;
    assert_eq!(unready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unready.json()["status"], "unavailable");
}

#[tokio::test]
async fn a_min_version_beyond_the_cart_is_answered_by_the_home_primary_once_without_a_warning() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    let read = app
        .send(
            "GET",
            "/api/v1/cart",
            &[app.bearer("alice"), h("cart-min-version", "7")],
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.version(), 1, "the newest cart there is");
    assert_eq!(read.header("cart-source"), Some("primary"));
    assert_eq!(
        read.json()["warnings"],
        serde_json::json!([]),
        "the home region is not unreachable: it is this edge"
    );
    assert!(
        app.app
            .metrics_text(Format::Text)
            .contains("\ncartedge_min_version_beyond_cart_total 1\n"),
        "{}",
        app.app.metrics_text(Format::Text)
    );
}

#[tokio::test]
async fn a_min_version_cookie_counts_only_for_the_owner_it_was_issued_for() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    let alice = app.add("alice", "sku-00001", 1).await;
    assert_eq!(alice.version(), 2);
    let alice_cookie = alice
        .cookie("cart_min_version")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(
        alice_cookie.starts_with("cart_min_version=2."),
        "{alice_cookie}"
    );
    app.add("bob", "sku-00002", 1).await;
    // Bob's cart is at version 1 in the cache; alice's cookie (version 2) left in the browser
    // must not make bob's read skip it, nor count as a minimum beyond bob's cart.
    let bob = app
        .send(
            "GET",
            "/api/v1/cart",
            &[app.bearer("bob"), h("cookie", &alice_cookie)],
            None,
        )
        .await;
    assert_eq!(bob.status, StatusCode::OK);
    assert_eq!(
        (bob.version(), bob.header("cart-source")),
        (1, Some("cache"))
    );
    for forged in ["cart_min_version=2", "cart_min_version=2.AAAAAAAAAAAAAAAA"] {
        let read = app
            .send(
                "GET",
                "/api/v1/cart",
                &[app.bearer("bob"), h("cookie", forged)],
                None,
            )
            .await;
        assert_eq!(
            (read.status, read.header("cart-source")),
            (StatusCode::OK, Some("cache")),
            "{forged}"
        );
    }
    assert!(app
        .app
        .metrics_text(Format::Text)
        .contains("\ncartedge_min_version_beyond_cart_total 0\n"));
    // Alice's own cookie still holds.
    let own = app
        .send(
            "GET",
            "/api/v1/cart",
            &[app.bearer("alice"), h("cookie", &alice_cookie)],
            None,
        )
        .await;
    assert_eq!(own.version(), 2);
}

/// The line ids of `sku-00005` in red and in blue (the golden vectors of `domain::variant`).
const RED: &str = "sku-00005~241889ca0604e333";
const BLUE: &str = "sku-00005~f234cb93c08ad64e";

async fn add_variant(app: &TestApp, sub: &str, variant: &str, quantity: i64) -> TestResponse {
    let body = format!(r#"{{"item_id":"sku-00005","quantity":{quantity},"variant":{variant}}}"#);
    let response = app
        .user(sub, "POST", "/api/v1/cart/items", Some(&body))
        .await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    response
}

/// `(line_id, quantity, variant)` of every line, in the cart's order.
fn lines(response: &TestResponse) -> Vec<(String, i64, serde_json::Value)> {
    response.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|line| {
            (
                line["line_id"].as_str().expect("line_id").to_string(),
                line["quantity"].as_i64().unwrap(),
                line["variant"].clone(),
            )
        })
        .collect()
}

/// A variant number PostgreSQL's `jsonb` would keep but print back as one the edge cannot read
/// (schemathesis found `-1.7976931348623157e308` made the add a 500) is refused up front with
/// nothing written; ordinary numbers are kept and read back.
#[tokio::test]
async fn a_variant_number_that_would_not_read_back_is_refused_and_ordinary_ones_are_kept() {
    let app = TestApp::spawn().await;
    for number in [
        "-1.7976931348623157e308",
        "1e300",
        "1e-300",
        "17121517845495742.5",
    ] {
        let body = format!(r#"{{"item_id":"sku-00005","quantity":1,"variant":{{"w":{number}}}}}"#);
        let refused = app
            .user("alice", "POST", "/api/v1/cart/items", Some(&body))
            .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{number}");
        assert_eq!(refused.error_code(), "invalid_request", "{number}");
    }
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(view.version(), 0, "nothing was written");
    let kept = add_variant(&app, "alice", r#"{"w":0.25,"n":9007199254740993,"z":0}"#, 1).await;
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(lines(&view), lines(&kept));
    assert_eq!(
        lines(&view)[0].2,
        serde_json::json!({"w": 0.25, "n": 9007199254740993_u64, "z": 0})
    );
}

#[tokio::test]
async fn two_variants_of_one_item_are_two_lines_and_the_same_variant_adds_to_its_line() {
    let app = TestApp::spawn_keeping_events().await;
    add_variant(&app, "alice", r#"{"color":"red"}"#, 1).await;
    add_variant(&app, "alice", r#"{"color":"blue"}"#, 1).await;
    // The same variant in another key order and spacing is the same line.
    let cart = add_variant(&app, "alice", r#"{ "color" : "red" }"#, 2).await;
    assert_eq!(
        lines(&cart),
        [
            (RED.to_string(), 3, serde_json::json!({"color": "red"})),
            (BLUE.to_string(), 1, serde_json::json!({"color": "blue"})),
        ],
        "{:?}",
        cart.body
    );
    assert_eq!(cart.json()["total_items"], 4);
    assert_eq!(
        app.query_i64("SELECT count(*) FROM cart_items WHERE owner = 'u:alice'")
            .await,
        2
    );
    // A plain add of the item is a third line, whose id is the item id.
    let cart = app.add("alice", "sku-00005", 1).await;
    assert_eq!(cart.json()["items"][2]["line_id"], "sku-00005");
    assert_eq!(cart.json()["items"][2]["variant"], serde_json::Value::Null);
    // The line's events name it.
    assert_eq!(
        app.query_i64(&format!(
            "SELECT count(*) FROM cart_events WHERE kind = 'item_added' \
             AND payload ->> 'line_id' = '{RED}' AND payload -> 'variant' = '{{\"color\":\"red\"}}'"
        ))
        .await,
        2
    );
}

#[tokio::test]
async fn put_and_delete_by_line_id_touch_one_line_and_an_item_id_alone_the_plain_line() {
    let app = TestApp::spawn_keeping_events().await;
    add_variant(&app, "alice", r#"{"color":"red"}"#, 1).await;
    add_variant(&app, "alice", r#"{"color":"blue"}"#, 1).await;
    app.add("alice", "sku-00005", 1).await;

    let set = app
        .user(
            "alice",
            "PUT",
            &format!("/api/v1/cart/items/{RED}"),
            Some(r#"{"quantity":5}"#),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    let quantities: Vec<(String, i64)> = lines(&set).into_iter().map(|l| (l.0, l.1)).collect();
    assert_eq!(
        quantities,
        [
            (RED.to_string(), 5),
            (BLUE.to_string(), 1),
            ("sku-00005".to_string(), 1)
        ]
    );
    // The item id alone is the variant-less line; `~` may come percent-encoded.
    let plain = app
        .user(
            "alice",
            "PUT",
            "/api/v1/cart/items/sku-00005",
            Some(r#"{"quantity":7}"#),
        )
        .await;
    let quantities: Vec<i64> = lines(&plain).into_iter().map(|l| l.1).collect();
    assert_eq!(quantities, [5, 1, 7]);
    let encoded = BLUE.replace('~', "%7E");
    let removed = app
        .user("alice", "DELETE", &format!("/cart/items/{encoded}"), None)
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.body);
    let remaining: Vec<String> = lines(&removed).into_iter().map(|l| l.0).collect();
    assert_eq!(remaining, [RED, "sku-00005"]);
    assert_eq!(
        app.query_i64(&format!(
            "SELECT count(*) FROM cart_events WHERE kind = 'item_removed' \
             AND payload ->> 'line_id' = '{BLUE}'"
        ))
        .await,
        1
    );

    // Without a variant-less line, the item id alone names nothing, although the item is there.
    app.user("alice", "DELETE", "/api/v1/cart/items/sku-00005", None)
        .await;
    let absent = app
        .user(
            "alice",
            "PUT",
            "/api/v1/cart/items/sku-00005",
            Some(r#"{"quantity":2}"#),
        )
        .await;
    assert_eq!(
        (absent.status, absent.error_code().as_str()),
        (StatusCode::NOT_FOUND, "item_not_in_cart")
    );
    // A line id that is not one is refused before anything is touched.
    for bad in ["sku-00005~241889CA0604E333", "sku-00005~2418", "sku-00005~"] {
        let response = app
            .user(
                "alice",
                "DELETE",
                &format!("/api/v1/cart/items/{bad}"),
                None,
            )
            .await;
        assert_eq!(
            (response.status, response.error_code().as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{bad}"
        );
    }
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(
        lines(&view),
        [(RED.to_string(), 5, serde_json::json!({"color": "red"}))]
    );
}

#[tokio::test]
async fn max_lines_counts_each_variant_as_a_line() {
    let app = TestApp::spawn_with(TestOptions {
        overlay: "[cart]\nmax_lines = 2\n".into(),
        ..TestOptions::default()
    })
    .await;
    add_variant(&app, "alice", r#"{"color":"red"}"#, 1).await;
    add_variant(&app, "alice", r#"{"color":"blue"}"#, 1).await;
    let third = app
        .user(
            "alice",
            "POST",
            "/api/v1/cart/items",
            Some(r#"{"item_id":"sku-00005","quantity":1,"variant":{"color":"green"}}"#),
        )
        .await;
    assert_eq!(
        (third.status, third.error_code().as_str()),
        (StatusCode::CONFLICT, "cart_full")
    );
    add_variant(&app, "alice", r#"{"color":"blue"}"#, 1).await;
}

/// The V4 migration backfilled existing lines with `cartedge_line_id`, a SQL copy of the edge's
/// rule: both must give the same id for the same variant, including key order, nesting,
/// escapes, non-ASCII keys, integers and plain decimals.
#[tokio::test]
async fn the_migrations_line_id_rule_is_the_edges() {
    use cartedge::domain::ids::ItemId;
    use cartedge::domain::variant::LineId;
    let app = TestApp::spawn().await;
    let item = ItemId::parse("sku-00005").unwrap();
    let variants = [
        r#"{"color":"red"}"#,
        r#"{"size":"M","fit":{"cut":"slim"}}"#,
        r#"{"é":"line\n\u0001\"\\/","a":[true,null,-2.5,{"z":0,"y":[]}],"Z":1,"bb":"", "b":{}}"#,
        r#"{"long key first":1,"k":12345678901234,"f":0.25}"#,
        r#"{}"#,
    ];
    for text in variants {
        let variant: serde_json::Value = serde_json::from_str(text).unwrap();
        let expected = LineId::of(&item, Some(&variant));
        let literal = text.replace('\'', "''");
        let matches = app
            .query_i64(&format!(
                "SELECT count(*) FROM (SELECT cartedge_line_id('sku-00005', '{literal}'::jsonb) AS id) l \
                 WHERE l.id = '{expected}'"
            ))
            .await;
        assert_eq!(matches, 1, "{text} should be {expected}");
    }
    assert_eq!(
        app.query_i64(
            "SELECT count(*) FROM (SELECT cartedge_line_id('sku-1', NULL) AS id) l WHERE l.id = 'sku-1'"
        )
        .await,
        1
    );
}

/// A region migrated to V4 reads replicas of regions still on V3 (no `line_id` column): the
/// cart query derives each line's id from its item and variant by the same rule.
#[tokio::test]
async fn carts_read_from_a_database_without_line_ids_get_them_derived() {
    use cartedge::domain::ids::OwnerKey;
    let app = TestApp::spawn().await;
    add_variant(&app, "alice", r#"{"color":"red"}"#, 1).await;
    app.add("alice", "sku-00001", 1).await;
    app.sql("ALTER TABLE cart_items DROP COLUMN line_id").await;
    let owner = OwnerKey::from_stored("u:alice".into());
    let (cart, _) = app
        .app
        .store
        .read_from_database("sg-1", &owner, 0)
        .await
        .expect("the cart reads without the column");
    let ids: Vec<&str> = cart.lines.iter().map(|l| l.line_id.as_str()).collect();
    assert_eq!(ids, [RED, "sku-00001"]);
}

/// This version's edges may be deployed before `cartedge migrate` applies V4 in their region:
/// on a database without line ids they write as the edges before them did (a line per item)
/// and address lines by the ids they show.
#[tokio::test]
async fn on_a_database_before_v4_lines_are_kept_per_item_as_before() {
    let app = TestApp::spawn().await;
    app.sql(
        "ALTER TABLE cart_items DROP COLUMN line_id; \
         ALTER TABLE cart_items ADD PRIMARY KEY (owner, item_id)",
    )
    .await;
    add_variant(&app, "alice", r#"{"color":"red"}"#, 1).await;
    let cart = add_variant(&app, "alice", r#"{"color":"blue"}"#, 1).await;
    assert_eq!(
        lines(&cart),
        [(BLUE.to_string(), 2, serde_json::json!({"color": "blue"}))]
    );
    let set = app
        .user(
            "alice",
            "PUT",
            &format!("/api/v1/cart/items/{BLUE}"),
            Some(r#"{"quantity":5}"#),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    assert_eq!(set.quantity_of("sku-00005"), 5);
    for path in [
        format!("/api/v1/cart/items/{RED}"),
        "/api/v1/cart/items/sku-00005".to_string(),
    ] {
        let other = app.user("alice", "DELETE", &path, None).await;
        assert_eq!(
            (other.status, other.error_code().as_str()),
            (StatusCode::NOT_FOUND, "item_not_in_cart"),
            "{path}"
        );
    }
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00005"),
        5,
        "a refused removal changed nothing"
    );
    let removed = app
        .user(
            "alice",
            "DELETE",
            &format!("/api/v1/cart/items/{BLUE}"),
            None,
        )
        .await;
    assert_eq!(removed.status, StatusCode::OK);
    assert_eq!(removed.json()["items"], serde_json::json!([]));

    // A merge sums per item, as before.
    app.add("alice", "sku-00001", 2).await;
    let guest = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[],
            Some(r#"{"item_id":"sku-00001","quantity":3}"#),
        )
        .await;
    let session = guest.header("cart-session").unwrap().to_string();
    let merged = app
        .send(
            "POST",
            "/api/v1/cart/merge",
            &[app.bearer("alice"), h("cart-session", &session)],
            None,
        )
        .await;
    assert_eq!(merged.status, StatusCode::OK, "{:?}", merged.body);
    assert_eq!(merged.quantity_of("sku-00001"), 5);
}

#[tokio::test]
async fn cart_lines_carry_the_catalog_name_and_null_once_the_item_is_gone() {
    let app = TestApp::spawn().await;
    app.add("namer", "sku-low", 1).await;
    let added = app.add("namer", "sku-00007", 1).await;
    assert_eq!(added.status, StatusCode::OK);
    let line_of = |view: &TestResponse, item: &str| {
        view.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|line| line["item_id"] == item)
            .cloned()
            .unwrap()
    };
    let name_of = |view: &TestResponse, item: &str| line_of(view, item)["name"].clone();
    assert_eq!(name_of(&added, "sku-low"), "Low stock");
    assert_eq!(name_of(&added, "sku-00007"), "Demo item 7");
    // Renamed in the catalog: the next view shows it (the test edge caches no catalog entry).
    app.sql("UPDATE catalog_items SET name = 'Nearly gone' WHERE item_id = 'sku-low'")
        .await;
    app.sql(
        "DELETE FROM catalog_prices WHERE item_id = 'sku-00007'; \
         DELETE FROM catalog_items WHERE item_id = 'sku-00007'",
    )
    .await;
    let view = app.user("namer", "GET", "/api/v1/cart", None).await;
    assert_eq!(name_of(&view, "sku-low"), "Nearly gone");
    assert_eq!(
        name_of(&view, "sku-00007"),
        serde_json::Value::Null,
        "gone from the catalog"
    );
    assert_eq!(
        line_of(&view, "sku-00007")["current_price"],
        serde_json::Value::Null
    );
}

#[tokio::test]
async fn a_cart_homed_where_this_region_reads_no_catalog_is_shown_without_prices_or_names() {
    let app = TestApp::spawn().await;
    let added = app.add("homeless", "sku-00001", 1).await;
    assert_eq!(added.status, StatusCode::OK);
    let (cart, _, _) = app
        .app
        .store
        .load_cart(
            "sg-1",
            &cartedge::domain::ids::OwnerKey::from_stored("u:homeless".to_string()),
            1,
        )
        .await
        .unwrap();
    // Priced from its home's catalog: sg's own here, so prices and names.
    let at_home = cartedge::api::cart::render_view(&app.app, &cart, "sg").await;
    assert!(at_home.warnings.is_empty(), "{:?}", at_home.warnings);
    assert_eq!(at_home.items[0].name.as_deref(), Some("Demo item 1"));
    // A home region whose catalog this region has no replica of (`database.peer_catalogs`):
    // prices unavailable, never another region's catalog.
    let elsewhere = cartedge::api::cart::render_view(&app.app, &cart, "th").await;
    let codes: Vec<&str> = elsewhere.warnings.iter().map(|w| w.code).collect();
    assert_eq!(codes, ["prices_unavailable"]);
    assert_eq!(elsewhere.items[0].name, None);
    assert_eq!(elsewhere.items[0].current_price, None);
    assert_eq!(
        elsewhere.currency.as_str(),
        "SGD",
        "the cart's own currency"
    );
}
