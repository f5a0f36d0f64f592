//! The cart handlers: reading a cart (cache-aside, read-your-writes across regions) and applying
//! one mutation in one write transaction on the shard primary, with its idempotency key. They
//! run on a validated [`Command`](super::command::Command) placed in this region and never read
//! the request themselves.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;

use super::command::{self, CartWrite, Change, Placed, ViewCart};
use super::error::ApiError;
use super::idempotency;
use super::parking;
use super::relay::{self, RelayHead};
use super::response::{self, SessionHeader};
use super::{Body, Surface};
use crate::app::App;
use crate::domain::cart::{self, AddRequest, CartView, StoredCart};
use crate::domain::ids::{Owner, OwnerKey, SessionId};
use crate::store::catalog::{Catalog, Lookup};
use crate::store::{CartOp, NearEntry, Source};

/// Warning codes this module adds to a view (the domain adds the per-line ones).
const STALE_POSSIBLE: &str = "stale_possible";
const PRICES_UNAVAILABLE: &str = "prices_unavailable";
/// The domain's per-line warning that a missing price makes meaningless.
const ITEM_UNAVAILABLE: &str = "item_unavailable";

/// How often a read waiting for replication re-reads the replica.
const REPLICA_POLL: Duration = Duration::from_millis(20);

/// Builds the client's view of a cart homed in `home`, with current prices and names from that
/// region's catalog (read here: this region's own, or its replica of the home's), in the cart's
/// own currency (an owner without a cart yet: the home region's).
pub async fn render_view(app: &App, cart: &StoredCart, home: &str) -> CartView {
    let home_currency = app
        .topology()
        .regions
        .get(home)
        .map_or(app.config.region.currency, |region| region.currency);
    let lookup = match app.store.catalog_of(home) {
        Some(catalog) => {
            catalog
                .lookup(cart.lines.iter().map(|l| l.item_id.as_str()))
                .await
        }
        None => {
            if !cart.lines.is_empty() {
                tracing::warn!(home, "no replica of the home region's catalog here (database.peer_catalogs); cart view without current prices");
            }
            Lookup {
                items: Default::default(),
                complete: cart.lines.is_empty(),
            }
        }
    };
    let mut view = cart::view(cart, home_currency, |id| lookup.get(id));
    if !lookup.complete {
        view.warnings.retain(|w| w.code != ITEM_UNAVAILABLE);
        view.warnings.push(cart::Warning {
            code: PRICES_UNAVAILABLE,
            item_id: None,
            message: "current catalog prices could not be read".into(),
        });
    }
    view
}

/// `GET /cart`.
pub async fn view(
    app: &App,
    surface: Surface,
    relay_head: &RelayHead,
    read: Option<ViewCart<'_>>,
) -> Result<Response<Body>, ApiError> {
    let Some(read) = read else {
        let cart = StoredCart::empty("");
        let view = render_view(app, &cart, &app.config.region.id).await;
        return Ok(response::cart_view(app, &view, Source::Replica, None));
    };
    let placed = &read.cart;
    // Adds parked here for a cart homed elsewhere are part of the cart this region shows; they
    // are read before the cart (`parking::for_read`).
    let parked = match surface {
        Surface::Public => Box::pin(parking::for_read(app, placed)).await.map(Box::new),
        _ => None,
    };
    let session = match &placed.owner {
        Owner::Guest(session) => Some(SessionHeader::Existing(session)),
        Owner::User(_) => None,
    };
    // The common read: this edge holds the cart in memory, fresh enough, with nothing to add.
    // (A cart the ring is moving takes the moves path below.)
    if parked.is_none() && placed.moving_from.is_none() && lag_warning(app, placed.shard).is_none()
    {
        if let Some(entry) = app.store.near_cart(&placed.key, read.min_version) {
            let version = entry.cart.version;
            if read.if_none_match.matches(version) {
                return Ok(response::not_modified(app, version, Source::Cache));
            }
            let body = rendered_body(app, &entry, placed.home).await;
            return Ok(response::cart(app, body, version, Source::Cache, session));
        }
    }
    let (mut cart, mut source, min_version) = match placed.moving_from {
        None => {
            app.store
                .load_cart(placed.shard, &placed.key, read.min_version)
                .await?
        }
        Some(from) => Box::pin(super::moves::load(app, placed, from, read.min_version)).await?,
    };
    let mut warnings = Vec::new();
    if cart.version < min_version && app.store.is_home(placed.shard) {
        // Below the minimum even on the home primary (`load_cart` read it): the client names a
        // version this cart never had (a stale or foreign token). The primary's cart is the
        // newest there is, so it is the answer, without forwarding anywhere and without a
        // warning.
        app.metrics.edge.min_version_beyond_cart.inc();
        tracing::debug!(owner = %placed.key, version = cart.version, min_version, "cart-min-version beyond the cart");
    } else if cart.version < min_version && surface != Surface::Internal {
        // Outside the home region the replica may not have replayed the caller's last write
        // yet: give it a bounded moment, then ask the home region, whose answer (its primary's
        // cart, even when that is below the minimum) is the freshest there is.
        // Rare paths, boxed so they do not size every read's future.
        match Box::pin(wait_for_replica(
            app,
            placed.shard,
            &placed.key,
            min_version,
        ))
        .await?
        {
            Some(replayed) => (cart, source) = (replayed, Source::Replica),
            None => {
                match Box::pin(ask_home(app, relay_head, placed.home, parked.is_some())).await {
                    Ok(HomeAnswer::Relayed(response)) => return Ok(response),
                    Ok(HomeAnswer::Cart(home_cart)) => {
                        (cart, source) = (*home_cart, Source::Primary)
                    }
                    Err(error) => {
                        tracing::warn!(%error, home = placed.home, "home region unreachable; serving the replica's older cart");
                        warnings.push(cart::Warning {
                            code: STALE_POSSIBLE,
                            item_id: None,
                            message: format!(
                                "the home region {} is unreachable; this cart may be older than version {min_version}",
                                placed.home
                            ),
                        });
                    }
                }
            }
        }
    }
    if warnings.is_empty() {
        warnings.extend(lag_warning(app, placed.shard));
    }
    if let Some(mut parked) = parked {
        Box::pin(parking::in_cart(app, placed, &mut parked, cart.version)).await;
        let parked = *parked;
        if !parked.pending.is_empty() || !parked.rejected.is_empty() {
            let mut view = Box::pin(parking::render(app, &cart, placed, &parked)).await;
            view.warnings.extend(warnings);
            let pending = parked.pending.len();
            return Ok(parking::respond(
                app,
                &view,
                source,
                session,
                pending,
                http::StatusCode::OK,
            ));
        }
    }
    if read.if_none_match.matches(cart.version) && warnings.is_empty() {
        return Ok(response::not_modified(app, cart.version, source));
    }
    let mut view = render_view(app, &cart, placed.home).await;
    view.warnings.extend(warnings);
    Ok(response::cart_view(app, &view, source, session))
}

