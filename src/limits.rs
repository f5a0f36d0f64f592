//! Edge rate limiting with governor: per cart owner (by tier and request class) and per client
//! IP for requests without valid credentials.
//!
//! The configured quotas are the region's. Each edge keeps its own counts (nothing is shared
//! between edges), so with `rate_limit.edges` edges serving a region each enforces its share:
//! rate and burst divided by the edge count, rounded up, never below 1 ([`edge_share`]). Behind
//! a load balancer that spreads an owner's requests evenly the region then admits the
//! configured quota (more by at most the rounding); an owner pinned to one edge gets one share.
//!
//! Memory stays bounded under a flood of distinct keys: a housekeeping task drops keys whose
//! state is indistinguishable from fresh (`retain_recent`) and, past `rate_limit.max_keys`,
//! clears a limiter outright (counted). The client IP is the socket peer, or the right-most
//! address of `X-Forwarded-For` that is not a trusted proxy, when the peer is one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::HeaderMap;
use ipnet::IpNet;

use crate::config::{QuotaConfig, RateLimitConfig};
use crate::metrics::{LimitMetrics, LimiterLabels, TierClassLabels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

type Limiter<K> =
    RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// What a request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Read,
    Write,
    Checkout,
}

/// Who pays: tiers come from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    User,
    Guest,
    /// Selected by the token claim `"tier": "service"` (load generators, internal jobs).
    Service,
}

/// A named quota, for the `RateLimit-Policy` / `RateLimit` headers.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub burst: u32,
    /// Seconds to refill the whole burst.
    pub window_secs: u64,
    /// `RateLimit-Policy` for this policy, built once (it is on every response).
    header: Option<http::HeaderValue>,
}

impl Policy {
    pub fn new(name: &str, burst: u32, window_secs: u64) -> Policy {
        let text = format!("\"{name}\";q={burst};w={window_secs}");
        Policy {
            name: name.to_string(),
            burst,
            window_secs,
            header: http::HeaderValue::from_str(&text).ok(),
        }
    }
}

/// The outcome of one check, carried into the response headers.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub policy: Arc<Policy>,
    pub remaining: u32,
    /// Seconds until a request would be admitted (0 when admitted).
    pub retry_after_secs: u64,
}

impl Verdict {
    pub fn admitted(&self) -> bool {
        self.retry_after_secs == 0
    }

