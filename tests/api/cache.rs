//! The Redis cache: the cache-fill race, Redis outages, and missed invalidations.

use std::time::Duration;

use crate::helpers::{private_redis, TestApp, TestOptions};
use cartedge::domain::ids::OwnerKey;
use http::StatusCode;

async fn redis_command(url: &str, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query_async(&mut connection).await.unwrap()
}

/// An edge on its own Redis, where alice's one-line cart (version 1) is served from the cache.
async fn app_with_a_cached_cart(redis_url: &str) -> TestApp {
    let app = TestApp::spawn_with(TestOptions {
        redis_url: Some(redis_url.to_string()),
        overlay: String::new(),
    })
    .await;
    app.add("alice", "sku-00001", 1).await;
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(view.header("cart-source"), Some("cache"));
    app
}

#[tokio::test]
async fn a_slow_reader_cannot_fill_the_cache_with_a_cart_older_than_a_committed_write() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    let owner = OwnerKey::from_stored("u:alice".into());
    // The reader reads version 1 from the database and is held there…
    let (stale, _) = app
        .app
        .store
        .read_from_database("sg-1", &owner, 0)
        .await
        .unwrap();
    assert_eq!(stale.version, 1);
    // …a writer commits version 2 and leaves it in the cache…
    assert_eq!(app.add("alice", "sku-00001", 1).await.version(), 2);
    // …and only then does the reader fill. The fence refuses the older version.
    let refused_before = app.app.metrics.cache.fill_refused.get();
    app.app.store.cache.fill(&stale).await;
    let refused_after = app.app.metrics.cache.fill_refused.get();
    assert_eq!(refused_after, refused_before + 1);
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(view.header("cart-source"), Some("cache"));
    assert_eq!(view.version(), 2);
    assert_eq!(view.quantity_of("sku-00001"), 2);
}

#[tokio::test]
async fn the_race_is_harmless_even_when_the_writer_finds_the_cache_empty() {
    let app = TestApp::spawn().await;
    app.add("alice", "sku-00001", 1).await;
    let owner = OwnerKey::from_stored("u:alice".into());
    let key = format!("{}u:alice", app.config.redis.key_prefix);
    redis_command(app.config.redis.url.expose(), &["DEL", &key]).await;
    let (stale, _) = app
        .app
        .store
        .read_from_database("sg-1", &owner, 0)
        .await
        .unwrap();
    app.user("alice", "DELETE", "/api/v1/cart/items/sku-00001", None)
        .await;
    app.app.store.cache.fill(&stale).await;
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(view.version(), 2);
    assert_eq!(view.json()["items"], serde_json::json!([]));
}

