//! The userspace link proxy that emulates the network between the regions of a local,
//! single-machine cluster (the kernel here has no `netem`, so latency and partitions have to be
//! made in userspace).
//!
//! What it owns: one loopback listener per [`LinkSpec`], the TCP connections accepted on it and
//! the matching connections to the link's target, plus the per-link knobs (one-way delay,
//! partition state) that [`LinkProxy::partition`], [`LinkProxy::heal`] and
//! [`LinkProxy::set_delay`] turn at runtime. [`serve_control`] / [`control_request`] expose those
//! knobs over a tiny HTTP/1.1 API so a separate CLI process can steer a running proxy.
//!
//! What it must not do: look at or change the bytes it carries (PostgreSQL replication and
//! TLS-wrapped HTTP/2 go through it, so it is strictly byte-transparent and order-preserving),
//! buffer without bound (every direction of every connection has a fixed byte and chunk budget,
//! beyond which it stops reading and lets TCP push back), or listen on / connect to anything
//! but loopback addresses. It is developer tooling: the edge itself never uses it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest single read forwarded as one chunk: big enough to move bulk data (base backups,
/// large responses) efficiently, small enough that one chunk never hogs a direction's budget.
const CHUNK: usize = 16 * 1024;
/// Bytes one direction of one connection may hold in flight (read but not yet written). This is
/// the emulated link's "bandwidth-delay product": beyond it the proxy stops reading, so the
/// sender sees ordinary TCP backpressure instead of the proxy growing without bound.
const BUDGET: usize = 4 * 1024 * 1024;
/// Chunks one direction may hold in flight. Bounds per-chunk overhead when a peer sends many tiny
/// writes; 1024 chunks per delay window is ample for replication and HTTP/2 chatter.
const SLOTS: usize = 1024;
/// Longest accepted one-way delay (one hour); caps user input so deadline arithmetic can never
/// overflow, and nothing sensible needs more.
pub const MAX_DELAY_MS: u64 = 60 * 60 * 1000;
/// How long connecting to a link's target may take before the client is reset; loopback
/// connects are instant unless the target's accept backlog is stuck.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`LinkProxy::shutdown`] waits for its tasks before aborting them, so shutdown is
/// always bounded.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Upper bound of one [`control_request`], so a wedged proxy cannot hang the CLI.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`serve_control`] lets in-flight control requests finish after its shutdown signal.
const CONTROL_GRACE: Duration = Duration::from_secs(2);

/// One emulated network link: a loopback listener whose connections are forwarded to `target`,
/// with the latency of the path between region `a` (the client's) and region `b` (the target's).
/// Serializable so a launcher can write the topology to disk and a CLI can list it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkSpec {
    /// Unique name, e.g. `"th->sg:edge"`; identifies the link in [`LinkProxy::addr`].
    pub name: String,
    /// Region on the listening side (where the clients of this link live).
    pub a: String,
    /// Region of the target.
    pub b: String,
    /// Where to listen; must be a loopback address. Port 0 lets the OS pick (see
    /// [`LinkProxy::addr`] for the resolved address).
    pub listen: SocketAddr,
    /// Where to forward to; must be a loopback address.
    pub target: SocketAddr,
    /// One-way delay added to each direction, in milliseconds (a round trip costs twice this).
    pub delay_ms: u64,
}

/// How a partitioned link misbehaves; the two modes produce the two failure shapes real
/// inter-region outages show (silent loss vs. fast failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionMode {
    /// Existing and new connections are kept open but nothing is forwarded until heal (bytes
    /// are buffered, bounded, and delivered after heal, like TCP retransmission): clients see
    /// timeouts, which is what a silently dropping network looks like.
    Blackhole,
    /// Existing connections are reset (RST via `SO_LINGER` 0) and new ones are accepted and
    /// reset at once: clients see fast connection errors.
    Reset,
}

/// The knobs of one link that can change at runtime; published through a `watch` channel so
/// every connection of the link reacts immediately without polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Control {
    delay_ms: u64,
    partition: Option<PartitionMode>,
}

/// Runtime state of one link, shared (behind an `Arc`) by the proxy handle, the accept loop and
/// every connection task of the link.
struct Link {
    /// The spec with the resolved listen address (its `delay_ms` is the initial value only).
    spec: LinkSpec,
    /// Current delay and partition state.
    control: watch::Sender<Control>,
}

