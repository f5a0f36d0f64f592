//! The local cluster: `cartedge local up|down`, everything on 127.0.0.1 under
//! `.cartedge/local/`, plus the process harness ([`procs`]) the tests share.
//!
//! `up` installs missing Debian packages (as root), starts PostgreSQL and Redis, applies
//! migrations, loads the demo catalog, writes a region file with generated secrets, starts the
//! edge and writes `cluster.json`. This module is developer tooling: the edge itself never
//! calls it.

pub mod linkproxy;
pub mod procs;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Sources};
use procs::{Lifetime, PgInstance, PgOptions, RedisInstance};

/// Demo catalog size: `sku-00001` … `sku-10000`.
pub const DEMO_ITEMS: i32 = 10_000;
/// The database every local shard uses.
pub const DATABASE: &str = "cartedge";

/// `cluster.json`: what is running and where.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub regions: Vec<ClusterRegion>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterRegion {
    pub id: String,
    pub edge_url: String,
    pub admin_url: String,
    pub currency: String,
    pub redis_url: String,
    pub postgres: Vec<ClusterPostgres>,
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
    pub edge_port: u16,
    pub admin_port: u16,
    /// Defaults file to layer under the generated region file (None: embedded).
    pub defaults: Option<PathBuf>,
}

/// The generated region file of the local `sg` edge.
pub fn region_file(dir: &Path) -> PathBuf {
    dir.join("regions").join("sg.toml")
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
    std::fs::write(&path, serde_json::to_vec_pretty(&secrets)?)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secrets)
}

fn is_alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie still "exists", so also look at /proc state.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(false);
    exists && !zombie
}

/// Brings the cluster up. In the foreground it serves until Ctrl-C/SIGTERM, then stops
/// everything; with `detach` it returns once the edge is ready.
pub async fn up(options: UpOptions) -> Result<()> {
    let dir = options.dir.clone();
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    if let Ok(text) = std::fs::read_to_string(dir.join("pids.json")) {
        let pids: Pids = serde_json::from_str(&text).unwrap_or_default();
        if pids
            .edges
            .iter()
            .chain(&pids.postgres)
            .chain(&pids.redis)
            .any(|p| is_alive(*p))
        {
            bail!("a local cluster is already running here; stop it with `cartedge local down`");
        }
    }
    for port in [options.edge_port, options.admin_port] {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!("port {port} on 127.0.0.1 is taken; stop what uses it or pass --edge-port/--admin-port");
        }
    }
    eprintln!("cartedge: checking packages (postgresql, redis-server)…");
    tokio::task::spawn_blocking(procs::ensure_packages).await??;
    let lifetime = if options.detach {
        Lifetime::Detached
    } else {
        Lifetime::TiedToParent
    };

    let pg_dir = dir.join("postgres").join("sg-shard0");
    std::fs::create_dir_all(&pg_dir)?;
    let redis_dir = dir.join("redis").join("sg");
    std::fs::create_dir_all(&redis_dir)?;
    eprintln!("cartedge: starting PostgreSQL and Redis…");
    let (pg, redis) =
        tokio::task::spawn_blocking(move || -> Result<(PgInstance, RedisInstance)> {
            let pg = PgInstance::start(
                &pg_dir.join("data"),
                PgOptions {
                    lifetime,
                    fsync: true,
                    ..PgOptions::default()
                },
            )?;
            let redis = RedisInstance::start(&redis_dir, None, lifetime)?;
            Ok((pg, redis))
        })
        .await??;
    let mut pids = Pids {
        edges: vec![],
        postgres: vec![pg.pid()],
        redis: vec![redis.pid()],
    };
    std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;

    create_database(&pg.dsn("postgres"), DATABASE).await?;
    let dsn = pg.dsn(DATABASE);
    let applied = crate::store::migrate::run(&dsn).await?;
    eprintln!(
        "cartedge: migrations applied: {}",
        if applied.is_empty() {
            "none pending".into()
        } else {
            applied.join(", ")
        }
    );
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    crate::store::catalog::load_demo(&client, DEMO_ITEMS).await?;
    drop(client);
    let _ = driver.await;
    eprintln!("cartedge: demo catalog ready ({DEMO_ITEMS} items)");

    let secrets = load_or_create_secrets(&dir)?;
    let region_path = region_file(&dir);
    let regions_dir = region_path.parent().unwrap_or(&dir).to_path_buf();
    std::fs::create_dir_all(&regions_dir)?;
    let ring_path = dir.join("ring.toml");
    std::fs::write(
        &ring_path,
        "# Generated by `cartedge local up`: the local cluster's ring.\nversion = 1\nvnodes = 200\n\n\
         [[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n",
    )?;
    let region = format!(
        "# Generated by `cartedge local up`; local development only.\n\
         [region]\nid = \"sg\"\ncurrency = \"SGD\"\n\n\
         [edge]\npublic_url = \"http://127.0.0.1:{edge}\"\ninternal_url = \"https://127.0.0.1:{internal}\"\n\n\
         [topology]\nring_file = \"{ring}\"\nregions_dir = \"{regions}\"\n\n\
         [server]\nlisten = \"127.0.0.1:{edge}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\n\
         [database]\ncatalog = \"{dsn}\"\ncatalog_primary = \"{dsn}\"\n\n\
         [[database.shards]]\nid = \"sg-1\"\nprimary = \"{dsn}\"\nreplica = \"{dsn}\"\n\n\
         [redis]\nurl = \"{redis}\"\n\n\
         [auth]\nissuer = \"cartedge-local\"\naudience = \"cartedge-api\"\nleeway = \"1s\"\n\
         session_secret = \"{session}\"\n\n\
         [[auth.keys]]\nkid = \"local-hs256\"\nalgorithm = \"HS256\"\nsecret = \"{jwt}\"\n",
        edge = options.edge_port,
        admin = options.admin_port,
        internal = options.edge_port + 363,
        ring = ring_path.display(),
        regions = regions_dir.display(),
        dsn = dsn,
        redis = redis.url(),
        session = secrets.session_secret,
        jwt = secrets.jwt_secret,
    );
    std::fs::write(&region_path, region)?;
    let sources = Sources::new(options.defaults.clone(), Some(region_path.clone()));
    let config = Config::load(&sources, std::env::vars())?;

    let cluster = ClusterFile {
        regions: vec![ClusterRegion {
            id: "sg".into(),
            edge_url: format!("http://127.0.0.1:{}", options.edge_port),
            admin_url: format!("http://127.0.0.1:{}", options.admin_port),
            currency: "SGD".into(),
            redis_url: redis.url(),
            postgres: vec![ClusterPostgres {
                role: "primary".into(),
                shards: vec!["sg-1".into()],
                dsn: dsn.clone(),
            }],
        }],
    };
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_vec_pretty(&cluster)?,
    )?;

    if options.detach {
        let exe = std::env::current_exe()?;
        let log = std::fs::File::create(dir.join("edge-sg.log"))?;
        let mut command = Command::new(exe);
        command.arg("--config").arg(&region_path);
        if let Some(defaults) = &options.defaults {
            command.arg("--defaults").arg(defaults);
        }
        command
            .arg("serve")
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
        let child = command.spawn().context("starting the edge")?;
        pids.edges.push(child.id());
        std::fs::write(dir.join("pids.json"), serde_json::to_vec(&pids)?)?;
        wait_ready(options.admin_port, Duration::from_secs(30))
            .await
            .with_context(|| {
                format!(
                    "the edge did not become ready; see {}",
                    dir.join("edge-sg.log").display()
                )
            })?;
        print_banner(&config, &dir);
        // Detached servers keep running; their handles must not stop them.
        std::mem::forget(pg);
        std::mem::forget(redis);
        return Ok(());
    }

    crate::telemetry::init(&config.log);
    let app = crate::app::App::new(config.clone())?;
    let listeners = crate::cli::Listeners::bind(&config).await?;
    print_banner(&config, &dir);
    eprintln!("cartedge: serving in the foreground; Ctrl-C stops everything");
    crate::cli::serve_bound(app, listeners).await;
    drop(pg);
    drop(redis);
    let _ = std::fs::remove_file(dir.join("pids.json"));
    let _ = std::fs::remove_file(dir.join("cluster.json"));
    eprintln!("cartedge: local cluster stopped");
    Ok(())
}

