//! Merging a guest cart into a user's cart, when the two may live on different shards homed in
//! different regions.
//!
//! Three steps, each one transaction on one shard, each safe to repeat:
//! 1. [`freeze`] (guest's shard): mark the guest cart `merging_into = user` at its current
//!    version and return its lines. A frozen cart refuses writes (`merge_in_progress`), so the
//!    lines cannot change under the merge; freezing again for the same user returns the same
//!    snapshot.
//! 2. [`WriteTx::apply_merge`] (user's shard): add the snapshot to the user's cart (line by
//!    line id: one item in two variants stays two lines) and record
//!    `(user, guest, frozen version)` in `cart_merges`, in one transaction. Finding that record
//!    means the merge was already applied: nothing is added twice.
//! 3. [`finalize`] (guest's shard): empty the guest cart, lift the freeze and mark the cart
//!    merged away (`merged_at`), if it is still the same freeze. A merged-away guest's session
//!    behaves like no session from then on: [`WriteTx::merged_away`] is how the write path asks.
//!
//! A crash after 1 leaves the guest cart frozen and unmerged; after 2, merged and frozen. Either
//! way a retry converges to "merged once, guest cart empty". When nobody retries, the janitor
//! settles the merge (`store::janitor`): [`settle`] on the user's shard says whether step 2 ran
//! (then [`finalize`], what a retry would do) or fences it off for good (then [`abort`], which
//! gives the guest their cart back). [`abort`] also lifts a freeze whose merge was refused
//! (edges of earlier releases refused carts in different currencies; a guest cart in another
//! currency is now re-priced from the user's home catalog instead).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use tokio_postgres::types::ToSql;

use super::carts::{self, keyed_by_line, moving_to, WriteTx};
use super::{events, tx, Store, StoreError};
use crate::domain::cart::{CatalogItem, StoredCart};
use crate::domain::ids::OwnerKey;
use crate::domain::lifecycle::{merge_reprices, plan_merge, MergeReport, MergeStrategy};
use crate::domain::money::Currency;

/// A guest cart held still for a merge.
#[derive(Debug, Clone)]
pub struct Frozen {
    pub cart: StoredCart,
    /// The version the cart was frozen at (0: there was no cart, nothing to merge).
    pub version: i64,
}

#[derive(Debug)]
pub enum FreezeOutcome {
    Frozen(Frozen),
    /// The guest cart is frozen for a merge into another user.
    Busy,
}

/// Step 1, on the guest cart's home shard. `user_shard` is where the user's cart lives (None
/// from edges of earlier releases): recorded with the freeze so the janitor can settle a merge
/// nobody retried. Freezing again for the same user returns the same snapshot and restarts the
/// freeze's age, so the janitor leaves a merge alone while its client is retrying it.
pub async fn freeze(
    store: &Store,
    shard: &str,
    guest: &OwnerKey,
    user: &str,
    user_shard: Option<&str>,
) -> Result<FreezeOutcome, StoreError> {
    let client = store.db_write(shard).await?;
    tx::run(client, async |client| {
        let lock = client
            .prepare_cached(
                "SELECT version, merging_into, merge_version, to_jsonb(carts) ->> 'moving_to' \
                 FROM carts WHERE owner = $1 FOR UPDATE",
            )
            .await?;
        let Some(row) = client.query_opt(&lock, &[&guest.as_str()]).await? else {
            return Ok(FreezeOutcome::Frozen(Frozen {
                cart: StoredCart::empty(guest.as_str()),
                version: 0,
            }));
        };
        carts::refuse_moving(guest.as_str(), row.try_get(3)?)?;
        let version: i64 = row.try_get(0)?;
        let merging_into: Option<String> = row.try_get(1)?;
        let merge_version: Option<i64> = row.try_get(2)?;
        let cart = carts::load(client, guest).await?;
        match merging_into {
            Some(into) if into == user => {
                let touch = client
                    .prepare_cached(
                        "UPDATE carts SET merge_started_at = now(), \
                         merge_user_shard = COALESCE($2, merge_user_shard) WHERE owner = $1",
                    )
                    .await?;
                client
                    .execute(&touch, &[&guest.as_str(), &user_shard])
                    .await?;
                Ok(FreezeOutcome::Frozen(Frozen {
                    cart,
                    version: merge_version.unwrap_or(version),
                }))
            }
            Some(_) => Ok(FreezeOutcome::Busy),
            None if cart.lines.is_empty() => Ok(FreezeOutcome::Frozen(Frozen { cart, version })),
            None => {
                let mark = client
                    .prepare_cached(
                        "UPDATE carts SET merging_into = $2, merge_version = version, \
                         merge_started_at = now(), merge_user_shard = $3 WHERE owner = $1",
                    )
                    .await?;
                client
                    .execute(&mark, &[&guest.as_str(), &user, &user_shard])
                    .await?;
                Ok(FreezeOutcome::Frozen(Frozen { cart, version }))
            }
        }
    })
    .await
}

