//! Parked adds: adds received here for carts homed in a region that could not be reached, kept
//! in `parked_writes` on the primary of this region's parking shard (its first home shard by
//! id) until the reconciler has forwarded them. This module owns that table's SQL: parking an
//! add under the caps, an owner's parked adds for a read (reporting rejected ones once), and
//! the reconciler's batch, lock and outcomes. Forwarding is not done here (`app` drives the
//! reconciler through `forward::parked`).

use chrono::{DateTime, Utc};
use deadpool_postgres::Object;
use serde_json::Value;

use super::{Store, StoreError, GAUGE_ROW_CAP};
use crate::domain::ids::OwnerKey;

/// The shard whose primary holds this region's parked adds: the first shard homed here, by id,
/// so every edge of the region picks the same one. None in a region that homes no shard (it
/// cannot park).
pub fn parking_shard(store: &Store) -> Option<String> {
    store.home_shards().into_iter().next()
}

/// An add to park.
pub struct NewParkedAdd<'a> {
    pub owner: &'a OwnerKey,
    pub idempotency_key: &'a str,
    /// The cart's home region and shard there.
    pub home: &'a str,
    pub home_shard: &'a str,
    /// The add's body as received (forwarded byte for byte: the home's idempotency fingerprint
    /// covers it).
    pub body: &'a str,
    pub item_id: &'a str,
    pub line_id: &'a str,
    pub variant: Option<&'a Value>,
    pub quantity: u16,
}

/// The caps a park is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub per_owner: i64,
    pub per_region: i64,
}

/// What parking an add did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkOutcome {
    Parked,
    /// The key is already parked with the same body: nothing parked twice.
    AlreadyParked,
    /// The key is parked with another body.
    KeyReused,
    OwnerFull,
    RegionFull,
}

/// Whether a parked add still waits or was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkedState {
    Pending,
    Rejected,
}

/// One parked add as stored.
#[derive(Debug, Clone)]
pub struct ParkedAdd {
    pub seq: i64,
    pub owner: String,
    pub idempotency_key: String,
    pub home: String,
    pub home_shard: String,
    pub body: String,
    pub item_id: String,
    pub line_id: String,
    pub variant: Option<Value>,
    pub quantity: u16,
    pub state: ParkedState,
    pub reason_code: Option<String>,
    pub reason: Option<String>,
    pub parked_at: DateTime<Utc>,
    /// The cart version the home region answered when it applied the add (the row is about to
    /// go): a cart at this version or newer already holds it.
    pub applied_version: Option<i64>,
    /// Older than `parking.max_age` (as the reconciler's batch query was told).
    pub expired: bool,
}

const COLUMNS: &str = "seq, owner, idempotency_key, home, home_shard, body, item_id, line_id, \
     variant, quantity, state, reason_code, reason, parked_at, applied_version";

fn decode(row: &tokio_postgres::Row, expired: bool) -> Result<ParkedAdd, StoreError> {
    let quantity: i32 = row.try_get(9)?;
    let state: String = row.try_get(10)?;
    let owner: String = row.try_get(1)?;
    let quantity = u16::try_from(quantity)
        .ok()
        .filter(|q| (1..=crate::domain::cart::MAX_QUANTITY).contains(q))
        .ok_or_else(|| {
            StoreError::corrupt(format!("parked add of {owner}: quantity {quantity}"))
        })?;
    let state = match state.as_str() {
        "pending" => ParkedState::Pending,
        "rejected" => ParkedState::Rejected,
        other => {
            return Err(StoreError::corrupt(format!(
                "parked add of {owner}: state {other}"
            )))
        }
    };
    Ok(ParkedAdd {
        seq: row.try_get(0)?,
        idempotency_key: row.try_get(2)?,
        home: row.try_get(3)?,
        home_shard: row.try_get(4)?,
        body: row.try_get(5)?,
        item_id: row.try_get(6)?,
        line_id: row.try_get(7)?,
        variant: row.try_get(8)?,
        quantity,
        state,
        reason_code: row.try_get(11)?,
        reason: row.try_get(12)?,
        parked_at: row.try_get(13)?,
        applied_version: row.try_get(14)?,
        owner,
        expired,
    })
}

