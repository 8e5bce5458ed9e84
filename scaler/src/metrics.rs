//! What the scaler says about itself on `/metrics`: its own health figures
//! (streams, batches, overflows, lag). The summed `internal_tcp_attempts_total`
//! of every agent is the store's; [`crate::export`] puts the two on one page.
//! This module must never import the store: the store counts into it.
//!
//! The counters here are updated on the hot paths (ingest, KEDA streams), so
//! they are plain prometheus-client atomics; nothing here takes a lock that
//! ingest or KEDA calls wait for.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::coldstart::ColdStartMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

/// Outcome of one batch, the `result` label of `itw_scaler_batches_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchResult {
    Applied,
    /// Already applied (a resend after a reconnect): acknowledged again, ignored.
    Duplicate,
    Rejected,
}

impl BatchResult {
    fn label(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Rejected => "rejected",
        }
    }
}

/// Seconds between an attempt's collection on the node and its arrival here.
/// Sub-millisecond steps: GetMetrics' goal is a p99 of 1 ms as KEDA sees it,
/// so the handler's own share must be told apart well below that.
const CALL_BUCKETS: [f64; 10] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
];

/// The sweep walks every Service and instance: milliseconds at 10,000.
const SWEEP_BUCKETS: [f64; 9] = [
    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
];

const LAG_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The scaler's own figures.
pub struct ScalerMetrics {
    registry: Registry,
    pub agents_connected: Gauge,
    pub agent_instances: Gauge,
    pub folded_instances: Gauge,
    pub folded_instances_forgotten: Counter,
    batches: Family<ResultLabel, Counter>,
    pub deltas: Counter,
    pub snapshots: Counter,
    rejected_streams: Family<ReasonLabel, Counter>,
    refused_entries: Family<ReasonLabel, Counter>,
    connections_closed: Family<ClosedLabels, Counter>,
    pub keda_streams: Gauge,
    pub keda_streams_refused: Counter,
    pub relay_streams: Gauge,
    relayed_streams_refused: Family<ReasonLabel, Counter>,
    relay_answer_bursts: Family<CauseLabel, Counter>,
    relay_answers: Counter,
    pub ingest_lag: Histogram,
    /// Time inside the GetMetrics handler, from its first poll to its answer.
    pub get_metrics_time: Histogram,
    /// Time from a GetMetrics request handed over by its connection to its
    /// answer built ([`crate::call_timing`]).
    pub get_metrics_call_time: Histogram,
    pub sweep_time: Histogram,
    pub series_overflow: Counter,
    pub window_overflow: Counter,
    pub active_services: Gauge,
    pub windowed_destinations: Gauge,
    pub window_buckets: Gauge,
    pub window_buckets_evicted: Counter,
    pub services: Gauge,
    /// Cold start by phase ([`crate::coldstart`]).
    pub cold_start: Arc<ColdStartMetrics>,
    pub service_edges: Gauge,
}

