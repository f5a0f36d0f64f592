//! The local cluster: `cartedge local up|down|partition|heal|link-proxy`, three regions (`sg`,
//! `id`, `th`) on 127.0.0.1 under `.cartedge/local/`. A module of the binary, not of the
//! library: it starts servers through `cartedge_dev::procs` (the process harness the tests
//! share), links the regions through `cartedge_dev::linkproxy` (which emulates the network
//! between them) and runs each edge as a `cartedge serve` process of its own, which writes JSON
//! lines to `edge-<region>.log` (named in `cluster.json`), detached or, in the foreground, tied
//! to this process.
//!
//! Per region: the primary of the shard homed there, a streaming replica of every other shard,
//! one Redis and one edge. Each region has its own catalog, the demo `sku-00001` … `sku-10000`
//! priced in its own currency with stock 1000, in its shard's database (`<region>-1`): its
//! edge reads and reserves on its primary, and the other regions read it through their
//! replicas of that shard (`database.peer_catalogs`). Every inter-region path — edge to edge
//! and every replication stream — runs through the link proxy with a one-way delay of half the
//! region pair's round trip. With `--with-prometheus` a Prometheus server scrapes every edge's
//! admin listener with the rules of `ops/prometheus/alerts.yml` loaded. This module is developer
//! tooling: the edge never calls it, and it parses no command line (`crate::cli` hands it plain
//! values).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use cartedge::config::{Config, Sources};
use cartedge_dev::ha::{Haproxy, Keeper, Monitor};
use cartedge_dev::linkproxy::{self, LinkProxy, LinkSpec};
use cartedge_dev::procs::{
    self, Lifetime, PgInstance, PgOptions, PrometheusInstance, RedisInstance,
};
use cartedge_dev::redis_ha::{RedisReplica, SentinelInstance};

/// Where the local cluster keeps its state unless told otherwise (`--dir`).
pub const DEFAULT_DIR: &str = ".cartedge/local";
/// Demo catalog size: `sku-00001` … `sku-10000`.
pub const DEMO_ITEMS: i32 = 10_000;
/// The database every local shard uses.
pub const DATABASE: &str = "cartedge";
/// The regions of the local cluster: id, currency, and the offset of its edge and admin ports.
pub const REGIONS: [(&str, &str, u16); 3] = [("sg", "SGD", 0), ("id", "IDR", 1), ("th", "THB", 2)];
/// The alert and recording rules `--with-prometheus` loads, as shipped in `ops/`.
const ALERT_RULES: &str = include_str!("../../ops/prometheus/alerts.yml");
/// How often the local Prometheus scrapes each edge and evaluates the rules: short, so a test or
/// a developer sees a change within seconds.
const PROMETHEUS_INTERVAL: &str = "1s";
/// Round trips between the regions, near real South-East Asian figures (ms).
pub const ROUND_TRIPS_MS: [(&str, &str, u64); 3] =
    [("sg", "id", 15), ("sg", "th", 30), ("id", "th", 45)];

/// The shard homed in a region of the local cluster.
fn shard_of(region: &str) -> String {
    format!("{region}-1")
}

/// One-way delay between two regions: half their round trip.
fn one_way_ms(a: &str, b: &str) -> u64 {
    ROUND_TRIPS_MS
        .iter()
        .find(|(x, y, _)| (*x == a && *y == b) || (*x == b && *y == a))
        .map(|(_, _, rtt)| rtt / 2)
        .unwrap_or(0)
}

/// `cluster.json`: what is running and where.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub regions: Vec<ClusterRegion>,
    /// The local Prometheus (`--with-prometheus`), e.g. `http://127.0.0.1:41234`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_url: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterRegion {
    pub id: String,
    /// Where shoppers connect: the edge, or in HA mode the region's HAProxy front.
    pub edge_url: String,
    /// The (first) edge's admin listener.
    pub admin_url: String,
    pub currency: String,
    /// The Redis the edges use (HA mode: the master when the cluster came up).
    pub redis_url: String,
    pub postgres: Vec<ClusterPostgres>,
    /// The (first) edge's JSON log file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// Every edge of the region (in HA mode two, behind HAProxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edges: Vec<ClusterEdge>,
    /// HA mode: the Redis master and its replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redis: Vec<ClusterRedis>,
    /// HA mode: the Sentinels watching the region's Redis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sentinels: Vec<ClusterRedis>,
    /// HA mode: the pg_auto_failover monitor of the region's formations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<ClusterMonitor>,
    /// HA mode: the HAProxy in front of the edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub haproxy: Option<ClusterHaproxy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterPostgres {
    /// `primary`, `standby` (the synchronous standby of a home shard) or `replica` (a
    /// cross-region streaming replica).
    pub role: String,
    pub shards: Vec<String>,
    pub dsn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// The postmaster's pid, or in HA mode for primary and standby the node's `pg_autoctl run`
    /// (leader of the node's process group: signal the group to take the whole node down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// HA mode: the node's name in its pg_auto_failover formation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterEdge {
    pub url: String,
    pub admin_url: String,
    /// Its listener for other regions' edges (behind HAProxy's internal front).
    #[serde(default)]
    pub internal: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRedis {
    /// `master` or `replica` (Redis); `sentinel`.
    pub role: String,
    pub url: String,
    pub pid: u32,
    /// Its working directory (log, and a sentinel's rewritten configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterMonitor {
    pub data_dir: PathBuf,
    /// pg_autoctl's own state (`XDG_*` directories) for this cluster.
    pub state_dir: PathBuf,
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterHaproxy {
    pub pid: u32,
    /// HAProxy's statistics page (`;csv` appended gives each server's state).
    pub stats_url: String,
}

/// Pids of a detached cluster, for `local down`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Pids {
    edges: Vec<u32>,
    postgres: Vec<u32>,
    redis: Vec<u32>,
    #[serde(default)]
    proxy: Vec<u32>,
    #[serde(default)]
    prometheus: Vec<u32>,
    /// HA mode: pg_autoctl process-group leaders (monitors and nodes), stopped with SIGTERM and
    /// then their whole group killed.
    #[serde(default)]
    groups: Vec<u32>,
    /// HA mode: HAProxy and Sentinel processes.
    #[serde(default)]
    ha: Vec<u32>,
}

impl Pids {
    fn read(dir: &Path) -> Option<Pids> {
        let text = std::fs::read_to_string(dir.join("pids.json")).ok()?;
        Some(serde_json::from_str(&text).unwrap_or_default())
    }

    fn all(&self) -> impl Iterator<Item = &u32> {
        self.edges
            .iter()
            .chain(&self.postgres)
            .chain(&self.redis)
            .chain(&self.proxy)
            .chain(&self.prometheus)
            .chain(&self.groups)
            .chain(&self.ha)
    }
}

/// Where the link proxy's control API listens (`proxy.json`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ProxyFile {
    pub control: SocketAddr,
    pub links: Vec<LinkSpec>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LocalSecrets {
    session_secret: String,
    jwt_secret: String,
}

/// Options of `cartedge local up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub dir: PathBuf,
    pub detach: bool,
    /// The `sg` edge's port; `id` and `th` use the next two.
    pub edge_port: u16,
    /// The `sg` admin port; `id` and `th` use the next two.
    pub admin_port: u16,
    /// Defaults file to layer under the generated region files (None: embedded).
    pub defaults: Option<PathBuf>,
    /// Also run a Prometheus server scraping every edge's admin listener, rules loaded.
    pub with_prometheus: bool,
    /// High availability: per region a pg_auto_failover monitor, a primary and a synchronous
    /// standby per home shard, a Redis master, replica and three Sentinels, and two edges
    /// behind HAProxy.
    pub ha: bool,
}

/// The generated region file of a local edge.
pub fn region_file(dir: &Path, region: &str) -> PathBuf {
    dir.join("regions").join(format!("{region}.toml"))
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn load_or_create_secrets(dir: &Path) -> Result<LocalSecrets> {
    let path = dir.join("secrets.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return serde_json::from_str(&text).context("reading secrets.json");
    }
    let secrets = LocalSecrets {
        session_secret: random_hex(32),
        jwt_secret: random_hex(32),
    };
    write_secret_file(&path, &serde_json::to_vec_pretty(&secrets)?)?;
    Ok(secrets)
}

/// Writes a file only its owner can read (it holds signing secrets): created with mode 0600,
/// never world-readable even for a moment, and narrowed to 0600 if it existed already.
fn write_secret_file(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    Ok(())
}

fn is_alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie still "exists", so also look at /proc state.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(false);
    exists && !zombie
}

/// Everything started for one run, so a failure part-way can stop what did start.
struct Started {
    postgres: Vec<PgInstance>,
    homes: Vec<HomeDb>,
    redis: Vec<RedisInstance>,
    haproxy: Vec<Haproxy>,
}

/// One edge's listeners.
#[derive(Debug, Clone, Copy)]
struct EdgeAddrs {
    edge: SocketAddr,
    admin: SocketAddr,
    internal: SocketAddr,
}

