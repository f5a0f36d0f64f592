//! Parsing a request's parts: identity, the cart contract's headers, query, path segments and
//! bodies. Each accessor reads one thing and validates it; `command` calls them once per request
//! to build a `Command`. Nothing here decides what a request does or touches the store.

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::names;
use crate::auth::{Authenticator, Session};
use crate::domain::cart::Quantity;
use crate::domain::ids::{ItemId, SessionId, UserId};
use crate::domain::money::Money;
use crate::domain::variant;
use crate::domain::variant::LineId;
use crate::limits::Tier;

/// Who sent the request.
#[derive(Debug, Clone)]
pub enum Caller {
    User(UserId),
    Guest(SessionId),
    Anonymous,
}

/// Who sent the request, as far as rate limits and role checks care.
#[derive(Debug, Clone)]
pub struct Identity {
    pub caller: Caller,
    pub tier: Tier,
    /// The bearer token's `role` claim (the payment service's, for settling orders).
    pub role: Option<String>,
}

/// Borrowed view of a request's head with the contract's accessors.
pub struct RequestParts<'a> {
    headers: &'a HeaderMap,
    query: Option<&'a str>,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| ApiError::InvalidRequest(format!("header {name} is not visible ASCII"))),
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim())
}

impl<'a> RequestParts<'a> {
    pub fn new(parts: &'a Parts) -> Self {
        RequestParts {
            headers: &parts.headers,
            query: parts.uri.query(),
        }
    }

    /// Resolves the caller, its rate-limit tier and its token's role. A present but bad
    /// credential is an error, never anonymous.
    pub fn identify(&self, auth: &Authenticator) -> Result<Identity, ApiError> {
        if let Some(value) = self.headers.get(header::AUTHORIZATION) {
            let verified = auth.verify(bearer_token(value)?)?;
            return Ok(Identity {
                caller: Caller::User(verified.user),
                tier: if verified.service {
                    Tier::Service
                } else {
                    Tier::User
                },
                role: verified.role,
            });
        }
        let caller = match self.guest_session(auth)? {
            Some(session) => Caller::Guest(session),
            None => Caller::Anonymous,
        };
        Ok(Identity {
            caller,
            tier: Tier::Guest,
            role: None,
        })
    }

    /// Resolves the caller alone.
    pub fn authenticate(&self, auth: &Authenticator) -> Result<Caller, ApiError> {
        self.identify(auth).map(|identity| identity.caller)
    }

    /// The guest session the request presents (`Cart-Session` header, else the cookie),
    /// verified; None when it presents none or an expired one (an expired session behaves like
    /// no session, a forged one is refused). The one place a session is looked up.
    pub fn guest_session(&self, auth: &Authenticator) -> Result<Option<SessionId>, ApiError> {
        let presented = match header_str(self.headers, names::CART_SESSION) {
            Ok(Some(value)) => Some(value),
            Ok(None) => cookie(self.headers, names::SESSION_COOKIE),
            Err(_) => return Err(ApiError::InvalidSession),
        };
        match presented.map(|s| auth.verify_session(s)).transpose()? {
            Some(Session::Live(session)) => Ok(Some(session)),
            Some(Session::Expired) | None => Ok(None),
        }
    }

    /// Seed compatibility: a `user_id` must be the token's `sub`.
    pub fn check_user_id(&self, caller: &Caller, user_id: Option<&str>) -> Result<(), ApiError> {
        match (user_id, caller) {
            (None, _) => Ok(()),
            (Some(claimed), Caller::User(user)) if claimed == user.as_str() => Ok(()),
            (Some(_), Caller::User(_)) => {
                Err(ApiError::Forbidden("user_id does not match the token"))
            }
            (Some(_), _) => Err(ApiError::Unauthenticated("user_id requires a bearer token")),
        }
    }

