//! Retention: the janitor purges inactive carts, old bookkeeping and expired reservations.
//!
//! Per shard, only in the shard's home region, and only one janitor at a time: a pass takes a
//! session advisory lock on the shard's primary and skips the shard when another holds it. Work
//! happens in bounded batches (`janitor.batch_size` rows, at most `janitor.max_batches` per
//! task), each its own short transaction, walking the `updated_at`/`created_at` indexes.
//!
//! Merges nobody finished: a guest cart frozen by a merge (`store::merge`) longer than
//! `janitor.stale_merge_after`, with no retry restarting its age, is settled on the user cart's
//! shard ([`merge::settle`]) and then, on the guest's shard:
//! - **finished** ([`merge::finalize`]: guest cart emptied and marked merged away) when step 2
//!   committed. That is exactly what a retry would do at that point: the user's cart already
//!   holds the lines, once, under the merge record that makes every later retry add nothing.
//! - **rolled back** ([`merge::abort`]: the freeze lifted, the lines kept, the version bumped)
//!   when it did not. Finishing would mean running step 2 ourselves, and the freeze does not
//!   record what a retry needs for it: the client's strategy, its idempotency key and answer,
//!   the user's home catalog for re-pricing. So the guest gets their cart back and can use it or
//!   merge again. A fence recorded in place of the merge record makes that final: an edge still
//!   holding the snapshot (a retry racing the janitor) adds nothing and merges afresh.
//!
//! When the user's cart lives on a shard homed elsewhere, the decision is that region's: the
//! pass hands such merges back ([`Pass::elsewhere`]) and the caller asks the user home's edge
//! (`forward::settle`), then carries the answer out here ([`carry_out`]). Freezes taken by
//! edges of earlier releases (which record neither age nor user shard) are purged with the
//! guest cart's lifetime as before.
//!
//! A purged cart keeps its row, emptied, with its version bumped (a tombstone) for
//! `retention.tombstone`: caches and clients that saw version N never see a smaller version for
//! the same owner while they may still hold N.

use std::time::Duration;

use deadpool_postgres::Object;

use super::merge::{self, Settled};
use super::{orders, Store, StoreError};
use crate::config::Config;
use crate::domain::cart::StoredCart;
use crate::domain::ids::OwnerKey;
use crate::domain::order::OrderStatus;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JanitorReport {
    /// Shards this pass worked.
    pub shards: Vec<String>,
    /// Shards skipped because another janitor held them.
    pub skipped: Vec<String>,
    pub carts_purged: u64,
    pub tombstones_deleted: u64,
    pub idempotency_keys_purged: u64,
    pub merge_records_purged: u64,
    pub reservations_released: u64,
    pub orders_expired: u64,
    /// Stale merges finished (guest cart emptied; the user's cart had the lines).
    pub merges_finished: u64,
    /// Stale merges rolled back (guest cart unfrozen with its lines).
    pub merges_rolled_back: u64,
}

/// Advisory-lock key of a shard's janitor (a session lock on the shard's primary).
pub fn lock_key(shard: &str) -> i64 {
    super::lock_key("cartedge-janitor", shard)
}

/// Advisory-lock key of the reservation sweep (on the catalog primary).
fn catalog_lock_key() -> i64 {
    super::lock_key("cartedge-janitor", "catalog")
}

/// Carts a pass changed (purged: their tombstones; settled merges: the guest carts), for the
/// caller to update caches with.
pub type Purged = Vec<StoredCart>;

/// A merge frozen past `janitor.stale_merge_after` on a guest shard homed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleMerge {
    pub guest: OwnerKey,
    /// The guest cart's shard (homed here).
    pub shard: String,
    pub user: String,
    /// The frozen guest version.
    pub version: i64,
    /// The user cart's shard, where the merge is decided.
    pub user_shard: String,
}

/// What one pass did, the carts it changed, and the stale merges it left for the caller to
/// settle with the user cart's home region.
#[derive(Debug, Default)]
pub struct Pass {
    pub report: JanitorReport,
    pub changed: Purged,
    pub elsewhere: Vec<StaleMerge>,
}

/// Runs one pass over every shard homed here (and the catalog's reservations, where the
/// catalog primary is configured).
pub async fn run_once(store: &Store, config: &Config) -> Result<Pass, StoreError> {
    let mut pass = Pass::default();
    for shard in &store.home_shards() {
        let client = store.db_write(shard).await?;
        if !try_lock(&client, lock_key(shard)).await? {
            pass.report.skipped.push(shard.clone());
            continue;
        }
        let result = shard_pass(store, &client, shard, config, &mut pass).await;
        unlock(client, lock_key(shard)).await;
        result?;
        pass.report.shards.push(shard.clone());
    }
    if let Some(pool) = &store.catalog_primary {
        let client = pool.get().await?;
        if try_lock(&client, catalog_lock_key()).await? {
            let result = reservation_pass(store, config, &mut pass.report).await;
            unlock(client, catalog_lock_key()).await;
            result?;
        } else {
            pass.report.skipped.push("catalog".into());
        }
    }
    Ok(pass)
}

