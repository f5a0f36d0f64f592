//! The near cache: decoded carts in the edge's own memory, in front of Redis, kept coherent by
//! Redis' server-assisted client-side caching.
//!
//! One connection per edge (RESP3) asks Redis for `CLIENT TRACKING ON BCAST PREFIX <prefix>`:
//! from then on Redis pushes the name of every cart key any client changes (this edge, the
//! region's other edges, fences from other regions) and the entry is dropped on arrival. The
//! near cache serves only while that connection is known good: it is emptied and bypassed
//! from the moment the connection is lost, fails its liveness `PING`, or points at a Redis that
//! is no longer the master (Sentinel moved it), until a new connection is tracking again. What
//! was invalidated while nobody listened can therefore never be served.
//!
//! A fill races invalidations: a reader that read an old cart from Redis just before a write
//! must not store it after the write's invalidation was applied. Every invalidation (and every
//! local write) advances a generation; a fill carries the generation read before its Redis
//! round trip and is dropped if anything was invalidated since. The writer's own reads are
//! exact besides: they carry `Cart-Min-Version`, and a cached cart older than that is never
//! used (`Store::load_cart`). Another reader of the same region may see the previous version
//! for as long as the invalidation takes to arrive (one push on loopback: well under a
//! millisecond), or up to the liveness bound when Redis' link silently stalls.
//!
//! An entry also keeps the last response body rendered from its cart ([`NearEntry::rendered`]),
//! stamped by the caller with what else the body depends on (the catalog's epoch, the home
//! region) and its age, so a hot cart is not rendered and encoded again on every read. It goes
//! with the entry: any change to the cart drops both.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::{PushInfo, PushKind, Value};

use crate::domain::cart::StoredCart;

/// Shards of the map, so concurrent readers rarely wait on one lock.
const SHARDS: usize = 16;
/// How often the tracking connection proves it is alive (and still on the master).
const LIVENESS_PERIOD: Duration = Duration::from_millis(200);
/// Bound on connecting, enabling tracking, and each liveness `PING`.
const STEP_TIMEOUT: Duration = Duration::from_secs(1);

/// One cart held in memory, with the body last rendered from it.
pub struct NearEntry {
    pub cart: StoredCart,
    rendered: Mutex<Option<Rendered>>,
}

/// A response body rendered from an entry's cart, and what it was rendered under.
struct Rendered {
    body: Bytes,
    /// What the body depends on besides the cart (the caller's stamp: catalog epoch and home).
    stamp: (u64, String),
    at: Instant,
}

impl NearEntry {
    fn new(cart: StoredCart) -> NearEntry {
        NearEntry {
            cart,
            rendered: Mutex::new(None),
        }
    }

    /// The body rendered from this cart for `home` at catalog `epoch`, if younger than `max_age`.
    pub fn rendered(&self, epoch: u64, home: &str, max_age: Duration) -> Option<Bytes> {
        let rendered = self.rendered.lock().ok()?;
        let rendered = rendered.as_ref()?;
        (rendered.stamp.0 == epoch && rendered.stamp.1 == home && rendered.at.elapsed() < max_age)
            .then(|| rendered.body.clone())
    }

    /// Keeps `body`, rendered from this cart for `home` at catalog `epoch`.
    pub fn keep_rendered(&self, epoch: u64, home: &str, body: Bytes) {
        if let Ok(mut rendered) = self.rendered.lock() {
            *rendered = Some(Rendered {
                body,
                stamp: (epoch, home.to_string()),
                at: Instant::now(),
            });
        }
    }
}

/// The in-memory carts of one edge.
pub struct NearCache {
    shards: Vec<Mutex<HashMap<String, Arc<NearEntry>>>>,
    hasher: std::collections::hash_map::RandomState,
    /// Entries per shard at most.
    shard_capacity: usize,
    /// Advanced by every invalidation and local write; fills from before are dropped.
    generation: AtomicU64,
    /// Whether the tracking connection is subscribed and alive; entries serve only then.
    listening: AtomicBool,
    /// The key prefix of carts in Redis (`redis.key_prefix`).
    prefix: String,
}

