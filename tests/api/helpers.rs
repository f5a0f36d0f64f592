//! The test harness: real PostgreSQL and Redis processes, started once per test binary on free
//! loopback ports in a temp dir, a fresh database cloned from a migrated template per test, a
//! Redis key prefix per test, and the edge served on port 0.
//!
//! Logs are quiet unless `TEST_LOG` is set: `TEST_LOG=1` shows `debug` and above, any other
//! value is taken as a tracing filter (`TEST_LOG=cartedge::store=trace`). Output goes through
//! the test harness' capture, so a passing test stays silent without `--nocapture`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use cartedge::app::App;
use cartedge::config::{Config, Sources};
use cartedge_dev::procs::{self, Lifetime, PgInstance, PgOptions, RedisInstance};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SESSION_SECRET: &str = "test-session-secret-0123456789abcdef";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123";
pub const TEMPLATE_DB: &str = "cartedge_template";

pub struct Shared {
    pub pg: PgInstance,
    pub redis: RedisInstance,
    pub dir: tempfile::TempDir,
    counter: AtomicU32,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// Runs an async set-up step on its own runtime (we may be inside a test's runtime).
fn block_on_fresh<T: Send + 'static>(
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(future)
    })
    .join()
    .expect("set-up thread")
}

pub async fn execute(dsn: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driver = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = driver.await;
}

/// The variable that turns test logs on (see the module documentation).
const TEST_LOG: &str = "TEST_LOG";

/// Installs a tracing subscriber once per test binary when `TEST_LOG` is set.
pub fn init_test_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(setting) = std::env::var(TEST_LOG).ok().filter(|v| !v.is_empty()) else {
            return;
        };
        let filter = match setting.as_str() {
            "1" | "true" | "yes" => "debug".to_string(),
            other => other.to_string(),
        };
        let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|error| {
            panic!("{TEST_LOG}={setting:?} is not a tracing filter: {error}")
        });
        // Another subscriber may be installed already (a test that set one up itself).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Where one test run keeps its servers' data (about 1 GB after a full run).
const RUN_DIR_PREFIX: &str = "cartedge-test-";
/// The pid of the test process that owns a run directory.
const OWNER_FILE: &str = "owner.pid";

/// Removes the directories of earlier runs whose test process is gone. The shared servers live
/// in a static, which is never dropped, so a run's directory outlives it (its servers die with
/// it): without this, every run on a developer's machine would leave a gigabyte in the temp dir.
fn remove_stale_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(RUN_DIR_PREFIX)
        {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join(OWNER_FILE)).ok();
        let Some(pid) = owner.and_then(|text| text.trim().parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub fn shared() -> &'static Shared {
    init_test_log();
    SHARED.get_or_init(|| {
        procs::ensure_packages().expect("packages");
        remove_stale_runs();
        let dir = tempfile::Builder::new()
            .prefix(RUN_DIR_PREFIX)
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .expect("owner file");
        let pg_parent = dir.path().join("pg");
        std::fs::create_dir_all(&pg_parent).unwrap();
        let pg = PgInstance::start(
            &pg_parent.join("data"),
            PgOptions {
                extra_conf: vec!["max_connections = 400".into()],
                ..PgOptions::default()
            },
        )
        .expect("start postgres");
        let redis_dir = dir.path().join("redis");
        std::fs::create_dir_all(&redis_dir).unwrap();
        let redis =
            RedisInstance::start(&redis_dir, None, Lifetime::TiedToParent).expect("start redis");
        let admin = pg.dsn("postgres");
        let template = pg.dsn(TEMPLATE_DB);
        block_on_fresh(async move {
            execute(&admin, &format!("CREATE DATABASE {TEMPLATE_DB}")).await;
            cartedge::store::migrate::run(&template)
                .await
                .expect("migrate");
            let (client, connection) = tokio_postgres::connect(&template, tokio_postgres::NoTls)
                .await
                .unwrap();
            let driver = tokio::spawn(connection);
            // One test catalog priced in every demo currency, so carts of any currency find
            // prices (multi-region tests give each region its own catalog instead).
            for currency in cartedge::store::catalog::demo_currencies() {
                cartedge::store::catalog::load_demo(&client, 200, currency)
                    .await
                    .unwrap();
            }
            client
                .batch_execute(
                    "INSERT INTO catalog_items (item_id, name, stock, active) VALUES
                       ('sku-low', 'Low stock', 3, true),
                       ('sku-zero', 'Sold out', 0, true),
                       ('sku-inactive', 'Retired', 100, false),
                       ('sku-thb-only', 'Thai only', 100, true);
                     INSERT INTO catalog_prices (item_id, currency, amount_minor) VALUES
                       ('sku-low', 'SGD', 500), ('sku-zero', 'SGD', 700),
                       ('sku-inactive', 'SGD', 900), ('sku-thb-only', 'THB', 2600);",
                )
                .await
                .unwrap();
            drop(client);
            let _ = driver.await;
        });
        Shared {
            pg,
            redis,
            dir,
            counter: AtomicU32::new(0),
        }
    })
}

