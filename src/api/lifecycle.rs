//! The cart lifecycle's handlers: merge on login, checkout, orders, and the internal merge
//! steps other edges call. Storage steps live in `store::merge` / `store::orders`; decisions in
//! `domain::lifecycle`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::request::{self, Caller, CheckoutBody, MergeBody, RequestParts};
use super::{
    build_cart_response, claim, forward, forward_key, forward_write, json_response, mark_write,
    names, render_view, to_stored, Body, Surface,
};
use crate::app::App;
use crate::domain::cart::StoredCart;
use crate::domain::ids::{tagged_digest, Owner, OwnerKey};
use crate::domain::lifecycle::{
    order_id, order_shard, price_checkout, CheckoutRefusal, CurrentOffer, MergeRefusal, MergeReport,
};
use crate::forward::client::names as fwd;
use crate::store::merge::{self, FreezeOutcome, Frozen, MergeOutcome};
use crate::store::orders::{self, Locked, Order, Reservation};
use crate::store::Source;

/// Paths of the merge steps on the internal (edge-to-edge) surface.
pub const FREEZE_PATH: &str = "/internal/v1/merge/freeze";
pub const FINALIZE_PATH: &str = "/internal/v1/merge/finalize";
pub const ABORT_PATH: &str = "/internal/v1/merge/abort";

/// The body of every internal merge step.
#[derive(Debug, Serialize, Deserialize)]
pub struct MergeStep {
    pub guest: String,
    pub user: String,
    #[serde(default)]
    pub version: i64,
}

/// An internal step's answer.
#[derive(Debug, Serialize, Deserialize)]
struct StepAnswer {
    status: String,
    #[serde(default)]
    version: i64,
    #[serde(default)]
    cart: Option<StoredCart>,
}

fn guest_of(step: &MergeStep) -> Result<OwnerKey, ApiError> {
    if !step.guest.starts_with("g:") {
        return Err(ApiError::InvalidRequest(
            "guest must be a guest owner".into(),
        ));
    }
    Ok(OwnerKey::from_stored(step.guest.clone()))
}

/// Serves a merge step for a guest cart homed here (called by the user's home edge).
pub async fn internal_step(app: &App, path: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let step: MergeStep = request::parse_json(body)?;
    let answer = run_step(app, path, &step).await?;
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_vec(&answer).unwrap_or_default(),
    ))
}

/// Runs a merge step on a guest cart homed in this region.
async fn run_step(app: &App, path: &str, step: &MergeStep) -> Result<StepAnswer, ApiError> {
    let guest = guest_of(step)?;
    let placement = app.topology.ring.locate(guest.as_str());
    if placement.home != app.config.region.id {
        return Err(ApiError::Misdirected);
    }
    let answer = match path {
        FREEZE_PATH => {
            match merge::freeze(&app.store, placement.shard, &guest, &step.user).await? {
                FreezeOutcome::Frozen(frozen) => StepAnswer {
                    status: "frozen".into(),
                    version: frozen.version,
                    cart: Some(frozen.cart),
                },
                FreezeOutcome::Busy => StepAnswer {
                    status: "busy".into(),
                    version: 0,
                    cart: None,
                },
            }
        }
        FINALIZE_PATH => {
            finalize_local(app, placement.shard, &guest, &step.user, step.version).await?;
            StepAnswer {
                status: "ok".into(),
                version: step.version,
                cart: None,
            }
        }
        ABORT_PATH => {
            merge::abort(
                &app.store,
                placement.shard,
                &guest,
                &step.user,
                step.version,
            )
            .await?;
            StepAnswer {
                status: "ok".into(),
                version: step.version,
                cart: None,
            }
        }
        _ => return Err(ApiError::NotFound),
    };
    Ok(answer)
}

async fn finalize_local(
    app: &App,
    shard: &str,
    guest: &OwnerKey,
    user: &str,
    version: i64,
) -> Result<(), ApiError> {
    if let Some(cart) = merge::finalize(&app.store, shard, guest, user, version).await? {
        app.store.cache.store_committed(&cart).await;
        app.invalidate_elsewhere(guest, cart.version);
    }
    Ok(())
}

/// How long a client waits before retrying a merge whose guest cart's home did not answer.
const STEP_RETRY_AFTER_SECS: u32 = 2;

