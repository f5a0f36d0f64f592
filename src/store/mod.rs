//! Storage: PostgreSQL pools with explicit intent, the Redis cart cache and the catalogs (this
//! region's own and its replicas of the other regions').
//!
//! Nobody outside this module takes a pool. Reads say what they need: [`Store::db_read`] (the
//! replica, falling back to the primary with a warning and a counter) or
//! [`Store::db_read_prefer_primary`]; writes go through [`Store::begin_write`] on the primary.
//! The cache never fails a request: every cache error is logged, counted and treated as a miss.

pub mod cache;
pub mod carts;
pub mod catalog;
pub mod events;
pub mod janitor;
pub mod merge;
pub mod migrate;
pub mod moves;
pub mod near;
pub mod orders;
pub mod parking;
mod redis_link;
pub mod tx;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::Config;
use crate::domain::cart::StoredCart;
use crate::domain::ids::OwnerKey;
use crate::metrics::{CacheMetrics, DbMetrics, Metrics, PoolLabels, ShardLabels, ShardRoleLabels};

pub use cache::Cache;
pub use carts::{CartOp, Claim, StoredResponse, WriteTx};
pub use catalog::Catalog;
pub use near::NearEntry;

/// Where a cart read was answered from; reported as `Cart-Source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Replica,
    Primary,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Replica => "replica",
            Source::Primary => "primary",
        }
    }
}

/// A storage failure. Client-actionable outcomes (cart rules) are not errors here.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be had, or it broke: the caller answers 503.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// This region does not hold the shard's primary: the write belongs to its home region.
    #[error("shard {0} is not homed in this region")]
    NotHome(String),
    /// The database refused a statement for a reason that is our bug or data corruption.
    #[error("database error: {0}")]
    Query(#[source] tokio_postgres::Error),
    /// A row that breaks the schema's promises (undecodable items, an out-of-range quantity, an
    /// unknown status): a bug or tampering, never retried into success. The caller answers 500
    /// and an operator has to look; the row is left as it is.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The cart row was moved to another shard (`store::moves`): it is a pointer, not the cart.
    /// The caller reads `to` instead; a client that meets this (an edge on the previous ring)
    /// is answered 503 and retries.
    #[error("the cart moved to shard {to} at version {version}")]
    Moved { to: String, version: i64 },
    /// A write met a cart row frozen or moved for a move to shard `to`: rolled back, retried.
    #[error("cart {owner} is moving to shard {to}")]
    Moving { owner: String, to: String },
}

impl StoreError {
    /// A corrupt row, logged here once with what was wrong (the API body stays generic).
    pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
        let what = what.into();
        tracing::error!(%what, "corrupt row in the database");
        StoreError::Corrupt(what)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        let transient = error.is_closed()
            || error.code().is_some_and(|code| {
                let class = &code.code()[..2];
                // connection exceptions, insufficient resources, operator intervention,
                // query canceled (statement timeout), serialization failures
                matches!(class, "08" | "53" | "57" | "40") || code.code() == "57014"
            })
            || std::error::Error::source(&error)
                .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some());
        if transient {
            StoreError::Unavailable(error.to_string())
        } else {
            StoreError::Query(error)
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

/// One shard's pools in this region: the primary only where the shard is homed.
struct ShardPools {
    primary: Option<Pool>,
    replica: Pool,
    /// How far the replica is behind its primary, in ms, per the heartbeat; -1 when unknown.
    lag_ms: Arc<AtomicI64>,
    /// Whether the primary's schema keys lines by line id, as its last write said (see
    /// `WriteTx`): false until a write found out.
    lines_keyed: Arc<std::sync::atomic::AtomicBool>,
}

/// The `role` label of a primary's and a replica's metrics.
const PRIMARY: &str = "primary";
const REPLICA: &str = "replica";

/// The most rows a gauge query counts: beyond it the gauge saturates, so the query stays
/// bounded however large a shard grows.
pub const GAUGE_ROW_CAP: i64 = 100_000;

/// How often heartbeats are written (home shards) and replica lag is read (the others).
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// One shard's pools as a health probe found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardProbe {
    pub shard: String,
    /// None where the shard is not homed here (no primary pool).
    pub primary: Option<bool>,
    pub replica: bool,
}

