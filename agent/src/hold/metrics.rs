//! What holding exposes on `/metrics`, per Service.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{coldstart::ColdStartMetrics, resolve::ServiceRef};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_namespace: String,
    pub destination_service: String,
}

impl ServiceLabels {
    pub fn of(service: &ServiceRef) -> Self {
        Self {
            destination_namespace: service.namespace.to_string(),
            destination_service: service.name.to_string(),
        }
    }
}

fn hold_histogram() -> Histogram {
    // 10 ms .. ~164 s: a cold start is seconds to minutes.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

#[derive(Debug)]
pub struct HoldMetrics {
    /// Connections parked now.
    pub held: Family<ServiceLabels, Gauge>,
    /// Connections ever parked.
    pub held_total: Family<ServiceLabels, Counter>,
    /// Handed over to the Service once it had a ready endpoint.
    pub released: Family<ServiceLabels, Counter>,
    /// Reset because the hold timeout passed first.
    pub timed_out: Family<ServiceLabels, Counter>,
    /// The client went away while parked.
    pub left: Family<ServiceLabels, Counter>,
    /// Released, but the Service refused the agent's connects until the
    /// hold timeout passed.
    pub release_failed: Family<ServiceLabels, Counter>,
    /// Connects of released connections that the datapath refused and the
    /// agent made again (kube-proxy or a socket load balancer not yet
    /// following the ready endpoint).
    pub release_retries: Family<ServiceLabels, Counter>,
    /// Seconds from accept to release, per Service: the cold start the
    /// client waited for.
    pub hold_seconds: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    /// Connections that reached a parking port without a record of our
    /// programs (someone connecting to it directly): reset, never handed on.
    pub not_redirected: Family<ServiceLabels, Counter>,
    /// Connects not parked because a cap was reached (per Service or per
    /// node): they went on unheld.
    pub over_cap: Family<ServiceLabels, Counter>,
    /// Parked connects whose connection never reached the parking listener
    /// (the client gave up, a policy dropped its handshake).
    pub expired: Family<ServiceLabels, Counter>,
    /// Bytes of what parked clients sent, kept by the agent now.
    pub buffered_bytes: Gauge,
    /// Parked connections that found the byte budget spent and stopped
    /// reading for a while.
    pub buffer_full: Counter,
    /// Destinations whose connects are parked now.
    pub held_destinations: Gauge,
    /// Parking listeners open (held destinations, and released ones whose
    /// connections are still spliced); getpeername() maps their ports.
    pub parking_listeners: Gauge,
    /// Destinations that should have been held and were not (no parking
    /// port, kernel map refused).
    pub hold_failures: Counter,
    /// Cold start by phase (registered by the agent, shared with reporting).
    pub cold_start: Arc<ColdStartMetrics>,
}

impl Default for HoldMetrics {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl HoldMetrics {
    pub fn new(cold_start: Arc<ColdStartMetrics>) -> Self {
        Self {
            held: Family::default(),
            held_total: Family::default(),
            released: Family::default(),
            timed_out: Family::default(),
            left: Family::default(),
            release_failed: Family::default(),
            release_retries: Family::default(),
            not_redirected: Family::default(),
            over_cap: Family::default(),
            expired: Family::default(),
            buffered_bytes: Gauge::default(),
            buffer_full: Counter::default(),
            hold_seconds: Family::new_with_constructor(hold_histogram),
            held_destinations: Gauge::default(),
            parking_listeners: Gauge::default(),
            hold_failures: Counter::default(),
            cold_start,
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        let agent = registry.sub_registry_with_prefix("itw_agent");
        agent.register(
            "held_connections",
            "Connections to a Service without a ready endpoint, parked by the agent now",
            self.held.clone(),
        );
        agent.register(
            "connections_held",
            "Connections ever parked while their Service had no ready endpoint",
            self.held_total.clone(),
        );
        agent.register(
            "held_released",
            "Parked connections handed over to their Service once it had a ready endpoint",
            self.released.clone(),
        );
        agent.register(
            "held_timed_out",
            "Parked connections reset because the hold timeout passed first",
            self.timed_out.clone(),
        );
        agent.register(
            "held_left",
            "Parked connections whose client went away before release",
            self.left.clone(),
        );
        agent.register(
            "held_release_failed",
            "Released connections the Service kept refusing until their hold timeout (reset)",
            self.release_failed.clone(),
        );
        agent.register(
            "held_release_retries",
            "Connects of released connections refused by a datapath not yet following the ready endpoint, and made again",
            self.release_retries.clone(),
        );
        agent.register(
            "hold_not_redirected",
            "Connections to a parking port that no program of ours parked (someone reaching it directly): reset, never handed on",
            self.not_redirected.clone(),
        );
        agent.register(
            "hold_over_cap",
            "Connects to a held Service not parked because HOLD_MAX_PER_SERVICE or HOLD_MAX_PER_NODE was reached: they went on as without holding",
            self.over_cap.clone(),
        );
        agent.register(
            "hold_expired",
            "Parked connects whose connection never reached the parking listener (client gone, handshake dropped), forgotten",
            self.expired.clone(),
        );
        agent.register(
            "hold_buffered_bytes",
            "Bytes of what parked clients sent, kept by the agent now (at most HOLD_MAX_BUFFERED_BYTES)",
            self.buffered_bytes.clone(),
        );
        agent.register(
            "hold_buffer_full",
            "Parked connections that found HOLD_MAX_BUFFERED_BYTES spent and stopped reading for a while",
            self.buffer_full.clone(),
        );
        agent.register(
            "hold_seconds",
            "How long released connections were held: the cold start their clients waited for",
            self.hold_seconds.clone(),
        );
        agent.register(
            "held_destinations",
            "ClusterIP:ports whose connects are parked now",
            self.held_destinations.clone(),
        );
        agent.register(
            "parking_listeners",
            "Parking listeners open: held destinations, and released ones whose connections the agent still splices",
            self.parking_listeners.clone(),
        );
        agent.register(
            "hold_failures",
            "ClusterIP:ports that should have been held and could not be (see the log)",
            self.hold_failures.clone(),
        );
    }
}