    pub fn query_user_id(&self) -> Option<String> {
        self.query?
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(key, _)| *key == "user_id")
            .map(|(_, value)| value.to_string())
    }

    /// `Cart-Min-Version` (header, then the `cart_min_version` cookie); 0 when absent.
    pub fn min_version(&self) -> Result<i64, ApiError> {
        let raw = match header_str(self.headers, names::CART_MIN_VERSION)? {
            Some(value) => Some(value),
            None => cookie(self.headers, names::MIN_VERSION_COOKIE),
        };
        match raw {
            None => Ok(0),
            Some(value) => value
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| {
                    ApiError::InvalidRequest(
                        "Cart-Min-Version must be a non-negative integer".into(),
                    )
                }),
        }
    }

    /// `If-Match: "<version>"` (a weak tag is accepted; `*` means any version).
    pub fn if_match(&self) -> Result<Option<i64>, ApiError> {
        let Some(value) = header_str(self.headers, header::IF_MATCH.as_str())? else {
            return Ok(None);
        };
        if value == "*" {
            return Ok(None);
        }
        parse_etag(value).map(Some).ok_or_else(|| {
            ApiError::InvalidRequest("If-Match must be an entity tag like \"3\"".into())
        })
    }

    /// `If-None-Match`: the versions it names (or `*`). An unreadable header names none.
    pub fn if_none_match(&self) -> IfNoneMatch {
        match header_str(self.headers, header::IF_NONE_MATCH.as_str()) {
            Ok(Some("*")) => IfNoneMatch::Any,
            Ok(Some(value)) => IfNoneMatch::Versions(
                value
                    .split(',')
                    .filter_map(|tag| parse_etag(tag.trim()))
                    .collect(),
            ),
            Ok(None) | Err(_) => IfNoneMatch::Versions(Vec::new()),
        }
    }

    /// The `Idempotency-Key`: 1–255 visible ASCII characters.
    pub fn idempotency_key(&self) -> Result<Option<&'a str>, ApiError> {
        let Some(value) = self.headers.get(names::IDEMPOTENCY_KEY) else {
            return Ok(None);
        };
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b))
        {
            return Err(ApiError::InvalidRequest(
                "Idempotency-Key must be 1-255 visible ASCII characters".into(),
            ));
        }
        Ok(value.to_str().ok())
    }
}

/// The cart versions a conditional read already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfNoneMatch {
    Any,
    Versions(Vec<i64>),
}

