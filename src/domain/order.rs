//! Orders as values: the validated order id, the closed set of order statuses, and the order a
//! checkout creates.
//!
//! Pure types; the store reads and writes them, the API renders them. Nothing here touches the
//! database or decides when an order changes status (that is `api::lifecycle` with
//! `store::orders`).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::IdError;
use super::lifecycle::OrderLine;
use super::money::{Currency, Money};

/// Longest shard id an order id may name (the ring allows 32; room to grow without a format
/// change).
const MAX_SHARD_LEN: usize = 64;
/// Hex digits of an order id's digest part (16 bytes).
const DIGEST_HEX_LEN: usize = 32;

/// An order id, `ord_<shard>_<32 lowercase hex>`. It names the shard that holds the order, so
/// any edge can route a request for it. The hex part derives from the owner and the checkout's
/// idempotency key: a retried checkout that lost its answer reuses the same order id and stock
/// reservation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrderId(String);

fn shard_is_valid(shard: &str) -> bool {
    !shard.is_empty()
        && shard.len() <= MAX_SHARD_LEN
        && shard
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl OrderId {
    /// The order id of a checkout on `shard` whose (owner, key) digest is `digest`.
    pub fn new(shard: &str, digest: &[u8; 16]) -> Result<OrderId, IdError> {
        if !shard_is_valid(shard) {
            return Err(IdError("an order id's shard must match [A-Za-z0-9-]{1,64}"));
        }
        let mut id = String::with_capacity(5 + shard.len() + DIGEST_HEX_LEN);
        id.push_str("ord_");
        id.push_str(shard);
        id.push('_');
        for byte in digest {
            id.push_str(&format!("{byte:02x}"));
        }
        Ok(OrderId(id))
    }

    /// Parses an order id as a client or a database row gives it.
    pub fn parse(value: &str) -> Result<OrderId, IdError> {
        if Self::split(value).is_some() {
            Ok(OrderId(value.to_string()))
        } else {
            Err(IdError("order id must match ord_<shard>_<32 hex digits>"))
        }
    }

    fn split(value: &str) -> Option<&str> {
        let rest = value.strip_prefix("ord_")?;
        let (shard, hex) = rest.rsplit_once('_')?;
        let hex_ok = hex.len() == DIGEST_HEX_LEN
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        (hex_ok && shard_is_valid(shard)).then_some(shard)
    }

    /// The shard that holds the order.
    pub fn shard(&self) -> &str {
        Self::split(&self.0).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for OrderId {
    type Error = IdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        OrderId::parse(&value)
    }
}

impl From<OrderId> for String {
    fn from(id: OrderId) -> String {
        id.0
    }
}

/// Where an order is in its life. Only `PendingPayment` changes, once, to one of the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Stock reserved, waiting for the payment service.
    PendingPayment,
    /// Paid: the reservation became a sale.
    Paid,
    /// Cancelled by the payment service; the stock went back.
    Cancelled,
    /// Not paid before its reservation ran out; the stock went back.
    Expired,
}

impl OrderStatus {
    /// Every status, in the order of its life.
    pub const ALL: [OrderStatus; 4] = [
        OrderStatus::PendingPayment,
        OrderStatus::Paid,
        OrderStatus::Cancelled,
        OrderStatus::Expired,
    ];

    /// The stored and shown name (also the `orders.status` column's value).
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
        }
    }

    pub fn parse(value: &str) -> Option<OrderStatus> {
        OrderStatus::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// Whether the status is final (anything but pending payment).
    pub fn is_settled(self) -> bool {
        self != OrderStatus::PendingPayment
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An order as stored and shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Order {
    pub order_id: OrderId,
    pub owner: String,
    pub status: OrderStatus,
    pub items: Vec<OrderLine>,
    pub total_price: Money,
    pub currency: Currency,
    pub reservation_expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_ids_name_their_shard() {
        let id = OrderId::new("sg-1", &[0xab; 16]).unwrap();
        assert_eq!(id.as_str(), format!("ord_sg-1_{}", "ab".repeat(16)));
        assert_eq!(id.shard(), "sg-1");
        assert_eq!(OrderId::parse(id.as_str()), Ok(id));
    }

    #[test]
    fn malformed_order_ids_are_refused() {
        for bad in [
            "ord_sg-1_xyz".to_string(),
            "sg-1_abababababababababababababababab".to_string(),
            format!("ord__{}", "ab".repeat(16)),
            format!("ord_sg-1_{}", "AB".repeat(16)),
            format!("ord_sg/1_{}", "ab".repeat(16)),
            format!("ord_{}_{}", "s".repeat(65), "ab".repeat(16)),
        ] {
            assert!(OrderId::parse(&bad).is_err(), "{bad} was accepted");
        }
        assert!(OrderId::new("", &[0; 16]).is_err());
        assert!(OrderId::new("sg_1", &[0; 16]).is_err());
    }

    #[test]
    fn order_ids_deserialize_only_when_valid() {
        let id: OrderId =
            serde_json::from_value(serde_json::json!(format!("ord_a_{}", "0".repeat(32)))).unwrap();
        assert_eq!(id.shard(), "a");
        assert_eq!(serde_json::to_value(&id).unwrap(), id.as_str());
        assert!(serde_json::from_value::<OrderId>(serde_json::json!("ord_a_0")).is_err());
    }

    #[test]
    fn order_statuses_round_trip_through_their_stored_names() {
        for status in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
        assert_eq!(OrderStatus::parse("shipped"), None);
        assert_eq!(OrderStatus::parse("Paid"), None);
        assert!(!OrderStatus::PendingPayment.is_settled());
        assert!(OrderStatus::Expired.is_settled());
    }
}
