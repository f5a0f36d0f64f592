//! Relaying a request to the edge of the region that is home to its cart or order, and relaying
//! the answer back. It owns which request headers travel, the edge-to-edge headers
//! (`Cart-Forwarded-From`, `Cart-Ring`), the key every relayed write carries, and fencing this
//! region's cache after a relayed write. Whether to relay is decided elsewhere (`command`). The
//! client's `traceparent` is not relayed as sent: the forwarder sends the request's own trace on
//! (a child span of this edge's), so the home edge's lines join this one's.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{header, Method, Response};
use http_body_util::Full;

use super::error::ApiError;
use super::{names, response, Body, Surface};
use crate::app::App;
use crate::domain::ids::{OwnerKey, SessionId};
use crate::forward::client::{names as fwd, Forwarder};

/// Headers a relay carries from the client's request: identity, body type, preconditions.
const RELAYED_HEADERS: [HeaderName; 6] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    HeaderName::from_static(names::CART_MIN_VERSION),
    header::COOKIE,
];

/// What a relay re-sends of the client's request head, captured when the request is read.
#[derive(Debug)]
pub struct RelayHead {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
}

impl RelayHead {
    pub fn of(parts: &Parts) -> RelayHead {
        let mut headers = HeaderMap::new();
        for name in RELAYED_HEADERS
            .iter()
            .chain([&HeaderName::from_static(names::CART_SESSION)])
        {
            for value in parts.headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        RelayHead {
            // A HEAD is relayed as the GET it stands for, so this edge learns the body's length
            // (and drops the body itself).
            method: if parts.method == http::Method::HEAD {
                http::Method::GET
            } else {
                parts.method.clone()
            },
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string(),
            headers,
        }
    }
}

/// The client to other regions' edges. Its absence when a request needs another region is a
/// configuration bug (a ring with several regions but no edge-to-edge TLS), not an outage.
pub fn forwarder_to<'a>(app: &'a App, home: &str) -> Result<&'a Arc<Forwarder>, ApiError> {
    app.forwarder.as_ref().ok_or_else(|| {
        ApiError::Internal(format!(
            "a request needs region {home} but no edge-to-edge TLS is configured"
        ))
    })
}

/// The edge-to-edge headers every request to a peer carries.
pub fn peer_headers(app: &App, headers: &mut HeaderMap) {
    headers.insert(
        HeaderName::from_static(fwd::FORWARDED_FROM),
        app.region_header.clone(),
    );
    if let Ok(ring) = HeaderValue::from_str(app.topology().ring.fingerprint()) {
        headers.insert(HeaderName::from_static(fwd::RING), ring);
    }
}

/// Sends the request to the home region's edge and relays its answer. `session` is a guest
/// session minted here (the home edge sees it as presented); `idempotency_key` is the key the
/// write runs under (the client's or one minted here).
pub async fn forward(
    app: &App,
    head: &RelayHead,
    home: &str,
    session: Option<&SessionId>,
    idempotency_key: Option<&str>,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let forwarder = forwarder_to(app, home)?;
    let mut headers = head.headers.clone();
    if let Some(value) = session.and_then(|s| HeaderValue::from_str(s.as_str()).ok()) {
        headers.insert(HeaderName::from_static(names::CART_SESSION), value);
    }
    if let Some(value) = idempotency_key.and_then(|k| HeaderValue::from_str(k).ok()) {
        headers.insert(HeaderName::from_static(names::IDEMPOTENCY_KEY), value);
    }
    peer_headers(app, &mut headers);
    let answer = forwarder
        .send(
            home,
            head.method.clone(),
            &head.path_and_query,
            &headers,
            body,
        )
        .await
        .map_err(|error| {
            ApiError::home_unreachable(&error, home, forwarder.retry_after_secs(), idempotency_key)
        })?;
    let mut response = Response::new(Full::new(answer.body));
    *response.status_mut() = answer.status;
    for (name, value) in &answer.headers {
        let hop_by_hop = [
            header::CONTENT_LENGTH,
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::DATE,
        ];
        if !hop_by_hop.contains(name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok(response)
}

/// What a relayed write needs besides the request.
pub struct Write<'a> {
    pub surface: Surface,
    pub home: &'a str,
    /// The client's key, if it sent one.
    pub client_key: Option<&'a str>,
    /// A guest session minted here for this write.
    pub new_session: Option<&'a SessionId>,
    /// The cart whose version the answer reports, to fence this region's cache at.
    pub owner: Option<&'a OwnerKey>,
    pub body: Bytes,
}

/// An Idempotency-Key for a relayed write whose client sent none.
pub fn mint_key() -> String {
    format!("fwd-{}", hex::encode(rand::random::<[u8; 16]>()))
}

/// Sends a write to the owner's home edge, always with an idempotency key (so a retry after a
/// lost answer applies once), then fences this region's cache at the version the home answered
/// with.
pub async fn forward_write(
    app: &App,
    head: &RelayHead,
    write: Write<'_>,
) -> Result<Response<Body>, ApiError> {
    if write.surface == Surface::Internal {
        // A forwarded request is never forwarded again.
        return Err(ApiError::Misdirected);
    }
    let key = write
        .client_key
        .map(str::to_string)
        .unwrap_or_else(mint_key);
    let mut response = forward(
        app,
        head,
        write.home,
        write.new_session,
        Some(&key),
        write.body,
    )
    .await?;
    if response.status().is_success() {
        let version = response
            .headers()
            .get(names::CART_VERSION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok());
        if let (Some(owner), Some(version)) = (write.owner, version) {
            // Our region's cache must not keep serving what this write replaced.
            app.store.cache.fence(owner.as_str(), version).await;
        }
        if let Some(session) = write.new_session {
            response::append_session_cookie(app, response.headers_mut(), session);
        }
    }
    Ok(response)
}
