//! Serving owners whose cart the ring is moving to another shard (`moving_from` in the ring
//! file): a read finds the cart on the new shard or, not moved yet, on the old one; a write
//! first moves the cart ([`ensure_moved`]), then applies on the new shard as usual.
//!
//! The steps are `store::moves`' (freeze and mark on the old shard, copy on the new). A write
//! runs at the owner's home edge, which holds the new shard's primary; the old shard's primary
//! is here too for an owner homed in a region (both shards are that region's), or, for an owner
//! on the global ring, possibly in another region, whose edge runs freeze and mark
//! (`forward::moves`, answered by `internal::move_step`).
//!
//! The same steps move the carts of users whose tokens gained a `region` claim while the ring
//! names `claims_from_global` ([`move_claims`], `cartedge ring move --claims`): from where the
//! global ring placed them to their claimed region's ring.

use super::command::Placed;
use super::error::ApiError;
use super::relay;
use crate::app::App;
use crate::domain::cart::StoredCart;
use crate::domain::ids::{OwnerKey, RegionId, UserId};
use crate::domain::ring::{Placement, Ring};
use crate::forward::moves::{self as remote, Request};
use crate::store::moves::{self, Copied, Freeze, Located};
use crate::store::{Source, Store, StoreError};
use futures_util::StreamExt;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

/// How long a client waits before retrying a write whose cart's old home did not answer.
const MOVE_RETRY_AFTER_SECS: u32 = 2;

/// What [`ensure_moved`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The owner had no cart on the old shard.
    Nothing,
    /// The cart was moved before.
    Before,
    /// This call copied the cart (and marked the old row).
    Now,
}

/// Moves `owner`'s cart from `from` (where the previous ring placed it) to `to_shard` (homed
/// here), unless done before. Every step is idempotent, so a retry after any failure converges.
pub async fn ensure_moved(
    app: &App,
    owner: &OwnerKey,
    from: Placement<'_>,
    to_shard: &str,
) -> Result<Moved, ApiError> {
    let request = Request {
        owner: owner.as_str().to_string(),
        from_shard: from.shard.to_string(),
        to_shard: to_shard.to_string(),
    };
    let frozen = if app.store.is_home(from.shard) {
        moves::freeze(&app.store, from.shard, owner.as_str(), to_shard).await?
    } else {
        let forwarder = relay::forwarder_to(app, from.home)?;
        remote::freeze::<Freeze>(
            forwarder,
            from.home,
            &app.config.region.id,
            app.topology().ring.fingerprint(),
            &request,
        )
        .await
        .map_err(|error| old_home_unreachable(&error, &from))?
    };
    let snapshot = match frozen {
        Freeze::Absent => return Ok(Moved::Nothing),
        Freeze::Moved { .. } => return Ok(Moved::Before),
        Freeze::Frozen { snapshot } => snapshot,
    };
    let mut snapshot = snapshot;
    let repriced = reprice(app, &mut snapshot).await?;
    let copied = moves::copy(&app.store, to_shard, &snapshot).await?;
    if repriced && copied == Copied::Now {
        // The copy is a new state of the cart (one version up): caches holding the old one
        // are fenced here and in the other regions, as after any write.
        let cart = app.store.load_from_primary(to_shard, owner).await?;
        app.store.cache.store_committed(&cart).await;
        app.invalidate_elsewhere(owner, cart.version);
    }
    if app.store.is_home(from.shard) {
        moves::mark(&app.store, from.shard, owner.as_str(), to_shard).await?;
    } else {
        let forwarder = relay::forwarder_to(app, from.home)?;
        remote::mark(
            forwarder,
            from.home,
            &app.config.region.id,
            app.topology().ring.fingerprint(),
            &request,
        )
        .await
        .map_err(|error| old_home_unreachable(&error, &from))?;
    }
    app.metrics.edge.carts_moved.inc();
    tracing::info!(owner = %owner, from = %from.shard, to = to_shard, version = snapshot.version, "cart moved");
    Ok(match copied {
        Copied::Now => Moved::Now,
        Copied::Before => Moved::Before,
    })
}