/// The region's storage: every shard's pools, the regional cache and the catalogs.
pub struct Store {
    /// Replaced whole when a reload adds shards ([`Store::add_shards`]); never loses one.
    shards: ArcSwap<HashMap<String, Arc<ShardPools>>>,
    pub cache: Arc<Cache>,
    /// This region's id: whose catalog [`Store::own_catalog`] is.
    region: String,
    /// This region's own catalog, read through `database.catalog`.
    catalog: Catalog,
    /// This region's replicas of the other regions' catalogs (`database.peer_catalogs`).
    peer_catalogs: HashMap<String, Catalog>,
    /// This region's own catalog primary, where checkouts of carts homed here reserve stock
    /// (None in regions that home no shards).
    catalog_primary: Option<Pool>,
    metrics: DbMetrics,
    cache_metrics: CacheMetrics,
    /// Counted by [`WriteTx::claim_idempotency`] on a replay.
    replays: prometheus_client::metrics::counter::Counter,
}

/// A 64-bit advisory-lock key for a named task on one shard.
pub(crate) fn lock_key(task: &str, shard: &str) -> i64 {
    advisory_lock_key(task, &[shard])
}

/// A 64-bit advisory-lock key: the first 8 bytes of [`tagged_digest`].
pub(crate) fn advisory_lock_key(tag: &str, parts: &[&str]) -> i64 {
    let digest = crate::domain::ids::tagged_digest(tag, parts);
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Stamps the shard's heartbeat on its primary.
async fn stamp(shard: &str, pools: &ShardPools) -> Result<(), StoreError> {
    let Some(primary) = &pools.primary else {
        return Ok(());
    };
    let client = primary.get().await?;
    let statement = client
        .prepare_cached(
            "INSERT INTO replication_heartbeat (shard, at) VALUES ($1, now()) \
             ON CONFLICT (shard) DO UPDATE SET at = EXCLUDED.at",
        )
        .await?;
    client.execute(&statement, &[&shard]).await?;
    Ok(())
}

/// The replica's lag in ms: how old the newest heartbeat it has replayed is.
async fn measure(shard: &str, pools: &ShardPools) -> Result<i64, StoreError> {
    let client = pools.replica.get().await?;
    let statement = client
        .prepare_cached(
            "SELECT (EXTRACT(EPOCH FROM (clock_timestamp() - at)) * 1000)::bigint \
             FROM replication_heartbeat WHERE shard = $1",
        )
        .await?;
    let row = client.query_opt(&statement, &[&shard]).await?;
    Ok(row.map(|r| r.get::<_, i64>(0).max(0)).unwrap_or(-1))
}

/// Builds a pool that connects lazily, so an edge starts (and serves cached reads) while a
/// database is down.
pub fn build_pool(dsn: &str, config: &Config) -> anyhow::Result<Pool> {
    let mut pg: tokio_postgres::Config = dsn
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid database connection string: {e}"))?;
    pg.connect_timeout(config.database.connect_timeout.0);
    pg.application_name(format!("cartedge-{}", config.region.id));
    pg.options(format!(
        "-c statement_timeout={}",
        config.database.statement_timeout.0.as_millis()
    ));
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(config.database.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.database.checkout_timeout.0))
        .create_timeout(Some(config.database.connect_timeout.0))
        .recycle_timeout(Some(Duration::from_secs(1)))
        .build()?)
}

/// The pools of one shard as `config` lists it (they connect lazily).
fn shard_pools(
    shard: &crate::config::ShardDatabase,
    config: &Config,
) -> anyhow::Result<ShardPools> {
    let primary = if shard.primary.is_empty() {
        None
    } else {
        Some(build_pool(shard.primary.expose(), config)?)
    };
    Ok(ShardPools {
        primary,
        replica: build_pool(shard.replica.expose(), config)?,
        lag_ms: Arc::new(AtomicI64::new(-1)),
        lines_keyed: Arc::default(),
    })
}

/// A connection to `shard`'s primary (`pools` are its), which only its home region has.
async fn primary_connection(shard: &str, pools: &ShardPools) -> Result<Object, StoreError> {
    let primary = pools
        .primary
        .as_ref()
        .ok_or_else(|| StoreError::NotHome(shard.to_string()))?;
    Ok(primary.get().await?)
}

