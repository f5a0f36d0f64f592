//! Identity and authorization: tokens, guest sessions, `user_id` compatibility, isolation.

use std::time::Duration;

use crate::helpers::{h, TestApp};
use http::StatusCode;

const ADD: &str = r#"{"item_id":"sku-00001","quantity":1}"#;

#[tokio::test]
async fn an_anonymous_get_returns_an_empty_cart_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let response = app.send("GET", "/api/v1/cart", &[], None).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.json()["items"], serde_json::json!([]));
    assert_eq!(response.json()["version"], 0);
    assert!(response.header("cart-session").is_none());
    assert!(response.header("set-cookie").is_none());
    assert_eq!(app.query_i64("SELECT count(*) FROM carts").await, 0);
}

#[tokio::test]
async fn a_guest_write_without_a_session_gets_one_as_header_and_cookie() {
    let app = TestApp::spawn().await;
    let first = app.send("POST", "/api/v1/cart/items", &[], Some(ADD)).await;
    assert_eq!(first.status, StatusCode::OK);
    let session = first
        .header("cart-session")
        .expect("session header")
        .to_string();
    let cookie = first.cookie("cart_session").expect("cookie");
    assert!(
        cookie.starts_with(&format!("cart_session={session};")),
        "{cookie}"
    );
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP must not mark the cookie Secure"
    );
    assert_eq!(first.json()["owner"], format!("g:{session}"));

    let by_header = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[h("cart-session", &session)],
            Some(ADD),
        )
        .await;
    assert_eq!(by_header.quantity_of("sku-00001"), 2);
    assert!(
        by_header.cookie("cart_session").is_none(),
        "an existing session is not reissued"
    );
    let by_cookie = app
        .send(
            "GET",
            "/api/v1/cart",
            &[h("cookie", &format!("theme=dark; cart_session={session}"))],
            None,
        )
        .await;
    assert_eq!(by_cookie.quantity_of("sku-00001"), 2);
    // Another guest is another cart.
    let other = app.send("POST", "/api/v1/cart/items", &[], Some(ADD)).await;
    assert_ne!(other.header("cart-session"), Some(session.as_str()));
    assert_eq!(other.quantity_of("sku-00001"), 1);
}

#[tokio::test]
async fn forged_or_malformed_sessions_get_401_invalid_session_never_a_new_cart() {
    let app = TestApp::spawn().await;
    let real = app.send("POST", "/api/v1/cart/items", &[], Some(ADD)).await;
    let session = real.header("cart-session").unwrap().to_string();
    let mut forged = session.clone();
    let flipped = if forged.starts_with('A') { "B" } else { "A" };
    forged.replace_range(0..1, flipped);
    for bad in [forged.as_str(), "not-a-session", "", &"A".repeat(43)] {
        for (method, path, body) in [
            ("GET", "/api/v1/cart", None),
            ("POST", "/api/v1/cart/items", Some(ADD)),
        ] {
            let response = app
                .send(method, path, &[h("cart-session", bad)], body)
                .await;
            assert_eq!(
                response.status,
                StatusCode::UNAUTHORIZED,
                "{method} {bad:?}"
            );
            assert_eq!(response.error_code(), "invalid_session");
            assert!(response.header("cart-session").is_none());
        }
    }
    let by_cookie = app
        .send(
            "GET",
            "/api/v1/cart",
            &[h("cookie", &format!("cart_session={forged}"))],
            None,
        )
        .await;
    assert_eq!(by_cookie.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.query_i64("SELECT count(*) FROM carts").await, 1);
}

#[tokio::test]
async fn an_expired_session_reads_as_no_session_and_a_write_mints_a_new_one() {
    let app = TestApp::spawn().await;
    let lifetime = app.config.retention.guest_cart.0.as_secs();
    // An authentic id issued a little more than a guest cart's retention ago, with a cart.
    let expired = app
        .app
        .auth
        .load()
        .issue_session_at(crate::helpers::now_unix() - lifetime - 60);
    let expired = expired.as_str().to_string();
    app.sql(&format!(
        "INSERT INTO carts (owner, currency, version) VALUES ('g:{expired}', 'SGD', 3)"
    ))
    .await;

    for presented in [
        h("cart-session", &expired),
        h("cookie", &format!("cart_session={expired}")),
    ] {
        let read = app
            .send(
                "GET",
                "/api/v1/cart",
                std::slice::from_ref(&presented),
                None,
            )
            .await;
        assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
        assert_eq!(read.json()["version"], 0, "not the old cart");
        assert_eq!(read.json()["items"], serde_json::json!([]));
        assert!(read.header("cart-session").is_none());
    }

    let write = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[h("cart-session", &expired)],
            Some(ADD),
        )
        .await;
    assert_eq!(write.status, StatusCode::OK, "{:?}", write.body);
    let fresh = write
        .header("cart-session")
        .expect("a new session")
        .to_string();
    assert_ne!(fresh, expired);
    assert!(write
        .cookie("cart_session")
        .is_some_and(|c| c.starts_with(&format!("cart_session={fresh};"))));
    assert_eq!(write.json()["owner"], format!("g:{fresh}"));
    assert_eq!(write.version(), 1);
    assert_eq!(write.quantity_of("sku-00001"), 1);
    // The old cart was not touched; the new session reads its own cart.
    assert_eq!(
        app.query_i64(&format!(
            "SELECT version FROM carts WHERE owner = 'g:{expired}'"
        ))
        .await,
        3
    );
    let again = app
        .send("GET", "/api/v1/cart", &[h("cart-session", &fresh)], None)
        .await;
    assert_eq!(again.quantity_of("sku-00001"), 1);
    // An expired id with a flipped bit is still forged: 401, not a new session.
    let mut forged = expired.clone();
    let last = if forged.ends_with('A') { "B" } else { "A" };
    forged.replace_range(forged.len() - 1.., last);
    let refused = app
        .send("GET", "/api/v1/cart", &[h("cart-session", &forged)], None)
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.error_code(), "invalid_session");
}

