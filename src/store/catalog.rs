//! A region's catalog: items, their names, a price per currency in minor units, stock and an
//! active flag. Each region has its own (priced in its currency, its stock reserved on its
//! primary); a [`Catalog`] reads one of them, this region's own or a replica of a peer's.
//!
//! Cart views need every line's current price on every read, so entries are reused in-process
//! for `cart.catalog_cache_ttl` (a few seconds). An entry past its TTL is still served for up to
//! [`MAX_STALENESS`] while one background task refreshes it, so expiry never stampedes the
//! database; only entries never seen (or far too old) are read inline. Adds read the catalog
//! fresh: the price a line captures and the `price_mismatch` check must not be seconds old. The
//! admin functions at the bottom back the `cartedge catalog …` commands.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use super::StoreError;
use crate::domain::cart::CatalogItem;
use crate::domain::money::{Currency, Money};

/// Bounds the in-process cache; past it the cache is cleared (entries are cheap to re-read).
const MAX_CACHED_ITEMS: usize = 200_000;
/// How far past its TTL an entry may be served while its refresh runs.
const MAX_STALENESS: Duration = Duration::from_secs(30);

const SELECT_ITEMS: &str =
    "SELECT i.item_id, i.active, i.stock, i.name, p.currency, p.amount_minor \
     FROM catalog_items i LEFT JOIN catalog_prices p ON p.item_id = i.item_id \
     WHERE i.item_id = ANY($1)";

type Entry = (Instant, Option<Arc<CatalogItem>>);

#[derive(Clone)]
pub struct Catalog {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    ttl: Duration,
    entries: RwLock<HashMap<String, Entry>>,
    /// Whether a background refresh is running (at most one at a time).
    refreshing: AtomicBool,
    /// Advanced whenever what an item's entry says changes (or entries are dropped), so
    /// something rendered from entries can tell it is still what a render would give.
    epoch: AtomicU64,
}

/// Current catalog entries for a set of items; `complete` is false when the catalog could not
/// be read, so views can say prices are unknown instead of calling items unavailable.
pub struct Lookup {
    pub items: HashMap<String, Arc<CatalogItem>>,
    pub complete: bool,
}

impl Lookup {
    pub fn get(&self, item_id: &str) -> Option<&CatalogItem> {
        self.items.get(item_id).map(Arc::as_ref)
    }
}

impl Catalog {
    pub fn new(pool: Pool, ttl: Duration) -> Catalog {
        Catalog {
            inner: Arc::new(Inner {
                pool,
                ttl,
                entries: RwLock::new(HashMap::new()),
                refreshing: AtomicBool::new(false),
                epoch: AtomicU64::new(0),
            }),
        }
    }

    /// Changes whenever a cached entry's content changes; compare it with the value read before
    /// a [`Catalog::lookup`] to tell whether a view rendered from that lookup is still current
    /// (as current as entries up to `cart.catalog_cache_ttl` old are).
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    /// How long entries are reused (`cart.catalog_cache_ttl`).
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The current entry of one item, read from the database (not the in-process cache).
    pub async fn get_fresh(&self, item_id: &str) -> Result<Option<Arc<CatalogItem>>, StoreError> {
        self.inner.get_fresh(item_id).await
    }

    /// The current entries of several items, read from the database in one query (a merge
    /// re-pricing a guest cart); items the catalog does not hold are absent.
    pub async fn get_fresh_many(
        &self,
        ids: &[&str],
    ) -> Result<HashMap<String, Arc<CatalogItem>>, StoreError> {
        let fetched: HashMap<String, Arc<CatalogItem>> = self
            .inner
            .fetch(ids)
            .await?
            .into_iter()
            .map(|(id, item)| (id, Arc::new(item)))
            .collect();
        self.inner.remember(Instant::now(), ids, &fetched);
        Ok(fetched)
    }

