//! Adding a shard moves carts online (`moving_from` in the ring file): region `sg` homes
//! `sg-1`; ring version 2 adds `sg-2` and moves from version 1. An edge on ring 1 wrote the
//! carts; an edge on ring 2 serves the owners that move, moving each cart on its first write
//! or through `api::moves::move_page` (what `cartedge ring move` runs).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cartedge::api::moves::{self, move_page, UserHomes};
use cartedge::domain::ids::OwnerKey;
use cartedge::store::moves as steps;

use crate::helpers::{fresh_database, h, query_opt_i64, shared, TestApp, TestOptions};

const RING_V1: &str = "version = 1\nvnodes = 200\n[[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n";
const RING_V2: &str = "version = 2\nvnodes = 200\nmoving_from = 1\n\
    [[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n[[shards]]\nid = \"sg-2\"\nhome = \"sg\"\n";
/// Ring 2 once the move is over: the marker removed.
const RING_V2_SETTLED: &str = "version = 2\nvnodes = 200\n\
    [[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n[[shards]]\nid = \"sg-2\"\nhome = \"sg\"\n";

/// Both edges of the roll on the same two shard databases and the same Redis cache.
struct Resharded {
    dir: tempfile::TempDir,
    /// The edge still on ring 1 (only `sg-1`).
    old: TestApp,
    /// The edge on ring 2, moving from 1.
    new: TestApp,
    sg1: String,
    sg2: String,
}

fn shard_overlay(dir: &Path, ring: &str, shards: &[(&str, &str)]) -> String {
    let mut text = format!(
        "[topology]\nring_file = \"{}\"\nregions_dir = \"{}\"\n",
        dir.join(ring).display(),
        dir.join("regions").display()
    );
    for (id, dsn) in shards {
        text.push_str(&format!(
            "[[database.shards]]\nid = \"{id}\"\nprimary = \"{dsn}\"\nreplica = \"{dsn}\"\n"
        ));
    }
    text
}

impl Resharded {
    async fn start() -> Resharded {
        let dir = tempfile::Builder::new()
            .prefix("cartedge-reshard-")
            .tempdir_in(shared().dir.path())
            .unwrap();
        std::fs::create_dir_all(dir.path().join("regions")).unwrap();
        std::fs::write(dir.path().join("ring.v1.toml"), RING_V1).unwrap();
        std::fs::write(dir.path().join("ring.toml"), RING_V2).unwrap();
        let (database, sg1) = fresh_database().await;
        let (_, sg2) = fresh_database().await;
        let old = TestApp::spawn_on(
            &sg1,
            &database,
            TestOptions {
                overlay: shard_overlay(dir.path(), "ring.v1.toml", &[("sg-1", &sg1)]),
                ..TestOptions::default()
            },
        )
        .await;
        // Its own cache key prefix: its reads find carts in the databases, not in what the old
        // edge cached.
        let new = TestApp::spawn_on(
            &sg1,
            &format!("{database}_v2"),
            TestOptions {
                overlay: shard_overlay(dir.path(), "ring.toml", &[("sg-1", &sg1), ("sg-2", &sg2)]),
                ..TestOptions::default()
            },
        )
        .await;
        assert_eq!(new.app.topology().ring.spec().moving_from, Some(1));
        Resharded {
            dir,
            old,
            new,
            sg1,
            sg2,
        }
    }

    /// `count` users (no region claim: the global ring) the new ring moves from sg-1 to sg-2.
    fn movers(&self, salt: &str, count: usize) -> Vec<String> {
        let ring = &self.new.app.topology().ring;
        let movers: Vec<String> = (0..count * 10)
            .map(|n| format!("{salt}-{n}"))
            .filter(|user| {
                ring.previous_placement(&format!("u:{user}"), None)
                    .is_some_and(|before| before.shard == "sg-1")
            })
            .take(count)
            .collect();
        assert_eq!(movers.len(), count);
        for user in &movers {
            assert_eq!(ring.locate(&format!("u:{user}")).shard, "sg-2");
        }
        movers
    }

    async fn row_version(&self, dsn: &str, user: &str) -> Option<i64> {
        query_opt_i64(
            dsn,
            "SELECT version FROM carts WHERE owner = $1",
            &[&format!("u:{user}")],
        )
        .await
    }

    async fn lines(&self, dsn: &str, user: &str) -> i64 {
        query_opt_i64(
            dsn,
            "SELECT count(*) FROM cart_items WHERE owner = $1",
            &[&format!("u:{user}")],
        )
        .await
        .unwrap()
    }

    /// `cartedge check-config` of this region with the marker removed from ring 2 (ring 1
    /// still kept beside it).
    async fn check_settled_config(&self) -> std::process::Output {
        let settled = self.dir.path().join("settled");
        std::fs::create_dir_all(&settled).unwrap();
        std::fs::write(settled.join("ring.v1.toml"), RING_V1).unwrap();
        std::fs::write(settled.join("ring.toml"), RING_V2_SETTLED).unwrap();
        let overlay = shard_overlay(
            &settled,
            "ring.toml",
            &[("sg-1", &self.sg1), ("sg-2", &self.sg2)],
        )
        .replace(
            &settled.join("regions").display().to_string(),
            &self.dir.path().join("regions").display().to_string(),
        );
        let text =
            crate::helpers::test_config_text(&self.sg1, &shared().redis.url(), "check:", &overlay);
        let file = self.dir.path().join("settled-sg.toml");
        std::fs::write(&file, text).unwrap();
        tokio::task::spawn_blocking(move || {
            crate::helpers::cli(&["--config", file.to_str().unwrap(), "check-config"])
        })
        .await
        .unwrap()
    }

    async fn moved(&self, user: &str) -> bool {
        query_opt_i64(
            &self.sg1,
            "SELECT count(*) FROM carts WHERE owner = $1 AND moved_at IS NOT NULL \
             AND moving_to = 'sg-2'",
            &[&format!("u:{user}")],
        )
        .await
            == Some(1)
    }
}

