//! The consistent-hash rings that place every cart owner on a shard, and each shard's home
//! region.
//!
//! One ring file describes two kinds of ring, built from the same shard list and the same
//! hashing: the **global ring** over every shard (owners without a home region: user tokens
//! without a `region` claim, guest sessions minted before sessions named their region) and one
//! **regional ring** per region over the shards homed there (owners with a home region). An
//! owner's home region therefore decides its region, and the regional ring only picks among that
//! region's shards; the version and fingerprint cover both kinds.
//!
//! Placement must never drift: a silent change would send users to a shard that does not hold
//! their cart. So hashing is pinned here, not left to `Hash` impls that the standard library may
//! change: virtual nodes and keys feed hashring's SipHash with explicit bytes only, and the
//! placement of 10 000 owner keys is checked against a golden file
//! (`tests/golden/ring-placement.txt`).
//!
//! A ring can be **moving**: `moving_from = N` names the ring version whose placement owners
//! are being moved away from (`store::moves`). A moving [`Ring`] holds that previous ring too,
//! so an edge can say where an owner lived before ([`Ring::previous_placement`]). Placement and
//! the fingerprint are the new ring's only: the marker changes neither, so removing it once every
//! owner moved is a no-op for routing, and [`Ring::accepts`] lets edges on either side of the
//! roll (N, and N+1 moving from N) accept each other's forwarded requests.
//!
//! A ring can also name `claims_from_global = true`: users whose tokens now carry a `region`
//! claim may still have their cart where the global ring placed them before the claim
//! ([`Ring::unclaimed_placement`]). Like `moving_from` it changes no placement and is not part
//! of the fingerprint. The two markers are never combined (one move at a time): a ring move
//! knows only its previous ring, and a claims move only the global placement of this one.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use super::ids::{RegionId, ShardId};
use hashring::HashRing;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Fewer virtual nodes per unit of weight spread keys unevenly (100 → up to 25 % off; 200 →
/// within ~4 %, measured on this machine).
pub const MIN_VNODES: u32 = 200;

/// The ring file (`config/ring.toml`): identical in every region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingSpec {
    /// Bumped by hand with every change, so edges can name what they run.
    pub version: u32,
    /// Virtual nodes per unit of shard weight.
    pub vnodes: u32,
    /// The version of the ring owners are moving away from while carts move to this one (the
    /// previous ring file is kept beside this one as `<stem>.v<N>.toml`); absent when settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_from: Option<u32>,
    /// Users whose tokens gained a `region` claim may still have their cart where the global
    /// ring placed them: edges look there and move it (`cartedge ring move --claims`). Removed
    /// once every such cart moved; never together with `moving_from`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub claims_from_global: bool,
    pub shards: Vec<ShardSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSpec {
    pub id: ShardId,
    /// The region whose primary owns this shard's writes.
    pub home: RegionId,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Why a ring description is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RingError(pub String);

/// One virtual node: hashed as `shard id bytes, 0x00, index as 4 little-endian bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VirtualNode {
    shard: usize,
    label: String,
    index: u32,
}

impl Hash for VirtualNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.label.as_bytes());
        state.write(&[0]);
        state.write(&self.index.to_le_bytes());
    }
}

/// A lookup key: only its bytes are hashed (no terminator, no length prefix).
struct KeyBytes<'a>(&'a [u8]);

impl Hash for KeyBytes<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

/// Where an owner's cart lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement<'a> {
    pub shard: &'a ShardId,
    pub home: &'a RegionId,
}

/// An immutable, validated ring file: the global ring and every regional ring.
pub struct Ring {
    spec: RingSpec,
    ring: HashRing<VirtualNode>,
    /// One ring per region that homes shards, over those shards only.
    regional: BTreeMap<RegionId, HashRing<VirtualNode>>,
    fingerprint: String,
    /// The ring of version `spec.moving_from`, while owners move away from it.
    previous: Option<Box<Ring>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("version", &self.spec.version)
            .field("shards", &self.spec.shards.len())
            .field("fingerprint", &self.fingerprint)
            .field("moving_from", &self.spec.moving_from)
            .field("claims_from_global", &self.spec.claims_from_global)
            .finish()
    }
}

