//! The command line as operators use it: check-config, token, migrate, catalog.

use std::process::{Command, Output};

use crate::helpers::{
    defaults_path, fresh_database, shared, test_config_text, TestApp, TestOptions,
};
use http::StatusCode;

fn cartedge(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cartedge"));
    command.arg("--defaults").arg(defaults_path()).args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

const SECRETS: [(&str, &str); 2] = [
    (
        "CARTEDGE__AUTH__SESSION_SECRET",
        "cli-session-secret-0123456789abcdef",
    ),
    (
        "CARTEDGE__AUTH__KEYS__0__SECRET",
        "cli-jwt-secret-0123456789abcdef0123",
    ),
];

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_redacted() {
    let region = concat!(env!("CARGO_MANIFEST_DIR"), "/regions/sg.toml");
    let output = cartedge(&["--config", region, "check-config"], &SECRETS);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("id = \"sg\""), "{printed}");
    assert!(printed.contains("currency = \"SGD\""));
    assert!(printed.contains("<redacted>"));
    // The replicas of the other regions' catalogs are connection strings: redacted too.
    assert!(printed.contains("[database.peer_catalogs]"), "{printed}");
    assert!(printed.contains("th = \"<redacted>\""), "{printed}");
    assert!(!printed.contains("pg-th-1-replica"), "{printed}");
    for (_, secret) in SECRETS {
        assert!(!printed.contains(secret), "a secret leaked");
    }
}

#[test]
fn every_production_region_file_passes_check_config_and_names_the_ring() {
    let ring = cartedge::topology::load_ring(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ring.toml"),
    )
    .unwrap();
    for region in ["sg", "id", "my", "th", "vn", "ph"] {
        let file = format!("{}/regions/{region}.toml", env!("CARGO_MANIFEST_DIR"));
        let output = cartedge(&["--config", &file, "check-config"], &SECRETS);
        assert!(
            output.status.success(),
            "{region}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let printed = String::from_utf8(output.stdout).unwrap();
        assert!(printed.contains(&format!("id = \"{region}\"")), "{printed}");
        assert!(
            printed.contains(&format!("fingerprint {}", ring.fingerprint())),
            "{printed}"
        );
        assert!(
            printed.contains("6 regions (id, my, ph, sg, th, vn)"),
            "{printed}"
        );
    }
}

#[test]
fn every_shipped_region_sells_from_its_own_catalog_and_reads_the_others_through_replicas() {
    let regions = ["sg", "id", "my", "th", "vn", "ph"];
    for region in regions {
        let file = format!("{}/regions/{region}.toml", env!("CARGO_MANIFEST_DIR"));
        let table: toml::Table = toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let database = table["database"].as_table().unwrap();
        let dsn = |key: &str| database[key].as_str().unwrap().to_string();
        // Its first shard's primary (and standby) and its replica here, like the shard DSNs.
        assert!(
            dsn("catalog_primary").starts_with(&format!(
                "host=pg-{region}-1.{region}.cartedge.internal,pg-{region}-1-standby.{region}."
            )),
            "{region}: {}",
            dsn("catalog_primary")
        );
        assert!(
            dsn("catalog").starts_with(&format!("host=pg-{region}-1-replica.{region}.")),
            "{region}: {}",
            dsn("catalog")
        );
        let peers = database["peer_catalogs"].as_table().unwrap();
        let mut named: Vec<&str> = peers.keys().map(String::as_str).collect();
        named.sort_unstable();
        let mut others: Vec<&str> = regions.iter().copied().filter(|r| *r != region).collect();
        others.sort_unstable();
        assert_eq!(named, others, "{region}");
        for (peer, replica) in peers {
            assert!(
                replica
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("host=pg-{peer}-1-replica.{region}.")),
                "{region}: {peer} = {replica}"
            );
        }
    }
}

#[test]
fn check_config_refuses_a_region_set_that_does_not_cover_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let regions = dir.path().join("regions");
    std::fs::create_dir_all(&regions).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    for region in ["sg", "id", "my", "th", "vn"] {
        std::fs::copy(
            format!("{root}/regions/{region}.toml"),
            regions.join(format!("{region}.toml")),
        )
        .unwrap();
    }
    // th stops listing a replica of ph-1, and ph has no region file at all.
    let th = std::fs::read_to_string(regions.join("th.toml")).unwrap();
    let cut = th.find("[[database.shards]]\nid = \"ph-1\"").unwrap();
    std::fs::write(regions.join("th.toml"), &th[..cut]).unwrap();
    let overlay = dir.path().join("sg.toml");
    let sg = std::fs::read_to_string(format!("{root}/regions/sg.toml"))
        .unwrap()
        .replace(
            "regions_dir = \"regions\"",
            &format!("regions_dir = \"{}\"", regions.display()),
        );
    std::fs::write(&overlay, sg).unwrap();
    let output = cartedge(
        &["--config", overlay.to_str().unwrap(), "check-config"],
        &SECRETS,
    );
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("region th cannot read shard ph-1"),
        "{error}"
    );
    assert!(
        error.contains("shard ph-1 is homed in ph, which has no region file"),
        "{error}"
    );
}

