//! The HTTP API: routing, request parsing, identity, and cart responses.
//!
//! `handle` is the whole request path: route → authenticate → parse → store → render. It knows
//! nothing of sockets (that is `server`) and takes no pool (that is `store`). Both path
//! prefixes (`/api/v1/cart…` and the seed's `/cart…`) reach the same handlers.

pub mod auth;
pub mod error;
pub mod request;

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
use crate::domain::ids::{ItemId, Owner, SessionId};
use crate::store::{CartOp, Claim, Source, StoredResponse};
use error::ApiError;
use request::{AddItemBody, Caller, ClearBody, RequestParts, SetQuantityBody};

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
}

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The public cart API (and `/health`, `/ready`).
    Public,
    /// The operator listener: `/health`, `/ready` only.
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Cart,
    CartItems,
    CartItem(&'a str),
    Health,
    Ready,
}

fn route(path: &str) -> Option<Route<'_>> {
    let path = match path.strip_prefix("/api/v1") {
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    };
    match path {
        "/cart" => Some(Route::Cart),
        "/cart/items" => Some(Route::CartItems),
        "/health" => Some(Route::Health),
        "/ready" => Some(Route::Ready),
        _ => path
            .strip_prefix("/cart/items/")
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .map(Route::CartItem),
    }
}

/// The route a path names, as a stable label (for metrics and benchmarks); None for no route.
pub fn route_name(path: &str) -> Option<&'static str> {
    route(path).map(|r| match r {
        Route::Cart => "cart",
        Route::CartItems => "cart_items",
        Route::CartItem(_) => "cart_item",
        Route::Health => "health",
        Route::Ready => "ready",
    })
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
    app.decorate(response.headers_mut());
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    Ok(response)
}