/// Runs one merge step against the guest cart's home: here, or that region's edge.
async fn guest_step(
    app: &App,
    path: &'static str,
    step: &MergeStep,
) -> Result<StepAnswer, ApiError> {
    let guest = guest_of(step)?;
    let placement = app.topology.ring.locate(guest.as_str());
    if placement.home == app.config.region.id {
        return run_step(app, path, step).await;
    }
    let forwarder = super::forwarder_to(app, placement.home)?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        HeaderName::from_static(fwd::FORWARDED_FROM),
        app.region_header.clone(),
    );
    if let Ok(ring) = HeaderValue::from_str(app.topology.ring.fingerprint()) {
        headers.insert(HeaderName::from_static(fwd::RING), ring);
    }
    let answer = forwarder
        .send(
            placement.home,
            Method::POST,
            path,
            &headers,
            Bytes::from(serde_json::to_vec(step).unwrap_or_default()),
        )
        .await
        .map_err(|error| {
            ApiError::home_unreachable(&error, placement.home, STEP_RETRY_AFTER_SECS, None)
        })?;
    if !answer.status.is_success() {
        let refused = format!("merge step answered {}", answer.status);
        return Err(ApiError::home_unreachable(
            &refused,
            placement.home,
            STEP_RETRY_AFTER_SECS,
            None,
        ));
    }
    serde_json::from_slice(&answer.body).map_err(|error| {
        ApiError::Internal(format!(
            "region {} answered a merge step with an unreadable body: {error}",
            placement.home
        ))
    })
}

/// `POST /cart/merge`: the caller's guest cart into their user cart.
pub async fn merge(
    app: &Arc<App>,
    request: &RequestParts<'_>,
    surface: Surface,
    caller: Caller,
    bytes: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let Caller::User(user) = caller else {
        return Err(ApiError::Unauthenticated(
            "merging needs the user's bearer token",
        ));
    };
    let body: MergeBody = request::parse_json_or_default(bytes)?;
    request.check_user_id(&Caller::User(user.clone()), body.user_id.as_deref())?;
    let session = request.guest_session(&app.auth.load())?.ok_or_else(|| {
        ApiError::InvalidRequest(
            "merging needs the guest session (Cart-Session header or cart_session cookie)".into(),
        )
    })?;
    let strategy = body.strategy.unwrap_or_default();
    let idempotency_key = request.idempotency_key()?;
    let user_key = Owner::User(user).key();
    let guest_key = Owner::Guest(session).key();
    let placement = app.topology.ring.locate(user_key.as_str());
    if placement.home != app.config.region.id {
        return forward_write(
            app,
            request,
            surface,
            &Method::POST,
            placement.home,
            (idempotency_key, None),
            &user_key,
            bytes,
        )
        .await;
    }
    let step = MergeStep {
        guest: guest_key.as_str().to_string(),
        user: user_key.as_str().to_string(),
        version: 0,
    };
    let frozen = guest_step(app, FREEZE_PATH, &step).await?;
    if frozen.status == "busy" {
        return Err(ApiError::GuestCartBusy);
    }
    let frozen = Frozen {
        cart: frozen
            .cart
            .unwrap_or_else(|| StoredCart::empty(guest_key.as_str())),
        version: frozen.version,
    };
    let step = MergeStep {
        version: frozen.version,
        ..step
    };
    if frozen.cart.lines.is_empty() {
        // Nothing to merge (no guest cart, or a merge that already finished): the user's cart.
        let cart = app
            .store
            .load_from_primary(placement.shard, &user_key)
            .await?;
        let (response, _) = merged_response(app, &cart, &MergeReport::default(), false).await;
        return Ok(response);
    }
    let fingerprint =
        request::fingerprint("merge", guest_key.as_str(), Some(frozen.version), bytes);
    let mut tx = app.store.begin_write(placement.shard).await?;
    if let Some(key) = idempotency_key {
        if let Some(answer) = claim(&mut tx, &user_key, key, &fingerprint).await? {
            return answer;
        }
    }
    let outcome = tx
        .apply_merge(
            &user_key,
            &frozen,
            strategy,
            app.config.cart.max_lines,
            app.config.region.currency,
        )
        .await?;
    match outcome {
        MergeOutcome::Refused(MergeRefusal::CurrencyMismatch { user, guest }) => {
            tx.rollback().await;
            if let Err(error) = guest_step(app, ABORT_PATH, &step).await {
                tracing::warn!(%error, "could not lift a refused merge's freeze; a retry will");
            }
            Err(ApiError::MergeCurrencyMismatch { user, guest })
        }
        MergeOutcome::AlreadyApplied { report } => {
            tx.rollback().await;
            finish_guest(app, &step).await;
            let cart = app
                .store
                .load_from_primary(placement.shard, &user_key)
                .await?;
            Ok(merged_response(app, &cart, &report, true).await.0)
        }
        MergeOutcome::Applied { cart, report } => {
            let (mut response, body) = merged_response(app, &cart, &report, true).await;
            if let Some(key) = idempotency_key {
                tx.record_idempotency(&user_key, key, &fingerprint, &to_stored(&response, body))
                    .await?;
            }
            tx.commit().await?;
            app.store.cache.store_committed(&cart).await;
            app.invalidate_elsewhere(&user_key, cart.version);
            finish_guest(app, &step).await;
            response
                .headers_mut()
                .append(header::SET_COOKIE, expire_session_cookie(app));
            Ok(response)
        }
    }
}