/// HA mode: the region's HAProxy listeners.
#[derive(Debug, Clone, Copy)]
struct Front {
    /// Shoppers' HTTP front (`edge_url`).
    public: SocketAddr,
    /// The TCP front other regions' edges reach this region through (mTLS passes through).
    internal: SocketAddr,
    /// HAProxy's statistics page.
    stats: SocketAddr,
}

/// The servers and files of one region.
struct RegionPlan {
    id: &'static str,
    currency: &'static str,
    /// One edge, or two in HA mode.
    edges: Vec<EdgeAddrs>,
    front: Option<Front>,
    /// Every listener above, bound from the start so no other process takes their ports while
    /// the cluster comes up; released just before HAProxy and the edges start.
    sockets: std::sync::Mutex<Option<Vec<std::net::TcpListener>>>,
}

impl RegionPlan {
    /// Where shoppers connect.
    fn public(&self) -> SocketAddr {
        self.front.map_or(self.edges[0].edge, |front| front.public)
    }

    /// The first edge's admin listener.
    fn admin(&self) -> SocketAddr {
        self.edges[0].admin
    }

    /// Where other regions' edges forward to.
    fn internal(&self) -> SocketAddr {
        self.front
            .map_or(self.edges[0].internal, |front| front.internal)
    }

    fn release_sockets(&self) {
        if let Ok(mut sockets) = self.sockets.lock() {
            sockets.take();
        }
    }
}

/// The database of a region's home shard: one primary, or in HA mode a pg_auto_failover
/// formation (its monitor, a primary and a synchronous standby).
enum HomeDb {
    Single(PgInstance),
    Formation {
        monitor: Monitor,
        nodes: Vec<Keeper>,
        state_dir: PathBuf,
    },
}

impl HomeDb {
    /// The DSN writes use: in HA mode every node, the writable one chosen at connect time.
    fn write_dsn(&self, dbname: &str) -> String {
        match self {
            HomeDb::Single(pg) => pg.dsn(dbname),
            HomeDb::Formation { nodes, .. } => multi_host_dsn(
                &nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
                dbname,
                "read-write",
            ),
        }
    }

    /// The DSN the home region reads with: in HA mode whichever node answers first.
    fn read_dsn(&self, dbname: &str) -> String {
        match self {
            HomeDb::Single(pg) => pg.dsn(dbname),
            HomeDb::Formation { nodes, .. } => multi_host_dsn(
                &nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
                dbname,
                "any",
            ),
        }
    }

    /// Each server's link-name suffix and port.
    fn nodes(&self) -> Vec<(String, u16)> {
        match self {
            HomeDb::Single(pg) => vec![(String::new(), pg.port)],
            HomeDb::Formation { nodes, .. } => nodes
                .iter()
                .map(|n| (format!("-{}", n.name), n.port))
                .collect(),
        }
    }

    /// The port of the server taking writes now.
    fn primary_port(&self) -> Result<u16> {
        match self {
            HomeDb::Single(pg) => Ok(pg.port),
            HomeDb::Formation { monitor, .. } => monitor
                .state()?
                .iter()
                .find(|n| n.is_writable_primary())
                .map(|n| n.nodeport)
                .context("the formation has no primary"),
        }
    }

    /// Pids to record for `local down`: postmasters, or process-group leaders.
    fn pids(&self) -> (Vec<u32>, Vec<u32>) {
        match self {
            HomeDb::Single(pg) => (vec![pg.pid()], Vec::new()),
            HomeDb::Formation { monitor, nodes, .. } => (
                Vec::new(),
                std::iter::once(monitor.pid())
                    .chain(nodes.iter().map(Keeper::pid))
                    .collect(),
            ),
        }
    }

    /// `cluster.json` entries of the home servers.
    fn cluster_entries(&self, shard: &str) -> Vec<ClusterPostgres> {
        match self {
            HomeDb::Single(pg) => vec![ClusterPostgres {
                role: "primary".into(),
                shards: vec![shard.to_string()],
                dsn: pg.dsn(DATABASE),
                data_dir: Some(pg.data_dir.clone()),
                pid: Some(pg.pid()),
                node: None,
            }],
            HomeDb::Formation { nodes, .. } => {
                let primary = self.primary_port().ok();
                nodes
                    .iter()
                    .map(|n| ClusterPostgres {
                        role: if Some(n.port) == primary {
                            "primary"
                        } else {
                            "standby"
                        }
                        .into(),
                        shards: vec![shard.to_string()],
                        dsn: n.dsn(DATABASE),
                        data_dir: Some(n.data_dir.clone()),
                        pid: Some(n.pid()),
                        node: Some(n.name.clone()),
                    })
                    .collect()
            }
        }
    }

    fn monitor_entry(&self) -> Option<ClusterMonitor> {
        match self {
            HomeDb::Single(_) => None,
            HomeDb::Formation {
                monitor, state_dir, ..
            } => Some(ClusterMonitor {
                data_dir: monitor.data_dir.clone(),
                state_dir: state_dir.clone(),
                pid: monitor.pid(),
            }),
        }
    }
}

/// `host=127.0.0.1,… port=P1,… user=postgres dbname=DB target_session_attrs=ATTRS`.
fn multi_host_dsn(ports: &[u16], dbname: &str, attrs: &str) -> String {
    let hosts = vec!["127.0.0.1"; ports.len()].join(",");
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "host={hosts} port={} user=postgres dbname={dbname} target_session_attrs={attrs}",
        ports.join(",")
    )
}

/// Starts a region's pg_auto_failover formation: the monitor, node `a` (the first primary)
/// and node `b` (its synchronous standby); returns once the formation has settled.
fn start_formation(root: &Path, lifetime: Lifetime) -> Result<HomeDb> {
    let state_dir = root.join("autoctl");
    let monitor = Monitor::start(&root.join("monitor").join("data"), &state_dir, lifetime)?;
    let a = Keeper::start(
        &monitor,
        &root.join("a").join("data"),
        "a",
        DATABASE,
        lifetime,
    )?;
    monitor.wait_for(FORMATION_READY, "the first node primary", |nodes| {
        nodes
            .iter()
            .any(|n| n.nodename == "a" && n.is_writable_primary())
    })?;
    let b = Keeper::start(
        &monitor,
        &root.join("b").join("data"),
        "b",
        DATABASE,
        lifetime,
    )?;
    monitor.wait_for(
        FORMATION_READY,
        "a primary and its synchronous standby",
        |nodes| cartedge_dev::ha::settled(nodes, 2),
    )?;
    Ok(HomeDb::Formation {
        monitor,
        nodes: vec![a, b],
        state_dir,
    })
}

/// How long a formation may take to come up.
const FORMATION_READY: Duration = Duration::from_secs(90);

async fn connect(dsn: &str) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, driver))
}

/// Brings the cluster up. In the foreground it serves until Ctrl-C/SIGTERM, then stops
/// everything; with `detach` it returns once every edge is ready. A failure part-way stops what
/// had started.
pub async fn up(options: UpOptions) -> Result<()> {
    std::fs::create_dir_all(&options.dir)?;
    let dir = options.dir.canonicalize()?;
    if Pids::read(&dir).is_some_and(|pids| pids.all().any(|p| is_alive(*p))) {
        bail!("a local cluster is already running here; stop it with `cartedge local down`");
    }
    let outcome = up_in(&dir, &options).await;
    if outcome.is_err()
        && options.detach
        && Pids::read(&dir).is_some_and(|pids| pids.all().count() > 0)
    {
        let _ = down(&dir);
    }
    outcome
}

