//! The history checker of the drills: every operation a drill's load sent, with what it was
//! told, and the checks against it: no acknowledged write lost, none applied twice, no read
//! older than its reader's own acknowledged writes.
//!
//! Each shopper's operations are sequential and every add names an item no other operation
//! of that shopper adds, with quantity 1; a remove names an item the shopper's add was
//! acknowledged for. So a cart's expected state is exact: an item whose add was acknowledged
//! and never targeted by a remove must be there with quantity 1; an item whose remove was
//! acknowledged must be gone; an item must never appear with a quantity above 1 (applied twice)
//! nor without any add having been tried for it. Operations whose outcome is unknown (a 5xx
//! or a broken connection after retries) may or may not have been applied: the checks allow
//! both.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Add,
    Remove,
}

/// How a write ended, after its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: applied, the cart at this version or later.
    Acknowledged { version: i64 },
    /// 4xx: refused, not applied.
    Refused,
    /// 5xx or no answer: maybe applied.
    Unknown,
}

/// One write of one shopper.
#[derive(Debug, Clone)]
pub struct Write {
    pub shopper: usize,
    pub kind: WriteKind,
    pub item: String,
    pub started: Instant,
    pub ended: Instant,
    pub outcome: Outcome,
}

/// One read of one shopper.
#[derive(Debug, Clone)]
pub struct Read {
    pub shopper: usize,
    /// None when the read failed (no 200).
    pub seen: Option<CartSeen>,
    /// The read-your-writes breach this read showed, if any.
    pub violation: Option<String>,
}

/// A cart as an answer showed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CartSeen {
    pub version: i64,
    /// Item id → quantity.
    pub items: BTreeMap<String, i64>,
}

/// What one shopper's acknowledged history says must hold now.
#[derive(Debug, Clone, Default)]
pub struct Expectation {
    /// The highest version an acknowledged write answered.
    pub min_version: i64,
    /// Added (acknowledged) and never targeted by a remove since.
    pub present: BTreeSet<String>,
    /// Removed (acknowledged) and never added again.
    pub absent: BTreeSet<String>,
    /// Every item an add was tried for (acknowledged, unknown or refused).
    pub tried: BTreeSet<String>,
}

impl Expectation {
    /// Takes one finished write into account.
    pub fn record(&mut self, write: &Write) {
        if write.kind == WriteKind::Add {
            self.tried.insert(write.item.clone());
        }
        match (&write.outcome, write.kind) {
            (Outcome::Acknowledged { version }, kind) => {
                self.min_version = self.min_version.max(*version);
                match kind {
                    WriteKind::Add => {
                        self.absent.remove(&write.item);
                        self.present.insert(write.item.clone());
                    }
                    WriteKind::Remove => {
                        self.present.remove(&write.item);
                        self.absent.insert(write.item.clone());
                    }
                }
            }
            // A remove that may have been applied: the item may be there or not.
            (Outcome::Unknown, WriteKind::Remove) => {
                self.present.remove(&write.item);
            }
            // An add that may have been applied: allowed either way (`tried`).
            (Outcome::Unknown, WriteKind::Add) | (Outcome::Refused, _) => {}
        }
    }

    /// What is wrong with `seen` given this history (empty: nothing). `final_state` also
    /// counts lost acknowledged writes separately from read-your-writes breaches.
    pub fn breaches(&self, seen: &CartSeen) -> Breaches {
        let mut breaches = Breaches::default();
        if seen.version < self.min_version {
            breaches.stale = Some(format!(
                "version {} is older than the acknowledged {}",
                seen.version, self.min_version
            ));
        }
        breaches.missing = self
            .present
            .iter()
            .filter(|item| !seen.items.contains_key(*item))
            .cloned()
            .collect();
        breaches.resurrected = self
            .absent
            .iter()
            .filter(|item| seen.items.contains_key(*item))
            .cloned()
            .collect();
        breaches.doubled = seen
            .items
            .iter()
            .filter(|(_, quantity)| **quantity > 1)
            .map(|(item, _)| item.clone())
            .collect();
        breaches.phantom = seen
            .items
            .keys()
            .filter(|item| !self.tried.contains(*item))
            .cloned()
            .collect();
        breaches
    }
}

