//! Sending a parked add to its cart's home region: the reconciler of the region that parked it
//! posts it to the home edge's internal surface with its Idempotency-Key, so a retry after a
//! lost answer is a replay there, never a second add. This module owns the message, the call
//! and how an answer is classified (applied, refused for good, or to retry); the answer side is
//! `api::internal::parked_add`. It also owns the question a read asks the home region when its
//! own replica is older than the cart it shows: which parked adds that cart already holds
//! (answered by `api::internal::parked_applied`).

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::{ForwardError, Forwarder};

/// The internal path a parked add is posted to.
pub const PATH: &str = "/internal/v1/parked/add";

/// The internal path a read asks which parked adds its home already applied.
pub const APPLIED_PATH: &str = "/internal/v1/parked/applied";

/// The header naming the cart version a home edge answered with.
const CART_VERSION: &str = "cart-version";

/// A parked add for a cart homed at the receiving edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The cart's owner key (`u:…` or `g:…`).
    pub owner: String,
    pub idempotency_key: String,
    /// The owner's shard at home, as the parking edge placed it.
    pub home_shard: String,
    /// The add's body as the client sent it.
    pub body: String,
}

/// Which of an owner's parked adds (by key) the home region has applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedQuestion {
    pub owner: String,
    /// The owner's shard at home.
    pub home_shard: String,
    pub keys: Vec<String>,
}

/// The home's answer: the keys it recorded, each with the cart version it answered, read from
/// the shard's primary in one snapshot with the cart's version there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedAnswer {
    pub applied: Vec<AppliedKey>,
    pub cart_version: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedKey {
    pub key: String,
    pub version: i64,
}

/// Why the home's answer to an [`AppliedQuestion`] is not known.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("the home region answered {0}")]
    Refused(StatusCode),
    #[error("the home region's answer is unreadable: {0}")]
    Unreadable(#[from] serde_json::Error),
}

/// Asks `region`'s edge which of `question.keys` it applied.
pub async fn ask_applied(
    forwarder: &Forwarder,
    region: &str,
    from: &str,
    fingerprint: &str,
    question: &AppliedQuestion,
) -> Result<AppliedAnswer, AskError> {
    let headers = super::internal_json_headers(from, fingerprint);
    let body = serde_json::to_vec(question)?;
    let answer = forwarder
        .send(
            region,
            Method::POST,
            APPLIED_PATH,
            &headers,
            Bytes::from(body),
        )
        .await?;
    if answer.status != StatusCode::OK {
        return Err(AskError::Refused(answer.status));
    }
    Ok(serde_json::from_slice(&answer.body)?)
}

/// What the home region did with a parked add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (or applied before: a replay); the cart's version after it, when answered.
    Applied { version: Option<i64> },
    /// Refused for good (a cart rule, an unknown item, a key reused): the public error code
    /// and message.
    Refused { code: String, message: String },
    /// Not now (a concurrent request with the key, a merge in progress, an outage at home):
    /// try again later.
    Retry { status: StatusCode },
}

/// Error codes of a 4xx that say "try again", not "never".
const RETRYABLE_CODES: [&str; 3] = ["request_in_progress", "merge_in_progress", "rate_limited"];

/// Classifies a home edge's answer to a parked add.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
    if status.is_success() {
        let version = headers
            .get(CART_VERSION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        return Outcome::Applied { version };
    }
    if !status.is_client_error()
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT
                | StatusCode::MISDIRECTED_REQUEST
                | StatusCode::TOO_MANY_REQUESTS
        )
    {
        return Outcome::Retry { status };
    }
    let error = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
    let code = error["error"]["code"]
        .as_str()
        .unwrap_or("refused")
        .to_string();
    if RETRYABLE_CODES.contains(&code.as_str()) {
        return Outcome::Retry { status };
    }
    let message = error["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("the home region answered {status}"));
    Outcome::Refused { code, message }
}

/// Posts `request` to `region`'s edge. `from` and `fingerprint` are this edge's region and
/// ring fingerprint (the receiving edge refuses another ring).
pub async fn send(
    forwarder: &Forwarder,
    region: &str,
    from: &str,
    fingerprint: &str,
    request: &Request,
) -> Result<Outcome, ForwardError> {
    let headers = super::internal_json_headers(from, fingerprint);
    // Serialising a struct of strings cannot fail; an empty body would be refused at home.
    let body = serde_json::to_vec(request).unwrap_or_default();
    let answer = forwarder
        .send(region, Method::POST, PATH, &headers, Bytes::from(body))
        .await?;
    Ok(classify(answer.status, &answer.headers, &answer.body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn answers_are_applied_refused_for_good_or_retried() {
        let mut headers = HeaderMap::new();
        headers.insert(CART_VERSION, HeaderValue::from_static("7"));
        assert_eq!(
            classify(StatusCode::OK, &headers, b"{}"),
            Outcome::Applied { version: Some(7) }
        );
        let limit = br#"{"error":{"code":"quantity_limit","message":"at most 999"}}"#;
        assert_eq!(
            classify(StatusCode::CONFLICT, &HeaderMap::new(), limit),
            Outcome::Refused {
                code: "quantity_limit".into(),
                message: "at most 999".into()
            }
        );
        let busy = br#"{"error":{"code":"request_in_progress","message":"busy"}}"#;
        assert!(matches!(
            classify(StatusCode::CONFLICT, &HeaderMap::new(), busy),
            Outcome::Retry { .. }
        ));
        for status in [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::MISDIRECTED_REQUEST,
            StatusCode::TOO_MANY_REQUESTS,
        ] {
            assert!(matches!(
                classify(status, &HeaderMap::new(), b""),
                Outcome::Retry { .. }
            ));
        }
    }
}
