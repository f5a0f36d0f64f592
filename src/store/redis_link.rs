//! How the cache reaches its Redis: the one server `redis.url` names, or the master that Redis
//! Sentinel names for `redis.master_name` (`redis.sentinels`).
//!
//! With sentinels the master is looked up lazily (redis-rs' `SentinelClient`: the sentinels are
//! asked, a master they flag down is skipped, and the named master must answer `ROLE` as a
//! master) and kept until something says it is no longer the master: a connection error or a
//! `READONLY` reply (an old master demoted to replica). The next operation then looks it up
//! again, so a failover is followed without a restart. A timeout only makes the link ask the
//! sentinels again while it keeps the master in use (a partitioned master answers nothing
//! until Sentinel promotes another, but a slow master is still the master). Lookups run in a task of
//! their own, one at a time and at most one per [`LOOKUP_INTERVAL`], bounded by
//! [`LOOKUP_TIMEOUT`]; an operation waits for a running lookup only within its own timeout
//! (the caller's), and while no master is known it fails at once, which the cache counts as a
//! miss. This module never decides what a failure means for a request.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{ErrorKind, RedisError, RedisResult};
use tokio::sync::watch;

use crate::config::RedisConfig;

/// Bound on one master lookup: a few round trips to the sentinels (asked concurrently) and one
/// `ROLE` to the master they name, each connection and reply bounded by redis-rs' defaults
/// (1 s to connect, 0.5 s per reply).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Least time between two lookups, so a dead master (every operation failing) costs the
/// sentinels a few queries a second, not one per request.
const LOOKUP_INTERVAL: Duration = Duration::from_millis(250);

/// A connection to the Redis the cache uses, and which master it came from.
pub struct Checkout {
    pub connection: ConnectionManager,
    /// Which lookup produced it (0 without sentinels); passed back to [`RedisLink::failed`].
    generation: u64,
}

/// The cache's way to Redis.
pub enum RedisLink {
    /// `redis.url`: one connection manager, reconnecting to the same address.
    Direct(ConnectionManager),
    /// `redis.sentinels`: the master the sentinels name, looked up again when it fails.
    Sentinel(Arc<SentinelLink>),
}

impl RedisLink {
    pub fn new(config: &RedisConfig) -> anyhow::Result<RedisLink> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.0.max(Duration::from_millis(200))))
            .set_response_timeout(Some(config.timeout.0))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        if !config.uses_sentinels() {
            let client = redis::Client::open(config.url.expose())?;
            let connection = ConnectionManager::new_lazy_with_config(client, manager_config)?;
            return Ok(RedisLink::Direct(connection));
        }
        let sentinels: Vec<&str> = config.sentinels.iter().map(|url| url.expose()).collect();
        let sentinel = SentinelClient::build(
            sentinels,
            config.master_name.clone(),
            None,
            SentinelServerType::Master,
        )?;
        let (state, _) = watch::channel(MasterState::Unknown);
        Ok(RedisLink::Sentinel(Arc::new(SentinelLink {
            sentinel: tokio::sync::Mutex::new(sentinel),
            master_name: config.master_name.clone(),
            manager_config,
            state,
            lookups: Mutex::new(Lookups::default()),
            last_master: Mutex::new(None),
        })))
    }

    /// A connection to the current master. Without sentinels this never fails (the manager
    /// connects lazily); with them it fails at once while no master is known and no lookup may
    /// start yet, and otherwise waits for the running lookup (the caller bounds the wait).
    pub async fn connection(&self) -> RedisResult<Checkout> {
        match self {
            RedisLink::Direct(connection) => Ok(Checkout {
                connection: connection.clone(),
                generation: 0,
            }),
            RedisLink::Sentinel(link) => link.connection().await,
        }
    }

    /// Tells the link an operation on `checkout` failed: a connection error or `READONLY` makes
    /// the next operation look the master up again; a timeout starts a recheck.
    pub fn failed(&self, checkout: &Checkout, error: &RedisError) {
        if let RedisLink::Sentinel(link) = self {
            match suspicion(error) {
                Suspicion::Gone => link.forget(checkout.generation, error),
                Suspicion::Slow => {
                    link.start_lookup(true);
                }
                Suspicion::None => {}
            }
        }
    }

    /// Tells the link an operation timed out: the master may be gone without a word (a
    /// partition, after which Sentinel promotes another), so the sentinels are asked again,
    /// while the master in use stays in use (a slow master is not a reason to stop using it).
    pub fn timed_out(&self) {
        if let RedisLink::Sentinel(link) = self {
            link.start_lookup(true);
        }
    }

    /// The master in use (`host:port`), with sentinels; None without them or while unknown.
    pub fn master(&self) -> Option<String> {
        match self {
            RedisLink::Direct(_) => None,
            RedisLink::Sentinel(link) => match &*link.state.borrow() {
                MasterState::Ready(master) => Some(master.address.clone()),
                MasterState::Unknown | MasterState::Resolving => None,
            },
        }
    }
}