/// Step 3: empties the guest cart and lifts the freeze, if it is still `user`'s freeze at
/// `version`. Returns the emptied cart when this call finished the merge.
pub async fn finalize(
    store: &Store,
    shard: &str,
    guest: &OwnerKey,
    user: &str,
    version: i64,
) -> Result<Option<StoredCart>, StoreError> {
    let client = store.db_write(shard).await?;
    tx::run(client, async |client| {
        let lift = client
            .prepare_cached(
                "UPDATE carts SET merging_into = NULL, merge_version = NULL, \
                 merge_started_at = NULL, merge_user_shard = NULL, \
                 version = version + 1, updated_at = now(), merged_at = now() \
                 WHERE owner = $1 AND merging_into = $2 AND merge_version = $3 RETURNING version",
            )
            .await?;
        let Some(row) = client
            .query_opt(&lift, &[&guest.as_str(), &user, &version])
            .await?
        else {
            return Ok(None);
        };
        let new_version: i64 = row.try_get(0)?;
        let delete = client
            .prepare_cached("DELETE FROM cart_items WHERE owner = $1")
            .await?;
        client.execute(&delete, &[&guest.as_str()]).await?;
        events::record(
            client,
            guest.as_str(),
            new_version,
            "merged_away",
            &json!({ "into": user, "frozen_version": version }),
        )
        .await?;
        Ok(Some(carts::load(client, guest).await?))
    })
    .await
}

/// Lifts `user`'s freeze at `version` without touching the lines: the merge was refused, or
/// fenced off by [`settle`]. The version moves on, so a later merge freezes a new version and
/// never meets this one's fence. Returns the cart when this call lifted the freeze (None: it
/// was not that freeze any more).
pub async fn abort(
    store: &Store,
    shard: &str,
    guest: &OwnerKey,
    user: &str,
    version: i64,
) -> Result<Option<StoredCart>, StoreError> {
    let client = store.db_write(shard).await?;
    tx::run(client, async |client| {
        let lift = client
            .prepare_cached(
                "UPDATE carts SET merging_into = NULL, merge_version = NULL, \
                 merge_started_at = NULL, merge_user_shard = NULL, \
                 version = version + 1, updated_at = now() \
                 WHERE owner = $1 AND merging_into = $2 AND merge_version = $3 RETURNING version",
            )
            .await?;
        let Some(row) = client
            .query_opt(&lift, &[&guest.as_str(), &user, &version])
            .await?
        else {
            return Ok(None);
        };
        let new_version: i64 = row.try_get(0)?;
        events::record(
            client,
            guest.as_str(),
            new_version,
            "merge_rolled_back",
            &json!({ "into": user, "frozen_version": version }),
        )
        .await?;
        Ok(Some(carts::load(client, guest).await?))
    })
    .await
}

/// What the user's side says about a frozen guest version (see [`settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Step 2 committed: the merge is finished by emptying the guest cart ([`finalize`]).
    Applied,
    /// Step 2 never committed and now never will (a fence is recorded in its place): the merge
    /// is rolled back by lifting the freeze ([`abort`]).
    Fenced,
}

