//! Adds that never fail because the home region is out of reach: a forwarded add whose home
//! region cannot be reached (timeout, open breaker, partition) is parked in this region
//! (`store::parking`) and answered 202 with the cart as this region knows it; reads of the
//! owner here show the parked adds (`write_pending`) until this region's reconciler (`app`)
//! has delivered them, and report once an add the home region refused (`write_rejected`).
//!
//! Only adds are parked: they commute with every other add, so applying them later, in
//! arrival order, is what the shopper would have had. Every other write keeps needing its home
//! region. This module decides what is parked and renders what the shopper sees; it never
//! forwards a parked add itself.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ETAG};
use http::{Response, StatusCode};

use super::command::{CartWrite, Change, Placed};
use super::error::ApiError;
use super::relay::{self, RelayHead};
use super::response::{self, SessionHeader};
use super::{names, Body, Surface};
use crate::app::App;
use crate::domain::cart::{self, CartView, PendingAdd, StoredCart, Warning};
use crate::domain::ids::{Owner, OwnerKey};
use crate::domain::variant::LineId;
use crate::forward;
use crate::store::parking::{self, Caps, NewParkedAdd, ParkOutcome, ParkedAdd, RecordsFrom};
use crate::store::Source;

/// The warning on a line whose add is parked here, not yet applied at home.
pub const WRITE_PENDING: &str = "write_pending";
/// The warning reporting (once) a parked add the home region refused.
pub const WRITE_REJECTED: &str = "write_rejected";

/// An owner's parked adds as a read here sees them.
pub struct Parked {
    pub pending: Vec<ParkedAdd>,
    /// Refused adds, reported by this read and deleted.
    pub rejected: Vec<ParkedAdd>,
}

/// Relays an add to the owner's home region; when that region cannot be reached, parks it
/// here. The key the add runs under (the client's, or one minted here and returned) is the
/// same for the relay and the parked add, so an add that reached home before its answer was
/// lost is a replay when the reconciler delivers it. The owner's adds parked earlier go first
/// ([`flush`]); while they cannot, this one is parked behind them.
pub async fn forward_add(
    app: &App,
    head: &RelayHead,
    surface: Surface,
    home: &str,
    write: &CartWrite<'_>,
    client_key: Option<&str>,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let key = client_key
        .map(str::to_string)
        .unwrap_or_else(relay::mint_key);
    if let Err(unreachable) = flush(app, &write.cart.key, home, Some(&key)).await {
        return Box::pin(park(app, write, &key, &body, unreachable)).await;
    }
    let relayed = relay::Write {
        surface,
        home,
        client_key: Some(&key),
        new_session: write.new_session.as_ref(),
        owner: Some(&write.cart.key),
        body: body.clone(),
    };
    match relay::forward_write(app, head, relayed).await {
        Err(unreachable @ ApiError::HomeRegionUnavailable { .. }) => {
            Box::pin(park(app, write, &key, &body, unreachable)).await
        }
        answered => answered,
    }
}

/// Before a write of `owner` is relayed to its home region, delivers the owner's adds parked
/// here (in arrival order), so the home applies the owner's writes in the order this region
/// accepted them: a quantity set after a parked add must not be overtaken by it. While they
/// cannot be delivered, the write gets the 503 `home_region_unavailable` it would get from an
/// unreachable home. A parking shard that cannot be read does not hold the write up (logged).
pub async fn flush(
    app: &App,
    owner: &OwnerKey,
    home: &str,
    idempotency_key: Option<&str>,
) -> Result<(), ApiError> {
    match app.flush_parked(owner).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            let retry_after = app
                .forwarder
                .as_ref()
                .map_or(1, |forwarder| forwarder.retry_after_secs());
            Err(ApiError::home_unreachable(
                &"parked adds of the owner could not be delivered first",
                home,
                retry_after,
                idempotency_key,
            ))
        }
        Err(error) => {
            tracing::warn!(%error, owner = %owner, "parked adds not read before relaying a write; relayed anyway");
            Ok(())
        }
    }
}

