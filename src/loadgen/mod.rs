//! `cartedge loadgen`: an open-loop load generator for a cluster of edges. A module of the
//! binary, not of the library: it reads the cluster a `cartedge local up` wrote (`cluster.json`
//! and the region files, for the edges' URLs and the HS256 key tokens are minted with), sends
//! requests at a constant arrival rate whatever the edges answer, and reports what it measured.
//!
//! Requests are due at `start + i / rate` and each one's latency counts from that intended
//! time ([`schedule`]), so a stall in the edge or in the generator itself is charged to every
//! request it delayed. Owners are drawn from a Zipf distribution over `--owners` users spread
//! over the cluster's regions; each request goes to its owner's home edge (or, `--via next`, the
//! next region's, which forwards its writes) with a token minted for that user (`region` claim,
//! service tier unless `--tier user`). A bounded number of
//! requests is in flight per edge; a request due when the bound is reached is counted as an
//! `in_flight_limit` error and not sent, and the schedule does not slow down. Everything stops
//! by itself: the schedule is finite and every request has a timeout.

mod plot;
mod report;
mod schedule;
mod traffic;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use cartedge::auth::ExtraClaims;
use cartedge::config::{AuthConfig, Config, Sources};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use crate::local::{self, ClusterFile};
use report::{Ending, Report};
use schedule::{Mix, Op};
use traffic::{HttpClient, Plan};

/// Recent items remembered per user, for updates and removes to address lines that exist.
const REMEMBERED_ITEMS: usize = 8;
/// How far `--find-max` raises the rate at each step.
const FIND_MAX_GROWTH: f64 = 1.5;
/// A `--find-max` step holds only if at most this share of its requests failed…
const FIND_MAX_ERROR_SHARE: f64 = 0.01;
/// …and it answered at least this share of the rate asked.
const FIND_MAX_RATE_SHARE: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tier {
    /// The `service` tier, whose quotas are sized for load generators.
    Service,
    /// No tier claim: a shopper's quotas apply (429s show where they bind).
    User,
}

/// Which region's edge a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The owner's home region: writes are applied there, reads served there.
    Home,
    /// The region after the owner's home in `cluster.json`: every write is forwarded to the
    /// home region and reads are served from that region's replica (shoppers abroad).
    Next,
}

/// `cartedge loadgen`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cluster's directory (`cluster.json`, `regions/<id>.toml`).
    #[arg(long, default_value = local::DEFAULT_DIR)]
    pub cluster: PathBuf,
    /// Arrival rate, requests per second (with `--find-max`, the first step's).
    #[arg(long)]
    pub rate: f64,
    /// How long the measured part of the schedule lasts, e.g. `30s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// A warm-up before it: requests sent at the same rate, not counted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub warmup: Duration,
    /// Operation weights: view, add, update, remove, merge, checkout.
    #[arg(long, default_value = "view=100,add=1")]
    pub mix: String,
    /// Users the owners are drawn from.
    #[arg(long, default_value_t = 10_000)]
    pub owners: u64,
    /// Exponent of the Zipf distribution over the users (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Rate-limit tier of the minted tokens.
    #[arg(long, value_enum, default_value_t = Tier::Service)]
    pub tier: Tier,
    /// Send each request to its owner's home edge, or to the next region's (forwarded writes).
    #[arg(long, value_enum, default_value_t = Via::Home)]
    pub via: Via,
    /// Items adds pick from: `sku-00001` … (the demo catalog has 10 000).
    #[arg(long, default_value_t = 10_000)]
    pub items: u32,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1 keep-alive.
    #[arg(long)]
    pub http2: bool,
    /// Requests in flight per edge (with HTTP/1.1 also the connections per edge).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Give up on a request after this long (counted as a `timeout` error).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a latency-percentile plot (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Raise the rate step by step until p99 passes `--p99-budget`; report the highest rate held.
    #[arg(long, requires = "p99_budget")]
    pub find_max: bool,
    /// The p99 a `--find-max` step must stay within, e.g. `50ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub p99_budget: Option<Duration>,
    /// Most `--find-max` steps.
    #[arg(long, default_value_t = 8)]
    pub max_steps: u32,
    /// Also run the same schedule of GETs against this URL (the bare responder) and report
    /// every figure as a ratio to it.
    #[arg(long)]
    pub baseline: Option<String>,
}

