//! The client that carries requests to other regions' edges: one HTTP/2 connection per peer
//! over mutual TLS, a bounded timeout per forward, one retry on a fresh connection when the
//! transport fails, and a per-peer circuit breaker so an unreachable region fails fast.
//!
//! Retrying is safe because every forwarded write carries an Idempotency-Key: a forward whose
//! connection dropped after the home edge committed is answered from the stored response.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use tracing::Instrument as _;

use super::tls::edge_server_name;
use crate::metrics::{ForwardMetrics, PeerLabels, PeerOutcomeLabels};
use crate::telemetry::{TraceContext, TRACEPARENT};

/// Headers that identify a forwarded request.
pub mod names {
    /// The region whose edge forwarded the request (a receiver never forwards it again).
    pub const FORWARDED_FROM: &str = "cart-forwarded-from";
    /// The forwarding edge's ring fingerprint; a receiver with another ring refuses to write.
    pub const RING: &str = "cart-ring";
    /// While the forwarding edge's ring is moving: the fingerprint of the ring it moves from, so
    /// an edge still running that ring accepts it during the roll (`Ring::accepts`).
    pub const RING_MOVING_FROM: &str = "cart-ring-moving-from";
    /// The home region that applied a write.
    pub const HOME_REGION: &str = "cart-home-region";
}

/// Logs a forward's duration when it ends (answered, failed or cancelled), inside its span.
struct ForwardTimer<'a> {
    span: &'a tracing::Span,
    peer: &'a str,
    started: Instant,
}

impl<'a> ForwardTimer<'a> {
    fn start(span: &'a tracing::Span, peer: &'a str) -> ForwardTimer<'a> {
        ForwardTimer {
            span,
            peer,
            started: Instant::now(),
        }
    }
}

impl Drop for ForwardTimer<'_> {
    fn drop(&mut self) {
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.span
            .in_scope(|| tracing::info!(peer = self.peer, latency_ms, "forward"));
    }
}

/// Bounds of forwarding.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Whole forward, connection set-up and retry included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Consecutive failures that open a peer's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit fails fast. After it, requests go through again, but the
    /// failure count stays one short of `breaker_failures`: the next failure re-opens at once.
    pub breaker_cooldown: Duration,
    /// The fingerprint of the ring this edge's ring moves from (None when settled): sent as
    /// `cart-ring-moving-from` with every request (until [`Forwarder::set_ring_moving_from`]).
    pub ring_moving_from: Option<http::HeaderValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no edge is known for region {0}")]
    UnknownPeer(String),
    #[error("the circuit to region {0} is open")]
    CircuitOpen(String),
    #[error("forward to region {0} timed out")]
    Timeout(String),
    #[error("forward to region {region} failed: {message}")]
    Transport { region: String, message: String },
    /// The peer's answer was longer than [`MAX_ANSWER_BYTES`]: a broken or hostile peer. Not
    /// retried (it would answer the same), and the body read so far is dropped.
    #[error("the answer from region {region} is longer than {limit} bytes")]
    AnswerTooLarge { region: String, limit: usize },
}

/// The longest peer answer read into memory. The largest legitimate answer is a full cart or
/// order (`cart.max_lines` lines with bounded variants), a few hundred KiB at most; past this
/// a peer is broken, and reading on would let it exhaust this edge's memory.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why one attempt failed.
#[derive(Debug)]
enum AttemptError {
    /// The connection or the exchange failed; another connection may do better.
    Transport(String),
    /// The answer passed [`MAX_ANSWER_BYTES`].
    TooLarge,
}

impl From<String> for AttemptError {
    fn from(message: String) -> Self {
        AttemptError::Transport(message)
    }
}

/// Reads a whole answer body, refusing one longer than `limit` bytes (its declared length is
/// not trusted; the bytes are counted as they arrive).
async fn read_answer<B>(body: B, limit: usize) -> Result<Bytes, AttemptError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(AttemptError::TooLarge),
        Err(error) => Err(AttemptError::Transport(format!(
            "reading the answer: {error}"
        ))),
    }
}

