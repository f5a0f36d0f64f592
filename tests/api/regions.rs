//! Two regions on one ring: `sg` homes shard `sg-1`, `th` homes `th-1`; each region has a
//! streaming replica of the other's shard. Edges reach each other over mutual TLS through the
//! link proxy, so tests can delay and partition the link.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cartedge::app::App;
use cartedge::config::{Config, Sources};
use cartedge::forward::{tls, Forwarder, Settings};
use cartedge::metrics::Format;
use cartedge_dev::linkproxy::{LinkProxy, LinkSpec, PartitionMode};
use cartedge_dev::procs::{PgInstance, PgOptions};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::net::TcpListener;

use crate::helpers::{defaults_path, execute, shared, TestResponse, JWT_SECRET, SESSION_SECRET};

pub(crate) struct Edge {
    pub(crate) app: Arc<App>,
    public: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub(crate) struct TwoRegions {
    dir: tempfile::TempDir,
    pub(crate) sg_primary: PgInstance,
    pub(crate) th_primary: PgInstance,
    /// th's replica of sg-1.
    pub(crate) th_replica_of_sg: PgInstance,
    _sg_replica_of_th: PgInstance,
    pub(crate) proxy: LinkProxy,
    pub(crate) sg: Edge,
    pub(crate) th: Edge,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
}

/// Adds whose home region cannot be reached answer 503 instead of being parked.
const NO_PARKING: &str = "[parking]\nenabled = false\n";

const RING: &str = "version = 1\nvnodes = 200\n[[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n[[shards]]\nid = \"th-1\"\nhome = \"th\"\n";

/// [`RING`] plus `th-2` (homed in th), moving from version 1 (which stays beside it as
/// `ring.v1.toml`): see `tests/api/reshard.rs`.
const RING_MOVING: &str = "version = 2\nvnodes = 200\nmoving_from = 1\n[[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n[[shards]]\nid = \"th-1\"\nhome = \"th\"\n[[shards]]\nid = \"th-2\"\nhome = \"th\"\n";

/// [`RING`] naming `claims_from_global`: users whose tokens gained a region claim may still
/// have a cart where the global ring put them (see `tests/api/reshard.rs`).
const RING_CLAIMS: &str = "version = 1\nvnodes = 200\nclaims_from_global = true\n[[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n[[shards]]\nid = \"th-1\"\nhome = \"th\"\n";

/// Which ring each region's edge runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Both on [`RING`].
    Plain,
    /// Both on [`RING_MOVING`].
    Moving,
    /// th on [`RING_MOVING`], sg still on [`RING`].
    Rolling,
    /// Both on [`RING_CLAIMS`].
    Claims,
}

/// The database of shard `th-2` on th's PostgreSQL server (so th's streaming replica in sg
/// carries it too).
pub(crate) const TH2_DATABASE: &str = "cartedge_th2";

fn start_pg(parent: &Path, name: &str) -> PgInstance {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    PgInstance::start(&dir.join("data"), PgOptions::default()).unwrap()
}

fn start_replica(primary: &PgInstance, parent: &Path, name: &str) -> PgInstance {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    PgInstance::start_replica(primary, &dir.join("data"), PgOptions::default()).unwrap()
}

/// Creates and migrates the region's database, with the region's own demo catalog priced in
/// `currencies`.
async fn prepare_primary(pg: &PgInstance, currencies: &[&str]) {
    execute(&pg.dsn("postgres"), "CREATE DATABASE cartedge").await;
    let dsn = pg.dsn("cartedge");
    cartedge::store::migrate::run(&dsn).await.unwrap();
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    for currency in currencies {
        let currency = cartedge::domain::money::Currency::parse(currency).unwrap();
        cartedge::store::catalog::load_demo(&client, 50, currency)
            .await
            .unwrap();
    }
    drop(client);
    let _ = driver.await;
}

#[allow(clippy::too_many_arguments)]
fn edge_config(
    dir: &Path,
    region: &str,
    currency: &str,
    shards: &[(&str, Option<String>, String)],
    catalog: &str,
    peer_catalog: (&str, String),
    redis_prefix: &str,
    peer: (&str, String),
    forward_timeout: &str,
    extra: &str,
) -> Config {
    let mut text = format!(
        "[region]\nid = \"{region}\"\ncurrency = \"{currency}\"\n\
         [topology]\nring_file = \"{ring}\"\nregions_dir = \"{regions}\"\n\
         [topology.peer_urls]\n{peer_id} = \"{peer_url}\"\n\
         [server]\nlisten = \"127.0.0.1:0\"\ndrain_grace = \"50ms\"\n\
         [tls]\nca_file = \"{pki}/ca.pem\"\ncert_file = \"{pki}/{region}.pem\"\nkey_file = \"{pki}/{region}.key\"\n\
         [forward]\ntimeout = \"{forward_timeout}\"\nconnect_timeout = \"300ms\"\nbreaker_failures = 3\nbreaker_cooldown = \"300ms\"\nreplica_wait = \"250ms\"\nmax_replica_lag = \"2500ms\"\n\
         [redis]\nurl = \"{redis}\"\nkey_prefix = \"{redis_prefix}\"\ntimeout = \"200ms\"\n\
         [cart]\ncatalog_cache_ttl = \"0s\"\n\
         [rate_limit]\nenabled = false\n\
         [janitor]\nenabled = false\n\
         [events]\nstream = \"{redis_prefix}cart-events\"\n\
         [auth]\nissuer = \"cartedge-test\"\naudience = \"cartedge-api\"\nsession_secret = \"{SESSION_SECRET}\"\n\
         [[auth.keys]]\nkid = \"test\"\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n\
         [database]\ncatalog = \"{catalog}\"\ncatalog_primary = \"{catalog}\"\n\
         [database.peer_catalogs]\n{peer_catalog_region} = \"{peer_catalog_dsn}\"\n",
        peer_catalog_region = peer_catalog.0,
        peer_catalog_dsn = peer_catalog.1,
        ring = dir.join("ring.toml").display(),
        regions = dir.join("regions").display(),
        pki = dir.join("pki").display(),
        redis = shared().redis.url(),
        peer_id = peer.0,
        peer_url = peer.1,
    );
    text.push_str(extra);
    for (id, primary, replica) in shards {
        text.push_str(&format!(
            "[[database.shards]]\nid = \"{id}\"\nreplica = \"{replica}\"\n"
        ));
        if let Some(primary) = primary {
            text.push_str(&format!("primary = \"{primary}\"\n"));
        }
    }
    let sources = Sources {
        defaults: Some(defaults_path()),
        region: None,
        overlay: Some(text),
    };
    Config::load(&sources, Vec::<(String, String)>::new()).expect("edge config")
}

