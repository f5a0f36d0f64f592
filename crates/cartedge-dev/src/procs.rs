//! Starting and stopping real, local PostgreSQL and Redis server processes (and
//! the Prometheus server of `cartedge local up --with-prometheus`).
//!
//! This module owns the *processes* behind the integration tests and the
//! `cartedge local up` cluster: locating (and, as root, installing) the server
//! binaries, creating data directories, `initdb` / `pg_basebackup`, writing the
//! server configuration, spawning the servers on free `127.0.0.1` ports with
//! their output going to log files, waiting until they answer, and stopping
//! them again (by handle or, for detached servers, by pid).
//!
//! It must not do anything else: no SQL beyond the readiness probe
//! (`pg_isready`), no schema or migrations, no Redis commands beyond `PING`, no
//! Prometheus request beyond `/-/ready` (its configuration is the caller's), and
//! no application logic. Callers connect on their own using
//! [`PgInstance::dsn`] and [`RedisInstance::url`].
//!
//! Everything here is synchronous (blocking `std::process`), so it can be used
//! from plain `#[test]`s, from a CLI before a runtime exists, or from async code
//! via `spawn_blocking`.

use std::env;
use std::ffi::CString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How long to wait for PostgreSQL to accept connections after spawning it.
const PG_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a PostgreSQL fast shutdown may take before we SIGKILL it.
const PG_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for Redis to answer `PING` after spawning it.
pub(crate) const REDIS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Redis may take to exit after SIGTERM before we SIGKILL it.
pub(crate) const REDIS_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace period after SIGKILL before `stop_pid` gives up.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Poll interval for readiness and exit checks.
pub(crate) const POLL: Duration = Duration::from_millis(20);
/// How much of a log file to quote in error messages.
const LOG_TAIL_BYTES: u64 = 4000;
/// Attempts with a fresh port when an automatically chosen port was taken
/// between `free_port()` and the server binding it.
const PORT_ATTEMPTS: usize = 3;
/// Conventional Debian location of redis-server.
const REDIS_SERVER_DEFAULT: &str = "/usr/bin/redis-server";
/// Debian location of the Prometheus server (package `prometheus`).
const PROMETHEUS_DEFAULT: &str = "/usr/bin/prometheus";
/// How long to wait for Prometheus to answer `/-/ready` after spawning it (it
/// replays its write-ahead log first, which is quick for a local cluster's).
const PROMETHEUS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Prometheus may take to exit after SIGTERM before we SIGKILL it.
const PROMETHEUS_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the config file we own inside a PostgreSQL data directory.
const PG_CONF_FILE: &str = "cartedge.conf";
/// Line appended once to `postgresql.conf` so our settings (written to
/// [`PG_CONF_FILE`] on every start) override the defaults.
const PG_INCLUDE_LINE: &str = "include_if_exists = 'cartedge.conf'";
/// Unix socket paths must fit in `sun_path` (108 bytes); stay well below.
const MAX_SOCKET_PATH: usize = 100;

/// Whether a started server must die with this process or outlive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed (SIGKILL via `PR_SET_PDEATHSIG`) when this process exits, however
    /// it exits (normal exit, panic, or being killed). For tests, so that a
    /// failing test binary never leaks servers. Also stopped when the handle
    /// is dropped.
    TiedToParent,
    /// Survives this process in its own session (`cartedge local up
    /// --detach`). Dropping the handle does nothing; stop it later by pid
    /// with [`stop_pid`].
    Detached,
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0,
/// read the port, drop the listener). Racy by nature, so the `start`
/// functions retry with a new port when an auto-chosen one was taken.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Makes sure the PostgreSQL server, redis-server and redis-sentinel binaries exist.
///
/// When some are missing and we run as root, installs only the missing Debian
/// packages (`apt-get update`, then `apt-get install -y` of `postgresql`,
/// `redis-server` and/or `redis-sentinel`, non-interactively). When not root, returns an error saying
/// what to install. Serialised within the process so parallel tests do not
/// race on the dpkg lock.
pub fn ensure_packages() -> Result<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);

    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "PostgreSQL/Redis server binaries are missing (packages: {}); install them with \
             `sudo apt-get install -y {}` (automatic installation only happens when running as root)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    tracing::info!(?missing, "installing missing server packages with apt-get");
    run_apt(&["update"])?;
    let mut args = vec!["install", "-y"];
    args.extend(missing.iter().copied());
    run_apt(&args)?;

    let still = missing_packages();
    if !still.is_empty() {
        bail!(
            "apt-get install succeeded but server binaries are still missing for: {}",
            still.join(", ")
        );
    }
    Ok(())
}

/// Directory holding the PostgreSQL server binaries (`postgres`, `initdb`,
/// `pg_isready`, `pg_basebackup`): the highest `/usr/lib/postgresql/*/bin`
/// that contains `postgres` (Debian layout), else `pg_config --bindir` from
/// PATH.
pub fn pg_bin_dir() -> Result<PathBuf> {
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(parse_version) else {
                continue;
            };
            let bin = entry.path().join("bin");
            if !is_executable(&bin.join("postgres")) {
                continue;
            }
            if best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return Ok(bin);
    }
    if let Some(pg_config) = find_in_path("pg_config") {
        let out = Command::new(&pg_config)
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && is_executable(&dir.join("postgres")) {
                return Ok(dir);
            }
        }
    }
    bail!(
        "no PostgreSQL server binaries found (looked for /usr/lib/postgresql/*/bin/postgres and \
         `pg_config --bindir` on PATH); call ensure_packages() as root or `apt-get install postgresql`"
    )
}