/// Parks an add in one transaction on the parking shard's primary: the owner's parked adds are
/// serialised by an advisory transaction lock (so the owner cap holds exactly), the region cap
/// is a bounded count of pending rows (concurrent parks of different owners may pass it by a
/// few). A key already parked is not parked again.
pub async fn park(
    store: &Store,
    shard: &str,
    add: &NewParkedAdd<'_>,
    caps: Caps,
) -> Result<ParkOutcome, StoreError> {
    let client = store.db_write(shard).await?;
    super::tx::run_if(
        client,
        async |client: &Object| {
            let lock = super::advisory_lock_key("parked-owner", &[add.owner.as_str()]);
            client
                .execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
                .await?;
            let existing = client
                .query_opt(
                    "SELECT body FROM parked_writes WHERE owner = $1 AND idempotency_key = $2",
                    &[&add.owner.as_str(), &add.idempotency_key],
                )
                .await?;
            if let Some(row) = existing {
                let body: String = row.try_get(0)?;
                return Ok(if body == add.body {
                    ParkOutcome::AlreadyParked
                } else {
                    ParkOutcome::KeyReused
                });
            }
            let owner_count: i64 = client
                .query_one(
                    "SELECT count(*)::bigint FROM parked_writes WHERE owner = $1",
                    &[&add.owner.as_str()],
                )
                .await?
                .try_get(0)?;
            if owner_count >= caps.per_owner {
                return Ok(ParkOutcome::OwnerFull);
            }
            let region_count: i64 = client
                .query_one(
                    "SELECT count(*)::bigint FROM (SELECT 1 FROM parked_writes \
                     WHERE state = 'pending' LIMIT $1) parked",
                    &[&caps.per_region],
                )
                .await?
                .try_get(0)?;
            if region_count >= caps.per_region {
                return Ok(ParkOutcome::RegionFull);
            }
            client
                .execute(
                    "INSERT INTO parked_writes (owner, idempotency_key, home, home_shard, body, \
                     item_id, line_id, variant, quantity) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &add.owner.as_str(),
                        &add.idempotency_key,
                        &add.home,
                        &add.home_shard,
                        &add.body,
                        &add.item_id,
                        &add.line_id,
                        &add.variant,
                        &i32::from(add.quantity),
                    ],
                )
                .await?;
            Ok(ParkOutcome::Parked)
        },
        |outcome| *outcome == ParkOutcome::Parked,
    )
    .await
}

/// An owner's parked adds as a read in this region shows them: the pending ones in arrival
/// order, and the rejected ones, which are deleted by this call (a rejection is reported once).
/// One indexed read when nothing was rejected, the common case.
pub async fn for_read(
    store: &Store,
    shard: &str,
    owner: &OwnerKey,
) -> Result<(Vec<ParkedAdd>, Vec<ParkedAdd>), StoreError> {
    let client = store.db_write(shard).await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM parked_writes WHERE owner = $1 ORDER BY seq"
        ))
        .await?;
    let (pending, rejected): (Vec<ParkedAdd>, Vec<ParkedAdd>) = client
        .query(&statement, &[&owner.as_str()])
        .await?
        .iter()
        .map(|row| decode(row, false))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .partition(|add| add.state == ParkedState::Pending);
    if rejected.is_empty() {
        return Ok((pending, rejected));
    }
    // Only the rejections read here are taken: one refused meanwhile is reported next time.
    let keys: Vec<&str> = rejected
        .iter()
        .map(|add| add.idempotency_key.as_str())
        .collect();
    let taken = client
        .prepare_cached(
            "DELETE FROM parked_writes WHERE owner = $1 AND state = 'rejected' \
             AND idempotency_key = ANY($2) RETURNING idempotency_key",
        )
        .await?;
    let deleted: Vec<String> = client
        .query(&taken, &[&owner.as_str(), &keys])
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    // A concurrent read that took a rejection first reports it; this one does not.
    let rejected = rejected
        .into_iter()
        .filter(|add| deleted.contains(&add.idempotency_key))
        .collect();
    Ok((pending, rejected))
}