/// The 503 of a move whose old shard's home edge did not answer a step: retried shortly.
fn old_home_unreachable(error: &dyn std::fmt::Display, from: &Placement<'_>) -> ApiError {
    ApiError::home_unreachable(&error, from.home, MOVE_RETRY_AFTER_SECS, None)
}

/// A cart moving to a shard homed in a region with another currency (an owner on the global
/// ring whose home changes with its shard) is priced from this, its new home region's,
/// catalog, as a merge re-prices a guest cart: a cart is always in its home region's currency.
/// A line this catalog does not sell in that currency is dropped (logged). The copy is then
/// another cart than the frozen one, so it takes the next version: caches and clients that saw
/// the frozen version see it change. Returns whether the cart was re-priced.
async fn reprice(app: &App, snapshot: &mut moves::Snapshot) -> Result<bool, ApiError> {
    let currency = app.config.region.currency;
    if snapshot.cart.get("currency").and_then(|c| c.as_str()) == Some(currency.as_str()) {
        return Ok(false);
    }
    let lines = snapshot.items.as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = lines
        .iter()
        .filter_map(|line| line.get("item_id")?.as_str())
        .collect();
    let catalog = app.store.own_catalog().get_fresh_many(&ids).await?;
    let mut priced = Vec::with_capacity(lines.len());
    for mut line in lines {
        let item = line
            .get("item_id")
            .and_then(|i| i.as_str())
            .unwrap_or_default();
        let Some(price) = catalog.get(item).and_then(|entry| entry.price_in(currency)) else {
            tracing::warn!(owner = %snapshot.owner, item, %currency, "line not sold in the cart's new home; left out of the move");
            continue;
        };
        if let Some(fields) = line.as_object_mut() {
            fields.insert("unit_price_minor".into(), price.amount_minor.into());
            fields.insert("currency".into(), currency.as_str().into());
        }
        priced.push(line);
    }
    snapshot.items = serde_json::Value::Array(priced);
    if let Some(fields) = snapshot.cart.as_object_mut() {
        fields.insert("currency".into(), currency.as_str().into());
        fields.insert("version".into(), (snapshot.version + 1).into());
    }
    Ok(true)
}

/// Moves a placed owner's cart to its shard if the ring is moving it (a no-op otherwise, and
/// when the new shard already holds the cart: the write after a move costs one primary read,
/// not a round of steps on the old shard, which may be another region's).
pub async fn settle_placed(app: &App, placed: &Placed<'_>) -> Result<(), ApiError> {
    if let Some(from) = placed.moving_from {
        if !moves::holds_cart(&app.store, placed.shard, placed.key.as_str()).await? {
            ensure_moved(app, &placed.key, from, placed.shard).await?;
        }
    }
    Ok(())
}

/// Reads a moving owner's cart: the new shard (cache first) when it holds the cart, else the
/// old shard's row, unless that row says it moved, in which case the new shard is read again
/// no lower than the version the row moved at (the caller's replica checks then apply, as for
/// any read). Returns what `Store::load_cart` returns.
pub async fn load(
    app: &App,
    placed: &Placed<'_>,
    from: Placement<'_>,
    min_version: i64,
) -> Result<(StoredCart, Source, i64), ApiError> {
    let (cart, source, min_version) = app
        .store
        .load_cart(placed.shard, &placed.key, min_version)
        .await?;
    if cart.version > 0 {
        return Ok((cart, source, min_version));
    }
    match moves::locate(&app.store, from.shard, &placed.key, min_version).await? {
        Located::Here(old) if old.version == 0 => Ok((cart, source, min_version)),
        Located::Here(old) => {
            // Not moved yet: the old row is the cart, at a version the copy will keep.
            app.store.cache.fill(&old).await;
            let source = if app.store.is_home(from.shard) && old.version < min_version {
                Source::Primary
            } else {
                Source::Replica
            };
            Ok((old, source, min_version))
        }
        Located::Moved { version, .. } => {
            let min_version = min_version.max(version);
            let (cart, source) = app
                .store
                .read_from_database(placed.shard, &placed.key, min_version)
                .await?;
            app.store.cache.fill(&cart).await;
            Ok((cart, source, min_version))
        }
    }
}

