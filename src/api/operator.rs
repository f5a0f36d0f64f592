//! The operator routes: `/health`, `/ready` (every surface) and `/metrics` (admin only). They
//! need no identity and never touch a cart.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::{response, Body};
use crate::app::App;

/// How long `/health` waits for each dependency before calling it unavailable.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// `GET /health`: the dependencies' state; 503 when no database answers.
pub async fn health(app: &App) -> Response<Body> {
    let (database, redis) = tokio::join!(
        app.store.databases_healthy(PROBE_TIMEOUT),
        app.store.cache.ping()
    );
    let status = match (database, redis) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let body = json!({
        "status": status,
        "region": app.config.region.id,
        "database": if database { "ok" } else { "unavailable" },
        "redis": if redis { "ok" } else { "unavailable" },
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let code = if database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    response::json(code, serde_json::to_vec(&body).unwrap_or_default())
}

/// Prometheus text exposition of the edge's counters (admin surface).
pub fn metrics(app: &App) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(app.metrics_text())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// `GET /ready`: 503 while draining, so load balancers stop sending new requests.
pub fn ready(app: &App) -> Response<Body> {
    if app.is_draining() {
        response::json(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"draining"}"#.to_vec(),
        )
    } else {
        response::json(StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
    }
}
