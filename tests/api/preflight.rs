//! `cartedge check-config` refuses every configuration `cartedge serve` refuses, with the same
//! exit status and the same message, and `serve` refuses it before binding a port.
//!
//! Each case is a region file broken in one way, layered like an operator's file over the
//! shipped defaults. The public listener is set to a port this test holds, so a `serve` that
//! got past the checks would fail with "binding …" instead: the control case shows that, and
//! every broken case must fail before it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::defaults_path;

/// Bound on one `serve` run; a refusal takes milliseconds.
const SERVE_LIMIT: Duration = Duration::from_secs(30);

const SESSION_SECRET: &str = "preflight-session-secret-0123456789";
const JWT_SECRET: &str = "preflight-jwt-secret-0123456789abcdef";
const DSN: &str = "host=127.0.0.1 port=1 user=cartedge dbname=cartedge";

/// A two-region world on disk: the ring, the peer's region file, the edge PKI, and a port
/// held so that `serve` cannot bind it.
struct World {
    dir: tempfile::TempDir,
    held: TcpListener,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        std::fs::write(
            base.join("ring.toml"),
            "version = 1\nvnodes = 200\n\
             [[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n\
             [[shards]]\nid = \"th-1\"\nhome = \"th\"\n",
        )
        .unwrap();
        std::fs::create_dir_all(base.join("regions")).unwrap();
        std::fs::write(
            base.join("regions/th.toml"),
            "[region]\nid = \"th\"\ncurrency = \"THB\"\n\
             [edge]\npublic_url = \"http://127.0.0.1\"\ninternal_url = \"https://127.0.0.1:1\"\n\
             [[database.shards]]\nid = \"sg-1\"\nreplica = \"x\"\n\
             [[database.shards]]\nid = \"th-1\"\nprimary = \"x\"\nreplica = \"x\"\n",
        )
        .unwrap();
        cartedge::forward::tls::generate_local_pki(&base.join("pki"), &["sg", "th"]).unwrap();
        World {
            dir,
            held: TcpListener::bind("127.0.0.1:0").unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A region file for `sg` that passes every check.
    fn good_region(&self) -> toml::Table {
        let text = format!(
            "[region]\nid = \"sg\"\ncurrency = \"SGD\"\n\
             [edge]\npublic_url = \"http://127.0.0.1:8080\"\ninternal_url = \"https://127.0.0.1:8443\"\n\
             [topology]\nring_file = \"{ring}\"\nregions_dir = \"{regions}\"\n\
             [server]\nlisten = \"{listen}\"\n\
             [tls]\nca_file = \"{pki}/ca.pem\"\ncert_file = \"{pki}/sg.pem\"\nkey_file = \"{pki}/sg.key\"\n\
             [redis]\nurl = \"redis://127.0.0.1:1/\"\n\
             [database]\ncatalog = \"{DSN}\"\ncatalog_primary = \"{DSN}\"\n\
             [database.peer_catalogs]\nth = \"{DSN}\"\n\
             [[database.shards]]\nid = \"sg-1\"\nprimary = \"{DSN}\"\nreplica = \"{DSN}\"\n\
             [[database.shards]]\nid = \"th-1\"\nreplica = \"{DSN}\"\n\
             [auth]\nsession_secret = \"{SESSION_SECRET}\"\n\
             [[auth.keys]]\nkid = \"test\"\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n\
             [janitor]\nenabled = false\n[events]\nrelay = false\n",
            ring = self.path("ring.toml").display(),
            regions = self.path("regions").display(),
            listen = self.held.local_addr().unwrap(),
            pki = self.path("pki").display(),
        );
        toml::from_str(&text).unwrap()
    }

    /// Writes the good region file with `overlay` merged into it (tables key by key; anything
    /// else, arrays included, replaced).
    fn region_file(&self, name: &str, overlay: &str) -> PathBuf {
        let mut region = self.good_region();
        cartedge::config::merge(&mut region, toml::from_str(overlay).expect("overlay TOML"));
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&region).unwrap()).unwrap();
        path
    }
}

impl World {
    /// Writes the good region file without the `[database]` key `key`.
    fn region_file_without(&self, name: &str, key: &str) -> PathBuf {
        let mut region = self.good_region();
        if let Some(toml::Value::Table(database)) = region.get_mut("database") {
            database.remove(key);
        }
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&region).unwrap()).unwrap();
        path
    }
}

/// `cartedge --defaults … --config <file> <command>` with no `CARTEDGE__…` (nor any other)
/// variable from this process's environment.
fn cartedge(file: &Path, command: &str) -> Command {
    let mut process = Command::new(env!("CARGO_BIN_EXE_cartedge"));
    process
        .env_clear()
        .arg("--defaults")
        .arg(defaults_path())
        .arg("--config")
        .arg(file)
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process
}