impl NearCache {
    /// A near cache of at most `capacity` carts (0: disabled, nothing is ever stored).
    pub fn new(capacity: usize, prefix: &str) -> NearCache {
        NearCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            shard_capacity: capacity.div_ceil(SHARDS),
            generation: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            prefix: prefix.to_string(),
        }
    }

    fn shard(&self, owner: &str) -> &Mutex<HashMap<String, Arc<NearEntry>>> {
        &self.shards[(self.hasher.hash_one(owner) as usize) % SHARDS]
    }

    /// Whether entries may be served now.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// The cached cart of `owner`, while tracking is alive.
    pub fn get(&self, owner: &str) -> Option<Arc<NearEntry>> {
        if self.shard_capacity == 0 || !self.is_listening() {
            return None;
        }
        self.shard(owner).lock().ok()?.get(owner).cloned()
    }

    /// The generation to pass to [`NearCache::fill`], read before the Redis round trip whose
    /// answer will be stored.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps a cart read from Redis, unless anything was invalidated since `generation` or
    /// tracking is down.
    pub fn fill(&self, cart: &StoredCart, generation: u64) {
        if self.shard_capacity == 0 || !self.is_listening() {
            return;
        }
        let Ok(mut shard) = self.shard(&cart.owner).lock() else {
            return;
        };
        // Checked under the shard's lock: an invalidation takes the same lock after advancing
        // the generation, so it either sees this entry and drops it, or this check sees it.
        if self.generation.load(Ordering::Acquire) != generation || !self.is_listening() {
            return;
        }
        if shard.len() >= self.shard_capacity && !shard.contains_key(&cart.owner) {
            // Bounded: an arbitrary entry makes room (no recency bookkeeping on the hit path).
            if let Some(victim) = shard.keys().next().cloned() {
                shard.remove(&victim);
            }
        }
        shard.insert(cart.owner.clone(), Arc::new(NearEntry::new(cart.clone())));
    }

    /// Drops one owner's entry (a Redis invalidation, or this edge's own write).
    pub fn invalidate(&self, owner: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut shard) = self.shard(owner).lock() {
            shard.remove(owner);
        }
    }

    /// Stops serving and drops everything (tracking lost, or Redis flushed its keys).
    pub fn deafen(&self) {
        self.listening.store(false, Ordering::Release);
        self.clear();
    }

    fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for shard in &self.shards {
            if let Ok(mut shard) = shard.lock() {
                shard.clear();
            }
        }
    }

    /// Starts serving: called once a fresh tracking subscription is confirmed (public for the
    /// benchmarks; nothing else may call it, or entries would serve without invalidations).
    /// Whatever was stored before is dropped first (it was not covered by this subscription).
    pub fn listen(&self) {
        self.clear();
        self.listening.store(true, Ordering::Release);
    }

    /// Entries held now, for the metrics.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one push from the tracking connection: an `invalidate` names keys (or is nil:
    /// Redis flushed everything); a disconnection stops serving.
    fn on_push(&self, push: &PushInfo) {
        match push.kind {
            PushKind::Invalidate => match push.data.first() {
                Some(Value::Array(keys)) => {
                    for key in keys {
                        if let Some(owner) = key_name(key)
                            .and_then(|k| k.strip_prefix(self.prefix.as_str()).map(str::to_string))
                        {
                            self.invalidate(&owner);
                        }
                    }
                }
                // A nil invalidation: Redis flushed its keyspace (or the server lost track).
                _ => self.clear(),
            },
            PushKind::Disconnection => self.deafen(),
            _ => {}
        }
    }
}