async fn up_in(dir: &Path, options: &UpOptions) -> Result<()> {
    let dir = dir.to_path_buf();
    let plans: Vec<RegionPlan> = REGIONS
        .iter()
        .map(|(id, currency, offset)| -> Result<RegionPlan> {
            let bind = |port: u16| {
                std::net::TcpListener::bind(("127.0.0.1", port)).with_context(|| {
                    format!("127.0.0.1:{port} is taken; stop what uses it or pass --edge-port/--admin-port")
                })
            };
            let mut sockets = Vec::new();
            let mut bound = |port: u16| -> Result<SocketAddr> {
                let socket = bind(port)?;
                let address = socket.local_addr()?;
                sockets.push(socket);
                Ok(address)
            };
            let (edges, front) = if options.ha {
                let front = Front {
                    public: bound(options.edge_port + offset)?,
                    internal: bound(0)?,
                    stats: bound(0)?,
                };
                let first = EdgeAddrs {
                    edge: bound(0)?,
                    admin: bound(options.admin_port + offset)?,
                    internal: bound(0)?,
                };
                let second = EdgeAddrs {
                    edge: bound(0)?,
                    admin: bound(0)?,
                    internal: bound(0)?,
                };
                (vec![first, second], Some(front))
            } else {
                let only = EdgeAddrs {
                    edge: bound(options.edge_port + offset)?,
                    admin: bound(options.admin_port + offset)?,
                    internal: bound(0)?,
                };
                (vec![only], None)
            };
            Ok(RegionPlan {
                id,
                currency,
                edges,
                front,
                sockets: std::sync::Mutex::new(Some(sockets)),
            })
        })
        .collect::<Result<_>>()?;
    if options.ha {
        eprintln!("cartedge: checking packages (postgresql, redis-server, pg_auto_failover, redis-sentinel, haproxy)…");
        tokio::task::spawn_blocking(cartedge_dev::ha::ensure_ha_packages).await??;
    } else {
        eprintln!("cartedge: checking packages (postgresql, redis-server)…");
        tokio::task::spawn_blocking(procs::ensure_packages).await??;
    }
    let lifetime = if options.detach {
        Lifetime::Detached
    } else {
        Lifetime::TiedToParent
    };

    let pg_root = dir.join("postgres");
    let primaries: BTreeMap<String, HomeDb> = if options.ha {
        eprintln!("cartedge: starting a pg_auto_failover formation per region (monitor, primary, synchronous standby)…");
        let mut starting = Vec::new();
        for (region, _, _) in REGIONS {
            let root = pg_root.join(shard_of(region));
            starting.push((
                region,
                tokio::task::spawn_blocking(move || start_formation(&root, lifetime)),
            ));
        }
        let mut primaries = BTreeMap::new();
        for (region, task) in starting {
            let home = task
                .await?
                .with_context(|| format!("{region}: starting the shard's formation"))?;
            primaries.insert(region.to_string(), home);
        }
        primaries
    } else {
        eprintln!("cartedge: starting a primary per region…");
        let pg_root = pg_root.clone();
        tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, HomeDb>> {
            let mut primaries = BTreeMap::new();
            for (region, _, _) in REGIONS {
                let parent = pg_root.join(shard_of(region));
                std::fs::create_dir_all(&parent)?;
                let options = PgOptions {
                    lifetime,
                    fsync: true,
                    ..PgOptions::default()
                };
                primaries.insert(
                    region.to_string(),
                    HomeDb::Single(PgInstance::start(&parent.join("data"), options)?),
                );
            }
            Ok(primaries)
        })
        .await??
    };
    let mut started = Started {
        postgres: Vec::new(),
        homes: Vec::new(),
        redis: Vec::new(),
        haproxy: Vec::new(),
    };
    let mut pids = Pids::default();
    for home in primaries.values() {
        let (postmasters, groups) = home.pids();
        pids.postgres.extend(postmasters);
        pids.groups.extend(groups);
    }
    std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;

    for (region, primary) in &primaries {
        create_database(&primary.write_dsn("postgres"), DATABASE).await?;
        let applied = cartedge::store::migrate::run(&primary.write_dsn(DATABASE)).await?;
        if !applied.is_empty() {
            eprintln!(
                "cartedge: {region}: migrations applied: {}",
                applied.join(", ")
            );
        }
    }
    // Every region sells from its own catalog, priced in its own currency.
    for (region, currency, _) in REGIONS {
        let currency = cartedge::domain::money::Currency::parse(currency)
            .with_context(|| format!("{region}: currency {currency}"))?;
        let (catalog, driver) = connect(&primaries[region].write_dsn(DATABASE)).await?;
        cartedge::store::catalog::load_demo(&catalog, DEMO_ITEMS, currency).await?;
        drop(catalog);
        let _ = driver.await;
    }
    eprintln!("cartedge: demo catalog ready in every region ({DEMO_ITEMS} items each)");

    eprintln!("cartedge: starting a streaming replica of every other shard in each region…");
    // replicas[(region, home)] is `region`'s replica of the shard homed in `home`.
    let replica_plan: Vec<(String, String)> = REGIONS
        .iter()
        .flat_map(|(region, _, _)| {
            REGIONS
                .iter()
                .filter(move |(home, _, _)| home != region)
                .map(move |(home, _, _)| (region.to_string(), home.to_string()))
        })
        .collect();
    let mut replicas: BTreeMap<(String, String), PgInstance> = BTreeMap::new();
    for (region, home) in &replica_plan {
        let parent = pg_root.join(format!("{}-replica-{region}", shard_of(home)));
        std::fs::create_dir_all(&parent)?;
        let source = primaries[home].primary_port()?;
        let mut options = PgOptions {
            lifetime,
            fsync: true,
            ..PgOptions::default()
        };
        if matches!(primaries[home], HomeDb::Formation { .. }) {
            // A copy of a pg_auto_failover node: never use the formation's replication slots.
            options.extra_conf.push("primary_slot_name = ''".into());
            // A standby's limits must be at least its primary's (pg_auto_failover sets 12).
            options.extra_conf.push("max_wal_senders = 12".into());
            options.extra_conf.push("max_replication_slots = 12".into());
        }
        let replica = tokio::task::block_in_place(|| {
            PgInstance::start_replica_of(source, &parent.join("data"), options)
        })?;
        pids.postgres.push(replica.pid());
        replicas.insert((region.clone(), home.clone()), replica);
    }
    std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;

    // The link proxy: edge-to-edge links per ordered region pair, and one per replication stream.
    let mut links = Vec::new();
    for source in &plans {
        for target in plans.iter().filter(|t| t.id != source.id) {
            links.push(LinkSpec {
                name: format!("{}->{}:edge", source.id, target.id),
                a: source.id.into(),
                b: target.id.into(),
                listen: "127.0.0.1:0".parse()?,
                target: target.internal(),
                delay_ms: one_way_ms(source.id, target.id),
            });
        }
    }
    for (region, home) in replicas.keys() {
        for (suffix, port) in primaries[home].nodes() {
            links.push(LinkSpec {
                name: format!("{region}->{home}:pg-{}{suffix}", shard_of(home)),
                a: region.clone(),
                b: home.clone(),
                listen: "127.0.0.1:0".parse()?,
                target: SocketAddr::from(([127, 0, 0, 1], port)),
                delay_ms: one_way_ms(region, home),
            });
        }
    }
    let proxy_state = dir.join("proxy.json");
    let _ = std::fs::remove_file(&proxy_state);
    let (proxy_links, in_process_proxy) = if options.detach {
        // The detached proxy binds its own ports (no race for "free" ones) and reports them in
        // proxy.json once it listens.
        let spec_path = dir.join("links.json");
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&links)?)?;
        let log = std::fs::File::create(dir.join("link-proxy.log"))?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["local", "link-proxy", "--links"])
            .arg(&spec_path)
            .arg("--state")
            .arg(&proxy_state);
        let child = spawn_detached(command, log)?;
        pids.proxy.push(child);
        std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;
        let state = wait_for_proxy_state(&proxy_state, child, Duration::from_secs(10))
            .await
            .with_context(|| {
                format!(
                    "the link proxy did not start; see {}",
                    dir.join("link-proxy.log").display()
                )
            })?;
        (state.links, None)
    } else {
        let proxy = Arc::new(LinkProxy::start(links).await?);
        let resolved = proxy.links();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        write_proxy_state(
            &proxy_state,
            &ProxyFile {
                control: listener.local_addr()?,
                links: resolved.clone(),
            },
        )?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(linkproxy::serve_control(
            proxy.clone(),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        (resolved, Some((proxy, stop, task)))
    };
    let link_address = |name: &str| -> Result<SocketAddr> {
        proxy_links
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.listen)
            .with_context(|| format!("no link {name}"))
    };
    // Replication streams now go through the proxy (reloadable since PostgreSQL 13).
    // In HA mode a replica lists every node of the formation and follows whichever is
    // writable (after a failover, the new primary on its new timeline).
    for ((region, home), replica) in &replicas {
        let mut ports = Vec::new();
        for (suffix, _) in primaries[home].nodes() {
            let via = link_address(&format!("{region}->{home}:pg-{}{suffix}", shard_of(home)))?;
            ports.push(via.port().to_string());
        }
        let (client, driver) = connect(&replica.dsn("postgres")).await?;
        let hosts = vec!["127.0.0.1"; ports.len()].join(",");
        let conninfo = format!(
            "host={hosts} port={} user=postgres application_name={region} target_session_attrs=read-write",
            ports.join(",")
        );
        // ALTER SYSTEM takes no parameters; `conninfo` is built from our own numbers.
        client
            .batch_execute(&format!("ALTER SYSTEM SET primary_conninfo = '{conninfo}'"))
            .await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        drop(client);
        let _ = driver.await;
    }

    eprintln!("cartedge: starting Redis and edge certificates…");
    let mut redis_urls = BTreeMap::new();
    let mut redis_ha: BTreeMap<&str, RedisHa> = BTreeMap::new();
    let mut redis_pids: BTreeMap<&str, u32> = BTreeMap::new();
    for plan in &plans {
        let redis_dir = dir.join("redis").join(plan.id);
        std::fs::create_dir_all(&redis_dir)?;
        let redis =
            tokio::task::block_in_place(|| RedisInstance::start(&redis_dir, None, lifetime))?;
        pids.redis.push(redis.pid());
        redis_pids.insert(plan.id, redis.pid());
        redis_urls.insert(plan.id, redis.url());
        if options.ha {
            let ha = tokio::task::block_in_place(|| {
                start_redis_ha(&dir.join("redis"), plan.id, redis.port, lifetime)
            })?;
            pids.redis.push(ha.replica.pid());
            pids.ha
                .extend(ha.sentinels.iter().map(SentinelInstance::pid));
            redis_ha.insert(plan.id, ha);
        }
        started.redis.push(redis);
    }
    std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;
    let pki = dir.join("pki");
    cartedge::forward::tls::generate_local_pki(&pki, &REGIONS.map(|r| r.0))?;

    let secrets = load_or_create_secrets(&dir)?;
    let ring_path = dir.join("ring.toml");
    let mut ring = String::from("# Generated by `cartedge local up`: the local cluster's ring.\nversion = 1\nvnodes = 200\n");
    for (region, _, _) in REGIONS {
        ring.push_str(&format!(
            "\n[[shards]]\nid = \"{}\"\nhome = \"{region}\"\n",
            shard_of(region)
        ));
    }
    std::fs::write(&ring_path, ring)?;
    let regions_dir = dir.join("regions");
    std::fs::create_dir_all(&regions_dir)?;
    let mut cluster = ClusterFile {
        regions: Vec::new(),
        prometheus_url: None,
    };
    let mut configs = Vec::new();
    for plan in &plans {
        let primary = &primaries[plan.id];
        let mut shards = format!(
            "[[database.shards]]\nid = \"{}\"\nprimary = \"{}\"\nreplica = \"{}\"\n\n",
            shard_of(plan.id),
            primary.write_dsn(DATABASE),
            primary.read_dsn(DATABASE),
        );
        let mut postgres = primary.cluster_entries(&shard_of(plan.id));
        for ((region, home), replica) in &replicas {
            if region == plan.id {
                shards.push_str(&format!(
                    "[[database.shards]]\nid = \"{}\"\nreplica = \"{}\"\n\n",
                    shard_of(home),
                    replica.dsn(DATABASE)
                ));
                postgres.push(ClusterPostgres {
                    role: "replica".into(),
                    shards: vec![shard_of(home)],
                    dsn: replica.dsn(DATABASE),
                    data_dir: Some(replica.data_dir.clone()),
                    pid: Some(replica.pid()),
                    node: None,
                });
            }
        }
        // The region's own catalog is in its primary; the others' through its replicas of them.
        let (catalog, catalog_primary) = (primary.read_dsn(DATABASE), primary.write_dsn(DATABASE));
        let mut peer_catalogs = String::new();
        for ((region, home), replica) in &replicas {
            if region == plan.id {
                peer_catalogs.push_str(&format!("{home} = \"{}\"\n", replica.dsn(DATABASE)));
            }
        }
        let mut peer_urls = String::new();
        for other in plans.iter().filter(|o| o.id != plan.id) {
            let via = link_address(&format!("{}->{}:edge", plan.id, other.id))?;
            peer_urls.push_str(&format!("{} = \"https://{via}\"\n", other.id));
        }
        let text = format!(
            "# Generated by `cartedge local up`; local development only.\n\
             [region]\nid = \"{id}\"\ncurrency = \"{currency}\"\n\n\
             [edge]\npublic_url = \"http://{public}\"\ninternal_url = \"https://{internal_url}\"\n\n\
             [topology]\nring_file = \"{ring}\"\nregions_dir = \"{regions}\"\n\n\
             [topology.peer_urls]\n{peer_urls}\n\
             [server]\nlisten = \"{edge}\"\nadmin_listen = \"{admin}\"\ninternal_listen = \"{internal}\"\n{server_extra}\n\
             [tls]\nca_file = \"{pki}/ca.pem\"\ncert_file = \"{pki}/{id}.pem\"\nkey_file = \"{pki}/{id}.key\"\n\n\
             {redis}\n\
             [auth]\nissuer = \"cartedge-local\"\naudience = \"cartedge-api\"\nleeway = \"1s\"\n\
             session_secret = \"{session}\"\n\n\
             [[auth.keys]]\nkid = \"local-hs256\"\nalgorithm = \"HS256\"\nsecret = \"{jwt}\"\n\n\
             [log]\nformat = \"{log_format}\"\n\n\
             [database]\ncatalog = \"{catalog}\"\ncatalog_primary = \"{catalog_primary}\"\n\n\
             [database.peer_catalogs]\n{peer_catalogs}\n{shards}[rate_limit]\nedges = {edges}\n",
            id = plan.id,
            currency = plan.currency,
            public = plan.public(),
            internal_url = plan.internal(),
            edge = plan.edges[0].edge,
            admin = plan.edges[0].admin,
            internal = plan.edges[0].internal,
            // Behind HAProxy (checks every 1 s, out after 2 failures) a stopping edge stays
            // reachable long enough for HAProxy to stop sending it requests.
            server_extra = if options.ha { "drain_grace = \"3s\"\n" } else { "" },
            // Each of a region's edges enforces its share of the regional quotas.
            edges = plan.edges.len(),
            ring = ring_path.display(),
            regions = regions_dir.display(),
            pki = pki.display(),
            redis = redis_section(&redis_urls[plan.id], redis_ha.get(plan.id)),
            session = secrets.session_secret,
            jwt = secrets.jwt_secret,
            // Every edge writes its log file in JSON.
            log_format = "json",
        );
        let path = region_file(&dir, plan.id);
        write_secret_file(&path, text.as_bytes())?;
        cluster.regions.push(ClusterRegion {
            id: plan.id.into(),
            edge_url: format!("http://{}", plan.public()),
            admin_url: format!("http://{}", plan.admin()),
            currency: plan.currency.into(),
            redis_url: redis_urls[plan.id].clone(),
            postgres,
            log: Some(edge_log(&dir, plan.id)),
            edges: Vec::new(),
            redis: Vec::new(),
            sentinels: Vec::new(),
            monitor: primary.monitor_entry(),
            haproxy: None,
        });
        if let (Some(ha), Some(region)) = (redis_ha.get(plan.id), cluster.regions.last_mut()) {
            region.redis = vec![
                ClusterRedis {
                    role: "master".into(),
                    url: redis_urls[plan.id].clone(),
                    pid: redis_pids[plan.id],
                    dir: Some(dir.join("redis").join(plan.id)),
                },
                ClusterRedis {
                    role: "replica".into(),
                    url: ha.replica.url(),
                    pid: ha.replica.pid(),
                    dir: Some(ha.replica.dir.clone()),
                },
            ];
            region.sentinels = ha
                .sentinels
                .iter()
                .map(|s| ClusterRedis {
                    role: "sentinel".into(),
                    url: s.url(),
                    pid: s.pid(),
                    dir: Some(s.dir.clone()),
                })
                .collect();
        }
        configs.push(path);
    }
    let mut loaded = Vec::new();
    for path in &configs {
        let sources = Sources::new(options.defaults.clone(), Some(path.clone()));
        loaded.push(Config::load(&sources, std::env::vars())?);
    }
    let prometheus = if options.with_prometheus {
        let prometheus = start_prometheus(&dir, &plans, lifetime).await?;
        pids.prometheus.push(prometheus.pid());
        std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;
        cluster.prometheus_url = Some(prometheus.url());
        Some(prometheus)
    } else {
        None
    };
    started.homes.extend(primaries.into_values());
    started.postgres.extend(replicas.into_values());

    // HA mode: HAProxy in front of each region's edges, checking each edge's /ready.
    if options.ha {
        for (plan, region) in plans.iter().zip(&mut cluster.regions) {
            let (Some(front), true) = (plan.front, plan.edges.len() > 1) else {
                continue;
            };
            plan.release_sockets();
            let root = dir.join("haproxy").join(plan.id);
            let config = haproxy_config(plan, &front);
            let haproxy = tokio::task::block_in_place(|| {
                Haproxy::start(&root, &config, front.stats.port(), lifetime)
            })?;
            pids.ha.push(haproxy.pid());
            region.haproxy = Some(ClusterHaproxy {
                pid: haproxy.pid(),
                stats_url: format!("http://{}/stats", front.stats),
            });
            started.haproxy.push(haproxy);
            std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;
        }
    }

    // Every edge is a process of its own (`cartedge serve`) writing JSON lines to its log file,
    // detached or, in the foreground, tied to this process (killed if it dies). A region's
    // second edge (HA mode) runs the same region file with its own listeners.
    let mut edge_children = Vec::new();
    for ((path, plan), region) in configs.iter().zip(&plans).zip(&mut cluster.regions) {
        // Release the reserved ports only now, a moment before the edges bind them.
        plan.release_sockets();
        for (index, addrs) in plan.edges.iter().enumerate() {
            let log_path = edge_log_n(&dir, plan.id, index);
            let log = std::fs::File::create(&log_path)?;
            let command = edge_command(path, options.defaults.as_deref(), index, addrs)?;
            let child = spawn_logging(command, log, lifetime)?;
            pids.edges.push(child.id());
            region.edges.push(ClusterEdge {
                url: format!("http://{}", addrs.edge),
                admin_url: format!("http://{}", addrs.admin),
                internal: addrs.internal.to_string(),
                pid: child.id(),
                log: Some(log_path),
            });
            edge_children.push(child);
            std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;
        }
    }
    for plan in &plans {
        for (index, addrs) in plan.edges.iter().enumerate() {
            let log = edge_log_n(&dir, plan.id, index);
            wait_ready(addrs.admin, Duration::from_secs(30))
                .await
                .with_context(|| {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                    format!(
                        "the {} edge did not become ready; last lines of {}:\n{}",
                        plan.id,
                        log.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })?;
        }
        if let Some(front) = plan.front {
            wait_haproxy_up(front.stats, plan.edges.len(), Duration::from_secs(15))
                .await
                .with_context(|| format!("{}: HAProxy does not see every edge up", plan.id))?;
        }
    }
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_vec_pretty(&cluster)?,
    )?;
    print_banner(&loaded, &cluster, &dir);
    print_prometheus(prometheus.as_ref());
    if options.detach {
        // Detached servers keep running; their handles must not stop them.
        if let Some(prometheus) = prometheus {
            std::mem::forget(prometheus);
        }
        for pg in started.postgres {
            std::mem::forget(pg);
        }
        for home in started.homes {
            std::mem::forget(home);
        }
        for haproxy in started.haproxy {
            std::mem::forget(haproxy);
        }
        for ha in redis_ha.into_values() {
            std::mem::forget(ha);
        }
        for redis in started.redis {
            std::mem::forget(redis);
        }
        return Ok(());
    }

    eprintln!(
        "cartedge: serving in the foreground (edge logs: {}); Ctrl-C stops everything",
        dir.join("edge-<region>.log").display()
    );
    wait_for_stop_signal().await;
    // Each edge drains (SIGTERM) before the databases and caches behind it stop.
    for pid in &pids.edges {
        procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(20))?;
    }
    for mut child in edge_children {
        let _ = child.wait();
    }
    if let Some((proxy, stop, task)) = in_process_proxy {
        let _ = stop.send(());
        let _ = task.await;
        drop(proxy);
    }
    drop(prometheus);
    drop(started);
    for file in ["pids.json", "cluster.json", "proxy.json"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    eprintln!("cartedge: local cluster stopped");
    Ok(())
}