/// Parks an add whose home region could not be reached and answers 202; `unreachable` (the
/// 503 the client gets without parking) when parking is off, a cap is reached or the parking
/// shard cannot take it.
async fn park(
    app: &App,
    write: &CartWrite<'_>,
    key: &str,
    body: &Bytes,
    unreachable: ApiError,
) -> Result<Response<Body>, ApiError> {
    let Change::Add(add) = &write.change else {
        return Err(unreachable);
    };
    // A session minted for this request is homed here: its adds are never forwarded.
    if !app.config.parking.enabled || write.new_session.is_some() {
        return Err(unreachable);
    }
    let (Some(shard), Ok(text)) = (
        parking::parking_shard(&app.store),
        std::str::from_utf8(body),
    ) else {
        return Err(unreachable);
    };
    let line_id = LineId::of(&add.item_id, add.variant.as_ref());
    let placed = &write.cart;
    let new = NewParkedAdd {
        owner: &placed.key,
        idempotency_key: key,
        home: placed.home,
        home_shard: placed.shard,
        body: text,
        item_id: add.item_id.as_str(),
        line_id: line_id.as_str(),
        variant: add.variant.as_ref(),
        quantity: add.quantity.get(),
    };
    let caps = Caps {
        per_owner: app.config.parking.max_per_owner,
        per_region: app.config.parking.max_per_region,
    };
    let metrics = &app.metrics.parking;
    match parking::park(&app.store, &shard, &new, caps).await {
        Ok(ParkOutcome::Parked) => {
            metrics.parked.inc();
            tracing::info!(owner = %placed.key, home = placed.home, "add parked while its home region is unreachable");
        }
        Ok(ParkOutcome::AlreadyParked) => {
            metrics.replayed.inc();
        }
        Ok(ParkOutcome::KeyReused) => return Err(ApiError::IdempotencyKeyReused),
        Ok(outcome @ (ParkOutcome::OwnerFull | ParkOutcome::RegionFull)) => {
            metrics.refused.inc();
            tracing::warn!(owner = %placed.key, ?outcome, "add not parked: parking cap reached");
            return Err(unreachable);
        }
        Err(error) => {
            tracing::warn!(%error, owner = %placed.key, "add not parked: the parking shard failed");
            return Err(unreachable);
        }
    }
    // The cart as this region knows it: its replica (or cache), with every parked add (read
    // first: see `view`).
    let mut parked = load(app, &shard, placed).await?;
    let (cart, _, _) = app.store.load_cart(placed.shard, &placed.key, 0).await?;
    in_cart(app, placed, &mut parked, cart.version).await;
    let view = render(app, &cart, placed, &parked).await;
    let session = match &placed.owner {
        Owner::Guest(session) => Some(SessionHeader::Existing(session)),
        Owner::User(_) => None,
    };
    let mut response = respond(
        app,
        &view,
        Source::Replica,
        session,
        parked.pending.len(),
        StatusCode::ACCEPTED,
    );
    if let Ok(value) = HeaderValue::from_str(key) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(names::IDEMPOTENCY_KEY), value);
    }
    Ok(response)
}

/// The owner's parked adds here, for a read of a cart homed elsewhere; None when there are
/// none (or this region cannot park). Read before the cart: an add the reconciler delivers
/// meanwhile is then either still in this list or already in the cart read after it, and
/// [`in_cart`] drops it from the list in the second case. A parking shard that cannot be read
/// leaves the read as it was, logged: reads never fail on its account.
pub async fn for_read(app: &App, placed: &Placed<'_>) -> Option<Parked> {
    if placed.home == app.config.region.id.as_str() {
        return None;
    }
    let shard = parking::parking_shard(&app.store)?;
    match load(app, &shard, placed).await {
        Ok(parked) if parked.pending.is_empty() && parked.rejected.is_empty() => None,
        Ok(parked) => Some(parked),
        Err(error) => {
            tracing::warn!(%error, owner = %placed.key, "parked adds not read; the cart is shown without them");
            None
        }
    }
}

async fn load(app: &App, shard: &str, placed: &Placed<'_>) -> Result<Parked, ApiError> {
    let (pending, rejected) = parking::for_read(&app.store, shard, &placed.key).await?;
    Ok(Parked { pending, rejected })
}