/// The `stale_possible` warning on a cart served outside its shard's home region while the
/// replica lags more than `forward.max_replica_lag` (or by an unknown amount).
fn lag_warning(app: &App, shard: &str) -> Option<cart::Warning> {
    if app.store.is_home(shard) {
        return None;
    }
    let lag = app.store.replica_lag(shard);
    if lag.is_some_and(|lag| lag <= app.config.forward.max_replica_lag.0) {
        return None;
    }
    let behind = match lag {
        Some(lag) => format!("{} ms behind", lag.as_millis()),
        None => "of unknown lag".to_string(),
    };
    Some(cart::Warning {
        code: STALE_POSSIBLE,
        item_id: None,
        message: format!("served in {} from a replica {behind}", app.config.region.id),
    })
}

/// The response body for a cart held in this edge's memory: the one rendered from it before
/// when the home catalog has not changed since and it is younger than the catalog's TTL (a
/// view is then as current as rendering it again would be, give or take that TTL), else
/// rendered now and kept. A view rendered without current prices is not kept.
async fn rendered_body(app: &App, entry: &NearEntry, home: &str) -> Bytes {
    let catalog = app.store.catalog_of(home);
    // Read before the render's catalog lookup: a change during it makes the body outdated.
    let epoch = catalog.map_or(0, Catalog::epoch);
    let max_age = catalog.map_or(Duration::ZERO, Catalog::ttl);
    if let Some(body) = entry.rendered(epoch, home, max_age) {
        return body;
    }
    let view = render_view(app, &entry.cart, home).await;
    let body = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
    if view.warnings.iter().all(|w| w.code != PRICES_UNAVAILABLE) {
        entry.keep_rendered(epoch, home, body.clone());
    }
    body
}

/// The home region's answer to a read this region could not serve fresh enough.
enum HomeAnswer {
    /// Relayed to the client as it is.
    Relayed(Response<Body>),
    /// The home's cart, for this region to lay its parked adds over.
    Cart(Box<StoredCart>),
}