/// How `ring move` places a user owner found on an old shard: the owner key does not say
/// whether the user's tokens carry a `region` claim, which decides between the ring of the
/// shard's home region and the global ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserHomes {
    /// Either, as far as the cart's old shard tells: a placement that would not have put the
    /// cart there is ruled out; when both remain and disagree about the new shard, the owner is
    /// [`Decision::Ambiguous`] and left to its first write (which knows its token).
    Auto,
    /// Tokens carry a `region` claim: a user on a shard is homed in that shard's region.
    Claimed,
    /// Tokens carry no claim: users are placed on the global ring.
    Global,
}

impl UserHomes {
    pub fn parse(text: &str) -> Option<UserHomes> {
        match text {
            "auto" => Some(UserHomes::Auto),
            "claimed" => Some(UserHomes::Claimed),
            "global" => Some(UserHomes::Global),
            _ => None,
        }
    }
}

/// What the moving ring means for an owner whose cart row is on a shard of the previous ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// The cart stays (or the row is not where the previous ring put the owner: an earlier
    /// ring's leftover).
    Stays,
    /// The cart moves from the previous placement to the shard named.
    Moves(Placement<'a>, &'a str),
    /// The owner's placement depends on its token's claim, which decides between a move and
    /// none (or two targets): moved by its first write, or by `--users claimed|global`.
    Ambiguous,
}

/// Where the current ring places an owner found on `shard` (a shard of the previous ring).
pub fn target<'a>(app: &'a App, owner: &str, shard: &str, users: UserHomes) -> Decision<'a> {
    target_on(&app.topology().ring, owner, shard, users)
}

/// [`target`] on a given moving ring.
pub fn target_on<'a>(ring: &'a Ring, owner: &str, shard: &str, users: UserHomes) -> Decision<'a> {
    let Some(previous) = ring.previous() else {
        return Decision::Stays;
    };
    let shard_home = previous
        .spec()
        .shards
        .iter()
        .find(|s| s.id == shard)
        .map(|s| s.home.to_string());
    let homes: Vec<Option<String>> = if owner.starts_with("g:") {
        vec![super::command::guest_home(&OwnerKey::from_stored(
            owner.to_string(),
        ))]
    } else {
        match users {
            UserHomes::Auto => vec![shard_home, None],
            UserHomes::Claimed => vec![shard_home],
            UserHomes::Global => vec![None],
        }
    };
    // Only a placement that put the cart on this shard can be the owner's.
    let mut outcomes = homes.iter().filter_map(|home| {
        let before = previous.place(owner, home.as_deref())?;
        if before.shard != shard {
            return None;
        }
        Some((before, ring.place(owner, home.as_deref())?.shard))
    });
    let Some((before, to)) = outcomes.next() else {
        return Decision::Stays;
    };
    if outcomes.any(|(_, other)| other != to) {
        return Decision::Ambiguous;
    }
    if to == before.shard {
        Decision::Stays
    } else {
        Decision::Moves(before, to)
    }
}

/// What one pass of [`move_page`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageReport {
    /// Owners with a cart row read on the shard.
    pub scanned: u64,
    /// Owners whose cart moves to a shard homed here, and were moved (now or before).
    pub moved: u64,
    /// Owners whose cart moves to a shard homed in another region (moved by that region's run).
    pub elsewhere: u64,
    /// Moves that failed (retried by the next run).
    pub errors: u64,
    /// Owners whose placement depends on their token's claim (see [`Decision::Ambiguous`]).
    pub ambiguous: u64,
    /// The cursor to continue after; None when the shard is done.
    pub next: Option<String>,
}

