//! Checkout: stock reservations on the catalog's primary, orders on the owner's shard.
//!
//! A checkout holds the cart's row lock (its write transaction) for its whole duration. Stock is
//! reserved in one transaction on the catalog primary, items updated in item-id order so
//! concurrent checkouts cannot deadlock, every line or none (`stock >= quantity` in the same
//! `UPDATE`, so stock never goes negative). The reservation id is the order id, which derives
//! from the owner and the idempotency key: a retried checkout finds its own held reservation
//! instead of reserving twice. The order is then created, and the cart cleared, in the cart's
//! transaction; if that fails the reservation is released. A held reservation that is neither
//! confirmed nor cancelled expires and the janitor returns its stock.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::carts::{self, WriteTx};
use super::{events, tx, Store, StoreError};
use crate::domain::cart::{CatalogItem, Quantity, StoredCart};
use crate::domain::ids::OwnerKey;
use crate::domain::lifecycle::{OrderLine, Shortage};
use crate::domain::money::{Currency, Money};
pub use crate::domain::order::{Order, OrderId, OrderStatus};

/// A reservation's state on the catalog primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    Held,
    Committed,
    Released,
    Missing,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReservedItem {
    item_id: String,
    quantity: i32,
}

fn catalog_primary(store: &Store) -> Result<&Pool, StoreError> {
    store.catalog_primary.as_ref().ok_or_else(|| {
        StoreError::Unavailable(
            "this region has no catalog primary (database.catalog_primary)".into(),
        )
    })
}

/// Current catalog entries read from the catalog's primary (checkout must not price from a
/// lagging replica).
pub async fn fresh_items(
    store: &Store,
    ids: &[&str],
) -> Result<HashMap<String, CatalogItem>, StoreError> {
    super::catalog::fetch_items(catalog_primary(store)?, ids).await
}

/// Reserves every line or none. `Ok(Err(shortages))` lists each short line with what is
/// available; nothing is held then.
pub async fn reserve(
    store: &Store,
    reservation_id: &str,
    lines: &[OrderLine],
    hold: Duration,
) -> Result<Result<DateTime<Utc>, Vec<Shortage>>, StoreError> {
    let client = catalog_primary(store)?.get().await?;
    // A shortage rolls back the lines already taken: all or none.
    tx::run_if(
        client,
        async |client| reserve_in(client, reservation_id, lines, hold).await,
        |reserved| reserved.is_ok(),
    )
    .await
}

async fn reserve_in(
    client: &Object,
    reservation_id: &str,
    lines: &[OrderLine],
    hold: Duration,
) -> Result<Result<DateTime<Utc>, Vec<Shortage>>, StoreError> {
    let existing = client
        .prepare_cached(
            "SELECT status, expires_at FROM stock_reservations WHERE reservation_id = $1 FOR UPDATE",
        )
        .await?;
    if let Some(row) = client.query_opt(&existing, &[&reservation_id]).await? {
        let status: String = row.try_get(0)?;
        if status == "held" {
            // A retry of the same checkout: the stock is already ours.
            return Ok(Ok(row.try_get(1)?));
        }
        let forget = client
            .prepare_cached("DELETE FROM stock_reservations WHERE reservation_id = $1")
            .await?;
        client.execute(&forget, &[&reservation_id]).await?;
    }
    // Item-id order (then line id: two variants of one item take its stock one after the other
    // in the same transaction, which sees its own decrements).
    let mut sorted: Vec<&OrderLine> = lines.iter().collect();
    sorted.sort_by(|a, b| {
        (a.item_id.as_str(), a.line_id.as_deref()).cmp(&(b.item_id.as_str(), b.line_id.as_deref()))
    });
    let take = client
        .prepare_cached(
            "UPDATE catalog_items SET stock = stock - $2, updated_at = now() \
             WHERE item_id = $1 AND active AND stock >= $2 RETURNING stock",
        )
        .await?;
    let available = client
        .prepare_cached(
            "SELECT CASE WHEN active THEN stock ELSE 0 END FROM catalog_items WHERE item_id = $1",
        )
        .await?;
    let mut short = Vec::new();
    for line in &sorted {
        let quantity = i32::from(line.quantity);
        if client
            .query_opt(&take, &[&line.item_id, &quantity])
            .await?
            .is_none()
        {
            let left = client
                .query_opt(&available, &[&line.item_id])
                .await?
                .map(|row| row.try_get::<_, i32>(0))
                .transpose()?
                .unwrap_or(0);
            short.push(Shortage {
                item_id: line.item_id.clone(),
                requested: line.quantity,
                available: i64::from(left),
            });
        }
    }
    if !short.is_empty() {
        return Ok(Err(short));
    }
    let items: Vec<ReservedItem> = sorted
        .iter()
        .map(|l| ReservedItem {
            item_id: l.item_id.clone(),
            quantity: i32::from(l.quantity),
        })
        .collect();
    let insert = client
        .prepare_cached(
            "INSERT INTO stock_reservations (reservation_id, status, items, expires_at) \
             VALUES ($1, 'held', $2, now() + make_interval(secs => $3)) RETURNING expires_at",
        )
        .await?;
    let row = client
        .query_one(
            &insert,
            &[
                &reservation_id,
                &serde_json::to_value(&items).unwrap_or(Value::Null),
                &hold.as_secs_f64(),
            ],
        )
        .await?;
    Ok(Ok(row.try_get(0)?))
}

