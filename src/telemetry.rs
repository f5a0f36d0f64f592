//! Logs and trace context: the global subscriber (JSON or text through a bounded, non-blocking
//! writer, its filter reloadable), the read-sampling rate, the keyed tag that stands for a guest
//! session in logs, and W3C Trace Context (`traceparent` parsed and formatted, the request's
//! context carried through its task so edge-to-edge calls pass it on).
//!
//! Besides the tracing subscriber itself, the filter's reload handle and the sampling rate are
//! the only process-wide state: they belong to the subscriber and change with it on SIGHUP.
//! This module knows no HTTP route, no handler and no store; it never sees a token or a raw
//! session id it would keep (the session tag is computed from it and the id dropped).

use std::io::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::LogConfig;

/// The W3C `traceparent` request header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context level 2 `traceresponse` response header.
pub const TRACERESPONSE: &str = "traceresponse";

/// One position in a trace: the trace, the span (the W3C "parent id" when sent on) and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` value. Version `00` must be exactly
    /// `00-<32 hex>-<16 hex>-<2 hex>`; a later version may carry more after a `-` (the spec's
    /// forward compatibility). Hex is lowercase; all-zero ids and version `ff` are invalid.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let bytes = value.as_bytes();
        if bytes.len() < 55 {
            return None;
        }
        let version = decode_hex::<1>(&value[..2])?[0];
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        if bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        let trace_id = decode_hex::<16>(value.get(3..35)?)?;
        let span_id = decode_hex::<8>(value.get(36..52)?)?;
        let flags = decode_hex::<1>(value.get(53..55)?)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace (no valid parent was given), marked sampled: its lines are in the logs.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: nonzero_random(),
            span_id: nonzero_random(),
            flags: 0x01,
        }
    }

    /// A new span of the same trace.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: nonzero_random(),
            ..*self
        }
    }

    /// The request's own context: the client's trace if its `traceparent` is valid, else a
    /// new one; either way a span id of this edge's own.
    pub fn for_request(traceparent: Option<&str>) -> TraceContext {
        match traceparent.and_then(TraceContext::parse) {
            Some(parent) => parent.child(),
            None => TraceContext::new_root(),
        }
    }

    pub fn trace_id(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex::encode(self.span_id)
    }

    /// `00-<trace id>-<span id>-<flags>`: the value of a `traceparent` sent on and of the
    /// `traceresponse` answered (both name this span).
    pub fn header_value(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id(),
            self.span_id(),
            self.flags
        )
    }
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn nonzero_random<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

/// Whom a request served, as its log line may name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LoggedOwner {
    /// No owner was resolved (probes, refused requests, settlements).
    #[default]
    Anonymous,
    /// A signed-in user, by id.
    User(String),
    /// A guest, only by the [`session_tag`] of its session.
    Guest(String),
}

impl LoggedOwner {
    /// `user`, `guest` or `anonymous`.
    pub fn kind(&self) -> &'static str {
        match self {
            LoggedOwner::Anonymous => "anonymous",
            LoggedOwner::User(_) => "user",
            LoggedOwner::Guest(_) => "guest",
        }
    }

    pub fn user_id(&self) -> Option<&str> {
        match self {
            LoggedOwner::User(user) => Some(user),
            _ => None,
        }
    }

    pub fn session_tag(&self) -> Option<&str> {
        match self {
            LoggedOwner::Guest(tag) => Some(tag),
            _ => None,
        }
    }
}

/// Where a request's handler leaves its [`LoggedOwner`] for the request's log line.
#[derive(Debug, Clone, Default)]
pub struct OwnerSlot(Arc<Mutex<LoggedOwner>>);

impl OwnerSlot {
    /// The owner noted so far (anonymous if none), leaving anonymous behind.
    pub fn take(&self) -> LoggedOwner {
        self.0
            .lock()
            .map(|mut owner| std::mem::take(&mut *owner))
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct RequestScope {
    context: TraceContext,
    owner: OwnerSlot,
}

tokio::task_local! {
    static CURRENT: RequestScope;
}

/// Runs `future` with `context` as the current trace (see [`current`]) and `owner` as the slot
/// [`note_owner`] fills.
pub async fn in_trace<F: std::future::Future>(
    context: TraceContext,
    owner: OwnerSlot,
    future: F,
) -> F::Output {
    CURRENT.scope(RequestScope { context, owner }, future).await
}

/// The trace of the request this task serves, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|scope| scope.context).ok()
}

/// Names the owner of the request this task serves, for its log line.
pub fn note_owner(owner: LoggedOwner) {
    let _ = CURRENT.try_with(|scope| {
        if let Ok(mut slot) = scope.owner.0.lock() {
            *slot = owner;
        }
    });
}

/// The keyed tag that stands for a guest session id in logs: HMAC-SHA256 under the session
/// secret, first 8 bytes in hex. Lines of one session can be joined; the id cannot be
/// recovered or guessed from it without the secret.
pub fn session_tag(secret: &[u8], session_id: &str) -> String {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        return String::from("-");
    };
    mac.update(b"cartedge log session tag\0");
    mac.update(session_id.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..8])
}

/// Parts per million of successful reads logged; [`LogConfig::read_sample_rate`] scaled.
static READ_SAMPLE_PPM: AtomicU32 = AtomicU32::new(10_000);

fn set_read_sample_rate(rate: f64) {
    let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0).round() as u32;
    READ_SAMPLE_PPM.store(ppm, Ordering::Relaxed);
}