async fn start_edge(config: Config, internal: TcpListener) -> Edge {
    let app = App::new(config).expect("app");
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = public.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_internal_tx, stop_internal) = tokio::sync::oneshot::channel::<()>();
    let tls = app.internal_tls.clone().expect("internal TLS");
    let internal_app = app.clone();
    tokio::spawn(async move {
        cartedge::server::run_internal(internal, internal_app, tls, async move {
            let _ = stop_internal.await;
        })
        .await
    });
    let public_app = app.clone();
    tokio::spawn(async move {
        cartedge::server::run(public, public_app, async move {
            let _ = stopped.await;
            let _ = stop_internal_tx.send(());
        })
        .await
    });
    Edge {
        app,
        public: address,
        stop: Some(stop),
    }
}

impl TwoRegions {
    async fn start(forward_timeout: &str) -> TwoRegions {
        Self::start_with(forward_timeout, "").await
    }

    /// Starts both regions with `extra` (TOML sections) added to both edges' configuration.
    pub(crate) async fn start_with(forward_timeout: &str, extra: &str) -> TwoRegions {
        Self::start_layout(forward_timeout, extra, Layout::Plain).await
    }

    /// Both regions on [`RING_MOVING`]: shard `th-2` added in th, carts moving from ring 1.
    pub(crate) async fn start_moving(forward_timeout: &str) -> TwoRegions {
        Self::start_layout(forward_timeout, NO_PARKING, Layout::Moving).await
    }

    /// The middle of a ring roll: th on [`RING_MOVING`], sg still on ring 1 (its own ring file
    /// and region files, which do not know `th-2`).
    pub(crate) async fn start_rolling(forward_timeout: &str) -> TwoRegions {
        Self::start_layout(forward_timeout, NO_PARKING, Layout::Rolling).await
    }

    /// Both regions on [`RING_CLAIMS`], with `extra` added to both edges' configuration.
    pub(crate) async fn start_claims(forward_timeout: &str, extra: &str) -> TwoRegions {
        Self::start_layout(forward_timeout, extra, Layout::Claims).await
    }

