//! A routed cart request read once into a typed [`Command`]: the caller (authenticated and
//! admitted by the rate limits), the owner and where the owner lives, the contract's headers
//! (`Cart-Min-Version`, `If-Match`, `If-None-Match`, `Idempotency-Key`), the validated operation
//! and the raw body. Placement is decided here, once: served by this region's store or relayed
//! to the home region's edge. Handlers get a `Command` and never read the request again.
//!
//! Checks run in a fixed order (body limits, then the contract's headers and the body's shape,
//! then `user_id`, then the values' ranges) so a request with several faults always gets the
//! same error. Nothing here touches the store.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::request::Parts;
use http::Method;
use hyper::body::Incoming;

use super::error::ApiError;
use super::lifecycle::Settlement;
use super::relay::RelayHead;
use super::request::{
    self, AddItemBody, Caller, CheckoutBody, ClearBody, Identity, IfNoneMatch, MergeBody,
    RequestParts, SetQuantityBody, ValidAdd,
};
use super::{Handler, Peer, Surface};
use crate::app::App;
use crate::domain::cart::Quantity;
use crate::domain::ids::{Owner, OwnerKey, RegionId, SessionId};
use crate::domain::lifecycle::MergeStrategy;
use crate::domain::money::Currency;
use crate::domain::order::OrderId;
use crate::domain::ring::Placement;
use crate::domain::variant::LineId;
use crate::limits::{Class, RateLimits, Verdict};

/// A cart request, read and validated.
pub struct Command<'a> {
    pub surface: Surface,
    pub operation: Operation<'a>,
    /// The client's `Idempotency-Key`, checked.
    pub idempotency_key: Option<String>,
    /// The body as received: what the idempotency fingerprint covers and a relay re-sends.
    pub body: Bytes,
    /// What a relay to the home region re-sends of the request head.
    pub relay: RelayHead,
    /// `Some(home)`: the operation runs in that region; this edge relays it.
    pub forward_to: Option<&'a str>,
    /// The rate-limit verdict, reported in the response's headers.
    pub verdict: Option<Verdict>,
}

/// A cart owner and where it lives.
pub struct Placed<'a> {
    pub owner: Owner,
    pub key: OwnerKey,
    pub shard: &'a str,
    pub home: &'a str,
    /// Where the previous ring placed the owner, while the ring is moving it to `shard`
    /// (`api::moves`); None when settled or not moving this owner.
    pub moving_from: Option<Placement<'a>>,
}

impl<'a> Placed<'a> {
    /// Places an owner: a user on the ring of its token's home region (`claim`), or on the
    /// global ring when the token names none (refused when `auth.require_region_claim`); a guest
    /// on the ring of the region bound into its session id (v1 and v2 ids: the global ring). A
    /// claim naming a region that homes no shard is not a credential this deployment issued.
    fn new(app: &'a App, owner: Owner, claim: Option<&RegionId>) -> Result<Placed<'a>, ApiError> {
        let key = owner.key();
        let ring = &app.topology().ring;
        // Where the owner is; `known` adds where its cart may still be, decided by the same
        // home region.
        match &owner {
            Owner::User(_) => {
                if claim.is_none() && app.auth.load().require_region_claim() {
                    return Err(ApiError::Unauthenticated(
                        "the bearer token must name the user's home region (region claim)",
                    ));
                }
                let home = claim.map(RegionId::as_str);
                let placement = ring
                    .place(key.as_str(), home)
                    .ok_or(ApiError::Unauthenticated(
                        "the token's region claim names no region of this deployment",
                    ))?;
                Ok(Placed::known(app, owner, key, placement, home))
            }
            Owner::Guest(_) => {
                let home = guest_home(&key);
                let placement = ring
                    .place(key.as_str(), home.as_deref())
                    .ok_or(ApiError::InvalidSession)?;
                Ok(Placed::known(app, owner, key, placement, home.as_deref()))
            }
        }
    }

    /// Places an owner whose placement is already known (`placement`, decided with home region
    /// `home`), adding where its cart may still be: where the previous ring had it while the
    /// ring moves, or for a user with a claim, while the ring names `claims_from_global`, where
    /// the global ring had it before its token named the region.
    pub fn known(
        app: &'a App,
        owner: Owner,
        key: OwnerKey,
        placement: Placement<'a>,
        home: Option<&str>,
    ) -> Placed<'a> {
        let ring = &app.topology().ring;
        let moving_from = match owner {
            Owner::User(_) => ring.user_moving_from(key.as_str(), home),
            Owner::Guest(_) => ring.previous_placement(key.as_str(), home),
        };
        Placed {
            moving_from,
            owner,
            key,
            shard: placement.shard,
            home: placement.home,
        }
    }

