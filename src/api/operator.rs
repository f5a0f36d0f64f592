//! The operator routes: `/health`, `/ready` (every surface) and `/metrics` (admin only). They
//! need no identity and never touch a cart.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::{response, Body};
use crate::app::App;

/// `GET /health`: the dependencies' state as of the last background probe (refreshed about
/// once a second and shared by every caller, so this never queries a database itself); 503 when
/// no database answered. `timestamp` is when that probe ran.
pub async fn health(app: &App) -> Response<Body> {
    let status = app.health().await;
    let (database, redis) = (status.database, status.redis);
    let summary = match (database, redis) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let body = json!({
        "status": summary,
        "region": app.config.region.id,
        "database": if database { "ok" } else { "unavailable" },
        "redis": if redis { "ok" } else { "unavailable" },
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
