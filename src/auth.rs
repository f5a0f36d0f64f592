//! Who is calling: user JWTs (`Authorization: Bearer`) and server-issued guest session ids.
//!
//! The accepted algorithm is pinned per key in configuration and never read from the token
//! header; a token picks its key by `kid` (or the only configured key when it names none).
//! Guest session ids are signed by this server (HMAC-SHA256, a 128-bit tag, base64url): only it
//! can mint one, and a forged or truncated id is refused, never replaced silently. An id carries
//! its issue time inside the signed bytes and lives `retention.guest_cart` from then; an
//! authentic id past that is [`Session::Expired`], which callers treat as no session. Reading
//! the clock for that check happens here, never in the domain.
//!
//! Formats (the tag always covers every byte before it, after a per-format context string):
//! - v1, the first format: 16 random bytes + tag = 43 characters. No issue time: still accepted,
//!   never expires by age (the janitor purges its idle cart); minted only while
//!   `auth.session_id_version = 1` (a rolling upgrade from a release that reads only v1).
//! - v2: version byte `0x02`, issue time (unix seconds, 48-bit big-endian), 16 random bytes,
//!   tag = 39 bytes, 52 characters. Minted only while `auth.session_id_version = 2`.
//! - v3 (minted by default): version byte `0x03`, issue time as in v2, the guest's **home
//!   region** (the region whose edge minted the id: its length, then its id zero-padded to 8
//!   bytes), 16 random bytes, tag = 48 bytes, 64 characters. The home region is signed with the
//!   rest, so a guest cannot move its cart to another region by editing its id.
//!
//! A v1 id is recognised by its length alone (its first byte is random); every later format is
//! longer than 43 characters and starts with its version byte, so a later format adds its fields
//! under a new version byte and context string without any reading of an older id changing.
//! v1 and v2 ids name no home region: their carts stay where the global ring put them.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, JwtKeyConfig};
use crate::domain::ids::{RegionId, SessionId, UserId};

/// Why a credential was refused. Deliberately coarse: a caller learns that its token or session
/// is not accepted, never which check failed. `api::error` turns it into the 401 answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("bearer token is invalid or expired")]
    InvalidToken,
    #[error("guest session is invalid")]
    InvalidSession,
}

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
const SESSION_RANDOM_BYTES: usize = 16;
const SESSION_TAG_BYTES: usize = 16;
/// Domain separation for the session HMAC, so the key cannot be reused to sign other things
/// and one format's signed bytes can never be read as another's.
const SESSION_CONTEXT_V1: &[u8] = b"cartedge guest session v1\0";
const SESSION_CONTEXT_V2: &[u8] = b"cartedge guest session v2\0";
const SESSION_CONTEXT_V3: &[u8] = b"cartedge guest session v3\0";
/// A v1 id: 32 bytes in unpadded base64url.
const SESSION_V1_CHARS: usize = 43;
const SESSION_V2: u8 = 2;
/// The issue time's width: 48 bits of unix seconds outlast any deployment.
const SESSION_TIME_BYTES: usize = 6;
const SESSION_V2_BYTES: usize = 1 + SESSION_TIME_BYTES + SESSION_RANDOM_BYTES + SESSION_TAG_BYTES;
/// 39 bytes are exactly 52 base64url characters (no padding bits, so one encoding per id).
const SESSION_V2_CHARS: usize = SESSION_V2_BYTES / 3 * 4;
const SESSION_V3: u8 = 3;
/// Room for a region id in a v3 id (region ids are at most 8 letters).
const SESSION_REGION_BYTES: usize = 8;
/// Where a v3 id's region length byte sits (after the version byte and the issue time).
const SESSION_V3_REGION_AT: usize = 1 + SESSION_TIME_BYTES;
const SESSION_V3_BYTES: usize =
    SESSION_V3_REGION_AT + 1 + SESSION_REGION_BYTES + SESSION_RANDOM_BYTES + SESSION_TAG_BYTES;
/// 48 bytes are exactly 64 base64url characters.
const SESSION_V3_CHARS: usize = SESSION_V3_BYTES / 3 * 4;
/// The longest presented value worth decoding (every format's length is checked exactly).
const SESSION_MAX_CHARS: usize = SESSION_V3_CHARS;

/// A presented guest session id that is authentic (signed by this server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// Within its lifetime: the owner of `g:<id>`.
    Live(SessionId),
    /// Issued longer ago than `retention.guest_cart` (or stamped further in the future than the
    /// token leeway allows, which only a broken clock produces): treated as no session.
    Expired,
}

fn parse_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "HS256" => Some(Algorithm::HS256),
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        "RS256" => Some(Algorithm::RS256),
        _ => None,
    }
}

fn decoding_key(key: &JwtKeyConfig) -> Result<(Algorithm, DecodingKey), String> {
    let algorithm = parse_algorithm(&key.algorithm).ok_or_else(|| {
        format!(
            "algorithm {:?} is not one of HS256, ES256, EdDSA, RS256",
            key.algorithm
        )
    })?;
    if key.kid.is_empty() {
        return Err("kid must not be empty".into());
    }
    if algorithm == Algorithm::HS256 {
        if key.secret.expose().len() < 32 {
            return Err("HS256 secret must be at least 32 bytes".into());
        }
        return Ok((
            algorithm,
            DecodingKey::from_secret(key.secret.expose().as_bytes()),
        ));
    }
    let path = key
        .public_key_file
        .as_ref()
        .ok_or("asymmetric keys need public_key_file")?;
    crate::pki::check_small_file(path)?;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let parsed = match algorithm {
        Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
        _ => DecodingKey::from_rsa_pem(&pem),
    };
    parsed
        .map(|k| (algorithm, k))
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))
}

