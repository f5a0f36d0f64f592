//! Typed configuration: layered loading, syntax checks and redacted printing.
//!
//! Layers, later wins: `config/default.toml` → `regions/<id>.toml` → `CARTEDGE__…` environment
//! variables (meant for secrets). Every table rejects unknown keys so a typo in an SRE-edited file
//! is an error, not a silently ignored setting. Loading takes the environment as a parameter so
//! tests never mutate the process environment.
//!
//! This module is a leaf: it imports nothing of the crate but `domain`. It checks what the
//! values say on their own (ranges, required keys, keys that go together); whatever needs key
//! material, certificate files, network syntax (CIDRs, URLs, DSNs) or the ring is `preflight`'s
//! job. It reads only the files it layers, opens no sockets and reads no clock.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::domain::ids::RegionId;
use crate::domain::money::Currency;

fn default_near_cache_entries() -> usize {
    100_000
}

/// The prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "CARTEDGE__";

/// The whole effective configuration of one edge.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub region: RegionConfig,
    pub edge: EdgeConfig,
    pub topology: TopologyConfig,
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub cart: CartConfig,
    pub auth: AuthConfig,
    pub idempotency: IdempotencyConfig,
    pub log: LogConfig,
    pub tls: TlsFiles,
    pub forward: ForwardConfig,
    pub rate_limit: RateLimitConfig,
    pub retention: RetentionConfig,
    pub janitor: JanitorConfig,
    pub events: EventsConfig,
    pub checkout: CheckoutConfig,
    pub parking: ParkingConfig,
}

/// Adds parked in this region while the cart's home region cannot be reached (`api::parking`,
/// `store::parking`), and the reconciler that forwards them once it can.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParkingConfig {
    /// Park adds the home region cannot take now (202) instead of answering 503.
    pub enabled: bool,
    /// Parked adds (pending or rejected, not yet reported) one owner may have here; past it, 503
    /// `home_region_unavailable` as without parking.
    pub max_per_owner: i64,
    /// Pending parked adds this region holds (counted on its parking shard); past it, 503.
    pub max_per_region: i64,
    /// A parked add still not applied this long after it arrived is rejected with a reason. It
    /// must stay below `idempotency.retention`: the home region must still recognise its key.
    pub max_age: Dur,
    /// Time between reconciler passes.
    pub interval: Dur,
}

