//! Redis high availability on one machine: a replica of a running Redis master and the
//! `redis-sentinel` processes that watch it, on `127.0.0.1` ports, for the integration tests and
//! `cartedge local up --ha`.
//!
//! It owns those processes (configuration, start, readiness, stop, on the same footing as
//! [`crate::procs::RedisInstance`]: output to a log file in the instance's directory, an
//! auto-chosen port retried when taken, [`Lifetime`] deciding whether they die with us) and the
//! few questions a harness asks them: who the master is (`SENTINEL get-master-addr-by-name`),
//! whether the sentinels see each other and the replica, whether a replica is in sync. It
//! speaks just enough RESP for those questions and holds no Redis client; it never decides a
//! failover (Sentinel does).
//!
//! Sentinel rewrites its configuration file while it runs, so every sentinel needs a directory
//! of its own; its file is written afresh on every start.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::procs::{
    absolute, create_dirs_0755, file_len, open_log, redis_ping, redis_server_bin, server_bin,
    start_with_port_retry, wait_ready, Lifetime, ServerProc, POLL, REDIS_READY_TIMEOUT,
    REDIS_STOP_TIMEOUT,
};

/// Where Debian's `redis-sentinel` package puts the binary.
const REDIS_SENTINEL_DEFAULT: &str = "/usr/bin/redis-sentinel";

/// How long a sentinel waits without an answer before it calls an instance subjectively down.
/// Short, so a local failover takes a few seconds (production keeps Sentinel's 30 s default or
/// a few seconds at most, depending on how flaky its network is).
const DOWN_AFTER_MS: u64 = 1000;

/// Sentinel's failover timeout: also the least time between two failovers of one master.
const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// Bound on one RESP exchange with a local server.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// The `redis-sentinel` binary: its Debian path, else `redis-sentinel` on PATH.
pub(crate) fn sentinel_bin() -> Option<PathBuf> {
    server_bin(REDIS_SENTINEL_DEFAULT, "redis-sentinel")
}

/// A Redis replica of a master on 127.0.0.1, persistence disabled, loopback only.
///
/// Its output goes to `<dir>/redis.log`.
#[derive(Debug)]
pub struct RedisReplica {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Absolute path of the working directory.
    pub dir: PathBuf,
    log_path: PathBuf,
    proc: ServerProc,
}

impl RedisReplica {
    /// Starts `redis-server --replicaof 127.0.0.1 <master_port>` in `dir` (created if missing)
    /// on `port` (or a free one) and waits (bounded 10 s) until it answers `PING`. Whether it
    /// has synced is [`RedisReplica::wait_synced`]'s. The master is told to sync replicas at
    /// once (`CONFIG SET repl-diskless-sync-delay 0`; the replica starts with the same
    /// setting, for when it is promoted).
    pub fn start(
        dir: &Path,
        port: Option<u16>,
        master_port: u16,
        lifetime: Lifetime,
    ) -> Result<RedisReplica> {
        let bin = redis_server_bin().ok_or_else(|| {
            anyhow!(
                "redis-server not found; call procs::ensure_packages() as root or \
                 `apt-get install redis-server`"
            )
        })?;
        // A master syncs a new replica only after `repl-diskless-sync-delay` (5 s by default),
        // waiting for more replicas to share the transfer; one local replica need not wait.
        if let Err(error) = command(
            master_port,
            &["CONFIG", "SET", "repl-diskless-sync-delay", "0"],
        ) {
            tracing::warn!(
                master_port,
                "could not shorten the master's sync delay: {error:#}"
            );
        }
        let dir = absolute(dir)?;
        create_dirs_0755(&dir)?;
        let log_path = dir.join("redis.log");
        let (port, proc) = start_with_port_retry(port, |port| {
            let offset = file_len(&log_path);
            let log = open_log(&log_path)?;
            let mut cmd = Command::new(&bin);
            cmd.args(["--save", "", "--appendonly", "no"])
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--replicaof", "127.0.0.1", &master_port.to_string()])
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--dir")
                .arg(&dir)
                .args(["--daemonize", "no", "--protected-mode", "no"])
                .current_dir(&dir)
                .stdout(log.try_clone()?)
                .stderr(log);
            let proc = ServerProc::spawn(cmd, lifetime, libc::SIGTERM, REDIS_STOP_TIMEOUT)
                .context("starting redis-server as a replica")?;
            wait_ready(
                proc,
                "redis-server (replica)",
                port,
                &log_path,
                offset,
                REDIS_READY_TIMEOUT,
                || redis_ping(port),
            )
        })?;
        tracing::info!(port, master_port, pid = proc.pid, dir = %dir.display(), "redis replica started");
        Ok(RedisReplica {
            port,
            dir,
            log_path,
            proc,
        })
    }