/// Options for [`PgInstance::start`] / [`PgInstance::start_replica`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Port to listen on; `None` picks a free one.
    pub port: Option<u16>,
    /// Whether the server dies with this process or outlives it.
    pub lifetime: Lifetime,
    /// `fsync`/`synchronous_commit`; off by default because tests and the
    /// local cluster value speed over durability.
    pub fsync: bool,
    /// Extra configuration lines, written after our own settings (so they
    /// win) in `cartedge.conf`, which `postgresql.conf` includes at its end.
    pub extra_conf: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            port: None,
            lifetime: Lifetime::TiedToParent,
            fsync: false,
            extra_conf: Vec::new(),
        }
    }
}

/// A running (or stopped) local PostgreSQL server.
///
/// Its output goes to `<data_dir>/../<data_dir name>.log` (outside the data
/// directory so `initdb`/`pg_basebackup` get an empty directory and replicas
/// don't copy the primary's log).
#[derive(Debug)]
pub struct PgInstance {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Absolute path of the data directory.
    pub data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    opts: PgOptions,
    log_path: PathBuf,
    proc: ServerProc,
}

impl PgInstance {
    /// Starts a primary in `data_dir`.
    ///
    /// Runs `initdb -U postgres --auth=trust -E UTF8 --locale=C` if the
    /// directory has no `PG_VERSION` (an existing cluster is reused as is),
    /// writes our settings (127.0.0.1 only, port, socket dir, 200
    /// connections, replication-ready WAL settings, fsync per option, log to
    /// stderr), spawns `postgres -D data_dir` and waits (bounded 30 s) until
    /// `pg_isready` succeeds; errors quote the tail of the log. As root,
    /// `initdb`/`postgres` run as the `postgres` OS user (they refuse root),
    /// and `data_dir` and its parent are chowned to that user.
    pub fn start(data_dir: &Path, opts: PgOptions) -> Result<PgInstance> {
        let bin_dir = pg_bin_dir()?;
        let data_dir = absolute(data_dir)?;
        let run_as = pg_run_as()?;
        prepare_pg_dirs(&data_dir, run_as.as_ref())?;
        let log_path = pg_log_path(&data_dir)?;

        if !data_dir.join("PG_VERSION").exists() {
            let mut cmd = Command::new(bin_dir.join("initdb"));
            cmd.arg("-D").arg(&data_dir).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ]);
            if !opts.fsync {
                cmd.arg("--no-sync");
            }
            pg_command_env(&mut cmd, &data_dir, run_as.as_ref());
            run_logged(cmd, &log_path, "initdb")?;
        }
        Self::launch(bin_dir, data_dir, run_as, log_path, opts)
    }

    /// Starts a streaming replica of `primary` in `data_dir` on its own port.
    ///
    /// Clones the primary with `pg_basebackup -h 127.0.0.1 -p <primary port>
    /// -U postgres -D data_dir -R -X stream --checkpoint=fast` (as the
    /// `postgres` user when root), which also writes `standby.signal` and
    /// `primary_conninfo`, then starts it like [`PgInstance::start`]. If
    /// `data_dir` already holds a cluster (`PG_VERSION`), it is started as is.
    /// Used by the multi-region setup.
    pub fn start_replica(
        primary: &PgInstance,
        data_dir: &Path,
        opts: PgOptions,
    ) -> Result<PgInstance> {
        Self::start_replica_of(primary.port, data_dir, opts)
    }

    /// [`PgInstance::start_replica`] of the server on `primary_port` (one this process did not
    /// start, e.g. a pg_auto_failover node).
    pub fn start_replica_of(
        primary_port: u16,
        data_dir: &Path,
        opts: PgOptions,
    ) -> Result<PgInstance> {
        let bin_dir = pg_bin_dir()?;
        let data_dir = absolute(data_dir)?;
        let run_as = pg_run_as()?;
        prepare_pg_dirs(&data_dir, run_as.as_ref())?;
        let log_path = pg_log_path(&data_dir)?;

        if !data_dir.join("PG_VERSION").exists() {
            let non_empty = fs::read_dir(&data_dir)
                .with_context(|| format!("reading {}", data_dir.display()))?
                .next()
                .is_some();
            if non_empty {
                bail!(
                    "{} is neither empty nor a PostgreSQL data directory; pg_basebackup needs an empty directory",
                    data_dir.display()
                );
            }
            let mut cmd = Command::new(bin_dir.join("pg_basebackup"));
            cmd.args(["-h", "127.0.0.1", "-p", &primary_port.to_string()])
                .args(["-U", "postgres", "-D"])
                .arg(&data_dir)
                .args(["-R", "-X", "stream", "--checkpoint=fast"]);
            if !opts.fsync {
                cmd.arg("--no-sync");
            }
            pg_command_env(&mut cmd, &data_dir, run_as.as_ref());
            run_logged(cmd, &log_path, "pg_basebackup")?;
        }
        Self::launch(bin_dir, data_dir, run_as, log_path, opts)
    }

    fn launch(
        bin_dir: PathBuf,
        data_dir: PathBuf,
        run_as: Option<RunAs>,
        log_path: PathBuf,
        opts: PgOptions,
    ) -> Result<PgInstance> {
        let (port, proc) = start_with_port_retry(opts.port, |port| {
            start_postgres(&bin_dir, &data_dir, run_as.as_ref(), port, &opts, &log_path)
        })?;
        tracing::info!(
            port,
            pid = proc.pid,
            data_dir = %data_dir.display(),
            log = %log_path.display(),
            "postgres started"
        );
        Ok(PgInstance {
            port,
            data_dir,
            bin_dir,
            run_as,
            opts: PgOptions {
                port: Some(port),
                ..opts
            },
            log_path,
            proc,
        })
    }

    /// Pid of the postmaster (the last one started, even after `stop`); what
    /// `local up --detach` records to stop the server later.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// libpq-style DSN for this server: `host=127.0.0.1 port=P user=postgres
    /// dbname=DB` (trust auth, so no password).
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={}",
            self.port,
            libpq_quote(dbname)
        )
    }

    /// Path of the server's log file, for error messages and `local up`.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Fast shutdown: SIGINT to the postmaster, wait up to 15 s, then
    /// SIGKILL. Idempotent; reaps the child to avoid zombies.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Stops the server if running and starts it again on the same port and
    /// data directory (new pid), waiting until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.proc = start_postgres(
            &self.bin_dir,
            &self.data_dir,
            self.run_as.as_ref(),
            self.port,
            &self.opts,
            &self.log_path,
        )?;
        Ok(())
    }
}

