//! The command line as operators use it: check-config, token, migrate, catalog.

use std::process::{Command, Output};

use crate::helpers::{
    defaults_path, fresh_database, shared, test_config_text, TestApp, TestOptions, JWT_SECRET,
    SESSION_SECRET,
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
        "sg: imported 2 items"
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

/// The local cluster's three regions as the CLI finds them without `--config`:
/// `.cartedge/local/regions/<id>.toml` under the working directory, each region's catalog in
/// its own database.
struct LocalRegions {
    dir: tempfile::TempDir,
    /// (region, currency, database DSN)
    regions: Vec<(&'static str, &'static str, String)>,
}

impl LocalRegions {
    async fn new() -> LocalRegions {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join(".cartedge/local");
        let regions_dir = local.join("regions");
        std::fs::create_dir_all(&regions_dir).unwrap();
        let mut regions = Vec::new();
        for (id, currency) in [("sg", "SGD"), ("id", "IDR"), ("th", "THB")] {
            regions.push((id, currency, fresh_database().await.1));
        }
        let ring = local.join("ring.toml");
        let mut ring_text = String::from("version = 1\nvnodes = 200\n");
        for (id, _, _) in &regions {
            ring_text.push_str(&format!("[[shards]]\nid = \"{id}-1\"\nhome = \"{id}\"\n"));
        }
        std::fs::write(&ring, ring_text).unwrap();
        for (id, currency, dsn) in &regions {
            let mut text = format!(
                "[region]\nid = \"{id}\"\ncurrency = \"{currency}\"\n\
                 [edge]\npublic_url = \"http://127.0.0.1:1\"\ninternal_url = \"https://127.0.0.1:1\"\n\
                 [topology]\nring_file = \"{ring}\"\nregions_dir = \"{regions}\"\n\
                 [auth]\nsession_secret = \"{SESSION_SECRET}\"\n\
                 [[auth.keys]]\nkid = \"test\"\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n\
                 [database]\ncatalog = \"{dsn}\"\ncatalog_primary = \"{dsn}\"\n",
                ring = ring.display(),
                regions = regions_dir.display(),
            );
            for (shard_home, _, shard_dsn) in &regions {
                text.push_str(&format!(
                    "[[database.shards]]\nid = \"{shard_home}-1\"\nreplica = \"{shard_dsn}\"\n"
                ));
                if shard_home == id {
                    text.push_str(&format!("primary = \"{shard_dsn}\"\n"));
                }
            }
            std::fs::write(regions_dir.join(format!("{id}.toml")), text).unwrap();
        }
        LocalRegions { dir, regions }
    }

    /// `cartedge <args>` run where the local cluster is (no `--config`: its `sg` file).
    fn cartedge(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cartedge"))
            .current_dir(self.dir.path())
            .arg("--defaults")
            .arg(defaults_path())
            .args(args)
            .output()
            .unwrap()
    }

    fn file(&self, region: &str) -> String {
        self.dir
            .path()
            .join(format!(".cartedge/local/regions/{region}.toml"))
            .display()
            .to_string()
    }

    async fn query_i64(&self, region: &str, sql: &str) -> Option<i64> {
        let dsn = &self.regions.iter().find(|r| r.0 == region).unwrap().2;
        let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        let value = client
            .query_opt(sql, &[])
            .await
            .unwrap()
            .map(|row| row.get(0));
        drop(client);
        let _ = driver.await;
        value
    }
}

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn failed(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[tokio::test]
async fn catalog_commands_on_the_local_cluster_write_every_regions_catalog_in_its_currency() {
    let local = LocalRegions::new().await;
    let price = |currency: &str| {
        format!("SELECT amount_minor FROM catalog_prices WHERE item_id = 'sku-00001' AND currency = '{currency}'")
    };
    let sg_thb_before = local.query_i64("sg", &price("THB")).await;

    // A price in THB changes only the catalog priced in THB: th's.
    let set = local.cartedge(&["catalog", "set-price", "sku-00001", "THB", "777"]);
    assert_eq!(succeeded(&set), "th: sku-00001 THB 777");
    assert_eq!(local.query_i64("th", &price("THB")).await, Some(777));
    assert_eq!(local.query_i64("sg", &price("THB")).await, sg_thb_before);
    assert_eq!(local.query_i64("id", &price("THB")).await, sg_thb_before);
    // No region of the cluster prices in MYR.
    let error = failed(&local.cartedge(&["catalog", "set-price", "sku-00001", "MYR", "5"]));
    assert!(error.contains("no region uses MYR"), "{error}");

    // Stock: every region's catalog, or the one --region names.
    let stock =
        |item: &str| format!("SELECT stock::bigint FROM catalog_items WHERE item_id = '{item}'");
    let all = local.cartedge(&["catalog", "set-stock", "sku-00002", "5"]);
    assert_eq!(
        succeeded(&all),
        "id: sku-00002 stock 5\nsg: sku-00002 stock 5\nth: sku-00002 stock 5"
    );
    let one = local.cartedge(&["catalog", "set-stock", "sku-00003", "9", "--region", "id"]);
    assert_eq!(succeeded(&one), "id: sku-00003 stock 9");
    for (region, expected) in [("sg", 1000), ("id", 9), ("th", 1000)] {
        assert_eq!(local.query_i64(region, &stock("sku-00002")).await, Some(5));
        assert_eq!(
            local.query_i64(region, &stock("sku-00003")).await,
            Some(expected),
            "{region}"
        );
    }

    // An import gives each region the column of its currency; a row without it is not sold there.
    let csv = local.dir.path().join("items.csv");
    std::fs::write(
        &csv,
        "item_id,name,stock,SGD,IDR,THB\nnew-1,New one,5,100,1180000,2600\nnew-2,Only in sg,3,200,,\n",
    )
    .unwrap();
    let imported = succeeded(&local.cartedge(&["catalog", "import", csv.to_str().unwrap()]));
    assert!(imported.contains("sg: imported 2 items"), "{imported}");
    assert!(
        imported.contains("th: imported 1 items (1 without a THB price, not sold there)"),
        "{imported}"
    );
    let currencies = "SELECT count(*)::bigint FROM catalog_prices WHERE item_id = 'new-1'";
    for (region, currency, amount) in [
        ("sg", "SGD", 100),
        ("id", "IDR", 1_180_000),
        ("th", "THB", 2600),
    ] {
        assert_eq!(
            local.query_i64(region, currencies).await,
            Some(1),
            "{region}"
        );
        let own = format!("SELECT amount_minor FROM catalog_prices WHERE item_id = 'new-1' AND currency = '{currency}'");
        assert_eq!(
            local.query_i64(region, &own).await,
            Some(amount),
            "{region}"
        );
    }
    assert_eq!(local.query_i64("th", &stock("new-2")).await, None);
    assert_eq!(local.query_i64("sg", &stock("new-2")).await, Some(3));

    // --region names a region of the cluster; a region file reaches only its own catalog.
    let error =
        failed(&local.cartedge(&["catalog", "set-stock", "sku-00002", "1", "--region", "xx"]));
    assert!(error.contains("--region xx: no such region"), "{error}");
    let id_file = local.file("id");
    let error = failed(&local.cartedge(&[
        "--config",
        &id_file,
        "catalog",
        "set-stock",
        "sku-00002",
        "1",
        "--region",
        "th",
    ]));
    assert!(error.contains("reaches only its own catalog"), "{error}");
    let own = local.cartedge(&[
        "--config",
        &id_file,
        "catalog",
        "--region",
        "id",
        "set-stock",
        "sku-00002",
        "2",
    ]);
    assert_eq!(succeeded(&own), "id: sku-00002 stock 2");
    let error = failed(&local.cartedge(&[
        "--config",
        &id_file,
        "catalog",
        "set-price",
        "sku-00001",
        "SGD",
        "1",
    ]));
    assert!(
        error.contains("no targeted catalog is priced in SGD: id (IDR)"),
        "{error}"
    );
}