/// One region of the cluster under load.
pub(crate) struct Region {
    pub(crate) id: String,
    pub(crate) edge_url: Arc<str>,
    pub(crate) auth: AuthConfig,
    pub(crate) token_ttl: Duration,
}

/// What a phase sends requests to.
enum Target {
    Cluster(Vec<Region>),
    Baseline(Arc<str>),
}

/// Runs `cartedge loadgen`.
pub async fn run(args: &Args, defaults: Option<PathBuf>) -> Result<()> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of requests per second");
    }
    if args.duration.is_zero() {
        bail!("--duration must be longer than zero");
    }
    if args.owners == 0 || args.items == 0 || args.connections == 0 {
        bail!("--owners, --items and --connections must be at least 1");
    }
    if !(args.zipf.is_finite() && args.zipf >= 0.0) {
        bail!("--zipf must be zero or more");
    }
    let mix = Mix::parse(&args.mix).map_err(anyhow::Error::msg)?;
    let regions = load_regions(&args.cluster, defaults)?;
    let cluster = Target::Cluster(regions);
    let baseline = args
        .baseline
        .as_deref()
        .map(|url| Target::Baseline(Arc::from(url)));

    let (report, baseline_report, find_max) = if args.find_max {
        let budget = args.p99_budget.unwrap_or(Duration::from_millis(50));
        let baseline_max = match &baseline {
            Some(target) => Some(find_max(args, &mix, target, budget).await?),
            None => None,
        };
        let edge_max = find_max(args, &mix, &cluster, budget).await?;
        let summary = json!({
            "p99_budget_ms": budget.as_secs_f64() * 1000.0,
            "highest_rate_held": edge_max.held,
            "every_step_held": edge_max.every_step_held,
            "steps": edge_max.steps,
            "baseline": baseline_max.as_ref().map(|b| json!({
                "highest_rate_held": b.held,
                "steps": b.steps,
            })),
            "ratio_to_baseline": baseline_max.as_ref().and_then(|b| match (edge_max.held, b.held) {
                (Some(edge), Some(base)) if base > 0.0 => Some(edge / base),
                _ => None,
            }),
        });
        let held = match edge_max.held {
            None => "none (the first step did not hold)".to_string(),
            Some(rate) if edge_max.every_step_held => {
                format!("{rate:.0}/s (every step held: a lower bound, raise --max-steps)")
            }
            Some(rate) => format!("{rate:.0}/s"),
        };
        println!("find-max: highest rate with p99 within {budget:?}: {held}");
        if let Some(b) = &baseline_max {
            println!(
                "find-max baseline: {}",
                b.held.map_or("none".to_string(), |r| format!("{r:.0}/s"))
            );
        }
        (
            edge_max.report,
            baseline_max.map(|b| b.report),
            Some(summary),
        )
    } else {
        let baseline_report = match &baseline {
            Some(target) => Some(run_phase(args, &mix, target, args.rate).await?),
            None => None,
        };
        (
            run_phase(args, &mix, &cluster, args.rate).await?,
            baseline_report,
            None,
        )
    };

    if let Some(base) = &baseline_report {
        print!("{}", base.table(None));
    }
    print!("{}", report.table(baseline_report.as_ref()));

    if let Some(path) = &args.json {
        let mut document = report.to_json();
        if let Some(base) = &baseline_report {
            document["baseline"] = base.to_json();
            document["ratio_to_baseline"] = report::ratios(&report, base);
        }
        if let Some(summary) = find_max {
            document["find_max"] = summary;
        }
        let text = serde_json::to_string_pretty(&document)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let mut series: Vec<(String, &hdrhistogram::Histogram<u64>)> = report
            .operations
            .iter()
            .map(|(op, tally)| (op.name().to_string(), &tally.latency))
            .collect();
        if let Some(base) = &baseline_report {
            series.push(("baseline".to_string(), &base.overall.latency));
        }
        plot::write(path, &series)?;
    }
    Ok(())
}

