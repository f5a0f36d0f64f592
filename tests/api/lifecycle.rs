//! The cart lifecycle in one region: merge on login, price changes, checkout with stock
//! reservation, orders and payment, the janitor and the event outbox.

use std::sync::Arc;
use std::time::Duration;

use crate::helpers::{h, now_unix, TestApp, TestOptions};
use http::StatusCode;
use serde_json::Value;

/// A guest session with a cart holding `lines` (item, quantity).
async fn guest_with(app: &TestApp, lines: &[(&str, i64)]) -> String {
    let mut session: Option<String> = None;
    for (item, quantity) in lines {
        let headers: Vec<(String, String)> = session.iter().map(|s| h("cart-session", s)).collect();
        let body = format!(r#"{{"item_id":"{item}","quantity":{quantity}}}"#);
        let response = app
            .send("POST", "/api/v1/cart/items", &headers, Some(&body))
            .await;
        assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
        session = response.header("cart-session").map(str::to_string);
    }
    session.expect("a session")
}

async fn merge(
    app: &TestApp,
    user: &str,
    session: &str,
    body: Option<&str>,
) -> crate::helpers::TestResponse {
    app.send(
        "POST",
        "/api/v1/cart/merge",
        &[app.bearer(user), h("cart-session", session)],
        body,
    )
    .await
}

async fn guest_cart(app: &TestApp, session: &str) -> crate::helpers::TestResponse {
    app.send("GET", "/api/v1/cart", &[h("cart-session", session)], None)
        .await
}

fn price_of(cart: &Value, item: &str) -> i64 {
    cart["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["item_id"] == item)
        .map(|l| l["unit_price"]["amount_minor"].as_i64().unwrap())
        .unwrap()
}

#[tokio::test]
async fn every_merge_strategy_combines_carts_and_empties_the_guest_cart() {
    let app = TestApp::spawn().await;
    // (strategy, expected quantity of the shared item)
    for (n, (strategy, shared)) in [("sum", 5), ("max", 3), ("keep_user", 2), ("keep_guest", 3)]
        .into_iter()
        .enumerate()
    {
        let user = format!("merger{n}");
        app.add(&user, "sku-00001", 2).await;
        let session = guest_with(&app, &[("sku-00001", 3), ("sku-00002", 1)]).await;
        let body = format!(r#"{{"strategy":"{strategy}"}}"#);
        let merged = merge(&app, &user, &session, Some(&body)).await;
        assert_eq!(
            merged.status,
            StatusCode::OK,
            "{strategy}: {:?}",
            merged.body
        );
        assert_eq!(merged.quantity_of("sku-00001"), shared, "{strategy}");
        assert_eq!(merged.quantity_of("sku-00002"), 1, "{strategy}");
        let report = &merged.json()["report"];
        assert_eq!(report["merged_lines"], 1, "{strategy}");
        assert_eq!(report["added_lines"], 1, "{strategy}");
        assert_eq!(report["clamped"], Value::Array(vec![]));
        // The guest's session cookie is expired and the guest cart is empty.
        assert!(merged
            .cookie("cart_session")
            .is_some_and(|c| c.contains("Max-Age=0")));
        let guest = guest_cart(&app, &session).await;
        assert_eq!(guest.json()["items"].as_array().unwrap().len(), 0);
        // What the user reads afterwards is the merged cart.
        let read = app.user(&user, "GET", "/api/v1/cart", None).await;
        assert_eq!(read.quantity_of("sku-00001"), shared);
    }
    // Without a strategy, quantities are summed; a line past 999 is capped and reported.
    app.add("big", "sku-00001", 900).await;
    let session = guest_with(&app, &[("sku-00001", 200)]).await;
    let merged = merge(&app, "big", &session, None).await;
    assert_eq!(merged.quantity_of("sku-00001"), 999);
    let clamped = &merged.json()["report"]["clamped"][0];
    assert_eq!(clamped["item_id"], "sku-00001");
    assert_eq!(clamped["requested"], 1100);
    assert_eq!(clamped["quantity"], 999);
}

#[tokio::test]
async fn a_merged_away_session_reads_an_empty_cart_and_its_writes_start_a_new_cart() {
    let app = TestApp::spawn().await;
    app.add("shopper", "sku-00001", 2).await;
    let old = guest_with(&app, &[("sku-00002", 1)]).await;
    let merged = merge(&app, "shopper", &old, None).await;
    assert_eq!(merged.status, StatusCode::OK, "{:?}", merged.body);
    let user_version = merged.version();
    let old_row = |column: &str| format!("SELECT {column} FROM carts WHERE owner = 'g:{old}'");
    let old_version = app.query_i64(&old_row("version")).await;

    let read = guest_cart(&app, &old).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.json()["items"], Value::Array(vec![]));

    let add = r#"{"item_id":"sku-00003","quantity":1}"#;
    let headers = [
        h("cart-session", &old),
        h("idempotency-key", "after-merge-1"),
    ];
    let write = app
        .send("POST", "/api/v1/cart/items", &headers, Some(add))
        .await;
    assert_eq!(write.status, StatusCode::OK, "{:?}", write.body);
    let fresh = write.header("cart-session").expect("a session").to_string();
    assert_ne!(fresh, old, "a merged-away session must not accept writes");
    assert!(write
        .cookie("cart_session")
        .is_some_and(|c| c.starts_with(&format!("cart_session={fresh};"))));
    assert_eq!(write.json()["owner"], format!("g:{fresh}"));
    assert_eq!(write.version(), 1);
    assert_eq!(write.quantity_of("sku-00003"), 1);
    assert_eq!(write.json()["items"].as_array().unwrap().len(), 1);

    // A retry of that write replays its answer: one new cart, not two.
    let retry = app
        .send("POST", "/api/v1/cart/items", &headers, Some(add))
        .await;
    assert_eq!(retry.header("cart-session"), Some(fresh.as_str()));
    assert_eq!(retry.body, write.body);
    let guests = "SELECT count(*) FROM carts WHERE owner LIKE 'g:%'";
    assert_eq!(app.query_i64(guests).await, 2);

    // Neither the user's cart nor the old guest row moved.
    let user = app.user("shopper", "GET", "/api/v1/cart", None).await;
    assert_eq!(user.version(), user_version);
    assert_eq!(user.quantity_of("sku-00001"), 2);
    assert_eq!(user.quantity_of("sku-00002"), 1);
    assert_eq!(app.query_i64(&old_row("version")).await, old_version);
    let old_lines = format!("SELECT count(*) FROM cart_items WHERE owner = 'g:{old}'");
    assert_eq!(app.query_i64(&old_lines).await, 0);
    // The old session still reads an empty cart; the new one reads its own.
    assert_eq!(
        guest_cart(&app, &old).await.json()["items"],
        Value::Array(vec![])
    );
    assert_eq!(guest_cart(&app, &fresh).await.quantity_of("sku-00003"), 1);
}

#[tokio::test]
async fn lines_keep_the_price_they_captured_through_a_merge() {
    let app = TestApp::spawn().await;
    let captured_user = price_of(&app.add("pricey", "sku-00003", 1).await.json(), "sku-00003");
    let session = guest_with(&app, &[("sku-00004", 1)]).await;
    let captured_guest = price_of(&guest_cart(&app, &session).await.json(), "sku-00004");
    // Both prices move before the merge.
    app.sql("UPDATE catalog_prices SET amount_minor = amount_minor + 1000 WHERE item_id IN ('sku-00003','sku-00004') AND currency = 'SGD'").await;
    let merged = merge(&app, "pricey", &session, None).await.json();
    assert_eq!(price_of(&merged, "sku-00003"), captured_user);
    assert_eq!(price_of(&merged, "sku-00004"), captured_guest);
    assert_eq!(merged["price_changed_lines"], 2);
}

#[tokio::test]
async fn a_merge_needs_a_user_token_and_a_guest_session() {
    let app = TestApp::spawn().await;
    let session = guest_with(&app, &[("sku-00001", 1)]).await;
    let no_session = app
        .send("POST", "/api/v1/cart/merge", &[app.bearer("u1")], None)
        .await;
    assert_eq!(no_session.status, StatusCode::BAD_REQUEST);
    let guest_only = app
        .send(
            "POST",
            "/api/v1/cart/merge",
            &[h("cart-session", &session)],
            None,
        )
        .await;
    assert_eq!(guest_only.status, StatusCode::UNAUTHORIZED);
    let forged = merge(
        &app,
        "u1",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        None,
    )
    .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    assert_eq!(forged.error_code(), "invalid_session");
    let bad_strategy = merge(&app, "u1", &session, Some(r#"{"strategy":"union"}"#)).await;
    assert_eq!(bad_strategy.status, StatusCode::BAD_REQUEST);
    // Nothing was merged by the refused requests.
    assert_eq!(guest_cart(&app, &session).await.quantity_of("sku-00001"), 1);
}

/// A guest cart in THB, as a guest who shopped in Bangkok has: its lines at THB catalog
/// prices, `sku-thb-only` among them.
async fn thb_guest_with(app: &TestApp, lines: &[(&str, i64)]) -> String {
    let session = guest_with(app, &lines[..1]).await;
    app.sql(&format!(
        "UPDATE carts SET currency = 'THB' WHERE owner = 'g:{session}'; \
         UPDATE cart_items i SET currency = 'THB', unit_price_minor = p.amount_minor \
         FROM catalog_prices p \
         WHERE i.owner = 'g:{session}' AND p.item_id = i.item_id AND p.currency = 'THB'"
    ))
    .await;
    for (item, quantity) in &lines[1..] {
        let body = format!(r#"{{"item_id":"{item}","quantity":{quantity}}}"#);
        let added = app
            .send(
                "POST",
                "/api/v1/cart/items",
                &[h("cart-session", &session)],
                Some(&body),
            )
            .await;
        assert_eq!(added.status, StatusCode::OK, "{:?}", added.body);
        assert_eq!(added.json()["currency"], "THB");
    }
    session
}

#[tokio::test]
async fn a_guest_cart_in_another_currency_is_repriced_from_the_users_home_catalog() {
    let app = TestApp::spawn().await;
    app.add("travel", "sku-00001", 1).await;
    let session = thb_guest_with(
        &app,
        &[("sku-00002", 2), ("sku-thb-only", 1), ("sku-00001", 3)],
    )
    .await;
    let sgd_price = |item: &'static str| {
        let app = &app;
        async move {
            app.query_i64(&format!(
                "SELECT amount_minor FROM catalog_prices WHERE item_id = '{item}' AND currency = 'SGD'"
            ))
            .await
        }
    };
    let captured_sku1 = price_of(
        &app.user("travel", "GET", "/api/v1/cart", None).await.json(),
        "sku-00001",
    );
    let merged = merge(&app, "travel", &session, None).await;
    assert_eq!(merged.status, StatusCode::OK, "{:?}", merged.body);
    let body = merged.json();
    assert_eq!(body["currency"], "SGD");
    // The guest-only SGD-priced line arrives at the SGD catalog price, not its THB amount.
    assert_eq!(merged.quantity_of("sku-00002"), 2);
    assert_eq!(price_of(&body, "sku-00002"), sgd_price("sku-00002").await);
    // The shared line sums and keeps the user's captured price.
    assert_eq!(merged.quantity_of("sku-00001"), 4);
    assert_eq!(price_of(&body, "sku-00001"), captured_sku1);
    // The SGD catalog does not sell the Thai-only item: skipped, not merged.
    assert_eq!(merged.quantity_of("sku-thb-only"), 0);
    assert_eq!(
        body["report"]["skipped"],
        serde_json::json!([{"line_id": "sku-thb-only", "item_id": "sku-thb-only", "reason": "not_sold_in_region"}])
    );
    assert_eq!(
        (
            body["report"]["merged_lines"].as_i64(),
            body["report"]["added_lines"].as_i64()
        ),
        (Some(1), Some(1))
    );
    let stored = app
        .query_i64("SELECT count(*) FROM cart_items WHERE owner = 'u:travel' AND currency <> 'SGD'")
        .await;
    assert_eq!(stored, 0, "every line of the user's cart is in SGD");
    // The guest cart was merged away (emptied), the skipped line with it.
    assert_eq!(
        guest_cart(&app, &session).await.json()["items"],
        serde_json::json!([])
    );
    // A user without a cart gets one in the home region's currency, re-priced the same way.
    let session = thb_guest_with(&app, &[("sku-00003", 1), ("sku-thb-only", 1)]).await;
    let fresh = merge(&app, "newcomer", &session, None).await;
    assert_eq!(fresh.status, StatusCode::OK, "{:?}", fresh.body);
    assert_eq!(fresh.json()["currency"], "SGD");
    assert_eq!(
        price_of(&fresh.json(), "sku-00003"),
        sgd_price("sku-00003").await
    );
    assert_eq!(
        fresh.json()["report"]["skipped"][0]["reason"],
        "not_sold_in_region"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_merge_retried_sequentially_or_concurrently_applies_once() {
    let app = Arc::new(TestApp::spawn().await);
    app.add("again", "sku-00001", 1).await;
    let session = guest_with(&app, &[("sku-00001", 2), ("sku-00005", 1)]).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let app = app.clone();
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            merge(&app, "again", &session, None).await.status
        }));
    }
    for task in tasks {
        let status = task.await.unwrap();
        // A merge racing another may be told to retry; none may fail otherwise.
        assert!(
            status == StatusCode::OK || status == StatusCode::CONFLICT,
            "{status}"
        );
    }
    let retried = merge(&app, "again", &session, None).await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_eq!(retried.quantity_of("sku-00001"), 3);
    assert_eq!(retried.quantity_of("sku-00005"), 1);
    assert_eq!(
        app.query_i64("SELECT count(*) FROM cart_merges").await,
        1,
        "one merge recorded"
    );
    assert_eq!(
        guest_cart(&app, &session).await.json()["items"],
        Value::Array(vec![])
    );
}

#[tokio::test]
async fn a_failure_between_the_two_carts_updates_converges_on_retry() {
    let app = TestApp::spawn().await;
    app.add("crashy", "sku-00001", 1).await;
    let session = guest_with(&app, &[("sku-00001", 2), ("sku-00006", 4)]).await;
    // 1. The user's side fails after the guest cart was frozen.
    app.sql(
        "CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
         CREATE TRIGGER inject BEFORE INSERT ON cart_merges FOR EACH ROW EXECUTE FUNCTION fail();",
    )
    .await;
    let failed = merge(&app, "crashy", &session, None).await;
    assert!(failed.status.is_server_error(), "{}", failed.status);
    let user = app.user("crashy", "GET", "/api/v1/cart", None).await;
    assert_eq!(user.quantity_of("sku-00001"), 1, "nothing merged");
    // The frozen guest cart refuses changes until the merge finishes.
    let frozen = app
        .send(
            "DELETE",
            "/api/v1/cart/items/sku-00006",
            &[h("cart-session", &session)],
            None,
        )
        .await;
    assert_eq!(frozen.status, StatusCode::CONFLICT);
    assert_eq!(frozen.error_code(), "merge_in_progress");
    // 2. The user's side commits, the guest's clean-up fails.
    app.sql(
        "DROP TRIGGER inject ON cart_merges; \
         CREATE TRIGGER inject BEFORE DELETE ON cart_items FOR EACH ROW \
         WHEN (OLD.owner LIKE 'g:%') EXECUTE FUNCTION fail();",
    )
    .await;
    let half = merge(&app, "crashy", &session, None).await;
    assert_eq!(half.status, StatusCode::OK, "{:?}", half.body);
    assert_eq!(half.quantity_of("sku-00001"), 3);
    assert_eq!(guest_cart(&app, &session).await.quantity_of("sku-00006"), 4);
    // 3. The retry finds the merge applied, adds nothing, and empties the guest cart.
    app.sql("DROP TRIGGER inject ON cart_items").await;
    let retried = merge(&app, "crashy", &session, None).await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_eq!(retried.quantity_of("sku-00001"), 3);
    assert_eq!(retried.quantity_of("sku-00006"), 4);
    assert_eq!(
        guest_cart(&app, &session).await.json()["items"],
        Value::Array(vec![])
    );
    let last = merge(&app, "crashy", &session, None).await;
    assert_eq!(last.quantity_of("sku-00001"), 3, "still not doubled");
}

pub(crate) fn payment_token(app: &TestApp) -> String {
    cartedge::auth::issue_token_with_role(
        &app.config.auth,
        "payments",
        Duration::from_secs(3600),
        now_unix(),
        "payment",
    )
    .unwrap()
}

pub(crate) async fn checkout(
    app: &TestApp,
    user: &str,
    key: &str,
    body: Option<&str>,
) -> crate::helpers::TestResponse {
    app.send(
        "POST",
        "/api/v1/cart/checkout",
        &[app.bearer(user), h("idempotency-key", key)],
        body,
    )
    .await
}

pub(crate) async fn stock(app: &TestApp, item: &str) -> i64 {
    app.query_i64(&format!(
        "SELECT stock::bigint FROM catalog_items WHERE item_id = '{item}'"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_checkouts_of_ten_in_stock_sell_exactly_ten() {
    let app = Arc::new(TestApp::spawn().await);
    app.sql("UPDATE catalog_items SET stock = 10 WHERE item_id = 'sku-00042'")
        .await;
    for n in 0..50 {
        let added = app.add(&format!("buyer{n}"), "sku-00042", 1).await;
        assert_eq!(added.status, StatusCode::OK);
    }
    let mut tasks = Vec::new();
    for n in 0..50 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let response = checkout(&app, &format!("buyer{n}"), "pay-1", None).await;
            (response.status, response.error_code())
        }));
    }
    let (mut sold, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (StatusCode::CREATED, _) => sold += 1,
            (StatusCode::CONFLICT, code) => {
                assert_eq!(code, "out_of_stock");
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((sold, refused), (10, 40));
    assert_eq!(stock(&app, "sku-00042").await, 0);
    assert_eq!(app.query_i64("SELECT count(*) FROM orders").await, 10);
    assert_eq!(
        app.query_i64("SELECT count(*) FROM stock_reservations WHERE status = 'held'")
            .await,
        10
    );
    // A refused buyer's cart is intact and the refusal names what is available.
    let refused_cart = app.add("late", "sku-00001", 1).await;
    assert_eq!(refused_cart.status, StatusCode::OK);
    app.sql("UPDATE catalog_items SET stock = 0 WHERE item_id = 'sku-00001'")
        .await;
    let short = checkout(&app, "late", "pay-1", None).await;
    assert_eq!(short.status, StatusCode::CONFLICT);
    let item = &short.json()["error"]["details"]["items"][0];
    assert_eq!(item["item_id"], "sku-00001");
    assert_eq!(item["available"], 0);
    assert_eq!(item["requested"], 1);
}

#[tokio::test]
async fn a_checkout_creates_an_order_clears_the_cart_and_replays_by_key() {
    let app = TestApp::spawn().await;
    app.add("shopper", "sku-00007", 2).await;
    let added = app.add("shopper", "sku-00008", 1).await;
    let before = stock(&app, "sku-00007").await;
    let missing_key = app
        .send(
            "POST",
            "/api/v1/cart/checkout",
            &[app.bearer("shopper")],
            None,
        )
        .await;
    assert_eq!(missing_key.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing_key.error_code(), "idempotency_key_required");
    let order = checkout(&app, "shopper", "k-1", Some("{}")).await;
    assert_eq!(order.status, StatusCode::CREATED, "{:?}", order.body);
    let body = order.json();
    assert_eq!(body["status"], "pending_payment");
    assert_eq!(body["owner"], "u:shopper");
    assert_eq!(body["currency"], "SGD");
    assert_eq!(body["items"].as_array().unwrap().len(), 2);
    let expected_total = added.json()["total_price"]["amount_minor"]
        .as_i64()
        .unwrap();
    assert_eq!(body["total_price"]["amount_minor"], expected_total);
    assert!(body["reservation_expires_at"].is_string());
    assert_eq!(stock(&app, "sku-00007").await, before - 2);
    // The cart is empty with a newer version.
    let cart = app.user("shopper", "GET", "/api/v1/cart", None).await;
    assert_eq!(cart.json()["items"], Value::Array(vec![]));
    assert!(cart.version() > added.version());
    // The same key returns the same order; another key finds an empty cart.
    let replay = checkout(&app, "shopper", "k-1", Some("{}")).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.json()["order_id"], body["order_id"]);
    let empty = checkout(&app, "shopper", "k-2", None).await;
    assert_eq!(empty.status, StatusCode::CONFLICT);
    assert_eq!(empty.error_code(), "cart_empty");
    assert_eq!(stock(&app, "sku-00007").await, before - 2, "reserved once");
    // Guests cannot check out.
    let session = guest_with(&app, &[("sku-00001", 1)]).await;
    let guest = app
        .send(
            "POST",
            "/api/v1/cart/checkout",
            &[h("cart-session", &session), h("idempotency-key", "g-1")],
            None,
        )
        .await;
    assert_eq!(guest.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_failure_after_the_reservation_returns_the_stock() {
    let app = TestApp::spawn().await;
    app.add("unlucky", "sku-00009", 3).await;
    let before = stock(&app, "sku-00009").await;
    app.sql(
        "CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
         CREATE TRIGGER inject BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION fail();",
    )
    .await;
    let failed = checkout(&app, "unlucky", "k-1", None).await;
    assert!(failed.status.is_server_error(), "{}", failed.status);
    assert_eq!(stock(&app, "sku-00009").await, before, "stock returned");
    assert_eq!(
        app.query_i64("SELECT count(*) FROM stock_reservations WHERE status = 'held'")
            .await,
        0
    );
    let cart = app.user("unlucky", "GET", "/api/v1/cart", None).await;
    assert_eq!(cart.quantity_of("sku-00009"), 3, "cart untouched");
    // The retry with the same key succeeds once the fault is gone.
    app.sql("DROP TRIGGER inject ON orders").await;
    let retried = checkout(&app, "unlucky", "k-1", None).await;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert_eq!(stock(&app, "sku-00009").await, before - 3);
}

#[tokio::test]
async fn a_moved_price_refuses_checkout_until_accepted_and_reads_report_it() {
    let app = TestApp::spawn().await;
    let added = app.add("watcher", "sku-00010", 2).await;
    let captured = price_of(&added.json(), "sku-00010");
    app.sql("UPDATE catalog_prices SET amount_minor = amount_minor + 250 WHERE item_id = 'sku-00010' AND currency = 'SGD'").await;
    let view = app
        .user("watcher", "GET", "/api/v1/cart", None)
        .await
        .json();
    let line = &view["items"][0];
    assert_eq!(line["price_changed"], true);
    assert_eq!(line["unit_price"]["amount_minor"], captured);
    assert_eq!(line["current_price"]["amount_minor"], captured + 250);
    assert_eq!(view["price_changed_lines"], 1);
    let before = stock(&app, "sku-00010").await;
    let refused = checkout(&app, "watcher", "k-1", None).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.error_code(), "price_changed");
    let change = &refused.json()["error"]["details"]["lines"][0];
    assert_eq!(change["item_id"], "sku-00010");
    assert_eq!(change["unit_price"]["amount_minor"], captured);
    assert_eq!(change["current_price"]["amount_minor"], captured + 250);
    assert_eq!(stock(&app, "sku-00010").await, before, "nothing reserved");
    let accepted = checkout(
        &app,
        "watcher",
        "k-2",
        Some(r#"{"accept_price_changes":true}"#),
    )
    .await;
    assert_eq!(accepted.status, StatusCode::CREATED, "{:?}", accepted.body);
    let order = accepted.json();
    assert_eq!(
        order["items"][0]["unit_price"]["amount_minor"],
        captured + 250
    );
    assert_eq!(order["total_price"]["amount_minor"], (captured + 250) * 2);
}

#[tokio::test]
async fn orders_are_private_and_the_payment_service_confirms_or_cancels_them() {
    let app = TestApp::spawn().await;
    app.add("owner", "sku-00011", 2).await;
    let before = stock(&app, "sku-00011").await;
    let order = checkout(&app, "owner", "k-1", None).await.json();
    let id = order["order_id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/orders/{id}");
    assert_eq!(app.user("owner", "GET", &path, None).await.json(), order);
    let stranger = app.user("stranger", "GET", &path, None).await;
    assert_eq!(stranger.status, StatusCode::NOT_FOUND);
    assert!(!String::from_utf8_lossy(&stranger.body).contains("sku-00011"));
    assert_eq!(
        app.user("owner", "GET", "/api/v1/orders/ord_nope", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // Only the payment service settles.
    let by_owner = app
        .user("owner", "POST", &format!("{path}/confirm"), None)
        .await;
    assert_eq!(by_owner.status, StatusCode::FORBIDDEN);
    let payment = payment_token(&app);
    let confirmed = app
        .user_with_token(&payment, "POST", &format!("{path}/confirm"))
        .await;
    assert_eq!(confirmed.status, StatusCode::OK, "{:?}", confirmed.body);
    assert_eq!(confirmed.json()["status"], "paid");
    let again = app
        .user_with_token(&payment, "POST", &format!("{path}/confirm"))
        .await;
    assert_eq!(again.json()["status"], "paid", "confirm is idempotent");
    let cancel_paid = app
        .user_with_token(&payment, "POST", &format!("{path}/cancel"))
        .await;
    assert_eq!(cancel_paid.status, StatusCode::CONFLICT);
    assert_eq!(cancel_paid.error_code(), "order_not_pending");
    assert_eq!(stock(&app, "sku-00011").await, before - 2, "sold");
    // A cancelled order returns its stock.
    app.add("owner", "sku-00011", 1).await;
    let second = checkout(&app, "owner", "k-2", None).await.json();
    let second_path = format!("/api/v1/orders/{}", second["order_id"].as_str().unwrap());
    assert_eq!(stock(&app, "sku-00011").await, before - 3);
    let cancelled = app
        .user_with_token(&payment, "POST", &format!("{second_path}/cancel"))
        .await;
    assert_eq!(cancelled.json()["status"], "cancelled");
    assert_eq!(stock(&app, "sku-00011").await, before - 2);
    // An expired reservation cannot be paid; its stock comes back.
    app.add("owner", "sku-00011", 1).await;
    let third = checkout(&app, "owner", "k-3", None).await.json();
    let third_id = third["order_id"].as_str().unwrap();
    app.sql(&format!("UPDATE stock_reservations SET expires_at = now() - interval '1 minute' WHERE reservation_id = '{third_id}'")).await;
    let late = app
        .user_with_token(
            &payment,
            "POST",
            &format!("/api/v1/orders/{third_id}/confirm"),
        )
        .await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert_eq!(late.error_code(), "reservation_expired");
    assert_eq!(stock(&app, "sku-00011").await, before - 2);
    let expired = app
        .user("owner", "GET", &format!("/api/v1/orders/{third_id}"), None)
        .await;
    assert_eq!(expired.json()["status"], "expired");
}

#[tokio::test]
async fn the_janitor_purges_what_aged_keeps_what_is_fresh_and_runs_once_per_shard() {
    let app = TestApp::spawn_with(TestOptions {
        overlay: "[retention]\ncart = \"30days\"\nguest_cart = \"7days\"\nempty_cart = \"2days\"\n"
            .into(),
        ..TestOptions::default()
    })
    .await;
    for user in ["old", "fresh", "young-empty", "old-empty"] {
        app.add(user, "sku-00001", 1).await;
    }
    app.user("young-empty", "DELETE", "/api/v1/cart", None)
        .await;
    app.user("old-empty", "DELETE", "/api/v1/cart", None).await;
    let old_guest = guest_with(&app, &[("sku-00001", 1)]).await;
    let new_guest = guest_with(&app, &[("sku-00001", 1)]).await;
    let old_version = app.user("old", "GET", "/api/v1/cart", None).await.version();
    app.sql(&format!(
        "UPDATE carts SET updated_at = now() - interval '31 days' WHERE owner = 'u:old'; \
         UPDATE carts SET updated_at = now() - interval '8 days' WHERE owner IN ('g:{old_guest}', 'u:fresh'); \
         UPDATE carts SET updated_at = now() - interval '3 days' WHERE owner IN ('u:old-empty'); \
         UPDATE carts SET updated_at = now() - interval '1 day' WHERE owner IN ('u:young-empty'); \
         INSERT INTO idempotency_keys (owner, key, request_hash, status, headers, body, created_at) \
         VALUES ('u:old', 'ancient', '\\x00', 200, '[]', '\\x00', now() - interval '3 days'), \
                ('u:old', 'recent', '\\x00', 200, '[]', '\\x00', now());"
    ))
    .await;
    // Another janitor holds the shard: this pass skips it.
    let lock = cartedge::store::janitor::lock_key("sg-1");
    let (holder, connection) = tokio_postgres::connect(&app.dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&lock])
        .await
        .unwrap();
    let skipped = app.app.janitor_once().await.unwrap();
    assert_eq!(skipped.skipped, ["sg-1"]);
    assert_eq!(skipped.carts_purged, 0);
    assert_eq!(
        app.query_i64("SELECT count(*) FROM cart_items WHERE owner = 'u:old'")
            .await,
        1
    );
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&lock])
        .await
        .unwrap();
    drop(holder);
    let _ = driver.await;

    let report = app.app.janitor_once().await.unwrap();
    assert_eq!(report.shards, ["sg-1"]);
    assert_eq!(report.carts_purged, 3, "{report:?}");
    assert_eq!(report.idempotency_keys_purged, 1);
    let old = app.user("old", "GET", "/api/v1/cart", None).await;
    assert_eq!(old.json()["items"], Value::Array(vec![]));
    assert!(
        old.version() > old_version,
        "a purge never lowers the version"
    );
    assert_eq!(
        guest_cart(&app, &old_guest).await.json()["items"],
        Value::Array(vec![])
    );
    assert_eq!(
        guest_cart(&app, &new_guest).await.quantity_of("sku-00001"),
        1
    );
    assert_eq!(
        app.user("fresh", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00001"),
        1
    );
    assert_eq!(
        app.query_i64(
            "SELECT count(*) FROM carts WHERE owner = 'u:young-empty' AND purged_at IS NULL"
        )
        .await,
        1
    );
    assert_eq!(
        app.query_i64(
            "SELECT count(*) FROM carts WHERE owner = 'u:old-empty' AND purged_at IS NOT NULL"
        )
        .await,
        1
    );
    assert_eq!(
        app.query_i64("SELECT count(*) FROM idempotency_keys WHERE key = 'recent'")
            .await,
        1
    );
    // A purged cart comes back to life on the next write, with a newer version.
    let revived = app.add("old", "sku-00002", 1).await;
    assert!(revived.version() > old.version());
    // Tombstones go once their own retention passed; a second pass finds nothing else.
    app.sql("UPDATE carts SET purged_at = now() - interval '8 days' WHERE purged_at IS NOT NULL")
        .await;
    let second = app.app.janitor_once().await.unwrap();
    assert_eq!(second.carts_purged, 0);
    assert_eq!(second.tombstones_deleted, 2);
    let metrics = app.app.metrics_text(cartedge::metrics::Format::Text);
    assert!(
        metrics.contains("cartedge_janitor_carts_purged_total 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_janitor_releases_expired_reservations_and_expires_their_orders() {
    let app = TestApp::spawn().await;
    app.add("slow-payer", "sku-00012", 4).await;
    let before = stock(&app, "sku-00012").await;
    let order = checkout(&app, "slow-payer", "k-1", None).await.json();
    let id = order["order_id"].as_str().unwrap();
    assert_eq!(stock(&app, "sku-00012").await, before - 4);
    app.sql(&format!(
        "UPDATE stock_reservations SET expires_at = now() - interval '2 hours' WHERE reservation_id = '{id}'; \
         UPDATE orders SET reservation_expires_at = now() - interval '2 hours' WHERE order_id = '{id}'"
    ))
    .await;
    let report = app.app.janitor_once().await.unwrap();
    assert_eq!(report.reservations_released, 1, "{report:?}");
    assert_eq!(report.orders_expired, 1);
    assert_eq!(stock(&app, "sku-00012").await, before);
    let seen = app
        .user("slow-payer", "GET", &format!("/api/v1/orders/{id}"), None)
        .await;
    assert_eq!(seen.json()["status"], "expired");
}

/// Relays until `expected` events went out (another relay — the stopped edge's, still winding
/// down — may hold the shard for a moment); bounded to 100 passes.
async fn relay(app: &TestApp, expected: u64) -> u64 {
    let mut published = 0;
    for _ in 0..100 {
        published += app.app.relay_once("sg-1").await.unwrap_or(0);
        if published >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    published
}

/// Every entry of a stream: (owner, version, kind).
async fn stream(redis_url: &str, name: &str) -> Vec<(String, i64, String)> {
    let client = redis::Client::open(redis_url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(name)
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            let text = |field: &str| -> String {
                let at = fields.iter().position(|f| f == field).unwrap();
                fields[at + 1].clone()
            };
            (
                text("owner"),
                text("version").parse().unwrap(),
                text("kind"),
            )
        })
        .collect()
}

#[tokio::test]
async fn events_reach_the_stream_in_order_per_cart_and_wait_out_a_relay_outage() {
    // An edge whose Redis is down: writes succeed, their events stay in the outbox.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("redis://{}/", unused.local_addr().unwrap());
    drop(unused);
    let outage = TestApp::spawn_with(TestOptions {
        redis_url: Some(dead_url),
        overlay: "[events]\ninterval = \"50ms\"\n".into(),
    })
    .await;
    for n in 0..5 {
        assert_eq!(
            outage.add("ann", "sku-00001", 1).await.status,
            StatusCode::OK
        );
        assert_eq!(
            outage.add("bob", &format!("sku-0002{n}"), 1).await.status,
            StatusCode::OK
        );
    }
    outage
        .user("ann", "DELETE", "/api/v1/cart/items/sku-00001", None)
        .await;
    // The relay (every 50 ms) tries and fails against the dead Redis: wait for two failed
    // passes after the last write, bounded to 10 s.
    let failures = || outage.app.metrics.lifecycle.relay_failures.get();
    let before = failures();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while failures() < before + 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failures() >= before + 2, "the relay ran during the outage");
    assert_eq!(
        outage.query_i64("SELECT count(*) FROM cart_events").await,
        11,
        "all waiting"
    );
    let database = outage.dsn.rsplit('/').next().unwrap().to_string();
    let dsn = outage.dsn.clone();
    drop(outage);

    // The relay comes back (a new edge on the same database, Redis up): nothing was lost.
    let redis_url = crate::helpers::shared().redis.url();
    let back = TestApp::spawn_on(
        &dsn,
        &database,
        TestOptions {
            redis_url: Some(redis_url.clone()),
            overlay: "[events]\nrelay = false\n".into(),
        },
    )
    .await;
    assert_eq!(relay(&back, 11).await, 11);
    assert_eq!(back.query_i64("SELECT count(*) FROM cart_events").await, 0);
    back.add("ann", "sku-00002", 1).await;
    assert_eq!(relay(&back, 1).await, 1);
    let events = stream(&redis_url, &back.config.events.stream).await;
    assert_eq!(events.len(), 12);
    for owner in ["u:ann", "u:bob"] {
        let versions: Vec<i64> = events
            .iter()
            .filter(|e| e.0 == owner)
            .map(|e| e.1)
            .collect();
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(versions, expected, "{owner}: in order, none missing");
    }
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e.0 == "u:ann")
        .map(|e| e.2.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "item_added",
            "item_added",
            "item_added",
            "item_added",
            "item_added",
            "item_removed",
            "item_added"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_janitors_at_once_purge_each_cart_exactly_once() {
    let first = TestApp::spawn_with(TestOptions {
        overlay: "[janitor]\nbatch_size = 3\n[events]\nrelay = false\n".into(),
        ..TestOptions::default()
    })
    .await;
    let database = first.dsn.rsplit('/').next().unwrap().to_string();
    let second = TestApp::spawn_on(
        &first.dsn,
        &database,
        TestOptions {
            overlay: "[janitor]\nbatch_size = 3\n[events]\nrelay = false\n".into(),
            ..TestOptions::default()
        },
    )
    .await;
    for n in 0..20 {
        first.add(&format!("idle{n}"), "sku-00001", 1).await;
    }
    first
        .sql("UPDATE carts SET updated_at = now() - interval '40 days'")
        .await;
    let (a, b) = tokio::join!(first.app.janitor_once(), second.app.janitor_once());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.carts_purged + b.carts_purged, 20, "{a:?} {b:?}");
    // Each pass either worked the shard or saw the other holding it.
    for report in [&a, &b] {
        assert_eq!(
            report.shards.len() + report.skipped.iter().filter(|s| *s == "sg-1").count(),
            1
        );
    }
    assert_eq!(
        first
            .query_i64("SELECT count(*) FROM cart_events WHERE kind = 'cart_expired'")
            .await,
        20,
        "one expiry event per cart"
    );
}

/// Adds `sku-00005` in `variant` (JSON, or `null`) to a guest cart, starting one if `session` is
/// None; returns the session.
async fn guest_adds_variant(
    app: &TestApp,
    session: Option<&str>,
    variant: &str,
    quantity: i64,
) -> String {
    let headers: Vec<(String, String)> = session.iter().map(|s| h("cart-session", s)).collect();
    let body = format!(r#"{{"item_id":"sku-00005","quantity":{quantity},"variant":{variant}}}"#);
    let response = app
        .send("POST", "/api/v1/cart/items", &headers, Some(&body))
        .await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    response
        .header("cart-session")
        .map(str::to_string)
        .or(session.map(str::to_string))
        .expect("a session")
}

/// `line_id → quantity` of a cart body.
fn quantities_by_line(cart: &Value) -> Vec<(String, i64)> {
    let mut lines: Vec<(String, i64)> = cart["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["line_id"].as_str().unwrap().to_string(),
                l["quantity"].as_i64().unwrap(),
            )
        })
        .collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn a_merge_sums_equal_lines_and_keeps_variants_apart() {
    let app = TestApp::spawn().await;
    let red = "sku-00005~241889ca0604e333";
    let blue = "sku-00005~f234cb93c08ad64e";
    app.user(
        "carol",
        "POST",
        "/api/v1/cart/items",
        Some(r#"{"item_id":"sku-00005","quantity":2,"variant":{"color":"red"}}"#),
    )
    .await;
    let session = guest_adds_variant(&app, None, r#"{"color":"red"}"#, 1).await;
    guest_adds_variant(&app, Some(&session), r#"{"color":"blue"}"#, 4).await;
    guest_adds_variant(&app, Some(&session), "null", 3).await;
    let merged = merge(&app, "carol", &session, None).await;
    assert_eq!(merged.status, StatusCode::OK, "{:?}", merged.body);
    let body = merged.json();
    assert_eq!(
        quantities_by_line(&body),
        [
            ("sku-00005".to_string(), 3),
            (red.to_string(), 3),
            (blue.to_string(), 4),
        ]
    );
    let blue_line = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["line_id"] == blue)
        .unwrap();
    assert_eq!(blue_line["variant"], serde_json::json!({"color": "blue"}));
    assert_eq!(body["report"]["merged_lines"], 1);
    assert_eq!(body["report"]["added_lines"], 2);
}

#[tokio::test]
async fn order_lines_keep_their_variant_and_line_id() {
    let app = TestApp::spawn().await;
    let before = stock(&app, "sku-00005").await;
    for (variant, quantity) in [(r#"{"color":"red"}"#, 2), (r#"{"color":"blue"}"#, 1)] {
        let body =
            format!(r#"{{"item_id":"sku-00005","quantity":{quantity},"variant":{variant}}}"#);
        let added = app
            .user("dave", "POST", "/api/v1/cart/items", Some(&body))
            .await;
        assert_eq!(added.status, StatusCode::OK);
    }
    let order = checkout(&app, "dave", "k-variants", Some("{}")).await;
    assert_eq!(order.status, StatusCode::CREATED, "{:?}", order.body);
    let items = order.json()["items"].clone();
    let mut lines: Vec<(String, i64, Value)> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["line_id"].as_str().unwrap().to_string(),
                l["quantity"].as_i64().unwrap(),
                l["variant"].clone(),
            )
        })
        .collect();
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        lines,
        [
            (
                "sku-00005~241889ca0604e333".to_string(),
                2,
                serde_json::json!({"color": "red"})
            ),
            (
                "sku-00005~f234cb93c08ad64e".to_string(),
                1,
                serde_json::json!({"color": "blue"})
            ),
        ]
    );
    // Both lines took the item's stock.
    assert_eq!(stock(&app, "sku-00005").await, before - 3);
    // The stored order reads back the same.
    let order_id = order.json()["order_id"].as_str().unwrap().to_string();
    let read = app
        .user("dave", "GET", &format!("/api/v1/orders/{order_id}"), None)
        .await;
    assert_eq!(read.json()["items"], items);
}

/// Makes every frozen guest cart's freeze ten minutes old (past the default
/// `janitor.stale_merge_after` of five).
async fn age_freezes(app: &TestApp) {
    app.sql(
        "UPDATE carts SET merge_started_at = now() - interval '10 minutes' \
         WHERE merging_into IS NOT NULL",
    )
    .await;
}

/// Makes every row change matching `trigger` (e.g. `BEFORE INSERT ON cart_merges FOR EACH
/// ROW`) fail.
async fn inject_failure(app: &TestApp, trigger: &str) {
    app.sql(&format!(
        "CREATE OR REPLACE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
         CREATE TRIGGER inject {trigger} EXECUTE FUNCTION fail();"
    ))
    .await;
}

/// Removes `session`'s sku-00006 line: 200 once the guest can use their cart, 409
/// `merge_in_progress` while it is frozen.
async fn guest_removes_a_line(app: &TestApp, session: &str) -> crate::helpers::TestResponse {
    app.send(
        "DELETE",
        "/api/v1/cart/items/sku-00006",
        &[h("cart-session", session)],
        None,
    )
    .await
}

fn merges_settled(app: &TestApp, outcome: &str) -> String {
    let metrics = app.app.metrics_text(cartedge::metrics::Format::Text);
    metrics
        .lines()
        .find(|line| {
            line.starts_with(&format!(
                "cartedge_janitor_merges_resolved_total{{outcome=\"{outcome}\"}}"
            ))
        })
        .unwrap_or_else(|| panic!("no {outcome} series:\n{metrics}"))
        .to_string()
}

#[tokio::test]
async fn a_stale_merge_that_never_reached_the_user_cart_is_rolled_back_and_the_guest_keeps_it() {
    let app = TestApp::spawn().await;
    app.add("abandoned", "sku-00001", 1).await;
    let session = guest_with(&app, &[("sku-00001", 2), ("sku-00006", 4)]).await;
    // The merge freezes the guest cart, then fails on the user's side; nobody retries.
    inject_failure(&app, "BEFORE INSERT ON cart_merges FOR EACH ROW").await;
    let failed = merge(&app, "abandoned", &session, None).await;
    assert!(failed.status.is_server_error(), "{}", failed.status);
    app.sql("DROP TRIGGER inject ON cart_merges").await;
    let frozen_version = guest_cart(&app, &session).await.version();

    // Younger than janitor.stale_merge_after: left alone.
    let young = app.app.janitor_once().await.unwrap();
    assert_eq!((young.merges_finished, young.merges_rolled_back), (0, 0));
    assert_eq!(
        guest_removes_a_line(&app, &session).await.error_code(),
        "merge_in_progress"
    );

    age_freezes(&app).await;
    let report = app.app.janitor_once().await.unwrap();
    assert_eq!(report.merges_rolled_back, 1, "{report:?}");
    assert_eq!(report.merges_finished, 0, "{report:?}");
    assert_eq!(
        merges_settled(&app, "rolled_back"),
        "cartedge_janitor_merges_resolved_total{outcome=\"rolled_back\"} 1"
    );
    // The guest has their cart back, lines and all, at a newer version (the cache too).
    let guest = guest_cart(&app, &session).await;
    assert!(guest.version() > frozen_version);
    assert_eq!(guest.quantity_of("sku-00006"), 4);
    let user = app.user("abandoned", "GET", "/api/v1/cart", None).await;
    assert_eq!(user.quantity_of("sku-00001"), 1, "nothing reached the user");
    let removed = guest_removes_a_line(&app, &session).await;
    assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.body);
    // A later merge takes the cart as it is now, once.
    let merged = merge(&app, "abandoned", &session, None).await;
    assert_eq!(merged.status, StatusCode::OK, "{:?}", merged.body);
    assert_eq!(merged.quantity_of("sku-00001"), 3);
    assert_eq!(merged.quantity_of("sku-00006"), 0);
    assert_eq!(
        guest_cart(&app, &session).await.json()["items"],
        Value::Array(vec![])
    );
    // Settled once: a second pass finds nothing.
    let again = app.app.janitor_once().await.unwrap();
    assert_eq!((again.merges_finished, again.merges_rolled_back), (0, 0));
}

#[tokio::test]
async fn a_stale_merge_that_reached_the_user_cart_is_finished_with_the_lines_there_once() {
    let app = TestApp::spawn().await;
    app.add("half-done", "sku-00001", 1).await;
    let session = guest_with(&app, &[("sku-00001", 2), ("sku-00006", 4)]).await;
    // The user's side commits; emptying the guest cart fails; nobody retries.
    inject_failure(
        &app,
        "BEFORE DELETE ON cart_items FOR EACH ROW WHEN (OLD.owner LIKE 'g:%')",
    )
    .await;
    let half = merge(&app, "half-done", &session, None).await;
    assert_eq!(half.status, StatusCode::OK, "{:?}", half.body);
    app.sql("DROP TRIGGER inject ON cart_items").await;
    assert_eq!(
        guest_removes_a_line(&app, &session).await.error_code(),
        "merge_in_progress"
    );
    let young = app.app.janitor_once().await.unwrap();
    assert_eq!((young.merges_finished, young.merges_rolled_back), (0, 0));

    age_freezes(&app).await;
    let report = app.app.janitor_once().await.unwrap();
    assert_eq!(report.merges_finished, 1, "{report:?}");
    assert_eq!(report.merges_rolled_back, 0, "{report:?}");
    assert_eq!(
        merges_settled(&app, "finished"),
        "cartedge_janitor_merges_resolved_total{outcome=\"finished\"} 1"
    );
    // Finished as a retry would: the guest cart is emptied and merged away, the user's holds
    // the guest's lines once.
    assert_eq!(
        guest_cart(&app, &session).await.json()["items"],
        Value::Array(vec![])
    );
    assert_eq!(
        app.query_i64(
            "SELECT count(*) FROM carts WHERE owner LIKE 'g:%' AND merged_at IS NOT NULL"
        )
        .await,
        1
    );
    let user = app.user("half-done", "GET", "/api/v1/cart", None).await;
    assert_eq!(user.quantity_of("sku-00001"), 3);
    assert_eq!(user.quantity_of("sku-00006"), 4);
    let retried = merge(&app, "half-done", &session, None).await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_eq!(retried.quantity_of("sku-00001"), 3, "not doubled");
    assert_eq!(retried.quantity_of("sku-00006"), 4, "not doubled");
}

#[tokio::test]
async fn a_retry_holding_a_snapshot_the_janitor_rolled_back_adds_nothing_of_it_and_merges_afresh() {
    let app = TestApp::spawn().await;
    app.add("fenced", "sku-00001", 1).await;
    let session = guest_with(&app, &[("sku-00001", 2), ("sku-00006", 4)]).await;
    inject_failure(&app, "BEFORE INSERT ON cart_merges FOR EACH ROW").await;
    let failed = merge(&app, "fenced", &session, None).await;
    assert!(failed.status.is_server_error(), "{}", failed.status);
    app.sql("DROP TRIGGER inject ON cart_merges").await;
    age_freezes(&app).await;
    // The janitor decides on the user's side, then fails to lift the freeze: the guest cart is
    // still frozen at the snapshot a retry now gets, and that snapshot is fenced off.
    inject_failure(
        &app,
        "BEFORE UPDATE ON carts FOR EACH ROW \
         WHEN (OLD.merging_into IS NOT NULL AND NEW.merging_into IS NULL)",
    )
    .await;
    let report = app.app.janitor_once().await.unwrap();
    assert_eq!((report.merges_finished, report.merges_rolled_back), (0, 0));
    assert_eq!(
        app.query_i64("SELECT count(*) FROM cart_merges WHERE abandoned_at IS NOT NULL")
            .await,
        1
    );
    app.sql("DROP TRIGGER inject ON carts").await;
    let retried = merge(&app, "fenced", &session, None).await;
    assert_eq!(retried.status, StatusCode::OK, "{:?}", retried.body);
    assert_eq!(
        retried.quantity_of("sku-00001"),
        3,
        "the guest's lines once"
    );
    assert_eq!(
        retried.quantity_of("sku-00006"),
        4,
        "the guest's lines once"
    );
    assert_eq!(
        guest_cart(&app, &session).await.json()["items"],
        Value::Array(vec![])
    );
    let last = merge(&app, "fenced", &session, None).await;
    assert_eq!(last.quantity_of("sku-00001"), 3, "still not doubled");
    let after = app.app.janitor_once().await.unwrap();
    assert_eq!((after.merges_finished, after.merges_rolled_back), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_at_the_moment_the_janitor_settles_a_stale_merge_merges_exactly_once() {
    let app = Arc::new(TestApp::spawn().await);
    for round in 0..4 {
        let user = format!("racer{round}");
        app.add(&user, "sku-00001", 1).await;
        let session = guest_with(&app, &[("sku-00001", 2), ("sku-00006", 4)]).await;
        // Round 0 and 2: the merge never reached the user; 1 and 3: it did, the guest's
        // clean-up failed.
        let trigger = if round % 2 == 0 {
            ("BEFORE INSERT ON cart_merges FOR EACH ROW", "cart_merges")
        } else {
            (
                "BEFORE DELETE ON cart_items FOR EACH ROW WHEN (OLD.owner LIKE 'g:%')",
                "cart_items",
            )
        };
        inject_failure(&app, trigger.0).await;
        let _ = merge(&app, &user, &session, None).await;
        app.sql(&format!("DROP TRIGGER inject ON {}", trigger.1))
            .await;
        age_freezes(&app).await;
        let janitor = {
            let app = app.clone();
            tokio::spawn(async move { app.app.janitor_once().await.unwrap() })
        };
        let retry = merge(&app, &user, &session, None).await;
        let report = janitor.await.unwrap();
        assert!(
            retry.status == StatusCode::OK || retry.status == StatusCode::CONFLICT,
            "round {round}: {} {:?}",
            retry.status,
            retry.body
        );
        assert!(report.merges_finished + report.merges_rolled_back <= 1);
        // Whatever the interleaving, one more merge leaves the guest's lines in the user's
        // cart exactly once and the guest cart empty.
        let settled = merge(&app, &user, &session, None).await;
        assert_eq!(
            settled.status,
            StatusCode::OK,
            "round {round}: {:?}",
            settled.body
        );
        assert_eq!(settled.quantity_of("sku-00001"), 3, "round {round}");
        assert_eq!(settled.quantity_of("sku-00006"), 4, "round {round}");
        assert_eq!(
            guest_cart(&app, &session).await.json()["items"],
            Value::Array(vec![]),
            "round {round}"
        );
        assert_eq!(
            app.query_i64(&format!(
                "SELECT count(*) FROM cart_merges WHERE user_owner = 'u:{user}' \
                 AND abandoned_at IS NULL"
            ))
            .await,
            1,
            "round {round}: one merge applied"
        );
    }
}
