//! Carts and their rules: quantities, line limits, prices, and the view a client sees.
//!
//! The store loads a [`StoredCart`], asks a `plan_*` function what a request may do, executes
//! the plan in its transaction, and the API renders a [`CartView`]. Keeping the decisions here
//! makes them unit-testable without a database.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::money::{Currency, Money};
use super::variant::stored_line_id;

/// Largest quantity of one line.
pub const MAX_QUANTITY: u16 = 999;

/// A line quantity, always within 1..=999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(u16);

impl Quantity {
    pub fn parse(value: i64) -> Option<Quantity> {
        if (1..=i64::from(MAX_QUANTITY)).contains(&value) {
            Some(Quantity(value as u16))
        } else {
            None
        }
    }
    pub fn get(self) -> u16 {
        self.0
    }
}

/// A line as stored (database row or cache entry). The serde form is the cache's: compact,
/// timestamps as integer microseconds (parsing RFC 3339 dominated cache-hit decoding). An entry
/// written by an edge older than line ids has no `k`; its line id is derived on the way in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredLineWire")]
pub struct StoredLine {
    /// The line's identity (`variant::LineId`): the item id, or the item id, `~` and the
    /// variant's hash.
    #[serde(rename = "k")]
    pub line_id: String,
    #[serde(rename = "i")]
    pub item_id: String,
    #[serde(rename = "q")]
    pub quantity: u16,
    #[serde(rename = "v")]
    pub variant: Option<Value>,
    /// Price captured when the line was added, in the cart's currency.
    #[serde(rename = "p")]
    pub unit_price_minor: i64,
    #[serde(rename = "a", with = "chrono::serde::ts_microseconds")]
    pub added_at: DateTime<Utc>,
    #[serde(rename = "u", with = "chrono::serde::ts_microseconds")]
    pub updated_at: DateTime<Utc>,
}

/// The serde form of [`StoredLine`] as read, with the line id optional.
#[derive(Deserialize)]
struct StoredLineWire {
    #[serde(rename = "k", default)]
    line_id: Option<String>,
    #[serde(rename = "i")]
    item_id: String,
    #[serde(rename = "q")]
    quantity: u16,
    #[serde(rename = "v")]
    variant: Option<Value>,
    #[serde(rename = "p")]
    unit_price_minor: i64,
    #[serde(rename = "a", with = "chrono::serde::ts_microseconds")]
    added_at: DateTime<Utc>,
    #[serde(rename = "u", with = "chrono::serde::ts_microseconds")]
    updated_at: DateTime<Utc>,
}

impl From<StoredLineWire> for StoredLine {
    fn from(wire: StoredLineWire) -> StoredLine {
        // A stored line id is moved, not copied (the cache hit path decodes every line).
        let line_id = match wire.line_id {
            Some(line_id) => line_id,
            None => stored_line_id(None, &wire.item_id, wire.variant.as_ref()),
        };
        StoredLine {
            line_id,
            item_id: wire.item_id,
            quantity: wire.quantity,
            variant: wire.variant,
            unit_price_minor: wire.unit_price_minor,
            added_at: wire.added_at,
            updated_at: wire.updated_at,
        }
    }
}

/// A cart as stored. `version` 0 with no currency means "no cart yet".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCart {
    #[serde(rename = "o")]
    pub owner: String,
    #[serde(rename = "c")]
    pub currency: Option<Currency>,
    #[serde(rename = "n")]
    pub version: i64,
    #[serde(rename = "l")]
    pub lines: Vec<StoredLine>,
    #[serde(rename = "u", with = "chrono::serde::ts_microseconds_option")]
    pub updated_at: Option<DateTime<Utc>>,
}

impl StoredCart {
    /// The cart of an owner who has none.
    pub fn empty(owner: &str) -> StoredCart {
        StoredCart {
            owner: owner.to_string(),
            currency: None,
            version: 0,
            lines: Vec::new(),
            updated_at: None,
        }
    }
}

/// What the catalog says about one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    pub item_id: String,
    /// The product name shown on cart lines.
    pub name: String,
    pub active: bool,
    pub stock: i64,
    pub prices: Vec<Money>,
}

