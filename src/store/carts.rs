//! Cart SQL: the consistent read of one cart and the write transaction every mutation uses.
//!
//! A mutation is one transaction on the primary. After the idempotency claim (when a key is
//! present: an advisory transaction lock on the key, then a lookup), its first statement on the
//! cart bumps the cart's version and so takes the cart row's lock: concurrent writers of one cart
//! queue behind each other and every read-modify-write below happens under that lock. The key's
//! answer is recorded inside the same transaction.

use bytes::Bytes;
use deadpool_postgres::Object;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::tx::Transaction;
use super::StoreError;
use crate::domain::cart::{
    check_version, plan_add, AddRequest, CartRule, CatalogItem, LineContext, Quantity, StoredCart,
    StoredLine,
};
use crate::domain::ids::{ItemId, OwnerKey};
use crate::domain::money::Currency;
use crate::domain::variant::{stored_line_id, LineId};

/// Whether `cart_items` keys lines by line id (migration V4). Until a region's primaries are
/// migrated, this version writes there as the edges before it did: a line per item, the
/// variant's last value kept (legacy mode), so its edges can be deployed before `migrate` runs.
/// The check is part of the statement that locks the cart, so it costs no round trip.
macro_rules! keyed_by_line {
    () => {
        "EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'cart_items'::regclass \
         AND attname = 'line_id' AND NOT attisdropped)"
    };
}
pub(super) use keyed_by_line;

/// The line id is read through `to_jsonb(i)` so this statement also runs on a replica of a
/// region not yet migrated to V4 (no `line_id` column): the id is then derived from the item and
/// variant, by the same rule the edge writes it with.
/// A row a move took away (V8 `moved_at`, read through `to_jsonb` for the same reason) is only a
/// pointer to the shard named by `moving_to`: it is reported as [`StoreError::Moved`], never
/// read as a cart.
const LOAD_CART: &str = "SELECT c.currency, c.version, c.updated_at, i.item_id, i.quantity, \
     i.variant, i.unit_price_minor, i.added_at, i.updated_at, to_jsonb(i) ->> 'line_id', \
     (to_jsonb(c) ->> 'moved_at') IS NOT NULL, to_jsonb(c) ->> 'moving_to' \
     FROM carts c LEFT JOIN cart_items i ON i.owner = c.owner \
     WHERE c.owner = $1 ORDER BY i.added_at, i.item_id, 10";

/// Appended to the `RETURNING` of the statement that locks a cart for a write: the shard a move
/// froze the row for (V8 `moving_to`; NULL on a database before V8). A frozen or moved row is
/// never written: the write is refused with [`StoreError::Moving`] and rolled back.
macro_rules! moving_to {
    () => {
        ", to_jsonb(carts) ->> 'moving_to'"
    };
}
pub(super) use moving_to;

/// A line's quantity as stored, checked against the cart rules (the schema's CHECK says the
/// same; a row that breaks it is corrupt, never truncated into range).
fn stored_quantity(owner: &str, line: &str, quantity: i32) -> Result<Quantity, StoreError> {
    Quantity::parse(i64::from(quantity)).ok_or_else(|| {
        StoreError::corrupt(format!("cart {owner}: line {line} has quantity {quantity}"))
    })
}

/// Reads one cart in a single statement (one consistent snapshot).
pub async fn load(client: &Object, owner: &OwnerKey) -> Result<StoredCart, StoreError> {
    let statement = client.prepare_cached(LOAD_CART).await?;
    let rows = client.query(&statement, &[&owner.as_str()]).await?;
    let Some(first) = rows.first() else {
        return Ok(StoredCart::empty(owner.as_str()));
    };
    if first.try_get::<_, bool>(10)? {
        return Err(StoreError::Moved {
            to: first.try_get::<_, Option<String>>(11)?.unwrap_or_default(),
            version: first.try_get(1)?,
        });
    }
    let currency: String = first.try_get(0)?;
    let mut cart = StoredCart {
        owner: owner.as_str().to_string(),
        currency: Currency::parse(&currency),
        version: first.try_get(1)?,
        lines: Vec::with_capacity(rows.len()),
        updated_at: Some(first.try_get(2)?),
    };
    for row in &rows {
        let item_id: Option<String> = row.try_get(3)?;
        let Some(item_id) = item_id else { continue };
        let quantity = stored_quantity(owner.as_str(), &item_id, row.try_get(4)?)?;
        let variant: Option<Value> = row.try_get(5)?;
        let line_id: Option<String> = row.try_get(9)?;
        cart.lines.push(StoredLine {
            line_id: stored_line_id(line_id.as_deref(), &item_id, variant.as_ref()),
            item_id,
            quantity: quantity.get(),
            variant,
            unit_price_minor: row.try_get(6)?,
            added_at: row.try_get(7)?,
            updated_at: row.try_get(8)?,
        });
    }
    Ok(cart)
}