/// Drops the pending adds a cart at `cart_version` already holds: one the reconciler saw
/// applied at that version or before (its row about to go), and one whose key the home region
/// recorded at that version or before (applied with its answer lost, or delivered and not yet
/// marked here).
///
/// The records are read from this region's replica of the home shard, in one snapshot with
/// the cart's version there; they are complete up to that version only. When the cart shown is
/// newer (it came from the home region, or from a cache fenced past the replica), the records
/// are asked of the home region's primary instead: otherwise an add applied between the two
/// versions would show twice, once in the cart and once as pending. Records that cannot be read
/// keep the adds pending (logged): the cart may then show such an add twice for that read.
pub async fn in_cart(app: &App, placed: &Placed<'_>, parked: &mut Parked, cart_version: i64) {
    parked.pending.retain(|add| {
        add.applied_version
            .is_none_or(|applied| applied > cart_version)
    });
    if parked.pending.is_empty() {
        return;
    }
    let keys: Vec<&str> = parked
        .pending
        .iter()
        .map(|add| add.idempotency_key.as_str())
        .collect();
    let local = parking::applied_at_home(
        &app.store,
        placed.shard,
        &placed.key,
        &keys,
        RecordsFrom::Local,
    )
    .await;
    let applied = match local {
        Ok(found) if found.cart_version >= cart_version => found.applied,
        Ok(_) => match Box::pin(applied_per_home(app, placed, &keys)).await {
            Ok(applied) => applied,
            Err(error) => {
                app.metrics.parking.overlay_unsure.inc();
                tracing::warn!(%error, owner = %placed.key, home = placed.home, "the replica is older than the cart shown and the home region did not say which parked adds it holds; shown as pending");
                return;
            }
        },
        Err(error) => {
            app.metrics.parking.overlay_unsure.inc();
            tracing::warn!(%error, owner = %placed.key, "home idempotency records not read; parked adds shown as pending");
            return;
        }
    };
    let held: Vec<String> = applied
        .into_iter()
        .filter(|(_, version)| *version <= cart_version)
        .map(|(key, _)| key)
        .collect();
    parked
        .pending
        .retain(|add| !held.contains(&add.idempotency_key));
}

/// Which of `keys` the home region's primary recorded for the owner (`forward::parked`).
async fn applied_per_home(
    app: &App,
    placed: &Placed<'_>,
    keys: &[&str],
) -> Result<Vec<(String, i64)>, String> {
    let Some(forwarder) = &app.forwarder else {
        return Err("no forwarder".to_string());
    };
    let question = forward::parked::AppliedQuestion {
        owner: placed.key.as_str().to_string(),
        home_shard: placed.shard.to_string(),
        keys: keys.iter().map(|key| (*key).to_string()).collect(),
    };
    let answer = forward::parked::ask_applied(
        forwarder,
        placed.home,
        &app.config.region.id,
        app.topology().ring.fingerprint(),
        &question,
    )
    .await
    .map_err(|error| error.to_string())?;
    Ok(answer
        .applied
        .into_iter()
        .map(|applied| (applied.key, applied.version))
        .collect())
}

