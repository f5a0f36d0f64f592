//! The high-availability processes of the local HA cluster (`cartedge local up --ha`) and of
//! the failure drills: pg_auto_failover formations (one monitor per region, a primary and a
//! synchronous standby per shard, each node a supervised `pg_autoctl run`) and HAProxy in front
//! of a region's edges.
//!
//! Like [`crate::procs`] this module owns processes and their files only: creating nodes with
//! `pg_autoctl create`, writing the monitor's tuning and HAProxy's configuration, spawning,
//! waiting, killing and stopping. It sends no SQL; it reads the formation's state with
//! `pg_autoctl show state --json`.
//!
//! A node is `pg_autoctl run` and the services it forks (the Postgres controller, the keeper)
//! plus the postmaster, all in one process group led by `pg_autoctl run`: killing the leader
//! alone leaves the controller restarting Postgres, so [`Keeper::kill`] signals the group. As
//! root everything runs as the `postgres` OS user (Postgres refuses root), with
//! `XDG_CONFIG_HOME`/`XDG_DATA_HOME`/`XDG_RUNTIME_DIR` under the cluster's directory so separate
//! clusters never share pg_autoctl state.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::procs::{self, Lifetime, RunAs, ServerProc};

/// How long a node may take to stop after SIGTERM (pg_autoctl stops Postgres first).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `pg_autoctl run` of the monitor may take to accept connections.
const MONITOR_READY: Duration = Duration::from_secs(30);
/// How long HAProxy may take to answer on its stats port.
const HAPROXY_READY: Duration = Duration::from_secs(10);

/// The monitor's health-check settings: a dead primary is noticed within about a second and
/// its standby promoted within a few (FIELD-NOTES measured 5–6 s with such settings, ~50 s with
/// the defaults).
const MONITOR_TUNING: &[(&str, &str)] = &[
    ("pgautofailover.health_check_period", "1000"),
    ("pgautofailover.health_check_timeout", "500"),
    ("pgautofailover.health_check_max_retries", "1"),
    ("pgautofailover.health_check_retry_delay", "200"),
    ("pgautofailover.node_considered_unhealthy_timeout", "1000"),
    // How long the monitor waits for an unreachable old primary to demote itself before the
    // standby takes writes: longer than the keepers' `NETWORK_PARTITION_TIMEOUT_S`, after
    // which an old primary cut off from the monitor and its standby demotes itself.
    ("pgautofailover.primary_demote_timeout", "4000"),
];

/// Seconds a keeper that reaches neither the monitor nor its standby waits before demoting
/// its primary (pg_autoctl's `timeout.network_partition_timeout`, 20 s by default). With a
/// synchronous standby such a primary cannot commit anything meanwhile anyway.
const NETWORK_PARTITION_TIMEOUT_S: &str = "2";

