//! The one error type a client can act on, and its mapping to status + JSON body.
//!
//! Every layer's error converts into [`ApiError`]; [`ApiError::into_response`] is the only place
//! that picks a status code and an error code. 5xx bodies are generic; the cause is logged once.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use crate::domain::cart::CartRule;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("guest session id is malformed or forged")]
    InvalidSession,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    #[error(transparent)]
    Rule(#[from] CartRule),
    #[error("a request with this Idempotency-Key is still in progress")]
    RequestInProgress,
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    #[error("too many requests; retry later")]
    RateLimited(super::limits::Verdict),
    #[error("this edge does not own the cart's shard")]
    Misdirected,
    #[error("the cart's home region cannot be reached; retry with the same Idempotency-Key")]
    HomeRegionUnavailable {
        retry_after_secs: u32,
        idempotency_key: Option<String>,
    },
    #[error("the sending edge runs another ring; refusing to write")]
    TopologyMismatch,
    #[error("service temporarily unavailable")]
    Unavailable {
        retry_after_secs: u32,
        cause: String,
    },
    #[error("this request needs an Idempotency-Key header")]
    IdempotencyKeyRequired,
    /// A lifecycle outcome the client can act on (merge, checkout, orders), with its details.
    #[error("{message}")]
    Refused {
        status: StatusCode,
        code: &'static str,
        message: String,
        details: Option<Value>,
    },
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A 409 with a stable code and details.
    pub fn conflict(code: &'static str, message: impl Into<String>, details: Value) -> ApiError {
        ApiError::Refused {
            status: StatusCode::CONFLICT,
            code,
            message: message.into(),
            details: Some(details),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(cause) => ApiError::Unavailable {
                retry_after_secs: 1,
                cause,
            },
            StoreError::NotHome(_) => ApiError::Misdirected,
            StoreError::Query(error) => ApiError::Internal(error_chain(&error)),
            StoreError::Corrupt(what) => ApiError::Internal(format!("corrupt row: {what}")),
        }
    }
}

/// Formats an error with its whole `source()` chain, for logs only.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl ApiError {
    /// Status, stable code and optional details.
    fn parts(&self) -> (StatusCode, &'static str, Option<Value>) {
        use StatusCode as S;
        match self {
            ApiError::InvalidRequest(_) => (S::BAD_REQUEST, "invalid_request", None),
            ApiError::Unauthenticated(_) => (S::UNAUTHORIZED, "unauthenticated", None),
            ApiError::InvalidSession => (S::UNAUTHORIZED, "invalid_session", None),
            ApiError::Forbidden(_) => (S::FORBIDDEN, "forbidden", None),
            ApiError::NotFound => (S::NOT_FOUND, "not_found", None),
            ApiError::MethodNotAllowed { .. } => {
                (S::METHOD_NOT_ALLOWED, "method_not_allowed", None)
            }
            ApiError::PayloadTooLarge { limit } => (
                S::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                Some(json!({ "limit_bytes": limit })),
            ),
            ApiError::UnsupportedMediaType => {
                (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", None)
            }
            ApiError::Rule(rule) => match rule {
                CartRule::UnknownItem => (S::NOT_FOUND, "unknown_item", None),
                CartRule::ItemNotInCart => (S::NOT_FOUND, "item_not_in_cart", None),
                CartRule::CurrencyMismatch { cart } => (
                    S::CONFLICT,
                    "currency_mismatch",
                    Some(json!({ "cart_currency": cart })),
                ),
                CartRule::PriceMismatch { current } => (
                    S::CONFLICT,
                    "price_mismatch",
                    Some(json!({ "current_price": current })),
                ),
                CartRule::OutOfStock => (S::CONFLICT, "out_of_stock", None),
                CartRule::QuantityLimit { current, requested } => (
                    S::CONFLICT,
                    "quantity_limit",
                    Some(
                        json!({ "current_quantity": current, "requested": requested, "max_quantity": 999 }),
                    ),
                ),
                CartRule::CartFull { max_lines } => (
                    S::CONFLICT,
                    "cart_full",
                    Some(json!({ "max_lines": max_lines })),
                ),
                CartRule::MergeInProgress => (S::CONFLICT, "merge_in_progress", None),
                CartRule::VersionMismatch { current } => (
                    S::PRECONDITION_FAILED,
                    "version_mismatch",
                    Some(json!({ "current_version": current })),
                ),
            },
            ApiError::RequestInProgress => (S::CONFLICT, "request_in_progress", None),
            ApiError::IdempotencyKeyReused => {
                (S::UNPROCESSABLE_ENTITY, "idempotency_key_reused", None)
            }
            ApiError::RateLimited(verdict) => (
                S::TOO_MANY_REQUESTS,
                "rate_limited",
                Some(
                    json!({ "policy": verdict.policy.name, "retry_after_seconds": verdict.retry_after_secs }),
                ),
            ),
            ApiError::Misdirected => (S::MISDIRECTED_REQUEST, "misdirected", None),
            ApiError::HomeRegionUnavailable { .. } => {
                (S::SERVICE_UNAVAILABLE, "home_region_unavailable", None)
            }
            ApiError::TopologyMismatch => (S::SERVICE_UNAVAILABLE, "topology_mismatch", None),
            ApiError::Unavailable { .. } => (S::SERVICE_UNAVAILABLE, "unavailable", None),
            ApiError::IdempotencyKeyRequired => (S::BAD_REQUEST, "idempotency_key_required", None),
            ApiError::Refused {
                status,
                code,
                details,
                ..
            } => (*status, code, details.clone()),
            ApiError::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal", None),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub fn code(&self) -> &'static str {
        self.parts().1
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let (status, code, details) = self.parts();
        let message = match &self {
            ApiError::Unavailable { cause, .. } => {
                tracing::warn!(%cause, "request failed: dependency unavailable");
                "service temporarily unavailable, retry later".to_string()
            }
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "request failed: internal error");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        let mut error = json!({ "code": code, "message": message });
        if let Some(details) = details {
            error["details"] = details;
        }
        let body = serde_json::to_vec(&json!({ "error": error })).unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            ApiError::Unauthenticated(_) | ApiError::InvalidSession => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unavailable {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::HomeRegionUnavailable {
                retry_after_secs,
                idempotency_key,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                if let Some(value) = idempotency_key
                    .as_deref()
                    .and_then(|k| HeaderValue::from_str(k).ok())
                {
                    headers.insert("idempotency-key", value);
                }
            }
            ApiError::TopologyMismatch => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(5u32));
            }
            ApiError::RateLimited(verdict) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(verdict.retry_after_secs),
                );
                super::limits::set_headers(headers, verdict);
            }
            _ => {}
        }
        response
    }
}
