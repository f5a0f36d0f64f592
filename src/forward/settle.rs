//! Settling a stale merge across regions: the janitor of the guest cart's home asks the edge of
//! the user cart's home whether the merge reached the user's cart (`store::merge::settle` runs
//! there, on that region's primary). This module owns the message and the call; the answer
//! side is `api::internal::merge_settle`.

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::{ForwardError, Forwarder};

/// The internal path a settle request is posted to.
pub const PATH: &str = "/internal/v1/merge/settle";

/// Which frozen guest version of which merge to settle, and the user cart's shard (homed at the
/// receiving edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub guest: String,
    pub user: String,
    pub version: i64,
    pub user_shard: String,
}

/// What the user's side decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The merge reached the user's cart: finish it.
    Applied,
    /// It did not, and now never will: roll it back.
    Fenced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub decision: Decision,
}

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("region {region} answered a settle request with {status}")]
    Refused { region: String, status: StatusCode },
    #[error("region {region} answered a settle request with an unreadable body: {cause}")]
    Unreadable { region: String, cause: String },
}

/// Asks `region`'s edge to settle `request`. `from` and `fingerprint` are this edge's region and
/// ring fingerprint (the receiving edge refuses another ring).
pub async fn ask(
    forwarder: &Forwarder,
    region: &str,
    from: &str,
    fingerprint: &str,
    request: &Request,
) -> Result<Decision, SettleError> {
    let headers = super::internal_json_headers(from, fingerprint);
    let body = serde_json::to_vec(request).map_err(|error| SettleError::Unreadable {
        region: region.to_string(),
        cause: error.to_string(),
    })?;
    let answer = forwarder
        .send(region, Method::POST, PATH, &headers, Bytes::from(body))
        .await?;
    if !answer.status.is_success() {
        return Err(SettleError::Refused {
            region: region.to_string(),
            status: answer.status,
        });
    }
    serde_json::from_slice::<Answer>(&answer.body)
        .map(|answer| answer.decision)
        .map_err(|error| SettleError::Unreadable {
            region: region.to_string(),
            cause: error.to_string(),
        })
}