impl Link {
    /// Whether this link joins regions `x` and `y`, in either order: partitions and delays are
    /// properties of the path between two regions, not of one direction of it.
    fn joins(&self, x: &str, y: &str) -> bool {
        (self.spec.a == x && self.spec.b == y) || (self.spec.a == y && self.spec.b == x)
    }
}

/// A running link proxy: the listeners of every link and their connections. Cheap to share
/// behind an `Arc` (as [`serve_control`] does); dropping it stops everything, like
/// [`LinkProxy::shutdown`] but without waiting.
pub struct LinkProxy {
    /// Every link, in the order given to [`LinkProxy::start`].
    links: Vec<Arc<Link>>,
    /// Set to `true` once to stop every accept loop and connection.
    stop: watch::Sender<bool>,
    /// The accept loops (each one owns and reaps its connection tasks).
    tasks: Vec<JoinHandle<()>>,
}

impl LinkProxy {
    /// Binds every listener (fails if any cannot bind) and starts forwarding.
    ///
    /// All listeners are bound before anything is spawned, so on error nothing is left running.
    /// Rejects non-loopback listen or target addresses and duplicate names with
    /// `InvalidInput`, because the proxy must never expose or reach anything off this machine
    /// and names are how links are addressed.
    pub async fn start(links: Vec<LinkSpec>) -> io::Result<LinkProxy> {
        let mut bound = Vec::with_capacity(links.len());
        let mut names = std::collections::HashSet::new();
        for mut spec in links {
            if !names.insert(spec.name.clone()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("duplicate link name {:?}", spec.name),
                ));
            }
            if !spec.listen.ip().is_loopback() || !spec.target.ip().is_loopback() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "link {}: listen {} and target {} must be loopback addresses",
                        spec.name, spec.listen, spec.target
                    ),
                ));
            }
            let listener = TcpListener::bind(spec.listen).await.map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("link {}: binding {}: {error}", spec.name, spec.listen),
                )
            })?;
            spec.listen = listener.local_addr()?;
            spec.delay_ms = spec.delay_ms.min(MAX_DELAY_MS);
            let (control, _) = watch::channel(Control {
                delay_ms: spec.delay_ms,
                partition: None,
            });
            bound.push((Arc::new(Link { spec, control }), listener));
        }
        let (stop, _) = watch::channel(false);
        let mut proxy = LinkProxy {
            links: Vec::with_capacity(bound.len()),
            stop,
            tasks: Vec::with_capacity(bound.len()),
        };
        for (link, listener) in bound {
            tracing::debug!(link = %link.spec.name, listen = %link.spec.listen, target = %link.spec.target, "link listening");
            let task = tokio::spawn(accept_loop(link.clone(), listener, proxy.stop.subscribe()));
            proxy.links.push(link);
            proxy.tasks.push(task);
        }
        Ok(proxy)
    }

    /// Actual listening address of a link by name (after port 0 resolution), so callers can
    /// point clients at the link instead of the target.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.links
            .iter()
            .find(|link| link.spec.name == name)
            .map(|link| link.spec.listen)
    }

    /// The specs with resolved listen addresses and the *current* delay, so a launcher can
    /// record the topology it actually got.
    pub fn links(&self) -> Vec<LinkSpec> {
        self.links
            .iter()
            .map(|link| LinkSpec {
                delay_ms: link.control.borrow().delay_ms,
                ..link.spec.clone()
            })
            .collect()
    }

    /// Cuts every link between regions x and y (either direction / either order of a,b).
    /// Returns how many links matched, so callers can tell a typo from a no-op.
    pub fn partition(&self, x: &str, y: &str, mode: PartitionMode) -> usize {
        self.update(x, y, |control| control.partition = Some(mode))
    }

    /// Restores every link between regions x and y; data held back by a blackhole is delivered
    /// and new connections are forwarded again. Returns how many links matched.
    pub fn heal(&self, x: &str, y: &str) -> usize {
        self.update(x, y, |control| control.partition = None)
    }

    /// Sets the one-way delay of every link between regions x and y (clamped to
    /// [`MAX_DELAY_MS`]). Applies to bytes read from now on; bytes already in flight keep their
    /// delivery time, and order is always preserved. Returns how many links matched.
    pub fn set_delay(&self, x: &str, y: &str, delay_ms: u64) -> usize {
        let delay_ms = delay_ms.min(MAX_DELAY_MS);
        self.update(x, y, |control| control.delay_ms = delay_ms)
    }

    /// Applies `change` to every link between x and y and wakes their connections.
    fn update(&self, x: &str, y: &str, change: impl Fn(&mut Control)) -> usize {
        let mut matched = 0;
        for link in self.links.iter().filter(|link| link.joins(x, y)) {
            link.control.send_modify(&change);
            matched += 1;
            tracing::debug!(link = %link.spec.name, control = ?*link.control.borrow(), "link updated");
        }
        matched
    }

    /// Current specs plus partition state, for `GET /links`.
    fn status(&self) -> Vec<serde_json::Value> {
        self.links
            .iter()
            .map(|link| {
                let control = *link.control.borrow();
                serde_json::json!({
                    "name": link.spec.name,
                    "a": link.spec.a,
                    "b": link.spec.b,
                    "listen": link.spec.listen,
                    "target": link.spec.target,
                    "delay_ms": control.delay_ms,
                    "partitioned": control.partition,
                })
            })
            .collect()
    }

    /// Stops all listeners and connections, and waits (bounded) until they are gone, so ports
    /// are free again when this returns. Open connections are closed, not reset.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut self.tasks);
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let joined = tokio::time::timeout(SHUTDOWN_GRACE, async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
        if joined.is_err() {
            tracing::debug!("link proxy tasks did not stop in time; aborting them");
            for abort in aborts {
                abort.abort();
            }
        }
    }
}