/// How long carts and bookkeeping are kept (the janitor enforces it).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// A cart untouched this long is purged.
    pub cart: Dur,
    /// A guest cart untouched this long is purged; a guest session id expires this long after
    /// it was issued.
    pub guest_cart: Dur,
    /// An empty cart untouched this long is purged.
    pub empty_cart: Dur,
    /// A purged cart keeps an empty row (its version) this long, so caches and clients that
    /// saw it never see its version go backwards; must exceed `redis.ttl`.
    pub tombstone: Dur,
    /// Records of applied merges are kept this long (retries of a merge are recognised).
    pub merge_record: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JanitorConfig {
    /// Run the janitor in the background (`cartedge janitor --once` runs one pass by hand).
    pub enabled: bool,
    /// Time between passes.
    pub interval: Dur,
    /// Rows per batch (each batch is one short transaction).
    pub batch_size: i64,
    /// Batches per task per shard per pass, so one pass is bounded.
    pub max_batches: u32,
    /// A merge whose guest cart has been frozen this long without a retry is settled by the
    /// janitor: finished when it reached the user's cart, rolled back otherwise. Keep it well
    /// above `server.request_timeout`: a merge still being handled that is rolled back under
    /// it stays correct (it meets the fence and merges afresh) but does its work twice.
    pub stale_merge_after: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Run the outbox relay for the shards homed here.
    pub relay: bool,
    /// The Redis Stream in this region's Redis.
    pub stream: String,
    /// Approximate cap of the stream (`XADD MAXLEN ~`).
    pub max_len: usize,
    /// Events per relay transaction.
    pub batch: i64,
    /// Pause between relay passes when the outbox is empty.
    pub interval: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutConfig {
    /// How long reserved stock is held for payment.
    pub reservation_ttl: Dur,
    /// The token `role` claim of the payment service (confirms and cancels orders).
    pub payment_role: String,
    /// How long past its reservation's expiry a pending order is left before the janitor
    /// expires it.
    pub expiry_grace: Dur,
}

/// Edge rate limits. Defaults fit a shopper, not a benchmark: load generators use a token with
/// the claim `"tier": "service"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// Per signed-in user.
    pub user: TierQuotas,
    /// Per guest session.
    pub guest: TierQuotas,
    /// Per owner with a service-tier token.
    pub service: TierQuotas,
    /// Per client IP, for requests without valid credentials.
    pub anonymous: QuotaConfig,
    /// Networks (CIDR) whose `X-Forwarded-For` is believed when they are the socket peer.
    pub trusted_proxies: Vec<String>,
    /// Keys one limiter may hold before it is cleared (bounds memory under floods).
    pub max_keys: usize,
    /// Edges serving this region. The quotas above are the region's; each edge enforces its
    /// share (rate and burst divided by this, rounded up, never below 1), since edges keep
    /// their counts apart.
    pub edges: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierQuotas {
    pub reads: QuotaConfig,
    pub writes: QuotaConfig,
    pub checkout: QuotaConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    pub per_second: u32,
    pub burst: u32,
}

/// Mutual TLS between edges. Empty paths: no internal listener and no forwarding (a region
/// that homes every shard, like the single-region local cluster, needs neither).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The private CA that signs every edge's certificate.
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TlsFiles {
    pub fn is_configured(&self) -> bool {
        !self.ca_file.as_os_str().is_empty()
    }
}

/// Forwarding writes (and read-your-writes reads) to home regions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Bound on one forward, connection set-up and one retry included; past it the client gets
    /// 503 `home_region_unavailable`.
    pub timeout: Dur,
    pub connect_timeout: Dur,
    /// Consecutive failures that open a peer's circuit (then writes fail at once).
    pub breaker_failures: u32,
    /// How long an open circuit fails fast; after it requests go through again and the next
    /// failure re-opens it at once.
    pub breaker_cooldown: Dur,
    /// How long a read waits for the local replica to reach `Cart-Min-Version` before asking the
    /// home region.
    pub replica_wait: Dur,
    /// Cross-region cache invalidations waiting to be sent; past it they are dropped (bounded by
    /// the cache TTL and the version check) and counted.
    pub invalidation_queue: usize,
    /// A replica further behind than this (or whose lag is unknown) makes reads served from it
    /// carry a `stale_possible` warning.
    pub max_replica_lag: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Region id, e.g. `sg`; reported in `Cart-Region` and `/health`.
    pub id: RegionId,
    /// Currency of carts created by this region's edge.
    pub currency: Currency,
}

/// How other regions' edges and clients reach this region's edges.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// The public base URL of this region's edges (documentation and walk-throughs).
    pub public_url: String,
    /// The base URL peers forward writes to (mutual TLS between edges).
    pub internal_url: String,
}

/// Where the ring and the peers' region files are.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyConfig {
    /// The global ring file, identical in every region.
    pub ring_file: PathBuf,
    /// The directory holding every region's file (`<id>.toml`), this one included.
    pub regions_dir: PathBuf,
    /// Per-peer overrides of `edge.internal_url`, for when this region reaches a peer through
    /// something of its own (a gateway; the local cluster's link proxy).
    #[serde(default)]
    pub peer_urls: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Public listener (the cart API, `/health`, `/ready`).
    pub listen: SocketAddr,
    /// Operator listener (`/health`, `/ready`, `/metrics`). Optional.
    pub admin_listen: Option<SocketAddr>,
    /// Listener for other regions' edges (mutual TLS, HTTP/2); needs `[tls]`. Optional.
    pub internal_listen: Option<SocketAddr>,
    /// Largest accepted request body; the contract says 16 KiB.
    pub max_body_bytes: usize,
    /// Upper bound on one request's handling; past it the client gets 503 `unavailable`.
    pub request_timeout: Dur,
    /// After SIGTERM, how long `/ready` answers 503 while the listener still accepts, so load
    /// balancers notice before connections are refused.
    pub drain_grace: Dur,
    /// How long in-flight connections may take to finish after the listener closes.
    pub drain_timeout: Dur,
    /// Bound on receiving a request head, so slow or idle clients cannot hold connections.
    pub header_read_timeout: Dur,
    /// Most header fields in one request (431 past it).
    pub max_headers: usize,
    /// Largest request head in bytes (431 past it).
    pub max_header_bytes: usize,
    /// Open connections per listener; past it new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before being served (rapid-reset protection).
    pub http2_max_pending_reset_streams: usize,
    /// PEM certificate chain (leaf first) of the public listener. Empty with `tls_key_file`:
    /// plain HTTP. Both are read again on reload, so a renewed certificate needs no restart.
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: PathBuf,
}