    /// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers structured form).
    pub fn policy_header(&self) -> String {
        self.policy
            .header
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    /// `RateLimit`: remaining quota and seconds until it resets.
    pub fn limit_header(&self) -> String {
        format!(
            "\"{}\";r={};t={}",
            self.policy.name, self.remaining, self.retry_after_secs
        )
    }
}

/// Sets `RateLimit-Policy` and `RateLimit` from a verdict.
pub fn set_headers(headers: &mut HeaderMap, verdict: &Verdict) {
    if let Some(policy) = &verdict.policy.header {
        headers.insert("ratelimit-policy", policy.clone());
    }
    if let Ok(value) = http::HeaderValue::from_str(&verdict.limit_header()) {
        headers.insert("ratelimit", value);
    }
}

struct Keyed<K: std::hash::Hash + Eq + Clone> {
    /// Swapped for a fresh one when it holds too many keys.
    limiter: ArcSwap<Limiter<K>>,
    quota: Quota,
    policy: Arc<Policy>,
    /// `cartedge_rate_limited_total` for this limiter's tier and class, resolved once.
    refused: Counter,
    /// `cartedge_rate_limiter_keys` for this limiter.
    keys: Gauge,
}

impl<K: std::hash::Hash + Eq + Clone> Keyed<K> {
    fn new(name: &str, quota: &QuotaConfig, refused: Counter, keys: Gauge) -> Keyed<K> {
        let per_second = NonZeroU32::new(quota.per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(quota.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let window_secs = (u64::from(burst.get()))
            .div_ceil(u64::from(per_second.get()))
            .max(1);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Keyed {
            limiter: ArcSwap::from_pointee(Self::fresh(quota)),
            quota,
            policy: Arc::new(Policy::new(name, burst.get(), window_secs)),
            refused,
            keys,
        }
    }

    fn fresh(quota: Quota) -> Limiter<K> {
        RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>()
    }

    fn len(&self) -> usize {
        self.limiter.load().len()
    }

    /// Drops keys that are back to a fresh state; clears everything past `max` keys.
    fn tidy(&self, max: usize) -> bool {
        let limiter = self.limiter.load();
        limiter.retain_recent();
        if limiter.len() > max {
            self.limiter.store(Arc::new(Self::fresh(self.quota)));
            return true;
        }
        limiter.shrink_to_fit();
        false
    }

    fn check(&self, key: &K) -> Verdict {
        match self.limiter.load().check_key(key) {
            Ok(state) => Verdict {
                policy: self.policy.clone(),
                remaining: state.remaining_burst_capacity(),
                retry_after_secs: 0,
            },
            Err(not_until) => {
                self.refused.inc();
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Verdict {
                    policy: self.policy.clone(),
                    remaining: 0,
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                }
            }
        }
    }
}

/// One edge's share of a regional quota served by `edges` edges: rate and burst divided by the
/// edge count, rounded up (the region may admit up to `edges - 1` more than configured, never
/// less), and never below 1.
pub fn edge_share(quota: &QuotaConfig, edges: u32) -> QuotaConfig {
    let edges = edges.max(1);
    QuotaConfig {
        per_second: quota.per_second.div_ceil(edges).max(1),
        burst: quota.burst.div_ceil(edges).max(1),
    }
}

pub struct RateLimits {
    enabled: bool,
    owners: HashMap<(Tier, Class), Keyed<String>>,
    anonymous: Keyed<IpAddr>,
    trusted_proxies: Vec<IpNet>,
    max_keys: usize,
    /// Times a limiter was cleared because it held more than `max_keys` keys.
    pub overflows: Counter,
}

impl RateLimits {
    /// Builds the limiters, each enforcing this edge's share of its quota
    /// (`rate_limit.edges`); their refusals and key counts go to `metrics` (shared by the
    /// limits a reload builds, so counts carry over).
    pub fn new(config: &RateLimitConfig, metrics: &LimitMetrics) -> anyhow::Result<RateLimits> {
        let keyed = |name: String, quota: &QuotaConfig, tier: &'static str, class: &'static str| {
            let refused = metrics
                .limited
                .get_or_create(&TierClassLabels { tier, class })
                .clone();
            let keys = metrics
                .keys
                .get_or_create(&LimiterLabels {
                    limiter: name.clone(),
                })
                .clone();
            (name, edge_share(quota, config.edges), refused, keys)
        };
        let mut owners = HashMap::new();
        for (tier, tier_name, quotas) in [
            (Tier::User, "user", &config.user),
            (Tier::Guest, "guest", &config.guest),
            (Tier::Service, "service", &config.service),
        ] {
            for (class, class_name, class_label, quota) in [
                (Class::Read, "reads", "read", &quotas.reads),
                (Class::Write, "writes", "write", &quotas.writes),
                (Class::Checkout, "checkout", "checkout", &quotas.checkout),
            ] {
                let (name, quota, refused, keys) = keyed(
                    format!("{tier_name}-{class_name}"),
                    quota,
                    tier_name,
                    class_label,
                );
                owners.insert((tier, class), Keyed::new(&name, &quota, refused, keys));
            }
        }
        let trusted_proxies = config
            .trusted_proxies
            .iter()
            .map(|net| {
                net.parse::<IpNet>()
                    .map_err(|e| anyhow::anyhow!("rate_limit.trusted_proxies {net:?}: {e}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(RateLimits {
            enabled: config.enabled,
            owners,
            anonymous: {
                let (name, quota, refused, keys) = keyed(
                    "anonymous".to_string(),
                    &config.anonymous,
                    "anonymous",
                    "any",
                );
                Keyed::new(&name, &quota, refused, keys)
            },
            trusted_proxies,
            max_keys: config.max_keys,
            overflows: metrics.overflows.clone(),
        })
    }

    /// Checks one request of `class` by owner `owner_key` in `tier`; None when limiting is off.
    pub fn check_owner(&self, tier: Tier, class: Class, owner_key: &str) -> Option<Verdict> {
        if !self.enabled {
            return None;
        }
        let keyed = self.owners.get(&(tier, class))?;
        Some(keyed.check(&owner_key.to_string()))
    }

    /// Checks one request from `ip` that carries no valid credentials.
    pub fn check_ip(&self, ip: IpAddr) -> Option<Verdict> {
        self.enabled.then(|| self.anonymous.check(&ip))
    }

    /// The client's address: the peer, or through trusted proxies the right-most untrusted
    /// `X-Forwarded-For` entry.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut ip = peer.ip();
        if !self.is_trusted(ip) {
            return ip;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|entry| entry.trim().parse::<IpAddr>().ok())
            .collect();
        for candidate in forwarded.into_iter().rev() {
            ip = candidate;
            if !self.is_trusted(candidate) {
                break;
            }
        }
        ip
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// Keys held across every limiter (a gauge).
    pub fn live_keys(&self) -> usize {
        self.owners.values().map(Keyed::len).sum::<usize>() + self.anonymous.len()
    }

    /// Sets `cartedge_rate_limiter_keys` from every limiter's current size.
    pub fn export_keys(&self) {
        for keyed in self.owners.values() {
            keyed.keys.set(keyed.len() as i64);
        }
        self.anonymous.keys.set(self.anonymous.len() as i64);
    }

    fn housekeeping(&self) {
        let cleared = self
            .owners
            .values()
            .map(|keyed| keyed.tidy(self.max_keys))
            .chain([self.anonymous.tidy(self.max_keys)])
            .filter(|cleared| *cleared)
            .count();
        if cleared > 0 {
            self.overflows.inc_by(cleared as u64);
            tracing::warn!(
                cleared,
                max_keys = self.max_keys,
                "rate limiter key flood: limiters cleared"
            );
        }
    }

    /// Runs housekeeping every `period` for as long as the limits are alive.
    pub fn spawn_housekeeping(self: &Arc<Self>, period: Duration) {
        let limits = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(limits) = limits.upgrade() else {
                    return;
                };
                limits.housekeeping();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TierQuotas;

    fn quota(per_second: u32, burst: u32) -> QuotaConfig {
        QuotaConfig { per_second, burst }
    }

    fn config() -> RateLimitConfig {
        let tier = TierQuotas {
            reads: quota(20, 40),
            writes: quota(10, 20),
            checkout: quota(1, 5),
        };
        RateLimitConfig {
            enabled: true,
            user: tier.clone(),
            guest: tier.clone(),
            service: TierQuotas {
                reads: quota(100_000, 100_000),
                writes: quota(100_000, 100_000),
                checkout: quota(100_000, 100_000),
            },
            anonymous: quota(50, 100),
            trusted_proxies: vec!["10.0.0.0/8".into()],
            max_keys: 3,
            edges: 1,
        }
    }

    #[test]
    fn a_burst_is_admitted_then_refused_with_a_retry_time() {
        let limits = RateLimits::new(&config(), &LimitMetrics::default()).unwrap();
        for n in 0..20 {
            let verdict = limits.check_owner(Tier::User, Class::Write, "u:a").unwrap();
            assert!(verdict.admitted(), "request {n}");
            assert_eq!(verdict.remaining, 19 - n);
        }
        let refused = limits.check_owner(Tier::User, Class::Write, "u:a").unwrap();
        assert!(!refused.admitted());
        assert!(refused.retry_after_secs >= 1);
        assert_eq!(refused.policy_header(), "\"user-writes\";q=20;w=2");
        // Another owner and another class are unaffected.
        assert!(limits
            .check_owner(Tier::User, Class::Write, "u:b")
            .unwrap()
            .admitted());
        assert!(limits
            .check_owner(Tier::User, Class::Read, "u:a")
            .unwrap()
            .admitted());
        assert!(limits
            .check_owner(Tier::Service, Class::Write, "u:a")
            .unwrap()
            .admitted());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let limits = RateLimits::new(&config(), &LimitMetrics::default()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7, 10.1.2.3".parse().unwrap(),
        );
        let proxy: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        assert_eq!(
            limits.client_ip(proxy, &headers),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let stranger: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        assert_eq!(
            limits.client_ip(stranger, &headers),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn housekeeping_bounds_the_number_of_keys() {
        let limits = RateLimits::new(&config(), &LimitMetrics::default()).unwrap();
        for n in 0..10 {
            limits.check_ip(IpAddr::from([192, 0, 2, n]));
        }
        assert_eq!(limits.live_keys(), 10);
        limits.housekeeping();
        assert!(limits.live_keys() <= 3, "{}", limits.live_keys());
        assert_eq!(limits.overflows.get(), 1);
    }

    #[test]
    fn an_edge_enforces_its_share_rounded_up_and_never_below_one() {
        let share = |per_second, burst, edges| {
            let share = edge_share(&quota(per_second, burst), edges);
            (share.per_second, share.burst)
        };
        assert_eq!(share(20, 40, 1), (20, 40));
        assert_eq!(share(20, 40, 2), (10, 20));
        assert_eq!(share(10, 5, 2), (5, 3), "rounded up");
        assert_eq!(share(1, 5, 3), (1, 2), "never below 1");
        assert_eq!(share(1, 1, 4), (1, 1));
        assert_eq!(share(7, 7, 0), (7, 7), "no edge count means one edge");
    }

    #[test]
    fn the_policy_header_names_the_share_this_edge_enforces() {
        let mut shared = config();
        shared.edges = 2;
        let limits = RateLimits::new(&shared, &LimitMetrics::default()).unwrap();
        for n in 0..10 {
            let verdict = limits.check_owner(Tier::User, Class::Write, "u:a").unwrap();
            assert!(verdict.admitted(), "request {n}");
        }
        let refused = limits.check_owner(Tier::User, Class::Write, "u:a").unwrap();
        assert!(!refused.admitted(), "half the burst of 20");
        assert_eq!(refused.policy_header(), "\"user-writes\";q=10;w=2");
    }

    #[test]
    fn disabled_limits_check_nothing() {
        let mut disabled = config();
        disabled.enabled = false;
        let limits = RateLimits::new(&disabled, &LimitMetrics::default()).unwrap();
        assert!(limits.check_owner(Tier::User, Class::Read, "u:a").is_none());
        assert!(limits.check_ip(IpAddr::from([192, 0, 2, 1])).is_none());
    }
}
