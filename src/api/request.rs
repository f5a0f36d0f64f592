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
use crate::domain::ids::{ItemId, OwnerKey, RegionId, SessionId, UserId};
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
    /// The bearer token's `region` claim: the user's home region.
    pub region: Option<RegionId>,
}

/// Borrowed view of a request's head with the contract's accessors.
pub struct RequestParts<'a> {
    headers: &'a HeaderMap,
    query: Option<&'a str>,
}

/// A header the contract allows once. Two field lines are ambiguous, so they are refused
/// rather than the first winning silently.
fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(duplicate_header(name));
    }
    value
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| ApiError::InvalidRequest(format!("header {name} is not visible ASCII")))
}

fn duplicate_header(name: &str) -> ApiError {
    ApiError::InvalidRequest(format!("header {name} must be sent at most once"))
}

/// Refuses a request carrying `name` more than once.
fn at_most_once(headers: &HeaderMap, name: &str) -> Result<(), ApiError> {
    if headers.get_all(name).iter().nth(1).is_some() {
        return Err(duplicate_header(name));
    }
    Ok(())
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
        at_most_once(self.headers, header::AUTHORIZATION.as_str())?;
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
                region: verified.region,
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
            region: None,
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
        at_most_once(self.headers, names::CART_SESSION)?;
        let presented = match single_header(self.headers, names::CART_SESSION) {
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

    /// The `user_id` query parameter; given twice it is ambiguous (400).
    pub fn query_user_id(&self) -> Result<Option<&'a str>, ApiError> {
        let mut values = self
            .query
            .into_iter()
            .flat_map(|query| query.split('&'))
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .filter(|(key, _)| *key == "user_id")
            .map(|(_, value)| value);
        let first = values.next();
        if values.next().is_some() {
            return Err(ApiError::InvalidRequest(
                "query parameter user_id must be given at most once".into(),
            ));
        }
        Ok(first)
    }

    /// The `user_id` a write claims, from its body or its query; both naming different users is
    /// ambiguous (400).
    pub fn claimed_user_id<'b>(
        &'b self,
        body: Option<&'b str>,
    ) -> Result<Option<&'b str>, ApiError> {
        match (body, self.query_user_id()?) {
            (Some(body), Some(query)) if body != query => Err(ApiError::InvalidRequest(
                "user_id in the body and in the query differ".into(),
            )),
            (body, query) => Ok(body.or(query)),
        }
    }

    /// `Cart-Min-Version` (a plain integer), else the `cart_min_version` cookie if it was
    /// issued for `owner` (a cookie bound to another owner, or unreadable, is ignored: it is
    /// what a shared browser or a logout leaves behind); 0 when neither applies.
    pub fn min_version(&self, auth: &Authenticator, owner: &OwnerKey) -> Result<i64, ApiError> {
        match single_header(self.headers, names::CART_MIN_VERSION)? {
            Some(value) => value
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| {
                    ApiError::InvalidRequest(
                        "Cart-Min-Version must be a non-negative integer".into(),
                    )
                }),
            None => Ok(cookie(self.headers, names::MIN_VERSION_COOKIE)
                .and_then(|value| auth.verify_min_version_cookie(owner.as_str(), value))
                .unwrap_or(0)),
        }
    }

    /// `If-Match: "<version>"` (a weak tag is accepted; `*` means any version).
    pub fn if_match(&self) -> Result<Option<i64>, ApiError> {
        let Some(value) = single_header(self.headers, header::IF_MATCH.as_str())? else {
            return Ok(None);
        };
        if value == "*" {
            return Ok(None);
        }
        parse_etag(value).map(Some).ok_or_else(|| {
            ApiError::InvalidRequest("If-Match must be an entity tag like \"3\"".into())
        })
    }

    /// `If-None-Match`: the versions it names (or `*`), over all its field lines (a list
    /// header may be split). An unreadable header names none.
    pub fn if_none_match(&self) -> IfNoneMatch {
        let mut versions = Vec::new();
        for value in self.headers.get_all(header::IF_NONE_MATCH) {
            let Ok(value) = value.to_str() else {
                continue;
            };
            if value.trim() == "*" {
                return IfNoneMatch::Any;
            }
            versions.extend(value.split(',').filter_map(|tag| parse_etag(tag.trim())));
        }
        IfNoneMatch::Versions(versions)
    }

    /// The `Idempotency-Key`: 1–255 visible ASCII characters.
    pub fn idempotency_key(&self) -> Result<Option<&'a str>, ApiError> {
        at_most_once(self.headers, names::IDEMPOTENCY_KEY)?;
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
    check_content_encoding(&parts.headers)?;
    let collect = Limited::new(body, limit).collect();
    let collected = match parts.extensions.get::<Deadline>() {
        Some(deadline) => tokio::time::timeout_at(deadline.0, collect)
            .await
            .map_err(|_| ApiError::RequestTimeout)?,
        None => collect.await,
    };
    let bytes = collected
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

