//! Cart SQL: the consistent read of one cart and the write transaction every mutation uses.
//!
//! A mutation is one transaction on the primary. After the idempotency claim (when a key is
//! present: an advisory transaction lock on the key, then a lookup), its first statement on the
//! cart bumps the cart's version and so takes the cart row's lock: concurrent writers of one cart
//! queue behind each other and every read-modify-write below happens under that lock. The key's
//! answer is recorded inside the same transaction.
//!
//! Round trips are saved by pipelining where order alone keeps the meaning (PostgreSQL runs a
//! connection's messages in order): `BEGIN` goes with the first statements, the key's lock with
//! its lookup, an add's bump with its line context, a change with its event and the cart read
//! back, the key's record with `COMMIT` (`store::tx`). A keyed add is four round trips.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::Object;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

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
    cart_of(owner, &rows)
}

/// The cart [`LOAD_CART`]'s rows describe.
fn cart_of(owner: &OwnerKey, rows: &[tokio_postgres::Row]) -> Result<StoredCart, StoreError> {
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
    for row in rows {
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

/// An add's line context on a schema keying lines by line id: the line's quantity (NULL: no
/// such line) and how many lines the cart has.
const LINE_CONTEXT_BY_LINE: &str =
    "SELECT (SELECT quantity FROM cart_items WHERE owner = $1 AND line_id = $2), \
     (SELECT count(*) FROM cart_items WHERE owner = $1)";

/// The statement that changes a cart's lines in [`WriteTx::apply`], with what it binds (held
/// here so the pipeline that sends it can borrow them).
enum Change<'v> {
    /// An add's upsert; `line_id` None in legacy mode (no line id column).
    Upsert {
        statement: Statement,
        line_id: Option<LineId>,
        item_id: &'v str,
        quantity: i32,
        price: i64,
        currency: Currency,
        variant: Option<&'v Value>,
    },
    /// A quantity set (`quantity`) or a removal of one line: keyed by line id (`by_line`) or,
    /// in legacy mode, by item id with the touched row checked against the line.
    Line {
        statement: Statement,
        line_id: &'v LineId,
        by_line: bool,
        quantity: Option<i32>,
    },
    Clear {
        statement: Statement,
    },
}

/// Whether `params` encode as `statement`'s parameters: what a pipeline ending in `COMMIT`
/// must know before sending (see `Transaction::commit_with`). Encoding is deterministic, so
/// parameters that encode here encode again when sent.
fn check_encodes(statement: &Statement, params: &[&(dyn ToSql + Sync)]) -> Result<(), StoreError> {
    let types = statement.params();
    if types.len() != params.len() {
        return Err(StoreError::corrupt(format!(
            "statement expects {} parameters, {} given",
            types.len(),
            params.len()
        )));
    }
    let mut scratch = bytes::BytesMut::new();
    for (param, ty) in params.iter().zip(types) {
        scratch.clear();
        param
            .to_sql_checked(ty, &mut scratch)
            .map_err(|error| StoreError::corrupt(format!("parameter does not encode: {error}")))?;
    }
    Ok(())
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
    /// Deferred: `BEGIN` goes out with the first statements.
    transaction: Transaction<Object>,
    /// Whether this shard's schema keys lines by line id (V4), as the last bump said: an add
    /// then reads its line's context in the same round trip as the bump.
    lines_keyed: Arc<AtomicBool>,
    /// `cartedge_db_query_duration_seconds` of the shard's primary: begin to commit.
    timer: Histogram,
    started: std::time::Instant,
    /// `cartedge_idempotent_replays_total`.
    replays: Counter,
}

impl WriteTx {
    /// A write transaction on `client` (a primary's connection). Sends nothing yet: `BEGIN`
    /// goes out with the first statements.
    pub(super) fn new(
        client: Object,
        lines_keyed: Arc<AtomicBool>,
        timer: Histogram,
        replays: Counter,
    ) -> WriteTx {
        WriteTx {
            transaction: Transaction::deferred(client),
            lines_keyed,
            timer,
            started: std::time::Instant::now(),
            replays,
        }
    }

    /// The connection, the transaction begun.
    pub(super) async fn client(&self) -> Result<&Object, StoreError> {
        self.transaction.open().await
    }

    /// Claims `key` for `owner`. The advisory lock (held until the transaction ends) makes a
    /// concurrent duplicate see [`Claim::InProgress`] instead of running twice.
    pub async fn claim_idempotency(
        &mut self,
        owner: &OwnerKey,
        key: &str,
        request_hash: &[u8],
    ) -> Result<Claim, StoreError> {
        // The lock, then the record, in one round trip (with `BEGIN` when it is the first):
        // the server runs them in order, so the record is read after the lock is held.
        let advisory = advisory_key(owner, key);
        let (acquired, row) = self
            .transaction
            .open_with(|client| async move {
                let lock = client
                    .prepare_cached("SELECT pg_try_advisory_xact_lock($1)")
                    .await?;
                let select = client
                    .prepare_cached(
                        "SELECT request_hash, status, headers, body FROM idempotency_keys \
                         WHERE owner = $1 AND key = $2",
                    )
                    .await?;
                let owner = owner.as_str();
                let (lock_params, select_params): (
                    [&(dyn ToSql + Sync); 1],
                    [&(dyn ToSql + Sync); 2],
                ) = ([&advisory], [&owner, &key]);
                let (acquired, row) = tokio::join!(
                    client.query_one(&lock, &lock_params),
                    client.query_opt(&select, &select_params)
                );
                Ok((acquired?.try_get::<_, bool>(0)?, row?))
            })
            .await?;
        if !acquired {
            return Ok(Claim::InProgress);
        }
        let Some(row) = row else {
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

    /// Records the response of a fresh request under its key and commits, in one round trip:
    /// the record and the write commit together or not at all.
    pub async fn commit_recorded(
        self,
        owner: &OwnerKey,
        key: &str,
        request_hash: &[u8],
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let insert = client
            .prepare_cached(
                "INSERT INTO idempotency_keys (owner, key, request_hash, status, headers, body) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        let headers = serde_json::to_value(&response.headers).unwrap_or(Value::Null);
        let status = response.status as i16;
        let owner = owner.as_str();
        let body = response.body.as_ref();
        let params: [&(dyn ToSql + Sync); 6] =
            [&owner, &key, &request_hash, &status, &headers, &body];
        // `commit_with` needs the record on the wire when first polled: the statement is
        // prepared above and its parameters are known to encode.
        check_encodes(&insert, &params)?;
        self.transaction
            .commit_with(|client| async move {
                client.execute(&insert, &params).await?;
                Ok(())
            })
            .await?;
        self.timer.observe(self.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Applies one mutation and returns the cart as committed-to-be, or the rule it broke (the
    /// caller then rolls back). Three round trips at most: the cart's bump (an add's line
    /// context with it, once this shard's schema is known to key lines by line id), an add's
    /// context otherwise, then the change, its outbox event and the cart read back together.
    pub async fn apply(
        &mut self,
        owner: &OwnerKey,
        op: &CartOp<'_>,
    ) -> Result<Result<StoredCart, CartRule>, StoreError> {
        let owner_str = owner.as_str();
        let (version, change) = match op {
            CartOp::Add {
                item_id,
                item,
                request,
                variant,
                new_cart_currency,
                max_lines,
            } => {
                let keyed_line = LineId::of(item_id, *variant);
                let pipelined = self.lines_keyed.load(Ordering::Relaxed);
                let (row, keyed_context) = self
                    .transaction
                    .open_with(|client| async move {
                        let bump = client
                            .prepare_cached(concat!(
                                "INSERT INTO carts (owner, currency, version) VALUES ($1, $2, 1) \
                                 ON CONFLICT (owner) DO UPDATE \
                                 SET version = carts.version + 1, updated_at = now(), \
                                 purged_at = NULL \
                                 RETURNING currency, merging_into, ",
                                keyed_by_line!(),
                                moving_to!(),
                                ", version"
                            ))
                            .await?;
                        let currency = new_cart_currency.as_str();
                        let bump_params: [&(dyn ToSql + Sync); 2] = [&owner_str, &currency];
                        if !pipelined {
                            return Ok((client.query_one(&bump, &bump_params).await?, None));
                        }
                        // Sent behind the bump, so it reads the lines once the cart is locked.
                        let context = client.prepare_cached(LINE_CONTEXT_BY_LINE).await?;
                        let line = keyed_line.as_str();
                        let context_params: [&(dyn ToSql + Sync); 2] = [&owner_str, &line];
                        let (row, context) = tokio::join!(
                            client.query_one(&bump, &bump_params),
                            client.query_one(&context, &context_params)
                        );
                        Ok((row?, Some(context)))
                    })
                    .await?;
                refuse_moving(owner_str, row.try_get(3)?)?;
                let currency: String = row.try_get(0)?;
                if row.try_get::<_, Option<String>>(1)?.is_some() {
                    return Ok(Err(CartRule::MergeInProgress));
                }
                let by_line: bool = row.try_get(2)?;
                self.lines_keyed.store(by_line, Ordering::Relaxed);
                let version: i64 = row.try_get(4)?;
                let cart_currency = Currency::parse(&currency).unwrap_or(*new_cart_currency);
                let client = self.client().await?;
                // In legacy mode the item id is the line's key.
                let line_id = LineId::of(item_id, variant.filter(|_| by_line));
                let row = match keyed_context.filter(|_| by_line) {
                    Some(context) => context?,
                    None => {
                        let context = client
                            .prepare_cached(if by_line {
                                LINE_CONTEXT_BY_LINE
                            } else {
                                "SELECT (SELECT quantity FROM cart_items \
                                 WHERE owner = $1 AND item_id = $2), \
                                 (SELECT count(*) FROM cart_items WHERE owner = $1)"
                            })
                            .await?;
                        client
                            .query_one(&context, &[&owner_str, &line_id.as_str()])
                            .await?
                    }
                };
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
                let statement = client
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
                let change = Change::Upsert {
                    statement,
                    // Legacy mode has no line id column.
                    line_id: by_line.then_some(line_id),
                    item_id: item_id.as_str(),
                    quantity: i32::from(plan.new_quantity.get()),
                    price: plan.unit_price_minor,
                    currency: cart_currency,
                    variant: *variant,
                };
                (version, change)
            }
            CartOp::SetQuantity {
                line_id,
                quantity,
                if_match,
            } => {
                let (version, by_line) = match self.bump_existing(owner_str, *if_match).await? {
                    Ok(bumped) => bumped,
                    Err(rule) => return Ok(Err(rule)),
                };
                let statement = self
                    .client()
                    .await?
                    .prepare_cached(if by_line {
                        "UPDATE cart_items SET quantity = $3, updated_at = now() \
                         WHERE owner = $1 AND line_id = $2 RETURNING variant"
                    } else {
                        "UPDATE cart_items SET quantity = $3, updated_at = now() \
                         WHERE owner = $1 AND item_id = $2 RETURNING variant"
                    })
                    .await?;
                let change = Change::Line {
                    statement,
                    line_id,
                    by_line,
                    quantity: Some(i32::from(quantity.get())),
                };
                (version, change)
            }
            CartOp::Remove { line_id, if_match } => {
                let (version, by_line) = match self.bump_existing(owner_str, *if_match).await? {
                    Ok(bumped) => bumped,
                    Err(rule) => return Ok(Err(rule)),
                };
                let statement = self
                    .client()
                    .await?
                    .prepare_cached(if by_line {
                        "DELETE FROM cart_items WHERE owner = $1 AND line_id = $2 \
                         RETURNING variant"
                    } else {
                        "DELETE FROM cart_items WHERE owner = $1 AND item_id = $2 \
                         RETURNING variant"
                    })
                    .await?;
                let change = Change::Line {
                    statement,
                    line_id,
                    by_line,
                    quantity: None,
                };
                (version, change)
            }
            CartOp::Clear { if_match } => {
                let version = match self.bump_existing(owner_str, *if_match).await? {
                    Ok((version, _)) => version,
                    // Clearing a cart that does not exist leaves it not existing.
                    Err(CartRule::ItemNotInCart) => return Ok(Ok(StoredCart::empty(owner_str))),
                    Err(rule) => return Ok(Err(rule)),
                };
                let statement = self
                    .client()
                    .await?
                    .prepare_cached("DELETE FROM cart_items WHERE owner = $1")
                    .await?;
                (version, Change::Clear { statement })
            }
        };
        let client = self.client().await?;
        let (kind, payload) = op.event();
        let event = client.prepare_cached(super::events::INSERT).await?;
        let read_back = client.prepare_cached(LOAD_CART).await?;
        let (line_text, currency_text, line_key);
        let (statement, params): (&Statement, Vec<&(dyn ToSql + Sync)>) = match &change {
            Change::Upsert {
                statement,
                line_id,
                item_id,
                quantity,
                price,
                currency,
                variant,
            } => {
                currency_text = currency.as_str();
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&owner_str];
                if let Some(line_id) = line_id {
                    line_text = line_id.as_str();
                    params.push(&line_text);
                }
                params.extend([
                    item_id as &(dyn ToSql + Sync),
                    quantity,
                    price,
                    &currency_text,
                    variant,
                ]);
                (statement, params)
            }
            Change::Line {
                statement,
                line_id,
                by_line,
                quantity,
            } => {
                line_key = if *by_line {
                    line_id.as_str()
                } else {
                    line_id.item_id()
                };
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&owner_str, &line_key];
                if let Some(quantity) = quantity {
                    params.push(quantity);
                }
                (statement, params)
            }
            Change::Clear { statement } => (statement, vec![&owner_str]),
        };
        // One round trip: the change, then its event and the cart as it now is (the server
        // runs them in this order).
        let event_params: [&(dyn ToSql + Sync); 4] = [&owner_str, &version, &kind, &payload];
        let read_params: [&(dyn ToSql + Sync); 1] = [&owner_str];
        let (changed, recorded, rows) = tokio::join!(
            client.query(statement, &params),
            client.execute(&event, &event_params),
            client.query(&read_back, &read_params)
        );
        let changed = changed?;
        recorded?;
        let rows = rows?;
        if let Change::Line {
            line_id, by_line, ..
        } = &change
        {
            let found = if *by_line {
                !changed.is_empty()
            } else {
                legacy_line_is(&changed, line_id)?
            };
            if !found {
                return Ok(Err(CartRule::ItemNotInCart));
            }
        }
        Ok(Ok(cart_of(owner, &rows)?))
    }

    /// Bumps the version of an existing cart, checking `If-Match` against the version before
    /// the bump; returns the new version and whether the database keys lines by line id (V4).
    /// A missing cart is reported as [`CartRule::ItemNotInCart`] (after the version check,
    /// which compares against version 0).
    async fn bump_existing(
        &self,
        owner: &str,
        if_match: Option<i64>,
    ) -> Result<Result<(i64, bool), CartRule>, StoreError> {
        let row = self
            .transaction
            .open_with(|client| async move {
                let bump = client
                    .prepare_cached(concat!(
                        "UPDATE carts SET version = version + 1, updated_at = now(), \
                         purged_at = NULL \
                         WHERE owner = $1 RETURNING version, merging_into, ",
                        keyed_by_line!(),
                        moving_to!()
                    ))
                    .await?;
                Ok(client.query_opt(&bump, &[&owner]).await?)
            })
            .await?;
        let Some(row) = row else {
            return Ok(check_version(if_match, 0).and(Err(CartRule::ItemNotInCart)));
        };
        refuse_moving(owner, row.try_get(3)?)?;
        let bumped: i64 = row.try_get(0)?;
        if row.try_get::<_, Option<String>>(1)?.is_some() {
            return Ok(Err(CartRule::MergeInProgress));
        }
        let by_line: bool = row.try_get(2)?;
        Ok(check_version(if_match, bumped - 1).map(|()| (bumped, by_line)))
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