impl Drop for LinkProxy {
    /// Signals every task to stop, so a proxy dropped without [`LinkProxy::shutdown`] (e.g. the
    /// last `Arc` going away in a test) does not leave listeners behind.
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Resolves once the proxy is stopping (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Resolves once the link is partitioned in [`PartitionMode::Reset`] (at once if it already
/// is), so connections can be torn down the moment the partition starts.
async fn reset_requested(control: &mut watch::Receiver<Control>) {
    let reset = control
        .wait_for(|c| c.partition == Some(PartitionMode::Reset))
        .await
        .is_ok();
    if !reset {
        // The link is gone; only the stop signal can end the connection now.
        std::future::pending::<()>().await;
    }
}

/// Waits until the link is not partitioned: this is where a blackhole holds data back.
async fn until_open(control: &mut watch::Receiver<Control>) -> io::Result<()> {
    control
        .wait_for(|c| c.partition.is_none())
        .await
        .map(|_| ())
        .map_err(|_| io::Error::other("link removed"))
}

/// Closes a socket abortively (RST) so the peer sees a reset, as it would if the path refused
/// or dropped the connection, instead of an orderly EOF.
fn abort(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Accepts connections of one link until stopped, then waits for its connections to end. Owns
/// the connection tasks in a `JoinSet` so finished ones are reaped and none outlive the link.
async fn accept_loop(link: Arc<Link>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    tracing::debug!(link = %link.spec.name, %peer, "connection accepted");
                    connections.spawn(connection(link.clone(), client, stop.clone()));
                }
                Err(error) => {
                    // Typically EMFILE; back off instead of spinning, the listener stays usable.
                    tracing::debug!(link = %link.spec.name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    tracing::debug!(link = %link.spec.name, "link stopped");
}

/// How the forwarding phase of a connection ended, which decides how the sockets are closed.
enum End {
    /// Both directions finished with EOF: close normally.
    Closed,
    /// One side failed: reset both, so the error propagates like a RST would.
    Failed(io::Error),
    /// The link was partitioned with [`PartitionMode::Reset`].
    Reset,
    /// The proxy is stopping.
    Stopped,
}

/// Serves one accepted connection: honours a partition before connecting to the target, then
/// forwards both directions until both are closed, the link resets or the proxy stops.
async fn connection(link: Arc<Link>, client: TcpStream, mut stop: watch::Receiver<bool>) {
    let name = &link.spec.name;
    let mut control = link.control.subscribe();
    // A blackholed link does not even let the connection through to the target (its "SYN" is
    // lost); the client's bytes wait in kernel buffers until heal.
    let state = tokio::select! {
        state = control.wait_for(|c| c.partition != Some(PartitionMode::Blackhole)) => match state {
            Ok(state) => *state,
            Err(_) => return,
        },
        _ = stopped(&mut stop) => return,
    };
    if state.partition == Some(PartitionMode::Reset) {
        tracing::debug!(link = %name, "link is reset-partitioned; resetting new connection");
        abort(client);
        return;
    }
    let upstream = tokio::select! {
        connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(link.spec.target)) => connected,
        _ = reset_requested(&mut control) => {
            abort(client);
            return;
        }
        _ = stopped(&mut stop) => return,
    };
    let mut upstream = match upstream {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            tracing::debug!(link = %name, %error, "connecting to the target failed; resetting client");
            abort(client);
            return;
        }
        Err(_) => {
            tracing::debug!(link = %name, "connecting to the target timed out; resetting client");
            abort(client);
            return;
        }
    };
    let mut client = client;
    // Nagle would add its own delays on top of the emulated ones.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let end = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let (to_upstream, from_client) = mpsc::channel(SLOTS);
        let (to_client, from_upstream) = mpsc::channel(SLOTS);
        let budget_up = Semaphore::new(BUDGET);
        let budget_down = Semaphore::new(BUDGET);
        let (control_up, control_down) = (control.clone(), control.clone());
        let forward = async {
            tokio::try_join!(
                pump_in(client_read, to_upstream, &link, &budget_up),
                pump_out(upstream_write, from_client, control_up, &budget_up),
                pump_in(upstream_read, to_client, &link, &budget_down),
                pump_out(client_write, from_upstream, control_down, &budget_down),
            )
        };
        tokio::select! {
            result = forward => match result {
                Ok(_) => End::Closed,
                Err(error) => End::Failed(error),
            },
            _ = reset_requested(&mut control) => End::Reset,
            _ = stopped(&mut stop) => End::Stopped,
        }
    };
    match end {
        End::Closed | End::Stopped => {
            tracing::debug!(link = %name, "connection closed");
        }
        End::Failed(error) => {
            tracing::debug!(link = %name, %error, "connection failed; resetting both sides");
            abort(client);
            abort(upstream);
        }
        End::Reset => {
            tracing::debug!(link = %name, "link partitioned; resetting connection");
            abort(client);
            abort(upstream);
        }
    }
}

/// Bytes read from one side, with the instant they may be written to the other.
struct Chunk {
    due: Instant,
    data: Bytes,
}

/// Reader half of one direction: reads chunks, stamps each with `arrival + delay` (so delays
/// never accumulate across chunks) and queues them. Takes budget before reading so the bytes
/// in flight stay bounded; returns at EOF, which closes the queue and thereby tells the writer
/// to half-close after the queued data.
async fn pump_in<R: AsyncRead + Unpin>(
    mut reader: R,
    queue: mpsc::Sender<Chunk>,
    link: &Link,
    budget: &Semaphore,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        let permit = budget
            .acquire_many(CHUNK as u32)
            .await
            .map_err(|_| io::Error::other("budget closed"))?;
        buf.reserve(CHUNK);
        let n = reader.read_buf(&mut (&mut buf).limit(CHUNK)).await?;
        // Keep exactly the n permits the chunk uses; the writer returns them once written.
        permit.forget();
        budget.add_permits(CHUNK - n);
        if n == 0 {
            return Ok(());
        }
        let delay = Duration::from_millis(link.control.borrow().delay_ms);
        let chunk = Chunk {
            due: Instant::now() + delay,
            data: buf.split().freeze(),
        };
        if queue.send(chunk).await.is_err() {
            // The writer is gone, which only happens when it failed; its error ends the
            // connection.
            return Ok(());
        }
    }
}

/// Writer half of one direction: writes queued chunks in order, each no earlier than its due
/// time and only while the link is not partitioned; after the queue closes (EOF on the other
/// side) it shuts down the write half, so half-close passes through the proxy.
async fn pump_out<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Chunk>,
    mut control: watch::Receiver<Control>,
    budget: &Semaphore,
) -> io::Result<()> {
    while let Some(chunk) = queue.recv().await {
        if chunk.due > Instant::now() {
            tokio::time::sleep_until(chunk.due).await;
        }
        until_open(&mut control).await?;
        writer.write_all(&chunk.data).await?;
        budget.add_permits(chunk.data.len());
    }
    // The FIN must not cross a blackhole either.
    until_open(&mut control).await?;
    writer.shutdown().await
}