/// Decides a merge nobody finished, on the user cart's home shard: whether `guest`'s frozen
/// `version` reached `user`'s cart. If not, a fence takes the merge record's place in the same
/// transaction, so an edge still holding that snapshot (a client's retry at this moment) finds
/// it in [`WriteTx::apply_merge`] and adds nothing. The user's cart row is locked first, as
/// step 2 locks it, so a step 2 in flight either committed before (`Applied`) or comes after
/// and meets the fence; two janitors settling the same merge get the same answer.
pub async fn settle(
    store: &Store,
    user_shard: &str,
    user: &str,
    guest: &str,
    version: i64,
) -> Result<Settled, StoreError> {
    let client = store.db_write(user_shard).await?;
    tx::run(client, async |client| {
        let lock = client
            .prepare_cached("SELECT 1 FROM carts WHERE owner = $1 FOR UPDATE")
            .await?;
        client.query_opt(&lock, &[&user]).await?;
        // Without a user cart row there is nothing to lock; the record's primary key still
        // orders this against a step 2 creating the cart (its insert waits on ours, or ours on
        // its, and the loser sees the winner's record).
        let fence = client
            .prepare_cached(
                "INSERT INTO cart_merges (user_owner, guest_owner, guest_version, report, abandoned_at) \
                 VALUES ($1, $2, $3, $4, now()) ON CONFLICT DO NOTHING",
            )
            .await?;
        let empty = serde_json::to_value(MergeReport::default()).unwrap_or_default();
        if client
            .execute(&fence, &[&user, &guest, &version, &empty])
            .await?
            == 1
        {
            return Ok(Settled::Fenced);
        }
        let recorded = client
            .prepare_cached(
                "SELECT abandoned_at IS NOT NULL FROM cart_merges \
                 WHERE user_owner = $1 AND guest_owner = $2 AND guest_version = $3",
            )
            .await?;
        let fenced: bool = client
            .query_one(&recorded, &[&user, &guest, &version])
            .await?
            .try_get(0)?;
        Ok(if fenced {
            Settled::Fenced
        } else {
            Settled::Applied
        })
    })
    .await
}

/// What step 2 found.
#[derive(Debug)]
pub enum MergeOutcome {
    /// Applied now; the user's cart as it will commit.
    Applied {
        cart: StoredCart,
        report: MergeReport,
    },
    /// This frozen guest version was merged before: nothing done (roll back).
    AlreadyApplied { report: MergeReport },
    /// The janitor rolled this frozen guest version back ([`settle`] fenced it): nothing done
    /// (roll back); the guest cart is to be unfrozen ([`abort`]) and merged afresh.
    Fenced,
}