/// The cart a home edge answered a read with, as stored (to lay this region's parked adds
/// over it); the answer itself, untouched, when it is not a cart.
pub async fn cart_of_answer(response: Response<Body>) -> Result<StoredCart, Response<Body>> {
    use http_body_util::BodyExt;
    if response.status() != StatusCode::OK {
        return Err(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    match stored_from_view(&bytes) {
        Some(cart) => Ok(cart),
        None => Err(Response::from_parts(
            parts,
            http_body_util::Full::new(bytes),
        )),
    }
}

/// A cart view's JSON read back into the stored cart it was rendered from.
fn stored_from_view(body: &[u8]) -> Option<StoredCart> {
    let view: serde_json::Value = serde_json::from_slice(body).ok()?;
    let time = |value: &serde_json::Value| serde_json::from_value(value.clone()).ok();
    let lines = view["items"]
        .as_array()?
        .iter()
        .map(|item| {
            Some(cart::StoredLine {
                line_id: item["line_id"].as_str()?.to_string(),
                item_id: item["item_id"].as_str()?.to_string(),
                quantity: u16::try_from(item["quantity"].as_u64()?).ok()?,
                variant: Some(item["variant"].clone()).filter(|v| !v.is_null()),
                unit_price_minor: item["unit_price"]["amount_minor"].as_i64()?,
                added_at: time(&item["added_at"])?,
                updated_at: time(&item["updated_at"])?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(StoredCart {
        owner: view["owner"].as_str()?.to_string(),
        currency: serde_json::from_value(view["currency"].clone()).ok(),
        version: view["version"].as_i64()?,
        lines,
        updated_at: time(&view["updated_at"]),
    })
}

/// The view of `cart` with the pending adds laid over (priced from the home region's catalog
/// as read here), a `write_pending` warning per parked line and a `write_rejected` warning per
/// refused add.
pub async fn render(
    app: &App,
    cart: &StoredCart,
    placed: &Placed<'_>,
    parked: &Parked,
) -> CartView {
    let home_currency = placed.currency(app);
    let currency = cart.currency.unwrap_or(home_currency);
    let prices = match app.store.catalog_of(placed.home) {
        Some(catalog) => Some(
            catalog
                .lookup(parked.pending.iter().map(|add| add.item_id.as_str()))
                .await,
        ),
        None => None,
    };
    let adds: Vec<PendingAdd> = parked
        .pending
        .iter()
        .map(|add| PendingAdd {
            line_id: add.line_id.clone(),
            item_id: add.item_id.clone(),
            variant: add.variant.clone(),
            quantity: add.quantity,
            unit_price_minor: prices
                .as_ref()
                .and_then(|lookup| lookup.get(&add.item_id))
                .and_then(|item| item.price_in(currency))
                .map_or(0, |price| price.amount_minor),
            parked_at: add.parked_at,
        })
        .collect();
    let shown = cart::with_pending_adds(cart, &adds, home_currency);
    let mut view = super::cart::render_view(app, &shown, placed.home).await;
    let mut warned: Vec<&str> = Vec::new();
    for add in &parked.pending {
        if warned.contains(&add.line_id.as_str()) {
            continue;
        }
        warned.push(&add.line_id);
        view.warnings.push(Warning {
            code: WRITE_PENDING,
            item_id: Some(add.item_id.clone()),
            message: format!(
                "added in {} while the home region {} was unreachable; not applied there yet",
                app.config.region.id, add.home
            ),
        });
    }
    for add in &parked.rejected {
        view.warnings.push(Warning {
            code: WRITE_REJECTED,
            item_id: Some(add.item_id.clone()),
            message: format!(
                "the add of {} x {} made while the home region {} was unreachable was refused ({}): {}",
                add.quantity,
                add.item_id,
                add.home,
                add.reason_code.as_deref().unwrap_or("refused"),
                add.reason.as_deref().unwrap_or("no reason given")
            ),
        });
    }
    view
}

/// A cart answer that includes parked adds: no `ETag` (the body is not the version's cart, so
/// it must never be revalidated as that version), and `Cart-Write-Pending` when adds wait.
pub fn respond(
    app: &App,
    view: &CartView,
    source: Source,
    session: Option<SessionHeader<'_>>,
    pending: usize,
    status: StatusCode,
) -> Response<Body> {
    let mut response = response::cart_view(app, view, source, session);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.remove(ETAG);
    if pending > 0 {
        headers.insert(
            HeaderName::from_static(names::CART_WRITE_PENDING),
            HeaderValue::from(pending),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cart_view_reads_back_into_its_stored_cart() {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let stored = StoredCart {
            owner: "u:a".into(),
            currency: Some(crate::domain::money::Currency::parse("SGD").unwrap()),
            version: 7,
            lines: vec![cart::StoredLine {
                line_id: "sku-1~0011223344556677".into(),
                item_id: "sku-1".into(),
                quantity: 3,
                variant: Some(serde_json::json!({"size": "m"})),
                unit_price_minor: 250,
                added_at: at,
                updated_at: at,
            }],
            updated_at: Some(at),
        };
        let view = cart::view(&stored, stored.currency.unwrap(), |_| None);
        let body = serde_json::to_vec(&view).unwrap();
        assert_eq!(stored_from_view(&body), Some(stored));
        assert_eq!(stored_from_view(b"{}"), None);
    }

    #[test]
    fn the_parking_warnings_are_in_the_closed_list() {
        for code in [WRITE_PENDING, WRITE_REJECTED] {
            assert!(cart::WARNING_CODES.contains(&code), "{code}");
        }
    }
}