    /// Entries for cart views: cached ones (fresh, or stale while a refresh runs), the rest in
    /// one query.
    pub async fn lookup<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Lookup {
        let now = Instant::now();
        let inner = &self.inner;
        let mut items = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        let mut stale: Vec<String> = Vec::new();
        {
            let entries = inner.entries.read().ok();
            for id in ids {
                match entries.as_ref().and_then(|e| e.get(id)) {
                    Some((at, entry)) if now.duration_since(*at) < inner.ttl + MAX_STALENESS => {
                        if now.duration_since(*at) >= inner.ttl {
                            stale.push(id.to_string());
                        }
                        if let Some(item) = entry {
                            items.insert(id.to_string(), item.clone());
                        }
                    }
                    _ => missing.push(id),
                }
            }
        }
        if !stale.is_empty() && !inner.refreshing.swap(true, Ordering::AcqRel) {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let ids: Vec<&str> = stale.iter().map(String::as_str).collect();
                if let Ok(fetched) = inner.fetch(&ids).await {
                    let fetched = fetched.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
                    inner.remember(Instant::now(), &ids, &fetched);
                }
                inner.refreshing.store(false, Ordering::Release);
            });
        }
        if missing.is_empty() {
            return Lookup {
                items,
                complete: true,
            };
        }
        // Boxed: entries are usually cached, and the query's future would size every view's.
        match Box::pin(inner.fetch(&missing)).await {
            Ok(fetched) => {
                let fetched: HashMap<String, Arc<CatalogItem>> =
                    fetched.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
                inner.remember(now, &missing, &fetched);
                items.extend(fetched);
                Lookup {
                    items,
                    complete: true,
                }
            }
            Err(error) => {
                tracing::warn!(%error, "catalog unavailable; cart view without current prices");
                Lookup {
                    items,
                    complete: false,
                }
            }
        }
    }
}

impl Inner {
    async fn fetch(&self, ids: &[&str]) -> Result<HashMap<String, CatalogItem>, StoreError> {
        fetch_items(&self.pool, ids).await
    }
}

/// Reads catalog entries from `pool` in one query.
pub(super) async fn fetch_items(
    pool: &Pool,
    ids: &[&str],
) -> Result<HashMap<String, CatalogItem>, StoreError> {
    {
        let client = pool.get().await?;
        let statement = client.prepare_cached(SELECT_ITEMS).await?;
        let rows = client.query(&statement, &[&ids]).await?;
        let mut items: HashMap<String, CatalogItem> = HashMap::new();
        for row in rows {
            let item_id: String = row.try_get(0)?;
            let entry = items.entry(item_id.clone()).or_insert(CatalogItem {
                item_id,
                active: row.try_get(1)?,
                stock: i64::from(row.try_get::<_, i32>(2)?),
                name: row.try_get(3)?,
                prices: Vec::new(),
            });
            let currency: Option<String> = row.try_get(4)?;
            let amount: Option<i64> = row.try_get(5)?;
            if let (Some(currency), Some(amount)) =
                (currency.as_deref().and_then(Currency::parse), amount)
            {
                entry.prices.push(Money::new(amount, currency));
            }
        }
        Ok(items)
    }
}

impl Inner {
    fn remember(&self, now: Instant, ids: &[&str], found: &HashMap<String, Arc<CatalogItem>>) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut entries) = self.entries.write() {
            let mut changed = false;
            if entries.len() + ids.len() > MAX_CACHED_ITEMS {
                entries.clear();
                changed = true;
            }
            for id in ids {
                let item = found.get(*id).cloned();
                let before = entries.insert(id.to_string(), (now, item.clone()));
                changed |= before.is_some_and(|(_, before)| before != item);
            }
            if changed {
                self.epoch.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    async fn get_fresh(&self, item_id: &str) -> Result<Option<Arc<CatalogItem>>, StoreError> {
        let mut fetched = self.fetch(&[item_id]).await?;
        let found: HashMap<String, Arc<CatalogItem>> = fetched
            .remove(item_id)
            .map(|item| (item_id.to_string(), Arc::new(item)))
            .into_iter()
            .collect();
        self.remember(Instant::now(), &[item_id], &found);
        Ok(found.get(item_id).cloned())
    }
}

/// One row of a catalog import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRow {
    pub item_id: String,
    pub name: String,
    pub stock: i32,
    pub prices: Vec<Money>,
}

/// Inserts or updates items and their prices in one transaction.
pub async fn upsert_items(
    client: &tokio_postgres::Client,
    rows: &[ImportRow],
) -> Result<u64, StoreError> {
    super::tx::run(client, async |client| {
        let item = client
            .prepare(
                "INSERT INTO catalog_items (item_id, name, stock, active) VALUES ($1, $2, $3, true) \
                 ON CONFLICT (item_id) DO UPDATE SET name = EXCLUDED.name, stock = EXCLUDED.stock, \
                 active = true, updated_at = now()",
            )
            .await?;
        let price = client
            .prepare(
                "INSERT INTO catalog_prices (item_id, currency, amount_minor) VALUES ($1, $2, $3) \
                 ON CONFLICT (item_id, currency) DO UPDATE SET amount_minor = EXCLUDED.amount_minor",
            )
            .await?;
        for row in rows {
            client
                .execute(&item, &[&row.item_id, &row.name, &row.stock])
                .await?;
            for money in &row.prices {
                client
                    .execute(
                        &price,
                        &[&row.item_id, &money.currency.as_str(), &money.amount_minor],
                    )
                    .await?;
            }
        }
        Ok(rows.len() as u64)
    })
    .await
}