async fn add(
    app: &TestApp,
    user: &str,
    item: &str,
    quantity: i64,
    key: &str,
) -> crate::helpers::TestResponse {
    let body = format!(r#"{{"item_id":"{item}","quantity":{quantity}}}"#);
    app.send(
        "POST",
        "/api/v1/cart/items",
        &[app.bearer(user), h("idempotency-key", key)],
        Some(&body),
    )
    .await
}

#[tokio::test]
async fn a_moved_cart_keeps_its_items_version_and_idempotency_keys() {
    let cluster = Resharded::start().await;
    let user = &cluster.movers("keeps", 1)[0];
    let first = add(&cluster.old, user, "sku-00001", 2, "first-add").await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let second = add(&cluster.old, user, "sku-00002", 1, "second-add").await;
    assert_eq!(second.status, 200);
    let before = second.version();

    // Before the move the new edge finds the cart on the old shard, at its version.
    let read = cluster.new.user(user, "GET", "/api/v1/cart", None).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.version(), before);
    assert_eq!(read.quantity_of("sku-00001"), 2);
    assert_eq!(cluster.row_version(&cluster.sg2, user).await, None);
    assert!(!cluster.moved(user).await);

    // The replayed key is the cart's first write on the new ring: the cart moves, then the
    // key replays from the copied record, byte for byte, adding nothing.
    let replay = add(&cluster.new, user, "sku-00001", 2, "first-add").await;
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.body, first.body);
    assert!(cluster.moved(user).await, "the old row is marked moved");
    assert_eq!(
        cluster.lines(&cluster.sg1, user).await,
        0,
        "no stale lines left behind"
    );
    assert_eq!(cluster.row_version(&cluster.sg2, user).await, Some(before));
    assert_eq!(cluster.lines(&cluster.sg2, user).await, 2);

    // An edge still on ring 1 writes where the cart no longer lives: refused (503, retried),
    // nothing written there.
    let stale_edge = add(&cluster.old, user, "sku-00004", 1, "stale-edge").await;
    assert_eq!(stale_edge.status, 503, "{:?}", stale_edge.body);
    assert_eq!(stale_edge.error_code(), "unavailable");
    assert_eq!(cluster.lines(&cluster.sg1, user).await, 0);
    assert_eq!(cluster.row_version(&cluster.sg1, user).await, Some(before));

    // A new write lands on the new shard, above the moved version; reads show everything.
    let third = add(&cluster.new, user, "sku-00003", 4, "third-add").await;
    assert_eq!(third.status, 200, "{:?}", third.body);
    assert_eq!(third.version(), before + 1);
    let read = cluster
        .new
        .send(
            "GET",
            "/api/v1/cart",
            &[
                cluster.new.bearer(user),
                h("cart-min-version", &before.to_string()),
            ],
            None,
        )
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.version(), before + 1);
    assert_eq!(
        (
            read.quantity_of("sku-00001"),
            read.quantity_of("sku-00002"),
            read.quantity_of("sku-00003")
        ),
        (2, 1, 4)
    );
    // A second run of the whole move finds it done.
    let owner = OwnerKey::from_stored(format!("u:{user}"));
    let from = cluster
        .new
        .app
        .topology()
        .ring
        .previous_placement(owner.as_str(), None)
        .unwrap();
    let again = moves::ensure_moved(&cluster.new.app, &owner, from, "sg-2")
        .await
        .unwrap();
    assert_eq!(again, moves::Moved::Before);
    assert_eq!(
        cluster.row_version(&cluster.sg2, user).await,
        Some(before + 1)
    );
}

#[tokio::test]
async fn a_move_stopped_after_any_step_converges_on_the_next_write() {
    let cluster = Resharded::start().await;
    let users = cluster.movers("crash", 2);
    let store = &cluster.new.app.store;
    for user in &users {
        assert_eq!(
            add(&cluster.old, user, "sku-00010", 3, "seed").await.status,
            200
        );
    }
    let (frozen_only, copied_too) = (&users[0], &users[1]);
    // Crash after the freeze: the old row is frozen but still the cart.
    let owner = format!("u:{frozen_only}");
    let snapshot = match steps::freeze(store, "sg-1", &owner, "sg-2").await.unwrap() {
        steps::Freeze::Frozen { snapshot } => snapshot,
        other => panic!("{other:?}"),
    };
    assert_eq!(snapshot.version, 1);
    // A frozen row takes no write from an edge still on ring 1: its change would miss the copy.
    let stale_edge = add(&cluster.old, frozen_only, "sku-00011", 1, "stale-edge").await;
    assert_eq!(stale_edge.status, 503, "{:?}", stale_edge.body);
    assert_eq!(
        cluster.row_version(&cluster.sg1, frozen_only).await,
        Some(1)
    );
    let read = cluster
        .new
        .user(frozen_only, "GET", "/api/v1/cart", None)
        .await;
    assert_eq!(read.quantity_of("sku-00010"), 3);
    // Crash after the copy (its answer lost): copying again does nothing.
    let owner2 = format!("u:{copied_too}");
    let steps::Freeze::Frozen {
        snapshot: snapshot2,
    } = steps::freeze(store, "sg-1", &owner2, "sg-2").await.unwrap()
    else {
        panic!("not frozen");
    };
    assert_eq!(
        steps::copy(store, "sg-2", &snapshot2).await.unwrap(),
        steps::Copied::Now
    );
    assert_eq!(
        steps::copy(store, "sg-2", &snapshot2).await.unwrap(),
        steps::Copied::Before
    );
    let read = cluster
        .new
        .user(copied_too, "GET", "/api/v1/cart", None)
        .await;
    assert_eq!((read.version(), read.quantity_of("sku-00010")), (1, 3));

    // The next write of each applies once on the new shard: the frozen one's write finishes
    // its move; the copied one's finds its cart there and leaves the old row to `ring move`.
    for user in [frozen_only, copied_too] {
        let write = add(&cluster.new, user, "sku-00010", 1, "after-crash").await;
        assert_eq!(write.status, 200, "{:?}", write.body);
        assert_eq!((write.version(), write.quantity_of("sku-00010")), (2, 4));
        assert_eq!(cluster.row_version(&cluster.sg2, user).await, Some(2));
    }
    assert!(cluster.moved(frozen_only).await);
    assert!(!cluster.moved(copied_too).await, "frozen, not marked yet");
    let page = move_page(&cluster.new.app, "sg-1", "", 100, 1, UserHomes::Auto, true)
        .await
        .unwrap();
    assert_eq!((page.moved, page.errors), (1, 0));
    for user in [frozen_only, copied_too] {
        assert!(cluster.moved(user).await);
        assert_eq!(cluster.lines(&cluster.sg1, user).await, 0);
        assert_eq!(cluster.row_version(&cluster.sg2, user).await, Some(2));
        let read = cluster.new.user(user, "GET", "/api/v1/cart", None).await;
        assert_eq!((read.version(), read.quantity_of("sku-00010")), (2, 4));
    }
    // A mark replayed after it ran changes nothing.
    assert!(!steps::mark(store, "sg-1", &owner, "sg-2").await.unwrap());
}

#[tokio::test]
async fn ring_move_moves_every_remaining_owner_and_then_finds_nothing_left() {
    let cluster = Resharded::start().await;
    let users: Vec<String> = (0..40).map(|n| format!("batch-{n}")).collect();
    for user in &users {
        assert_eq!(
            add(&cluster.old, user, "sku-00005", 1, "seed").await.status,
            200
        );
    }
    let app = &cluster.new.app;
    let count = |act| async move {
        let mut total = (0, 0);
        let mut cursor = String::new();
        for _ in 0..100 {
            let page = move_page(app, "sg-1", &cursor, 7, 4, UserHomes::Auto, act)
                .await
                .unwrap();
            total.0 += page.moved;
            total.1 += page.errors;
            match page.next {
                Some(next) => cursor = next,
                None => return total,
            }
        }
        panic!("more than 100 pages");
    };
    let ring = &app.topology().ring;
    let expected = users
        .iter()
        .filter(|u| ring.previous_placement(&format!("u:{u}"), None).is_some())
        .count() as u64;
    assert!(expected > 0);
    assert_eq!(
        count(false).await,
        (expected, 0),
        "status counts what is left"
    );
    // Removing the marker now is refused: the old shard still holds carts to move.
    let early = cluster.check_settled_config().await;
    assert!(!early.status.success());
    let error = String::from_utf8_lossy(&early.stderr);
    assert!(
        error.contains(&format!("{expected} owners still have carts to move")),
        "{error}"
    );
    assert_eq!(count(true).await, (expected, 0));
    assert_eq!(count(false).await, (0, 0), "nothing left after the move");
    let done = cluster.check_settled_config().await;
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    for user in &users {
        let moves = ring
            .previous_placement(&format!("u:{user}"), None)
            .is_some();
        assert_eq!(cluster.moved(user).await, moves, "{user}");
        let read = cluster.new.user(user, "GET", "/api/v1/cart", None).await;
        assert_eq!(read.quantity_of("sku-00005"), 1, "{user}");
    }
}