impl Ring {
    /// A settled ring. A spec that names `moving_from` needs its previous ring: see
    /// [`Ring::moving`].
    pub fn new(spec: RingSpec) -> Result<Ring, RingError> {
        if let Some(from) = spec.moving_from {
            return Err(RingError(format!(
                "the ring moves from version {from}, whose ring file is needed too"
            )));
        }
        Ring::build(spec)
    }

    /// A ring whose owners are moving away from `previous` (the ring of version
    /// `spec.moving_from`). Only additions and re-weighting are moves this release makes: every
    /// shard of the previous ring must still be in this one with the same home, so both
    /// placements' databases stay reachable during the move.
    pub fn moving(spec: RingSpec, previous: Ring) -> Result<Ring, RingError> {
        let Some(from) = spec.moving_from else {
            return Err(RingError("the ring names no moving_from version".into()));
        };
        if previous.spec.version != from {
            return Err(RingError(format!(
                "moving_from = {from} but the previous ring file has version {}",
                previous.spec.version
            )));
        }
        if from >= spec.version {
            return Err(RingError(format!(
                "moving_from = {from} must be below the ring's version {}",
                spec.version
            )));
        }
        if previous.previous.is_some() {
            return Err(RingError(format!(
                "the ring of version {from} is itself moving: finish that move first"
            )));
        }
        // One move at a time: while users' carts move off the global ring, a ring move would
        // give those users two old placements (the previous ring's and this ring's global one),
        // and a moving owner has room for one.
        if spec.claims_from_global || previous.spec.claims_from_global {
            return Err(RingError(
                "claims_from_global and moving_from cannot be combined: finish the claims move \
                 (ring move --claims, then remove claims_from_global) first"
                    .into(),
            ));
        }
        for old in &previous.spec.shards {
            match spec.shards.iter().find(|s| s.id == old.id) {
                None => {
                    return Err(RingError(format!(
                        "shard {} of version {from} is missing: a move cannot remove a shard",
                        old.id
                    )))
                }
                Some(new) if new.home != old.home => {
                    return Err(RingError(format!(
                        "shard {} is homed in {} in version {from} and {} now: a move cannot rehome a shard",
                        old.id, old.home, new.home
                    )))
                }
                Some(_) => {}
            }
        }
        let mut settled = spec.clone();
        settled.moving_from = None;
        let mut ring = Ring::build(settled)?;
        ring.spec = spec;
        ring.previous = Some(Box::new(previous));
        Ok(ring)
    }

    fn build(spec: RingSpec) -> Result<Ring, RingError> {
        if spec.vnodes < MIN_VNODES {
            return Err(RingError(format!("vnodes must be at least {MIN_VNODES}")));
        }
        if spec.shards.is_empty() {
            return Err(RingError("the ring has no shards".into()));
        }
        let mut seen = BTreeSet::new();
        for shard in &spec.shards {
            if !seen.insert(shard.id.as_str()) {
                return Err(RingError(format!("shard {} is listed twice", shard.id)));
            }
            if shard.home.is_empty() {
                return Err(RingError(format!("shard {} has no home region", shard.id)));
            }
            if !(1..=100).contains(&shard.weight) {
                return Err(RingError(format!(
                    "shard {} weight must be within 1..=100",
                    shard.id
                )));
            }
        }
        let ring = hash_ring(&spec, |_| true);
        let homes: BTreeSet<&RegionId> = spec.shards.iter().map(|s| &s.home).collect();
        let regional = homes
            .into_iter()
            .map(|home| (home.clone(), hash_ring(&spec, |s| &s.home == home)))
            .collect();
        let fingerprint = fingerprint(&spec);
        Ok(Ring {
            spec,
            ring,
            regional,
            fingerprint,
            previous: None,
        })
    }

