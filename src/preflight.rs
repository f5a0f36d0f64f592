//! The start-up check: everything about a loaded configuration that `config` cannot see on its
//! own, checked before any port is bound.
//!
//! `config` parses and checks values in isolation; this module opens the files they name and
//! parses what they mean: JWT verification keys, the public listener's certificate and key, the
//! edge-to-edge CA, certificate and key (and that the certificate names this edge), trusted
//! proxy networks, database connection strings, the Redis URL, the log filter, every peer's
//! internal URL, and the region set against the ring (through `topology`), including the
//! catalog primary that a region homing shards needs for checkout and a replica of the catalog
//! of every other region that homes shards (`database.peer_catalogs`). Both `cartedge serve` and
//! `cartedge check-config` run [`check`], so `check-config` refuses exactly what `serve` would
//! refuse, with the same message; `App::new` then finds nothing left to refuse.
//!
//! It reports every problem at once, each naming the configuration key it is about, and never
//! prints a secret (connection strings and URLs may hold passwords, so their parse errors are
//! reported without the value). It reads files and parses; it opens no sockets and connects to
//! nothing (an unreachable database is a runtime condition reported on `/health`).

use std::fmt;

use ipnet::IpNet;

use crate::config::{Config, ConfigError, Secret};
use crate::forward::tls::{edge_names, EDGE_DNS_SUFFIX};
use crate::pki;
use crate::topology::Topology;

#[cfg(test)]
use std::path::Path;

/// A configuration `serve` must not start with: every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreflightError {
    pub problems: Vec<String>,
}

impl fmt::Display for PreflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration:\n  - {}",
            self.problems.join("\n  - ")
        )
    }
}

impl std::error::Error for PreflightError {}

/// Runs every start-up check on a configuration that [`Config::load`] accepted; returns the
/// validated topology (the ring and every region), or every problem found.
pub fn check(config: &Config) -> Result<Topology, PreflightError> {
    let mut problems = Vec::new();
    check_auth(config, &mut problems);
    check_public_tls(config, &mut problems);
    check_edge_tls(config, &mut problems);
    check_trusted_proxies(config, &mut problems);
    check_connection_strings(config, &mut problems);
    check_log_filter(config, &mut problems);
    let topology = match Topology::load(config) {
        Ok(topology) => Some(topology),
        Err(ConfigError::Invalid(found)) => {
            problems.extend(found);
            None
        }
        Err(error) => {
            problems.push(format!("topology: {error}"));
            None
        }
    };
    if let Some(topology) = &topology {
        check_peers(config, topology, &mut problems);
        check_catalog_primary(config, topology, &mut problems);
        check_peer_catalogs(config, topology, &mut problems);
    }
    match topology {
        Some(topology) if problems.is_empty() => Ok(topology),
        _ => Err(PreflightError { problems }),
    }
}

/// JWT verification keys: algorithm, secret length, public key files.
fn check_auth(config: &Config, problems: &mut Vec<String>) {
    for (index, key) in config.auth.keys.iter().enumerate() {
        if let Err(problem) = crate::auth::check_key_config(key) {
            problems.push(format!("auth.keys[{index}] ({}): {problem}", key.kid));
        }
    }
}

/// The public listener's certificate chain and key: small regular files that parse and belong
/// together.
fn check_public_tls(config: &Config, problems: &mut Vec<String>) {
    if let Some((cert, key)) = config.server.public_tls() {
        if let Err(error) = pki::load_certified_key(cert, key) {
            problems.push(format!("server.tls_cert_file/tls_key_file: {error:#}"));
        }
    }
}

/// Mutual TLS between edges: the CA, this edge's certificate and key, the configurations the
/// forwarder and the internal listener are built from, and the edge name peers verify.
fn check_edge_tls(config: &Config, problems: &mut Vec<String>) {
    let files = &config.tls;
    if !files.is_configured() {
        return;
    }
    let roots = pki::load_roots(&files.ca_file)
        .map_err(|error| problems.push(format!("tls.ca_file: {error:#}")));
    let certified = pki::load_certified_key(&files.cert_file, &files.key_file)
        .map_err(|error| problems.push(format!("tls.cert_file/tls.key_file: {error:#}")));
    let (Ok(_), Ok(certified)) = (roots, certified) else {
        return;
    };
    // What `App::new` builds; anything the two files above did not already explain.
    let (cert, key, ca) = (&files.cert_file, &files.key_file, &files.ca_file);
    if let Err(error) = crate::forward::tls::server_config(cert, key, ca) {
        problems.push(format!("tls: {error:#}"));
    } else if let Err(error) = crate::forward::tls::client_config(cert, key, ca) {
        problems.push(format!("tls: {error:#}"));
    }
    let region = &config.region.id;
    let named = certified
        .end_entity_cert()
        .ok()
        .and_then(edge_names)
        .is_some_and(|names| names.iter().any(|name| name == region));
    if !named {
        problems.push(format!(
            "tls.cert_file {} does not name this edge ({region}{EDGE_DNS_SUFFIX}), so peers would refuse it",
            cert.display()
        ));
    }
}

