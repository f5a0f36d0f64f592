//! Moving a cart from the shard the previous ring placed its owner on to the shard the current
//! ring places it on (the ring file's `moving_from`), while both keep serving.
//!
//! Three steps, each one transaction on one shard, each safe to repeat, like the merge's:
//! 1. [`freeze`] (old shard): lock the cart row, mark it `moving_to = <new shard>` and hand over
//!    everything the owner has there that the write path reads: the cart row (version, currency,
//!    frozen-merge state), its lines with their captured prices, the owner's idempotency records
//!    (so a replayed key still replays after the move) and the merges recorded into it (so a
//!    retried merge still adds nothing twice). From then on this release writes the cart only on
//!    the new shard. Freezing again returns the same snapshot (nothing writes a frozen row).
//! 2. [`copy`] (new shard): insert the snapshot at its version, unless the owner already has a
//!    cart there (an earlier copy, and maybe writes after it): then nothing is done. A row left
//!    there by an earlier move away is a pointer and is replaced.
//! 3. [`mark`] (old shard): mark the row moved (`moved_at`), delete its lines and lift its
//!    merge state, keeping its version: the row is a pointer to the new shard from then on.
//!
//! A crash or a lost answer between steps leaves a frozen row (1), or a frozen row and a copy
//! (2); running the steps again converges on "copied once, old row moved". The version never
//! goes backwards: the copy keeps the frozen version, and every write after it bumps it on the
//! new shard, so caches and `Cart-Min-Version` stay valid across the move.
//!
//! The snapshot travels as JSON (`to_jsonb` of each row, read back with
//! `jsonb_populate_record`), so the copy names no column and moves what the schema holds;
//! both shards must run the same migrations (V8 or later).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{tx, Store, StoreError};
use crate::domain::cart::StoredCart;
use crate::domain::ids::OwnerKey;

/// Everything of one owner a move carries from the old shard to the new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub owner: String,
    /// The cart's version when frozen: the copy keeps it.
    pub version: i64,
    /// The `carts` row, as `to_jsonb` gave it.
    pub cart: Value,
    /// The `cart_items` rows.
    pub items: Value,
    /// The owner's `idempotency_keys` rows.
    pub idempotency: Value,
    /// The `cart_merges` rows recorded into this owner's cart.
    pub merges: Value,
}

/// What step 1 found on the old shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Freeze {
    /// The owner has no cart row there: nothing to move.
    Absent,
    /// Frozen (now or before): copy this.
    Frozen { snapshot: Box<Snapshot> },
    /// Step 3 already ran: the cart is on `to`.
    Moved { to: String },
}

/// What step 2 did on the new shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    Now,
    /// The owner already had a cart there (an earlier copy): nothing done.
    Before,
}

/// How a cart row reads on one shard, for a reader that must not take a pointer for a cart.
#[derive(Debug, Clone, PartialEq)]
pub enum Located {
    /// The cart (empty with version 0 when the owner has no row).
    Here(StoredCart),
    /// The row was moved (step 3) at `version` to shard `to`.
    Moved { to: String, version: i64 },
}

/// Step 1, on the old shard's primary.
pub async fn freeze(
    store: &Store,
    from_shard: &str,
    owner: &str,
    to_shard: &str,
) -> Result<Freeze, StoreError> {
    let client = store.db_write(from_shard).await?;
    tx::run(client, async |client| {
        let lock = client
            .prepare_cached(
                "SELECT version, moving_to, moved_at IS NOT NULL FROM carts \
                 WHERE owner = $1 FOR UPDATE",
            )
            .await?;
        let Some(row) = client.query_opt(&lock, &[&owner]).await? else {
            return Ok(Freeze::Absent);
        };
        let version: i64 = row.try_get(0)?;
        let moving_to: Option<String> = row.try_get(1)?;
        if row.try_get::<_, bool>(2)? {
            return Ok(Freeze::Moved {
                to: moving_to.unwrap_or_else(|| to_shard.to_string()),
            });
        }
        if moving_to.as_deref() != Some(to_shard) {
            let mark = client
                .prepare_cached("UPDATE carts SET moving_to = $2 WHERE owner = $1")
                .await?;
            client.execute(&mark, &[&owner, &to_shard]).await?;
        }
        let rows = client
            .prepare_cached(
                "SELECT (SELECT to_jsonb(c) FROM carts c WHERE c.owner = $1), \
                 (SELECT coalesce(jsonb_agg(to_jsonb(i)), '[]'::jsonb) FROM cart_items i \
                  WHERE i.owner = $1), \
                 (SELECT coalesce(jsonb_agg(to_jsonb(k)), '[]'::jsonb) FROM idempotency_keys k \
                  WHERE k.owner = $1), \
                 (SELECT coalesce(jsonb_agg(to_jsonb(m)), '[]'::jsonb) FROM cart_merges m \
                  WHERE m.user_owner = $1)",
            )
            .await?;
        let row = client.query_one(&rows, &[&owner]).await?;
        Ok(Freeze::Frozen {
            snapshot: Box::new(Snapshot {
                owner: owner.to_string(),
                version,
                cart: row.try_get(0)?,
                items: row.try_get(1)?,
                idempotency: row.try_get(2)?,
                merges: row.try_get(3)?,
            }),
        })
    })
    .await
}