/// Moves (or, with `act == false`, only counts) one page of owners of `shard` (a shard of the
/// previous ring) after the cursor `after`: those the current ring places on a shard homed
/// here, `concurrency` at a time. Safe to stop and rerun: every step is idempotent and a moved
/// row is never read as unmoved again.
pub async fn move_page(
    app: &App,
    shard: &str,
    after: &str,
    limit: i64,
    concurrency: usize,
    users: UserHomes,
    act: bool,
) -> Result<PageReport, ApiError> {
    let owners = moves::unmoved_owners(&app.store, shard, after, limit).await?;
    let mut report = PageReport {
        scanned: owners.len() as u64,
        next: (owners.len() as i64 == limit)
            .then(|| owners.last().cloned())
            .flatten(),
        ..PageReport::default()
    };
    let mut local = Vec::new();
    for owner in &owners {
        let (from, to) = match target(app, owner, shard, users) {
            Decision::Stays => continue,
            Decision::Ambiguous => {
                report.ambiguous += 1;
                continue;
            }
            Decision::Moves(from, to) => (from, to),
        };
        if app.store.is_home(to) {
            local.push((owner.clone(), from, to));
        } else {
            report.elsewhere += 1;
        }
    }
    if !act {
        report.moved = local.len() as u64;
        return Ok(report);
    }
    // The futures are built in a loop, not by a closure over the items, so the stream stays
    // `Send` for callers that spawn it.
    let mut pending = Vec::with_capacity(local.len());
    for (owner, from, to) in local {
        pending
            .push(async move { ensure_moved(app, &OwnerKey::from_stored(owner), from, to).await });
    }
    let results: Vec<Result<Moved, ApiError>> = futures_util::stream::iter(pending)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    for result in results {
        match result {
            Ok(_) => report.moved += 1,
            Err(error) => {
                report.errors += 1;
                tracing::warn!(%error, shard, "cart move failed; the next run retries it");
            }
        }
    }
    Ok(report)
}

/// How many owners with a cart on a shard of `ring`'s previous ring the ring still moves
/// elsewhere (their old row not marked moved), and how many are ambiguous: what `check-config`
/// asks the old shards before the `moving_from` marker may go. Read on this region's replicas.
pub async fn count_unmoved(
    store: &Store,
    ring: &Ring,
    users: UserHomes,
) -> Result<(u64, u64), StoreError> {
    const PAGE: i64 = 1_000;
    let Some(previous) = ring.previous() else {
        return Ok((0, 0));
    };
    let (mut left, mut ambiguous) = (0, 0);
    for shard in &previous.spec().shards {
        let mut cursor = String::new();
        loop {
            let owners = moves::unmoved_owners(store, &shard.id, &cursor, PAGE).await?;
            for owner in &owners {
                match target_on(ring, owner, &shard.id, users) {
                    Decision::Stays => {}
                    Decision::Moves(..) => left += 1,
                    Decision::Ambiguous => ambiguous += 1,
                }
            }
            match owners.last() {
                Some(last) if owners.len() as i64 == PAGE => cursor = last.clone(),
                _ => break,
            }
        }
    }
    Ok((left, ambiguous))
}

/// One line of a `ring move --claims` file: a user whose tokens now name `region`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedUser {
    /// The line of the file it came from (from 1), for messages.
    pub line: usize,
    pub user: UserId,
    pub region: RegionId,
}

/// Why `ring move --claims` moved nothing.
#[derive(Debug, thiserror::Error)]
pub enum ClaimsError {
    #[error(
        "the ring does not name claims_from_global = true, so edges would not find these users' \
         carts on their global shards: set the marker and roll the ring to every edge first"
    )]
    NoMarker,
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Reads a claims file: one `user_id,region` (or `user_id region`) per line; blank lines and
/// `#` comments are skipped. A malformed line, a region that homes no shard of `ring`, or a
/// user listed again with another region is an error naming its line, so a bad file moves
/// nothing. A user listed twice with the same region counts once.
pub fn parse_claims(text: &str, ring: &Ring) -> Result<Vec<ClaimedUser>, ClaimsError> {
    let mut users = Vec::new();
    let mut seen: BTreeMap<String, (usize, RegionId)> = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let bad = |message: String| ClaimsError::Line { line, message };
        let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
        if content.is_empty() {
            continue;
        }
        let fields: Vec<&str> = if content.contains(',') {
            content.split(',').map(str::trim).collect()
        } else {
            content.split_whitespace().collect()
        };
        let [user, region] = fields[..] else {
            return Err(bad(format!("expected `user_id,region`, found {content:?}")));
        };
        let user = UserId::parse(user).map_err(|error| bad(format!("{user:?}: {error}")))?;
        let region =
            RegionId::parse(region).map_err(|error| bad(format!("{region:?}: {error}")))?;
        if !ring.homes_shards(region.as_str()) {
            return Err(bad(format!("region {region} homes no shard of the ring")));
        }
        match seen.entry(user.as_str().to_string()) {
            Entry::Occupied(first) if first.get().1 != region => {
                return Err(bad(format!(
                    "user {} is listed on line {} with region {}",
                    user.as_str(),
                    first.get().0,
                    first.get().1
                )));
            }
            Entry::Occupied(_) => continue,
            Entry::Vacant(slot) => {
                slot.insert((line, region.clone()));
            }
        }
        users.push(ClaimedUser { line, user, region });
    }
    Ok(users)
}

