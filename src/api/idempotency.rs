//! Idempotency keys as the handlers see them: what makes two requests "the same", claiming a
//! key inside the write transaction, and recording and replaying the first answer. The key's
//! storage is `store`'s; this module never opens a transaction itself.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::{names, Body};
use crate::domain::ids::OwnerKey;
use crate::store::{Claim, StoredResponse, WriteTx};

/// Hash of what makes two requests "the same" for idempotency: the operation, its target,
/// its precondition and the exact body.
pub fn fingerprint(operation: &str, item: &str, if_match: Option<i64>, body: &[u8]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(operation.as_bytes());
    hasher.update([0]);
    hasher.update(item.as_bytes());
    hasher.update([0]);
    hasher.update(
        if_match
            .map(|v| v.to_string())
            .unwrap_or_default()
            .as_bytes(),
    );
    hasher.update([0]);
    hasher.update(body);
    hasher.finalize().to_vec()
}

/// Claims an idempotency key in `tx`. `None`: fresh, go ahead. `Some(answer)`: the transaction
/// was rolled back and `answer` (the stored response, or why the key cannot be used) is final.
pub async fn claim(
    tx: &mut WriteTx,
    owner: &OwnerKey,
    key: &str,
    fingerprint: &[u8],
) -> Result<Option<Result<Response<Body>, ApiError>>, ApiError> {
    let answer = match tx.claim_idempotency(owner, key, fingerprint).await? {
        Claim::Fresh => return Ok(None),
        Claim::Replay(stored) => Ok(replay(stored)),
        Claim::Reused => Err(ApiError::IdempotencyKeyReused),
        Claim::InProgress => Err(ApiError::RequestInProgress),
    };
    tx.rollback_in_place().await;
    Ok(Some(answer))
}

/// Commits `tx`, recording `response` (whose body is `body`) under `key` in the same round
/// trip when the request carried one: the write and its answer commit together or not at all.
pub async fn commit(
    tx: WriteTx,
    key: Option<&str>,
    owner: &OwnerKey,
    fingerprint: &[u8],
    response: &Response<Body>,
    body: Bytes,
) -> Result<(), ApiError> {
    match key {
        Some(key) => {
            let stored = to_stored(response, body);
            tx.commit_recorded(owner, key, fingerprint, &stored).await?
        }
        None => tx.commit().await?,
    }
    Ok(())
}

/// The response as recorded under its key (`body` is the response's body, kept by the caller).
pub fn to_stored(response: &Response<Body>, body: Bytes) -> StoredResponse {
    let headers = response
        .headers()
        .iter()
        // A replay goes to the same owner, who already holds the session: never re-send it.
        .filter(|(name, value)| {
            *name != header::SET_COOKIE
                || !value
                    .as_bytes()
                    .starts_with(names::SESSION_COOKIE.as_bytes())
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
        })
        .collect();
    StoredResponse {
        status: response.status().as_u16(),
        headers,
        body,
    }
}

fn replay(stored: StoredResponse) -> Response<Body> {
    let mut response = Response::new(Full::new(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.append(name, value);
        }
    }
    headers.insert(
        HeaderName::from_static(names::IDEMPOTENT_REPLAYED),
        HeaderValue::from_static("true"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_by_body_target_and_precondition() {
        let base = fingerprint("add", "a", None, b"{}");
        assert_eq!(base, fingerprint("add", "a", None, b"{}"));
        assert_ne!(base, fingerprint("add", "b", None, b"{}"));
        assert_ne!(base, fingerprint("add", "a", Some(1), b"{}"));
        assert_ne!(base, fingerprint("add", "a", None, b"{ }"));
        assert_ne!(base, fingerprint("set", "a", None, b"{}"));
    }
}
