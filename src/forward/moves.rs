//! The steps of a cart move that run on the old shard's home region: a cart moving to a shard
//! homed in another region (an owner without a home region, on the global ring) is frozen and
//! marked moved by the edge that holds the old shard's primary (`store::moves` runs there). This
//! module owns the messages and the call; the answer side is `api::internal::move_step`.

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::{ForwardError, Forwarder};

/// A step of a move asked of the old shard's home edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Freeze,
    Mark,
}

impl Step {
    pub const fn path(self) -> &'static str {
        match self {
            Step::Freeze => "/internal/v1/move/freeze",
            Step::Mark => "/internal/v1/move/mark",
        }
    }
}

/// Which owner moves from which shard (homed at the receiving edge) to which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub owner: String,
    pub from_shard: String,
    pub to_shard: String,
}

/// The answer to a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marked {
    pub marked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("region {region} answered a move step with {status}")]
    Refused { region: String, status: StatusCode },
    #[error("region {region} answered a move step with an unreadable body: {cause}")]
    Unreadable { region: String, cause: String },
}

async fn call<T: serde::de::DeserializeOwned>(
    forwarder: &Forwarder,
    region: &str,
    from: &str,
    fingerprint: &str,
    step: Step,
    request: &Request,
) -> Result<T, MoveError> {
    let unreadable = |cause: String| MoveError::Unreadable {
        region: region.to_string(),
        cause,
    };
    let headers = super::internal_json_headers(from, fingerprint);
    let body = serde_json::to_vec(request).map_err(|error| unreadable(error.to_string()))?;
    let answer = forwarder
        .send(
            region,
            Method::POST,
            step.path(),
            &headers,
            Bytes::from(body),
        )
        .await?;
    if !answer.status.is_success() {
        return Err(MoveError::Refused {
            region: region.to_string(),
            status: answer.status,
        });
    }
    serde_json::from_slice(&answer.body).map_err(|error| unreadable(error.to_string()))
}

/// Step 1 at `region`'s edge (the old shard's home), answered with the store's freeze outcome
/// (`T`, which this layer does not name). `from` and `fingerprint` are this edge's region and
/// ring fingerprint.
pub async fn freeze<T: serde::de::DeserializeOwned>(
    forwarder: &Forwarder,
    region: &str,
    from: &str,
    fingerprint: &str,
    request: &Request,
) -> Result<T, MoveError> {
    call(forwarder, region, from, fingerprint, Step::Freeze, request).await
}

/// Step 3 at `region`'s edge; whether this call marked the row.
pub async fn mark(
    forwarder: &Forwarder,
    region: &str,
    from: &str,
    fingerprint: &str,
    request: &Request,
) -> Result<bool, MoveError> {
    let marked: Marked = call(forwarder, region, from, fingerprint, Step::Mark, request).await?;
    Ok(marked.marked)
}
