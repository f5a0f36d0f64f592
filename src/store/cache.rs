//! The regional Redis cart cache (cache-aside), with a version fence.
//!
//! Each cart is one hash `<prefix><owner>` with fields `v` (version), `c` (the stored cart as
//! compact JSON) and `f` (the format of `c`), read with one `HMGET`. Every write into it goes through one Lua script that refuses
//! to replace a version with an older one, so the classic cache-aside race — a slow reader
//! filling the cache with a cart older than a write that already happened — cannot take
//! effect: the writer leaves its version behind (the new cart, or a bare fence when it has no
//! cart to leave), and the late filler's older version is refused.
//!
//! Redis being slow or down never fails a request: operations are bounded by `redis.timeout`
//! and errors count as misses. A write whose cache update failed is remembered (bounded) and
//! its fence retried in the background; until then reads of that owner skip the cache. If too
//! many are pending, the whole cache is distrusted until Redis is back and our keys are
//! flushed, so no cart older than a write made during an outage is served afterwards.
//!
//! Which Redis that is (`redis.url`, or the master Redis Sentinel names) is `redis_link`'s:
//! every operation takes its connection there and reports its failures back, so a failover is
//! followed without a restart.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{RedisError, RedisResult, Script};

use super::near::{NearCache, NearEntry};
use super::redis_link::RedisLink;

use crate::config::RedisConfig;
use crate::domain::cart::StoredCart;
use crate::domain::ids::OwnerKey;
use crate::metrics::CacheMetrics;

/// Format of the `c` field, stored as `f`. An entry in another format (an edge of another
/// release during a rolling deploy) is a miss and may be replaced at the same version.
const FORMAT: &str = "1";

/// Sets `v`/`c`/`f` only when the stored version is older, or equal without a cart body in our
/// format (how a fence is filled). ARGV: version, cart JSON ("" = fence only: drop `c`), TTL in
/// ms, format.
const FENCED_SET: &str = r#"
local current = redis.call('HGET', KEYS[1], 'v')
if current then
  local stored, incoming = tonumber(current), tonumber(ARGV[1])
  if stored > incoming then
    return 0
  end
  if stored == incoming and (ARGV[2] == '' or
      (redis.call('HEXISTS', KEYS[1], 'c') == 1 and redis.call('HGET', KEYS[1], 'f') == ARGV[4])) then
    return 0
  end
end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'c', 'f')
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'c', ARGV[2], 'f', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// One cache lookup.
#[derive(Debug, Default)]
pub struct CacheRead {
    pub cart: Option<StoredCart>,
    /// The newest version the cache has seen for the owner (a fence or the cart's own).
    pub newest_version: Option<i64>,
    /// Whether Redis answered (false: skipped or failed, already counted as such).
    pub answered: bool,
}

/// Why one cache operation got no answer.
#[derive(Debug)]
enum Failure {
    Redis(RedisError),
    TimedOut,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Redis(error) => error.fmt(f),
            Failure::TimedOut => f.write_str("timed out"),
        }
    }
}

pub struct Cache {
    link: RedisLink,
    prefix: String,
    ttl_ms: u64,
    timeout: Duration,
    script: Script,
    /// Owners whose post-write cache update failed, with the version to fence at.
    pending: Mutex<HashMap<String, i64>>,
    /// Fast check so the hot path takes no lock while nothing is pending.
    has_pending: AtomicBool,
    /// Set when `pending` overflowed: every cache read is skipped until a flush succeeds.
    distrust_all: AtomicBool,
    max_pending: usize,
    metrics: CacheMetrics,
    /// Decoded carts in this edge's memory, coherent through Redis' invalidation pushes.
    near: Arc<NearCache>,
    /// `redis.url` when no sentinels are configured: where the near cache's tracking
    /// connection goes (with sentinels: the current master).
    direct_url: Option<String>,
}

