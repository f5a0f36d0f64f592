//! The edge's Prometheus registry and its typed metric families, grouped by the module that
//! updates them (`http` for `api`, `cache`/`db`/`lifecycle` for `store` and `app`, `forward`,
//! `limits`, `edge`). Every name carries the `cartedge_` prefix; labels are bounded sets
//! (route templates, methods, status codes, shards, peers, tiers), never an owner, item, token or
//! raw path.
//!
//! This module only defines and exposes metrics: it imports nothing from the crate, does no
//! I/O and knows no request. The families are cheap clones of shared atomics, so each module
//! keeps the handles it updates (pre-resolved where the labels are known up front, so the hot
//! path is an atomic add). The admin `/metrics` handler calls [`Metrics::encode`].

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The prefix of every metric name.
pub const PREFIX: &str = "cartedge";

/// Latency buckets in seconds, 0.5 ms to 5 s: a cache hit lands in the first few, a forwarded
/// write across regions in the middle, a timeout in the last.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn histogram_family<S: Clone + std::hash::Hash + Eq>() -> HistogramFamily<S> {
    Family::new_with_constructor(latency_histogram)
}

/// A float gauge (seconds, averages).
pub type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub region: String,
    pub ring_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardRoleLabels {
    pub shard: String,
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub shard: String,
    pub role: &'static str,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerOutcomeLabels {
    pub peer: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierClassLabels {
    pub tier: &'static str,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimiterLabels {
    pub limiter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The label for a request whose path no route matches (404, and 405 for a path routed for
/// other methods), so the raw path never becomes a label.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// A method as a bounded label: the standard ones by name, anything else `other`.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Per-request metrics, updated once per request at the end of `api::handle`.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
}

impl HttpMetrics {
    fn new(registry: &mut Registry) -> HttpMetrics {
        let metrics = HttpMetrics {
            requests: Family::default(),
            duration: histogram_family(),
        };
        registry.register(
            "http_requests",
            "Requests answered, by route template, method and status code",
            metrics.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's head to its response, by route template and method",
            metrics.duration.clone(),
        );
        metrics
    }

    /// Counts one answered request. The labels are static, so this allocates nothing once a
    /// (route, method, status) has been seen.
    pub fn observe(
        &self,
        route: &'static str,
        method: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
        self.duration
            .get_or_create(&RouteLabels { route, method })
            .observe(elapsed.as_secs_f64());
    }
}

/// Cache requests by operation and result, pre-resolved so the cache-hit path is one atomic
/// add. Reads are `hit`, `miss`, `error` or `skipped` (the owner's or the whole cache's
/// entries are distrusted); writes (`fill`, `store`, `fence`) are `ok`, `refused` (a newer
/// version was there), `error` or `skipped`.
#[derive(Clone)]
pub struct CacheMetrics {
    family: Family<CacheLabels, Counter>,
    pub read_hit: Counter,
    pub read_miss: Counter,
    pub read_skipped: Counter,
    pub fill_ok: Counter,
    pub fill_refused: Counter,
    pub fill_skipped: Counter,
    /// Reads the near cache answered (also counted as read hits).
    pub near_hit: Counter,
}

impl CacheMetrics {
    fn new(registry: &mut Registry) -> CacheMetrics {
        let family: Family<CacheLabels, Counter> = Family::default();
        registry.register(
            "cache_requests",
            "Cache requests by operation (read, fill, store, fence; near: reads the in-process near cache answered) and result",
            family.clone(),
        );
        let get = |op, result| family.get_or_create(&CacheLabels { op, result }).clone();
        CacheMetrics {
            read_hit: get("read", "hit"),
            read_miss: get("read", "miss"),
            read_skipped: get("read", "skipped"),
            fill_ok: get("fill", "ok"),
            fill_refused: get("fill", "refused"),
            fill_skipped: get("fill", "skipped"),
            near_hit: get("near", "hit"),
            family,
        }
    }

    /// Counts one cache request; for the rarer outcomes (errors, writes).
    pub fn count(&self, op: &'static str, result: &'static str) {
        self.family.get_or_create(&CacheLabels { op, result }).inc();
    }
}

/// Database timings and state, per shard and role (`primary` or `replica`).
#[derive(Clone)]
pub struct DbMetrics {
    pub query_duration: HistogramFamily<ShardRoleLabels>,
    pub pool_connections: Family<PoolLabels, Gauge>,
    pub replica_lag: Family<ShardLabels, FloatGauge>,
    pub replica_fallbacks: Counter,
    pub outbox_backlog: Family<ShardLabels, Gauge>,
    pub carts_active: Family<ShardLabels, Gauge>,
    pub cart_lines_avg: Family<ShardLabels, FloatGauge>,
}

impl DbMetrics {
    fn new(registry: &mut Registry) -> DbMetrics {
        let metrics = DbMetrics {
            query_duration: histogram_family(),
            pool_connections: Family::default(),
            replica_lag: Family::default(),
            replica_fallbacks: Counter::default(),
            outbox_backlog: Family::default(),
            carts_active: Family::default(),
            cart_lines_avg: Family::default(),
        };
        registry.register(
            "db_query_duration_seconds",
            "Database round trips the edge times (cart reads, write transactions from begin to commit), by shard and role",
            metrics.query_duration.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Connections in each shard's pools, by role and state (idle, in_use)",
            metrics.pool_connections.clone(),
        );
        registry.register(
            "replica_lag_seconds",
            "Age of the newest heartbeat the shard's replica in this region has replayed; absent while unknown",
            metrics.replica_lag.clone(),
        );
        registry.register(
            "replica_fallbacks",
            "Reads sent to the primary because the replica was unavailable",
            metrics.replica_fallbacks.clone(),
        );
        registry.register(
            "outbox_backlog",
            "Events waiting in a home shard's outbox (counted up to 100000)",
            metrics.outbox_backlog.clone(),
        );
        registry.register(
            "carts_active",
            "Carts of a home shard updated in the last 24 hours and not purged (counted up to 100000)",
            metrics.carts_active.clone(),
        );
        registry.register(
            "cart_lines_avg",
            "Average number of lines of the active carts of a home shard",
            metrics.cart_lines_avg.clone(),
        );
        metrics
    }

    /// The histogram for one shard and role (resolve once per task, not per query, where the
    /// shard is fixed).
    pub fn query_timer(&self, shard: &str, role: &'static str) -> Histogram {
        self.query_duration
            .get_or_create(&ShardRoleLabels {
                shard: shard.to_string(),
                role,
            })
            .clone()
    }
}

/// Edge-to-edge forwarding, per peer region.
#[derive(Clone)]
pub struct ForwardMetrics {
    pub requests: Family<PeerOutcomeLabels, Counter>,
    pub duration: HistogramFamily<PeerLabels>,
    pub breaker_open: Family<PeerLabels, Gauge>,
    pub retries: Family<PeerLabels, Counter>,
    pub invalidations: Family<OutcomeLabels, Counter>,
}

impl ForwardMetrics {
    fn new(registry: &mut Registry) -> ForwardMetrics {
        let metrics = ForwardMetrics {
            requests: Family::default(),
            duration: histogram_family(),
            breaker_open: Family::default(),
            retries: Family::default(),
            invalidations: Family::default(),
        };
        registry.register(
            "forward_requests",
            "Requests sent to another region's edge, by peer and outcome (ok, error, timeout, too_large, breaker_open)",
            metrics.requests.clone(),
        );
        registry.register(
            "forward_duration_seconds",
            "Time of each request sent to another region's edge, retry included",
            metrics.duration.clone(),
        );
        registry.register(
            "forward_breaker_open",
            "1 while the circuit breaker to a peer is open",
            metrics.breaker_open.clone(),
        );
        registry.register(
            "forward_retries",
            "Forwards retried once on a fresh connection",
            metrics.retries.clone(),
        );
        registry.register(
            "invalidations",
            "Cross-region cache invalidation batches by outcome (delivered, refused, failed per peer; dropped when the queue was full)",
            metrics.invalidations.clone(),
        );
        metrics
    }

    pub fn invalidation(&self, outcome: &'static str) {
        self.invalidations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// Rate limiting: refusals by tier and class, live keys per limiter.
#[derive(Clone)]
pub struct LimitMetrics {
    pub limited: Family<TierClassLabels, Counter>,
    pub keys: Family<LimiterLabels, Gauge>,
    pub overflows: Counter,
}

impl LimitMetrics {
    fn new(registry: &mut Registry) -> LimitMetrics {
        let metrics = LimitMetrics {
            limited: Family::default(),
            keys: Family::default(),
            overflows: Counter::default(),
        };
        registry.register(
            "rate_limited",
            "Requests refused with 429, by tier (user, guest, service, anonymous) and class (read, write, checkout, any)",
            metrics.limited.clone(),
        );
        registry.register(
            "rate_limiter_keys",
            "Keys held by each rate limiter",
            metrics.keys.clone(),
        );
        registry.register(
            "rate_limiter_overflows",
            "Times a limiter was cleared because it held more than rate_limit.max_keys keys",
            metrics.overflows.clone(),
        );
        metrics
    }
}

/// What the janitor and the outbox relay did since start (names kept from the first page).
#[derive(Clone, Default)]
pub struct LifecycleMetrics {
    pub janitor_passes: Counter,
    pub janitor_failures: Counter,
    pub janitor_skipped_shards: Counter,
    pub carts_purged: Counter,
    pub tombstones_deleted: Counter,
    pub idempotency_keys_purged: Counter,
    pub merge_records_purged: Counter,
    pub reservations_released: Counter,
    pub orders_expired: Counter,
    /// Stale merges the janitor settled: `outcome` is `finished` or `rolled_back`.
    pub merges_settled_finished: Counter,
    pub merges_settled_rolled_back: Counter,
    pub events_published: Counter,
    pub relay_failures: Counter,
}

impl LifecycleMetrics {
    fn new(registry: &mut Registry) -> LifecycleMetrics {
        let metrics = LifecycleMetrics::default();
        for (name, help, counter) in [
            (
                "janitor_passes",
                "Janitor passes started",
                &metrics.janitor_passes,
            ),
            (
                "janitor_failures",
                "Janitor passes that failed",
                &metrics.janitor_failures,
            ),
            (
                "janitor_skipped_shards",
                "Shards skipped because another janitor held them",
                &metrics.janitor_skipped_shards,
            ),
            (
                "janitor_carts_purged",
                "Inactive carts purged",
                &metrics.carts_purged,
            ),
            (
                "janitor_tombstones_deleted",
                "Purged-cart tombstones deleted",
                &metrics.tombstones_deleted,
            ),
            (
                "janitor_idempotency_keys_purged",
                "Idempotency keys purged",
                &metrics.idempotency_keys_purged,
            ),
            (
                "janitor_merge_records_purged",
                "Merge records purged",
                &metrics.merge_records_purged,
            ),
            (
                "janitor_reservations_released",
                "Expired stock reservations released",
                &metrics.reservations_released,
            ),
            (
                "janitor_orders_expired",
                "Unpaid orders expired",
                &metrics.orders_expired,
            ),
            (
                "events_published",
                "Outbox events published to the stream",
                &metrics.events_published,
            ),
            (
                "events_relay_failures",
                "Outbox relay passes that failed",
                &metrics.relay_failures,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        // Both series exist from start, so a rate over them is never absent.
        let settled: Family<OutcomeLabels, Counter> = Family::default();
        let finished = settled
            .get_or_create(&OutcomeLabels {
                outcome: "finished",
            })
            .clone();
        let rolled_back = settled
            .get_or_create(&OutcomeLabels {
                outcome: "rolled_back",
            })
            .clone();
        registry.register(
            "janitor_merges_resolved",
            "Stale merges the janitor settled, by outcome (finished: the user cart had the lines; rolled_back: the guest cart unfrozen)",
            settled,
        );
        LifecycleMetrics {
            merges_settled_finished: finished,
            merges_settled_rolled_back: rolled_back,
            ..metrics
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

/// Adds parked while their home region was unreachable: the region's backlog (read from its
/// parking shard by the reconciler, so every edge of a region reports the same figure) and what
/// this edge parked, applied and rejected.
#[derive(Clone)]
pub struct ParkingMetrics {
    /// `pending` and `rejected` (not yet reported to their owner) rows.
    pub parked_writes: Family<StateLabels, Gauge>,
    pub parked: Counter,
    pub replayed: Counter,
    pub refused: Counter,
    pub applied: Counter,
    pub rejected: Counter,
    pub expired: Counter,
    /// Reads that laid parked adds over a cart without knowing which of them it already held.
    pub overlay_unsure: Counter,
}

impl ParkingMetrics {
    fn new(registry: &mut Registry) -> ParkingMetrics {
        let parked_writes: Family<StateLabels, Gauge> = Family::default();
        registry.register(
            "parked_writes",
            "Parked adds in this region by state (pending, rejected), as of the reconciler's last pass (counted up to 100000)",
            parked_writes.clone(),
        );
        let outcomes: Family<OutcomeLabels, Counter> = Family::default();
        registry.register(
            "parked_write_outcomes",
            "Parked adds by outcome: parked, replayed (a retry of a parked key), refused (a cap reached: 503), applied, rejected (home refused), expired (parking.max_age)",
            outcomes.clone(),
        );
        let overlay_unsure = Counter::default();
        registry.register(
            "parked_overlay_unsure",
            "Reads that showed parked adds as pending without knowing whether the cart shown already held them (the home's records unreadable): such a read may show an add twice",
            overlay_unsure.clone(),
        );
        let get = |outcome| outcomes.get_or_create(&OutcomeLabels { outcome }).clone();
        ParkingMetrics {
            parked: get("parked"),
            replayed: get("replayed"),
            refused: get("refused"),
            applied: get("applied"),
            rejected: get("rejected"),
            expired: get("expired"),
            parked_writes,
            overlay_unsure,
        }
    }
}

/// Edge-wide counters of the request path.
#[derive(Clone, Default)]
pub struct EdgeMetrics {
    pub topology_mismatches: Counter,
    pub min_version_beyond_cart: Counter,
    pub health_probes: Counter,
    pub idempotent_replays: Counter,
    /// Carts this edge moved to the shard the ring now places them on (`api::moves`).
    pub carts_moved: Counter,
    /// Mirrors the log writer's process-wide count (see [`EdgeMetrics::mirror_dropped_lines`]).
    log_lines_dropped: Counter,
}

impl EdgeMetrics {
    fn new(registry: &mut Registry) -> EdgeMetrics {
        let metrics = EdgeMetrics::default();
        registry.register(
            "topology_mismatches",
            "Edge-to-edge requests refused for another ring",
            metrics.topology_mismatches.clone(),
        );
        registry.register(
            "min_version_beyond_cart",
            "Reads whose Cart-Min-Version was above the home primary's cart",
            metrics.min_version_beyond_cart.clone(),
        );
        registry.register(
            "health_probes",
            "Background probes of PostgreSQL and Redis for /health",
            metrics.health_probes.clone(),
        );
        registry.register(
            "idempotent_replays",
            "Writes answered with the stored answer of an earlier request with the same Idempotency-Key",
            metrics.idempotent_replays.clone(),
        );
        registry.register(
            "carts_moved",
            "Carts moved from the shard of the previous ring to the shard of the current one",
            metrics.carts_moved.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log writer could not keep up",
            metrics.log_lines_dropped.clone(),
        );
        metrics
    }

    /// Brings the dropped-log-lines counter up to `total`, the log writer's count so far (a
    /// counter only grows, and so does the writer's count).
    pub fn mirror_dropped_lines(&self, total: u64) {
        let seen = self.log_lines_dropped.get();
        if total > seen {
            self.log_lines_dropped.inc_by(total - seen);
        }
    }
}

macro_rules! unregistered_default {
    ($($group:ident),*) => {$(
        /// A set not registered anywhere (unit tests, tools).
        impl Default for $group {
            fn default() -> Self {
                $group::new(&mut Registry::default())
            }
        }
    )*};
}

unregistered_default!(
    HttpMetrics,
    CacheMetrics,
    DbMetrics,
    ForwardMetrics,
    LimitMetrics
);

/// The exposition format a scraper asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0` (what Prometheus asks for first).
    OpenMetrics,
    /// `text/plain; version=0.0.4`, the classic format (`promtool check metrics`, curl).
    Text,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics only when named.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The registry and every family of one edge (one per `App`, so several edges in a process
/// keep their own numbers).
pub struct Metrics {
    registry: Registry,
    /// `cartedge_build_info`: one series, replaced when the edge reloads another ring.
    build_info: Family<BuildLabels, Gauge>,
    build: std::sync::Mutex<BuildLabels>,
    pub http: HttpMetrics,
    pub cache: CacheMetrics,
    pub db: DbMetrics,
    pub forward: ForwardMetrics,
    pub limits: LimitMetrics,
    pub lifecycle: LifecycleMetrics,
    pub edge: EdgeMetrics,
    pub parking: ParkingMetrics,
}

impl Metrics {
    /// Registers every family and sets `cartedge_build_info` to 1.
    pub fn new(build: BuildLabels) -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let info: Family<BuildLabels, Gauge> = Family::default();
        info.get_or_create(&build).set(1);
        registry.register(
            "build_info",
            "Always 1; the labels name the running build, region and ring",
            info.clone(),
        );
        Metrics {
            build_info: info,
            build: std::sync::Mutex::new(build),
            http: HttpMetrics::new(&mut registry),
            cache: CacheMetrics::new(&mut registry),
            db: DbMetrics::new(&mut registry),
            forward: ForwardMetrics::new(&mut registry),
            limits: LimitMetrics::new(&mut registry),
            lifecycle: LifecycleMetrics::new(&mut registry),
            edge: EdgeMetrics::new(&mut registry),
            parking: ParkingMetrics::new(&mut registry),
            registry,
        }
    }

    /// Names another ring version in `cartedge_build_info` (after a reload installed it).
    pub fn set_ring_version(&self, ring_version: String) {
        let mut build = self.build.lock().unwrap_or_else(|e| e.into_inner());
        build.ring_version = ring_version;
        self.build_info.clear();
        self.build_info.get_or_create(&build).set(1);
    }

    /// The exposition of every family. Gauges read at scrape time are refreshed by the caller
    /// (`App::metrics_text`) first.
    pub fn encode(&self, format: Format) -> String {
        let mut open_metrics = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut open_metrics, &self.registry);
        match format {
            Format::OpenMetrics => open_metrics,
            Format::Text => to_classic_text(&open_metrics),
        }
    }
}

/// OpenMetrics → the classic text format: counters are named with their `_total` suffix in
/// `# HELP`/`# TYPE`, and `# UNIT` and `# EOF` are dropped. Samples are the same in both.
fn to_classic_text(open_metrics: &str) -> String {
    let mut text = String::with_capacity(open_metrics.len());
    let mut help: Option<&str> = None;
    for line in open_metrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(pending) = help.replace(rest) {
                push_line(&mut text, "# HELP ", pending, "");
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some(pending) = help.take() {
                let (help_name, help_text) = pending.split_once(' ').unwrap_or((pending, ""));
                text.push_str("# HELP ");
                text.push_str(help_name);
                text.push_str(if help_name == name { suffix } else { "" });
                text.push(' ');
                text.push_str(help_text);
                text.push('\n');
            }
            text.push_str("# TYPE ");
            text.push_str(name);
            text.push_str(suffix);
            text.push(' ');
            text.push_str(kind);
            text.push('\n');
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(pending) = help.take() {
            push_line(&mut text, "# HELP ", pending, "");
        }
        push_line(&mut text, "", line, "");
    }
    if let Some(pending) = help {
        push_line(&mut text, "# HELP ", pending, "");
    }
    text
}

fn push_line(text: &mut String, prefix: &str, body: &str, suffix: &str) {
    text.push_str(prefix);
    text.push_str(body);
    text.push_str(suffix);
    text.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(BuildLabels {
            version: "1.2.3".into(),
            region: "eu".into(),
            ring_version: "7".into(),
        })
    }

    #[test]
    fn classic_text_names_counters_with_their_total_suffix() {
        let metrics = metrics();
        metrics.edge.health_probes.inc();
        metrics
            .http
            .observe("/cart", "GET", 200, Duration::from_millis(3));
        let text = metrics.encode(Format::Text);
        assert!(text.contains("# TYPE cartedge_health_probes_total counter\n"));
        assert!(text.contains("# HELP cartedge_health_probes_total Background probes"));
        assert!(text.contains("\ncartedge_health_probes_total 1\n"));
        assert!(text.contains(
            "cartedge_http_requests_total{route=\"/cart\",method=\"GET\",status=\"200\"} 1\n"
        ));
        assert!(text.contains("# TYPE cartedge_http_request_duration_seconds histogram\n"));
        assert!(text.contains(
            "cartedge_http_request_duration_seconds_bucket{le=\"0.005\",route=\"/cart\",method=\"GET\"} 1\n"
        ) || text.contains(
            "cartedge_http_request_duration_seconds_bucket{route=\"/cart\",method=\"GET\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "cartedge_build_info{version=\"1.2.3\",region=\"eu\",ring_version=\"7\"} 1\n"
        ));
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));
    }

    #[test]
    fn open_metrics_is_served_only_when_asked_for() {
        assert_eq!(Format::from_accept(None), Format::Text);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Text);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert!(metrics().encode(Format::OpenMetrics).ends_with("# EOF\n"));
    }

    #[test]
    fn latency_buckets_span_half_a_millisecond_to_five_seconds() {
        assert_eq!(LATENCY_BUCKETS.first(), Some(&0.0005));
        assert_eq!(LATENCY_BUCKETS.last(), Some(&5.0));
        assert!(LATENCY_BUCKETS.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