/// Differences between a cart and its acknowledged history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breaches {
    pub stale: Option<String>,
    /// Acknowledged adds not in the cart.
    pub missing: Vec<String>,
    /// Acknowledged removes back in the cart.
    pub resurrected: Vec<String>,
    /// Lines with a quantity above 1: an add applied twice.
    pub doubled: Vec<String>,
    /// Lines no add was ever tried for.
    pub phantom: Vec<String>,
}

impl Breaches {
    pub fn is_empty(&self) -> bool {
        self.stale.is_none()
            && self.missing.is_empty()
            && self.resurrected.is_empty()
            && self.doubled.is_empty()
            && self.phantom.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(stale) = &self.stale {
            parts.push(stale.clone());
        }
        for (what, items) in [
            ("missing", &self.missing),
            ("resurrected", &self.resurrected),
            ("doubled", &self.doubled),
            ("phantom", &self.phantom),
        ] {
            if !items.is_empty() {
                parts.push(format!("{what}: {}", items.join(" ")));
            }
        }
        parts.join("; ")
    }
}

/// A drill's one-line verdict (printed as JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub drill: String,
    /// HTTP requests sent (every attempt, reads and writes).
    pub requests: u64,
    /// Failed requests by `"<status> <code>"` (`"transport"` when there was no answer).
    pub failures: BTreeMap<String, u64>,
    pub writes: u64,
    pub writes_acknowledged: u64,
    pub writes_unknown: u64,
    pub reads: u64,
    pub failed_reads: u64,
    /// The longest time a shopper's writes kept failing, from the first failure to the next
    /// acknowledged write (or the end).
    pub longest_unavailability_ms: u64,
    /// The slowest write attempt.
    pub max_write_ms: u64,
    pub acknowledged_writes_lost: u64,
    pub writes_applied_twice: u64,
    pub ryw_violations: u64,
    /// The first few problems, for a human.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// What the drill measured beyond the common figures (failover time, …).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub measured: BTreeMap<String, serde_json::Value>,
}

/// How many problems a summary quotes.
const QUOTED_PROBLEMS: usize = 8;

impl Summary {
    pub fn problem(&mut self, text: String) {
        if self.problems.len() < QUOTED_PROBLEMS {
            self.problems.push(text);
        }
    }

    /// Folds the load's history into the summary: counts, windows, read-your-writes breaches.
    pub fn add_history(&mut self, writes: &[Write], reads: &[Read], max_write: Duration) {
        self.writes += writes.len() as u64;
        self.reads += reads.len() as u64;
        self.max_write_ms = self.max_write_ms.max(max_write.as_millis() as u64);
        for write in writes {
            match write.outcome {
                Outcome::Acknowledged { .. } => self.writes_acknowledged += 1,
                Outcome::Unknown => self.writes_unknown += 1,
                Outcome::Refused => {}
            }
        }
        for read in reads {
            if read.seen.is_none() {
                self.failed_reads += 1;
            }
            if let Some(violation) = &read.violation {
                self.ryw_violations += 1;
                self.problem(format!(
                    "shopper {}: read-your-writes: {violation}",
                    read.shopper
                ));
            }
        }
        self.longest_unavailability_ms = self
            .longest_unavailability_ms
            .max(longest_unavailability(writes).as_millis() as u64);
    }

    /// Checks a shopper's final cart against its history.
    pub fn check_final(&mut self, shopper: usize, expectation: &Expectation, seen: &CartSeen) {
        let breaches = expectation.breaches(seen);
        self.acknowledged_writes_lost +=
            (breaches.missing.len() + breaches.resurrected.len()) as u64;
        self.writes_applied_twice += breaches.doubled.len() as u64;
        if !breaches.is_empty() {
            self.problem(format!(
                "shopper {shopper}: final cart: {}",
                breaches.describe()
            ));
        }
    }

    /// Whether nothing acknowledged was lost or doubled and every read saw its writes.
    pub fn consistent(&self) -> bool {
        self.acknowledged_writes_lost == 0
            && self.writes_applied_twice == 0
            && self.ryw_violations == 0
    }
}

