//! The cart lifecycle's decisions: merging a guest cart into a user's cart and pricing a
//! checkout (order ids and statuses are in `order`). Pure functions; the store executes what
//! they decide.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cart::{CatalogItem, StoredCart, StoredLine, MAX_QUANTITY};
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
    pub currency: Currency,
    pub writes: Vec<MergeWrite>,
    pub report: MergeReport,
}

/// The reason a guest line is skipped when the user's home catalog does not sell its item in
/// the user's currency (no price in it, inactive, or absent).
pub const NOT_SOLD_IN_REGION: &str = "not_sold_in_region";

/// The currency the user's cart has after a merge: its own while it holds lines, else the
/// user's home region's (an empty cart is as good as a new one).
pub fn merge_currency(user: &StoredCart, home_currency: Currency) -> Currency {
    match user.currency {
        Some(currency) if !user.lines.is_empty() => currency,
        _ => home_currency,
    }
}

/// Whether merging `guest` into `user` re-prices the guest's lines: the guest cart is in
/// another currency than the user's cart will be (a guest who shopped in another region).
pub fn merge_reprices(user: &StoredCart, guest: &StoredCart, home_currency: Currency) -> bool {
    let currency = merge_currency(user, home_currency);
    !guest.lines.is_empty() && guest.currency.is_some_and(|guest| guest != currency)
}