/// Reads the cart at its home region's edge: its answer is relayed, except that with parked
/// adds here (`with_parked`) a cart answer is taken apart to show them too.
async fn ask_home(
    app: &App,
    relay_head: &RelayHead,
    home: &str,
    with_parked: bool,
) -> Result<HomeAnswer, ApiError> {
    let response = relay::forward(app, relay_head, home, None, None, Bytes::new()).await?;
    if !with_parked {
        return Ok(HomeAnswer::Relayed(response));
    }
    Ok(match parking::cart_of_answer(response).await {
        Ok(cart) => HomeAnswer::Cart(Box::new(cart)),
        Err(response) => HomeAnswer::Relayed(response),
    })
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

/// Runs one mutation of a cart homed here: one transaction on the primary with the idempotency
/// key, then the cache.
pub async fn write(
    app: &App,
    write: CartWrite<'_>,
    idempotency_key: Option<&str>,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let CartWrite {
        cart: mut placed,
        mut new_session,
        change,
        home_currency,
    } = write;
    let (operation, item, if_match) = change.fingerprint_parts();
    let fingerprint = idempotency::fingerprint(operation, item, if_match, body);

    // Adds need the catalog's current entry; read it fresh, before taking the cart's lock. A
    // write runs at the owner's home edge, so the home catalog is this region's own.
    let catalog_item = match &change {
        Change::Add(add) => {
            app.store
                .own_catalog()
                .get_fresh(add.item_id.as_str())
                .await?
        }
        _ => None,
    };

    // A cart the ring is moving is moved before the write applies on its new shard.
    super::moves::settle_placed(app, &placed).await?;
    let mut tx = app.store.begin_write(placed.shard).await?;
    // The key is claimed and its answer recorded under the owner the client named, even when
    // the write goes to a successor cart: a retry replays the same answer.
    let claimed = placed.key.clone();
    if let Some(key) = idempotency_key {
        if let Some(answer) = idempotency::claim(&mut tx, &claimed, key, &fingerprint).await? {
            return answer;
        }
    }
    if matches!(placed.owner, Owner::Guest(_)) && tx.merged_away(&placed.key).await? {
        // A merged-away session behaves like no session: the write starts a new guest cart.
        let successor = successor_session(app, placed.shard)?;
        placed = Placed {
            key: Owner::Guest(successor.clone()).key(),
            owner: Owner::Guest(successor.clone()),
            // A new session has no cart anywhere to move.
            moving_from: None,
            ..placed
        };
        new_session = Some(successor);
    }
    let add_request;
    let op = match &change {
        Change::Add(add) => {
            add_request = AddRequest {
                quantity: add.quantity,
                client_price: add.price,
            };
            CartOp::Add {
                item_id: &add.item_id,
                item: catalog_item.as_deref(),
                request: &add_request,
                variant: add.variant.as_ref(),
                new_cart_currency: home_currency,
                max_lines: app.config.cart.max_lines,
            }
        }
        Change::Set {
            line_id,
            quantity,
            if_match,
        } => CartOp::SetQuantity {
            line_id,
            quantity: *quantity,
            if_match: *if_match,
        },
        Change::Remove { line_id, if_match } => CartOp::Remove {
            line_id,
            if_match: *if_match,
        },
        Change::Clear { if_match } => CartOp::Clear {
            if_match: *if_match,
        },
    };
    let cart = match tx.apply(&placed.key, &op).await? {
        Ok(cart) => cart,
        Err(rule) => {
            tx.rollback().await;
            return Err(ApiError::Rule(rule));
        }
    };
    let view = render_view(app, &cart, placed.home).await;
    let session_header = new_session
        .as_ref()
        .map(SessionHeader::New)
        .or(match &placed.owner {
            Owner::Guest(session) => Some(SessionHeader::Existing(session)),
            Owner::User(_) => None,
        });
    let body = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
    let mut response = response::cart(
        app,
        body.clone(),
        view.version,
        Source::Primary,
        session_header,
    );
    response::mark_write(
        app,
        response.headers_mut(),
        placed.key.as_str(),
        view.version,
    );
    idempotency::commit(tx, idempotency_key, &claimed, &fingerprint, &response, body).await?;
    if cart.version > 0 {
        app.store.cache.store_committed(&cart).await;
        app.invalidate_elsewhere(&placed.key, cart.version);
    }
    tracing::debug!(owner = %placed.key, version = cart.version, operation, "cart written");
    Ok(response)
}

/// Most sessions drawn while looking for one placed on a given shard. Each draw lands there with
/// probability 1/shards (an eighth with the shipped ring), so running out is vanishingly rare.
const SUCCESSOR_DRAWS: usize = 4096;

/// A new guest session whose cart the ring places on `shard`, so a write that finds its
/// session merged away starts the new cart in the same transaction (and its idempotency
/// record covers both). The new id is as fresh as any other: minted now, here.
fn successor_session(app: &App, shard: &str) -> Result<SessionId, ApiError> {
    let auth = app.auth.load();
    (0..SUCCESSOR_DRAWS)
        .map(|_| auth.issue_session())
        .find(|session| {
            let key = Owner::Guest(session.clone()).key();
            command::guest_placement(app, &key).is_ok_and(|placement| placement.shard == shard)
        })
        .ok_or_else(|| {
            ApiError::Internal(format!(
                "no new guest session placed on shard {shard} in {SUCCESSOR_DRAWS} draws"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warnings_added_here_are_in_the_closed_list() {
        for code in [STALE_POSSIBLE, PRICES_UNAVAILABLE, ITEM_UNAVAILABLE] {
            assert!(cart::WARNING_CODES.contains(&code), "{code}");
        }
    }
}