impl Cache {
    pub fn new(config: &RedisConfig, metrics: CacheMetrics) -> anyhow::Result<Cache> {
        Ok(Cache {
            link: RedisLink::new(config)?,
            prefix: config.key_prefix.clone(),
            ttl_ms: config.ttl.0.as_millis() as u64,
            timeout: config.timeout.0,
            script: Script::new(FENCED_SET),
            pending: Mutex::new(HashMap::new()),
            has_pending: AtomicBool::new(false),
            distrust_all: AtomicBool::new(false),
            max_pending: config.max_pending_invalidations,
            metrics,
            near: Arc::new(NearCache::new(
                config.near_cache_entries,
                &config.key_prefix,
            )),
            direct_url: (!config.uses_sentinels()).then(|| config.url.expose().to_string()),
        })
    }

    /// Starts the near cache's tracking connection (a no-op when `redis.near_cache_entries` is
    /// 0); it ends when the cache is dropped.
    pub fn spawn_tracking(self: &Arc<Self>) {
        let cache = Arc::downgrade(self);
        let near = Arc::downgrade(&self.near);
        tokio::spawn(super::near::track(near, move || {
            let cache = cache.upgrade()?;
            match &cache.direct_url {
                Some(url) => Some(url.clone()),
                None => cache
                    .link
                    .master()
                    .map(|master| format!("redis://{master}/")),
            }
        }));
    }

    /// The near cache, for the metrics and tests.
    pub fn near(&self) -> &NearCache {
        &self.near
    }

