//! The requests the load generator sends: one HTTP client per run (hyper-util's pooled client,
//! HTTP/1.1 keep-alive or HTTP/2 with prior knowledge), and each operation as the HTTP calls it
//! takes. An operation's plan (owner, token, item, idempotency key) is decided by the
//! scheduler; this module only sends it and reads how it ended.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::report::Ending;
use super::schedule::Op;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Answers larger than this are read and dropped without parsing an error code.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The client of a run. With HTTP/1.1 each request in flight holds one keep-alive connection
/// (so the in-flight bound per edge is also its connection bound) and up to `connections` idle
/// ones are kept per edge; with HTTP/2 the requests to one edge share a connection.
pub fn client(http2: bool, connections: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_max_idle_per_host(connections)
        .pool_idle_timeout(Duration::from_secs(60));
    if http2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

/// One operation, decided: where it goes and what it carries.
#[derive(Debug, Clone)]
pub struct Plan {
    pub op: Op,
    /// The edge (or the baseline's full URL when `baseline` is set).
    pub base_url: Arc<str>,
    /// `Bearer <token>`.
    pub authorization: Option<Arc<str>>,
    /// The item an add (or a merge's guest add) puts in, or the line an update or remove
    /// addresses.
    pub item: String,
    /// Unique per request.
    pub idempotency_key: String,
    /// A baseline request: a bare GET of `base_url`.
    pub baseline: bool,
}

/// What sending an operation came to: how it ended and how many HTTP requests it took.
pub struct Sent {
    pub ending: Ending,
    pub http_requests: u64,
}

/// Sends one operation.
pub async fn send(client: &HttpClient, plan: &Plan) -> Sent {
    if plan.baseline {
        let request = build(Method::GET, &plan.base_url, None, None, None, None);
        return finish(call(client, request).await.map(|answer| answer.ending), 1);
    }
    let base = &plan.base_url;
    let auth = plan.authorization.as_deref();
    let key = Some(plan.idempotency_key.as_str());
    let add_body = || Bytes::from(format!(r#"{{"item_id":"{}","quantity":1}}"#, plan.item));
    let request = match plan.op {
        Op::View => build(
            Method::GET,
            &format!("{base}/api/v1/cart"),
            auth,
            None,
            None,
            None,
        ),
        Op::Add => build(
            Method::POST,
            &format!("{base}/api/v1/cart/items"),
            auth,
            key,
            None,
            Some(add_body()),
        ),
        Op::Update => build(
            Method::PUT,
            &format!("{base}/api/v1/cart/items/{}", plan.item),
            auth,
            key,
            None,
            Some(Bytes::from_static(br#"{"quantity":2}"#)),
        ),
        Op::Remove => build(
            Method::DELETE,
            &format!("{base}/api/v1/cart/items/{}", plan.item),
            auth,
            key,
            None,
            None,
        ),
        Op::Checkout => build(
            Method::POST,
            &format!("{base}/api/v1/cart/checkout"),
            auth,
            key,
            None,
            Some(Bytes::from_static(b"{}")),
        ),
        Op::Merge => {
            // The guest's cart first: an anonymous add mints the session the merge takes in.
            let guest_key = format!("{}-guest", plan.idempotency_key);
            let guest_add = build(
                Method::POST,
                &format!("{base}/api/v1/cart/items"),
                None,
                Some(&guest_key),
                None,
                Some(add_body()),
            );
            let session = match call(client, guest_add).await {
                Ok(Answer {
                    session: Some(session),
                    ..
                }) => session,
                // A guest add refused is counted as the merge's failure, under its status.
                Ok(Answer {
                    ending: ending @ Ending::Answered { status: 400.., .. },
                    ..
                }) => return finish(Ok(ending), 1),
                Ok(_) => return finish(Err("no_guest_session"), 1),
                Err(kind) => return finish(Err(kind), 1),
            };
            let merge = build(
                Method::POST,
                &format!("{base}/api/v1/cart/merge"),
                auth,
                key,
                Some(&session),
                Some(Bytes::from_static(br#"{"strategy":"sum"}"#)),
            );
            return finish(call(client, merge).await.map(|answer| answer.ending), 2);
        }
    };
    finish(call(client, request).await.map(|answer| answer.ending), 1)
}

fn finish(result: Result<Ending, &'static str>, http_requests: u64) -> Sent {
    Sent {
        ending: result.unwrap_or_else(Ending::Failed),
        http_requests,
    }
}

fn build(
    method: Method,
    url: &str,
    authorization: Option<&str>,
    idempotency_key: Option<&str>,
    session: Option<&str>,
    body: Option<Bytes>,
) -> Result<Request<Full<Bytes>>, &'static str> {
    let mut builder = Request::builder().method(method).uri(url);
    if let Some(authorization) = authorization {
        builder = builder.header(http::header::AUTHORIZATION, authorization);
    }
    if let Some(key) = idempotency_key {
        builder = builder.header("idempotency-key", key);
    }
    if let Some(session) = session {
        builder = builder.header("cart-session", session);
    }
    if body.is_some() {
        builder = builder.header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    builder
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|_| "invalid_request")
}

struct Answer {
    ending: Ending,
    session: Option<String>,
}

async fn call(
    client: &HttpClient,
    request: Result<Request<Full<Bytes>>, &'static str>,
) -> Result<Answer, &'static str> {
    let response = client.request(request?).await.map_err(|error| {
        if error.is_connect() {
            "connect"
        } else {
            "transport"
        }
    })?;
    let status = response.status().as_u16();
    let session = response
        .headers()
        .get("cart-session")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    // The body is always read to its end, so the connection goes back to the pool.
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|_| "transport")?
        .to_bytes();
    let code = (status >= 400 && body.len() <= MAX_ERROR_BODY)
        .then(|| error_code(&body))
        .flatten();
    Ok(Answer {
        ending: Ending::Answered { status, code },
        session,
    })
}

/// The `error.code` of an error body `{"error":{"code",…}}`.
fn error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value
        .get("error")?
        .get("code")?
        .as_str()
        .map(str::to_string)
}
