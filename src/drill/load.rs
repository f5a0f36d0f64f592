//! The drills' load: a few shoppers, each a sequential loop at a constant pace (a write, then a
//! read of its own cart with `Cart-Min-Version` set to its last acknowledged version), every
//! operation recorded for the history checker. Bounded by a deadline and an operation count;
//! a write whose outcome is unknown (5xx, no answer) is retried a bounded number of times with
//! the same `Idempotency-Key`, so a retry can never apply it twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::history::{CartSeen, Expectation, Outcome, Read, Write, WriteKind};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Bound on one request, above the edge's own request timeout (10 s by default): a request
/// still unanswered past it counts as a hang.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(15);
/// Attempts of one write whose outcome stays unknown.
const WRITE_ATTEMPTS: usize = 4;
/// Pause between those attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// One shopper of a drill.
#[derive(Debug, Clone)]
pub struct Shopper {
    pub index: usize,
    /// The region homing the cart.
    pub home: String,
    /// Where its requests go (a region's front).
    pub edge_url: Arc<str>,
    pub token: Arc<str>,
    /// Items only this shopper adds, each at most once.
    pub items: Vec<String>,
}

/// The pace and bounds of a load.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Between one shopper's operations.
    pub interval: Duration,
    /// No operation starts after it.
    pub until: Instant,
}

/// Everything one shopper did.
#[derive(Debug, Default)]
pub struct ShopperRun {
    pub writes: Vec<Write>,
    pub reads: Vec<Read>,
    pub expectation: Expectation,
    pub requests: u64,
    pub failures: BTreeMap<String, u64>,
    /// Writes answered 202: an add parked because its home region could not be reached.
    pub parked: u64,
    pub max_write: Duration,
}

/// An answer: status and body, or why there was none.
struct Answer {
    status: u16,
    body: Bytes,
}

async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    token: &str,
    headers: &[(&str, String)],
    body: Option<String>,
) -> Result<Answer, &'static str> {
    let mut builder = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"));
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    let body = match body {
        Some(body) => {
            builder = builder.header("content-type", "application/json");
            Full::new(Bytes::from(body))
        }
        None => Full::new(Bytes::new()),
    };
    let request = builder.body(body).map_err(|_| "request")?;
    let exchange = async {
        let response = client.request(request).await.map_err(|_| "transport")?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| "transport")?
            .to_bytes();
        Ok::<_, &'static str>(Answer { status, body })
    };
    tokio::time::timeout(REQUEST_LIMIT, exchange)
        .await
        .map_err(|_| "hang")?
}

/// `"<status> <code>"` of a failed answer.
fn failure_key(answer: &Result<Answer, &'static str>) -> Option<String> {
    match answer {
        Ok(answer) if answer.status < 400 => None,
        Ok(answer) => {
            let code = serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v.get("error")?.get("code")?.as_str().map(str::to_string))
                .unwrap_or_default();
            Some(format!("{} {code}", answer.status).trim().to_string())
        }
        Err(why) => Some((*why).to_string()),
    }
}

/// A cart body's version and items.
pub fn parse_cart(body: &[u8]) -> Option<CartSeen> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let version = value.get("version")?.as_i64()?;
    let mut items = BTreeMap::new();
    for line in value.get("items")?.as_array()? {
        let item = line.get("item_id")?.as_str()?.to_string();
        let quantity = line.get("quantity")?.as_i64()?;
        *items.entry(item).or_insert(0) += quantity;
    }
    Some(CartSeen { version, items })
}

impl ShopperRun {
    fn count(&mut self, answer: &Result<Answer, &'static str>) {
        self.requests += 1;
        if matches!(answer, Ok(answer) if answer.status == 202) {
            self.parked += 1;
        }
        if let Some(key) = failure_key(answer) {
            *self.failures.entry(key).or_default() += 1;
        }
    }
}

