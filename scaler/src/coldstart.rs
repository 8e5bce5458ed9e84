//! Cold start by phase as this replica sees it, per Service
//! (`itw_scaler_cold_start_seconds`), observed once per activation:
//!
//! - `first_connect_to_received`: the agent's wake collection (its first
//!   connect after idle, stamped `collected_at_unix_ms` on the agent's clock,
//!   corrected by the offset this replica measured for that agent instance)
//!   -> the wake batch received here;
//! - `received_to_stream`: that batch received -> `StreamIsActive` `true`
//!   handed to the first stream of the Service.
//!
//! An activation is a `StreamIsActive` stream of the Service going inactive
//! -> active. Only the first stream to do so counts: the record of the wake
//! batch is taken by it, so a Service with several ScaledObjects (or KEDA
//! replicas) is observed once, not once per stream. Later streams of the same
//! activation find no record and observe nothing.
//!
//! What this module owns: one record per subscribed Service (the last wake
//! batch received for it) and the histograms. What it must never do: take a
//! time of its own. Every instant is one the activation timeline
//! ([`itw_telemetry::timeline`]) logs, handed in by the caller.

use std::{collections::HashMap, collections::HashSet, sync::Arc, time::Duration};

use itw_telemetry::cold_start::{self, ColdStartFamily, ColdStartLabels};
use parking_lot::Mutex;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// `phase`: the agent's first connect -> the wake batch received here.
pub const FIRST_CONNECT_TO_RECEIVED: &str = "first_connect_to_received";
/// `phase`: the wake batch received -> `StreamIsActive` `true` handed over.
pub const RECEIVED_TO_STREAM: &str = "received_to_stream";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeftOutLabels {
    pub reason: &'static str,
}

/// Activations of a Service past MAX_SERVICES Services with series.
pub const LEFT_OUT_MAX_SERVICES: &str = "max_services";
/// Activations whose last wake batch was received longer ago than the
/// trigger's window (plus its one extra second): the activation was made by
/// batches that were not wakes (an `activationThreshold` above 0, a wake
/// the agent's ring buffer dropped), so no first connect is known.
pub const LEFT_OUT_STALE_WAKE: &str = "stale_wake";

#[derive(Debug)]
pub struct ColdStartMetrics {
    pub seconds: ColdStartFamily,
    /// `first_connect_to_received` observations that came out negative
    /// (observed as 0).
    pub clock_skew: Counter,
    pub left_out: Family<LeftOutLabels, Counter>,
}

impl Default for ColdStartMetrics {
    fn default() -> Self {
        Self {
            seconds: cold_start::family(),
            clock_skew: Counter::default(),
            left_out: Family::default(),
        }
    }
}

impl ColdStartMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "itw_scaler_cold_start_seconds",
            "Per Service, once per activation: the agent's first connect -> the wake batch received here (first_connect_to_received), received -> StreamIsActive true handed to the first stream (received_to_stream)",
            self.seconds.clone(),
        );
        registry.register(
            "itw_scaler_cold_start_clock_skew",
            "first_connect_to_received observations that came out negative after the clock offset correction (observed as 0)",
            self.clock_skew.clone(),
        );
        registry.register(
            "itw_scaler_cold_start_left_out",
            "Activations not observed in itw_scaler_cold_start_seconds, by reason: max_services (MAX_SERVICES Services have series), stale_wake (no wake batch within the trigger's window)",
            self.left_out.clone(),
        );
    }

    fn left_out(&self, reason: &'static str) {
        self.left_out.get_or_create(&LeftOutLabels { reason }).inc();
    }
}

/// A wake batch's arrival, as the timeline's "wake batch received" stamps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WakeReceipt {
    /// CLOCK_MONOTONIC, µs ([`itw_telemetry::timeline::monotonic_us`]).
    pub at_us: u64,
    /// The scaler clock at the same moment, Unix ms.
    pub at_ms: i64,
}

/// The last wake batch received for a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pending {
    received_us: u64,
    /// First connect -> received, ms; negative when the clocks disagree by
    /// more than the transit.
    first_connect_ms: i64,
}

type ServiceKey = (Arc<str>, Arc<str>);

#[derive(Debug, Default)]
struct Book {
    pending: HashMap<ServiceKey, Pending>,
    /// Services with series in the family.
    with_series: HashSet<ServiceKey>,
}

/// The cold start records and histograms of one replica.
#[derive(Debug)]
pub struct ColdStarts {
    max_services: usize,
    metrics: Arc<ColdStartMetrics>,
    book: Mutex<Book>,
}

impl ColdStarts {
    /// `max_services`: MAX_SERVICES, which bounds the Services with series
    /// and the records alike.
    pub fn new(max_services: usize, metrics: Arc<ColdStartMetrics>) -> Self {
        Self {
            max_services,
            metrics,
            book: Mutex::new(Book::default()),
        }
    }