/// One cart mutation, validated by the API layer.
#[derive(Debug)]
pub enum CartOp<'a> {
    Add {
        /// The item; with `variant` it names the line the add lands on (`LineId::of`).
        item_id: &'a ItemId,
        /// The catalog's current entry (None: unknown item).
        item: Option<&'a CatalogItem>,
        request: &'a AddRequest,
        variant: Option<&'a Value>,
        /// Currency a cart created by this add gets (the receiving region's).
        new_cart_currency: Currency,
        max_lines: u32,
    },
    /// Sets one line's quantity (a line id naming just an item is its variant-less line).
    SetQuantity {
        line_id: &'a LineId,
        quantity: Quantity,
        if_match: Option<i64>,
    },
    /// Removes one line.
    Remove {
        line_id: &'a LineId,
        if_match: Option<i64>,
    },
    Clear {
        if_match: Option<i64>,
    },
}

impl CartOp<'_> {
    /// The outbox event this mutation writes: its kind and payload.
    fn event(&self) -> (&'static str, Value) {
        match self {
            CartOp::Add {
                item_id,
                request,
                variant,
                ..
            } => (
                "item_added",
                serde_json::json!({
                    "item_id": item_id.as_str(),
                    "line_id": LineId::of(item_id, *variant).as_str(),
                    "variant": variant,
                    "quantity": request.quantity.get(),
                }),
            ),
            CartOp::SetQuantity {
                line_id, quantity, ..
            } => (
                "quantity_set",
                serde_json::json!({
                    "item_id": line_id.item_id(),
                    "line_id": line_id.as_str(),
                    "quantity": quantity.get(),
                }),
            ),
            CartOp::Remove { line_id, .. } => (
                "item_removed",
                serde_json::json!({ "item_id": line_id.item_id(), "line_id": line_id.as_str() }),
            ),
            CartOp::Clear { .. } => ("cart_cleared", serde_json::json!({})),
        }
    }
}

/// A response stored with its idempotency key, replayed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// What claiming an idempotency key found.
#[derive(Debug)]
pub enum Claim {
    /// First use: go ahead, then record the response.
    Fresh,
    /// Already done with the same request: replay this.
    Replay(StoredResponse),
    /// Already used for a different request.
    Reused,
    /// Another transaction holds the key right now.
    InProgress,
}

/// An open transaction on the primary, built on [`Transaction`]. Commit or roll back
/// explicitly; dropping it unfinished (a panic, a cancelled request) discards the connection so
/// the server aborts the transaction.
pub struct WriteTx {
    transaction: Transaction<Object>,
    /// `cartedge_db_query_duration_seconds` of the shard's primary: begin to commit.
    timer: Histogram,
    started: std::time::Instant,
    /// `cartedge_idempotent_replays_total`.
    replays: Counter,
}

impl WriteTx {
    pub(super) async fn begin(
        client: Object,
        timer: Histogram,
        replays: Counter,
    ) -> Result<WriteTx, StoreError> {
        let started = std::time::Instant::now();
        Ok(WriteTx {
            transaction: Transaction::begin(client).await?,
            timer,
            started,
            replays,
        })
    }

    pub(super) fn client(&self) -> Result<&Object, StoreError> {
        self.transaction.connection()
    }