    /// The currency of the cart's home region: a cart is priced there, whichever edge the
    /// client called.
    pub fn currency(&self, app: &App) -> Currency {
        app.topology()
            .regions
            .get(self.home)
            .map(|region| region.currency)
            .unwrap_or(app.config.region.currency)
    }
}

/// Where a guest's cart lives (`g:<session id>`): on the ring of the region bound into a v3
/// session id, else on the global ring. The id was verified where the request entered; a key
/// naming a region that homes no shard is refused as an invalid session.
pub fn guest_placement<'a>(app: &'a App, guest: &OwnerKey) -> Result<Placement<'a>, ApiError> {
    app.topology()
        .ring
        .place(guest.as_str(), guest_home(guest).as_deref())
        .ok_or(ApiError::InvalidSession)
}

/// The home region bound into a guest's session id (v3), None for earlier ids.
pub fn guest_home(guest: &OwnerKey) -> Option<String> {
    guest
        .as_str()
        .strip_prefix("g:")
        .and_then(crate::auth::session_home)
        .map(|home| home.to_string())
}

/// Where the previous ring placed a guest, while the ring is moving its cart.
pub fn guest_moving_from<'a>(app: &'a App, guest: &OwnerKey) -> Option<Placement<'a>> {
    app.topology()
        .ring
        .previous_placement(guest.as_str(), guest_home(guest).as_deref())
}

pub enum Operation<'a> {
    /// `GET /cart`; `None` for a caller without a session, whose cart is empty.
    View(Option<ViewCart<'a>>),
    /// The item and clear routes.
    Write(CartWrite<'a>),
    Merge(MergeCarts<'a>),
    Checkout(Checkout<'a>),
    GetOrder(OrderLookup<'a>),
    Settle(Settle<'a>),
}

pub struct ViewCart<'a> {
    pub cart: Placed<'a>,
    /// The freshest version the client has seen (`Cart-Min-Version` or its cookie); 0 if none.
    pub min_version: i64,
    pub if_none_match: IfNoneMatch,
}

pub struct CartWrite<'a> {
    pub cart: Placed<'a>,
    /// A session minted for a caller that had none; the write creates its cart.
    pub new_session: Option<SessionId>,
    pub change: Change,
    /// The currency of the cart's home region (a new cart takes it).
    pub home_currency: Currency,
}

/// A validated mutation of one cart.
pub enum Change {
    Add(ValidAdd),
    Set {
        line_id: LineId,
        quantity: Quantity,
        if_match: Option<i64>,
    },
    Remove {
        line_id: LineId,
        if_match: Option<i64>,
    },
    Clear {
        if_match: Option<i64>,
    },
}

impl Change {
    /// The operation's name, target and precondition, for the idempotency fingerprint (a line
    /// without variant has its item id as line id, so those fingerprints are unchanged).
    pub fn fingerprint_parts(&self) -> (&'static str, &str, Option<i64>) {
        match self {
            Change::Add(add) => ("add", add.item_id.as_str(), None),
            Change::Set {
                line_id, if_match, ..
            } => ("set", line_id.as_str(), *if_match),
            Change::Remove { line_id, if_match } => ("remove", line_id.as_str(), *if_match),
            Change::Clear { if_match } => ("clear", "", *if_match),
        }
    }
}

pub struct MergeCarts<'a> {
    pub user: Placed<'a>,
    pub guest: OwnerKey,
    pub strategy: MergeStrategy,
}

pub struct Checkout<'a> {
    pub user: Placed<'a>,
    /// Checkout requires a key.
    pub key: String,
    pub accept_price_changes: bool,
}

pub struct OrderLookup<'a> {
    pub owner: OwnerKey,
    pub order_id: OrderId,
    pub shard: String,
    pub home: &'a str,
}