/// Runs one shopper until `pace.until`, `stop` turns true, or its items run out.
pub async fn run_shopper(
    client: HttpClient,
    shopper: Shopper,
    pace: Pace,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> ShopperRun {
    let mut run = ShopperRun::default();
    let mut ticker = tokio::time::interval(pace.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fresh = shopper.items.iter();
    for step in 0..shopper.items.len() * 2 {
        ticker.tick().await;
        if Instant::now() >= pace.until || stop.as_ref().is_some_and(|stop| *stop.borrow()) {
            break;
        }
        // Every third operation removes the oldest item still expected in the cart.
        let removable = run.expectation.present.iter().next().cloned();
        let (kind, item) = match removable {
            Some(item) if step % 3 == 2 => (WriteKind::Remove, item),
            _ => match fresh.next() {
                Some(item) => (WriteKind::Add, item.clone()),
                None => break,
            },
        };
        let write = write_once(&client, &shopper, kind, &item, step, &mut run).await;
        run.expectation.record(&write);
        run.writes.push(write);
        let read = read_own(&client, &shopper, &mut run).await;
        run.reads.push(read);
    }
    run
}

/// One write with its retries.
async fn write_once(
    client: &HttpClient,
    shopper: &Shopper,
    kind: WriteKind,
    item: &str,
    step: usize,
    run: &mut ShopperRun,
) -> Write {
    let key = format!("drill-{}-{step}-{}", shopper.index, rand::random::<u32>());
    let started = Instant::now();
    let mut outcome = Outcome::Unknown;
    for attempt in 0..WRITE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        let attempt_started = Instant::now();
        let headers = [("idempotency-key", key.clone())];
        let answer = match kind {
            WriteKind::Add => {
                let url = format!("{}/api/v1/cart/items", shopper.edge_url);
                let body = serde_json::json!({ "item_id": item, "quantity": 1 }).to_string();
                send(
                    client,
                    Method::POST,
                    &url,
                    &shopper.token,
                    &headers,
                    Some(body),
                )
                .await
            }
            WriteKind::Remove => {
                let url = format!("{}/api/v1/cart/items/{item}", shopper.edge_url);
                send(client, Method::DELETE, &url, &shopper.token, &headers, None).await
            }
        };
        run.max_write = run.max_write.max(attempt_started.elapsed());
        run.count(&answer);
        match &answer {
            Ok(a) if (200..300).contains(&a.status) => {
                outcome = match parse_cart(&a.body) {
                    Some(cart) => Outcome::Acknowledged {
                        version: cart.version,
                    },
                    None => Outcome::Unknown,
                };
                break;
            }
            // 429 is the edge saying "not now", never applied: try again.
            Ok(a) if a.status == 429 => {}
            Ok(a) if (400..500).contains(&a.status) => {
                outcome = Outcome::Refused;
                break;
            }
            _ => {}
        }
    }
    Write {
        shopper: shopper.index,
        kind,
        item: item.to_string(),
        started,
        ended: Instant::now(),
        outcome,
    }
}

/// Reads the shopper's cart with its freshest acknowledged version and checks it.
async fn read_own(client: &HttpClient, shopper: &Shopper, run: &mut ShopperRun) -> Read {
    let url = format!("{}/api/v1/cart", shopper.edge_url);
    let min = run.expectation.min_version;
    let headers: Vec<(&str, String)> = if min > 0 {
        vec![("cart-min-version", min.to_string())]
    } else {
        Vec::new()
    };
    let answer = send(client, Method::GET, &url, &shopper.token, &headers, None).await;
    run.count(&answer);
    let seen = match &answer {
        Ok(a) if a.status == 200 => parse_cart(&a.body),
        _ => None,
    };
    let violation = seen.as_ref().and_then(|seen| {
        let breaches = run.expectation.breaches(seen);
        (!breaches.is_empty()).then(|| breaches.describe())
    });
    Read {
        shopper: shopper.index,
        seen,
        violation,
    }
}

/// The shopper's cart at the end, read at `edge_url` with its freshest acknowledged version;
/// retried (bounded by `limit`) until an answer comes.
pub async fn final_cart(
    client: &HttpClient,
    edge_url: &str,
    token: &str,
    min_version: i64,
    limit: Duration,
) -> Option<CartSeen> {
    let deadline = Instant::now() + limit;
    let url = format!("{edge_url}/api/v1/cart");
    loop {
        let headers: Vec<(&str, String)> = if min_version > 0 {
            vec![("cart-min-version", min_version.to_string())]
        } else {
            Vec::new()
        };
        if let Ok(answer) = send(client, Method::GET, &url, token, &headers, None).await {
            if answer.status == 200 {
                return parse_cart(&answer.body);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