/// Writes `prometheus/prometheus.yml` (every edge's admin listener as a target labelled with its
/// region, scraped every [`PROMETHEUS_INTERVAL`]) and `prometheus/alerts.yml`, then starts
/// Prometheus on a free loopback port with its data in `prometheus/data`.
async fn start_prometheus(
    dir: &Path,
    plans: &[RegionPlan],
    lifetime: Lifetime,
) -> Result<PrometheusInstance> {
    eprintln!("cartedge: starting Prometheus…");
    tokio::task::spawn_blocking(procs::ensure_prometheus).await??;
    let root = dir.join("prometheus");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("alerts.yml"), ALERT_RULES)?;
    let config = root.join("prometheus.yml");
    std::fs::write(&config, prometheus_config(plans))?;
    let data = root.join("data");
    tokio::task::spawn_blocking(move || PrometheusInstance::start(&config, &data, None, lifetime))
        .await?
}

/// The local Prometheus' configuration: one `cartedge` job, a static target per region.
fn prometheus_config(plans: &[RegionPlan]) -> String {
    let mut targets = String::new();
    for plan in plans {
        for edge in &plan.edges {
            targets.push_str(&format!(
                "      - targets: [\"{admin}\"]\n        labels:\n          region: \"{id}\"\n",
                admin = edge.admin,
                id = plan.id
            ));
        }
    }
    format!(
        "# Generated by `cartedge local up --with-prometheus`; local development only.\n\
         global:\n  scrape_interval: {PROMETHEUS_INTERVAL}\n  scrape_timeout: {PROMETHEUS_INTERVAL}\n\
         \x20 evaluation_interval: {PROMETHEUS_INTERVAL}\n\n\
         rule_files:\n  - alerts.yml\n\n\
         scrape_configs:\n  - job_name: cartedge\n    metrics_path: /metrics\n    static_configs:\n{targets}"
    )
}