    /// Claims `key` for `owner`. The advisory lock (held until the transaction ends) makes a
    /// concurrent duplicate see [`Claim::InProgress`] instead of running twice.
    pub async fn claim_idempotency(
        &mut self,
        owner: &OwnerKey,
        key: &str,
        request_hash: &[u8],
    ) -> Result<Claim, StoreError> {
        let client = self.client()?;
        let lock = client
            .prepare_cached("SELECT pg_try_advisory_xact_lock($1)")
            .await?;
        let acquired: bool = client
            .query_one(&lock, &[&advisory_key(owner, key)])
            .await?
            .try_get(0)?;
        if !acquired {
            return Ok(Claim::InProgress);
        }
        let select = client
            .prepare_cached(
                "SELECT request_hash, status, headers, body FROM idempotency_keys \
                 WHERE owner = $1 AND key = $2",
            )
            .await?;
        let Some(row) = client.query_opt(&select, &[&owner.as_str(), &key]).await? else {
            return Ok(Claim::Fresh);
        };
        let stored_hash: Vec<u8> = row.try_get(0)?;
        if stored_hash != request_hash {
            return Ok(Claim::Reused);
        }
        let status: i16 = row.try_get(1)?;
        let headers: Value = row.try_get(2)?;
        let body: Vec<u8> = row.try_get(3)?;
        let corrupt =
            |what: String| StoreError::corrupt(format!("idempotency record {owner}/{key}: {what}"));
        let headers = serde_json::from_value(headers)
            .map_err(|error| corrupt(format!("headers do not decode: {error}")))?;
        let status = u16::try_from(status)
            .ok()
            .filter(|status| (100..=599).contains(status))
            .ok_or_else(|| corrupt(format!("status {status}")))?;
        self.replays.inc();
        Ok(Claim::Replay(StoredResponse {
            status,
            headers,
            body: Bytes::from(body),
        }))
    }

