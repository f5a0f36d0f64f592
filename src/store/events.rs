//! Cart events: the transactional outbox and its relay to the home region's Redis Stream.
//!
//! Every committed change writes one row to `cart_events` in its own transaction ([`record`]).
//! The relay ([`relay_once`]) publishes a shard's outbox in id order to the stream and deletes
//! what it published, in one transaction guarded by an advisory lock, so one relay at a time
//! works a shard. Changes of one cart are serialised by the cart row's lock, so their ids grow
//! in commit order and the stream carries them in order per cart. Delivery is at least once (a
//! crash between `XADD` and `COMMIT` republishes); a republished event keeps its `(shard, id)`, which consumers de-duplicate on.
//! While Redis or the relay is down, events wait in the outbox.

use deadpool_postgres::Object;
use serde_json::Value;

use super::{Store, StoreError};

/// The outbox insert: owner, cart version, kind, payload.
pub(super) const INSERT: &str =
    "INSERT INTO cart_events (owner, cart_version, kind, payload) VALUES ($1, $2, $3, $4)";

/// Writes one event in the caller's transaction.
pub async fn record(
    client: &Object,
    owner: &str,
    version: i64,
    kind: &str,
    payload: &Value,
) -> Result<(), StoreError> {
    let insert = client.prepare_cached(INSERT).await?;
    client
        .execute(&insert, &[&owner, &version, &kind, payload])
        .await?;
    Ok(())
}

/// What a relay pass did on one shard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayPass {
    pub published: u64,
    /// Another relay held the shard.
    pub skipped: bool,
}

/// Advisory-lock key of a shard's relay.
fn relay_lock(shard: &str) -> i64 {
    super::lock_key("cartedge-relay", shard)
}

/// Publishes up to `batch` outbox events of `shard` to `stream`. Errors leave the events in the
/// outbox.
pub async fn relay_once(
    store: &Store,
    shard: &str,
    stream: &str,
    max_len: usize,
    batch: i64,
) -> Result<RelayPass, StoreError> {
    let client = store.db_write(shard).await?;
    // Nothing published: roll back, which only lets the advisory lock go.
    super::tx::run_if(
        client,
        async |client| relay_in(client, store, shard, stream, max_len, batch).await,
        |pass| pass.published > 0,
    )
    .await
}

async fn relay_in(
    client: &Object,
    store: &Store,
    shard: &str,
    stream: &str,
    max_len: usize,
    batch: i64,
) -> Result<RelayPass, StoreError> {
    let lock = client
        .prepare_cached("SELECT pg_try_advisory_xact_lock($1)")
        .await?;
    let acquired: bool = client
        .query_one(&lock, &[&relay_lock(shard)])
        .await?
        .try_get(0)?;
    if !acquired {
        return Ok(RelayPass {
            published: 0,
            skipped: true,
        });
    }
    let select = client
        .prepare_cached(
            "SELECT id, owner, cart_version, kind, payload::text, \
             (EXTRACT(EPOCH FROM created_at) * 1000)::bigint \
             FROM cart_events ORDER BY id LIMIT $1",
        )
        .await?;
    let rows = client.query(&select, &[&batch]).await?;
    if rows.is_empty() {
        return Ok(RelayPass::default());
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut entries = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = row.try_get(0)?;
        let owner: String = row.try_get(1)?;
        let version: i64 = row.try_get(2)?;
        let kind: String = row.try_get(3)?;
        let payload: String = row.try_get(4)?;
        let at: i64 = row.try_get(5)?;
        ids.push(id);
        entries.push(vec![
            ("shard", shard.to_string()),
            ("id", id.to_string()),
            ("owner", owner),
            ("version", version.to_string()),
            ("kind", kind),
            ("payload", payload),
            ("at_ms", at.to_string()),
        ]);
    }
    store
        .cache
        .append_stream(stream, max_len, &entries)
        .await
        .map_err(|error| StoreError::Unavailable(format!("event stream: {error}")))?;
    let delete = client
        .prepare_cached("DELETE FROM cart_events WHERE id = ANY($1)")
        .await?;
    client.execute(&delete, &[&ids]).await?;
    Ok(RelayPass {
        published: ids.len() as u64,
        skipped: false,
    })
}