fn print_prometheus(prometheus: Option<&PrometheusInstance>) {
    if let Some(prometheus) = prometheus {
        println!(
            "  prometheus {}  (every edge's /metrics each {PROMETHEUS_INTERVAL}, ops/prometheus/alerts.yml loaded; log {})\n",
            prometheus.url(),
            prometheus.log_path().display()
        );
    }
}

/// An edge's log file (its stderr: JSON lines).
fn edge_log(dir: &Path, region: &str) -> PathBuf {
    dir.join(format!("edge-{region}.log"))
}

/// The log of a region's edge number `index`: `edge-<region>.log`, then `edge-<region>-b.log`.
fn edge_log_n(dir: &Path, region: &str, index: usize) -> PathBuf {
    if index == 0 {
        edge_log(dir, region)
    } else {
        dir.join(format!("edge-{region}-{}.log", edge_letter(index)))
    }
}

/// `a`, `b`, … for a region's edges.
fn edge_letter(index: usize) -> char {
    char::from(b'a' + u8::try_from(index % 26).unwrap_or(0))
}

/// `cartedge --config <region file> serve`; every edge after the first has its own listeners
/// (environment overrides of `server.*`).
fn edge_command(
    region_file: &Path,
    defaults: Option<&Path>,
    index: usize,
    addrs: &EdgeAddrs,
) -> Result<Command> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--config").arg(region_file);
    if let Some(defaults) = defaults {
        command.arg("--defaults").arg(defaults);
    }
    command.arg("serve");
    if index > 0 {
        let prefix = cartedge::config::ENV_PREFIX;
        command
            .env(format!("{prefix}SERVER__LISTEN"), addrs.edge.to_string())
            .env(
                format!("{prefix}SERVER__ADMIN_LISTEN"),
                addrs.admin.to_string(),
            )
            .env(
                format!("{prefix}SERVER__INTERNAL_LISTEN"),
                addrs.internal.to_string(),
            );
    }
    Ok(command)
}

/// The `[redis]` section of a region file: the one Redis, or in HA mode the Sentinels that
/// name the master.
fn redis_section(url: &str, ha: Option<&RedisHa>) -> String {
    match ha {
        None => format!("[redis]\nurl = \"{url}\"\n"),
        Some(ha) => {
            let sentinels: Vec<String> = ha
                .sentinels
                .iter()
                .map(|s| format!("\"{}\"", s.url()))
                .collect();
            format!(
                "[redis]\nsentinels = [{}]\nmaster_name = \"{}\"\n",
                sentinels.join(", "),
                ha.master_name
            )
        }
    }
}

/// HA mode: a region's Redis replica and the three Sentinels watching its master.
struct RedisHa {
    master_name: String,
    replica: RedisReplica,
    sentinels: Vec<SentinelInstance>,
}

/// The Sentinel name of a region's Redis master.
pub fn redis_master_name(region: &str) -> String {
    format!("cartedge-{region}")
}

/// Starts a replica of the region's Redis master and three Sentinels (quorum 2), and waits
/// until they know each other: only then can they fail over.
fn start_redis_ha(
    root: &Path,
    region: &str,
    master_port: u16,
    lifetime: Lifetime,
) -> Result<RedisHa> {
    let master_name = redis_master_name(region);
    let replica_dir = root.join(format!("{region}-replica"));
    std::fs::create_dir_all(&replica_dir)?;
    let replica = RedisReplica::start(&replica_dir, None, master_port, lifetime)?;
    replica.wait_synced(Duration::from_secs(15))?;
    let mut sentinels = Vec::new();
    for n in 1..=3 {
        let sentinel_dir = root.join(format!("{region}-sentinel-{n}"));
        std::fs::create_dir_all(&sentinel_dir)?;
        sentinels.push(SentinelInstance::start(
            &sentinel_dir,
            &master_name,
            master_port,
            2,
            lifetime,
        )?);
    }
    for sentinel in &sentinels {
        sentinel.wait_monitoring(1, 2, Duration::from_secs(20))?;
    }
    Ok(RedisHa {
        master_name,
        replica,
        sentinels,
    })
}