/// A peer's answer.
#[derive(Debug)]
pub struct Forwarded {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct Breaker {
    consecutive_failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    fn allow(&self) -> bool {
        let Ok(mut open_until) = self.open_until.lock() else {
            return true;
        };
        match *open_until {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                // Half-open: requests go through again (not just one); the failure count was
                // left one short of the threshold, so one more failure re-opens at once.
                *open_until = None;
                true
            }
            None => true,
        }
    }

    fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Whether requests are refused right now (for the breaker gauge; changes nothing).
    fn is_open(&self) -> bool {
        self.open_until
            .lock()
            .map(|until| until.is_some_and(|until| Instant::now() < until))
            .unwrap_or(false)
    }

    fn failure(&self, threshold: u32, cooldown: Duration) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= threshold {
            if let Ok(mut open_until) = self.open_until.lock() {
                *open_until = Some(Instant::now() + cooldown);
            }
            self.consecutive_failures
                .store(threshold.saturating_sub(1), Ordering::Relaxed);
        }
    }
}

struct Peer {
    region: String,
    /// `host:port` to dial (in the local cluster, the link proxy's port).
    address: String,
    /// The name the peer's certificate must carry.
    server_name: ServerName<'static>,
    authority: String,
    sender: tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
    breaker: Breaker,
    metrics: PeerMetrics,
}

/// One peer's metric handles, resolved once so a forward allocates no label.
struct PeerMetrics {
    ok: Counter,
    error: Counter,
    timeout: Counter,
    too_large: Counter,
    breaker_refused: Counter,
    retries: Counter,
    duration: Histogram,
    breaker_open: Gauge,
}

impl PeerMetrics {
    fn new(metrics: &ForwardMetrics, region: &str) -> PeerMetrics {
        let outcome = |outcome| {
            metrics
                .requests
                .get_or_create(&PeerOutcomeLabels {
                    peer: region.to_string(),
                    outcome,
                })
                .clone()
        };
        let peer = PeerLabels {
            peer: region.to_string(),
        };
        PeerMetrics {
            ok: outcome("ok"),
            error: outcome("error"),
            timeout: outcome("timeout"),
            too_large: outcome("too_large"),
            breaker_refused: outcome("breaker_open"),
            retries: metrics.retries.get_or_create(&peer).clone(),
            duration: metrics.duration.get_or_create(&peer).clone(),
            breaker_open: metrics.breaker_open.get_or_create(&peer).clone(),
        }
    }
}

pub struct Forwarder {
    connector: TlsConnector,
    peers: HashMap<String, Arc<Peer>>,
    settings: Settings,
    /// `cart-ring-moving-from` sent with every request: `settings.ring_moving_from` at first,
    /// replaced when the edge reloads another ring ([`Forwarder::set_ring_moving_from`]).
    ring_moving_from: arc_swap::ArcSwapOption<http::HeaderValue>,
    /// The forwarding families (also used by `invalidate` for its outcomes).
    pub metrics: ForwardMetrics,
}

