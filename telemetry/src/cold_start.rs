//! The cold start histograms' shape, the same in both binaries
//! (`itw_agent_cold_start_seconds`, `itw_scaler_cold_start_seconds`): their
//! labels and buckets, so one dashboard query reads either.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, histogram::Histogram},
};

/// Upper bounds in seconds, 100 µs to 60 s in 1-2.5-5 steps: the direct path
/// (sub-millisecond hand-offs) and a pod start (seconds) both fall in buckets
/// narrow enough for `histogram_quantile` to read.
pub const BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 20.0, 30.0, 60.0,
];

/// One Service's series of one phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ColdStartLabels {
    pub destination_namespace: Arc<str>,
    pub destination_service: Arc<str>,
    pub phase: &'static str,
}

/// A family of cold start histograms, one per (Service, phase).
pub type ColdStartFamily = Family<ColdStartLabels, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// An empty family with [`BUCKETS`].
pub fn family() -> ColdStartFamily {
    Family::new_with_constructor(histogram)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_span_100_us_to_60_s_in_rising_order() {
        assert_eq!(BUCKETS.first(), Some(&0.0001));
        assert_eq!(BUCKETS.last(), Some(&60.0));
        assert!(BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