impl Default for ScalerMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let agents_connected = Gauge::default();
        registry.register(
            "itw_scaler_agents_connected",
            "Open agent ingest streams that have said hello",
            agents_connected.clone(),
        );
        let agent_instances = Gauge::default();
        registry.register(
            "itw_scaler_agent_instances",
            "Agent instances held (connected, or disconnected within INSTANCE_RETENTION)",
            agent_instances.clone(),
        );
        let folded_instances = Gauge::default();
        registry.register(
            "itw_scaler_folded_instances",
            "Folded agent instances remembered (FOLDED_RETENTION, MAX_FOLDED_INSTANCES) so that one coming back is not counted twice",
            folded_instances.clone(),
        );
        let folded_instances_forgotten = Counter::default();
        registry.register(
            "itw_scaler_folded_instances_forgotten",
            "Folded agent instances forgotten before FOLDED_RETENTION because MAX_FOLDED_INSTANCES was reached (one coming back would be counted again)",
            folded_instances_forgotten.clone(),
        );
        let batches = Family::<ResultLabel, Counter>::default();
        registry.register(
            "itw_scaler_batches",
            "Agent batches by result: applied, duplicate (a resend, acknowledged and ignored), rejected",
            batches.clone(),
        );
        let deltas = Counter::default();
        registry.register(
            "itw_scaler_deltas",
            "Deltas applied from agent batches",
            deltas.clone(),
        );
        let snapshots = Counter::default();
        registry.register(
            "itw_scaler_snapshots",
            "Agent snapshots applied",
            snapshots.clone(),
        );
        let rejected_streams = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "itw_scaler_rejected_streams",
            "Agent ingest streams ended with an error status, by reason",
            rejected_streams.clone(),
        );
        let refused_entries = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "itw_scaler_refused_entries",
            "Entries of agent batches and snapshots refused alone (the rest of the message is applied), by reason: a name Kubernetes would not allow (invalid_namespace, invalid_service, invalid_pod), or a cap (max_services, max_services_per_agent, max_edges)",
            refused_entries.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "itw_scaler_connections_closed",
            "Connections the scaler closed unasked, by listener (grpc, metrics) and reason: connection_cap (GRPC_MAX_CONNECTIONS, or 256 on /metrics), idle (IDLE_TIMEOUT on gRPC, 60s on /metrics)",
            connections_closed.clone(),
        );
        let keda_streams = Gauge::default();
        registry.register(
            "itw_scaler_keda_streams",
            "Open KEDA StreamIsActive and StreamMetricSpec streams",
            keda_streams.clone(),
        );
        let keda_streams_refused = Counter::default();
        registry.register(
            "itw_scaler_keda_streams_refused",
            "KEDA streams refused because MAX_KEDA_STREAMS were open",
            keda_streams_refused.clone(),
        );
        let relay_streams = Gauge::default();
        registry.register(
            "itw_scaler_relay_streams",
            "Open Relay streams, each carrying many agents' streams from a relay (their agents count in itw_scaler_agents_connected)",
            relay_streams.clone(),
        );
        let relayed_streams_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "itw_scaler_relayed_streams_refused",
            "Relayed agent streams refused before their hello was read, by reason: max_relayed_streams (MAX_RELAYED_STREAMS live on their Relay stream)",
            relayed_streams_refused.clone(),
        );
        let relay_answer_bursts = Family::<CauseLabel, Counter>::default();
        registry.register(
            "itw_scaler_relay_answer_bursts",
            "Bursts of answers sent on Relay streams, by cause: tick (the acks held up to RELAY_ACK_DELAY), urgent (a welcome, an ended or a wake batch's ack, with what was held before it), full (64 answers held)",
            relay_answer_bursts.clone(),
        );
        let relay_answers = Counter::default();
        registry.register(
            "itw_scaler_relay_answers",
            "Answers sent on Relay streams (welcomes, acks, ended); divided by itw_scaler_relay_answer_bursts_total, the answers each wake of a serving thread writes",
            relay_answers.clone(),
        );
        let ingest_lag = Histogram::new(LAG_BUCKETS);
        registry.register(
            "itw_scaler_ingest_lag_seconds",
            "Time from an agent collecting a batch (clock offset corrected) to the scaler receiving it",
            ingest_lag.clone(),
        );
        let get_metrics_time = Histogram::new(CALL_BUCKETS);
        registry.register(
            "itw_scaler_get_metrics_handler_seconds",
            "Time inside the GetMetrics handler (the store read and the answer), without the time the call waited to be decoded and scheduled",
            get_metrics_time.clone(),
        );
        let get_metrics_call_time = Histogram::new(CALL_BUCKETS);
        registry.register(
            "itw_scaler_get_metrics_seconds",
            "Time from a GetMetrics request handed over by its connection to its answer built: the handler plus the time its task waited for a serving thread",
            get_metrics_call_time.clone(),
        );
        let sweep_time = Histogram::new(SWEEP_BUCKETS);
        registry.register(
            "itw_scaler_sweep_seconds",
            "Time one housekeeping sweep (instances, windows, edges; every 5s) took",
            sweep_time.clone(),
        );
        let series_overflow = Counter::default();
        registry.register(
            "itw_scaler_series_overflow",
            "Series reports folded into their service's \"(other processes)\" series because MAX_SERIES was reached",
            series_overflow.clone(),
        );
        let window_overflow = Counter::default();
        registry.register(
            "itw_scaler_window_overflow",
            "Attempts counted in totals but not windowed because MAX_DESTINATIONS was reached",
            window_overflow.clone(),
        );
        let active_services = Gauge::default();
        registry.register(
            "itw_scaler_active_services",
            "Services with at least one attempt in the kept history (updated every few seconds)",
            active_services.clone(),
        );
        let windowed_destinations = Gauge::default();
        registry.register(
            "itw_scaler_windowed_destinations",
            "Destinations (namespace, service, port) with a per-second window",
            windowed_destinations.clone(),
        );
        let window_buckets = Gauge::default();
        registry.register(
            "itw_scaler_window_buckets",
            "Non-empty per-second counts held in all windows (MAX_WINDOW_BUCKETS; updated every few seconds)",
            window_buckets.clone(),
        );
        let window_buckets_evicted = Counter::default();
        registry.register(
            "itw_scaler_window_buckets_evicted",
            "Per-second counts forgotten before they left the history because MAX_WINDOW_BUCKETS was reached (windows longer than what is left under-report)",
            window_buckets_evicted.clone(),
        );
        let services = Gauge::default();
        registry.register(
            "itw_scaler_services",
            "Services with series on this replica (MAX_SERVICES)",
            services.clone(),
        );
        let cold_start = Arc::new(ColdStartMetrics::default());
        cold_start.register(&mut registry);
        let service_edges = Gauge::default();
        registry.register(
            "itw_scaler_service_edges",
            "Edges \"Service A calls Service B\" of the dependency graph held by this replica (EDGE_MAX_AGE, MAX_EDGES; itw.v1.Graph/ListEdges lists them)",
            service_edges.clone(),
        );
        Self {
            registry,
            agents_connected,
            agent_instances,
            folded_instances,
            folded_instances_forgotten,
            batches,
            deltas,
            snapshots,
            rejected_streams,
            refused_entries,
            connections_closed,
            keda_streams,
            keda_streams_refused,
            relay_streams,
            relayed_streams_refused,
            relay_answer_bursts,
            relay_answers,
            ingest_lag,
            get_metrics_time,
            get_metrics_call_time,
            sweep_time,
            series_overflow,
            window_overflow,
            active_services,
            windowed_destinations,
            window_buckets,
            window_buckets_evicted,
            services,
            cold_start,
            service_edges,
        }
    }
}

