//! The cart lifecycle's decisions: merging a guest cart into a user's cart and pricing a
//! checkout (order ids and statuses are in `order`). Pure functions; the store executes what
//! they decide.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cart::{StoredCart, StoredLine, MAX_QUANTITY};
use super::money::{Currency, Money};

/// How quantities of a line in both carts (same item, same variant: same line id) combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeStrategy {
    /// Quantities added, a line capped at 999 (reported as clamped).
    #[default]
    Sum,
    /// The larger quantity.
    Max,
    /// The user's line as it is.
    KeepUser,
    /// The guest's line (quantity, captured price and variant).
    KeepGuest,
}

/// A line the merge capped at the maximum quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clamped {
    /// Absent from reports stored before line ids.
    #[serde(default)]
    pub line_id: String,
    pub item_id: String,
    pub requested: u32,
    pub quantity: u16,
}

/// A guest line the merge could not take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Absent from reports stored before line ids.
    #[serde(default)]
    pub line_id: String,
    pub item_id: String,
    pub reason: String,
}

/// What a merge did, reported to the client and stored with the merge.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MergeReport {
    /// Guest lines combined into lines the user already had.
    pub merged_lines: u32,
    /// Guest lines added as new lines.
    pub added_lines: u32,
    pub clamped: Vec<Clamped>,
    pub skipped: Vec<Skipped>,
}

/// One line the merge writes into the user's cart (insert or update).
#[derive(Debug, Clone, PartialEq)]
pub struct MergeWrite {
    pub line_id: String,
    pub item_id: String,
    pub quantity: u16,
    pub unit_price_minor: i64,
    pub variant: Option<Value>,
}

/// The merge, decided.
#[derive(Debug, Clone, PartialEq)]
pub struct MergePlan {
    /// The user cart's currency afterwards.
    pub currency: Option<Currency>,
    pub writes: Vec<MergeWrite>,
    pub report: MergeReport,
}

/// Why a merge cannot happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeRefusal {
    CurrencyMismatch { user: Currency, guest: Currency },
}

/// Decides how `guest` merges into `user`. Lines with the same line id combine; the same item in
/// different variants stays in separate lines. Existing user lines keep their captured price
/// (except under `keep_guest`, where the guest's line wins whole); guest lines keep theirs.
/// New lines beyond `max_lines` are skipped and reported.
pub fn plan_merge(
    user: &StoredCart,
    guest: &StoredCart,
    strategy: MergeStrategy,
    max_lines: u32,
) -> Result<MergePlan, MergeRefusal> {
    if guest.lines.is_empty() {
        return Ok(MergePlan {
            currency: user.currency,
            writes: Vec::new(),
            report: MergeReport::default(),
        });
    }
    if let (Some(user_currency), Some(guest_currency)) = (user.currency, guest.currency) {
        if user_currency != guest_currency {
            return Err(MergeRefusal::CurrencyMismatch {
                user: user_currency,
                guest: guest_currency,
            });
        }
    }
    let mut report = MergeReport::default();
    let mut writes = Vec::new();
    let mut line_count = user.lines.len();
    for line in &guest.lines {
        match user.lines.iter().find(|l| l.line_id == line.line_id) {
            Some(existing) => {
                report.merged_lines += 1;
                let (requested, base) = match strategy {
                    MergeStrategy::Sum => (
                        u32::from(existing.quantity) + u32::from(line.quantity),
                        existing,
                    ),
                    MergeStrategy::Max => {
                        (u32::from(existing.quantity.max(line.quantity)), existing)
                    }
                    MergeStrategy::KeepUser => (u32::from(existing.quantity), existing),
                    MergeStrategy::KeepGuest => (u32::from(line.quantity), line),
                };
                let quantity = clamp(requested);
                if u32::from(quantity) < requested {
                    report.clamped.push(Clamped {
                        line_id: line.line_id.clone(),
                        item_id: line.item_id.clone(),
                        requested,
                        quantity,
                    });
                }
                if quantity != existing.quantity
                    || base.unit_price_minor != existing.unit_price_minor
                    || base.variant != existing.variant
                {
                    writes.push(write_of(base, quantity));
                }
            }
            None if line_count >= max_lines as usize => report.skipped.push(Skipped {
                line_id: line.line_id.clone(),
                item_id: line.item_id.clone(),
                reason: "cart_full".into(),
            }),
            None => {
                line_count += 1;
                report.added_lines += 1;
                writes.push(write_of(line, clamp(u32::from(line.quantity))));
            }
        }
    }
    Ok(MergePlan {
        currency: user.currency.or(guest.currency),
        writes,
        report,
    })
}