impl CatalogItem {
    pub fn price_in(&self, currency: Currency) -> Option<Money> {
        self.prices.iter().copied().find(|p| p.currency == currency)
    }
}

/// A cart rule a request broke; each maps to one stable error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CartRule {
    #[error("item is not in the catalog or not active")]
    UnknownItem,
    #[error("item has no price in the cart's currency {cart}")]
    CurrencyMismatch { cart: Currency },
    #[error("client price differs from the catalog price")]
    PriceMismatch { current: Money },
    /// The same details as a checkout's shortage: which item, how many were asked, how many
    /// there are.
    #[error("item is out of stock")]
    OutOfStock {
        item_id: String,
        requested: u16,
        available: i64,
    },
    #[error("a line may hold at most 999 units")]
    QuantityLimit { current: u16, requested: u16 },
    #[error("the cart already holds the most lines allowed")]
    CartFull { max_lines: u32 },
    #[error("item is not in the cart")]
    ItemNotInCart,
    #[error("the cart is being merged into a user's cart; retry the merge or start a new session")]
    MergeInProgress,
    #[error("cart version differs from If-Match")]
    VersionMismatch { current: i64 },
}

/// An add request, validated.
#[derive(Debug, Clone)]
pub struct AddRequest {
    pub quantity: Quantity,
    pub client_price: Option<Money>,
}

/// What an add will write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddPlan {
    pub unit_price_minor: i64,
    pub new_quantity: Quantity,
    pub is_new_line: bool,
}

/// The state of the cart, read under the cart's lock, that an add depends on.
#[derive(Debug, Clone, Copy)]
pub struct LineContext {
    pub cart_currency: Currency,
    pub existing_quantity: Option<u16>,
    pub line_count: usize,
    pub max_lines: u32,
}

/// Decides an add. A new line captures the catalog price; an existing line keeps the price it
/// captured (the view reports `price_changed` when the catalog moved since).
pub fn plan_add(
    item: Option<&CatalogItem>,
    context: LineContext,
    request: &AddRequest,
) -> Result<AddPlan, CartRule> {
    let item = item.filter(|i| i.active).ok_or(CartRule::UnknownItem)?;
    let current = item
        .price_in(context.cart_currency)
        .ok_or(CartRule::CurrencyMismatch {
            cart: context.cart_currency,
        })?;
    if let Some(client) = request.client_price {
        if client != current {
            return Err(CartRule::PriceMismatch { current });
        }
    }
    if item.stock <= 0 {
        return Err(CartRule::OutOfStock {
            item_id: item.item_id.clone(),
            requested: request.quantity.get(),
            available: item.stock.max(0),
        });
    }
    let existing = context.existing_quantity.unwrap_or(0);
    let total = u32::from(existing) + u32::from(request.quantity.get());
    let new_quantity = Quantity::parse(i64::from(total)).ok_or(CartRule::QuantityLimit {
        current: existing,
        requested: request.quantity.get(),
    })?;
    let is_new_line = context.existing_quantity.is_none();
    if is_new_line && context.line_count >= context.max_lines as usize {
        return Err(CartRule::CartFull {
            max_lines: context.max_lines,
        });
    }
    Ok(AddPlan {
        unit_price_minor: current.amount_minor,
        new_quantity,
        is_new_line,
    })
}

/// Checks an `If-Match` version against the cart's current one.
pub fn check_version(expected: Option<i64>, current: i64) -> Result<(), CartRule> {
    match expected {
        Some(expected) if expected != current => Err(CartRule::VersionMismatch { current }),
        _ => Ok(()),
    }
}

