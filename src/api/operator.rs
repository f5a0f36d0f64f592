//! The operator routes: `/health`, `/ready` (every surface) and `/metrics` (admin only). They
//! need no identity and never touch a cart.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::{response, Body};
use crate::app::App;

/// The ring this edge serves now, as `/health` reports it.
fn ring_state(app: &App) -> serde_json::Value {
    let ring = &app.topology().ring;
    json!({
        "version": ring.spec().version,
        "fingerprint": ring.fingerprint(),
        "moving_from": ring.spec().moving_from,
        "claims_from_global": ring.claims_from_global(),
    })
}

/// `GET /health`: the dependencies' state as of the last background probe (refreshed about
/// once a second and shared by every caller, so this never queries a database itself); 503 when
/// no database answered. `timestamp` is when that probe ran; `redis_master` is the master
/// the cache follows with `redis.sentinels` (null without them or while none is known).
pub async fn health(app: &App) -> Response<Body> {
    let status = app.health().await;
    let (database, redis) = (status.database(), status.redis);
    let summary = match (database, redis) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let state = |ok: bool| if ok { "ok" } else { "unavailable" };
    let shards: Vec<serde_json::Value> = status
        .shards
        .iter()
        .map(|shard| {
            let mut entry = json!({"id": shard.shard, "replica": state(shard.replica)});
            if let Some(primary) = shard.primary {
                entry["primary"] = json!(state(primary));
            }
            entry
        })
        .collect();
    let peers: Vec<serde_json::Value> = status
        .peers
        .iter()
        .map(|(region, open)| {
            json!({"region": region, "state": if *open { "breaker_open" } else { "ok" }})
        })
        .collect();
    let body = json!({
        "status": summary,
        "region": app.config.region.id,
        "database": state(database),
        "redis": state(redis),
        "redis_master": status.redis_master,
        "shards": shards,
        "peers": peers,
        "ring": ring_state(app),
        "timestamp": status.checked_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let code = if database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    response::json(code, serde_json::to_vec(&body).unwrap_or_default())
}

/// The edge's metrics (admin surface): OpenMetrics when the scraper asks for it (Prometheus
/// does), else the classic Prometheus text format.
pub fn metrics(app: &App, headers: &http::HeaderMap) -> Response<Body> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = crate::metrics::Format::from_accept(accept);
    let mut response = Response::new(Full::new(Bytes::from(app.metrics_text(format))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    response
}

/// `GET /ready`, what a load balancer checks: 503 while draining, so it stops sending new
/// requests, and 503 when this edge can serve no read (neither its Redis nor any of its replicas
/// answered the last probe). A homed primary down does not make an edge unready: its reads go
/// on, and writes for that shard fail fast on their own (503 `unavailable`).
pub async fn ready(app: &App) -> Response<Body> {
    if app.is_draining() {
        return response::json(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"draining"}"#.to_vec(),
        );
    }
    if app.health().await.can_serve_reads() {
        response::json(StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
    } else {
        response::json(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"unavailable"}"#.to_vec(),
        )
    }
}
