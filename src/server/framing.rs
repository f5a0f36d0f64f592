//! Conflicting HTTP/1 framing: finds requests that carry both `Content-Length` and
//! `Transfer-Encoding`, so the service can refuse them with 400 before reading their body.
//!
//! hyper resolves such a request itself (chunked wins, the connection closes after it) and
//! hands the service a request whose `Content-Length` is gone, so the service cannot see the
//! conflict. [`Watched`] wraps a connection's byte stream and follows the HTTP/1 framing of
//! every request on it as hyper reads it (head, then a fixed-length or chunked body), and
//! [`FramingWatch`] remembers the position on the connection of the first request whose head
//! carries both headers. hyper calls the service once per request head, in order, so the
//! service refuses the request whose position matches.
//!
//! The watch only reads; it never changes the bytes hyper sees. On anything it does not
//! follow (HTTP/2, a head or chunk line hyper will refuse anyway, an over-long line) it stops
//! watching that connection; hyper's own parsing still applies. It must not be used to decide
//! anything but this refusal.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head or chunk-size line followed; hyper refuses heads past `server.max_header_bytes`
/// long before this.
const MAX_LINE: usize = 64 * 1024;

/// No conflicting request seen (positions are stored plus one).
const NONE: u64 = 0;

/// What the reader of a connection found, shared with that connection's service.
#[derive(Debug, Default)]
pub struct FramingWatch {
    /// One plus the position (0-based, in arrival order) of the first request on the
    /// connection whose head carried both headers; [`NONE`] when there is none.
    conflicting: AtomicU64,
}

impl FramingWatch {
    /// Whether the request at `position` on this connection carried both `Content-Length` and
    /// `Transfer-Encoding`.
    pub fn conflicts_at(&self, position: u64) -> bool {
        self.conflicting.load(Ordering::Acquire) == position.saturating_add(1)
    }

    fn record(&self, position: u64) {
        let _ = self.conflicting.compare_exchange(
            NONE,
            position.saturating_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// Where the scanner is in the connection's byte stream.
#[derive(Debug)]
enum State {
    /// Reading a request head line by line.
    Head(Head),
    /// Skipping a body of known length.
    Fixed { remaining: u64 },
    /// Reading a chunk-size line.
    ChunkSize { line: Vec<u8> },
    /// Skipping chunk data.
    ChunkData { remaining: u64 },
    /// Expecting the line break after chunk data.
    ChunkEnd { line: Vec<u8> },
    /// Reading trailer lines after the last chunk.
    Trailers { line: Vec<u8> },
    /// Not following this connection any more.
    Stopped,
}

#[derive(Debug, Default)]
struct Head {
    /// The part of a line that arrived before its end (lines are usually whole in one read and
    /// then never copied).
    line: Vec<u8>,
    /// The request line was seen; `Some(true)` when it is the HTTP/2 preface.
    request_line: Option<bool>,
    content_length: Option<u64>,
    has_content_length: bool,
    transfer_encoding: Option<Vec<u8>>,
}

/// Follows the framing of the requests on one connection.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Request heads completed so far.
    heads: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Head(Head::default()),
            heads: 0,
        }
    }
}

/// Takes the next line out of `bytes`: the finished line without its `\r\n` (or bare `\n`,
/// which hyper also accepts) when its end is in `bytes`, joined to the part `pending` kept
/// from earlier reads; `None` when `bytes` ends first (kept in `pending`). `Err` when the line
/// is too long to follow.
fn take_line<'b>(pending: &mut Vec<u8>, bytes: &mut &'b [u8]) -> Result<Option<Cow<'b, [u8]>>, ()> {
    let Some(end) = bytes.iter().position(|b| *b == b'\n') else {
        if pending.len() + bytes.len() > MAX_LINE {
            return Err(());
        }
        pending.extend_from_slice(bytes);
        *bytes = &[];
        return Ok(None);
    };
    let part = &bytes[..end];
    *bytes = &bytes[end + 1..];
    if pending.len() + part.len() > MAX_LINE {
        return Err(());
    }
    let line = if pending.is_empty() {
        Cow::Borrowed(part.strip_suffix(b"\r").unwrap_or(part))
    } else {
        let mut joined = std::mem::take(pending);
        joined.extend_from_slice(part);
        if joined.last() == Some(&b'\r') {
            joined.pop();
        }
        Cow::Owned(joined)
    };
    Ok(Some(line))
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |at| at + 1);
    &value[start..end]
}