/// Step 3, best effort: a failure leaves the guest cart frozen until the merge is retried.
async fn finish_guest(app: &App, step: &MergeStep) {
    if let Err(error) = guest_step(app, FINALIZE_PATH, step).await {
        tracing::warn!(%error, guest = %step.guest, "merge applied but the guest cart is not emptied yet; a retry finishes it");
    }
}

fn expire_session_cookie(app: &App) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}",
        names::SESSION_COOKIE,
        if app.tls { "; Secure" } else { "" }
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("cart_session=; Max-Age=0"))
}

/// The merge's answer (and its body): the user's cart view with the report beside its fields.
async fn merged_response(
    app: &App,
    cart: &StoredCart,
    report: &MergeReport,
    written: bool,
) -> (Response<Body>, Bytes) {
    #[derive(Serialize)]
    struct Merged<'a> {
        #[serde(flatten)]
        cart: &'a crate::domain::cart::CartView,
        report: &'a MergeReport,
    }
    let view = render_view(app, cart).await;
    let merged = Merged {
        cart: &view,
        report,
    };
    let body = Bytes::from(serde_json::to_vec(&merged).unwrap_or_default());
    let mut response = build_cart_response(
        app,
        StatusCode::OK,
        body.clone(),
        view.version,
        Source::Primary,
        None,
    );
    if written {
        mark_write(app, response.headers_mut(), view.version);
    }
    (response, body)
}