/// A tiny HTTP/1.1 control API (hyper server) so a separate CLI process can steer a running
/// proxy:
///   `POST /partition?a=sg&b=th[&mode=blackhole|reset]` -> 200 `{"links": n}` (404
///   `{"error":...}` when n == 0); `mode` defaults to `blackhole`.
///   `POST /heal?a=sg&b=th` -> 200 `{"links": n}` (404 when n == 0)
///   `POST /delay?a=sg&b=th&ms=30` -> 200 `{"links": n}` (404 when n == 0)
///   `GET  /links` -> 200 JSON array of `{name,a,b,listen,target,delay_ms,partitioned}` where
///   `partitioned` is `null`, `"blackhole"` or `"reset"`.
/// Bad parameters get 400, wrong methods 405, unknown paths 404.
/// Serves until `shutdown` resolves, then lets in-flight requests finish (bounded).
pub async fn serve_control(
    proxy: Arc<LinkProxy>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let proxy = proxy.clone();
                    let service = hyper::service::service_fn(move |request| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, Infallible>(control_response(&proxy, &request)) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service);
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%peer, %error, "control connection failed");
                        }
                    });
                }
                Err(error) => {
                    tracing::debug!(%error, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(CONTROL_GRACE, graceful.shutdown()).await;
}

/// A JSON response; the control API only ever speaks JSON so the CLI can parse every answer.
fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A JSON error response.
fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message.into() }))
}