/// Whether the last coding of a `Transfer-Encoding` value is `chunked`.
fn ends_chunked(value: &[u8]) -> bool {
    let last = value.rsplit(|b| *b == b',').next().unwrap_or_default();
    trim(last).eq_ignore_ascii_case(b"chunked")
}

impl Scanner {
    /// Follows `bytes`, the next bytes read from the connection; records a conflicting head
    /// in `watch`.
    pub fn feed(&mut self, mut bytes: &[u8], watch: &FramingWatch) {
        while !bytes.is_empty() {
            let taken = match &mut self.state {
                State::Stopped => return,
                State::Fixed { remaining } | State::ChunkData { remaining } => {
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *remaining -= take as u64;
                    bytes = &bytes[take..];
                    if *remaining == 0 {
                        self.state = match self.state {
                            State::ChunkData { .. } => State::ChunkEnd { line: Vec::new() },
                            _ => State::Head(Head::default()),
                        };
                    }
                    continue;
                }
                State::Head(Head { line, .. })
                | State::ChunkSize { line }
                | State::ChunkEnd { line }
                | State::Trailers { line } => take_line(line, &mut bytes),
            };
            let line = match taken {
                Err(()) => {
                    self.state = State::Stopped;
                    return;
                }
                // The rest of the line comes with a later read.
                Ok(None) => return,
                Ok(Some(line)) => line,
            };
            let next = match &self.state {
                State::Head(_) => self.head_line(&line, watch),
                State::ChunkSize { .. } => Some(chunk_size(&line)),
                State::ChunkEnd { .. } if line.is_empty() => {
                    Some(State::ChunkSize { line: Vec::new() })
                }
                State::ChunkEnd { .. } => Some(State::Stopped),
                State::Trailers { .. } if line.is_empty() => Some(State::Head(Head::default())),
                State::Trailers { .. }
                | State::Fixed { .. }
                | State::ChunkData { .. }
                | State::Stopped => None,
            };
            if let Some(next) = next {
                self.state = next;
            }
        }
    }

    /// A finished head line; the next state when the head is complete or unfollowable.
    fn head_line(&mut self, line: &[u8], watch: &FramingWatch) -> Option<State> {
        let State::Head(head) = &mut self.state else {
            return Some(State::Stopped);
        };
        if head.request_line.is_none() {
            // Empty lines before a request line are skipped, as hyper does.
            if !line.is_empty() {
                head.request_line = Some(line.starts_with(b"PRI "));
            }
            return None;
        }
        if !line.is_empty() {
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                return Some(State::Stopped);
            };
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.eq_ignore_ascii_case(b"content-length") {
                head.has_content_length = true;
                head.content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // Several lines form one list; the last coding is what counts.
                head.transfer_encoding = Some(value.to_vec());
            }
            return None;
        }
        // The head is complete.
        if head.request_line == Some(true) {
            // The HTTP/2 preface: the rest is frames, not HTTP/1.
            return Some(State::Stopped);
        }
        let position = self.heads;
        self.heads += 1;
        let head = std::mem::take(head);
        match (head.has_content_length, head.transfer_encoding) {
            (true, Some(_)) => {
                watch.record(position);
                // hyper closes the connection after this request.
                Some(State::Stopped)
            }
            (_, Some(coding)) if ends_chunked(&coding) => {
                Some(State::ChunkSize { line: Vec::new() })
            }
            // hyper refuses any other coding (400) and closes.
            (_, Some(_)) => Some(State::Stopped),
            (true, None) => match head.content_length {
                Some(0) => Some(State::Head(Head::default())),
                Some(length) => Some(State::Fixed { remaining: length }),
                None => Some(State::Stopped),
            },
            (false, None) => Some(State::Head(Head::default())),
        }
    }
}