/// A ring with one shard `sg-1` homed in `sg`, and an empty peer directory (this region is
/// described by its own configuration): (ring file, regions dir).
pub fn single_region_topology() -> (std::path::PathBuf, std::path::PathBuf) {
    let base = shared().dir.path();
    let ring = base.join("ring-single.toml");
    let regions = base.join("regions-single");
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::fs::write(
            &ring,
            "version = 1\nvnodes = 200\n[[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n",
        )
        .unwrap();
        std::fs::create_dir_all(&regions).unwrap();
    });
    (ring, regions)
}

/// A new database cloned from the migrated template: (name, DSN).
pub async fn fresh_database() -> (String, String) {
    let shared = shared();
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let database = format!("t_{}_{n}", std::process::id());
    execute(
        &shared.pg.dsn("postgres"),
        &format!("CREATE DATABASE {database} TEMPLATE {TEMPLATE_DB}"),
    )
    .await;
    let dsn = shared.pg.dsn(&database);
    (database, dsn)
}

/// Knobs a test may turn.
#[derive(Default)]
pub struct TestOptions {
    /// Use this Redis instead of the shared one.
    pub redis_url: Option<String>,
    /// Extra TOML layered last.
    pub overlay: String,
}

pub struct TestApp {
    pub address: SocketAddr,
    pub app: Arc<App>,
    pub config: Config,
    pub dsn: String,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// Every `Set-Cookie` value.
    pub fn cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }
    /// The `Set-Cookie` value of cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.cookies()
            .into_iter()
            .find(|c| c.starts_with(&format!("{name}=")))
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    pub fn version(&self) -> i64 {
        self.json()["version"].as_i64().expect("version")
    }
    /// Quantity of `item` in a cart body, 0 when absent.
    pub fn quantity_of(&self, item: &str) -> i64 {
        self.json()["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|line| line["item_id"] == item)
            .map(|line| line["quantity"].as_i64().unwrap())
            .unwrap_or(0)
    }
}

/// The TOML a test edge runs with, as one region-file layer.
pub fn test_config_text(dsn: &str, redis_url: &str, prefix: &str, overlay: &str) -> String {
    let (ring, regions) = single_region_topology();
    let (ring, regions) = (ring.display(), regions.display());
    let base = format!(
        "[region]\nid = \"sg\"\ncurrency = \"SGD\"\n\
         [server]\nlisten = \"127.0.0.1:0\"\ndrain_grace = \"200ms\"\ndrain_timeout = \"5s\"\n\
         [edge]\npublic_url = \"http://127.0.0.1:8080\"\ninternal_url = \"https://127.0.0.1:8443\"\n\
         [topology]\nring_file = \"{ring}\"\nregions_dir = \"{regions}\"\n\
         [database]\ncatalog = \"{dsn}\"\ncatalog_primary = \"{dsn}\"\npool_size = 32\n\
         [[database.shards]]\nid = \"sg-1\"\nprimary = \"{dsn}\"\nreplica = \"{dsn}\"\n\
         [redis]\nurl = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\ntimeout = \"200ms\"\n\
         [cart]\ncatalog_cache_ttl = \"0s\"\n\
         [rate_limit]\nenabled = false\n\
         [janitor]\nenabled = false\n\
         [events]\nstream = \"{prefix}cart-events\"\n\
         [auth]\nissuer = \"cartedge-test\"\naudience = \"cartedge-api\"\nsession_secret = \"{SESSION_SECRET}\"\n\
         [[auth.keys]]\nkid = \"test\"\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n"
    );
    let mut merged: toml::Table = toml::from_str(&base).unwrap();
    let extra: toml::Table = toml::from_str(overlay).expect("overlay TOML");
    for (key, value) in extra {
        match (merged.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                existing.extend(incoming)
            }
            (_, value) => {
                merged.insert(key, value);
            }
        }
    }
    toml::to_string(&merged).unwrap()
}

