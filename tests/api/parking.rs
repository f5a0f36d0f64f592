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
    let (client, connection) = tokio_postgres::connect(
        &regions.sg_primary.dsn("cartedge"),
        tokio_postgres::NoTls,
    )
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
        .map(|all| {
            all.iter()
                .filter(|w| w["code"] == code)
                .cloned()
                .collect()
        })
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
    assert_eq!(replayed.status, StatusCode::ACCEPTED, "a replay while parked");
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
    assert_eq!(pending_items(&read), ["sku-00002", "sku-00003", "sku-00004"]);
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
            &[(
                "authorization",
                format!("Bearer {}", regions.token(&user)),
            )],
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
        if parked_at_th(&regions, &owner).await == 0 && lines_at_sg(&regions, &owner).await == expected {
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
    let before = regions
        .add(&regions.th, &user, "sku-00005", 990, None)
        .await;
    assert_eq!(before.status, StatusCode::OK, "{:?}", before.body);
    regions
        .proxy
        .partition("sg", "th", PartitionMode::Blackhole);
    let parked = regions
        .add(&regions.th, &user, "sku-00005", 20, Some("too-many"))
        .await;
    assert_eq!(parked.status, StatusCode::ACCEPTED, "{:?}", parked.body);
    assert_eq!(pending_items(&parked), ["sku-00005"]);
    regions.proxy.heal("sg", "th");

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
    assert!(warnings(&next, "write_rejected").is_empty(), "{:?}", next.json());
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

/// The history check: every add acknowledged during a partition (202 or 200) uses its own item,
/// quantity 1. The first parked adds' own forwards are held by the blackhole and delivered at
/// the heal (their answers lost), and the reconciler is cut off again mid-drain (its answers
/// lost too). After the final heal every acknowledged add is in sg's cart exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_parked_through_lost_answers_and_a_second_cut_are_applied_exactly_once() {
    const ADDS: usize = 30;
    let regions = TwoRegions::start_with("700ms", FAST_RECONCILER).await;
    let user = regions.user_homed_in("sg", "history");
    let owner = format!("u:{user}");
    // Each round trip through the link takes at least 60 ms, so the drain takes a while.
    regions.proxy.set_delay("sg", "th", 30);
    regions
        .proxy
        .partition("sg", "th", PartitionMode::Blackhole);
    let mut acknowledged = Vec::new();
    let partitioned_at = Instant::now();
    for n in 0..ADDS {
        let item = format!("sku-{:05}", 10 + n);
        let answer = regions
            .add(&regions.th, &user, &item, 1, Some(&format!("history-{n}")))
            .await;
        assert!(
            matches!(answer.status, StatusCode::ACCEPTED | StatusCode::OK),
            "add {n}: {} {:?}",
            answer.status,
            answer.body
        );
        acknowledged.push(item);
    }
    let accepting = partitioned_at.elapsed();
    assert_eq!(parked_at_th(&regions, &owner).await, ADDS as i64);

    regions.proxy.heal("sg", "th");
    // Cut again once the reconciler has delivered a few, so some of its answers are lost.
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline && parked_at_th(&regions, &owner).await > (ADDS as i64) - 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let timeouts = |regions: &TwoRegions| {
        th_metric(
            regions,
            "cartedge_forward_requests_total{peer=\"sg\",outcome=\"timeout\"}",
        )
    };
    let timeouts_before = timeouts(&regions);
    regions
        .proxy
        .partition("sg", "th", PartitionMode::Blackhole);
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline && timeouts(&regions) <= timeouts_before {
        tokio::time::sleep(POLL).await;
    }
    assert!(
        timeouts(&regions) > timeouts_before,
        "the reconciler's forward was cut"
    );
    let still_parked = parked_at_th(&regions, &owner).await;
    assert!(still_parked > 0, "the second cut came after the drain");

    let healed_at = Instant::now();
    regions.proxy.heal("sg", "th");
    while healed_at.elapsed() < DRAIN_LIMIT && parked_at_th(&regions, &owner).await > 0 {
        tokio::time::sleep(POLL).await;
    }
    let drained_in = healed_at.elapsed();
    assert_eq!(parked_at_th(&regions, &owner).await, 0, "not drained");
    let lines = lines_at_sg(&regions, &owner).await;
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|item| !lines.contains_key(*item))
        .collect();
    let doubled: Vec<(&String, &i64)> = lines.iter().filter(|(_, q)| **q != 1).collect();
    let unknown: Vec<&String> = lines
        .keys()
        .filter(|item| !acknowledged.contains(item))
        .collect();
    eprintln!(
        "parking history drill: {} adds accepted during the partition in {} ms, {} applied after \
         the heals, {} parked at the second cut, drained {} ms after the final heal; lost {}, \
         doubled {}",
        acknowledged.len(),
        accepting.as_millis(),
        lines.len(),
        still_parked,
        drained_in.as_millis(),
        lost.len(),
        doubled.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(doubled.is_empty(), "doubled: {doubled:?}");
    assert!(unknown.is_empty(), "never acknowledged: {unknown:?}");
    assert_eq!(lines.len(), ADDS);
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
