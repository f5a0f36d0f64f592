//! `cartedge drill <name>`: failure drills on a running local cluster (`cartedge local up --ha
//! --detach`), each under a bounded constant-pace load whose every operation is recorded and
//! checked by the history checker ([`history`]). A module of the binary: it drives processes
//! through `crate::local` and `cartedge_dev`, and talks to the edges over HTTP like any client.
//!
//! Each drill prints one JSON line ([`history::Summary`]: requests, failures by status and
//! code, the longest unavailability, acknowledged writes lost, writes applied twice,
//! read-your-writes violations, and what the drill measured) and fails (non-zero exit) when
//! anything acknowledged was lost or doubled, a read missed its reader's writes, or the drill's
//! own promise was broken. Every drill leaves the cluster as it found it (killed servers run
//! again, partitions healed, replay resumed), so drills run one after another on one cluster.

pub mod history;
pub mod load;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cartedge::auth::ExtraClaims;
use serde_json::json;

use crate::loadgen::Region;
use crate::local::{self, ClusterFile, ClusterRegion};
use history::{Expectation, Summary, WriteKind};
use load::{HttpClient, Pace, Shopper, ShopperRun};

/// The drills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Drill {
    /// Kill a region's Redis master: Sentinel promotes its replica; no read fails.
    Redis,
    /// Kill -9 a shard's primary node: pg_auto_failover promotes the synchronous standby.
    Primary,
    /// Kill the synchronous standby: writes must not hang past the request timeout.
    Standby,
    /// Kill an edge (HAProxy takes it out), then restart every edge one by one.
    Edge,
    /// Cut a region off from the others, then heal.
    Partition,
    /// Pause a replica's replay: reads with Cart-Min-Version still see their writes.
    ReplicaPause,
    /// Reload every edge (changed quotas, a second signing key) under load.
    Reload,
}

impl Drill {
    fn name(self) -> &'static str {
        match self {
            Drill::Redis => "redis",
            Drill::Primary => "primary",
            Drill::Standby => "standby",
            Drill::Edge => "edge",
            Drill::Partition => "partition",
            Drill::ReplicaPause => "replica-pause",
            Drill::Reload => "reload",
        }
    }
}

/// `cartedge drill` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    pub drill: Drill,
    /// The local cluster's directory.
    #[arg(long, default_value = local::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// How long the load runs (the fault is injected after a fifth of it).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Shoppers per group (each drill has one to three groups).
    #[arg(long, default_value_t = 3)]
    pub shoppers: usize,
    /// Pause between one shopper's operations (each a write and a read).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Also write the JSON line to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The region most drills strike.
const TARGET: &str = "sg";
/// Failover must be over within this after a primary is killed (the issue's bound).
const FAILOVER_BOUND: Duration = Duration::from_secs(15);
/// Sentinel must have promoted a replica within this after the master is killed.
const SENTINEL_BOUND: Duration = Duration::from_secs(10);
/// The edge's request timeout (the shipped default): no write may take longer, plus slack.
const WRITE_BOUND: Duration = Duration::from_millis(11_000);

/// What a drill works with.
struct Drilling {
    args: Args,
    defaults: Option<PathBuf>,
    regions: Vec<Region>,
    client: HttpClient,
    run_id: String,
}

/// Runs one drill and prints its JSON line.
pub async fn run(args: Args, defaults: Option<PathBuf>) -> Result<()> {
    let regions = crate::loadgen::load_regions(&args.dir, defaults.clone())?;
    let cluster = local::current(&args.dir).await?;
    let drill = args.drill;
    let needs_ha = matches!(drill, Drill::Redis | Drill::Standby | Drill::Edge);
    if needs_ha {
        let ha = cluster.regions.iter().all(|r| r.monitor.is_some());
        if !ha {
            bail!(
                "drill {} needs the HA cluster (`cartedge local up --ha --detach`)",
                drill.name()
            );
        }
    }
    let context = Drilling {
        args,
        defaults,
        regions,
        client: load::client(),
        run_id: format!("{:08x}", rand::random::<u32>()),
    };
    let mut summary = Summary {
        drill: drill.name().to_string(),
        ..Summary::default()
    };
    let verdict = match drill {
        Drill::Redis => redis(&context, &cluster, &mut summary).await,
        Drill::Primary => primary(&context, &cluster, &mut summary).await,
        Drill::Standby => standby(&context, &cluster, &mut summary).await,
        Drill::Edge => edge(&context, &cluster, &mut summary).await,
        Drill::Partition => partition(&context, &mut summary).await,
        Drill::ReplicaPause => replica_pause(&context, &cluster, &mut summary).await,
        Drill::Reload => reload(&context, &cluster, &mut summary).await,
    };
    if let Err(error) = &verdict {
        summary.problem(format!("drill: {error:#}"));
    }
    let line = serde_json::to_string(&summary)?;
    println!("{line}");
    if let Some(path) = &context.args.json {
        std::fs::write(path, format!("{line}\n"))?;
    }
    verdict?;
    if !summary.consistent() {
        bail!(
            "drill {}: {} acknowledged writes lost, {} applied twice, {} read-your-writes violations",
            drill.name(),
            summary.acknowledged_writes_lost,
            summary.writes_applied_twice,
            summary.ryw_violations
        );
    }
    Ok(())
}