/// Whether this successful read's request line is logged.
pub fn sample_read() -> bool {
    let ppm = READ_SAMPLE_PPM.load(Ordering::Relaxed);
    ppm >= 1_000_000 || (ppm > 0 && rand::random_range(0..1_000_000) < ppm)
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

fn filter_from(config: &LogConfig) -> Result<EnvFilter, String> {
    EnvFilter::try_new(&config.filter).map_err(|e| format!("log.filter: {e}"))
}

/// Installs the global subscriber; `RUST_LOG` overrides the configured filter. Keep the
/// returned guard alive for the life of the process: dropping it flushes the lines still queued.
/// A second call (tests, or several edges in one process) installs nothing and returns None.
pub fn init(config: &LogConfig) -> Option<LogGuard> {
    use std::io::IsTerminal as _;
    set_read_sample_rate(config.read_sample_rate);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| filter_from(config))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = match config.format.as_str() {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let (writer, guard) = NonBlocking::stderr();
    let output: Box<dyn Layer<_> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(writer)
            .boxed()
    };
    Registry::default()
        .with(filter)
        .with(output)
        .try_init()
        .ok()?;
    let _ = FILTER.set(handle);
    Some(guard)
}

/// Whether the configured filter parses (what [`reload`] would refuse).
pub fn check_filter(config: &LogConfig) -> Result<(), String> {
    filter_from(config).map(|_| ())
}

/// Applies a reloaded configuration's filter and sampling rate (on SIGHUP). The filter is left
/// alone when `RUST_LOG` is set, as at start-up.
pub fn reload(config: &LogConfig) -> Result<(), String> {
    let filter = filter_from(config)?;
    if std::env::var_os(EnvFilter::DEFAULT_ENV).is_none() {
        if let Some(handle) = FILTER.get() {
            handle
                .reload(filter)
                .map_err(|e| format!("log.filter: {e}"))?;
        }
    }
    set_read_sample_rate(config.read_sample_rate);
    Ok(())
}

/// Lines queued for the writer thread at most; past it lines are dropped (and counted), so a
/// stalled stderr never blocks a request.
const QUEUE_LINES: usize = 16 * 1024;

/// Lines dropped because the queue was full.
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because the writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED_LINES.load(Ordering::Relaxed)
}

enum Message {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// A `MakeWriter` that hands each formatted line to a writer thread over a bounded queue.
#[derive(Clone)]
struct NonBlocking {
    queue: SyncSender<Message>,
}

impl NonBlocking {
    fn stderr() -> (NonBlocking, LogGuard) {
        let (queue, lines) = sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("cartedge-log".into())
            .spawn(move || write_lines(lines))
            .map(|_| ())
            .unwrap_or_else(|error| eprintln!("cartedge: no log writer thread: {error}"));
        (
            NonBlocking {
                queue: queue.clone(),
            },
            LogGuard { queue },
        )
    }
}

fn write_lines(lines: Receiver<Message>) {
    let stderr = std::io::stderr();
    while let Ok(message) = lines.recv() {
        match message {
            Message::Line(line) => {
                let mut out = stderr.lock();
                let _ = out.write_all(&line);
                // Drain what is already queued before flushing once.
                while let Ok(Message::Line(line)) = lines.try_recv() {
                    let _ = out.write_all(&line);
                }
                let _ = out.flush();
            }
            Message::Flush(done) => {
                let _ = stderr.lock().flush();
                let _ = done.send(());
            }
        }
    }
}

impl std::io::Write for NonBlocking {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.queue.try_send(Message::Line(buf.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED_LINES.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NonBlocking {
    type Writer = NonBlocking;

    fn make_writer(&'a self) -> NonBlocking {
        self.clone()
    }
}

/// Flushes the queued log lines when dropped (bounded: a stuck stderr delays exit by at most
/// a second).
pub struct LogGuard {
    queue: SyncSender<Message>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (done, flushed) = sync_channel(1);
        if self.queue.send(Message::Flush(done)).is_ok() {
            let _ = flushed.recv_timeout(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_honoured_and_formatted_back() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceContext::parse(value).unwrap();
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.span_id(), "00f067aa0ba902b7");
        assert_eq!(parsed.header_value(), value);
        let request = TraceContext::for_request(Some(value));
        assert_eq!(request.trace_id(), parsed.trace_id());
        assert_ne!(request.span_id(), parsed.span_id());
        // A later version may carry more fields.
        assert!(TraceContext::parse(&format!("01{}-extra", &value[2..])).is_some());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for bad in [
            "",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        assert!(TraceContext::parse(good).is_some());
        let made = TraceContext::for_request(Some("garbage"));
        assert!(TraceContext::parse(&made.header_value()).is_some());
    }

    #[test]
    fn the_session_tag_is_keyed_and_hides_the_id() {
        let tag = session_tag(&[7; 32], "v2.abc");
        assert_eq!(tag.len(), 16);
        assert_eq!(tag, session_tag(&[7; 32], "v2.abc"));
        assert_ne!(tag, session_tag(&[8; 32], "v2.abc"));
        assert!(!tag.contains("abc"));
    }

    #[test]
    fn sampling_follows_the_rate_at_its_ends() {
        set_read_sample_rate(0.0);
        assert!((0..1000).all(|_| !sample_read()));
        set_read_sample_rate(1.0);
        assert!((0..1000).all(|_| sample_read()));
        set_read_sample_rate(0.01);
    }
}
