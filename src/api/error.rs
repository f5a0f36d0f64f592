//! The one error type a client can act on, and its mapping to status + JSON body.
//!
//! Every public error code is an [`ErrorCode`]; every [`ApiError`] variant names exactly one code
//! and has exactly one `details` shape. [`ApiError::into_response`] is the only place that turns
//! an error into a status, a body and headers. Lower layers' errors convert here (`From` for the
//! store, [`ApiError::home_unreachable`] for a forward). A 5xx body carries no internals; its
//! cause is logged once. This module must not decide *when* an error happens, only what it says.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use super::names;
use crate::auth::AuthError;
use crate::domain::cart::CartRule;
use crate::domain::lifecycle::{PriceChange, Shortage};
use crate::domain::order::OrderStatus;
use crate::limits::Verdict;
use crate::store::StoreError;

/// Declares the closed set of public error codes with their status, so the list the OpenAPI
/// test checks is generated from the same declaration the responses use.
macro_rules! error_codes {
    ($($variant:ident => $code:literal, $status:ident;)*) => {
        /// A public error code: the `error.code` of a response body.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// Every code the edge can answer with.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            pub const fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)*
                }
            }
        }
    };
}

error_codes! {
    InvalidRequest => "invalid_request", BAD_REQUEST;
    IdempotencyKeyRequired => "idempotency_key_required", BAD_REQUEST;
    Unauthenticated => "unauthenticated", UNAUTHORIZED;
    InvalidSession => "invalid_session", UNAUTHORIZED;
    Forbidden => "forbidden", FORBIDDEN;
    NotFound => "not_found", NOT_FOUND;
    UnknownItem => "unknown_item", NOT_FOUND;
    ItemNotInCart => "item_not_in_cart", NOT_FOUND;
    OrderNotFound => "order_not_found", NOT_FOUND;
    MethodNotAllowed => "method_not_allowed", METHOD_NOT_ALLOWED;
    CurrencyMismatch => "currency_mismatch", CONFLICT;
    PriceMismatch => "price_mismatch", CONFLICT;
    OutOfStock => "out_of_stock", CONFLICT;
    QuantityLimit => "quantity_limit", CONFLICT;
    CartFull => "cart_full", CONFLICT;
    MergeInProgress => "merge_in_progress", CONFLICT;
    RequestInProgress => "request_in_progress", CONFLICT;
    PriceChanged => "price_changed", CONFLICT;
    CartEmpty => "cart_empty", CONFLICT;
    OrderNotPending => "order_not_pending", CONFLICT;
    ReservationExpired => "reservation_expired", CONFLICT;
    VersionMismatch => "version_mismatch", PRECONDITION_FAILED;
    RequestTimeout => "request_timeout", REQUEST_TIMEOUT;
    PayloadTooLarge => "payload_too_large", PAYLOAD_TOO_LARGE;
    UnsupportedMediaType => "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE;
    Misdirected => "misdirected", MISDIRECTED_REQUEST;
    IdempotencyKeyReused => "idempotency_key_reused", UNPROCESSABLE_ENTITY;
    RateLimited => "rate_limited", TOO_MANY_REQUESTS;
    Internal => "internal", INTERNAL_SERVER_ERROR;
    HomeRegionUnavailable => "home_region_unavailable", SERVICE_UNAVAILABLE;
    TopologyMismatch => "topology_mismatch", SERVICE_UNAVAILABLE;
    Unavailable => "unavailable", SERVICE_UNAVAILABLE;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a client should wait before retrying after a ring mismatch: an operator must act.
const TOPOLOGY_RETRY_AFTER_SECS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("this request needs an Idempotency-Key header")]
    IdempotencyKeyRequired,
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("guest session id is malformed or forged")]
    InvalidSession,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no such route")]
    NotFound,
    /// `allow` is the route's methods, for the `Allow` header.
    #[error("method not allowed")]
    MethodNotAllowed { allow: String },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The client stopped sending its body before it was complete: its fault, not a
    /// dependency's, so no `Retry-After` and no outage in the logs.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// The body is not plain JSON: the reason names what was wrong (type or encoding).
    #[error("{0}")]
    UnsupportedMediaType(&'static str),
    /// A cart write broke one of the cart's rules.
    #[error(transparent)]
    Rule(#[from] CartRule),
    #[error("a request with this Idempotency-Key is still in progress")]
    RequestInProgress,
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    #[error("too many requests; retry later")]
    RateLimited(Verdict),
    /// Merge: the guest cart is frozen by another user's merge.
    #[error("this guest cart is being merged into another user's cart")]
    GuestCartBusy,
    #[error("the cart is empty")]
    CartEmpty,
    #[error("prices changed since these items were added; review them and check out with accept_price_changes")]
    PriceChanged { lines: Vec<PriceChange> },
    /// Checkout: the catalog cannot supply these lines; nothing was reserved.
    #[error("some items are not available in the quantity requested; nothing was reserved")]
    StockShort { items: Vec<Shortage> },
    #[error("no such order")]
    OrderNotFound,
    #[error("the order is {status}")]
    OrderNotPending { status: OrderStatus },
    #[error("the order's stock reservation expired before payment; the stock was returned")]
    ReservationExpired { status: OrderStatus },
    #[error("this edge does not own the cart's shard")]
    Misdirected,
    #[error("the cart's home region cannot be reached; retry with the same Idempotency-Key")]
    HomeRegionUnavailable {
        retry_after_secs: u32,
        idempotency_key: Option<String>,
    },
    #[error("the sending edge runs another ring; refusing to write")]
    TopologyMismatch,
    /// A dependency is down or overloaded: retrying later may succeed.
    #[error("service temporarily unavailable")]
    Unavailable {
        retry_after_secs: u32,
        cause: String,
    },
    /// Our bug, a configuration bug or a corrupt row: retrying will not help.
    #[error("internal error")]
    Internal(String),
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> ApiError {
        match error {
            AuthError::InvalidToken => {
                ApiError::Unauthenticated("bearer token is invalid or expired")
            }
            AuthError::InvalidSession => ApiError::InvalidSession,
        }
    }
}

impl From<StoreError> for ApiError {
    /// Only a dependency outage is a 503 that invites retries; anything else the store reports
    /// (a refused statement, a row that does not decode) is a 500.
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(cause) => ApiError::Unavailable {
                retry_after_secs: 1,
                cause,
            },
            StoreError::NotHome(_) => ApiError::Misdirected,
            // An edge still on the previous ring met a cart a move took away (or is taking):
            // by the client's retry it is on its new shard, or this edge runs the new ring.
            moved @ (StoreError::Moved { .. } | StoreError::Moving { .. }) => {
                ApiError::Unavailable {
                    retry_after_secs: 1,
                    cause: moved.to_string(),
                }
            }
            other => ApiError::Internal(error_chain(&other)),
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
    /// Every public error code, from the declaration the responses use.
    pub fn all_codes() -> impl Iterator<Item = &'static str> {
        ErrorCode::ALL.iter().map(|code| code.as_str())
    }

    /// The home region could not be reached (or refused the step): logged here, and a 503 that
    /// tells the client to retry with the same key.
    pub fn home_unreachable(
        error: &dyn std::fmt::Display,
        home: &str,
        retry_after_secs: u32,
        idempotency_key: Option<&str>,
    ) -> ApiError {
        tracing::warn!(%error, home, "home region unreachable");
        ApiError::HomeRegionUnavailable {
            retry_after_secs,
            idempotency_key: idempotency_key.map(str::to_string),
        }
    }

    pub fn code(&self) -> ErrorCode {
        use ErrorCode as C;
        match self {
            ApiError::InvalidRequest(_) => C::InvalidRequest,
            ApiError::IdempotencyKeyRequired => C::IdempotencyKeyRequired,
            ApiError::Unauthenticated(_) => C::Unauthenticated,
            ApiError::InvalidSession => C::InvalidSession,
            ApiError::Forbidden(_) => C::Forbidden,
            ApiError::NotFound => C::NotFound,
            ApiError::MethodNotAllowed { .. } => C::MethodNotAllowed,
            ApiError::PayloadTooLarge { .. } => C::PayloadTooLarge,
            ApiError::RequestTimeout => C::RequestTimeout,
            ApiError::UnsupportedMediaType(_) => C::UnsupportedMediaType,
            ApiError::Rule(rule) => match rule {
                CartRule::UnknownItem => C::UnknownItem,
                CartRule::ItemNotInCart => C::ItemNotInCart,
                CartRule::CurrencyMismatch { .. } => C::CurrencyMismatch,
                CartRule::PriceMismatch { .. } => C::PriceMismatch,
                CartRule::OutOfStock { .. } => C::OutOfStock,
                CartRule::QuantityLimit { .. } => C::QuantityLimit,
                CartRule::CartFull { .. } => C::CartFull,
                CartRule::MergeInProgress => C::MergeInProgress,
                CartRule::VersionMismatch { .. } => C::VersionMismatch,
            },
            ApiError::RequestInProgress => C::RequestInProgress,
            ApiError::IdempotencyKeyReused => C::IdempotencyKeyReused,
            ApiError::RateLimited(_) => C::RateLimited,
            ApiError::GuestCartBusy => C::MergeInProgress,
            ApiError::CartEmpty => C::CartEmpty,
            ApiError::PriceChanged { .. } => C::PriceChanged,
            ApiError::StockShort { .. } => C::OutOfStock,
            ApiError::OrderNotFound => C::OrderNotFound,
            ApiError::OrderNotPending { .. } => C::OrderNotPending,
            ApiError::ReservationExpired { .. } => C::ReservationExpired,
            ApiError::Misdirected => C::Misdirected,
            ApiError::HomeRegionUnavailable { .. } => C::HomeRegionUnavailable,
            ApiError::TopologyMismatch => C::TopologyMismatch,
            ApiError::Unavailable { .. } => C::Unavailable,
            ApiError::Internal(_) => C::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code().status()
    }

    /// The variant's one `details` shape (None: the body has no `details`).
    fn details(&self) -> Option<Value> {
        let details = match self {
            ApiError::PayloadTooLarge { limit } => json!({ "limit_bytes": limit }),
            ApiError::Rule(CartRule::CurrencyMismatch { cart }) => {
                json!({ "cart_currency": cart })
            }
            ApiError::Rule(CartRule::PriceMismatch { current }) => {
                json!({ "current_price": current })
            }
            ApiError::Rule(CartRule::QuantityLimit { current, requested }) => json!({
                "current_quantity": current,
                "requested": requested,
                "max_quantity": crate::domain::cart::MAX_QUANTITY,
            }),
            ApiError::Rule(CartRule::CartFull { max_lines }) => json!({ "max_lines": max_lines }),
            ApiError::Rule(CartRule::VersionMismatch { current }) => {
                json!({ "current_version": current })
            }
            ApiError::RateLimited(verdict) => json!({
                "policy": verdict.policy.name,
                "retry_after_seconds": verdict.retry_after_secs,
            }),
            ApiError::GuestCartBusy
            | ApiError::CartEmpty
            | ApiError::Rule(CartRule::MergeInProgress) => json!({}),
            ApiError::Rule(CartRule::OutOfStock {
                item_id,
                requested,
                available,
            }) => json!({ "items": [{
                "item_id": item_id,
                "requested": requested,
                "available": available,
            }] }),
            ApiError::PriceChanged { lines } => json!({ "lines": lines }),
            ApiError::StockShort { items } => json!({ "items": items }),
            ApiError::OrderNotPending { status } | ApiError::ReservationExpired { status } => {
                json!({ "status": status })
            }
            ApiError::InvalidRequest(_)
            | ApiError::IdempotencyKeyRequired
            | ApiError::Unauthenticated(_)
            | ApiError::InvalidSession
            | ApiError::Forbidden(_)
            | ApiError::NotFound
            | ApiError::MethodNotAllowed { .. }
            | ApiError::RequestTimeout
            | ApiError::UnsupportedMediaType(_)
            | ApiError::Rule(CartRule::UnknownItem | CartRule::ItemNotInCart)
            | ApiError::RequestInProgress
            | ApiError::IdempotencyKeyReused
            | ApiError::OrderNotFound
            | ApiError::Misdirected
            | ApiError::HomeRegionUnavailable { .. }
            | ApiError::TopologyMismatch
            | ApiError::Unavailable { .. }
            | ApiError::Internal(_) => return None,
        };
        Some(details)
    }

    /// The message a client sees: the variant's own, except for 5xx causes, which are logged
    /// here (once) and never sent.
    fn message(&self) -> String {
        match self {
            ApiError::Unavailable { cause, .. } => {
                tracing::warn!(%cause, "request failed: dependency unavailable");
                "service temporarily unavailable, retry later".to_string()
            }
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "request failed: internal error");
                "internal error".to_string()
            }
            other => other.to_string(),
        }
    }

    /// The one mapping from an error to its response: status, `{"error":{code,message,details}}`
    /// and the headers the error implies.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let code = self.code();
        let mut error = json!({ "code": code.as_str(), "message": self.message() });
        if let Some(details) = self.details() {
            error["details"] = details;
        }
        let body = serde_json::to_vec(&json!({ "error": error })).unwrap_or_default();
        let mut response = super::response::json(code.status(), body);
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthenticated(_) | ApiError::InvalidSession => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                if let Ok(value) = HeaderValue::from_str(allow) {
                    headers.insert(header::ALLOW, value);
                }
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
                    headers.insert(names::IDEMPOTENCY_KEY, value);
                }
            }
            ApiError::TopologyMismatch => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(TOPOLOGY_RETRY_AFTER_SECS),
                );
            }
            ApiError::RateLimited(verdict) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(verdict.retry_after_secs),
                );
                crate::limits::set_headers(headers, verdict);
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::{Currency, Money};

    /// One value of every variant (and of every cart rule). The match below has no wildcard, so
    /// a new variant fails to compile until it is sampled here.
    fn one_of_each() -> Vec<ApiError> {
        let sgd = Currency::parse("SGD").unwrap();
        let verdict = Verdict {
            policy: std::sync::Arc::new(crate::limits::Policy::new("writes", 1, 1)),
            remaining: 0,
            retry_after_secs: 1,
        };
        let shortage = Shortage {
            item_id: "sku-1".into(),
            requested: 2,
            available: 1,
        };
        let rules = vec![
            CartRule::UnknownItem,
            CartRule::CurrencyMismatch { cart: sgd },
            CartRule::PriceMismatch {
                current: Money::new(100, sgd),
            },
            CartRule::OutOfStock {
                item_id: "sku-1".into(),
                requested: 1,
                available: 0,
            },
            CartRule::QuantityLimit {
                current: 999,
                requested: 1,
            },
            CartRule::CartFull { max_lines: 1 },
            CartRule::ItemNotInCart,
            CartRule::MergeInProgress,
            CartRule::VersionMismatch { current: 1 },
        ];
        let mut all: Vec<ApiError> = rules.into_iter().map(ApiError::Rule).collect();
        all.extend([
            ApiError::InvalidRequest("x".into()),
            ApiError::IdempotencyKeyRequired,
            ApiError::Unauthenticated("x"),
            ApiError::InvalidSession,
            ApiError::Forbidden("x"),
            ApiError::NotFound,
            ApiError::MethodNotAllowed {
                allow: "GET".into(),
            },
            ApiError::PayloadTooLarge { limit: 1 },
            ApiError::RequestTimeout,
            ApiError::UnsupportedMediaType("x"),
            ApiError::RequestInProgress,
            ApiError::IdempotencyKeyReused,
            ApiError::RateLimited(verdict),
            ApiError::GuestCartBusy,
            ApiError::CartEmpty,
            ApiError::PriceChanged {
                lines: vec![PriceChange {
                    item_id: "sku-1".into(),
                    unit_price: Money::new(100, sgd),
                    current_price: Money::new(120, sgd),
                }],
            },
            ApiError::StockShort {
                items: vec![shortage],
            },
            ApiError::OrderNotFound,
            ApiError::OrderNotPending {
                status: OrderStatus::Paid,
            },
            ApiError::ReservationExpired {
                status: OrderStatus::Expired,
            },
            ApiError::Misdirected,
            ApiError::HomeRegionUnavailable {
                retry_after_secs: 1,
                idempotency_key: None,
            },
            ApiError::TopologyMismatch,
            ApiError::Unavailable {
                retry_after_secs: 1,
                cause: "x".into(),
            },
            ApiError::Internal("x".into()),
        ]);
        for error in &all {
            match error {
                ApiError::Rule(
                    CartRule::UnknownItem
                    | CartRule::CurrencyMismatch { .. }
                    | CartRule::PriceMismatch { .. }
                    | CartRule::OutOfStock { .. }
                    | CartRule::QuantityLimit { .. }
                    | CartRule::CartFull { .. }
                    | CartRule::ItemNotInCart
                    | CartRule::MergeInProgress
                    | CartRule::VersionMismatch { .. },
                )
                | ApiError::InvalidRequest(_)
                | ApiError::IdempotencyKeyRequired
                | ApiError::Unauthenticated(_)
                | ApiError::InvalidSession
                | ApiError::Forbidden(_)
                | ApiError::NotFound
                | ApiError::MethodNotAllowed { .. }
                | ApiError::PayloadTooLarge { .. }
                | ApiError::RequestTimeout
                | ApiError::UnsupportedMediaType(_)
                | ApiError::RequestInProgress
                | ApiError::IdempotencyKeyReused
                | ApiError::RateLimited(_)
                | ApiError::GuestCartBusy
                | ApiError::CartEmpty
                | ApiError::PriceChanged { .. }
                | ApiError::StockShort { .. }
                | ApiError::OrderNotFound
                | ApiError::OrderNotPending { .. }
                | ApiError::ReservationExpired { .. }
                | ApiError::Misdirected
                | ApiError::HomeRegionUnavailable { .. }
                | ApiError::TopologyMismatch
                | ApiError::Unavailable { .. }
                | ApiError::Internal(_) => {}
            }
        }
        all
    }

    /// The shape of a `details` value: its keys, and for arrays of objects the keys of their
    /// items (`None` when there are no details).
    fn shape(details: &Option<Value>) -> Option<Vec<String>> {
        let object = details.as_ref()?.as_object()?;
        let mut keys = Vec::new();
        for (key, value) in object {
            keys.push(key.clone());
            if let Some(first) = value.as_array().and_then(|items| items.first()) {
                if let Some(item) = first.as_object() {
                    keys.extend(item.keys().map(|k| format!("{key}[].{k}")));
                }
            }
        }
        keys.sort();
        Some(keys)
    }

    #[test]
    fn every_code_has_exactly_one_details_shape() {
        /// Per code: each variant seen (as debug text) with its details shape.
        type Seen = Vec<(String, Option<Vec<String>>)>;
        let mut shapes: std::collections::BTreeMap<&str, Seen> = Default::default();
        for error in one_of_each() {
            shapes
                .entry(error.code().as_str())
                .or_default()
                .push((format!("{error:?}"), shape(&error.details())));
        }
        for (code, seen) in &shapes {
            let first = &seen[0].1;
            for (variant, shape) in seen {
                assert_eq!(
                    shape, first,
                    "{code}: {variant} has details {shape:?}, another variant {first:?}"
                );
            }
        }
        // And every code the enum declares is answered by some variant.
        for code in ErrorCode::ALL {
            assert!(shapes.contains_key(code.as_str()), "{code} has no variant");
        }
    }

    #[test]
    fn codes_are_unique_and_lowercase() {
        let mut seen = std::collections::HashSet::new();
        for code in ApiError::all_codes() {
            assert!(seen.insert(code), "{code} is declared twice");
            assert!(code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }

    #[tokio::test]
    async fn an_internal_error_is_a_500_without_internals_and_an_outage_a_503_with_retry_after() {
        use http_body_util::BodyExt;

        let outage = ApiError::from(StoreError::Unavailable("pool timed out".into()));
        assert_eq!(outage.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(outage
            .into_response()
            .headers()
            .contains_key(header::RETRY_AFTER));

        let internal = ApiError::Internal("row 7 has quantity 70000".into());
        let response = internal.into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!response.headers().contains_key(header::RETRY_AFTER));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(r#""code":"internal""#), "{body}");
        assert!(!body.contains("70000"), "{body}");
    }
}
