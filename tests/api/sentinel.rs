//! An edge following Redis Sentinel (`redis.sentinels`, `redis.master_name`), on real
//! processes: a master, its replica and sentinels. When the master dies or is demoted, reads go
//! on from PostgreSQL and the edge finds the master Sentinel names next, without a restart.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use cartedge::config::DEFAULT_REDIS_URL;
use cartedge_dev::procs::{Lifetime, RedisInstance};
use cartedge_dev::redis_ha::{self, RedisReplica, SentinelInstance};
use http::StatusCode;

use crate::helpers::{shared, TestApp, TestOptions};

const MASTER_NAME: &str = "cartedge-sg";

/// How long a failover may take to be followed: Sentinel needs about 1 s to call the master
/// down, a vote and a promotion; the edge one lookup after that.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(20);

/// What one read may take while the master is dead or being replaced: a cache round trip is
/// bounded by `redis.timeout` (200 ms in tests), then PostgreSQL answers.
const READ_BOUND: Duration = Duration::from_secs(1);

/// A master, its synced replica and `sentinels` sentinels that see both (and each other).
struct RedisHa {
    master: RedisInstance,
    replica: RedisReplica,
    sentinels: Vec<SentinelInstance>,
}

impl RedisHa {
    async fn start(name: &str, sentinels: usize) -> RedisHa {
        let root = shared().dir.path().join(format!("sentinel-{name}"));
        tokio::task::spawn_blocking(move || {
            let master = RedisInstance::start(&root.join("master"), None, Lifetime::TiedToParent)
                .expect("master");
            let replica = RedisReplica::start(
                &root.join("replica"),
                None,
                master.port,
                Lifetime::TiedToParent,
            )
            .expect("replica");
            replica.wait_synced(Duration::from_secs(10)).expect("sync");
            let quorum = (sentinels / 2 + 1) as u32;
            let sentinels: Vec<SentinelInstance> = (0..sentinels)
                .map(|index| {
                    SentinelInstance::start(
                        &root.join(format!("sentinel-{index}")),
                        MASTER_NAME,
                        master.port,
                        quorum,
                        Lifetime::TiedToParent,
                    )
                    .expect("sentinel")
                })
                .collect();
            for sentinel in &sentinels {
                sentinel
                    .wait_monitoring(1, sentinels.len() - 1, Duration::from_secs(20))
                    .expect("sentinels see the replica and each other");
            }
            RedisHa {
                master,
                replica,
                sentinels,
            }
        })
        .await
        .unwrap()
    }

