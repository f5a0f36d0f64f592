//! A line's free-form `variant` (size, colour, …): its validation (a small JSON object) and the
//! line identity it gives a cart line ([`LineId`]). Pure: no I/O; the hashing is pinned to
//! explicit bytes so a line id never drifts between builds, edges or the V4 backfill.
//!
//! A line is its item and its variant. Its id is the item id when the variant is null, else the
//! item id, `~`, and the first 8 bytes of SHA-256 over the variant's canonical JSON as 16
//! lowercase hex digits. Canonical JSON is defined here, not by PostgreSQL: object keys sorted by
//! their UTF-8 bytes, no whitespace, strings escaped as JSON requires and nothing more (`"`, `\`,
//! control characters as `\b \f \n \r \t` or `\u00xx`), numbers as `serde_json` prints them.
//! Item ids cannot contain `~` (see [`ItemId`]), so a line id splits unambiguously.

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::ids::{IdError, ItemId};

/// Largest serialized variant.
pub const MAX_VARIANT_BYTES: usize = 1024;
/// Deepest nesting allowed; the object itself is depth 1.
pub const MAX_VARIANT_DEPTH: usize = 4;

/// Smallest and largest magnitude of a variant number that is not an integer.
const DECIMAL_RANGE: std::ops::Range<f64> = 1e-15..1e15;

/// Accepts `null` (no variant) or an object within the size and depth limits whose keys and
/// strings hold no NUL character (PostgreSQL's `jsonb`, where lines are stored, cannot) and
/// whose numbers read back as they were written: integers within 64 bits, or decimals of
/// magnitude within [`DECIMAL_RANGE`]. `jsonb` keeps a number exactly and prints it without an
/// exponent, so `1e308` comes back as 309 digits that do not parse as the float they were;
/// refused here, such a line would be unreadable after its write.
pub fn validate(value: &Value) -> Result<Option<&Value>, &'static str> {
    match value {
        Value::Null => Ok(None),
        Value::Object(_) => {
            if depth(value) > MAX_VARIANT_DEPTH {
                return Err("variant nests deeper than 4 levels");
            }
            if has_nul(value) {
                return Err("variant must not contain NUL characters");
            }
            if !numbers_round_trip(value) {
                return Err(
                    "variant numbers must be integers within 64 bits, or decimals between 1e-15 and 1e15 in size",
                );
            }
            let size = serde_json::to_vec(value)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if size > MAX_VARIANT_BYTES {
                return Err("variant is larger than 1 KiB");
            }
            Ok(Some(value))
        }
        _ => Err("variant must be a JSON object"),
    }
}

/// Whether any key or string in `value` contains U+0000.
pub fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || has_nul(value)),
        _ => false,
    }
}