/// The issue's load test, in one region: 200 owners seeded through the edge on ring 1, then
/// reads and writes through the edge on ring 2 while `move_page` moves everyone left. Every
/// acknowledged write is in the final carts, every read saw every write acknowledged before it
/// started, and the movers end up on sg-2.
#[tokio::test]
async fn adding_a_shard_under_load_loses_no_acknowledged_write() {
    const OWNERS: usize = 200;
    const WRITES_PER_OWNER: usize = 3;
    let cluster = Arc::new(Resharded::start().await);
    let users: Vec<String> = (0..OWNERS).map(|n| format!("load-{n}")).collect();
    for user in &users {
        assert_eq!(
            add(&cluster.old, user, "sku-00100", 1, "seed").await.status,
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    // Acknowledged quantity per (owner, item).
    let acknowledged = Arc::new(std::sync::Mutex::new(
        BTreeMap::<(String, String), i64>::new(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
    for (n, user) in users.iter().enumerate() {
        let (cluster, acknowledged, semaphore, user) = (
            cluster.clone(),
            acknowledged.clone(),
            semaphore.clone(),
            user.clone(),
        );
        acknowledged
            .lock()
            .unwrap()
            .insert((user.clone(), "sku-00100".into()), 1);
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.unwrap();
            let mut stale_reads = 0;
            let (mut read_ms, mut write_ms) = (Vec::new(), Vec::new());
            for write in 0..WRITES_PER_OWNER {
                assert!(Instant::now() < deadline, "load test ran out of time");
                let expected = acknowledged.lock().unwrap().clone();
                let started = Instant::now();
                let read = cluster.new.user(&user, "GET", "/api/v1/cart", None).await;
                read_ms.push(started.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(read.status, 200);
                for ((owner, item), quantity) in &expected {
                    if *owner == user && read.quantity_of(item) != *quantity {
                        stale_reads += 1;
                    }
                }
                let item = format!("sku-{:05}", 1 + (n + write) % 90);
                let key = format!("load-{write}");
                // An unknown outcome (503) is retried with the same key until acknowledged.
                for attempt in 0..20 {
                    let started = Instant::now();
                    let answer = add(&cluster.new, &user, &item, 1, &key).await;
                    write_ms.push(started.elapsed().as_secs_f64() * 1000.0);
                    if answer.status == 200 {
                        *acknowledged
                            .lock()
                            .unwrap()
                            .entry((user.clone(), item.clone()))
                            .or_insert(0) += 1;
                        break;
                    }
                    assert!(
                        answer.status.is_server_error() && attempt < 19,
                        "{:?}",
                        answer.body
                    );
                }
            }
            (stale_reads, read_ms, write_ms)
        });
    }
    // `ring move` runs meanwhile, page after page, until nothing is left.
    let mover = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let app = &cluster.new.app;
            let started = Instant::now();
            let (mut errors, mut total) = (0, 0);
            for _ in 0..50 {
                let mut cursor = String::new();
                let mut moved = 0;
                loop {
                    let page = move_page(app, "sg-1", &cursor, 25, 4, UserHomes::Auto, true)
                        .await
                        .unwrap();
                    moved += page.moved;
                    total += page.moved;
                    errors += page.errors;
                    match page.next {
                        Some(next) => cursor = next,
                        None => break,
                    }
                }
                if moved == 0 {
                    return (errors, total, started.elapsed());
                }
            }
            panic!("ring move did not finish in 50 passes");
        })
    };
    let mut stale_reads = 0;
    let (mut read_ms, mut write_ms) = (Vec::new(), Vec::new());
    while let Some(result) = tasks.join_next().await {
        let (stale, reads, writes) = result.unwrap();
        stale_reads += stale;
        read_ms.extend(reads);
        write_ms.extend(writes);
    }
    let (errors, moved_by_ring_move, took) = mover.await.unwrap();
    assert_eq!(errors, 0, "no move failed");
    // The figures of the closing note (a debug build on a shared machine: indicative only).
    let p99 = |mut samples: Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
    };
    eprintln!(
        "reshard load: ring move moved {moved_by_ring_move} owners in {:.2}s ({:.0}/s) under load; \
         read p99 {:.1} ms over {} reads, write p99 {:.1} ms over {} writes",
        took.as_secs_f64(),
        moved_by_ring_move as f64 / took.as_secs_f64().max(0.001),
        p99(read_ms.clone()),
        read_ms.len(),
        p99(write_ms.clone()),
        write_ms.len()
    );
    assert_eq!(
        stale_reads, 0,
        "every read showed the writes acknowledged before it"
    );
    let acknowledged = acknowledged.lock().unwrap().clone();
    let ring = &cluster.new.app.topology().ring;
    let mut movers = 0;
    for user in &users {
        let read = cluster.new.user(user, "GET", "/api/v1/cart", None).await;
        for ((owner, item), quantity) in &acknowledged {
            if owner == user {
                assert_eq!(read.quantity_of(item), *quantity, "{user} {item}");
            }
        }
        let lines = read.json()["items"].as_array().unwrap().len();
        let expected_lines = acknowledged
            .keys()
            .filter(|(owner, _)| owner == user)
            .count();
        assert_eq!(lines, expected_lines, "{user}: no line doubled or invented");
        if ring
            .previous_placement(&format!("u:{user}"), None)
            .is_some()
        {
            movers += 1;
            assert!(cluster.moved(user).await, "{user} moved");
            assert_eq!(cluster.lines(&cluster.sg1, user).await, 0);
            assert_eq!(
                cluster.lines(&cluster.sg2, user).await as usize,
                expected_lines
            );
        } else {
            assert_eq!(
                cluster.row_version(&cluster.sg2, user).await,
                None,
                "{user} stays"
            );
        }
    }
    assert!(movers > OWNERS / 4, "{movers} of {OWNERS} moved");
}