#[test]
fn check_config_fails_with_every_problem_before_binding_anything() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[cart]\nmax_lines = 0\n").unwrap();
    let output = cartedge(&["--config", file.to_str().unwrap(), "check-config"], &[]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("cart.max_lines") && error.contains("auth.session_secret"),
        "{error}"
    );
    std::fs::write(&file, "[cart]\nmax_lines = 5\nmax_linez = 5\n").unwrap();
    let typo = cartedge(
        &["--config", file.to_str().unwrap(), "check-config"],
        &SECRETS,
    );
    assert!(!typo.status.success());
    assert!(String::from_utf8_lossy(&typo.stderr).contains("max_linez"));
}

#[tokio::test]
async fn token_migrate_and_catalog_commands_act_on_the_configured_cluster() {
    let shared = shared();
    let (database, dsn) = fresh_database().await;
    let file = shared.dir.path().join(format!("{database}-cli.toml"));
    std::fs::write(
        &file,
        test_config_text(&dsn, &shared.redis.url(), "cli:", ""),
    )
    .unwrap();
    let config = file.to_str().unwrap().to_string();

    let migrate = cartedge(&["--config", &config, "migrate"], &[]);
    assert!(migrate.status.success());
    assert_eq!(
        String::from_utf8_lossy(&migrate.stdout).trim(),
        "shard sg-1: no pending migrations"
    );

    let csv = shared.dir.path().join(format!("{database}.csv"));
    std::fs::write(
        &csv,
        "item_id,name,stock,SGD,THB\nnew-1,New one,5,1234,3000\nnew-2,New two,0,99,\n",
    )
    .unwrap();
    let import = cartedge(
        &[
            "--config",
            &config,
            "catalog",
            "import",
            csv.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&import.stdout).trim(),
        "imported 2 items"
    );
    let price = cartedge(
        &[
            "--config",
            &config,
            "catalog",
            "set-price",
            "new-2",
            "SGD",
            "150",
        ],
        &[],
    );
    assert!(price.status.success());
    // A currency no region uses is refused.
    let unknown = cartedge(
        &[
            "--config",
            &config,
            "catalog",
            "set-price",
            "new-2",
            "XXX",
            "150",
        ],
        &[],
    );
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("no region uses XXX"), "{stderr}");
    let stock = cartedge(
        &["--config", &config, "catalog", "set-stock", "new-2", "7"],
        &[],
    );
    assert!(stock.status.success());
    let missing = cartedge(
        &["--config", &config, "catalog", "set-stock", "nope", "7"],
        &[],
    );
    assert!(!missing.status.success());

    let token = cartedge(
        &[
            "--config", &config, "token", "--sub", "carol", "--ttl", "5m",
        ],
        &[],
    );
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();

    // An edge on the same database accepts the token and sees the imported catalog.
    let edge = TestApp::spawn_on(&dsn, &database, TestOptions::default()).await;
    let added = edge
        .send(
            "POST",
            "/api/v1/cart/items",
            &[("authorization".into(), format!("Bearer {token}"))],
            Some(r#"{"item_id":"new-2","quantity":2}"#),
        )
        .await;
    assert_eq!(
        added.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&added.body)
    );
    assert_eq!(added.json()["owner"], "u:carol");
    assert_eq!(added.json()["items"][0]["unit_price"]["amount_minor"], 150);
    let sold_out_check = edge
        .query_i64("SELECT stock::bigint FROM catalog_items WHERE item_id = 'new-2'")
        .await;
    assert_eq!(sold_out_check, 7);
}

#[tokio::test]
async fn janitor_once_runs_one_pass_and_prints_what_it_did() {
    let shared = shared();
    let (database, dsn) = fresh_database().await;
    let config = shared.dir.path().join(format!("{database}-janitor.toml"));
    std::fs::write(
        &config,
        // The edge's own cache prefix: the janitor fences the carts it purges there.
        test_config_text(&dsn, &shared.redis.url(), &format!("{database}:cart:"), ""),
    )
    .unwrap();
    let app = TestApp::spawn_on(&dsn, &database, TestOptions::default()).await;
    app.add("gone", "sku-00001", 1).await;
    app.add("kept", "sku-00001", 1).await;
    app.sql("UPDATE carts SET updated_at = now() - interval '31 days' WHERE owner = 'u:gone'")
        .await;
    let config = config.to_str().unwrap();
    let pass = cartedge(&["--config", config, "janitor", "--once"], &[]);
    assert!(
        pass.status.success(),
        "{}",
        String::from_utf8_lossy(&pass.stderr)
    );
    let printed: serde_json::Value =
        serde_json::from_slice(pass.stdout.trim_ascii()).expect("one JSON line");
    assert_eq!(printed["shards"], serde_json::json!(["sg-1"]));
    assert_eq!(printed["carts_purged"], 1);
    let gone = app.user("gone", "GET", "/api/v1/cart", None).await;
    assert_eq!(gone.json()["items"], serde_json::json!([]));
    assert_eq!(
        app.user("kept", "GET", "/api/v1/cart", None)
            .await
            .quantity_of("sku-00001"),
        1
    );
}