impl IfNoneMatch {
    pub fn matches(&self, version: i64) -> bool {
        match self {
            IfNoneMatch::Any => true,
            IfNoneMatch::Versions(versions) => versions.contains(&version),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer_token(value: &http::HeaderValue) -> Result<&str, ApiError> {
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("authorization header is malformed"))?;
    let (scheme, token) = value.split_once(' ').ok_or(ApiError::Unauthenticated(
        "authorization must be a Bearer token",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthenticated(
            "authorization must be a Bearer token",
        ));
    }
    Ok(token.trim())
}

/// Percent-decodes one path segment (`sku%3A1` is `sku:1`, as clients that encode every
/// reserved character send it). None when a `%` is not followed by two hex digits or the
/// decoded bytes are not UTF-8.
pub fn decode_path_segment(raw: &str) -> Option<String> {
    if !raw.contains('%') {
        return Some(raw.to_string());
    }
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = tail.get(..2)?;
            let text = std::str::from_utf8(hex).ok()?;
            if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            bytes.push(u8::from_str_radix(text, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The `{line_id}` path segment: percent-decoded, then checked. An item id alone names the
/// item's variant-less line.
pub fn line_id_segment(raw: &str) -> Result<LineId, ApiError> {
    let decoded = decode_path_segment(raw).ok_or_else(|| {
        ApiError::InvalidRequest("line_id in the path is not valid percent-encoding".into())
    })?;
    LineId::parse(&decoded).map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

fn parse_etag(tag: &str) -> Option<i64> {
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    tag.strip_prefix('"')?
        .strip_suffix('"')?
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
}

/// Reads a body up to `limit` bytes. A body is JSON: a non-empty one needs
/// `Content-Type: application/json`; `required` bodies must be non-empty.
pub async fn read_body(
    parts: &Parts,
    body: Incoming,
    limit: usize,
    required: bool,
) -> Result<Bytes, ApiError> {
    check_declared_length(&parts.headers, limit)?;
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::InvalidRequest("request body could not be read".into())
            }
        })?
        .to_bytes();
    check_body(&parts.headers, &bytes, required)?;
    Ok(bytes)
}

/// Refuses a body before reading it when its `Content-Length` is malformed or over `limit`.
pub fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    let Some(length) = headers.get(header::CONTENT_LENGTH) else {
        return Ok(());
    };
    let length: u64 = length
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ApiError::InvalidRequest("Content-Length is malformed".into()))?;
    if length > limit as u64 {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    Ok(())
}

/// What a body read in full must be: non-empty when `required`, and JSON when non-empty.
pub fn check_body(headers: &HeaderMap, bytes: &[u8], required: bool) -> Result<(), ApiError> {
    if bytes.is_empty() {
        return if required {
            Err(ApiError::InvalidRequest("a JSON body is required".into()))
        } else {
            Ok(())
        };
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if !json {
        return Err(ApiError::UnsupportedMediaType);
    }
    Ok(())
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
}

pub fn parse_json_or_default<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        Ok(T::default())
    } else {
        parse_json(bytes)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddItemBody {
    pub item_id: String,
    pub quantity: i64,
    #[serde(default)]
    pub variant: Option<Value>,
    #[serde(default)]
    pub price: Option<Money>,
    #[serde(default)]
    pub user_id: Option<String>,
}

/// A validated add.
pub struct ValidAdd {
    pub item_id: ItemId,
    pub quantity: Quantity,
    pub variant: Option<Value>,
    pub price: Option<Money>,
}

impl AddItemBody {
    pub fn validate(self) -> Result<ValidAdd, ApiError> {
        let item_id =
            ItemId::parse(&self.item_id).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        let quantity = Quantity::parse(self.quantity).ok_or_else(|| {
            ApiError::InvalidRequest("quantity must be an integer within 1..=999".into())
        })?;
        let variant = match &self.variant {
            None => None,
            Some(value) => variant::validate(value)
                .map_err(|e| ApiError::InvalidRequest(e.to_string()))?
                .cloned(),
        };
        Ok(ValidAdd {
            item_id,
            quantity,
            variant,
            price: self.price,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetQuantityBody {
    quantity: i64,
    #[serde(default)]
    pub user_id: Option<String>,
}

impl SetQuantityBody {
    pub fn validate(&self) -> Result<Quantity, ApiError> {
        Quantity::parse(self.quantity).ok_or_else(|| {
            ApiError::InvalidRequest("quantity must be an integer within 1..=999".into())
        })
    }
}

/// Body of the DELETEs: optional, and only `user_id` is allowed in it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClearBody {
    #[serde(default)]
    pub user_id: Option<String>,
}

/// Body of `POST /cart/merge`: optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeBody {
    #[serde(default)]
    pub strategy: Option<crate::domain::lifecycle::MergeStrategy>,
    #[serde(default)]
    pub user_id: Option<String>,
}

/// Body of `POST /cart/checkout`: optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    #[serde(default)]
    pub accept_price_changes: Option<bool>,
    #[serde(default)]
    pub user_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_tags_parse_strong_and_weak() {
        assert_eq!(parse_etag("\"3\""), Some(3));
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("3"), None);
        assert_eq!(parse_etag("\"-1\""), None);
    }

    #[test]
    fn path_segments_are_percent_decoded_strictly() {
        assert_eq!(decode_path_segment("sku-1").as_deref(), Some("sku-1"));
        assert_eq!(decode_path_segment("a%3Ab%3a").as_deref(), Some("a:b:"));
        assert_eq!(decode_path_segment("%2F").as_deref(), Some("/"));
        for bad in ["%", "%3", "%zz", "%+1", "%FF"] {
            assert_eq!(decode_path_segment(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn add_bodies_reject_unknown_fields_wrong_types_and_ranges() {
        assert!(parse_json::<AddItemBody>(br#"{"item_id":"a","quantity":1,"x":1}"#).is_err());
        assert!(parse_json::<AddItemBody>(br#"{"item_id":"a","quantity":"1"}"#).is_err());
        assert!(parse_json::<AddItemBody>(br#"{"item_id":"a","quantity":1.5}"#).is_err());
        let zero: AddItemBody = parse_json(br#"{"item_id":"a","quantity":0}"#).unwrap();
        assert!(zero.validate().is_err());
        let bad_variant: AddItemBody =
            parse_json(br#"{"item_id":"a","quantity":1,"variant":"M"}"#).unwrap();
        assert!(bad_variant.validate().is_err());
        let ok: AddItemBody =
            parse_json(br#"{"item_id":"a","quantity":2,"variant":{"size":"M"}}"#).unwrap();
        assert_eq!(ok.validate().unwrap().quantity.get(), 2);
    }
}
