//! Edge-to-edge traffic between regions: mutual TLS material ([`tls`]), the HTTP/2 client (one
//! multiplexed connection per peer) that forwards writes and home-region reads ([`client`]),
//! the batched cross-region cache fences ([`invalidate`]), the janitor's question about a
//! stale merge to the user cart's home ([`settle`]), the reconciler's parked adds sent to
//! their home ([`parked`]) and the steps of a cart move run on the old shard's home
//! ([`moves`]).

pub mod client;
pub mod invalidate;
pub mod moves;
pub mod parked;
pub mod settle;
pub mod tls;

pub use client::{ForwardError, Forwarded, Forwarder, Settings};

/// Headers of an edge's own JSON request to another region's internal surface: the content
/// type, this edge's region (`from`) and its ring fingerprint (the receiving edge refuses
/// another ring).
pub(crate) fn internal_json_headers(from: &str, fingerprint: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let (Ok(from), Ok(ring)) = (
        http::HeaderValue::from_str(from),
        http::HeaderValue::from_str(fingerprint),
    ) {
        headers.insert(client::names::FORWARDED_FROM, from);
        headers.insert(client::names::RING, ring);
    }
    headers
}