/// An owner without a home region (global ring) whose cart the new ring places on a shard
/// homed in another region: th (the new home) copies it, and sg's edge (the old shard's home)
/// freezes and marks it, asked over the internal surface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_moving_to_another_region_moves_through_the_old_shards_home_edge() {
    use crate::regions::{TwoRegions, TH2_DATABASE};
    let regions = TwoRegions::start_moving("2s").await;
    let ring = &regions.th.app.topology().ring;
    let mut movers = (0..10_000).map(|n| format!("abroad-{n}")).filter(|user| {
        let key = format!("u:{user}");
        ring.previous_placement(&key, None)
            .is_some_and(|before| before.shard == "sg-1")
            && ring.locate(&key).shard == "th-2"
    });
    let (user, quiet) = (movers.next().unwrap(), movers.next().unwrap());
    let owner = format!("u:{user}");
    // The cart as ring 1 left it on sg-1: version 3, two lines.
    let sg1 = regions.sg_primary.dsn("cartedge");
    for owner in [owner.clone(), format!("u:{quiet}")] {
        crate::helpers::execute(
            &sg1,
            &format!(
                "INSERT INTO carts (owner, currency, version) VALUES ('{owner}', 'SGD', 3); \
                 INSERT INTO cart_items (owner, line_id, item_id, quantity, unit_price_minor, currency) \
                 VALUES ('{owner}', 'sku-00001', 'sku-00001', 2, 500, 'SGD'), \
                        ('{owner}', 'sku-00002', 'sku-00002', 1, 700, 'SGD');"
            ),
        )
        .await;
    }
    // Read in sg before the move: the old shard's cart.
    let before = regions.get(&regions.sg, &user, None).await;
    assert_eq!(before.status, 200, "{:?}", before.body);
    assert_eq!((before.version(), before.quantity_of("sku-00001")), (3, 2));

    // A write received in sg goes to the new home, th, which moves the cart first.
    let token = regions.token(&user);
    let removed = regions
        .send(
            &regions.sg,
            "DELETE",
            "/api/v1/cart/items/sku-00002",
            &[
                ("authorization", format!("Bearer {token}")),
                ("idempotency-key", "remove-abroad".to_string()),
            ],
            None,
        )
        .await;
    assert_eq!(removed.status, 200, "{:?}", removed.body);
    assert_eq!(removed.header("cart-home-region"), Some("th"));
    assert_eq!(
        removed.version(),
        5,
        "the copy re-priced version 3 into THB as version 4; the write made 5"
    );
    assert_eq!(removed.quantity_of("sku-00001"), 2);
    assert_eq!(removed.quantity_of("sku-00002"), 0);
    let th2 = regions.th_primary.dsn(TH2_DATABASE);
    let on_th2 = query_opt_i64(
        &th2,
        "SELECT version FROM carts WHERE owner = $1",
        &[&owner],
    )
    .await;
    assert_eq!(on_th2, Some(5));
    let marked = query_opt_i64(
        &sg1,
        "SELECT count(*) FROM carts WHERE owner = $1 AND moved_at IS NOT NULL \
         AND moving_to = 'th-2' AND NOT EXISTS (SELECT 1 FROM cart_items i WHERE i.owner = $1)",
        &[&owner],
    )
    .await;
    assert_eq!(marked, Some(1), "sg's edge marked the old row moved");
    // Its new home prices it: the cart is in th's currency from th's catalog, so adds work.
    assert_eq!(removed.json()["currency"], "THB");
    let added = regions
        .send(
            &regions.sg,
            "POST",
            "/api/v1/cart/items",
            &[
                ("authorization", format!("Bearer {token}")),
                ("idempotency-key", "add-abroad".to_string()),
            ],
            Some(r#"{"item_id":"sku-00003","quantity":1}"#),
        )
        .await;
    assert_eq!(added.status, 200, "{:?}", added.body);
    assert_eq!(added.version(), 6);

    // Both regions read the moved cart (sg through its replica of th-2, at least version 6).
    let deadline = Instant::now() + Duration::from_secs(10);
    for edge in [&regions.th, &regions.sg] {
        loop {
            let read = regions.get(edge, &user, Some(6)).await;
            assert_eq!(read.status, 200, "{:?}", read.body);
            if read.version() == 6 {
                assert_eq!(read.quantity_of("sku-00001"), 2);
                assert_eq!(read.quantity_of("sku-00002"), 0);
                assert_eq!(read.quantity_of("sku-00003"), 1);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "read stuck at {}",
                read.version()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // A cart moved by `ring move` (no write): sg had cached it at version 3 in SGD; the
    // re-priced copy is version 4 in THB and sg's cache is fenced, so sg never serves the old
    // prices as the current cart.
    let cached = regions.get(&regions.sg, &quiet, None).await;
    assert_eq!(
        (cached.version(), cached.json()["currency"].as_str()),
        (3, Some("SGD"))
    );
    // th scans sg-1 on its replica, which may not have replayed the seeded row yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = move_page(&regions.th.app, "sg-1", "", 100, 2, UserHomes::Global, true)
            .await
            .unwrap();
        assert_eq!(page.errors, 0);
        let quiet_moved = query_opt_i64(
            &sg1,
            "SELECT count(*) FROM carts WHERE owner = $1 AND moved_at IS NOT NULL",
            &[&format!("u:{quiet}")],
        )
        .await;
        if quiet_moved == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "{page:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = regions.get(&regions.sg, &quiet, None).await;
        assert_eq!(read.status, 200, "{:?}", read.body);
        if read.version() == 4 {
            assert_eq!(read.json()["currency"], "THB");
            assert_eq!(read.quantity_of("sku-00002"), 1);
            break;
        }
        assert_eq!(read.version(), 3, "{:?}", read.body);
        assert!(Instant::now() < deadline, "sg kept serving version 3");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// In the middle of a roll (sg still on ring 1, th on ring 2 moving from 1) each side runs the
/// other's forwarded writes; a sender naming any other ring is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_ring_roll_both_sides_accept_each_others_forwarded_writes() {
    use crate::regions::TwoRegions;
    let regions = TwoRegions::start_rolling("2s").await;
    let (v1, v2) = (
        &regions.sg.app.topology().ring,
        &regions.th.app.topology().ring,
    );
    assert_ne!(v1.fingerprint(), v2.fingerprint());
    assert_eq!(v2.previous().unwrap().fingerprint(), v1.fingerprint());
    // Users both rings place alike (the roll moves neither), homed in sg and in th.
    let steady = |home: &str, salt: &str| {
        (0..10_000)
            .map(|n| format!("{salt}-{n}"))
            .find(|user| {
                let key = format!("u:{user}");
                v1.locate(&key).home == home && v2.locate(&key).shard == v1.locate(&key).shard
            })
            .unwrap()
    };
    let (of_sg, of_th) = (steady("sg", "roll-sg"), steady("th", "roll-th"));
    // sg (ring 1) forwards to th (ring 2 moving from 1): th knows ring 1.
    let at_th = regions
        .add(&regions.sg, &of_th, "sku-00001", 1, Some("roll-1"))
        .await;
    assert_eq!(at_th.status, 200, "{:?}", at_th.body);
    assert_eq!(at_th.header("cart-home-region"), Some("th"));
    // th forwards to sg with `cart-ring-moving-from`: sg accepts a ring moving from its own.
    let at_sg = regions
        .add(&regions.th, &of_sg, "sku-00002", 1, Some("roll-2"))
        .await;
    assert_eq!(at_sg.status, 200, "{:?}", at_sg.body);
    assert_eq!(at_sg.header("cart-home-region"), Some("sg"));

    // A ring 2 that says it moves from some other ring is refused by sg.
    let forwarder =
        regions.th_client_of_sg(Some(http::HeaderValue::from_static("0000000000000000")));
    let mut headers = http::HeaderMap::new();
    let token = regions.token(&of_sg);
    headers.insert(
        "authorization",
        http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert("idempotency-key", http::HeaderValue::from_static("roll-3"));
    headers.insert("cart-forwarded-from", http::HeaderValue::from_static("th"));
    headers.insert(
        "cart-ring",
        http::HeaderValue::from_str(v2.fingerprint()).unwrap(),
    );
    let refused = forwarder
        .send(
            "sg",
            http::Method::POST,
            "/api/v1/cart/items",
            &headers,
            bytes::Bytes::from_static(br#"{"item_id":"sku-00003","quantity":1}"#),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 503);
    assert!(
        String::from_utf8_lossy(&refused.body).contains("topology_mismatch"),
        "{:?}",
        refused.body
    );
}

/// One HTTP request to a local cluster edge with a bearer token: (status, JSON body).
async fn call(
    url: &str,
    method: &str,
    bearer: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let authorization = [("authorization", format!("Bearer {bearer}"))];
    crate::local::http(url, method, &authorization, body).await
}

/// The issue's `cartedge local add-shard`: a shard added to sg of a running local cluster takes
/// its share of the carts written before, every cart reads back the same in every region, and
/// nothing is left to move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_add_shard_moves_the_carts_the_new_shard_takes_and_loses_none() {
    use crate::helpers::{cli, local_up, LOCAL_TEST_PORTS};
    let started = local_up("add-shard", LOCAL_TEST_PORTS, &[]);
    let dir = started.cluster.dir.clone();
    let sg_file = dir.join("regions/sg.toml");
    let sg_file = sg_file.to_str().unwrap();
    let token = |sub: &str| {
        let output = cli(&["--config", sg_file, "token", "--sub", sub]);
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    let users: Vec<(String, String)> = (0..40)
        .map(|n| {
            let user = format!("shopper-{n}");
            let bearer = token(&user);
            (user, bearer)
        })
        .collect();
    let sg_edge = format!("http://127.0.0.1:{}", started.edge_port);
    let th_edge = format!("http://127.0.0.1:{}", started.edge_port + 2);
    for (_, bearer) in &users {
        let (status, body) = call(
            &format!("{sg_edge}/api/v1/cart/items"),
            "POST",
            bearer,
            Some(r#"{"item_id":"sku-00007","quantity":2}"#),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }

    let edge_pids = || -> Vec<u64> {
        let cluster: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
        cluster["regions"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|region| region["edges"].as_array().unwrap().clone())
            .map(|edge| edge["pid"].as_u64().unwrap())
            .collect()
    };
    let pids_before = edge_pids();
    let added = tokio::task::spawn_blocking({
        let dir = started.dir.clone();
        move || cli(&["local", "add-shard", "sg-2@sg", "--dir", &dir])
    })
    .await
    .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(
        added
            .stdout
            .trim_ascii_end()
            .rsplit(|b| *b == b'\n')
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(report["errors"], 0, "{report}");

    let ring = cartedge::topology::load_ring(&dir.join("ring.toml")).unwrap();
    assert_eq!(ring.spec().moving_from, Some(1));
    // Rolled without a restart: the same processes, each serving ring 2 moving from 1.
    assert_eq!(edge_pids(), pids_before, "no edge was restarted");
    for pid in &pids_before {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "edge {pid} still runs"
        );
    }
    let health = |edge: &str| {
        let edge = edge.to_string();
        async move {
            let (status, health) = call(&format!("{edge}/health"), "GET", "", None).await;
            assert_eq!(status, 200, "{health}");
            (
                health["ring"]["version"].clone(),
                health["ring"]["moving_from"].clone(),
            )
        }
    };
    for edge in [&sg_edge, &th_edge] {
        assert_eq!(health(edge).await, (2.into(), 1.into()), "{edge}");
    }
    let movers = users
        .iter()
        .filter(|(user, _)| {
            ring.previous_placement(&format!("u:{user}"), None)
                .is_some()
        })
        .count();
    assert!(movers > 0);
    // Tokens without a region claim: users found on id-1 or th-1 might also be homed there
    // (then sg-2 takes nothing of theirs), so `--users auto` leaves them to their first write;
    // this deployment knows its tokens.
    let moved_first = report["moved"].as_u64().unwrap();
    assert!(moved_first > 0, "{report}");
    assert!(report["undecided_users"].as_u64().unwrap() > 0, "{report}");
    let global = cli(&["--config", sg_file, "ring", "move", "--users", "global"]);
    assert!(
        global.status.success(),
        "{}",
        String::from_utf8_lossy(&global.stderr)
    );
    let second: serde_json::Value = serde_json::from_slice(&global.stdout).unwrap();
    assert_eq!(
        second["moved"].as_u64().unwrap() + moved_first,
        movers as u64,
        "{second}"
    );
    let cluster: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    let sg2 = cluster["regions"][0]["postgres"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["shards"][0] == "sg-2" && p["role"] == "primary")
        .unwrap()["dsn"]
        .as_str()
        .unwrap()
        .to_string();
    for (user, bearer) in &users {
        let owner = format!("u:{user}");
        let on_sg2 = query_opt_i64(
            &sg2,
            "SELECT version FROM carts WHERE owner = $1",
            &[&owner],
        )
        .await;
        let before = ring.previous_placement(&owner, None);
        assert_eq!(on_sg2.is_some(), before.is_some(), "{user}");
        // A cart that came from another region was re-priced in SGD at the next version (the
        // fence reaching the other regions' caches asynchronously: polled, bounded).
        let (version, currency) = match before {
            Some(before) if before.home != "sg" => (2, Some("SGD")),
            _ => (1, None),
        };
        for edge in [&sg_edge, &th_edge] {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (status, cart) =
                    call(&format!("{edge}/api/v1/cart"), "GET", bearer, None).await;
                assert_eq!(status, 200, "{cart}");
                assert_eq!(cart["items"][0]["quantity"], 2, "{user} at {edge}: {cart}");
                if cart["version"] == version {
                    if let Some(currency) = currency {
                        assert_eq!(cart["currency"], currency, "{user} at {edge}: {cart}");
                    }
                    break;
                }
                assert!(Instant::now() < deadline, "{user} at {edge}: {cart}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let status = cli(&[
        "--config", sg_file, "ring", "move", "--status", "--users", "global",
    ]);
    let left: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(left["left_to_move_here"], 0, "{left}");

    // The move over, the marker goes and `local reload` rolls the settled ring, again without
    // a restart; every cart still reads back.
    let ring_path = dir.join("ring.toml");
    let settled = std::fs::read_to_string(&ring_path)
        .unwrap()
        .replace("moving_from = 1\n", "");
    std::fs::write(&ring_path, settled).unwrap();
    let reloaded = tokio::task::spawn_blocking({
        let dir = started.dir.clone();
        move || cli(&["local", "reload", "--dir", &dir])
    })
    .await
    .unwrap();
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    assert_eq!(edge_pids(), pids_before, "no edge was restarted");
    for edge in [&sg_edge, &th_edge] {
        assert_eq!(
            health(edge).await,
            (2.into(), serde_json::Value::Null),
            "{edge}"
        );
    }
    for (user, bearer) in &users {
        let (status, cart) = call(&format!("{th_edge}/api/v1/cart"), "GET", bearer, None).await;
        assert_eq!(status, 200, "{cart}");
        assert_eq!(cart["items"][0]["quantity"], 2, "{user}: {cart}");
    }
}

/// The issue's "rolled to every edge without a restart": one edge starts on ring 1, carts
/// are written, ring 2 (adding `sg-2`, moving from 1) and the shard's pools arrive by
/// `App::reload` (what SIGHUP runs) while readers keep reading, and the edge then serves ring
/// 2: reads find every cart, a moving owner's write moves its cart to the new shard, the
/// settled ring (marker removed) reloads the same way, and a reload that removes a shard is
/// refused with the running ring kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_reloaded_without_a_restart_serves_the_new_shard_and_every_cart_throughout() {
    let dir = tempfile::Builder::new()
        .prefix("cartedge-reload-ring-")
        .tempdir_in(shared().dir.path())
        .unwrap();
    let path = dir.path();
    std::fs::create_dir_all(path.join("regions")).unwrap();
    std::fs::write(path.join("ring.toml"), RING_V1).unwrap();
    let (database, sg1) = fresh_database().await;
    let (_, sg2) = fresh_database().await;
    let edge = Arc::new(
        TestApp::spawn_on(
            &sg1,
            &database,
            TestOptions {
                overlay: shard_overlay(path, "ring.toml", &[("sg-1", &sg1)]),
                ..TestOptions::default()
            },
        )
        .await,
    );
    let config_with = |shards: &[(&str, &str)]| {
        crate::helpers::test_config(
            &sg1,
            edge.config.redis.url.expose(),
            &edge.config.redis.key_prefix,
            &shard_overlay(path, "ring.toml", shards),
        )
    };
    let ring_of = |health: &crate::helpers::TestResponse| {
        let ring = &health.json()["ring"];
        (ring["version"].as_u64(), ring["moving_from"].as_u64())
    };
    assert_eq!(
        ring_of(&edge.send("GET", "/health", &[], None).await),
        (Some(1), None)
    );

    // Owners ring 2 will move from sg-1 to sg-2, each with a cart written on ring 1.
    std::fs::write(path.join("ring.v1.toml"), RING_V1).unwrap();
    let next_path = path.join("next.toml");
    std::fs::write(&next_path, RING_V2.replace("moving_from = 1\n", "")).unwrap();
    let next = cartedge::topology::load_ring(&next_path).unwrap();
    let movers: Vec<String> = (0..400)
        .map(|n| format!("reload-{n}"))
        .filter(|user| next.locate(&format!("u:{user}")).shard == "sg-2")
        .take(12)
        .collect();
    assert_eq!(movers.len(), 12);
    for user in &movers {
        let added = add(&edge, user, "sku-00005", 3, &format!("{user}-first")).await;
        assert_eq!(added.status, 200, "{:?}", added.body);
    }

    // Readers run across the reload (bounded: until told to stop, or 30 s).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|reader| {
            let (edge, stop, movers) = (edge.clone(), stop.clone(), movers.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut reads = 0u32;
                let mut n = reader;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    let user = &movers[n % movers.len()];
                    let read = edge.user(user, "GET", "/api/v1/cart", None).await;
                    assert_eq!(read.status, 200, "{user}: {:?}", read.body);
                    assert_eq!(read.quantity_of("sku-00005"), 3, "{user}: {:?}", read.body);
                    reads += 1;
                    n += 3;
                }
                reads
            })
        })
        .collect();

    std::fs::write(path.join("ring.toml"), RING_V2).unwrap();
    edge.app
        .reload(&config_with(&[("sg-1", &sg1), ("sg-2", &sg2)]))
        .expect("ring 2 reloads");
    assert_eq!(
        ring_of(&edge.send("GET", "/health", &[], None).await),
        (Some(2), Some(1))
    );
    let exposition = edge.app.metrics_text(cartedge::metrics::Format::Text);
    assert!(
        exposition.contains("ring_version=\"2\"") && !exposition.contains("ring_version=\"1\""),
        "cartedge_build_info names the ring served"
    );
    // A moving owner's write moves its cart to the new shard first; a replayed key replays.
    let user = &movers[0];
    let write = add(&edge, user, "sku-00006", 1, &format!("{user}-second")).await;
    assert_eq!(write.status, 200, "{:?}", write.body);
    assert_eq!(write.version(), 2);
    assert_eq!(
        query_opt_i64(
            &sg2,
            "SELECT version FROM carts WHERE owner = $1",
            &[&format!("u:{user}")]
        )
        .await,
        Some(2),
        "the cart lives on sg-2 now"
    );
    let replay = add(&edge, user, "sku-00005", 3, &format!("{user}-first")).await;
    assert_eq!(replay.status, 200);
    assert_eq!(
        replay.version(),
        1,
        "the first add replays from its moved record"
    );

    // Every other mover, by the move `ring move` runs.
    let mut cursor = String::new();
    loop {
        let page = move_page(&edge.app, "sg-1", &cursor, 100, 2, UserHomes::Global, true)
            .await
            .unwrap();
        assert_eq!(page.errors, 0);
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }

    // The settled ring reloads the same way; a ring that drops a shard is refused.
    std::fs::write(path.join("ring.toml"), RING_V2_SETTLED).unwrap();
    edge.app
        .reload(&config_with(&[("sg-1", &sg1), ("sg-2", &sg2)]))
        .expect("the settled ring reloads");
    assert_eq!(
        ring_of(&edge.send("GET", "/health", &[], None).await),
        (Some(2), None)
    );
    // A marker alone (same version, same placement) is a ring change a reload installs too.
    std::fs::write(
        path.join("ring.toml"),
        format!("claims_from_global = true\n{RING_V2_SETTLED}"),
    )
    .unwrap();
    edge.app
        .reload(&config_with(&[("sg-1", &sg1), ("sg-2", &sg2)]))
        .expect("the marked ring reloads");
    let health = edge.send("GET", "/health", &[], None).await;
    assert_eq!(health.json()["ring"]["claims_from_global"], true);
    std::fs::write(
        path.join("ring.toml"),
        "version = 3\nvnodes = 200\n[[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n",
    )
    .unwrap();
    let refused = edge
        .app
        .reload(&config_with(&[("sg-1", &sg1)]))
        .expect_err("dropping a shard needs a restart");
    assert!(
        format!("{refused:#}").contains("sg-2 is no longer listed"),
        "{refused:#}"
    );
    assert_eq!(
        ring_of(&edge.send("GET", "/health", &[], None).await),
        (Some(2), None)
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    for reader in readers {
        reads += reader
            .await
            .expect("every read during the reload showed the cart");
    }
    assert!(reads > 0);
    for user in &movers {
        let read = edge.user(user, "GET", "/api/v1/cart", None).await;
        assert_eq!(read.status, 200);
        assert_eq!(read.quantity_of("sku-00005"), 3, "{user}");
        assert!(
            query_opt_i64(
                &sg2,
                "SELECT version FROM carts WHERE owner = $1",
                &[&format!("u:{user}")]
            )
            .await
            .is_some(),
            "{user} moved to sg-2"
        );
    }
}

/// Reads `user`'s cart at `edge` with `token` until it shows `version` (bounded: another
/// region's replica may not have replayed it yet).
async fn read_until(
    regions: &crate::regions::TwoRegions,
    edge: &crate::regions::Edge,
    token: &str,
    version: i64,
) -> crate::helpers::TestResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = regions
            .send(
                edge,
                "GET",
                "/api/v1/cart",
                &[("authorization", format!("Bearer {token}"))],
                None,
            )
            .await;
        assert_eq!(read.status, 200, "{:?}", read.body);
        if read.version() == version {
            return read;
        }
        assert!(Instant::now() < deadline, "read stuck: {:?}", read.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A user whose first tokens named no region (the global ring put the cart on sg-1, homed in
/// sg) and whose tokens now name th: with `claims_from_global` in the ring, edges find the cart
/// on sg-1 before it moves, and `ring move --claims` run in th moves it to th-1 (re-priced in
/// THB at the next version), keeping its idempotency records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_whose_token_gains_a_region_claim_keeps_the_cart_the_global_ring_placed() {
    use crate::regions::{homed_token, TwoRegions};
    let regions = TwoRegions::start_claims("2s", "[parking]\nenabled = false\n").await;
    let ring = &regions.th.app.topology().ring;
    assert!(ring.claims_from_global());
    let user = regions.user_homed_in("sg", "gains-claim");
    let owner = format!("u:{user}");
    assert_eq!(
        ring.unclaimed_placement(&owner, "th")
            .map(|p| p.shard.as_str()),
        Some("sg-1")
    );
    // A line for sg's run, and a th user the global ring already placed on th-1.
    let for_sg = regions.user_homed_in("sg", "claims-sg");
    let in_place = regions.user_homed_in("th", "claims-th");
    let (sg1, th1) = (
        regions.sg_primary.dsn("cartedge"),
        regions.th_primary.dsn("cartedge"),
    );
    let moved_row = || async {
        query_opt_i64(
            &sg1,
            "SELECT version FROM carts WHERE owner = $1 AND moved_at IS NOT NULL \
             AND moving_to = 'th-1' AND NOT EXISTS (SELECT 1 FROM cart_items i WHERE i.owner = $1)",
            &[&owner],
        )
        .await
    };
    let on_th1 = || async {
        query_opt_i64(
            &th1,
            "SELECT version FROM carts WHERE owner = $1",
            &[&owner],
        )
        .await
    };

    // Shopping with a token without the claim: the cart is on sg-1, in SGD.
    let first = regions
        .add(&regions.sg, &user, "sku-00001", 2, Some("before-claim"))
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.json()["currency"], "SGD");
    let second = regions
        .add(&regions.th, &user, "sku-00002", 1, Some("before-claim-2"))
        .await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.version(), 2);

    // (a) The token now names th: both edges show the cart still on sg-1, before any move.
    let claimed = homed_token(&regions, &user, "th");
    for edge in [&regions.sg, &regions.th] {
        let read = read_until(&regions, edge, &claimed, 2).await;
        assert_eq!(read.quantity_of("sku-00001"), 2);
        assert_eq!(read.quantity_of("sku-00002"), 1);
    }
    assert_eq!(on_th1().await, None, "nothing moved by a read");

    // (d) A malformed file is refused with its line number before anything moves.
    let app = &regions.th.app;
    for (file, line) in [
        (format!("{user},th\nnot a line at all\n"), 2),
        (format!("# claims\n{user},th\n\n{in_place} vn\n"), 4),
    ] {
        match moves::move_claims(app, &file, 10, 2, |_| {}).await {
            Err(moves::ClaimsError::Line { line: at, .. }) => assert_eq!(at, line, "{file}"),
            other => panic!("{file}: {other:?}"),
        }
    }
    assert_eq!(on_th1().await, None);
    assert_eq!(moved_row().await, None);

    // (b) `ring move --claims` in th: the status first, then the move.
    let file = format!("# user,region\n{user},th\n{for_sg} sg\n\n{in_place},th\n");
    let left = moves::claims_status(app, &file, 2).await.unwrap();
    assert_eq!(
        (left.users_here, left.to_move, left.left),
        (2, 1, 1),
        "{left:?}"
    );
    assert_eq!(left.elsewhere, BTreeMap::from([("sg".to_string(), 1)]));
    let mut progress_lines = 0;
    let report = moves::move_claims(app, &file, 10, 2, |_| progress_lines += 1)
        .await
        .unwrap();
    assert_eq!(
        (report.to_move, report.moved, report.copied, report.errors),
        (1, 1, 1, 0),
        "{report:?}"
    );
    assert_eq!(report.elsewhere, BTreeMap::from([("sg".to_string(), 1)]));
    assert_eq!(progress_lines, 1);
    assert_eq!(
        on_th1().await,
        Some(3),
        "re-priced into THB: the copy is version 2 + 1"
    );
    assert_eq!(moved_row().await, Some(2), "the old row is a pointer");
    let read = read_until(&regions, &regions.th, &claimed, 3).await;
    assert_eq!(read.json()["currency"], "THB");
    assert_eq!(
        (read.quantity_of("sku-00001"), read.quantity_of("sku-00002")),
        (2, 1)
    );
    // An Idempotency-Key from before the claim still replays on the new shard.
    let replay = regions
        .send(
            &regions.th,
            "POST",
            "/api/v1/cart/items",
            &[
                ("authorization", format!("Bearer {claimed}")),
                ("idempotency-key", "before-claim".to_string()),
            ],
            Some(r#"{"item_id":"sku-00001","quantity":2}"#),
        )
        .await;
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.body, first.body);
    assert_eq!(on_th1().await, Some(3), "the replay added nothing");
    // Rerunning finds it done; nothing is left.
    let again = moves::move_claims(app, &file, 10, 2, |_| {}).await.unwrap();
    assert_eq!((again.moved, again.copied, again.errors), (1, 0, 0));
    // `--status` reads th's replica of sg-1, which replays the mark shortly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = moves::claims_status(app, &file, 2).await.unwrap();
        if left.left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // sg reads the moved cart too (through its replica of th-1, or th).
    let read = read_until(&regions, &regions.sg, &claimed, 3).await;
    assert_eq!(read.quantity_of("sku-00001"), 2);
}

/// Why the marker exists: without it an edge looks for a claimed user's cart on the claimed
/// region's ring only, where it is not, and `ring move --claims` refuses to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_claims_marker_a_claimed_token_does_not_see_the_global_cart() {
    use crate::regions::{homed_token, TwoRegions};
    let regions = TwoRegions::start_with("2s", "").await;
    assert!(!regions.sg.app.topology().ring.claims_from_global());
    let user = regions.user_homed_in("sg", "no-marker");
    let written = regions
        .add(&regions.sg, &user, "sku-00001", 2, Some("before-claim"))
        .await;
    assert_eq!(written.status, 200, "{:?}", written.body);
    // Once th's replica of sg-1 holds the cart, th's edge (which never cached it) reads the
    // claimed user's cart on th-1 only: empty.
    let deadline = Instant::now() + Duration::from_secs(10);
    while query_opt_i64(
        &regions.th_replica_of_sg.dsn("cartedge"),
        "SELECT version FROM carts WHERE owner = $1",
        &[&format!("u:{user}")],
    )
    .await
        != Some(1)
    {
        assert!(
            Instant::now() < deadline,
            "th's replica never replayed the cart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claimed = homed_token(&regions, &user, "th");
    let read = read_until(&regions, &regions.th, &claimed, 0).await;
    assert_eq!(read.quantity_of("sku-00001"), 0);
    let refused = moves::move_claims(&regions.th.app, &format!("{user},th\n"), 10, 2, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(refused, moves::ClaimsError::NoMarker),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("claims_from_global"));
}

/// An add parked in sg for a claimed user homed in th (th cut off) is delivered to th, which
/// first moves the cart the global ring placed on sg-1: the parked add joins the old items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_add_of_a_user_who_gained_a_claim_moves_the_global_cart_before_applying() {
    use crate::regions::{homed_token, TwoRegions};
    use cartedge_dev::linkproxy::PartitionMode;
    let regions = TwoRegions::start_claims("700ms", "[parking]\ninterval = \"200ms\"\n").await;
    let user = regions.user_homed_in("sg", "parked-claim");
    let owner = format!("u:{user}");
    let before = regions
        .add(&regions.sg, &user, "sku-00001", 2, Some("before-claim"))
        .await;
    assert_eq!(before.status, 200, "{:?}", before.body);
    // The token now names th, which sg cannot reach: the add is parked in sg.
    regions.proxy.partition("sg", "th", PartitionMode::Reset);
    let claimed = homed_token(&regions, &user, "th");
    let parked = regions
        .send(
            &regions.sg,
            "POST",
            "/api/v1/cart/items",
            &[
                ("authorization", format!("Bearer {claimed}")),
                ("idempotency-key", "parked-add".to_string()),
            ],
            Some(r#"{"item_id":"sku-00002","quantity":1}"#),
        )
        .await;
    assert_eq!(parked.status, 202, "{:?}", parked.body);
    regions.proxy.heal("sg", "th");
    // sg's reconciler delivers it; th moves the cart first, then applies the add.
    let th1 = regions.th_primary.dsn("cartedge");
    let deadline = Instant::now() + Duration::from_secs(30);
    while query_opt_i64(
        &th1,
        "SELECT quantity::bigint FROM cart_items WHERE owner = $1 AND item_id = 'sku-00002'",
        &[&owner],
    )
    .await
        != Some(1)
    {
        assert!(Instant::now() < deadline, "the parked add never reached th");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old_items = query_opt_i64(
        &th1,
        "SELECT quantity::bigint FROM cart_items WHERE owner = $1 AND item_id = 'sku-00001'",
        &[&owner],
    )
    .await;
    assert_eq!(
        old_items,
        Some(2),
        "the cart from before the claim moved with it"
    );
    let moved = query_opt_i64(
        &regions.sg_primary.dsn("cartedge"),
        "SELECT count(*) FROM carts WHERE owner = $1 AND moved_at IS NOT NULL",
        &[&owner],
    )
    .await;
    assert_eq!(moved, Some(1), "sg-1's row is a pointer");
}

/// `cartedge ring move --claims` as an SRE runs it, on one region whose only shard is sg-1
/// (every sg user is already where the claim puts it): one JSON line out, `--status` too; a
/// bad line, a ring without the marker, or `--users` with it is refused with its reason.
#[tokio::test]
async fn ring_move_claims_on_the_command_line_reports_and_refuses_with_reasons() {
    use crate::helpers::{cli, test_config_text};
    let (_, dsn) = fresh_database().await;
    let dir = tempfile::Builder::new()
        .prefix("cartedge-claims-cli-")
        .tempdir_in(shared().dir.path())
        .unwrap();
    std::fs::create_dir_all(dir.path().join("regions")).unwrap();
    std::fs::write(
        dir.path().join("ring.toml"),
        RING_V1.replace(
            "vnodes = 200\n",
            "vnodes = 200\nclaims_from_global = true\n",
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("plain.toml"), RING_V1).unwrap();
    let config_for = |ring: &str| {
        let text = test_config_text(
            &dsn,
            &shared().redis.url(),
            "claims-cli:",
            &shard_overlay(dir.path(), ring, &[("sg-1", &dsn)]),
        );
        let file = dir.path().join(format!("sg-{ring}"));
        std::fs::write(&file, text).unwrap();
        file.display().to_string()
    };
    let (marked, plain) = (config_for("ring.toml"), config_for("plain.toml"));
    let claims = |name: &str, text: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        file.display().to_string()
    };
    let good = claims("good.csv", "# user,region\nalice,sg\n\nbob sg\n");
    let bad = claims("bad.csv", "alice,sg\nbob\n");
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let args = |config: &str, rest: &[&str]| {
        let mut all = vec!["--config".to_string(), config.to_string()];
        all.extend(["ring", "move"].iter().chain(rest).map(|s| s.to_string()));
        all
    };

    // check-config names the marker (the fingerprint does not show it).
    let checked = run(vec![
        "--config".into(),
        marked.clone(),
        "check-config".into(),
    ])
    .await;
    assert!(checked.status.success());
    assert!(String::from_utf8_lossy(&checked.stdout).contains("# claims_from_global:"));

    let moved = run(args(&marked, &["--claims", &good])).await;
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&moved.stdout).unwrap();
    assert_eq!(
        (
            &report["users_here"],
            &report["to_move_here"],
            &report["errors"]
        ),
        (&2.into(), &0.into(), &0.into()),
        "{report}"
    );
    let status = run(args(&marked, &["--claims", &good, "--status"])).await;
    assert!(status.status.success());
    let left: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(left["left_to_move_here"], 0, "{left}");

    for (args, reason) in [
        (args(&marked, &["--claims", &bad]), "line 2"),
        (args(&plain, &["--claims", &good]), "claims_from_global"),
        (
            args(&marked, &["--claims", &good, "--users", "global"]),
            "cannot be used with",
        ),
    ] {
        let refused = run(args.clone()).await;
        let error = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{args:?}");
        assert!(error.contains(reason), "{args:?}: {error}");
    }
}
