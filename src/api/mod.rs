//! The HTTP API: the route table and dispatch.
//!
//! `handle` is the whole request path: route (the [`ROUTES`] table) → read the request into a
//! [`command::Command`] (identity, rate limits, body, contract headers, placement) → run it here
//! or relay it to the home region → render. It knows nothing of sockets (that is `server`) and
//! takes no pool (that is `store`). The handlers live in `cart`, `lifecycle`, `internal` and
//! `operator`; response headers and cookies in `response`; errors in `error`.

pub mod cart;
pub mod command;
pub mod error;
pub mod idempotency;
pub mod internal;
pub mod lifecycle;
pub mod moves;
pub mod operator;
pub mod parking;
pub mod relay;
pub mod request;
pub mod response;
pub mod router;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::app::App;
use crate::forward;
use command::{Command, Operation};
use error::ApiError;
use internal::Step;
use router::{Lookup, Route, Surfaces};

pub type Body = Full<Bytes>;

/// Names of the cart contract's headers, cookies and media types.
pub mod names {
    pub const CART_VERSION: &str = "cart-version";
    pub const CART_SOURCE: &str = "cart-source";
    pub const CART_REGION: &str = "cart-region";
    pub const CART_SESSION: &str = "cart-session";
    pub const CART_MIN_VERSION: &str = "cart-min-version";
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
    pub const CART_WRITE_PENDING: &str = "cart-write-pending";
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
    /// The operator listener: `/health`, `/ready`, `/metrics`.
    Admin,
    /// The mutual-TLS listener for other regions' edges: forwarded requests, invalidations and
    /// merge steps. Nothing that arrives here is forwarded again.
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
    /// The janitor of a guest cart's home region asks about a stale merge into a user cart
    /// homed here.
    MergeSettle,
    MergeStep(internal::Step),
    /// A step of a cart move on an old shard homed here, asked by the new shard's home edge.
    MoveStep(forward::moves::Step),
    /// Another region's reconciler delivers an add it parked for a cart homed here.
    ParkedAdd,
    /// Another region's read asks which of its parked adds a cart homed here already holds.
    ParkedApplied,
}

const fn versioned(
    surfaces: Surfaces,
    method: Method,
    pattern: &'static str,
    name: &'static str,
    handler: Handler,
) -> Route<Handler> {
    Route {
        surfaces,
        method,
        pattern,
        name,
        handler,
        versioned: true,
    }
}

/// An edge-to-edge POST (no version prefix).
const fn internal(pattern: &'static str, name: &'static str, handler: Handler) -> Route<Handler> {
    Route {
        surfaces: Surfaces::INTERNAL,
        method: Method::POST,
        pattern,
        name,
        handler,
        versioned: false,
    }
}

/// Every route of every surface. A path matched on a surface but not for the request's method
/// is a 405 whose `Allow` lists the methods below in this order (HEAD after each GET: a GET
/// route answers HEAD without the body); anything else is a 404.
pub static ROUTES: [Route<Handler>; 22] = {
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
            "/cart/items/{line_id}",
            "cart_item",
            H::SetItem,
        ),
        versioned(
            S::CART,
            M::DELETE,
            "/cart/items/{line_id}",
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
            Step::Freeze.path(),
            "merge_freeze",
            H::MergeStep(Step::Freeze),
        ),
        internal(
            Step::Finalize.path(),
            "merge_finalize",
            H::MergeStep(Step::Finalize),
        ),
        internal(Step::Abort.path(), "merge_abort", H::MergeStep(Step::Abort)),
        internal(forward::settle::PATH, "merge_settle", H::MergeSettle),
        internal(forward::parked::PATH, "parked_add", H::ParkedAdd),
        internal(
            forward::parked::APPLIED_PATH,
            "parked_applied",
            H::ParkedApplied,
        ),
        internal(
            forward::moves::Step::Freeze.path(),
            "move_freeze",
            H::MoveStep(forward::moves::Step::Freeze),
        ),
        internal(
            forward::moves::Step::Mark.path(),
            "move_mark",
            H::MoveStep(forward::moves::Step::Mark),
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
    mut request: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let method = request.method().clone();
    let over_tls = request.extensions().get::<OverTls>().is_some();
    let deadline = tokio::time::Instant::now() + app.config.server.request_timeout.0;
    request.extensions_mut().insert(request::Deadline(deadline));
    let traced = TracedRequest::start(&app, surface, &request);
    // A body read running into the same deadline answers 408 itself: `timeout_at` polls the
    // inner future before its own timer, so this 503 is for handling that ran too long.
    // Boxed once: the handling future is a few kilobytes (the largest route's state), and the
    // trace scope, the timeout and hyper each move what they wrap; they now move a pointer.
    let dispatched = traced.run(Box::pin(dispatch(&app, surface, request)));
    let mut response = match tokio::time::timeout_at(deadline, dispatched).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => error.into_response(),
        Err(_) => ApiError::Unavailable {
            retry_after_secs: 1,
            cause: "request timed out".into(),
        }
        .into_response(),
    };
    if method == Method::HEAD {
        strip_body(&mut response);
    }
    app.decorate(response.headers_mut(), over_tls);
    app.metrics.http.observe(
        traced.fields.route,
        crate::metrics::method_label(&method),
        response.status().as_u16(),
        started.elapsed(),
    );
    traced.finish(&mut response, started);
    Ok(response)
}