/// The regions of `cluster.json` with their region files' token keys.
pub(crate) fn load_regions(dir: &Path, defaults: Option<PathBuf>) -> Result<Vec<Region>> {
    let path = dir.join("cluster.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (start a cluster with `cartedge local up`, or pass --cluster)",
            path.display()
        )
    })?;
    let cluster: ClusterFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if cluster.regions.is_empty() {
        bail!("{} lists no region", path.display());
    }
    cluster
        .regions
        .into_iter()
        .map(|region| {
            let sources = Sources::new(defaults.clone(), Some(local::region_file(dir, &region.id)));
            let config = Config::load(&sources, std::env::vars())
                .with_context(|| format!("region {}'s file", region.id))?;
            let token_ttl = config.auth.max_token_lifetime.0;
            // A key that cannot sign is found now, not as a run of 401s.
            cartedge::auth::issue_token_with(
                &config.auth,
                "lg-user-check",
                token_ttl,
                0,
                &ExtraClaims {
                    region: Some(&region.id),
                    ..ExtraClaims::default()
                },
            )
            .map_err(|error| {
                anyhow::anyhow!("region {}: cannot mint tokens: {error}", region.id)
            })?;
            Ok(Region {
                edge_url: Arc::from(region.edge_url.trim_end_matches('/')),
                id: region.id,
                auth: config.auth,
                token_ttl,
            })
        })
        .collect()
}

struct FindMax {
    held: Option<f64>,
    /// No step failed: `held` is only a lower bound.
    every_step_held: bool,
    steps: Vec<serde_json::Value>,
    /// The report of the highest step that held (else the first step's).
    report: Report,
}

/// Raises the rate by [`FIND_MAX_GROWTH`] per step, at most `--max-steps` steps, until a step's
/// p99 passes `budget` (or it fails too many requests or cannot keep the rate).
async fn find_max(args: &Args, mix: &Mix, target: &Target, budget: Duration) -> Result<FindMax> {
    let budget_ms = budget.as_secs_f64() * 1000.0;
    let mut found = FindMax {
        held: None,
        every_step_held: true,
        steps: Vec::new(),
        report: Report::default(),
    };
    let mut rate = args.rate;
    for step in 0..args.max_steps.max(1) {
        let report = run_phase(args, mix, target, rate).await?;
        let p99 = report.overall.percentile_ms(99.0);
        let error_share = report.overall.error_count() as f64 / report.scheduled.max(1) as f64;
        let held = p99 <= budget_ms
            && error_share <= FIND_MAX_ERROR_SHARE
            && report.achieved_rate() >= FIND_MAX_RATE_SHARE * rate;
        eprintln!(
            "loadgen: find-max step {}: {rate:.0}/s asked, {:.0}/s answered, p99 {p99:.2} ms, errors {}: {}",
            step + 1,
            report.achieved_rate(),
            report.overall.error_count(),
            if held { "held" } else { "did not hold" }
        );
        found.steps.push(json!({
            "rate": rate,
            "achieved_rate": report.achieved_rate(),
            "p99_ms": p99,
            "errors": report.overall.error_count(),
            "held": held,
        }));
        if held || step == 0 {
            found.report = report;
        }
        if !held {
            found.every_step_held = false;
            break;
        }
        found.held = Some(rate);
        rate *= FIND_MAX_GROWTH;
    }
    Ok(found)
}