/// When the request's handling must end (`server.request_timeout` after it started), inserted
/// by `api::handle`. A body still arriving then is the client's fault: 408, not a 503.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub tokio::time::Instant);

/// Bodies are JSON as sent: any `Content-Encoding` but `identity` (gzip, …) is refused with
/// 415 rather than parsed as if it were plain.
pub fn check_content_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"));
    if encoded {
        return Err(ApiError::UnsupportedMediaType(
            "request body must not be content-encoded (only identity is accepted)",
        ));
    }
    Ok(())
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
        return Err(ApiError::UnsupportedMediaType(
            "request body must be application/json",
        ));
    }
    Ok(())
}

/// Parses a JSON body. A failure is described in the API's words (never serde's type names).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|_| describe_body_error(bytes, &[]))
}

/// Parses a public request body; a failure names the field and what it must hold.
pub fn parse_body<T: JsonBody>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would take a JSON array for a struct's fields in order; a body is an object.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(describe_body_error(bytes, T::FIELDS));
    }
    serde_json::from_slice(bytes).map_err(|_| describe_body_error(bytes, T::FIELDS))
}

/// As [`parse_body`], an empty body being the default.
pub fn parse_body_or_default<T: JsonBody + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        Ok(T::default())
    } else {
        parse_body(bytes)
    }
}

/// A public request body and the fields it accepts, so errors can say what was expected.
pub trait JsonBody: DeserializeOwned {
    const FIELDS: &'static [BodyField];
}

/// One field of a body: its name, whether it is required, what it must hold (as the API
/// documents it) and a check of a present value.
pub struct BodyField {
    pub name: &'static str,
    pub required: bool,
    pub expected: &'static str,
    pub accepts: fn(&Value) -> bool,
}

const USER_ID: BodyField = BodyField {
    name: "user_id",
    required: false,
    expected: "a string or null",
    accepts: |v| v.is_string() || v.is_null(),
};

const QUANTITY: BodyField = BodyField {
    name: "quantity",
    required: true,
    expected: "an integer from 1 to 999",
    accepts: Value::is_i64,
};

/// Why a body did not parse, found again on the body as a generic JSON value: syntax, shape,
/// unknown fields, missing fields, then the first field holding the wrong kind of value.
fn describe_body_error(bytes: &[u8], fields: &[BodyField]) -> ApiError {
    let invalid = |message: String| ApiError::InvalidRequest(message);
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(error) => {
            return invalid(format!(
                "body is not valid JSON (line {}, column {})",
                error.line(),
                error.column()
            ))
        }
    };
    let Value::Object(object) = &value else {
        return invalid("body must be a JSON object".into());
    };
    if fields.is_empty() {
        return invalid("body does not have the expected fields".into());
    }
    if let Some(unknown) = object
        .keys()
        .find(|key| !fields.iter().any(|f| f.name == key.as_str()))
    {
        let allowed: Vec<String> = fields.iter().map(|f| format!("`{}`", f.name)).collect();
        return invalid(format!(
            "unknown field `{unknown}`; the body may hold {}",
            allowed.join(", ")
        ));
    }
    for field in fields {
        match object.get(field.name) {
            None if field.required => {
                return invalid(format!("field `{}` is required", field.name))
            }
            Some(value) if !(field.accepts)(value) => {
                return invalid(format!(
                    "field `{}`: expected {}",
                    field.name, field.expected
                ))
            }
            _ => {}
        }
    }
    // What a generic value cannot show: a field given twice.
    invalid("body holds a field more than once".into())
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

