//! The HTTP API: routing, request parsing, identity, and cart responses.
//!
//! `handle` is the whole request path: route → authenticate → parse → store → render. It knows
//! nothing of sockets (that is `server`) and takes no pool (that is `store`). Both path
//! prefixes (`/api/v1/cart…` and the seed's `/cart…`) reach the same handlers.

pub mod auth;
pub mod error;
pub mod lifecycle;
pub mod limits;
pub mod request;
pub mod router;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::app::App;
use crate::domain::cart::{self, AddRequest, CartView, StoredCart};
use crate::domain::ids::{ItemId, Owner, OwnerKey, SessionId};
use crate::domain::money::Currency;
use crate::forward;
use crate::store::{CartOp, Claim, Source, StoredResponse, WriteTx};
use error::ApiError;
use limits::Class;
use request::{AddItemBody, Caller, ClearBody, RequestParts, SetQuantityBody};
use router::{Lookup, Route as RouteRow, Surfaces};
use std::net::SocketAddr;

pub type Body = Full<Bytes>;

/// Header names of the cart contract.
pub mod names {
    pub const CART_VERSION: &str = "cart-version";
    pub const CART_SOURCE: &str = "cart-source";
    pub const CART_REGION: &str = "cart-region";
    pub const CART_SESSION: &str = "cart-session";
    pub const CART_MIN_VERSION: &str = "cart-min-version";
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
    pub const SESSION_COOKIE: &str = "cart_session";
    pub const MIN_VERSION_COOKIE: &str = "cart_min_version";
    pub const APPLICATION_JSON: &str = "application/json";
    pub const NO_STORE: &str = "no-store";
}

/// The socket peer of a request's connection (inserted by `server`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Present on requests whose connection is TLS (inserted by `server`): their responses carry
/// `Strict-Transport-Security`.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The public cart API (and `/health`, `/ready`).
    Public,
    /// The operator listener: `/health`, `/ready` only.
    Admin,
    /// The mutual-TLS listener for other regions' edges: forwarded requests and invalidations.
    /// Nothing that arrives here is forwarded again.
    Internal,
}

/// What serves a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    ViewCart,
    ClearCart,
    AddItem,
    SetItem,
    RemoveItem,
    Merge,
    Checkout,
    GetOrder,
    Settle(lifecycle::Settlement),
    Health,
    Ready,
    Metrics,
    Invalidate,
    MergeStep(&'static str),
}

const fn versioned(
    surfaces: Surfaces,
    method: Method,
    pattern: &'static str,
    name: &'static str,
    handler: Handler,
) -> RouteRow<Handler> {
    RouteRow {
        surfaces,
        method,
        pattern,
        name,
        handler,
        versioned: true,
    }
}

/// An edge-to-edge POST (no version prefix).
const fn internal(
    pattern: &'static str,
    name: &'static str,
    handler: Handler,
) -> RouteRow<Handler> {
    RouteRow {
        surfaces: Surfaces::INTERNAL,
        method: Method::POST,
        pattern,
        name,
        handler,
        versioned: false,
    }
}

/// Every route of every surface. A path matched on a surface but not for the request's method
/// is a 405 whose `Allow` lists the methods below in this order; anything else is a 404.
pub static ROUTES: [RouteRow<Handler>; 17] = {
    use Handler as H;
    use Method as M;
    use Surfaces as S;
    [
        versioned(S::CART, M::GET, "/cart", "cart", H::ViewCart),
        versioned(S::CART, M::DELETE, "/cart", "cart", H::ClearCart),
        versioned(S::CART, M::POST, "/cart/items", "cart_items", H::AddItem),
        versioned(
            S::CART,
            M::PUT,
            "/cart/items/{item_id}",
            "cart_item",
            H::SetItem,
        ),
        versioned(
            S::CART,
            M::DELETE,
            "/cart/items/{item_id}",
            "cart_item",
            H::RemoveItem,
        ),
        versioned(S::CART, M::POST, "/cart/merge", "merge", H::Merge),
        versioned(S::CART, M::POST, "/cart/checkout", "checkout", H::Checkout),
        versioned(S::CART, M::GET, "/orders/{order_id}", "order", H::GetOrder),
        versioned(
            S::CART,
            M::POST,
            "/orders/{order_id}/confirm",
            "order_confirm",
            H::Settle(lifecycle::Settlement::Confirm),
        ),
        versioned(
            S::CART,
            M::POST,
            "/orders/{order_id}/cancel",
            "order_cancel",
            H::Settle(lifecycle::Settlement::Cancel),
        ),
        versioned(S::ALL, M::GET, "/health", "health", H::Health),
        versioned(S::ALL, M::GET, "/ready", "ready", H::Ready),
        versioned(S::ADMIN, M::GET, "/metrics", "metrics", H::Metrics),
        internal(forward::invalidate::PATH, "invalidate", H::Invalidate),
        internal(
            lifecycle::FREEZE_PATH,
            "merge_freeze",
            H::MergeStep(lifecycle::FREEZE_PATH),
        ),
        internal(
            lifecycle::FINALIZE_PATH,
            "merge_finalize",
            H::MergeStep(lifecycle::FINALIZE_PATH),
        ),
        internal(
            lifecycle::ABORT_PATH,
            "merge_abort",
            H::MergeStep(lifecycle::ABORT_PATH),
        ),
    ]
};