impl Drilling {
    fn region(&self, id: &str) -> Result<&Region> {
        self.regions
            .iter()
            .find(|r| r.id == id)
            .with_context(|| format!("the cluster has no region {id}"))
    }

    /// `count` shoppers homed in `home` whose requests go to `via`'s front, numbered from
    /// `first`; each gets 300 demo items no other shopper of this run uses.
    fn shoppers(&self, home: &str, via: &str, first: usize, count: usize) -> Result<Vec<Shopper>> {
        let home_region = self.region(home)?;
        let edge_url = self.region(via)?.edge_url.clone();
        (first..first + count)
            .map(|index| {
                let user = format!("drill-{}-{index}", self.run_id);
                let token = cartedge::auth::issue_token_with(
                    &home_region.auth,
                    &user,
                    home_region.token_ttl,
                    unix_now(),
                    &ExtraClaims {
                        tier: Some("service"),
                        region: Some(home),
                        ..ExtraClaims::default()
                    },
                )
                .map_err(|error| anyhow::anyhow!("minting a token: {error}"))?;
                let items = (0..300)
                    .map(|k| format!("sku-{:05}", (index * 300 + k) % 10_000 + 1))
                    .collect();
                Ok(Shopper {
                    index,
                    home: home.to_string(),
                    edge_url: edge_url.clone(),
                    token: Arc::from(token),
                    items,
                })
            })
            .collect()
    }

    fn pace(&self, started: Instant) -> Pace {
        Pace {
            interval: self.args.interval,
            until: started + self.args.duration,
        }
    }

    /// When the fault strikes: a fifth into the load, so the cache is warm and a history
    /// exists before it.
    fn fault_delay(&self) -> Duration {
        self.args.duration / 5
    }
}

/// Runs the shoppers until the pace's end while `fault` runs beside them; returns their runs
/// and what the fault measured.
async fn under_load<F>(
    context: &Drilling,
    shoppers: &[Shopper],
    started: Instant,
    fault: F,
) -> (Vec<ShopperRun>, Result<BTreeMap<String, serde_json::Value>>)
where
    F: std::future::Future<Output = Result<BTreeMap<String, serde_json::Value>>>,
{
    load_beside(context, shoppers, context.pace(started), false, fault).await
}

/// [`under_load`] whose shoppers keep going until `fault` is done (bounded by 5 minutes).
async fn under_load_until_done<F>(
    context: &Drilling,
    shoppers: &[Shopper],
    started: Instant,
    fault: F,
) -> (Vec<ShopperRun>, Result<BTreeMap<String, serde_json::Value>>)
where
    F: std::future::Future<Output = Result<BTreeMap<String, serde_json::Value>>>,
{
    let pace = Pace {
        interval: context.args.interval,
        until: started + Duration::from_secs(300),
    };
    load_beside(context, shoppers, pace, true, fault).await
}

/// Spawns every shopper at `pace`, awaits `fault`, then (with `stop_when_done`) stops them,
/// and collects their runs.
async fn load_beside<F>(
    context: &Drilling,
    shoppers: &[Shopper],
    pace: Pace,
    stop_when_done: bool,
    fault: F,
) -> (Vec<ShopperRun>, Result<BTreeMap<String, serde_json::Value>>)
where
    F: std::future::Future<Output = Result<BTreeMap<String, serde_json::Value>>>,
{
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = shoppers
        .iter()
        .cloned()
        .map(|shopper| {
            let stop = stop_when_done.then(|| stopped.clone());
            tokio::spawn(load::run_shopper(
                context.client.clone(),
                shopper,
                pace,
                stop,
            ))
        })
        .collect();
    let measured = fault.await;
    let _ = stop.send(true);
    let mut runs = Vec::new();
    for task in tasks {
        runs.push(task.await.unwrap_or_default());
    }
    (runs, measured)
}

/// Folds the runs into the summary and checks every shopper's final cart at its home.
async fn settle(
    context: &Drilling,
    summary: &mut Summary,
    shoppers: &[Shopper],
    runs: &[ShopperRun],
) -> Result<()> {
    for (shopper, run) in shoppers.iter().zip(runs) {
        summary.requests += run.requests;
        for (key, count) in &run.failures {
            *summary.failures.entry(key.clone()).or_default() += count;
        }
        summary.add_history(&run.writes, &run.reads, run.max_write);
        let home = context.region(&shopper.home)?;
        let seen = load::final_cart(
            &context.client,
            &home.edge_url,
            &shopper.token,
            run.expectation.min_version,
            Duration::from_secs(30),
        )
        .await
        .with_context(|| {
            format!(
                "shopper {}: the final cart could not be read",
                shopper.index
            )
        })?;
        summary.check_final(shopper.index, &run.expectation, &seen);
    }
    Ok(())
}