#[tokio::test]
async fn reads_come_from_postgres_while_redis_is_stopped_and_no_stale_cart_after_restart() {
    let mut redis = private_redis("stopped");
    let app = app_with_a_cached_cart(&redis.url()).await;

    redis.stop();
    let during = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(during.status, StatusCode::OK);
    assert_ne!(during.header("cart-source"), Some("cache"));
    assert_eq!(during.quantity_of("sku-00001"), 1);
    let write = app.add("alice", "sku-00001", 1).await;
    assert_eq!(write.status, StatusCode::OK, "writes succeed without Redis");
    assert_eq!(write.version(), 2);
    // `/health` reports the background probe, refreshed about once a second.
    let mut degraded = false;
    for _ in 0..50 {
        let health = app.send("GET", "/health", &[], None).await;
        assert_eq!(health.status, StatusCode::OK);
        if health.json()["status"] == "degraded" {
            degraded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(degraded, "health reports redis down");

    redis.restart().unwrap();
    let mut served_from_cache = false;
    for _ in 0..50 {
        let view = app.user("alice", "GET", "/api/v1/cart", None).await;
        assert_eq!(view.status, StatusCode::OK);
        assert_eq!(
            view.version(),
            2,
            "never a cart older than the write made during the outage"
        );
        if view.header("cart-source") == Some("cache") {
            served_from_cache = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served_from_cache,
        "the cache is used again once Redis is back"
    );
}

#[tokio::test]
async fn a_write_whose_cache_update_failed_is_never_shadowed_by_the_older_cached_cart() {
    let redis = private_redis("oom");
    let url = redis.url();
    let app = app_with_a_cached_cart(&url).await;
    // Redis keeps answering reads but refuses every write: the post-write update fails while
    // the old version 1 stays readable.
    redis_command(&url, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).await;
    redis_command(&url, &["CONFIG", "SET", "maxmemory", "1"]).await;
    assert_eq!(app.add("alice", "sku-00001", 1).await.version(), 2);
    assert_eq!(app.app.store.cache.pending_state(), (1, false));
    let view = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(view.version(), 2);
    assert_ne!(view.header("cart-source"), Some("cache"));

    redis_command(&url, &["CONFIG", "SET", "maxmemory", "0"]).await;
    let mut repaired = false;
    for _ in 0..50 {
        app.app.store.cache.repair_once().await;
        if app.app.store.cache.pending_state() == (0, false) {
            repaired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(repaired);
    for _ in 0..2 {
        let view = app.user("alice", "GET", "/api/v1/cart", None).await;
        assert_eq!(view.version(), 2);
    }
    assert_eq!(
        app.user("alice", "GET", "/api/v1/cart", None)
            .await
            .header("cart-source"),
        Some("cache")
    );
}

#[tokio::test]
async fn too_many_missed_invalidations_distrust_the_whole_cache_until_it_is_flushed() {
    let redis = private_redis("overflow");
    let url = redis.url();
    let app = TestApp::spawn_with(TestOptions {
        redis_url: Some(url.clone()),
        overlay: "[redis]\nmax_pending_invalidations = 1\n".into(),
    })
    .await;
    app.add("alice", "sku-00001", 1).await;
    app.add("bob", "sku-00001", 1).await;
    redis_command(&url, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).await;
    redis_command(&url, &["CONFIG", "SET", "maxmemory", "1"]).await;
    app.add("alice", "sku-00001", 1).await;
    app.add("bob", "sku-00001", 1).await;
    assert!(
        app.app.store.cache.pending_state().1,
        "overflow distrusts the cache"
    );
    for user in ["alice", "bob"] {
        let view = app.user(user, "GET", "/api/v1/cart", None).await;
        assert_eq!(view.version(), 2);
        assert_ne!(view.header("cart-source"), Some("cache"));
    }
    redis_command(&url, &["CONFIG", "SET", "maxmemory", "0"]).await;
    app.app.store.cache.repair_once().await;
    assert_eq!(app.app.store.cache.pending_state(), (0, false));
    let keys = redis_command(
        &url,
        &["KEYS", &format!("{}*", app.config.redis.key_prefix)],
    )
    .await;
    assert_eq!(keys, redis::Value::Array(vec![]), "our keys were flushed");
    for user in ["alice", "bob"] {
        assert_eq!(
            app.user(user, "GET", "/api/v1/cart", None).await.version(),
            2
        );
    }
}

/// Catalog entries reused for a second, as in production (tests otherwise read them fresh).
const CATALOG_CACHED: &str = "[cart]\ncatalog_cache_ttl = \"1s\"\n";

/// A hot cart's view is rendered once and its body reused from the edge's memory while the
/// cart and the catalog stay as they were. A write through the edge shows at once; a new price
/// reaches the view within the catalog's TTL and one refresh, as it does without the reuse (a
/// body kept past its age, or past a catalog change, would show the old price for ever).
#[tokio::test]
async fn a_view_reused_from_memory_shows_a_write_at_once_and_a_new_price_within_the_ttl() {
    let app = TestApp::spawn_with(TestOptions {
        overlay: CATALOG_CACHED.into(),
        ..TestOptions::default()
    })
    .await;
    near_cache_listening(&app).await;
    let added = app.add("alice", "sku-00005", 2).await;
    let captured = added.json()["items"][0]["unit_price"]["amount_minor"]
        .as_i64()
        .unwrap();
    let current = |view: &crate::helpers::TestResponse| {
        view.json()["items"][0]["current_price"]["amount_minor"]
            .as_i64()
            .unwrap()
    };
    // The first read fills the edge's memory, the second renders from it, the third reuses.
    let reads: Vec<_> = reads_of_alice(&app, 3).await;
    assert_eq!(reads[1].body, reads[2].body);
    assert_eq!(reads[2].header("cart-source"), Some("cache"));
    assert_eq!(current(&reads[2]), captured);

    app.sql("UPDATE catalog_prices SET amount_minor = amount_minor + 100 WHERE item_id = 'sku-00005' AND currency = 'SGD'")
        .await;
    let mut seen = captured;
    for _ in 0..200 {
        seen = current(&app.user("alice", "GET", "/api/v1/cart", None).await);
        if seen == captured + 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, captured + 100, "the new price never reached the view");

    let version = app.add("alice", "sku-00006", 1).await.version();
    let after = app.user("alice", "GET", "/api/v1/cart", None).await;
    assert_eq!(after.version(), version);
    assert_eq!(after.quantity_of("sku-00006"), 1);
}

async fn reads_of_alice(app: &TestApp, count: usize) -> Vec<crate::helpers::TestResponse> {
    let mut reads = Vec::new();
    for _ in 0..count {
        reads.push(app.user("alice", "GET", "/api/v1/cart", None).await);
    }
    reads
}

/// Waits (bounded) until an edge's near cache is subscribed to Redis' invalidations.
async fn near_cache_listening(app: &TestApp) {
    for _ in 0..100 {
        if app.app.store.cache.near().is_listening() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the near cache never subscribed to invalidations");
}

/// Two edges of one region on one Redis, each with its near cache: a version either edge
/// acknowledged is never followed by an older one on the other when the reader carries it
/// (`Cart-Min-Version`, as the writer's cookie does), and even a reader without it sees the
/// new version as soon as Redis' invalidation push arrives (an edge that missed it would serve
/// its in-memory cart forever). Reads in between are near-cache hits, not Redis round trips.
/// The catalog is cached in-process here, so hot carts' views are also reused from memory.
#[tokio::test]
async fn two_edges_of_a_region_never_serve_a_version_older_than_either_acknowledged() {
    let options = || TestOptions {
        overlay: CATALOG_CACHED.into(),
        ..TestOptions::default()
    };
    let first = TestApp::spawn_with(options()).await;
    let database = first.dsn.rsplit('/').next().unwrap().to_string();
    let second = TestApp::spawn_on(&first.dsn, &database, options()).await;
    near_cache_listening(&first).await;
    near_cache_listening(&second).await;
    let edges = [&first, &second];
    for round in 0..12 {
        let (writer, reader) = (edges[round % 2], edges[(round + 1) % 2]);
        let version = writer.add("alice", "sku-00001", 1).await.version();
        let seen = reader
            .send(
                "GET",
                "/api/v1/cart",
                &[
                    reader.bearer("alice"),
                    crate::helpers::h("cart-min-version", &version.to_string()),
                ],
                None,
            )
            .await;
        assert_eq!(seen.status, StatusCode::OK);
        assert!(
            seen.version() >= version,
            "round {round}: the other edge served {} after {version} was acknowledged",
            seen.version()
        );
        // Without the version: the invalidation reaches the reader within a bounded time.
        let mut plain = 0;
        for _ in 0..100 {
            plain = reader
                .user("alice", "GET", "/api/v1/cart", None)
                .await
                .version();
            if plain >= version {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            plain, version,
            "round {round}: the invalidation never arrived"
        );
    }
    for edge in edges {
        // The first read may fill the edge's memory (its own write dropped its entry)…
        edge.user("alice", "GET", "/api/v1/cart", None).await;
        // …the next is answered from it.
        let before = edge.app.metrics.cache.near_hit.get();
        let view = edge.user("alice", "GET", "/api/v1/cart", None).await;
        assert_eq!(view.header("cart-source"), Some("cache"));
        assert_eq!(
            edge.app.metrics.cache.near_hit.get(),
            before + 1,
            "a repeated read is answered from the edge's memory"
        );
    }
}
