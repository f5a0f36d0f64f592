//! What a load-generator run measured: HdrHistogram latencies and error counts per operation,
//! per region and overall, and their renderings (the final table, the `--json` document, the
//! ratios to a baseline run). Recording happens in one task; nothing here does I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use super::schedule::Op;

/// The longest latency a histogram holds exactly (longer ones are recorded as this): an hour.
const MAX_RECORDED_MICROS: u64 = 3_600_000_000;

/// How one scheduled request ended.
#[derive(Debug, Clone)]
pub enum Ending {
    /// An HTTP answer; `code` is the `error.code` of an error body.
    Answered { status: u16, code: Option<String> },
    /// No answer: `timeout`, `connect`, `transport`; or `no_guest_session`, a merge whose guest
    /// add was answered without a `Cart-Session`.
    Failed(&'static str),
    /// Not sent: the bound on requests in flight was reached (the schedule did not slow down).
    InFlightLimit,
}

impl Ending {
    fn is_success(&self) -> bool {
        matches!(self, Ending::Answered { status, .. } if *status < 400)
    }

    /// The key this ending is counted under among errors: `404 item_not_in_cart`, `timeout`.
    fn error_key(&self) -> String {
        match self {
            Ending::Answered {
                status,
                code: Some(code),
            } => format!("{status} {code}"),
            Ending::Answered { status, code: None } => status.to_string(),
            Ending::Failed(kind) => (*kind).to_string(),
            Ending::InFlightLimit => "in_flight_limit".to_string(),
        }
    }
}

/// Latencies and errors of one slice of the traffic (an operation, a region, or all of it).
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latencies in microseconds of every request sent (answered or failed).
    pub latency: Histogram<u64>,
    /// Requests sent.
    pub count: u64,
    /// Requests that failed or were not sent, by [`Ending::error_key`].
    pub errors: BTreeMap<String, u64>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            // Constant bounds that hdrhistogram accepts (low ≥ 1, high ≥ 2 × low, 3 digits).
            latency: Histogram::new_with_bounds(1, MAX_RECORDED_MICROS, 3)
                .expect("constant histogram bounds are valid"),
            count: 0,
            errors: BTreeMap::new(),
        }
    }
}

impl Tally {
    fn record(&mut self, latency: Option<Duration>, ending: &Ending) {
        if let Some(latency) = latency {
            self.count += 1;
            let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            self.latency.saturating_record(micros.max(1));
        }
        if !ending.is_success() {
            *self.errors.entry(ending.error_key()).or_default() += 1;
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// A percentile (0–100) in milliseconds; 0 without samples.
    pub fn percentile_ms(&self, percentile: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        self.latency.value_at_quantile(percentile / 100.0) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.latency.max() as f64 / 1000.0
    }

    fn figures(&self) -> Value {
        json!({
            "count": self.count,
            "errors": self.error_count(),
            "p50_ms": self.percentile_ms(50.0),
            "p90_ms": self.percentile_ms(90.0),
            "p99_ms": self.percentile_ms(99.0),
            "p999_ms": self.percentile_ms(99.9),
            "max_ms": self.max_ms(),
            "errors_by_kind": self.errors,
        })
    }
}

/// Everything one measured phase recorded.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// What was measured: the cluster directory or the baseline URL.
    pub target: String,
    /// The arrival rate asked for (requests/s).
    pub rate: f64,
    /// The measured span of the schedule (warm-up excluded).
    pub duration: Duration,
    /// From the start of the measured span to the last answer (at least `duration`).
    pub elapsed: Duration,
    /// Requests the measured span scheduled (sent or not).
    pub scheduled: u64,
    /// HTTP requests sent, counting a merge's guest add.
    pub http_requests: u64,
    /// Requests that got an HTTP answer (any status).
    pub answered: u64,
    pub overall: Tally,
    pub operations: BTreeMap<Op, Tally>,
    pub regions: BTreeMap<String, Tally>,
    /// Every HTTP status seen, with its count.
    pub status: BTreeMap<u16, u64>,
    /// How late the generator itself sent each request after its intended time (its timer's
    /// granularity, its own CPU starvation): part of every latency, shown apart so a reader
    /// can tell the generator's share from the target's.
    pub dispatch_lag: Tally,
}

impl Report {
    pub fn new(
        target: String,
        rate: f64,
        duration: Duration,
        ops: impl Iterator<Item = Op>,
    ) -> Report {
        Report {
            target,
            rate,
            duration,
            elapsed: duration,
            operations: ops.map(|op| (op, Tally::default())).collect(),
            ..Report::default()
        }
    }

