//! The `cartedge` command line: serve, migrate, check-config, token, janitor, catalog, ring,
//! local, loadgen. A module of the binary, not of the library: it parses arguments, loads the
//! configuration and runs each command through the library (`cartedge::service` runs an edge)
//! or the launcher ([`crate::local`]). Serving and launching live there, not here.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cartedge::app::App;
use cartedge::config::{Config, Sources};
use cartedge::domain::ids::{RegionId, ShardId};
use cartedge::domain::money::{Currency, Money};
use cartedge::domain::ring::{plan_moves, sample_owner_keys, Ring, ShardSpec};
use cartedge::service::{reload_on_sighup, serve_bound, Listeners};
use cartedge::store::catalog::{self, ImportRow};
use clap::{Parser, Subcommand};

use crate::local;

#[derive(Debug, Parser)]
#[command(name = "cartedge", version, about = "Multi-region shopping-cart edge")]
pub struct Cli {
    /// Region file (`regions/<id>.toml`); defaults to the local cluster's generated one.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Defaults file; `config/default.toml` when present, else the built-in copy.
    #[arg(long, global = true)]
    pub defaults: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the edge server.
    Serve,
    /// Apply pending database migrations to the primary.
    Migrate,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Print a user token the configured HS256 key signs (local cluster and tests).
    Token {
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. `1h`, `15m`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Rate-limit tier claim, e.g. `service` for load generators.
        #[arg(long)]
        tier: Option<String>,
        /// Role claim, e.g. `payment` for the payment service (`checkout.payment_role`).
        #[arg(long, conflicts_with = "tier")]
        role: Option<String>,
        /// Home region claim: the user's market, whose shards hold the cart.
        #[arg(long)]
        region: Option<String>,
    },
    /// Run the janitor for the shards homed in this region: purge inactive carts, old
    /// idempotency keys and merge records, release expired reservations. Prints each pass as
    /// one JSON line.
    Janitor {
        /// Run one pass and exit (otherwise a pass every `janitor.interval` until Ctrl-C).
        #[arg(long)]
        once: bool,
    },
    /// Manage the regions' catalogs: with `--config`, that region's own catalog; on the local
    /// cluster, every region's (or the one `--region` names).
    Catalog(CatalogArgs),
    /// Run a local cluster on 127.0.0.1.
    #[command(subcommand)]
    Local(LocalCommand),
    /// Inspect the consistent-hash ring.
    #[command(subcommand)]
    Ring(RingCommand),
    /// Send open-loop load at a constant rate to the cluster's edges and report latencies.
    Loadgen(crate::loadgen::Args),
    /// Run a failure drill on the running local cluster (see RELIABILITY.md): one JSON line
    /// out, non-zero exit when anything acknowledged was lost or the drill's promise broken.
    Drill(crate::drill::Args),
}