/// One measured run: the warm-up, then `--duration` at `rate`, then waiting for the answers.
async fn run_phase(args: &Args, mix: &Mix, target: &Target, rate: f64) -> Result<Report> {
    let client = traffic::client(args.http2, args.connections);
    let mut planner = Planner::new(args, target)?;
    let (target_name, region_names): (String, Vec<String>) = match target {
        Target::Cluster(regions) => (
            args.cluster.display().to_string(),
            regions.iter().map(|r| r.id.clone()).collect(),
        ),
        Target::Baseline(url) => (format!("baseline {url}"), vec!["baseline".to_string()]),
    };
    let ops: Vec<Op> = match target {
        Target::Cluster(_) => mix.ops().collect(),
        Target::Baseline(_) => vec![Op::View],
    };
    let warmup_requests = schedule::requests_in(args.warmup, rate);
    let measured_requests = schedule::requests_in(args.duration, rate);
    let (outcomes, mut receiver) = mpsc::unbounded_channel::<Outcome>();
    let start = Instant::now();
    let measure_start = start + schedule::intended_offset(warmup_requests, rate);

    let collector = {
        let report = Report::new(target_name, rate, args.duration, ops.into_iter());
        let names = region_names.clone();
        tokio::spawn(async move {
            let mut report = report;
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.tick().await;
            let mut last_completion = measure_start;
            loop {
                tokio::select! {
                    outcome = receiver.recv() => {
                        let Some(outcome) = outcome else { break };
                        if !outcome.measured {
                            continue;
                        }
                        last_completion = last_completion.max(outcome.completed);
                        let latency = outcome.sent.then(|| {
                            schedule::latency_from_intended(outcome.intended, outcome.completed)
                        });
                        let lag = outcome.sent.then(|| {
                            schedule::latency_from_intended(outcome.intended, outcome.dispatched)
                        });
                        let region = names.get(outcome.region).map_or("?", String::as_str);
                        report.record(outcome.op, region, latency, lag, outcome.http_requests, &outcome.ending);
                    }
                    _ = ticker.tick() => progress(&report, start, measure_start),
                }
            }
            report.elapsed = last_completion.saturating_duration_since(measure_start);
            report
        })
    };

    let bounds: Vec<Arc<Semaphore>> = region_names
        .iter()
        .map(|_| Arc::new(Semaphore::new(args.connections)))
        .collect();
    for index in 0..warmup_requests + measured_requests {
        let intended = start + schedule::intended_offset(index, rate);
        if intended > Instant::now() {
            tokio::time::sleep_until(intended.into()).await;
        }
        let measured = index >= warmup_requests;
        let (region, plan) = planner.plan(mix, index);
        let Ok(permit) = bounds[region].clone().try_acquire_owned() else {
            let _ = outcomes.send(Outcome {
                measured,
                op: plan.op,
                region,
                intended,
                dispatched: Instant::now(),
                completed: Instant::now(),
                sent: false,
                http_requests: 0,
                ending: Ending::InFlightLimit,
            });
            continue;
        };
        let client: HttpClient = client.clone();
        let outcomes = outcomes.clone();
        let timeout = args.timeout;
        let dispatched = Instant::now();
        tokio::spawn(async move {
            let sent = tokio::time::timeout(timeout, traffic::send(&client, &plan)).await;
            let completed = Instant::now();
            drop(permit);
            let (ending, http_requests) = match sent {
                Ok(sent) => (sent.ending, sent.http_requests),
                Err(_) => (Ending::Failed("timeout"), 1),
            };
            let _ = outcomes.send(Outcome {
                measured,
                op: plan.op,
                region,
                intended,
                dispatched,
                completed,
                sent: true,
                http_requests,
                ending,
            });
        });
    }
    drop(outcomes);
    collector.await.context("the collector task failed")
}

/// The live progress line, about once a second on stderr.
fn progress(report: &Report, start: Instant, measure_start: Instant) {
    let now = Instant::now();
    // The first quarter second of the measured span is too short for a rate.
    if now < measure_start + Duration::from_millis(250) {
        eprintln!(
            "loadgen {}: {:>6.1}s warming up",
            report.target,
            now.duration_since(start).as_secs_f64()
        );
        return;
    }
    let seconds = now.duration_since(measure_start).as_secs_f64();
    eprintln!(
        "loadgen {}: {:>6.1}s {:>9.0} req/s answered, {} errors, p99 {:.2} ms",
        report.target,
        now.duration_since(start).as_secs_f64(),
        report.answered as f64 / seconds,
        report.overall.error_count(),
        report.overall.percentile_ms(99.0)
    );
}

/// How one request went, sent from its task to the collector.
struct Outcome {
    measured: bool,
    op: Op,
    region: usize,
    intended: Instant,
    /// When the generator handed it to the client.
    dispatched: Instant,
    completed: Instant,
    sent: bool,
    http_requests: u64,
    ending: Ending,
}

