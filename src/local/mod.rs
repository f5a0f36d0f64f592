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
use cartedge_dev::linkproxy::{self, LinkProxy, LinkSpec};
use cartedge_dev::procs::{
    self, Lifetime, PgInstance, PgOptions, PrometheusInstance, RedisInstance,
};

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
    pub edge_url: String,
    pub admin_url: String,
    pub currency: String,
    pub redis_url: String,
    pub postgres: Vec<ClusterPostgres>,
    /// The edge's JSON log file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterPostgres {
    pub role: String,
    pub shards: Vec<String>,
    pub dsn: String,
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
    redis: Vec<RedisInstance>,
}

/// The servers and files of one region.
struct RegionPlan {
    id: &'static str,
    currency: &'static str,
    edge: SocketAddr,
    admin: SocketAddr,
    internal: SocketAddr,
    /// The edge's public, admin and internal listeners, bound from the start so no other
    /// process takes their ports while the cluster comes up; handed to the edge (foreground) or
    /// released just before it starts (detached).
    sockets: std::sync::Mutex<Option<[std::net::TcpListener; 3]>>,
}

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
            let edge = bind(options.edge_port + offset)?;
            let admin = bind(options.admin_port + offset)?;
            let internal = bind(0)?;
            Ok(RegionPlan {
                id,
                currency,
                edge: edge.local_addr()?,
                admin: admin.local_addr()?,
                internal: internal.local_addr()?,
                sockets: std::sync::Mutex::new(Some([edge, admin, internal])),
            })
        })
        .collect::<Result<_>>()?;
    eprintln!("cartedge: checking packages (postgresql, redis-server)…");
    tokio::task::spawn_blocking(procs::ensure_packages).await??;
    let lifetime = if options.detach {
        Lifetime::Detached
    } else {
        Lifetime::TiedToParent
    };

    eprintln!("cartedge: starting a primary per region…");
    let pg_root = dir.join("postgres");
    let primaries: BTreeMap<String, PgInstance> = {
        let pg_root = pg_root.clone();
        tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, PgInstance>> {
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
                    PgInstance::start(&parent.join("data"), options)?,
                );
            }
            Ok(primaries)
        })
        .await??
    };
    let mut started = Started {
        postgres: Vec::new(),
        redis: Vec::new(),
    };
    let mut pids = Pids::default();
    pids.postgres
        .extend(primaries.values().map(PgInstance::pid));
    std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;

    for (region, primary) in &primaries {
        create_database(&primary.dsn("postgres"), DATABASE).await?;
        let applied = cartedge::store::migrate::run(&primary.dsn(DATABASE)).await?;
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
        let (catalog, driver) = connect(&primaries[region].dsn(DATABASE)).await?;
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
        let primary = &primaries[home];
        let options = PgOptions {
            lifetime,
            fsync: true,
            ..PgOptions::default()
        };
        let replica = tokio::task::block_in_place(|| {
            PgInstance::start_replica(primary, &parent.join("data"), options)
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
                target: target.internal,
                delay_ms: one_way_ms(source.id, target.id),
            });
        }
    }
    for (region, home) in replicas.keys() {
        links.push(LinkSpec {
            name: format!("{region}->{home}:pg-{}", shard_of(home)),
            a: region.clone(),
            b: home.clone(),
            listen: "127.0.0.1:0".parse()?,
            target: SocketAddr::from(([127, 0, 0, 1], primaries[home].port)),
            delay_ms: one_way_ms(region, home),
        });
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
    for ((region, home), replica) in &replicas {
        let via = link_address(&format!("{region}->{home}:pg-{}", shard_of(home)))?;
        let (client, driver) = connect(&replica.dsn("postgres")).await?;
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres application_name={region}",
            via.port()
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
    for plan in &plans {
        let redis_dir = dir.join("redis").join(plan.id);
        std::fs::create_dir_all(&redis_dir)?;
        let redis =
            tokio::task::block_in_place(|| RedisInstance::start(&redis_dir, None, lifetime))?;
        pids.redis.push(redis.pid());
        redis_urls.insert(plan.id, redis.url());
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
            "[[database.shards]]\nid = \"{}\"\nprimary = \"{dsn}\"\nreplica = \"{dsn}\"\n\n",
            shard_of(plan.id),
            dsn = primary.dsn(DATABASE)
        );
        let mut postgres = vec![ClusterPostgres {
            role: "primary".into(),
            shards: vec![shard_of(plan.id)],
            dsn: primary.dsn(DATABASE),
        }];
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
                });
            }
        }
        // The region's own catalog is in its primary; the others' through its replicas of them.
        let catalog = primary.dsn(DATABASE);
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
             [edge]\npublic_url = \"http://{edge}\"\ninternal_url = \"https://{internal}\"\n\n\
             [topology]\nring_file = \"{ring}\"\nregions_dir = \"{regions}\"\n\n\
             [topology.peer_urls]\n{peer_urls}\n\
             [server]\nlisten = \"{edge}\"\nadmin_listen = \"{admin}\"\ninternal_listen = \"{internal}\"\n\n\
             [tls]\nca_file = \"{pki}/ca.pem\"\ncert_file = \"{pki}/{id}.pem\"\nkey_file = \"{pki}/{id}.key\"\n\n\
             [redis]\nurl = \"{redis}\"\n\n\
             [auth]\nissuer = \"cartedge-local\"\naudience = \"cartedge-api\"\nleeway = \"1s\"\n\
             session_secret = \"{session}\"\n\n\
             [[auth.keys]]\nkid = \"local-hs256\"\nalgorithm = \"HS256\"\nsecret = \"{jwt}\"\n\n\
             [log]\nformat = \"{log_format}\"\n\n\
             [database]\ncatalog = \"{catalog}\"\ncatalog_primary = \"{catalog}\"\n\n\
             [database.peer_catalogs]\n{peer_catalogs}\n{shards}",
            id = plan.id,
            currency = plan.currency,
            edge = plan.edge,
            admin = plan.admin,
            internal = plan.internal,
            ring = ring_path.display(),
            regions = regions_dir.display(),
            pki = pki.display(),
            redis = redis_urls[plan.id],
            session = secrets.session_secret,
            jwt = secrets.jwt_secret,
            // Every edge writes its log file in JSON.
            log_format = "json",
        );
        let path = region_file(&dir, plan.id);
        write_secret_file(&path, text.as_bytes())?;
        cluster.regions.push(ClusterRegion {
            id: plan.id.into(),
            edge_url: format!("http://{}", plan.edge),
            admin_url: format!("http://{}", plan.admin),
            currency: plan.currency.into(),
            redis_url: redis_urls[plan.id].clone(),
            postgres,
            log: Some(edge_log(&dir, plan.id)),
        });
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
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_vec_pretty(&cluster)?,
    )?;
    started.postgres.extend(primaries.into_values());
    started.postgres.extend(replicas.into_values());

    // Every edge is a process of its own (`cartedge serve`) writing JSON lines to its log file,
    // detached or, in the foreground, tied to this process (killed if it dies).
    let mut edge_children = Vec::new();
    for (path, plan) in configs.iter().zip(&plans) {
        let log = std::fs::File::create(edge_log(&dir, plan.id))?;
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("--config").arg(path);
        if let Some(defaults) = &options.defaults {
            command.arg("--defaults").arg(defaults);
        }
        command.arg("serve");
        // Release the reserved ports only now, a moment before the edge binds them.
        if let Ok(mut sockets) = plan.sockets.lock() {
            sockets.take();
        }
        let child = spawn_logging(command, log, lifetime)?;
        pids.edges.push(child.id());
        edge_children.push(child);
        std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;
    }
    for plan in &plans {
        let log = edge_log(&dir, plan.id);
        wait_ready(plan.admin, Duration::from_secs(30))
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
    print_banner(&loaded, &dir);
    print_prometheus(prometheus.as_ref());
    if options.detach {
        // Detached servers keep running; their handles must not stop them.
        if let Some(prometheus) = prometheus {
            std::mem::forget(prometheus);
        }
        for pg in started.postgres {
            std::mem::forget(pg);
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
        targets.push_str(&format!(
            "      - targets: [\"{admin}\"]\n        labels:\n          region: \"{id}\"\n",
            admin = plan.admin,
            id = plan.id
        ));
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

/// Cuts (`partition`) or restores (`heal`) every link between two regions of a running local
/// cluster.
pub async fn steer(dir: &Path, verb: &str, a: &str, b: &str) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("proxy.json"))
        .with_context(|| format!("no running local cluster in {}", dir.display()))?;
    let proxy: ProxyFile = serde_json::from_str(&text)?;
    let (status, body) =
        linkproxy::control_request(proxy.control, "POST", &format!("/{verb}?a={a}&b={b}")).await?;
    if status != 200 {
        bail!("{verb} {a} {b}: {body}");
    }
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

async fn wait_ready(admin: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let request = b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            if stream.write_all(request).await.is_ok() {
                let mut head = [0u8; 12];
                if stream.read_exact(&mut head).await.is_ok() && head.ends_with(b"200") {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("not ready after {limit:?}")
}

fn print_banner(configs: &[Config], dir: &Path) {
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
    for config in configs {
        lines.push_str(&format!(
            "  region {}  edge http://{}  admin http://{}  ({})\n",
            config.region.id,
            config.server.listen,
            config
                .server
                .admin_listen
                .map(|a| a.to_string())
                .unwrap_or_default(),
            config.region.currency
        ));
    }
    let edge = |id: &str| {
        configs
            .iter()
            .find(|c| c.region.id == id)
            .map(|c| format!("http://{}", c.server.listen))
            .unwrap_or_default()
    };
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
    for pid in &pids.postgres {
        procs::stop_pid(*pid, libc::SIGINT, Duration::from_secs(20))?;
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