/// HAProxy's configuration for a region: the shoppers' HTTP front balanced over the edges'
/// public listeners, the TCP front other regions forward to (mTLS passes through) over their
/// internal listeners, each server checked with `GET /ready` on its admin listener every
/// second (down after two failures, up after one success: a draining or dead edge is out
/// within two checks), and a statistics page.
fn haproxy_config(plan: &RegionPlan, front: &Front) -> String {
    let mut public = String::new();
    let mut internal = String::new();
    for (index, edge) in plan.edges.iter().enumerate() {
        let name = format!("edge-{}", edge_letter(index));
        public.push_str(&format!(
            "    server {name} {} check port {}\n",
            edge.edge,
            edge.admin.port()
        ));
        internal.push_str(&format!(
            "    server {name} {} check port {}\n",
            edge.internal,
            edge.admin.port()
        ));
    }
    format!(
        "# Generated by `cartedge local up --ha` for region {id}; local development only.\n\
         global\n    maxconn 4096\n\n\
         defaults\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n\
         \x20   timeout http-keep-alive 60s\n    retries 3\n    option redispatch\n\n\
         frontend public\n    mode http\n    bind {public_front}\n    default_backend edges\n\n\
         backend edges\n    mode http\n    balance roundrobin\n\
         \x20   # A connection refused or closed before any answer (an edge stopping) is retried\n\
         \x20   # on the other edge: the request never reached the first one.\n\
         \x20   retry-on conn-failure empty-response\n\
         \x20   option httpchk GET /ready\n    http-check expect status 200\n\
         \x20   default-server inter 1s fall 2 rise 1\n{public}\n\
         frontend internal\n    mode tcp\n    bind {internal_front}\n    default_backend internal\n\n\
         backend internal\n    mode tcp\n    balance roundrobin\n\
         \x20   option httpchk GET /ready\n    http-check expect status 200\n\
         \x20   default-server inter 1s fall 2 rise 1\n{internal}\n\
         listen stats\n    mode http\n    bind {stats}\n    stats enable\n    stats uri /stats\n",
        id = plan.id,
        public_front = front.public,
        internal_front = front.internal,
        stats = front.stats,
    )
}

/// How many servers of HAProxy's `edges` backend are UP, from its CSV statistics.
async fn haproxy_servers_up(stats: SocketAddr) -> Result<usize> {
    let states = haproxy_states(&format!("http://{stats}/stats")).await?;
    Ok(states.iter().filter(|(_, status)| status == "UP").count())
}

/// Waits until HAProxy's `edges` backend has `count` servers UP.
async fn wait_haproxy_up(stats: SocketAddr, count: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let up = haproxy_servers_up(stats).await.unwrap_or(0);
        if up >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{up} of {count} edges up after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Spawns a process with its output to `log`, detached or tied to this process.
fn spawn_logging(
    mut command: Command,
    log: std::fs::File,
    lifetime: Lifetime,
) -> Result<std::process::Child> {
    command.stdout(log.try_clone()?).stderr(log);
    procs::spawn_server(command, lifetime)
}

/// Returns on Ctrl-C (SIGINT) or SIGTERM.
async fn wait_for_stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Spawns a process in its own session with output to `log`; returns its pid.
fn spawn_detached(mut command: Command, log: std::fs::File) -> Result<u32> {
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    #[cfg(unix)]
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(command.spawn().context("starting a detached process")?.id())
}

/// Runs the link proxy of a detached cluster until SIGTERM (`cartedge local link-proxy`):
/// binds every link and the control API, then writes where they listen to `state`.
pub async fn run_link_proxy(links: &Path, state: &Path) -> Result<()> {
    let specs: Vec<LinkSpec> = serde_json::from_slice(&std::fs::read(links)?)?;
    let proxy = Arc::new(LinkProxy::start(specs).await?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    write_proxy_state(
        state,
        &ProxyFile {
            control: listener.local_addr()?,
            links: proxy.links(),
        },
    )?;
    linkproxy::serve_control(proxy, listener, cartedge::server::shutdown_signal()).await;
    Ok(())
}

/// Writes proxy.json atomically (readers never see half a file).
fn write_proxy_state(path: &Path, state: &ProxyFile) -> Result<()> {
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

async fn wait_for_proxy_state(path: &Path, pid: u32, limit: Duration) -> Result<ProxyFile> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(bytes) = std::fs::read(path) {
            return Ok(serde_json::from_slice(&bytes)?);
        }
        if !is_alive(pid) {
            bail!("the link proxy exited");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no {} after {limit:?}", path.display())
}

/// [`steer`] without printing (the drills).
pub async fn steer_quietly(dir: &Path, verb: &str, a: &str, b: &str) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("proxy.json"))
        .with_context(|| format!("no running local cluster in {}", dir.display()))?;
    let proxy: ProxyFile = serde_json::from_str(&text)?;
    let (status, body) =
        linkproxy::control_request(proxy.control, "POST", &format!("/{verb}?a={a}&b={b}")).await?;
    if status != 200 {
        bail!("{verb} {a} {b}: {body}");
    }
    Ok(())
}

/// Cuts (`partition`) or restores (`heal`) every link between two regions of a running local
/// cluster.
pub async fn steer(dir: &Path, verb: &str, a: &str, b: &str) -> Result<()> {
    steer_quietly(dir, verb, a, b).await?;
    let verb_done = if verb == "partition" {
        "partitioned"
    } else {
        "healed"
    };
    println!("{verb_done} {a} <-> {b}");
    Ok(())
}

async fn create_database(admin_dsn: &str, name: &str) -> Result<()> {
    let (client, driver) = connect(admin_dsn).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // Identifiers cannot be parameters; `name` is our own constant, quoted anyway.
        client
            .batch_execute(&format!("CREATE DATABASE \"{}\"", name.replace('"', "")))
            .await?;
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// `cartedge local reload`: rolls `<dir>/ring.toml` (checked first) to every edge of the
/// running cluster; returns its version.
pub async fn reload(dir: &Path) -> Result<u32> {
    let cluster = read_cluster(dir)
        .with_context(|| format!("no local cluster is running in {}", dir.display()))?;
    let ring = cartedge::topology::load_ring(&dir.join("ring.toml"))?;
    let version = ring.spec().version;
    roll_ring(&cluster, &ring).await?;
    Ok(version)
}

/// How long an edge may take to serve a ring it was told to reload.
const RING_ROLL_LIMIT: Duration = Duration::from_secs(20);

/// Sends SIGHUP to every edge of the cluster in turn and waits, each time, until that edge's
/// `/health` names `ring`: its version, fingerprint and markers (a reload that refuses the
/// files leaves the old ring, and the roll stops there with the edge's log named).
pub async fn roll_ring(cluster: &ClusterFile, ring: &cartedge::domain::ring::Ring) -> Result<()> {
    let wanted = serde_json::json!({
        "version": ring.spec().version,
        "fingerprint": ring.fingerprint(),
        "moving_from": ring.spec().moving_from,
        "claims_from_global": ring.claims_from_global(),
    });
    for region in &cluster.regions {
        for edge in &region.edges {
            // SAFETY: kill(2) with a pid this cluster started; no memory is involved.
            if unsafe { libc::kill(edge.pid as libc::pid_t, libc::SIGHUP) } != 0 {
                bail!(
                    "the {} edge (pid {}) is not running: {}",
                    region.id,
                    edge.pid,
                    std::io::Error::last_os_error()
                );
            }
            let admin: SocketAddr = edge
                .admin_url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()
                .with_context(|| format!("admin URL {}", edge.admin_url))?;
            wait_for_ring(admin, &wanted, RING_ROLL_LIMIT)
                .await
                .with_context(|| {
                    format!(
                        "the {} edge did not take ring {wanted} (see {})",
                        region.id,
                        edge.log
                            .as_deref()
                            .map_or_else(|| "its log".to_string(), |p| p.display().to_string())
                    )
                })?;
        }
    }
    Ok(())
}

/// Polls `GET /health` on an admin listener until its `ring` is `wanted`.
async fn wait_for_ring(
    admin: SocketAddr,
    wanted: &serde_json::Value,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut seen = None;
    while Instant::now() < deadline {
        if let Some((_, body)) = admin_get(admin, "/health").await {
            seen = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .map(|health| health["ring"].clone());
            if seen.as_ref() == Some(wanted) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("still on ring {seen:?} after {limit:?}")
}

async fn wait_ready(admin: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some((200, _)) = admin_get(admin, "/ready").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("not ready after {limit:?}")
}

/// `GET path` on an edge's admin listener (plain HTTP, one connection per call): the status and
/// the body, or None when the edge did not answer.
async fn admin_get(admin: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    let status = std::str::from_utf8(answer.get(9..12)?).ok()?.parse().ok()?;
    let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, answer.split_off(body_at)))
}

fn print_banner(configs: &[Config], cluster: &ClusterFile, dir: &Path) {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| {
            std::env::current_dir().ok().and_then(|cwd| {
                p.strip_prefix(&cwd)
                    .ok()
                    .map(|r| format!("./{}", r.display()))
            })
        })
        .unwrap_or_else(|| "cartedge".into());
    let mut lines = String::from("\ncartedge local cluster is up\n\n");
    let edge = |id: &str| {
        cluster
            .regions
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.edge_url.clone())
            .unwrap_or_default()
    };
    for config in configs {
        lines.push_str(&format!(
            "  region {}  edge {}  admin http://{}  ({})\n",
            config.region.id,
            edge(config.region.id.as_str()),
            config
                .server
                .admin_listen
                .map(|a| a.to_string())
                .unwrap_or_default(),
            config.region.currency
        ));
    }
    let (sg, th) = (edge("sg"), edge("th"));
    let user = "alice";
    lines.push_str(&format!(
        "  state      {}\n\nTry it ({user} shops in Singapore: her token's region claim homes her cart in sg, `{exe} ring locate u:{user} --region sg --ring {}`):\n\
         \n  TOKEN=$({exe} token --sub {user} --region sg)\
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\
         \n       -d '{{\"item_id\":\"sku-00001\",\"quantity\":2}}' {sg}/api/v1/cart/items\
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" {sg}/api/v1/cart\
         \n  curl -s -X PUT -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\
         \n       -d '{{\"quantity\":5}}' {sg}/api/v1/cart/items/sku-00001\
         \n  curl -si -X DELETE -H \"Authorization: Bearer $TOKEN\" {th}/api/v1/cart/items/sku-00001   # via th: see Cart-Home-Region, Cart-Version\
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Cart-Min-Version: 3' {th}/api/v1/cart   # read-your-writes anywhere\
         \n  curl -si -H 'Content-Type: application/json' -d '{{\"item_id\":\"sku-00002\",\"quantity\":1}}' {sg}/api/v1/cart/items   # guest: note Cart-Session\
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Cart-Session: <it>' -X POST {sg}/api/v1/cart/merge   # log-in: guest cart into {user}'s\
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Idempotency-Key: co-1' -X POST {sg}/api/v1/cart/checkout   # order, stock reserved\
         \n  curl -s {sg}/health\
         \n  {exe} local partition sg th   # then writes at th for sg carts get 503; `{exe} local heal sg th`\n",
        dir.join("cluster.json").display(),
        dir.join("ring.toml").display(),
    ));
    println!("{lines}");
}

