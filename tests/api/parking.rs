//! Adds parked in a visiting region while the cart's home region is cut off, and delivered
//! exactly once after the heal (two regions on one ring: `sg` homes `sg-1`, `th` homes `th-1`,
//! so `th` parks on `th-1`'s primary). Built on the regions tests' cluster and link proxy.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cartedge::metrics::Format;
use cartedge_dev::linkproxy::PartitionMode;
use cartedge_dev::procs::PgInstance;
use http::StatusCode;
use serde_json::Value;

use crate::helpers::TestResponse;
use crate::regions::TwoRegions;

/// A reconciler pass every 200 ms, so a drain is quick to observe.
const FAST_RECONCILER: &str = "[parking]\ninterval = \"200ms\"\n";

/// How long a drain after the heal may take before a test fails.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

async fn query_i64(pg: &PgInstance, sql: &str, owner: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(&pg.dsn("cartedge"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let row = client.query_one(sql, &[&owner]).await.unwrap();
    drop(client);
    let _ = driver.await;
    row.get(0)
}

/// Parked adds of `owner` at th (pending or rejected).
async fn parked_at_th(regions: &TwoRegions, owner: &str) -> i64 {
    query_i64(
        &regions.th_primary,
        "SELECT count(*)::bigint FROM parked_writes WHERE owner = $1",
        owner,
    )
    .await
}

/// Every line of `owner`'s cart at its home primary (sg), item → quantity.
async fn lines_at_sg(regions: &TwoRegions, owner: &str) -> BTreeMap<String, i64> {
    let (client, connection) =
        tokio_postgres::connect(&regions.sg_primary.dsn("cartedge"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT item_id, quantity::bigint FROM cart_items WHERE owner = $1",
            &[&owner],
        )
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn warnings(response: &TestResponse, code: &str) -> Vec<Value> {
    response.json()["warnings"]
        .as_array()
        .map(|all| all.iter().filter(|w| w["code"] == code).cloned().collect())
        .unwrap_or_default()
}

fn pending_items(response: &TestResponse) -> Vec<String> {
    let mut items: Vec<String> = warnings(response, "write_pending")
        .iter()
        .map(|w| w["item_id"].as_str().unwrap_or_default().to_string())
        .collect();
    items.sort();
    items
}

fn metric_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn th_metric(regions: &TwoRegions, series: &str) -> f64 {
    metric_value(&regions.th.app.metrics_text(Format::Text), series)
}

/// An add at th that reaches sg (`applied`: item, quantity, key), then, with sg cut off from
/// th, an add at th that is parked (`parked`); the link is healed before the parked answer
/// (202) is returned.
async fn add_then_park(
    regions: &TwoRegions,
    user: &str,
    applied: (&str, i64, Option<&str>),
    parked: (&str, i64, &str),
) -> TestResponse {
    let (item, quantity, key) = applied;
    let before = regions.add(&regions.th, user, item, quantity, key).await;
    assert_eq!(before.status, StatusCode::OK, "{:?}", before.body);
    regions
        .proxy
        .partition("sg", "th", PartitionMode::Blackhole);
    let (item, quantity, key) = parked;
    let answer = regions
        .add(&regions.th, user, item, quantity, Some(key))
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    regions.proxy.heal("sg", "th");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_at_th_for_a_shopper_cut_off_from_sg_are_parked_shown_and_applied_once_after_heal() {
    let regions = TwoRegions::start_with("700ms", FAST_RECONCILER).await;
    let user = regions.user_homed_in("sg", "parked");
    let owner = format!("u:{user}");
    let before = regions
        .add(&regions.th, &user, "sku-00001", 1, Some("before-cut"))
        .await;
    assert_eq!(before.status, StatusCode::OK, "{:?}", before.body);

    assert_eq!(
        regions
            .proxy
            .partition("sg", "th", PartitionMode::Blackhole),
        2
    );
    // Three adds, the second sent twice under the same key; the third without a key.
    let first = regions
        .add(&regions.th, &user, "sku-00002", 2, Some("park-a"))
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    assert_eq!(first.header("cart-write-pending"), Some("1"));
    assert_eq!(first.header("cart-source"), Some("replica"));
    assert_eq!(first.header("idempotency-key"), Some("park-a"));
    assert!(first.header("etag").is_none());
    assert_eq!(first.quantity_of("sku-00002"), 2);
    assert_eq!(first.quantity_of("sku-00001"), 1, "the replica's cart");
    assert_eq!(pending_items(&first), ["sku-00002"]);
    let second = regions
        .add(&regions.th, &user, "sku-00003", 1, Some("park-b"))
        .await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(second.header("cart-write-pending"), Some("2"));
    let replayed = regions
        .add(&regions.th, &user, "sku-00003", 1, Some("park-b"))
        .await;
    assert_eq!(
        replayed.status,
        StatusCode::ACCEPTED,
        "a replay while parked"
    );
    assert_eq!(replayed.header("cart-write-pending"), Some("2"));
    assert_eq!(replayed.quantity_of("sku-00003"), 1, "parked once");
    let third = regions.add(&regions.th, &user, "sku-00004", 3, None).await;
    assert_eq!(third.status, StatusCode::ACCEPTED);
    assert!(third
        .header("idempotency-key")
        .is_some_and(|key| key.starts_with("fwd-")));
    assert_eq!(parked_at_th(&regions, &owner).await, 3);

    // Reads at th show the parked adds; reads at sg do not (yet).
    let read = regions.get(&regions.th, &user, None).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.header("cart-write-pending"), Some("3"));
    assert_eq!(
        pending_items(&read),
        ["sku-00002", "sku-00003", "sku-00004"]
    );
    assert_eq!(read.quantity_of("sku-00001"), 1);
    assert_eq!(read.quantity_of("sku-00002"), 2);
    assert_eq!(read.quantity_of("sku-00003"), 1);
    assert_eq!(read.quantity_of("sku-00004"), 3);
    let at_home = regions.get(&regions.sg, &user, None).await;
    assert_eq!(at_home.quantity_of("sku-00002"), 0);
    assert!(at_home.header("cart-write-pending").is_none());

    // Anything but an add still needs the home region. (A line not in the cart: the blackhole
    // delivers the held request at the heal, where it changes nothing.)
    let remove = regions
        .send(
            &regions.th,
            "DELETE",
            "/api/v1/cart/items/sku-00009",
            &[("authorization", format!("Bearer {}", regions.token(&user)))],
            None,
        )
        .await;
    assert_eq!(remove.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(remove.error_code(), "home_region_unavailable");

    let healed_at = Instant::now();
    regions.proxy.heal("sg", "th");
    let expected: BTreeMap<String, i64> = [
        ("sku-00001", 1),
        ("sku-00002", 2),
        ("sku-00003", 1),
        ("sku-00004", 3),
    ]
    .into_iter()
    .map(|(item, quantity)| (item.to_string(), quantity))
    .collect();
    let mut drained = false;
    while healed_at.elapsed() < DRAIN_LIMIT {
        if parked_at_th(&regions, &owner).await == 0
            && lines_at_sg(&regions, &owner).await == expected
        {
            drained = true;
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(
        drained,
        "parked adds not applied within {DRAIN_LIMIT:?}: home {:?}, {} still parked",
        lines_at_sg(&regions, &owner).await,
        parked_at_th(&regions, &owner).await
    );
    eprintln!(
        "parking drill: 3 adds parked, drained {} ms after the heal",
        healed_at.elapsed().as_millis()
    );
    // Applied once each, and th reads them back from sg's cart without a pending warning.
    let read = regions.get(&regions.th, &user, None).await;
    assert!(read.header("cart-write-pending").is_none());
    assert!(pending_items(&read).is_empty(), "{:?}", read.json());
    for (item, quantity) in &expected {
        assert_eq!(read.quantity_of(item), *quantity, "{item}");
    }
    assert_eq!(
        th_metric(
            &regions,
            "cartedge_parked_write_outcomes_total{outcome=\"parked\"}"
        ),
        3.0
    );
    assert_eq!(
        th_metric(
            &regions,
            "cartedge_parked_write_outcomes_total{outcome=\"replayed\"}"
        ),
        1.0
    );
    assert_eq!(
        th_metric(
            &regions,
            "cartedge_parked_write_outcomes_total{outcome=\"applied\"}"
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_add_past_999_is_reported_once_as_write_rejected_at_th() {
    let regions = TwoRegions::start_with("700ms", FAST_RECONCILER).await;
    let user = regions.user_homed_in("sg", "rejected");
    let owner = format!("u:{user}");
    let parked = add_then_park(
        &regions,
        &user,
        ("sku-00005", 990, None),
        ("sku-00005", 20, "too-many"),
    )
    .await;
    assert_eq!(pending_items(&parked), ["sku-00005"]);

    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut reported = None;
    while Instant::now() < deadline {
        let read = regions.get(&regions.th, &user, None).await;
        assert_eq!(read.status, StatusCode::OK);
        if !warnings(&read, "write_rejected").is_empty() {
            reported = Some(read);
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let reported = reported.expect("the refused add is reported at th");
    let rejected = warnings(&reported, "write_rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["item_id"], "sku-00005");
    let message = rejected[0]["message"].as_str().unwrap();
    assert!(message.contains("quantity_limit"), "{message}");
    assert!(pending_items(&reported).is_empty());
    assert_eq!(reported.quantity_of("sku-00005"), 990);
    // Reported once: the next read has no warning and nothing is left parked.
    let next = regions.get(&regions.th, &user, None).await;
    assert!(
        warnings(&next, "write_rejected").is_empty(),
        "{:?}",
        next.json()
    );
    assert_eq!(parked_at_th(&regions, &owner).await, 0);
    assert_eq!(regions.quantity_at_home(&user, "sku-00005").await, 990);
    assert_eq!(
        th_metric(
            &regions,
            "cartedge_parked_write_outcomes_total{outcome=\"rejected\"}"
        ),
        1.0
    );
}

/// Every line of `owner`'s cart at sg that is also still parked at th: adds the home region
/// committed whose answer never reached th.
async fn committed_but_still_parked(regions: &TwoRegions, owner: &str) -> usize {
    let (client, connection) =
        tokio_postgres::connect(&regions.th_primary.dsn("cartedge"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    let parked: Vec<String> = client
        .query(
            "SELECT item_id FROM parked_writes WHERE owner = $1",
            &[&owner],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let _ = driver.await;
    let home = lines_at_sg(regions, owner).await;
    parked
        .iter()
        .filter(|item| home.contains_key(*item))
        .count()
}

/// Polls (bounded) until sg has committed an add of `owner` that th still holds parked: an
/// answer lost after the commit. Returns how many there were.
async fn await_lost_answer(regions: &TwoRegions, owner: &str) -> usize {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let lost = committed_but_still_parked(regions, owner).await;
        if lost > 0 || Instant::now() >= deadline {
            return lost;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A parked add that reached sg under its key another way (here the shopper's retry sent
/// straight to sg; in the drain, a delivery whose answer is still on its way) is in the cart sg
/// answers th with, while th's replica (paused) has neither that cart nor sg's record of the
/// key. th must show the add once, in the cart, not a second time as pending: it asks sg which
/// parked keys that cart holds. Reading the records from its own replica instead shows the
/// line at quantity 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_add_already_in_the_newer_cart_sg_answers_shows_once_at_th() {
    // The reconciler runs once at start, then not within the test: the add stays parked.
    let regions = TwoRegions::start_with("700ms", "[parking]\ninterval = \"1h\"\n").await;
    let user = regions.user_homed_in("sg", "overlay");
    let owner = format!("u:{user}");
    add_then_park(
        &regions,
        &user,
        ("sku-00001", 1, Some("overlay-0")),
        ("sku-00002", 1, "overlay-1"),
    )
    .await;

    regions.replica_sql("SELECT pg_wal_replay_pause()").await;
    let at_sg = regions
        .add(&regions.sg, &user, "sku-00002", 1, Some("overlay-1"))
        .await;
    assert_eq!(at_sg.status, StatusCode::OK, "{:?}", at_sg.body);
    assert_eq!(regions.quantity_at_home(&user, "sku-00002").await, 1);
    assert_eq!(
        parked_at_th(&regions, &owner).await,
        1,
        "still parked at th"
    );

    // th's replica cannot reach that version, so th asks sg for the cart, and lays its parked
    // add over sg's answer.
    let read = regions.get(&regions.th, &user, Some(at_sg.version())).await;
    regions.replica_sql("SELECT pg_wal_replay_resume()").await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
    assert_eq!(read.version(), at_sg.version());
    assert_eq!(read.header("cart-source"), Some("primary"));
    assert_eq!(read.quantity_of("sku-00002"), 1, "{:?}", read.body);
    assert_eq!(read.quantity_of("sku-00001"), 1);
    assert!(pending_items(&read).is_empty(), "{:?}", read.body);
    assert_eq!(read.header("cart-write-pending"), None);
    assert_eq!(
        th_metric(&regions, "cartedge_parked_overlay_unsure_total"),
        0.0
    );
}

/// The history check: every add acknowledged (200 or 202) uses its own item, quantity 1, so a
/// lost add is a missing line and a doubled one a quantity of 2. Answers are lost after the
/// commit by slowing the link past th's forward timeout (900 ms each way, timeout 800 ms): a
/// request on the open connection still reaches sg and commits, its answer never reaches th.
/// Shopper B loses the answer of its own forward (the add is parked, yet already applied);
/// shopper A's adds are parked during a partition, and the link turns slow while the
/// reconciler delivers them. When the link is fast again everything drains, and every
/// acknowledged add is in sg's cart exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_parked_through_lost_answers_are_applied_exactly_once() {
    const PARKED_ADDS: usize = 15;
    const SLOW: u64 = 900;
    let regions = TwoRegions::start_with("800ms", FAST_RECONCILER).await;
    let shoppers = [
        regions.user_homed_in("sg", "history-a"),
        regions.user_homed_in("sg", "history-b"),
    ];
    let owners: Vec<String> = shoppers.iter().map(|user| format!("u:{user}")).collect();
    let mut acknowledged: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let add = async |shopper: usize, n: usize, acknowledged: &mut [Vec<String>; 2]| {
        let item = format!("sku-{:05}", 10 + shopper * 20 + n);
        let answer = regions
            .add(
                &regions.th,
                &shoppers[shopper],
                &item,
                1,
                Some(&format!("history-{shopper}-{n}")),
            )
            .await;
        assert!(
            matches!(answer.status, StatusCode::ACCEPTED | StatusCode::OK),
            "add {shopper}/{n}: {} {:?}",
            answer.status,
            answer.body
        );
        acknowledged[shopper].push(item);
        answer.status
    };
    // Both carts exist, and th's connection to sg is open (the slow link then delays requests
    // and answers on it, not a handshake).
    assert_eq!(add(0, 0, &mut acknowledged).await, StatusCode::OK);
    assert_eq!(add(1, 0, &mut acknowledged).await, StatusCode::OK);

    // B: the forward commits at sg after th gave up on it; th parks the add.
    regions.proxy.set_delay("sg", "th", SLOW);
    assert_eq!(add(1, 1, &mut acknowledged).await, StatusCode::ACCEPTED);
    let lost_by_forward = await_lost_answer(&regions, &owners[1]).await;
    assert_eq!(
        lost_by_forward, 1,
        "B's forward committed with its answer lost"
    );
    regions.proxy.set_delay("sg", "th", 0);

    // A: parked during a partition.
    regions
        .proxy
        .partition("sg", "th", PartitionMode::Blackhole);
    let partitioned_at = Instant::now();
    for n in 1..=PARKED_ADDS {
        assert_eq!(add(0, n, &mut acknowledged).await, StatusCode::ACCEPTED);
    }
    let accepting = partitioned_at.elapsed();
    // Heal with a 30 ms link, so each delivery takes a while; slow it past the timeout once the
    // reconciler has delivered a few: the one then in flight commits with its answer lost.
    let healed_at = Instant::now();
    regions.proxy.set_delay("sg", "th", 30);
    regions.proxy.heal("sg", "th");
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline && parked_at_th(&regions, &owners[0]).await > 12 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    regions.proxy.set_delay("sg", "th", SLOW);
    let lost_by_reconciler = await_lost_answer(&regions, &owners[0]).await;
    assert!(
        lost_by_reconciler > 0,
        "a reconciler delivery committed with its answer lost"
    );

    let fast_at = Instant::now();
    regions.proxy.set_delay("sg", "th", 0);
    let mut parked = 1;
    // Reads at th while the backlog drains: every acknowledged add of A shows exactly once
    // (parked or applied, never neither, never both).
    let mut read_breaches = Vec::new();
    let mut reads = 0;
    while fast_at.elapsed() < DRAIN_LIMIT && parked > 0 {
        parked = 0;
        for owner in &owners {
            parked += parked_at_th(&regions, owner).await;
        }
        let read = regions.get(&regions.th, &shoppers[0], None).await;
        reads += 1;
        for item in &acknowledged[0] {
            match read.quantity_of(item) {
                1 => {}
                quantity => read_breaches.push(format!("read {reads}: {item} x{quantity}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        read_breaches.is_empty(),
        "reads at th during the drain: {read_breaches:?}"
    );
    eprintln!("{reads} reads at th during the drain, each showing every add once");
    let drained_in = fast_at.elapsed();
    assert_eq!(parked, 0, "not drained within {DRAIN_LIMIT:?}");
    let (mut lost, mut doubled, mut applied) = (Vec::new(), Vec::new(), 0);
    for (shopper, owner) in owners.iter().enumerate() {
        let lines = lines_at_sg(&regions, owner).await;
        applied += lines.len();
        for item in &acknowledged[shopper] {
            match lines.get(item) {
                None => lost.push(item.clone()),
                Some(1) => {}
                Some(_) => doubled.push(item.clone()),
            }
        }
        assert!(
            lines
                .keys()
                .all(|item| acknowledged[shopper].contains(item)),
            "lines never acknowledged: {lines:?}"
        );
    }
    eprintln!(
        "parking history drill: {PARKED_ADDS} adds accepted (202) during the partition in {} ms; \
         answers lost after commit: {lost_by_forward} of a forward, {lost_by_reconciler} of the \
         reconciler; {applied} adds at home of {} acknowledged; all parked adds applied {} ms \
         after the heal ({} ms after the link was fast again); lost {}, doubled {}",
        accepting.as_millis(),
        acknowledged[0].len() + acknowledged[1].len(),
        healed_at.elapsed().as_millis(),
        drained_in.as_millis(),
        lost.len(),
        doubled.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(doubled.is_empty(), "doubled: {doubled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_relayed_after_the_heal_first_delivers_the_owners_parked_adds() {
    // No reconciler pass after start-up: only the write itself can deliver the parked add.
    let regions = TwoRegions::start_with("700ms", "[parking]\ninterval = \"1h\"\n").await;
    let user = regions.user_homed_in("sg", "flush");
    let owner = format!("u:{user}");
    // Reset: the add's own forward fails at once and never reaches sg later.
    regions.proxy.partition("sg", "th", PartitionMode::Reset);
    let parked = regions
        .add(&regions.th, &user, "sku-00006", 2, Some("flush-add"))
        .await;
    assert_eq!(parked.status, StatusCode::ACCEPTED, "{:?}", parked.body);
    regions.proxy.heal("sg", "th");
    // The shopper sets the quantity they see: applied after the parked add, not before it.
    let token = format!("Bearer {}", regions.token(&user));
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut set = None;
    while Instant::now() < deadline {
        let answer = regions
            .send(
                &regions.th,
                "PUT",
                "/api/v1/cart/items/sku-00006",
                &[("authorization", token.clone())],
                Some(r#"{"quantity":5}"#),
            )
            .await;
        // 503 while th's breaker to sg is still open from the cut.
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            set = Some(answer);
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let set = set.expect("the set goes through after the heal");
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    assert_eq!(set.quantity_of("sku-00006"), 5);
    assert_eq!(regions.quantity_at_home(&user, "sku-00006").await, 5);
    assert_eq!(parked_at_th(&regions, &owner).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_is_capped_per_owner_and_an_add_parked_past_max_age_is_rejected_with_its_reason() {
    let regions = TwoRegions::start_with(
        "700ms",
        "[parking]\ninterval = \"200ms\"\nmax_per_owner = 2\nmax_age = \"1h\"\n",
    )
    .await;
    let user = regions.user_homed_in("sg", "capped");
    let owner = format!("u:{user}");
    regions.proxy.partition("sg", "th", PartitionMode::Reset);
    for (n, item) in ["sku-00007", "sku-00008"].into_iter().enumerate() {
        let parked = regions
            .add(&regions.th, &user, item, 1, Some(&format!("capped-{n}")))
            .await;
        assert_eq!(parked.status, StatusCode::ACCEPTED, "{:?}", parked.body);
    }
    // Past the owner's cap: 503 as without parking.
    let refused = regions
        .add(&regions.th, &user, "sku-00009", 1, Some("capped-2"))
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "home_region_unavailable");
    assert_eq!(refused.header("idempotency-key"), Some("capped-2"));
    assert_eq!(parked_at_th(&regions, &owner).await, 2);
    assert_eq!(
        th_metric(
            &regions,
            "cartedge_parked_write_outcomes_total{outcome=\"refused\"}"
        ),
        1.0
    );

    // One of them has waited longer than parking.max_age: the reconciler rejects it although
    // the home region is still out of reach, and the next read says why.
    query_i64(
        &regions.th_primary,
        "WITH aged AS (UPDATE parked_writes SET parked_at = now() - interval '2 hours' \
         WHERE owner = $1 AND idempotency_key = 'capped-0' RETURNING 1) \
         SELECT count(*)::bigint FROM aged",
        &owner,
    )
    .await;
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut reported = None;
    while Instant::now() < deadline {
        let read = regions.get(&regions.th, &user, None).await;
        if !warnings(&read, "write_rejected").is_empty() {
            reported = Some(read);
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let reported = reported.expect("the expired add is reported");
    let rejected = warnings(&reported, "write_rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["item_id"], "sku-00007");
    let message = rejected[0]["message"].as_str().unwrap();
    assert!(message.contains("parked_too_long"), "{message}");
    // The other one is still pending, and still shown.
    assert_eq!(pending_items(&reported), ["sku-00008"]);
    assert_eq!(reported.header("cart-write-pending"), Some("1"));
    assert_eq!(reported.quantity_of("sku-00007"), 0);
    assert_eq!(
        th_metric(
            &regions,
            "cartedge_parked_write_outcomes_total{outcome=\"expired\"}"
        ),
        1.0
    );
}