async fn create_database(admin_dsn: &str, name: &str) -> Result<()> {
    let (client, connection) = tokio_postgres::connect(admin_dsn, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
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

async fn wait_ready(port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
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

fn print_banner(config: &Config, dir: &Path) {
    let edge = format!("http://{}", config.server.listen);
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
    println!(
        "\ncartedge local cluster is up\n\
         \n  region sg  edge  {edge}\n             admin http://{admin}\n  state      {state}\n\
         \nTry it:\n\
         \n  TOKEN=$({exe} token --sub alice)\
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\
         \n       -d '{{\"item_id\":\"sku-00001\",\"quantity\":2}}' {edge}/api/v1/cart/items\
         \n  curl -s -H \"Authorization: Bearer $TOKEN\" {edge}/api/v1/cart\
         \n  curl -s -X PUT -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\
         \n       -d '{{\"quantity\":5}}' {edge}/api/v1/cart/items/sku-00001\
         \n  curl -s -X DELETE -H \"Authorization: Bearer $TOKEN\" {edge}/api/v1/cart\
         \n  curl -si -H 'Content-Type: application/json' -d '{{\"item_id\":\"sku-00002\",\"quantity\":1}}' {edge}/api/v1/cart/items   # guest: note Cart-Session\
         \n  curl -s {edge}/health\n",
        admin = config.server.admin_listen.map(|a| a.to_string()).unwrap_or_default(),
        state = dir.join("cluster.json").display(),
    );
}

/// Stops a detached cluster started in `dir`.
pub fn down(dir: &Path) -> Result<()> {
    let text = match std::fs::read_to_string(dir.join("pids.json")) {
        Ok(text) => text,
        Err(_) => {
            println!("no local cluster is running in {}", dir.display());
            return Ok(());
        }
    };
    let pids: Pids = serde_json::from_str(&text).unwrap_or_default();
    for pid in &pids.edges {
        procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(20))?;
    }
    for pid in &pids.postgres {
        procs::stop_pid(*pid, libc::SIGINT, Duration::from_secs(20))?;
    }
    for pid in &pids.redis {
        procs::stop_pid(*pid, libc::SIGTERM, Duration::from_secs(10))?;
    }
    std::fs::remove_file(dir.join("pids.json"))?;
    let _ = std::fs::remove_file(dir.join("cluster.json"));
    println!("local cluster stopped");
    Ok(())
}