/// What a claims file asks of the region `here`.
#[derive(Debug, Default)]
pub struct ClaimsPlan<'a> {
    /// Users claimed by `here`.
    pub users_here: u64,
    /// Those of them the global ring placed on another shard than their claim's: the owner,
    /// its global placement and its claimed shard (homed here).
    pub moves: Vec<(OwnerKey, Placement<'a>, &'a str)>,
    /// Users claimed by other regions, by region: that region's run moves them (the copy needs
    /// the new shard's primary).
    pub elsewhere: BTreeMap<String, u64>,
}

/// The claims file's plan for this edge's region on the ring it runs; refused unless the ring
/// names `claims_from_global`.
fn claims_here<'a>(app: &'a App, file: &str) -> Result<ClaimsPlan<'a>, ClaimsError> {
    let ring = &app.topology().ring;
    if !ring.claims_from_global() {
        return Err(ClaimsError::NoMarker);
    }
    let users = parse_claims(file, ring)?;
    Ok(plan_claims(ring, &app.config.region.id, &users))
}

/// Splits a claims file's users into this region's moves and the other regions' counts. Empty
/// of moves unless `ring` names `claims_from_global`.
pub fn plan_claims<'a>(ring: &'a Ring, here: &str, users: &[ClaimedUser]) -> ClaimsPlan<'a> {
    let mut plan = ClaimsPlan::default();
    for claimed in users {
        if claimed.region != here {
            *plan
                .elsewhere
                .entry(claimed.region.to_string())
                .or_default() += 1;
            continue;
        }
        plan.users_here += 1;
        let key = crate::domain::ids::Owner::User(claimed.user.clone()).key();
        let (Some(from), Some(to)) = (
            ring.unclaimed_placement(key.as_str(), here),
            ring.locate_in(key.as_str(), here),
        ) else {
            continue;
        };
        plan.moves.push((key, from, to.shard.as_str()));
    }
    plan
}

/// What `ring move --claims` did in this region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimsReport {
    /// The file's users claimed by this region.
    pub users_here: u64,
    /// Those whose global placement is another shard than their claim's.
    pub to_move: u64,
    /// Of those, done: copied now, moved before, or without a cart to move.
    pub moved: u64,
    /// Carts this run copied.
    pub copied: u64,
    /// Moves that failed (retried by the next run).
    pub errors: u64,
    /// Users claimed by other regions, by region.
    pub elsewhere: BTreeMap<String, u64>,
}

/// `cartedge ring move --claims`: moves the carts of the file's users claimed by this region
/// from their global shard to their claimed one, `batch` users at a time (`progress` is called
/// after each batch), `concurrency` moves in flight. The whole file is read before anything
/// moves; refused unless the ring names `claims_from_global`. Safe to stop and rerun: a moved
/// cart's move answers [`Moved::Before`].
pub async fn move_claims(
    app: &App,
    file: &str,
    batch: usize,
    concurrency: usize,
    mut progress: impl FnMut(&ClaimsReport),
) -> Result<ClaimsReport, ClaimsError> {
    let plan = claims_here(app, file)?;
    let mut report = ClaimsReport {
        users_here: plan.users_here,
        to_move: plan.moves.len() as u64,
        elsewhere: plan.elsewhere,
        ..ClaimsReport::default()
    };
    for chunk in plan.moves.chunks(batch.max(1)) {
        // Built in a loop, not by a closure over the items, so the stream stays `Send`.
        let mut pending = Vec::with_capacity(chunk.len());
        for (owner, from, to) in chunk {
            pending.push(async move { ensure_moved(app, owner, *from, to).await });
        }
        let results: Vec<Result<Moved, ApiError>> = futures_util::stream::iter(pending)
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        for result in results {
            match result {
                Ok(moved) => {
                    report.moved += 1;
                    report.copied += u64::from(moved == Moved::Now);
                }
                Err(error) => {
                    report.errors += 1;
                    tracing::warn!(%error, "claimed cart move failed; the next run retries it");
                }
            }
        }
        progress(&report);
    }
    Ok(report)
}