/// Whether every number in `value` is an integer within 64 bits, zero, or a decimal of
/// magnitude within [`DECIMAL_RANGE`].
fn numbers_round_trip(value: &Value) -> bool {
    match value {
        Value::Number(number) => {
            number.is_i64()
                || number.is_u64()
                || number
                    .as_f64()
                    .is_some_and(|f| f == 0.0 || DECIMAL_RANGE.contains(&f.abs()))
        }
        Value::Array(items) => items.iter().all(numbers_round_trip),
        Value::Object(map) => map.values().all(numbers_round_trip),
        _ => true,
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Separates the item id from the variant hash in a line id; never part of an item id.
pub const LINE_SEPARATOR: char = '~';
/// Hex digits of the variant hash in a line id (8 bytes of SHA-256).
const HASH_HEX_DIGITS: usize = 16;

/// The identity of a cart line: its item and, when it has one, its variant's hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LineId {
    text: String,
    /// Length of the item id at the start of `text`.
    item_len: usize,
}

impl LineId {
    /// The line an add of `item` with `variant` lands on (a null variant is no variant).
    pub fn of(item: &ItemId, variant: Option<&Value>) -> LineId {
        let mut text = item.as_str().to_string();
        if let Some(variant) = variant.filter(|v| !v.is_null()) {
            text.push(LINE_SEPARATOR);
            text.push_str(&variant_hash(variant));
        }
        LineId {
            item_len: item.as_str().len(),
            text,
        }
    }

    /// Reads a line id from a client (a path segment) or from storage: an item id alone, or an
    /// item id, `~` and exactly 16 lowercase hex digits.
    pub fn parse(value: &str) -> Result<LineId, IdError> {
        const REFUSAL: IdError = IdError(
            "line id must be an item id ([A-Za-z0-9._:-]{1,64}), optionally followed by ~ and 16 lowercase hex digits",
        );
        let (item, hash) = match value.split_once(LINE_SEPARATOR) {
            Some((item, hash)) => (item, Some(hash)),
            None => (value, None),
        };
        let item = ItemId::parse(item).map_err(|_| REFUSAL)?;
        if let Some(hash) = hash {
            if hash.len() != HASH_HEX_DIGITS
                || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(REFUSAL);
            }
        }
        Ok(LineId {
            item_len: item.as_str().len(),
            text: value.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The item the line holds.
    pub fn item_id(&self) -> &str {
        &self.text[..self.item_len]
    }

    /// Whether the line carries a variant.
    pub fn has_variant(&self) -> bool {
        self.text.len() > self.item_len
    }
}

impl fmt::Display for LineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The line id of a line as stored: the stored id when the row has one, else derived from its
/// item and variant (rows of a database not yet migrated to V4, cache entries and merge answers
/// written by an older edge).
pub fn stored_line_id(stored: Option<&str>, item_id: &str, variant: Option<&Value>) -> String {
    match stored {
        Some(line_id) => line_id.to_string(),
        None => match variant.filter(|v| !v.is_null()) {
            Some(variant) => format!("{item_id}{LINE_SEPARATOR}{}", variant_hash(variant)),
            None => item_id.to_string(),
        },
    }
}

/// The first 8 bytes of SHA-256 over the canonical JSON of `variant`, as 16 lowercase hex
/// digits.
pub fn variant_hash(variant: &Value) -> String {
    let digest = Sha256::digest(canonical_json(variant).as_bytes());
    hex::encode(&digest[..HASH_HEX_DIGITS / 2])
}

/// The canonical JSON text of `value` (see the module documentation).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // `str` orders by UTF-8 bytes, whatever order the map keeps.
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (index, (key, value)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(text) => write_string(text, out),
        Value::Number(number) => out.push_str(&number.to_string()),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Null => out.push_str("null"),
    }
}

/// A JSON string with only the escapes JSON requires (the same as PostgreSQL's jsonb output).
fn write_string(text: &str, out: &mut String) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_within_limits_pass() {
        assert!(validate(&json!({"size": "M", "fit": {"cut": "slim"}}))
            .unwrap()
            .is_some());
        assert!(validate(&Value::Null).unwrap().is_none());
    }

    #[test]
    fn non_objects_deep_or_large_variants_fail() {
        assert!(validate(&json!("M")).is_err());
        assert!(validate(&json!([1])).is_err());
        assert!(validate(&json!({"a": {"b": {"c": {"d": {}}}}})).is_err());
        assert!(validate(&json!({"a": {"b": {"c": {"d": 1}}}})).is_ok());
        assert!(validate(&json!({"a": "x".repeat(1100)})).is_err());
    }

    #[test]
    fn nul_characters_anywhere_fail() {
        assert!(validate(&json!({"size": "M\u{0}"})).is_err());
        assert!(validate(&json!({"si\u{0}ze": "M"})).is_err());
        assert!(validate(&json!({"a": [{"b": ["\u{0}"]}]})).is_err());
        assert!(validate(&json!({"a": "\u{1}"})).is_ok());
    }

    /// Golden vectors: the canonical text and the line id of fixed variants. A change here moves
    /// every stored line id; it needs a migration, not an edit of these strings.
    #[test]
    fn line_ids_match_the_golden_vectors() {
        let item = ItemId::parse("sku-00005").unwrap();
        let cases = [
            (
                json!({"color": "red"}),
                r#"{"color":"red"}"#,
                "241889ca0604e333",
            ),
            (
                json!({"color": "blue"}),
                r#"{"color":"blue"}"#,
                "f234cb93c08ad64e",
            ),
            (
                json!({"size": "M", "fit": {"cut": "slim"}}),
                r#"{"fit":{"cut":"slim"},"size":"M"}"#,
                "865042abcea719bb",
            ),
            (
                json!({"é": "line\n\u{1}\"", "a": [true, null, -2.5], "Z": 1}),
                "{\"Z\":1,\"a\":[true,null,-2.5],\"\u{e9}\":\"line\\n\\u0001\\\"\"}",
                "89e4eb04c0ecd977",
            ),
            (json!({}), "{}", "44136fa355b3678a"),
        ];
        for (variant, canonical, hash) in cases {
            assert_eq!(canonical_json(&variant), canonical);
            assert_eq!(variant_hash(&variant), hash);
            let line = LineId::of(&item, Some(&variant));
            assert_eq!(line.as_str(), format!("sku-00005~{hash}"));
            assert_eq!(line.item_id(), "sku-00005");
            assert!(line.has_variant());
        }
    }

    #[test]
    fn key_order_and_whitespace_do_not_change_a_line_id() {
        let item = ItemId::parse("sku-1").unwrap();
        let a: Value = serde_json::from_str(r#"{ "size" : "M", "color": "red" }"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"color":"red","size":"M"}"#).unwrap();
        assert_eq!(LineId::of(&item, Some(&a)), LineId::of(&item, Some(&b)));
        let c: Value = serde_json::from_str(r#"{"color":"blue","size":"M"}"#).unwrap();
        assert_ne!(LineId::of(&item, Some(&a)), LineId::of(&item, Some(&c)));
    }

    #[test]
    fn a_line_without_variant_is_its_item_id() {
        let item = ItemId::parse("sku-1").unwrap();
        assert_eq!(LineId::of(&item, None).as_str(), "sku-1");
        assert_eq!(LineId::of(&item, Some(&Value::Null)).as_str(), "sku-1");
        assert!(!LineId::of(&item, None).has_variant());
        assert_eq!(stored_line_id(None, "sku-1", None), "sku-1");
        assert_eq!(
            stored_line_id(None, "sku-00005", Some(&json!({"color": "red"}))),
            "sku-00005~241889ca0604e333"
        );
        assert_eq!(stored_line_id(Some("x~1"), "x", None), "x~1");
    }

    #[test]
    fn line_ids_parse_unambiguously() {
        let plain = LineId::parse("sku:1.a_b-c").unwrap();
        assert_eq!(plain.item_id(), "sku:1.a_b-c");
        assert!(!plain.has_variant());
        let variant = LineId::parse("sku-1~0123456789abcdef").unwrap();
        assert_eq!(variant.item_id(), "sku-1");
        assert!(variant.has_variant());
        for bad in [
            "",
            "~0123456789abcdef",
            "sku-1~",
            "sku-1~0123456789ABCDEF",
            "sku-1~0123456789abcde",
            "sku-1~0123456789abcdef0",
            "sku-1~0123456789abcdeg",
            "sku-1~0123456789abcdef~0123456789abcdef",
            "a~b~0123456789abcdef",
            "a/b",
        ] {
            assert!(LineId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