    /// Counts one measured request; `latency` is None for one that was never sent, `lag` how
    /// late after its intended time it was sent.
    pub fn record(
        &mut self,
        op: Op,
        region: &str,
        latency: Option<Duration>,
        lag: Option<Duration>,
        http_requests: u64,
        ending: &Ending,
    ) {
        self.scheduled += 1;
        if let Some(lag) = lag {
            self.dispatch_lag.record(
                Some(lag),
                &Ending::Answered {
                    status: 200,
                    code: None,
                },
            );
        }
        self.http_requests += http_requests;
        if let Ending::Answered { status, .. } = ending {
            self.answered += 1;
            *self.status.entry(*status).or_default() += 1;
        }
        self.overall.record(latency, ending);
        self.operations
            .entry(op)
            .or_default()
            .record(latency, ending);
        if !self.regions.contains_key(region) {
            self.regions.insert(region.to_string(), Tally::default());
        }
        if let Some(tally) = self.regions.get_mut(region) {
            tally.record(latency, ending);
        }
    }

    /// Requests sent in the measured span.
    pub fn requests(&self) -> u64 {
        self.overall.count
    }

    /// Answers per second over the measured span.
    pub fn achieved_rate(&self) -> f64 {
        let seconds = self.elapsed.max(self.duration).as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        self.answered as f64 / seconds
    }

    /// The `--json` document: the contract keys (`requests`, `errors`, `achieved_rate`,
    /// `operations.<op>.{count,p50_ms,p90_ms,p99_ms,p999_ms,max_ms}`, `status`) and more.
    pub fn to_json(&self) -> Value {
        let operations: Map<String, Value> = self
            .operations
            .iter()
            .map(|(op, tally)| (op.name().to_string(), tally.figures()))
            .collect();
        let regions: Map<String, Value> = self
            .regions
            .iter()
            .map(|(region, tally)| (region.clone(), tally.figures()))
            .collect();
        let status: Map<String, Value> = self
            .status
            .iter()
            .map(|(code, count)| (code.to_string(), json!(count)))
            .collect();
        json!({
            "target": self.target,
            "rate": self.rate,
            "duration_s": self.duration.as_secs_f64(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "scheduled": self.scheduled,
            "requests": self.requests(),
            "http_requests": self.http_requests,
            "errors": self.overall.error_count(),
            "achieved_rate": self.achieved_rate(),
            "overall": self.overall.figures(),
            "dispatch_lag_ms": {
                "p50": self.dispatch_lag.percentile_ms(50.0),
                "p99": self.dispatch_lag.percentile_ms(99.0),
                "max": self.dispatch_lag.max_ms(),
            },
            "operations": operations,
            "regions": regions,
            "status": status,
        })
    }

    /// The final table: one row per operation, one per region, one for everything.
    pub fn table(&self, baseline: Option<&Report>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} requests in {:.1}s at {:.0}/s asked, {:.1}/s answered, {} errors{}",
            self.target,
            self.requests(),
            self.elapsed.as_secs_f64(),
            self.rate,
            self.achieved_rate(),
            self.overall.error_count(),
            baseline
                .map(|b| format!(
                    " ({} of the baseline's rate)",
                    ratio(self.achieved_rate(), b.achieved_rate())
                ))
                .unwrap_or_default(),
        );
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  errors",
            "", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let rows = self
            .operations
            .iter()
            .map(|(op, tally)| (op.name().to_string(), tally))
            .chain(
                self.regions
                    .iter()
                    .map(|(region, tally)| (format!("region {region}"), tally)),
            )
            .chain(std::iter::once(("all".to_string(), &self.overall)));
        for (name, tally) in rows {
            let errors = if tally.errors.is_empty() {
                "-".to_string()
            } else {
                tally
                    .errors
                    .iter()
                    .map(|(key, count)| format!("{key} x{count}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                out,
                "{name:<16} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {errors}",
                tally.count,
                tally.percentile_ms(50.0),
                tally.percentile_ms(90.0),
                tally.percentile_ms(99.0),
                tally.percentile_ms(99.9),
                tally.max_ms(),
            );
            if let Some(base) = baseline {
                let base = &base.overall;
                let _ = writeln!(
                    out,
                    "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                    "  x baseline",
                    "",
                    ratio(tally.percentile_ms(50.0), base.percentile_ms(50.0)),
                    ratio(tally.percentile_ms(90.0), base.percentile_ms(90.0)),
                    ratio(tally.percentile_ms(99.0), base.percentile_ms(99.0)),
                    ratio(tally.percentile_ms(99.9), base.percentile_ms(99.9)),
                    ratio(tally.max_ms(), base.max_ms()),
                );
            }
        }
        let status: Vec<String> = self
            .status
            .iter()
            .map(|(code, count)| format!("{code} x{count}"))
            .collect();
        let _ = writeln!(out, "status: {}", status.join(", "));
        let _ = writeln!(
            out,
            "the generator's own dispatch lag (in every latency above): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.dispatch_lag.percentile_ms(50.0),
            self.dispatch_lag.percentile_ms(99.0),
            self.dispatch_lag.max_ms()
        );
        out
    }
}

fn ratio(value: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}x", value / base)
    } else {
        "-".to_string()
    }
}