/// The longest window in which one shopper's writes failed: from its first failed write to
/// its next acknowledged one (or its last write's end).
pub fn longest_unavailability(writes: &[Write]) -> Duration {
    let mut by_shopper: BTreeMap<usize, Vec<&Write>> = BTreeMap::new();
    for write in writes {
        by_shopper.entry(write.shopper).or_default().push(write);
    }
    let mut longest = Duration::ZERO;
    for mut list in by_shopper.into_values() {
        list.sort_by_key(|w| w.started);
        let mut failing_since: Option<Instant> = None;
        let mut last_end = None;
        for write in list {
            last_end = Some(write.ended);
            match (&write.outcome, failing_since) {
                (Outcome::Acknowledged { .. }, Some(since)) => {
                    longest = longest.max(write.ended.duration_since(since));
                    failing_since = None;
                }
                (Outcome::Unknown, None) => failing_since = Some(write.started),
                _ => {}
            }
        }
        if let (Some(since), Some(end)) = (failing_since, last_end) {
            longest = longest.max(end.duration_since(since));
        }
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(kind: WriteKind, item: &str, outcome: Outcome) -> Write {
        let now = Instant::now();
        Write {
            shopper: 0,
            kind,
            item: item.into(),
            started: now,
            ended: now,
            outcome,
        }
    }

    fn cart(version: i64, items: &[(&str, i64)]) -> CartSeen {
        CartSeen {
            version,
            items: items.iter().map(|(i, q)| (i.to_string(), *q)).collect(),
        }
    }

    fn history(writes: &[Write]) -> Expectation {
        let mut expectation = Expectation::default();
        for w in writes {
            expectation.record(w);
        }
        expectation
    }

    #[test]
    fn an_acknowledged_add_missing_is_lost_and_an_unknown_one_is_not() {
        let e = history(&[
            write(WriteKind::Add, "a", Outcome::Acknowledged { version: 1 }),
            write(WriteKind::Add, "b", Outcome::Unknown),
            write(WriteKind::Add, "c", Outcome::Acknowledged { version: 2 }),
        ]);
        assert!(e.breaches(&cart(2, &[("a", 1), ("c", 1)])).is_empty());
        assert!(e
            .breaches(&cart(3, &[("a", 1), ("b", 1), ("c", 1)]))
            .is_empty());
        let lost = e.breaches(&cart(2, &[("c", 1)]));
        assert_eq!(lost.missing, vec!["a".to_string()]);
    }

    #[test]
    fn removes_doubles_phantoms_and_old_versions_are_caught() {
        let e = history(&[
            write(WriteKind::Add, "a", Outcome::Acknowledged { version: 1 }),
            write(WriteKind::Add, "b", Outcome::Acknowledged { version: 2 }),
            write(WriteKind::Remove, "a", Outcome::Acknowledged { version: 3 }),
            write(WriteKind::Remove, "b", Outcome::Unknown),
        ]);
        // b's remove may or may not have happened.
        assert!(e.breaches(&cart(3, &[("b", 1)])).is_empty());
        assert!(e.breaches(&cart(4, &[])).is_empty());
        let resurrected = e.breaches(&cart(3, &[("a", 1)]));
        assert_eq!(resurrected.resurrected, vec!["a".to_string()]);
        assert_eq!(
            e.breaches(&cart(3, &[("b", 2)])).doubled,
            vec!["b".to_string()]
        );
        assert_eq!(
            e.breaches(&cart(3, &[("z", 1)])).phantom,
            vec!["z".to_string()]
        );
        assert!(e.breaches(&cart(2, &[("b", 1)])).stale.is_some());
    }

    #[test]
    fn unavailability_runs_from_the_first_failure_to_the_next_acknowledgement() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let w = |start: u64, end: u64, outcome: Outcome| Write {
            shopper: 0,
            kind: WriteKind::Add,
            item: format!("i{start}"),
            started: at(start),
            ended: at(end),
            outcome,
        };
        let writes = vec![
            w(0, 10, Outcome::Acknowledged { version: 1 }),
            w(100, 110, Outcome::Unknown),
            w(200, 210, Outcome::Unknown),
            w(300, 350, Outcome::Acknowledged { version: 2 }),
            w(400, 410, Outcome::Unknown),
            w(500, 520, Outcome::Acknowledged { version: 3 }),
        ];
        assert_eq!(longest_unavailability(&writes), Duration::from_millis(250));
    }
}