impl Drop for PgInstance {
    /// TiedToParent servers are stopped with their handle; Detached ones are
    /// meant to outlive it and are left running.
    fn drop(&mut self) {
        if self.proc.lifetime == Lifetime::TiedToParent {
            self.stop();
        }
    }
}

/// A running (or stopped) local Redis server, persistence disabled.
///
/// Its output goes to `<dir>/redis.log`.
#[derive(Debug)]
pub struct RedisInstance {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Absolute path of the working directory.
    pub dir: PathBuf,
    bin: PathBuf,
    log_path: PathBuf,
    proc: ServerProc,
}

impl RedisInstance {
    /// Starts `redis-server` in `dir` (created if missing) on `port` (or a
    /// free one) with no persistence, bound to 127.0.0.1, and waits (bounded
    /// 10 s) until it answers `PING` with `+PONG`.
    pub fn start(dir: &Path, port: Option<u16>, lifetime: Lifetime) -> Result<RedisInstance> {
        let bin = redis_server_bin().ok_or_else(|| {
            anyhow!(
                "redis-server not found ({REDIS_SERVER_DEFAULT} or PATH); call ensure_packages() \
                 as root or `apt-get install redis-server`"
            )
        })?;
        let dir = absolute(dir)?;
        create_dirs_0755(&dir)?;
        let log_path = dir.join("redis.log");
        let (port, proc) = start_with_port_retry(port, |port| {
            start_redis(&bin, &dir, port, lifetime, &log_path)
        })?;
        tracing::info!(port, pid = proc.pid, dir = %dir.display(), "redis started");
        Ok(RedisInstance {
            port,
            dir,
            bin,
            log_path,
            proc,
        })
    }

    /// Pid of the redis-server process (the last one started, even after
    /// `stop`); what `local up --detach` records to stop it later.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Connection URL: `redis://127.0.0.1:P/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Path of the server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Idempotent; reaps the child.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Stops the server if running and starts it again on the same port
    /// (new pid, empty dataset), waiting until it answers `PING`.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let lifetime = self.proc.lifetime;
        self.proc = start_redis(&self.bin, &self.dir, self.port, lifetime, &self.log_path)?;
        Ok(())
    }
}

impl Drop for RedisInstance {
    /// Same rule as [`PgInstance`]: stop TiedToParent, leave Detached running.
    fn drop(&mut self) {
        if self.proc.lifetime == Lifetime::TiedToParent {
            self.stop();
        }
    }
}

/// Stops a (typically detached) process by pid: sends `signal` (SIGINT gives
/// PostgreSQL a fast shutdown, SIGTERM suits Redis), waits until the process
/// is gone for at most `timeout`, then SIGKILLs it. Returns `Ok` if it was
/// already gone. Reaps it if it happens to be our own child; do not use it
/// on a pid whose `std::process::Child` is still held elsewhere.
pub fn stop_pid(pid: u32, signal: i32, timeout: Duration) -> Result<()> {
    let raw = libc::pid_t::try_from(pid).map_err(|_| anyhow!("invalid pid {pid}"))?;
    if raw <= 1 {
        // 0 would signal our own process group, 1 is init.
        bail!("refusing to signal pid {pid}");
    }
    if !(1..=64).contains(&signal) {
        bail!("invalid signal {signal}");
    }
    if !pid_alive(pid) {
        return Ok(());
    }
    if !send_signal(raw, signal).with_context(|| format!("sending signal {signal} to pid {pid}"))? {
        return Ok(());
    }
    if wait_gone(pid, timeout) {
        return Ok(());
    }
    tracing::warn!(
        pid,
        signal,
        ?timeout,
        "process did not exit in time; sending SIGKILL"
    );
    if !send_signal(raw, libc::SIGKILL).with_context(|| format!("sending SIGKILL to pid {pid}"))? {
        return Ok(());
    }
    if wait_gone(pid, KILL_GRACE) {
        Ok(())
    } else {
        bail!("pid {pid} is still alive after SIGKILL")
    }
}

// ---------------------------------------------------------------------------
// Process handling
// ---------------------------------------------------------------------------

/// A spawned server process. TiedToParent servers keep their `Child` (so
/// `stop` can reap them); Detached ones keep only the pid.
#[derive(Debug)]
pub(crate) struct ServerProc {
    pub(crate) pid: u32,
    child: Option<Child>,
    pub(crate) lifetime: Lifetime,
    running: bool,
    stop_signal: i32,
    stop_timeout: Duration,
}

impl ServerProc {
    pub(crate) fn spawn(
        cmd: Command,
        lifetime: Lifetime,
        stop_signal: i32,
        stop_timeout: Duration,
    ) -> Result<ServerProc> {
        let child = spawn_server(cmd, lifetime)?;
        let pid = child.id();
        let child = match lifetime {
            Lifetime::TiedToParent => Some(child),
            // Dropping a Child neither kills nor waits; the process lives on.
            Lifetime::Detached => None,
        };
        Ok(ServerProc {
            pid,
            child,
            lifetime,
            running: true,
            stop_signal,
            stop_timeout,
        })
    }

