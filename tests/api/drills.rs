//! The failure drills of RELIABILITY.md, shortened, on a real HA local cluster (`local up --ha
//! --detach`: pg_auto_failover formations, Redis with Sentinel, two edges per region behind
//! HAProxy): every drill runs under load with its history checked, and must end with nothing
//! acknowledged lost, nothing applied twice and no read missing its reader's writes. Each drill
//! exits non-zero when its own promise breaks (a failed read while a primary fails over, a
//! failed request during the rolling restart, …); this test also checks that each fault really
//! struck (a failover happened, a request was refused during the partition) so a drill whose
//! fault missed cannot pass.

use crate::helpers::{cli, local_up};

/// Edge and admin ports of the HA test cluster: a range of their own, below the ephemeral one.
const HA_TEST_PORTS: std::ops::Range<u16> = 10_000..11_990;

/// Runs `cartedge drill <name>` shortened; returns its JSON line, failing with its output when
/// it exits non-zero.
fn drill(dir: &str, name: &str) -> serde_json::Value {
    let out = cli(&[
        "drill",
        name,
        "--dir",
        dir,
        "--duration",
        "10s",
        "--shoppers",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "drill {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    let summary: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("drill {name}: not one JSON line ({e}): {stdout}"));
    assert_eq!(summary["drill"], name);
    assert_eq!(summary["acknowledged_writes_lost"], 0, "{name}: {summary}");
    assert_eq!(summary["writes_applied_twice"], 0, "{name}: {summary}");
    assert_eq!(summary["ryw_violations"], 0, "{name}: {summary}");
    assert!(
        summary["writes_acknowledged"].as_u64().unwrap_or(0) > 20,
        "{name}: the load hardly ran: {summary}"
    );
    summary
}

/// `local status` as JSON.
fn status(dir: &str) -> serde_json::Value {
    let out = cli(&["local", "status", "--dir", dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("local status prints JSON")
}

/// The node name of the sg shard's server with `role`.
fn sg_node(status: &serde_json::Value, role: &str) -> String {
    status["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "sg")
        .unwrap()["postgres"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == role)
        .and_then(|p| p["node"].as_str())
        .unwrap_or_else(|| panic!("no sg {role} in {status}"))
        .to_string()
}

/// The URL of the sg Redis master.
fn redis_master(status: &serde_json::Value) -> String {
    status["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "sg")
        .unwrap()["redis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "master")
        .and_then(|r| r["url"].as_str())
        .unwrap_or_else(|| panic!("no sg Redis master in {status}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_drill_holds_on_the_ha_cluster() {
    let started = local_up("ha", HA_TEST_PORTS, &["--ha"]);
    let (dir_arg, edge_port) = (started.dir.clone(), started.edge_port);

    // cluster.json lists every HA part; the region's edge_url is HAProxy's front.
    let before = status(&dir_arg);
    for region in before["regions"].as_array().unwrap() {
        let id = region["id"].as_str().unwrap();
        assert_eq!(region["edges"].as_array().unwrap().len(), 2, "{id}");
        for edge in region["edges"].as_array().unwrap() {
            assert!(edge["pid"].as_u64().is_some() && edge["admin_url"].is_string());
            assert_ne!(
                edge["url"], region["edge_url"],
                "{id}: edges sit behind HAProxy"
            );
        }
        let roles: Vec<&str> = region["postgres"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["primary", "standby", "replica", "replica"], "{id}");
        for server in region["postgres"].as_array().unwrap() {
            assert!(server["pid"].as_u64().is_some(), "{id}: {server}");
            assert!(server["data_dir"].is_string() && server["dsn"].is_string());
        }
        assert!(region["haproxy"]["pid"].as_u64().is_some(), "{id}");
        let redis: Vec<&str> = region["redis"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["role"].as_str().unwrap())
            .collect();
        assert_eq!(redis, ["master", "replica"], "{id}");
        assert_eq!(region["sentinels"].as_array().unwrap().len(), 3, "{id}");
    }
    assert!(before["regions"][0]["edge_url"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":{edge_port}")));

    // The Redis master dies: Sentinel promotes the replica, reads go on, the cache comes back.
    let old_master = redis_master(&before);
    let summary = drill(&dir_arg, "redis");
    assert_eq!(summary["failed_reads"], 0, "{summary}");
    assert!(summary["measured"]["cache_hits_after"].as_u64().unwrap() > 0);
    assert_ne!(
        redis_master(&status(&dir_arg)),
        old_master,
        "local status names the promoted Redis"
    );

    // The primary dies: the standby takes over, writes come back within 15 s, nothing is lost.
    let old_primary = sg_node(&before, "primary");
    let summary = drill(&dir_arg, "primary");
    assert!(
        summary["failures"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("503")),
        "the struck shard's writes were refused while it failed over: {summary}"
    );
    assert!(
        summary["measured"]["writes_back_after_ms"]
            .as_u64()
            .unwrap()
            <= 15_000
    );
    let after = status(&dir_arg);
    assert_ne!(
        sg_node(&after, "primary"),
        old_primary,
        "local status shows the promoted node as primary"
    );
    assert_eq!(
        sg_node(&after, "standby"),
        old_primary,
        "the old primary rejoined as standby"
    );

    // The synchronous standby dies: the primary goes on alone (wait_primary), no write hangs.
    let summary = drill(&dir_arg, "standby");
    assert!(
        summary["measured"]["survivor_wait_primary_ms"].is_u64(),
        "{summary}"
    );
    assert!(summary["max_write_ms"].as_u64().unwrap() < 11_000);

    // An edge dies, then every edge restarts in turn.
    let summary = drill(&dir_arg, "edge");
    assert!(
        summary["measured"]["removed_by_haproxy_ms"].is_u64(),
        "{summary}"
    );
    assert_eq!(summary["measured"]["edges_restarted"], 6, "{summary}");
    assert_eq!(
        summary["measured"]["failed_requests_during_rolling_restart"],
        0
    );

    // sg cut off: its own shoppers go on, remote-homed writes are kept from their home (adds
    // parked with 202, removals refused with 503: which of the two a run meets depends on
    // where in its add-add-remove cycle each shopper is while the link is cut), all converges.
    let summary = drill(&dir_arg, "partition");
    let refused = summary["failures"]["503 home_region_unavailable"]
        .as_u64()
        .unwrap_or(0);
    let parked = summary["measured"]["remote_writes_parked"]
        .as_u64()
        .unwrap();
    assert!(
        refused + parked > 0,
        "the partition kept remote-homed writes from their home: {summary}"
    );
    assert_eq!(summary["measured"]["home_shoppers_failed_requests"], 0);

    // A replica stops replaying: reads with Cart-Min-Version still see their writes.
    let summary = drill(&dir_arg, "replica-pause");
    assert_eq!(summary["failed_reads"], 0, "{summary}");

    // Quotas and keys reloaded under load: nothing fails, the new key's tokens work.
    let summary = drill(&dir_arg, "reload");
    assert_eq!(summary["measured"]["edges_reloaded"], 6, "{summary}");
    assert!(summary["measured"]["new_key_requests"].as_u64().unwrap() > 0);
    assert!(
        summary["failures"].as_object().unwrap().is_empty(),
        "{summary}"
    );

    drop(started);
}
