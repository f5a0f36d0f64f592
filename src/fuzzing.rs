//! Fuzz entry points: each takes arbitrary bytes, feeds them through the edge's real parsing
//! and verification code, and asserts what must hold for every input. A panic is a finding.
//!
//! The cargo-fuzz targets in `fuzz/` call these, and the test suite replays every committed
//! corpus file through them (`tests/api/fuzz_corpus.rs`), so a fixed crash stays fixed. They
//! open no sockets and read files only where the configuration under test names one.
//!
//! Input shapes (so seed files stay readable):
//! - [`request`]: `METHOD target` on the first line, then `Name: value` header lines, an empty
//!   line, and the body.
//! - [`session_id`], [`token`]: the presented value, raw.
//! - [`config`]: TOML layered over the built-in defaults, optionally followed by a line `%%env`
//!   and `CARTEDGE__…=value` lines.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use crate::api::error::ApiError;
use crate::api::idempotency;
use crate::api::request::{self, AddItemBody, Caller, ClearBody, RequestParts, SetQuantityBody};
use crate::auth::{Authenticator, Session};
use crate::config::{AuthConfig, Config, Dur, JwtKeyConfig, Secret, Sources};
use crate::domain::ids::{ItemId, Owner, UserId};
use crate::domain::variant;

/// The guest-session HMAC key of [`authenticator`]; public so seed sessions can be minted.
pub const SESSION_SECRET: &str = "fuzz-session-secret-0123456789abcdef";
/// The HS256 keys (`kid`, secret) of [`authenticator`]; public so seed tokens can be signed.
pub const TOKEN_KEYS: [(&str, &str); 2] = [
    ("k1", "fuzz-token-secret-one-0123456789abcdef"),
    ("k2", "fuzz-token-secret-two-0123456789abcdef"),
];
/// The `iss` and `aud` [`authenticator`] requires.
pub const ISSUER: &str = "fuzz-issuer";
pub const AUDIENCE: &str = "fuzz-audience";

/// How long [`authenticator`]'s guest sessions live (the default `retention.guest_cart`).
pub const SESSION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// The fixed clock (unix seconds) [`session_id`] also verifies at, so a seed's verdict does not
/// change as the wall clock moves on; the `valid-v2` seed was issued at it.
pub const SESSION_CLOCK: u64 = 1_800_000_000;

/// Body limit the request target checks declared lengths against (the default's).
const BODY_LIMIT: usize = 16 * 1024;

/// The fixed authentication configuration every target verifies with.
pub fn auth_config() -> AuthConfig {
    AuthConfig {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        leeway: Dur(std::time::Duration::from_secs(1)),
        max_token_lifetime: Dur(std::time::Duration::from_secs(24 * 3600)),
        session_secret: Secret::new(SESSION_SECRET),
        session_id_version: 2,
        require_region_claim: false,
        keys: TOKEN_KEYS
            .iter()
            .map(|(kid, secret)| JwtKeyConfig {
                kid: (*kid).into(),
                algorithm: "HS256".into(),
                secret: Secret::new(*secret),
                public_key_file: None,
            })
            .collect(),
    }
}

/// An authenticator over [`auth_config`]. Built per input (a few µs) rather than kept in a
/// global, so no state carries from one input to the next.
pub fn authenticator() -> Authenticator {
    match Authenticator::new(&auth_config(), SESSION_LIFETIME) {
        Ok(auth) => auth,
        Err(error) => panic!("the fixed fuzz configuration is valid: {error}"),
    }
}

/// Request parsing and body decoding: route matching, the contract's headers, identity, the
/// JSON bodies and their validation, and error rendering.
pub fn request(data: &[u8]) {
    let (head, body) = split_once(data, b"\r\n\r\n")
        .or_else(|| split_once(data, b"\n\n"))
        .unwrap_or((data, &[]));
    let mut lines = head.split(|b| *b == b'\n').map(trim_cr);
    let start = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let (method, target) = start.split_once(' ').unwrap_or(("GET", start.as_str()));

    let path = target.split('?').next().unwrap_or_default();
    let route = crate::api::route_name(path);
    if route == Some("cart_item") {
        let raw = path.rsplit('/').next().unwrap_or_default();
        if let Some(decoded) = request::decode_path_segment(raw) {
            // Decoding only ever removes escapes.
            assert!(decoded.len() <= raw.len());
            assert!(raw.contains('%') || decoded == raw);
        }
    }
    // Both prefixes reach the same handlers.
    if path.starts_with('/') && !path.starts_with("/api/v1") {
        assert_eq!(crate::api::route_name(&format!("/api/v1{path}")), route);
    }

    let mut builder = http::Request::builder();
    if let Ok(method) = http::Method::from_bytes(method.as_bytes()) {
        builder = builder.method(method);
    }
    let Ok(built) = builder.uri(target).body(()) else {
        return;
    };
    let (mut parts, ()) = built.into_parts();
    for line in lines {
        let Some((name, value)) = split_once(line, b":") else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value.trim_ascii()),
        ) {
            parts.headers.append(name, value);
        }
    }
    contract_headers(&parts);
    bodies(&parts.headers, body);
}