pub struct Settle<'a> {
    pub order_id: OrderId,
    pub action: Settlement,
    pub shard: String,
    pub home: &'a str,
}

/// What a route reads of the body: nothing, or up to the limit (`required`: non-empty).
fn body_rule(handler: Handler) -> Option<bool> {
    match handler {
        Handler::AddItem | Handler::SetItem => Some(true),
        Handler::RemoveItem | Handler::ClearCart | Handler::Merge | Handler::Checkout => {
            Some(false)
        }
        _ => None,
    }
}

/// Reads a routed cart request into a command: admits the caller, reads the body, validates the
/// operation and decides where it runs.
pub async fn read<'a>(
    app: &'a App,
    surface: Surface,
    handler: Handler,
    param: Option<&str>,
    parts: &Parts,
    body: Incoming,
) -> Result<Command<'a>, ApiError> {
    let request = RequestParts::new(parts);
    let (identity, verdict) = admit(app, surface, handler, parts, &request)?;
    let (caller, role, claim) = (identity.caller, identity.role, identity.region);
    let claim = claim.as_ref();
    let body = match body_rule(handler) {
        Some(required) => {
            request::read_body(parts, body, app.config.server.max_body_bytes, required).await?
        }
        None => Bytes::new(),
    };
    let param = param.unwrap_or_default();
    let (operation, idempotency_key) = match handler {
        Handler::ViewCart => (view(app, &request, caller, claim)?, None),
        Handler::Merge => merge(app, &request, caller, claim, &body)?,
        Handler::Checkout => checkout(app, &request, caller, claim, &body)?,
        Handler::GetOrder => (get_order(app, caller, param)?, None),
        Handler::Settle(action) => (settle(app, &caller, role, param, action)?, None),
        Handler::AddItem | Handler::SetItem | Handler::RemoveItem | Handler::ClearCart => {
            write(app, &request, caller, claim, handler, param, &body)?
        }
        Handler::Health
        | Handler::Ready
        | Handler::Metrics
        | Handler::Invalidate
        | Handler::MergeSettle
        | Handler::ParkedAdd
        | Handler::ParkedApplied
        | Handler::MergeStep(_)
        | Handler::MoveStep(_) => return Err(ApiError::NotFound),
    };
    let here = app.config.region.id.as_str();
    let home = match &operation {
        Operation::Write(write) => Some(write.cart.home),
        Operation::Merge(merge) => Some(merge.user.home),
        Operation::Checkout(checkout) => Some(checkout.user.home),
        Operation::Settle(settle) => Some(settle.home),
        // Reads are served here; they ask the home only when this region cannot answer.
        Operation::View(_) | Operation::GetOrder(_) => None,
    };
    Ok(Command {
        surface,
        operation,
        idempotency_key,
        body,
        relay: RelayHead::of(parts),
        forward_to: home.filter(|home| *home != here),
        verdict,
    })
}

/// Charges an operator probe (`/health`, `/ready`) on the public listener to its client IP's
/// anonymous quota, like any request without credentials; the admin listener's probes are not
/// limited (load balancers and monitoring poll them).
pub fn admit_probe(
    app: &App,
    surface: Surface,
    parts: &Parts,
) -> Result<Option<Verdict>, ApiError> {
    if surface != Surface::Public {
        return Ok(None);
    }
    let limits = app.limits.load();
    let verdict = limits.check_ip(client_ip(&limits, parts));
    if let Some(verdict) = verdict.as_ref().filter(|v| !v.admitted()) {
        return Err(ApiError::RateLimited(verdict.clone()));
    }
    Ok(verdict)
}