pub fn defaults_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml")
}

/// The `cartedge` binary with the repository's defaults file.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cartedge"))
        .arg("--defaults")
        .arg(defaults_path())
        .args(args)
        .output()
        .unwrap()
}

/// A detached local cluster (`local up --detach --dir`), always stopped: its servers outlive
/// the test process otherwise.
pub struct LocalCluster {
    pub dir: std::path::PathBuf,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(env!("CARGO_BIN_EXE_cartedge"))
            .args(["local", "down", "--dir"])
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A detached local cluster a test brought up (`local up --detach` in a directory of its own),
/// stopped when dropped.
pub struct StartedCluster {
    pub cluster: LocalCluster,
    /// The cluster's directory, as the `--dir` argument.
    pub dir: String,
    /// The sg edge's (or HAProxy front's) port; id and th use the next two.
    pub edge_port: u16,
    /// The sg admin port; id and th use the next two.
    pub admin_port: u16,
    /// What `local up` printed.
    pub stdout: String,
}

/// Brings up `local up --detach <extra…>` in `<tmp>/cartedge-<name>-<pid>` on edge and admin
/// ports from `ports`; fails the test with `local up`'s output when it does not come up.
pub fn local_up(name: &str, ports: std::ops::Range<u16>, extra: &[&str]) -> StartedCluster {
    let dir = std::env::temp_dir().join(format!("cartedge-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = LocalCluster { dir: dir.clone() };
    let dir_arg = dir.to_str().unwrap().to_string();
    let edge_port = three_free_ports(0, ports.clone());
    let admin_port = three_free_ports(edge_port + 3, ports);
    let (edge, admin) = (edge_port.to_string(), admin_port.to_string());
    let mut args = vec!["local", "up", "--detach"];
    args.extend_from_slice(extra);
    args.extend([
        "--dir",
        &dir_arg,
        "--edge-port",
        &edge,
        "--admin-port",
        &admin,
    ]);
    let up = cli(&args);
    let stdout = String::from_utf8_lossy(&up.stdout).to_string();
    assert!(
        up.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    StartedCluster {
        cluster,
        dir: dir_arg,
        edge_port,
        admin_port,
        stdout,
    }
}

/// Where tests/api/local.rs and tests/api/ops.rs look for cluster ports: separate ranges, both
/// below Linux's ephemeral range (32768+), so the two clusters never collide and no outgoing
/// connection takes a port while a cluster comes up.
pub const LOCAL_TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;
pub const OPS_TEST_PORTS: std::ops::Range<u16> = 12_000..19_900;

/// A port `p` with `p`, `p + 1` and `p + 2` free on 127.0.0.1, at or after `after`, in `range`
/// (the start spread by the process id so parallel runs rarely probe the same ports).
pub fn three_free_ports(after: u16, range: std::ops::Range<u16>) -> u16 {
    let spread = (range.end - range.start) / 2;
    let start = after.max(range.start + (std::process::id() % 300) as u16 * 20 % spread);
    for base in (start..range.end).step_by(7) {
        if (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no three consecutive free ports in {range:?}");
}

pub fn test_config(dsn: &str, redis_url: &str, prefix: &str, overlay: &str) -> Config {
    let sources = Sources {
        defaults: Some(defaults_path()),
        region: None,
        overlay: Some(test_config_text(dsn, redis_url, prefix, overlay)),
    };
    Config::load(&sources, Vec::<(String, String)>::new()).expect("test config")
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(TestOptions::default()).await
    }

    /// An edge whose outbox stays put (no relay publishing and deleting events), so a test
    /// can count the events its writes recorded.
    pub async fn spawn_keeping_events() -> TestApp {
        TestApp::spawn_with(TestOptions {
            overlay: "[events]\nrelay = false\n".into(),
            ..TestOptions::default()
        })
        .await
    }

    pub async fn spawn_with(options: TestOptions) -> TestApp {
        let (database, dsn) = fresh_database().await;
        TestApp::spawn_on(&dsn, &database, options).await
    }

    /// An edge on an existing database.
    pub async fn spawn_on(dsn: &str, database: &str, options: TestOptions) -> TestApp {
        let shared = shared();
        let dsn = dsn.to_string();
        let redis_url = options
            .redis_url
            .clone()
            .unwrap_or_else(|| shared.redis.url());
        let config = test_config(
            &dsn,
            &redis_url,
            &format!("{database}:cart:"),
            &options.overlay,
        );
        let app = App::new(config.clone()).expect("app");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let server_app = app.clone();
        let server = tokio::spawn(async move {
            cartedge::server::run(listener, server_app, async move {
                let _ = stop.await;
            })
            .await;
        });
        TestApp {
            address,
            app,
            config,
            dsn,
            shutdown: Some(shutdown),
            server: Some(server),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    pub fn token(&self, sub: &str) -> String {
        self.token_with_ttl(sub, Duration::from_secs(3600))
    }

    pub fn token_with_ttl(&self, sub: &str, ttl: Duration) -> String {
        cartedge::auth::issue_token(&self.config.auth, sub, ttl, now_unix()).unwrap()
    }

    pub fn bearer(&self, sub: &str) -> (String, String) {
        (
            "authorization".into(),
            format!("Bearer {}", self.token(sub)),
        )
    }

    /// Sends a request. A body is sent as JSON unless a content-type header is given.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<&str>,
    ) -> TestResponse {
        let mut builder = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(self.url(path));
        let mut has_type = false;
        for (name, value) in headers {
            has_type |= name.eq_ignore_ascii_case("content-type");
            builder = builder.header(name.as_str(), value.as_str());
        }
        if body.is_some() && !has_type {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .unwrap();
        let response = self.client.request(request).await.expect("request");
        let (parts, body) = response.into_parts();
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// With a given bearer token.
    pub async fn user_with_token(&self, token: &str, method: &str, path: &str) -> TestResponse {
        self.send(
            method,
            path,
            &[h("authorization", &format!("Bearer {token}"))],
            None,
        )
        .await
    }

    /// As user `sub`.
    pub async fn user(
        &self,
        sub: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> TestResponse {
        self.send(method, path, &[self.bearer(sub)], body).await
    }

    pub async fn add(&self, sub: &str, item: &str, quantity: i64) -> TestResponse {
        let body = format!(r#"{{"item_id":"{item}","quantity":{quantity}}}"#);
        self.user(sub, "POST", "/api/v1/cart/items", Some(&body))
            .await
    }

    pub async fn sql(&self, sql: &str) {
        execute(&self.dsn, sql).await
    }

    pub async fn query_i64(&self, sql: &str) -> i64 {
        query_opt_i64(&self.dsn, sql, &[]).await.expect("a row")
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join_server(&mut self) {
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(20), server)
                .await
                .expect("drained")
                .unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A private Redis for tests that stop or pause it.
pub fn private_redis(name: &str) -> RedisInstance {
    let dir = shared().dir.path().join(format!("redis-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    RedisInstance::start(&dir, None, Lifetime::TiedToParent).expect("private redis")
}

pub fn h(name: &str, value: &str) -> (String, String) {
    (name.to_string(), value.to_string())
}

/// The first column of the first row of one query on `dsn`, read as a bigint (None: no row).
pub async fn query_opt_i64(
    dsn: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Option<i64> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let row = client.query_opt(sql, params).await.unwrap();
    drop(client);
    let _ = driver.await;
    row.map(|row| row.get(0))
}