impl ServerConfig {
    /// The public listener's certificate and key files, when it serves TLS.
    pub fn public_tls(&self) -> Option<(&Path, &Path)> {
        let configured = !self.tls_cert_file.as_os_str().is_empty();
        configured.then_some((self.tls_cert_file.as_path(), self.tls_key_file.as_path()))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Every shard of the ring as this region reaches it.
    #[serde(default)]
    pub shards: Vec<ShardDatabase>,
    /// Reads of this region's own catalog (items, names, prices in this region's currency,
    /// stock): a replica of `catalog_primary` or the primary itself.
    pub catalog: Secret,
    /// This region's own catalog primary: checkouts of carts homed here reserve stock on it and
    /// `cartedge catalog …` writes it. Required where the region homes shards.
    pub catalog_primary: Secret,
    /// Region id → this region's replica of that region's catalog. A cart is priced from its
    /// home region's catalog, so a visiting shopper's cart read here needs one for every other
    /// region that homes shards.
    #[serde(default)]
    pub peer_catalogs: BTreeMap<String, Secret>,
    /// Connections per pool (primary, replica and every catalog each get one pool).
    pub pool_size: usize,
    /// Bound on establishing one connection.
    pub connect_timeout: Dur,
    /// Bound on waiting for a pooled connection before the request fails with 503.
    pub checkout_timeout: Dur,
    /// Server-side statement timeout set on every connection.
    pub statement_timeout: Dur,
}

/// One shard's endpoints in this region (libpq key=value strings or URLs; multi-host strings
/// with `target_session_attrs=read-write` let a promoted standby be found).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardDatabase {
    pub id: String,
    /// The shard's primary: only in the shard's home region.
    #[serde(default)]
    pub primary: Secret,
    /// A replica readable from this region (in the home region it may equal the primary).
    pub replica: Secret,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Secret,
    /// Cache entry lifetime; also bounds how long a missed invalidation can matter.
    pub ttl: Dur,
    /// Prefix of every cart key, so several deployments or tests can share one Redis.
    pub key_prefix: String,
    /// Bound on one cache round trip; a slow cache is treated as a miss, never as an error.
    pub timeout: Dur,
    /// Owners whose invalidation failed are remembered up to this many; past it the whole
    /// cache is distrusted and flushed when Redis is reachable again.
    pub max_pending_invalidations: usize,
    /// Carts kept decoded in the edge's memory in front of Redis, coherent through Redis'
    /// invalidation pushes (`CLIENT TRACKING`); 0 turns the near cache off.
    #[serde(default = "default_near_cache_entries")]
    pub near_cache_entries: usize,
    /// Redis Sentinel addresses (`redis://host:port`): when set, the master is whichever one
    /// these sentinels name for `master_name`, looked up again after a connection error or a
    /// `READONLY` reply, and `url` must keep its default (it would be ignored). Empty: `url`.
    #[serde(default)]
    pub sentinels: Vec<Secret>,
    /// The master's name in the sentinels' `sentinel monitor` lines; set with `sentinels`.
    #[serde(default)]
    pub master_name: String,
}

/// `redis.url` as the defaults file sets it. With `redis.sentinels` any other value is refused:
/// the sentinels name the master, so an address in `url` would be silently ignored.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