    /// Has the process exited? Reaps it if so.
    pub(crate) fn exited(&mut self) -> bool {
        let gone = match &mut self.child {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => !pid_alive(self.pid),
        };
        if gone {
            self.running = false;
        }
        gone
    }

    /// Signal, wait bounded, SIGKILL, reap. Idempotent.
    pub(crate) fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let Some(mut child) = self.child.take() else {
            if let Err(err) = stop_pid(self.pid, self.stop_signal, self.stop_timeout) {
                tracing::warn!(pid = self.pid, "stopping server failed: {err:#}");
            }
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        // The child is not reaped yet, so its pid cannot have been reused.
        if let Ok(raw) = libc::pid_t::try_from(self.pid) {
            let _ = send_signal(raw, self.stop_signal);
        }
        let deadline = Instant::now() + self.stop_timeout;
        loop {
            match child.try_wait() {
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) => {
                    tracing::warn!(pid = self.pid, "server did not stop in time; SIGKILL");
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(Some(_)) | Err(_) => return,
            }
        }
    }
}

/// Spawns a server with stdin from /dev/null (stdout/stderr are set by the
/// caller to the log file) according to `lifetime`.
pub fn spawn_server(mut cmd: Command, lifetime: Lifetime) -> Result<Child> {
    cmd.stdin(Stdio::null());
    match lifetime {
        Lifetime::TiedToParent => {
            let parent =
                libc::pid_t::try_from(std::process::id()).context("own pid does not fit pid_t")?;
            // SAFETY: the closure runs between fork and exec and only makes
            // async-signal-safe syscalls (prctl, getppid) without allocating.
            // std runs it after setgid/setuid, which would otherwise clear the
            // parent-death signal.
            unsafe {
                cmd.pre_exec(move || {
                    let sig = libc::SIGKILL as libc::c_ulong;
                    let zero: libc::c_ulong = 0;
                    if libc::prctl(libc::PR_SET_PDEATHSIG, sig, zero, zero, zero) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent may have died before prctl took effect.
                    if libc::getppid() != parent {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
            spawn_on_spawner_thread(cmd).context("spawning server process")
        }
        Lifetime::Detached => {
            // SAFETY: setsid is async-signal-safe; no allocation.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn().context("spawning detached server process")
        }
    }
}

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `cmd` from one long-lived thread.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not
/// the process; tests run on many short-lived threads, so spawning from the
/// caller's thread would kill servers as soon as the test thread finished.
/// This thread lives until the process exits.
fn spawn_on_spawner_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);
    let tx = {
        let mut guard = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel::<SpawnRequest>();
                thread::Builder::new()
                    .name("cartedge-procs-spawner".into())
                    .spawn(move || {
                        for mut req in rx {
                            let result = req.cmd.spawn();
                            let _ = req.reply.send(result);
                        }
                    })?;
                *guard = Some(tx.clone());
                tx
            }
        }
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    let gone = || io::Error::other("process spawner thread is gone");
    tx.send(SpawnRequest {
        cmd,
        reply: reply_tx,
    })
    .map_err(|_| gone())?;
    reply_rx.recv().map_err(|_| gone())?
}

/// Sends `signal`; `Ok(false)` if the process no longer exists.
fn send_signal(pid: libc::pid_t, signal: i32) -> io::Result<bool> {
    // SAFETY: plain syscall; callers never pass pid <= 0.
    if unsafe { libc::kill(pid, signal) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Is `pid` still running? Reaps it if it is an exited child of ours; treats
/// a zombie that is not ours as gone.
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    let mut status = 0;
    // SAFETY: plain syscall with a valid status pointer.
    let r = unsafe { libc::waitpid(raw, &mut status, libc::WNOHANG) };
    if r == raw {
        return false; // our child, just reaped
    }
    if r == 0 {
        return true; // our child, still running
    }
    // Not our child: probe it.
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(raw, 0) } != 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    {
        return false;
    }
    !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    // Format: "pid (comm) S ..."; comm may contain ')' so use the last one.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            Some(rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pid_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Runs `start(port)` with `fixed` or, if `None`, with a fresh free port,
/// retrying a few times when the auto-chosen port turned out to be taken.
pub(crate) fn start_with_port_retry<F>(
    fixed: Option<u16>,
    mut start: F,
) -> Result<(u16, ServerProc)>
where
    F: FnMut(u16) -> Result<ServerProc>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = match fixed {
            Some(port) => port,
            None => free_port()?,
        };
        match start(port) {
            Ok(proc) => return Ok((port, proc)),
            Err(err)
                if fixed.is_none()
                    && attempt < PORT_ATTEMPTS
                    && format!("{err:#}").contains("Address already in use") =>
            {
                tracing::debug!(port, "auto-chosen port was taken; retrying: {err:#}");
            }
            Err(err) => return Err(err),
        }
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL helpers
// ---------------------------------------------------------------------------

/// OS user to run PostgreSQL tools as.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    uid: u32,
    gid: u32,
    name: String,
    home: PathBuf,
}

/// `Some(postgres user)` when we are root (initdb/postgres refuse to run as
/// root), `None` to run as ourselves.
pub(crate) fn pg_run_as() -> Result<Option<RunAs>> {
    if !is_root() {
        return Ok(None);
    }
    let user = lookup_user("postgres")?.ok_or_else(|| {
        anyhow!(
            "running as root but there is no `postgres` OS user to run initdb/postgres as \
             (PostgreSQL refuses to run as root); install the postgresql package \
             (ensure_packages) or run as a non-root user"
        )
    })?;
    Ok(Some(user))
}

/// Thread-safe `getpwnam_r` lookup.
fn lookup_user(name: &str) -> Result<Option<RunAs>> {
    let cname = CString::new(name)?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: valid C string, out-pointers and buffer of the given length.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc))
                .with_context(|| format!("looking up OS user {name}"));
        }
        if result.is_null() {
            return Ok(None);
        }
        let home = if pwd.pw_dir.is_null() {
            PathBuf::from("/")
        } else {
            // SAFETY: getpwnam_r succeeded, so pw_dir points into `buf`.
            let dir = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) };
            PathBuf::from(dir.to_string_lossy().into_owned())
        };
        return Ok(Some(RunAs {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            name: name.to_owned(),
            home,
        }));
    }
}