/// The first write of `shoppers` acknowledged after `since` started, as time since `since`.
fn first_ack_after(runs: &[ShopperRun], shoppers: &[usize], since: Instant) -> Option<Duration> {
    runs.iter()
        .flat_map(|run| &run.writes)
        .filter(|w| shoppers.contains(&w.shopper))
        .filter(|w| w.started >= since)
        .filter(|w| matches!(w.outcome, history::Outcome::Acknowledged { .. }))
        .map(|w| w.ended.duration_since(since))
        .min()
}

fn target_region<'a>(cluster: &'a ClusterFile, id: &str) -> Result<&'a ClusterRegion> {
    cluster
        .regions
        .iter()
        .find(|r| r.id == id)
        .with_context(|| format!("cluster.json has no region {id}"))
}

fn ms(duration: Duration) -> serde_json::Value {
    json!(duration.as_millis() as u64)
}

/// Waits (bounded) until the region's formation is settled again: a primary and a
/// synchronous standby.
async fn wait_settled(dir: &Path, region: &str, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let cluster = local::read_cluster(dir)?;
        let monitor = target_region(&cluster, region)?
            .monitor
            .clone()
            .context("no monitor")?;
        let nodes = tokio::task::spawn_blocking(move || {
            cartedge_dev::ha::state_of(&monitor.data_dir, &monitor.state_dir)
        })
        .await??;
        if cartedge_dev::ha::settled(&nodes, 2) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{region}: the formation did not settle within {limit:?}: {nodes:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Drill `primary`: kill -9 the target region's primary node under load.
async fn primary(context: &Drilling, cluster: &ClusterFile, summary: &mut Summary) -> Result<()> {
    if target_region(cluster, TARGET)?.monitor.is_none() {
        return kill_lone_primary(context, cluster, summary).await;
    }
    kill_pg_node(context, cluster, summary, "primary").await
}

/// Drill `primary` on a cluster without `--ha`: the shard's only primary is killed and nothing
/// takes over. Writes for the shard fail until the drill itself starts the primary again
/// after the load (standing in for an operator); what was acknowledged survives only because
/// the same data directory comes back.
async fn kill_lone_primary(
    context: &Drilling,
    cluster: &ClusterFile,
    summary: &mut Summary,
) -> Result<()> {
    let n = context.args.shoppers;
    let mut shoppers = context.shoppers(TARGET, TARGET, 0, n)?;
    shoppers.extend(context.shoppers(TARGET, "th", n, n)?);
    let node = target_region(cluster, TARGET)?
        .postgres
        .iter()
        .find(|p| p.role == "primary")
        .cloned()
        .with_context(|| format!("{TARGET} has no primary"))?;
    let pid = node.pid.context("the primary is not running")?;
    let started = Instant::now();
    let killed_at = started + context.fault_delay();
    let fault = async {
        tokio::time::sleep_until(killed_at.into()).await;
        // SAFETY: kill(2) touches no memory.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        let mut measured = BTreeMap::new();
        measured.insert(
            "killed".into(),
            json!(format!("primary {} (no standby)", node.dsn)),
        );
        Ok(measured)
    };
    let (runs, measured) = under_load(context, &shoppers, started, fault).await;
    summary.measured.extend(measured?);
    let restarted = local::restart_postgres(&context.args.dir, &node).await?;
    summary.measured.insert(
        "restarted_by_the_drill_after_ms".into(),
        ms(killed_at.elapsed()),
    );
    let _ = restarted;
    settle(context, summary, &shoppers, &runs).await?;
    let struck: Vec<usize> = (0..2 * n).collect();
    let back = first_ack_after(&runs, &struck, killed_at);
    summary
        .measured
        .insert("writes_back_after_ms".into(), back.map_or(json!(null), ms));
    Ok(())
}

/// Drill `standby`: kill -9 the synchronous standby under load.
async fn standby(context: &Drilling, cluster: &ClusterFile, summary: &mut Summary) -> Result<()> {
    kill_pg_node(context, cluster, summary, "standby").await
}

async fn kill_pg_node(
    context: &Drilling,
    cluster: &ClusterFile,
    summary: &mut Summary,
    role: &str,
) -> Result<()> {
    let n = context.args.shoppers;
    // Shoppers of the struck shard at home and through another region, and shoppers of
    // another region's shard at the struck region (untouched by the fault).
    let mut shoppers = context.shoppers(TARGET, TARGET, 0, n)?;
    shoppers.extend(context.shoppers(TARGET, "th", n, n)?);
    shoppers.extend(context.shoppers("id", TARGET, 2 * n, n)?);
    let struck: Vec<usize> = (0..2 * n).collect();
    let region = target_region(cluster, TARGET)?;
    let node = region
        .postgres
        .iter()
        .find(|p| p.role == role && p.node.is_some())
        .cloned()
        .with_context(|| format!("{TARGET} has no {role} node"))?;
    let monitor = region.monitor.clone().context("no monitor")?;
    let pid = node.pid.context("the node is not running")?;
    let data_dir = node
        .data_dir
        .clone()
        .context("the node has no data directory")?;
    let started = Instant::now();
    let delay = context.fault_delay();
    let killed_at = started + delay;
    let fault = async {
        tokio::time::sleep_until(killed_at.into()).await;
        cartedge_dev::ha::kill_node(pid, &data_dir);
        let mut measured = BTreeMap::new();
        measured.insert("killed".into(), json!(format!("{role} {}", node.dsn)));
        // What the monitor does about it, observed for up to the failover bound.
        let mut states = Vec::new();
        while killed_at.elapsed() < FAILOVER_BOUND {
            let monitor = monitor.clone();
            let nodes = tokio::task::spawn_blocking(move || {
                cartedge_dev::ha::state_of(&monitor.data_dir, &monitor.state_dir)
            })
            .await??;
            let survivor = nodes
                .iter()
                .find(|n| Some(&n.nodename) != node.node.as_ref());
            if let Some(survivor) = survivor {
                let state = survivor.current_group_state.clone();
                if states.last() != Some(&state) {
                    states.push(state.clone());
                    measured.insert(format!("survivor_{state}_ms"), ms(killed_at.elapsed()));
                }
                if role == "primary" && survivor.is_writable_primary() {
                    break;
                }
                if role == "standby" && survivor.current_group_state == "wait_primary" {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        measured.insert("survivor_states".into(), json!(states));
        Ok(measured)
    };
    let (runs, measured) = under_load(context, &shoppers, started, fault).await;
    summary.measured.extend(measured?);
    // The killed node runs again and rejoins as the standby.
    local::rerun_node(&context.args.dir, &monitor, &node)?;
    let resynced = wait_settled(&context.args.dir, TARGET, Duration::from_secs(90)).await?;
    summary
        .measured
        .insert("rejoined_as_standby_ms".into(), ms(resynced));
    settle(context, summary, &shoppers, &runs).await?;
    let back = first_ack_after(&runs, &struck, killed_at);
    summary
        .measured
        .insert("writes_back_after_ms".into(), back.map_or(json!(null), ms));
    if summary.failed_reads > 0 {
        summary.problem(format!("{} reads failed", summary.failed_reads));
        bail!("reads failed during the drill");
    }
    if Duration::from_millis(summary.max_write_ms) > WRITE_BOUND {
        bail!(
            "a write took {} ms (bound {WRITE_BOUND:?})",
            summary.max_write_ms
        );
    }
    match back {
        Some(back) if back <= FAILOVER_BOUND => Ok(()),
        Some(back) => bail!("writes came back {back:?} after the kill (bound {FAILOVER_BOUND:?})"),
        None => bail!("no write of the struck shard succeeded after the kill"),
    }
}

/// Drill `edge`: kill -9 one edge (HAProxy must take it out within two checks), then a
/// rolling restart of every edge with no failed request.
async fn edge(context: &Drilling, cluster: &ClusterFile, summary: &mut Summary) -> Result<()> {
    let n = context.args.shoppers;
    let region = target_region(cluster, TARGET)?;
    let haproxy = region.haproxy.clone().context("no HAProxy")?;
    let victim = region.edges.first().cloned().context("no edge")?;

    // Phase 1: one edge killed under load.
    let mut shoppers = context.shoppers(TARGET, TARGET, 0, n)?;
    shoppers.extend(context.shoppers("th", TARGET, n, n)?);
    let started = Instant::now();
    let killed_at = started + context.fault_delay();
    let fault = async {
        tokio::time::sleep_until(killed_at.into()).await;
        // SAFETY: kill(2) touches no memory.
        unsafe {
            libc::kill(victim.pid as libc::pid_t, libc::SIGKILL);
        }
        let mut measured = BTreeMap::new();
        while killed_at.elapsed() < Duration::from_secs(10) {
            let states = local::haproxy_states(&haproxy.stats_url).await?;
            if states
                .iter()
                .any(|(name, state)| name == "edge-a" && state.starts_with("DOWN"))
            {
                measured.insert("removed_by_haproxy_ms".into(), ms(killed_at.elapsed()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(measured)
    };
    let (runs, measured) = under_load(context, &shoppers, started, fault).await;
    summary.measured.extend(measured?);
    settle(context, summary, &shoppers, &runs).await?;
    let failed_during_kill: u64 = summary.failures.values().sum();
    summary.measured.insert(
        "failed_requests_during_kill".into(),
        json!(failed_during_kill),
    );
    local::restart_edge(
        &context.args.dir,
        context.defaults.as_deref(),
        TARGET,
        0,
        &victim,
    )
    .await?;

    // Phase 2: a rolling restart of every edge of every region under load.
    let mut rolling = Summary::default();
    let mut shoppers = Vec::new();
    for (i, r) in cluster.regions.iter().enumerate() {
        shoppers.extend(context.shoppers(&r.id, &r.id, 100 + i * n, n)?);
    }
    let started = Instant::now();
    let dir = context.args.dir.clone();
    let defaults = context.defaults.clone();
    let fault = async move {
        let mut measured = BTreeMap::new();
        let mut restarted = 0;
        let roll_started = Instant::now();
        let cluster = local::read_cluster(&dir)?;
        for region in &cluster.regions {
            let stats = region.haproxy.clone().context("no HAProxy")?.stats_url;
            for (index, edge) in region.edges.iter().enumerate() {
                cartedge_dev::procs::stop_pid(edge.pid, libc::SIGTERM, Duration::from_secs(20))?;
                local::restart_edge(&dir, defaults.as_deref(), &region.id, index, edge).await?;
                wait_all_up(&stats, region.edges.len(), Duration::from_secs(15)).await?;
                restarted += 1;
            }
        }
        measured.insert("edges_restarted".into(), json!(restarted));
        measured.insert("rolling_restart_ms".into(), ms(roll_started.elapsed()));
        Ok(measured)
    };
    // The load lasts as long as the rolling restart takes, at least the drill's duration.
    let (runs, measured) = under_load_until_done(context, &shoppers, started, fault).await;
    rolling.measured.extend(measured?);
    settle(context, &mut rolling, &shoppers, &runs).await?;
    let failed: u64 = rolling.failures.values().sum();
    summary.measured.extend(rolling.measured.clone());
    summary.measured.insert(
        "failed_requests_during_rolling_restart".into(),
        json!(failed),
    );
    merge_summary(summary, rolling);
    let removed = summary
        .measured
        .get("removed_by_haproxy_ms")
        .and_then(serde_json::Value::as_u64);
    if removed.is_none_or(|ms| ms > 3_500) {
        bail!("HAProxy did not take the killed edge out within two health checks");
    }
    if failed > 0 {
        bail!("{failed} requests failed during the rolling restart");
    }
    Ok(())
}

/// Waits until HAProxy sees `count` edges UP.
async fn wait_all_up(stats: &str, count: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let states = local::haproxy_states(stats).await.unwrap_or_default();
        if states.iter().filter(|(_, s)| s == "UP").count() >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("HAProxy sees {states:?} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Adds `other`'s counts to `summary`.
fn merge_summary(summary: &mut Summary, other: Summary) {
    summary.requests += other.requests;
    for (key, count) in other.failures {
        *summary.failures.entry(key).or_default() += count;
    }
    summary.writes += other.writes;
    summary.writes_acknowledged += other.writes_acknowledged;
    summary.writes_unknown += other.writes_unknown;
    summary.reads += other.reads;
    summary.failed_reads += other.failed_reads;
    summary.longest_unavailability_ms = summary
        .longest_unavailability_ms
        .max(other.longest_unavailability_ms);
    summary.max_write_ms = summary.max_write_ms.max(other.max_write_ms);
    summary.acknowledged_writes_lost += other.acknowledged_writes_lost;
    summary.writes_applied_twice += other.writes_applied_twice;
    summary.ryw_violations += other.ryw_violations;
    for problem in other.problems {
        summary.problem(problem);
    }
}

/// Drill `partition`: the target region cut off from the others, then healed.
async fn partition(context: &Drilling, summary: &mut Summary) -> Result<()> {
    let n = context.args.shoppers;
    let home: Vec<Shopper> = context.shoppers(TARGET, TARGET, 0, n)?;
    let remote: Vec<Shopper> = context.shoppers("id", TARGET, n, n)?;
    let mut shoppers = home.clone();
    shoppers.extend(remote.clone());
    let others: Vec<String> = context
        .regions
        .iter()
        .filter(|r| r.id != TARGET)
        .map(|r| r.id.clone())
        .collect();
    let started = Instant::now();
    let cut_at = started + context.fault_delay();
    let heal_at = started + context.args.duration * 3 / 5;
    let dir = context.args.dir.clone();
    let fault = async {
        tokio::time::sleep_until(cut_at.into()).await;
        for other in &others {
            local::steer_quietly(&dir, "partition", TARGET, other).await?;
        }
        tokio::time::sleep_until(heal_at.into()).await;
        for other in &others {
            local::steer_quietly(&dir, "heal", TARGET, other).await?;
        }
        let mut measured = BTreeMap::new();
        measured.insert("partitioned_ms".into(), ms(heal_at.duration_since(cut_at)));
        Ok::<_, anyhow::Error>(measured)
    };
    let (runs, measured) = under_load(context, &shoppers, started, fault).await;
    if let Err(error) = &measured {
        // Never leave the cluster cut.
        for other in &others {
            let _ = local::steer_quietly(&context.args.dir, "heal", TARGET, other).await;
        }
        bail!("steering the link proxy: {error:#}");
    }
    summary.measured.extend(measured?);
    let home_ids: Vec<usize> = home.iter().map(|s| s.index).collect();
    let home_failures: u64 = runs
        .iter()
        .filter(|run| {
            run.writes
                .first()
                .is_some_and(|w| home_ids.contains(&w.shopper))
        })
        .map(|run| run.failures.values().sum::<u64>())
        .sum();
    let remote_ids: Vec<usize> = remote.iter().map(|s| s.index).collect();
    let slowest_remote = runs
        .iter()
        .flat_map(|run| &run.writes)
        .filter(|w| remote_ids.contains(&w.shopper))
        .filter(|w| w.started >= cut_at && w.ended <= heal_at)
        .filter(|w| w.kind == WriteKind::Add)
        .map(|w| w.ended.duration_since(w.started))
        .max()
        .unwrap_or_default();
    summary
        .measured
        .insert("home_shoppers_failed_requests".into(), json!(home_failures));
    let remote_parked: u64 = runs
        .iter()
        .filter(|run| {
            run.writes
                .first()
                .is_some_and(|w| remote_ids.contains(&w.shopper))
        })
        .map(|run| run.parked)
        .sum();
    summary
        .measured
        .insert("remote_writes_parked".into(), json!(remote_parked));
    summary.measured.insert(
        "remote_write_slowest_during_partition_ms".into(),
        ms(slowest_remote),
    );
    // After healing, the remote-homed carts converge at the cut-off region.
    let converge_started = Instant::now();
    for (shopper, run) in shoppers.iter().zip(&runs).filter(|(s, _)| s.home != TARGET) {
        converge_at(context, shopper, &run.expectation, Duration::from_secs(30)).await?;
    }
    summary.measured.insert(
        "converged_after_heal_ms".into(),
        ms(converge_started.elapsed()),
    );
    settle(context, summary, &shoppers, &runs).await?;
    if home_failures > 0 {
        bail!("{home_failures} requests of shoppers at home failed during the partition");
    }
    Ok(())
}

/// Waits until a plain read (no `Cart-Min-Version`) at the shopper's edge shows its
/// acknowledged history: the region's replica and cache caught up.
async fn converge_at(
    context: &Drilling,
    shopper: &Shopper,
    expectation: &Expectation,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(seen) =
            load::final_cart(&context.client, &shopper.edge_url, &shopper.token, 0, limit).await
        {
            if expectation.breaches(&seen).is_empty() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "shopper {}: the cart at {} did not converge within {limit:?}",
                shopper.index,
                shopper.edge_url
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drill `replica-pause`: the replay of a region's replica of the target shard paused under
/// load; reads there carry `Cart-Min-Version` and must still see their writes.
async fn replica_pause(
    context: &Drilling,
    cluster: &ClusterFile,
    summary: &mut Summary,
) -> Result<()> {
    let reader = "th";
    let replica = target_region(cluster, reader)?
        .postgres
        .iter()
        .find(|p| p.role == "replica" && p.shards.iter().any(|s| s == &format!("{TARGET}-1")))
        .cloned()
        .with_context(|| format!("{reader} has no replica of {TARGET}-1"))?;
    let shoppers = context.shoppers(TARGET, reader, 0, context.args.shoppers * 2)?;
    let started = Instant::now();
    let paused_at = started + context.fault_delay();
    let resume_at = started + context.args.duration * 4 / 5;
    let dsn = replica.dsn.clone();
    let fault = async {
        tokio::time::sleep_until(paused_at.into()).await;
        local::set_replay_paused(&dsn, true).await?;
        tokio::time::sleep_until(resume_at.into()).await;
        local::set_replay_paused(&dsn, false).await?;
        let mut measured = BTreeMap::new();
        measured.insert(
            "replay_paused_ms".into(),
            ms(resume_at.duration_since(paused_at)),
        );
        Ok(measured)
    };
    let (runs, measured) = under_load(context, &shoppers, started, fault).await;
    if measured.is_err() {
        let _ = local::set_replay_paused(&replica.dsn, false).await;
    }
    summary.measured.extend(measured?);
    settle(context, summary, &shoppers, &runs).await?;
    Ok(())
}

/// Marks delimiting what the `reload` drill adds to a region file.
const RELOAD_BEGIN: &str = "# --- drill reload: begin ---";
const RELOAD_END: &str = "# --- drill reload: end ---";

/// Drill `reload`: every edge reloads (SIGHUP) changed quotas and a second signing key under
/// load; shoppers with tokens signed by the new key join after the reload.
async fn reload(context: &Drilling, cluster: &ClusterFile, summary: &mut Summary) -> Result<()> {
    let n = context.args.shoppers;
    let mut before = Vec::new();
    for (i, r) in context.regions.iter().enumerate() {
        before.extend(context.shoppers(&r.id, &r.id, i * n, n)?);
    }
    let secret = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect::<String>();
    let kid = format!("drill-{}", context.run_id);
    let started = Instant::now();
    let reload_at = started + context.fault_delay();
    let dir = context.args.dir.clone();
    let pids: Vec<u32> = cluster
        .regions
        .iter()
        .flat_map(|r| r.edges.iter().map(|e| e.pid))
        .collect();
    let fault = async {
        tokio::time::sleep_until(reload_at.into()).await;
        for r in &context.regions {
            let path = local::region_file(&dir, &r.id);
            let text = std::fs::read_to_string(&path)?;
            let kept = strip_reload_block(&text);
            let block = format!(
                "{RELOAD_BEGIN}\n[rate_limit.user]\nreads = {{ per_second = 25, burst = 50 }}\n\
                 writes = {{ per_second = 12, burst = 24 }}\ncheckout = {{ per_second = 1, burst = 5 }}\n\n\
                 [[auth.keys]]\nkid = \"{kid}\"\nalgorithm = \"HS256\"\nsecret = \"{secret}\"\n{RELOAD_END}\n"
            );
            std::fs::write(&path, format!("{kept}\n{block}"))?;
        }
        for pid in &pids {
            // SAFETY: kill(2) touches no memory.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGHUP);
            }
        }
        let mut measured = BTreeMap::new();
        measured.insert("edges_reloaded".into(), json!(pids.len()));
        Ok(measured)
    };
    let (runs, measured) = under_load(context, &before, started, fault).await;
    summary.measured.extend(measured?);
    settle(context, summary, &before, &runs).await?;

    // Shoppers whose tokens the new key signs, after the reload.
    let mut after = Vec::new();
    for (i, r) in context.regions.iter().enumerate() {
        let mut group = context.shoppers(&r.id, &r.id, 50 + i * n, n)?;
        let mut auth = r.auth.clone();
        auth.keys.retain(|_| false);
        let config = cartedge::config::Config::load(
            &cartedge::config::Sources::new(
                context.defaults.clone(),
                Some(local::region_file(&dir, &r.id)),
            ),
            std::env::vars(),
        )?;
        auth.keys = config
            .auth
            .keys
            .into_iter()
            .filter(|key| key.kid == kid)
            .collect();
        for shopper in &mut group {
            let user = format!("drill-{}-{}", context.run_id, shopper.index);
            let token = cartedge::auth::issue_token_with(
                &auth,
                &user,
                r.token_ttl,
                unix_now(),
                &ExtraClaims {
                    tier: Some("service"),
                    region: Some(&r.id),
                    ..ExtraClaims::default()
                },
            )
            .map_err(|error| anyhow::anyhow!("minting with the new key: {error}"))?;
            shopper.token = Arc::from(token);
        }
        after.extend(group);
    }
    let started = Instant::now();
    let quick = Pace {
        interval: context.args.interval,
        until: started + context.args.duration / 4,
    };
    let tasks: Vec<_> = after
        .iter()
        .cloned()
        .map(|s| tokio::spawn(load::run_shopper(context.client.clone(), s, quick, None)))
        .collect();
    let mut runs_after = Vec::new();
    for task in tasks {
        runs_after.push(task.await.unwrap_or_default());
    }
    let mut second = Summary::default();
    settle(context, &mut second, &after, &runs_after).await?;
    summary
        .measured
        .insert("new_key_requests".into(), json!(second.requests));
    merge_summary(summary, second);
    let failed: u64 = summary.failures.values().sum();
    if failed > 0 {
        bail!("{failed} requests failed across the reload");
    }
    Ok(())
}

/// A region file without the block a previous `reload` drill added.
fn strip_reload_block(text: &str) -> String {
    match (text.find(RELOAD_BEGIN), text.find(RELOAD_END)) {
        (Some(begin), Some(end)) if end > begin => {
            let after = &text[end + RELOAD_END.len()..];
            format!(
                "{}{}",
                text[..begin].trim_end(),
                after.trim_start_matches('\n')
            )
        }
        _ => text.trim_end().to_string(),
    }
}

/// Drill `redis`: kill -9 the target region's Redis master under load. Reads fall back to
/// PostgreSQL until Sentinel promotes the replica and the edges find it; none may fail, and
/// the cache must serve hits again afterwards.
async fn redis(context: &Drilling, cluster: &ClusterFile, summary: &mut Summary) -> Result<()> {
    let n = context.args.shoppers;
    let region = target_region(cluster, TARGET)?;
    let master = region
        .redis
        .iter()
        .find(|r| r.role == "master")
        .cloned()
        .with_context(|| format!("{TARGET} lists no Redis master"))?;
    let sentinels: Vec<u16> = region
        .sentinels
        .iter()
        .filter_map(|s| s.url.rsplit(':').next()?.trim_end_matches('/').parse().ok())
        .collect();
    let admins: Vec<String> = region.edges.iter().map(|e| e.admin_url.clone()).collect();
    let mut shoppers = context.shoppers(TARGET, TARGET, 0, n)?;
    shoppers.extend(context.shoppers("id", TARGET, n, n)?);
    let name = local::redis_master_name(TARGET);
    let started = Instant::now();
    let killed_at = started + context.fault_delay();
    let late = started + context.args.duration * 3 / 5;
    let end = started + context.args.duration;
    let fault = async {
        tokio::time::sleep_until(killed_at.into()).await;
        let before = cache_reads(&admins).await;
        // SAFETY: kill(2) touches no memory.
        unsafe {
            libc::kill(master.pid as libc::pid_t, libc::SIGKILL);
        }
        let mut measured = BTreeMap::new();
        let old_port = master
            .url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .unwrap_or("")
            .to_string();
        let mut promoted = None;
        while killed_at.elapsed() < SENTINEL_BOUND + Duration::from_secs(5) {
            let ports = sentinels.clone();
            let name = name.clone();
            let now = tokio::task::spawn_blocking(move || {
                ports.into_iter().find_map(|port| {
                    cartedge_dev::redis_ha::master_addr_by_name(port, &name)
                        .ok()
                        .flatten()
                })
            })
            .await?;
            if let Some(address) = now.filter(|a| a.port().to_string() != old_port) {
                promoted = Some(address);
                measured.insert("sentinel_promoted_after_ms".into(), ms(killed_at.elapsed()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let new_master = promoted.context("Sentinel promoted no replica")?;
        tokio::time::sleep_until(late.into()).await;
        let recovering = cache_reads(&admins).await;
        tokio::time::sleep_until(end.into()).await;
        let after = cache_reads(&admins).await;
        measured.insert(
            "hit_rate_before".into(),
            json!(hit_rate(before.0, before.1)),
        );
        measured.insert(
            "hit_rate_after".into(),
            json!(hit_rate(after.0 - recovering.0, after.1 - recovering.1)),
        );
        measured.insert("new_master".into(), json!(new_master.to_string()));
        measured.insert("cache_hits_after".into(), json!(after.0 - recovering.0));
        Ok(measured)
    };
    let (runs, measured) = under_load(context, &shoppers, started, fault).await;
    summary.measured.extend(measured?);
    let new_port = summary
        .measured
        .get("new_master")
        .and_then(serde_json::Value::as_str)
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port())
        .context("no new master")?;
    let hits_after = summary
        .measured
        .get("cache_hits_after")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    // The killed master comes back as a replica of the new one.
    local::restart_redis_as_replica(&context.args.dir, &master, new_port)?;
    settle(context, summary, &shoppers, &runs).await?;
    if summary.failed_reads > 0 {
        bail!(
            "{} reads failed while Redis failed over",
            summary.failed_reads
        );
    }
    let promoted = summary
        .measured
        .get("sentinel_promoted_after_ms")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(u64::MAX);
    if Duration::from_millis(promoted) > SENTINEL_BOUND {
        bail!("Sentinel promoted a replica only after {promoted} ms");
    }
    if hits_after == 0 {
        bail!("the cache served no hit after the failover");
    }
    Ok(())
}

/// The sum over `admins` of the edges' cache reads: (hits, all).
async fn cache_reads(admins: &[String]) -> (u64, u64) {
    let mut hits = 0;
    let mut all = 0;
    for admin in admins {
        let Ok(text) = metrics_text(admin).await else {
            continue;
        };
        for line in text.lines() {
            if !line.starts_with("cartedge_cache_requests_total") || !line.contains("op=\"read\"") {
                continue;
            }
            let value: u64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |v| v as u64);
            all += value;
            if line.contains("result=\"hit\"") {
                hits += value;
            }
        }
    }
    (hits, all)
}

fn hit_rate(hits: u64, all: u64) -> f64 {
    if all == 0 {
        0.0
    } else {
        (hits as f64 / all as f64 * 1000.0).round() / 1000.0
    }
}

/// An edge's `/metrics` text.
async fn metrics_text(admin_url: &str) -> Result<String> {
    use http_body_util::BodyExt;
    let client = load::client();
    let uri: http::Uri = format!("{admin_url}/metrics").parse()?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.get(uri)).await??;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Seconds since the Unix epoch, for tokens' `iat` and `exp`.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