/// A digest of (owner, idempotency key): the order id's random part.
fn order_digest(owner: &OwnerKey, key: &str) -> [u8; 16] {
    let digest = tagged_digest("cartedge-order", &[owner.as_str(), key]);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// `POST /cart/checkout`: the cart becomes an order with its stock reserved, or nothing
/// happens.
pub async fn checkout(
    app: &Arc<App>,
    request: &RequestParts<'_>,
    surface: Surface,
    caller: Caller,
    bytes: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let user = match caller {
        Caller::User(user) => user,
        Caller::Guest(_) => return Err(ApiError::Forbidden("guests must log in to check out")),
        Caller::Anonymous => {
            return Err(ApiError::Unauthenticated(
                "checking out needs a bearer token",
            ))
        }
    };
    let key = request
        .idempotency_key()?
        .ok_or(ApiError::IdempotencyKeyRequired)?;
    let body: CheckoutBody = request::parse_json_or_default(bytes)?;
    request.check_user_id(&Caller::User(user.clone()), body.user_id.as_deref())?;
    let accept = body.accept_price_changes.unwrap_or(false);
    let owner = Owner::User(user).key();
    let placement = app.topology.ring.locate(owner.as_str());
    if placement.home != app.config.region.id {
        return forward_write(
            app,
            request,
            surface,
            &Method::POST,
            placement.home,
            (Some(key), None),
            &owner,
            bytes,
        )
        .await;
    }
    let fingerprint = request::fingerprint("checkout", "", None, bytes);
    let mut tx = app.store.begin_write(placement.shard).await?;
    if let Some(answer) = claim(&mut tx, &owner, key, &fingerprint).await? {
        return answer;
    }
    let cart = match tx.lock_for_checkout(&owner).await? {
        Locked::Cart(cart) => cart,
        Locked::Empty => {
            tx.rollback().await;
            return Err(ApiError::CartEmpty);
        }
    };
    let currency = cart.currency.unwrap_or(app.config.region.currency);
    let ids: Vec<&str> = cart.lines.iter().map(|l| l.item_id.as_str()).collect();
    let catalog = match orders::fresh_items(&app.store, &ids).await {
        Ok(items) => items,
        Err(error) => {
            tx.rollback().await;
            return Err(error.into());
        }
    };
    let priced = price_checkout(&cart, currency, accept, |id| CurrentOffer {
        price: catalog
            .get(id)
            .filter(|item| item.active)
            .and_then(|item| item.price_in(currency)),
    });
    let (lines, total) = match priced {
        Ok(priced) => priced,
        Err(refusal) => {
            tx.rollback().await;
            return Err(match refusal {
                CheckoutRefusal::Empty => ApiError::CartEmpty,
                CheckoutRefusal::PriceChanged(lines) => ApiError::PriceChanged { lines },
                CheckoutRefusal::Unavailable(items) => ApiError::StockShort { items },
            });
        }
    };
    let id = order_id(placement.shard, &order_digest(&owner, key));
    let hold = app.config.checkout.reservation_ttl.0;
    let expires_at = match orders::reserve(&app.store, &id, &lines, hold).await {
        Ok(Ok(expires_at)) => expires_at,
        Ok(Err(items)) => {
            tx.rollback().await;
            return Err(ApiError::StockShort { items });
        }
        Err(error) => {
            tx.rollback().await;
            return Err(error.into());
        }
    };
    let now = chrono::Utc::now();
    let draft = Order {
        order_id: id.clone(),
        owner: owner.as_str().to_string(),
        status: "pending_payment".into(),
        items: lines,
        total_price: total,
        currency,
        reservation_expires_at: expires_at,
        created_at: now,
        updated_at: now,
    };
    let committed = async {
        let (cleared, order) = tx.create_order(&owner, &draft).await?;
        let body = Bytes::from(serde_json::to_vec(&order).unwrap_or_default());
        let mut response = order_response(app, StatusCode::CREATED, body.clone());
        set_version(response.headers_mut(), cleared.version);
        mark_write(app, response.headers_mut(), cleared.version);
        tx.record_idempotency(&owner, key, &fingerprint, &to_stored(&response, body))
            .await?;
        tx.commit().await?;
        Ok::<_, ApiError>((cleared, response))
    }
    .await;
    match committed {
        Ok((cleared, response)) => {
            app.store.cache.store_committed(&cleared).await;
            app.invalidate_elsewhere(&owner, cleared.version);
            tracing::info!(order_id = %id, owner = %owner, total = total.amount_minor, "checked out");
            Ok(response)
        }
        Err(error) => {
            // The order is not known to exist: give the stock back (a pending order whose
            // reservation is gone can only expire, never oversell).
            if let Err(release) = orders::release(&app.store, &id).await {
                tracing::error!(order_id = %id, error = %release, "checkout failed and its reservation could not be released; it will expire");
            }
            Err(error)
        }
    }
}

fn set_version(headers: &mut http::HeaderMap, version: i64) {
    headers.insert(
        HeaderName::from_static(names::CART_VERSION),
        HeaderValue::from(version),
    );
}

fn order_response(app: &App, status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = json_response(status, body.into());
    response.headers_mut().insert(
        HeaderName::from_static(names::CART_REGION),
        app.region_header.clone(),
    );
    response
}

/// Where an order lives: its shard and that shard's home region.
fn order_home<'a>(app: &'a App, order_id: &str) -> Result<(String, &'a str), ApiError> {
    let shard = order_shard(order_id).ok_or(ApiError::OrderNotFound)?;
    let home = app
        .topology
        .ring
        .spec()
        .shards
        .iter()
        .find(|s| s.id == shard)
        .map(|s| s.home.as_str())
        .ok_or(ApiError::OrderNotFound)?;
    Ok((shard.to_string(), home))
}