    async fn start_layout(forward_timeout: &str, extra: &str, layout: Layout) -> TwoRegions {
        let moving = matches!(layout, Layout::Moving | Layout::Rolling);
        let shared = shared();
        let dir = tempfile::Builder::new()
            .prefix("cartedge-regions-")
            .tempdir_in(shared.dir.path())
            .unwrap();
        let base = dir.path().to_path_buf();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let (sg_primary, th_primary) = {
            let base = base.clone();
            tokio::task::spawn_blocking(move || (start_pg(&base, "sg-1"), start_pg(&base, "th-1")))
                .await
                .unwrap()
        };
        // Each region sells from its own catalog, priced in its own currency.
        prepare_primary(&sg_primary, &["SGD"]).await;
        prepare_primary(&th_primary, &["THB"]).await;
        if moving {
            execute(
                &th_primary.dsn("postgres"),
                &format!("CREATE DATABASE {TH2_DATABASE}"),
            )
            .await;
            cartedge::store::migrate::run(&th_primary.dsn(TH2_DATABASE))
                .await
                .unwrap();
        }
        let (th_replica_of_sg, sg_replica_of_th) = {
            let base = base.clone();
            let sg_port = sg_primary.port;
            let th_port = th_primary.port;
            let (sg_dir, th_dir) = (sg_primary.data_dir.clone(), th_primary.data_dir.clone());
            let _ = (sg_port, th_port, sg_dir, th_dir);
            // PgInstance is not Send-shareable across the blocking call by reference; start
            // replicas here (each takes ~0.5 s).
            (
                start_replica(&sg_primary, &base, "sg-1-replica-th"),
                start_replica(&th_primary, &base, "th-1-replica-sg"),
            )
        };
        tls::generate_local_pki(&base.join("pki"), &["sg", "th"]).unwrap();
        if moving {
            std::fs::write(base.join("ring.v1.toml"), RING).unwrap();
            std::fs::write(base.join("ring.toml"), RING_MOVING).unwrap();
        } else if layout == Layout::Claims {
            std::fs::write(base.join("ring.toml"), RING_CLAIMS).unwrap();
        } else {
            std::fs::write(base.join("ring.toml"), RING).unwrap();
        }
        let regions = base.join("regions");
        std::fs::create_dir_all(&regions).unwrap();
        // Ring 1's region files, for an edge still on it.
        let regions_v1 = base.join("regions-v1");
        std::fs::create_dir_all(&regions_v1).unwrap();

        let sg_internal = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let th_internal = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let link = |name: &str, a: &str, b: &str, target: SocketAddr| LinkSpec {
            name: name.into(),
            a: a.into(),
            b: b.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            target,
            delay_ms: 0,
        };
        let proxy = LinkProxy::start(vec![
            link("th->sg:edge", "th", "sg", sg_internal.local_addr().unwrap()),
            link("sg->th:edge", "sg", "th", th_internal.local_addr().unwrap()),
        ])
        .await
        .unwrap();
        for (id, currency, internal, moving, regions) in [
            (
                "sg",
                "SGD",
                sg_internal.local_addr().unwrap(),
                moving,
                &regions,
            ),
            (
                "th",
                "THB",
                th_internal.local_addr().unwrap(),
                moving,
                &regions,
            ),
            (
                "sg",
                "SGD",
                sg_internal.local_addr().unwrap(),
                false,
                &regions_v1,
            ),
            (
                "th",
                "THB",
                th_internal.local_addr().unwrap(),
                false,
                &regions_v1,
            ),
        ] {
            std::fs::write(
                regions.join(format!("{id}.toml")),
                format!(
                    "[region]\nid = \"{id}\"\ncurrency = \"{currency}\"\n[edge]\npublic_url = \"http://127.0.0.1\"\ninternal_url = \"https://{internal}\"\n\
                     [[database.shards]]\nid = \"sg-1\"\nreplica = \"x\"\n{}\
                     [[database.shards]]\nid = \"th-1\"\nreplica = \"x\"\n{}{}",
                    if id == "sg" { "primary = \"x\"\n" } else { "" },
                    if id == "th" { "primary = \"x\"\n" } else { "" },
                    match (moving, id) {
                        (false, _) => "",
                        (true, "th") => "[[database.shards]]\nid = \"th-2\"\nreplica = \"x\"\nprimary = \"x\"\n",
                        (true, _) => "[[database.shards]]\nid = \"th-2\"\nreplica = \"x\"\n",
                    },
                ),
            )
            .unwrap();
        }
        let prefix = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let mut sg_shards = vec![
            (
                "sg-1",
                Some(sg_primary.dsn("cartedge")),
                sg_primary.dsn("cartedge"),
            ),
            ("th-1", None, sg_replica_of_th.dsn("cartedge")),
        ];
        let mut th_shards = vec![
            ("sg-1", None, th_replica_of_sg.dsn("cartedge")),
            (
                "th-1",
                Some(th_primary.dsn("cartedge")),
                th_primary.dsn("cartedge"),
            ),
        ];
        if layout == Layout::Moving {
            sg_shards.push(("th-2", None, sg_replica_of_th.dsn(TH2_DATABASE)));
        }
        if moving {
            th_shards.push((
                "th-2",
                Some(th_primary.dsn(TH2_DATABASE)),
                th_primary.dsn(TH2_DATABASE),
            ));
        }
        let sg_config = edge_config(
            &base,
            "sg",
            "SGD",
            &sg_shards,
            &sg_primary.dsn("cartedge"),
            ("th", sg_replica_of_th.dsn("cartedge")),
            &format!("{prefix}:sg:"),
            (
                "th",
                format!("https://{}", proxy.addr("sg->th:edge").unwrap()),
            ),
            forward_timeout,
            extra,
        );
        let th_config = edge_config(
            &base,
            "th",
            "THB",
            &th_shards,
            &th_primary.dsn("cartedge"),
            ("sg", th_replica_of_sg.dsn("cartedge")),
            &format!("{prefix}:th:"),
            (
                "sg",
                format!("https://{}", proxy.addr("th->sg:edge").unwrap()),
            ),
            forward_timeout,
            extra,
        );
        let mut sg_config = sg_config;
        if layout == Layout::Rolling {
            sg_config.topology.ring_file = base.join("ring.v1.toml");
            sg_config.topology.regions_dir = regions_v1;
        }
        let sg = start_edge(sg_config, sg_internal).await;
        let th = start_edge(th_config, th_internal).await;
        TwoRegions {
            dir,
            sg_primary,
            th_primary,
            th_replica_of_sg,
            _sg_replica_of_th: sg_replica_of_th,
            proxy,
            sg,
            th,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }

    pub(crate) fn token(&self, sub: &str) -> String {
        cartedge::auth::issue_token(
            &self.sg.app.config.auth,
            sub,
            Duration::from_secs(3600),
            crate::helpers::now_unix(),
        )
        .unwrap()
    }

    /// A user id the ring homes in `region`.
    pub(crate) fn user_homed_in(&self, region: &str, salt: &str) -> String {
        (0..10_000)
            .map(|n| format!("{salt}-{n}"))
            .find(|user| {
                self.sg
                    .app
                    .topology()
                    .ring
                    .locate(&format!("u:{user}"))
                    .home
                    == region
            })
            .unwrap()
    }

    pub(crate) async fn send(
        &self,
        edge: &Edge,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&str>,
    ) -> TestResponse {
        use http_body_util::BodyExt;
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", edge.public, path));
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(http_body_util::Full::new(Bytes::from(
                body.unwrap_or("").to_string(),
            )))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub(crate) async fn add(
        &self,
        edge: &Edge,
        user: &str,
        item: &str,
        quantity: i64,
        key: Option<&str>,
    ) -> TestResponse {
        let mut headers = vec![("authorization", format!("Bearer {}", self.token(user)))];
        if let Some(key) = key {
            headers.push(("idempotency-key", key.to_string()));
        }
        let body = format!(r#"{{"item_id":"{item}","quantity":{quantity}}}"#);
        self.send(edge, "POST", "/api/v1/cart/items", &headers, Some(&body))
            .await
    }

    pub(crate) async fn get(
        &self,
        edge: &Edge,
        user: &str,
        min_version: Option<i64>,
    ) -> TestResponse {
        let mut headers = vec![("authorization", format!("Bearer {}", self.token(user)))];
        if let Some(version) = min_version {
            headers.push(("cart-min-version", version.to_string()));
        }
        self.send(edge, "GET", "/api/v1/cart", &headers, None).await
    }

    pub(crate) async fn quantity_at_home(&self, user: &str, item: &str) -> i64 {
        let (client, connection) =
            tokio_postgres::connect(&self.sg_primary.dsn("cartedge"), tokio_postgres::NoTls)
                .await
                .unwrap();
        let driver = tokio::spawn(connection);
        let row = client
            .query_opt(
                "SELECT quantity::bigint FROM cart_items WHERE owner = $1 AND item_id = $2",
                &[&format!("u:{user}"), &item],
            )
            .await
            .unwrap();
        drop(client);
        let _ = driver.await;
        row.map(|r| r.get(0)).unwrap_or(0)
    }

    /// A client to sg's internal surface holding th's certificate, through the th→sg link,
    /// announcing `ring_moving_from` (the ring it moves from) when given.
    pub(crate) fn th_client_of_sg(&self, ring_moving_from: Option<http::HeaderValue>) -> Forwarder {
        let pki = self.path().join("pki");
        let client = tls::client_config(
            &pki.join("th.pem"),
            &pki.join("th.key"),
            &pki.join("ca.pem"),
        )
        .unwrap();
        let sg_url = format!("https://{}", self.proxy.addr("th->sg:edge").unwrap());
        Forwarder::new(
            [("sg", sg_url.as_str())],
            client,
            Settings {
                timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_millis(500),
                breaker_failures: 100,
                breaker_cooldown: Duration::from_millis(100),
                ring_moving_from,
            },
            cartedge::metrics::ForwardMetrics::default(),
        )
        .unwrap()
    }

    pub(crate) async fn replica_sql(&self, sql: &str) {
        execute(&self.th_replica_of_sg.dsn("cartedge"), sql).await;
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_at_th_for_an_sg_user_is_forwarded_applied_once_and_read_back_with_its_version() {
    let regions = TwoRegions::start("2s").await;
    let user = regions.user_homed_in("sg", "rw");
    // Another sg user's cart, written before th's replay pauses and read once at th.
    let earlier = regions.user_homed_in("sg", "rw-earlier");
    assert_eq!(
        regions
            .add(&regions.sg, &earlier, "sku-00003", 1, None)
            .await
            .status,
        StatusCode::OK
    );
    assert!(served_at(&regions, &regions.th, &earlier, 1).await);
    regions.replica_sql("SELECT pg_wal_replay_pause()").await;

    let written = regions.add(&regions.th, &user, "sku-00001", 2, None).await;
    assert_eq!(
        written.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&written.body)
    );
    assert_eq!(written.header("cart-home-region"), Some("sg"));
    assert_eq!(written.version(), 1);
    assert_eq!(
        written.json()["currency"],
        "SGD",
        "a cart is priced in its home region's currency, whichever edge received the request"
    );
    let bound = regions
        .sg
        .app
        .auth
        .load()
        .min_version_cookie(&format!("u:{user}"), 1);
    assert_eq!(
        written
            .cookie("cart_min_version")
            .unwrap()
            .split(';')
            .next(),
        Some(format!("cart_min_version={bound}").as_str()),
        "set by the home edge, bound to the owner, valid in every region"
    );
    assert_eq!(regions.quantity_at_home(&user, "sku-00001").await, 2);

    // With the returned version th never answers older: its replica cannot replay, so it asks sg.
    let fresh = regions.get(&regions.th, &user, Some(1)).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(fresh.version(), 1);
    assert_eq!(fresh.quantity_of("sku-00001"), 2);
    // Even without it: th fenced its cache at version 1 as the answer passed through, and the
    // fence is a read-your-writes hint.
    let hinted = regions.get(&regions.th, &user, None).await;
    assert_eq!(hinted.version(), 1);

    // Meanwhile the heartbeat shows th's replica falling behind, and carts served from it (the
    // earlier user's) say so.
    let mut flagged = false;
    for _ in 0..100 {
        let view = regions.get(&regions.th, &earlier, None).await;
        if view.json()["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "stale_possible")
        {
            assert_eq!(view.version(), 1);
            flagged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(flagged, "a lagging replica's reads carry stale_possible");

    regions.replica_sql("SELECT pg_wal_replay_resume()").await;
    let mut converged = false;
    for _ in 0..100 {
        let view = regions.get(&regions.th, &user, None).await;
        let warned = view.json()["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "stale_possible");
        if view.version() == 1 && !warned && view.header("cart-region") == Some("th") {
            assert_eq!(view.quantity_of("sku-00001"), 2);
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        converged,
        "after replay resumes th serves the cart itself again"
    );
    let _ = regions.path();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_fails_forwarded_writes_fast_keeps_reads_and_loses_nothing_acknowledged() {
    // Without parking, as before it existed (tests/api/parking.rs covers adds parked instead).
    let regions = TwoRegions::start_with("700ms", NO_PARKING).await;
    let user = regions.user_homed_in("sg", "part");
    let mut acknowledged = 0;
    for _ in 0..3 {
        if regions
            .add(&regions.th, &user, "sku-00002", 1, None)
            .await
            .status
            == StatusCode::OK
        {
            acknowledged += 1;
        }
    }
    assert_eq!(acknowledged, 3);

    assert_eq!(
        regions
            .proxy
            .partition("sg", "th", PartitionMode::Blackhole),
        2
    );
    let cut = regions
        .add(&regions.th, &user, "sku-00002", 1, Some("during-partition"))
        .await;
    assert_eq!(cut.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(cut.error_code(), "home_region_unavailable");
    assert!(cut.header("retry-after").is_some());
    assert_eq!(cut.header("idempotency-key"), Some("during-partition"));
    let generated = regions.add(&regions.th, &user, "sku-00002", 1, None).await;
    assert_eq!(generated.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(generated
        .header("idempotency-key")
        .is_some_and(|k| k.starts_with("fwd-")));
    // th's forwarding metrics: three forwards answered, the cut ones failed, every one timed.
    let th_metrics = regions.th.app.metrics_text(Format::Text);
    assert!(
        metric_value(
            &th_metrics,
            "cartedge_forward_requests_total{peer=\"sg\",outcome=\"ok\"}"
        )
        .is_some_and(|count| count >= 3.0),
        "{th_metrics}"
    );
    let failed_forwards: f64 = ["error", "timeout", "breaker_open"]
        .iter()
        .filter_map(|outcome| {
            metric_value(
                &th_metrics,
                &format!("cartedge_forward_requests_total{{peer=\"sg\",outcome=\"{outcome}\"}}"),
            )
        })
        .sum();
    assert!(failed_forwards >= 2.0, "{th_metrics}");
    assert!(
        metric_value(
            &th_metrics,
            "cartedge_forward_duration_seconds_count{peer=\"sg\"}"
        )
        .is_some_and(|count| count >= 4.0),
        "{th_metrics}"
    );
    assert!(th_metrics.contains("cartedge_forward_breaker_open{peer=\"sg\"} "));
    let read = regions.get(&regions.th, &user, None).await;
    assert_eq!(read.status, StatusCode::OK, "reads keep working in th");
    assert_eq!(read.header("cart-region"), Some("th"));
    // A read that needs sg says the cart may be stale instead of failing.
    let needs_home = regions.get(&regions.th, &user, Some(1_000)).await;
    assert_eq!(needs_home.status, StatusCode::OK);
    assert!(needs_home.json()["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["code"] == "stale_possible"));
    // A user homed in th is not affected.
    let local_user = regions.user_homed_in("th", "part-local");
    assert_eq!(
        regions
            .add(&regions.th, &local_user, "sku-00003", 1, None)
            .await
            .status,
        StatusCode::OK
    );

    regions.proxy.heal("sg", "th");
    let mut retried = None;
    for _ in 0..60 {
        let retry = regions
            .add(&regions.th, &user, "sku-00002", 1, Some("during-partition"))
            .await;
        if retry.status == StatusCode::OK {
            retried = Some(retry);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(retried.is_some(), "writes work again after heal");
    // Every acknowledged write is there; the retried one applied once (the generated-key write
    // that timed out may or may not have reached sg before the cut).
    let quantity = regions.quantity_at_home(&user, "sku-00002").await;
    assert!(
        (acknowledged + 1..=acknowledged + 2).contains(&quantity),
        "quantity {quantity}"
    );
    let again = regions
        .add(&regions.th, &user, "sku-00002", 1, Some("during-partition"))
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(regions.quantity_at_home(&user, "sku-00002").await, quantity);
    assert!(regions.sg.app.metrics.edge.idempotent_replays.get() >= 1);
    // th measures the lag of its replica of sg's shard from the heartbeat (about once a
    // second); sg delivered its commits' invalidations to th.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut lag, mut delivered) = (None, None);
    while std::time::Instant::now() < deadline && (lag.is_none() || delivered.is_none()) {
        lag = metric_value(
            &regions.th.app.metrics_text(Format::Text),
            "cartedge_replica_lag_seconds{shard=\"sg-1\"}",
        );
        delivered = metric_value(
            &regions.sg.app.metrics_text(Format::Text),
            "cartedge_invalidations_total{outcome=\"delivered\"}",
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        lag.is_some_and(|seconds| seconds >= 0.0),
        "no replica lag at th"
    );
    assert!(
        delivered.is_some_and(|count| count >= 1.0),
        "no invalidation delivered by sg"
    );
}

/// The value of the sample `series` (name and labels exactly) in an exposition.
fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_whose_answer_was_lost_after_the_commit_is_retried_and_applied_once() {
    let regions = TwoRegions::start_with("800ms", NO_PARKING).await;
    let user = regions.user_homed_in("sg", "lost");
    // Warm the th -> sg connection so the slow link delays only the request and its answer.
    assert_eq!(
        regions
            .add(&regions.th, &user, "sku-00001", 1, None)
            .await
            .status,
        StatusCode::OK
    );
    // The request reaches sg (and commits) after 500 ms; its answer would arrive after 1 s,
    // past th's 800 ms forward timeout.
    regions.proxy.set_delay("sg", "th", 500);
    let lost = regions
        .add(&regions.th, &user, "sku-00004", 3, Some("lost-answer"))
        .await;
    assert_eq!(lost.status, StatusCode::SERVICE_UNAVAILABLE);
    regions.proxy.set_delay("sg", "th", 0);
    let mut committed = false;
    for _ in 0..50 {
        if regions.quantity_at_home(&user, "sku-00004").await == 3 {
            committed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        committed,
        "the home edge committed the write whose answer was lost"
    );
    let mut retry = None;
    for _ in 0..40 {
        let attempt = regions
            .add(&regions.th, &user, "sku-00004", 3, Some("lost-answer"))
            .await;
        if attempt.status == StatusCode::OK {
            retry = Some(attempt);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retry = retry.expect("the retry succeeds once the link is fast again");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.quantity_of("sku-00004"), 3);
    assert_eq!(
        regions.quantity_at_home(&user, "sku-00004").await,
        3,
        "applied once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_refuse_writes_from_another_ring_and_never_forward_a_forwarded_request() {
    let regions = TwoRegions::start("2s").await;
    let forwarder = regions.th_client_of_sg(None);
    let user_of_th = regions.user_homed_in("th", "misdirected");
    let token = regions.token(&user_of_th);
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("cart-forwarded-from", HeaderValue::from_static("th"));
    headers.insert("cart-ring", HeaderValue::from_static("0000000000000000"));
    let body = Bytes::from_static(br#"{"item_id":"sku-00001","quantity":1}"#);
    let other_ring = forwarder
        .send(
            "sg",
            Method::POST,
            "/api/v1/cart/items",
            &headers,
            body.clone(),
        )
        .await
        .unwrap();
    assert_eq!(other_ring.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&other_ring.body).contains("topology_mismatch"));
    assert_eq!(regions.sg.app.metrics.edge.topology_mismatches.get(), 1);

    headers.insert(
        "cart-ring",
        HeaderValue::from_str(regions.sg.app.topology().ring.fingerprint()).unwrap(),
    );
    let misdirected = forwarder
        .send("sg", Method::POST, "/api/v1/cart/items", &headers, body)
        .await
        .unwrap();
    assert_eq!(misdirected.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(String::from_utf8_lossy(&misdirected.body).contains("misdirected"));
    let _ = &regions.th_primary;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_at_home_fences_the_other_regions_cache() {
    let regions = TwoRegions::start("2s").await;
    let user = regions.user_homed_in("sg", "inval");
    assert_eq!(
        regions
            .add(&regions.sg, &user, "sku-00005", 1, None)
            .await
            .status,
        StatusCode::OK
    );
    // th caches version 1 once its replica has it.
    let mut cached = false;
    for _ in 0..100 {
        let view = regions.get(&regions.th, &user, None).await;
        if view.version() == 1 {
            let again = regions.get(&regions.th, &user, None).await;
            cached = again.header("cart-source") == Some("cache");
            if cached {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cached, "th serves version 1 from its cache");
    regions.replica_sql("SELECT pg_wal_replay_pause()").await;
    assert_eq!(
        regions
            .add(&regions.sg, &user, "sku-00005", 1, None)
            .await
            .version(),
        2
    );
    // sg's invalidation reaches th and fences its cache: th stops serving version 1 from cache.
    let owner = cartedge::domain::ids::OwnerKey::from_stored(format!("u:{user}"));
    let mut fenced = false;
    for _ in 0..100 {
        if regions.th.app.store.cache.get(&owner).await.is_none() {
            fenced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fenced,
        "th's cached version 1 was fenced by sg's invalidation"
    );
    regions.replica_sql("SELECT pg_wal_replay_resume()").await;
}

/// A guest session minted by an anonymous add at `edge`: its cart is homed in `edge`'s region,
/// bound inside the session id.
async fn guest_minted_at(regions: &TwoRegions, edge: &Edge, item: &str) -> String {
    let body = format!(r#"{{"item_id":"{item}","quantity":2}}"#);
    let added = regions
        .send(edge, "POST", "/api/v1/cart/items", &[], Some(&body))
        .await;
    assert_eq!(added.status, StatusCode::OK, "{:?}", added.body);
    let session = added.header("cart-session").unwrap().to_string();
    let region = edge.app.config.region.id.to_string();
    assert_eq!(added.header("cart-home-region"), Some(region.as_str()));
    assert_eq!(
        cartedge::auth::session_home(&session).as_deref(),
        Some(region.as_str())
    );
    session
}

/// Whether `edge` comes to serve `user`'s cart at `version` itself (its replica has replayed
/// it), polling for at most five seconds.
async fn served_at(regions: &TwoRegions, edge: &Edge, user: &str, version: i64) -> bool {
    let region = edge.app.config.region.id.to_string();
    for _ in 0..100 {
        let view = regions.get(edge, user, None).await;
        if view.version() == version && view.header("cart-region") == Some(region.as_str()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Adds `quantity` of `item` at `edge` as the guest holding `session`.
async fn guest_add(
    regions: &TwoRegions,
    edge: &Edge,
    session: &str,
    item: &str,
    quantity: i64,
) -> TestResponse {
    let body = format!(r#"{{"item_id":"{item}","quantity":{quantity}}}"#);
    regions
        .send(
            edge,
            "POST",
            "/api/v1/cart/items",
            &[("cart-session", session.to_string())],
            Some(&body),
        )
        .await
}

/// The shard holding a guest's cart (on its home region's ring).
fn guest_shard(regions: &TwoRegions, session: &str) -> String {
    let home = cartedge::auth::session_home(session);
    regions
        .sg
        .app
        .topology()
        .ring
        .place(&format!("g:{session}"), home.as_deref())
        .unwrap()
        .shard
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cart_homed_in_sg_merges_into_a_user_cart_homed_in_th_and_checks_out() {
    let regions = TwoRegions::start("2s").await;
    let user = regions.user_homed_in("th", "merge");
    // The user's cart (THB, homed in th) is written through th; the guest started shopping in
    // sg (its session, minted there, homes its cart in sg) and goes on at th.
    let added = regions.add(&regions.th, &user, "sku-00001", 1, None).await;
    assert_eq!(added.status, StatusCode::OK, "{:?}", added.body);
    let session = guest_minted_at(&regions, &regions.sg, "sku-00001").await;
    let extra = guest_add(&regions, &regions.th, &session, "sku-00002", 1).await;
    assert_eq!(extra.status, StatusCode::OK);
    // Log-in happens at the sg edge: it forwards to th, which freezes the guest cart in sg.
    let headers = [
        ("authorization", format!("Bearer {}", regions.token(&user))),
        ("cart-session", session.clone()),
    ];
    for attempt in 0..2 {
        let merged = regions
            .send(&regions.sg, "POST", "/api/v1/cart/merge", &headers, None)
            .await;
        assert_eq!(
            merged.status,
            StatusCode::OK,
            "{attempt}: {:?}",
            merged.body
        );
        assert_eq!(
            merged.quantity_of("sku-00001"),
            3,
            "attempt {attempt}: merged once"
        );
        assert_eq!(merged.quantity_of("sku-00002"), 1);
        if attempt == 0 {
            assert_eq!(merged.header("cart-home-region"), Some("th"));
        }
    }
    let guest = regions
        .send(
            &regions.sg,
            "GET",
            "/api/v1/cart",
            &[("cart-session", session.clone())],
            None,
        )
        .await;
    assert_eq!(guest.json()["items"], serde_json::Value::Array(vec![]));
    // The merged-away session writing at th is relayed to sg, whose edge starts a new guest
    // cart (homed where the old one was) instead of reopening the merged one.
    let after = guest_add(&regions, &regions.th, &session, "sku-00003", 1).await;
    assert_eq!(after.status, StatusCode::OK, "{:?}", after.body);
    let successor = after.header("cart-session").unwrap().to_string();
    assert_ne!(successor, session);
    assert!(after.cookie("cart_session").is_some());
    assert_eq!(after.json()["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        guest_shard(&regions, &successor),
        guest_shard(&regions, &session)
    );
    // Checkout at sg runs in th against the catalog primary.
    let order = regions
        .send(
            &regions.sg,
            "POST",
            "/api/v1/cart/checkout",
            &[
                ("authorization", format!("Bearer {}", regions.token(&user))),
                ("idempotency-key", "co-1".to_string()),
            ],
            None,
        )
        .await;
    assert_eq!(order.status, StatusCode::CREATED, "{:?}", order.body);
    let body = order.json();
    assert_eq!(body["currency"], "THB");
    let id = body["order_id"].as_str().unwrap();
    assert!(id.starts_with("ord_th-1_"), "{id}");
    let seen = regions
        .send(
            &regions.sg,
            "GET",
            &format!("/api/v1/orders/{id}"),
            &[("authorization", format!("Bearer {}", regions.token(&user)))],
            None,
        )
        .await;
    assert_eq!(seen.status, StatusCode::OK, "{:?}", seen.body);
    assert_eq!(seen.json()["order_id"], body["order_id"]);
    let cart = regions
        .get(
            &regions.sg,
            &user,
            order.header("cart-version").and_then(|v| v.parse().ok()),
        )
        .await;
    assert_eq!(cart.json()["items"], serde_json::Value::Array(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_min_version_beyond_the_cart_is_answered_by_the_home_primary_in_both_regions() {
    let regions = TwoRegions::start("2s").await;
    let user = regions.user_homed_in("sg", "beyond");
    assert_eq!(
        regions
            .add(&regions.sg, &user, "sku-00004", 1, None)
            .await
            .status,
        StatusCode::OK
    );
    let no_stale_warning = |view: &TestResponse| {
        !view.json()["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "stale_possible")
    };
    let beyond = |edge: &Edge| edge.app.metrics.edge.min_version_beyond_cart.get();

    // At home: the primary's cart is the answer, read here, never forwarded to sg itself.
    let home = regions.get(&regions.sg, &user, Some(9)).await;
    assert_eq!(home.status, StatusCode::OK);
    assert_eq!(
        (home.version(), home.header("cart-source")),
        (1, Some("primary"))
    );
    assert!(
        no_stale_warning(&home),
        "{}",
        String::from_utf8_lossy(&home.body)
    );
    assert_eq!(beyond(&regions.sg), 1);

    // Elsewhere: th's replica is below the minimum, so th asks sg, whose primary answers
    // version 1 without a warning; th relays that answer.
    let mut replicated = false;
    for _ in 0..100 {
        if regions.get(&regions.th, &user, None).await.version() == 1 {
            replicated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replicated);
    let away = regions.get(&regions.th, &user, Some(9)).await;
    assert_eq!(away.status, StatusCode::OK);
    assert_eq!(away.version(), 1);
    assert_eq!(away.header("cart-region"), Some("sg"), "the home's answer");
    assert!(
        no_stale_warning(&away),
        "{}",
        String::from_utf8_lossy(&away.body)
    );
    assert_eq!(beyond(&regions.sg), 2, "counted where the primary answered");
    let _ = &regions.th_primary;
}

/// A token whose `region` claim homes `sub` in `region`.
pub(crate) fn homed_token(regions: &TwoRegions, sub: &str, region: &str) -> String {
    let extra = cartedge::auth::ExtraClaims {
        region: Some(region),
        ..Default::default()
    };
    cartedge::auth::issue_token_with(
        &regions.sg.app.config.auth,
        sub,
        Duration::from_secs(3600),
        crate::helpers::now_unix(),
        &extra,
    )
    .unwrap()
}

/// Adds `quantity` of `sku-00001` at `edge` with `token`.
async fn add_with_token(
    regions: &TwoRegions,
    edge: &Edge,
    token: &str,
    quantity: i64,
) -> TestResponse {
    let headers = [("authorization", format!("Bearer {token}"))];
    let body = format!(r#"{{"item_id":"sku-00001","quantity":{quantity}}}"#);
    regions
        .send(edge, "POST", "/api/v1/cart/items", &headers, Some(&body))
        .await
}

/// The quantity of `item` in `owner`'s cart on the database `pg` (0 when absent).
async fn quantity_in(pg: &PgInstance, owner: &str, item: &str) -> i64 {
    crate::helpers::query_opt_i64(
        &pg.dsn("cartedge"),
        "SELECT quantity::bigint FROM cart_items WHERE owner = $1 AND item_id = $2",
        &[&owner, &item],
    )
    .await
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_claim_homes_a_shopper_in_their_own_region_and_prices_the_cart_there() {
    let regions = TwoRegions::start("2s").await;
    // /health names every dependency: th's primary and replica of th-1, its replica of sg-1
    // (whose primary is sg's), and its one peer.
    let health = regions.send(&regions.th, "GET", "/health", &[], None).await;
    assert_eq!(health.status, StatusCode::OK, "{:?}", health.body);
    assert_eq!(
        health.json()["shards"],
        serde_json::json!([
            {"id": "sg-1", "replica": "ok"},
            {"id": "th-1", "primary": "ok", "replica": "ok"}
        ])
    );
    assert_eq!(
        health.json()["peers"],
        serde_json::json!([{"region": "sg", "state": "ok"}])
    );
    // A Thai shopper whom the global ring would home in sg: the claim homes the cart in th.
    let thai = regions.user_homed_in("sg", "thai");
    let token = homed_token(&regions, &thai, "th");
    let at_home = add_with_token(&regions, &regions.th, &token, 2).await;
    assert_eq!(at_home.status, StatusCode::OK, "{:?}", at_home.body);
    assert_eq!(at_home.header("cart-home-region"), Some("th"));
    assert_eq!(at_home.json()["currency"], "THB");
    // Travelling: sg relays the write to th, and the cart stays in THB.
    let away = add_with_token(&regions, &regions.sg, &token, 1).await;
    assert_eq!(away.status, StatusCode::OK, "{:?}", away.body);
    assert_eq!(away.header("cart-home-region"), Some("th"));
    assert_eq!(away.json()["currency"], "THB");
    let owner = format!("u:{thai}");
    assert_eq!(
        quantity_in(&regions.th_primary, &owner, "sku-00001").await,
        3
    );
    assert_eq!(
        quantity_in(&regions.sg_primary, &owner, "sku-00001").await,
        0
    );
    // Read back at sg with the version the write returned: never older.
    let version = away.version().to_string();
    let read = regions
        .send(
            &regions.sg,
            "GET",
            "/api/v1/cart",
            &[
                ("authorization", format!("Bearer {token}")),
                ("cart-min-version", version),
            ],
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.quantity_of("sku-00001"), 3);

    // A Singaporean whom the global ring would home in th, adding at th: relayed to sg, priced
    // in SGD although the first write came through Bangkok.
    let singaporean = regions.user_homed_in("th", "singaporean");
    let token = homed_token(&regions, &singaporean, "sg");
    let relayed = add_with_token(&regions, &regions.th, &token, 1).await;
    assert_eq!(relayed.status, StatusCode::OK, "{:?}", relayed.body);
    assert_eq!(relayed.header("cart-home-region"), Some("sg"));
    assert_eq!(relayed.json()["currency"], "SGD");
    let owner = format!("u:{singaporean}");
    assert_eq!(
        quantity_in(&regions.sg_primary, &owner, "sku-00001").await,
        1
    );

    // A claim naming a region that homes no shard is no credential of this deployment.
    let stranger = homed_token(&regions, "stranger", "vn");
    for edge in [&regions.sg, &regions.th] {
        let refused = add_with_token(&regions, edge, &stranger, 1).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.error_code(), "unauthenticated");
        let bearer = [("authorization", format!("Bearer {stranger}"))];
        let read = regions
            .send(edge, "GET", "/api/v1/cart", &bearer, None)
            .await;
        assert_eq!(read.status, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_homed_where_its_session_was_minted_and_old_credentials_keep_their_carts() {
    let regions = TwoRegions::start("2s").await;
    // A guest minted at th: homed in th (the id says so), whichever edge it calls next.
    let session = guest_minted_at(&regions, &regions.th, "sku-00001").await;
    let owner = format!("g:{session}");
    let more = guest_add(&regions, &regions.sg, &session, "sku-00001", 1).await;
    assert_eq!(more.status, StatusCode::OK, "{:?}", more.body);
    assert_eq!(more.header("cart-home-region"), Some("th"));
    assert_eq!(more.json()["currency"], "THB");
    assert_eq!(
        quantity_in(&regions.th_primary, &owner, "sku-00001").await,
        3
    );

    // Credentials from before home regions: a v2 session (no region inside) and a token
    // without a claim. Both stay on the global ring, so they reach the carts they already
    // have. Pick ones the global ring homes in sg, written at th.
    let auth = regions.th.app.auth.load();
    let ring = &regions.sg.app.topology().ring;
    let old_session = (0..256)
        .map(|_| auth.issue_session_at(crate::helpers::now_unix()))
        .find(|s| ring.locate(&format!("g:{}", s.as_str())).home == "sg")
        .unwrap();
    assert_eq!(cartedge::auth::session_home(old_session.as_str()), None);
    let old_user = regions.user_homed_in("sg", "old-token");
    let old_owner_keys = [
        format!("g:{}", old_session.as_str()),
        format!("u:{old_user}"),
    ];
    let credentials = [
        ("cart-session", old_session.as_str().to_string()),
        (
            "authorization",
            format!("Bearer {}", regions.token(&old_user)),
        ),
    ];
    for (credential, owner) in credentials.iter().zip(&old_owner_keys) {
        // The cart they already had (written on sg-1, where the global ring puts them).
        execute(
            &regions.sg_primary.dsn("cartedge"),
            &format!(
                "INSERT INTO carts (owner, version, currency, updated_at) VALUES ('{owner}', 1, 'SGD', now());
                 INSERT INTO cart_items (owner, line_id, item_id, quantity, unit_price_minor, currency, added_at)
                 VALUES ('{owner}', 'sku-00002', 'sku-00002', 4, 100, 'SGD', now())"
            ),
        )
        .await;
        let read = regions
            .send(
                &regions.sg,
                "GET",
                "/api/v1/cart",
                std::slice::from_ref(credential),
                None,
            )
            .await;
        assert_eq!(read.status, StatusCode::OK, "{owner}: {:?}", read.body);
        assert_eq!(read.quantity_of("sku-00002"), 4, "{owner}");
        let added = regions
            .send(
                &regions.th,
                "POST",
                "/api/v1/cart/items",
                std::slice::from_ref(credential),
                Some(r#"{"item_id":"sku-00002","quantity":1}"#),
            )
            .await;
        assert_eq!(added.status, StatusCode::OK, "{owner}: {:?}", added.body);
        assert_eq!(added.header("cart-home-region"), Some("sg"), "{owner}");
        assert_eq!(added.quantity_of("sku-00002"), 5, "{owner}");
        assert_eq!(
            quantity_in(&regions.sg_primary, owner, "sku-00002").await,
            5
        );
    }
}

/// One query's single bigint answer on `pg`'s `cartedge` database.
async fn query_i64(pg: &PgInstance, sql: &str) -> i64 {
    crate::helpers::query_opt_i64(&pg.dsn("cartedge"), sql, &[])
        .await
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visiting_shoppers_cart_is_priced_and_named_from_its_home_catalog_and_reserves_there() {
    let regions = TwoRegions::start("2s").await;
    let user = regions.user_homed_in("th", "visitor");
    let added = regions.add(&regions.th, &user, "sku-00001", 2, None).await;
    assert_eq!(added.status, StatusCode::OK, "{:?}", added.body);
    assert_eq!(added.json()["currency"], "THB");
    // sg serves the cart itself once its replica of th-1 has it.
    assert!(
        served_at(&regions, &regions.sg, &user, 1).await,
        "sg serves the visitor's cart from its replica"
    );
    // th's catalog (not sg's) renames and re-prices it.
    execute(
        &regions.th_primary.dsn("cartedge"),
        "UPDATE catalog_items SET name = 'Kaeng som' WHERE item_id = 'sku-00001'; \
         UPDATE catalog_prices SET amount_minor = 4321 WHERE item_id = 'sku-00001' AND currency = 'THB'",
    )
    .await;
    // Read at sg, the visitor's cart shows th's catalog once sg's replica of it has the change.
    let mut seen = None;
    for _ in 0..100 {
        let view = regions.get(&regions.sg, &user, None).await;
        assert_eq!(view.status, StatusCode::OK);
        assert_eq!(view.header("cart-region"), Some("sg"), "served at sg");
        let line = view.json()["items"][0].clone();
        if line["name"] == "Kaeng som" {
            seen = Some(line);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = seen.expect("sg shows the name from th's catalog");
    assert_eq!(
        line["current_price"],
        serde_json::json!({"amount_minor": 4321, "currency": "THB"})
    );
    assert_eq!(line["price_changed"], true);
    // An owner homed in th without a cart is shown an empty cart in THB at sg too.
    let newcomer = regions.user_homed_in("th", "visitor-empty");
    let empty = regions.get(&regions.sg, &newcomer, None).await;
    assert_eq!(empty.json()["currency"], "THB");
    // sg's own catalog still has the old name: a cart homed in sg shows that one.
    let local = regions.user_homed_in("sg", "visitor-local");
    let at_home = regions.add(&regions.sg, &local, "sku-00001", 1, None).await;
    assert_eq!(at_home.json()["items"][0]["name"], "Demo item 1");

    // Checked out through sg, the visitor's order reserves stock in th's catalog only.
    let stock = "SELECT stock::bigint FROM catalog_items WHERE item_id = 'sku-00001'";
    let (th_before, sg_before) = (
        query_i64(&regions.th_primary, stock).await,
        query_i64(&regions.sg_primary, stock).await,
    );
    let order = regions
        .send(
            &regions.sg,
            "POST",
            "/api/v1/cart/checkout",
            &[
                ("authorization", format!("Bearer {}", regions.token(&user))),
                ("idempotency-key", "visit-1".to_string()),
            ],
            Some(r#"{"accept_price_changes":true}"#),
        )
        .await;
    assert_eq!(order.status, StatusCode::CREATED, "{:?}", order.body);
    assert_eq!(order.json()["total_price"]["amount_minor"], 2 * 4321);
    assert_eq!(query_i64(&regions.th_primary, stock).await, th_before - 2);
    assert_eq!(query_i64(&regions.sg_primary, stock).await, sg_before);
}

/// `user` logs in at sg with the guest `session`.
async fn merge_at_sg(regions: &TwoRegions, user: &str, session: &str) -> TestResponse {
    let headers = [
        ("authorization", format!("Bearer {}", regions.token(user))),
        ("cart-session", session.to_string()),
    ];
    regions
        .send(&regions.sg, "POST", "/api/v1/cart/merge", &headers, None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_merge_into_a_user_cart_homed_elsewhere_is_settled_by_the_guests_home_janitor() {
    let regions = TwoRegions::start("2s").await;
    let sg = regions.sg_primary.dsn("cartedge");
    let th = regions.th_primary.dsn("cartedge");
    let user = regions.user_homed_in("th", "stale");
    let added = regions.add(&regions.th, &user, "sku-00001", 1, None).await;
    assert_eq!(added.status, StatusCode::OK, "{:?}", added.body);
    let fail = "CREATE OR REPLACE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS \
                $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;";
    let age = "UPDATE carts SET merge_started_at = now() - interval '10 minutes' \
               WHERE merging_into IS NOT NULL";

    // 1. A guest homed in sg; the merge (run in th) fails before the user's cart is written.
    let abandoned = guest_minted_at(&regions, &regions.sg, "sku-00001").await;
    execute(
        &th,
        &format!(
            "{fail} CREATE TRIGGER inject BEFORE INSERT ON cart_merges \
             FOR EACH ROW EXECUTE FUNCTION fail();"
        ),
    )
    .await;
    assert!(merge_at_sg(&regions, &user, &abandoned)
        .await
        .status
        .is_server_error());
    execute(&th, "DROP TRIGGER inject ON cart_merges").await;
    execute(&sg, age).await;
    // sg's janitor asks th, which fences the merge off: sg rolls it back.
    let report = regions.sg.app.janitor_once().await.unwrap();
    assert_eq!(
        (report.merges_finished, report.merges_rolled_back),
        (0, 1),
        "{report:?}"
    );
    let again = guest_add(&regions, &regions.sg, &abandoned, "sku-00002", 1).await;
    assert_eq!(again.status, StatusCode::OK, "the guest uses their cart");
    assert_eq!(again.quantity_of("sku-00001"), 2);
    assert_eq!(
        regions
            .get(&regions.th, &user, None)
            .await
            .quantity_of("sku-00001"),
        1
    );

    // 2. Another guest; the merge reaches the user's cart in th, emptying the guest cart in sg
    // fails.
    let half = guest_minted_at(&regions, &regions.sg, "sku-00003").await;
    execute(
        &sg,
        &format!(
            "{fail} CREATE TRIGGER inject BEFORE DELETE ON cart_items \
             FOR EACH ROW WHEN (OLD.owner LIKE 'g:%') EXECUTE FUNCTION fail();"
        ),
    )
    .await;
    let merged = merge_at_sg(&regions, &user, &half).await;
    assert_eq!(merged.status, StatusCode::OK, "{:?}", merged.body);
    assert_eq!(merged.quantity_of("sku-00003"), 2);
    execute(&sg, "DROP TRIGGER inject ON cart_items").await;
    execute(&sg, age).await;
    // th says the merge was applied: sg finishes it, adding nothing.
    let report = regions.sg.app.janitor_once().await.unwrap();
    assert_eq!(
        (report.merges_finished, report.merges_rolled_back),
        (1, 0),
        "{report:?}"
    );
    let guest = regions
        .send(
            &regions.sg,
            "GET",
            "/api/v1/cart",
            &[("cart-session", half.clone())],
            None,
        )
        .await;
    assert_eq!(guest.json()["items"], serde_json::Value::Array(vec![]));
    let user_cart = regions.get(&regions.th, &user, None).await;
    assert_eq!(user_cart.quantity_of("sku-00003"), 2, "once");
    assert_eq!(user_cart.quantity_of("sku-00001"), 1);
}

/// A process about to exit (a `ring move`, a janitor pass) waits for the cross-region cache
/// fences it queued: once `settle_invalidations` says so, th's cache has seen each version,
/// with no polling. If it returned before the send finished, th would not have them yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalidations_a_process_queued_have_reached_the_other_region_once_settled() {
    let regions = TwoRegions::start("2s").await;
    use cartedge::domain::ids::OwnerKey;
    let owners: Vec<OwnerKey> = (0..40)
        .map(|n| OwnerKey::from_stored(format!("u:settle-{n}")))
        .collect();
    for (n, owner) in owners.iter().enumerate() {
        regions.sg.app.invalidate_elsewhere(owner, 7 + n as i64);
    }
    assert!(
        regions
            .sg
            .app
            .settle_invalidations(Duration::from_secs(10))
            .await,
        "sent within the bound"
    );
    for (n, owner) in owners.iter().enumerate() {
        let seen = regions.th.app.store.cache.read(owner).await.newest_version;
        assert!(
            seen.is_some_and(|version| version >= 7 + n as i64),
            "{owner}: th's cache saw {seen:?}"
        );
    }
}