#[tokio::test]
async fn missing_invalid_and_expired_bearer_tokens_get_401_with_www_authenticate() {
    let app = TestApp::spawn().await;
    let expired = cartedge::auth::issue_token(
        &app.config.auth,
        "alice",
        Duration::from_secs(0),
        crate::helpers::now_unix() - 60,
    )
    .unwrap();
    let mut other_secret = app.config.auth.clone();
    other_secret.keys[0].secret =
        cartedge::config::Secret::new("another-secret-0123456789abcdefgh");
    let forged = cartedge::auth::issue_token(
        &other_secret,
        "alice",
        Duration::from_secs(60),
        crate::helpers::now_unix(),
    )
    .unwrap();
    for value in [
        format!("Bearer {expired}"),
        format!("Bearer {forged}"),
        "Bearer garbage".to_string(),
        "Basic YWxpY2U6cHc=".to_string(),
        "Bearer".to_string(),
    ] {
        let response = app
            .send("GET", "/api/v1/cart", &[h("authorization", &value)], None)
            .await;
        assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{value}");
        assert_eq!(response.error_code(), "unauthenticated");
        assert_eq!(response.header("www-authenticate"), Some("Bearer"));
    }
}

#[tokio::test]
async fn user_id_must_match_the_token_sub() {
    let app = TestApp::spawn().await;
    let same = app
        .user("alice", "GET", "/api/v1/cart?user_id=alice", None)
        .await;
    assert_eq!(same.status, StatusCode::OK);
    let other = app
        .user("alice", "GET", "/api/v1/cart?user_id=bob", None)
        .await;
    assert_eq!(
        (other.status, other.error_code().as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let body = r#"{"item_id":"sku-00001","quantity":1,"user_id":"bob"}"#;
    let other_body = app
        .user("alice", "POST", "/api/v1/cart/items", Some(body))
        .await;
    assert_eq!(other_body.status, StatusCode::FORBIDDEN);
    let put = app
        .user(
            "alice",
            "PUT",
            "/api/v1/cart/items/sku-00001",
            Some(r#"{"quantity":1,"user_id":"bob"}"#),
        )
        .await;
    assert_eq!(put.status, StatusCode::FORBIDDEN);
    let delete = app
        .user(
            "alice",
            "DELETE",
            "/api/v1/cart/items/sku-00001?user_id=bob",
            None,
        )
        .await;
    assert_eq!(delete.status, StatusCode::FORBIDDEN);
    let anonymous = app
        .send("GET", "/api/v1/cart?user_id=alice", &[], None)
        .await;
    assert_eq!(
        (anonymous.status, anonymous.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    let matching = r#"{"item_id":"sku-00001","quantity":1,"user_id":"alice"}"#;
    assert_eq!(
        app.user("alice", "POST", "/cart/items", Some(matching))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        app.query_i64("SELECT count(*) FROM carts WHERE owner <> 'u:alice'")
            .await,
        0
    );
}

#[tokio::test]
async fn one_user_never_sees_or_changes_another_users_cart() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 3).await;
    let bob = app.user("bob", "GET", "/api/v1/cart", None).await;
    assert_eq!(bob.json()["owner"], "u:bob");
    assert_eq!(bob.json()["items"], serde_json::json!([]));
    let bob_delete = app
        .user("bob", "DELETE", "/api/v1/cart/items/sku-00001", None)
        .await;
    assert_eq!(bob_delete.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00001"),
        3
    );
}

/// A token for `sub` whose `region` claim is `region`.
fn homed_token(app: &TestApp, sub: &str, region: &str) -> String {
    let extra = cartedge::auth::ExtraClaims {
        region: Some(region),
        ..Default::default()
    };
    cartedge::auth::issue_token_with(
        &app.config.auth,
        sub,
        Duration::from_secs(600),
        crate::helpers::now_unix(),
        &extra,
    )
    .unwrap()
}

#[tokio::test]
async fn require_region_claim_refuses_user_tokens_without_a_home_region() {
    let app = TestApp::spawn_with(crate::helpers::TestOptions {
        overlay: "[auth]\nrequire_region_claim = true\n".into(),
        ..Default::default()
    })
    .await;
    let bearer = |token: String| h("authorization", &format!("Bearer {token}"));
    for (method, path, body) in [
        ("POST", "/api/v1/cart/items", Some(ADD)),
        ("GET", "/api/v1/cart", None),
    ] {
        let unclaimed = app
            .send(method, path, &[bearer(app.token("alice"))], body)
            .await;
        assert_eq!(
            unclaimed.status,
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        assert_eq!(unclaimed.error_code(), "unauthenticated");
        assert!(unclaimed.header("www-authenticate").is_some());
        let homed = app
            .send(
                method,
                path,
                &[bearer(homed_token(&app, "alice", "sg"))],
                body,
            )
            .await;
        assert_eq!(homed.status, StatusCode::OK, "{method} {path}");
        // This deployment homes no shard in th: such a claim is not one of its credentials.
        let foreign = app
            .send(
                method,
                path,
                &[bearer(homed_token(&app, "alice", "th"))],
                body,
            )
            .await;
        assert_eq!(foreign.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // Guests have no token: they are homed by their session, and unaffected.
    let guest = app.send("POST", "/api/v1/cart/items", &[], Some(ADD)).await;
    assert_eq!(guest.status, StatusCode::OK);
    assert_eq!(
        app.query_i64("SELECT count(*) FROM carts WHERE owner = 'u:alice'")
            .await,
        1
    );
}