    /// Records the response of a fresh request under its key, in this transaction.
    pub async fn record_idempotency(
        &mut self,
        owner: &OwnerKey,
        key: &str,
        request_hash: &[u8],
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let client = self.client()?;
        let insert = client
            .prepare_cached(
                "INSERT INTO idempotency_keys (owner, key, request_hash, status, headers, body) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        let headers = serde_json::to_value(&response.headers).unwrap_or(Value::Null);
        client
            .execute(
                &insert,
                &[
                    &owner.as_str(),
                    &key,
                    &request_hash,
                    &(response.status as i16),
                    &headers,
                    &response.body.as_ref(),
                ],
            )
            .await?;
        Ok(())
    }

    /// Applies one mutation and returns the cart as committed-to-be, or the rule it broke (the
    /// caller then rolls back).
    pub async fn apply(
        &mut self,
        owner: &OwnerKey,
        op: &CartOp<'_>,
    ) -> Result<Result<StoredCart, CartRule>, StoreError> {
        let client = self.client()?;
        let owner_str = owner.as_str();
        match op {
            CartOp::Add {
                item_id,
                item,
                request,
                variant,
                new_cart_currency,
                max_lines,
            } => {
                let bump = client
                    .prepare_cached(concat!(
                        "INSERT INTO carts (owner, currency, version) VALUES ($1, $2, 1) \
                         ON CONFLICT (owner) DO UPDATE \
                         SET version = carts.version + 1, updated_at = now(), purged_at = NULL \
                         RETURNING currency, merging_into, ",
                        keyed_by_line!(),
                        moving_to!()
                    ))
                    .await?;
                let row = client
                    .query_one(&bump, &[&owner_str, &new_cart_currency.as_str()])
                    .await?;
                refuse_moving(owner_str, row.try_get(3)?)?;
                let currency: String = row.try_get(0)?;
                if row.try_get::<_, Option<String>>(1)?.is_some() {
                    return Ok(Err(CartRule::MergeInProgress));
                }
                let by_line: bool = row.try_get(2)?;
                let cart_currency = Currency::parse(&currency).unwrap_or(*new_cart_currency);
                // In legacy mode the item id is the line's key.
                let line_id = LineId::of(item_id, variant.filter(|_| by_line));
                let context_query = client
                    .prepare_cached(if by_line {
                        "SELECT (SELECT quantity FROM cart_items WHERE owner = $1 AND line_id = $2), \
                         (SELECT count(*) FROM cart_items WHERE owner = $1)"
                    } else {
                        "SELECT (SELECT quantity FROM cart_items WHERE owner = $1 AND item_id = $2), \
                         (SELECT count(*) FROM cart_items WHERE owner = $1)"
                    })
                    .await?;
                let row = client
                    .query_one(&context_query, &[&owner_str, &line_id.as_str()])
                    .await?;
                let existing: Option<i32> = row.try_get(0)?;
                let existing = existing
                    .map(|q| stored_quantity(owner_str, line_id.as_str(), q))
                    .transpose()?;
                let line_count: i64 = row.try_get(1)?;
                let context = LineContext {
                    cart_currency,
                    existing_quantity: existing.map(Quantity::get),
                    line_count: usize::try_from(line_count).map_err(|_| {
                        StoreError::corrupt(format!("cart {owner_str}: {line_count} lines"))
                    })?,
                    max_lines: *max_lines,
                };
                let plan = match plan_add(*item, context, request) {
                    Ok(plan) => plan,
                    Err(rule) => return Ok(Err(rule)),
                };
                let upsert = client
                    .prepare_cached(if by_line {
                        "INSERT INTO cart_items \
                         (owner, line_id, item_id, quantity, unit_price_minor, currency, variant) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (owner, line_id) DO UPDATE \
                         SET quantity = EXCLUDED.quantity, updated_at = now()"
                    } else {
                        "INSERT INTO cart_items \
                         (owner, item_id, quantity, unit_price_minor, currency, variant) \
                         VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (owner, item_id) DO UPDATE \
                         SET quantity = EXCLUDED.quantity, \
                             variant = COALESCE(EXCLUDED.variant, cart_items.variant), \
                             updated_at = now()"
                    })
                    .await?;
                let quantity = i32::from(plan.new_quantity.get());
                let line_params: [&(dyn ToSql + Sync); 7] = [
                    &owner_str,
                    &line_id.as_str(),
                    &item_id.as_str(),
                    &quantity,
                    &plan.unit_price_minor,
                    &cart_currency.as_str(),
                    variant,
                ];
                if by_line {
                    client.execute(&upsert, &line_params).await?;
                } else {
                    // Legacy mode has no line id column.
                    let mut legacy_params = line_params.to_vec();
                    legacy_params.remove(1);
                    client.execute(&upsert, &legacy_params).await?;
                }
            }
            CartOp::SetQuantity {
                line_id,
                quantity,
                if_match,
            } => {
                let by_line = match bump_existing(client, owner_str, *if_match).await? {
                    Ok(by_line) => by_line,
                    Err(rule) => return Ok(Err(rule)),
                };
                let quantity = i32::from(quantity.get());
                let found = if by_line {
                    let update = client
                        .prepare_cached(
                            "UPDATE cart_items SET quantity = $3, updated_at = now() \
                             WHERE owner = $1 AND line_id = $2",
                        )
                        .await?;
                    client
                        .execute(&update, &[&owner_str, &line_id.as_str(), &quantity])
                        .await?
                        > 0
                } else {
                    let update = client
                        .prepare_cached(
                            "UPDATE cart_items SET quantity = $3, updated_at = now() \
                             WHERE owner = $1 AND item_id = $2 RETURNING variant",
                        )
                        .await?;
                    let rows = client
                        .query(&update, &[&owner_str, &line_id.item_id(), &quantity])
                        .await?;
                    legacy_line_is(&rows, line_id)?
                };
                if !found {
                    return Ok(Err(CartRule::ItemNotInCart));
                }
            }
            CartOp::Remove { line_id, if_match } => {
                let by_line = match bump_existing(client, owner_str, *if_match).await? {
                    Ok(by_line) => by_line,
                    Err(rule) => return Ok(Err(rule)),
                };
                let found = if by_line {
                    let delete = client
                        .prepare_cached("DELETE FROM cart_items WHERE owner = $1 AND line_id = $2")
                        .await?;
                    client
                        .execute(&delete, &[&owner_str, &line_id.as_str()])
                        .await?
                        > 0
                } else {
                    let delete = client
                        .prepare_cached(
                            "DELETE FROM cart_items WHERE owner = $1 AND item_id = $2 \
                             RETURNING variant",
                        )
                        .await?;
                    let rows = client
                        .query(&delete, &[&owner_str, &line_id.item_id()])
                        .await?;
                    legacy_line_is(&rows, line_id)?
                };
                if !found {
                    return Ok(Err(CartRule::ItemNotInCart));
                }
            }
            CartOp::Clear { if_match } => {
                match bump_existing(client, owner_str, *if_match).await? {
                    Ok(_) => {}
                    // Clearing a cart that does not exist leaves it not existing.
                    Err(CartRule::ItemNotInCart) => return Ok(Ok(StoredCart::empty(owner_str))),
                    Err(rule) => return Ok(Err(rule)),
                }
                let delete = client
                    .prepare_cached("DELETE FROM cart_items WHERE owner = $1")
                    .await?;
                client.execute(&delete, &[&owner_str]).await?;
            }
        }
        let cart = load(client, owner).await?;
        if cart.version > 0 {
            let (kind, payload) = op.event();
            super::events::record(client, owner_str, cart.version, kind, &payload).await?;
        }
        Ok(Ok(cart))
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        let committed = self.transaction.commit().await;
        if committed.is_ok() {
            self.timer.observe(self.started.elapsed().as_secs_f64());
        }
        committed
    }

    pub async fn rollback(self) {
        self.transaction.rollback().await
    }

    /// Rolls back and leaves this handle finished (for callers that only borrow it).
    pub async fn rollback_in_place(&mut self) {
        self.transaction.rollback_in_place().await
    }
}

/// Whether the line a legacy-mode (V3) statement touched, if any, is `line_id`: there the item
/// id is the key, and the line's id derives from its variant. On `false` the caller answers
/// `item_not_in_cart` and the transaction is rolled back, undoing the touch.
fn legacy_line_is(rows: &[tokio_postgres::Row], line_id: &LineId) -> Result<bool, StoreError> {
    let Some(row) = rows.first() else {
        return Ok(false);
    };
    let variant: Option<Value> = row.try_get(0)?;
    Ok(stored_line_id(None, line_id.item_id(), variant.as_ref()) == line_id.as_str())
}

/// Bumps the version of an existing cart, checking `If-Match` against the version before the
/// bump. A missing cart is reported as [`CartRule::ItemNotInCart`] (after the version check,
/// which compares against version 0). `Ok(true)`: the database keys lines by line id (V4).
async fn bump_existing(
    client: &Object,
    owner: &str,
    if_match: Option<i64>,
) -> Result<Result<bool, CartRule>, StoreError> {
    let bump = client
        .prepare_cached(concat!(
            "UPDATE carts SET version = version + 1, updated_at = now(), purged_at = NULL \
             WHERE owner = $1 RETURNING version, merging_into, ",
            keyed_by_line!(),
            moving_to!()
        ))
        .await?;
    let Some(row) = client.query_opt(&bump, &[&owner]).await? else {
        return Ok(check_version(if_match, 0).and(Err(CartRule::ItemNotInCart)));
    };
    refuse_moving(owner, row.try_get(3)?)?;
    let bumped: i64 = row.try_get(0)?;
    if row.try_get::<_, Option<String>>(1)?.is_some() {
        return Ok(Err(CartRule::MergeInProgress));
    }
    let by_line: bool = row.try_get(2)?;
    Ok(check_version(if_match, bumped - 1).map(|()| by_line))
}

/// Refuses a write to a cart row a move froze or moved (`moving_to` set): an edge still on the
/// previous ring must not write where the cart no longer lives. The caller's transaction is
/// rolled back and the client retries (503), by then on the cart's new shard.
pub(super) fn refuse_moving(owner: &str, moving_to: Option<String>) -> Result<(), StoreError> {
    match moving_to {
        Some(to) => Err(StoreError::Moving {
            owner: owner.to_string(),
            to,
        }),
        None => Ok(()),
    }
}

/// A 64-bit advisory-lock key for an (owner, idempotency key) pair.
fn advisory_key(owner: &OwnerKey, key: &str) -> i64 {
    super::advisory_lock_key("cartedge-idempotency", &[owner.as_str(), key])
}