/// Which of `keys` the home region recorded for `owner`, with the cart version each answered,
/// and the owner's cart version in the same snapshot: an add applied at home whose answer never
/// reached this region is in every cart at or past its version, and the records are complete up
/// to `cart_version` (one statement, one snapshot), not beyond.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedAtHome {
    pub applied: Vec<(String, i64)>,
    pub cart_version: i64,
}

/// Where [`applied_at_home`] reads the home shard's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordsFrom {
    /// This region's copy (its replica; the primary when the shard is homed here).
    Local,
    /// The shard's primary (home region only): complete up to the newest cart there is.
    Primary,
}

/// Reads [`AppliedAtHome`] for `keys` of `owner` on `home_shard`.
pub async fn applied_at_home(
    store: &Store,
    home_shard: &str,
    owner: &OwnerKey,
    keys: &[&str],
    from: RecordsFrom,
) -> Result<AppliedAtHome, StoreError> {
    let (client, _) = match from {
        RecordsFrom::Local => store.db_read(home_shard).await?,
        RecordsFrom::Primary => store.db_read_prefer_primary(home_shard).await?,
    };
    // One row at least (the cart's version), one per record found.
    let statement = client
        .prepare_cached(
            "SELECT COALESCE((SELECT version FROM carts WHERE owner = $1), 0), k.key, k.headers \
             FROM (SELECT 1) AS one LEFT JOIN idempotency_keys k \
             ON k.owner = $1 AND k.key = ANY($2) AND k.status BETWEEN 200 AND 299",
        )
        .await?;
    let rows = client.query(&statement, &[&owner.as_str(), &keys]).await?;
    let mut found = AppliedAtHome::default();
    for row in rows {
        found.cart_version = row.try_get(0)?;
        let (Some(key), Some(headers)) = (
            row.try_get::<_, Option<String>>(1)?,
            row.try_get::<_, Option<Value>>(2)?,
        ) else {
            continue;
        };
        // Stored as `[[name, value], …]`; an answer without a version is not counted.
        let version = headers.as_array().and_then(|pairs| {
            pairs.iter().find_map(|pair| {
                let pair = pair.as_array()?;
                (pair.first()?.as_str()? == "cart-version")
                    .then(|| pair.get(1)?.as_str()?.parse::<i64>().ok())
                    .flatten()
            })
        });
        if let Some(version) = version {
            found.applied.push((key, version));
        }
    }
    Ok(found)
}

/// The reconciler's hold on the parking shard: a session advisory lock on a dedicated
/// connection, so one reconciler per region works at a time. Release it with
/// [`Reconciling::finish`].
pub struct Reconciling {
    client: Option<Object>,
    key: i64,
}

/// Takes the region's reconciler lock on `shard`; None when another edge holds it.
pub async fn lock(store: &Store, shard: &str) -> Result<Option<Reconciling>, StoreError> {
    let client = store.db_write(shard).await?;
    let key = super::lock_key("parked-writes-reconciler", shard);
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await?
        .try_get(0)?;
    Ok(locked.then_some(Reconciling {
        client: Some(client),
        key,
    }))
}

impl Reconciling {
    fn client(&self) -> Result<&Object, StoreError> {
        self.client
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("reconciler lock already released".into()))
    }

    /// The oldest pending parked adds (at most `limit`), in arrival order, each marked expired
    /// when older than `max_age`.
    pub async fn pending(
        &self,
        max_age: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<ParkedAdd>, StoreError> {
        let client = self.client()?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS}, parked_at < now() - make_interval(secs => $1) \
                 FROM parked_writes WHERE state = 'pending' ORDER BY seq LIMIT $2"
            ))
            .await?;
        client
            .query(&statement, &[&max_age.as_secs_f64(), &limit])
            .await?
            .iter()
            .map(|row| decode(row, row.try_get(15)?))
            .collect()
    }

    /// Releases the lock; a connection that may still hold it is closed, never pooled.
    pub async fn finish(mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let released = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await
            .ok()
            .and_then(|row| row.try_get::<_, bool>(0).ok());
        if released != Some(true) {
            let _ = Object::take(client);
        }
    }
}