/// The client's IP as the rate limits see it (the socket peer, or the forwarded address from a
/// trusted proxy).
fn client_ip(limits: &RateLimits, parts: &Parts) -> IpAddr {
    let peer = parts
        .extensions
        .get::<Peer>()
        .map(|p| p.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    limits.client_ip(peer, &parts.headers)
}

/// Authenticates the caller and charges the rate limits. Failed credentials are limited per
/// client IP, so guessing is slow; edge-to-edge requests were limited where they entered.
fn admit(
    app: &App,
    surface: Surface,
    handler: Handler,
    parts: &Parts,
    request: &RequestParts<'_>,
) -> Result<(Identity, Option<Verdict>), ApiError> {
    let limited = surface == Surface::Public;
    let limits = app.limits.load();
    let client_ip = || client_ip(&limits, parts);
    let identity = match request.identify(&app.auth.load()) {
        Ok(identity) => identity,
        Err(error) => {
            if let Some(verdict) = limits
                .check_ip(client_ip())
                .filter(|v| limited && !v.admitted())
            {
                return Err(ApiError::RateLimited(verdict));
            }
            return Err(error);
        }
    };
    let class = match handler {
        _ if parts.method == Method::GET || parts.method == Method::HEAD => Class::Read,
        Handler::Checkout => Class::Checkout,
        _ => Class::Write,
    };
    let verdict = if !limited {
        None
    } else {
        match &identity.caller {
            Caller::Anonymous => limits.check_ip(client_ip()),
            Caller::User(user) => {
                limits.check_owner(identity.tier, class, &format!("u:{}", user.as_str()))
            }
            Caller::Guest(session) => {
                limits.check_owner(identity.tier, class, &format!("g:{}", session.as_str()))
            }
        }
    };
    if let Some(verdict) = verdict.as_ref().filter(|v| !v.admitted()) {
        return Err(ApiError::RateLimited(verdict.clone()));
    }
    Ok((identity, verdict))
}

fn view<'a>(
    app: &'a App,
    request: &RequestParts<'_>,
    caller: Caller,
    claim: Option<&RegionId>,
) -> Result<Operation<'a>, ApiError> {
    request.check_user_id(&caller, request.query_user_id()?)?;
    let owner = match caller {
        Caller::User(user) => Owner::User(user),
        Caller::Guest(session) => Owner::Guest(session),
        // A guest with no session sees an empty cart; nothing is created.
        Caller::Anonymous => return Ok(Operation::View(None)),
    };
    let cart = Placed::new(app, owner, claim)?;
    let min_version = request.min_version(&app.auth.load(), &cart.key)?;
    Ok(Operation::View(Some(ViewCart {
        cart,
        min_version,
        if_none_match: request.if_none_match(),
    })))
}

/// A write's body, parsed but not yet validated (so `user_id` is checked first).
enum ParsedWrite {
    Add(AddItemBody),
    Set(LineId, SetQuantityBody),
    Remove(LineId, ClearBody),
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

fn write<'a>(
    app: &'a App,
    request: &RequestParts<'_>,
    caller: Caller,
    claim: Option<&RegionId>,
    handler: Handler,
    line_segment: &str,
    body: &[u8],
) -> Result<(Operation<'a>, Option<String>), ApiError> {
    let if_match = request.if_match()?;
    let parsed = match handler {
        Handler::AddItem => ParsedWrite::Add(request::parse_body(body)?),
        Handler::SetItem => ParsedWrite::Set(
            request::line_id_segment(line_segment)?,
            request::parse_body(body)?,
        ),
        Handler::RemoveItem => ParsedWrite::Remove(
            request::line_id_segment(line_segment)?,
            request::parse_body_or_default(body)?,
        ),
        _ => ParsedWrite::Clear(request::parse_body_or_default(body)?),
    };
    request.check_user_id(&caller, request.claimed_user_id(parsed.user_id())?)?;
    let change = match parsed {
        ParsedWrite::Add(body) => Change::Add(body.validate()?),
        ParsedWrite::Set(line_id, body) => Change::Set {
            quantity: body.validate()?,
            line_id,
            if_match,
        },
        ParsedWrite::Remove(line_id, _) => Change::Remove { line_id, if_match },
        ParsedWrite::Clear(_) => Change::Clear { if_match },
    };
    let key = request.idempotency_key()?.map(str::to_string);
    let (owner, new_session) = match caller {
        Caller::User(user) => (Owner::User(user), None),
        Caller::Guest(session) => (Owner::Guest(session), None),
        Caller::Anonymous => {
            let session = app.auth.load().issue_session();
            (Owner::Guest(session.clone()), Some(session))
        }
    };
    let cart = Placed::new(app, owner, claim)?;
    let write = CartWrite {
        home_currency: cart.currency(app),
        cart,
        new_session,
        change,
    };
    Ok((Operation::Write(write), key))
}