/// What an operation's error says about the master it ran on.
#[derive(Debug, PartialEq, Eq)]
pub enum Suspicion {
    /// Nothing (a script or type error is the operation's own).
    None,
    /// It did not answer in time: maybe slow, maybe cut off. Ask the sentinels, keep it.
    Slow,
    /// It is not the master any more (`READONLY`) or cannot be reached: look the master up.
    Gone,
}

/// Reads an operation's error: timeouts first (they are I/O errors too), then `READONLY` and
/// the connection failures.
pub fn suspicion(error: &RedisError) -> Suspicion {
    if error.is_timeout() {
        Suspicion::Slow
    } else if error.kind() == ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
    {
        Suspicion::Gone
    } else {
        Suspicion::None
    }
}

#[derive(Clone)]
struct Master {
    address: String,
    connection: ConnectionManager,
    generation: u64,
}

#[derive(Clone)]
enum MasterState {
    /// No master known: the next operation starts a lookup (if [`LOOKUP_INTERVAL`] allows).
    Unknown,
    /// A lookup is running; operations wait for it within their own timeout.
    Resolving,
    Ready(Master),
}

pub struct SentinelLink {
    /// Held by the one running lookup (it caches its connections to the sentinels).
    sentinel: tokio::sync::Mutex<SentinelClient>,
    master_name: String,
    manager_config: ConnectionManagerConfig,
    state: watch::Sender<MasterState>,
    /// When the last lookup started, and whether one is running (both under one lock, so
    /// at most one runs and none starts sooner than [`LOOKUP_INTERVAL`] after the last).
    lookups: Mutex<Lookups>,
    /// The last master found, kept across a lookup so the same address keeps its connection.
    last_master: Mutex<Option<Master>>,
}

#[derive(Default)]
struct Lookups {
    last_started: Option<Instant>,
    running: bool,
}

impl SentinelLink {
    async fn connection(self: &Arc<Self>) -> RedisResult<Checkout> {
        let mut receiver = self.state.subscribe();
        let unknown = matches!(*receiver.borrow_and_update(), MasterState::Unknown);
        if unknown && !self.start_lookup(false) {
            return Err(no_master_known());
        }
        let state = receiver
            .wait_for(|state| !matches!(state, MasterState::Resolving))
            .await
            .map_err(|_| no_master_known())?;
        match &*state {
            MasterState::Ready(master) => Ok(Checkout {
                connection: master.connection.clone(),
                generation: master.generation,
            }),
            MasterState::Unknown | MasterState::Resolving => Err(no_master_known()),
        }
    }