    /// The ring owners are moving away from (None when settled).
    pub fn previous(&self) -> Option<&Ring> {
        self.previous.as_deref()
    }

    /// Where an owner lived under the previous ring, when the ring is moving and its shard
    /// changed; None otherwise (settled ring, unchanged placement, or a home region that homed
    /// no shard before).
    pub fn previous_placement(&self, owner_key: &str, home: Option<&str>) -> Option<Placement<'_>> {
        let previous = self.previous.as_deref()?;
        let before = previous.place(owner_key, home)?;
        let now = self.place(owner_key, home)?;
        (before.shard != now.shard).then_some(before)
    }

    /// Whether the ring names `claims_from_global` (users with a `region` claim may still have
    /// a cart where the global ring placed them).
    pub fn claims_from_global(&self) -> bool {
        self.spec.claims_from_global
    }

    /// Where the global ring placed a user whose token now names home region `claim`, while the
    /// ring names `claims_from_global` and that is another shard than the claim's: the user's
    /// cart may still be there, written before the token carried the claim. None otherwise (no
    /// marker, the same shard, or a claim naming a region that homes no shard). The two
    /// placements differ only when the global ring put the user on another region's shard: a
    /// shard homed in `claim` that is first on the global ring is first on `claim`'s ring too.
    pub fn unclaimed_placement(&self, user_key: &str, claim: &str) -> Option<Placement<'_>> {
        if !self.spec.claims_from_global {
            return None;
        }
        let claimed = self.locate_in(user_key, claim)?;
        let global = self.locate(user_key);
        (global.shard != claimed.shard).then_some(global)
    }

    /// Where a user's cart may still be while it moves to where this ring places it by the
    /// token's `claim` (None: no claim, the global ring): the previous ring's placement
    /// (`moving_from`), else the global ring's when the claim is new (`claims_from_global`).
    /// [`Ring::moving`] refuses the two markers together, so at most one applies.
    pub fn user_moving_from(&self, user_key: &str, claim: Option<&str>) -> Option<Placement<'_>> {
        self.previous_placement(user_key, claim)
            .or_else(|| claim.and_then(|claim| self.unclaimed_placement(user_key, claim)))
    }

    /// Whether this edge runs a request forwarded by an edge whose ring fingerprint is
    /// `theirs` and which (when moving) moves from `theirs_moving_from`: the same ring, or the
    /// two sides of a roll (this ring moves from theirs, or theirs moves from this).
    pub fn accepts(&self, theirs: Option<&str>, theirs_moving_from: Option<&str>) -> bool {
        let Some(theirs) = theirs else {
            return false;
        };
        theirs == self.fingerprint
            || self
                .previous
                .as_deref()
                .is_some_and(|previous| previous.fingerprint == theirs)
            || theirs_moving_from == Some(self.fingerprint.as_str())
    }

    pub fn spec(&self) -> &RingSpec {
        &self.spec
    }

    /// A short, stable digest of everything that decides placement.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The shard and home region of an owner key (`u:<sub>` / `g:<session>`) that has no home
    /// region of its own: the global ring decides both.
    pub fn locate(&self, owner_key: &str) -> Placement<'_> {
        self.placement(&self.ring, owner_key)
            .expect("a validated ring has nodes")
    }

    /// The shard of an owner whose home region is `home`, on that region's ring; None when no
    /// shard is homed in `home`.
    pub fn locate_in(&self, owner_key: &str, home: &str) -> Option<Placement<'_>> {
        self.placement(self.regional.get(home)?, owner_key)
    }

    /// Where an owner lives: on its home region's ring when it has a home region, else on the
    /// global ring. None when `home` homes no shard.
    pub fn place(&self, owner_key: &str, home: Option<&str>) -> Option<Placement<'_>> {
        match home {
            Some(home) => self.locate_in(owner_key, home),
            None => Some(self.locate(owner_key)),
        }
    }

    /// Whether some shard is homed in `region` (so an owner can be homed there).
    pub fn homes_shards(&self, region: &str) -> bool {
        self.regional.contains_key(region)
    }

    fn placement(&self, ring: &HashRing<VirtualNode>, owner_key: &str) -> Option<Placement<'_>> {
        let node = ring.get(&KeyBytes(owner_key.as_bytes()))?;
        let shard = &self.spec.shards[node.shard];
        Some(Placement {
            shard: &shard.id,
            home: &shard.home,
        })
    }

    /// Shards homed in `region`.
    pub fn shards_homed_in<'a>(
        &'a self,
        region: &'a str,
    ) -> impl Iterator<Item = &'a ShardSpec> + 'a {
        self.spec.shards.iter().filter(move |s| s.home == region)
    }
}

