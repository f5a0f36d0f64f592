//! Wiring: builds the edge's shared state from configuration. No request logic lives here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::mpsc;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::domain::ids::{OwnerKey, RegionId};
use crate::forward::{tls, Forwarder, Settings};
use crate::limits::RateLimits;
use crate::metrics::{BuildLabels, Format, LifecycleMetrics, Metrics};
use crate::pki::load_certified_key;
use crate::pki::public::PublicTls;
use crate::store::Store;
use crate::topology::{Current, Topology};

/// How often missed cache invalidations are retried.
const CACHE_REPAIR_PERIOD: Duration = Duration::from_millis(250);

/// Parked adds one reconciler pass reads (a full batch is followed by another pass at once).
const RECONCILE_BATCH: i64 = 500;

/// How often a write waits for an owner's parked add another task is delivering, and how long
/// each time (bounded: about a second in all).
const FLUSH_ATTEMPTS: usize = 20;
const FLUSH_PAUSE: Duration = Duration::from_millis(50);

/// What became of one parked add sent home.
enum Delivery {
    Applied,
    Rejected,
    /// The home asked to retry (a concurrent request with its key, a merge, an outage there).
    Wait,
    /// The home region could not be reached.
    Unreachable,
}

/// What one reconciler pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReconcilePass {
    pub applied: u64,
    pub rejected: u64,
    /// The pass read a full batch: more may be waiting.
    pub full_batch: bool,
}

/// How often rate limiters drop idle keys.
const LIMITS_HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(10);

/// How often the dependencies are probed for `/health`: every caller shares the last probe,
/// so a flood of health checks costs the databases nothing.
const HEALTH_PERIOD: Duration = Duration::from_secs(1);

/// How often the business gauges and the outbox backlog are refreshed (one bounded query per
/// home shard each time).
const SHARD_GAUGES_PERIOD: Duration = Duration::from_secs(30);

/// How long a health probe waits for each dependency before calling it unavailable.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The dependencies' state at the last background probe.
#[derive(Debug, Clone)]
pub struct HealthStatus {
    pub redis: bool,
    /// With `redis.sentinels`: the master the cache uses (`host:port`), if one is known.
    pub redis_master: Option<String>,
    /// Each shard's primary (where homed here) and replica, as probed.
    pub shards: Vec<crate::store::ShardProbe>,
    /// Each peer region and whether its circuit breaker refuses requests now.
    pub peers: Vec<(String, bool)>,
    pub checked_at: chrono::DateTime<chrono::Utc>,
}

impl HealthStatus {
    /// Every primary homed here (or, homing none, every replica) answered.
    pub fn database(&self) -> bool {
        Store::databases_healthy(&self.shards)
    }

    /// Whether this edge can serve reads: its Redis or one of its replicas answered.
    pub fn can_serve_reads(&self) -> bool {
        self.redis || self.shards.iter().any(|shard| shard.replica)
    }
}