/// One request's trace and its log line: the request's fields (trace and span ids, region,
/// route, method, and the owner once known: what every line logged inside the request carries,
/// see `telemetry::in_trace`), the trace context handlers pass on to other edges, and the owner
/// a handler names. Writes and errors are logged at INFO; successful reads only at the
/// configured sampling rate. No tracing span is built per request: the fields ride in the
/// request task's scope and are written only into the lines actually logged.
struct TracedRequest {
    context: crate::telemetry::TraceContext,
    fields: crate::telemetry::RequestFields,
    owner: crate::telemetry::OwnerSlot,
}

impl TracedRequest {
    fn start(app: &App, surface: Surface, request: &Request<Incoming>) -> TracedRequest {
        use crate::telemetry::{TraceContext, TRACEPARENT};
        let traceparent = request.headers().get(TRACEPARENT);
        let context = TraceContext::for_request(traceparent.and_then(|v| v.to_str().ok()));
        let route = match router::lookup(&ROUTES, surface, request.method(), request.uri().path()) {
            Lookup::Found(route, _) => route.pattern,
            _ => crate::metrics::UNMATCHED_ROUTE,
        };
        TracedRequest {
            context,
            fields: crate::telemetry::RequestFields {
                region: app.region_label.clone(),
                route,
                method: request.method().clone(),
            },
            owner: crate::telemetry::OwnerSlot::default(),
        }
    }

    /// Runs the request's future inside its trace context. Not an `async fn`: a wrapper's
    /// state would hold `future` twice (as its argument and inside what it awaits).
    fn run<F: std::future::Future>(
        &self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        crate::telemetry::in_trace(
            self.context,
            self.owner.clone(),
            self.fields.clone(),
            future,
        )
    }

    fn finish(&self, response: &mut Response<Body>, started: Instant) {
        if let Ok(value) = http::HeaderValue::from_str(&self.context.header_value()) {
            response
                .headers_mut()
                .insert(crate::telemetry::TRACERESPONSE, value);
        }
        let status = response.status().as_u16();
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let fields = &self.fields;
        let read = matches!(fields.method, Method::GET | Method::HEAD);
        if read && status < 400 && !crate::telemetry::sample_read() {
            return;
        }
        let owner = self.owner.take();
        // Logged after the request's task scope ended, so the line names its fields itself.
        tracing::info!(
            trace_id = %self.context.trace_id(),
            span_id = %self.context.span_id(),
            region = &*fields.region,
            route = fields.route,
            method = %fields.method,
            status,
            latency_ms,
            owner = owner.kind(),
            user_id = owner.user_id(),
            session = owner.session_tag(),
            "request"
        );
    }
}

/// A HEAD answer: the GET's status and headers, `Content-Length` the GET body's, no body.
fn strip_body(response: &mut Response<Body>) {
    use hyper::body::Body as _;
    if let Some(length) = response.body().size_hint().exact() {
        response.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(length),
        );
    }
    *response.body_mut() = Full::new(Bytes::new());
}

