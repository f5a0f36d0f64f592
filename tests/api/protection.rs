//! Edge protection: rate limits per owner, tier and class, and per client IP.

use std::time::Duration;

use crate::helpers::{h, TestApp, TestOptions};
use http::StatusCode;

async fn limited_app(extra: &str) -> TestApp {
    TestApp::spawn_with(TestOptions {
        overlay: format!("[rate_limit]\nenabled = true\n{extra}"),
        ..TestOptions::default()
    })
    .await
}

#[tokio::test]
async fn writes_past_the_owners_burst_get_429_with_rate_limit_headers() {
    // One write a second after a burst of 5: slow enough that no token comes back mid-test.
    let app = limited_app("[rate_limit.user]\nwrites = { per_second = 1, burst = 5 }\n").await;
    for n in 0..5 {
        let response = app.add("alice", "sku-00001", 1).await;
        assert_eq!(response.status, StatusCode::OK, "write {n}");
        assert_eq!(
            response.header("ratelimit-policy"),
            Some("\"user-writes\";q=5;w=5")
        );
        assert_eq!(
            response.header("ratelimit"),
            Some(format!("\"user-writes\";r={};t=0", 4 - n).as_str())
        );
    }
    let refused = app.add("alice", "sku-00001", 1).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "rate_limited");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert!(refused.header("ratelimit-policy").is_some());
    assert!(refused.header("ratelimit").unwrap().contains("r=0"));
    // The refused write changed nothing; reads have their own quota; bob has his own.
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(view.status, StatusCode::OK);
    assert_eq!(view.quantity_of("sku-00001"), 5);
    assert_eq!(app.add("bob", "sku-00001", 1).await.status, StatusCode::OK);
}

/// Sends `count` cart reads with `token`; returns how many were served before the first
/// refusal (every answer is 200 or 429).
async fn reads_served(app: &TestApp, token: &str, count: usize) -> usize {
    for n in 0..count {
        let response = app.user_with_token(token, "GET", "/api/v1/cart").await;
        match response.status {
            StatusCode::OK => {}
            StatusCode::TOO_MANY_REQUESTS => return n,
            other => panic!("read {n} answered {other}"),
        }
    }
    count
}

#[tokio::test]
async fn a_service_tier_token_is_not_held_to_a_shoppers_quota() {
    // A shopper's reads: a burst of 10, then one a second, so the loop below outruns it.
    let app = limited_app("[rate_limit.user]\nreads = { per_second = 1, burst = 10 }\n").await;
    let token_for = |sub: &str, tier: Option<&str>| {
        cartedge::auth::issue_token_for_tier(
            &app.config.auth,
            sub,
            Duration::from_secs(600),
            crate::helpers::now_unix(),
            tier,
        )
        .unwrap()
    };
    let service = token_for("loadgen", Some("service"));
    let shopper = token_for("shopper", None);
    assert_eq!(reads_served(&app, &service, 60).await, 60);
    // The control: the same loop with a shopper's token is limited, so the 60 above prove
    // the tier, not a loop too short to reach any limit.
    let shopper_served = reads_served(&app, &shopper, 60).await;
    assert!(
        (10..60).contains(&shopper_served),
        "a shopper was served {shopper_served} reads in a row"
    );
}

#[tokio::test]
async fn requests_without_valid_credentials_are_limited_per_client_ip() {
    let app = limited_app("anonymous = { per_second = 1, burst = 5 }\n").await;
    for _ in 0..5 {
        let forged = app
            .send(
                "GET",
                "/api/v1/cart",
                &[h("authorization", "Bearer forged")],
                None,
            )
            .await;
        assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    }
    let limited = app
        .send(
            "GET",
            "/api/v1/cart",
            &[h("authorization", "Bearer forged")],
            None,
        )
        .await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "guessing credentials is slowed down"
    );
    let anonymous = app.send("GET", "/api/v1/cart", &[], None).await;
    assert_eq!(
        anonymous.status,
        StatusCode::TOO_MANY_REQUESTS,
        "same IP, no credentials"
    );
    // A signed-in user from the same IP has their own quota.
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_quota() {
    let app = limited_app(
        "anonymous = { per_second = 1, burst = 2 }\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    )
    .await;
    for client in ["198.51.100.1", "198.51.100.2"] {
        for _ in 0..2 {
            let response = app
                .send(
                    "GET",
                    "/api/v1/cart",
                    &[h("x-forwarded-for", &format!("{client}, 127.0.0.1"))],
                    None,
                )
                .await;
            assert_eq!(response.status, StatusCode::OK, "{client}");
        }
        let third = app
            .send("GET", "/api/v1/cart", &[h("x-forwarded-for", client)], None)
            .await;
        assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS, "{client}");
    }
}