/// Shards a reload would add ([`Store::prepare_shards`]), their pools built but not yet
/// serving.
pub struct NewShards(Vec<(String, Arc<ShardPools>)>);

impl Store {
    pub fn new(config: &Config, metrics: &Metrics) -> anyhow::Result<Store> {
        let mut shards = HashMap::new();
        for shard in &config.database.shards {
            shards.insert(shard.id.clone(), Arc::new(shard_pools(shard, config)?));
        }
        let ttl = config.cart.catalog_cache_ttl.0;
        let catalog_pool = build_pool(config.database.catalog.expose(), config)?;
        let mut peer_catalogs = HashMap::new();
        for (region, dsn) in &config.database.peer_catalogs {
            let pool = build_pool(dsn.expose(), config)?;
            peer_catalogs.insert(region.clone(), Catalog::new(pool, ttl));
        }
        let catalog_primary = if config.database.catalog_primary.is_empty() {
            None
        } else {
            Some(build_pool(
                config.database.catalog_primary.expose(),
                config,
            )?)
        };
        Ok(Store {
            shards: ArcSwap::from_pointee(shards),
            cache: Arc::new(Cache::new(&config.redis, metrics.cache.clone())?),
            region: config.region.id.to_string(),
            catalog: Catalog::new(catalog_pool, ttl),
            peer_catalogs,
            catalog_primary,
            metrics: metrics.db.clone(),
            cache_metrics: metrics.cache.clone(),
            replays: metrics.edge.idempotent_replays.clone(),
        })
    }

    fn pools(&self, shard: &str) -> Result<Arc<ShardPools>, StoreError> {
        self.shards
            .load()
            .get(shard)
            .cloned()
            .ok_or_else(|| StoreError::Unavailable(format!("shard {shard} is not configured")))
    }

    /// The shards `config` lists that this store does not have yet, with their pools built
    /// (nothing serves them until [`Store::add_shards`]). A shard this store has keeps its
    /// pools: a changed connection string takes effect at the next restart. Refused (a
    /// restart's business too): a shard no longer listed, or one gaining or losing its primary.
    pub fn prepare_shards(&self, config: &Config) -> anyhow::Result<NewShards> {
        let running = self.shards.load();
        let mut new = Vec::new();
        for shard in &config.database.shards {
            match running.get(&shard.id) {
                Some(pools) => {
                    let homed_now = !shard.primary.is_empty();
                    if pools.primary.is_some() != homed_now {
                        anyhow::bail!(
                            "shard {}: gaining or losing its primary here needs a restart",
                            shard.id
                        );
                    }
                }
                None => new.push((shard.id.clone(), Arc::new(shard_pools(shard, config)?))),
            }
        }
        let listed: std::collections::HashSet<&str> = config
            .database
            .shards
            .iter()
            .map(|s| s.id.as_str())
            .collect();
        if let Some(gone) = running.keys().find(|id| !listed.contains(id.as_str())) {
            anyhow::bail!("shard {gone} is no longer listed: removing a shard needs a restart");
        }
        Ok(NewShards(new))
    }

    /// Starts serving the shards [`Store::prepare_shards`] built, with their heartbeats;
    /// returns their ids.
    pub fn add_shards(self: &Arc<Self>, new: NewShards) -> Vec<String> {
        let mut shards = HashMap::clone(&self.shards.load());
        for (id, pools) in &new.0 {
            shards.insert(id.clone(), pools.clone());
        }
        self.shards.store(Arc::new(shards));
        new.0
            .into_iter()
            .map(|(id, pools)| {
                self.spawn_heartbeat(id.clone(), pools.primary.is_some());
                id
            })
            .collect()
    }

    /// A connection for writes: the shard's primary, which only its home region has.
    pub async fn db_write(&self, shard: &str) -> Result<Object, StoreError> {
        let pools = self.pools(shard)?;
        primary_connection(shard, &pools).await
    }