fn contract_headers(parts: &Parts) {
    let view = RequestParts::new(parts);
    let auth = authenticator();
    let owner = crate::domain::ids::OwnerKey::from_stored("u:fuzz".to_string());
    if let Ok(Some(version)) = view.if_match() {
        assert!(version >= 0);
    }
    // A tag list that names a version never names an impossible one.
    assert!(
        !view.if_none_match().matches(-1)
            || parts
                .headers
                .get_all("if-none-match")
                .iter()
                .any(|v| v.as_bytes().trim_ascii() == b"*")
    );
    let _ = view.if_none_match().matches(0);
    if let Ok(Some(key)) = view.idempotency_key() {
        assert!((1..=255).contains(&key.len()));
        assert!(key.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
    let user_id = view.query_user_id();
    match view.identify(&auth) {
        Ok(identity) => {
            let caller = identity.caller;
            // Nobody can sign a token without the key, and no seed holds a valid one.
            assert!(!parts.headers.contains_key("authorization"));
            if let Caller::Guest(session) = &caller {
                let live = Session::Live(session.clone());
                assert_eq!(auth.verify_session(session.as_str()), Ok(live));
            }
            match user_id {
                Ok(user_id) => {
                    if let Err(error) = view.check_user_id(&caller, user_id) {
                        render(error);
                    }
                }
                Err(error) => render(error),
            }
        }
        Err(error) => render(error),
    }
    // A cookie-borne minimum counts only for the owner it was issued for.
    if let Ok(version) = view.min_version(&auth, &owner) {
        assert!(version >= 0);
    }
    for result in [
        view.min_version(&auth, &owner).map(drop),
        view.if_match().map(drop),
    ] {
        if let Err(error) = result {
            render(error);
        }
    }
}

fn bodies(headers: &HeaderMap, body: &[u8]) {
    for result in [
        request::check_declared_length(headers, BODY_LIMIT),
        request::check_body(headers, body, true),
        request::check_body(headers, body, false),
    ] {
        if let Err(error) = result {
            render(error);
        }
    }
    match request::parse_body::<AddItemBody>(body).and_then(AddItemBody::validate) {
        Ok(add) => {
            assert!((1..=999).contains(&add.quantity.get()));
            assert!(ItemId::parse(add.item_id.as_str()).is_ok());
            if let Some(variant) = &add.variant {
                assert!(variant.is_object());
                assert!(variant::validate(variant).is_ok());
                // Lines are stored as PostgreSQL jsonb, which cannot hold U+0000.
                assert!(!variant::has_nul(variant));
            }
        }
        Err(error) => render(error),
    }
    match request::parse_body::<SetQuantityBody>(body) {
        Ok(set) => match set.validate() {
            Ok(quantity) => assert!((1..=999).contains(&quantity.get())),
            Err(error) => render(error),
        },
        Err(error) => render(error),
    }
    if let Err(error) = request::parse_body_or_default::<ClearBody>(body) {
        render(error);
    }
    if let Err(error) = request::parse_json::<crate::forward::invalidate::Batch>(body) {
        render(error);
    }
    let item = String::from_utf8_lossy(body);
    let a = idempotency::fingerprint("add", &item, Some(1), body);
    assert_eq!(a, idempotency::fingerprint("add", &item, Some(1), body));
    assert_ne!(a, idempotency::fingerprint("set", &item, Some(1), body));
}

/// A parse or validation error is the client's: a 4xx with the JSON error body.
fn render(error: ApiError) {
    let status = error.status();
    assert!(status.is_client_error(), "{status} for {:?}", error.code());
    let response = error.into_response();
    assert_eq!(response.status(), status);
}

/// Guest session ids and the other identifiers: parsing and verification, presented as the
/// `Cart-Session` header and as the `cart_session` cookie.
pub fn session_id(data: &[u8]) {
    let auth = authenticator();
    let text = String::from_utf8_lossy(data);
    for verdict in [
        auth.verify_session(&text),
        auth.verify_session_at(&text, SESSION_CLOCK),
    ] {
        if let Ok(Session::Live(session)) = verdict {
            // Only canonical ids verify, so one session is one owner key.
            assert_eq!(session.as_str(), text);
            assert_eq!(
                Owner::Guest(session.clone()).key().as_str(),
                format!("g:{text}")
            );
        }
    }
    // Authenticity does not depend on the clock: only live and expired trade places.
    assert_eq!(
        auth.verify_session(&text).is_ok(),
        auth.verify_session_at(&text, SESSION_CLOCK).is_ok()
    );
    let minted = auth.issue_session();
    assert_eq!(
        auth.verify_session(minted.as_str()),
        Ok(Session::Live(minted.clone()))
    );
    let old = auth.issue_session_at(SESSION_CLOCK);
    let lifetime = SESSION_LIFETIME.as_secs();
    assert_eq!(
        auth.verify_session_at(old.as_str(), SESSION_CLOCK + lifetime + 1),
        Ok(Session::Expired)
    );
    for (name, prefix) in [
        ("cart-session", &b""[..]),
        ("cookie", &b"cart_session="[..]),
    ] {
        let value = [prefix, data].concat();
        let Ok(value) = HeaderValue::from_bytes(&value) else {
            continue;
        };
        let parts = parts_with(HeaderName::from_static(name), value);
        match RequestParts::new(&parts).authenticate(&auth) {
            Ok(Caller::Guest(session)) => assert_eq!(
                auth.verify_session(session.as_str()),
                Ok(Session::Live(session.clone()))
            ),
            Ok(Caller::User(_)) => panic!("a session became a user"),
            Ok(Caller::Anonymous) | Err(_) => {}
        }
    }
    if let Ok(user) = UserId::parse(&text) {
        assert_eq!(user.as_str(), text);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        assert_eq!(Owner::User(user).key().as_str(), format!("u:{text}"));
    }
    if let Ok(item) = ItemId::parse(&text) {
        assert!((1..=64).contains(&item.as_str().len()));
    }
}

/// The head of a request carrying one header.
fn parts_with(name: HeaderName, value: HeaderValue) -> http::request::Parts {
    let mut request = http::Request::new(());
    request.headers_mut().insert(name, value);
    request.into_parts().0
}

/// Bearer tokens: header parsing and JWT verification with the fixed keys. Nothing the fuzzer
/// can produce is a valid token, so everything must be refused, and nothing may panic.
pub fn token(data: &[u8]) {
    let auth = authenticator();
    let text = String::from_utf8_lossy(data);
    assert!(auth.verify(&text).is_err(), "token accepted: {text:?}");
    for prefix in [&b""[..], b"Bearer ", b"bearer  "] {
        let value = [prefix, data].concat();
        let Ok(value) = HeaderValue::from_bytes(&value) else {
            continue;
        };
        let parts = parts_with(http::header::AUTHORIZATION, value);
        match RequestParts::new(&parts).identify(&auth) {
            Ok(_) => panic!("authorization accepted: {text:?}"),
            Err(error) => assert_eq!(error.status(), http::StatusCode::UNAUTHORIZED),
        }
    }
}

/// Fixed secrets the config target passes through the environment, as an operator would.
const CONFIG_SECRETS: [(&str, &str); 2] = [
    (
        "CARTEDGE__AUTH__SESSION_SECRET",
        "fuzz-config-session-secret-0123456789",
    ),
    (
        "CARTEDGE__AUTH__KEYS__0__SECRET",
        "fuzz-config-token-secret-0123456789",
    ),
];

/// Configuration loading through the real loader: TOML over the built-in defaults,
/// environment overrides, validation and the redacted printing of `check-config`.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let config = match load_config(data) {
        Ok(config) => config,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    let printed = config.redacted_toml();
    let debug = format!("{config:?}");
    for (_, secret) in CONFIG_SECRETS {
        // (Unless the input also put the secret somewhere that is not secret.)
        if !text.contains(secret) {
            assert!(!printed.contains(secret), "a secret was printed");
            assert!(!debug.contains(secret), "a secret was debug-printed");
        }
    }
    // What `check-config` prints reads back as a configuration.
    if let Err(error) = toml::from_str::<Config>(&printed) {
        panic!("printed configuration does not read back: {error}\n{printed}");
    }
}

/// The configuration a [`config`] input describes, loaded as `cartedge` loads its own.
pub fn load_config(data: &[u8]) -> Result<Config, crate::config::ConfigError> {
    let text = String::from_utf8_lossy(data);
    let (overlay, env_text) = text.split_once("\n%%env\n").unwrap_or((&text, ""));
    let mut env: Vec<(String, String)> = CONFIG_SECRETS
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    env.extend(
        env_text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (name.to_string(), value.to_string())),
    );
    let sources = Sources {
        defaults: None,
        region: None,
        overlay: Some(overlay.to_string()),
    };
    Config::load(&sources, env)
}

fn split_once<'a>(data: &'a [u8], separator: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    let at = data
        .windows(separator.len())
        .position(|window| window == separator)?;
    Some((&data[..at], &data[at + separator.len()..]))
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}