/// Why a stale merge homed partly elsewhere was not settled in this pass (logged; the next pass
/// asks again).
#[derive(Debug, thiserror::Error)]
enum SettleElsewhereError {
    #[error("shard {0} is not on the ring")]
    UnknownShard(String),
    #[error("region {0} is not reachable: no edge-to-edge TLS is configured")]
    NoForwarder(String),
    #[error(transparent)]
    Ask(#[from] crate::forward::settle::SettleError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Everything a request needs, shared by all connections.
pub struct App {
    pub config: Config,
    /// Swapped whole by [`App::reload`] (key rotation).
    pub auth: ArcSwap<Authenticator>,
    pub store: Arc<Store>,
    /// The ring and every region; another ring is installed by [`App::reload`].
    topology: Current,
    /// `Cart-Region`, pre-encoded once.
    pub region_header: HeaderValue,
    /// This region's id as every request's log lines carry it (shared, not copied per request).
    pub region_label: Arc<str>,
    /// Whether the public listener serves TLS (cookies get `Secure`).
    pub tls: bool,
    /// The public listener's TLS (certificate swapped by [`App::reload`]); None: plain HTTP.
    pub public_tls: Option<PublicTls>,
    /// The client to other regions' edges (None when no mutual TLS is configured).
    pub forwarder: Option<Arc<Forwarder>>,
    /// The internal listener's TLS (mutual) configuration.
    pub internal_tls: Option<Arc<rustls::ServerConfig>>,
    /// Cross-region cache invalidations to send after local commits.
    invalidations: Option<mpsc::Sender<crate::forward::invalidate::Queued>>,
    /// Invalidations queued, and those whose sending has finished (see
    /// [`App::settle_invalidations`]).
    invalidations_queued: AtomicU64,
    invalidations_done: Arc<AtomicU64>,
    /// Edge rate limits; swapped whole by [`App::reload`].
    pub limits: ArcSwap<RateLimits>,
    /// The registry behind the admin `/metrics` (every module keeps handles to its families).
    pub metrics: Arc<Metrics>,
    /// The last health probe (None until the first one ends); see [`App::health`].
    health: tokio::sync::watch::Sender<Option<HealthStatus>>,
    draining: AtomicBool,
}

/// The authenticator of `config`, minting guest sessions homed in `region` (this edge's) when it
/// homes shards. An edge of a region that homes none (it serves reads and forwards every write) mints
/// sessions without a home region, which the global ring places: no shard could hold a cart
/// homed there.
fn authenticator(
    config: &Config,
    region: &RegionId,
    topology: &Topology,
) -> anyhow::Result<Authenticator> {
    let auth = Authenticator::new(&config.auth, config.retention.guest_cart.0)
        .map_err(|e| anyhow::anyhow!("auth: {e}"))?;
    Ok(if topology.ring.homes_shards(region) {
        auth.minting_for(region.clone())
    } else {
        auth
    })
}

/// `cart-ring-moving-from` for the requests this edge forwards: the fingerprint of the ring its
/// ring moves from (None when settled).
fn ring_moving_from(topology: &Topology) -> Option<HeaderValue> {
    let previous = topology.ring.previous()?;
    HeaderValue::from_str(previous.fingerprint()).ok()
}

impl App {
    /// Builds the state and starts the cache repair task (so call it inside a Tokio runtime).
    /// Connects to nothing yet: pools and the cache connect lazily, so an edge starts while a
    /// dependency is down and reports it on `/health`.
    pub fn new(config: Config) -> anyhow::Result<Arc<App>> {
        let current = Current::new(Topology::load(&config)?);
        let topology = current.get();
        let auth = authenticator(&config, &config.region.id, topology)?;
        let metrics = Arc::new(Metrics::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
            region: config.region.id.to_string(),
            ring_version: topology.ring.spec().version.to_string(),
        }));
        let store = Arc::new(Store::new(&config, &metrics)?);
        store.cache.spawn_repair(CACHE_REPAIR_PERIOD);
        store.cache.spawn_tracking();
        store.spawn_heartbeats();
        let region_header = HeaderValue::from_str(&config.region.id)?;
        let region_label = Arc::from(config.region.id.as_str());
        let public_tls = match config.server.public_tls() {
            Some((cert, key)) => Some(PublicTls::load(cert, key)?),
            None => None,
        };
        let (forwarder, internal_tls) = if config.tls.is_configured() {
            let files = &config.tls;
            let client = tls::client_config(&files.cert_file, &files.key_file, &files.ca_file)?;
            let server = tls::server_config(&files.cert_file, &files.key_file, &files.ca_file)?;
            let peers = topology
                .regions
                .values()
                .filter(|peer| peer.id != config.region.id)
                .map(|peer| (peer.id.as_str(), peer.internal_url.as_str()));
            let settings = Settings {
                timeout: config.forward.timeout.0,
                connect_timeout: config.forward.connect_timeout.0,
                breaker_failures: config.forward.breaker_failures,
                breaker_cooldown: config.forward.breaker_cooldown.0,
                ring_moving_from: ring_moving_from(topology),
            };
            let forwarder = Arc::new(Forwarder::new(
                peers,
                client,
                settings,
                metrics.forward.clone(),
            )?);
            (Some(forwarder), Some(Arc::new(server)))
        } else {
            (None, None)
        };
        let invalidations_done = Arc::new(AtomicU64::new(0));
        let invalidations = forwarder.as_ref().map(|forwarder| {
            let (sender, receiver) = mpsc::channel(config.forward.invalidation_queue);
            let peers: Vec<String> = topology
                .regions
                .keys()
                .filter(|id| **id != config.region.id)
                .map(|id| id.to_string())
                .collect();
            tokio::spawn(crate::forward::invalidate::run(
                forwarder.clone(),
                peers,
                config.region.id.to_string(),
                current.clone(),
                receiver,
                invalidations_done.clone(),
            ));
            sender
        });
        let limits = Arc::new(RateLimits::new(&config.rate_limit, &metrics.limits)?);
        limits.spawn_housekeeping(LIMITS_HOUSEKEEPING_PERIOD);
        Ok(Arc::new(App {
            limits: ArcSwap::new(limits),
            config,
            auth: ArcSwap::from_pointee(auth),
            store,
            topology: current,
            region_header,
            region_label,
            tls: public_tls.is_some(),
            public_tls,
            forwarder,
            internal_tls,
            invalidations,
            invalidations_queued: AtomicU64::new(0),
            invalidations_done,
            metrics,
            health: tokio::sync::watch::Sender::new(None),
            draining: AtomicBool::new(false),
        }))
        .inspect(|app| app.spawn_background())
    }