/// A hash ring over the shards `include` keeps, `vnodes × weight` virtual nodes each.
fn hash_ring(spec: &RingSpec, include: impl Fn(&ShardSpec) -> bool) -> HashRing<VirtualNode> {
    let mut nodes = Vec::new();
    for (position, shard) in spec.shards.iter().enumerate() {
        if !include(shard) {
            continue;
        }
        for index in 0..spec.vnodes * shard.weight {
            nodes.push(VirtualNode {
                shard: position,
                label: shard.id.to_string(),
                index,
            });
        }
    }
    let mut ring = HashRing::new();
    ring.batch_add(nodes);
    ring
}

fn fingerprint(spec: &RingSpec) -> String {
    let mut hasher = Sha256::new();
    // v2: placement is the global ring plus one ring per region (v1 edges knew only the global
    // ring, so the two must not accept each other's forwarded requests).
    hasher.update(b"cartedge ring v2: global and regional rings\n");
    hasher.update(format!(
        "version={}\nvnodes={}\n",
        spec.version, spec.vnodes
    ));
    let mut shards: Vec<&ShardSpec> = spec.shards.iter().collect();
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    for shard in shards {
        hasher.update(format!(
            "shard={} home={} weight={}\n",
            shard.id, shard.home, shard.weight
        ));
    }
    hex::encode(&hasher.finalize()[..8])
}

/// What adding shards would move, counted over a set of owner keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovePlan {
    pub owners: usize,
    pub moved: usize,
    /// Moved owners by (from shard, to shard).
    pub flows: Vec<(String, String, usize)>,
}

/// Counts which of `owners` change shard between `before` and `after`.
pub fn plan_moves<'a>(
    before: &Ring,
    after: &Ring,
    owners: impl Iterator<Item = &'a str>,
) -> MovePlan {
    let mut flows: std::collections::BTreeMap<(String, String), usize> = Default::default();
    let mut total = 0;
    let mut moved = 0;
    for owner in owners {
        total += 1;
        let (from, to) = (before.locate(owner).shard, after.locate(owner).shard);
        if from != to {
            moved += 1;
            *flows.entry((from.to_string(), to.to_string())).or_default() += 1;
        }
    }
    MovePlan {
        owners: total,
        moved,
        flows: flows.into_iter().map(|((f, t), n)| (f, t, n)).collect(),
    }
}

/// Deterministic sample owner keys (users and guests alike) for placement checks and plans.
pub fn sample_owner_keys(count: usize) -> Vec<String> {
    (0..count)
        .map(|n| {
            if n % 2 == 0 {
                format!("u:user-{n:06}")
            } else {
                let digest = Sha256::digest(format!("guest-{n}").as_bytes());
                format!("g:{}", hex::encode(&digest[..16]))
            }
        })
        .collect()
}