fn key_name(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// Keeps one tracking connection to the Redis `address()` names (the configured one, or the
/// current Sentinel master), for as long as the near cache exists: connect with RESP3,
/// subscribe with `CLIENT TRACKING ON BCAST PREFIX`, then serve while each liveness `PING`
/// answers and the master has not moved; on any failure stop serving, drop everything, and
/// start again. Holds the near cache only weakly, so it ends with its edge.
pub async fn track<F>(weak: Weak<NearCache>, address: F)
where
    F: Fn() -> Option<String> + Send + 'static,
{
    loop {
        let Some(near) = weak.upgrade() else {
            return;
        };
        if near.shard_capacity == 0 {
            return;
        }
        near.deafen();
        let Some(url) = address() else {
            drop(near);
            tokio::time::sleep(LIVENESS_PERIOD).await;
            continue;
        };
        match subscribe(&weak, &near.prefix, &url).await {
            Ok(mut connection) => {
                near.listen();
                tracing::info!(redis = %redact(&url), "near cache tracking Redis invalidations");
                loop {
                    tokio::time::sleep(LIVENESS_PERIOD).await;
                    if !near.is_listening() || address().as_deref() != Some(url.as_str()) {
                        break;
                    }
                    let ping = redis::cmd("PING");
                    let alive = tokio::time::timeout(
                        STEP_TIMEOUT,
                        ping.query_async::<Value>(&mut connection),
                    )
                    .await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
                tracing::warn!("near cache tracking lost; serving from Redis until it is back");
            }
            Err(error) => {
                tracing::debug!(%error, "near cache cannot subscribe to invalidations yet");
                drop(near);
                tokio::time::sleep(LIVENESS_PERIOD).await;
            }
        }
    }
}

/// Opens the tracking connection and subscribes.
async fn subscribe(
    near: &Weak<NearCache>,
    prefix: &str,
    url: &str,
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let info: redis::ConnectionInfo = url.parse()?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    let info = info.set_redis_settings(settings);
    let client = redis::Client::open(info)?;
    let pushes = near.clone();
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(STEP_TIMEOUT))
        .set_response_timeout(Some(STEP_TIMEOUT))
        .set_push_sender(move |push: PushInfo| {
            if let Some(near) = pushes.upgrade() {
                near.on_push(&push);
            }
            Ok::<(), redis::aio::SendError>(())
        });
    let mut connection = tokio::time::timeout(
        STEP_TIMEOUT,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await??;
    let mut tracking = redis::cmd("CLIENT");
    tracking
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(prefix);
    tokio::time::timeout(STEP_TIMEOUT, tracking.query_async::<()>(&mut connection)).await??;
    Ok(connection)
}

/// A Redis URL without its password, for logs.
fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((_, host)) => format!("redis://…@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cart(owner: &str, version: i64) -> StoredCart {
        StoredCart {
            version,
            ..StoredCart::empty(owner)
        }
    }

    #[test]
    fn nothing_is_served_or_stored_while_not_listening() {
        let near = NearCache::new(100, "cart:");
        near.fill(&cart("u:a", 1), near.generation());
        assert!(near.get("u:a").is_none());
        near.listen();
        near.fill(&cart("u:a", 1), near.generation());
        assert_eq!(near.get("u:a").map(|c| c.cart.version), Some(1));
        near.deafen();
        assert!(near.get("u:a").is_none());
        near.listen();
        assert!(near.get("u:a").is_none(), "listening again starts empty");
    }

    #[test]
    fn a_fill_older_than_an_invalidation_is_dropped() {
        let near = NearCache::new(100, "cart:");
        near.listen();
        let before = near.generation();
        near.on_push(&PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Array(vec![Value::BulkString(b"cart:u:a".to_vec())])],
        });
        near.fill(&cart("u:a", 1), before);
        assert!(near.get("u:a").is_none());
        near.fill(&cart("u:a", 2), near.generation());
        assert_eq!(near.get("u:a").map(|c| c.cart.version), Some(2));
        near.on_push(&PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Array(vec![Value::BulkString(b"cart:u:a".to_vec())])],
        });
        assert!(near.get("u:a").is_none());
    }

    #[test]
    fn a_flush_or_a_disconnection_empties_it_and_capacity_is_bounded() {
        let near = NearCache::new(32, "cart:");
        near.listen();
        for n in 0..200 {
            near.fill(&cart(&format!("u:{n}"), 1), near.generation());
        }
        assert!(near.len() <= 32, "{}", near.len());
        near.on_push(&PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Nil],
        });
        assert!(near.is_empty());
        near.fill(&cart("u:x", 1), near.generation());
        near.on_push(&PushInfo {
            kind: PushKind::Disconnection,
            data: vec![],
        });
        assert!(near.get("u:x").is_none() && !near.is_listening());
    }

    #[test]
    fn a_rendered_body_serves_only_under_its_stamp_and_age_and_goes_with_its_cart() {
        let near = NearCache::new(100, "cart:");
        near.listen();
        near.fill(&cart("u:a", 1), near.generation());
        let entry = near.get("u:a").unwrap();
        let long = Duration::from_secs(60);
        assert!(
            entry.rendered(7, "sg", long).is_none(),
            "nothing rendered yet"
        );
        entry.keep_rendered(7, "sg", Bytes::from_static(b"v1"));
        assert_eq!(entry.rendered(7, "sg", long).as_deref(), Some(&b"v1"[..]));
        assert!(
            entry.rendered(8, "sg", long).is_none(),
            "the catalog changed"
        );
        assert!(
            entry.rendered(7, "th", long).is_none(),
            "rendered for another home"
        );
        assert!(entry.rendered(7, "sg", Duration::ZERO).is_none(), "too old");
        // A new version of the cart is a new entry, without the old body.
        near.invalidate("u:a");
        near.fill(&cart("u:a", 2), near.generation());
        assert!(near.get("u:a").unwrap().rendered(7, "sg", long).is_none());
    }
}