/// `GET /orders/{id}`: the owner's order (anyone else: 404).
pub async fn get_order(
    app: &Arc<App>,
    request: &RequestParts<'_>,
    surface: Surface,
    caller: Caller,
    order_id: &str,
) -> Result<Response<Body>, ApiError> {
    let user = match caller {
        Caller::User(user) => user,
        Caller::Guest(_) => return Err(ApiError::OrderNotFound),
        Caller::Anonymous => return Err(ApiError::Unauthenticated("orders need a bearer token")),
    };
    let owner = Owner::User(user).key();
    let (shard, home) = order_home(app, order_id)?;
    let (client, _) = if app.store.is_home(&shard) {
        app.store.db_read_prefer_primary(&shard).await?
    } else {
        app.store.db_read(&shard).await?
    };
    let found = orders::load_order(&client, order_id, Some(owner.as_str())).await?;
    drop(client);
    match found {
        Some(order) => Ok(order_response(
            app,
            StatusCode::OK,
            serde_json::to_vec(&order).unwrap_or_default(),
        )),
        // A replica may not have the order yet: ask its home.
        None if home != app.config.region.id && surface != Surface::Internal => {
            forward(app, request, &Method::GET, home, None, None, Bytes::new()).await
        }
        None => Err(ApiError::OrderNotFound),
    }
}

/// What the payment service asks of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Confirm,
    Cancel,
}

/// `POST /orders/{id}/confirm|cancel`, payment service only.
pub async fn settle(
    app: &Arc<App>,
    request: &RequestParts<'_>,
    surface: Surface,
    order_id: &str,
    action: Settlement,
) -> Result<Response<Body>, ApiError> {
    let role = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(request::bearer_token)
        .transpose()?
        .map(|token| app.auth.load().verify(token))
        .transpose()?
        .and_then(|verified| verified.role);
    if role.as_deref() != Some(app.config.checkout.payment_role.as_str()) {
        return Err(ApiError::Forbidden(
            "only the payment service confirms or cancels orders",
        ));
    }
    let (shard, home) = order_home(app, order_id)?;
    if home != app.config.region.id {
        if surface == Surface::Internal {
            return Err(ApiError::Misdirected);
        }
        let key = forward_key(None);
        return forward(
            app,
            request,
            &Method::POST,
            home,
            None,
            Some(&key),
            Bytes::new(),
        )
        .await;
    }
    let (client, _) = app.store.db_read_prefer_primary(&shard).await?;
    let order = orders::load_order(&client, order_id, None).await?;
    drop(client);
    let order = order.ok_or(ApiError::OrderNotFound)?;
    let not_pending = |order: Order| ApiError::OrderNotPending {
        status: order.status,
    };
    let done = match (action, order.status.as_str()) {
        (Settlement::Confirm, "paid") | (Settlement::Cancel, "cancelled") => order,
        (_, "pending_payment") => {
            let state = match action {
                Settlement::Confirm => orders::commit_reservation(&app.store, order_id).await?,
                Settlement::Cancel => orders::reservation_status(&app.store, order_id).await?,
            };
            let status = match (action, state) {
                (_, Reservation::Committed) => "paid",
                (Settlement::Cancel, _) => {
                    orders::release(&app.store, order_id).await?;
                    "cancelled"
                }
                (Settlement::Confirm, _) => {
                    orders::release(&app.store, order_id).await?;
                    "expired"
                }
            };
            let settled = orders::settle_order(&app.store, &shard, order_id, status)
                .await?
                .ok_or(ApiError::OrderNotFound)?;
            match (action, settled.status.as_str()) {
                (Settlement::Confirm, "paid") | (Settlement::Cancel, "cancelled") => settled,
                (Settlement::Confirm, "expired") => {
                    return Err(ApiError::ReservationExpired {
                        status: settled.status,
                    })
                }
                _ => return Err(not_pending(settled)),
            }
        }
        _ => return Err(not_pending(order)),
    };
    tracing::info!(order_id, status = %done.status, "order settled");
    Ok(order_response(
        app,
        StatusCode::OK,
        serde_json::to_vec(&done).unwrap_or_default(),
    ))
}