    /// A wake batch the agent collected at `collected_at_ms` (its clock),
    /// whose instance's clock is `offset_ms` behind ours, was received and
    /// applied; it had attempts to `services` (the subscribed ones only: no
    /// other can activate a stream).
    pub fn wake_batch<'a>(
        &self,
        receipt: WakeReceipt,
        collected_at_ms: i64,
        offset_ms: i64,
        services: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        let pending = Pending {
            received_us: receipt.at_us,
            first_connect_ms: receipt
                .at_ms
                .saturating_sub(collected_at_ms.saturating_add(offset_ms)),
        };
        let mut book = self.book.lock();
        for (namespace, service) in services {
            let key: ServiceKey = (namespace.into(), service.into());
            if book.pending.len() >= self.max_services && !book.pending.contains_key(&key) {
                // Only subscribed Services get here: as many as there are
                // triggers, far below the cap unless it is set tiny.
                self.metrics.left_out(LEFT_OUT_MAX_SERVICES);
                continue;
            }
            book.pending.insert(key, pending);
        }
    }

    /// `StreamIsActive` `true` was handed to a stream of the Service at
    /// `at_us` (CLOCK_MONOTONIC µs), the stream's trigger having a `window`:
    /// observes the activation if no stream did yet.
    pub fn activated(&self, namespace: &str, service: &str, at_us: u64, window: Duration) {
        let key: ServiceKey = (namespace.into(), service.into());
        let mut book = self.book.lock();
        let Some(pending) = book.pending.remove(&key) else {
            return;
        };
        let waited_us = at_us.saturating_sub(pending.received_us);
        // The activity window keeps one second more than the trigger's.
        let window_us = u64::try_from(window.as_micros())
            .unwrap_or(u64::MAX)
            .saturating_add(1_000_000);
        if waited_us > window_us {
            self.metrics.left_out(LEFT_OUT_STALE_WAKE);
            return;
        }
        if !book.with_series.contains(&key) {
            if book.with_series.len() >= self.max_services {
                self.metrics.left_out(LEFT_OUT_MAX_SERVICES);
                return;
            }
            book.with_series.insert(key.clone());
        }
        drop(book);
        let first_connect_ms = if pending.first_connect_ms < 0 {
            self.metrics.clock_skew.inc();
            0
        } else {
            pending.first_connect_ms
        };
        let (namespace, service) = key;
        let observe = |phase: &'static str, seconds: f64| {
            self.metrics
                .seconds
                .get_or_create(&ColdStartLabels {
                    destination_namespace: Arc::clone(&namespace),
                    destination_service: Arc::clone(&service),
                    phase,
                })
                .observe(seconds);
        };
        observe(FIRST_CONNECT_TO_RECEIVED, first_connect_ms as f64 / 1e3);
        observe(RECEIVED_TO_STREAM, waited_us as f64 / 1e6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn cold_starts(max_services: usize) -> (ColdStarts, Arc<ColdStartMetrics>) {
        let metrics = Arc::new(ColdStartMetrics::default());
        (ColdStarts::new(max_services, Arc::clone(&metrics)), metrics)
    }

    /// The exposition lines of the cold start families, without comments.
    fn lines(metrics: &ColdStartMetrics) -> Vec<String> {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    /// `_count`, `_sum` and the non-zero cumulative buckets of one series.
    fn series(metrics: &ColdStartMetrics, service: &str, phase: &str) -> Vec<String> {
        let labels = format!(
            "destination_namespace=\"apps\",destination_service=\"{service}\",phase=\"{phase}\""
        );
        lines(metrics)
            .into_iter()
            .filter(|l| l.contains(&labels))
            .map(|l| l.replace(&labels, ""))
            .filter(|l| !l.ends_with(" 0"))
            .collect()
    }

    fn receipt(at_us: u64, at_ms: i64) -> WakeReceipt {
        WakeReceipt { at_us, at_ms }
    }

    #[test]
    fn one_activation_observes_each_phase_once_from_the_timeline_stamps() {
        let (starts, metrics) = cold_starts(10);
        // Collected at 1_000 on an agent clock 250 ms behind ours, received
        // at our 1_253: 3 ms after the first connect.
        starts.wake_batch(receipt(5_000_000, 1_253), 1_000, 250, [("apps", "web")]);
        // Handed to the stream 700 µs after the batch arrived.
        starts.activated("apps", "web", 5_000_700, WINDOW);
        assert_eq!(
            series(&metrics, "web", FIRST_CONNECT_TO_RECEIVED),
            vec![
                "itw_scaler_cold_start_seconds_sum{} 0.003",
                "itw_scaler_cold_start_seconds_count{} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"0.005\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"0.01\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"0.025\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"0.05\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"0.1\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"0.25\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"0.5\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"1.0\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"2.5\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"5.0\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"10.0\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"20.0\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"30.0\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"60.0\",} 1",
                "itw_scaler_cold_start_seconds_bucket{le=\"+Inf\",} 1",
            ]
        );
        let stream = series(&metrics, "web", RECEIVED_TO_STREAM);
        assert_eq!(stream[0], "itw_scaler_cold_start_seconds_sum{} 0.0007");
        assert_eq!(stream[1], "itw_scaler_cold_start_seconds_count{} 1");
        assert_eq!(
            stream[2],
            "itw_scaler_cold_start_seconds_bucket{le=\"0.001\",} 1"
        );
        assert_eq!(
            stream.len(),
            2 + 17,
            "le=0.001, every bucket above and +Inf"
        );
        // A second stream of the same activation observes nothing.
        starts.activated("apps", "web", 5_000_900, WINDOW);
        assert_eq!(
            series(&metrics, "web", RECEIVED_TO_STREAM)[1],
            "itw_scaler_cold_start_seconds_count{} 1"
        );
        assert_eq!(metrics.clock_skew.get(), 0);
    }

    #[test]
    fn the_last_wake_batch_before_the_activation_is_the_one_observed() {
        let (starts, metrics) = cold_starts(10);
        starts.wake_batch(receipt(1_000_000, 10_000), 9_990, 0, [("apps", "web")]);
        starts.wake_batch(
            receipt(2_000_000, 11_000),
            10_998,
            0,
            [("apps", "web"), ("apps", "db")],
        );
        starts.activated("apps", "web", 2_250_000, WINDOW);
        let first = series(&metrics, "web", FIRST_CONNECT_TO_RECEIVED);
        assert_eq!(first[0], "itw_scaler_cold_start_seconds_sum{} 0.002");
        let stream = series(&metrics, "web", RECEIVED_TO_STREAM);
        assert_eq!(stream[0], "itw_scaler_cold_start_seconds_sum{} 0.25");
        assert_eq!(stream[1], "itw_scaler_cold_start_seconds_count{} 1");
        assert_eq!(
            stream[2],
            "itw_scaler_cold_start_seconds_bucket{le=\"0.25\",} 1"
        );
        // db was in the batch but no stream of it went active.
        assert_eq!(
            series(&metrics, "db", RECEIVED_TO_STREAM),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_negative_first_connect_counts_as_zero_and_apart() {
        let (starts, metrics) = cold_starts(10);
        // The snapshot's transit made the offset 40 ms too large.
        starts.wake_batch(receipt(7_000, 1_010), 1_000, 50, [("apps", "web")]);
        starts.activated("apps", "web", 7_100, WINDOW);
        let first = series(&metrics, "web", FIRST_CONNECT_TO_RECEIVED);
        assert_eq!(first[0], "itw_scaler_cold_start_seconds_sum{} 0.0");
        assert_eq!(first[1], "itw_scaler_cold_start_seconds_count{} 1");
        assert_eq!(
            first[2],
            "itw_scaler_cold_start_seconds_bucket{le=\"0.0001\",} 1"
        );
        assert_eq!(metrics.clock_skew.get(), 1);
    }

    #[test]
    fn a_wake_older_than_the_window_is_left_out_as_stale() {
        let (starts, metrics) = cold_starts(10);
        starts.wake_batch(receipt(0, 1_000), 1_000, 0, [("apps", "web")]);
        // 10 s window + its extra second: 11 s is still fresh, past is not.
        starts.activated("apps", "web", 11_000_001, Duration::from_secs(10));
        assert_eq!(
            series(&metrics, "web", RECEIVED_TO_STREAM),
            Vec::<String>::new()
        );
        assert_eq!(
            metrics
                .left_out
                .get_or_create(&LeftOutLabels {
                    reason: LEFT_OUT_STALE_WAKE
                })
                .get(),
            1
        );
        starts.wake_batch(receipt(0, 1_000), 1_000, 0, [("apps", "web")]);
        starts.activated("apps", "web", 11_000_000, Duration::from_secs(10));
        assert_eq!(
            series(&metrics, "web", RECEIVED_TO_STREAM)[1],
            "itw_scaler_cold_start_seconds_count{} 1"
        );
    }

    #[test]
    fn services_past_max_services_are_counted_not_observed() {
        let (starts, metrics) = cold_starts(1);
        starts.wake_batch(receipt(0, 0), 0, 0, [("apps", "web")]);
        starts.activated("apps", "web", 10, WINDOW);
        starts.wake_batch(receipt(0, 0), 0, 0, [("apps", "web"), ("apps", "db")]);
        starts.activated("apps", "web", 10, WINDOW);
        starts.activated("apps", "db", 10, WINDOW);
        assert_eq!(
            series(&metrics, "web", RECEIVED_TO_STREAM)[1],
            "itw_scaler_cold_start_seconds_count{} 2"
        );
        assert_eq!(
            series(&metrics, "db", RECEIVED_TO_STREAM),
            Vec::<String>::new()
        );
        assert_eq!(
            metrics
                .left_out
                .get_or_create(&LeftOutLabels {
                    reason: LEFT_OUT_MAX_SERVICES
                })
                .get(),
            1,
            "db's record was refused (web's record filled the one place)"
        );
    }
}