/// Validates one configured key without keeping it (used by `preflight::check`).
pub fn check_key_config(key: &JwtKeyConfig) -> Result<(), String> {
    decoding_key(key).map(|_| ())
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    /// `"service"` selects the service rate-limit tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tier: Option<String>,
    /// A service role, e.g. the payment service's (`checkout.payment_role`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    /// The shopper's home region (their market), set by the identity service at sign-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    region: Option<String>,
}

struct VerifyingKey {
    key: DecodingKey,
    validation: Validation,
}

/// Most verified tokens remembered; past it the memory is cleared (cheap to rebuild).
const MAX_CACHED_TOKENS: usize = 50_000;

/// Tokens that already passed verification, keyed by SHA-256 of the token (raw tokens are not
/// kept), each valid until its own `exp` (+ leeway). Signature checks and claim parsing cost
/// several µs even for HS256 and 50–350 µs for asymmetric keys; a hit costs one hash.
struct VerifiedTokens {
    entries: RwLock<HashMap<[u8; 32], (Verified, u64)>>,
}

impl VerifiedTokens {
    fn get(&self, digest: &[u8; 32], now: u64, leeway: u64) -> Option<Verified> {
        let entries = self.entries.read().ok()?;
        let (verified, exp) = entries.get(digest)?;
        (now <= exp.saturating_add(leeway)).then(|| verified.clone())
    }

    fn insert(&self, digest: [u8; 32], verified: Verified, exp: u64) {
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= MAX_CACHED_TOKENS {
                entries.clear();
            }
            entries.insert(digest, (verified, exp));
        }
    }
}

/// What a valid token says about its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user: UserId,
    /// The token carries `"tier": "service"`.
    pub service: bool,
    /// The token's `role` claim.
    pub role: Option<String>,
    /// The token's `region` claim: the user's home region. Whether the region exists is the
    /// topology's business (checked where the owner is placed), not this module's.
    pub region: Option<RegionId>,
}

/// Verifies bearer tokens and signs/verifies guest sessions.
pub struct Authenticator {
    keys: HashMap<String, VerifyingKey>,
    leeway: u64,
    verified: VerifiedTokens,
    /// The key used when a token names no `kid`: only when exactly one key is configured.
    only_kid: Option<String>,
    /// Longest `exp - now` accepted (`auth.max_token_lifetime`), in seconds.
    max_lifetime: u64,
    session_mac: Hmac<Sha256>,
    /// How long a guest session id is accepted after its issue time (`retention.guest_cart`,
    /// the same span after which the janitor purges an idle guest cart), in seconds.
    session_lifetime: u64,
    /// The format minted (`auth.session_id_version`): 1 or 2 only during a rolling upgrade.
    mint_version: u8,
    /// The region bound into minted v3 ids: this edge's (see [`Authenticator::minting_for`]).
    home_region: Option<RegionId>,
    /// `auth.require_region_claim`.
    require_region_claim: bool,
}