impl WriteTx {
    /// Whether `guest`'s cart was merged into a user's cart (step 3 ran). Locks the cart row, so
    /// no finalize can land between this answer and the rest of the transaction. A merged-away
    /// cart is never written again: the API layer starts a new guest cart instead.
    pub async fn merged_away(&mut self, guest: &OwnerKey) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let lock = client
            .prepare_cached("SELECT merged_at IS NOT NULL FROM carts WHERE owner = $1 FOR UPDATE")
            .await?;
        let row = client.query_opt(&lock, &[&guest.as_str()]).await?;
        Ok(match row {
            Some(row) => row.try_get(0)?,
            None => false,
        })
    }

    /// Step 2, on the user cart's home shard: merges the frozen guest snapshot once.
    /// `home_currency` is this (the user's home) region's; `home_catalog` holds this region's
    /// catalog entries of the guest's items (None: the catalog could not be read), from which a
    /// guest cart in another currency is re-priced (`domain::lifecycle::plan_merge`).
    #[allow(clippy::too_many_arguments)]
    pub async fn apply_merge(
        &mut self,
        user: &OwnerKey,
        guest: &Frozen,
        strategy: MergeStrategy,
        max_lines: u32,
        home_currency: Currency,
        home_catalog: Option<&HashMap<String, Arc<CatalogItem>>>,
    ) -> Result<MergeOutcome, StoreError> {
        let client = self.client().await?;
        let currency = home_currency;
        // Lock (or create) the user's cart first: concurrent merges and writes queue here.
        let bump = client
            .prepare_cached(concat!(
                "INSERT INTO carts (owner, currency, version) VALUES ($1, $2, 1) \
                 ON CONFLICT (owner) DO UPDATE \
                 SET version = carts.version + 1, updated_at = now(), purged_at = NULL \
                 RETURNING version, ",
                keyed_by_line!(),
                moving_to!()
            ))
            .await?;
        let locked = client
            .query_one(&bump, &[&user.as_str(), &currency.as_str()])
            .await?;
        carts::refuse_moving(user.as_str(), locked.try_get(2)?)?;
        let by_line: bool = locked.try_get(1)?;
        let done = client
            .prepare_cached(
                "SELECT report, abandoned_at IS NOT NULL FROM cart_merges \
                 WHERE user_owner = $1 AND guest_owner = $2 AND guest_version = $3",
            )
            .await?;
        if let Some(row) = client
            .query_opt(
                &done,
                &[&user.as_str(), &guest.cart.owner.as_str(), &guest.version],
            )
            .await?
        {
            if row.try_get::<_, bool>(1)? {
                return Ok(MergeOutcome::Fenced);
            }
            let report: serde_json::Value = row.try_get(0)?;
            let report = serde_json::from_value(report).map_err(|error| {
                StoreError::corrupt(format!(
                    "merge record {user} <- {}@{}: report does not decode: {error}",
                    guest.cart.owner, guest.version
                ))
            })?;
            return Ok(MergeOutcome::AlreadyApplied { report });
        }
        let mut current = carts::load(client, user).await?;
        let mut guest_cart = std::borrow::Cow::Borrowed(&guest.cart);
        if !by_line {
            // Legacy mode (a database before V4): lines are keyed by item, as they were.
            for line in &mut current.lines {
                line.line_id.clone_from(&line.item_id);
            }
            for line in &mut guest_cart.to_mut().lines {
                line.line_id.clone_from(&line.item_id);
            }
        }
        if home_catalog.is_none() && merge_reprices(&current, &guest_cart, home_currency) {
            return Err(StoreError::Unavailable(
                "the catalog could not be read to re-price a guest cart in another currency".into(),
            ));
        }
        let plan = plan_merge(
            &current,
            &guest_cart,
            strategy,
            max_lines,
            home_currency,
            |id| {
                home_catalog
                    .and_then(|items| items.get(id))
                    .map(Arc::as_ref)
            },
        );
        if current.currency != Some(plan.currency) {
            let set = client
                .prepare_cached("UPDATE carts SET currency = $2 WHERE owner = $1")
                .await?;
            client
                .execute(&set, &[&user.as_str(), &plan.currency.as_str()])
                .await?;
        }
        let upsert = client
            .prepare_cached(if by_line {
                "INSERT INTO cart_items \
                 (owner, line_id, item_id, quantity, unit_price_minor, currency, variant) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (owner, line_id) DO UPDATE \
                 SET quantity = EXCLUDED.quantity, unit_price_minor = EXCLUDED.unit_price_minor, \
                     variant = EXCLUDED.variant, updated_at = now()"
            } else {
                // Legacy mode: no line id column, the item id is the key.
                "INSERT INTO cart_items \
                 (owner, item_id, quantity, unit_price_minor, currency, variant) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (owner, item_id) DO UPDATE \
                 SET quantity = EXCLUDED.quantity, unit_price_minor = EXCLUDED.unit_price_minor, \
                     variant = EXCLUDED.variant, updated_at = now()"
            })
            .await?;
        let line_currency = plan.currency;
        let (user_key, line_currency_code) = (user.as_str(), line_currency.as_str());
        for write in &plan.writes {
            let quantity = i32::from(write.quantity);
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                &user_key,
                &write.line_id,
                &write.item_id,
                &quantity,
                &write.unit_price_minor,
                &line_currency_code,
                &write.variant,
            ];
            if !by_line {
                params.remove(1);
            }
            client.execute(&upsert, &params).await?;
        }
        let report = serde_json::to_value(&plan.report).unwrap_or_default();
        // A janitor settling this merge without a user cart row to lock may have fenced it since
        // the check above: then nothing of this transaction may commit.
        let record = client
            .prepare_cached(
                "INSERT INTO cart_merges (user_owner, guest_owner, guest_version, report) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .await?;
        let recorded = client
            .execute(
                &record,
                &[
                    &user.as_str(),
                    &guest.cart.owner.as_str(),
                    &guest.version,
                    &report,
                ],
            )
            .await?;
        if recorded == 0 {
            return Ok(MergeOutcome::Fenced);
        }
        let cart = carts::load(client, user).await?;
        events::record(
            client,
            user.as_str(),
            cart.version,
            "carts_merged",
            &json!({ "guest": guest.cart.owner, "guest_version": guest.version, "report": report }),
        )
        .await?;
        Ok(MergeOutcome::Applied {
            cart,
            report: plan.report,
        })
    }
}
