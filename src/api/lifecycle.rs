//! The cart lifecycle's handlers: merge on login, checkout, orders and their settlement by the
//! payment service. They run on a validated [`Command`](super::command::Command) placed in this
//! region and never read the request themselves. Storage steps live in `store::merge` /
//! `store::orders`; decisions in `domain::lifecycle`; the guest side of a merge in `internal`.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use serde::Serialize;

use super::cart::render_view;
use super::command::{self, Checkout, MergeCarts, OrderLookup, Settle};
use super::error::ApiError;
use super::idempotency;
use super::internal::{self, MergeStep, Step, StepAnswer, StepStatus};
use super::relay::{self, RelayHead};
use super::{names, response, Body, Surface};
use crate::app::App;
use crate::domain::cart::StoredCart;
use crate::domain::ids::{tagged_digest, OwnerKey};
use crate::domain::lifecycle::{price_checkout, CheckoutRefusal, CurrentOffer, MergeReport};
use crate::domain::order::{OrderId, OrderStatus};
use crate::store::merge::{Frozen, MergeOutcome};
use crate::store::orders::{self, Locked, Order, Reservation};
use crate::store::Source;

/// What the payment service asks of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Confirm,
    Cancel,
}

/// How long a client waits before retrying a merge whose guest cart's home did not answer.
const STEP_RETRY_AFTER_SECS: u32 = 2;