impl Authenticator {
    /// `session_lifetime` is `retention.guest_cart`: a guest session id expires that long after
    /// it was issued.
    pub fn new(config: &AuthConfig, session_lifetime: Duration) -> Result<Authenticator, String> {
        let mut keys = HashMap::new();
        for key in &config.keys {
            let (algorithm, decoding) = decoding_key(key)?;
            let mut validation = Validation::new(algorithm);
            validation.leeway = config.leeway.0.as_secs();
            let mut required = vec!["exp", "sub"];
            if config.issuer.is_empty() {
                validation.iss = None;
            } else {
                validation.set_issuer(&[&config.issuer]);
                required.push("iss");
            }
            if config.audience.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&[&config.audience]);
                required.push("aud");
            }
            validation.set_required_spec_claims(&required);
            validation.validate_nbf = true;
            keys.insert(
                key.kid.clone(),
                VerifyingKey {
                    key: decoding,
                    validation,
                },
            );
        }
        let only_kid = (config.keys.len() == 1).then(|| config.keys[0].kid.clone());
        let session_mac = Hmac::<Sha256>::new_from_slice(config.session_secret.expose().as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(Authenticator {
            keys,
            leeway: config.leeway.0.as_secs(),
            verified: VerifiedTokens {
                entries: RwLock::new(HashMap::new()),
            },
            only_kid,
            max_lifetime: config.max_token_lifetime.0.as_secs(),
            session_mac,
            session_lifetime: session_lifetime.as_secs(),
            mint_version: config.session_id_version,
            home_region: None,
            require_region_claim: config.require_region_claim,
        })
    }

    /// Whether user tokens without a `region` claim are refused (`auth.require_region_claim`).
    pub fn require_region_claim(&self) -> bool {
        self.require_region_claim
    }

    /// Binds `region` (this edge's) into the guest session ids minted from now on (v3). Without
    /// it, or with `auth.session_id_version` below 3, minted ids name no home region.
    pub fn minting_for(mut self, region: RegionId) -> Authenticator {
        self.home_region = Some(region);
        self
    }

    /// Verifies a bearer token and returns its user.
    pub fn verify_token(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify(token).map(|verified| verified.user)
    }

    /// Verifies a bearer token and returns its user and tier.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        const INVALID: AuthError = AuthError::InvalidToken;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(INVALID);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(verified) = self.verified.get(&digest, now, self.leeway) {
            return Ok(verified);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| INVALID)?;
        // RFC 7515 §4.1.11: a recipient must refuse critical extensions it does not process,
        // and this edge processes none.
        if header.crit.is_some() {
            return Err(INVALID);
        }
        let kid = header
            .kid
            .as_ref()
            .or(self.only_kid.as_ref())
            .ok_or(INVALID)?;
        let key = self.keys.get(kid).ok_or(INVALID)?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|_| INVALID)?;
        let claims = &data.claims;
        // A token valid for longer than any the identity provider issues is a leaked signing
        // key or a forged clock; one issued in the future means the same.
        if claims.exp > now.saturating_add(self.max_lifetime + self.leeway)
            || claims
                .iat
                .is_some_and(|iat| iat > now.saturating_add(self.leeway))
        {
            return Err(INVALID);
        }
        let region = match &data.claims.region {
            Some(region) => Some(RegionId::parse(region).map_err(|_| INVALID)?),
            None => None,
        };
        let verified = Verified {
            user: UserId::parse(&data.claims.sub).map_err(|_| INVALID)?,
            service: data.claims.tier.as_deref() == Some("service"),
            role: data.claims.role,
            region,
        };
        self.verified
            .insert(digest, verified.clone(), data.claims.exp);
        Ok(verified)
    }

    fn session_tag(&self, context: &[u8], signed: &[u8]) -> [u8; SESSION_TAG_BYTES] {
        let mut mac = self.session_mac.clone();
        mac.update(context);
        mac.update(signed);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; SESSION_TAG_BYTES];
        tag.copy_from_slice(&full[..SESSION_TAG_BYTES]);
        tag
    }

    /// Mints a new guest session id, issued now: v3 bound to this edge's region, or the older
    /// format `auth.session_id_version` names.
    pub fn issue_session(&self) -> SessionId {
        let now = jsonwebtoken::get_current_timestamp();
        match (self.mint_version, &self.home_region) {
            (1, _) => self.issue_session_v1(),
            (3.., Some(region)) => self.issue_session_v3(now, region),
            _ => self.issue_session_at(now),
        }
    }

    /// A v3 id issued at `issued_unix` whose home region is `region`.
    pub fn issue_session_v3(&self, issued_unix: u64, region: &RegionId) -> SessionId {
        let mut raw = [0u8; SESSION_V3_BYTES];
        raw[0] = SESSION_V3;
        let time = issued_unix.to_be_bytes();
        raw[1..SESSION_V3_REGION_AT].copy_from_slice(&time[time.len() - SESSION_TIME_BYTES..]);
        let name = region.as_bytes();
        // RegionId guarantees 1..=8 bytes; a longer one cannot be constructed.
        let len = name.len().min(SESSION_REGION_BYTES);
        raw[SESSION_V3_REGION_AT] = len as u8;
        let region_at = SESSION_V3_REGION_AT + 1;
        raw[region_at..region_at + len].copy_from_slice(&name[..len]);
        let random_at = region_at + SESSION_REGION_BYTES;
        let signed = SESSION_V3_BYTES - SESSION_TAG_BYTES;
        let random: [u8; SESSION_RANDOM_BYTES] = rand::random();
        raw[random_at..signed].copy_from_slice(&random);
        let tag = self.session_tag(SESSION_CONTEXT_V3, &raw[..signed]);
        raw[signed..].copy_from_slice(&tag);
        SessionId::verified(URL_SAFE_NO_PAD.encode(raw))
    }

    fn issue_session_v1(&self) -> SessionId {
        let random: [u8; SESSION_RANDOM_BYTES] = rand::random();
        let mut raw = [0u8; SESSION_RANDOM_BYTES + SESSION_TAG_BYTES];
        raw[..SESSION_RANDOM_BYTES].copy_from_slice(&random);
        let tag = self.session_tag(SESSION_CONTEXT_V1, &random);
        raw[SESSION_RANDOM_BYTES..].copy_from_slice(&tag);
        SessionId::verified(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Mints a v2 guest session id (no home region) stamped with `issued_unix` (seconds).
    /// Request handling always uses [`issue_session`](Self::issue_session); tests use this to
    /// hold an old id.
    pub fn issue_session_at(&self, issued_unix: u64) -> SessionId {
        let random: [u8; SESSION_RANDOM_BYTES] = rand::random();
        let mut raw = [0u8; SESSION_V2_BYTES];
        raw[0] = SESSION_V2;
        let time = issued_unix.to_be_bytes();
        raw[1..1 + SESSION_TIME_BYTES].copy_from_slice(&time[time.len() - SESSION_TIME_BYTES..]);
        let signed = SESSION_V2_BYTES - SESSION_TAG_BYTES;
        raw[1 + SESSION_TIME_BYTES..signed].copy_from_slice(&random);
        let tag = self.session_tag(SESSION_CONTEXT_V2, &raw[..signed]);
        raw[signed..].copy_from_slice(&tag);
        SessionId::verified(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Checks a presented guest session id against the clock now.
    pub fn verify_session(&self, presented: &str) -> Result<Session, AuthError> {
        self.verify_session_at(presented, jsonwebtoken::get_current_timestamp())
    }

    /// Checks a presented guest session id: a forged, truncated or unknown-format id is an
    /// error; an authentic one is live or expired at `now_unix`.
    pub fn verify_session_at(&self, presented: &str, now_unix: u64) -> Result<Session, AuthError> {
        const INVALID: AuthError = AuthError::InvalidSession;
        if presented.len() > SESSION_MAX_CHARS {
            return Err(INVALID);
        }
        let raw = URL_SAFE_NO_PAD.decode(presented).map_err(|_| INVALID)?;
        let issue_time = |raw: &[u8]| {
            let mut time = [0u8; 8];
            time[8 - SESSION_TIME_BYTES..].copy_from_slice(&raw[1..1 + SESSION_TIME_BYTES]);
            u64::from_be_bytes(time)
        };
        let (context, issued) = match (presented.len(), raw.first()) {
            (SESSION_V1_CHARS, _) => (SESSION_CONTEXT_V1, None),
            (SESSION_V2_CHARS, Some(&SESSION_V2)) => (SESSION_CONTEXT_V2, Some(issue_time(&raw))),
            // The region must read back as a region id, or the id is not one of ours.
            (SESSION_V3_CHARS, Some(&SESSION_V3)) if v3_region(&raw).is_some() => {
                (SESSION_CONTEXT_V3, Some(issue_time(&raw)))
            }
            _ => return Err(INVALID),
        };
        let signed = raw.len().checked_sub(SESSION_TAG_BYTES).ok_or(INVALID)?;
        let mut mac = self.session_mac.clone();
        mac.update(context);
        mac.update(&raw[..signed]);
        mac.verify_truncated_left(&raw[signed..])
            .map_err(|_| INVALID)?;
        if let Some(issued) = issued {
            let expired = now_unix.saturating_sub(issued) > self.session_lifetime;
            let from_the_future = issued > now_unix.saturating_add(self.leeway);
            if expired || from_the_future {
                return Ok(Session::Expired);
            }
        }
        // Re-encode so the owner key is canonical even if a decoder were lenient.
        Ok(Session::Live(SessionId::verified(
            URL_SAFE_NO_PAD.encode(&raw),
        )))
    }
}

/// The home region a guest session id names (v3), read without checking its signature: for ids
/// already verified where the request entered (an owner key `g:<id>` passed between edges). v1
/// and v2 ids, and anything that is not a session id, name none.
pub fn session_home(session: &str) -> Option<RegionId> {
    if session.len() != SESSION_V3_CHARS {
        return None;
    }
    let raw = URL_SAFE_NO_PAD.decode(session).ok()?;
    (raw.first() == Some(&SESSION_V3))
        .then(|| v3_region(&raw))
        .flatten()
}

/// The region field of a decoded v3 id, if it holds a region id.
fn v3_region(raw: &[u8]) -> Option<RegionId> {
    let len = usize::from(*raw.get(SESSION_V3_REGION_AT)?);
    if !(1..=SESSION_REGION_BYTES).contains(&len) {
        return None;
    }
    let field =
        raw.get(SESSION_V3_REGION_AT + 1..SESSION_V3_REGION_AT + 1 + SESSION_REGION_BYTES)?;
    if field[len..].iter().any(|b| *b != 0) {
        return None;
    }
    RegionId::parse(std::str::from_utf8(&field[..len]).ok()?).ok()
}

/// Signs a user token with the first HS256 key of `config` (the local cluster's tooling and
/// tests; production tokens come from the identity provider).
pub fn issue_token(
    config: &AuthConfig,
    sub: &str,
    ttl: Duration,
    now_unix: u64,
) -> Result<String, String> {
    issue_token_for_tier(config, sub, ttl, now_unix, None)
}

/// As [`issue_token`], with a `tier` claim (`service` for load generators).
pub fn issue_token_for_tier(
    config: &AuthConfig,
    sub: &str,
    ttl: Duration,
    now_unix: u64,
    tier: Option<&str>,
) -> Result<String, String> {
    let extra = ExtraClaims {
        tier,
        ..ExtraClaims::default()
    };
    issue_token_with(config, sub, ttl, now_unix, &extra)
}

/// The optional claims a minted token may carry.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExtraClaims<'a> {
    /// `service` for load generators.
    pub tier: Option<&'a str>,
    /// The payment service's role.
    pub role: Option<&'a str>,
    /// The user's home region.
    pub region: Option<&'a str>,
}

/// As [`issue_token`], with a `role` claim (the payment service's token).
pub fn issue_token_with_role(
    config: &AuthConfig,
    sub: &str,
    ttl: Duration,
    now_unix: u64,
    role: &str,
) -> Result<String, String> {
    let extra = ExtraClaims {
        role: Some(role),
        ..ExtraClaims::default()
    };
    issue_token_with(config, sub, ttl, now_unix, &extra)
}

/// As [`issue_token`], with any of the optional claims.
pub fn issue_token_with(
    config: &AuthConfig,
    sub: &str,
    ttl: Duration,
    now_unix: u64,
    extra: &ExtraClaims<'_>,
) -> Result<String, String> {
    UserId::parse(sub).map_err(|e| e.to_string())?;
    if let Some(region) = extra.region {
        RegionId::parse(region).map_err(|e| e.to_string())?;
    }
    let key = config
        .keys
        .iter()
        .find(|k| k.algorithm == "HS256")
        .ok_or("no HS256 key is configured; tokens come from your identity provider")?;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    let claims = Claims {
        sub: sub.to_string(),
        exp: now_unix + ttl.as_secs(),
        iss: (!config.issuer.is_empty()).then(|| config.issuer.clone()),
        aud: (!config.audience.is_empty()).then(|| config.audience.clone()),
        iat: Some(now_unix),
        tier: extra.tier.map(str::to_string),
        role: extra.role.map(str::to_string),
        region: extra.region.map(str::to_string),
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(key.secret.expose().as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// Domain separation for the read-your-writes cookie's tag.
const MIN_VERSION_CONTEXT: &[u8] = b"cartedge min version v1\0";
/// Bytes of HMAC kept in the `cart_min_version` cookie's tag.
const MIN_VERSION_TAG_BYTES: usize = 12;

impl Authenticator {
    /// The `cart_min_version` cookie value for `owner` at `version`: `<version>.<tag>`, the tag
    /// a keyed hash (the session secret) of the owner and the version, so a cookie left in a
    /// shared browser by another owner is recognised as theirs.
    pub fn min_version_cookie(&self, owner: &str, version: i64) -> String {
        format!(
            "{version}.{}",
            URL_SAFE_NO_PAD.encode(self.min_version_tag(owner, version))
        )
    }

    /// The version a `cart_min_version` cookie value carries, if it was issued for `owner`.
    pub fn verify_min_version_cookie(&self, owner: &str, value: &str) -> Option<i64> {
        let (version, tag) = value.split_once('.')?;
        let version = version.parse::<i64>().ok().filter(|v| *v >= 0)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let verified = tag.len() == MIN_VERSION_TAG_BYTES
            && self
                .min_version_mac(owner, version)
                .verify_truncated_left(&tag)
                .is_ok();
        verified.then_some(version)
    }

    fn min_version_mac(&self, owner: &str, version: i64) -> Hmac<Sha256> {
        let mut mac = self.session_mac.clone();
        mac.update(MIN_VERSION_CONTEXT);
        mac.update(owner.as_bytes());
        mac.update(b"\0");
        mac.update(&version.to_be_bytes());
        mac
    }

    fn min_version_tag(&self, owner: &str, version: i64) -> [u8; MIN_VERSION_TAG_BYTES] {
        let full = self.min_version_mac(owner, version).finalize().into_bytes();
        let mut tag = [0u8; MIN_VERSION_TAG_BYTES];
        tag.copy_from_slice(&full[..MIN_VERSION_TAG_BYTES]);
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const SESSION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
    use crate::config::{Dur, Secret};

    /// Issuer `iss-a`, audience `aud-a`, 1 s leeway, one HS256 key `k1` with `secret`.
    pub(super) fn config_with_secret(secret: &str) -> AuthConfig {
        AuthConfig {
            issuer: "iss-a".into(),
            audience: "aud-a".into(),
            leeway: Dur(Duration::from_secs(1)),
            max_token_lifetime: Dur(Duration::from_secs(24 * 3600)),
            session_secret: Secret::new("s".repeat(32)),
            session_id_version: 2,
            require_region_claim: false,
            keys: vec![JwtKeyConfig {
                kid: "k1".into(),
                algorithm: "HS256".into(),
                secret: Secret::new(secret),
                public_key_file: None,
            }],
        }
    }

    fn config() -> AuthConfig {
        config_with_secret(&"k".repeat(32))
    }

    /// Claims of `sub` valid for a minute for issuer `iss-a` and audience `aud-a`, nothing else.
    fn claims_for(sub: &str) -> Claims {
        Claims {
            sub: sub.into(),
            exp: now() + 60,
            iss: Some("iss-a".into()),
            aud: Some("aud-a".into()),
            iat: None,
            tier: None,
            role: None,
            region: None,
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn issued_tokens_verify_and_name_their_user() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let token = issue_token(&config(), "alice", Duration::from_secs(60), now()).unwrap();
        assert_eq!(auth.verify_token(&token).unwrap().as_str(), "alice");
    }

    #[test]
    fn expired_wrong_audience_and_garbage_tokens_are_refused() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let expired = issue_token(&config(), "alice", Duration::from_secs(0), now() - 120).unwrap();
        assert!(auth.verify_token(&expired).is_err());
        let mut other = config();
        other.audience = "aud-b".into();
        let foreign = issue_token(&other, "alice", Duration::from_secs(60), now()).unwrap();
        assert!(auth.verify_token(&foreign).is_err());
        assert!(auth.verify_token("not.a.token").is_err());
        assert!(auth.verify_token(&"a".repeat(MAX_TOKEN_BYTES + 1)).is_err());
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        // Valid for one more second, counting the leeway: verified now, remembered, and
        // refused from memory once its exp + leeway has passed.
        let token = issue_token(&config(), "alice", Duration::from_secs(0), now()).unwrap();
        assert!(auth.verify_token(&token).is_ok());
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        assert!(auth.verified.get(&digest, now(), 1).is_some());
        let service = issue_token_for_tier(
            &config(),
            "svc",
            Duration::from_secs(60),
            now(),
            Some("service"),
        )
        .unwrap();
        assert!(auth.verify(&service).unwrap().service);
        assert!(!auth.verify(&token).unwrap().service);
        assert!(auth.verified.get(&digest, now() + 2, 1).is_none());
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let mut forged = config();
        forged.keys[0].secret = Secret::new("x".repeat(32));
        let token = issue_token(&forged, "alice", Duration::from_secs(60), now()).unwrap();
        assert!(auth.verify_token(&token).is_err());
    }

    #[test]
    fn eddsa_keys_are_selected_by_kid_and_their_algorithm_is_pinned() {
        use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        // SubjectPublicKeyInfo for Ed25519: a fixed 12-byte prefix and the 32-byte key.
        let mut spki = hex::decode("302a300506032b6570032100").unwrap();
        spki.extend_from_slice(pair.public_key().as_ref());
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&spki)
        );
        let dir = std::env::temp_dir().join(format!("cartedge-eddsa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ed.pem");
        std::fs::write(&path, pem).unwrap();
        let mut config = config();
        config.keys.push(JwtKeyConfig {
            kid: "ed-1".into(),
            algorithm: "EdDSA".into(),
            secret: Secret::default(),
            public_key_file: Some(path),
        });
        let auth = Authenticator::new(&config, SESSION_LIFETIME).unwrap();
        let claims = claims_for("erin");
        let signing = EncodingKey::from_ed_der(pkcs8.as_ref());
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("ed-1".into());
        let token = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        assert_eq!(auth.verify_token(&token).unwrap().as_str(), "erin");
        // Two keys configured: a token naming no kid is refused.
        header.kid = None;
        let no_kid = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        assert!(auth.verify_token(&no_kid).is_err());
        // The HS256 key's kid with an EdDSA signature: the pinned algorithm refuses it.
        header.kid = Some("k1".into());
        let wrong_alg = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        assert!(auth.verify_token(&wrong_alg).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sessions_verify_only_when_minted_with_our_secret() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let session = auth.issue_session();
        assert_eq!(session.as_str().len(), SESSION_V2_CHARS);
        assert_eq!(
            auth.verify_session(session.as_str()).unwrap(),
            Session::Live(session.clone())
        );
        let mut other_config = config();
        other_config.session_secret = Secret::new("t".repeat(32));
        let other = Authenticator::new(&other_config, SESSION_LIFETIME).unwrap();
        assert!(other.verify_session(session.as_str()).is_err());
        let mut tampered = session.as_str().to_string();
        let last = if tampered.ends_with('A') { "B" } else { "A" };
        tampered.replace_range(51..52, last);
        assert!(auth.verify_session(&tampered).is_err());
        assert!(auth.verify_session("short").is_err());
        assert!(auth
            .verify_session(&format!("{}A", session.as_str()))
            .is_err());
        assert_ne!(auth.issue_session(), auth.issue_session());
    }

    /// Signs `raw`'s leading bytes into a v2-shaped id whose version byte is `version`.
    fn signed_with(auth: &Authenticator, context: &[u8], mut raw: Vec<u8>) -> String {
        let signed = raw.len() - SESSION_TAG_BYTES;
        let tag = auth.session_tag(context, &raw[..signed]);
        raw[signed..].copy_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    #[test]
    fn a_session_expires_its_lifetime_after_its_issue_time() {
        let auth = Authenticator::new(&config(), Duration::from_secs(3600)).unwrap();
        let issued = 1_800_000_000;
        let session = auth.issue_session_at(issued);
        let live = Session::Live(session.clone());
        assert_eq!(
            auth.verify_session_at(session.as_str(), issued),
            Ok(live.clone())
        );
        assert_eq!(
            auth.verify_session_at(session.as_str(), issued + 3600),
            Ok(live.clone())
        );
        assert_eq!(
            auth.verify_session_at(session.as_str(), issued + 3601),
            Ok(Session::Expired)
        );
        // Another edge's clock a little behind is fine; an id from far in the future is not.
        assert_eq!(
            auth.verify_session_at(session.as_str(), issued - 1),
            Ok(live)
        );
        assert_eq!(
            auth.verify_session_at(session.as_str(), issued - 60),
            Ok(Session::Expired)
        );
    }

    #[test]
    fn the_issue_time_is_signed_and_formats_do_not_mix() {
        let auth = Authenticator::new(&config(), Duration::from_secs(3600)).unwrap();
        let issued = 1_800_000_000;
        let session = auth.issue_session_at(issued);
        let raw = URL_SAFE_NO_PAD.decode(session.as_str()).unwrap();
        assert_eq!(raw[0], SESSION_V2);
        assert_eq!(&raw[1..7], &issued.to_be_bytes()[2..]);
        // Moving the issue time forward without the key breaks the tag.
        let mut younger = raw.clone();
        younger[6] ^= 0x01;
        assert_eq!(
            auth.verify_session_at(&URL_SAFE_NO_PAD.encode(&younger), issued + 7200),
            Err(AuthError::InvalidSession)
        );
        // The v1 context never signs a v2 id, and an unknown version byte is refused even
        // when its tag is right.
        let v1_signed = signed_with(&auth, SESSION_CONTEXT_V1, raw.clone());
        assert!(auth.verify_session_at(&v1_signed, issued).is_err());
        let mut v3 = raw.clone();
        v3[0] = 3;
        let v3 = signed_with(&auth, SESSION_CONTEXT_V2, v3);
        assert!(auth.verify_session_at(&v3, issued).is_err());
    }

    #[test]
    fn v3_sessions_bind_the_minting_region_under_the_signature() {
        let th = RegionId::parse("th").unwrap();
        let mut minting = config();
        minting.session_id_version = 3;
        let auth = Authenticator::new(&minting, Duration::from_secs(3600))
            .unwrap()
            .minting_for(th.clone());
        let session = auth.issue_session();
        assert_eq!(session.as_str().len(), SESSION_V3_CHARS);
        assert_eq!(session_home(session.as_str()), Some(th.clone()));
        assert_eq!(
            auth.verify_session(session.as_str()),
            Ok(Session::Live(session.clone()))
        );
        // Another edge with the same secret reads it (any region verifies any region's ids).
        let elsewhere = Authenticator::new(&config(), Duration::from_secs(3600)).unwrap();
        assert_eq!(
            elsewhere.verify_session(session.as_str()),
            Ok(Session::Live(session.clone()))
        );
        // Moving the cart to another region by editing the id breaks the tag.
        let mut raw = URL_SAFE_NO_PAD.decode(session.as_str()).unwrap();
        raw[SESSION_V3_REGION_AT + 1..SESSION_V3_REGION_AT + 3].copy_from_slice(b"sg");
        let moved = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(session_home(&moved).as_deref(), Some("sg"));
        assert_eq!(auth.verify_session(&moved), Err(AuthError::InvalidSession));
        // A correctly signed v3 id whose region field is not a region id is not one of ours.
        let mut bad = URL_SAFE_NO_PAD.decode(session.as_str()).unwrap();
        bad[SESSION_V3_REGION_AT] = 9;
        let bad = signed_with(&auth, SESSION_CONTEXT_V3, bad);
        assert_eq!(session_home(&bad), None);
        assert!(auth.verify_session(&bad).is_err());
        // The issue time still bounds its life.
        let issued = 1_800_000_000;
        let old = auth.issue_session_v3(issued, &th);
        assert_eq!(
            auth.verify_session_at(old.as_str(), issued + 3601),
            Ok(Session::Expired)
        );
        // Older formats, and edges configured for them, name no home region.
        let v2 = auth.issue_session_at(issued);
        assert_eq!(session_home(v2.as_str()), None);
        let mut rolling = minting.clone();
        rolling.session_id_version = 2;
        let rolling = Authenticator::new(&rolling, Duration::from_secs(3600))
            .unwrap()
            .minting_for(th);
        assert_eq!(rolling.issue_session().as_str().len(), SESSION_V2_CHARS);
    }

    #[test]
    fn the_region_claim_is_read_and_must_be_a_region_id() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let mint = |region: Option<&str>| {
            let extra = ExtraClaims {
                region,
                ..ExtraClaims::default()
            };
            issue_token_with(&config(), "alice", Duration::from_secs(60), now(), &extra)
        };
        let homed = auth.verify(&mint(Some("id")).unwrap()).unwrap();
        assert_eq!(homed.region.as_deref(), Some("id"));
        assert_eq!(auth.verify(&mint(None).unwrap()).unwrap().region, None);
        // The tooling refuses to mint a malformed claim; a token carrying one is refused.
        assert!(mint(Some("Not A Region")).is_err());
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let claims = Claims {
            region: Some("SG!".into()),
            ..claims_for("alice")
        };
        let key = EncodingKey::from_secret("k".repeat(32).as_bytes());
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert_eq!(auth.verify(&token), Err(AuthError::InvalidToken));
    }

    #[test]
    fn v1_sessions_still_verify_and_never_expire_by_age() {
        let auth = Authenticator::new(&config(), Duration::from_secs(1)).unwrap();
        let v1 = signed_with(&auth, SESSION_CONTEXT_V1, vec![7u8; 32]);
        assert_eq!(v1.len(), SESSION_V1_CHARS);
        assert_eq!(
            auth.verify_session_at(&v1, u64::MAX),
            Ok(Session::Live(SessionId::verified(v1.clone())))
        );
        // During a rolling upgrade the edge mints v1 ids, which every release reads.
        let mut rolling = config();
        rolling.session_id_version = 1;
        let rolling = Authenticator::new(&rolling, Duration::from_secs(1)).unwrap();
        let minted = rolling.issue_session();
        assert_eq!(minted.as_str().len(), SESSION_V1_CHARS);
        assert_eq!(
            auth.verify_session_at(minted.as_str(), u64::MAX),
            Ok(Session::Live(minted.clone()))
        );
        // A v1 id signed as v2 is nothing.
        let forged = signed_with(&auth, SESSION_CONTEXT_V2, vec![7u8; 32]);
        assert!(auth.verify_session(&forged).is_err());
    }
}

/// RFC 8725 negative suite: every forged, malformed or misdirected token is refused.
#[cfg(test)]
mod negative {
    use super::tests::SESSION_LIFETIME;
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use serde_json::json;

    const SECRET: &str = "negative-suite-secret-0123456789abcdef";

    fn config() -> AuthConfig {
        super::tests::config_with_secret(SECRET)
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    /// Signs arbitrary header and claims JSON with HS256 and `key` (bypassing the library's
    /// typed encoder so malformed claims can be built).
    fn sign(header: serde_json::Value, claims: serde_json::Value, key: &[u8]) -> String {
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            B64.encode(mac.finalize().into_bytes())
        )
    }

    fn good_claims() -> serde_json::Value {
        json!({"sub": "alice", "exp": now() + 300, "iss": "iss-a", "aud": "aud-a"})
    }

    fn hs256() -> serde_json::Value {
        json!({"alg": "HS256", "typ": "JWT", "kid": "k1"})
    }

    #[test]
    fn the_reference_token_is_accepted() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let token = sign(hs256(), good_claims(), SECRET.as_bytes());
        assert_eq!(auth.verify_token(&token).unwrap().as_str(), "alice");
    }

    #[test]
    fn every_forged_or_malformed_token_is_refused() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let with = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut claims = good_claims();
            change(&mut claims);
            sign(hs256(), claims, SECRET.as_bytes())
        };
        let valid = sign(hs256(), good_claims(), SECRET.as_bytes());
        let unsigned = format!(
            "{}.{}.",
            B64.encode(json!({"alg": "none", "kid": "k1"}).to_string()),
            B64.encode(good_claims().to_string())
        );
        let cases: Vec<(&str, String)> = vec![
            ("alg none", unsigned),
            (
                "alg none, HS256 signature",
                sign(
                    json!({"alg": "none", "kid": "k1"}),
                    good_claims(),
                    SECRET.as_bytes(),
                ),
            ),
            (
                "RS256 header on an HMAC signature",
                sign(
                    json!({"alg": "RS256", "kid": "k1"}),
                    good_claims(),
                    SECRET.as_bytes(),
                ),
            ),
            (
                "ES256 header",
                sign(
                    json!({"alg": "ES256", "kid": "k1"}),
                    good_claims(),
                    SECRET.as_bytes(),
                ),
            ),
            (
                "signed with another key",
                sign(
                    hs256(),
                    good_claims(),
                    b"another-secret-entirely-0123456789",
                ),
            ),
            (
                "signed with a public key as HMAC secret",
                sign(
                    hs256(),
                    good_claims(),
                    b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
                ),
            ),
            ("wrong aud", with(&|c| c["aud"] = json!("aud-b"))),
            (
                "missing aud",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
            ),
            ("wrong iss", with(&|c| c["iss"] = json!("iss-b"))),
            (
                "missing iss",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("iss");
                }),
            ),
            (
                "missing exp",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
            (
                "expired beyond leeway",
                with(&|c| c["exp"] = json!(now() - 30)),
            ),
            (
                "nbf in the future",
                with(&|c| c["nbf"] = json!(now() + 300)),
            ),
            (
                "exp as a string",
                with(&|c| c["exp"] = json!((now() + 300).to_string())),
            ),
            (
                "nbf as a string",
                with(&|c| c["nbf"] = json!(now().to_string())),
            ),
            (
                "sub not a user id",
                with(&|c| c["sub"] = json!("alice smith")),
            ),
            (
                "missing sub",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("sub");
                }),
            ),
            (
                "unknown kid",
                sign(
                    json!({"alg": "HS256", "kid": "k9"}),
                    good_claims(),
                    SECRET.as_bytes(),
                ),
            ),
            ("truncated", valid[..valid.len() - 5].to_string()),
            ("padded", format!("{valid}==")),
            ("extra segment", format!("{valid}.x")),
            ("garbage", "eyJhbGciOi.garbage.token".to_string()),
            ("empty", String::new()),
            (
                "oversized",
                format!("{valid}{}", "A".repeat(MAX_TOKEN_BYTES)),
            ),
        ];
        for (name, token) in cases {
            assert!(auth.verify_token(&token).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn critical_extensions_eternal_tokens_and_tokens_from_the_future_are_refused() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let with = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut claims = good_claims();
            change(&mut claims);
            sign(hs256(), claims, SECRET.as_bytes())
        };
        let day = 24 * 3600;
        // Controls: the same shapes within the rules are accepted, so each refusal below is
        // for the rule its name gives.
        let accepted = [
            (
                "exp a day ahead",
                with(&|c| c["exp"] = json!(now() + day - 60)),
            ),
            ("iat now", with(&|c| c["iat"] = json!(now()))),
            (
                "iat within the leeway",
                with(&|c| c["iat"] = json!(now() + 1)),
            ),
        ];
        for (name, token) in accepted {
            assert!(auth.verify_token(&token).is_ok(), "{name} was refused");
        }
        let mut crit_header = hs256();
        crit_header["crit"] = json!(["exp-ext"]);
        crit_header["exp-ext"] = json!(1);
        let mut empty_crit = hs256();
        empty_crit["crit"] = json!([]);
        let refused = [
            (
                "crit names an extension",
                sign(crit_header, good_claims(), SECRET.as_bytes()),
            ),
            (
                "crit empty",
                sign(empty_crit, good_claims(), SECRET.as_bytes()),
            ),
            ("exp 2^63", with(&|c| c["exp"] = json!(1u64 << 63))),
            (
                "exp past the longest lifetime",
                with(&|c| c["exp"] = json!(now() + day + 60)),
            ),
            (
                "iat in the future",
                with(&|c| c["iat"] = json!(now() + 300)),
            ),
        ];
        for (name, token) in refused {
            assert!(auth.verify_token(&token).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn a_valid_token_for_another_audience_is_refused_and_leeway_is_honoured() {
        let auth = Authenticator::new(&config(), SESSION_LIFETIME).unwrap();
        let mut elsewhere = config();
        elsewhere.audience = "another-service".into();
        let foreign =
            issue_token(&elsewhere, "alice", Duration::from_secs(300), now() as u64).unwrap();
        assert!(auth.verify_token(&foreign).is_err());
        // Expired within the 1 s leeway: still accepted.
        let mut claims = good_claims();
        claims["exp"] = json!(now());
        assert!(auth
            .verify_token(&sign(hs256(), claims, SECRET.as_bytes()))
            .is_ok());
    }
}