#[derive(Debug, Subcommand)]
pub enum RingCommand {
    /// Print `shard=<shard id> home=<region id>` for an owner key (`u:<sub>` or `g:<session>`).
    Locate {
        owner: String,
        /// Place a user as a token with this `region` claim would be placed.
        #[arg(long)]
        region: Option<String>,
        /// Ring file.
        #[arg(long, default_value = "config/ring.toml")]
        ring: PathBuf,
    },
    /// Count how many owners adding shards would move (over a deterministic sample of keys);
    /// without `--add-shard`, a moving ring's move under way (previous ring -> this one).
    Plan {
        /// `<shard id>@<home region>[:<weight>]`, repeatable.
        #[arg(long = "add-shard")]
        add_shard: Vec<String>,
        #[arg(long, default_value = "config/ring.toml")]
        ring: PathBuf,
        /// Sample size.
        #[arg(long, default_value_t = 100_000)]
        owners: usize,
    },
    /// While the ring moves (`moving_from`): move the carts the ring places on a shard homed in
    /// this region (`--config`) from the shards of the previous ring, a page at a time, with a
    /// progress line per page. Safe to stop and rerun; run it in every region that homes a
    /// shard owners move to.
    Move {
        /// Owners read per page (and the most moved per page).
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// Moves in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Only report what is left to move (nothing is moved).
        #[arg(long)]
        status: bool,
        /// How a user found on a shard is placed: `auto` (by the shard it was found on; owners
        /// that leaves undecided move on their first write), `claimed` (tokens carry a region
        /// claim: homed in that shard's region) or `global` (tokens carry none).
        #[arg(long, default_value = "auto")]
        users: String,
        /// Instead of the moving ring's owners: the users of this file (one `user_id,region`
        /// per line, `#` comments) whose tokens gained a `region` claim, moved from where the
        /// global ring placed them to their claimed region's ring (this region's lines only;
        /// the ring must name `claims_from_global`). `--batch` users per progress line.
        #[arg(long, conflicts_with = "users")]
        claims: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct CatalogArgs {
    /// Only this region's catalog (its primary). With `--config`, it must be that file's region.
    #[arg(long, global = true)]
    pub region: Option<String>,
    #[command(subcommand)]
    pub command: CatalogCommand,
}

#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Import a CSV: header `item_id,name,stock,<CUR>,<CUR>…`, prices in minor units. Each
    /// region's catalog gets the column of its currency (rows without a price there are not
    /// sold there and skipped).
    Import { file: PathBuf },
    /// Set one item's price, in minor units, in the catalogs priced in that currency.
    SetPrice {
        item_id: String,
        currency: String,
        amount_minor: i64,
    },
    /// Set one item's stock (in each targeted region's catalog).
    SetStock { item_id: String, quantity: i32 },
}

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Start PostgreSQL, Redis and the edge; serve until Ctrl-C unless --detach.
    Up {
        #[arg(long)]
        detach: bool,
        #[arg(long, default_value = local::DEFAULT_DIR)]
        dir: PathBuf,
        #[arg(long, default_value_t = 8080)]
        edge_port: u16,
        #[arg(long, default_value_t = 9080)]
        admin_port: u16,
        /// Also run Prometheus (Debian package `prometheus`) scraping every edge, with
        /// ops/prometheus/alerts.yml loaded; its URL goes to cluster.json as `prometheus_url`.
        #[arg(long)]
        with_prometheus: bool,
        /// High availability: per region a pg_auto_failover monitor with a primary and a
        /// synchronous standby per home shard, Redis with a replica and three Sentinels, and
        /// two edges behind HAProxy (whose front is the region's edge port).
        #[arg(long)]
        ha: bool,
    },
    /// Print cluster.json as the cluster is now: roles after failovers, pids alive.
    Status {
        #[arg(long, default_value = local::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Stop a detached local cluster.
    Down {
        #[arg(long, default_value = local::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Add a shard to a region of the running cluster: its primary there, replicas elsewhere,
    /// the ring moving to a version with it rolled to every edge (SIGHUP, no restart), then
    /// the carts it takes moved (`ring move`, owners on the global ring). Not with `--ha`.
    AddShard {
        /// `<shard id>@<region>`.
        shard: String,
        #[arg(long, default_value = local::DEFAULT_DIR)]
        dir: PathBuf,
        /// Owners read (and moved) per page of the move.
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// Roll the ring only; move later with `ring move --config <dir>/regions/<region>.toml`
        /// (moving owners move on their first write meanwhile).
        #[arg(long)]
        no_move: bool,
    },
    /// Roll the ring file to every edge of the running cluster without a restart (SIGHUP, one
    /// edge at a time, each waited for until its `/health` names the file's ring version):
    /// after editing `<dir>/ring.toml`, e.g. removing `moving_from` once a move is over.
    Reload {
        #[arg(long, default_value = local::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Cut every link (edges and replication) between two regions of the running cluster.
    Partition {
        a: String,
        b: String,
        #[arg(long, default_value = local::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Restore the links between two regions.
    Heal {
        a: String,
        b: String,
        #[arg(long, default_value = local::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Run the link proxy of a detached cluster (started by `local up --detach`).
    #[command(hide = true)]
    LinkProxy {
        #[arg(long)]
        links: PathBuf,
        /// Where to write the bound addresses (proxy.json).
        #[arg(long)]
        state: PathBuf,
    },
}

impl Cli {
    fn defaults(&self) -> Option<PathBuf> {
        self.defaults.clone().or_else(|| {
            let path = PathBuf::from("config/default.toml");
            path.exists().then_some(path)
        })
    }

    fn load_config(&self) -> Result<Config> {
        Ok(Config::load(&self.sources()?, std::env::vars())?)
    }

    fn sources(&self) -> Result<Sources> {
        let region = match &self.config {
            Some(path) => path.clone(),
            None => {
                let generated = local::region_file(Path::new(local::DEFAULT_DIR), "sg");
                if !generated.exists() {
                    bail!("no --config given and no local cluster found (run `cartedge local up`)");
                }
                generated
            }
        };
        Ok(Sources::new(self.defaults(), Some(region)))
    }
}

/// How long a command that wrote carts waits, before exiting, for the cache invalidations it
/// queued for the other regions.
const SETTLE_INVALIDATIONS: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the command line.
pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Serve => {
            let config = cli.load_config()?;
            cartedge::preflight::check(&config)?;
            // Held until the edge stops: dropping it flushes the queued log lines.
            let _log_guard = cartedge::telemetry::init(&config.log);
            let app = App::new(config.clone())?;
            let listeners = Listeners::bind(&config).await?;
            reload_on_sighup(app.clone(), cli.sources()?);
            tracing::info!(region = %config.region.id, listen = %config.server.listen, tls = app.tls, "edge serving");
            serve_bound(app, listeners).await;
            Ok(())
        }
        Command::Migrate => {
            let config = cli.load_config()?;
            // Every primary homed in this region, and the catalog's primary where it lives here.
            let mut targets: Vec<(String, &str)> = config
                .database
                .shards
                .iter()
                .filter(|s| !s.primary.is_empty())
                .map(|s| (format!("shard {}", s.id), s.primary.expose()))
                .collect();
            let catalog = config.database.catalog_primary.expose();
            if !catalog.is_empty() && !targets.iter().any(|(_, dsn)| *dsn == catalog) {
                targets.push(("catalog".into(), catalog));
            }
            if targets.is_empty() {
                bail!(
                    "no primary is homed in region {}: nothing to migrate",
                    config.region.id
                );
            }
            for (name, dsn) in targets {
                let applied = cartedge::store::migrate::run(dsn)
                    .await
                    .with_context(|| format!("migrating {name}"))?;
                if applied.is_empty() {
                    println!("{name}: no pending migrations");
                }
                for migration in applied {
                    println!("{name}: applied {migration}");
                }
            }
            Ok(())
        }
        Command::CheckConfig => {
            let config = cli.load_config()?;
            let topology = cartedge::preflight::check(&config)?;
            refuse_unfinished_move(&config, &topology.ring).await?;
            print!("{}", config.redacted_toml());
            let spec = topology.ring.spec();
            println!(
                "\n# ring version {} fingerprint {}: {} shards, {} regions ({})",
                spec.version,
                topology.ring.fingerprint(),
                spec.shards.len(),
                topology.regions.len(),
                topology
                    .regions
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if topology.ring.claims_from_global() {
                println!(
                    "# claims_from_global: users with a region claim are also looked for on the global ring"
                );
            }
            Ok(())
        }
        Command::Token {
            sub,
            ttl,
            tier,
            role,
            region,
        } => {
            let config = cli.load_config()?;
            let ttl = humantime::parse_duration(ttl).context("--ttl")?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            if let Some(region) = region {
                let topology = cartedge::topology::Topology::load(&config)?;
                if !topology.ring.homes_shards(region) {
                    bail!("--region {region}: no shard of the ring is homed there");
                }
            }
            let extra = cartedge::auth::ExtraClaims {
                tier: tier.as_deref(),
                role: role.as_deref(),
                region: region.as_deref(),
            };
            let token = cartedge::auth::issue_token_with(&config.auth, sub, ttl, now, &extra)
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("{token}");
            Ok(())
        }
        Command::Janitor { once } => {
            let mut config = cli.load_config()?;
            // This process runs passes itself and relays nothing.
            config.janitor.enabled = false;
            config.events.relay = false;
            let interval = config.janitor.interval.0;
            let app = App::new(config)?;
            loop {
                let report = app.janitor_once().await.context("janitor pass")?;
                println!("{}", serde_json::to_string(&report)?);
                if *once {
                    app.settle_invalidations(SETTLE_INVALIDATIONS).await;
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Command::Catalog(CatalogArgs { region, command }) => {
            let (targets, currencies) = catalog_targets(&cli, region.as_deref())?;
            run_catalog(command, &targets, &currencies).await
        }
        Command::Local(LocalCommand::Up {
            detach,
            dir,
            edge_port,
            admin_port,
            with_prometheus,
            ha,
        }) => {
            local::up(local::UpOptions {
                dir: dir.clone(),
                detach: *detach,
                edge_port: *edge_port,
                admin_port: *admin_port,
                defaults: cli.defaults(),
                with_prometheus: *with_prometheus,
                ha: *ha,
            })
            .await
        }
        Command::Local(LocalCommand::Down { dir }) => local::down(dir),
        Command::Local(LocalCommand::Reload { dir }) => {
            let version = local::reload(dir).await?;
            println!("every edge serves ring {version}");
            Ok(())
        }
        Command::Local(LocalCommand::AddShard {
            shard,
            dir,
            batch,
            no_move,
        }) => {
            let Some((id, home)) = shard.split_once('@') else {
                bail!("{shard}: expected <shard id>@<region>");
            };
            let added = local::add_shard(dir, id, home).await?;
            if *no_move {
                eprintln!(
                    "cartedge: ring moving from version {}; run `cartedge --config {} ring move`",
                    added.moving_from,
                    added.home_file.display()
                );
                return Ok(());
            }
            let mut config = Config::load(
                &Sources::new(cli.defaults(), Some(added.home_file)),
                std::env::vars(),
            )?;
            config.janitor.enabled = false;
            config.events.relay = false;
            let app = App::new(config)?;
            eprintln!(
                "cartedge: ring moving from version {}; moving the carts {id} takes…",
                added.moving_from
            );
            let moved = ring_move(
                &app,
                (*batch).clamp(1, 10_000),
                8,
                false,
                cartedge::api::moves::UserHomes::Auto,
            )
            .await;
            app.settle_invalidations(SETTLE_INVALIDATIONS).await;
            moved
        }
        Command::Local(LocalCommand::Status { dir }) => local::status(dir).await,
        Command::Local(LocalCommand::Partition { a, b, dir }) => {
            local::steer(dir, "partition", a, b).await
        }
        Command::Local(LocalCommand::Heal { a, b, dir }) => local::steer(dir, "heal", a, b).await,
        Command::Loadgen(args) => crate::loadgen::run(args, cli.defaults()).await,
        Command::Drill(args) => crate::drill::run(args.clone(), cli.defaults()).await,
        Command::Local(LocalCommand::LinkProxy { links, state }) => {
            local::run_link_proxy(links, state).await
        }
        Command::Ring(RingCommand::Locate {
            owner,
            region,
            ring,
        }) => {
            let home = match (owner.split_once(':'), region) {
                (Some(("u", user)), region) if !user.is_empty() => region.clone(),
                (Some(("g", _)), Some(_)) => {
                    bail!("a guest's home region is bound inside its session id; drop --region")
                }
                (Some(("g", session)), None) if !session.is_empty() => {
                    cartedge::auth::session_home(session).map(|r| r.to_string())
                }
                _ => bail!("an owner key is u:<user id> or g:<session id>"),
            };
            let ring = load_ring(ring)?;
            let placement = ring.place(owner, home.as_deref()).with_context(|| {
                format!(
                    "no shard of the ring is homed in {}",
                    home.as_deref().unwrap_or_default()
                )
            })?;
            println!("shard={} home={}", placement.shard, placement.home);
            Ok(())
        }
        Command::Ring(RingCommand::Move {
            batch,
            concurrency,
            status,
            users: _,
            claims: Some(file),
        }) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut config = cli.load_config()?;
            config.janitor.enabled = false;
            config.events.relay = false;
            let app = App::new(config)?;
            let moved = ring_move_claims(
                &app,
                &text,
                (*batch).clamp(1, 10_000),
                *concurrency,
                *status,
            )
            .await;
            app.settle_invalidations(SETTLE_INVALIDATIONS).await;
            moved.with_context(|| file.display().to_string())
        }
        Command::Ring(RingCommand::Move {
            batch,
            concurrency,
            status,
            users,
            claims: None,
        }) => {
            let users = cartedge::api::moves::UserHomes::parse(users)
                .with_context(|| format!("--users {users}: expected auto, claimed or global"))?;
            let mut config = cli.load_config()?;
            // This process moves carts and runs nothing in the background.
            config.janitor.enabled = false;
            config.events.relay = false;
            let app = App::new(config)?;
            let moved = ring_move(
                &app,
                (*batch).clamp(1, 10_000),
                *concurrency,
                *status,
                users,
            )
            .await;
            app.settle_invalidations(SETTLE_INVALIDATIONS).await;
            moved
        }
        Command::Ring(RingCommand::Plan {
            add_shard,
            ring,
            owners,
        }) => {
            let loaded = load_ring(ring)?;
            // A moving ring with no shard to add: the plan of the move under way.
            let (before, after) = match (loaded.previous(), add_shard.is_empty()) {
                (Some(_), false) => bail!(
                    "{} is moving from version {}: finish that move (cartedge ring move) first",
                    ring.display(),
                    loaded.spec().moving_from.unwrap_or_default()
                ),
                (Some(previous), true) => {
                    let previous = Ring::new(previous.spec().clone())
                        .map_err(|e| anyhow::anyhow!("the previous ring: {e}"))?;
                    (previous, loaded)
                }
                (None, true) => bail!(
                    "{} is not moving: name the shards to add with --add-shard",
                    ring.display()
                ),
                (None, false) => {
                    let mut spec = loaded.spec().clone();
                    for added in add_shard {
                        spec.shards.push(parse_shard(added)?);
                    }
                    let after =
                        Ring::new(spec).map_err(|e| anyhow::anyhow!("the new ring: {e}"))?;
                    (loaded, after)
                }
            };
            let keys = sample_owner_keys(*owners);
            let plan = plan_moves(&before, &after, keys.iter().map(String::as_str));
            let verb = if after.previous().is_some() {
                "move"
            } else {
                "would move"
            };
            println!(
                "ring {} -> {}: {} of {} sampled owners {verb} ({:.1}%)",
                before.fingerprint(),
                after.fingerprint(),
                plan.moved,
                plan.owners,
                100.0 * plan.moved as f64 / plan.owners.max(1) as f64
            );
            for (from, to, count) in plan.flows {
                println!("  {from} -> {to}: {count}");
            }
            Ok(())
        }
    }
}

/// Refuses a settled ring while a ring it moved from is still kept beside it
/// (`<stem>.v<N>.toml`, N below its version) and owners the move concerns have carts on that
/// ring's shards not marked moved: removing `moving_from` then would hide their carts. Asks the
/// old shards (this region's replicas of them).
async fn refuse_unfinished_move(config: &Config, ring: &Ring) -> Result<()> {
    let path = &config.topology.ring_file;
    if ring.previous().is_some() {
        return Ok(());
    }
    let version = ring.spec().version;
    let Some(from) = (1..version)
        .rev()
        .find(|n| cartedge::topology::previous_ring_path(path, *n).exists())
    else {
        return Ok(());
    };
    let previous =
        cartedge::topology::load_ring(&cartedge::topology::previous_ring_path(path, from))?;
    let mut spec = ring.spec().clone();
    spec.moving_from = Some(from);
    let moving = Ring::moving(spec, previous)
        .map_err(|e| anyhow::anyhow!("{}: as a move from version {from}: {e}", path.display()))?;
    let metrics = cartedge::metrics::Metrics::new(cartedge::metrics::BuildLabels {
        version: env!("CARGO_PKG_VERSION").to_string(),
        region: config.region.id.to_string(),
        ring_version: version.to_string(),
    });
    let store = cartedge::store::Store::new(config, &metrics)?;
    let users = if config.auth.require_region_claim {
        cartedge::api::moves::UserHomes::Claimed
    } else {
        cartedge::api::moves::UserHomes::Auto
    };
    let (left, ambiguous) = cartedge::api::moves::count_unmoved(&store, &moving, users)
        .await
        .with_context(|| {
            format!("asking the shards of ring version {from} what is left to move")
        })?;
    if ambiguous > 0 {
        eprintln!(
            "warning: {ambiguous} users on the shards of version {from} were not moved and their \
             placement depends on their tokens' region claim; those whose token moves them lose \
             sight of their cart once moving_from is gone (run `cartedge ring move --users \
             claimed|global` first if the deployment knows)"
        );
    }
    if left > 0 {
        bail!(
            "{}: moving_from = {from} was removed but {left} owners still have carts to move \
             from the shards of version {from}: put the marker back and run `cartedge ring move`",
            path.display()
        );
    }
    Ok(())
}

/// `cartedge ring move`: every shard of the previous ring, page by page.
async fn ring_move(
    app: &App,
    batch: i64,
    concurrency: usize,
    status_only: bool,
    users: cartedge::api::moves::UserHomes,
) -> Result<()> {
    use cartedge::api::moves::move_page;
    let Some(previous) = app.topology().ring.previous() else {
        bail!("the ring is not moving (no moving_from): nothing to move");
    };
    let mut shards: Vec<String> = previous
        .spec()
        .shards
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    shards.sort();
    // First count what is left, so the progress line has a total.
    let (mut left, mut elsewhere, mut ambiguous) = (0u64, 0u64, 0u64);
    for shard in &shards {
        let mut cursor = String::new();
        loop {
            let page = move_page(app, shard, &cursor, batch, 1, users, false)
                .await
                .map_err(|e| anyhow::anyhow!("reading shard {shard}: {e}"))?;
            left += page.moved;
            elsewhere += page.elsewhere;
            ambiguous += page.ambiguous;
            match page.next {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }
    let region = &app.config.region.id;
    if status_only {
        println!(
            "{}",
            serde_json::json!({
                "region": region.as_str(),
                "left_to_move_here": left,
                "left_to_move_elsewhere": elsewhere,
                "undecided_users": ambiguous,
            })
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    let (mut moved, mut errors) = (0u64, 0u64);
    for shard in &shards {
        let mut cursor = String::new();
        loop {
            let page = move_page(app, shard, &cursor, batch, concurrency, users, true)
                .await
                .map_err(|e| anyhow::anyhow!("moving from shard {shard}: {e}"))?;
            moved += page.moved;
            errors += page.errors;
            let seconds = started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "ring move {region}: {moved}/{left} owners moved ({:.1}/s), {errors} errors, from {shard}",
                moved as f64 / seconds
            );
            match page.next {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "region": region.as_str(),
            "moved": moved,
            "errors": errors,
            "left_to_move_elsewhere": elsewhere,
            "undecided_users": ambiguous,
            "seconds": seconds,
            "owners_per_second": moved as f64 / seconds.max(0.001),
        })
    );
    if errors > 0 {
        bail!("{errors} moves failed; run `cartedge ring move` again to retry them");
    }
    Ok(())
}

/// `cartedge ring move --claims <file>`: this region's users of the file, moved off their
/// global shard in batches, a progress line per batch; or, with `--status`, what is left.
async fn ring_move_claims(
    app: &App,
    file: &str,
    batch: i64,
    concurrency: usize,
    status_only: bool,
) -> Result<()> {
    use cartedge::api::moves::{claims_status, move_claims};
    let region = &app.config.region.id;
    if status_only {
        let left = claims_status(app, file, concurrency).await?;
        println!(
            "{}",
            serde_json::json!({
                "region": region.as_str(),
                "users_here": left.users_here,
                "to_move_here": left.to_move,
                "left_to_move_here": left.left,
                "left_for_regions": left.elsewhere,
            })
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    let batch = usize::try_from(batch).unwrap_or(1);
    let report = move_claims(app, file, batch, concurrency, |report| {
        let seconds = started.elapsed().as_secs_f64().max(0.001);
        eprintln!(
            "ring move --claims {region}: {}/{} owners moved ({:.1}/s), {} errors",
            report.moved,
            report.to_move,
            report.moved as f64 / seconds,
            report.errors
        );
    })
    .await?;
    for (other, users) in &report.elsewhere {
        eprintln!(
            "ring move --claims {region}: {users} users left for region {other} (run it there)"
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "region": region.as_str(),
            "users_here": report.users_here,
            "to_move_here": report.to_move,
            "moved": report.moved,
            "copied": report.copied,
            "errors": report.errors,
            "left_for_regions": report.elsewhere,
            "seconds": seconds,
            "owners_per_second": report.moved as f64 / seconds.max(0.001),
        })
    );
    if report.errors > 0 {
        bail!(
            "{} moves failed; run `cartedge ring move --claims` again to retry them",
            report.errors
        );
    }
    Ok(())
}

/// Reads and validates a ring file.
fn load_ring(path: &Path) -> Result<Ring> {
    Ok(cartedge::topology::load_ring(path)?)
}

fn parse_shard(text: &str) -> Result<ShardSpec> {
    let (id, rest) = text
        .split_once('@')
        .context("--add-shard takes <shard id>@<home region>[:<weight>]")?;
    let (home, weight) = match rest.split_once(':') {
        Some((home, weight)) => (
            home,
            weight.parse().context("weight must be a whole number")?,
        ),
        None => (rest, 1),
    };
    Ok(ShardSpec {
        id: ShardId::parse(id).with_context(|| format!("shard id {id:?}"))?,
        home: RegionId::parse(home).with_context(|| format!("region id {home:?}"))?,
        weight,
    })
}

/// One region's catalog primary a `cartedge catalog` command writes.
struct CatalogTarget {
    region: String,
    currency: Currency,
    dsn: String,
}

impl CatalogTarget {
    fn of(config: &Config) -> Result<CatalogTarget> {
        if config.database.catalog_primary.is_empty() {
            bail!(
                "region {} has no catalog primary (database.catalog_primary)",
                config.region.id
            );
        }
        Ok(CatalogTarget {
            region: config.region.id.to_string(),
            currency: config.region.currency,
            dsn: config.database.catalog_primary.expose().to_string(),
        })
    }

    async fn connect(&self) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        let (client, connection) = tokio_postgres::connect(&self.dsn, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to region {}'s catalog primary", self.region))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok((client, driver))
    }
}

/// The catalogs a `cartedge catalog` command writes, and every currency some region uses.
/// With `--config`: that region's own catalog (a `--region` naming another region is an
/// error: the file reaches only its own primary). On the local cluster: every region's, or the
/// one `--region` names, each through its generated region file.
fn catalog_targets(cli: &Cli, region: Option<&str>) -> Result<(Vec<CatalogTarget>, Vec<Currency>)> {
    let config = cli.load_config()?;
    let topology = cartedge::topology::Topology::load(&config)?;
    let currencies: Vec<Currency> = topology
        .regions
        .values()
        .map(|peer| peer.currency)
        .collect();
    if let Some(region) = region {
        if !topology.regions.contains_key(region) {
            let known: Vec<&str> = topology.regions.keys().map(|id| id.as_str()).collect();
            bail!(
                "--region {region}: no such region (the regions are {})",
                known.join(", ")
            );
        }
    }
    if let Some(file) = &cli.config {
        if let Some(region) = region.filter(|region| *region != config.region.id.as_str()) {
            bail!(
                "--region {region}: {} is region {}'s file, which reaches only its own catalog; give region {region}'s file",
                file.display(),
                config.region.id
            );
        }
        return Ok((vec![CatalogTarget::of(&config)?], currencies));
    }
    let dir = Path::new(local::DEFAULT_DIR);
    let mut targets = Vec::new();
    for id in topology.regions.keys() {
        if region.is_some_and(|region| region != id.as_str()) {
            continue;
        }
        let sources = Sources::new(cli.defaults(), Some(local::region_file(dir, id)));
        let config = Config::load(&sources, std::env::vars())
            .with_context(|| format!("the local cluster's region {id}"))?;
        targets.push(CatalogTarget::of(&config)?);
    }
    Ok((targets, currencies))
}

async fn run_catalog(
    command: &CatalogCommand,
    targets: &[CatalogTarget],
    currencies: &[Currency],
) -> Result<()> {
    match command {
        CatalogCommand::Import { file } => {
            let rows = read_catalog_csv(file)?;
            // Every region's column is there before anything is written.
            for target in targets {
                if !rows.is_empty()
                    && rows
                        .iter()
                        .all(|row| row_price(row, target.currency).is_none())
                {
                    bail!(
                        "{} has no {} prices for region {}",
                        file.display(),
                        target.currency,
                        target.region
                    );
                }
            }
            for target in targets {
                let sold: Vec<ImportRow> = rows
                    .iter()
                    .filter_map(|row| {
                        let price = row_price(row, target.currency)?;
                        Some(ImportRow {
                            prices: vec![price],
                            ..row.clone()
                        })
                    })
                    .collect();
                let (client, driver) = target.connect().await?;
                let count = catalog::upsert_items(&client, &sold).await?;
                drop(client);
                let _ = driver.await;
                let unpriced = rows.len() - sold.len();
                if unpriced == 0 {
                    println!("{}: imported {count} items", target.region);
                } else {
                    println!(
                        "{}: imported {count} items ({unpriced} without a {} price, not sold there)",
                        target.region, target.currency
                    );
                }
            }
        }
        CatalogCommand::SetPrice {
            item_id,
            currency,
            amount_minor,
        } => {
            let currency =
                Currency::parse(currency).context("currency must be an ISO 4217 code like SGD")?;
            if !currencies.contains(&currency) {
                let used: Vec<String> = currencies.iter().map(|c| c.to_string()).collect();
                bail!(
                    "no region uses {currency} (the regions use {})",
                    used.join(", ")
                );
            }
            if *amount_minor < 0 {
                bail!("amount_minor must not be negative");
            }
            let priced: Vec<&CatalogTarget> =
                targets.iter().filter(|t| t.currency == currency).collect();
            if priced.is_empty() {
                let regions: Vec<String> = targets
                    .iter()
                    .map(|t| format!("{} ({})", t.region, t.currency))
                    .collect();
                bail!(
                    "no targeted catalog is priced in {currency}: {}",
                    regions.join(", ")
                );
            }
            let price = Money::new(*amount_minor, currency);
            let what = format!("{item_id} {currency} {amount_minor}");
            each_catalog(&priced, item_id, &what, async |client| {
                Ok(catalog::set_price(client, item_id, price).await?)
            })
            .await?;
        }
        CatalogCommand::SetStock { item_id, quantity } => {
            if *quantity < 0 {
                bail!("quantity must not be negative");
            }
            let all: Vec<&CatalogTarget> = targets.iter().collect();
            let what = format!("{item_id} stock {quantity}");
            each_catalog(&all, item_id, &what, async |client| {
                Ok(catalog::set_stock(client, item_id, *quantity).await?)
            })
            .await?;
        }
    }
    Ok(())
}

/// A CSV row's price in `currency`, if it has one.
fn row_price(row: &ImportRow, currency: Currency) -> Option<Money> {
    row.prices.iter().copied().find(|p| p.currency == currency)
}

/// Runs one change on each target's catalog (`change` answers whether the item exists there),
/// printing what changed where. Fails when no targeted catalog holds the item; regions that
/// lack it are named on stderr.
async fn each_catalog(
    targets: &[&CatalogTarget],
    item_id: &str,
    what: &str,
    change: impl AsyncFn(&tokio_postgres::Client) -> Result<bool>,
) -> Result<()> {
    let mut missing = Vec::new();
    for target in targets {
        let (client, driver) = target.connect().await?;
        let changed = change(&client).await;
        drop(client);
        let _ = driver.await;
        if changed? {
            println!("{}: {what}", target.region);
        } else {
            missing.push(target.region.as_str());
        }
    }
    if missing.len() == targets.len() {
        bail!(
            "no item {item_id:?} in the catalog of {}",
            missing.join(", ")
        );
    }
    for region in missing {
        eprintln!("{region}: no item {item_id:?} in its catalog, left as it is");
    }
    Ok(())
}

/// Parses a catalog CSV: `item_id,name,stock` then one column per currency code.
fn read_catalog_csv(path: &Path) -> Result<Vec<ImportRow>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let position = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (Some(id_at), Some(name_at), Some(stock_at)) =
        (position("item_id"), position("name"), position("stock"))
    else {
        bail!("the header must name item_id, name and stock");
    };
    let currencies: Vec<(usize, Currency)> = headers
        .iter()
        .enumerate()
        .filter_map(|(index, header)| Currency::parse(header.trim()).map(|c| (index, c)))
        .collect();
    if currencies.is_empty() {
        bail!("the header names no currency column (e.g. SGD)");
    }
    let mut rows = Vec::new();
    for (line, record) in reader.records().enumerate() {
        let record = record?;
        let at = line + 2;
        let field = |index: usize| record.get(index).unwrap_or("").trim();
        let item_id = field(id_at);
        cartedge::domain::ids::ItemId::parse(item_id)
            .map_err(|e| anyhow::anyhow!("line {at}: {e}"))?;
        let stock: i32 = field(stock_at)
            .parse()
            .ok()
            .filter(|s| *s >= 0)
            .with_context(|| format!("line {at}: stock must be a non-negative integer"))?;
        let mut prices = Vec::new();
        for (index, currency) in &currencies {
            let raw = field(*index);
            if raw.is_empty() {
                continue;
            }
            let amount: i64 = raw.parse().ok().filter(|a| *a >= 0).with_context(|| {
                format!("line {at}: {currency} must be a non-negative integer of minor units")
            })?;
            prices.push(Money::new(amount, *currency));
        }
        rows.push(ImportRow {
            item_id: item_id.to_string(),
            name: field(name_at).to_string(),
            stock,
            prices,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_csv_rejects_bad_rows_with_their_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.csv");
        std::fs::write(
            &file,
            "item_id,name,stock,SGD\nok-1,Fine,1,100\nbad-2,Broken,1,12.50\n",
        )
        .unwrap();
        let error = read_catalog_csv(&file).unwrap_err().to_string();
        assert!(error.contains("line 3") && error.contains("SGD"), "{error}");
        std::fs::write(&file, "item_id,name,stock\nok-1,Fine,1\n").unwrap();
        assert!(read_catalog_csv(&file).is_err());
    }
}
