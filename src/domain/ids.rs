//! Validated identifiers: user ids, item ids, guest session ids and cart owner keys.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(pub &'static str);

fn check(value: &str, max: usize, allowed: impl Fn(u8) -> bool) -> bool {
    !value.is_empty() && value.len() <= max && value.bytes().all(allowed)
}

/// A user id: a token's `sub`, `[A-Za-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    pub fn parse(value: &str) -> Result<UserId, IdError> {
        if check(value, 64, |b| {
            b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
        }) {
            Ok(UserId(value.to_string()))
        } else {
            Err(IdError("user id must match [A-Za-z0-9_-]{1,64}"))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A catalog item id, `[A-Za-z0-9._:-]{1,64}`. It never contains `~`, which line ids
/// (`variant::LineId`) use to append a variant's hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(String);

impl ItemId {
    pub fn parse(value: &str) -> Result<ItemId, IdError> {
        if check(value, 64, |b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
        }) {
            Ok(ItemId(value.to_string()))
        } else {
            Err(IdError("item_id must match [A-Za-z0-9._:-]{1,64}"))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A guest session id whose signature has already been checked (see `auth`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// Wraps an id that the caller has verified. Only the auth module should call this.
    pub fn verified(value: String) -> SessionId {
        SessionId(value)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whose cart: a user or a guest session. Its key (`u:<sub>` / `g:<session>`) is the cart's
/// primary key everywhere (database, cache, ring).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    User(UserId),
    Guest(SessionId),
}

impl Owner {
    pub fn key(&self) -> OwnerKey {
        match self {
            Owner::User(user) => OwnerKey(format!("u:{}", user.as_str())),
            Owner::Guest(session) => OwnerKey(format!("g:{}", session.as_str())),
        }
    }
}

/// The stable string key of a cart owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerKey(String);

impl OwnerKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Re-reads a key that was produced by [`Owner::key`] (for example from the database).
    pub fn from_stored(value: String) -> OwnerKey {
        OwnerKey(value)
    }
}

impl fmt::Display for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of `tag` and `parts`, each part preceded by a NUL byte: the one derivation behind
/// advisory-lock keys and order ids, so their inputs can never run together.
pub fn tagged_digest(tag: &str, parts: &[&str]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(tag.as_bytes());
    for part in parts {
        hasher.update([0]);
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_the_token_sub_grammar() {
        assert!(UserId::parse("alice_01-x").is_ok());
        assert!(UserId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "ü", "a.b", &"a".repeat(65)] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn item_ids_allow_dots_colons_and_dashes_only() {
        assert!(ItemId::parse("sku-00001").is_ok());
        assert!(ItemId::parse("a.b:c_d-e").is_ok());
        // `~` separates a line id's item from its variant hash (`variant::LineId`).
        for bad in ["", "a/b", "a b", "<x>", "a~b", &"x".repeat(65)] {
            assert!(ItemId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn owner_keys_are_prefixed_by_kind() {
        let user = Owner::User(UserId::parse("bob").unwrap());
        assert_eq!(user.key().as_str(), "u:bob");
        let guest = Owner::Guest(SessionId::verified("abc".into()));
        assert_eq!(guest.key().as_str(), "g:abc");
    }

    #[test]
    fn tagged_digests_separate_their_parts_with_nul() {
        use sha2::{Digest, Sha256};
        let expected: [u8; 32] = Sha256::digest(b"tag\0u:a\0key").into();
        assert_eq!(tagged_digest("tag", &["u:a", "key"]), expected);
        assert_ne!(tagged_digest("tag", &["u:ak", "ey"]), expected);
    }
}

/// Declares a validated string id for the topology (regions, shards): parsed once where it
/// enters (configuration, the ring file, a request header), then carried as its own type so a
/// shard id is never passed where a region id belongs. It reads as a `&str` (`Deref`, `Borrow`)
/// for lookups and formatting, but only `parse` makes one.
macro_rules! topology_id {
    ($(#[$doc:meta])* $name:ident, $valid:expr, $rule:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<$name, IdError> {
                let valid: fn(&str) -> bool = $valid;
                if valid(value) {
                    Ok($name(value.to_string()))
                } else {
                    Err(IdError($rule))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<$name, IdError> {
                $name::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for &$name {
            fn eq(&self, other: &$name) -> bool {
                self.0 == other.0
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

topology_id!(
    /// A region id (`sg`, `id`, …): 1-8 lowercase ASCII letters. It becomes a DNS label
    /// (`<id>.edge.…`), a header value (`Cart-Region`) and a file name (`regions/<id>.toml`), so
    /// nothing else is allowed.
    RegionId,
    |id| (1..=8).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase()),
    "region id must be 1-8 lowercase ASCII letters"
);

topology_id!(
    /// A shard id (`sg-1`): 1-32 of `[A-Za-z0-9-]`. It names a database in configuration and
    /// is the prefix of order ids, hashed by the ring as its bytes.
    ShardId,
    |id| {
        (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    },
    "shard id must be 1-32 of [A-Za-z0-9-]"
);

#[cfg(test)]
mod topology_id_tests {
    use super::*;

    #[test]
    fn region_and_shard_ids_are_checked_where_they_enter() {
        assert!(RegionId::parse("sg").is_ok());
        for bad in ["", "SG", "s-g", "toolongid", "sg1"] {
            assert!(RegionId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ShardId::parse("sg-1").is_ok());
        for bad in ["", "sg_1", "sg 1", &"x".repeat(33)] {
            assert!(ShardId::parse(bad).is_err(), "{bad:?}");
        }
        let region: RegionId = serde_json::from_str("\"th\"").unwrap();
        assert_eq!(region, "th");
        assert!(serde_json::from_str::<RegionId>("\"TH\"").is_err());
        assert_eq!(
            serde_json::to_string(&ShardId::parse("th-1").unwrap()).unwrap(),
            "\"th-1\""
        );
    }
}