/// Networks whose `X-Forwarded-For` is believed.
fn check_trusted_proxies(config: &Config, problems: &mut Vec<String>) {
    for (index, network) in config.rate_limit.trusted_proxies.iter().enumerate() {
        if let Err(error) = network.parse::<IpNet>() {
            problems.push(format!(
                "rate_limit.trusted_proxies[{index}] {network:?}: {error} (expected a CIDR such as 10.0.0.0/8)"
            ));
        }
    }
}

/// Every PostgreSQL connection string parses as `tokio_postgres` will parse it, and the Redis
/// URL as `redis` will. Values are never echoed: they may carry passwords.
fn check_connection_strings(config: &Config, problems: &mut Vec<String>) {
    let database = &config.database;
    let mut dsns: Vec<(String, &Secret)> = Vec::new();
    for shard in &database.shards {
        if !shard.primary.is_empty() {
            dsns.push((
                format!("database.shards[{}].primary", shard.id),
                &shard.primary,
            ));
        }
        dsns.push((
            format!("database.shards[{}].replica", shard.id),
            &shard.replica,
        ));
    }
    dsns.push(("database.catalog".into(), &database.catalog));
    if !database.catalog_primary.is_empty() {
        dsns.push(("database.catalog_primary".into(), &database.catalog_primary));
    }
    for (region, dsn) in &database.peer_catalogs {
        dsns.push((format!("database.peer_catalogs.{region}"), dsn));
    }
    for (key, dsn) in dsns {
        if let Err(error) = dsn.expose().parse::<tokio_postgres::Config>() {
            problems.push(format!(
                "{key} is not a valid PostgreSQL connection string: {}",
                postgres_parse_error(&error)
            ));
        }
    }
    if redis::Client::open(config.redis.url.expose()).is_err() {
        problems.push("redis.url is not a valid redis URL".into());
    }
    for (index, sentinel) in config.redis.sentinels.iter().enumerate() {
        if redis::Client::open(sentinel.expose()).is_err() {
            problems.push(format!("redis.sentinels[{index}] is not a valid redis URL"));
        }
    }
}

/// The log filter: without this check a typo silently falls back to `info`.
fn check_log_filter(config: &Config, problems: &mut Vec<String>) {
    let filter = &config.log.filter;
    if let Err(error) = tracing_subscriber::EnvFilter::try_new(filter) {
        problems.push(format!("log.filter {filter:?}: {error}"));
    }
}

/// A connection-string parse error with its cause. The causes name an option or a position
/// and at most one character of the value, never the value itself.
fn postgres_parse_error(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// Every peer's id and internal URL, as the forwarder will use them; overrides in
/// `topology.peer_urls` name regions that exist.
fn check_peers(config: &Config, topology: &Topology, problems: &mut Vec<String>) {
    for region in config.topology.peer_urls.keys() {
        if !topology.regions.contains_key(region.as_str()) {
            problems.push(format!(
                "topology.peer_urls.{region}: no region {region:?} in topology.regions_dir"
            ));
        }
    }
    for peer in topology.regions.values() {
        if peer.id == config.region.id {
            if let Err(problem) = check_internal_url(&peer.internal_url) {
                problems.push(format!("edge.internal_url: {problem}"));
            }
            continue;
        }
        if let Err(problem) = check_internal_url(&peer.internal_url) {
            let key = if config.topology.peer_urls.contains_key(peer.id.as_str()) {
                format!("topology.peer_urls.{}", peer.id)
            } else {
                format!("region {}: edge.internal_url", peer.id)
            };
            problems.push(format!("{key}: {problem}"));
        }
    }
}

/// An edge's internal URL: `https://host[:port][/]`, the only form the forwarder dials (mutual
/// TLS; a path would be silently dropped).
pub fn check_internal_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|error| format!("{url:?} is not a URL: {error}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "{url:?} must be an https:// URL (edges talk mutual TLS)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{url:?} must not have a path or query"));
    }
    Ok(())
}