/// Returns a held reservation's stock. True when this call released it.
pub async fn release(store: &Store, reservation_id: &str) -> Result<bool, StoreError> {
    let client = catalog_primary(store)?.get().await?;
    tx::run(client, async |client| {
        release_in(client, reservation_id).await
    })
    .await
}

async fn release_in(client: &Object, reservation_id: &str) -> Result<bool, StoreError> {
    let mark = client
        .prepare_cached(
            "UPDATE stock_reservations SET status = 'released', updated_at = now() \
             WHERE reservation_id = $1 AND status = 'held' RETURNING items",
        )
        .await?;
    let Some(row) = client.query_opt(&mark, &[&reservation_id]).await? else {
        return Ok(false);
    };
    let items: Value = row.try_get(0)?;
    // Undecodable items roll the release back: marking it released would keep its stock
    // forever. The reservation stays held for an operator to repair.
    let mut items: Vec<ReservedItem> = serde_json::from_value(items).map_err(|error| {
        StoreError::corrupt(format!(
            "stock reservation {reservation_id}: items do not decode: {error}"
        ))
    })?;
    if let Some(bad) = items
        .iter()
        .find(|item| Quantity::parse(i64::from(item.quantity)).is_none())
    {
        return Err(StoreError::corrupt(format!(
            "stock reservation {reservation_id}: item {} has quantity {}",
            bad.item_id, bad.quantity
        )));
    }
    items.sort_by(|a, b| a.item_id.cmp(&b.item_id));
    let give = client
        .prepare_cached(
            "UPDATE catalog_items SET stock = stock + $2, updated_at = now() WHERE item_id = $1",
        )
        .await?;
    for item in &items {
        client
            .execute(&give, &[&item.item_id, &item.quantity])
            .await?;
    }
    Ok(true)
}

/// Turns a held, unexpired reservation into a sale. Returns the state found afterwards
/// (`Committed` also when an earlier call committed it).
pub async fn commit_reservation(
    store: &Store,
    reservation_id: &str,
) -> Result<Reservation, StoreError> {
    let client = catalog_primary(store)?.get().await?;
    let commit = client
        .prepare_cached(
            "UPDATE stock_reservations SET status = 'committed', updated_at = now() \
             WHERE reservation_id = $1 AND status = 'held' AND expires_at > now()",
        )
        .await?;
    if client.execute(&commit, &[&reservation_id]).await? == 1 {
        return Ok(Reservation::Committed);
    }
    reservation_state(&client, reservation_id).await
}

/// The state of a reservation, without changing it.
pub async fn reservation_status(
    store: &Store,
    reservation_id: &str,
) -> Result<Reservation, StoreError> {
    let client = catalog_primary(store)?.get().await?;
    reservation_state(&client, reservation_id).await
}