fn merge<'a>(
    app: &'a App,
    request: &RequestParts<'_>,
    caller: Caller,
    claim: Option<&RegionId>,
    body: &[u8],
) -> Result<(Operation<'a>, Option<String>), ApiError> {
    let Caller::User(user) = &caller else {
        return Err(ApiError::Unauthenticated(
            "merging needs the user's bearer token",
        ));
    };
    let user = user.clone();
    let parsed: MergeBody = request::parse_body_or_default(body)?;
    request.check_user_id(&caller, parsed.user_id.as_deref())?;
    let session = request.guest_session(&app.auth.load())?.ok_or_else(|| {
        ApiError::InvalidRequest(
            "merging needs the guest session (Cart-Session header or cart_session cookie)".into(),
        )
    })?;
    let key = request.idempotency_key()?.map(str::to_string);
    let merge = MergeCarts {
        user: Placed::new(app, Owner::User(user), claim)?,
        guest: Owner::Guest(session).key(),
        strategy: parsed.strategy.unwrap_or_default(),
    };
    Ok((Operation::Merge(merge), key))
}

fn checkout<'a>(
    app: &'a App,
    request: &RequestParts<'_>,
    caller: Caller,
    claim: Option<&RegionId>,
    body: &[u8],
) -> Result<(Operation<'a>, Option<String>), ApiError> {
    let user = match &caller {
        Caller::User(user) => user.clone(),
        Caller::Guest(_) => return Err(ApiError::Forbidden("guests must log in to check out")),
        Caller::Anonymous => {
            return Err(ApiError::Unauthenticated(
                "checking out needs a bearer token",
            ))
        }
    };
    let key = request
        .idempotency_key()?
        .ok_or(ApiError::IdempotencyKeyRequired)?
        .to_string();
    let parsed: CheckoutBody = request::parse_body_or_default(body)?;
    request.check_user_id(&caller, parsed.user_id.as_deref())?;
    let checkout = Checkout {
        user: Placed::new(app, Owner::User(user), claim)?,
        key: key.clone(),
        accept_price_changes: parsed.accept_price_changes.unwrap_or(false),
    };
    Ok((Operation::Checkout(checkout), Some(key)))
}

fn get_order<'a>(app: &'a App, caller: Caller, order_id: &str) -> Result<Operation<'a>, ApiError> {
    let user = match caller {
        Caller::User(user) => user,
        // Someone else's order does not exist for them.
        Caller::Guest(_) => return Err(ApiError::OrderNotFound),
        Caller::Anonymous => return Err(ApiError::Unauthenticated("orders need a bearer token")),
    };
    // A malformed id names no order.
    let order_id = OrderId::parse(order_id).map_err(|_| ApiError::OrderNotFound)?;
    Ok(Operation::GetOrder(OrderLookup {
        owner: Owner::User(user).key(),
        home: shard_home(app, order_id.shard())?,
        shard: order_id.shard().to_string(),
        order_id,
    }))
}

fn settle<'a>(
    app: &'a App,
    caller: &Caller,
    role: Option<String>,
    order_id: &str,
    action: Settlement,
) -> Result<Operation<'a>, ApiError> {
    // No credential at all is a 401 with a challenge, as on every other route; a credential
    // without the payment role is a 403.
    if let Caller::Anonymous = caller {
        return Err(ApiError::Unauthenticated(
            "confirming or cancelling an order needs the payment service's bearer token",
        ));
    }
    if role.as_deref() != Some(app.config.checkout.payment_role.as_str()) {
        return Err(ApiError::Forbidden(
            "only the payment service confirms or cancels orders",
        ));
    }
    let order_id = OrderId::parse(order_id).map_err(|_| ApiError::OrderNotFound)?;
    Ok(Operation::Settle(Settle {
        action,
        home: shard_home(app, order_id.shard())?,
        shard: order_id.shard().to_string(),
        order_id,
    }))
}

/// The home region of a shard an order id names; an unknown shard is no such order.
fn shard_home<'a>(app: &'a App, shard: &str) -> Result<&'a str, ApiError> {
    app.topology()
        .ring
        .spec()
        .shards
        .iter()
        .find(|s| s.id == shard)
        .map(|s| s.home.as_str())
        .ok_or(ApiError::OrderNotFound)
}