async fn dispatch(
    app: &Arc<App>,
    surface: Surface,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = request.into_parts();
    if surface == Surface::Internal {
        check_ring(app, &parts.headers)?;
    }
    let (handler, param) = match router::lookup(&ROUTES, surface, &parts.method, parts.uri.path()) {
        Lookup::Found(route, param) => (route.handler, param),
        Lookup::MethodNotAllowed(allow) => return Err(ApiError::MethodNotAllowed { allow }),
        Lookup::NotFound => return Err(ApiError::NotFound),
    };
    match handler {
        Handler::Health | Handler::Ready => {
            let verdict = command::admit_probe(app, surface, &parts)?;
            let mut response = if handler == Handler::Health {
                operator::health(app).await
            } else {
                operator::ready(app).await
            };
            if let Some(verdict) = &verdict {
                crate::limits::set_headers(response.headers_mut(), verdict);
            }
            return Ok(response);
        }
        Handler::Metrics => return Ok(operator::metrics(app, &parts.headers)),
        Handler::Invalidate => {
            let bytes = request::read_body(&parts, body, internal::MAX_BODY_BYTES, true).await?;
            return Box::pin(internal::invalidate(app, &bytes)).await;
        }
        Handler::MergeStep(step) => {
            let bytes = request::read_body(&parts, body, internal::MAX_BODY_BYTES, true).await?;
            return Box::pin(internal::merge_step(app, step, &bytes)).await;
        }
        Handler::MergeSettle => {
            let bytes = request::read_body(&parts, body, internal::MAX_BODY_BYTES, true).await?;
            return Box::pin(internal::merge_settle(app, &bytes)).await;
        }
        Handler::ParkedAdd => {
            let bytes = request::read_body(&parts, body, internal::MAX_BODY_BYTES, true).await?;
            return Box::pin(internal::parked_add(app, &bytes)).await;
        }
        Handler::ParkedApplied => {
            let bytes = request::read_body(&parts, body, internal::MAX_BODY_BYTES, true).await?;
            return Box::pin(internal::parked_applied(app, &bytes)).await;
        }
        Handler::MoveStep(step) => {
            let bytes = request::read_body(&parts, body, internal::MAX_BODY_BYTES, true).await?;
            return Box::pin(internal::move_step(app, step, &bytes)).await;
        }
        _ => {}
    }
    let command = command::read(app, surface, handler, param, &parts, body).await?;
    let verdict = command.verdict.clone();
    let mut response = run(app, command).await?;
    if let Some(verdict) = &verdict {
        crate::limits::set_headers(response.headers_mut(), verdict);
    }
    Ok(response)
}

/// An edge runs a request from another edge only if both place owners on the same ring, or
/// are the two sides of a ring roll (one's ring moving from the other's).
fn check_ring(app: &App, headers: &http::HeaderMap) -> Result<(), ApiError> {
    let ring = headers
        .get(forward::client::names::RING)
        .and_then(|v| v.to_str().ok());
    let moving_from = headers
        .get(forward::client::names::RING_MOVING_FROM)
        .and_then(|v| v.to_str().ok());
    if app.topology().ring.accepts(ring, moving_from) {
        return Ok(());
    }
    app.metrics.edge.topology_mismatches.inc();
    tracing::error!(theirs = ?ring, ours = app.topology().ring.fingerprint(), "request from an edge with another ring refused");
    Err(ApiError::TopologyMismatch)
}

/// Tells the request's log line whom it served: a user by id, a guest only by the keyed tag of
/// its session (never the id).
fn note_owner(app: &App, operation: &Operation<'_>) {
    use crate::domain::ids::Owner;
    use crate::telemetry::LoggedOwner;
    let owner = match operation {
        Operation::View(read) => read.as_ref().map(|read| &read.cart.owner),
        Operation::Write(write) => Some(&write.cart.owner),
        Operation::Merge(merge) => Some(&merge.user.owner),
        Operation::Checkout(checkout) => Some(&checkout.user.owner),
        Operation::GetOrder(_) | Operation::Settle(_) => None,
    };
    let logged = match owner {
        Some(Owner::User(user)) => LoggedOwner::User(user.as_str().to_string()),
        Some(Owner::Guest(session)) => LoggedOwner::Guest(crate::telemetry::session_tag(
            app.config.auth.session_secret.expose().as_bytes(),
            session.as_str(),
        )),
        None => match operation {
            Operation::GetOrder(lookup) => match lookup.owner.as_str().split_once(':') {
                Some(("u", user)) => LoggedOwner::User(user.to_string()),
                Some(("g", session)) => LoggedOwner::Guest(crate::telemetry::session_tag(
                    app.config.auth.session_secret.expose().as_bytes(),
                    session,
                )),
                _ => LoggedOwner::Anonymous,
            },
            _ => LoggedOwner::Anonymous,
        },
    };
    // Lines logged later in the request (a store error, a forward) name the owner too.
    crate::telemetry::note_owner(logged);
}