/// The client- or operator-facing route a path names, as a stable label (for metrics and
/// benchmarks); None for no route.
pub fn route_name(path: &str) -> Option<&'static str> {
    router::name(&ROUTES, path)
}

/// Serves one request. Never fails: every error becomes a response.
pub async fn handle(
    app: Arc<App>,
    surface: Surface,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let over_tls = request.extensions().get::<OverTls>().is_some();
    let timeout = app.config.server.request_timeout.0;
    let response = match tokio::time::timeout(timeout, dispatch(&app, surface, request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => error.into_response(),
        Err(_) => ApiError::Unavailable {
            retry_after_secs: 1,
            cause: "request timed out".into(),
        }
        .into_response(),
    };
    let mut response = response;
    app.decorate(response.headers_mut(), over_tls);
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    Ok(response)
}

async fn dispatch(
    app: &Arc<App>,
    surface: Surface,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = request.into_parts();
    if surface == Surface::Internal {
        let ring = parts
            .headers
            .get(forward::client::names::RING)
            .and_then(|v| v.to_str().ok());
        if ring != Some(app.topology.ring.fingerprint()) {
            app.topology_mismatches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(theirs = ?ring, ours = app.topology.ring.fingerprint(), "request from an edge with another ring refused");
            return Err(ApiError::TopologyMismatch);
        }
    }
    let (handler, param) = match router::lookup(&ROUTES, surface, &parts.method, parts.uri.path()) {
        Lookup::Found(route, param) => (route.handler, param),
        Lookup::MethodNotAllowed(allow) => return Err(ApiError::MethodNotAllowed { allow }),
        Lookup::NotFound => return Err(ApiError::NotFound),
    };
    match handler {
        Handler::Health => return Ok(health(app).await),
        Handler::Ready => return Ok(ready(app)),
        Handler::Metrics => return Ok(metrics(app)),
        Handler::Invalidate => {
            let bytes = request::read_body(&parts, body, 1 << 20, true).await?;
            let batch: forward::invalidate::Batch = request::parse_json(&bytes)?;
            for cart in &batch.carts {
                app.store.cache.fence(&cart.owner, cart.version).await;
            }
            return Ok(json_response(
                StatusCode::OK,
                br#"{"status":"ok"}"#.to_vec(),
            ));
        }
        Handler::MergeStep(path) => {
            let bytes = request::read_body(&parts, body, 1 << 20, true).await?;
            return lifecycle::internal_step(app, path, &bytes).await;
        }
        _ => {}
    }
    let param = param.unwrap_or_default();
    let route = match handler {
        Handler::ViewCart | Handler::ClearCart => Route::Cart,
        Handler::AddItem => Route::CartItems,
        Handler::SetItem | Handler::RemoveItem => Route::CartItem(param),
        Handler::Merge => Route::Merge,
        Handler::Checkout => Route::Checkout,
        Handler::GetOrder => Route::Order(param),
        Handler::Settle(action) => Route::Settle(param, action),
        _ => return Err(ApiError::NotFound),
    };
    let method = parts.method.clone();
    let request = RequestParts::new(&parts);
    let class = match (route, &method) {
        (_, &Method::GET) => Class::Read,
        (Route::Checkout, _) => Class::Checkout,
        _ => Class::Write,
    };
    // Edge-to-edge requests were limited where they entered.
    let limited = surface == Surface::Public;
    let limits = app.limits.load();
    let auth = app.auth.load();
    let client_ip = || {
        let peer = parts
            .extensions
            .get::<Peer>()
            .map(|p| p.0)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        limits.client_ip(peer, &parts.headers)
    };
    let (caller, tier) = match request.authenticate_with_tier(&auth) {
        Ok(found) => found,
        Err(error) => {
            // Failed credentials are limited per client IP, so guessing is slow.
            if let Some(verdict) = limits
                .check_ip(client_ip())
                .filter(|v| limited && !v.admitted())
            {
                return Err(ApiError::RateLimited(verdict));
            }
            return Err(error);
        }
    };
    let verdict = if !limited {
        None
    } else {
        match &caller {
            Caller::Anonymous => limits.check_ip(client_ip()),
            Caller::User(user) => limits.check_owner(tier, class, &format!("u:{}", user.as_str())),
            Caller::Guest(session) => {
                limits.check_owner(tier, class, &format!("g:{}", session.as_str()))
            }
        }
    };
    if let Some(verdict) = &verdict {
        if !verdict.admitted() {
            return Err(ApiError::RateLimited(verdict.clone()));
        }
    }
    let mut response = serve_cart(app, &parts, body, &request, surface, route, caller).await?;
    if let Some(verdict) = &verdict {
        limits::set_headers(response.headers_mut(), verdict);
    }
    Ok(response)
}

/// The cart routes, once the caller is known and admitted.
async fn serve_cart(
    app: &Arc<App>,
    parts: &http::request::Parts,
    body: Incoming,
    request: &RequestParts<'_>,
    surface: Surface,
    route: Route<'_>,
    caller: Caller,
) -> Result<Response<Body>, ApiError> {
    let method = parts.method.clone();
    match route {
        Route::Cart if method == Method::GET => {
            request.check_user_id(&caller, request.query_user_id().as_deref())?;
            return view_cart(app, request, surface, caller).await;
        }
        Route::Order(id) => return lifecycle::get_order(app, request, surface, caller, id).await,
        Route::Settle(id, action) => {
            return lifecycle::settle(app, request, surface, id, action).await
        }
        Route::Merge | Route::Checkout => {
            let limit = app.config.server.max_body_bytes;
            let bytes = request::read_body(parts, body, limit, false).await?;
            return if route == Route::Merge {
                lifecycle::merge(app, request, surface, caller, &bytes).await
            } else {
                lifecycle::checkout(app, request, surface, caller, &bytes).await
            };
        }
        _ => {}
    }
    // Every other route is a write: read its body, check `user_id`, then validate.
    let required = matches!(
        (route, &method),
        (Route::CartItems, _) | (Route::CartItem(_), &Method::PUT)
    );
    let bytes = request::read_body(parts, body, app.config.server.max_body_bytes, required).await?;
    let if_match = request.if_match()?;
    let parsed = match route {
        Route::CartItems => ParsedWrite::Add(request::parse_json(&bytes)?),
        Route::CartItem(raw_id) => {
            let decoded = request::decode_path_segment(raw_id).ok_or_else(|| {
                ApiError::InvalidRequest("item_id in the path is not valid percent-encoding".into())
            })?;
            let item_id =
                ItemId::parse(&decoded).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
            if method == Method::PUT {
                ParsedWrite::Set(item_id, request::parse_json(&bytes)?)
            } else {
                ParsedWrite::Remove(item_id, request::parse_json_or_default(&bytes)?)
            }
        }
        _ => ParsedWrite::Clear(request::parse_json_or_default(&bytes)?),
    };
    let query_user_id = request.query_user_id();
    request.check_user_id(&caller, parsed.user_id().or(query_user_id.as_deref()))?;
    let kind = match parsed {
        ParsedWrite::Add(body) => WriteKind::Add(body.validate()?),
        ParsedWrite::Set(item_id, body) => WriteKind::Set {
            quantity: body.validate()?,
            item_id,
            if_match,
        },
        ParsedWrite::Remove(item_id, _) => WriteKind::Remove { item_id, if_match },
        ParsedWrite::Clear(_) => WriteKind::Clear { if_match },
    };
    write(app, request, surface, &method, caller, &bytes, kind).await
}

/// A write's body, parsed but not yet validated (so `user_id` is checked first).
enum ParsedWrite {
    Add(AddItemBody),
    Set(ItemId, SetQuantityBody),
    Remove(ItemId, ClearBody),
    Clear(ClearBody),
}

impl ParsedWrite {
    fn user_id(&self) -> Option<&str> {
        match self {
            ParsedWrite::Add(body) => body.user_id.as_deref(),
            ParsedWrite::Set(_, body) => body.user_id.as_deref(),
            ParsedWrite::Remove(_, body) | ParsedWrite::Clear(body) => body.user_id.as_deref(),
        }
    }
}

async fn health(app: &App) -> Response<Body> {
    let probe_timeout = std::time::Duration::from_millis(500);
    let (database, redis) = tokio::join!(
        app.store.databases_healthy(probe_timeout),
        app.store.cache.ping()
    );
    let status = match (database, redis) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let body = json!({
        "status": status,
        "region": app.config.region.id,
        "database": if database { "ok" } else { "unavailable" },
        "redis": if redis { "ok" } else { "unavailable" },
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let code = if database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(code, serde_json::to_vec(&body).unwrap_or_default())
}

/// Prometheus text exposition of the edge's counters (admin surface).
fn metrics(app: &App) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(app.metrics_text())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn ready(app: &App) -> Response<Body> {
    if app.is_draining() {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"draining"}"#.to_vec(),
        )
    } else {
        json_response(StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
    }
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn view_cart(
    app: &App,
    request: &RequestParts<'_>,
    surface: Surface,
    caller: Caller,
) -> Result<Response<Body>, ApiError> {
    let owner = match caller {
        Caller::User(user) => Owner::User(user),
        Caller::Guest(session) => Owner::Guest(session),
        Caller::Anonymous => {
            // A guest with no session sees an empty cart; nothing is created.
            let cart = StoredCart::empty("");
            let view = render_view(app, &cart).await;
            return Ok(cart_response(
                app,
                StatusCode::OK,
                &view,
                Source::Replica,
                None,
            ));
        }
    };
    let min_version = request.min_version()?;
    let owner_key = owner.key();
    let placement = app.topology.ring.locate(owner_key.as_str());
    let (mut cart, mut source, min_version) = app
        .store
        .load_cart(placement.shard, &owner_key, min_version)
        .await?;
    let mut warnings = Vec::new();
    if cart.version < min_version && surface != Surface::Internal {
        // Only outside the home region can the freshest copy be older than the caller's last
        // write: give the local replica a bounded moment to replay, then ask the home region.
        match wait_for_replica(app, placement.shard, &owner_key, min_version).await? {
            Some(replayed) => (cart, source) = (replayed, Source::Replica),
            None => match forward(
                app,
                request,
                &Method::GET,
                placement.home,
                None,
                None,
                Bytes::new(),
            )
            .await
            {
                Ok(response) => return Ok(response),
                Err(error) => {
                    tracing::warn!(%error, home = placement.home, "home region unreachable; serving the replica's older cart");
                    warnings.push(cart::Warning {
                        code: "stale_possible",
                        item_id: None,
                        message: format!(
                            "the home region {} is unreachable; this cart may be older than version {min_version}",
                            placement.home
                        ),
                    });
                }
            },
        }
    }
    if warnings.is_empty() && !app.store.is_home(placement.shard) {
        let lag = app.store.replica_lag(placement.shard);
        if lag.is_none_or(|lag| lag > app.config.forward.max_replica_lag.0) {
            let behind = match lag {
                Some(lag) => format!("{} ms behind", lag.as_millis()),
                None => "of unknown lag".to_string(),
            };
            warnings.push(cart::Warning {
                code: "stale_possible",
                item_id: None,
                message: format!("served in {} from a replica {behind}", app.config.region.id),
            });
        }
    }
    if request.if_none_match_matches(cart.version) && warnings.is_empty() {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        set_cart_headers(app, response.headers_mut(), cart.version, source);
        return Ok(response);
    }
    let mut view = render_view(app, &cart).await;
    view.warnings.extend(warnings);
    let session = match &owner {
        Owner::Guest(session) => Some(SessionHeader::Existing(session)),
        Owner::User(_) => None,
    };
    Ok(cart_response(app, StatusCode::OK, &view, source, session))
}

/// Polls the local replica until it holds `min_version`, for at most `forward.replica_wait`.
async fn wait_for_replica(
    app: &App,
    shard: &str,
    owner: &OwnerKey,
    min_version: i64,
) -> Result<Option<StoredCart>, ApiError> {
    let deadline = Instant::now() + app.config.forward.replica_wait.0;
    while Instant::now() < deadline {
        tokio::time::sleep(REPLICA_POLL).await;
        let (cart, _) = app
            .store
            .read_from_database(shard, owner, min_version)
            .await?;
        if cart.version >= min_version {
            app.store.cache.fill(&cart).await;
            return Ok(Some(cart));
        }
    }
    Ok(None)
}

/// How often a read waiting for replication re-reads the replica.
const REPLICA_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The currency of the region whose edge received the request from the client: this one, or
/// for a forwarded request the forwarding region's.
fn receiving_currency(app: &App, request: &RequestParts<'_>, surface: Surface) -> Currency {
    if surface != Surface::Internal {
        return app.config.region.currency;
    }
    request
        .headers()
        .get(forward::client::names::FORWARDED_FROM)
        .and_then(|v| v.to_str().ok())
        .and_then(|region| app.topology.regions.get(region))
        .map(|peer| peer.currency)
        .unwrap_or(app.config.region.currency)
}

/// The client to other regions' edges. Its absence when a request needs another region is a
/// configuration bug (a ring with several regions but no edge-to-edge TLS), not an outage.
pub(crate) fn forwarder_to<'a>(
    app: &'a App,
    home: &str,
) -> Result<&'a Arc<forward::client::Forwarder>, ApiError> {
    app.forwarder.as_ref().ok_or_else(|| {
        ApiError::Internal(format!(
            "a request needs region {home} but no edge-to-edge TLS is configured"
        ))
    })
}

/// Headers a forward carries from the client's request: identity, body type, preconditions.
const FORWARDED_HEADERS: [&str; 6] = [
    "authorization",
    "content-type",
    "if-match",
    "if-none-match",
    "cart-min-version",
    "cookie",
];

/// Sends the request to the home region's edge and relays its answer. `session` is a guest
/// session minted here (the home edge sees it as presented); `idempotency_key` is the key the
/// write runs under (the client's or one minted here).
async fn forward(
    app: &App,
    request: &RequestParts<'_>,
    method: &Method,
    home: &str,
    session: Option<&SessionId>,
    idempotency_key: Option<&str>,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let forwarder = forwarder_to(app, home)?;
    let mut headers = HeaderMap::new();
    for name in FORWARDED_HEADERS {
        for value in request.headers().get_all(name) {
            headers.append(HeaderName::from_static(name), value.clone());
        }
    }
    let presented = session.map(|s| s.as_str().to_string()).or_else(|| {
        request
            .headers()
            .get(names::CART_SESSION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    if let Some(value) = presented.and_then(|s| HeaderValue::from_str(&s).ok()) {
        headers.insert(HeaderName::from_static(names::CART_SESSION), value);
    }
    if let Some(value) = idempotency_key.and_then(|k| HeaderValue::from_str(k).ok()) {
        headers.insert(HeaderName::from_static(names::IDEMPOTENCY_KEY), value);
    }
    headers.insert(
        HeaderName::from_static(forward::client::names::FORWARDED_FROM),
        app.region_header.clone(),
    );
    if let Ok(ring) = HeaderValue::from_str(app.topology.ring.fingerprint()) {
        headers.insert(HeaderName::from_static(forward::client::names::RING), ring);
    }
    let answer = forwarder
        .send(
            home,
            method.clone(),
            request.path_and_query(),
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
        if !matches!(
            name.as_str(),
            "content-length" | "connection" | "transfer-encoding" | "date"
        ) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok(response)
}

/// Builds the client's view with current catalog prices.
async fn render_view(app: &App, cart: &StoredCart) -> CartView {
    let lookup = app
        .store
        .catalog
        .lookup(cart.lines.iter().map(|l| l.item_id.as_str()))
        .await;
    let mut view = cart::view(cart, app.config.region.currency, |id| lookup.get(id));
    if !lookup.complete {
        view.warnings.retain(|w| w.code != "item_unavailable");
        view.warnings.push(cart::Warning {
            code: "prices_unavailable",
            item_id: None,
            message: "current catalog prices could not be read".into(),
        });
    }
    view
}

enum SessionHeader<'a> {
    Existing(&'a SessionId),
    New(&'a SessionId),
}

fn set_cart_headers(app: &App, headers: &mut HeaderMap, version: i64, source: Source) {
    headers.insert(header::ETAG, etag(version));
    headers.insert(
        HeaderName::from_static(names::CART_VERSION),
        HeaderValue::from(version),
    );
    headers.insert(
        HeaderName::from_static(names::CART_SOURCE),
        HeaderValue::from_static(source.as_str()),
    );
    headers.insert(
        HeaderName::from_static(names::CART_REGION),
        app.region_header.clone(),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

fn cart_response(
    app: &App,
    status: StatusCode,
    view: &CartView,
    source: Source,
    session: Option<SessionHeader<'_>>,
) -> Response<Body> {
    let body = Bytes::from(serde_json::to_vec(view).unwrap_or_default());
    build_cart_response(app, status, body, view.version, source, session)
}

fn build_cart_response(
    app: &App,
    status: StatusCode,
    body: Bytes,
    version: i64,
    source: Source,
    session: Option<SessionHeader<'_>>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    set_cart_headers(app, headers, version, source);
    match session {
        Some(SessionHeader::Existing(session)) => {
            if let Ok(value) = HeaderValue::from_str(session.as_str()) {
                headers.insert(HeaderName::from_static(names::CART_SESSION), value);
            }
        }
        Some(SessionHeader::New(session)) => append_session_cookie(app, headers, session),
        None => {}
    }
    response
}

/// Hands a newly minted guest session to the client: `Cart-Session` and the `cart_session`
/// cookie.
fn append_session_cookie(app: &App, headers: &mut HeaderMap, session: &SessionId) {
    if let Ok(value) = HeaderValue::from_str(session.as_str()) {
        headers.insert(HeaderName::from_static(names::CART_SESSION), value);
    }
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Lax{}",
        names::SESSION_COOKIE,
        session.as_str(),
        if app.tls { "; Secure" } else { "" }
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

/// Marks a committed write: the home region that applied it, and the `cart_min_version` cookie
/// that makes a browser's next read, in any region, at least this fresh.
fn mark_write(app: &App, headers: &mut HeaderMap, version: i64) {
    headers.insert(
        HeaderName::from_static(forward::client::names::HOME_REGION),
        app.region_header.clone(),
    );
    let cookie = format!(
        "{}={version}; Path=/; SameSite=Lax{}",
        names::MIN_VERSION_COOKIE,
        if app.tls { "; Secure" } else { "" }
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

/// A validated mutation, before it is bound to a cart.
enum WriteKind {
    Add(request::ValidAdd),
    Set {
        item_id: ItemId,
        quantity: cart::Quantity,
        if_match: Option<i64>,
    },
    Remove {
        item_id: ItemId,
        if_match: Option<i64>,
    },
    Clear {
        if_match: Option<i64>,
    },
}

impl WriteKind {
    fn fingerprint_parts(&self) -> (&'static str, &str, Option<i64>) {
        match self {
            WriteKind::Add(add) => ("add", add.item_id.as_str(), None),
            WriteKind::Set {
                item_id, if_match, ..
            } => ("set", item_id.as_str(), *if_match),
            WriteKind::Remove { item_id, if_match } => ("remove", item_id.as_str(), *if_match),
            WriteKind::Clear { if_match } => ("clear", "", *if_match),
        }
    }
}

/// Runs one mutation: one transaction on the primary with the idempotency key, then the cache.
#[allow(clippy::too_many_arguments)]
async fn write(
    app: &App,
    request: &RequestParts<'_>,
    surface: Surface,
    method: &Method,
    caller: Caller,
    body: &Bytes,
    kind: WriteKind,
) -> Result<Response<Body>, ApiError> {
    let idempotency_key = request.idempotency_key()?;
    let (owner, new_session) = match caller {
        Caller::User(user) => (Owner::User(user), None),
        Caller::Guest(session) => (Owner::Guest(session), None),
        Caller::Anonymous => {
            let session = app.auth.load().issue_session();
            (Owner::Guest(session.clone()), Some(session))
        }
    };
    let owner_key = owner.key();
    let placement = app.topology.ring.locate(owner_key.as_str());
    if placement.home != app.config.region.id {
        return forward_write(
            app,
            request,
            surface,
            method,
            placement.home,
            (idempotency_key, new_session.as_ref()),
            &owner_key,
            body,
        )
        .await;
    }
    let (operation, item, if_match) = kind.fingerprint_parts();
    let fingerprint = request::fingerprint(operation, item, if_match, body);

    // Adds need the catalog's current entry; read it fresh, before taking the cart's lock.
    let catalog_item = match &kind {
        WriteKind::Add(add) => app.store.catalog.get_fresh(add.item_id.as_str()).await?,
        _ => None,
    };

    let mut tx = app.store.begin_write(placement.shard).await?;
    if let Some(key) = idempotency_key {
        if let Some(answer) = claim(&mut tx, &owner_key, key, &fingerprint).await? {
            return answer;
        }
    }
    let add_request;
    let op = match &kind {
        WriteKind::Add(add) => {
            add_request = AddRequest {
                quantity: add.quantity,
                client_price: add.price,
            };
            CartOp::Add {
                item_id: &add.item_id,
                item: catalog_item.as_deref(),
                request: &add_request,
                variant: add.variant.as_ref(),
                new_cart_currency: receiving_currency(app, request, surface),
                max_lines: app.config.cart.max_lines,
            }
        }
        WriteKind::Set {
            item_id,
            quantity,
            if_match,
        } => CartOp::SetQuantity {
            item_id,
            quantity: *quantity,
            if_match: *if_match,
        },
        WriteKind::Remove { item_id, if_match } => CartOp::Remove {
            item_id,
            if_match: *if_match,
        },
        WriteKind::Clear { if_match } => CartOp::Clear {
            if_match: *if_match,
        },
    };
    let cart = match tx.apply(&owner_key, &op).await? {
        Ok(cart) => cart,
        Err(rule) => {
            tx.rollback().await;
            return Err(ApiError::Rule(rule));
        }
    };
    let view = render_view(app, &cart).await;
    let session_header = new_session
        .as_ref()
        .map(SessionHeader::New)
        .or(match &owner {
            Owner::Guest(session) => Some(SessionHeader::Existing(session)),
            Owner::User(_) => None,
        });
    let body = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
    let mut response = build_cart_response(
        app,
        StatusCode::OK,
        body.clone(),
        view.version,
        Source::Primary,
        session_header,
    );
    mark_write(app, response.headers_mut(), view.version);
    if let Some(key) = idempotency_key {
        tx.record_idempotency(&owner_key, key, &fingerprint, &to_stored(&response, body))
            .await?;
    }
    tx.commit().await?;
    if cart.version > 0 {
        app.store.cache.store_committed(&cart).await;
        app.invalidate_elsewhere(&owner_key, cart.version);
    }
    tracing::debug!(owner = %owner_key, version = cart.version, operation, "cart written");
    Ok(response)
}

/// A forward's idempotency key: the client's, or one minted here.
fn forward_key(client_key: Option<&str>) -> String {
    client_key
        .map(str::to_string)
        .unwrap_or_else(|| format!("fwd-{}", hex::encode(rand::random::<[u8; 16]>())))
}

/// Sends a write to the owner's home edge, always with an idempotency key (so a retry after a
/// lost answer applies once), then fences this region's cache at the version the home answered
/// with. `identity` is the client's key and a guest session minted here, if any.
#[allow(clippy::too_many_arguments)]
async fn forward_write(
    app: &App,
    request: &RequestParts<'_>,
    surface: Surface,
    method: &Method,
    home: &str,
    identity: (Option<&str>, Option<&SessionId>),
    owner: &OwnerKey,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    if surface == Surface::Internal {
        // A forwarded request is never forwarded again.
        return Err(ApiError::Misdirected);
    }
    let (client_key, new_session) = identity;
    let key = forward_key(client_key);
    let mut response = forward(
        app,
        request,
        method,
        home,
        new_session,
        Some(&key),
        body.clone(),
    )
    .await?;
    if response.status().is_success() {
        let version = response
            .headers()
            .get(names::CART_VERSION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok());
        if let Some(version) = version {
            // Our region's cache must not keep serving what this write replaced.
            app.store.cache.fence(owner.as_str(), version).await;
        }
        if let Some(session) = new_session {
            append_session_cookie(app, response.headers_mut(), session);
        }
    }
    Ok(response)
}

/// Claims an idempotency key in `tx`. `None`: fresh, go ahead. `Some(answer)`: the transaction
/// was rolled back and `answer` (the stored response, or why the key cannot be used) is final.
async fn claim(
    tx: &mut WriteTx,
    owner: &OwnerKey,
    key: &str,
    fingerprint: &[u8],
) -> Result<Option<Result<Response<Body>, ApiError>>, ApiError> {
    let answer = match tx.claim_idempotency(owner, key, fingerprint).await? {
        Claim::Fresh => return Ok(None),
        Claim::Replay(stored) => Ok(replay(stored)),
        Claim::Reused => Err(ApiError::IdempotencyKeyReused),
        Claim::InProgress => Err(ApiError::RequestInProgress),
    };
    tx.rollback_in_place().await;
    Ok(Some(answer))
}

fn to_stored(response: &Response<Body>, body: Bytes) -> StoredResponse {
    let headers = response
        .headers()
        .iter()
        // A replay goes to the same owner, who already holds the session: never re-send it.
        .filter(|(name, value)| {
            *name != header::SET_COOKIE
                || !value
                    .as_bytes()
                    .starts_with(names::SESSION_COOKIE.as_bytes())
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
        })
        .collect();
    StoredResponse {
        status: response.status().as_u16(),
        headers,
        body,
    }
}

fn replay(stored: StoredResponse) -> Response<Body> {
    let mut response = Response::new(Full::new(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.append(name, value);
        }
    }
    headers.insert(
        HeaderName::from_static(names::IDEMPOTENT_REPLAYED),
        HeaderValue::from_static("true"),
    );
    response
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Cart,
    CartItems,
    CartItem(&'a str),
    Merge,
    Checkout,
    Order(&'a str),
    Settle(&'a str, lifecycle::Settlement),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(surface: Surface, method: Method, path: &str) -> Option<(Handler, Option<&str>)> {
        match router::lookup(&ROUTES, surface, &method, path) {
            Lookup::Found(route, param) => Some((route.handler, param)),
            _ => None,
        }
    }

    #[test]
    fn both_prefixes_reach_the_same_routes() {
        for prefix in ["", "/api/v1"] {
            let at = |path: &str| format!("{prefix}{path}");
            assert_eq!(route_name(&at("/cart")), Some("cart"));
            assert_eq!(route_name(&at("/cart/items")), Some("cart_items"));
            assert_eq!(
                found(Surface::Public, Method::PUT, &at("/cart/items/sku-1")),
                Some((Handler::SetItem, Some("sku-1")))
            );
            assert_eq!(route_name(&at("/cart/items/")), None);
            assert_eq!(route_name(&at("/cart/items/a/b")), None);
            assert_eq!(route_name(&at("/health")), Some("health"));
        }
        assert_eq!(route_name("/api/v1cart"), None);
        assert_eq!(route_name("/api/v2/cart"), None);
    }

    #[test]
    fn surfaces_see_only_their_routes_and_405_lists_the_table_methods() {
        assert!(found(Surface::Admin, Method::GET, "/cart").is_none());
        assert!(matches!(
            router::lookup(&ROUTES, Surface::Admin, &Method::GET, "/cart"),
            Lookup::NotFound
        ));
        assert!(matches!(
            router::lookup(&ROUTES, Surface::Public, &Method::GET, "/metrics"),
            Lookup::NotFound
        ));
        assert!(found(Surface::Admin, Method::GET, "/metrics").is_some());
        match router::lookup(&ROUTES, Surface::Public, &Method::POST, "/cart") {
            Lookup::MethodNotAllowed(allow) => assert_eq!(allow, "GET, DELETE"),
            other => panic!("{other:?}"),
        }
        match router::lookup(&ROUTES, Surface::Public, &Method::GET, "/cart/items/x") {
            Lookup::MethodNotAllowed(allow) => assert_eq!(allow, "PUT, DELETE"),
            other => panic!("{other:?}"),
        }
        let freeze = lifecycle::FREEZE_PATH;
        assert!(found(Surface::Internal, Method::POST, freeze).is_some());
        assert!(found(Surface::Public, Method::POST, freeze).is_none());
        let prefixed = format!("/api/v1{freeze}");
        assert!(found(Surface::Internal, Method::POST, &prefixed).is_none());
        assert_eq!(route_name(freeze), None);
    }
}