async fn reservation_state(
    client: &Object,
    reservation_id: &str,
) -> Result<Reservation, StoreError> {
    let state = client
        .prepare_cached("SELECT status FROM stock_reservations WHERE reservation_id = $1")
        .await?;
    let status: Option<String> = client
        .query_opt(&state, &[&reservation_id])
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
    Ok(match status.as_deref() {
        Some("held") => Reservation::Held,
        Some("committed") => Reservation::Committed,
        Some(_) => Reservation::Released,
        None => Reservation::Missing,
    })
}

/// Held reservations past their expiry, oldest first.
pub async fn expired_reservations(store: &Store, limit: i64) -> Result<Vec<String>, StoreError> {
    let client = catalog_primary(store)?.get().await?;
    let select = client
        .prepare_cached(
            "SELECT reservation_id FROM stock_reservations \
             WHERE status = 'held' AND expires_at < now() ORDER BY expires_at LIMIT $1",
        )
        .await?;
    client
        .query(&select, &[&limit])
        .await?
        .iter()
        .map(|row| row.try_get(0).map_err(StoreError::from))
        .collect()
}

const ORDER_COLUMNS: &str = "order_id, owner, status, items, total_minor, currency, \
     reservation_expires_at, created_at, updated_at";

fn order_from_row(row: &tokio_postgres::Row) -> Result<Order, StoreError> {
    let order_id: String = row.try_get(0)?;
    let corrupt = |what: String| StoreError::corrupt(format!("order {order_id}: {what}"));
    let id = OrderId::parse(&order_id).map_err(|error| corrupt(error.to_string()))?;
    let status: String = row.try_get(2)?;
    let status =
        OrderStatus::parse(&status).ok_or_else(|| corrupt(format!("unknown status {status:?}")))?;
    let currency: String = row.try_get(5)?;
    let currency = Currency::parse(&currency)
        .ok_or_else(|| corrupt(format!("invalid currency {currency:?}")))?;
    let items: Value = row.try_get(3)?;
    // An order is never shown without its items.
    let items: Vec<OrderLine> = serde_json::from_value(items)
        .map_err(|error| corrupt(format!("items do not decode: {error}")))?;
    if let Some(bad) = items
        .iter()
        .find(|line| Quantity::parse(i64::from(line.quantity)).is_none())
    {
        return Err(corrupt(format!(
            "item {} has quantity {}",
            bad.item_id, bad.quantity
        )));
    }
    Ok(Order {
        order_id: id,
        owner: row.try_get(1)?,
        status,
        items,
        total_price: Money::new(row.try_get(4)?, currency),
        currency,
        reservation_expires_at: row.try_get(6)?,
        created_at: row.try_get(7)?,
        updated_at: row.try_get(8)?,
    })
}

/// Reads an order held on `shard`; with `owner`, only that owner's. In the shard's home region
/// from the primary (an order just created or settled must be found), elsewhere from the
/// replica, which may not have it yet.
pub async fn find_order(
    store: &Store,
    shard: &str,
    order_id: &OrderId,
    owner: Option<&str>,
) -> Result<Option<Order>, StoreError> {
    let (client, _) = if store.is_home(shard) {
        store.db_read_prefer_primary(shard).await?
    } else {
        store.db_read(shard).await?
    };
    load_order(&client, order_id, owner).await
}

/// Reads an order on `client`; with `owner`, only that owner's.
async fn load_order(
    client: &Object,
    order_id: &OrderId,
    owner: Option<&str>,
) -> Result<Option<Order>, StoreError> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1 AND ($2::text IS NULL OR owner = $2)"
        ))
        .await?;
    client
        .query_opt(&statement, &[&order_id.as_str(), &owner])
        .await?
        .map(|row| order_from_row(&row))
        .transpose()
}

/// Moves a pending order to `status` on the shard primary, in one transaction with its event.
/// Returns the order afterwards, or None when there is no such order. An order that is not
/// pending is returned unchanged.
pub async fn settle_order(
    store: &Store,
    shard: &str,
    order_id: &OrderId,
    status: OrderStatus,
) -> Result<Option<Order>, StoreError> {
    let client = store.db_write(shard).await?;
    tx::run(client, async |client| {
        settle_in(client, order_id, status).await
    })
    .await
}

