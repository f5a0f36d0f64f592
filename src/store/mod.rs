//! Storage: PostgreSQL pools with explicit intent, the Redis cart cache and the catalog.
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
pub mod orders;
pub mod tx;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::Config;
use crate::domain::cart::StoredCart;
use crate::domain::ids::OwnerKey;

pub use cache::Cache;
pub use carts::{CartOp, Claim, StoredResponse, WriteTx};
pub use catalog::Catalog;

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

/// Counters other layers (metrics, health) read.
#[derive(Debug, Default)]
pub struct StoreCounters {
    pub replica_fallbacks: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
}

/// One shard's pools in this region: the primary only where the shard is homed.
struct ShardPools {
    primary: Option<Pool>,
    replica: Pool,
    /// How far the replica is behind its primary, in ms, per the heartbeat; -1 when unknown.
    lag_ms: Arc<AtomicI64>,
}

/// How often heartbeats are written (home shards) and replica lag is read (the others).
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// The region's storage: every shard's pools, the regional cache and the catalog.
pub struct Store {
    shards: HashMap<String, ShardPools>,
    pub cache: Arc<Cache>,
    pub catalog: Catalog,
    /// The catalog's primary, where stock is reserved (None in regions without it).
    catalog_primary: Option<Pool>,
    pub counters: StoreCounters,
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

impl Store {
    pub fn new(config: &Config) -> anyhow::Result<Store> {
        let mut shards = HashMap::new();
        for shard in &config.database.shards {
            let primary = if shard.primary.is_empty() {
                None
            } else {
                Some(build_pool(shard.primary.expose(), config)?)
            };
            let replica = build_pool(shard.replica.expose(), config)?;
            let lag_ms = Arc::new(AtomicI64::new(-1));
            shards.insert(
                shard.id.clone(),
                ShardPools {
                    primary,
                    replica,
                    lag_ms,
                },
            );
        }
        let catalog_pool = build_pool(config.database.catalog.expose(), config)?;
        let catalog_primary = if config.database.catalog_primary.is_empty() {
            None
        } else {
            Some(build_pool(
                config.database.catalog_primary.expose(),
                config,
            )?)
        };
        Ok(Store {
            shards,
            cache: Arc::new(Cache::new(&config.redis)?),
            catalog: Catalog::new(catalog_pool, config.cart.catalog_cache_ttl.0),
            catalog_primary,
            counters: StoreCounters::default(),
        })
    }

    fn pools(&self, shard: &str) -> Result<&ShardPools, StoreError> {
        self.shards
            .get(shard)
            .ok_or_else(|| StoreError::Unavailable(format!("shard {shard} is not configured")))
    }

    /// A connection for writes: the shard's primary, which only its home region has.
    pub async fn db_write(&self, shard: &str) -> Result<Object, StoreError> {
        let primary = self
            .pools(shard)?
            .primary
            .as_ref()
            .ok_or_else(|| StoreError::NotHome(shard.to_string()))?;
        Ok(primary.get().await?)
    }

    /// A connection for reads that tolerate replication lag: the replica, or (in the home
    /// region) the primary with a warning when the replica cannot be had.
    pub async fn db_read(&self, shard: &str) -> Result<(Object, Source), StoreError> {
        let pools = self.pools(shard)?;
        match (pools.replica.get().await, &pools.primary) {
            (Ok(client), _) => Ok((client, Source::Replica)),
            (Err(error), Some(primary)) => {
                self.counters
                    .replica_fallbacks
                    .fetch_add(1, Ordering::Relaxed);
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
        let pools = self.shards.get(shard)?;
        if pools.primary.is_some() {
            return Some(Duration::ZERO);
        }
        let lag = pools.lag_ms.load(Ordering::Relaxed);
        (lag >= 0).then(|| Duration::from_millis(lag as u64))
    }

    /// Starts the heartbeat tasks: stamp every shard homed here, measure every other shard's
    /// replica. They end when the store is dropped.
    pub fn spawn_heartbeats(self: &Arc<Self>) {
        for (shard, pools) in &self.shards {
            let shard = shard.clone();
            let store = Arc::downgrade(self);
            let home = pools.primary.is_some();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(HEARTBEAT_PERIOD);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    let Some(store) = store.upgrade() else { return };
                    let Some(pools) = store.shards.get(&shard) else {
                        return;
                    };
                    if home {
                        if let Err(error) = stamp(&shard, pools).await {
                            tracing::debug!(%shard, %error, "heartbeat not written");
                        }
                    } else {
                        let lag = measure(&shard, pools).await.unwrap_or(-1);
                        pools.lag_ms.store(lag, Ordering::Relaxed);
                    }
                }
            });
        }
    }

    /// Shards homed in this region, sorted.
    pub fn home_shards(&self) -> Vec<String> {
        let mut shards: Vec<String> = self
            .shards
            .iter()
            .filter(|(_, p)| p.primary.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        shards.sort();
        shards
    }

    /// Whether this region can reserve stock (holds a connection to the catalog's primary).
    pub fn has_catalog_primary(&self) -> bool {
        self.catalog_primary.is_some()
    }

    /// Whether this region holds the shard's primary.
    pub fn is_home(&self, shard: &str) -> bool {
        self.shards.get(shard).is_some_and(|p| p.primary.is_some())
    }

    /// Opens a write transaction on the shard's primary.
    pub async fn begin_write(&self, shard: &str) -> Result<WriteTx, StoreError> {
        WriteTx::begin(self.db_write(shard).await?).await
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
        let cached = self.cache.read(owner).await;
        let min_version = min_version.max(cached.newest_version.unwrap_or(0));
        if let Some(cart) = cached.cart {
            if cart.version >= min_version {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok((cart, Source::Cache, min_version));
            }
        }
        self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
        let (cart, source) = self.read_from_database(shard, owner, min_version).await?;
        self.cache.fill(&cart).await;
        Ok((cart, source, min_version))
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
        let cart = carts::load(&client, owner).await?;
        if cart.version >= min_version || !self.is_home(shard) {
            return Ok((cart, source));
        }
        drop(client);
        let (client, source) = self.db_read_prefer_primary(shard).await?;
        Ok((carts::load(&client, owner).await?, source))
    }

    /// One cart read from the shard's primary (home region only).
    pub async fn load_from_primary(
        &self,
        shard: &str,
        owner: &OwnerKey,
    ) -> Result<StoredCart, StoreError> {
        let (client, _) = self.db_read_prefer_primary(shard).await?;
        carts::load(&client, owner).await
    }

    /// Whether every primary homed here (or, in a region that homes none, every replica)
    /// answers a trivial query within `timeout`.
    pub async fn databases_healthy(&self, timeout: Duration) -> bool {
        let homed: Vec<&Pool> = self
            .shards
            .values()
            .filter_map(|p| p.primary.as_ref())
            .collect();
        let pools: Vec<&Pool> = if homed.is_empty() {
            self.shards.values().map(|p| &p.replica).collect()
        } else {
            homed
        };
        let probes = pools.into_iter().map(|pool| async move {
            let probe = async {
                let client = pool.get().await.ok()?;
                client.simple_query("SELECT 1").await.ok()
            };
            matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(_)))
        });
        futures_util::future::join_all(probes)
            .await
            .into_iter()
            .all(|ok| ok)
    }
}
