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

/// What every log line written while a request is served says about it, besides its trace:
/// set once when the request starts (no tracing span is built per request: formatting a
/// span's fields for every request cost a quarter of the cache-hit read path).
#[derive(Clone)]
pub struct RequestFields {
    pub region: Arc<str>,
    /// The route template, never the raw path.
    pub route: &'static str,
    pub method: http::Method,
}

#[derive(Clone)]
struct RequestScope {
    context: TraceContext,
    owner: OwnerSlot,
    fields: RequestFields,
}

impl RequestScope {
    /// The request's fields as JSON members, each preceded by a comma.
    fn json_members(&self) -> String {
        let owner = self.owner.0.lock().map(|o| o.clone()).unwrap_or_default();
        let mut out = format!(
            ",\"trace_id\":\"{}\",\"span_id\":\"{}\"",
            self.context.trace_id(),
            self.context.span_id()
        );
        let mut member = |name: &str, value: &str| {
            // Strings are escaped as JSON (serde_json cannot fail on a &str).
            let value = serde_json::to_string(value).unwrap_or_default();
            out.push_str(&format!(",\"{name}\":{value}"));
        };
        member("region", &self.fields.region);
        member("route", self.fields.route);
        member("method", self.fields.method.as_str());
        member("owner", owner.kind());
        if let Some(user) = owner.user_id() {
            member("user_id", user);
        }
        if let Some(tag) = owner.session_tag() {
            member("session", tag);
        }
        out
    }

    /// The request's fields as ` name=value` pairs, for text lines.
    fn text_pairs(&self) -> String {
        let owner = self.owner.0.lock().map(|o| o.clone()).unwrap_or_default();
        let mut out = format!(
            " trace_id={} span_id={} region={} route={} method={} owner={}",
            self.context.trace_id(),
            self.context.span_id(),
            self.fields.region,
            self.fields.route,
            self.fields.method,
            owner.kind()
        );
        if let Some(user) = owner.user_id() {
            out.push_str(&format!(" user_id={user}"));
        }
        if let Some(tag) = owner.session_tag() {
            out.push_str(&format!(" session={tag}"));
        }
        out
    }
}

tokio::task_local! {
    static CURRENT: RequestScope;
}

/// Runs `future` with `context` as the current trace (see [`current`]), `owner` as the slot
/// [`note_owner`] fills, and `fields`: every line logged meanwhile carries them (and the owner
/// once noted).
pub fn in_trace<F: std::future::Future>(
    context: TraceContext,
    owner: OwnerSlot,
    fields: RequestFields,
    future: F,
) -> impl std::future::Future<Output = F::Output> {
    // Not an `async fn`: its state would hold `future` twice.
    CURRENT.scope(
        RequestScope {
            context,
            owner,
            fields,
        },
        future,
    )
}

/// An event format that adds the current request's fields ([`in_trace`]) to every line: as
/// members of the JSON object, or as `name=value` pairs at the end of a text line. Lines
/// logged outside a request are left as the inner format writes them.
struct WithRequest<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithRequest<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let extra = CURRENT
            .try_with(|scope| {
                if self.json {
                    scope.json_members()
                } else {
                    scope.text_pairs()
                }
            })
            .ok();
        let Some(extra) = extra else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        // Both formats end a line with a newline; JSON closes its object just before it.
        let closing = if self.json { "}\n" } else { "\n" };
        match line.strip_suffix(closing) {
            Some(body) => write!(writer, "{body}{extra}{closing}"),
            None => writer.write_str(&line),
        }
    }
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
        let format = tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false);
        tracing_subscriber::fmt::layer()
            .json()
            .event_format(WithRequest {
                inner: format,
                json: true,
            })
            .with_writer(writer)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(WithRequest {
                inner: tracing_subscriber::fmt::format(),
                json: false,
            })
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

    /// A writer into a shared buffer, for capturing formatted lines.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Lines logged by `log` under a JSON or text subscriber built as `init` builds it.
    fn lines_of(json: bool, log: impl FnOnce()) -> Vec<String> {
        let captured = Captured::default();
        let layer: Box<dyn Layer<Registry> + Send + Sync> = if json {
            tracing_subscriber::fmt::layer()
                .json()
                .event_format(WithRequest {
                    inner: tracing_subscriber::fmt::format()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false),
                    json: true,
                })
                .with_writer(captured.clone())
                .boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .event_format(WithRequest {
                    inner: tracing_subscriber::fmt::format(),
                    json: false,
                })
                .with_writer(captured.clone())
                .boxed()
        };
        tracing::subscriber::with_default(Registry::default().with(layer), log);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn lines_logged_while_a_request_is_served_carry_its_fields() {
        let context = TraceContext::new_root();
        let fields = RequestFields {
            region: Arc::from("sg"),
            route: "/cart/items",
            method: http::Method::POST,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for json in [true, false] {
            let lines = lines_of(json, || {
                runtime.block_on(in_trace(
                    context,
                    OwnerSlot::default(),
                    fields.clone(),
                    async {
                        tracing::warn!(shard = "sg-1", "before the owner is known");
                        note_owner(LoggedOwner::User("alice".into()));
                        tracing::warn!("after");
                    },
                ));
                tracing::warn!("outside any request");
            });
            assert_eq!(lines.len(), 3, "{lines:?}");
            if json {
                let parsed: Vec<serde_json::Value> = lines
                    .iter()
                    .map(|line| serde_json::from_str(line).unwrap())
                    .collect();
                for line in &parsed[..2] {
                    assert_eq!(line["trace_id"], context.trace_id(), "{line}");
                    assert_eq!(line["span_id"], context.span_id());
                    assert_eq!(line["region"], "sg");
                    assert_eq!(line["route"], "/cart/items");
                    assert_eq!(line["method"], "POST");
                }
                assert_eq!(parsed[0]["shard"], "sg-1");
                assert_eq!(parsed[0]["owner"], "anonymous");
                assert_eq!(parsed[1]["owner"], "user");
                assert_eq!(parsed[1]["user_id"], "alice");
                assert!(parsed[2].get("trace_id").is_none(), "{}", parsed[2]);
                assert_eq!(parsed[2]["message"], "outside any request");
            } else {
                let trace = format!("trace_id={}", context.trace_id());
                assert!(lines[0].contains(&trace), "{}", lines[0]);
                assert!(
                    lines[1].ends_with("owner=user user_id=alice"),
                    "{}",
                    lines[1]
                );
                assert!(!lines[2].contains("trace_id="), "{}", lines[2]);
            }
        }
    }

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