impl RedisConfig {
    /// Whether the master is found through Redis Sentinel rather than `url`.
    pub fn uses_sentinels(&self) -> bool {
        !self.sentinels.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CartConfig {
    /// Most lines one cart may hold (`cart_full` past it).
    pub max_lines: u32,
    /// How long a catalog entry (current price, stock) is reused in-process for cart views.
    pub catalog_cache_ttl: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Expected `iss`; empty disables the check.
    pub issuer: String,
    /// Expected `aud`; empty disables the check.
    pub audience: String,
    /// Clock-skew allowance for `exp`/`nbf`/`iat`.
    pub leeway: Dur,
    /// Tokens whose `exp` lies further ahead than this are refused (a stolen key or a broken
    /// issuer minting near-eternal tokens); so are tokens whose `iat` is in the future.
    pub max_token_lifetime: Dur,
    /// HMAC key for guest session ids (at least 32 bytes).
    pub session_secret: Secret,
    /// The guest session id format minted: 3 (carries its issue time and the minting region,
    /// the guest's home), 2 (issue time only) or 1 (the old format, never expires by age). All
    /// are always accepted; 2 and 1 are for a rolling upgrade while some region still runs a
    /// release that cannot read the newer ids.
    pub session_id_version: u8,
    /// Refuse user tokens without a `region` claim (401) instead of placing their owners on the
    /// global ring.
    #[serde(default)]
    pub require_region_claim: bool,
    /// Verification keys; a token names one by `kid`, or the only key is used.
    pub keys: Vec<JwtKeyConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    pub kid: String,
    /// `HS256`, `ES256`, `EdDSA` or `RS256`: pinned here, never taken from the token.
    pub algorithm: String,
    /// Shared secret for `HS256` (at least 32 bytes).
    #[serde(default)]
    pub secret: Secret,
    /// PEM public key file for asymmetric algorithms.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long idempotency keys are kept (the contract says at least 24 h).
    pub retention: Dur,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `json`, `text`, or `auto` (text when stderr is a terminal, JSON otherwise).
    pub format: String,
    /// A `tracing` filter directive, e.g. `info,cartedge=debug`; `RUST_LOG` wins when set.
    /// Changed on SIGHUP.
    pub filter: String,
    /// The share of successful reads whose request line is logged at INFO (0..=1; writes and
    /// errors are always logged). Changed on SIGHUP.
    #[serde(default = "default_read_sample_rate")]
    pub read_sample_rate: f64,
}

fn default_read_sample_rate() -> f64 {
    0.01
}

/// A duration written as a human string (`"250ms"`, `"1h"`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A string that must never be printed: `Debug` and `Serialize` redact it.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The defaults shipped in the binary, used when no defaults file is named or found.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../config/default.toml");

/// Where the layers come from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The defaults file (`config/default.toml`); `None` uses [`EMBEDDED_DEFAULTS`].
    pub defaults: Option<PathBuf>,
    /// The region file (`regions/<id>.toml`), if any.
    pub region: Option<PathBuf>,
    /// Extra TOML text applied after the region file (used by tests and the local launcher).
    pub overlay: Option<String>,
}

impl Sources {
    pub fn new(defaults: Option<PathBuf>, region: Option<PathBuf>) -> Self {
        Sources {
            defaults,
            region,
            overlay: None,
        }
    }
}

impl Config {
    /// Loads and validates the layered configuration. `env` is the process environment (or a
    /// test's stand-in); only variables starting with [`ENV_PREFIX`] are read.
    pub fn load<I, K, V>(sources: &Sources, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut merged = match &sources.defaults {
            Some(path) => read_toml(path)?,
            None => toml::from_str(EMBEDDED_DEFAULTS).map_err(|e| ConfigError::Parse {
                path: "embedded defaults".into(),
                message: e.to_string(),
            })?,
        };
        if let Some(region) = &sources.region {
            merge(&mut merged, read_toml(region)?);
        }
        if let Some(overlay) = &sources.overlay {
            let layer: toml::Table = toml::from_str(overlay).map_err(|e| ConfigError::Parse {
                path: "overlay".into(),
                message: e.to_string(),
            })?;
            merge(&mut merged, layer);
        }
        let mut overrides: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in env {
            if let Some(rest) = name.as_ref().strip_prefix(ENV_PREFIX) {
                overrides.insert(rest.to_string(), value.as_ref().to_string());
            }
        }
        for (path, value) in overrides {
            apply_env(&mut merged, &path, &value)?;
        }
        let config: Config =
            Config::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Parse {
                path: "effective configuration".into(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the values say on their own: ranges, required keys, keys that go together.
    /// Files, key material and network syntax are checked by `preflight::check`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.server.max_body_bytes == 0 || self.server.max_body_bytes > 1 << 20 {
            problems.push("server.max_body_bytes must be within 1..=1048576".into());
        }
        if self.database.shards.is_empty() {
            problems.push("database.shards must list every shard of the ring".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for shard in &self.database.shards {
            if !seen.insert(shard.id.as_str()) {
                problems.push(format!("database.shards lists {} twice", shard.id));
            }
            if shard.replica.is_empty() {
                problems.push(format!("database.shards {}: replica is required", shard.id));
            }
        }
        if self.database.catalog.is_empty() {
            problems.push("database.catalog is required".into());
        }
        if self.database.pool_size == 0 {
            problems.push("database.pool_size must be at least 1".into());
        }
        if self.redis.ttl.0 < Duration::from_secs(1) {
            problems.push("redis.ttl must be at least 1s".into());
        }
        let redis = &self.redis;
        if redis.sentinels.is_empty() != redis.master_name.is_empty() {
            problems.push(
                "redis.sentinels and redis.master_name must both be set or both be empty".into(),
            );
        }
        if redis.uses_sentinels() && redis.url.expose() != DEFAULT_REDIS_URL {
            problems.push(format!(
                "redis.url must stay {DEFAULT_REDIS_URL:?} when redis.sentinels is set: the sentinels name the master"
            ));
        }
        if !(1..=1000).contains(&self.cart.max_lines) {
            problems.push("cart.max_lines must be within 1..=1000".into());
        }
        if self.idempotency.retention.0 < Duration::from_secs(24 * 3600) {
            problems.push("idempotency.retention must be at least 24h".into());
        }
        let retention = &self.retention;
        for (name, value) in [
            ("retention.cart", retention.cart),
            ("retention.guest_cart", retention.guest_cart),
            ("retention.empty_cart", retention.empty_cart),
        ] {
            if value.0 < Duration::from_secs(3600) {
                problems.push(format!("{name} must be at least 1h"));
            }
        }
        if retention.tombstone.0 <= self.redis.ttl.0 {
            problems.push("retention.tombstone must be longer than redis.ttl".into());
        }
        if retention.merge_record.0 < Duration::from_secs(3600) {
            problems.push("retention.merge_record must be at least 1h".into());
        }
        if !(1..=10_000).contains(&self.janitor.batch_size) || self.janitor.max_batches == 0 {
            problems.push(
                "janitor.batch_size must be within 1..=10000 and janitor.max_batches at least 1"
                    .into(),
            );
        }
        if !(1..=1000).contains(&self.rate_limit.edges) {
            problems.push("rate_limit.edges must be within 1..=1000".into());
        }
        if self.janitor.interval.0 < Duration::from_secs(1) {
            problems.push("janitor.interval must be at least 1s".into());
        }
        // Not tied to server.request_timeout by a check (configurations valid before the key
        // existed stay valid): settling a merge still in flight is safe, only wasteful.
        if self.janitor.stale_merge_after.0 < Duration::from_secs(1) {
            problems.push("janitor.stale_merge_after must be at least 1s".into());
        }
        let parking = &self.parking;
        if !(1..=10_000).contains(&parking.max_per_owner)
            || !(1..=10_000_000).contains(&parking.max_per_region)
        {
            problems.push(
                "parking.max_per_owner must be within 1..=10000 and parking.max_per_region within 1..=10000000"
                    .into(),
            );
        }
        if parking.max_age.0 < Duration::from_secs(60)
            || parking.max_age.0 >= self.idempotency.retention.0
        {
            problems.push(
                "parking.max_age must be at least 1m and shorter than idempotency.retention".into(),
            );
        }
        if parking.interval.0 < Duration::from_millis(100) {
            problems.push("parking.interval must be at least 100ms".into());
        }
        if self.events.stream.is_empty()
            || self.events.max_len == 0
            || !(1..=10_000).contains(&self.events.batch)
        {
            problems.push(
                "events.stream must be set, events.max_len at least 1, events.batch within 1..=10000"
                    .into(),
            );
        }
        if self.checkout.reservation_ttl.0 < Duration::from_secs(1)
            || self.checkout.payment_role.is_empty()
        {
            problems.push(
                "checkout.reservation_ttl must be at least 1s and checkout.payment_role set".into(),
            );
        }
        if self.auth.session_secret.expose().len() < 32 {
            problems.push("auth.session_secret must be at least 32 bytes".into());
        }
        if self.auth.keys.is_empty() {
            problems.push("auth.keys must name at least one key".into());
        }
        if !(1..=3).contains(&self.auth.session_id_version) {
            problems.push("auth.session_id_version must be 1, 2 or 3".into());
        }
        if self.server.max_headers == 0 || self.server.max_header_bytes < 1024 {
            problems.push(
                "server.max_headers must be at least 1 and server.max_header_bytes at least 1024"
                    .into(),
            );
        }
        if self.server.max_connections == 0 {
            problems.push("server.max_connections must be at least 1".into());
        }
        let (cert, key) = (&self.server.tls_cert_file, &self.server.tls_key_file);
        if cert.as_os_str().is_empty() != key.as_os_str().is_empty() {
            problems.push(
                "server.tls_cert_file and server.tls_key_file must both be set or both be empty"
                    .into(),
            );
        }
        let tls = &self.tls;
        let set = [&tls.ca_file, &tls.cert_file, &tls.key_file]
            .iter()
            .filter(|path| !path.as_os_str().is_empty())
            .count();
        if set != 0 && set != 3 {
            problems.push(
                "tls.ca_file, tls.cert_file and tls.key_file must all be set or all be empty"
                    .into(),
            );
        }
        if self.server.internal_listen.is_some() && !self.tls.is_configured() {
            problems.push(
                "server.internal_listen needs tls.ca_file, tls.cert_file and tls.key_file".into(),
            );
        }
        let listeners = [
            ("server.listen", Some(self.server.listen)),
            ("server.admin_listen", self.server.admin_listen),
            ("server.internal_listen", self.server.internal_listen),
        ];
        for (index, (name, address)) in listeners.iter().enumerate() {
            let Some(address) = address.filter(|a| a.port() != 0) else {
                continue;
            };
            for (other, other_address) in &listeners[..index] {
                if *other_address == Some(address) {
                    problems.push(format!("{name} {address} is also {other}"));
                }
            }
        }
        if self.forward.breaker_failures == 0 {
            problems.push("forward.breaker_failures must be at least 1".into());
        }
        if self.forward.invalidation_queue == 0 {
            problems.push("forward.invalidation_queue must be at least 1".into());
        }
        if !matches!(self.log.format.as_str(), "text" | "json" | "auto") {
            problems.push("log.format must be text, json or auto".into());
        }
        if !(0.0..=1.0).contains(&self.log.read_sample_rate) {
            problems.push("log.read_sample_rate must be between 0 and 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The effective configuration as TOML with every secret redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// This region's endpoints of a shard.
    pub fn shard(&self, id: &str) -> Option<&ShardDatabase> {
        self.database.shards.iter().find(|s| s.id == id)
    }
}

fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Deep-merges `layer` into `base`: tables merge key by key, anything else replaces. (Public
/// so tests build layered files the way the loader reads them.)
pub fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge(existing, incoming)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `CARTEDGE__A__B=value` as `a.b = value`. Numeric segments index arrays. A value
/// replacing a string stays a string (so a numeric-looking secret is not turned into a number);
/// otherwise it is read as a TOML value when it parses as one.
fn apply_env(root: &mut toml::Table, path: &str, raw: &str) -> Result<(), ConfigError> {
    let name = format!("{ENV_PREFIX}{path}");
    let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::Env {
            name,
            message: "empty path segment".into(),
        });
    }
    let mut slot: &mut toml::Value = root
        .entry(segments[0].clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    for segment in &segments[1..] {
        slot = match slot {
            toml::Value::Table(table) => table
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            toml::Value::Array(items) => {
                let index: usize = segment.parse().map_err(|_| ConfigError::Env {
                    name: name.clone(),
                    message: format!("{segment:?} is not an array index"),
                })?;
                items.get_mut(index).ok_or_else(|| ConfigError::Env {
                    name: name.clone(),
                    message: format!("index {index} is out of range"),
                })?
            }
            _ => {
                return Err(ConfigError::Env {
                    name,
                    message: "path goes through a plain value".into(),
                })
            }
        };
    }
    let keep_string = matches!(slot, toml::Value::String(_));
    *slot = if keep_string {
        toml::Value::String(raw.to_string())
    } else {
        parse_scalar(raw)
    };
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    let probe = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&probe) {
        Ok(mut table) => table
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources_with(overlay: &str) -> Sources {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        Sources {
            defaults: Some(root.join("config/default.toml")),
            region: Some(root.join("regions/sg.toml")),
            overlay: Some(overlay.to_string()),
        }
    }

    const SECRETS: [(&str, &str); 2] = [
        (
            "CARTEDGE__AUTH__SESSION_SECRET",
            "0123456789abcdef0123456789abcdef",
        ),
        (
            "CARTEDGE__AUTH__KEYS__0__SECRET",
            "fedcba9876543210fedcba9876543210",
        ),
    ];

    #[test]
    fn region_file_and_environment_layer_over_defaults() {
        let mut env = SECRETS.to_vec();
        env.push(("CARTEDGE__CART__MAX_LINES", "7"));
        env.push(("UNRELATED", "x"));
        let config = Config::load(&sources_with(""), env).unwrap();
        assert_eq!(config.region.id, "sg");
        assert_eq!(config.region.currency.as_str(), "SGD");
        assert_eq!(config.cart.max_lines, 7);
        assert_eq!(
            config.auth.keys[0].secret.expose(),
            "fedcba9876543210fedcba9876543210"
        );
    }

    #[test]
    fn the_read_sample_rate_defaults_to_one_percent_and_stays_within_0_and_1() {
        let config = Config::load(&sources_with(""), SECRETS).unwrap();
        assert_eq!(config.log.read_sample_rate, 0.01);
        for rate in ["1.5", "-0.1", "nan"] {
            let overlay = format!("[log]\nread_sample_rate = {rate}\n");
            let error = Config::load(&sources_with(&overlay), SECRETS).unwrap_err();
            assert!(
                error.to_string().contains("log.read_sample_rate"),
                "{rate}: {error}"
            );
        }
        let overlay = "[log]\nread_sample_rate = 1.0\n";
        assert!(Config::load(&sources_with(overlay), SECRETS).is_ok());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = Config::load(&sources_with("[cart]\nmax_linez = 3\n"), SECRETS).unwrap_err();
        assert!(error.to_string().contains("max_linez"), "{error}");
    }

    #[test]
    fn a_missing_session_secret_fails_loading_with_the_key_named() {
        let error = Config::load(&sources_with(""), Vec::<(String, String)>::new()).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("auth.session_secret"), "{text}");
        // Key material is preflight's (see `preflight::tests`).
        assert!(!text.contains("auth.keys[0]"), "{text}");
    }

    #[test]
    fn redacted_output_never_contains_secrets() {
        let config = Config::load(&sources_with(""), SECRETS).unwrap();
        let printed = config.redacted_toml();
        assert!(printed.contains("<redacted>"));
        assert!(!printed.contains("0123456789abcdef"));
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn peer_catalogs_are_overridden_from_the_environment_and_redacted() {
        let mut env = SECRETS.to_vec();
        env.push((
            "CARTEDGE__DATABASE__PEER_CATALOGS__TH",
            "host=th-replica password=pw",
        ));
        env.push(("CARTEDGE__DATABASE__PEER_CATALOGS__ZZ", "host=zz"));
        let config = Config::load(&sources_with(""), env).unwrap();
        let peers = &config.database.peer_catalogs;
        assert_eq!(peers["th"].expose(), "host=th-replica password=pw");
        assert_eq!(
            peers["zz"].expose(),
            "host=zz",
            "an unknown region is preflight's"
        );
        assert!(peers["id"].expose().contains("pg-id-1-replica.sg."));
        let printed = config.redacted_toml();
        assert!(!printed.contains("th-replica"), "{printed}");
        assert!(!printed.contains("pg-id-1-replica"), "{printed}");
    }

    #[test]
    fn a_numeric_looking_secret_stays_a_string() {
        let mut env = SECRETS.to_vec();
        env[0].1 = "12345678901234567890123456789012";
        let config = Config::load(&sources_with(""), env).unwrap();
        assert_eq!(
            config.auth.session_secret.expose(),
            "12345678901234567890123456789012"
        );
    }

    #[test]
    fn configuration_is_a_leaf_that_imports_only_the_domain() {
        let needle = concat!("crate", "::");
        for (number, line) in include_str!("config.rs").lines().enumerate() {
            if let Some(at) = line.find(needle) {
                assert!(
                    line[at + needle.len()..].starts_with("domain"),
                    "config.rs:{}: {line}",
                    number + 1
                );
            }
        }
    }

    #[test]
    fn keys_that_go_together_are_checked_together() {
        let half_tls = "[tls]\nca_file = \"ca.pem\"\n";
        let error = Config::load(&sources_with(half_tls), SECRETS).unwrap_err();
        assert!(error.to_string().contains("must all be set"), "{error}");
        let same_port =
            "[server]\nlisten = \"127.0.0.1:7000\"\nadmin_listen = \"127.0.0.1:7000\"\n";
        let error = Config::load(&sources_with(same_port), SECRETS).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("server.admin_listen 127.0.0.1:7000 is also server.listen"),
            "{error}"
        );
        let any_port = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";
        assert!(Config::load(&sources_with(any_port), SECRETS).is_ok());
    }

    #[test]
    fn sentinels_need_a_master_name_and_leave_the_url_at_its_default() {
        let sentinels = "sentinels = [\"redis://127.0.0.1:26379\"]\n";
        let without_name = format!("[redis]\nurl = \"{DEFAULT_REDIS_URL}\"\n{sentinels}");
        let error = Config::load(&sources_with(&without_name), SECRETS).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("redis.sentinels and redis.master_name must both be set"),
            "{error}"
        );
        let name_only = format!("[redis]\nurl = \"{DEFAULT_REDIS_URL}\"\nmaster_name = \"sg\"\n");
        assert!(Config::load(&sources_with(&name_only), SECRETS).is_err());
        let both =
            format!("[redis]\nurl = \"{DEFAULT_REDIS_URL}\"\n{sentinels}master_name = \"sg\"\n");
        let config = Config::load(&sources_with(&both), SECRETS).unwrap();
        assert!(config.redis.uses_sentinels());
        assert!(config.redacted_toml().contains("<redacted>"));
        let ambiguous =
            format!("[redis]\nurl = \"redis://10.0.0.7:6379/\"\n{sentinels}master_name = \"sg\"\n");
        let error = Config::load(&sources_with(&ambiguous), SECRETS).unwrap_err();
        assert!(
            error.to_string().contains("the sentinels name the master"),
            "{error}"
        );
    }

    #[test]
    fn parking_has_defaults_and_its_max_age_stays_below_the_idempotency_retention() {
        let defaults = Config::load(&sources_with(""), SECRETS).unwrap();
        assert!(defaults.parking.enabled);
        assert_eq!(defaults.parking.max_per_owner, 50);
        assert_eq!(defaults.parking.max_age.0, Duration::from_secs(6 * 3600));
        for (overlay, problem) in [
            (
                "[parking]\nmax_age = \"24h\"\n",
                "parking.max_age must be at least 1m and shorter than idempotency.retention",
            ),
            (
                "[parking]\nmax_per_owner = 0\n",
                "parking.max_per_owner must be within 1..=10000",
            ),
            (
                "[parking]\ninterval = \"10ms\"\n",
                "parking.interval must be at least 100ms",
            ),
        ] {
            let error = Config::load(&sources_with(overlay), SECRETS).unwrap_err();
            assert!(error.to_string().contains(problem), "{overlay}: {error}");
        }
        let longer = "[idempotency]\nretention = \"48h\"\n[parking]\nmax_age = \"24h\"\n";
        assert!(Config::load(&sources_with(longer), SECRETS).is_ok());
    }

    #[test]
    fn stale_merges_and_edges_per_region_have_defaults_and_bounds() {
        let defaults = Config::load(&sources_with(""), SECRETS).unwrap();
        assert_eq!(
            defaults.janitor.stale_merge_after.0,
            Duration::from_secs(300)
        );
        assert_eq!(defaults.rate_limit.edges, 1);
        let eager = "[janitor]\nstale_merge_after = \"0s\"\n";
        let error = Config::load(&sources_with(eager), SECRETS).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("janitor.stale_merge_after must be at least 1s"),
            "{error}"
        );
        let none = "[rate_limit]\nedges = 0\n";
        let error = Config::load(&sources_with(none), SECRETS).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("rate_limit.edges must be within 1..=1000"),
            "{error}"
        );
    }

    #[test]
    fn the_defaults_file_sets_the_default_redis_url() {
        let defaults: toml::Table = toml::from_str(include_str!("../config/default.toml")).unwrap();
        assert_eq!(defaults["redis"]["url"].as_str(), Some(DEFAULT_REDIS_URL));
    }

    #[test]
    fn durations_are_human_strings() {
        let config = Config::load(&sources_with("[redis]\nttl = \"90m\"\n"), SECRETS).unwrap();
        assert_eq!(config.redis.ttl.0, Duration::from_secs(90 * 60));
        let error = Config::load(&sources_with("[redis]\nttl = \"soon\"\n"), SECRETS).unwrap_err();
        assert!(error.to_string().contains("invalid duration"), "{error}");
    }
}