/// Common setup for commands that touch a data directory: run from the
/// parent directory (accessible to the postgres user, unlike e.g. /root),
/// C locale, and as the postgres user when root.
pub(crate) fn pg_command_env(cmd: &mut Command, data_dir: &Path, run_as: Option<&RunAs>) {
    if let Some(parent) = data_dir.parent() {
        cmd.current_dir(parent);
    }
    cmd.env("LC_ALL", "C").env_remove("PGDATA");
    if let Some(user) = run_as {
        cmd.uid(user.uid)
            .gid(user.gid)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
}

/// Creates the data directory (0700) and its parent (0755); as root, chowns
/// both to the postgres user (the parent so it can traverse it and create its
/// socket there; not if the parent is `/` or a sticky shared dir like /tmp)
/// and checks it can reach them.
pub(crate) fn prepare_pg_dirs(data_dir: &Path, run_as: Option<&RunAs>) -> Result<()> {
    let parent = data_dir
        .parent()
        .ok_or_else(|| anyhow!("data dir {} has no parent", data_dir.display()))?;
    create_dirs_0755(parent)?;
    if !data_dir.exists() {
        DirBuilder::new()
            .mode(0o700)
            .create(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
    }
    let Some(user) = run_as else {
        return Ok(());
    };
    chown_to(data_dir, user)?;
    let parent_meta =
        fs::metadata(parent).with_context(|| format!("inspecting {}", parent.display()))?;
    if parent != Path::new("/") && parent_meta.mode() & 0o1000 == 0 {
        chown_to(parent, user)?;
    }
    for dir in parent.ancestors() {
        let meta = fs::metadata(dir).with_context(|| format!("inspecting {}", dir.display()))?;
        if !mode_allows(&meta, user, 0o1) {
            bail!(
                "the {} OS user cannot traverse {} (mode {:o}); put the data directory \
                 somewhere it can reach (e.g. under /tmp) or `chmod o+x` that directory",
                user.name,
                dir.display(),
                meta.mode() & 0o7777
            );
        }
    }
    Ok(())
}

pub(crate) fn chown_to(path: &Path, user: &RunAs) -> Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {} to {}", path.display(), user.name))
}

/// Does `meta`'s mode grant `bit` (1 = x, 2 = w, 4 = r) to `user`?
fn mode_allows(meta: &fs::Metadata, user: &RunAs, bit: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == user.uid {
        mode & (bit << 6) != 0
    } else if meta.gid() == user.gid {
        mode & (bit << 3) != 0
    } else {
        mode & bit != 0
    }
}

/// `<parent>/<data dir name>.log`.
fn pg_log_path(data_dir: &Path) -> Result<PathBuf> {
    let parent = data_dir
        .parent()
        .ok_or_else(|| anyhow!("data dir {} has no parent", data_dir.display()))?;
    let name = data_dir
        .file_name()
        .ok_or_else(|| anyhow!("data dir {} has no name", data_dir.display()))?;
    let mut file = name.to_os_string();
    file.push(".log");
    Ok(parent.join(file))
}

/// Unix socket directory: the data dir's parent if the socket path stays
/// short and the server can write there, else /tmp (PostgreSQL's default).
fn pg_socket_dir(data_dir: &Path, run_as: Option<&RunAs>) -> PathBuf {
    let tmp = PathBuf::from("/tmp");
    let Some(parent) = data_dir.parent() else {
        return tmp;
    };
    let Some(text) = parent.to_str() else {
        return tmp;
    };
    let socket_len = text.len() + "/.s.PGSQL.65535.lock".len();
    if socket_len >= MAX_SOCKET_PATH || text.contains(',') {
        return tmp;
    }
    let writable = match (run_as, fs::metadata(parent)) {
        (None, Ok(_)) => true,
        (Some(user), Ok(meta)) => mode_allows(&meta, user, 0o2),
        (_, Err(_)) => false,
    };
    if writable {
        parent.to_path_buf()
    } else {
        tmp
    }
}

/// Makes `postgresql.conf` include `cartedge.conf` (once) and rewrites
/// `cartedge.conf` with this instance's settings.
fn write_pg_conf(
    data_dir: &Path,
    port: u16,
    opts: &PgOptions,
    run_as: Option<&RunAs>,
) -> Result<()> {
    let main_conf = data_dir.join("postgresql.conf");
    let text = fs::read_to_string(&main_conf)
        .with_context(|| format!("reading {}", main_conf.display()))?;
    if !text.lines().any(|line| line.trim() == PG_INCLUDE_LINE) {
        let mut file = OpenOptions::new()
            .append(true)
            .open(&main_conf)
            .with_context(|| format!("opening {}", main_conf.display()))?;
        write!(
            file,
            "\n# Added by cartedge: its settings live in {PG_CONF_FILE} (rewritten on every start).\n{PG_INCLUDE_LINE}\n"
        )
        .with_context(|| format!("writing {}", main_conf.display()))?;
    }

    let socket_dir = pg_socket_dir(data_dir, run_as);
    let on_off = |b: bool| if b { "on" } else { "off" };
    let mut conf = String::from(
        "# Written by cartedge on every server start; edits are overwritten.\n\
         # Put extra settings in PgOptions::extra_conf instead.\n",
    );
    let settings = [
        ("listen_addresses", conf_quote("127.0.0.1")),
        ("port", port.to_string()),
        (
            "unix_socket_directories",
            conf_quote(&socket_dir.to_string_lossy()),
        ),
        ("max_connections", "200".into()),
        ("shared_buffers", "32MB".into()),
        ("fsync", on_off(opts.fsync).into()),
        ("synchronous_commit", on_off(opts.fsync).into()),
        ("wal_level", "replica".into()),
        ("max_wal_senders", "10".into()),
        ("hot_standby", "on".into()),
        ("logging_collector", "off".into()),
        ("log_destination", conf_quote("stderr")),
    ];
    for (key, value) in settings {
        conf.push_str(&format!("{key} = {value}\n"));
    }
    if !opts.extra_conf.is_empty() {
        conf.push_str("# PgOptions::extra_conf\n");
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
    }
    let path = data_dir.join(PG_CONF_FILE);
    fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    if let Some(user) = run_as {
        chown_to(&path, user)?;
    }
    Ok(())
}

/// Writes the config, spawns `postgres -D data_dir` with output appended to
/// the log, and waits until it is ready.
fn start_postgres(
    bin_dir: &Path,
    data_dir: &Path,
    run_as: Option<&RunAs>,
    port: u16,
    opts: &PgOptions,
    log_path: &Path,
) -> Result<ServerProc> {
    write_pg_conf(data_dir, port, opts, run_as)?;
    let offset = file_len(log_path);
    let log = open_log(log_path)?;
    let mut cmd = Command::new(bin_dir.join("postgres"));
    cmd.arg("-D")
        .arg(data_dir)
        .stdout(log.try_clone()?)
        .stderr(log);
    pg_command_env(&mut cmd, data_dir, run_as);
    let mut proc = ServerProc::spawn(cmd, opts.lifetime, libc::SIGINT, PG_STOP_TIMEOUT)
        .context("starting postgres")?;

    let deadline = Instant::now() + PG_READY_TIMEOUT;
    loop {
        if proc.exited() {
            bail!(
                "postgres (pid {}, port {port}) exited during startup; {}:\n{}",
                proc.pid,
                log_path.display(),
                log_since(log_path, offset)
            );
        }
        if pg_isready(bin_dir, port) {
            return Ok(proc);
        }
        if Instant::now() >= deadline {
            proc.stop();
            bail!(
                "postgres (port {port}) not ready after {PG_READY_TIMEOUT:?}; {}:\n{}",
                log_path.display(),
                log_since(log_path, offset)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a local server on `port` accepts connections (`pg_isready`).
pub(crate) fn pg_ready(port: u16) -> bool {
    pg_bin_dir().is_ok_and(|bin| pg_isready(&bin, port))
}

/// `pg_isready -h 127.0.0.1 -p port`: true when the server accepts
/// connections (a hot standby counts once consistent).
fn pg_isready(bin_dir: &Path, port: u16) -> bool {
    Command::new(bin_dir.join("pg_isready"))
        .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-t", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// Quotes a postgresql.conf string value.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Quotes a libpq keyword value if it needs it.
fn libpq_quote(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

// ---------------------------------------------------------------------------
// Redis helpers
// ---------------------------------------------------------------------------

pub(crate) fn redis_server_bin() -> Option<PathBuf> {
    server_bin(REDIS_SERVER_DEFAULT, "redis-server")
}

/// A server binary: its Debian path, else `name` on PATH.
pub(crate) fn server_bin(default: &str, name: &str) -> Option<PathBuf> {
    let default = Path::new(default);
    if is_executable(default) {
        return Some(default.to_path_buf());
    }
    find_in_path(name)
}

/// Waits until a just-spawned server answers `ready`, bounded by `timeout`. If it exits first,
/// or the time runs out (it is then stopped), the error quotes its log since `offset`; an exit
/// whose log says the port was taken says `(Address already in use)`, which
/// `start_with_port_retry` looks for.
pub(crate) fn wait_ready(
    mut proc: ServerProc,
    name: &str,
    port: u16,
    log_path: &Path,
    offset: u64,
    timeout: Duration,
    ready: impl Fn() -> bool,
) -> Result<ServerProc> {
    let deadline = Instant::now() + timeout;
    loop {
        if proc.exited() {
            let tail = log_since(log_path, offset);
            let taken = if tail.contains("address already in use") {
                " (Address already in use)"
            } else {
                ""
            };
            bail!(
                "{name} (pid {}, port {port}) exited during startup{taken}; {}:\n{tail}",
                proc.pid,
                log_path.display(),
            );
        }
        if ready() {
            return Ok(proc);
        }
        if Instant::now() >= deadline {
            proc.stop();
            bail!(
                "{name} (port {port}) was not ready within {timeout:?}; {}:\n{}",
                log_path.display(),
                log_since(log_path, offset)
            );
        }
        thread::sleep(POLL);
    }
}

/// Spawns redis-server with output appended to the log and waits for PONG.
fn start_redis(
    bin: &Path,
    dir: &Path,
    port: u16,
    lifetime: Lifetime,
    log_path: &Path,
) -> Result<ServerProc> {
    let offset = file_len(log_path);
    let log = open_log(log_path)?;
    let mut cmd = Command::new(bin);
    cmd.args(["--save", "", "--appendonly", "no"])
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--dir")
        .arg(dir)
        .args(["--daemonize", "no", "--protected-mode", "no"])
        .current_dir(dir)
        .stdout(log.try_clone()?)
        .stderr(log);
    let proc = ServerProc::spawn(cmd, lifetime, libc::SIGTERM, REDIS_STOP_TIMEOUT)
        .context("starting redis-server")?;
    wait_ready(
        proc,
        "redis-server",
        port,
        log_path,
        offset,
        REDIS_READY_TIMEOUT,
        || redis_ping(port),
    )
}

/// Sends an inline `PING` and expects `+PONG`.
pub(crate) fn redis_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(1));
    if stream.set_read_timeout(timeout).is_err()
        || stream.set_write_timeout(timeout).is_err()
        || stream.write_all(b"PING\r\n").is_err()
    {
        return false;
    }
    let mut buf = [0_u8; 64];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                len += n;
                if buf[..len].contains(&b'\n') {
                    break;
                }
            }
        }
    }
    buf[..len].starts_with(b"+PONG")
}

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

/// Makes sure the Prometheus server binary exists: when it is missing and we
/// run as root, installs the Debian package `prometheus` (which also brings
/// `promtool`); otherwise says what to install.
pub fn ensure_prometheus() -> Result<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    if prometheus_bin().is_some() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the Prometheus server is missing; install it with `sudo apt-get install -y \
             prometheus` (automatic installation only happens when running as root)"
        );
    }
    tracing::info!("installing prometheus with apt-get");
    run_apt(&["update"])?;
    run_apt(&["install", "-y", "--no-install-recommends", "prometheus"])?;
    if prometheus_bin().is_none() {
        bail!("apt-get install prometheus succeeded but {PROMETHEUS_DEFAULT} is still missing");
    }
    Ok(())
}