    /// A connection for reads that tolerate replication lag: the replica, or (in the home
    /// region) the primary with a warning when the replica cannot be had.
    pub async fn db_read(&self, shard: &str) -> Result<(Object, Source), StoreError> {
        let pools = self.pools(shard)?;
        match (pools.replica.get().await, &pools.primary) {
            (Ok(client), _) => Ok((client, Source::Replica)),
            (Err(error), Some(primary)) => {
                self.metrics.replica_fallbacks.inc();
                tracing::warn!(%error, shard, "replica unavailable, reading from the primary");
                Ok((primary.get().await?, Source::Primary))
            }
            (Err(error), None) => Err(error.into()),
        }
    }

    /// A connection for reads that must see the latest commit: the primary (home region only).
    pub async fn db_read_prefer_primary(
        &self,
        shard: &str,
    ) -> Result<(Object, Source), StoreError> {
        Ok((self.db_write(shard).await?, Source::Primary))
    }

    /// The replica's lag behind the shard's primary (None when unknown). Always zero for a shard
    /// homed here.
    pub fn replica_lag(&self, shard: &str) -> Option<Duration> {
        let pools = self.pools(shard).ok()?;
        if pools.primary.is_some() {
            return Some(Duration::ZERO);
        }
        let lag = pools.lag_ms.load(Ordering::Relaxed);
        (lag >= 0).then(|| Duration::from_millis(lag as u64))
    }

    /// Starts the heartbeat tasks: stamp every shard homed here, measure every other shard's
    /// replica. They end when the store is dropped.
    pub fn spawn_heartbeats(self: &Arc<Self>) {
        for (shard, pools) in self.shards.load().iter() {
            self.spawn_heartbeat(shard.clone(), pools.primary.is_some());
        }
    }

