//! The scaler's `/metrics` page: its own figures ([`crate::metrics`]), then
//! the attempts of every series the store exports.
//!
//! It only reads: a scrape never changes a count, and it holds no lock of the
//! store longer than the brief listing of its series.

use std::sync::Arc;

use itw_telemetry::{
    exposition::{AttemptSeries, ScrapeView, encode_attempts},
    http::MetricsSource,
};

use crate::{metrics::ScalerMetrics, store::Store};

/// `/metrics` of the scaler: its own figures, then the attempts of every series.
pub struct Exporter {
    pub metrics: Arc<ScalerMetrics>,
    pub store: Arc<Store>,
}

impl MetricsSource for Exporter {
    fn encode(&self, out: &mut String, view: &ScrapeView) -> std::fmt::Result {
        self.metrics.encode(out)?;
        let series = self.store.attempt_series();
        encode_attempts(
            out,
            view,
            series.iter().map(|s| AttemptSeries {
                labels: s.labels(),
                attempts: s.exported(),
                created: s.created(),
            }),
        )
    }
}