/// The state after a chunk-size line: `<hex>[ws][;extensions]`.
fn chunk_size(line: &[u8]) -> State {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let size = std::str::from_utf8(&line[..digits])
        .ok()
        .and_then(|hex| u64::from_str_radix(hex, 16).ok());
    match size {
        None => State::Stopped,
        Some(0) => State::Trailers { line: Vec::new() },
        Some(size) => State::ChunkData { remaining: size },
    }
}

/// A connection's byte stream with its framing followed on the way in.
pub struct Watched<S> {
    inner: S,
    scanner: Scanner,
    watch: Arc<FramingWatch>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, watch: Arc<FramingWatch>) -> Watched<S> {
        Watched {
            inner,
            scanner: Scanner::default(),
            watch,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            this.scanner.feed(&buf.filled()[before..], &this.watch);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `piece` bytes; returns the conflicting position, if any.
    fn conflict(stream: &[u8], piece: usize) -> Option<u64> {
        let watch = FramingWatch::default();
        let mut scanner = Scanner::default();
        for chunk in stream.chunks(piece) {
            scanner.feed(chunk, &watch);
        }
        (0..16).find(|position| watch.conflicts_at(*position))
    }

    fn every_split(stream: &[u8]) -> Vec<Option<u64>> {
        [1, 2, 3, 7, 64, stream.len().max(1)]
            .into_iter()
            .map(|piece| conflict(stream, piece))
            .collect()
    }

    const FIXED: &[u8] =
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n\r\nTransfer-Encoding: chunked";
    const BOTH: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

    /// A chunked request whose chunks (with an extension) and trailer look like heads.
    fn chunked() -> Vec<u8> {
        let data = b"Content-Length: 5\r\n\r\nGET /x HTTP/1.1\r\n\r\n";
        let mut stream =
            b"POST /a HTTP/1.1\r\nHost: x\r\ntransfer-encoding: gzip, Chunked\r\n\r\n".to_vec();
        stream.extend_from_slice(format!("{:x};ext=1\r\n", data.len()).as_bytes());
        stream.extend_from_slice(data);
        stream.extend_from_slice(b"\r\n0\r\nContent-Length: 1\r\n\r\n");
        stream
    }

    #[test]
    fn a_head_with_both_headers_is_found_in_either_order_and_any_split() {
        assert!(every_split(BOTH).iter().all(|found| *found == Some(0)));
        let reversed =
            b"POST /a HTTP/1.1\nTransfer-Encoding: chunked\nContent-Length: 5\n\n5\nhello\n0\n\n";
        assert!(every_split(reversed).iter().all(|found| *found == Some(0)));
    }

    #[test]
    fn bodies_are_skipped_so_header_text_inside_them_is_not_a_head() {
        assert!(every_split(FIXED).iter().all(Option::is_none));
        assert!(every_split(&chunked()).iter().all(Option::is_none));
    }

    #[test]
    fn the_position_is_that_of_the_conflicting_request_behind_others() {
        let get = b"\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let stream = [FIXED, chunked().as_slice(), get.as_slice(), BOTH].concat();
        assert!(every_split(&stream).iter().all(|found| *found == Some(3)));
    }

    #[test]
    fn http2_and_unfollowable_streams_are_left_alone() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(conflict(preface, 5), None);
        let bad_chunk = [
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".as_slice(),
            BOTH,
        ]
        .concat();
        assert_eq!(conflict(&bad_chunk, 4), None);
    }
}