impl ScalerMetrics {
    /// Writes these figures in the text exposition format.
    pub fn encode(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
    }

    pub fn batch(&self, result: BatchResult) {
        self.batches
            .get_or_create(&ResultLabel {
                result: result.label(),
            })
            .inc();
    }

    /// A connection the guarded listener closed: `listener` is `grpc` or
    /// `metrics`, `reason` `connection_cap` or `idle`.
    pub fn connection_closed(&self, listener: &'static str, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ClosedLabels { listener, reason })
            .inc();
    }

    pub fn rejected_stream(&self, reason: &'static str) {
        self.rejected_streams
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts an entry refused for its name; `reason` says which name.
    pub fn refused_entry(&self, reason: &'static str) {
        self.refused_entries
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Entries refused for `reason` so far (tests).
    #[cfg(test)]
    pub fn refused_entries(&self, reason: &'static str) -> u64 {
        self.refused_entries
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Keeps `itw_scaler_keda_streams` up while the returned guard lives;
    /// None (counted in `itw_scaler_keda_streams_refused_total`) when `max`
    /// streams are open already.
    pub fn keda_stream(self: &Arc<Self>, max: usize) -> Option<GaugeGuard> {
        let before = self.keda_streams.inc();
        if usize::try_from(before).unwrap_or(0) >= max {
            self.keda_streams.dec();
            self.keda_streams_refused.inc();
            return None;
        }
        Some(GaugeGuard(self.keda_streams.clone()))
    }

    /// Counts a relayed stream refused for `reason` ([`crate::relay::Refusal`]).
    pub fn relayed_refused(&self, reason: &'static str) {
        self.relayed_streams_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one burst of `answers` answers sent on a Relay stream.
    pub fn relay_burst(&self, cause: &'static str, answers: usize) {
        self.relay_answer_bursts
            .get_or_create(&CauseLabel { cause })
            .inc();
        self.relay_answers.inc_by(answers as u64);
    }

    /// Bursts sent for `cause` and answers sent in all (tests).
    #[cfg(test)]
    pub fn relay_bursts(&self, cause: &'static str) -> (u64, u64) {
        (
            self.relay_answer_bursts
                .get_or_create(&CauseLabel { cause })
                .get(),
            self.relay_answers.get(),
        )
    }

    /// Keeps `itw_scaler_relay_streams` up while the returned guard lives.
    pub fn relay_connected(&self) -> GaugeGuard {
        self.relay_streams.inc();
        GaugeGuard(self.relay_streams.clone())
    }

    /// Keeps `itw_scaler_agents_connected` up while the returned guard lives.
    pub fn agent_connected(&self) -> GaugeGuard {
        self.agents_connected.inc();
        GaugeGuard(self.agents_connected.clone())
    }
}

/// Decrements its gauge when dropped, however the stream ended.
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