/// Makes sure the HA packages are installed: pg_auto_failover (`postgresql-15-auto-failover`,
/// `pg-auto-failover-cli`), `redis-sentinel` and `haproxy`. As root the missing ones are
/// installed with apt-get; otherwise the error says what to install.
pub fn ensure_ha_packages() -> Result<()> {
    procs::ensure_packages()?;
    let mut missing = Vec::new();
    if procs::server_bin("/usr/bin/pg_autoctl", "pg_autoctl").is_none() || !pg_extension_installed()
    {
        missing.extend(["postgresql-15-auto-failover", "pg-auto-failover-cli"]);
    }
    if procs::server_bin("/usr/bin/redis-sentinel", "redis-sentinel").is_none() {
        missing.push("redis-sentinel");
    }
    if procs::server_bin("/usr/sbin/haproxy", "haproxy").is_none() {
        missing.push("haproxy");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !procs::is_root() {
        bail!(
            "the HA cluster needs {}; install them with `sudo apt-get install -y {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    procs::run_apt(&["update"])?;
    let mut args = vec!["install", "-y"];
    args.extend(missing.iter().copied());
    procs::run_apt(&args)
}

/// Whether the pg_auto_failover extension is in the server's extension directory.
fn pg_extension_installed() -> bool {
    let Ok(bin) = procs::pg_bin_dir() else {
        return false;
    };
    // /usr/lib/postgresql/15/bin -> /usr/share/postgresql/15/extension
    let Some(version) = bin.parent().and_then(Path::file_name) else {
        return false;
    };
    Path::new("/usr/share/postgresql")
        .join(version)
        .join("extension/pgautofailover.control")
        .exists()
}

/// Where pg_autoctl keeps its own state for one cluster, and as whom it runs.
#[derive(Debug, Clone)]
struct Autoctl {
    /// Holds `config/`, `data/` and `run/` (the XDG directories).
    root: PathBuf,
    run_as: Option<RunAs>,
    pg_ctl: PathBuf,
}

impl Autoctl {
    fn new(root: &Path) -> Result<Autoctl> {
        let root = procs::absolute(root)?;
        let run_as = procs::pg_run_as()?;
        for sub in ["config", "data", "run"] {
            let dir = root.join(sub);
            procs::create_dirs_0755(&dir)?;
            if let Some(user) = &run_as {
                procs::chown_to(&dir, user)?;
            }
        }
        if let Some(user) = &run_as {
            procs::chown_to(&root, user)?;
        }
        Ok(Autoctl {
            root,
            run_as,
            pg_ctl: procs::pg_bin_dir()?.join("pg_ctl"),
        })
    }

    /// `pg_autoctl <args>` for a node whose data directory is `data_dir`.
    fn command(&self, data_dir: &Path) -> Command {
        let mut cmd = Command::new("pg_autoctl");
        procs::pg_command_env(&mut cmd, data_dir, self.run_as.as_ref());
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self
            .pg_ctl
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()];
        paths.extend(std::env::split_paths(&path));
        cmd.env("XDG_CONFIG_HOME", self.root.join("config"))
            .env("XDG_DATA_HOME", self.root.join("data"))
            .env("XDG_RUNTIME_DIR", self.root.join("run"))
            .env("PATH", std::env::join_paths(paths).unwrap_or(path));
        cmd
    }

    /// Runs a one-shot `pg_autoctl` command, its output appended to `log`.
    fn run(&self, data_dir: &Path, args: &[&str], log: &Path, what: &str) -> Result<()> {
        let mut cmd = self.command(data_dir);
        cmd.args(args);
        procs::run_logged(cmd, log, what)
    }

    /// Spawns `pg_autoctl run --pgdata <data_dir>` as the leader of its own process group.
    fn spawn_run(
        &self,
        data_dir: &Path,
        log_path: &Path,
        lifetime: Lifetime,
    ) -> Result<ServerProc> {
        use std::os::unix::process::CommandExt;
        let log = procs::open_log(log_path)?;
        let mut cmd = self.command(data_dir);
        cmd.arg("run")
            .arg("--pgdata")
            .arg(data_dir)
            .stdout(log.try_clone()?)
            .stderr(log);
        if lifetime == Lifetime::TiedToParent {
            // Detached servers get a session (and group) of their own from `spawn_server`.
            cmd.process_group(0);
        }
        ServerProc::spawn(cmd, lifetime, libc::SIGTERM, STOP_TIMEOUT)
            .context("starting pg_autoctl run")
    }
}

/// Sends `signal` to every process of the group `pgid` leads. False when none was there.
pub fn signal_group(pgid: u32, signal: i32) -> bool {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return false;
    };
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// One node of a formation as the monitor sees it (`pg_autoctl show state --json`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    pub nodename: String,
    pub nodeport: u16,
    /// What the node last reported: `primary`, `secondary`, `wait_primary`, `demoted`, …
    pub current_group_state: String,
    /// What the monitor assigned it.
    pub assigned_group_state: String,
    #[serde(default)]
    pub reported_tli: i64,
    #[serde(default)]
    pub health: i32,
}

impl NodeState {
    /// Reported and assigned `single` (no standby registered yet), `primary`, or
    /// `wait_primary` (a primary whose standby is gone: writes continue without a synchronous
    /// standby).
    pub fn is_writable_primary(&self) -> bool {
        matches!(
            (
                self.current_group_state.as_str(),
                self.assigned_group_state.as_str()
            ),
            ("single", "single") | ("primary", "primary") | ("wait_primary", "wait_primary")
        )
    }

    /// A standby in sync, ready to be promoted.
    pub fn is_secondary(&self) -> bool {
        self.current_group_state == "secondary" && self.assigned_group_state == "secondary"
    }
}

/// Whether a formation of `count` nodes is settled: one primary with a synchronous standby
/// (reported and assigned `primary`), every other node a `secondary`. Only a settled formation
/// fails over: a primary still in `wait_primary` has no standby ready to promote.
pub fn settled(nodes: &[NodeState], count: usize) -> bool {
    let primaries = nodes
        .iter()
        .filter(|n| n.current_group_state == "primary" && n.assigned_group_state == "primary")
        .count();
    let secondaries = nodes.iter().filter(|n| n.is_secondary()).count();
    nodes.len() == count && primaries == 1 && secondaries == count - 1
}

/// A pg_auto_failover monitor (its own small Postgres), run by `pg_autoctl run`.
#[derive(Debug)]
pub struct Monitor {
    pub port: u16,
    pub data_dir: PathBuf,
    autoctl: Autoctl,
    log_path: PathBuf,
    proc: ServerProc,
}

impl Monitor {
    /// Creates (unless `data_dir` already holds one) and runs a monitor on a free port, its
    /// pg_autoctl state under `state_dir`, with the fast health checks of `MONITOR_TUNING`.
    pub fn start(data_dir: &Path, state_dir: &Path, lifetime: Lifetime) -> Result<Monitor> {
        let autoctl = Autoctl::new(state_dir)?;
        let data_dir = procs::absolute(data_dir)?;
        let parent = data_dir
            .parent()
            .context("monitor data dir has no parent")?;
        procs::create_dirs_0755(parent)?;
        if let Some(user) = &autoctl.run_as {
            procs::chown_to(parent, user)?;
        }
        let log_path = parent.join("monitor.log");
        let port = if data_dir.join("PG_VERSION").exists() {
            read_port(&data_dir)?
        } else {
            let port = procs::free_port()?;
            autoctl.run(
                &data_dir,
                &[
                    "create",
                    "monitor",
                    "--pgdata",
                    path_str(&data_dir)?,
                    "--pgport",
                    &port.to_string(),
                    "--pgctl",
                    path_str(&autoctl.pg_ctl)?,
                    "--hostname",
                    "127.0.0.1",
                    "--auth",
                    "trust",
                    "--no-ssl",
                ],
                &log_path,
                "pg_autoctl create monitor",
            )?;
            autoctl.run(
                &data_dir,
                &[
                    "config",
                    "set",
                    "--pgdata",
                    path_str(&data_dir)?,
                    "postgresql.listen_addresses",
                    "127.0.0.1",
                ],
                &log_path,
                "pg_autoctl config set",
            )?;
            let mut tuning =
                String::from("\n# cartedge: fast failure detection (local HA cluster)\n");
            for (key, value) in MONITOR_TUNING {
                tuning.push_str(&format!("{key} = {value}\n"));
            }
            tuning.push_str("listen_addresses = '127.0.0.1'\n");
            append(&data_dir.join("postgresql.conf"), &tuning)?;
            port
        };
        let offset = procs::file_len(&log_path);
        let proc = autoctl.spawn_run(&data_dir, &log_path, lifetime)?;
        let proc = procs::wait_ready(
            proc,
            "pg_autoctl monitor",
            port,
            &log_path,
            offset,
            MONITOR_READY,
            || procs::pg_ready(port),
        )?;
        Ok(Monitor {
            port,
            data_dir,
            autoctl,
            log_path,
            proc,
        })
    }

    /// The URI nodes register with.
    pub fn uri(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            self.port
        )
    }

    /// Pid of `pg_autoctl run` (leader of the monitor's process group).
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The formation's nodes as the monitor sees them now.
    pub fn state(&self) -> Result<Vec<NodeState>> {
        formation_state(&self.autoctl, &self.data_dir)
    }

    /// Polls [`Monitor::state`] until `done` holds, bounded by `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[NodeState]) -> bool,
    ) -> Result<Vec<NodeState>> {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            if let Ok(nodes) = self.state() {
                if done(&nodes) {
                    return Ok(nodes);
                }
                last = nodes;
            }
            if Instant::now() >= deadline {
                bail!("{what}: not reached within {timeout:?}; the monitor says {last:?}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if self.proc.lifetime == Lifetime::TiedToParent {
            self.stop();
            signal_group(self.proc.pid, libc::SIGKILL);
        }
    }
}

