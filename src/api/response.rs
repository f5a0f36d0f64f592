//! Building success responses: the one place that sets the cart contract's response headers
//! (`ETag`, `Cart-Version`, `Cart-Source`, `Cart-Region`, `Cart-Session`), its cookies
//! (`cart_session`, `cart_min_version`) and JSON bodies. Errors are rendered by `error`, not
//! here; nothing here reads a request.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::{names, Body};
use crate::app::App;
use crate::domain::cart::CartView;
use crate::domain::ids::SessionId;
use crate::forward::client::names as fwd;
use crate::store::Source;

/// What a cart response says about a guest's session.
pub enum SessionHeader<'a> {
    /// The session the request presented: echoed in `Cart-Session`.
    Existing(&'a SessionId),
    /// A session minted for this request: `Cart-Session` and the `cart_session` cookie.
    New(&'a SessionId),
}

/// A JSON body with `Cache-Control: no-store`.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(names::APPLICATION_JSON),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(names::NO_STORE),
    );
    response
}

/// An order (or other lifecycle answer) from this region.
pub fn order(app: &App, status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = json(status, body);
    response.headers_mut().insert(
        HeaderName::from_static(names::CART_REGION),
        app.region_header.clone(),
    );
    response
}

/// The headers every answer about a cart version carries (also on a 304).
pub fn set_cart_headers(app: &App, headers: &mut HeaderMap, version: i64, source: Source) {
    headers.insert(header::ETAG, etag(version));
    set_version(headers, version);
    headers.insert(
        HeaderName::from_static(names::CART_SOURCE),
        HeaderValue::from_static(source.as_str()),
    );
    headers.insert(
        HeaderName::from_static(names::CART_REGION),
        app.region_header.clone(),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(names::NO_STORE),
    );
}

pub fn set_version(headers: &mut HeaderMap, version: i64) {
    headers.insert(
        HeaderName::from_static(names::CART_VERSION),
        HeaderValue::from(version),
    );
}

/// The cart's version as a strong entity tag.
fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// The cart view as the body, with the cart headers.
pub fn cart_view(
    app: &App,
    view: &CartView,
    source: Source,
    session: Option<SessionHeader<'_>>,
) -> Response<Body> {
    let body = Bytes::from(serde_json::to_vec(view).unwrap_or_default());
    cart(app, body, view.version, source, session)
}

/// A 200 whose body (already serialised) is a cart at `version`.
pub fn cart(
    app: &App,
    body: Bytes,
    version: i64,
    source: Source,
    session: Option<SessionHeader<'_>>,
) -> Response<Body> {
    let mut response = json(StatusCode::OK, body);
    let headers = response.headers_mut();
    set_cart_headers(app, headers, version, source);
    match session {
        Some(SessionHeader::Existing(session)) => echo_session(headers, session),
        Some(SessionHeader::New(session)) => append_session_cookie(app, headers, session),
        None => {}
    }
    response
}

/// A 304 for a cart the client already holds.
pub fn not_modified(app: &App, version: i64, source: Source) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    set_cart_headers(app, response.headers_mut(), version, source);
    response
}

fn echo_session(headers: &mut HeaderMap, session: &SessionId) {
    if let Ok(value) = HeaderValue::from_str(session.as_str()) {
        headers.insert(HeaderName::from_static(names::CART_SESSION), value);
    }
}

/// Hands a newly minted guest session to the client: `Cart-Session` and the `cart_session`
/// cookie.
pub fn append_session_cookie(app: &App, headers: &mut HeaderMap, session: &SessionId) {
    echo_session(headers, session);
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Lax{}",
        names::SESSION_COOKIE,
        session.as_str(),
        secure(app)
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

/// Ends the guest session in the browser (its cart was merged into the user's).
pub fn expire_session_cookie(app: &App, headers: &mut HeaderMap) {
    let cookie = format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}",
        names::SESSION_COOKIE,
        secure(app)
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

/// Marks a committed write: the home region that applied it, and the `cart_min_version` cookie
/// that makes a browser's next read of `owner`'s cart, in any region, at least this fresh. The
/// cookie is bound to `owner` (`<version>.<tag>`), so another owner's read ignores it.
pub fn mark_write(app: &App, headers: &mut HeaderMap, owner: &str, version: i64) {
    headers.insert(
        HeaderName::from_static(fwd::HOME_REGION),
        app.region_header.clone(),
    );
    let cookie = format!(
        "{}={}; Path=/; SameSite=Lax{}",
        names::MIN_VERSION_COOKIE,
        app.auth.load().min_version_cookie(owner, version),
        secure(app)
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

/// Cookies are `Secure` when the public listener speaks TLS.
fn secure(app: &App) -> &'static str {
    if app.tls {
        "; Secure"
    } else {
        ""
    }
}