/// What `ring move --claims --status` found in this region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimsLeft {
    /// The file's users claimed by this region.
    pub users_here: u64,
    /// Those whose global placement is another shard than their claim's.
    pub to_move: u64,
    /// Of those, the ones whose global shard still holds their cart (not marked moved).
    pub left: u64,
    /// Users claimed by other regions, by region (their own `--status` answers for them).
    pub elsewhere: BTreeMap<String, u64>,
}

/// How many of the file's users claimed by this region still have a cart on their global
/// shard, read on this region's replica of it (`concurrency` reads in flight). Moves nothing.
pub async fn claims_status(
    app: &App,
    file: &str,
    concurrency: usize,
) -> Result<ClaimsLeft, ClaimsError> {
    let plan = claims_here(app, file)?;
    let mut pending = Vec::with_capacity(plan.moves.len());
    for (owner, from, _) in &plan.moves {
        pending.push(async move {
            match moves::locate(&app.store, from.shard, owner, 0).await? {
                Located::Here(cart) => Ok::<bool, StoreError>(cart.version > 0),
                Located::Moved { .. } => Ok(false),
            }
        });
    }
    let results: Vec<Result<bool, StoreError>> = futures_util::stream::iter(pending)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut left = 0;
    for result in results {
        left += u64::from(result.map_err(ApiError::from)?);
    }
    Ok(ClaimsLeft {
        users_here: plan.users_here,
        to_move: plan.moves.len() as u64,
        left,
        elsewhere: plan.elsewhere,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ring::{sample_owner_keys, test_spec as spec};

    fn moving_ring(added: (&str, &str)) -> Ring {
        let old = spec(1, &[("sg-1", "sg"), ("id-1", "id")]);
        let mut new = spec(2, &[("sg-1", "sg"), ("id-1", "id"), added]);
        new.moving_from = Some(1);
        Ring::moving(new, Ring::new(old).unwrap()).unwrap()
    }

    fn claims_ring(marked: bool) -> Ring {
        let mut spec = spec(1, &[("sg-1", "sg"), ("sg-2", "sg"), ("id-1", "id")]);
        spec.claims_from_global = marked;
        Ring::new(spec).unwrap()
    }

    fn line_error(text: &str) -> (usize, String) {
        match parse_claims(text, &claims_ring(true)) {
            Err(ClaimsError::Line { line, message }) => (line, message),
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn a_claims_file_takes_commas_or_whitespace_and_skips_comments_and_blank_lines() {
        let text = "# exported from the identity provider\n\nalice,sg\n  bob   id  \n\
                    carol , sg # moved to Singapore\nalice,sg\n";
        let users = parse_claims(text, &claims_ring(true)).unwrap();
        let read: Vec<(usize, &str, &str)> = users
            .iter()
            .map(|u| (u.line, u.user.as_str(), u.region.as_str()))
            .collect();
        assert_eq!(
            read,
            [(3, "alice", "sg"), (4, "bob", "id"), (5, "carol", "sg")],
            "the repeated line counts once"
        );
    }

    #[test]
    fn a_bad_claims_line_is_refused_with_its_line_number() {
        assert_eq!(line_error("alice,sg\nbob\n").0, 2);
        assert_eq!(line_error("alice,sg,extra\n").0, 1);
        assert_eq!(line_error("alice sg extra\n").0, 1);
        let (line, message) = line_error("alice,sg\n\nbob,vn\n");
        assert_eq!(line, 3);
        assert!(message.contains("region vn homes no shard"), "{message}");
        let (line, message) = line_error("al ice!,sg\n");
        assert_eq!(line, 1);
        assert!(message.contains("user id must match"), "{message}");
        let (line, message) = line_error("alice,sg\nalice,id\n");
        assert_eq!(line, 2);
        assert!(
            message.contains("listed on line 1 with region sg"),
            "{message}"
        );
        assert_eq!(line_error("alice,SG!\n").0, 1);
    }

    #[test]
    fn a_claims_plan_moves_only_this_regions_users_whose_global_shard_differs() {
        let ring = claims_ring(true);
        let keys: Vec<String> = users().take(400).collect();
        let text: String = keys
            .iter()
            .enumerate()
            .map(|(n, key)| {
                let region = if n % 2 == 0 { "id" } else { "sg" };
                format!("{},{region}\n", key.trim_start_matches("u:"))
            })
            .collect();
        let users = parse_claims(&text, &ring).unwrap();
        let plan = plan_claims(&ring, "id", &users);
        assert_eq!(plan.users_here, 200);
        assert_eq!(plan.elsewhere, BTreeMap::from([("sg".to_string(), 200)]));
        assert!(!plan.moves.is_empty());
        let moving: Vec<&str> = plan.moves.iter().map(|(k, ..)| k.as_str()).collect();
        for (n, key) in keys.iter().enumerate().filter(|(n, _)| n % 2 == 0) {
            let (global, claimed) = (ring.locate(key), ring.locate_in(key, "id").unwrap());
            assert_eq!(
                moving.contains(&key.as_str()),
                global.shard != claimed.shard,
                "{n}"
            );
        }
        for (_, from, to) in &plan.moves {
            assert_ne!(*from.home, "id");
            assert_eq!(*to, "id-1");
        }
        // Without the marker nothing moves.
        let plain = claims_ring(false);
        assert!(plan_claims(&plain, "id", &users).moves.is_empty());
    }

    fn users() -> impl Iterator<Item = String> {
        sample_owner_keys(4_000)
            .into_iter()
            .filter(|k| k.starts_with("u:"))
    }

    #[test]
    fn a_shard_added_in_the_carts_region_moves_its_users_whatever_their_token() {
        // Both placements that put a cart on sg-1 share its virtual node, so a shard added in
        // sg takes the cart under both or neither: nothing is ambiguous.
        let ring = moving_ring(("sg-2", "sg"));
        let mut moves = 0;
        for key in users() {
            let auto = target_on(&ring, &key, "sg-1", UserHomes::Auto);
            assert_eq!(
                auto,
                target_on(&ring, &key, "sg-1", UserHomes::Claimed),
                "{key}"
            );
            moves += usize::from(matches!(auto, Decision::Moves(_, "sg-2")));
        }
        assert!(moves > 300, "{moves}");
    }

    #[test]
    fn a_shard_added_elsewhere_leaves_users_whose_token_decides_to_their_first_write() {
        // id-2 takes global-ring owners from sg-1, never owners homed in sg: a user found on
        // sg-1 whom both rings put there is undecided; one only the regional ring puts there
        // stays.
        let ring = moving_ring(("id-2", "id"));
        let previous = ring.previous().unwrap();
        let mut ambiguous = 0;
        for key in users() {
            let global = target_on(&ring, &key, "sg-1", UserHomes::Global);
            match target_on(&ring, &key, "sg-1", UserHomes::Auto) {
                Decision::Ambiguous => {
                    ambiguous += 1;
                    assert!(matches!(global, Decision::Moves(_, "id-2")), "{key}");
                }
                Decision::Stays => {
                    assert!(
                        previous.locate(&key).shard != "sg-1" || global == Decision::Stays,
                        "{key}"
                    );
                }
                Decision::Moves(..) => panic!("{key}: a claimed user would stay on sg-1"),
            }
            assert_eq!(
                target_on(&ring, &key, "sg-1", UserHomes::Claimed),
                Decision::Stays
            );
        }
        assert!(ambiguous > 50, "{ambiguous}");
    }
}