    /// Runs one operation on a connection to the current Redis, the whole of it (a master
    /// lookup included) bounded by `redis.timeout`, and tells the link how it failed.
    async fn run<T, F, Fut>(&self, operation: F) -> Result<T, Failure>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempt = async {
            let checkout = self.link.connection().await?;
            let result = operation(checkout.connection.clone()).await;
            if let Err(error) = &result {
                self.link.failed(&checkout, error);
            }
            result
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result.map_err(Failure::Redis),
            Err(_) => {
                self.link.timed_out();
                Err(Failure::TimedOut)
            }
        }
    }

    /// The Redis master in use when it comes from sentinels (`host:port`), for `/health`.
    pub fn master(&self) -> Option<String> {
        self.link.master()
    }

    fn key(&self, owner: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + owner.len());
        key.push_str(&self.prefix);
        key.push_str(owner);
        key
    }

    fn is_pending(&self, owner: &str) -> bool {
        self.has_pending.load(Ordering::Acquire)
            && self
                .pending
                .lock()
                .map(|pending| pending.contains_key(owner))
                .unwrap_or(true)
    }

    fn note_error(&self, what: &'static str, error: &dyn std::fmt::Display) {
        let op = match what {
            "get" | "decode" => "read",
            other => other,
        };
        self.metrics.count(op, "error");
        tracing::warn!(operation = what, %error, "cache unavailable");
    }

    /// The cached cart, if there is a trustworthy one.
    pub async fn get(&self, owner: &OwnerKey) -> Option<StoredCart> {
        self.read(owner).await.cart
    }

    /// The owner's cart in this edge's memory (the near cache), as [`Cache::read`] would
    /// answer with it, without a copy: None when the near cache does not hold it or may not
    /// serve it now. Counted as a near hit. Only a cart at `min_version` or newer is returned.
    pub fn read_near(&self, owner: &OwnerKey, min_version: i64) -> Option<Arc<NearEntry>> {
        if self.distrust_all.load(Ordering::Acquire) || self.is_pending(owner.as_str()) {
            return None;
        }
        let entry = self
            .near
            .get(owner.as_str())
            .filter(|entry| entry.cart.version >= min_version)?;
        self.metrics.near_hit.inc();
        Some(entry)
    }

    /// What the cache knows of an owner: a trustworthy cart, and the newest version it has
    /// seen (a fence left by a write whose cart it does not hold is a read-your-writes hint).
    pub async fn read(&self, owner: &OwnerKey) -> CacheRead {
        if self.distrust_all.load(Ordering::Acquire) || self.is_pending(owner.as_str()) {
            self.metrics.read_skipped.inc();
            return CacheRead::default();
        }
        if let Some(entry) = self.read_near(owner, 0) {
            // Counted as a read hit by the caller, like any cart the cache answers with.
            return CacheRead {
                newest_version: Some(entry.cart.version),
                cart: Some(entry.cart.clone()),
                answered: true,
            };
        }
        let generation = self.near.generation();
        let mut command = redis::cmd("HMGET");
        command
            .arg(self.key(owner.as_str()))
            .arg("v")
            .arg("c")
            .arg("f");
        let command = &command;
        let answer = self
            .run(|mut connection| async move {
                command
                    .query_async::<(Option<i64>, Option<Vec<u8>>, Option<String>)>(&mut connection)
                    .await
            })
            .await;
        match answer {
            Ok((Some(version), Some(body), Some(format))) if format == FORMAT => {
                match serde_json::from_slice::<StoredCart>(&body) {
                    Ok(cart) if cart.version == version && cart.owner == owner.as_str() => {
                        self.near.fill(&cart, generation);
                        CacheRead {
                            cart: Some(cart),
                            newest_version: Some(version),
                            answered: true,
                        }
                    }
                    _ => {
                        self.note_error("decode", &"cached cart does not decode");
                        CacheRead {
                            cart: None,
                            newest_version: Some(version),
                            answered: false,
                        }
                    }
                }
            }
            Ok((version, _, _)) => CacheRead {
                cart: None,
                newest_version: version,
                answered: true,
            },
            Err(failure) => {
                self.note_error("get", &failure);
                CacheRead::default()
            }
        }
    }

    async fn fenced_set(&self, owner: &str, version: i64, body: &str) -> Result<bool, String> {
        let mut invocation = self.script.key(self.key(owner));
        invocation
            .arg(version)
            .arg(body)
            .arg(self.ttl_ms)
            .arg(FORMAT);
        let invocation = &invocation;
        self.run(
            |mut connection| async move { invocation.invoke_async::<i64>(&mut connection).await },
        )
        .await
        .map(|applied| applied == 1)
        .map_err(|failure| failure.to_string())
    }

    /// Fills the cache after a database read, unless a newer version is already there.
    pub async fn fill(&self, cart: &StoredCart) {
        if self.distrust_all.load(Ordering::Acquire) || self.is_pending(&cart.owner) {
            self.metrics.fill_skipped.inc();
            return;
        }
        let Ok(body) = serde_json::to_string(cart) else {
            return;
        };
        match self.fenced_set(&cart.owner, cart.version, &body).await {
            Ok(true) => {
                self.metrics.fill_ok.inc();
            }
            Ok(false) => {
                self.metrics.fill_refused.inc();
            }
            Err(error) => self.note_error("fill", &error),
        }
    }

    /// Leaves a committed cart in the cache. If Redis cannot be told, the owner is remembered
    /// and fenced later; reads skip the cache for it meanwhile.
    pub async fn store_committed(&self, cart: &StoredCart) {
        let body = serde_json::to_string(cart).unwrap_or_default();
        let stored = self.fenced_set(&cart.owner, cart.version, &body).await;
        // Redis pushes the invalidation too; dropping the entry here as well means this edge's
        // next read never waits on that push.
        self.near.invalidate(&cart.owner);
        match stored {
            Ok(true) => self.metrics.count("store", "ok"),
            Ok(false) => self.metrics.count("store", "refused"),
            Err(error) => {
                self.note_error("store", &error);
                self.remember(&cart.owner, cart.version);
            }
        }
    }

    /// Fences an owner at `version` (drops any older cached cart) without a cart body: for
    /// writes committed elsewhere (forwarded writes, invalidations from other regions).
    pub async fn fence(&self, owner: &str, version: i64) {
        let fenced = self.fenced_set(owner, version, "").await;
        self.near.invalidate(owner);
        match fenced {
            Ok(true) => self.metrics.count("fence", "ok"),
            Ok(false) => self.metrics.count("fence", "refused"),
            Err(error) => {
                self.note_error("fence", &error);
                self.remember(owner, version);
            }
        }
    }

    fn remember(&self, owner: &str, version: i64) {
        let Ok(mut pending) = self.pending.lock() else {
            self.distrust_all.store(true, Ordering::Release);
            return;
        };
        if pending.len() >= self.max_pending && !pending.contains_key(owner) {
            tracing::error!(
                pending = pending.len(),
                "too many missed cache invalidations; distrusting the whole cache until Redis is flushed"
            );
            self.distrust_all.store(true, Ordering::Release);
            pending.clear();
        } else {
            let entry = pending.entry(owner.to_string()).or_insert(version);
            *entry = (*entry).max(version);
        }
        self.has_pending
            .store(!pending.is_empty(), Ordering::Release);
    }

    /// How many owners are waiting for a fence, and whether the whole cache is distrusted.
    pub fn pending_state(&self) -> (usize, bool) {
        let count = self.pending.lock().map(|p| p.len()).unwrap_or(0);
        (count, self.distrust_all.load(Ordering::Acquire))
    }

    /// Whether Redis answers a PING within the timeout.
    pub async fn ping(&self) -> bool {
        let command = redis::cmd("PING");
        let command = &command;
        self.run(
            |mut connection| async move { command.query_async::<String>(&mut connection).await },
        )
        .await
        .is_ok()
    }

    /// One repair pass: fence every pending owner, or flush our keys when distrusting all.
    pub async fn repair_once(&self) {
        if self.distrust_all.load(Ordering::Acquire) {
            if self.flush_prefix().await.is_ok() {
                tracing::info!("cache flushed after missed invalidations; trusting it again");
                self.distrust_all.store(false, Ordering::Release);
            }
            return;
        }
        if !self.has_pending.load(Ordering::Acquire) {
            return;
        }
        let snapshot: Vec<(String, i64)> = match self.pending.lock() {
            Ok(pending) => pending.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            Err(_) => return,
        };
        for (owner, version) in snapshot {
            if self.fenced_set(&owner, version, "").await.is_err() {
                return;
            }
            if let Ok(mut pending) = self.pending.lock() {
                if pending.get(&owner) == Some(&version) {
                    pending.remove(&owner);
                }
                self.has_pending
                    .store(!pending.is_empty(), Ordering::Release);
            }
        }
    }

    async fn flush_prefix(&self) -> Result<(), RedisError> {
        let checkout = self.link.connection().await?;
        let result = self.flush_prefix_on(checkout.connection.clone()).await;
        if let Err(error) = &result {
            self.link.failed(&checkout, error);
        }
        result
    }

    async fn flush_prefix_on(&self, mut connection: ConnectionManager) -> Result<(), RedisError> {
        let pattern = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        // Bounded: a SCAN cursor returns to 0 after one full pass over the keyspace.
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<i64>(&mut connection)
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Appends entries (field/value pairs) to a capped stream in one pipeline (`XADD … MAXLEN ~`).
    /// Errors are returned, not swallowed: the outbox relay keeps the events for the next pass.
    pub async fn append_stream(
        &self,
        stream: &str,
        max_len: usize,
        entries: &[Vec<(&'static str, String)>],
    ) -> Result<(), RedisError> {
        let mut pipeline = redis::pipe();
        for fields in entries {
            pipeline
                .cmd("XADD")
                .arg(stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(max_len)
                .arg("*")
                .arg(fields)
                .ignore();
        }
        let checkout = self.link.connection().await?;
        let mut connection = checkout.connection.clone();
        let result = pipeline.query_async::<()>(&mut connection).await;
        if let Err(error) = &result {
            self.link.failed(&checkout, error);
        }
        result
    }

    /// Runs [`Cache::repair_once`] every `period` for as long as the cache is alive.
    pub fn spawn_repair(self: &Arc<Self>, period: Duration) {
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(cache) = cache.upgrade() else { return };
                cache.repair_once().await;
            }
        });
    }
}
