//! Wiring: builds the edge's shared state from configuration. No request logic lives here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::mpsc;

use crate::api::auth::Authenticator;
use crate::api::limits::RateLimits;
use crate::config::Config;
use crate::domain::ids::OwnerKey;
use crate::forward::{tls, Forwarder, Settings};
use crate::server::tls::{load_certified_key, PublicTls};
use crate::store::Store;
use crate::topology::Topology;

/// How often missed cache invalidations are retried.
const CACHE_REPAIR_PERIOD: Duration = Duration::from_millis(250);

/// How often rate limiters drop idle keys.
const LIMITS_HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(10);

/// Everything a request needs, shared by all connections.
pub struct App {
    pub config: Config,
    /// Swapped whole by [`App::reload`] (key rotation).
    pub auth: ArcSwap<Authenticator>,
    pub store: Arc<Store>,
    /// The ring and every region.
    pub topology: Topology,
    /// `Cart-Region`, pre-encoded once.
    pub region_header: HeaderValue,
    /// Whether the public listener serves TLS (cookies get `Secure`).
    pub tls: bool,
    /// The public listener's TLS (certificate swapped by [`App::reload`]); None: plain HTTP.
    pub public_tls: Option<PublicTls>,
    /// The client to other regions' edges (None when no mutual TLS is configured).
    pub forwarder: Option<Arc<Forwarder>>,
    /// The internal listener's TLS (mutual) configuration.
    pub internal_tls: Option<Arc<rustls::ServerConfig>>,
    /// Cross-region cache invalidations to send after local commits.
    invalidations: Option<mpsc::Sender<(String, i64)>>,
    /// Edge rate limits; swapped whole by [`App::reload`].
    pub limits: ArcSwap<RateLimits>,
    /// Requests refused because the sender's ring differs from ours.
    pub topology_mismatches: AtomicU64,
    /// Invalidations dropped because the queue was full.
    pub invalidations_dropped: AtomicU64,
    draining: AtomicBool,
}

impl App {
    /// Builds the state and starts the cache repair task (so call it inside a Tokio runtime).
    /// Connects to nothing yet: pools and the cache connect lazily, so an edge starts while a
    /// dependency is down and reports it on `/health`.
    pub fn new(config: Config) -> anyhow::Result<Arc<App>> {
        let auth = Authenticator::new(&config.auth).map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        let topology = Topology::load(&config)?;
        let store = Arc::new(Store::new(&config)?);
        store.cache.spawn_repair(CACHE_REPAIR_PERIOD);
        store.spawn_heartbeats();
        let region_header = HeaderValue::from_str(&config.region.id)?;
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
            };
            let forwarder = Arc::new(Forwarder::new(peers, client, settings)?);
            (Some(forwarder), Some(Arc::new(server)))
        } else {
            (None, None)
        };
        let invalidations = forwarder.as_ref().map(|forwarder| {
            let (sender, receiver) = mpsc::channel(config.forward.invalidation_queue);
            let peers: Vec<String> = topology
                .regions
                .keys()
                .filter(|id| **id != config.region.id)
                .cloned()
                .collect();
            tokio::spawn(crate::forward::invalidate::run(
                forwarder.clone(),
                peers,
                config.region.id.clone(),
                topology.ring.fingerprint().to_string(),
                receiver,
            ));
            sender
        });
        let limits = Arc::new(RateLimits::new(&config.rate_limit)?);
        limits.spawn_housekeeping(LIMITS_HOUSEKEEPING_PERIOD);
        Ok(Arc::new(App {
            limits: ArcSwap::new(limits),
            config,
            auth: ArcSwap::from_pointee(auth),
            store,
            topology,
            region_header,
            tls: public_tls.is_some(),
            public_tls,
            forwarder,
            internal_tls,
            invalidations,
            topology_mismatches: AtomicU64::new(0),
            invalidations_dropped: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        }))
    }

    /// Applies what may change without a restart: verification keys (rotation), token
    /// settings, rate-limit quotas and tiers, and the public listener's certificate (read
    /// again from its files). Everything else in `config` is ignored until a restart, and so is
    /// turning public TLS on or off (the listener's protocol is fixed at start-up). Every part
    /// is built first, so a bad file changes nothing.
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        let auth = Authenticator::new(&config.auth).map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        let limits = Arc::new(RateLimits::new(&config.rate_limit)?);
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
        self.auth.store(Arc::new(auth));
        self.limits.store(limits);
        if let (Some(tls), Some(certificate)) = (&self.public_tls, certificate) {
            tls.install(certificate);
            tracing::info!("public TLS certificate reloaded");
        }
        tracing::info!("keys and rate limits reloaded");
        Ok(())
    }

    /// Queues a committed version for the other regions' caches; never waits.
    pub fn invalidate_elsewhere(&self, owner: &OwnerKey, version: i64) {
        if let Some(queue) = &self.invalidations {
            if queue
                .try_send((owner.as_str().to_string(), version))
                .is_err()
            {
                self.invalidations_dropped.fetch_add(1, Ordering::Relaxed);
            }
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
                HeaderValue::from_static(crate::server::tls::HSTS),
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
