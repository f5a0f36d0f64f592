//! Hot-path micro-benchmarks, each with its budget: routing + body parsing, token
//! verification (cold and remembered), guest sessions, ring placement, the rate-limit check,
//! cart view encoding, cached cart decoding, and a read answered from the edge's memory (the
//! near cache with the view body it keeps).
//!
//! `scripts/bench` (or `cargo bench --bench edge`) runs them and then prints each estimate
//! (criterion's mean) beside its budget, exiting non-zero when one is over. The budgets come
//! from the seed's peak: 50 000 requests/s on a region's edges leaves an edge core roughly 40 µs
//! of CPU per request for everything, kernel and TLS included, so each step of the cache-hit
//! read gets a slice of that; cold token verification happens once per token lifetime.
//! Benchmarks are not tests: `cargo test --benches` runs each once, without the budgets.

use std::hint::black_box;
use std::time::Duration;

use cartedge::api::request::{parse_json, AddItemBody};
use cartedge::auth::{issue_token, Authenticator};
use cartedge::config::{AuthConfig, Dur, JwtKeyConfig, Secret};
use cartedge::domain::cart::{view, CatalogItem, StoredCart, StoredLine};
use cartedge::domain::money::{Currency, Money};
use cartedge::domain::variant::stored_line_id;
use cartedge::store::near::NearCache;
use criterion::{criterion_group, Criterion};

/// The allocator the `cartedge` binary runs with, so allocation costs are the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Each benchmark's budget: criterion's mean estimate must stay at or below it.
const BUDGETS: [(&str, Duration); 10] = [
    ("route_and_parse_add_item", Duration::from_micros(3)),
    ("verify_hs256_token_first_time", Duration::from_micros(25)),
    ("verify_hs256_token_remembered", Duration::from_micros(1)),
    ("verify_guest_session", Duration::from_micros(2)),
    (
        "ring_place_owner_global_and_regional",
        Duration::from_micros(1),
    ),
    ("rate_limit_check_owner", Duration::from_micros(1)),
    ("encode_5_item_cart_view", Duration::from_micros(10)),
    ("decode_cached_5_item_cart", Duration::from_micros(5)),
    ("decode_cached_50_item_cart", Duration::from_micros(20)),
    ("near_cache_hit_with_kept_view", Duration::from_nanos(500)),
];

fn auth_config() -> AuthConfig {
    AuthConfig {
        issuer: "cartedge".into(),
        audience: "cartedge-api".into(),
        leeway: Dur(Duration::from_secs(1)),
        max_token_lifetime: Dur(Duration::from_secs(24 * 3600)),
        session_secret: Secret::new("s".repeat(32)),
        session_id_version: 2,
        require_region_claim: false,
        keys: vec![JwtKeyConfig {
            kid: "k".into(),
            algorithm: "HS256".into(),
            secret: Secret::new("k".repeat(32)),
            public_key_file: None,
        }],
    }
}

fn five_item_cart() -> (StoredCart, Vec<CatalogItem>) {
    cart_of(5)
}

fn cart_of(items: u16) -> (StoredCart, Vec<CatalogItem>) {
    let sgd = Currency::parse("SGD").unwrap();
    let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let lines: Vec<StoredLine> = (1..=items)
        .map(|n| {
            let item_id = format!("sku-{n:05}");
            let variant = (n % 2 == 0).then(|| serde_json::json!({"size": "M", "colour": "navy"}));
            StoredLine {
                line_id: stored_line_id(None, &item_id, variant.as_ref()),
                item_id,
                quantity: n,
                variant,
                unit_price_minor: 1000 + i64::from(n) * 37,
                added_at: at,
                updated_at: at,
            }
        })
        .collect();
    let catalog = lines
        .iter()
        .map(|line| CatalogItem {
            item_id: line.item_id.clone(),
            name: format!("Item {}", line.item_id),
            active: true,
            stock: 1000,
            prices: vec![Money::new(line.unit_price_minor, sgd)],
        })
        .collect();
    let cart = StoredCart {
        owner: "u:alice".into(),
        currency: Some(sgd),
        version: 12,
        lines,
        updated_at: Some(at),
    };
    (cart, catalog)
}

fn routing_and_parsing(c: &mut Criterion) {
    let body = br#"{"item_id":"sku-00042","quantity":2,"variant":{"size":"M"},"price":{"amount_minor":1999,"currency":"SGD"}}"#;
    c.bench_function("route_and_parse_add_item", |b| {
        b.iter(|| {
            let route = cartedge::api::route_name(black_box("/api/v1/cart/items"));
            let parsed: AddItemBody = parse_json(black_box(body)).unwrap();
            black_box((route, parsed.validate().is_ok()))
        })
    });
}