    /// Starts the outbox relay (per shard homed here), the parked-add reconciler (in a region
    /// that homes a shard and forwards) and the janitor, as configured. They end when the app is
    /// dropped.
    fn spawn_background(self: &Arc<Self>) {
        let app = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(HEALTH_PERIOD);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(app) = app.upgrade() else { return };
                let status = app.probe_health().await;
                app.health.send_replace(Some(status));
            }
        });
        for shard in self.store.home_shards() {
            self.spawn_shard_tasks(shard);
        }
        if crate::store::parking::parking_shard(&self.store).is_some() && self.forwarder.is_some() {
            // Runs even with `parking.enabled` off, so adds parked before are still delivered.
            let app = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    let Some(app) = app.upgrade() else { return };
                    let pause = match app.reconcile_parked_once().await {
                        Ok(pass) if pass.full_batch && pass.applied + pass.rejected > 0 => {
                            Duration::ZERO
                        }
                        _ => app.config.parking.interval.0,
                    };
                    drop(app);
                    tokio::time::sleep(pause).await;
                }
            });
        }
        if self.config.janitor.enabled {
            let app = Arc::downgrade(self);
            let period = self.config.janitor.interval.0;
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    let Some(app) = app.upgrade() else { return };
                    let _ = app.janitor_once().await;
                }
            });
        }
    }

    /// The tasks of one shard homed here: its gauges and (`events.relay`) its outbox relay.
    /// They end when the app is dropped.
    fn spawn_shard_tasks(self: &Arc<Self>, shard: String) {
        let store = Arc::downgrade(&self.store);
        let gauged = shard.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SHARD_GAUGES_PERIOD);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(store) = store.upgrade() else { return };
                if let Err(error) = store.refresh_shard_gauges(&gauged).await {
                    tracing::debug!(shard = %gauged, %error, "shard gauges not refreshed");
                }
            }
        });
        if self.config.events.relay {
            let app = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    let Some(app) = app.upgrade() else { return };
                    let pause = match app.relay_once(&shard).await {
                        Ok(published) if published as i64 >= app.config.events.batch => {
                            Duration::ZERO
                        }
                        _ => app.config.events.interval.0,
                    };
                    drop(app);
                    tokio::time::sleep(pause).await;
                }
            });
        }
    }

    /// One reconciler pass over this region's parked adds (`store::parking`), if this edge gets
    /// the region's reconciler lock: the oldest pending adds, in arrival order, are sent to
    /// their home regions with their keys (`forward::parked`). An applied add fences this
    /// region's cache at the version home answered with, then is deleted; a refused one (or one
    /// older than `parking.max_age`) becomes a rejected record; an owner whose add must wait
    /// has its later adds wait too, and a home that cannot be reached is not tried again in
    /// this pass. Every edge then refreshes `cartedge_parked_writes`.
    pub async fn reconcile_parked_once(&self) -> Result<ReconcilePass, crate::store::StoreError> {
        use crate::store::parking;
        let Some(shard) = parking::parking_shard(&self.store) else {
            return Ok(ReconcilePass::default());
        };
        let mut pass = ReconcilePass::default();
        if let Some(lock) = parking::lock(&self.store, &shard).await? {
            let worked = self.reconcile_with(&shard, &lock).await;
            lock.finish().await;
            pass = worked?;
        }
        match parking::counts(&self.store, &shard).await {
            Ok((pending, rejected)) => {
                let gauge = &self.metrics.parking.parked_writes;
                use crate::metrics::StateLabels;
                gauge
                    .get_or_create(&StateLabels { state: "pending" })
                    .set(pending);
                gauge
                    .get_or_create(&StateLabels { state: "rejected" })
                    .set(rejected);
            }
            Err(error) => tracing::debug!(%shard, %error, "parked writes not counted"),
        }
        Ok(pass)
    }

    async fn reconcile_with(
        &self,
        shard: &str,
        lock: &crate::store::parking::Reconciling,
    ) -> Result<ReconcilePass, crate::store::StoreError> {
        use std::collections::HashSet;
        let adds = lock
            .pending(self.config.parking.max_age.0, RECONCILE_BATCH)
            .await?;
        let mut pass = ReconcilePass {
            full_batch: adds.len() as i64 >= RECONCILE_BATCH,
            ..ReconcilePass::default()
        };
        let mut waiting_owners: HashSet<&str> = HashSet::new();
        let mut unreachable: HashSet<&str> = HashSet::new();
        for add in &adds {
            if waiting_owners.contains(add.owner.as_str()) {
                continue;
            }
            if unreachable.contains(add.home.as_str()) && !add.expired {
                waiting_owners.insert(&add.owner);
                continue;
            }
            match self.deliver_parked(shard, add).await? {
                Delivery::Applied => pass.applied += 1,
                Delivery::Rejected => pass.rejected += 1,
                Delivery::Wait => {
                    waiting_owners.insert(&add.owner);
                }
                Delivery::Unreachable => {
                    waiting_owners.insert(&add.owner);
                    unreachable.insert(&add.home);
                }
            }
        }
        if pass.applied + pass.rejected > 0 {
            tracing::info!(
                applied = pass.applied,
                rejected = pass.rejected,
                "parked adds reconciled"
            );
        }
        Ok(pass)
    }

    /// Delivers one parked add to its home region (`forward::parked`), with its key, and
    /// records the outcome: applied (this region's cache fenced at the version home answered
    /// with, then the row deleted), refused or older than `parking.max_age` (a rejected
    /// record), or still waiting.
    async fn deliver_parked(
        &self,
        shard: &str,
        add: &crate::store::parking::ParkedAdd,
    ) -> Result<Delivery, crate::store::StoreError> {
        use crate::forward::parked::{self, Outcome};
        use crate::store::parking;
        let metrics = &self.metrics.parking;
        if add.expired {
            let reason = format!(
                "the home region {} could not be reached within {}; the add was not applied",
                add.home,
                humantime::format_duration(self.config.parking.max_age.0)
            );
            parking::rejected(&self.store, shard, add, "parked_too_long", &reason).await?;
            metrics.expired.inc();
            return Ok(Delivery::Rejected);
        }
        let Some(forwarder) = &self.forwarder else {
            return Ok(Delivery::Unreachable);
        };
        let request = parked::Request {
            owner: add.owner.clone(),
            idempotency_key: add.idempotency_key.clone(),
            home_shard: add.home_shard.clone(),
            body: add.body.clone(),
        };
        let sent = parked::send(
            forwarder,
            &add.home,
            &self.config.region.id,
            self.topology().ring.fingerprint(),
            &request,
        )
        .await;
        Ok(match sent {
            Ok(Outcome::Applied { version }) => {
                // Marked with the version, then fenced, then gone: a read here in between
                // shows the add on an older cart only, so never twice and never not at all.
                if let Some(version) = version {
                    parking::applying(&self.store, shard, add, version).await?;
                    self.store.cache.fence(&add.owner, version).await;
                }
                parking::applied(&self.store, shard, add).await?;
                metrics.applied.inc();
                Delivery::Applied
            }
            Ok(Outcome::Refused { code, message }) => {
                tracing::info!(owner = %add.owner, home = %add.home, %code, "parked add refused by its home region");
                parking::rejected(&self.store, shard, add, &code, &message).await?;
                metrics.rejected.inc();
                Delivery::Rejected
            }
            Ok(Outcome::Retry { status }) => {
                tracing::debug!(owner = %add.owner, home = %add.home, %status, "parked add to be retried");
                parking::attempted(&self.store, shard, add).await?;
                Delivery::Wait
            }
            Err(error) => {
                tracing::debug!(home = %add.home, %error, "home region still unreachable; parked adds wait");
                parking::attempted(&self.store, shard, add).await?;
                Delivery::Unreachable
            }
        })
    }

    /// Delivers `owner`'s parked adds before another write of that owner is relayed home, so
    /// the home region applies the owner's writes in the order this region accepted them.
    /// Returns whether none is left pending (false: the home region cannot take them now).
    /// An add another task is delivering at the same moment is waited for, briefly.
    pub async fn flush_parked(&self, owner: &OwnerKey) -> Result<bool, crate::store::StoreError> {
        use crate::store::parking;
        let Some(shard) = parking::parking_shard(&self.store) else {
            return Ok(true);
        };
        let max_age = self.config.parking.max_age.0;
        for _ in 0..FLUSH_ATTEMPTS {
            let adds = parking::pending_of(&self.store, &shard, owner, max_age).await?;
            let mut waiting = false;
            for add in &adds {
                match self.deliver_parked(&shard, add).await? {
                    Delivery::Applied | Delivery::Rejected => {}
                    Delivery::Wait => {
                        waiting = true;
                        break;
                    }
                    Delivery::Unreachable => return Ok(false),
                }
            }
            if !waiting {
                return Ok(true);
            }
            tokio::time::sleep(FLUSH_PAUSE).await;
        }
        Ok(false)
    }

    /// Publishes one batch of a shard's outbox; returns how many events went out.
    pub async fn relay_once(&self, shard: &str) -> Result<u64, crate::store::StoreError> {
        let events = &self.config.events;
        match crate::store::events::relay_once(
            &self.store,
            shard,
            &events.stream,
            events.max_len,
            events.batch,
        )
        .await
        {
            Ok(pass) => {
                self.metrics
                    .lifecycle
                    .events_published
                    .inc_by(pass.published);
                Ok(pass.published)
            }
            Err(error) => {
                self.metrics.lifecycle.relay_failures.inc();
                tracing::debug!(%shard, %error, "outbox relay pass failed; events stay in the outbox");
                Err(error)
            }
        }
    }

    /// One janitor pass (see `store::janitor`), with caches updated for the carts it purged or
    /// whose stale merge it settled, counters and a log line.
    pub async fn janitor_once(
        &self,
    ) -> Result<crate::store::janitor::JanitorReport, crate::store::StoreError> {
        let c: &LifecycleMetrics = &self.metrics.lifecycle;
        c.janitor_passes.inc();
        let crate::store::janitor::Pass {
            mut report,
            mut changed,
            elsewhere,
        } = match crate::store::janitor::run_once(&self.store, &self.config).await {
            Ok(pass) => pass,
            Err(error) => {
                c.janitor_failures.inc();
                tracing::warn!(%error, "janitor pass failed");
                return Err(error);
            }
        };
        for merge in &elsewhere {
            match self.settle_elsewhere(merge, &mut report).await {
                Ok(Some(cart)) => changed.push(cart),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, guest = %merge.guest, user = %merge.user, frozen_version = merge.version, "stale merge not settled; the next pass tries again");
                }
            }
        }
        for cart in &changed {
            self.store.cache.store_committed(cart).await;
            self.invalidate_elsewhere(&OwnerKey::from_stored(cart.owner.clone()), cart.version);
        }
        c.janitor_skipped_shards.inc_by(report.skipped.len() as u64);
        c.carts_purged.inc_by(report.carts_purged);
        c.tombstones_deleted.inc_by(report.tombstones_deleted);
        c.idempotency_keys_purged
            .inc_by(report.idempotency_keys_purged);
        c.merge_records_purged.inc_by(report.merge_records_purged);
        c.reservations_released.inc_by(report.reservations_released);
        c.orders_expired.inc_by(report.orders_expired);
        c.merges_settled_finished.inc_by(report.merges_finished);
        c.merges_settled_rolled_back
            .inc_by(report.merges_rolled_back);
        tracing::info!(
            shards = ?report.shards,
            skipped = ?report.skipped,
            carts_purged = report.carts_purged,
            tombstones_deleted = report.tombstones_deleted,
            idempotency_keys_purged = report.idempotency_keys_purged,
            merge_records_purged = report.merge_records_purged,
            reservations_released = report.reservations_released,
            orders_expired = report.orders_expired,
            merges_finished = report.merges_finished,
            merges_rolled_back = report.merges_rolled_back,
            "janitor pass"
        );
        Ok(report)
    }

    /// Settles a stale merge whose user cart is homed in another region: that region's edge
    /// decides (`forward::settle`), this one carries the decision out on the guest's shard.
    async fn settle_elsewhere(
        &self,
        merge: &crate::store::janitor::StaleMerge,
        report: &mut crate::store::janitor::JanitorReport,
    ) -> Result<Option<crate::domain::cart::StoredCart>, SettleElsewhereError> {
        use crate::forward::settle::{self, Decision};
        use crate::store::merge::Settled;
        let home = self
            .topology()
            .ring
            .spec()
            .shards
            .iter()
            .find(|shard| shard.id == merge.user_shard)
            .map(|shard| shard.home.to_string())
            .ok_or_else(|| SettleElsewhereError::UnknownShard(merge.user_shard.clone()))?;
        let forwarder = self
            .forwarder
            .as_ref()
            .ok_or_else(|| SettleElsewhereError::NoForwarder(home.clone()))?;
        let request = settle::Request {
            guest: merge.guest.as_str().to_string(),
            user: merge.user.clone(),
            version: merge.version,
            user_shard: merge.user_shard.clone(),
        };
        let decision = settle::ask(
            forwarder,
            &home,
            &self.config.region.id,
            self.topology().ring.fingerprint(),
            &request,
        )
        .await?;
        let settled = match decision {
            Decision::Applied => Settled::Applied,
            Decision::Fenced => Settled::Fenced,
        };
        Ok(crate::store::janitor::carry_out(&self.store, merge, settled, report).await?)
    }

    /// Probes PostgreSQL and Redis once (the background health task's step).
    async fn probe_health(&self) -> HealthStatus {
        self.metrics.edge.health_probes.inc();
        let (shards, redis) = tokio::join!(
            self.store.probe_shards(HEALTH_PROBE_TIMEOUT),
            self.store.cache.ping()
        );
        let peers = self
            .forwarder
            .as_ref()
            .map(|forwarder| forwarder.peer_states())
            .unwrap_or_default();
        HealthStatus {
            redis,
            redis_master: self.store.cache.master(),
            shards,
            peers,
            checked_at: chrono::Utc::now(),
        }
    }

    /// The dependencies' state as of the last background probe (at most about a second old);
    /// right after start, waits for the first probe.
    pub async fn health(&self) -> HealthStatus {
        let mut receiver = self.health.subscribe();
        let status = match receiver.wait_for(Option::is_some).await {
            Ok(status) => (*status).clone(),
            // The sender lives in `self`, so the channel cannot close while we hold `&self`.
            Err(_) => None,
        };
        match status {
            Some(status) => status,
            None => self.probe_health().await,
        }
    }

    /// The admin `/metrics` exposition: gauges read at scrape time (pool connections, limiter
    /// keys, breakers) are refreshed first, then every family is encoded.
    pub fn metrics_text(&self, format: Format) -> String {
        self.store.export_pool_connections();
        self.limits.load().export_keys();
        if let Some(forwarder) = &self.forwarder {
            forwarder.export_breakers();
        }
        self.metrics
            .edge
            .mirror_dropped_lines(crate::telemetry::dropped_lines());
        self.metrics.encode(format)
    }

    /// Applies what may change without a restart: verification keys (rotation), token
    /// settings, rate-limit quotas and tiers, the public listener's certificate (read again
    /// from its files), and another ring with the shards it adds (see
    /// [`App::next_topology`]). Everything else in `config` is ignored until a restart, and so
    /// is turning public TLS on or off (the listener's protocol is fixed at start-up). Every
    /// part is built first, so a bad file changes nothing.
    pub fn reload(self: &Arc<Self>, config: &Config) -> anyhow::Result<()> {
        let topology = self.next_topology(config)?;
        let auth = authenticator(
            config,
            &self.config.region.id,
            topology.as_ref().map_or(self.topology(), |(next, _)| next),
        )?;
        let limits = Arc::new(RateLimits::new(&config.rate_limit, &self.metrics.limits)?);
        let certificate = match (&self.public_tls, config.server.public_tls()) {
            (Some(_), Some((cert, key))) => Some(
                load_certified_key(cert, key).map_err(|e| anyhow::anyhow!("public TLS: {e:#}"))?,
            ),
            (None, None) => None,
            (running, _) => {
                tracing::warn!(
                    tls = running.is_some(),
                    "turning public TLS on or off needs a restart; keeping the listener as it is"
                );
                None
            }
        };
        limits.spawn_housekeeping(LIMITS_HOUSEKEEPING_PERIOD);
        if let Some((topology, shards)) = topology {
            self.install_topology(topology, shards);
        }
        self.auth.store(Arc::new(auth));
        self.limits.store(limits);
        if let (Some(tls), Some(certificate)) = (&self.public_tls, certificate) {
            tls.install(certificate);
            tracing::info!("public TLS certificate reloaded");
        }
        tracing::info!("keys and rate limits reloaded");
        Ok(())
    }

    /// The ring and every region this edge runs on now. A request places its owner once, where
    /// it starts, and keeps that placement across a reload.
    pub fn topology(&self) -> &'static Topology {
        self.topology.get()
    }

    /// The topology `config` describes when its ring differs from the running one (None: the
    /// same ring), checked as at start-up and against this edge, with the pools of the shards
    /// it adds built (not serving yet). A reload may add shards, re-weight them, set or remove
    /// `moving_from`; the region and the set of regions are fixed until a restart, and so are
    /// the shards an edge serves (none removed, none gaining or losing its primary here), and
    /// a region that homed no shard at start-up cannot start homing one (its guest sessions,
    /// parking and reservations are set up at start-up).
    fn next_topology(
        &self,
        config: &Config,
    ) -> anyhow::Result<Option<(Topology, crate::store::NewShards)>> {
        let running = self.topology();
        let next = Topology::load(config)?;
        if !running.ring_differs(&next) {
            return Ok(None);
        }
        if config.region.id != self.config.region.id {
            anyhow::bail!(
                "the region changed ({} → {}): that needs a restart",
                self.config.region.id,
                config.region.id
            );
        }
        if !next.regions.keys().eq(running.regions.keys()) {
            anyhow::bail!(
                "the set of regions changed: adding or removing a region needs a restart"
            );
        }
        let region = self.config.region.id.as_str();
        if next.ring.homes_shards(region) != running.ring.homes_shards(region) {
            anyhow::bail!(
                "region {region} would start or stop homing shards: that needs a restart"
            );
        }
        let shards = self.store.prepare_shards(config)?;
        Ok(Some((next, shards)))
    }

    /// Serves from `topology` (and the shards it adds) from the next request on: pools,
    /// heartbeats, the outbox relay and shard gauges of new home shards, the ring headers sent
    /// to other regions and `cartedge_build_info`.
    fn install_topology(self: &Arc<Self>, topology: Topology, shards: crate::store::NewShards) {
        let added = self.store.add_shards(shards);
        for shard in added.iter().filter(|shard| self.store.is_home(shard)) {
            self.spawn_shard_tasks(shard.clone());
        }
        let topology = self.topology.replace(topology);
        if let Some(forwarder) = &self.forwarder {
            forwarder.set_ring_moving_from(ring_moving_from(topology));
        }
        let spec = topology.ring.spec();
        self.metrics.set_ring_version(spec.version.to_string());
        tracing::info!(
            ring_version = spec.version,
            moving_from = spec.moving_from,
            fingerprint = topology.ring.fingerprint(),
            shards_added = ?added,
            "ring reloaded"
        );
    }

    /// Queues a committed version for the other regions' caches; never waits.
    pub fn invalidate_elsewhere(&self, owner: &OwnerKey, version: i64) {
        if let Some(queue) = &self.invalidations {
            match queue.try_send((
                owner.as_str().to_string(),
                version,
                crate::telemetry::current(),
            )) {
                Ok(()) => {
                    self.invalidations_queued.fetch_add(1, Ordering::AcqRel);
                }
                Err(_) => self.metrics.forward.invalidation("dropped"),
            }
        }
    }

    /// Waits (at most `within`) until every invalidation queued so far has been sent to the
    /// other regions (or failed): a command-line process that wrote carts (`ring move`, a
    /// janitor pass) calls it before exiting, or the fences it queued would die with it.
    /// True when everything was sent in time.
    pub async fn settle_invalidations(&self, within: Duration) -> bool {
        let queued = self.invalidations_queued.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.invalidations_done.load(Ordering::Acquire) >= queued {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    queued,
                    done = self.invalidations_done.load(Ordering::Acquire),
                    "cross-region cache invalidations still unsent at exit"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Turns readiness off (SIGTERM's first step).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Headers every response carries; `over_tls` when its connection is TLS. HSTS is never
    /// sent over plain HTTP, not even when a relayed answer from another edge carried it.
    pub fn decorate(&self, headers: &mut HeaderMap, over_tls: bool) {
        if over_tls {
            headers.insert(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static(crate::pki::public::HSTS),
            );
        } else {
            headers.remove(header::STRICT_TRANSPORT_SECURITY);
        }
        headers.insert(
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            HeaderName::from_static("x-frame-options"),
            HeaderValue::from_static("DENY"),
        );
    }
}