/// `https://host:port[/]` → `host:port`.
fn address_of(url: &str) -> anyhow::Result<String> {
    let uri: http::Uri = url.parse().map_err(|e| anyhow::anyhow!("{url:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow::anyhow!("{url:?} has no host"))?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(443)))
}

impl Forwarder {
    /// `peers`: (region id, internal URL) of every other region.
    pub fn new<'a>(
        peers: impl IntoIterator<Item = (&'a str, &'a str)>,
        tls: rustls::ClientConfig,
        settings: Settings,
        metrics: ForwardMetrics,
    ) -> anyhow::Result<Forwarder> {
        let mut map = HashMap::new();
        for (region, url) in peers {
            map.insert(
                region.to_string(),
                Arc::new(Peer {
                    region: region.to_string(),
                    address: address_of(url)?,
                    server_name: edge_server_name(region),
                    authority: format!("{region}.edge.cartedge.internal"),
                    sender: tokio::sync::Mutex::new(None),
                    breaker: Breaker::default(),
                    metrics: PeerMetrics::new(&metrics, region),
                }),
            );
        }
        Ok(Forwarder {
            connector: TlsConnector::from(Arc::new(tls)),
            peers: map,
            ring_moving_from: arc_swap::ArcSwapOption::from_pointee(
                settings.ring_moving_from.clone(),
            ),
            settings,
            metrics,
        })
    }

    /// The fingerprint of the ring this edge's ring now moves from (None: settled), sent from
    /// the next request on.
    pub fn set_ring_moving_from(&self, fingerprint: Option<http::HeaderValue>) {
        self.ring_moving_from.store(fingerprint.map(Arc::new));
    }

    /// Every peer region, sorted, with whether its breaker refuses requests now.
    pub fn peer_states(&self) -> Vec<(String, bool)> {
        let mut states: Vec<(String, bool)> = self
            .peers
            .iter()
            .map(|(region, peer)| (region.clone(), peer.breaker.is_open()))
            .collect();
        states.sort();
        states
    }

    /// Sets `cartedge_forward_breaker_open` for every peer (at scrape time).
    pub fn export_breakers(&self) {
        for peer in self.peers.values() {
            peer.metrics
                .breaker_open
                .set(i64::from(peer.breaker.is_open()));
        }
    }

    /// Seconds a client should wait before retrying a failed forward.
    pub fn retry_after_secs(&self) -> u32 {
        self.settings.breaker_cooldown.as_secs().max(1) as u32
    }

    async fn connect(&self, peer: &Peer) -> Result<http2::SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::time::timeout(
            self.settings.connect_timeout,
            tokio::net::TcpStream::connect(&peer.address),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.settings.connect_timeout,
            self.connector.connect(peer.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let (sender, connection) = builder
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let region = peer.region.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%region, %error, "edge connection closed");
            }
        });
        Ok(sender)
    }

    async fn sender(
        &self,
        peer: &Peer,
        fresh: bool,
    ) -> Result<http2::SendRequest<Full<Bytes>>, String> {
        let mut slot = peer.sender.lock().await;
        if let Some(sender) = slot.as_ref() {
            if !fresh && !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        let sender = self.connect(peer).await?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn attempt(
        &self,
        peer: &Peer,
        fresh: bool,
        request: Request<Full<Bytes>>,
    ) -> Result<Forwarded, AttemptError> {
        let mut sender = self.sender(peer, fresh).await?;
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = read_answer(body, MAX_ANSWER_BYTES).await?;
        Ok(Forwarded {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Sends one request to `region`'s edge. `headers` are sent as given (the caller adds the
    /// forwarding headers and the Idempotency-Key).
    pub async fn send(
        &self,
        region: &str,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Forwarded, ForwardError> {
        let peer = self
            .peers
            .get(region)
            .ok_or_else(|| ForwardError::UnknownPeer(region.to_string()))?;
        if !peer.breaker.allow() {
            peer.metrics.breaker_refused.inc();
            return Err(ForwardError::CircuitOpen(region.to_string()));
        }
        // This forward is a span of the caller's trace (the request this task serves, or the
        // one the caller named in `traceparent`): the peer continues it from here.
        let trace = headers
            .get(TRACEPARENT)
            .and_then(|value| TraceContext::parse(value.to_str().ok()?))
            .or_else(|| crate::telemetry::current().map(|context| context.child()));
        let span = tracing::info_span!(
            "forward",
            peer = region,
            method = %method,
            path = path_and_query,
            trace_id = trace.map(|t| t.trace_id()).as_deref(),
            span_id = trace.map(|t| t.span_id()).as_deref(),
        );
        let _timed = ForwardTimer::start(&span, region);
        let build = || -> Result<Request<Full<Bytes>>, String> {
            let mut builder = Request::builder()
                .method(method.clone())
                .uri(format!("https://{}{}", peer.authority, path_and_query));
            for (name, value) in headers {
                builder = builder.header(name, value);
            }
            if let Some(moving_from) = &*self.ring_moving_from.load() {
                builder = builder.header(names::RING_MOVING_FROM, &**moving_from);
            }
            if let Some(trace) = trace.filter(|_| !headers.contains_key(TRACEPARENT)) {
                builder = builder.header(TRACEPARENT, trace.header_value());
            }
            builder
                .body(Full::new(body.clone()))
                .map_err(|e| e.to_string())
        };
        let exchange = async {
            let request = build()?;
            match self.attempt(peer, false, request).await {
                Ok(answer) => Ok(answer),
                Err(AttemptError::TooLarge) => Err(AttemptError::TooLarge),
                Err(AttemptError::Transport(first)) => {
                    // The connection may have died (peer restarted, link reset): once more on
                    // a fresh connection. Safe: writes carry an Idempotency-Key.
                    peer.metrics.retries.inc();
                    tracing::warn!(region, error = %first, "forward failed; retrying on a new connection");
                    self.attempt(peer, true, build()?).await
                }
            }
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.settings.timeout, exchange)
            .instrument(span.clone())
            .await;
        peer.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(answer)) => {
                peer.breaker.success();
                peer.metrics.ok.inc();
                Ok(answer)
            }
            Ok(Err(AttemptError::Transport(message))) => {
                peer.metrics.error.inc();
                self.fail(peer);
                Err(ForwardError::Transport {
                    region: region.to_string(),
                    message,
                })
            }
            Ok(Err(AttemptError::TooLarge)) => {
                // A peer that answers like this is broken: let the breaker count it.
                peer.metrics.too_large.inc();
                self.fail(peer);
                Err(ForwardError::AnswerTooLarge {
                    region: region.to_string(),
                    limit: MAX_ANSWER_BYTES,
                })
            }
            Err(_) => {
                peer.metrics.timeout.inc();
                self.fail(peer);
                // A request stuck on a dead link must not pin the next one to it.
                if let Ok(mut slot) = peer.sender.try_lock() {
                    *slot = None;
                }
                Err(ForwardError::Timeout(region.to_string()))
            }
        }
    }

    fn fail(&self, peer: &Peer) {
        peer.breaker.failure(
            self.settings.breaker_failures,
            self.settings.breaker_cooldown,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_longer_than_the_cap_are_refused_and_shorter_ones_read_whole() {
        let at_cap = Full::new(Bytes::from(vec![b'x'; 64]));
        assert_eq!(read_answer(at_cap, 64).await.unwrap().len(), 64);
        let past_cap = Full::new(Bytes::from(vec![b'x'; 65]));
        assert!(matches!(
            read_answer(past_cap, 64).await,
            Err(AttemptError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn a_streamed_answer_is_cut_off_at_the_cap_whatever_it_declares() {
        // Many small frames: the cap counts bytes as they arrive, not a declared length.
        let frames = (0..100).map(|_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(
                b"0123456789",
            )))
        });
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        assert!(matches!(
            read_answer(body, 999).await,
            Err(AttemptError::TooLarge)
        ));
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_half_opens_after_cooldown() {
        let breaker = Breaker::default();
        for _ in 0..2 {
            breaker.failure(3, Duration::from_millis(50));
            assert!(breaker.allow());
        }
        breaker.failure(3, Duration::from_millis(50));
        assert!(!breaker.allow(), "open after three failures");
        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.allow(), "half-open after the cooldown");
        breaker.failure(3, Duration::from_millis(50));
        assert!(!breaker.allow(), "one failure while half-open re-opens");
        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.allow());
        breaker.success();
        breaker.failure(3, Duration::from_millis(50));
        assert!(breaker.allow(), "a success resets the count");
    }

    #[test]
    fn internal_urls_become_dial_addresses() {
        assert_eq!(
            address_of("https://127.0.0.1:8443").unwrap(),
            "127.0.0.1:8443"
        );
        assert_eq!(
            address_of("https://edge-sg.cartedge.internal").unwrap(),
            "edge-sg.cartedge.internal:443"
        );
        assert!(address_of("not a url").is_err());
    }
}
