//! The multi-region topology an edge runs in: the ring, this region, and its peers.
//!
//! Built at start-up from the ring file and every region file in `topology.regions_dir`, and
//! again by a reload that brings another ring ([`Current`] holds the one requests use).
//! Peers' files are read leniently (only ids, currencies, URLs and which shards they list: their
//! secrets are not ours), but the whole set is validated: every shard of the ring has exactly one
//! home region with a primary there, every region can read every shard, no region or shard is
//! listed twice. This module reads files; it opens no sockets.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use serde::Deserialize;

use crate::config::{Config, ConfigError};
use crate::domain::ids::RegionId;
use crate::domain::money::Currency;
use crate::domain::ring::{Ring, RingSpec};

/// Another region's edge, as this edge needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: RegionId,
    pub currency: Currency,
    pub public_url: String,
    pub internal_url: String,
}

/// The ring plus every region, this one included.
#[derive(Debug)]
pub struct Topology {
    pub ring: Ring,
    /// This edge's region id.
    pub region: RegionId,
    /// Every region by id, this one included.
    pub regions: BTreeMap<RegionId, Peer>,
}

/// What a region file says about the topology, read without defaults or secrets.
#[derive(Debug, Deserialize)]
struct RegionView {
    region: RegionPart,
    #[serde(default)]
    edge: EdgePart,
    #[serde(default)]
    database: DatabasePart,
}

#[derive(Debug, Deserialize)]
struct RegionPart {
    id: RegionId,
    currency: Currency,
}

#[derive(Debug, Default, Deserialize)]
struct EdgePart {
    #[serde(default)]
    public_url: String,
    #[serde(default)]
    internal_url: String,
}

#[derive(Debug, Default, Deserialize)]
struct DatabasePart {
    #[serde(default)]
    shards: Vec<ShardPart>,
}

#[derive(Debug, Deserialize)]
struct ShardPart {
    id: String,
    #[serde(default)]
    primary: Option<String>,
    #[serde(default)]
    replica: Option<String>,
}

/// Reads and validates a ring file. A ring with `moving_from = N` also reads the ring it moves
/// from, kept beside it as `<stem>.v<N>.toml` (`config/ring.v1.toml` for `config/ring.toml`).
pub fn load_ring(path: &Path) -> Result<Ring, ConfigError> {
    let spec = read_ring_spec(path)?;
    let invalid = |path: &Path, e: crate::domain::ring::RingError| {
        ConfigError::Invalid(vec![format!("{}: {e}", path.display())])
    };
    let Some(from) = spec.moving_from else {
        return Ring::new(spec).map_err(|e| invalid(path, e));
    };
    let previous_path = previous_ring_path(path, from);
    let previous_spec = read_ring_spec(&previous_path)?;
    let previous = Ring::new(previous_spec).map_err(|e| invalid(&previous_path, e))?;
    Ring::moving(spec, previous).map_err(|e| invalid(path, e))
}

/// Where the ring of version `version` is kept while the ring at `path` moves from it.
pub fn previous_ring_path(path: &Path, version: u32) -> std::path::PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("ring");
    path.with_file_name(format!("{stem}.v{version}.toml"))
}

fn read_ring_spec(path: &Path) -> Result<RingSpec, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Problems of one region's shard list against the ring.
fn check_region(ring: &Ring, region: &str, shards: &[(String, bool, bool)]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for (id, has_primary, has_replica) in shards {
        if !listed.insert(id.as_str()) {
            problems.push(format!("region {region}: shard {id} is listed twice"));
        }
        let Some(spec) = ring.spec().shards.iter().find(|s| &s.id == id) else {
            problems.push(format!("region {region}: shard {id} is not in the ring"));
            continue;
        };
        if spec.home == region && !has_primary {
            problems.push(format!(
                "region {region}: shard {id} is homed here but has no primary"
            ));
        }
        if spec.home != region && *has_primary {
            problems.push(format!(
                "region {region}: shard {id} is homed in {} and must not list a primary here",
                spec.home
            ));
        }
        if !has_replica {
            problems.push(format!(
                "region {region}: shard {id} has no replica to read from"
            ));
        }
    }
    for spec in &ring.spec().shards {
        if !listed.contains(spec.id.as_str()) {
            problems.push(format!(
                "region {region} cannot read shard {} (not listed)",
                spec.id
            ));
        }
    }
    problems
}