#[tokio::test]
async fn the_authorization_matrix_never_shows_one_owner_another_owners_cart() {
    let app = TestApp::spawn().await;
    let guest = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[],
            Some(r#"{"item_id":"sku-00002","quantity":1}"#),
        )
        .await
        .header("cart-session")
        .unwrap()
        .to_string();
    // Another last character (never the real one, which is `A` one time in sixteen): the tag no
    // longer matches.
    let last = if guest.ends_with('A') { 'E' } else { 'A' };
    let forged_session = format!("{}{last}", &guest[..42]);
    let identities: Vec<(&str, Vec<(String, String)>)> = vec![
        ("owner", vec![app.bearer("alice")]),
        ("another user", vec![app.bearer("bob")]),
        ("guest", vec![h("cart-session", &guest)]),
        ("no credentials", vec![]),
        (
            "forged bearer",
            vec![h("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.forged")],
        ),
        ("forged session", vec![h("cart-session", &forged_session)]),
    ];
    let routes: [(&str, &str, Option<&str>); 5] = [
        ("GET", "/api/v1/cart", None),
        (
            "POST",
            "/api/v1/cart/items",
            Some(r#"{"item_id":"sku-00003","quantity":1}"#),
        ),
        (
            "PUT",
            "/api/v1/cart/items/sku-00001",
            Some(r#"{"quantity":7}"#),
        ),
        ("DELETE", "/api/v1/cart/items/sku-00001", None),
        ("DELETE", "/api/v1/cart", None),
    ];
    for (who, headers) in &identities {
        for (method, path, body) in routes {
            // Alice always holds sku-00001 before each request.
            app.add("alice", "sku-00001", 1).await;
            let response = app.send(method, path, headers, body).await;
            let expected = match (*who, method, path) {
                ("forged bearer" | "forged session", _, _) => StatusCode::UNAUTHORIZED,
                ("owner", _, _) => StatusCode::OK,
                (_, "PUT", _) | (_, "DELETE", "/api/v1/cart/items/sku-00001") => {
                    StatusCode::NOT_FOUND
                }
                _ => StatusCode::OK,
            };
            assert_eq!(response.status, expected, "{who}: {method} {path}");
            let text = String::from_utf8_lossy(&response.body);
            if *who != "owner" {
                assert!(
                    !text.contains("u:alice"),
                    "{who}: {method} {path} leaked alice's cart: {text}"
                );
            }
        }
    }
    // Nobody but alice touched alice's cart: her last action was the owner's DELETE of the cart,
    // then one add per later request.
    let alice = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(alice.quantity_of("sku-00003"), 0);
    assert_eq!(alice.json()["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_reload_applies_new_quotas_and_rotated_keys_without_a_restart() {
    let app = limited_app("[rate_limit.user]\nwrites = { per_second = 1, burst = 2 }\n").await;
    for _ in 0..2 {
        assert_eq!(
            app.add("alice", "sku-00001", 1).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        app.add("alice", "sku-00001", 1).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let old_token = app.token("alice");

    // New quotas, and the signing key rotated to a new kid and secret.
    let rotated = crate::helpers::test_config(
        &app.dsn,
        app.config.redis.url.expose(),
        &app.config.redis.key_prefix,
        "[rate_limit]\nenabled = true\n[rate_limit.user]\nwrites = { per_second = 1, burst = 50 }\n\
         [[auth.keys]]\nkid = \"rotated\"\nalgorithm = \"HS256\"\nsecret = \"rotated-secret-0123456789abcdef0123\"\n",
    );
    app.app.reload(&rotated).unwrap();
    let new_token = cartedge::auth::issue_token(
        &rotated.auth,
        "alice",
        Duration::from_secs(600),
        crate::helpers::now_unix(),
    )
    .unwrap();
    let with_new = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[h("authorization", &format!("Bearer {new_token}"))],
            Some(r#"{"item_id":"sku-00001","quantity":1}"#),
        )
        .await;
    assert_eq!(
        with_new.status,
        StatusCode::OK,
        "the new key and the new quota apply"
    );
    assert_eq!(
        with_new.header("ratelimit-policy"),
        Some("\"user-writes\";q=50;w=50")
    );
    let with_old = app
        .send(
            "GET",
            "/api/v1/cart",
            &[h("authorization", &format!("Bearer {old_token}"))],
            None,
        )
        .await;
    assert_eq!(
        with_old.status,
        StatusCode::UNAUTHORIZED,
        "the retired key is gone"
    );

    // A configuration that does not load changes nothing.
    let mut broken = rotated.clone();
    broken.auth.keys[0].secret = cartedge::config::Secret::new("short");
    assert!(app.app.reload(&broken).is_err());
    assert_eq!(
        app.user_with_token(&new_token, "GET", "/api/v1/cart")
            .await
            .status,
        StatusCode::OK
    );
}

/// Reads by `token` sent alternately to each edge in `edges`, `rounds` times round: how many were
/// admitted, and how long it took (every answer is 200 or 429).
async fn admitted_across(edges: &[&TestApp], token: &str, rounds: usize) -> (usize, Duration) {
    let started = std::time::Instant::now();
    let mut admitted = 0;
    for round in 0..rounds {
        for (n, edge) in edges.iter().enumerate() {
            let response = edge.user_with_token(token, "GET", "/api/v1/cart").await;
            match response.status {
                StatusCode::OK => admitted += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    assert_eq!(response.error_code(), "rate_limited");
                }
                other => panic!("round {round}, edge {n}: {other}"),
            }
        }
    }
    (admitted, started.elapsed())
}

/// Asserts `admitted` is `expected` plus at most what `edges` edges refilled at `per_second`
/// each while the requests ran.
fn assert_admitted(
    admitted: usize,
    expected: usize,
    edges: usize,
    per_second: usize,
    took: Duration,
) {
    let refilled = edges * per_second * (took.as_secs() as usize + 1);
    assert!(
        (expected..=expected + refilled).contains(&admitted),
        "admitted {admitted}, expected {expected} (+{refilled} refilled in {took:?})"
    );
}

#[tokio::test]
async fn two_edges_of_a_region_admit_the_regional_burst_once_not_twice() {
    // The region's quota: a burst of 10 reads, then one a second.
    let overlay = |edges: u32| {
        format!(
            "[rate_limit]\nenabled = true\nedges = {edges}\n\
             [rate_limit.user]\nreads = {{ per_second = 1, burst = 10 }}\n"
        )
    };
    let first = TestApp::spawn_with(TestOptions {
        overlay: overlay(2),
        ..TestOptions::default()
    })
    .await;
    let database = first.dsn.rsplit('/').next().unwrap().to_string();
    let second = TestApp::spawn_on(
        &first.dsn,
        &database,
        TestOptions {
            overlay: overlay(2),
            ..TestOptions::default()
        },
    )
    .await;
    let edges = [&first, &second];
    // A shopper's token (user tier), alternating between the two edges as an even load
    // balancer would: each edge admits its share (5), the region the burst (10).
    let (admitted, took) = admitted_across(&edges, &first.token("shared-shopper"), 20).await;
    assert_admitted(admitted, 10, 2, 1, took);
    let policy = first
        .user("policy-reader", "GET", "/api/v1/cart", None)
        .await;
    assert_eq!(
        policy.header("ratelimit-policy"),
        Some("\"user-reads\";q=5;w=5"),
        "each edge names the share it enforces"
    );

    // Reloaded to one edge per region (as each edge's SIGHUP does), the same loop by another
    // shopper gets the whole burst on each edge: twice the region's quota.
    let single = crate::helpers::test_config(
        &first.dsn,
        first.config.redis.url.expose(),
        &first.config.redis.key_prefix,
        &overlay(1),
    );
    for edge in edges {
        edge.app.reload(&single).unwrap();
    }
    let (admitted, took) = admitted_across(&edges, &first.token("another-shopper"), 20).await;
    assert_admitted(admitted, 20, 2, 1, took);
}