/// Runs one merge step against the guest cart's home: here, or that region's edge.
async fn guest_step(app: &App, step: Step, request: &MergeStep) -> Result<StepAnswer, ApiError> {
    let guest = internal::guest_of(request)?;
    let placement = command::guest_placement(app, &guest)?;
    if *placement.home == app.config.region.id {
        return internal::run_step(app, step, request).await;
    }
    let forwarder = relay::forwarder_to(app, placement.home)?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(names::APPLICATION_JSON),
    );
    relay::peer_headers(app, &mut headers);
    let answer = forwarder
        .send(
            placement.home,
            Method::POST,
            step.path(),
            &headers,
            Bytes::from(serde_json::to_vec(request).unwrap_or_default()),
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

/// How many times one merge request freezes the guest cart: a second time only when the first
/// snapshot had been rolled back by the janitor meanwhile (its freeze is lifted, then merged
/// afresh).
const MERGE_ATTEMPTS: usize = 2;

/// `POST /cart/merge`: the caller's guest cart into their user cart.
pub async fn merge(
    app: &App,
    merge: MergeCarts<'_>,
    idempotency_key: Option<&str>,
    bytes: &Bytes,
) -> Result<Response<Body>, ApiError> {
    // A user cart the ring is moving is moved first; the guest's, by the freeze step.
    super::moves::settle_placed(app, &merge.user).await?;
    for _ in 0..MERGE_ATTEMPTS {
        if let Some(response) = merge_once(app, &merge, idempotency_key, bytes).await? {
            return Ok(response);
        }
    }
    // Rolled back under this request twice: a client retry starts over.
    Err(ApiError::GuestCartBusy)
}

/// One freeze-apply-finalize round; None when the janitor had rolled the frozen snapshot back
/// (`store::merge::settle`): the freeze is lifted here and the caller starts over.
async fn merge_once(
    app: &App,
    merge: &MergeCarts<'_>,
    idempotency_key: Option<&str>,
    bytes: &Bytes,
) -> Result<Option<Response<Body>>, ApiError> {
    let MergeCarts {
        user,
        guest: guest_key,
        strategy,
    } = merge;
    let user_key = &user.key;
    let step = MergeStep {
        guest: guest_key.as_str().to_string(),
        user: user_key.as_str().to_string(),
        version: 0,
        user_shard: Some(user.shard.to_string()),
    };
    let frozen = guest_step(app, Step::Freeze, &step).await?;
    if frozen.status == StepStatus::Busy {
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
        let cart = app.store.load_from_primary(user.shard, user_key).await?;
        let (response, _) =
            merged_response(app, &cart, user.home, &MergeReport::default(), false).await;
        return Ok(Some(response));
    }
    // A guest cart in another currency (one homed in another region) is re-priced from this,
    // the user's home, region's catalog: read its entries of the guest's items before taking
    // the user cart's lock. Unreadable: the merge fails only if it needs them.
    let item_ids: Vec<&str> = frozen
        .cart
        .lines
        .iter()
        .map(|line| line.item_id.as_str())
        .collect();
    let home_catalog = match app.store.own_catalog().get_fresh_many(&item_ids).await {
        Ok(items) => Some(items),
        Err(error) => {
            tracing::warn!(%error, "catalog unavailable; a merge that re-prices will fail");
            None
        }
    };
    let fingerprint =
        idempotency::fingerprint("merge", guest_key.as_str(), Some(frozen.version), bytes);
    let mut tx = app.store.begin_write(user.shard).await?;
    if let Some(key) = idempotency_key {
        if let Some(answer) = idempotency::claim(&mut tx, user_key, key, &fingerprint).await? {
            return answer.map(Some);
        }
    }
    let outcome = tx
        .apply_merge(
            user_key,
            &frozen,
            *strategy,
            app.config.cart.max_lines,
            app.config.region.currency,
            home_catalog.as_ref(),
        )
        .await?;
    match outcome {
        MergeOutcome::AlreadyApplied { report } => {
            tx.rollback().await;
            finish_guest(app, &step).await;
            let cart = app.store.load_from_primary(user.shard, user_key).await?;
            Ok(Some(
                merged_response(app, &cart, user.home, &report, true)
                    .await
                    .0,
            ))
        }
        MergeOutcome::Fenced => {
            tx.rollback().await;
            tracing::info!(guest = %step.guest, version = step.version, "merge snapshot was rolled back by the janitor; merging afresh");
            // The janitor may not have lifted the freeze yet: lifting it here is its own step,
            // safe to repeat.
            guest_step(app, Step::Abort, &step).await?;
            Ok(None)
        }
        MergeOutcome::Applied { cart, report } => {
            let (mut response, body) = merged_response(app, &cart, user.home, &report, true).await;
            idempotency::commit(tx, idempotency_key, user_key, &fingerprint, &response, body)
                .await?;
            app.store.cache.store_committed(&cart).await;
            app.invalidate_elsewhere(user_key, cart.version);
            finish_guest(app, &step).await;
            response::expire_session_cookie(app, response.headers_mut());
            Ok(Some(response))
        }
    }
}

/// Step 3, best effort: a failure leaves the guest cart frozen until the merge is retried.
async fn finish_guest(app: &App, step: &MergeStep) {
    if let Err(error) = guest_step(app, Step::Finalize, step).await {
        tracing::warn!(%error, guest = %step.guest, "merge applied but the guest cart is not emptied yet; a retry finishes it");
    }
}

/// The merge's answer (and its body): the user's cart view with the report beside its fields.
async fn merged_response(
    app: &App,
    cart: &StoredCart,
    home: &str,
    report: &MergeReport,
    written: bool,
) -> (Response<Body>, Bytes) {
    #[derive(Serialize)]
    struct Merged<'a> {
        #[serde(flatten)]
        cart: &'a crate::domain::cart::CartView,
        report: &'a MergeReport,
    }
    let view = render_view(app, cart, home).await;
    let merged = Merged {
        cart: &view,
        report,
    };
    let body = Bytes::from(serde_json::to_vec(&merged).unwrap_or_default());
    let mut response = response::cart(app, body.clone(), view.version, Source::Primary, None);
    if written {
        response::mark_write(app, response.headers_mut(), &cart.owner, view.version);
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
    app: &App,
    checkout: Checkout<'_>,
    bytes: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let Checkout {
        user,
        key,
        accept_price_changes: accept,
    } = checkout;
    super::moves::settle_placed(app, &user).await?;
    let key = key.as_str();
    let owner = user.key;
    let fingerprint = idempotency::fingerprint("checkout", "", None, bytes);
    let mut tx = app.store.begin_write(user.shard).await?;
    if let Some(answer) = idempotency::claim(&mut tx, &owner, key, &fingerprint).await? {
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
    let id = OrderId::new(user.shard, &order_digest(&owner, key))
        .map_err(|error| ApiError::Internal(error.to_string()))?;
    let hold = app.config.checkout.reservation_ttl.0;
    let expires_at = match orders::reserve(&app.store, id.as_str(), &lines, hold).await {
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
        status: OrderStatus::PendingPayment,
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
        let mut response = response::order(app, StatusCode::CREATED, body.clone());
        response::set_version(response.headers_mut(), cleared.version);
        response::mark_write(app, response.headers_mut(), owner.as_str(), cleared.version);
        idempotency::commit(tx, Some(key), &owner, &fingerprint, &response, body).await?;
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
            if let Err(release) = orders::release(&app.store, id.as_str()).await {
                tracing::error!(order_id = %id, error = %release, "checkout failed and its reservation could not be released; it will expire");
            }
            Err(error)
        }
    }
}

/// `GET /orders/{id}`: the owner's order (anyone else: 404).
pub async fn get_order(
    app: &App,
    surface: Surface,
    relay_head: &RelayHead,
    lookup: OrderLookup<'_>,
) -> Result<Response<Body>, ApiError> {
    let OrderLookup {
        owner,
        order_id,
        shard,
        home,
    } = lookup;
    let found = orders::find_order(&app.store, &shard, &order_id, Some(owner.as_str())).await?;
    match found {
        Some(order) => Ok(response::order(
            app,
            StatusCode::OK,
            serde_json::to_vec(&order).unwrap_or_default(),
        )),
        // A replica may not have the order yet: ask its home.
        None if home != app.config.region.id && surface != Surface::Internal => {
            relay::forward(app, relay_head, home, None, None, Bytes::new()).await
        }
        None => Err(ApiError::OrderNotFound),
    }
}

/// `POST /orders/{id}/confirm|cancel`, payment service only, for an order homed here.
pub async fn settle(app: &App, settle: Settle<'_>) -> Result<Response<Body>, ApiError> {
    let Settle {
        order_id,
        action,
        shard,
        home: _,
    } = settle;
    let order_id = &order_id;
    let order = orders::find_order(&app.store, &shard, order_id, None).await?;
    let order = order.ok_or(ApiError::OrderNotFound)?;
    let not_pending = |order: Order| ApiError::OrderNotPending {
        status: order.status,
    };
    let done = match (action, order.status) {
        (Settlement::Confirm, OrderStatus::Paid) | (Settlement::Cancel, OrderStatus::Cancelled) => {
            order
        }
        (_, OrderStatus::PendingPayment) => {
            let state = match action {
                Settlement::Confirm => {
                    orders::commit_reservation(&app.store, order_id.as_str()).await?
                }
                Settlement::Cancel => {
                    orders::reservation_status(&app.store, order_id.as_str()).await?
                }
            };
            let status = match (action, state) {
                (_, Reservation::Committed) => OrderStatus::Paid,
                (Settlement::Cancel, _) => {
                    orders::release(&app.store, order_id.as_str()).await?;
                    OrderStatus::Cancelled
                }
                (Settlement::Confirm, _) => {
                    orders::release(&app.store, order_id.as_str()).await?;
                    OrderStatus::Expired
                }
            };
            let settled = orders::settle_order(&app.store, &shard, order_id, status)
                .await?
                .ok_or(ApiError::OrderNotFound)?;
            match (action, settled.status) {
                (Settlement::Confirm, OrderStatus::Paid)
                | (Settlement::Cancel, OrderStatus::Cancelled) => settled,
                (Settlement::Confirm, OrderStatus::Expired) => {
                    return Err(ApiError::ReservationExpired {
                        status: settled.status,
                    })
                }
                _ => return Err(not_pending(settled)),
            }
        }
        _ => return Err(not_pending(order)),
    };
    tracing::info!(%order_id, status = %done.status, "order settled");
    Ok(response::order(
        app,
        StatusCode::OK,
        serde_json::to_vec(&done).unwrap_or_default(),
    ))
}
