//! Hot-path micro-benchmarks: routing + body parsing, token verification, cart encoding.
//! Run with `cargo bench --bench edge`; quote results as ratios within one run.

use std::hint::black_box;
use std::time::Duration;

use cartedge::api::request::{parse_json, AddItemBody};
use cartedge::auth::{issue_token, Authenticator};
use cartedge::config::{AuthConfig, Dur, JwtKeyConfig, Secret};
use cartedge::domain::cart::{view, CatalogItem, StoredCart, StoredLine};
use cartedge::domain::money::{Currency, Money};
use cartedge::domain::variant::stored_line_id;
use criterion::{criterion_group, criterion_main, Criterion};

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
    let sgd = Currency::parse("SGD").unwrap();
    let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let lines: Vec<StoredLine> = (1..=5)
        .map(|n| {
            let item_id = format!("sku-0000{n}");
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
}

criterion_group!(
    benches,
    routing_and_parsing,
    token_verification,
    cart_encoding
);
criterion_main!(benches);
