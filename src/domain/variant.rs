//! Validation of a line's free-form `variant` (size, colour, …): a small JSON object.

use serde_json::Value;

/// Largest serialized variant.
pub const MAX_VARIANT_BYTES: usize = 1024;
/// Deepest nesting allowed; the object itself is depth 1.
pub const MAX_VARIANT_DEPTH: usize = 4;

/// Accepts `null` (no variant) or an object within the size and depth limits whose keys and
/// strings hold no NUL character (PostgreSQL's `jsonb`, where lines are stored, cannot).
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

fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
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
}