fn clamp(requested: u32) -> u16 {
    requested.min(u32::from(MAX_QUANTITY)).max(1) as u16
}

fn write_of(line: &StoredLine, quantity: u16) -> MergeWrite {
    MergeWrite {
        line_id: line.line_id.clone(),
        item_id: line.item_id.clone(),
        quantity,
        unit_price_minor: line.unit_price_minor,
        variant: line.variant.clone(),
    }
}

/// A line whose captured price differs from the catalog's current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceChange {
    pub item_id: String,
    pub unit_price: Money,
    pub current_price: Money,
}

/// A line the catalog cannot supply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shortage {
    pub item_id: String,
    pub requested: u16,
    pub available: i64,
}

/// One line of an order, at the price charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The cart line it came from; absent from orders placed before line ids.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub line_id: Option<String>,
    pub item_id: String,
    pub quantity: u16,
    pub unit_price: Money,
    pub line_total: Money,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub variant: Option<Value>,
}

/// What the catalog currently says about an item, for checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrentOffer {
    /// Price in the cart's currency; None when the item is no longer sold in it.
    pub price: Option<Money>,
}

/// Why a checkout cannot go ahead before any stock is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckoutRefusal {
    Empty,
    /// Prices moved and the client did not accept the current ones.
    PriceChanged(Vec<PriceChange>),
    /// Items no longer sold (no current price): reported as out of stock with nothing available.
    Unavailable(Vec<Shortage>),
}