    /// Pid of the redis-server process (the last one started, even after `stop`).
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

    /// Waits (bounded by `timeout`) until the replica's link to its master is up
    /// (`master_link_status:up`): before that, Sentinel would not promote it.
    pub fn wait_synced(&self, timeout: Duration) -> Result<()> {
        let port = self.port;
        poll_until(timeout, "the replica's link to its master to be up", || {
            Ok(replication_info(port)?
                .get("master_link_status")
                .is_some_and(|status| status == "up"))
        })
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Idempotent; reaps the child.
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

impl Drop for RedisReplica {
    /// Stops a TiedToParent replica; leaves a Detached one running.
    fn drop(&mut self) {
        if self.proc.lifetime == Lifetime::TiedToParent {
            self.stop();
        }
    }
}

/// One `redis-sentinel` process watching one master.
///
/// Its configuration is `<dir>/sentinel.conf` (Sentinel rewrites it as it learns the other
/// sentinels, the replicas and failovers), its output `<dir>/sentinel.log`.
#[derive(Debug)]
pub struct SentinelInstance {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Absolute path of the working directory (this sentinel's alone).
    pub dir: PathBuf,
    /// The monitored master's name.
    pub master_name: String,
    log_path: PathBuf,
    proc: ServerProc,
}

impl SentinelInstance {
    /// Starts a sentinel on a free port; see [`SentinelInstance::start_on`].
    pub fn start(
        dir: &Path,
        master_name: &str,
        master_port: u16,
        quorum: u32,
        lifetime: Lifetime,
    ) -> Result<SentinelInstance> {
        SentinelInstance::start_on(dir, None, master_name, master_port, quorum, lifetime)
    }

    /// Starts `redis-sentinel` in `dir` (created if missing) on `port` (or a free one),
    /// monitoring `127.0.0.1:<master_port>` as `master_name` with `quorum`, down after 1 s,
    /// failover timeout 3 s, one replica resynced at a time; waits (bounded 10 s) until it
    /// answers `PING`. Whether it sees the other sentinels yet is
    /// [`SentinelInstance::wait_monitoring`]'s.
    pub fn start_on(
        dir: &Path,
        port: Option<u16>,
        master_name: &str,
        master_port: u16,
        quorum: u32,
        lifetime: Lifetime,
    ) -> Result<SentinelInstance> {
        if master_name.is_empty()
            || !master_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bail!("sentinel master name {master_name:?} must be letters, digits, '-', '_' or '.'");
        }
        if quorum == 0 {
            bail!("sentinel quorum must be at least 1");
        }
        let bin = sentinel_bin().ok_or_else(|| {
            anyhow!(
                "redis-sentinel not found ({REDIS_SENTINEL_DEFAULT} or PATH); call \
                 procs::ensure_packages() as root or `apt-get install redis-sentinel`"
            )
        })?;
        let dir = absolute(dir)?;
        create_dirs_0755(&dir)?;
        let log_path = dir.join("sentinel.log");
        let conf_path = dir.join("sentinel.conf");
        let (port, proc) = start_with_port_retry(port, |port| {
            std::fs::write(
                &conf_path,
                sentinel_conf(&dir, port, master_name, master_port, quorum),
            )
            .with_context(|| format!("writing {}", conf_path.display()))?;
            let offset = file_len(&log_path);
            let log = open_log(&log_path)?;
            let mut cmd = Command::new(&bin);
            cmd.arg(&conf_path)
                .current_dir(&dir)
                .stdout(log.try_clone()?)
                .stderr(log);
            let proc = ServerProc::spawn(cmd, lifetime, libc::SIGTERM, REDIS_STOP_TIMEOUT)
                .context("starting redis-sentinel")?;
            wait_ready(
                proc,
                "redis-sentinel",
                port,
                &log_path,
                offset,
                REDIS_READY_TIMEOUT,
                || redis_ping(port),
            )
        })?;
        tracing::info!(port, master_name, master_port, pid = proc.pid, dir = %dir.display(), "redis sentinel started");
        Ok(SentinelInstance {
            port,
            dir,
            master_name: master_name.to_string(),
            log_path,
            proc,
        })
    }

    /// Pid of the redis-sentinel process (the last one started, even after `stop`).
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// The sentinel's URL, as `redis.sentinels` lists it: `redis://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Path of the sentinel's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The master this sentinel names now (`SENTINEL get-master-addr-by-name`).
    pub fn master_addr(&self) -> Result<Option<SocketAddr>> {
        master_addr_by_name(self.port, &self.master_name)
    }

    /// Waits (bounded by `timeout`) until this sentinel knows at least `replicas` replicas and
    /// `other_sentinels` other sentinels of its master: a failover needs both (the quorum is
    /// counted among the sentinels that found each other, the new master among the replicas).
    pub fn wait_monitoring(
        &self,
        replicas: usize,
        other_sentinels: usize,
        timeout: Duration,
    ) -> Result<()> {
        let (port, name) = (self.port, self.master_name.as_str());
        let what = format!(
            "sentinel :{port} to see {replicas} replica(s) and {other_sentinels} other sentinel(s)"
        );
        poll_until(timeout, &what, || {
            let reply = command(port, &["SENTINEL", "MASTER", name])?;
            let fields = reply.pairs();
            let count = |key: &str| {
                fields
                    .get(key)
                    .and_then(|value| value.parse::<usize>().ok())
                    .unwrap_or(0)
            };
            Ok(count("num-slaves") >= replicas && count("num-other-sentinels") >= other_sentinels)
        })
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Idempotent; reaps the child.
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

impl Drop for SentinelInstance {
    /// Stops a TiedToParent sentinel; leaves a Detached one running.
    fn drop(&mut self) {
        if self.proc.lifetime == Lifetime::TiedToParent {
            self.stop();
        }
    }
}

/// The configuration a sentinel starts from (it appends what it learns).
fn sentinel_conf(
    dir: &Path,
    port: u16,
    master_name: &str,
    master_port: u16,
    quorum: u32,
) -> String {
    format!(
        "# Written by cartedge-dev on every start; redis-sentinel rewrites it while it runs.\n\
         port {port}\n\
         bind 127.0.0.1\n\
         protected-mode no\n\
         daemonize no\n\
         logfile \"\"\n\
         dir \"{dir}\"\n\
         sentinel resolve-hostnames no\n\
         sentinel announce-hostnames no\n\
         sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n\
         sentinel down-after-milliseconds {master_name} {DOWN_AFTER_MS}\n\
         sentinel failover-timeout {master_name} {FAILOVER_TIMEOUT_MS}\n\
         sentinel parallel-syncs {master_name} 1\n",
        dir = dir.display(),
    )
}

/// The master the sentinel on `sentinel_port` names for `master_name`
/// (`SENTINEL get-master-addr-by-name`); None when it monitors no such master.
pub fn master_addr_by_name(sentinel_port: u16, master_name: &str) -> Result<Option<SocketAddr>> {
    let reply = command(
        sentinel_port,
        &["SENTINEL", "get-master-addr-by-name", master_name],
    )?;
    let Resp::Array(Some(parts)) = reply else {
        return Ok(None);
    };
    match parts.as_slice() {
        [Resp::Bulk(Some(host)), Resp::Bulk(Some(port))] => {
            let address = format!("{host}:{port}");
            address
                .parse()
                .map(Some)
                .with_context(|| format!("sentinel named master {address:?}"))
        }
        other => bail!("unexpected get-master-addr-by-name reply {other:?}"),
    }
}

/// Waits (bounded by `timeout`) until the sentinel on `sentinel_port` names a master other
/// than `old_master` for `master_name`, and returns it: how a harness sees a failover done.
pub fn wait_for_new_master(
    sentinel_port: u16,
    master_name: &str,
    old_master: SocketAddr,
    timeout: Duration,
) -> Result<SocketAddr> {
    let mut found = None;
    poll_until(timeout, "the sentinels to promote a new master", || {
        found = master_addr_by_name(sentinel_port, master_name)?.filter(|a| *a != old_master);
        Ok(found.is_some())
    })?;
    found.ok_or_else(|| anyhow!("no new master"))
}

/// `role` from `INFO replication` of the server on `port` (`master` or `slave`).
pub fn redis_role(port: u16) -> Result<String> {
    replication_info(port)?
        .remove("role")
        .ok_or_else(|| anyhow!("INFO replication of :{port} names no role"))
}

fn replication_info(port: u16) -> Result<HashMap<String, String>> {
    let Resp::Bulk(Some(text)) = command(port, &["INFO", "replication"])? else {
        bail!("INFO replication of :{port} did not answer a bulk string");
    };
    Ok(text
        .lines()
        .filter_map(|line| line.trim_end().split_once(':'))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect())
}

/// Calls `check` every [`POLL`] until it says yes, an error being a no (the server may be
/// starting); fails with the last error after `timeout`.
fn poll_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(error) => Some(error),
        };
        if Instant::now() >= deadline {
            return Err(match last_error {
                Some(error) => error.context(format!("waiting {timeout:?} for {what}")),
                None => anyhow!("waited {timeout:?} for {what}"),
            });
        }
        thread::sleep(POLL);
    }
}

/// One RESP2 reply.
#[derive(Debug, PartialEq)]
enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// A flat array of field/value bulk strings as a map (what `SENTINEL MASTER` answers).
    fn pairs(&self) -> HashMap<String, String> {
        let Resp::Array(Some(items)) = self else {
            return HashMap::new();
        };
        items
            .chunks(2)
            .filter_map(|pair| match pair {
                [Resp::Bulk(Some(key)), Resp::Bulk(Some(value))] => {
                    Some((key.clone(), value.clone()))
                }
                _ => None,
            })
            .collect()
    }
}