/// Routes one control request. Synchronous because every operation is a quick state change.
fn control_response(proxy: &LinkProxy, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let params = query_params(request.uri().query().unwrap_or(""));
    let expected = match path {
        "/partition" | "/heal" | "/delay" => Method::POST,
        "/links" => Method::GET,
        _ => return error(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    };
    if request.method() != expected {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} expects {expected}"),
        );
        if let Ok(allow) = hyper::header::HeaderValue::from_str(expected.as_str()) {
            response.headers_mut().insert(hyper::header::ALLOW, allow);
        }
        return response;
    }
    if path == "/links" {
        return json(StatusCode::OK, serde_json::Value::from(proxy.status()));
    }
    let (Some(a), Some(b)) = (params.get("a"), params.get("b")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "query parameters a and b are required",
        );
    };
    let matched = match path {
        "/partition" => {
            let mode = match params.get("mode").map(String::as_str) {
                None | Some("blackhole") => PartitionMode::Blackhole,
                Some("reset") => PartitionMode::Reset,
                Some(other) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("mode must be blackhole or reset, not {other:?}"),
                    )
                }
            };
            proxy.partition(a, b, mode)
        }
        "/heal" => proxy.heal(a, b),
        _ => {
            let ms = params.get("ms").and_then(|ms| ms.parse::<u64>().ok());
            match ms {
                Some(ms) if ms <= MAX_DELAY_MS => proxy.set_delay(a, b, ms),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("ms must be an integer between 0 and {MAX_DELAY_MS}"),
                    )
                }
            }
        }
    };
    if matched == 0 {
        return error(
            StatusCode::NOT_FOUND,
            format!("no link between regions {a:?} and {b:?}"),
        );
    }
    json(StatusCode::OK, serde_json::json!({ "links": matched }))
}

/// Parses `k=v&k2=v2`, percent-decoding keys and values (`+` is a space), so region names
/// survive a CLI that URL-encodes them. Later duplicates win.
fn query_params(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

/// Minimal `application/x-www-form-urlencoded` decoding; malformed escapes are kept verbatim
/// rather than rejected, since this only parses our own CLI's requests.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes[i] {
            b'%' => bytes
                .get(i + 1..i + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok()),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, byte) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Client side of the control API for the CLI: sends one request to `control`