/// Decides each request of the schedule: its operation (the mix), owner (Zipf), edge, token,
/// item and idempotency key. Lives in the scheduling task alone.
struct Planner<'a> {
    target: &'a Target,
    tier: Tier,
    via: Via,
    items: u32,
    zipf: Zipf<f64>,
    rng: SmallRng,
    /// Unique per run, so idempotency keys never collide with an earlier run's.
    run_id: String,
    /// Tokens minted so far, per user rank, with when they were minted.
    tokens: HashMap<u64, (Arc<str>, Instant)>,
    /// The last items added per user rank (most recent last).
    items_of: HashMap<u64, Vec<u32>>,
}

impl<'a> Planner<'a> {
    fn new(args: &Args, target: &'a Target) -> Result<Planner<'a>> {
        let zipf = Zipf::new(args.owners as f64, args.zipf)
            .map_err(|error| anyhow::anyhow!("--owners/--zipf: {error}"))?;
        let mut rng = SmallRng::from_os_rng();
        Ok(Planner {
            target,
            tier: args.tier,
            via: args.via,
            items: args.items,
            zipf,
            run_id: format!("{:08x}", rng.random::<u32>()),
            rng,
            tokens: HashMap::new(),
            items_of: HashMap::new(),
        })
    }

    fn plan(&mut self, mix: &Mix, index: u64) -> (usize, Plan) {
        let idempotency_key = format!("lg-{}-{index}", self.run_id);
        let regions = match self.target {
            Target::Baseline(url) => {
                let plan = Plan {
                    op: Op::View,
                    base_url: url.clone(),
                    authorization: None,
                    item: String::new(),
                    idempotency_key,
                    baseline: true,
                };
                return (0, plan);
            }
            Target::Cluster(regions) => regions,
        };
        let op = mix.op_at(index);
        // Zipf gives ranks 1..=owners (as floats); rank 1 is the hottest user.
        let rank = (self.zipf.sample(&mut self.rng) as u64).max(1);
        let home = schedule::home_of(rank, regions.len());
        let region = &regions[home];
        let authorization = self.token(rank, region);
        let item = match op {
            Op::Add | Op::Merge => {
                let item = self.rng.random_range(1..=self.items);
                if op == Op::Add {
                    let remembered = self.items_of.entry(rank).or_default();
                    remembered.push(item);
                    if remembered.len() > REMEMBERED_ITEMS {
                        remembered.remove(0);
                    }
                }
                item
            }
            Op::Update => self
                .items_of
                .get(&rank)
                .and_then(|items| items.last().copied())
                .unwrap_or_else(|| self.rng.random_range(1..=self.items)),
            Op::Remove => self
                .items_of
                .get_mut(&rank)
                .and_then(Vec::pop)
                .unwrap_or_else(|| self.rng.random_range(1..=self.items)),
            Op::Checkout => {
                self.items_of.remove(&rank);
                0
            }
            Op::View => 0,
        };
        let edge = schedule::edge_of(home, regions.len(), self.via == Via::Next);
        let plan = Plan {
            op,
            base_url: regions[edge].edge_url.clone(),
            authorization,
            item: format!("sku-{item:05}"),
            idempotency_key,
            baseline: false,
        };
        (edge, plan)
    }

    /// The user's `Bearer` value, minted on first use and again when half its lifetime is gone.
    fn token(&mut self, rank: u64, region: &Region) -> Option<Arc<str>> {
        if let Some((token, minted)) = self.tokens.get(&rank) {
            if minted.elapsed() < region.token_ttl / 2 {
                return Some(token.clone());
            }
        }
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let extra = ExtraClaims {
            tier: match self.tier {
                Tier::Service => Some("service"),
                Tier::User => None,
            },
            role: None,
            region: Some(&region.id),
        };
        let sub = format!("lg-user-{rank}");
        match cartedge::auth::issue_token_with(
            &region.auth,
            &sub,
            region.token_ttl,
            now_unix,
            &extra,
        ) {
            Ok(token) => {
                let bearer: Arc<str> = Arc::from(format!("Bearer {token}"));
                self.tokens.insert(rank, (bearer.clone(), Instant::now()));
                Some(bearer)
            }
            // Without a token the request goes out as a guest's and its answer (401 or a
            // guest cart) is counted like any other: the run does not stop.
            Err(_) => None,
        }
    }
}