    /// One shard's heartbeat task: `home`, stamp it; else measure its replica's lag.
    fn spawn_heartbeat(self: &Arc<Self>, shard: String, home: bool) {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(HEARTBEAT_PERIOD);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(store) = store.upgrade() else { return };
                let Ok(pools) = store.pools(&shard) else {
                    return;
                };
                if home {
                    if let Err(error) = stamp(&shard, &pools).await {
                        tracing::debug!(%shard, %error, "heartbeat not written");
                    }
                } else {
                    let lag = measure(&shard, &pools).await.unwrap_or(-1);
                    pools.lag_ms.store(lag, Ordering::Relaxed);
                    let labels = ShardLabels {
                        shard: shard.clone(),
                    };
                    if lag >= 0 {
                        store
                            .metrics
                            .replica_lag
                            .get_or_create(&labels)
                            .set(lag as f64 / 1000.0);
                    } else {
                        store.metrics.replica_lag.remove(&labels);
                    }
                }
            }
        });
    }

    /// Shards homed in this region, sorted.
    pub fn home_shards(&self) -> Vec<String> {
        let mut shards: Vec<String> = self
            .shards
            .load()
            .iter()
            .filter(|(_, p)| p.primary.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        shards.sort();
        shards
    }

    /// This region's own catalog: adds read it fresh (they run at the owner's home edge) and a
    /// merge re-prices from it (it runs at the user's home edge).
    pub fn own_catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The catalog of `region` as read here: this region's own, or its replica of a peer's.
    /// None when this region has no replica of it (preflight refuses that for every region
    /// that homes shards).
    pub fn catalog_of(&self, region: &str) -> Option<&Catalog> {
        if region == self.region {
            Some(&self.catalog)
        } else {
            self.peer_catalogs.get(region)
        }
    }

    /// Whether this region can reserve stock (holds a connection to its catalog's primary).
    pub fn has_catalog_primary(&self) -> bool {
        self.catalog_primary.is_some()
    }

    /// Whether this region holds the shard's primary.
    pub fn is_home(&self, shard: &str) -> bool {
        self.shards
            .load()
            .get(shard)
            .is_some_and(|p| p.primary.is_some())
    }

    /// Opens a write transaction on the shard's primary.
    pub async fn begin_write(&self, shard: &str) -> Result<WriteTx, StoreError> {
        let pools = self.pools(shard)?;
        let client = primary_connection(shard, &pools).await?;
        let timer = self.metrics.query_timer(shard, PRIMARY);
        Ok(WriteTx::new(
            client,
            pools.lines_keyed.clone(),
            timer,
            self.replays.clone(),
        ))
    }

    /// The owner's cart from this edge's memory when it holds one at `min_version` or newer
    /// (what [`Store::load_cart`] would answer from its cache, without copying the cart);
    /// None otherwise, and the caller takes the [`Store::load_cart`] path.
    pub fn near_cart(&self, owner: &OwnerKey, min_version: i64) -> Option<Arc<NearEntry>> {
        let entry = self.cache.read_near(owner, min_version)?;
        self.cache_metrics.read_hit.inc();
        Some(entry)
    }

    /// Reads a cart cache-aside: the cache, then the replica, then the primary when the
    /// replica is older than `min_version`. A database read refills the cache unless a newer
    /// version is already there (the version fence in [`Cache::fill`]).
    ///
    /// Returns the cart, where it came from, and the version the caller must not read below:
    /// `min_version` raised to any newer version the cache has seen (a fence left by a write
    /// through this region), so a reader who sent no version still sees writes made here.
    pub async fn load_cart(
        &self,
        shard: &str,
        owner: &OwnerKey,
        min_version: i64,
    ) -> Result<(StoredCart, Source, i64), StoreError> {
        let span = tracing::debug_span!("cache", op = "read");
        let started = std::time::Instant::now();
        let cached = tracing::Instrument::instrument(self.cache.read(owner), span.clone()).await;
        tracing::debug!(
            parent: &span,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            hit = cached.cart.is_some(),
            "cache read"
        );
        let min_version = min_version.max(cached.newest_version.unwrap_or(0));
        if let Some(cart) = cached.cart {
            if cart.version >= min_version {
                self.cache_metrics.read_hit.inc();
                return Ok((cart, Source::Cache, min_version));
            }
        }
        if cached.answered {
            self.cache_metrics.read_miss.inc();
        }
        // The miss path is boxed: a cache hit's future (the common read) stays small.
        Box::pin(async move {
            let (cart, source) = self.read_from_database(shard, owner, min_version).await?;
            self.cache.fill(&cart).await;
            Ok((cart, source, min_version))
        })
        .await
    }

    /// The database half of [`Store::load_cart`], without touching the cache. Outside the
    /// shard's home region the replica's cart is returned even when older than `min_version`;
    /// the caller decides what to do about it.
    pub async fn read_from_database(
        &self,
        shard: &str,
        owner: &OwnerKey,
        min_version: i64,
    ) -> Result<(StoredCart, Source), StoreError> {
        let (client, source) = self.db_read(shard).await?;
        let cart = self
            .timed(shard, source, carts::load(&client, owner))
            .await?;
        if cart.version >= min_version || !self.is_home(shard) {
            return Ok((cart, source));
        }
        drop(client);
        let (client, source) = self.db_read_prefer_primary(shard).await?;
        let cart = self
            .timed(shard, source, carts::load(&client, owner))
            .await?;
        Ok((cart, source))
    }

    /// One cart read from the shard's primary (home region only).
    pub async fn load_from_primary(
        &self,
        shard: &str,
        owner: &OwnerKey,
    ) -> Result<StoredCart, StoreError> {
        let (client, source) = self.db_read_prefer_primary(shard).await?;
        self.timed(shard, source, carts::load(&client, owner)).await
    }

    /// Runs one query, observing its duration under the shard and the role it ran on.
    async fn timed<T>(
        &self,
        shard: &str,
        source: Source,
        query: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let role = if source == Source::Replica {
            REPLICA
        } else {
            PRIMARY
        };
        // A DEBUG span per query (free unless DEBUG is on for `cartedge::store`): the lines
        // logged inside it name the shard and role, and its end is a line with its duration.
        let span = tracing::debug_span!("db", shard, role);
        let started = std::time::Instant::now();
        let result = tracing::Instrument::instrument(query, span.clone()).await;
        let elapsed = started.elapsed();
        self.metrics
            .query_duration
            .get_or_create(&ShardRoleLabels {
                shard: shard.to_string(),
                role,
            })
            .observe(elapsed.as_secs_f64());
        tracing::debug!(parent: &span, latency_ms = elapsed.as_secs_f64() * 1000.0, ok = result.is_ok(), "db query");
        result
    }

    /// Sets `cartedge_db_pool_connections` from every shard pool's current status (at scrape
    /// time: reading a pool's status takes no connection).
    pub fn export_pool_connections(&self) {
        for (shard, pools) in self.shards.load().iter() {
            let roles = [
                (PRIMARY, pools.primary.as_ref()),
                (REPLICA, Some(&pools.replica)),
            ];
            for (role, pool) in roles {
                let Some(pool) = pool else { continue };
                let status = pool.status();
                let idle = status.available as i64;
                let in_use = (status.size as i64 - idle).max(0);
                for (state, value) in [("idle", idle), ("in_use", in_use)] {
                    self.metrics
                        .pool_connections
                        .get_or_create(&PoolLabels {
                            shard: shard.clone(),
                            role,
                            state,
                        })
                        .set(value);
                }
            }
        }
    }

    /// Refreshes a home shard's business gauges and outbox backlog: two bounded queries on
    /// its replica (an index range scan over `carts.updated_at`, capped at
    /// [`GAUGE_ROW_CAP`] rows, and a capped count of the outbox), under the pool's
    /// `statement_timeout`.
    pub async fn refresh_shard_gauges(&self, shard: &str) -> Result<(), StoreError> {
        let (client, source) = self.db_read(shard).await?;
        let cap = GAUGE_ROW_CAP;
        let carts = client
            .prepare_cached(
                "SELECT count(*)::bigint, coalesce(avg(lines), 0)::float8 FROM (                    SELECT (SELECT count(*) FROM cart_items i WHERE i.owner = c.owner) AS lines                    FROM carts c                    WHERE c.updated_at > now() - interval '24 hours' AND c.purged_at IS NULL                    LIMIT $1) active",
            )
            .await?;
        let row = self
            .timed(shard, source, async {
                Ok(client.query_one(&carts, &[&cap]).await?)
            })
            .await?;
        let (active, lines_avg): (i64, f64) = (row.try_get(0)?, row.try_get(1)?);
        let backlog = client
            .prepare_cached(
                "SELECT count(*)::bigint FROM (SELECT 1 FROM cart_events LIMIT $1) waiting",
            )
            .await?;
        let row = self
            .timed(shard, source, async {
                Ok(client.query_one(&backlog, &[&cap]).await?)
            })
            .await?;
        let waiting: i64 = row.try_get(0)?;
        let labels = ShardLabels {
            shard: shard.to_string(),
        };
        self.metrics.carts_active.get_or_create(&labels).set(active);
        self.metrics
            .cart_lines_avg
            .get_or_create(&labels)
            .set(lines_avg);
        self.metrics
            .outbox_backlog
            .get_or_create(&labels)
            .set(waiting);
        Ok(())
    }

    /// Whether every primary homed here (or, in a region that homes none, every replica)
    /// answers a trivial query within `timeout`.
    /// Probes every pool once (`SELECT 1`, bounded by `timeout`), all at once: each shard's
    /// primary where it is homed here, and its replica.
    pub async fn probe_shards(&self, timeout: Duration) -> Vec<ShardProbe> {
        let probe = |pool: &Pool| {
            let pool = pool.clone();
            async move {
                let probe = async {
                    let client = pool.get().await.ok()?;
                    client.simple_query("SELECT 1").await.ok()
                };
                matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(_)))
            }
        };
        let shards = self.shards.load();
        let probes = shards.iter().map(|(shard, pools)| {
            let primary: futures_util::future::OptionFuture<_> =
                pools.primary.as_ref().map(probe).into();
            let replica = probe(&pools.replica);
            async move {
                let (primary, replica) = tokio::join!(primary, replica);
                ShardProbe {
                    shard: shard.to_string(),
                    primary,
                    replica,
                }
            }
        });
        let mut probes = futures_util::future::join_all(probes).await;
        probes.sort_by(|a, b| a.shard.cmp(&b.shard));
        probes
    }

    /// Whether the probed databases can take this region's work: every primary homed here
    /// answered (or, homing none, every replica did).
    pub fn databases_healthy(probes: &[ShardProbe]) -> bool {
        let homed: Vec<bool> = probes.iter().filter_map(|p| p.primary).collect();
        if homed.is_empty() {
            probes.iter().all(|p| p.replica)
        } else {
            homed.into_iter().all(|ok| ok)
        }
    }
}