/// Stops a detached cluster started in `dir`.
pub fn down(dir: &Path) -> Result<()> {
    let Some(pids) = Pids::read(dir) else {
        println!("no local cluster is running in {}", dir.display());
        return Ok(());
    };
    for pid in &pids.edges {
        procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(20))?;
    }
    for pid in &pids.proxy {
        procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(10))?;
    }
    for pid in &pids.prometheus {
        procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(10))?;
    }
    for pid in &pids.ha {
        procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(10))?;
    }
    for pid in &pids.postgres {
        procs::stop_pid(*pid, libc::SIGINT, Duration::from_secs(20))?;
    }
    // pg_autoctl nodes, then monitors (recorded last): SIGTERM stops Postgres; whatever of the
    // group is left after that is killed.
    for pid in pids.groups.iter().rev() {
        let _ = procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(20));
        cartedge_dev::ha::signal_group(*pid, libc::SIGKILL);
    }
    for pid in &pids.redis {
        procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(10))?;
    }
    for file in ["pids.json", "cluster.json", "proxy.json"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    println!("local cluster stopped");
    Ok(())
}

/// `cartedge local status`: cluster.json as the cluster is now. In HA mode each home shard's
/// roles come from its pg_auto_failover monitor (`primary`, `standby`; a node the monitor
/// cannot reach stays listed with its last role and `"pid"` only if it is alive), and each
/// region's Redis roles from its Sentinels.
pub async fn status(dir: &Path) -> Result<()> {
    let cluster = current(dir).await?;
    println!("{}", serde_json::to_string_pretty(&cluster)?);
    Ok(())
}

