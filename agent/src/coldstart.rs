//! Cold start by phase as this agent sees it, per Service
//! (`itw_agent_cold_start_seconds`):
//!
//! - `first_connect_to_stream`: a wake read from the ring buffer (the first
//!   connect after the destination was idle) -> its batch handed to the
//!   first scaler stream, once per wake batch and Service in it;
//! - for held Services, once per held ClusterIP:port that parked a client
//!   (see [`crate::hold`]): `parked_to_endpoint_ready` (the first client
//!   parked -> the agent learns of a ready endpoint), `endpoint_ready_to_released`
//!   (-> the first parked client's connection to the Service made, its splice
//!   starting) and `released_to_first_byte` (-> that connection's first byte
//!   from the Service).
//!
//! The series are per Service the agent watches and that woke or was held on
//! this node, so `WATCH_NAMESPACES`, `SERVICE_SELECTOR` and the service map
//! bound them as they bound `internal_tcp_attempts_total`.
//!
//! This module never takes a time itself: the wake's instants are the
//! activation timeline's ([`itw_telemetry::timeline`]), handed in.

use std::sync::Arc;

use itw_telemetry::cold_start::{self, ColdStartFamily, ColdStartLabels};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::resolve::ServiceRef;

/// `phase`: a wake read from the ring -> its batch handed to a scaler stream.
pub const FIRST_CONNECT_TO_STREAM: &str = "first_connect_to_stream";
/// `phase`: the first client parked -> an endpoint of the Service ready.
pub const PARKED_TO_ENDPOINT_READY: &str = "parked_to_endpoint_ready";
/// `phase`: an endpoint ready -> the first parked client released.
pub const ENDPOINT_READY_TO_RELEASED: &str = "endpoint_ready_to_released";
/// `phase`: released -> the first byte from the Service to that client.
pub const RELEASED_TO_FIRST_BYTE: &str = "released_to_first_byte";

#[derive(Debug)]
pub struct ColdStartMetrics {
    seconds: ColdStartFamily,
}

impl Default for ColdStartMetrics {
    fn default() -> Self {
        Self {
            seconds: cold_start::family(),
        }
    }
}

impl ColdStartMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let agent = registry.sub_registry_with_prefix("itw_agent");
        agent.register(
            "cold_start_seconds",
            "Per Service: a wake read from the ring -> its batch handed to a scaler stream (first_connect_to_stream); for held Services, per held ClusterIP:port, the first client parked -> an endpoint ready (parked_to_endpoint_ready) -> that client released (endpoint_ready_to_released) -> its first byte from the Service (released_to_first_byte)",
            self.seconds.clone(),
        );
    }

    pub fn observe(&self, service: &ServiceRef, phase: &'static str, seconds: f64) {
        self.seconds
            .get_or_create(&ColdStartLabels {
                destination_namespace: Arc::clone(&service.namespace),
                destination_service: Arc::clone(&service.name),
                phase,
            })
            .observe(seconds);
    }

    /// A wake batch was handed to a scaler stream at `handed_us`
    /// (CLOCK_MONOTONIC µs, the timeline's stamp).
    pub fn handed(&self, woken: &Woken, handed_us: u64) {
        let seconds = handed_us.saturating_sub(woken.read_at_us) as f64 / 1e6;
        for service in woken.services.iter() {
            self.observe(service, FIRST_CONNECT_TO_STREAM, seconds);
        }
    }
}

/// What a wake collection carries to the stream that sends its batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Woken {
    /// When the counting loop took the wakes
    /// (`itw_agent_report_wake_to_send_seconds` starts here).
    pub at: Instant,
    /// When the first of them was read from the ring buffer, CLOCK_MONOTONIC
    /// µs: the timeline's "wakes read from the ring buffer".
    pub read_at_us: u64,
    /// The Services with attempts in the collection, each once.
    pub services: Arc<[ServiceRef]>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `_sum`, `_count` and the non-zero buckets of one series, its labels
    /// left out.
    pub(crate) fn series(metrics: &ColdStartMetrics, service: &str, phase: &str) -> Vec<String> {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let labels = format!(
            "destination_namespace=\"apps\",destination_service=\"{service}\",phase=\"{phase}\""
        );
        text.lines()
            .filter(|l| l.contains(&labels))
            .map(|l| l.replace(&labels, ""))
            .filter(|l| !l.ends_with(" 0"))
            .collect()
    }

    #[test]
    fn a_handed_wake_batch_observes_each_of_its_services_once() {
        let metrics = ColdStartMetrics::default();
        let woken = Woken {
            at: Instant::now(),
            read_at_us: 10_000,
            services: Arc::from([
                ServiceRef::new("apps", "web"),
                ServiceRef::new("apps", "db"),
            ]),
        };
        metrics.handed(&woken, 10_300);
        for service in ["web", "db"] {
            let lines = series(&metrics, service, FIRST_CONNECT_TO_STREAM);
            assert_eq!(lines[0], "itw_agent_cold_start_seconds_sum{} 0.0003");
            assert_eq!(lines[1], "itw_agent_cold_start_seconds_count{} 1");
            assert_eq!(
                lines[2],
                "itw_agent_cold_start_seconds_bucket{le=\"0.0005\",} 1"
            );
            assert_eq!(
                lines.len(),
                2 + 18,
                "le=0.0005, every bucket above and +Inf"
            );
        }
    }
}