/// A settled ring of weight-1 shards given as `(id, home)`, for tests.
#[cfg(test)]
pub(crate) fn test_spec(version: u32, shards: &[(&str, &str)]) -> RingSpec {
    RingSpec {
        version,
        vnodes: 200,
        moving_from: None,
        claims_from_global: false,
        shards: shards
            .iter()
            .map(|(id, home)| ShardSpec {
                id: ShardId::parse(id).unwrap(),
                home: RegionId::parse(home).unwrap(),
                weight: 1,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shards: &[(&str, &str)]) -> RingSpec {
        test_spec(1, shards)
    }

    #[test]
    fn placement_is_stable_and_spread_evenly() {
        let ring = Ring::new(spec(&[("s1", "sg"), ("s2", "id"), ("s3", "th")])).unwrap();
        let keys = sample_owner_keys(30_000);
        let mut counts = std::collections::HashMap::new();
        for key in &keys {
            *counts.entry(ring.locate(key).shard).or_insert(0usize) += 1;
        }
        for (shard, count) in counts {
            let share = count as f64 / keys.len() as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.05, "{shard}: {share}");
        }
        assert_eq!(ring.locate("u:alice"), ring.locate("u:alice"));
    }

    #[test]
    fn adding_a_shard_moves_about_one_nth_and_only_onto_the_new_shard() {
        let before = Ring::new(spec(&[("s1", "sg"), ("s2", "id"), ("s3", "th")])).unwrap();
        let after = Ring::new(spec(&[
            ("s1", "sg"),
            ("s2", "id"),
            ("s3", "th"),
            ("s4", "sg"),
        ]))
        .unwrap();
        let keys = sample_owner_keys(20_000);
        let plan = plan_moves(&before, &after, keys.iter().map(String::as_str));
        let share = plan.moved as f64 / plan.owners as f64;
        assert!((share - 0.25).abs() < 0.05, "moved {share}");
        assert!(
            plan.flows.iter().all(|(_, to, _)| to == "s4"),
            "{:?}",
            plan.flows
        );
    }

    #[test]
    fn a_home_region_keeps_its_owners_on_its_own_shards_spread_evenly() {
        let ring = Ring::new(spec(&[
            ("sg-1", "sg"),
            ("sg-2", "sg"),
            ("id-1", "id"),
            ("th-1", "th"),
        ]))
        .unwrap();
        let keys = sample_owner_keys(20_000);
        let mut counts = std::collections::HashMap::new();
        for key in &keys {
            let placement = ring.locate_in(key, "sg").unwrap();
            assert_eq!(placement.home, "sg");
            *counts.entry(placement.shard.to_string()).or_insert(0usize) += 1;
            assert_eq!(ring.locate_in(key, "th").unwrap().shard, "th-1");
            assert_eq!(ring.place(key, None), Some(ring.locate(key)));
            assert_eq!(ring.place(key, Some("sg")), ring.locate_in(key, "sg"));
        }
        assert_eq!(counts.len(), 2);
        for (shard, count) in counts {
            let share = count as f64 / keys.len() as f64;
            assert!((share - 0.5).abs() < 0.05, "{shard}: {share}");
        }
        assert!(ring.homes_shards("id"));
        assert!(!ring.homes_shards("vn"));
        assert_eq!(ring.locate_in("u:alice", "vn"), None);
        assert_eq!(ring.place("u:alice", Some("vn")), None);
    }

    #[test]
    fn a_shard_added_in_one_region_moves_no_owner_homed_in_another() {
        let before = Ring::new(spec(&[("sg-1", "sg"), ("id-1", "id"), ("id-2", "id")])).unwrap();
        let after = Ring::new(spec(&[
            ("sg-1", "sg"),
            ("id-1", "id"),
            ("id-2", "id"),
            ("sg-2", "sg"),
        ]))
        .unwrap();
        let keys = sample_owner_keys(10_000);
        let mut moved_in_sg = 0;
        for key in &keys {
            assert_eq!(before.locate_in(key, "id"), after.locate_in(key, "id"));
            let (from, to) = (
                before.locate_in(key, "sg").unwrap().shard,
                after.locate_in(key, "sg").unwrap().shard,
            );
            if from != to {
                assert_eq!(to, "sg-2");
                moved_in_sg += 1;
            }
        }
        let share = moved_in_sg as f64 / keys.len() as f64;
        assert!((share - 0.5).abs() < 0.05, "moved {share}");
    }

    #[test]
    fn invalid_rings_are_refused() {
        let mut few = spec(&[("s1", "sg")]);
        few.vnodes = 100;
        assert!(Ring::new(few).is_err());
        assert!(Ring::new(spec(&[("s1", "sg"), ("s1", "id")])).is_err());
        assert!(Ring::new(spec(&[])).is_err());
        // A shard id is checked where the ring file is read: it cannot even be written down.
        let file = "version = 1\nvnodes = 200\n[[shards]]\nid = \"bad id\"\nhome = \"sg\"\n";
        let error = toml::from_str::<RingSpec>(file).unwrap_err().to_string();
        assert!(error.contains("shard id must be"), "{error}");
    }

    #[test]
    fn a_moving_ring_knows_the_previous_placement_of_the_owners_that_move() {
        let before = Ring::new(spec(&[("sg-1", "sg"), ("id-1", "id")])).unwrap();
        let mut next = spec(&[("sg-1", "sg"), ("id-1", "id"), ("sg-2", "sg")]);
        next.version = 2;
        next.moving_from = Some(1);
        let settled_fingerprint = {
            let mut settled = next.clone();
            settled.moving_from = None;
            Ring::new(settled).unwrap().fingerprint().to_string()
        };
        let ring = Ring::moving(next.clone(), Ring::new(before.spec().clone()).unwrap()).unwrap();
        assert_eq!(ring.fingerprint(), settled_fingerprint);
        let mut moved = 0;
        for key in sample_owner_keys(4_000) {
            for home in [None, Some("sg"), Some("id")] {
                let now = ring.place(&key, home).unwrap();
                match ring.previous_placement(&key, home) {
                    Some(old) => {
                        moved += 1;
                        assert_eq!(Some(old), before.place(&key, home));
                        assert_eq!(now.shard, "sg-2");
                    }
                    None => assert_eq!(now.shard, before.place(&key, home).unwrap().shard),
                }
            }
        }
        assert!(moved > 1_000, "{moved}");
        // Both sides of the roll accept each other; anything else is refused.
        assert!(ring.accepts(Some(before.fingerprint()), None));
        assert!(before.accepts(Some(ring.fingerprint()), Some(before.fingerprint())));
        assert!(!before.accepts(Some(ring.fingerprint()), None));
        assert!(!before.accepts(Some("0000000000000000"), None));
        assert!(!ring.accepts(None, None));
        // The marker needs its previous ring, of that version, not itself moving, keeping every
        // shard at its home.
        assert!(Ring::new(next.clone()).is_err());
        let mut wrong = next.clone();
        wrong.moving_from = Some(3);
        assert!(Ring::moving(wrong, Ring::new(before.spec().clone()).unwrap()).is_err());
        let mut removes = spec(&[("sg-2", "sg"), ("id-1", "id")]);
        removes.version = 2;
        removes.moving_from = Some(1);
        assert!(Ring::moving(removes, Ring::new(before.spec().clone()).unwrap()).is_err());
    }

    #[test]
    fn the_claims_marker_changes_neither_placement_nor_the_fingerprint() {
        let shards = [("sg-1", "sg"), ("sg-2", "sg"), ("id-1", "id")];
        let plain = Ring::new(spec(&shards)).unwrap();
        let file = "version = 1\nvnodes = 200\nclaims_from_global = true\n\
            [[shards]]\nid = \"sg-1\"\nhome = \"sg\"\n\
            [[shards]]\nid = \"sg-2\"\nhome = \"sg\"\n\
            [[shards]]\nid = \"id-1\"\nhome = \"id\"\n";
        let marked = Ring::new(toml::from_str::<RingSpec>(file).unwrap()).unwrap();
        assert!(marked.claims_from_global());
        assert!(!plain.claims_from_global());
        assert_eq!(marked.fingerprint(), plain.fingerprint());
        for key in sample_owner_keys(2_000) {
            for home in [None, Some("sg"), Some("id")] {
                assert_eq!(marked.place(&key, home), plain.place(&key, home), "{key}");
            }
        }
        // A settled file without the marker says nothing about it.
        let text = toml::to_string(plain.spec()).unwrap();
        assert!(!text.contains("claims_from_global"), "{text}");
        assert!(toml::to_string(marked.spec())
            .unwrap()
            .contains("claims_from_global = true"));
    }

    #[test]
    fn the_claims_marker_points_a_claimed_user_at_its_global_placement_when_that_differs() {
        let shards = [("sg-1", "sg"), ("sg-2", "sg"), ("id-1", "id")];
        let plain = Ring::new(spec(&shards)).unwrap();
        let mut marked_spec = spec(&shards);
        marked_spec.claims_from_global = true;
        let marked = Ring::new(marked_spec).unwrap();
        let mut moving = 0;
        for key in sample_owner_keys(4_000)
            .iter()
            .filter(|k| k.starts_with("u:"))
        {
            let global = marked.locate(key);
            for claim in ["sg", "id"] {
                assert_eq!(plain.unclaimed_placement(key, claim), None);
                assert_eq!(plain.user_moving_from(key, Some(claim)), None);
                let claimed = marked.locate_in(key, claim).unwrap();
                match marked.unclaimed_placement(key, claim) {
                    Some(old) => {
                        moving += 1;
                        assert_eq!(old, global);
                        assert_ne!(old.shard, claimed.shard);
                        // Only a user the global ring homed in another region moves.
                        assert_ne!(old.home, claim, "{key}");
                    }
                    None => assert_eq!(global.shard, claimed.shard, "{key}"),
                }
                assert_eq!(
                    marked.user_moving_from(key, Some(claim)),
                    marked.unclaimed_placement(key, claim)
                );
            }
            // Without a claim the user is on the global ring, where its cart already is.
            assert_eq!(marked.user_moving_from(key, None), None);
        }
        assert!(moving > 500, "{moving}");
        // A claim naming a region that homes no shard places nobody.
        assert_eq!(marked.unclaimed_placement("u:alice", "vn"), None);
    }

    #[test]
    fn the_claims_marker_and_a_ring_move_are_never_combined() {
        let before = spec(&[("sg-1", "sg"), ("id-1", "id")]);
        let mut next = spec(&[("sg-1", "sg"), ("id-1", "id"), ("sg-2", "sg")]);
        next.version = 2;
        next.moving_from = Some(1);
        let mut marked_next = next.clone();
        marked_next.claims_from_global = true;
        let error = Ring::moving(marked_next, Ring::new(before.clone()).unwrap()).unwrap_err();
        assert!(error.0.contains("cannot be combined"), "{error}");
        let mut marked_before = before.clone();
        marked_before.claims_from_global = true;
        let error = Ring::moving(next.clone(), Ring::new(marked_before).unwrap()).unwrap_err();
        assert!(error.0.contains("cannot be combined"), "{error}");
        assert!(Ring::moving(next, Ring::new(before).unwrap()).is_ok());
    }

    #[test]
    fn the_fingerprint_names_placement_not_file_order() {
        let a = Ring::new(spec(&[("s1", "sg"), ("s2", "id")])).unwrap();
        let b = Ring::new(spec(&[("s2", "id"), ("s1", "sg")])).unwrap();
        let c = Ring::new(spec(&[("s1", "sg"), ("s2", "th")])).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