/// (127.0.0.1:port) and returns (status, body). Uses hyper's HTTP/1 client connection directly
/// because one request per process needs no pool. Bounded by a 10 s timeout so a wedged proxy
/// cannot hang the CLI.
pub async fn control_request(
    control: SocketAddr,
    method: &str,
    path_and_query: &str,
) -> anyhow::Result<(u16, String)> {
    let method = Method::from_bytes(method.as_bytes())
        .with_context(|| format!("invalid HTTP method {method:?}"))?;
    let request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, control.to_string())
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("invalid control request {path_and_query:?}"))?;
    let exchange = async {
        let stream = TcpStream::connect(control)
            .await
            .with_context(|| format!("connecting to the link proxy control API at {control}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "control client connection failed");
            }
        });
        let result = async {
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        }
        .await;
        driver.abort();
        result
    };
    tokio::time::timeout(CONTROL_TIMEOUT, exchange)
        .await
        .with_context(|| format!("control request to {control} timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upper bound for every test, so a hang fails instead of blocking the suite.
    const TEST_LIMIT: Duration = Duration::from_secs(30);
    /// Generous bound for things that should happen "promptly".
    const PROMPT: Duration = Duration::from_secs(5);

    /// An echo server that serves at most `connections` connections, echoing until EOF and
    /// then half-closing, so half-close through the proxy is observable.
    async fn echo_server(connections: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..connections {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.split();
                    if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                        let _ = writer.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    fn spec(name: &str, target: SocketAddr, delay_ms: u64) -> LinkSpec {
        LinkSpec {
            name: name.into(),
            a: "th".into(),
            b: "sg".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            target,
            delay_ms,
        }
    }

    async fn proxy_to_echo(delay_ms: u64) -> (LinkProxy, SocketAddr) {
        let target = echo_server(16).await;
        let proxy = LinkProxy::start(vec![spec("th->sg:echo", target, delay_ms)])
            .await
            .unwrap();
        let addr = proxy.addr("th->sg:echo").unwrap();
        (proxy, addr)
    }

    /// Sends `message` and reads the same number of bytes back.
    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut reply = vec![0; message.len()];
        stream.read_exact(&mut reply).await?;
        Ok(reply)
    }

    /// Whether the connection was ended by the proxy: EOF or an error (typically a reset).
    async fn is_closed(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(PROMPT, stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    #[tokio::test]
    async fn forwards_bytes_intact_with_half_close() {
        tokio::time::timeout(TEST_LIMIT, async {
            let (proxy, addr) = proxy_to_echo(0).await;
            assert_eq!(proxy.links()[0].listen, addr);
            assert_ne!(addr.port(), 0);

            let mut stream = TcpStream::connect(addr).await.unwrap();
            assert_eq!(round_trip(&mut stream, b"hello").await.unwrap(), b"hello");

            let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
            let (mut reader, mut writer) = stream.into_split();
            let sent = payload.clone();
            let sender = tokio::spawn(async move {
                writer.write_all(&sent).await.unwrap();
                // Half-close: the echo must still come back after our FIN.
                writer.shutdown().await.unwrap();
                writer
            });
            let mut echoed = Vec::new();
            reader.read_to_end(&mut echoed).await.unwrap();
            let _writer = sender.await.unwrap();
            assert_eq!(echoed.len(), payload.len());
            assert!(echoed == payload, "echoed bytes differ");
            proxy.shutdown().await;
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn delay_applies_in_each_direction() {
        tokio::time::timeout(TEST_LIMIT, async {
            let (proxy, addr) = proxy_to_echo(40).await;
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let started = std::time::Instant::now();
            assert_eq!(round_trip(&mut stream, b"ping").await.unwrap(), b"ping");
            let elapsed = started.elapsed();
            assert!(
                elapsed >= Duration::from_millis(80),
                "round trip {elapsed:?}"
            );

            // Lowering the delay applies to new bytes; only assert the lower bound.
            assert_eq!(proxy.set_delay("sg", "th", 10), 1);
            assert_eq!(proxy.links()[0].delay_ms, 10);
            let started = std::time::Instant::now();
            assert_eq!(round_trip(&mut stream, b"pong").await.unwrap(), b"pong");
            assert!(started.elapsed() >= Duration::from_millis(20));
            proxy.shutdown().await;
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn reset_partition_resets_and_heal_restores() {
        tokio::time::timeout(TEST_LIMIT, async {
            let (proxy, addr) = proxy_to_echo(0).await;
            let mut established = TcpStream::connect(addr).await.unwrap();
            assert_eq!(round_trip(&mut established, b"a").await.unwrap(), b"a");

            assert_eq!(proxy.partition("sg", "th", PartitionMode::Reset), 1);
            assert!(is_closed(&mut established).await, "established not closed");

            let mut fresh = TcpStream::connect(addr).await.unwrap();
            assert!(is_closed(&mut fresh).await, "new connection not closed");

            assert_eq!(proxy.heal("th", "sg"), 1);
            let mut healed = TcpStream::connect(addr).await.unwrap();
            assert_eq!(round_trip(&mut healed, b"back").await.unwrap(), b"back");
            assert_eq!(proxy.partition("th", "nowhere", PartitionMode::Reset), 0);
            proxy.shutdown().await;
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn blackhole_holds_data_until_heal() {
        tokio::time::timeout(TEST_LIMIT, async {
            let (proxy, addr) = proxy_to_echo(0).await;
            let mut established = TcpStream::connect(addr).await.unwrap();
            assert_eq!(round_trip(&mut established, b"a").await.unwrap(), b"a");

            assert_eq!(proxy.partition("th", "sg", PartitionMode::Blackhole), 1);
            established.write_all(b"request").await.unwrap();
            let mut fresh = TcpStream::connect(addr).await.unwrap();
            fresh.write_all(b"fresh").await.unwrap();

            let mut reply = [0u8; 7];
            let silent =
                tokio::time::timeout(Duration::from_millis(300), established.read(&mut reply))
                    .await;
            assert!(silent.is_err(), "a reply crossed the blackhole");
            let mut fresh_reply = [0u8; 5];
            let silent =
                tokio::time::timeout(Duration::from_millis(300), fresh.read(&mut fresh_reply))
                    .await;
            assert!(silent.is_err(), "a reply crossed the blackhole");

            assert_eq!(proxy.heal("sg", "th"), 1);
            tokio::time::timeout(PROMPT, established.read_exact(&mut reply))
                .await
                .expect("no reply after heal")
                .unwrap();
            assert_eq!(&reply, b"request");
            tokio::time::timeout(PROMPT, fresh.read_exact(&mut fresh_reply))
                .await
                .expect("no reply after heal")
                .unwrap();
            assert_eq!(&fresh_reply, b"fresh");
            proxy.shutdown().await;
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn control_api_steers_the_proxy() {
        tokio::time::timeout(TEST_LIMIT, async {
            let (proxy, addr) = proxy_to_echo(0).await;
            let proxy = Arc::new(proxy);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let control = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve_control(proxy.clone(), listener, async {
                let _ = stopped.await;
            }));

            let (status, body) =
                control_request(control, "POST", "/partition?a=sg&b=th&mode=reset")
                    .await
                    .unwrap();
            assert_eq!((status, body.as_str()), (200, r#"{"links":1}"#));
            let (status, body) = control_request(control, "GET", "/links").await.unwrap();
            assert_eq!(status, 200);
            let links: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(links[0]["name"], "th->sg:echo");
            assert_eq!(links[0]["partitioned"], "reset");
            assert_eq!(links[0]["listen"], addr.to_string());
            let mut fresh = TcpStream::connect(addr).await.unwrap();
            assert!(is_closed(&mut fresh).await, "partition had no effect");

            let (status, _) = control_request(control, "POST", "/heal?a=th&b=sg")
                .await
                .unwrap();
            assert_eq!(status, 200);
            let mut healed = TcpStream::connect(addr).await.unwrap();
            assert_eq!(round_trip(&mut healed, b"ok").await.unwrap(), b"ok");

            let (status, _) = control_request(control, "POST", "/delay?a=th&b=sg&ms=30")
                .await
                .unwrap();
            assert_eq!(status, 200);
            let (_, body) = control_request(control, "GET", "/links").await.unwrap();
            let links: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(links[0]["partitioned"], serde_json::Value::Null);
            assert_eq!(links[0]["delay_ms"], 30);

            let (status, body) = control_request(control, "POST", "/partition?a=xx&b=th")
                .await
                .unwrap();
            assert_eq!(status, 404);
            assert!(body.contains("error"), "{body}");
            let (status, _) = control_request(control, "POST", "/partition?a=sg&b=th&mode=drop")
                .await
                .unwrap();
            assert_eq!(status, 400);
            let (status, _) = control_request(control, "GET", "/heal?a=sg&b=th")
                .await
                .unwrap();
            assert_eq!(status, 405);

            let _ = stop.send(());
            server.await.unwrap();
            assert!(control_request(control, "GET", "/links").await.is_err());
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn rejects_non_loopback_and_duplicates() {
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut outside = spec("out", target, 0);
        outside.listen = "0.0.0.0:0".parse().unwrap();
        let error = LinkProxy::start(vec![outside]).await.err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let error = LinkProxy::start(vec![spec("d", target, 0), spec("d", target, 0)])
            .await
            .err()
            .unwrap();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn decodes_query_parameters() {
        let params = query_params("a=s%67&b=t+h&mode=&x=%zz&y=%+1");
        assert_eq!(params["a"], "sg");
        assert_eq!(params["b"], "t h");
        assert_eq!(params["mode"], "");
        assert_eq!(params["x"], "%zz");
        assert_eq!(params["y"], "% 1");
    }
}