/// A line as the client sees it.
#[derive(Debug, Clone, Serialize)]
pub struct LineView {
    /// What `PUT`/`DELETE /cart/items/{line_id}` address.
    pub line_id: String,
    pub item_id: String,
    /// The catalog's name for the item; None when the item is gone from the catalog (or the
    /// catalog could not be read).
    pub name: Option<String>,
    pub quantity: u16,
    pub variant: Option<Value>,
    pub unit_price: Money,
    pub current_price: Option<Money>,
    pub price_changed: bool,
    pub added_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Every warning code a cart view can carry: the closed list `openapi.json` documents (a test
/// checks both directions). The per-line ones are set here, the others by the API (`cart`,
/// `parking`).
pub const WARNING_CODES: [&str; 7] = [
    "low_stock",
    "out_of_stock",
    "item_unavailable",
    "prices_unavailable",
    "stale_possible",
    "write_pending",
    "write_rejected",
];

/// Something the client should know about the cart that is not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
    pub message: String,
}

/// The cart body of every cart response.
#[derive(Debug, Clone, Serialize)]
pub struct CartView {
    pub owner: String,
    pub currency: Currency,
    pub version: i64,
    pub items: Vec<LineView>,
    pub total_items: u64,
    pub total_price: Money,
    /// How many lines' captured price differs from the catalog's current one.
    pub price_changed_lines: u32,
    pub updated_at: Option<DateTime<Utc>>,
    pub warnings: Vec<Warning>,
}

/// Builds the client's view of a stored cart. `catalog` answers the current state of an item
/// (None when unknown); `default_currency` is used for an owner with no cart yet.
pub fn view<'a>(
    cart: &StoredCart,
    default_currency: Currency,
    catalog: impl Fn(&str) -> Option<&'a CatalogItem>,
) -> CartView {
    let currency = cart.currency.unwrap_or(default_currency);
    let mut warnings = Vec::new();
    let mut total_items: u64 = 0;
    let mut total_minor: i128 = 0;
    let items: Vec<LineView> = cart
        .lines
        .iter()
        .map(|line| {
            let entry = catalog(&line.item_id);
            let current_price = entry
                .filter(|e| e.active)
                .and_then(|e| e.price_in(currency));
            match entry {
                None => warnings.push(item_warning(
                    "item_unavailable",
                    line,
                    "item is no longer sold",
                )),
                Some(e) if !e.active => warnings.push(item_warning(
                    "item_unavailable",
                    line,
                    "item is no longer sold",
                )),
                Some(e) if e.stock <= 0 => {
                    warnings.push(item_warning("out_of_stock", line, "item is out of stock"))
                }
                Some(e) if e.stock < i64::from(line.quantity) => warnings.push(item_warning(
                    "low_stock",
                    line,
                    &format!("only {} in stock", e.stock),
                )),
                Some(_) => {}
            }
            total_items += u64::from(line.quantity);
            total_minor += i128::from(line.unit_price_minor) * i128::from(line.quantity);
            LineView {
                line_id: line.line_id.clone(),
                item_id: line.item_id.clone(),
                name: entry.map(|e| e.name.clone()),
                quantity: line.quantity,
                variant: line.variant.clone(),
                unit_price: Money::new(line.unit_price_minor, currency),
                price_changed: current_price
                    .is_some_and(|p| p.amount_minor != line.unit_price_minor),
                current_price,
                added_at: line.added_at,
                updated_at: line.updated_at,
            }
        })
        .collect();
    let price_changed_lines = items.iter().filter(|l: &&LineView| l.price_changed).count() as u32;
    CartView {
        price_changed_lines,
        owner: cart.owner.clone(),
        currency,
        version: cart.version,
        items,
        total_items,
        total_price: Money::new(
            total_minor.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
            currency,
        ),
        updated_at: cart.updated_at,
        warnings,
    }
}

/// An add accepted in a visiting region and not yet applied at home (a parked add), as a read
/// in that region shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingAdd {
    pub line_id: String,
    pub item_id: String,
    pub variant: Option<Value>,
    pub quantity: u16,
    /// The home catalog's current price in the cart's currency (what the home region will
    /// capture), 0 when unknown.
    pub unit_price_minor: i64,
    pub parked_at: DateTime<Utc>,
}

