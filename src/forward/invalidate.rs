//! Cross-region cache invalidation: after a commit, the home edge tells every other region's
//! edges the cart's new version, so they fence their caches. Asynchronous, batched and bounded:
//! a lost message is bounded by the cache TTL and by `Cart-Min-Version`. Each message carries a
//! `traceparent` continuing the trace of a write it reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::client::names;
use super::Forwarder;
use crate::telemetry::{TraceContext, TRACEPARENT};
use crate::topology::Current;

/// The internal path invalidations are posted to.
pub const PATH: &str = "/internal/v1/invalidate";
/// Most carts in one message.
const MAX_BATCH: usize = 256;

/// What a commit queues: the owner key, its new version, and the committing request's trace.
pub type Queued = (String, i64, Option<TraceContext>);

/// One cart's new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invalidation {
    pub owner: String,
    pub version: i64,
}

/// The body of an invalidation message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub carts: Vec<Invalidation>,
}

/// Sends queued invalidations to every peer until the queue closes.
/// `done` counts the invalidations whose sending has finished (delivered or not), so a process
/// about to exit can wait for what it queued ([`crate::app::App::settle_invalidations`]).
pub async fn run(
    forwarder: Arc<Forwarder>,
    peers: Vec<String>,
    region: String,
    topology: Current,
    mut queue: mpsc::Receiver<Queued>,
    done: Arc<AtomicU64>,
) {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(from) = HeaderValue::from_str(&region) {
        headers.insert(names::FORWARDED_FROM, from);
    }
    let mut buffer = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut buffer, MAX_BATCH).await > 0 {
        // A batch continues the trace of the first write in it that had one (one parent per
        // message); the other writes' traces are named in this line.
        let traces: Vec<TraceContext> = buffer.iter().filter_map(|queued| queued.2).collect();
        if traces.len() > 1 {
            tracing::debug!(traces = ?traces.iter().map(TraceContext::trace_id).collect::<Vec<_>>(), "invalidation batch carries several writes' traces");
        }
        let mut headers = headers.clone();
        // The ring the edge runs now: a reload may have installed another since the last batch.
        if let Ok(ring) = HeaderValue::from_str(topology.get().ring.fingerprint()) {
            headers.insert(names::RING, ring);
        }
        if let Some(value) = traces
            .first()
            .and_then(|trace| HeaderValue::from_str(&trace.child().header_value()).ok())
        {
            headers.insert(TRACEPARENT, value);
        }
        let batch = Batch {
            carts: buffer
                .drain(..)
                .map(|(owner, version, _)| Invalidation { owner, version })
                .collect(),
        };
        let count = batch.carts.len() as u64;
        let Ok(body) = serde_json::to_vec(&batch) else {
            done.fetch_add(count, Ordering::AcqRel);
            continue;
        };
        let body = Bytes::from(body);
        let sends = peers.iter().map(|peer| {
            let forwarder = forwarder.clone();
            let headers = headers.clone();
            let body = body.clone();
            async move {
                match forwarder
                    .send(peer, Method::POST, PATH, &headers, body)
                    .await
                {
                    Ok(answer) if answer.status.is_success() => {
                        forwarder.metrics.invalidation("delivered")
                    }
                    Ok(answer) => {
                        forwarder.metrics.invalidation("refused");
                        tracing::warn!(%peer, status = %answer.status, "invalidation refused")
                    }
                    Err(error) => {
                        forwarder.metrics.invalidation("failed");
                        tracing::warn!(%peer, %error, "invalidation not delivered")
                    }
                }
            }
        });
        futures_util::future::join_all(sends).await;
        done.fetch_add(count, Ordering::AcqRel);
    }
}