impl Drop for Reconciling {
    fn drop(&mut self) {
        // Dropped unfinished (a cancelled pass): the session lock must die with its connection.
        if let Some(client) = self.client.take() {
            let _ = Object::take(client);
        }
    }
}

/// The pending parked adds of one owner, in arrival order, each marked expired when older
/// than `max_age`.
pub async fn pending_of(
    store: &Store,
    shard: &str,
    owner: &OwnerKey,
    max_age: std::time::Duration,
) -> Result<Vec<ParkedAdd>, StoreError> {
    let client = store.db_write(shard).await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS}, parked_at < now() - make_interval(secs => $2) \
             FROM parked_writes WHERE owner = $1 AND state = 'pending' ORDER BY seq"
        ))
        .await?;
    client
        .query(&statement, &[&owner.as_str(), &max_age.as_secs_f64()])
        .await?
        .iter()
        .map(|row| decode(row, row.try_get(15)?))
        .collect()
}

/// The home region applied the add at cart version `version`: marked with it first, so reads
/// here show it only on an older cart while this region's cache is fenced (the caller's next
/// step), then deleted by [`applied`].
pub async fn applying(
    store: &Store,
    shard: &str,
    add: &ParkedAdd,
    version: i64,
) -> Result<(), StoreError> {
    let client = store.db_write(shard).await?;
    client
        .execute(
            "UPDATE parked_writes SET applied_version = $3 \
             WHERE owner = $1 AND idempotency_key = $2",
            &[&add.owner, &add.idempotency_key, &version],
        )
        .await?;
    Ok(())
}

/// The home region applied the add: it is no longer parked.
pub async fn applied(store: &Store, shard: &str, add: &ParkedAdd) -> Result<(), StoreError> {
    let client = store.db_write(shard).await?;
    client
        .execute(
            "DELETE FROM parked_writes WHERE owner = $1 AND idempotency_key = $2",
            &[&add.owner, &add.idempotency_key],
        )
        .await?;
    Ok(())
}

/// The add will never be applied: kept as a rejected record for the owner's next read.
pub async fn rejected(
    store: &Store,
    shard: &str,
    add: &ParkedAdd,
    code: &str,
    reason: &str,
) -> Result<(), StoreError> {
    let client = store.db_write(shard).await?;
    client
        .execute(
            "UPDATE parked_writes SET state = 'rejected', reason_code = $3, reason = $4 \
             WHERE owner = $1 AND idempotency_key = $2 AND state = 'pending'",
            &[&add.owner, &add.idempotency_key, &code, &reason],
        )
        .await?;
    Ok(())
}

/// One more failed attempt (the home was unreachable or asked to retry).
pub async fn attempted(store: &Store, shard: &str, add: &ParkedAdd) -> Result<(), StoreError> {
    let client = store.db_write(shard).await?;
    client
        .execute(
            "UPDATE parked_writes SET attempts = attempts + 1 \
             WHERE owner = $1 AND idempotency_key = $2",
            &[&add.owner, &add.idempotency_key],
        )
        .await?;
    Ok(())
}

/// How many parked adds the region holds, by state (each counted up to [`GAUGE_ROW_CAP`]).
pub async fn counts(store: &Store, shard: &str) -> Result<(i64, i64), StoreError> {
    let client = store.db_write(shard).await?;
    let statement = client
        .prepare_cached(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM parked_writes WHERE state = 'pending' LIMIT $1) p)::bigint, \
                    (SELECT count(*) FROM (SELECT 1 FROM parked_writes WHERE state = 'rejected' LIMIT $1) r)::bigint",
        )
        .await?;
    let row = client.query_one(&statement, &[&GAUGE_ROW_CAP]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
