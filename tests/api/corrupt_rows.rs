//! Rows that break the schema's promises (corrupted here with SQL) are refused loudly: a 500
//! `internal` whose body names nothing internal, and nothing changed on their account. Never a
//! reservation marked released without its stock, an order shown without its items, or a
//! quantity squeezed into range.

use http::StatusCode;

use crate::helpers::TestApp;
use crate::lifecycle::{checkout, payment_token, stock};

/// The generic body of every 500: code `internal`, and no word of what broke.
fn assert_generic_internal_error(response: &crate::helpers::TestResponse) {
    assert_eq!(
        response.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{:?}",
        response.body
    );
    assert_eq!(response.error_code(), "internal");
    let body = String::from_utf8_lossy(&response.body).to_lowercase();
    for internal in [
        "corrupt",
        "decode",
        "quantity",
        "sku-",
        "ord_",
        "reservation",
    ] {
        assert!(!body.contains(internal), "{internal:?} in {body}");
    }
}

/// A signed-in shopper's order for two of `item`: its id.
async fn order_of_two(app: &TestApp, user: &str, item: &str) -> String {
    assert_eq!(app.add(user, item, 2).await.status, StatusCode::OK);
    let order = checkout(app, user, "k-1", None).await;
    assert_eq!(order.status, StatusCode::CREATED, "{:?}", order.body);
    order.json()["order_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_reservation_whose_items_do_not_decode_is_not_released_by_a_cancel() {
    let app = TestApp::spawn().await;
    let before = stock(&app, "sku-00031").await;
    let id = order_of_two(&app, "canceller", "sku-00031").await;
    app.sql(&format!(
        "UPDATE stock_reservations SET items = '{{\"not\": \"a list\"}}' WHERE reservation_id = '{id}'"
    ))
    .await;
    let cancel = app
        .user_with_token(
            &payment_token(&app),
            "POST",
            &format!("/api/v1/orders/{id}/cancel"),
        )
        .await;
    assert_generic_internal_error(&cancel);
    let held = app
        .query_i64(&format!(
            "SELECT count(*) FROM stock_reservations WHERE reservation_id = '{id}' AND status = 'held'"
        ))
        .await;
    assert_eq!(held, 1, "the reservation stays held for an operator");
    let pending = app
        .query_i64(&format!(
            "SELECT count(*) FROM orders WHERE order_id = '{id}' AND status = 'pending_payment'"
        ))
        .await;
    assert_eq!(pending, 1, "the order is not cancelled without its stock");
    assert_eq!(stock(&app, "sku-00031").await, before - 2);
}

#[tokio::test]
async fn the_janitor_leaves_an_undecodable_reservation_held_and_releases_the_others() {
    let app = TestApp::spawn().await;
    let broken = order_of_two(&app, "broken-payer", "sku-00032").await;
    let healthy = order_of_two(&app, "slow-payer", "sku-00033").await;
    let healthy_before = stock(&app, "sku-00033").await;
    app.sql(&format!(
        "UPDATE stock_reservations SET expires_at = now() - interval '2 hours'; \
         UPDATE orders SET reservation_expires_at = now() - interval '2 hours'; \
         UPDATE stock_reservations SET items = '[{{\"item_id\": \"sku-00032\", \"quantity\": -5}}]' \
         WHERE reservation_id = '{broken}'"
    ))
    .await;
    let report = app.app.janitor_once().await.expect("the pass goes on");
    assert_eq!(report.reservations_released, 1, "{report:?}");
    assert_eq!(report.orders_expired, 1, "{report:?}");
    assert_eq!(stock(&app, "sku-00033").await, healthy_before + 2);
    let status = |id: String| {
        let app = &app;
        async move {
            app.query_i64(&format!(
                "SELECT count(*) FROM stock_reservations WHERE reservation_id = '{id}' AND status = 'held'"
            ))
            .await
        }
    };
    assert_eq!(status(broken.clone()).await, 1, "left held");
    assert_eq!(status(healthy).await, 0, "released");
    let pending = app
        .query_i64(&format!(
            "SELECT count(*) FROM orders WHERE order_id = '{broken}' AND status = 'pending_payment'"
        ))
        .await;
    assert_eq!(
        pending, 1,
        "its order is not expired without its stock back"
    );
}

#[tokio::test]
async fn an_order_whose_items_do_not_decode_is_a_500_not_an_order_without_items() {
    let app = TestApp::spawn().await;
    let id = order_of_two(&app, "reader", "sku-00034").await;
    let path = format!("/api/v1/orders/{id}");
    assert_eq!(
        app.user("reader", "GET", &path, None).await.status,
        StatusCode::OK
    );
    app.sql(&format!(
        "UPDATE orders SET items = '\"garbage\"' WHERE order_id = '{id}'"
    ))
    .await;
    assert_generic_internal_error(&app.user("reader", "GET", &path, None).await);
}

#[tokio::test]
async fn a_stored_quantity_out_of_range_is_a_500_never_truncated() {
    let app = TestApp::spawn().await;
    // Past the CHECK a tampered or restored table might lack: 1000 fits a u16 but is not a
    // quantity; -1 was read as 0 before.
    app.sql(
        "ALTER TABLE cart_items DROP CONSTRAINT IF EXISTS cart_items_quantity_check; \
         INSERT INTO carts (owner, currency, version) VALUES ('u:big', 'SGD', 1), ('u:negative', 'SGD', 1); \
         INSERT INTO cart_items (owner, line_id, item_id, quantity, unit_price_minor, currency) VALUES \
           ('u:big', 'sku-00035', 'sku-00035', 1000, 100, 'SGD'), \
           ('u:negative', 'sku-00035', 'sku-00035', -1, 100, 'SGD')",
    )
    .await;
    for user in ["big", "negative"] {
        assert_generic_internal_error(&app.user(user, "GET", "/api/v1/cart", None).await);
        // A write that reads the line's quantity refuses too, and changes nothing.
        assert_generic_internal_error(&app.add(user, "sku-00035", 1).await);
    }
    assert_eq!(
        app.query_i64("SELECT version FROM carts WHERE owner = 'u:big'")
            .await,
        1
    );
}