/// Sets one price; returns whether the item exists.
pub async fn set_price(
    client: &tokio_postgres::Client,
    item_id: &str,
    price: Money,
) -> Result<bool, tokio_postgres::Error> {
    let changed = client
        .execute(
            "INSERT INTO catalog_prices (item_id, currency, amount_minor) \
             SELECT item_id, $2, $3 FROM catalog_items WHERE item_id = $1 \
             ON CONFLICT (item_id, currency) DO UPDATE SET amount_minor = EXCLUDED.amount_minor",
            &[&item_id, &price.currency.as_str(), &price.amount_minor],
        )
        .await?;
    Ok(changed > 0)
}

/// Sets one item's stock; returns whether the item exists.
pub async fn set_stock(
    client: &tokio_postgres::Client,
    item_id: &str,
    stock: i32,
) -> Result<bool, tokio_postgres::Error> {
    let changed = client
        .execute(
            "UPDATE catalog_items SET stock = $2, updated_at = now() WHERE item_id = $1",
            &[&item_id, &stock],
        )
        .await?;
    Ok(changed > 0)
}

/// Demo prices: units of each currency per 1.00 SGD (applied to SGD cents, so the result is in
/// the currency's minor units; VND has none, so its rate is per SGD cent already).
const DEMO_RATES: [(&str, i64); 6] = [
    ("SGD", 1),
    ("IDR", 11_800),
    ("MYR", 3),
    ("THB", 26),
    ("VND", 190),
    ("PHP", 42),
];

/// Loads the demo catalog into one region's catalog: `sku-00001` … `sku-<count>`, stock 1000,
/// priced in `currency` (the region's), the same basket of goods in every region at roughly the
/// same value. A currency without a demo rate is priced as SGD cents. Idempotent: existing items
/// and prices are left as they are, and loading it again in another currency adds those prices.
pub async fn load_demo(
    client: &tokio_postgres::Client,
    count: i32,
    currency: Currency,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO catalog_items (item_id, name, stock, active) \
             SELECT format('sku-%s', lpad(n::text, 5, '0')), format('Demo item %s', n), 1000, true \
             FROM generate_series(1, $1::int) AS n ON CONFLICT (item_id) DO NOTHING",
            &[&count],
        )
        .await?;
    let rate = DEMO_RATES
        .iter()
        .find(|(code, _)| *code == currency.as_str())
        .map_or(1, |(_, rate)| *rate);
    // SGD price in cents: 1.00 to 99.99, spread deterministically over the items.
    client
        .execute(
            "INSERT INTO catalog_prices (item_id, currency, amount_minor) \
             SELECT format('sku-%s', lpad(n::text, 5, '0')), $2::text, \
                    (100 + (n * 7919) % 9900)::bigint * $3::bigint \
             FROM generate_series(1, $1::int) AS n ON CONFLICT (item_id, currency) DO NOTHING",
            &[&count, &currency.as_str(), &rate],
        )
        .await?;
    Ok(())
}

/// The currencies the demo catalog has rates for.
pub fn demo_currencies() -> impl Iterator<Item = Currency> {
    DEMO_RATES
        .iter()
        .filter_map(|(code, _)| Currency::parse(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(price: i64) -> Arc<CatalogItem> {
        Arc::new(CatalogItem {
            item_id: "sku-1".into(),
            name: "one".into(),
            active: true,
            stock: 5,
            prices: vec![Money::new(price, Currency::parse("SGD").unwrap())],
        })
    }

    #[tokio::test]
    async fn the_epoch_moves_when_an_entry_says_something_new_and_only_then() {
        let config: tokio_postgres::Config = "host=127.0.0.1 dbname=unused".parse().unwrap();
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        let pool = Pool::builder(manager).max_size(1).build().unwrap();
        let catalog = Catalog::new(pool, Duration::from_secs(5));
        let remember = |price: Option<i64>| {
            let found = price
                .map(|price| ("sku-1".to_string(), item(price)))
                .into_iter()
                .collect();
            catalog.inner.remember(Instant::now(), &["sku-1"], &found);
        };
        let start = catalog.epoch();
        remember(Some(100));
        assert_eq!(catalog.epoch(), start, "a first sighting changes no view");
        remember(Some(100));
        assert_eq!(
            catalog.epoch(),
            start,
            "a refresh that finds the same entry"
        );
        remember(Some(150));
        assert_eq!(catalog.epoch(), start + 1, "a new price");
        remember(None);
        assert_eq!(catalog.epoch(), start + 2, "the item gone");
    }
}