/// Runs `serve` until it exits, killing it past [`SERVE_LIMIT`] (then the test fails).
fn serve(file: &Path) -> Output {
    let mut child = cartedge(file, "serve").spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > SERVE_LIMIT {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!(
                "serve --config {} still running after {SERVE_LIMIT:?}: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn check_config(file: &Path) -> Output {
    cartedge(file, "check-config").output().unwrap()
}

#[test]
fn the_good_region_file_passes_check_config_and_serve_gets_as_far_as_binding() {
    let world = World::new();
    let file = world.region_file("good", "");
    let checked = check_config(&file);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(String::from_utf8_lossy(&checked.stdout).contains("2 regions (sg, th)"));
    let served = serve(&file);
    assert!(!served.status.success());
    let error = String::from_utf8_lossy(&served.stderr);
    let listen = world.held.local_addr().unwrap();
    assert!(error.contains(&format!("binding {listen}")), "{error}");
}

#[test]
fn check_config_and_serve_refuse_each_broken_region_file_alike_before_binding() {
    let world = World::new();
    let pki = world.path("pki");
    let pki = pki.display();
    let foreign = tempfile::tempdir().unwrap();
    cartedge::forward::tls::generate_local_pki(foreign.path(), &["sg"]).unwrap();
    let session = SESSION_SECRET;
    // (name, overlay on the good file, text the refusal must contain)
    let cases: Vec<(&str, String, String)> = vec![
        (
            "trusted-proxy-cidr",
            "[rate_limit]\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n".into(),
            "rate_limit.trusted_proxies[1] \"10.0.0.0/33\": invalid IP address syntax".into(),
        ),
        (
            "peer-url-override",
            "[topology.peer_urls]\nth = \"http://127.0.0.1:1\"\n".into(),
            "topology.peer_urls.th: \"http://127.0.0.1:1\" must be an https:// URL".into(),
        ),
        (
            "peer-url-unknown-region",
            "[topology.peer_urls]\nxx = \"https://127.0.0.1:1\"\n".into(),
            "topology.peer_urls.xx: no region \"xx\" in topology.regions_dir".into(),
        ),
        (
            "catalog-dsn",
            "[database]\ncatalog = \"host=127.0.0.1 port=notaport\"\n".into(),
            "database.catalog is not a valid PostgreSQL connection string: invalid connection string: invalid value for option `port`".into(),
        ),
        (
            "shard-dsn",
            format!(
                "[[database.shards]]\nid = \"sg-1\"\nprimary = \"postgres://u@h:port/x\"\nreplica = \"{DSN}\"\n\
                 [[database.shards]]\nid = \"th-1\"\nreplica = \"{DSN}\"\n"
            ),
            "database.shards[sg-1].primary is not a valid PostgreSQL connection string".into(),
        ),
        (
            "redis-url",
            "[redis]\nurl = \"tcp://127.0.0.1:6379\"\n".into(),
            "redis.url is not a valid redis URL".into(),
        ),
        (
            "redis-sentinels-without-master-name",
            "[redis]\nurl = \"redis://127.0.0.1:6379/\"\nsentinels = [\"redis://127.0.0.1:26379\"]\n".into(),
            "redis.sentinels and redis.master_name must both be set or both be empty".into(),
        ),
        (
            "redis-sentinels-beside-an-address",
            "[redis]\nurl = \"redis://10.1.2.3:6379/\"\nsentinels = [\"redis://127.0.0.1:26379\"]\nmaster_name = \"sg\"\n".into(),
            "redis.url must stay \"redis://127.0.0.1:6379/\" when redis.sentinels is set".into(),
        ),
        (
            "redis-sentinel-url",
            "[redis]\nurl = \"redis://127.0.0.1:6379/\"\nsentinels = [\"redis://127.0.0.1:26379\", \"sentinel:26380\"]\nmaster_name = \"sg\"\n".into(),
            "redis.sentinels[1] is not a valid redis URL".into(),
        ),
        (
            "missing-edge-key-file",
            format!("[tls]\nkey_file = \"{pki}/missing.key\"\n"),
            format!("tls.cert_file/tls.key_file: cannot read {pki}/missing.key"),
        ),
        (
            "mismatched-edge-cert-and-key",
            format!("[tls]\nkey_file = \"{pki}/th.key\"\n"),
            format!("key {pki}/th.key does not fit certificate {pki}/sg.pem"),
        ),
        (
            "edge-cert-of-another-edge",
            format!("[tls]\ncert_file = \"{pki}/th.pem\"\nkey_file = \"{pki}/th.key\"\n"),
            "does not name this edge (sg.edge.cartedge.internal)".into(),
        ),
        (
            "edge-ca-is-not-a-certificate",
            format!("[tls]\nca_file = \"{pki}/ca.key\"\n"),
            format!("tls.ca_file: no certificates found in {pki}/ca.key"),
        ),
        (
            "public-tls-mismatched",
            format!(
                "[server]\ntls_cert_file = \"{pki}/sg.pem\"\ntls_key_file = \"{}\"\n",
                foreign.path().join("sg.key").display()
            ),
            "server.tls_cert_file/tls_key_file: key".into(),
        ),
        (
            "public-tls-special-file",
            format!("[server]\ntls_cert_file = \"/dev/zero\"\ntls_key_file = \"{pki}/sg.key\"\n"),
            "server.tls_cert_file/tls_key_file: /dev/zero is not a regular file".into(),
        ),
        (
            "public-tls-cert-without-key",
            format!("[server]\ntls_cert_file = \"{pki}/sg.pem\"\n"),
            "server.tls_cert_file and server.tls_key_file must both be set or both be empty"
                .into(),
        ),
        (
            "jwt-algorithm",
            format!("[[auth.keys]]\nkid = \"test\"\nalgorithm = \"HS512\"\nsecret = \"{session}\"\n"),
            "auth.keys[0] (test): algorithm \"HS512\" is not one of HS256, ES256, EdDSA, RS256"
                .into(),
        ),
        (
            "jwt-public-key-file",
            format!(
                "[[auth.keys]]\nkid = \"es\"\nalgorithm = \"ES256\"\npublic_key_file = \"{}\"\n",
                world.path("ring.toml").display()
            ),
            format!(
                "auth.keys[0] (es): cannot parse {}",
                world.path("ring.toml").display()
            ),
        ),
        (
            "jwt-short-secret",
            "[[auth.keys]]\nkid = \"test\"\nalgorithm = \"HS256\"\nsecret = \"short\"\n".into(),
            "auth.keys[0] (test): HS256 secret must be at least 32 bytes".into(),
        ),
        (
            "session-secret",
            "[auth]\nsession_secret = \"too-short\"\n".into(),
            "auth.session_secret must be at least 32 bytes".into(),
        ),
        (
            "session-id-version",
            "[auth]\nsession_id_version = 4\n".into(),
            "auth.session_id_version must be 1, 2 or 3".into(),
        ),
        (
            "missing-catalog-primary",
            "[database]\ncatalog_primary = \"\"\n".into(),
            "database.catalog_primary is required: region sg is home to shard(s) sg-1".into(),
        ),
        (
            "peer-catalog-of-an-unknown-region",
            format!("[database.peer_catalogs]\nxx = \"{DSN}\"\n"),
            "database.peer_catalogs.xx: no region \"xx\" in topology.regions_dir".into(),
        ),
        (
            "peer-catalog-of-this-region",
            format!("[database.peer_catalogs]\nsg = \"{DSN}\"\n"),
            "database.peer_catalogs.sg: this region's own catalog is database.catalog".into(),
        ),
        (
            "peer-catalog-dsn",
            "[database.peer_catalogs]\nth = \"host=127.0.0.1 port=notaport\"\n".into(),
            "database.peer_catalogs.th is not a valid PostgreSQL connection string".into(),
        ),
        (
            "shard-not-in-ring",
            format!(
                "[[database.shards]]\nid = \"sg-1\"\nprimary = \"{DSN}\"\nreplica = \"{DSN}\"\n\
                 [[database.shards]]\nid = \"th-1\"\nreplica = \"{DSN}\"\n\
                 [[database.shards]]\nid = \"zz-9\"\nreplica = \"{DSN}\"\n"
            ),
            "region sg: shard zz-9 is not in the ring".into(),
        ),
        (
            "missing-ring-file",
            format!(
                "[topology]\nring_file = \"{}\"\n",
                world.path("no-ring.toml").display()
            ),
            "topology: cannot read".into(),
        ),
        (
            "log-filter",
            "[log]\nfilter = \"info,cartedge=loud\"\n".into(),
            "log.filter \"info,cartedge=loud\":".into(),
        ),
        (
            "unknown-field",
            "[cart]\nmax_linez = 3\n".into(),
            "unknown field `max_linez`".into(),
        ),
        (
            "bad-duration",
            "[redis]\nttl = \"soon\"\n".into(),
            "invalid duration \"soon\"".into(),
        ),
        (
            "same-port-twice",
            format!(
                "[server]\nadmin_listen = \"{}\"\n",
                world.held.local_addr().unwrap()
            ),
            "server.admin_listen".into(),
        ),
    ];
    assert!(cases.len() >= 12);
    let mut files: Vec<(&str, PathBuf, String)> = cases
        .iter()
        .map(|(name, overlay, expected)| {
            (*name, world.region_file(name, overlay), expected.clone())
        })
        .collect();
    // A region homing shards must read the catalog of every other region that does.
    files.push((
        "missing-peer-catalog",
        world.region_file_without("missing-peer-catalog", "peer_catalogs"),
        "database.peer_catalogs.th is required: region th homes shards".into(),
    ));
    for (name, file, expected) in &files {
        let checked = check_config(file);
        let served = serve(file);
        let checked_error = String::from_utf8_lossy(&checked.stderr);
        let served_error = String::from_utf8_lossy(&served.stderr);
        assert!(
            !checked.status.success(),
            "{name}: check-config accepted it"
        );
        assert!(
            checked.stdout.is_empty(),
            "{name}: check-config printed a configuration it refused"
        );
        assert!(
            checked_error.contains(expected.as_str()),
            "{name}: check-config said {checked_error}"
        );
        assert_eq!(
            served.status.code(),
            checked.status.code(),
            "{name}: serve said {served_error}"
        );
        assert_eq!(served_error, checked_error, "{name}: different refusals");
        assert!(
            !served_error.contains("binding"),
            "{name}: serve got as far as binding: {served_error}"
        );
    }
}