async fn dispatch(
    app: &Arc<App>,
    surface: Surface,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = request.into_parts();
    let route = route(parts.uri.path()).ok_or(ApiError::NotFound)?;
    if surface == Surface::Admin && !matches!(route, Route::Health | Route::Ready) {
        return Err(ApiError::NotFound);
    }
    let method = parts.method.clone();
    match (route, &method) {
        (Route::Health, &Method::GET) => return Ok(health(app).await),
        (Route::Ready, &Method::GET) => return Ok(ready(app)),
        (Route::Health | Route::Ready, _) => {
            return Err(ApiError::MethodNotAllowed { allow: "GET" })
        }
        _ => {}
    }
    let allow = match route {
        Route::Cart => "GET, DELETE",
        Route::CartItems => "POST",
        _ => "PUT, DELETE",
    };
    let allowed = matches!(
        (route, &method),
        (Route::Cart, &Method::GET | &Method::DELETE)
            | (Route::CartItems, &Method::POST)
            | (Route::CartItem(_), &Method::PUT | &Method::DELETE)
    );
    if !allowed {
        return Err(ApiError::MethodNotAllowed { allow });
    }
    let request = RequestParts::new(&parts);
    let caller = request.authenticate(&app.auth)?;
    match route {
        Route::Cart if method == Method::GET => {
            request.check_user_id(&caller, request.query_user_id().as_deref())?;
            view_cart(app, &request, caller).await
        }
        Route::Cart => {
            let bytes =
                request::read_body(&parts, body, app.config.server.max_body_bytes, false).await?;
            let parsed: ClearBody = request::parse_json_or_default(&bytes)?;
            request.check_user_id(
                &caller,
                parsed
                    .user_id
                    .as_deref()
                    .or(request.query_user_id().as_deref()),
            )?;
            let if_match = request.if_match()?;
            write(app, &request, caller, &bytes, WriteKind::Clear { if_match }).await
        }
        Route::CartItems => {
            let bytes =
                request::read_body(&parts, body, app.config.server.max_body_bytes, true).await?;
            let parsed: AddItemBody = request::parse_json(&bytes)?;
            request.check_user_id(
                &caller,
                parsed
                    .user_id
                    .as_deref()
                    .or(request.query_user_id().as_deref()),
            )?;
            let add = parsed.validate()?;
            write(app, &request, caller, &bytes, WriteKind::Add(add)).await
        }
        Route::CartItem(raw_id) => {
            let item_id =
                ItemId::parse(raw_id).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
            let if_match = request.if_match()?;
            if method == Method::PUT {
                let bytes =
                    request::read_body(&parts, body, app.config.server.max_body_bytes, true)
                        .await?;
                let parsed: SetQuantityBody = request::parse_json(&bytes)?;
                request.check_user_id(
                    &caller,
                    parsed
                        .user_id
                        .as_deref()
                        .or(request.query_user_id().as_deref()),
                )?;
                let quantity = parsed.validate()?;
                write(
                    app,
                    &request,
                    caller,
                    &bytes,
                    WriteKind::Set {
                        item_id,
                        quantity,
                        if_match,
                    },
                )
                .await
            } else {
                let bytes =
                    request::read_body(&parts, body, app.config.server.max_body_bytes, false)
                        .await?;
                let parsed: ClearBody = request::parse_json_or_default(&bytes)?;
                request.check_user_id(
                    &caller,
                    parsed
                        .user_id
                        .as_deref()
                        .or(request.query_user_id().as_deref()),
                )?;
                write(
                    app,
                    &request,
                    caller,
                    &bytes,
                    WriteKind::Remove { item_id, if_match },
                )
                .await
            }
        }
        Route::Health | Route::Ready => Err(ApiError::NotFound),
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

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
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
    let shard = app.shard_of(&owner_key);
    let (cart, source) = app.store.load_cart(shard, &owner_key, min_version).await?;
    if request.if_none_match_matches(cart.version) {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        set_cart_headers(app, response.headers_mut(), cart.version, source);
        return Ok(response);
    }
    let view = render_view(app, &cart).await;
    let session = match &owner {
        Owner::Guest(session) => Some(SessionHeader::Existing(session)),
        Owner::User(_) => None,
    };
    Ok(cart_response(app, StatusCode::OK, &view, source, session))
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
        Some(SessionHeader::New(session)) => {
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
                headers.insert(header::SET_COOKIE, value);
            }
        }
        None => {}
    }
    response
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
async fn write(
    app: &App,
    request: &RequestParts<'_>,
    caller: Caller,
    body: &Bytes,
    kind: WriteKind,
) -> Result<Response<Body>, ApiError> {
    let idempotency_key = request.idempotency_key()?;
    let (owner, new_session) = match caller {
        Caller::User(user) => (Owner::User(user), None),
        Caller::Guest(session) => (Owner::Guest(session), None),
        Caller::Anonymous => {
            let session = app.auth.issue_session();
            (Owner::Guest(session.clone()), Some(session))
        }
    };
    let owner_key = owner.key();
    let (operation, item, if_match) = kind.fingerprint_parts();
    let fingerprint = request::fingerprint(operation, item, if_match, body);

    // Adds need the catalog's current entry; read it fresh, before taking the cart's lock.
    let catalog_item = match &kind {
        WriteKind::Add(add) => app.store.catalog.get_fresh(add.item_id.as_str()).await?,
        _ => None,
    };

    let mut tx = app.store.begin_write(app.shard_of(&owner_key)).await?;
    if let Some(key) = idempotency_key {
        match tx.claim_idempotency(&owner_key, key, &fingerprint).await? {
            Claim::Fresh => {}
            Claim::Replay(stored) => {
                tx.rollback().await;
                return Ok(replay(stored));
            }
            Claim::Reused => {
                tx.rollback().await;
                return Err(ApiError::IdempotencyKeyReused);
            }
            Claim::InProgress => {
                tx.rollback().await;
                return Err(ApiError::RequestInProgress);
            }
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
                new_cart_currency: app.config.region.currency,
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
    let response = build_cart_response(
        app,
        StatusCode::OK,
        body.clone(),
        view.version,
        Source::Primary,
        session_header,
    );
    if let Some(key) = idempotency_key {
        tx.record_idempotency(&owner_key, key, &fingerprint, &to_stored(&response, body))
            .await?;
    }
    tx.commit().await?;
    if cart.version > 0 {
        app.store.cache.store_committed(&cart).await;
    }
    tracing::debug!(owner = %owner_key, version = cart.version, operation, "cart written");
    Ok(response)
}

fn to_stored(response: &Response<Body>, body: Bytes) -> StoredResponse {
    let headers = response
        .headers()
        .iter()
        .filter(|(name, _)| *name != header::SET_COOKIE)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_prefixes_reach_the_same_routes() {
        assert_eq!(route("/api/v1/cart"), Some(Route::Cart));
        assert_eq!(route("/cart"), Some(Route::Cart));
        assert_eq!(route("/api/v1/cart/items"), Some(Route::CartItems));
        assert_eq!(route("/cart/items/sku-1"), Some(Route::CartItem("sku-1")));
        assert_eq!(
            route("/api/v1/cart/items/sku-1"),
            Some(Route::CartItem("sku-1"))
        );
        assert_eq!(route("/cart/items/"), None);
        assert_eq!(route("/cart/items/a/b"), None);
        assert_eq!(route("/api/v1cart"), None);
        assert_eq!(route("/api/v2/cart"), None);
        assert_eq!(route("/health"), Some(Route::Health));
    }
}