/// The formation's state as a monitor at `monitor_dir` reports it; usable without a
/// [`Monitor`] handle (a detached cluster's `local status`).
pub fn state_of(monitor_dir: &Path, state_dir: &Path) -> Result<Vec<NodeState>> {
    let autoctl = Autoctl::new(state_dir)?;
    formation_state(&autoctl, monitor_dir)
}

fn formation_state(autoctl: &Autoctl, monitor_dir: &Path) -> Result<Vec<NodeState>> {
    let mut cmd = autoctl.command(monitor_dir);
    cmd.args(["show", "state", "--json", "--pgdata"])
        .arg(monitor_dir)
        .stdin(std::process::Stdio::null());
    let out = cmd.output().context("running pg_autoctl show state")?;
    if !out.status.success() {
        bail!(
            "pg_autoctl show state failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing pg_autoctl show state --json")
}

/// One Postgres node of a formation (`pg_autoctl create postgres` + `pg_autoctl run`): the
/// first registered becomes the primary, the next its synchronous standby.
#[derive(Debug)]
pub struct Keeper {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    autoctl: Autoctl,
    log_path: PathBuf,
    lifetime: Lifetime,
    proc: ServerProc,
}

impl Keeper {
    /// Creates the node (unless `data_dir` holds one: it is run as it is, and pg_auto_failover
    /// decides its role) and runs it. Returns once `pg_autoctl run` is up; wait on the
    /// monitor for the node's role.
    pub fn start(
        monitor: &Monitor,
        data_dir: &Path,
        name: &str,
        dbname: &str,
        lifetime: Lifetime,
    ) -> Result<Keeper> {
        let autoctl = monitor.autoctl.clone();
        let data_dir = procs::absolute(data_dir)?;
        let parent = data_dir.parent().context("node data dir has no parent")?;
        procs::create_dirs_0755(parent)?;
        if let Some(user) = &autoctl.run_as {
            procs::chown_to(parent, user)?;
        }
        let log_path = parent.join(format!("{name}.log"));
        let port = if data_dir.join("PG_VERSION").exists() {
            read_port(&data_dir)?
        } else {
            let port = procs::free_port()?;
            autoctl.run(
                &data_dir,
                &[
                    "create",
                    "postgres",
                    "--pgdata",
                    path_str(&data_dir)?,
                    "--pgport",
                    &port.to_string(),
                    "--pgctl",
                    path_str(&autoctl.pg_ctl)?,
                    "--hostname",
                    "127.0.0.1",
                    "--listen",
                    "127.0.0.1",
                    "--auth",
                    "trust",
                    "--no-ssl",
                    "--monitor",
                    &monitor.uri(),
                    "--name",
                    name,
                    "--dbname",
                    dbname,
                ],
                &log_path,
                "pg_autoctl create postgres",
            )?;
            autoctl.run(
                &data_dir,
                &[
                    "config",
                    "set",
                    "--pgdata",
                    path_str(&data_dir)?,
                    "timeout.network_partition_timeout",
                    NETWORK_PARTITION_TIMEOUT_S,
                ],
                &log_path,
                "pg_autoctl config set",
            )?;
            port
        };
        let proc = autoctl.spawn_run(&data_dir, &log_path, lifetime)?;
        Ok(Keeper {
            name: name.to_string(),
            port,
            data_dir,
            autoctl,
            log_path,
            lifetime,
            proc,
        })
    }

    /// Pid of `pg_autoctl run`, the leader of the node's process group.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Pid of the node's postmaster (first line of `postmaster.pid`), while it runs.
    pub fn postgres_pid(&self) -> Option<u32> {
        postmaster_pid(&self.data_dir)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `host=127.0.0.1 port=P user=postgres dbname=DB`.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// The node dies at once, Postgres and its supervisor alike (SIGKILL to the group).
    pub fn kill(&mut self) {
        kill_node(self.proc.pid, &self.data_dir);
        self.proc.exited();
    }

    /// Runs the node again after [`Keeper::kill`] or [`Keeper::stop`]: pg_auto_failover makes
    /// an old primary rejoin as a standby (rewound), never writable on its own.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.proc = self
            .autoctl
            .spawn_run(&self.data_dir, &self.log_path, self.lifetime)?;
        Ok(())
    }

    /// SIGTERM (pg_autoctl stops Postgres), bounded, then SIGKILL to the group.
    pub fn stop(&mut self) {
        self.proc.stop();
        signal_group(self.proc.pid, libc::SIGKILL);
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::TiedToParent {
            self.stop();
        }
    }
}

/// Runs an existing node again (`pg_autoctl run`) from its data directory alone, e.g. after a
/// drill killed it: pg_auto_failover decides its role (an old primary rejoins as a standby).
/// `state_dir` is the cluster's pg_autoctl state; returns the new group leader's pid.
pub fn rerun_node(
    data_dir: &Path,
    state_dir: &Path,
    log_path: &Path,
    lifetime: Lifetime,
) -> Result<u32> {
    let autoctl = Autoctl::new(state_dir)?;
    let proc = autoctl.spawn_run(data_dir, log_path, lifetime)?;
    let pid = proc.pid;
    // The handle's drop must not stop a detached node.
    std::mem::forget(proc);
    Ok(pid)
}

/// Kills a node by its group leader's pid, and its postmaster by `postmaster.pid` in case it
/// left the group.
pub fn kill_node(leader: u32, data_dir: &Path) {
    signal_group(leader, libc::SIGKILL);
    if let Some(pid) = postmaster_pid(data_dir) {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) touches no memory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The postmaster's pid from `postmaster.pid`, if the file is there and the process alive.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    procs::pid_alive(pid).then_some(pid)
}

/// The port pg_autoctl configured for an existing node (`port = N` in its own settings file).
fn read_port(data_dir: &Path) -> Result<u16> {
    let path = data_dir.join("postgresql-auto-failover.conf");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("port"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .find_map(|value| value.trim().trim_matches('\'').parse().ok())
        .with_context(|| format!("no port in {}", path.display()))
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// HAProxy in the foreground (`-db`), configured by the caller's text.
#[derive(Debug)]
pub struct Haproxy {
    proc: ServerProc,
    config_path: PathBuf,
    log_path: PathBuf,
}

impl Haproxy {
    /// Writes `config` to `<dir>/haproxy.cfg`, checks it (`haproxy -c`), starts HAProxy and
    /// waits until `ready_port` (one of its listeners) accepts connections.
    pub fn start(dir: &Path, config: &str, ready_port: u16, lifetime: Lifetime) -> Result<Haproxy> {
        let bin = procs::server_bin("/usr/sbin/haproxy", "haproxy")
            .context("haproxy is not installed (apt-get install -y haproxy)")?;
        procs::create_dirs_0755(dir)?;
        let config_path = dir.join("haproxy.cfg");
        fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_path = dir.join("haproxy.log");
        let mut check = Command::new(&bin);
        check.arg("-c").arg("-f").arg(&config_path);
        procs::run_logged(check, &log_path, "haproxy -c")?;
        let offset = procs::file_len(&log_path);
        let log = procs::open_log(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-db")
            .arg("-f")
            .arg(&config_path)
            .current_dir(dir)
            .stdout(log.try_clone()?)
            .stderr(log);
        let proc = ServerProc::spawn(cmd, lifetime, libc::SIGUSR1, STOP_TIMEOUT)
            .context("starting haproxy")?;
        let proc = procs::wait_ready(
            proc,
            "haproxy",
            ready_port,
            &log_path,
            offset,
            HAPROXY_READY,
            || std::net::TcpStream::connect(("127.0.0.1", ready_port)).is_ok(),
        )?;
        Ok(Haproxy {
            proc,
            config_path,
            log_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if self.proc.lifetime == Lifetime::TiedToParent {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formation_settled(nodes: &[NodeState]) -> bool {
        settled(nodes, 2)
    }

    fn primary(nodes: &[NodeState]) -> Option<&NodeState> {
        nodes.iter().find(|node| node.is_writable_primary())
    }

    /// A formation comes up as a primary and a synchronous standby; killing the primary's
    /// whole node (supervisor, controller and postmaster) makes the monitor promote the
    /// standby; the old node, run again, rejoins as the standby.
    #[test]
    fn a_killed_primary_is_replaced_by_its_standby_and_rejoins_as_standby() {
        ensure_ha_packages().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let monitor = Monitor::start(
            &root.join("monitor/data"),
            &root.join("autoctl"),
            Lifetime::TiedToParent,
        )
        .unwrap();
        let mut a = Keeper::start(
            &monitor,
            &root.join("a/data"),
            "a",
            "cartedge",
            Lifetime::TiedToParent,
        )
        .unwrap();
        monitor
            .wait_for(Duration::from_secs(60), "a primary", |nodes| {
                primary(nodes).is_some_and(|n| n.nodename == "a")
            })
            .unwrap();
        let b = Keeper::start(
            &monitor,
            &root.join("b/data"),
            "b",
            "cartedge",
            Lifetime::TiedToParent,
        )
        .unwrap();
        monitor
            .wait_for(Duration::from_secs(60), "a standby", formation_settled)
            .unwrap();
        let postmaster = a.postgres_pid().expect("a's postmaster runs");

        a.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while procs::pid_alive(postmaster) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !procs::pid_alive(postmaster),
            "killing the node kills its postmaster"
        );
        let after = monitor
            .wait_for(Duration::from_secs(30), "b promoted", |nodes| {
                primary(nodes).is_some_and(|n| n.nodename == "b")
            })
            .unwrap();
        assert!(primary(&after).is_some_and(|n| n.nodeport == b.port));

        a.restart().unwrap();
        monitor
            .wait_for(Duration::from_secs(60), "a back as standby", |nodes| {
                nodes.iter().any(|n| n.nodename == "a" && n.is_secondary())
                    && primary(nodes).is_some_and(|n| n.nodename == "b")
            })
            .unwrap();
    }
}