/// Prices a checkout: every line at its captured price, or at the current one when it moved
/// and `accept_price_changes`. Lines are returned sorted by item id, then line id (the
/// reservation order); two variants of one item are two order lines.
pub fn price_checkout(
    cart: &StoredCart,
    currency: Currency,
    accept_price_changes: bool,
    current: impl Fn(&str) -> CurrentOffer,
) -> Result<(Vec<OrderLine>, Money), CheckoutRefusal> {
    if cart.lines.is_empty() {
        return Err(CheckoutRefusal::Empty);
    }
    let mut changes = Vec::new();
    let mut unavailable = Vec::new();
    let mut lines = Vec::with_capacity(cart.lines.len());
    for line in &cart.lines {
        let captured = Money::new(line.unit_price_minor, currency);
        let Some(now) = current(&line.item_id).price else {
            unavailable.push(Shortage {
                item_id: line.item_id.clone(),
                requested: line.quantity,
                available: 0,
            });
            continue;
        };
        if now != captured {
            changes.push(PriceChange {
                item_id: line.item_id.clone(),
                unit_price: captured,
                current_price: now,
            });
        }
        let unit = if accept_price_changes { now } else { captured };
        lines.push(OrderLine {
            line_id: Some(line.line_id.clone()),
            item_id: line.item_id.clone(),
            quantity: line.quantity,
            unit_price: unit,
            line_total: Money::new(
                unit.amount_minor.saturating_mul(i64::from(line.quantity)),
                currency,
            ),
            variant: line.variant.clone(),
        });
    }
    if !unavailable.is_empty() {
        return Err(CheckoutRefusal::Unavailable(unavailable));
    }
    if !changes.is_empty() && !accept_price_changes {
        return Err(CheckoutRefusal::PriceChanged(changes));
    }
    lines.sort_by(|a, b| {
        (a.item_id.as_str(), a.line_id.as_deref()).cmp(&(b.item_id.as_str(), b.line_id.as_deref()))
    });
    let total = lines
        .iter()
        .fold(0i64, |sum, l| sum.saturating_add(l.line_total.amount_minor));
    Ok((lines, Money::new(total, currency)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn sgd() -> Currency {
        Currency::parse("SGD").unwrap()
    }

    fn line(item: &str, quantity: u16, price: i64) -> StoredLine {
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        StoredLine {
            line_id: item.into(),
            item_id: item.into(),
            quantity,
            variant: None,
            unit_price_minor: price,
            added_at: at,
            updated_at: at,
        }
    }

    fn cart(owner: &str, lines: Vec<StoredLine>) -> StoredCart {
        StoredCart {
            owner: owner.into(),
            currency: Some(sgd()),
            version: 1,
            lines,
            updated_at: None,
        }
    }

    fn quantities(plan: &MergePlan) -> Vec<(String, u16, i64)> {
        plan.writes
            .iter()
            .map(|w| (w.item_id.clone(), w.quantity, w.unit_price_minor))
            .collect()
    }

    #[test]
    fn every_strategy_combines_shared_lines_its_way() {
        let user = cart("u:a", vec![line("a", 2, 100), line("b", 1, 50)]);
        let guest = cart("g:s", vec![line("a", 3, 120), line("c", 4, 10)]);
        let expect = [
            (MergeStrategy::Sum, Some(5), 100),
            (MergeStrategy::Max, Some(3), 100),
            (MergeStrategy::KeepUser, None, 100),
            (MergeStrategy::KeepGuest, Some(3), 120),
        ];
        for (strategy, quantity_of_a, price_of_a) in expect {
            let plan = plan_merge(&user, &guest, strategy, 100).unwrap();
            let writes = quantities(&plan);
            match quantity_of_a {
                Some(q) => assert!(
                    writes.contains(&("a".into(), q, price_of_a)),
                    "{strategy:?}: {writes:?}"
                ),
                None => assert!(writes.iter().all(|w| w.0 != "a"), "{strategy:?}"),
            }
            // The guest-only line arrives with the guest's captured price.
            assert!(writes.contains(&("c".into(), 4, 10)), "{strategy:?}");
            assert_eq!(plan.report.merged_lines, 1);
            assert_eq!(plan.report.added_lines, 1);
        }
    }

    #[test]
    fn sums_past_999_are_clamped_and_reported() {
        let user = cart("u:a", vec![line("a", 900, 100)]);
        let guest = cart("g:s", vec![line("a", 200, 100)]);
        let plan = plan_merge(&user, &guest, MergeStrategy::Sum, 100).unwrap();
        assert_eq!(quantities(&plan), [("a".to_string(), 999, 100)]);
        assert_eq!(
            plan.report.clamped,
            [Clamped {
                line_id: "a".into(),
                item_id: "a".into(),
                requested: 1100,
                quantity: 999
            }]
        );
    }

    #[test]
    fn new_lines_past_the_line_limit_are_skipped() {
        let user = cart("u:a", vec![line("a", 1, 1)]);
        let guest = cart("g:s", vec![line("b", 1, 1), line("c", 1, 1)]);
        let plan = plan_merge(&user, &guest, MergeStrategy::Sum, 2).unwrap();
        assert_eq!(plan.report.added_lines, 1);
        assert_eq!(plan.report.skipped.len(), 1);
        assert_eq!(plan.report.skipped[0].reason, "cart_full");
    }

    #[test]
    fn different_currencies_refuse_and_an_empty_guest_cart_changes_nothing() {
        let user = cart("u:a", vec![line("a", 1, 1)]);
        let mut guest = cart("g:s", vec![line("a", 1, 1)]);
        guest.currency = Currency::parse("THB");
        assert!(matches!(
            plan_merge(&user, &guest, MergeStrategy::Sum, 10),
            Err(MergeRefusal::CurrencyMismatch { .. })
        ));
        guest.lines.clear();
        let plan = plan_merge(&user, &guest, MergeStrategy::Sum, 10).unwrap();
        assert!(plan.writes.is_empty());
        assert_eq!(plan.report, MergeReport::default());
        // A user without a cart takes the guest's currency.
        let none = StoredCart::empty("u:b");
        let guest = cart("g:s", vec![line("a", 1, 1)]);
        let plan = plan_merge(&none, &guest, MergeStrategy::Sum, 10).unwrap();
        assert_eq!(plan.currency, Some(sgd()));
    }

    #[test]
    fn checkout_prices_refuse_moved_prices_unless_accepted() {
        let cart = cart("u:a", vec![line("b", 2, 100), line("a", 1, 50)]);
        let offer = |id: &str| CurrentOffer {
            price: Some(Money::new(if id == "b" { 110 } else { 50 }, sgd())),
        };
        match price_checkout(&cart, sgd(), false, offer) {
            Err(CheckoutRefusal::PriceChanged(changes)) => {
                assert_eq!(changes.len(), 1);
                assert_eq!(changes[0].item_id, "b");
                assert_eq!(changes[0].current_price, Money::new(110, sgd()));
            }
            other => panic!("{other:?}"),
        }
        let (lines, total) = price_checkout(&cart, sgd(), true, offer).unwrap();
        assert_eq!(lines[0].item_id, "a", "sorted for the reservation");
        assert_eq!(total, Money::new(50 + 220, sgd()));
        let gone = |_: &str| CurrentOffer { price: None };
        assert!(matches!(
            price_checkout(&cart, sgd(), true, gone),
            Err(CheckoutRefusal::Unavailable(_))
        ));
        assert_eq!(
            price_checkout(&StoredCart::empty("u:a"), sgd(), true, offer),
            Err(CheckoutRefusal::Empty)
        );
    }

    fn variant_line(item: &str, color: &str, quantity: u16) -> StoredLine {
        let variant = serde_json::json!({ "color": color });
        let mut line = line(item, quantity, 100);
        line.line_id = crate::domain::variant::stored_line_id(None, item, Some(&variant));
        line.variant = Some(variant);
        line
    }

    #[test]
    fn a_merge_combines_equal_line_ids_and_keeps_other_variants_apart() {
        let user = cart("u:a", vec![variant_line("a", "red", 2)]);
        let guest = cart(
            "g:s",
            vec![variant_line("a", "red", 1), variant_line("a", "blue", 4)],
        );
        let plan = plan_merge(&user, &guest, MergeStrategy::Sum, 10).unwrap();
        let writes: Vec<(String, u16)> = plan
            .writes
            .iter()
            .map(|w| (w.line_id.clone(), w.quantity))
            .collect();
        assert_eq!(
            writes,
            [
                (user.lines[0].line_id.clone(), 3),
                (guest.lines[1].line_id.clone(), 4)
            ]
        );
        assert_eq!((plan.report.merged_lines, plan.report.added_lines), (1, 1));
    }

    #[test]
    fn checkout_keeps_each_variant_line_with_its_line_id() {
        let cart = cart(
            "u:a",
            vec![variant_line("a", "red", 2), variant_line("a", "blue", 1)],
        );
        let offer = |_: &str| CurrentOffer {
            price: Some(Money::new(100, sgd())),
        };
        let (lines, total) = price_checkout(&cart, sgd(), false, offer).unwrap();
        assert_eq!(lines.len(), 2);
        for line in &lines {
            let source = cart
                .lines
                .iter()
                .find(|l| Some(&l.line_id) == line.line_id.as_ref())
                .unwrap();
            assert_eq!(line.variant, source.variant);
            assert_eq!(line.quantity, source.quantity);
        }
        assert_eq!(total, Money::new(300, sgd()));
    }
}