/// A running (or stopped) local Prometheus server on 127.0.0.1, with the
/// configuration file the caller wrote and its data in `data_dir`.
///
/// Its output goes to `<data_dir>/../prometheus.log`.
#[derive(Debug)]
pub struct PrometheusInstance {
    /// TCP port of its HTTP API and UI on 127.0.0.1.
    pub port: u16,
    log_path: PathBuf,
    proc: ServerProc,
}

impl PrometheusInstance {
    /// Starts `prometheus` with `config` (its rule files are resolved relative
    /// to the configuration file), storage in `data_dir` (created if missing),
    /// listening on `port` (or a free one), and waits (bounded) until it answers
    /// `/-/ready`.
    pub fn start(
        config: &Path,
        data_dir: &Path,
        port: Option<u16>,
        lifetime: Lifetime,
    ) -> Result<PrometheusInstance> {
        let bin = prometheus_bin().ok_or_else(|| {
            anyhow!(
                "prometheus not found ({PROMETHEUS_DEFAULT} or PATH); call ensure_prometheus() \
                 as root or `apt-get install prometheus`"
            )
        })?;
        let config = absolute(config)?;
        let data_dir = absolute(data_dir)?;
        create_dirs_0755(&data_dir)?;
        let log_path = data_dir
            .parent()
            .unwrap_or(&data_dir)
            .join("prometheus.log");
        let (port, proc) = start_with_port_retry(port, |port| {
            start_prometheus(&bin, &config, &data_dir, port, lifetime, &log_path)
        })?;
        tracing::info!(port, pid = proc.pid, "prometheus started");
        Ok(PrometheusInstance {
            port,
            log_path,
            proc,
        })
    }

