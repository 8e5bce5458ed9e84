//! The scaler's own account of a phase, from its `/metrics` before and
//! after: how long GetMetrics spent inside its handler and how long the
//! sweeps took. Set beside the latency the KEDA-role client saw, it tells a
//! slow handler from a call that waited for a thread.

use std::net::SocketAddr;

use itw_telemetry::exposition::{Sample, parse_samples};

const HANDLER: &str = "itw_scaler_get_metrics_handler_seconds_bucket";
const CALL: &str = "itw_scaler_get_metrics_seconds_bucket";
const SWEEP: &str = "itw_scaler_sweep_seconds_bucket";

/// Cumulative bucket counts of one histogram, by upper bound (`+Inf` last).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Buckets(Vec<(f64, f64)>);

impl Buckets {
    fn of(samples: &[Sample], name: &str) -> Self {
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| Some((s.label("le")?.parse::<f64>().ok()?, s.value)))
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self(buckets)
    }

    /// What was observed between `before` and `self`.
    fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|&(le, n)| {
                    let was = before.0.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
                    (le, n - was)
                })
                .collect(),
        )
    }

    fn total(&self) -> f64 {
        self.0.last().map_or(0.0, |b| b.1)
    }

    /// Observations above `bound` (which must be a bucket's upper bound).
    fn above(&self, bound: f64) -> f64 {
        let within = self.0.iter().find(|b| b.0 == bound).map_or(0.0, |b| b.1);
        self.total() - within
    }

    /// The upper bound of the bucket holding quantile `q`.
    fn quantile_bound(&self, q: f64) -> f64 {
        let rank = (self.total() * q).ceil();
        self.0
            .iter()
            .find(|b| b.1 >= rank && b.1 > 0.0)
            .map_or(0.0, |b| b.0)
    }
}

fn bound(le: f64) -> String {
    if le.is_infinite() {
        "above the last bucket".to_owned()
    } else {
        format!("<= {:.3} ms", le * 1e3)
    }
}

/// The two histograms at one moment.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ScalerSide {
    handler: Buckets,
    call: Buckets,
    sweep: Buckets,
}

impl ScalerSide {
    pub async fn scrape(metrics: SocketAddr) -> anyhow::Result<Self> {
        let body = reqwest::get(format!("http://{metrics}/metrics"))
            .await?
            .text()
            .await?;
        Ok(Self::parse(&body))
    }

    fn parse(body: &str) -> Self {
        let samples = parse_samples(body);
        Self {
            handler: Buckets::of(&samples, HANDLER),
            call: Buckets::of(&samples, CALL),
            sweep: Buckets::of(&samples, SWEEP),
        }
    }

    /// One line on what happened since `before`.
    pub fn summary_since(&self, before: &Self) -> String {
        let handler = self.handler.since(&before.handler);
        let call = self.call.since(&before.call);
        let sweep = self.sweep.since(&before.sweep);
        format!(
            "inside the scaler: GetMetrics handler p50 {}, p99 {}, {:.0} of {:.0} over 1 ms; handed over to answered (queue included) p50 {}, p99 {}, {:.0} of {:.0} over 1 ms; {:.0} sweeps, slowest {}",
            bound(handler.quantile_bound(0.5)),
            bound(handler.quantile_bound(0.99)),
            handler.above(0.001),
            handler.total(),
            bound(call.quantile_bound(0.5)),
            bound(call.quantile_bound(0.99)),
            call.above(0.001),
            call.total(),
            sweep.total(),
            bound(sweep.quantile_bound(1.0)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(name: &str, counts: [u32; 4]) -> String {
        ["0.0001", "0.001", "0.01", "+Inf"]
            .iter()
            .zip(counts)
            .map(|(le, n)| format!("{name}{{le=\"{le}\"}} {n}\n"))
            .collect()
    }

    fn body(handler: [u32; 4], call: [u32; 4], sweeps: [u32; 4]) -> String {
        histogram(HANDLER, handler) + &histogram(CALL, call) + &histogram(SWEEP, sweeps)
    }

    #[test]
    fn a_phase_is_the_difference_of_two_scrapes() {
        let before = ScalerSide::parse(&body([10, 10, 10, 10], [9, 10, 10, 10], [1, 1, 1, 1]));
        let after = ScalerSide::parse(&body(
            [200, 205, 210, 210],
            [108, 200, 209, 210],
            [3, 3, 3, 4],
        ));
        assert_eq!(
            after.summary_since(&before),
            "inside the scaler: GetMetrics handler p50 <= 0.100 ms, p99 <= 10.000 ms, 5 of 200 over 1 ms; handed over to answered (queue included) p50 <= 1.000 ms, p99 <= 10.000 ms, 10 of 200 over 1 ms; 3 sweeps, slowest above the last bucket"
        );
    }

    #[test]
    fn nothing_observed_reads_as_zero() {
        let side = ScalerSide::parse("");
        assert_eq!(
            side.summary_since(&ScalerSide::default()),
            "inside the scaler: GetMetrics handler p50 <= 0.000 ms, p99 <= 0.000 ms, 0 of 0 over 1 ms; handed over to answered (queue included) p50 <= 0.000 ms, p99 <= 0.000 ms, 0 of 0 over 1 ms; 0 sweeps, slowest <= 0.000 ms"
        );
    }
}