/// The cart as a visiting region knows it: the stored cart with its pending adds laid over, in
/// their order (a line already there gains the quantity, saturated at [`MAX_QUANTITY`]; a new
/// line is appended). The version stays the stored cart's: nothing here was committed.
pub fn with_pending_adds(cart: &StoredCart, adds: &[PendingAdd], currency: Currency) -> StoredCart {
    let mut shown = cart.clone();
    if shown.currency.is_none() && !adds.is_empty() {
        shown.currency = Some(currency);
    }
    for add in adds {
        match shown.lines.iter_mut().find(|l| l.line_id == add.line_id) {
            Some(line) => {
                line.quantity = line.quantity.saturating_add(add.quantity).min(MAX_QUANTITY);
                line.updated_at = line.updated_at.max(add.parked_at);
            }
            None => shown.lines.push(StoredLine {
                line_id: add.line_id.clone(),
                item_id: add.item_id.clone(),
                quantity: add.quantity.min(MAX_QUANTITY),
                variant: add.variant.clone(),
                unit_price_minor: add.unit_price_minor,
                added_at: add.parked_at,
                updated_at: add.parked_at,
            }),
        }
    }
    shown
}

#[cfg(test)]
mod pending_tests {
    use super::*;

    fn add(line: &str, quantity: u16) -> PendingAdd {
        PendingAdd {
            line_id: line.into(),
            item_id: line.into(),
            variant: None,
            quantity,
            unit_price_minor: 250,
            parked_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    #[test]
    fn pending_adds_join_existing_lines_saturated_and_append_new_ones_in_order() {
        let currency = Currency::parse("SGD").unwrap();
        let empty = StoredCart::empty("u:a");
        let shown = with_pending_adds(
            &empty,
            &[add("sku-1", 2), add("sku-2", 1), add("sku-1", 3)],
            currency,
        );
        assert_eq!(shown.version, 0);
        assert_eq!(shown.currency, Some(currency));
        let lines: Vec<(&str, u16)> = shown
            .lines
            .iter()
            .map(|l| (l.line_id.as_str(), l.quantity))
            .collect();
        assert_eq!(lines, [("sku-1", 5), ("sku-2", 1)]);
        let full = with_pending_adds(&shown, &[add("sku-1", 999)], currency);
        assert_eq!(full.lines[0].quantity, MAX_QUANTITY);
        assert_eq!(with_pending_adds(&empty, &[], currency), empty);
    }
}

fn item_warning(code: &'static str, line: &StoredLine, message: &str) -> Warning {
    Warning {
        code,
        item_id: Some(line.item_id.clone()),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sgd() -> Currency {
        Currency::parse("SGD").unwrap()
    }

    fn item(stock: i64, price: i64) -> CatalogItem {
        CatalogItem {
            item_id: "sku-1".into(),
            name: "Item one".into(),
            active: true,
            stock,
            prices: vec![Money::new(price, sgd())],
        }
    }

    fn context(existing: Option<u16>, lines: usize) -> LineContext {
        LineContext {
            cart_currency: sgd(),
            existing_quantity: existing,
            line_count: lines,
            max_lines: 3,
        }
    }

    fn add(quantity: i64) -> AddRequest {
        AddRequest {
            quantity: Quantity::parse(quantity).unwrap(),
            client_price: None,
        }
    }

    #[test]
    fn quantities_are_one_to_999() {
        assert!(Quantity::parse(0).is_none());
        assert!(Quantity::parse(1000).is_none());
        assert!(Quantity::parse(-1).is_none());
        assert_eq!(Quantity::parse(999).unwrap().get(), 999);
    }

    #[test]
    fn a_new_line_captures_the_catalog_price() {
        let plan = plan_add(Some(&item(5, 1250)), context(None, 0), &add(2)).unwrap();
        assert_eq!(plan.unit_price_minor, 1250);
        assert_eq!(plan.new_quantity.get(), 2);
        assert!(plan.is_new_line);
    }

    #[test]
    fn adds_sum_into_an_existing_line_and_refuse_to_pass_999() {
        let plan = plan_add(Some(&item(5, 100)), context(Some(2), 3), &add(2)).unwrap();
        assert_eq!(plan.new_quantity.get(), 4);
        assert!(!plan.is_new_line);
        let error = plan_add(Some(&item(5, 100)), context(Some(998), 1), &add(2)).unwrap_err();
        assert_eq!(
            error,
            CartRule::QuantityLimit {
                current: 998,
                requested: 2
            }
        );
    }

    #[test]
    fn a_full_cart_refuses_new_lines_only() {
        let error = plan_add(Some(&item(5, 100)), context(None, 3), &add(1)).unwrap_err();
        assert_eq!(error, CartRule::CartFull { max_lines: 3 });
    }

    #[test]
    fn client_prices_must_equal_the_catalog() {
        let mut request = add(1);
        request.client_price = Some(Money::new(1, sgd()));
        let error = plan_add(Some(&item(5, 100)), context(None, 0), &request).unwrap_err();
        assert_eq!(
            error,
            CartRule::PriceMismatch {
                current: Money::new(100, sgd())
            }
        );
        request.client_price = Some(Money::new(100, sgd()));
        assert!(plan_add(Some(&item(5, 100)), context(None, 0), &request).is_ok());
    }

    #[test]
    fn unknown_inactive_unpriced_and_sold_out_items_are_refused() {
        assert_eq!(
            plan_add(None, context(None, 0), &add(1)),
            Err(CartRule::UnknownItem)
        );
        let mut inactive = item(5, 100);
        inactive.active = false;
        assert_eq!(
            plan_add(Some(&inactive), context(None, 0), &add(1)),
            Err(CartRule::UnknownItem)
        );
        let mut thb_only = item(5, 100);
        thb_only.prices = vec![Money::new(100, Currency::parse("THB").unwrap())];
        assert_eq!(
            plan_add(Some(&thb_only), context(None, 0), &add(1)),
            Err(CartRule::CurrencyMismatch { cart: sgd() })
        );
        assert_eq!(
            plan_add(Some(&item(0, 100)), context(None, 0), &add(1)),
            Err(CartRule::OutOfStock {
                item_id: item(0, 100).item_id,
                requested: 1,
                available: 0,
            })
        );
    }

    #[test]
    fn the_view_totals_captured_prices_and_flags_changes_and_low_stock() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let cart = StoredCart {
            owner: "u:a".into(),
            currency: Some(sgd()),
            version: 3,
            lines: vec![
                StoredLine {
                    line_id: "sku-1".into(),
                    item_id: "sku-1".into(),
                    quantity: 3,
                    variant: None,
                    unit_price_minor: 100,
                    added_at: at,
                    updated_at: at,
                },
                StoredLine {
                    line_id: "gone".into(),
                    item_id: "gone".into(),
                    quantity: 1,
                    variant: None,
                    unit_price_minor: 5,
                    added_at: at,
                    updated_at: at,
                },
            ],
            updated_at: Some(at),
        };
        let catalog_item = item(2, 120);
        let view = view(&cart, sgd(), |id| (id == "sku-1").then_some(&catalog_item));
        assert_eq!(view.total_items, 4);
        assert_eq!(view.total_price, Money::new(305, sgd()));
        assert!(view.items[0].price_changed);
        assert_eq!(view.items[0].current_price, Some(Money::new(120, sgd())));
        assert_eq!(view.items[0].name.as_deref(), Some("Item one"));
        assert_eq!(view.items[1].name, None, "gone from the catalog");
        assert!(!view.items[1].price_changed);
        assert_eq!(view.price_changed_lines, 1);
        let codes: Vec<_> = view.warnings.iter().map(|w| w.code).collect();
        assert_eq!(codes, ["low_stock", "item_unavailable"]);
    }

    #[test]
    fn if_match_compares_versions() {
        assert!(check_version(None, 4).is_ok());
        assert!(check_version(Some(4), 4).is_ok());
        assert_eq!(
            check_version(Some(3), 4),
            Err(CartRule::VersionMismatch { current: 4 })
        );
    }

    #[test]
    fn a_cache_entry_without_line_ids_derives_them() {
        let old = r#"{"o":"u:a","c":"SGD","n":2,"u":null,"l":[
            {"i":"sku-1","q":1,"v":null,"p":5,"a":0,"u":0},
            {"i":"sku-00005","q":1,"v":{"color":"red"},"p":5,"a":0,"u":0}]}"#;
        let cart: StoredCart = serde_json::from_str(old).unwrap();
        assert_eq!(cart.lines[0].line_id, "sku-1");
        assert_eq!(cart.lines[1].line_id, "sku-00005~241889ca0604e333");
        let again: StoredCart =
            serde_json::from_slice(&serde_json::to_vec(&cart).unwrap()).unwrap();
        assert_eq!(again, cart);
    }
}