fn ratio_value(value: f64, base: f64) -> Value {
    if base > 0.0 {
        json!(value / base)
    } else {
        Value::Null
    }
}

/// Every figure of `report` as a ratio to the baseline's: throughput to its throughput, each
/// operation's percentiles to its overall percentiles (the baseline only sends GETs).
pub fn ratios(report: &Report, baseline: &Report) -> Value {
    let base = &baseline.overall;
    let operations: Map<String, Value> = report
        .operations
        .iter()
        .map(|(op, tally)| {
            (
                op.name().to_string(),
                json!({
                    "p50": ratio_value(tally.percentile_ms(50.0), base.percentile_ms(50.0)),
                    "p90": ratio_value(tally.percentile_ms(90.0), base.percentile_ms(90.0)),
                    "p99": ratio_value(tally.percentile_ms(99.0), base.percentile_ms(99.0)),
                    "p999": ratio_value(tally.percentile_ms(99.9), base.percentile_ms(99.9)),
                    "max": ratio_value(tally.max_ms(), base.max_ms()),
                }),
            )
        })
        .collect();
    json!({
        "achieved_rate": ratio_value(report.achieved_rate(), baseline.achieved_rate()),
        "operations": operations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_by_status_and_code_and_unsent_requests_have_no_latency() {
        let mut report = Report::new(
            "t".into(),
            10.0,
            Duration::from_secs(1),
            [Op::View].into_iter(),
        );
        let ok = Ending::Answered {
            status: 200,
            code: None,
        };
        let limited = Ending::Answered {
            status: 429,
            code: Some("rate_limited".into()),
        };
        report.record(Op::View, "sg", Some(Duration::from_millis(2)), None, 1, &ok);
        report.record(
            Op::View,
            "sg",
            Some(Duration::from_millis(4)),
            None,
            1,
            &limited,
        );
        report.record(Op::View, "sg", None, None, 0, &Ending::InFlightLimit);
        assert_eq!(report.requests(), 2);
        assert_eq!(report.scheduled, 3);
        assert_eq!(report.overall.error_count(), 2);
        assert_eq!(report.overall.errors["429 rate_limited"], 1);
        assert_eq!(report.overall.errors["in_flight_limit"], 1);
        let document = report.to_json();
        assert_eq!(document["status"]["429"], 1);
        assert_eq!(document["operations"]["view"]["count"], 2);
        assert!(document["operations"]["view"]["max_ms"].as_f64().unwrap() >= 3.9);
    }
}