/// cluster.json as written.
pub fn read_cluster(dir: &Path) -> Result<ClusterFile> {
    let text = std::fs::read_to_string(dir.join("cluster.json"))
        .with_context(|| format!("no running local cluster in {}", dir.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// cluster.json refreshed from the running processes (what `local status` prints).
pub async fn current(dir: &Path) -> Result<ClusterFile> {
    let mut cluster = read_cluster(dir)?;
    for region in &mut cluster.regions {
        refresh_region(region).await;
    }
    Ok(cluster)
}

/// Records a process that replaced another (a drill restarted an edge or a database node):
/// `local down` stops the new one, and cluster.json names it.
fn replace_pid(dir: &Path, old: u32, new: u32) -> Result<()> {
    if let Some(mut pids) = Pids::read(dir) {
        for list in [
            &mut pids.edges,
            &mut pids.postgres,
            &mut pids.redis,
            &mut pids.groups,
            &mut pids.ha,
        ] {
            for pid in list.iter_mut().filter(|pid| **pid == old) {
                *pid = new;
            }
        }
        std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;
    }
    let mut cluster = read_cluster(dir)?;
    for region in &mut cluster.regions {
        for edge in region.edges.iter_mut().filter(|e| e.pid == old) {
            edge.pid = new;
        }
        for server in region.postgres.iter_mut().filter(|p| p.pid == Some(old)) {
            server.pid = Some(new);
        }
        for redis in region.redis.iter_mut().chain(&mut region.sentinels) {
            if redis.pid == old {
                redis.pid = new;
            }
        }
    }
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_vec_pretty(&cluster)?,
    )?;
    Ok(())
}

/// Starts a region's edge number `index` again (detached, its log appended), after a drill
/// stopped or killed it; returns its pid once its `/ready` answers 200.
pub async fn restart_edge(
    dir: &Path,
    defaults: Option<&Path>,
    region: &str,
    index: usize,
    edge: &ClusterEdge,
) -> Result<u32> {
    let parse = |url: &str| -> Result<SocketAddr> {
        url.trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("edge address {url}"))
    };
    let addrs = EdgeAddrs {
        edge: parse(&edge.url)?,
        admin: parse(&edge.admin_url)?,
        internal: parse(&edge.internal)?,
    };
    let command = edge_command(&region_file(dir, region), defaults, index, &addrs)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(edge_log_n(dir, region, index))?;
    let child = spawn_logging(command, log, Lifetime::Detached)?;
    let pid = child.id();
    replace_pid(dir, edge.pid, pid)?;
    wait_ready(addrs.admin, Duration::from_secs(30)).await?;
    Ok(pid)
}

/// Starts a killed PostgreSQL server (not a pg_auto_failover node) again from its data
/// directory on its port, detached; returns its new pid. Retried for a few seconds: the
/// killed postmaster's backends may still hold its shared memory.
pub async fn restart_postgres(dir: &Path, server: &ClusterPostgres) -> Result<u32> {
    let data_dir = server
        .data_dir
        .clone()
        .context("the server has no data directory")?;
    let port: u16 = server
        .dsn
        .split_whitespace()
        .find_map(|part| part.strip_prefix("port="))
        .and_then(|port| port.parse().ok())
        .context("no port in the server's dsn")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pg = loop {
        let data_dir = data_dir.clone();
        let started = tokio::task::spawn_blocking(move || {
            PgInstance::start(
                &data_dir,
                PgOptions {
                    port: Some(port),
                    lifetime: Lifetime::Detached,
                    fsync: true,
                    ..PgOptions::default()
                },
            )
        })
        .await?;
        match started {
            Ok(pg) => break pg,
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let pid = pg.pid();
    std::mem::forget(pg);
    if let Some(old) = server.pid {
        replace_pid(dir, old, pid)?;
    }
    Ok(pid)
}

/// Runs a killed pg_auto_failover node again (detached); pg_auto_failover decides its role.
pub fn rerun_node(dir: &Path, monitor: &ClusterMonitor, server: &ClusterPostgres) -> Result<u32> {
    let data_dir = server
        .data_dir
        .as_ref()
        .context("the node has no data directory")?;
    let node = server.node.as_deref().unwrap_or("node");
    let log = data_dir
        .parent()
        .map(|parent| parent.join(format!("{node}.log")))
        .context("the node's data directory has no parent")?;
    let pid = cartedge_dev::ha::rerun_node(data_dir, &monitor.state_dir, &log, Lifetime::Detached)?;
    if let Some(old) = server.pid {
        replace_pid(dir, old, pid)?;
    } else {
        // The old pid is gone from cluster.json (dead): match the node by its data directory.
        let mut cluster = read_cluster(dir)?;
        for region in &mut cluster.regions {
            for entry in region
                .postgres
                .iter_mut()
                .filter(|p| p.data_dir == server.data_dir)
            {
                if let Some(old) = entry.pid.replace(pid) {
                    replace_pid(dir, old, pid)?;
                }
            }
        }
        std::fs::write(
            dir.join("cluster.json"),
            serde_json::to_vec_pretty(&cluster)?,
        )?;
    }
    Ok(pid)
}

/// Starts a killed Redis of a region again, detached, as a replica of the current master
/// (Sentinel would make it one anyway); returns its pid.
pub fn restart_redis_as_replica(dir: &Path, old: &ClusterRedis, master_port: u16) -> Result<u32> {
    let redis_dir = old.dir.clone().context("the Redis has no directory")?;
    let port = url_port(&old.url).context("the Redis URL has no port")?;
    let replica = RedisReplica::start(&redis_dir, Some(port), master_port, Lifetime::Detached)?;
    let pid = replica.pid();
    std::mem::forget(replica);
    replace_pid(dir, old.pid, pid)?;
    Ok(pid)
}

/// Pauses or resumes a replica's WAL replay (`pg_wal_replay_pause()` / `_resume()`).
pub async fn set_replay_paused(dsn: &str, paused: bool) -> Result<()> {
    let (client, driver) = connect(dsn).await?;
    let statement = if paused {
        "SELECT pg_wal_replay_pause()"
    } else {
        "SELECT pg_wal_replay_resume()"
    };
    client.execute(statement, &[]).await?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// Each server of HAProxy's `edges` backend with its status (`UP`, `DOWN`, `MAINT`, …).
pub async fn haproxy_states(stats_url: &str) -> Result<Vec<(String, String)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address: SocketAddr = stats_url
        .trim_start_matches("http://")
        .trim_end_matches("/stats")
        .parse()
        .context("HAProxy stats address")?;
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /stats;csv HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body
        .lines()
        .filter(|line| line.starts_with("edges,edge-"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            Some((fields.get(1)?.to_string(), fields.get(17)?.to_string()))
        })
        .collect())
}

/// Updates one region's roles and pids from the running processes.
async fn refresh_region(region: &mut ClusterRegion) {
    if let Some(monitor) = &region.monitor {
        let (data_dir, state_dir) = (monitor.data_dir.clone(), monitor.state_dir.clone());
        let nodes =
            tokio::task::spawn_blocking(move || cartedge_dev::ha::state_of(&data_dir, &state_dir))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
        for server in region.postgres.iter_mut().filter(|p| p.node.is_some()) {
            if let Some(node) = nodes
                .iter()
                .find(|n| Some(&n.nodename) == server.node.as_ref())
            {
                server.role = if node.is_writable_primary() {
                    "primary".into()
                } else {
                    "standby".into()
                };
            }
        }
    }
    for server in &mut region.postgres {
        server.pid = server.pid.filter(|pid| is_alive(*pid));
    }
    region.edges.retain(|edge| is_alive(edge.pid));
    let _ = refresh_redis_roles(region).await;
}

/// Asks the region's first answering Sentinel which Redis is the master now.
async fn refresh_redis_roles(region: &mut ClusterRegion) -> Result<()> {
    let name = redis_master_name(&region.id);
    let ports: Vec<u16> = region
        .sentinels
        .iter()
        .filter_map(|s| url_port(&s.url))
        .collect();
    let master = tokio::task::spawn_blocking(move || {
        ports.into_iter().find_map(|port| {
            cartedge_dev::redis_ha::master_addr_by_name(port, &name)
                .ok()
                .flatten()
        })
    })
    .await?;
    let Some(master) = master else {
        return Ok(());
    };
    for redis in &mut region.redis {
        redis.role = if url_port(&redis.url) == Some(master.port()) {
            "master".into()
        } else {
            "replica".into()
        };
    }
    region.redis.retain(|r| is_alive(r.pid));
    region.sentinels.retain(|s| is_alive(s.pid));
    Ok(())
}

/// The port of `redis://127.0.0.1:P/`-like URLs.
fn url_port(url: &str) -> Option<u16> {
    url.trim_end_matches('/').rsplit(':').next()?.parse().ok()
}

/// What `cartedge local add-shard` changed, for the caller (which then runs the move).
#[derive(Debug, Clone)]
pub struct AddedShard {
    /// The home region's file: the move runs with it.
    pub home_file: PathBuf,
    /// The ring version the cluster now moves from.
    pub moving_from: u32,
}

/// `cartedge local add-shard <id>@<region>`: starts the new shard's primary in `home` and a
/// streaming replica of it in every other region (direct, not through the link proxy), keeps
/// the running ring as `ring.v<N>.toml`, writes ring N+1 with the shard and `moving_from = N`,
/// adds the shard to every region file and rolls the ring to every edge in turn without a
/// restart ([`roll_ring`]: SIGHUP, then the edge's `/health` names the new ring). The carts are moved by the caller (`ring move`), and by
/// each moving owner's first write meanwhile. Refused on an HA cluster (`--ha`) and while the
/// ring is still moving.
pub async fn add_shard(dir: &Path, shard: &str, home: &str) -> Result<AddedShard> {
    use cartedge::domain::ids::{RegionId, ShardId};
    use cartedge::domain::ring::{RingSpec, ShardSpec};
    let cluster = read_cluster(dir)
        .with_context(|| format!("no local cluster is running in {}", dir.display()))?;
    if cluster
        .regions
        .iter()
        .any(|r| r.monitor.is_some() || r.haproxy.is_some())
    {
        bail!("local add-shard does not support an HA cluster (local up --ha)");
    }
    if !cluster.regions.iter().any(|r| r.id == home) {
        bail!("region {home} is not a region of the local cluster");
    }
    let ring_path = dir.join("ring.toml");
    let ring_text = std::fs::read_to_string(&ring_path)?;
    let mut spec: RingSpec =
        toml::from_str(&ring_text).with_context(|| format!("reading {}", ring_path.display()))?;
    if let Some(from) = spec.moving_from {
        bail!(
            "the ring is still moving from version {from}: finish that move (ring move, then remove moving_from) first"
        );
    }
    if spec.claims_from_global {
        bail!(
            "the ring names claims_from_global: finish that move (ring move --claims, then remove the marker) first"
        );
    }
    if spec.shards.iter().any(|s| s.id == shard) {
        bail!("shard {shard} is already in the ring");
    }
    let from = spec.version;
    spec.version += 1;
    spec.moving_from = Some(from);
    spec.shards.push(ShardSpec {
        id: ShardId::parse(shard).map_err(|e| anyhow::anyhow!("{e}"))?,
        home: RegionId::parse(home).map_err(|e| anyhow::anyhow!("{e}"))?,
        weight: 1,
    });

    eprintln!(
        "cartedge: starting {shard}'s primary in {home} and a replica in every other region…"
    );
    let pg_root = dir.join("postgres");
    let options = || PgOptions {
        lifetime: Lifetime::Detached,
        fsync: true,
        ..PgOptions::default()
    };
    let primary_dir = pg_root.join(shard);
    std::fs::create_dir_all(&primary_dir)?;
    let primary =
        tokio::task::block_in_place(|| PgInstance::start(&primary_dir.join("data"), options()))?;
    let mut started = vec![primary.pid()];
    create_database(&primary.dsn("postgres"), DATABASE).await?;
    cartedge::store::migrate::run(&primary.dsn(DATABASE)).await?;
    let mut replicas = BTreeMap::new();
    for region in cluster.regions.iter().filter(|r| r.id != home) {
        let parent = pg_root.join(format!("{shard}-replica-{}", region.id));
        std::fs::create_dir_all(&parent)?;
        let replica = tokio::task::block_in_place(|| {
            PgInstance::start_replica_of(primary.port, &parent.join("data"), options())
        })?;
        started.push(replica.pid());
        replicas.insert(region.id.clone(), replica);
    }
    let mut pids = Pids::read(dir).unwrap_or_default();
    pids.postgres.extend(&started);
    std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;

    // The ring pair, then every region file and cluster.json.
    let previous_path = cartedge::topology::previous_ring_path(&ring_path, from);
    std::fs::write(&previous_path, &ring_text)?;
    let next = format!(
        "# Generated by `cartedge local add-shard {shard}@{home}`: ring {} moving from {from} \
         (kept in {}).\n{}",
        spec.version,
        previous_path.display(),
        toml::to_string(&spec)?
    );
    let mut cluster = cluster;
    for region in &mut cluster.regions {
        let path = region_file(dir, &region.id);
        let mut text = std::fs::read_to_string(&path)?;
        let (entry, postgres) = if region.id == home {
            (
                format!(
                    "\n[[database.shards]]\nid = \"{shard}\"\nprimary = \"{dsn}\"\nreplica = \"{dsn}\"\n",
                    dsn = primary.dsn(DATABASE)
                ),
                ClusterPostgres {
                    role: "primary".into(),
                    shards: vec![shard.to_string()],
                    dsn: primary.dsn(DATABASE),
                    data_dir: Some(primary.data_dir.clone()),
                    pid: Some(primary.pid()),
                    node: None,
                },
            )
        } else {
            let replica = &replicas[&region.id];
            (
                format!(
                    "\n[[database.shards]]\nid = \"{shard}\"\nreplica = \"{}\"\n",
                    replica.dsn(DATABASE)
                ),
                ClusterPostgres {
                    role: "replica".into(),
                    shards: vec![shard.to_string()],
                    dsn: replica.dsn(DATABASE),
                    data_dir: Some(replica.data_dir.clone()),
                    pid: Some(replica.pid()),
                    node: None,
                },
            )
        };
        text.push_str(&entry);
        write_secret_file(&path, text.as_bytes())?;
        region.postgres.push(postgres);
    }
    std::fs::write(&ring_path, next)?;
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_vec_pretty(&cluster)?,
    )?;
    // The servers run detached: dropping their handles leaves them running.
    drop((primary, replicas));

    eprintln!(
        "cartedge: rolling ring {} to every edge (SIGHUP, one at a time, no restart)…",
        spec.version
    );
    // Read back as the edges will read it (and checked before any edge is told).
    let ring = cartedge::topology::load_ring(&ring_path)?;
    roll_ring(&cluster, &ring).await?;
    Ok(AddedShard {
        home_file: region_file(dir, home),
        moving_from: from,
    })
}