/// Step 2, on the new shard's primary.
pub async fn copy(
    store: &Store,
    to_shard: &str,
    snapshot: &Snapshot,
) -> Result<Copied, StoreError> {
    let owner = snapshot.owner.as_str();
    let mut cart = snapshot.cart.clone();
    let Some(fields) = cart.as_object_mut() else {
        return Err(StoreError::corrupt(format!(
            "move snapshot of {owner}: the cart row is not an object"
        )));
    };
    if fields.get("owner").and_then(Value::as_str) != Some(owner) {
        return Err(StoreError::corrupt(format!(
            "move snapshot of {owner}: the cart row names another owner"
        )));
    }
    // The copy is the cart, not a pointer.
    fields.insert("moving_to".into(), Value::Null);
    fields.insert("moved_at".into(), Value::Null);
    let client = store.db_write(to_shard).await?;
    tx::run(client, async |client| {
        // A row an earlier move took away from this shard is only a pointer: the cart
        // replaces it (its lines were deleted with the mark).
        let stale = client
            .prepare_cached("DELETE FROM carts WHERE owner = $1 AND moved_at IS NOT NULL")
            .await?;
        client.execute(&stale, &[&owner]).await?;
        let insert = client
            .prepare_cached(
                "INSERT INTO carts SELECT * FROM jsonb_populate_record(NULL::carts, $1) \
                 ON CONFLICT (owner) DO NOTHING",
            )
            .await?;
        if client.execute(&insert, &[&cart]).await? == 0 {
            return Ok(Copied::Before);
        }
        let items = client
            .prepare_cached(
                "INSERT INTO cart_items \
                 SELECT * FROM jsonb_populate_recordset(NULL::cart_items, $1)",
            )
            .await?;
        client.execute(&items, &[&snapshot.items]).await?;
        let keys = client
            .prepare_cached(
                "INSERT INTO idempotency_keys \
                 SELECT * FROM jsonb_populate_recordset(NULL::idempotency_keys, $1) \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        client.execute(&keys, &[&snapshot.idempotency]).await?;
        let merges = client
            .prepare_cached(
                "INSERT INTO cart_merges \
                 SELECT * FROM jsonb_populate_recordset(NULL::cart_merges, $1) \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        client.execute(&merges, &[&snapshot.merges]).await?;
        Ok(Copied::Now)
    })
    .await
}

/// Step 3, on the old shard's primary: marks `owner`'s row moved to `to_shard`, if it is
/// frozen for that move. Returns whether this call marked it.
pub async fn mark(
    store: &Store,
    from_shard: &str,
    owner: &str,
    to_shard: &str,
) -> Result<bool, StoreError> {
    let client = store.db_write(from_shard).await?;
    tx::run(client, async |client| {
        let mark = client
            .prepare_cached(
                "UPDATE carts SET moved_at = now(), merging_into = NULL, merge_version = NULL, \
                 merge_started_at = NULL, merge_user_shard = NULL \
                 WHERE owner = $1 AND moving_to = $2 AND moved_at IS NULL",
            )
            .await?;
        if client.execute(&mark, &[&owner, &to_shard]).await? == 0 {
            return Ok(false);
        }
        let delete = client
            .prepare_cached("DELETE FROM cart_items WHERE owner = $1")
            .await?;
        client.execute(&delete, &[&owner]).await?;
        Ok(true)
    })
    .await
}

/// Reads `owner`'s row on `shard` (replica, or primary when the replica is older than
/// `min_version` here at home), telling a moved row from a cart in one statement.
pub async fn locate(
    store: &Store,
    shard: &str,
    owner: &OwnerKey,
    min_version: i64,
) -> Result<Located, StoreError> {
    match store.read_from_database(shard, owner, min_version).await {
        Ok((cart, _)) => Ok(Located::Here(cart)),
        Err(StoreError::Moved { to, version }) => Ok(Located::Moved { to, version }),
        Err(error) => Err(error),
    }
}

/// Whether `owner` has a cart row on `shard` that is the cart (not a moved pointer), read on
/// the primary: a write of a moving owner whose cart is already there skips the move's steps
/// (a copy whose mark was lost is finished by `ring move`, which finds the old row unmarked).
pub async fn holds_cart(store: &Store, shard: &str, owner: &str) -> Result<bool, StoreError> {
    let client = store.db_write(shard).await?;
    let present = client
        .prepare_cached(
            "SELECT 1 FROM carts WHERE owner = $1 AND (to_jsonb(carts) ->> 'moved_at') IS NULL",
        )
        .await?;
    Ok(client.query_opt(&present, &[&owner]).await?.is_some())
}

/// One page of owners with a cart row on `shard` not marked moved, after `after` in owner
/// order (the `ring move` scan): on the primary where the shard is homed here, else on this
/// region's replica (each move's freeze then reads the primary).
pub async fn unmoved_owners(
    store: &Store,
    shard: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let (client, _) = if store.is_home(shard) {
        store.db_read_prefer_primary(shard).await?
    } else {
        store.db_read(shard).await?
    };
    let page = client
        .prepare_cached(
            "SELECT owner FROM carts WHERE owner > $1 \
             AND (to_jsonb(carts) ->> 'moved_at') IS NULL ORDER BY owner LIMIT $2",
        )
        .await?;
    let rows = client.query(&page, &[&after, &limit]).await?;
    rows.iter()
        .map(|row| row.try_get(0).map_err(StoreError::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freeze_answer_round_trips_as_tagged_json() {
        let frozen = Freeze::Frozen {
            snapshot: Box::new(Snapshot {
                owner: "u:alice".into(),
                version: 7,
                cart: serde_json::json!({"owner": "u:alice", "version": 7}),
                items: serde_json::json!([]),
                idempotency: serde_json::json!([]),
                merges: serde_json::json!([]),
            }),
        };
        for answer in [frozen, Freeze::Absent, Freeze::Moved { to: "sg-3".into() }] {
            let text = serde_json::to_string(&answer).unwrap();
            assert_eq!(serde_json::from_str::<Freeze>(&text).unwrap(), answer);
        }
        assert_eq!(
            serde_json::to_string(&Freeze::Absent).unwrap(),
            r#"{"status":"absent"}"#
        );
    }
}