    /// Pid of the prometheus process; what `local up --detach` records to stop
    /// it later.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Base URL of its HTTP API: `http://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Path of the server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Idempotent; reaps the child.
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

impl Drop for PrometheusInstance {
    /// Same rule as [`PgInstance`]: stop TiedToParent, leave Detached running.
    fn drop(&mut self) {
        if self.proc.lifetime == Lifetime::TiedToParent {
            self.stop();
        }
    }
}

fn prometheus_bin() -> Option<PathBuf> {
    server_bin(PROMETHEUS_DEFAULT, "prometheus")
}

/// Spawns prometheus with output appended to the log and waits for `/-/ready`.
fn start_prometheus(
    bin: &Path,
    config: &Path,
    data_dir: &Path,
    port: u16,
    lifetime: Lifetime,
    log_path: &Path,
) -> Result<ServerProc> {
    let offset = file_len(log_path);
    let log = open_log(log_path)?;
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data_dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .current_dir(data_dir)
        .stdout(log.try_clone()?)
        .stderr(log);
    let proc = ServerProc::spawn(cmd, lifetime, libc::SIGTERM, PROMETHEUS_STOP_TIMEOUT)
        .context("starting prometheus")?;
    wait_ready(
        proc,
        "prometheus",
        port,
        log_path,
        offset,
        PROMETHEUS_READY_TIMEOUT,
        || http_get_ok(port, "/-/ready"),
    )
}

/// Sends `GET path` over HTTP/1.1 to 127.0.0.1:`port` and expects a 200.
fn http_get_ok(port: u16, path: &str) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(1));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if stream.set_read_timeout(timeout).is_err()
        || stream.set_write_timeout(timeout).is_err()
        || stream.write_all(request.as_bytes()).is_err()
    {
        return false;
    }
    let mut head = [0_u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|meta| meta.is_file() && meta.mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// "15" -> [15], "9.6" -> [9, 6]; `None` for anything else.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// Creates `dir` and missing ancestors with mode 0755 regardless of umask,
/// so a server running as another user can traverse what we created.
pub(crate) fn create_dirs_0755(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut current = Some(dir);
    while let Some(d) = current {
        if d.exists() {
            break;
        }
        missing.push(d);
        current = d.parent();
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod 0755 {}", d.display()))?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err).with_context(|| format!("creating {}", d.display())),
        }
    }
    Ok(())
}