/// Sends one command to the server on 127.0.0.1:`port` and reads its reply; an error reply is
/// an error.
fn command(port: u16, args: &[&str]) -> Result<Resp> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, COMMAND_TIMEOUT)
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    match read_reply(&mut reader, 0)? {
        Resp::Error(message) => bail!("127.0.0.1:{port} answered {args:?} with {message}"),
        reply => Ok(reply),
    }
}

/// Replies nest at most this deep here (`SENTINEL MASTER` is one flat array).
const MAX_REPLY_DEPTH: usize = 4;

fn read_reply(reader: &mut impl BufRead, depth: usize) -> Result<Resp> {
    if depth > MAX_REPLY_DEPTH {
        bail!("reply nested deeper than {MAX_REPLY_DEPTH}");
    }
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("connection closed before a reply");
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    let length = || -> Result<i64> { rest.parse().with_context(|| format!("bad length {rest:?}")) };
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Integer(length()?),
        "$" => match usize::try_from(length()?) {
            Err(_) => Resp::Bulk(None),
            Ok(len) => {
                let mut body = vec![0_u8; len + 2];
                reader.read_exact(&mut body)?;
                body.truncate(len);
                Resp::Bulk(Some(String::from_utf8_lossy(&body).into_owned()))
            }
        },
        "*" => match usize::try_from(length()?) {
            Err(_) => Resp::Array(None),
            Ok(count) => {
                let items = (0..count)
                    .map(|_| read_reply(reader, depth + 1))
                    .collect::<Result<Vec<_>>>()?;
                Resp::Array(Some(items))
            }
        },
        other => bail!("unexpected reply type {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Resp {
        read_reply(&mut BufReader::new(bytes), 0).unwrap()
    }

    #[test]
    fn replies_parse_into_their_resp_types() {
        assert_eq!(parse(b"+PONG\r\n"), Resp::Simple("PONG".into()));
        assert_eq!(parse(b"$-1\r\n"), Resp::Bulk(None));
        assert_eq!(parse(b"*-1\r\n"), Resp::Array(None));
        assert_eq!(
            parse(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n"),
            Resp::Array(Some(vec![
                Resp::Bulk(Some("127.0.0.1".into())),
                Resp::Bulk(Some("6380".into()))
            ]))
        );
        let pairs =
            parse(b"*4\r\n$4\r\nname\r\n$2\r\nsg\r\n$10\r\nnum-slaves\r\n$1\r\n1\r\n").pairs();
        assert_eq!(pairs["num-slaves"], "1");
        assert!(read_reply(
            &mut BufReader::new(&b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"[..]),
            0
        )
        .is_err());
    }

    #[test]
    fn a_sentinel_follows_its_master_to_the_replica_after_the_master_is_killed() {
        crate::procs::ensure_packages().unwrap();
        let root = tempfile::tempdir().unwrap();
        let master = crate::procs::RedisInstance::start(
            &root.path().join("master"),
            None,
            Lifetime::TiedToParent,
        )
        .unwrap();
        let replica = RedisReplica::start(
            &root.path().join("replica"),
            None,
            master.port,
            Lifetime::TiedToParent,
        )
        .unwrap();
        replica.wait_synced(Duration::from_secs(10)).unwrap();
        assert_eq!(redis_role(replica.port).unwrap(), "slave");
        let sentinel = SentinelInstance::start(
            &root.path().join("sentinel"),
            "ha",
            master.port,
            1,
            Lifetime::TiedToParent,
        )
        .unwrap();
        let old_master = SocketAddr::from((Ipv4Addr::LOCALHOST, master.port));
        assert_eq!(sentinel.master_addr().unwrap(), Some(old_master));
        sentinel
            .wait_monitoring(1, 0, Duration::from_secs(15))
            .unwrap();
        assert_eq!(master_addr_by_name(sentinel.port, "other").unwrap(), None);

        let mut master = master;
        master.stop();
        let promoted =
            wait_for_new_master(sentinel.port, "ha", old_master, Duration::from_secs(20)).unwrap();
        assert_eq!(promoted.port(), replica.port);
        assert_eq!(redis_role(replica.port).unwrap(), "master");
    }
}