/// Runs a command where its placement says: relayed to the home region, or here.
async fn run(app: &App, command: Command<'_>) -> Result<Response<Body>, ApiError> {
    let Command {
        surface,
        operation,
        idempotency_key,
        body,
        relay: relay_head,
        forward_to,
        verdict: _,
    } = command;
    let key = idempotency_key.as_deref();
    note_owner(app, &operation);
    if let Some(home) = forward_to {
        if let Operation::Write(write) = &operation {
            if surface == Surface::Public && matches!(write.change, command::Change::Add(_)) {
                // An add is parked here when its home region cannot be reached.
                return Box::pin(parking::forward_add(
                    app,
                    &relay_head,
                    surface,
                    home,
                    write,
                    key,
                    body,
                ))
                .await;
            }
        }
        let (owner, new_session) = match &operation {
            Operation::Write(write) => (Some(&write.cart.key), write.new_session.as_ref()),
            Operation::Merge(merge) => (Some(&merge.user.key), None),
            Operation::Checkout(checkout) => (Some(&checkout.user.key), None),
            Operation::Settle(_) | Operation::View(_) | Operation::GetOrder(_) => (None, None),
        };
        // The key is minted here when the client sent none, so a 503 names the key the write
        // would have run under.
        let minted;
        let key = match (key, owner) {
            (None, Some(_)) => {
                minted = relay::mint_key();
                Some(minted.as_str())
            }
            (key, _) => key,
        };
        if let (Some(owner), Surface::Public) = (owner, surface) {
            // The owner's adds parked here reach home before this write does.
            Box::pin(parking::flush(app, owner, home, key)).await?;
        }
        let write = relay::Write {
            surface,
            home,
            client_key: key,
            new_session,
            owner,
            body,
        };
        return Box::pin(relay::forward_write(app, &relay_head, write)).await;
    }
    // Only the read's future is held inline: the others are boxed, so the future of every
    // request is as small as a read's and is not copied around at its full size on each move
    // (a checkout's state machine is many times a read's).
    match operation {
        Operation::View(read) => cart::view(app, surface, &relay_head, read).await,
        Operation::Write(write) => Box::pin(cart::write(app, write, key, &body)).await,
        Operation::Merge(merge) => Box::pin(lifecycle::merge(app, merge, key, &body)).await,
        Operation::Checkout(checkout) => Box::pin(lifecycle::checkout(app, checkout, &body)).await,
        Operation::GetOrder(lookup) => {
            Box::pin(lifecycle::get_order(app, surface, &relay_head, lookup)).await
        }
        Operation::Settle(settle) => Box::pin(lifecycle::settle(app, settle)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<'a, A, B, C, F: std::future::Future>(_: impl FnOnce(A, B, C) -> F) -> usize
    where
        A: 'a,
    {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_requests_future_stays_small() {
        // Every move of the request's future copies it whole; heavy handlers are boxed so a
        // read's future (the common case) sets the size.
        let dispatch_size = future_size(dispatch);
        let run_size = future_size(|app: &App, command: Command<'static>, _: ()| run(app, command));
        let view_size = future_size(
            |app: &App, relay: &relay::RelayHead, read: Option<command::ViewCart<'static>>| {
                cart::view(app, Surface::Public, relay, read)
            },
        );
        let load_size = future_size(|app: &App, key: &crate::domain::ids::OwnerKey, _: ()| {
            app.store.load_cart("sg-1", key, 0)
        });
        let render_size =
            future_size(|app: &App, cart: &crate::domain::cart::StoredCart, _: ()| {
                cart::render_view(app, cart, "sg")
            });
        eprintln!("dispatch {dispatch_size} run {run_size} view {view_size} load {load_size} render {render_size} bytes");
        assert!(
            dispatch_size <= 4096,
            "dispatch future is {dispatch_size} bytes"
        );
    }

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
            Lookup::MethodNotAllowed(allow) => assert_eq!(allow, "GET, HEAD, DELETE"),
            other => panic!("{other:?}"),
        }
        match router::lookup(&ROUTES, Surface::Public, &Method::GET, "/cart/items/x") {
            Lookup::MethodNotAllowed(allow) => assert_eq!(allow, "PUT, DELETE"),
            other => panic!("{other:?}"),
        }
        let freeze = Step::Freeze.path();
        assert!(found(Surface::Internal, Method::POST, freeze).is_some());
        assert!(found(Surface::Public, Method::POST, freeze).is_none());
        let prefixed = format!("/api/v1{freeze}");
        assert!(found(Surface::Internal, Method::POST, &prefixed).is_none());
        assert_eq!(route_name(freeze), None);
    }
}