pub(crate) fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))
}

pub(crate) fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|meta| meta.len()).unwrap_or(0)
}

/// What was appended to the log after `offset`, at most the last
/// [`LOG_TAIL_BYTES`].
pub(crate) fn log_since(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return "<log unreadable>".into();
    };
    let len = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    let offset = if offset > len { 0 } else { offset };
    let start = offset.max(len.saturating_sub(LOG_TAIL_BYTES));
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut buf).is_err() {
        return "<log unreadable>".into();
    }
    let text = String::from_utf8_lossy(&buf);
    if start > offset {
        format!("[...]{text}")
    } else {
        text.into_owned()
    }
}

/// Runs a short-lived tool with output appended to `log_path`; on failure the
/// error quotes what it wrote.
pub(crate) fn run_logged(mut cmd: Command, log_path: &Path, what: &str) -> Result<()> {
    let offset = file_len(log_path);
    let log = open_log(log_path)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = cmd
        .status()
        .with_context(|| format!("running {what} ({})", cmd.get_program().to_string_lossy()))?;
    if !status.success() {
        bail!(
            "{what} failed ({status}); {}:\n{}",
            log_path.display(),
            log_since(log_path, offset)
        );
    }
    Ok(())
}

fn missing_packages() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if pg_bin_dir().is_err() {
        missing.push("postgresql");
    }
    if redis_server_bin().is_none() {
        missing.push("redis-server");
    }
    if crate::redis_ha::sentinel_bin().is_none() {
        missing.push("redis-sentinel");
    }
    missing
}

pub(crate) fn run_apt(args: &[&str]) -> Result<()> {
    let out = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("running apt-get")?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let tail_start = text.len().saturating_sub(LOG_TAIL_BYTES as usize);
        let tail_start = (tail_start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        bail!(
            "`apt-get {}` failed ({}):\n{}",
            args.join(" "),
            out.status,
            &text[tail_start..]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port_closed(port: u16) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
    }

    fn pg_ready(port: u16) -> bool {
        pg_isready(&pg_bin_dir().expect("pg bin dir"), port)
    }

    /// Existence check that does not reap (the pid belongs to a held Child).
    fn exists(pid: u32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    #[test]
    fn postgres_and_redis_start_answer_restart_and_stop() {
        ensure_packages().expect("server packages available");
        let tmp = tempfile::tempdir().expect("tempdir");

        let mut pg = PgInstance::start(&tmp.path().join("pg"), PgOptions::default())
            .expect("start postgres");
        let mut redis =
            RedisInstance::start(&tmp.path().join("redis"), None, Lifetime::TiedToParent)
                .expect("start redis");

        assert!(pg_ready(pg.port), "pg_isready on {}", pg.port);
        assert!(redis_ping(redis.port), "PING on {}", redis.port);
        assert!(exists(pg.pid()) && exists(redis.pid()));
        assert_eq!(
            pg.dsn("cart"),
            format!("host=127.0.0.1 port={} user=postgres dbname=cart", pg.port)
        );
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port));
        assert!(pg.log_path().exists());

        // Restart keeps the port and the data directory.
        let (pg_port, old_pid) = (pg.port, pg.pid());
        pg.restart().expect("restart postgres");
        assert_eq!(pg.port, pg_port);
        assert_ne!(pg.pid(), old_pid);
        assert!(pg_ready(pg.port));
        redis.restart().expect("restart redis");
        assert!(redis_ping(redis.port));

        pg.stop();
        redis.stop();
        assert!(port_closed(pg.port), "postgres port still open");
        assert!(port_closed(redis.port), "redis port still open");
        assert!(!exists(pg.pid()) && !exists(redis.pid()));
        // Idempotent.
        pg.stop();
        redis.stop();
    }

    #[test]
    fn replica_answers_pg_isready() {
        ensure_packages().expect("server packages available");
        let tmp = tempfile::tempdir().expect("tempdir");
        let primary = PgInstance::start(&tmp.path().join("primary"), PgOptions::default())
            .expect("start primary");
        let replica =
            PgInstance::start_replica(&primary, &tmp.path().join("replica"), PgOptions::default())
                .expect("start replica");

        assert_ne!(replica.port, primary.port);
        assert!(replica.data_dir.join("standby.signal").exists());
        assert!(
            pg_ready(replica.port),
            "pg_isready on replica {}",
            replica.port
        );
        assert!(pg_ready(primary.port));
    }

    #[test]
    fn detached_redis_outlives_handle_and_stops_by_pid() {
        ensure_packages().expect("server packages available");
        let tmp = tempfile::tempdir().expect("tempdir");
        let redis = RedisInstance::start(&tmp.path().join("redis"), None, Lifetime::Detached)
            .expect("start detached redis");
        let (pid, port) = (redis.pid(), redis.port);
        drop(redis);

        let alive_after_drop = redis_ping(port);
        stop_pid(pid, libc::SIGTERM, Duration::from_secs(10)).expect("stop_pid");
        assert!(alive_after_drop, "detached redis died with its handle");
        assert!(port_closed(port));
        stop_pid(pid, libc::SIGTERM, Duration::from_secs(1)).expect("stop_pid when gone");
    }

    #[test]
    fn stop_pid_refuses_dangerous_pids() {
        assert!(stop_pid(0, libc::SIGTERM, Duration::from_secs(1)).is_err());
        assert!(stop_pid(1, libc::SIGTERM, Duration::from_secs(1)).is_err());
    }
}