async fn settle_in(
    client: &Object,
    order_id: &OrderId,
    status: OrderStatus,
) -> Result<Option<Order>, StoreError> {
    let update = client
        .prepare_cached(&format!(
            "UPDATE orders SET status = $2, updated_at = now() \
             WHERE order_id = $1 AND status = 'pending_payment' RETURNING {ORDER_COLUMNS}"
        ))
        .await?;
    match client
        .query_opt(&update, &[&order_id.as_str(), &status.as_str()])
        .await?
    {
        Some(row) => {
            let order = order_from_row(&row)?;
            let kind = format!("order_{}", status.as_str());
            events::record(
                client,
                &order.owner,
                0,
                &kind,
                &json!({ "order_id": order.order_id.as_str() }),
            )
            .await?;
            Ok(Some(order))
        }
        None => load_order(client, order_id, None).await,
    }
}

/// Pending orders whose reservation expired before `now() - grace`, oldest first.
pub async fn overdue_orders(
    store: &Store,
    shard: &str,
    grace: Duration,
    limit: i64,
) -> Result<Vec<OrderId>, StoreError> {
    let client = store.db_write(shard).await?;
    let select = client
        .prepare_cached(
            "SELECT order_id FROM orders WHERE status = 'pending_payment' \
             AND reservation_expires_at < now() - make_interval(secs => $1) \
             ORDER BY reservation_expires_at LIMIT $2",
        )
        .await?;
    client
        .query(&select, &[&grace.as_secs_f64(), &limit])
        .await?
        .iter()
        .map(|row| {
            let id: String = row.try_get(0)?;
            OrderId::parse(&id)
                .map_err(|error| StoreError::corrupt(format!("order {id:?}: {error}")))
        })
        .collect()
}

/// What a checkout's cart transaction found.
#[derive(Debug)]
pub enum Locked {
    Cart(StoredCart),
    /// The owner has no cart (or an empty one).
    Empty,
}

impl WriteTx {
    /// Locks the owner's cart for a checkout and reads it.
    pub async fn lock_for_checkout(&mut self, owner: &OwnerKey) -> Result<Locked, StoreError> {
        let client = self.client().await?;
        let lock = client
            .prepare_cached(
                "SELECT version, to_jsonb(carts) ->> 'moving_to' FROM carts \
                 WHERE owner = $1 FOR UPDATE",
            )
            .await?;
        let Some(row) = client.query_opt(&lock, &[&owner.as_str()]).await? else {
            return Ok(Locked::Empty);
        };
        carts::refuse_moving(owner.as_str(), row.try_get(1)?)?;
        let cart = carts::load(client, owner).await?;
        Ok(if cart.lines.is_empty() {
            Locked::Empty
        } else {
            Locked::Cart(cart)
        })
    }

    /// Creates the order (its timestamps are the database's; the returned order has them) and
    /// clears the cart (version bumped), with the outbox event.
    pub async fn create_order(
        &mut self,
        owner: &OwnerKey,
        order: &Order,
    ) -> Result<(StoredCart, Order), StoreError> {
        let client = self.client().await?;
        let insert = client
            .prepare_cached(
                "INSERT INTO orders (order_id, owner, status, currency, total_minor, items, \
                 reservation_expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?;
        client
            .execute(
                &insert,
                &[
                    &order.order_id.as_str(),
                    &order.owner,
                    &order.status.as_str(),
                    &order.currency.as_str(),
                    &order.total_price.amount_minor,
                    &serde_json::to_value(&order.items).unwrap_or(Value::Null),
                    &order.reservation_expires_at,
                ],
            )
            .await?;
        let clear = client
            .prepare_cached("DELETE FROM cart_items WHERE owner = $1")
            .await?;
        client.execute(&clear, &[&owner.as_str()]).await?;
        let bump = client
            .prepare_cached(
                "UPDATE carts SET version = version + 1, updated_at = now() WHERE owner = $1",
            )
            .await?;
        client.execute(&bump, &[&owner.as_str()]).await?;
        let cart = carts::load(client, owner).await?;
        events::record(
            client,
            owner.as_str(),
            cart.version,
            "checked_out",
            &json!({ "order_id": order.order_id.as_str(), "total_minor": order.total_price.amount_minor }),
        )
        .await?;
        let stored = load_order(client, &order.order_id, None)
            .await?
            .ok_or_else(|| StoreError::Unavailable("order vanished in its transaction".into()))?;
        Ok((cart, stored))
    }
}