/// A region that homes shards runs checkouts, which reserve stock on its own catalog's primary.
fn check_catalog_primary(config: &Config, topology: &Topology, problems: &mut Vec<String>) {
    if !config.database.catalog_primary.is_empty() {
        return;
    }
    let homed: Vec<&str> = topology
        .ring
        .spec()
        .shards
        .iter()
        .filter(|shard| shard.home == config.region.id)
        .map(|shard| shard.id.as_str())
        .collect();
    if !homed.is_empty() {
        problems.push(format!(
            "database.catalog_primary is required: region {} is home to shard(s) {}, whose checkouts reserve stock on its own catalog's primary",
            config.region.id,
            homed.join(", ")
        ));
    }
}

/// Every other region that homes shards has a replica of its catalog here (a visiting
/// shopper's cart is priced from its home catalog), and every entry names another region.
fn check_peer_catalogs(config: &Config, topology: &Topology, problems: &mut Vec<String>) {
    let here = config.region.id.as_str();
    let peers = &config.database.peer_catalogs;
    for region in peers.keys() {
        if region == here {
            problems.push(format!(
                "database.peer_catalogs.{region}: this region's own catalog is database.catalog"
            ));
        } else if !topology.regions.contains_key(region.as_str()) {
            problems.push(format!(
                "database.peer_catalogs.{region}: no region {region:?} in topology.regions_dir"
            ));
        }
    }
    let mut homing: Vec<&str> = topology
        .ring
        .spec()
        .shards
        .iter()
        .map(|shard| shard.home.as_str())
        .filter(|home| *home != here && !peers.contains_key(*home))
        .collect();
    homing.sort_unstable();
    homing.dedup();
    for region in homing {
        problems.push(format!(
            "database.peer_catalogs.{region} is required: region {region} homes shards, and its shoppers' carts read here are priced from its catalog"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;

    fn production_sg(env: &[(&str, &str)]) -> Config {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sources = Sources::new(
            Some(root.join("config/default.toml")),
            Some(root.join("regions/sg.toml")),
        );
        Config::load(&sources, env.iter().copied()).unwrap()
    }

    const SESSION_SECRET: (&str, &str) = (
        "CARTEDGE__AUTH__SESSION_SECRET",
        "0123456789abcdef0123456789abcdef",
    );

    #[test]
    fn the_production_region_passes_and_a_missing_key_secret_is_named() {
        let key_secret = (
            "CARTEDGE__AUTH__KEYS__0__SECRET",
            "fedcba9876543210fedcba9876543210",
        );
        let topology = check(&production_sg(&[SESSION_SECRET, key_secret])).unwrap();
        assert_eq!(topology.regions.len(), 6);
        let error = check(&production_sg(&[SESSION_SECRET])).unwrap_err();
        assert_eq!(
            error.problems,
            ["auth.keys[0] (hs-1): HS256 secret must be at least 32 bytes"]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut config = production_sg(&[SESSION_SECRET]);
        config.rate_limit.trusted_proxies = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()];
        config.database.catalog = Secret::new("host=db port=notaport");
        config.database.catalog_primary = Secret::new("");
        let text = check(&config).unwrap_err().to_string();
        for expected in [
            "auth.keys[0]",
            "rate_limit.trusted_proxies[1] \"10.0.0.0/33\"",
            "database.catalog is not a valid PostgreSQL connection string",
            "database.catalog_primary is required: region sg is home to shard(s) sg-1, sg-2",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
        assert_eq!(text.matches("\n  - ").count(), 4, "{text}");
    }

    #[test]
    fn internal_urls_must_be_https_with_a_host_and_no_path() {
        assert!(check_internal_url("https://edge-th.cartedge.internal:8443").is_ok());
        assert!(check_internal_url("https://127.0.0.1:8443/").is_ok());
        for bad in [
            "",
            "edge-th:8443",
            "http://edge-th:8443",
            "https://",
            "https://edge-th:8443/api",
            "https://edge th:8443",
        ] {
            assert!(check_internal_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_connection_string_error_never_echoes_the_value() {
        let config_text = "host=db password=hunter2hunter2 port=notaport";
        let error = config_text.parse::<tokio_postgres::Config>().unwrap_err();
        let text = postgres_parse_error(&error);
        assert_eq!(
            text,
            "invalid connection string: invalid value for option `port`"
        );
        let url = "postgres://u:hunter2hunter2@db:notaport/x";
        let error = url.parse::<tokio_postgres::Config>().unwrap_err();
        assert!(!postgres_parse_error(&error).contains("hunter2"), "{error}");
    }
}