impl JsonBody for AddItemBody {
    const FIELDS: &'static [BodyField] = &[
        BodyField {
            name: "item_id",
            required: true,
            expected: "a string",
            accepts: Value::is_string,
        },
        QUANTITY,
        BodyField {
            name: "variant",
            required: false,
            expected: "an object or null",
            accepts: |_| true,
        },
        BodyField {
            name: "price",
            required: false,
            expected: "an object with `amount_minor` (an integer) and `currency` (a currency code), or null",
            accepts: |v| v.is_null() || serde_json::from_value::<Money>(v.clone()).is_ok(),
        },
        USER_ID,
    ];
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
            ApiError::InvalidRequest("field `quantity`: expected an integer from 1 to 999".into())
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

impl JsonBody for SetQuantityBody {
    const FIELDS: &'static [BodyField] = &[QUANTITY, USER_ID];
}

impl SetQuantityBody {
    pub fn validate(&self) -> Result<Quantity, ApiError> {
        Quantity::parse(self.quantity).ok_or_else(|| {
            ApiError::InvalidRequest("field `quantity`: expected an integer from 1 to 999".into())
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

impl JsonBody for ClearBody {
    const FIELDS: &'static [BodyField] = &[USER_ID];
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

impl JsonBody for MergeBody {
    const FIELDS: &'static [BodyField] = &[
        BodyField {
            name: "strategy",
            required: false,
            expected: "one of \"sum\", \"max\", \"keep_user\", \"keep_guest\", or null",
            accepts: |v| {
                v.is_null()
                    || serde_json::from_value::<crate::domain::lifecycle::MergeStrategy>(v.clone())
                        .is_ok()
            },
        },
        USER_ID,
    ];
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

impl JsonBody for CheckoutBody {
    const FIELDS: &'static [BodyField] = &[
        BodyField {
            name: "accept_price_changes",
            required: false,
            expected: "true, false or null",
            accepts: |v| v.is_boolean() || v.is_null(),
        },
        USER_ID,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<T: JsonBody + std::fmt::Debug>(body: &str) -> String {
        match parse_body::<T>(body.as_bytes()) {
            Err(ApiError::InvalidRequest(message)) => message,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn body_errors_name_the_field_and_what_it_must_hold_never_serde_types() {
        let cases = [
            (r#"["a",1]"#, "body must be a JSON object"),
            ("{", "body is not valid JSON (line 1, column 1)"),
            (
                r#"{"item_id":"a","quantity":"1"}"#,
                "field `quantity`: expected an integer from 1 to 999",
            ),
            (r#"{"item_id":"a"}"#, "field `quantity` is required"),
            (
                r#"{"item_id":"a","quantity":1,"price":{"amount_minor":1}}"#,
                "field `price`: expected an object with `amount_minor` (an integer) and `currency` (a currency code), or null",
            ),
            (
                r#"{"item_id":"a","quantity":1,"colour":"red"}"#,
                "unknown field `colour`; the body may hold `item_id`, `quantity`, `variant`, `price`, `user_id`",
            ),
            (
                r#"{"item_id":"a","quantity":1,"quantity":2}"#,
                "body holds a field more than once",
            ),
        ];
        for (body, expected) in cases {
            let text = message::<AddItemBody>(body);
            assert_eq!(text, expected, "{body}");
            assert!(!text.contains("struct") && !text.contains("i64"), "{text}");
        }
        assert_eq!(
            message::<MergeBody>(r#"{"strategy":"both"}"#),
            "field `strategy`: expected one of \"sum\", \"max\", \"keep_user\", \"keep_guest\", or null"
        );
    }

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
