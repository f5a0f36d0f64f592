//! The pure parts of the load generator: the operations and their mix, when each request is
//! meant to go out (an open-loop schedule at a constant arrival rate) and how its latency is
//! counted (from that intended time, never from when it actually left). No I/O, no clock: the
//! caller passes instants in.

use std::time::{Duration, Instant};

/// The cart operations the generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// `GET /api/v1/cart`.
    View,
    /// `POST /api/v1/cart/items`.
    Add,
    /// `PUT /api/v1/cart/items/{line}`.
    Update,
    /// `DELETE /api/v1/cart/items/{line}`.
    Remove,
    /// An anonymous add (minting a guest session), then `POST /api/v1/cart/merge`.
    Merge,
    /// `POST /api/v1/cart/checkout`.
    Checkout,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::View,
        Op::Add,
        Op::Update,
        Op::Remove,
        Op::Merge,
        Op::Checkout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::View => "view",
            Op::Add => "add",
            Op::Update => "update",
            Op::Remove => "remove",
            Op::Merge => "merge",
            Op::Checkout => "checkout",
        }
    }

    fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// The largest sum of mix weights: one cycle of the mix is laid out in memory.
const MAX_MIX_TOTAL: u32 = 1_000_000;

/// A weighted mix of operations, laid out as one cycle in which every operation appears as
/// often as its weight says, interleaved (smooth weighted round robin), so any window of the
/// schedule follows the mix and a run's counts match it exactly over whole cycles.
#[derive(Debug, Clone)]
pub struct Mix {
    weights: Vec<(Op, u32)>,
    cycle: Vec<Op>,
}

impl Mix {
    /// Parses `view=100,add=1,…`; weights are whole numbers, at least one positive.
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut weights: Vec<(Op, u32)> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("mix entry {part:?}: expected <operation>=<weight>"))?;
            let op = Op::parse(name.trim()).ok_or_else(|| {
                format!(
                    "mix entry {part:?}: unknown operation (the operations are view, add, update, remove, merge, checkout)"
                )
            })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("mix entry {part:?}: the weight must be a whole number"))?;
            if weights.iter().any(|(seen, _)| *seen == op) {
                return Err(format!("mix names {} twice", op.name()));
            }
            weights.push((op, weight));
        }
        weights.retain(|(_, weight)| *weight > 0);
        let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err("the mix needs at least one operation with a positive weight".into());
        }
        if total > u64::from(MAX_MIX_TOTAL) {
            return Err(format!(
                "the mix weights add up to more than {MAX_MIX_TOTAL}"
            ));
        }
        weights.sort();
        let cycle = interleave(&weights, total);
        Ok(Mix { weights, cycle })
    }

    /// The operations with a positive weight, in a fixed order.
    pub fn ops(&self) -> impl Iterator<Item = Op> + '_ {
        self.weights.iter().map(|(op, _)| *op)
    }

    /// The operation of the request with this index in the schedule.
    pub fn op_at(&self, index: u64) -> Op {
        self.cycle[(index % self.cycle.len() as u64) as usize]
    }
}

/// Smooth weighted round robin: each step every operation gains its weight and the one with the
/// most credit goes next, paying the total back.
fn interleave(weights: &[(Op, u32)], total: u64) -> Vec<Op> {
    let mut credit = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (slot, (_, weight)) in credit.iter_mut().zip(weights) {
            *slot += i64::from(*weight);
        }
        let mut best = 0;
        for (index, value) in credit.iter().enumerate() {
            if *value > credit[best] {
                best = index;
            }
        }
        credit[best] -= total as i64;
        cycle.push(weights[best].0);
    }
    cycle
}

/// When the request with this index is meant to go out, after the schedule's start: `index /
/// rate` seconds, whatever happened to the requests before it.
pub fn intended_offset(index: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(index as f64 / rate)
}

/// How many requests a span of the schedule holds at this rate.
pub fn requests_in(span: Duration, rate: f64) -> u64 {
    (span.as_secs_f64() * rate).round() as u64
}

/// One request's latency: from when it was meant to go out to when its answer (or failure)
/// came back. A request that left late because the generator or the target stalled is charged
/// the stall, so coordinated omission cannot hide it.
pub fn latency_from_intended(intended: Instant, completed: Instant) -> Duration {
    completed.saturating_duration_since(intended)
}

/// The region a user is homed in: users are spread round robin over the regions, so the Zipf
/// ranks (the hottest users first) land in every region.
pub fn home_of(user_rank: u64, regions: usize) -> usize {
    (user_rank % regions.max(1) as u64) as usize
}

/// The region whose edge a request of an owner homed in `home` goes to: the home itself, or
/// (`abroad`) the next region, which has to forward its writes (itself when there is only one).
pub fn edge_of(home: usize, regions: usize, abroad: bool) -> usize {
    if abroad {
        (home + 1) % regions.max(1)
    } else {
        home
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abroad_every_owner_is_sent_to_another_region_than_its_home() {
        for regions in 2..=6 {
            for rank in 1..=60 {
                let home = home_of(rank, regions);
                assert_eq!(edge_of(home, regions, false), home);
                let edge = edge_of(home, regions, true);
                assert!(edge < regions && edge != home, "{rank} of {regions}");
            }
        }
        assert_eq!(edge_of(0, 1, true), 0, "one region: nowhere else to go");
    }

    #[test]
    fn a_request_sent_late_is_charged_from_its_intended_time() {
        let start = Instant::now();
        let rate = 100.0;
        // Request 3 is due 30 ms in; the generator stalled and sent it at 80 ms; the answer
        // took 5 ms. Its latency is 55 ms, not the 5 ms the server spent.
        let intended = start + intended_offset(3, rate);
        assert_eq!(intended - start, Duration::from_millis(30));
        let sent = start + Duration::from_millis(80);
        let completed = sent + Duration::from_millis(5);
        assert_eq!(
            latency_from_intended(intended, completed),
            Duration::from_millis(55)
        );
        // The next request's intended time does not move because this one was late.
        assert_eq!(
            start + intended_offset(4, rate) - start,
            Duration::from_millis(40)
        );
    }

    #[test]
    fn the_mix_is_followed_exactly_over_a_cycle_and_interleaved() {
        let mix = Mix::parse("view=100,add=1").unwrap();
        let ops: Vec<Op> = (0..101).map(|i| mix.op_at(i)).collect();
        assert_eq!(ops.iter().filter(|op| **op == Op::Add).count(), 1);
        let mix = Mix::parse("view=2,add=1,update=1").unwrap();
        let ops: Vec<Op> = (0..4).map(|i| mix.op_at(i)).collect();
        assert_eq!(ops.iter().filter(|op| **op == Op::View).count(), 2);
        assert_ne!(
            ops[0], ops[1],
            "weights are interleaved, not bunched: {ops:?}"
        );
    }

    #[test]
    fn a_mix_with_unknown_operations_or_no_weight_is_refused() {
        assert!(Mix::parse("view=1,buy=1").is_err());
        assert!(Mix::parse("view=0").is_err());
        assert!(Mix::parse("view=1,view=2").is_err());
        assert!(Mix::parse("view=x").is_err());
    }

    #[test]
    fn the_schedule_holds_rate_times_span_requests() {
        assert_eq!(requests_in(Duration::from_secs(2), 250.0), 500);
        assert_eq!(requests_in(Duration::ZERO, 250.0), 0);
    }
}
