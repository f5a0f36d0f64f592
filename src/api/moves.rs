//! Serving owners whose cart the ring is moving to another shard (`moving_from` in the ring
//! file): a read finds the cart on the new shard or, not moved yet, on the old one; a write
//! first moves the cart ([`ensure_moved`]), then applies on the new shard as usual.
//!
//! The steps are `store::moves`' (freeze and mark on the old shard, copy on the new). A write
//! runs at the owner's home edge, which holds the new shard's primary; the old shard's primary
//! is here too for an owner homed in a region (both shards are that region's), or, for an owner
//! on the global ring, possibly in another region, whose edge runs freeze and mark
//! (`forward::moves`, answered by `internal::move_step`).

use super::command::Placed;
use super::error::ApiError;
use super::relay;
use crate::app::App;
use crate::domain::cart::StoredCart;
use crate::domain::ids::OwnerKey;
use crate::domain::ring::Placement;
use crate::forward::moves::{self as remote, Request};
use crate::store::moves::{self, Copied, Freeze, Located};
use crate::store::Source;

/// How long a client waits before retrying a write whose cart's old home did not answer.
const MOVE_RETRY_AFTER_SECS: u32 = 2;

/// What [`ensure_moved`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The owner had no cart on the old shard.
    Nothing,
    /// The cart was moved before.
    Before,
    /// This call copied the cart (and marked the old row).
    Now,
}

/// Moves `owner`'s cart from `from` (where the previous ring placed it) to `to_shard` (homed
/// here), unless done before. Every step is idempotent, so a retry after any failure converges.
pub async fn ensure_moved(
    app: &App,
    owner: &OwnerKey,
    from: Placement<'_>,
    to_shard: &str,
) -> Result<Moved, ApiError> {
    let request = Request {
        owner: owner.as_str().to_string(),
        from_shard: from.shard.to_string(),
        to_shard: to_shard.to_string(),
    };
    let frozen = if app.store.is_home(from.shard) {
        moves::freeze(&app.store, from.shard, owner.as_str(), to_shard).await?
    } else {
        let forwarder = relay::forwarder_to(app, from.home)?;
        remote::freeze(
            forwarder,
            from.home,
            &app.config.region.id,
            app.topology.ring.fingerprint(),
            &request,
        )
        .await
        .map_err(|error| {
            ApiError::home_unreachable(&error, from.home, MOVE_RETRY_AFTER_SECS, None)
        })?
    };
    let snapshot = match frozen {
        Freeze::Absent => return Ok(Moved::Nothing),
        Freeze::Moved { .. } => return Ok(Moved::Before),
        Freeze::Frozen { snapshot } => snapshot,
    };
    let copied = moves::copy(&app.store, to_shard, &snapshot).await?;
    if app.store.is_home(from.shard) {
        moves::mark(&app.store, from.shard, owner.as_str(), to_shard).await?;
    } else {
        let forwarder = relay::forwarder_to(app, from.home)?;
        remote::mark(
            forwarder,
            from.home,
            &app.config.region.id,
            app.topology.ring.fingerprint(),
            &request,
        )
        .await
        .map_err(|error| {
            ApiError::home_unreachable(&error, from.home, MOVE_RETRY_AFTER_SECS, None)
        })?;
    }
    app.metrics.edge.carts_moved.inc();
    tracing::info!(owner = %owner, from = %from.shard, to = to_shard, version = snapshot.version, "cart moved");
    Ok(match copied {
        Copied::Now => Moved::Now,
        Copied::Before => Moved::Before,
    })
}

/// Moves a placed owner's cart to its shard if the ring is moving it (a no-op otherwise).
pub async fn settle_placed(app: &App, placed: &Placed<'_>) -> Result<(), ApiError> {
    if let Some(from) = placed.moving_from {
        ensure_moved(app, &placed.key, from, placed.shard).await?;
    }
    Ok(())
}

/// Reads a moving owner's cart: the new shard (cache first) when it holds the cart, else the
/// old shard's row, unless that row says it moved, in which case the new shard is read again
/// no lower than the version the row moved at (the caller's replica checks then apply, as for
/// any read). Returns what `Store::load_cart` returns.
pub async fn load(
    app: &App,
    placed: &Placed<'_>,
    from: Placement<'_>,
    min_version: i64,
) -> Result<(StoredCart, Source, i64), ApiError> {
    let (cart, source, min_version) = app
        .store
        .load_cart(placed.shard, &placed.key, min_version)
        .await?;
    if cart.version > 0 {
        return Ok((cart, source, min_version));
    }
    match moves::locate(&app.store, from.shard, &placed.key, min_version).await? {
        Located::Here(old) if old.version == 0 => Ok((cart, source, min_version)),
        Located::Here(old) => {
            // Not moved yet: the old row is the cart, at a version the copy will keep.
            app.store.cache.fill(&old).await;
            let source = if app.store.is_home(from.shard) && old.version < min_version {
                Source::Primary
            } else {
                Source::Replica
            };
            Ok((old, source, min_version))
        }
        Located::Moved { version, .. } => {
            let min_version = min_version.max(version);
            let (cart, source) = app
                .store
                .read_from_database(placed.shard, &placed.key, min_version)
                .await?;
            app.store.cache.fill(&cart).await;
            Ok((cart, source, min_version))
        }
    }
}
