//! Money in integer minor units with its ISO 4217 currency. No floats anywhere.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An ISO 4217 alphabetic code: three ASCII capital letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(value: &str) -> Option<Currency> {
        let bytes = value.as_bytes();
        if bytes.len() == 3 && bytes.iter().all(|b| b.is_ascii_uppercase()) {
            Some(Currency([bytes[0], bytes[1], bytes[2]]))
        } else {
            None
        }
    }
    pub fn as_str(&self) -> &str {
        // Only ASCII capitals are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Currency::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not an ISO 4217 code")))
    }
}

/// An amount in minor units (cents, sen, satang; whole dong for VND).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Money {
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Money {
        Money {
            amount_minor,
            currency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_are_three_capital_letters() {
        assert_eq!(Currency::parse("SGD").unwrap().as_str(), "SGD");
        for bad in ["sgd", "SG", "SGDX", "S1D", ""] {
            assert!(Currency::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn money_serializes_as_minor_units_and_code() {
        let money = Money::new(1999, Currency::parse("THB").unwrap());
        let json = serde_json::to_string(&money).unwrap();
        assert_eq!(json, r#"{"amount_minor":1999,"currency":"THB"}"#);
        let back: Money = serde_json::from_str(&json).unwrap();
        assert_eq!(back, money);
        assert!(serde_json::from_str::<Money>(r#"{"amount_minor":1.5,"currency":"THB"}"#).is_err());
    }
}