    /// Starts a lookup in a task of its own, unless one is running or the last one started
    /// less than [`LOOKUP_INTERVAL`] ago. `keep_current`: the master in use stays in use
    /// meanwhile (a recheck); otherwise the state says a lookup is running, so operations wait
    /// for it. Returns whether a lookup runs now or a master became known meanwhile.
    fn start_lookup(self: &Arc<Self>, keep_current: bool) -> bool {
        let Ok(mut lookups) = self.lookups.lock() else {
            return false;
        };
        if lookups.running {
            return true;
        }
        if lookups
            .last_started
            .is_some_and(|at| at.elapsed() < LOOKUP_INTERVAL)
        {
            return false;
        }
        if !keep_current {
            let started = self.state.send_if_modified(|state| {
                if matches!(state, MasterState::Unknown) {
                    *state = MasterState::Resolving;
                    true
                } else {
                    false
                }
            });
            if !started {
                // Another caller's lookup found a master since we looked.
                return true;
            }
        }
        lookups.running = true;
        lookups.last_started = Some(Instant::now());
        drop(lookups);
        let link = Arc::clone(self);
        tokio::spawn(async move {
            link.look_up().await;
            if let Ok(mut lookups) = link.lookups.lock() {
                lookups.running = false;
            }
        });
        true
    }

    /// One lookup. Found: the master becomes (or stays) the one in use. Not found: a waiting
    /// state becomes unknown; a master in use stays (its own failures will retire it).
    async fn look_up(&self) {
        let lookup = async {
            let mut sentinel = self.sentinel.lock().await;
            sentinel.async_get_client().await
        };
        let client = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                tracing::warn!(master_name = %self.master_name, %error, "no redis master found through the sentinels");
                self.give_up();
                return;
            }
            Err(_) => {
                tracing::warn!(master_name = %self.master_name, timeout = ?LOOKUP_TIMEOUT, "redis master lookup through the sentinels timed out");
                self.give_up();
                return;
            }
        };
        let address = client.get_connection_info().addr().to_string();
        let Ok(mut last_master) = self.last_master.lock() else {
            self.give_up();
            return;
        };
        let master = match last_master.as_ref() {
            Some(previous) if previous.address == address => Master {
                address,
                connection: previous.connection.clone(),
                generation: previous.generation + 1,
            },
            previous => {
                let connection = match ConnectionManager::new_lazy_with_config(
                    client,
                    self.manager_config.clone(),
                ) {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%error, "cannot build a connection to the redis master");
                        self.give_up();
                        return;
                    }
                };
                tracing::info!(
                    master_name = %self.master_name,
                    master = %address,
                    previous = previous.map(|master| master.address.as_str()),
                    "following the redis master named by the sentinels"
                );
                Master {
                    address,
                    connection,
                    generation: previous.map_or(1, |master| master.generation + 1),
                }
            }
        };
        *last_master = Some(master.clone());
        self.state.send_replace(MasterState::Ready(master));
    }

    fn give_up(&self) {
        self.state.send_if_modified(|state| {
            if matches!(state, MasterState::Resolving) {
                *state = MasterState::Unknown;
                true
            } else {
                false
            }
        });
    }

    /// Forgets the master `generation` came from (not a newer one another lookup found).
    fn forget(&self, generation: u64, error: &RedisError) {
        let forgotten = self.state.send_if_modified(|state| match state {
            MasterState::Ready(master) if master.generation == generation => {
                *state = MasterState::Unknown;
                true
            }
            _ => false,
        });
        if forgotten {
            tracing::warn!(master_name = %self.master_name, %error, "redis master failed; asking the sentinels again");
        }
    }
}

fn no_master_known() -> RedisError {
    RedisError::from((
        ErrorKind::MasterNameNotFoundBySentinel,
        "no redis master known yet (asking the sentinels)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readonly_and_connection_failures_retire_the_master_a_timeout_only_rechecks_it() {
        let readonly = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert_eq!(suspicion(&readonly), Suspicion::Gone);
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(suspicion(&dropped), Suspicion::Gone);
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(suspicion(&refused), Suspicion::Gone);
        let slow = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(suspicion(&slow), Suspicion::Slow);
        let wrong_type = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert_eq!(suspicion(&wrong_type), Suspicion::None);
    }
}