    /// An edge whose cache follows these sentinels.
    async fn edge(&self) -> TestApp {
        let urls: Vec<String> = self
            .sentinels
            .iter()
            .map(|sentinel| format!("\"{}\"", sentinel.url()))
            .collect();
        TestApp::spawn_with(TestOptions {
            redis_url: Some(DEFAULT_REDIS_URL.to_string()),
            overlay: format!(
                "[redis]\nsentinels = [{}]\nmaster_name = \"{MASTER_NAME}\"\n",
                urls.join(", ")
            ),
        })
        .await
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

async fn command(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query_async(&mut connection).await
}

/// Whether `INFO replication` of the Redis on `port` says `role` (`role:master`, `role:slave`).
async fn role_is(port: u16, role: &str) -> bool {
    match command(port, &["INFO", "replication"]).await {
        Ok(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).contains(role),
        Ok(redis::Value::VerbatimString { text, .. }) => text.contains(role),
        _ => false,
    }
}

/// The version the Redis on `port` holds for `key` (None: no entry).
async fn cached_version(port: u16, key: &str) -> Option<i64> {
    match command(port, &["HGET", key, "v"]).await.ok()? {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

/// alice's one-line cart (version 1), served from the cache on the master.
async fn alice_cached_on(app: &TestApp, master_port: u16) -> String {
    assert_eq!(
        app.add("alice", "sku-00001", 1).await.status,
        StatusCode::OK
    );
    let key = format!("{}u:alice", app.config.redis.key_prefix);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let view = app.user("alice", "GET", "/api/v1/cart", None).await;
        assert_eq!(view.status, StatusCode::OK);
        if view.header("cart-source") == Some("cache") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cart is never served from the cache"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cached_version(master_port, &key).await, Some(1));
    key
}

/// Reads alice's cart until it comes from the cache at `version` and the Redis on `port` holds
/// that version, every read answering 200 within [`READ_BOUND`] with the cart at `version`
/// meanwhile; returns how many reads that took.
async fn until_cached_at(app: &TestApp, key: &str, port: u16, version: i64) -> usize {
    let started = Instant::now();
    let mut reads = 0;
    loop {
        let sent = Instant::now();
        let view = app.user("alice", "GET", "/api/v1/cart", None).await;
        reads += 1;
        assert_eq!(view.status, StatusCode::OK, "reads never fail");
        assert!(
            sent.elapsed() < READ_BOUND,
            "a read took {:?}: a dead master must not hold it",
            sent.elapsed()
        );
        assert_eq!(view.version(), version, "never an older cart");
        assert_eq!(view.quantity_of("sku-00001"), version);
        if view.header("cart-source") == Some("cache")
            && cached_version(port, key).await == Some(version)
        {
            return reads;
        }
        assert!(
            started.elapsed() < FOLLOW_TIMEOUT,
            "after {reads} reads in {FOLLOW_TIMEOUT:?} the edge caches nothing on the new master \
             (127.0.0.1:{port}); it holds {:?}",
            cached_version(port, key).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_edge_following_sentinel_caches_on_the_promoted_replica_after_its_master_is_killed() {
    let ha = RedisHa::start("killed", 3).await;
    let app = ha.edge().await;
    let key = alice_cached_on(&app, ha.master.port).await;
    let old_master = loopback(ha.master.port);

    let killed = std::process::Command::new("kill")
        .args(["-9", &ha.master.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Written while the master is dead: the cache cannot take it, PostgreSQL does.
    let write = app.add("alice", "sku-00001", 1).await;
    assert_eq!(write.status, StatusCode::OK);
    assert_eq!(write.version(), 2);

    // Every read answers (from PostgreSQL while Sentinel promotes), and within the bound the
    // edge caches on the replica Sentinel promoted: version 2 can only have come from it.
    until_cached_at(&app, &key, ha.replica.port, 2).await;
    let sentinel_port = ha.sentinels[0].port;
    let promoted = tokio::task::spawn_blocking(move || {
        redis_ha::wait_for_new_master(sentinel_port, MASTER_NAME, old_master, FOLLOW_TIMEOUT)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(promoted, loopback(ha.replica.port));

    // `/health` names the master the cache follows (refreshed by its probe about once a second).
    let expected = format!("127.0.0.1:{}", ha.replica.port);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = app.send("GET", "/health", &[], None).await;
        if health.json()["redis"] == "ok" && health.json()["redis_master"] == expected.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", health.json());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_master_demoted_under_the_edge_answers_readonly_and_the_edge_moves_to_the_new_master() {
    let ha = RedisHa::start("demoted", 1).await;
    let app = ha.edge().await;
    let key = alice_cached_on(&app, ha.master.port).await;
    let (master, replica) = (ha.master.port, ha.replica.port);
    let sentinel = ha.sentinels[0].port;

    // The roles swap by hand, behind Sentinel's back (it is told afterwards): unlike a
    // Sentinel failover, which closes the old master's client connections, a `REPLICAOF` leaves
    // the edge's connection open, so the edge only learns it from a `READONLY` reply.
    command(sentinel, &["SENTINEL", "REMOVE", MASTER_NAME])
        .await
        .unwrap();
    command(replica, &["REPLICAOF", "NO", "ONE"]).await.unwrap();
    command(master, &["REPLICAOF", "127.0.0.1", &replica.to_string()])
        .await
        .unwrap();
    let monitor = [
        "SENTINEL",
        "MONITOR",
        MASTER_NAME,
        "127.0.0.1",
        &replica.to_string(),
        "1",
    ];
    command(sentinel, &monitor).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !role_is(master, "role:slave").await {
        assert!(
            Instant::now() < deadline,
            "the old master never became a replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let write = app.add("alice", "sku-00001", 1).await;
    assert_eq!(write.status, StatusCode::OK);
    assert_eq!(write.version(), 2);
    until_cached_at(&app, &key, replica, 2).await;
}