async fn try_lock(client: &Object, key: i64) -> Result<bool, StoreError> {
    let lock = client
        .prepare_cached("SELECT pg_try_advisory_lock($1)")
        .await?;
    Ok(client.query_one(&lock, &[&key]).await?.try_get(0)?)
}

async fn unlock(client: Object, key: i64) {
    let released = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .ok()
        .and_then(|row| row.try_get::<_, bool>(0).ok());
    if released != Some(true) {
        // Never return a connection that may still hold the lock to the pool.
        let _ = Object::take(client);
    }
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Runs `statement` (which returns one row per affected row) until a batch comes back short
/// or `max_batches` ran; returns the rows affected.
async fn batches(
    client: &Object,
    statement: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    max_batches: u32,
    batch_size: i64,
) -> Result<u64, StoreError> {
    let statement = client.prepare_cached(statement).await?;
    let mut total = 0;
    for _ in 0..max_batches {
        let done = client.execute(&statement, params).await?;
        total += done;
        if (done as i64) < batch_size {
            break;
        }
    }
    Ok(total)
}

const PURGE_CARTS: &str = "\
    WITH doomed AS ( \
        SELECT owner FROM carts \
        WHERE updated_at < now() - make_interval(secs => $1) \
          AND purged_at IS NULL \
          AND (updated_at < now() - make_interval(secs => $2) \
               OR (owner LIKE 'g:%' AND updated_at < now() - make_interval(secs => $3)) \
               OR (updated_at < now() - make_interval(secs => $4) \
                   AND NOT EXISTS (SELECT 1 FROM cart_items i WHERE i.owner = carts.owner))) \
        ORDER BY updated_at LIMIT $5 FOR UPDATE SKIP LOCKED), \
    emptied AS (DELETE FROM cart_items i USING doomed d WHERE i.owner = d.owner), \
    purged AS ( \
        UPDATE carts c SET version = c.version + 1, purged_at = now(), updated_at = now(), \
            merging_into = NULL, merge_version = NULL, merge_started_at = NULL, merge_user_shard = NULL \
        FROM doomed d WHERE c.owner = d.owner RETURNING c.owner, c.version, c.currency), \
    logged AS ( \
        INSERT INTO cart_events (owner, cart_version, kind, payload) \
        SELECT owner, version, 'cart_expired', '{}'::jsonb FROM purged) \
    SELECT owner, version, currency FROM purged";

async fn shard_pass(
    store: &Store,
    client: &Object,
    shard: &str,
    config: &Config,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    let retention = &config.retention;
    let janitor = &config.janitor;
    let size = janitor.batch_size;
    // Carts: the youngest lifetime bounds the index range scanned.
    let shortest = retention
        .cart
        .0
        .min(retention.guest_cart.0)
        .min(retention.empty_cart.0);
    let purge = client.prepare_cached(PURGE_CARTS).await?;
    for _ in 0..janitor.max_batches {
        let rows = client
            .query(
                &purge,
                &[
                    &secs(shortest),
                    &secs(retention.cart.0),
                    &secs(retention.guest_cart.0),
                    &secs(retention.empty_cart.0),
                    &size,
                ],
            )
            .await?;
        for row in &rows {
            let owner: String = row.try_get(0)?;
            let mut cart = StoredCart::empty(&owner);
            cart.version = row.try_get(1)?;
            let currency: String = row.try_get(2)?;
            cart.currency = crate::domain::money::Currency::parse(&currency);
            pass.changed.push(cart);
        }
        pass.report.carts_purged += rows.len() as u64;
        if (rows.len() as i64) < size {
            break;
        }
    }
    pass.report.tombstones_deleted += batches(
        client,
        "DELETE FROM carts WHERE owner IN (SELECT owner FROM carts \
         WHERE purged_at < now() - make_interval(secs => $1) LIMIT $2)",
        &[&secs(retention.tombstone.0), &size],
        janitor.max_batches,
        size,
    )
    .await?;
    pass.report.idempotency_keys_purged += batches(
        client,
        "DELETE FROM idempotency_keys WHERE (owner, key) IN (SELECT owner, key \
         FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1) \
         ORDER BY created_at LIMIT $2)",
        &[&secs(config.idempotency.retention.0), &size],
        janitor.max_batches,
        size,
    )
    .await?;
    settle_stale_merges(store, client, shard, config, pass).await?;
    pass.report.merge_records_purged += batches(
        client,
        "DELETE FROM cart_merges WHERE (user_owner, guest_owner, guest_version) IN \
         (SELECT user_owner, guest_owner, guest_version FROM cart_merges \
         WHERE created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2)",
        &[&secs(retention.merge_record.0), &size],
        janitor.max_batches,
        size,
    )
    .await?;
    // Orders whose reservation ran out unpaid: return the stock, then expire the order. An
    // order whose reservation was committed (its confirm crashed half-way) is marked paid.
    let overdue = orders::overdue_orders(
        store,
        shard,
        config.checkout.expiry_grace.0,
        size * i64::from(janitor.max_batches.min(10)),
    )
    .await?;
    for order_id in overdue {
        if store.catalog_primary.is_none() {
            tracing::warn!(%order_id, "overdue order left pending: no catalog primary configured here");
            continue;
        }
        match orders::release(store, order_id.as_str()).await {
            Ok(true) => pass.report.reservations_released += 1,
            Ok(false) => {}
            // Logged where found; the order stays pending (its stock was not returned) and
            // the rest of the pass goes on.
            Err(StoreError::Corrupt(_)) => continue,
            Err(error) => return Err(error),
        }
        let state = orders::reservation_status(store, order_id.as_str()).await?;
        let status = if state == orders::Reservation::Committed {
            OrderStatus::Paid
        } else {
            OrderStatus::Expired
        };
        match orders::settle_order(store, shard, &order_id, status).await {
            Ok(Some(order)) if order.status == OrderStatus::Expired => {
                pass.report.orders_expired += 1
            }
            Ok(_) | Err(StoreError::Corrupt(_)) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Frozen guest carts on a shard older than `janitor.stale_merge_after`, oldest first: (guest,
/// user, frozen version, user cart's shard).
const STALE_MERGES: &str = "\
    SELECT owner, merging_into, merge_version, merge_user_shard FROM carts \
    WHERE merging_into IS NOT NULL AND merge_version IS NOT NULL \
      AND merge_user_shard IS NOT NULL \
      AND merge_started_at < now() - make_interval(secs => $1) \
    ORDER BY merge_started_at LIMIT $2";

/// Settles the stale merges of guest carts on `shard` whose user cart is homed here too, and
/// hands the others back in [`Pass::elsewhere`] (see the module docs). One bounded batch per
/// pass; each merge is settled on its own, and one that fails is logged and tried again by the
/// next pass.
async fn settle_stale_merges(
    store: &Store,
    client: &Object,
    shard: &str,
    config: &Config,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    let stale = client.prepare_cached(STALE_MERGES).await?;
    let rows = client
        .query(
            &stale,
            &[
                &secs(config.janitor.stale_merge_after.0),
                &config.janitor.batch_size,
            ],
        )
        .await?;
    for row in rows {
        let merge = StaleMerge {
            guest: OwnerKey::from_stored(row.try_get::<_, String>(0)?),
            shard: shard.to_string(),
            user: row.try_get(1)?,
            version: row.try_get(2)?,
            user_shard: row.try_get(3)?,
        };
        if !store.is_home(&merge.user_shard) {
            pass.elsewhere.push(merge);
            continue;
        }
        let settled = merge::settle(
            store,
            &merge.user_shard,
            &merge.user,
            merge.guest.as_str(),
            merge.version,
        )
        .await;
        let done = match settled {
            Ok(settled) => carry_out(store, &merge, settled, &mut pass.report).await,
            Err(error) => Err(error),
        };
        match done {
            Ok(Some(cart)) => pass.changed.push(cart),
            Ok(None) => {}
            // The fence, if recorded, stays: the next pass (or a retry) lifts the freeze.
            Err(error) => {
                tracing::warn!(%error, guest = %merge.guest, user = %merge.user, frozen_version = merge.version, "stale merge not settled; the next pass tries again");
            }
        }
    }
    Ok(())
}

/// Carries out what the user's side decided about a stale merge, on the guest's shard (homed
/// here): finishes it (`Applied`) or rolls it back (`Fenced`). Counts it in `report` and logs
/// it; returns the guest cart as it now is, or None when the freeze was no longer this merge's
/// (a retry or another janitor got there first, and is counted where it happened).
pub async fn carry_out(
    store: &Store,
    merge: &StaleMerge,
    settled: Settled,
    report: &mut JanitorReport,
) -> Result<Option<StoredCart>, StoreError> {
    let (guest, user, version) = (&merge.guest, merge.user.as_str(), merge.version);
    let cart = match settled {
        Settled::Applied => merge::finalize(store, &merge.shard, guest, user, version).await?,
        Settled::Fenced => merge::abort(store, &merge.shard, guest, user, version).await?,
    };
    let Some(cart) = cart else {
        return Ok(None);
    };
    let outcome = match settled {
        Settled::Applied => {
            report.merges_finished += 1;
            "finished"
        }
        Settled::Fenced => {
            report.merges_rolled_back += 1;
            "rolled_back"
        }
    };
    tracing::info!(
        guest = %guest,
        user,
        user_shard = %merge.user_shard,
        frozen_version = version,
        version = cart.version,
        outcome,
        "stale merge settled by the janitor"
    );
    Ok(Some(cart))
}

async fn reservation_pass(
    store: &Store,
    config: &Config,
    report: &mut JanitorReport,
) -> Result<(), StoreError> {
    let limit = config.janitor.batch_size * i64::from(config.janitor.max_batches.min(10));
    for reservation_id in orders::expired_reservations(store, limit).await? {
        match orders::release(store, &reservation_id).await {
            Ok(true) => report.reservations_released += 1,
            Ok(false) => {}
            // Logged where found; it stays held for an operator, the others are released.
            Err(StoreError::Corrupt(_)) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