impl Topology {
    /// Loads the ring and every region file, and validates the whole set and this edge's own
    /// configuration against it.
    pub fn load(config: &Config) -> Result<Topology, ConfigError> {
        let ring = load_ring(&config.topology.ring_file)?;
        let dir = &config.topology.regions_dir;
        let entries = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
            path: dir.clone(),
            source,
        })?;
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        let mut problems = Vec::new();
        let mut regions = BTreeMap::new();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let view: RegionView = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if stem != view.region.id {
                problems.push(format!(
                    "{}: region id {} differs from the file name",
                    path.display(),
                    view.region.id
                ));
            }
            // This region is checked from its effective configuration below, not its file.
            if view.region.id != config.region.id {
                let shards: Vec<(String, bool, bool)> = view
                    .database
                    .shards
                    .iter()
                    .map(|s| {
                        let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.is_empty());
                        (s.id.clone(), set(&s.primary), set(&s.replica))
                    })
                    .collect();
                problems.extend(check_region(&ring, &view.region.id, &shards));
                if view.edge.internal_url.is_empty() {
                    problems.push(format!(
                        "region {}: edge.internal_url is required",
                        view.region.id
                    ));
                }
            }
            let internal_url = config
                .topology
                .peer_urls
                .get(view.region.id.as_str())
                .cloned()
                .unwrap_or(view.edge.internal_url);
            let peer = Peer {
                id: view.region.id.clone(),
                currency: view.region.currency,
                public_url: view.edge.public_url,
                internal_url,
            };
            if regions.insert(view.region.id.clone(), peer).is_some() {
                problems.push(format!("region {} has two files", view.region.id));
            }
        }
        let own: Vec<(String, bool, bool)> = config
            .database
            .shards
            .iter()
            .map(|s| (s.id.clone(), !s.primary.is_empty(), !s.replica.is_empty()))
            .collect();
        problems.extend(check_region(&ring, &config.region.id, &own));
        regions.insert(
            config.region.id.clone(),
            Peer {
                id: config.region.id.clone(),
                currency: config.region.currency,
                public_url: config.edge.public_url.clone(),
                internal_url: config.edge.internal_url.clone(),
            },
        );
        for spec in &ring.spec().shards {
            if !regions.contains_key(&spec.home) {
                problems.push(format!(
                    "shard {} is homed in {}, which has no region file",
                    spec.id, spec.home
                ));
            }
        }
        if problems.is_empty() {
            Ok(Topology {
                ring,
                region: config.region.id.clone(),
                regions,
            })
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// The topology an edge runs on now, replaced whole when a reload brings another ring
/// ([`Current::replace`]); clones share it.
///
/// Each topology installed is leaked: [`Current::get`] hands out `&'static Topology`, so a
/// request's placement (which borrows shard and region ids from the ring) stays valid however
/// long the request runs, with no reference count taken per request. A topology is a few
/// kilobytes and is replaced only when the ring file changes (a shard added, a move settled),
/// a handful of times in an edge's life; a reload that changes nothing replaces nothing.
#[derive(Clone)]
pub struct Current(Arc<ArcSwap<&'static Topology>>);

impl Current {
    pub fn new(topology: Topology) -> Current {
        let leaked: &'static Topology = Box::leak(Box::new(topology));
        Current(Arc::new(ArcSwap::from_pointee(leaked)))
    }

    /// The topology requests use now.
    pub fn get(&self) -> &'static Topology {
        **self.0.load()
    }

    /// Installs `topology` for every request that starts from now on; returns it.
    pub fn replace(&self, topology: Topology) -> &'static Topology {
        let leaked: &'static Topology = Box::leak(Box::new(topology));
        self.0.store(Arc::new(leaked));
        leaked
    }
}

impl Topology {
    /// Whether `next` runs another ring: its file (shards, weights, version, markers) or the
    /// ring it moves from differs. What makes a reload install it.
    pub fn ring_differs(&self, next: &Topology) -> bool {
        let previous = |ring: &Ring| ring.previous().map(|p| p.spec().clone());
        self.ring.spec() != next.ring.spec() || previous(&self.ring) != previous(&next.ring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::ShardId;
    use crate::domain::ring::ShardSpec;

    fn ring() -> Ring {
        Ring::new(RingSpec {
            version: 1,
            vnodes: 200,
            moving_from: None,
            claims_from_global: false,
            shards: vec![
                ShardSpec {
                    id: ShardId::parse("a-1").unwrap(),
                    home: RegionId::parse("a").unwrap(),
                    weight: 1,
                },
                ShardSpec {
                    id: ShardId::parse("b-1").unwrap(),
                    home: RegionId::parse("b").unwrap(),
                    weight: 1,
                },
            ],
        })
        .unwrap()
    }

    #[test]
    fn a_region_must_hold_primaries_of_its_shards_and_replicas_of_all() {
        let good = vec![
            ("a-1".to_string(), true, true),
            ("b-1".to_string(), false, true),
        ];
        assert!(check_region(&ring(), "a", &good).is_empty());
        let missing_primary = vec![
            ("a-1".to_string(), false, true),
            ("b-1".to_string(), false, true),
        ];
        assert_eq!(check_region(&ring(), "a", &missing_primary).len(), 1);
        let foreign_primary = vec![
            ("a-1".to_string(), true, true),
            ("b-1".to_string(), true, true),
        ];
        assert_eq!(check_region(&ring(), "a", &foreign_primary).len(), 1);
        let unreadable = vec![("a-1".to_string(), true, true)];
        assert!(check_region(&ring(), "a", &unreadable)[0].contains("cannot read shard b-1"));
        let unknown = vec![
            ("a-1".to_string(), true, true),
            ("b-1".to_string(), false, true),
            ("z-9".to_string(), false, true),
        ];
        assert!(check_region(&ring(), "a", &unknown)[0].contains("not in the ring"));
    }
}