/// Decides how `guest` merges into `user`. Lines with the same line id combine; the same item in
/// different variants stays in separate lines. Existing user lines keep their captured price
/// (except under `keep_guest`, where the guest's line wins whole); guest lines keep theirs.
/// New lines beyond `max_lines` are skipped and reported.
///
/// A guest cart in another currency than the user's (see [`merge_reprices`]) is re-priced
/// first: each guest line takes the current price, in the user's currency, of `home_catalog`
/// (the user's home region's catalog); a line whose item that catalog does not sell in that
/// currency (no price, inactive, absent) is skipped as [`NOT_SOLD_IN_REGION`].
pub fn plan_merge<'a>(
    user: &StoredCart,
    guest: &StoredCart,
    strategy: MergeStrategy,
    max_lines: u32,
    home_currency: Currency,
    home_catalog: impl Fn(&str) -> Option<&'a CatalogItem>,
) -> MergePlan {
    let currency = merge_currency(user, home_currency);
    let reprice = merge_reprices(user, guest, home_currency);
    let mut report = MergeReport::default();
    let mut writes = Vec::new();
    let mut line_count = user.lines.len();
    for guest_line in &guest.lines {
        let repriced;
        let line = if reprice {
            let price = home_catalog(&guest_line.item_id)
                .filter(|item| item.active)
                .and_then(|item| item.price_in(currency));
            let Some(price) = price else {
                report.skipped.push(Skipped {
                    line_id: guest_line.line_id.clone(),
                    item_id: guest_line.item_id.clone(),
                    reason: NOT_SOLD_IN_REGION.into(),
                });
                continue;
            };
            repriced = StoredLine {
                unit_price_minor: price.amount_minor,
                ..guest_line.clone()
            };
            &repriced
        } else {
            guest_line
        };
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
    MergePlan {
        currency,
        writes,
        report,
    }
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

    /// A merge of carts in one currency (no catalog needed).
    fn merged(
        user: &StoredCart,
        guest: &StoredCart,
        strategy: MergeStrategy,
        max: u32,
    ) -> MergePlan {
        plan_merge(user, guest, strategy, max, sgd(), |_| None)
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
            let plan = merged(&user, &guest, strategy, 100);
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
        let plan = merged(&user, &guest, MergeStrategy::Sum, 100);
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
        let plan = merged(&user, &guest, MergeStrategy::Sum, 2);
        assert_eq!(plan.report.added_lines, 1);
        assert_eq!(plan.report.skipped.len(), 1);
        assert_eq!(plan.report.skipped[0].reason, "cart_full");
    }

    #[test]
    fn a_guest_cart_in_another_currency_is_repriced_from_the_home_catalog() {
        let thb = Currency::parse("THB").unwrap();
        let user = cart("u:a", vec![line("a", 1, 100)]);
        let mut guest = cart(
            "g:s",
            vec![
                line("a", 2, 2600),
                line("b", 1, 5200),
                line("thai", 1, 900),
                line("retired", 1, 900),
                line("gone", 1, 900),
            ],
        );
        guest.currency = Some(thb);
        let offer = |id: &str, active: bool, prices: Vec<Money>| CatalogItem {
            item_id: id.into(),
            name: id.into(),
            active,
            stock: 10,
            prices,
        };
        let catalog = [
            offer("a", true, vec![Money::new(110, sgd())]),
            offer(
                "b",
                true,
                vec![Money::new(210, sgd()), Money::new(5200, thb)],
            ),
            offer("thai", true, vec![Money::new(900, thb)]),
            offer("retired", false, vec![Money::new(300, sgd())]),
        ];
        let lookup = |id: &str| catalog.iter().find(|item| item.item_id == id);
        assert!(merge_reprices(&user, &guest, sgd()));
        for strategy in [MergeStrategy::Sum, MergeStrategy::KeepGuest] {
            let plan = plan_merge(&user, &guest, strategy, 10, sgd(), lookup);
            assert_eq!(plan.currency, sgd());
            let writes = quantities(&plan);
            // The shared line keeps the user's price under sum, takes the guest's (re-priced
            // in SGD) under keep_guest; the new line arrives at the SGD catalog price.
            let shared_price = if strategy == MergeStrategy::Sum {
                100
            } else {
                110
            };
            let shared_quantity = if strategy == MergeStrategy::Sum { 3 } else { 2 };
            assert_eq!(
                writes,
                [
                    ("a".to_string(), shared_quantity, shared_price),
                    ("b".to_string(), 1, 210)
                ],
                "{strategy:?}"
            );
            let skipped: Vec<(&str, &str)> = plan
                .report
                .skipped
                .iter()
                .map(|s| (s.item_id.as_str(), s.reason.as_str()))
                .collect();
            assert_eq!(
                skipped,
                [
                    ("thai", NOT_SOLD_IN_REGION),
                    ("retired", NOT_SOLD_IN_REGION),
                    ("gone", NOT_SOLD_IN_REGION)
                ]
            );
            assert_eq!((plan.report.merged_lines, plan.report.added_lines), (1, 1));
        }
        // An empty user cart takes the home region's currency, so a THB guest cart is
        // re-priced into SGD there too; a guest cart in the user's currency is not.
        let empty = StoredCart::empty("u:b");
        let plan = plan_merge(&empty, &guest, MergeStrategy::Sum, 10, sgd(), lookup);
        assert_eq!(plan.currency, sgd());
        assert_eq!(
            quantities(&plan),
            [("a".to_string(), 2, 110), ("b".to_string(), 1, 210)]
        );
        let plan = plan_merge(&empty, &guest, MergeStrategy::Sum, 10, thb, lookup);
        assert_eq!(plan.currency, thb);
        assert!(plan.report.skipped.is_empty());
        assert_eq!(quantities(&plan)[0], ("a".to_string(), 2, 2600));
    }

    #[test]
    fn an_empty_guest_cart_changes_nothing() {
        let user = cart("u:a", vec![line("a", 1, 1)]);
        let mut guest = cart("g:s", vec![line("a", 1, 1)]);
        guest.lines.clear();
        let plan = merged(&user, &guest, MergeStrategy::Sum, 10);
        assert!(plan.writes.is_empty());
        assert_eq!(plan.report, MergeReport::default());
        // A user without a cart takes the guest's currency.
        let none = StoredCart::empty("u:b");
        let guest = cart("g:s", vec![line("a", 1, 1)]);
        let plan = merged(&none, &guest, MergeStrategy::Sum, 10);
        assert_eq!(plan.currency, sgd());
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
        let plan = merged(&user, &guest, MergeStrategy::Sum, 10);
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
