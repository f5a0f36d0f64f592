//! Wiring: builds the edge's shared state from configuration. No request logic lives here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::api::auth::Authenticator;
use crate::config::Config;
use crate::domain::ids::OwnerKey;
use crate::store::Store;
use crate::topology::Topology;

/// How often missed cache invalidations are retried.
const CACHE_REPAIR_PERIOD: Duration = Duration::from_millis(250);

/// Everything a request needs, shared by all connections.
pub struct App {
    pub config: Config,
    pub auth: Authenticator,
    pub store: Store,
    /// The ring and every region.
    pub topology: Topology,
    /// `Cart-Region`, pre-encoded once.
    pub region_header: HeaderValue,
    /// Whether the public listener serves TLS (cookies get `Secure`).
    pub tls: bool,
    draining: AtomicBool,
}

impl App {
    /// Builds the state and starts the cache repair task (so call it inside a Tokio runtime).
    /// Connects to nothing yet: pools and the cache connect lazily, so an edge starts while a
    /// dependency is down and reports it on `/health`.
    pub fn new(config: Config) -> anyhow::Result<Arc<App>> {
        let auth = Authenticator::new(&config.auth).map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        let topology = Topology::load(&config)?;
        let store = Store::new(&config)?;
        store.cache.spawn_repair(CACHE_REPAIR_PERIOD);
        let region_header = HeaderValue::from_str(&config.region.id)?;
        Ok(Arc::new(App {
            config,
            auth,
            store,
            topology,
            region_header,
            tls: false,
            draining: AtomicBool::new(false),
        }))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Turns readiness off (SIGTERM's first step).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The shard an owner's cart lives on.
    pub fn shard_of(&self, owner: &OwnerKey) -> &str {
        self.topology.ring.locate(owner.as_str()).shard
    }

    /// Headers every response carries.
    pub fn decorate(&self, headers: &mut HeaderMap) {
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