fn token_verification(c: &mut Criterion) {
    let config = auth_config();
    let auth = Authenticator::new(&config, Duration::from_secs(30 * 24 * 3600)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = issue_token(&config, "alice", Duration::from_secs(3600), now).unwrap();
    c.bench_function("verify_hs256_token_first_time", |b| {
        b.iter_batched(
            || Authenticator::new(&config, Duration::from_secs(30 * 24 * 3600)).unwrap(),
            |fresh| black_box(fresh.verify_token(black_box(&token)).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("verify_hs256_token_remembered", |b| {
        b.iter(|| black_box(auth.verify_token(black_box(&token)).unwrap()))
    });
    let session = auth.issue_session();
    c.bench_function("verify_guest_session", |b| {
        b.iter(|| black_box(auth.verify_session(black_box(session.as_str())).unwrap()))
    });
}

fn cart_encoding(c: &mut Criterion) {
    let (cart, catalog) = five_item_cart();
    let sgd = Currency::parse("SGD").unwrap();
    c.bench_function("encode_5_item_cart_view", |b| {
        b.iter(|| {
            let rendered = view(black_box(&cart), sgd, |id| {
                catalog.iter().find(|i| i.item_id == id)
            });
            black_box(serde_json::to_vec(&rendered).unwrap())
        })
    });
    let cached = serde_json::to_vec(&cart).unwrap();
    c.bench_function("decode_cached_5_item_cart", |b| {
        b.iter(|| black_box(serde_json::from_slice::<StoredCart>(black_box(&cached)).unwrap()))
    });
    let (large, _) = cart_of(50);
    let cached = serde_json::to_vec(&large).unwrap();
    c.bench_function("decode_cached_50_item_cart", |b| {
        b.iter(|| black_box(serde_json::from_slice::<StoredCart>(black_box(&cached)).unwrap()))
    });
}

/// The cache-hit read's storage step: the owner's entry in the edge's memory and the view body
/// kept with it (no copy of the cart, no render, no encode), among 10 000 entries.
fn near_cache_hit(c: &mut Criterion) {
    let near = NearCache::new(100_000, "cart:");
    near.listen();
    let (cart, catalog) = five_item_cart();
    let sgd = Currency::parse("SGD").unwrap();
    let body = bytes::Bytes::from(
        serde_json::to_vec(&view(&cart, sgd, |id| {
            catalog.iter().find(|i| i.item_id == id)
        }))
        .unwrap(),
    );
    let owners: Vec<String> = (0..10_000).map(|n| format!("u:user-{n}")).collect();
    for owner in &owners {
        near.fill(
            &StoredCart {
                owner: owner.clone(),
                ..cart.clone()
            },
            near.generation(),
        );
        near.get(owner)
            .unwrap()
            .keep_rendered(1, "sg", body.clone());
    }
    // Longer than the run: every lookup finds its body.
    let ttl = Duration::from_secs(3600);
    let mut next = 0;
    c.bench_function("near_cache_hit_with_kept_view", |b| {
        b.iter(|| {
            next = (next + 1) % owners.len();
            let entry = near.get(black_box(&owners[next])).unwrap();
            black_box(entry.rendered(1, "sg", ttl).unwrap())
        })
    });
}

fn placement_and_limits(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ring = cartedge::topology::load_ring(&root.join("config/ring.toml")).unwrap();
    c.bench_function("ring_place_owner_global_and_regional", |b| {
        b.iter(|| {
            let global = ring.place(black_box("u:alice"), None).unwrap();
            let regional = ring.place(black_box("u:alice"), Some("id")).unwrap();
            black_box((global.shard, regional.shard))
        })
    });
    let defaults: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("config/default.toml")).unwrap())
            .unwrap();
    let mut config: cartedge::config::RateLimitConfig =
        defaults["rate_limit"].clone().try_into().unwrap();
    config.enabled = true;
    let limits =
        cartedge::limits::RateLimits::new(&config, &cartedge::metrics::LimitMetrics::default())
            .unwrap();
    let owners: Vec<String> = (0..1024).map(|n| format!("u:user-{n}")).collect();
    let mut next = 0;
    c.bench_function("rate_limit_check_owner", |b| {
        b.iter(|| {
            next = (next + 1) % owners.len();
            black_box(limits.check_owner(
                cartedge::limits::Tier::Service,
                cartedge::limits::Class::Read,
                black_box(&owners[next]),
            ))
        })
    });
}

criterion_group!(
    benches,
    routing_and_parsing,
    token_verification,
    placement_and_limits,
    cart_encoding,
    near_cache_hit
);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench` passes `--bench`; `cargo test --benches` runs each benchmark once without
    // it, and writes no estimates worth checking.
    if std::env::args().any(|arg| arg == "--bench") && !check_budgets() {
        std::process::exit(1);
    }
}

/// Prints each benchmark's mean estimate beside its budget; false when one is over (or was
/// not measured).
fn check_budgets() -> bool {
    let criterion_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion");
    println!(
        "\n{:<40} {:>12} {:>12}  verdict",
        "benchmark", "mean", "budget"
    );
    let mut all_within = true;
    for (name, budget) in BUDGETS {
        let path = criterion_dir.join(name).join("new/estimates.json");
        let mean = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|estimates| estimates["mean"]["point_estimate"].as_f64())
            .map(|ns| Duration::from_nanos(ns.round() as u64));
        let (shown, verdict) = match mean {
            Some(mean) if mean <= budget => (format!("{mean:.2?}"), "ok"),
            Some(mean) => (format!("{mean:.2?}"), "OVER BUDGET"),
            None => ("-".to_string(), "NOT MEASURED"),
        };
        all_within &= verdict == "ok";
        println!(
            "{name:<40} {shown:>12} {:>12}  {verdict}",
            format!("{budget:.2?}")
        );
    }
    all_within
}
