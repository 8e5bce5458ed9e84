//! What the relay says about itself on `/metrics`. Updated on the
//! forwarding paths, so everything here is a prometheus-client atomic; no
//! lock a stream waits for.

use std::net::SocketAddr;

use itw_telemetry::{exposition::ScrapeView, http::MetricsSource};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    pub replica: String,
}

/// Why an agent stream ended or was refused (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The agent closed its side.
    AgentClosed,
    /// The agent went away (reset, or its connection died).
    AgentGone,
    /// The agent's message could not be read (too large, malformed).
    AgentError,
    /// The replica ended the relayed stream (`ended`).
    ReplicaEnded,
    /// The Relay stream to its replica ended or broke.
    RelayStreamEnded,
    /// The agent did not read its responses (AGENT_RESPONSE_BUFFER).
    ResponseBufferFull,
    /// The relay is stopping.
    Stopping,
    /// Its replica is no longer resolved from SCALER_ADDR (scaled down,
    /// or not ready), so its Relay stream was ended.
    ReplicaGone,
    /// Refused: no `authorization` header with the expected token.
    Unauthenticated,
    /// Refused: the `itw-replica` header is missing, malformed or names a
    /// replica this relay did not resolve.
    UnknownReplica,
    /// Refused: no Relay stream to the replica came up in time.
    ReplicaUnreachable,
    /// Refused: MAX_AGENT_STREAMS were open.
    MaxAgentStreams,
}

impl EndReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::AgentClosed => "agent_closed",
            Self::AgentGone => "agent_gone",
            Self::AgentError => "agent_error",
            Self::ReplicaEnded => "replica_ended",
            Self::RelayStreamEnded => "relay_stream_ended",
            Self::ResponseBufferFull => "response_buffer_full",
            Self::Stopping => "stopping",
            Self::ReplicaGone => "replica_gone",
            Self::Unauthenticated => "unauthenticated",
            Self::UnknownReplica => "unknown_replica",
            Self::ReplicaUnreachable => "replica_unreachable",
            Self::MaxAgentStreams => "max_agent_streams",
        }
    }
}

/// The relay's own figures.
pub struct RelayMetrics {
    registry: Registry,
    pub agent_streams: Gauge,
    relay_streams_up: Family<ReplicaLabel, Gauge>,
    pub replicas: Gauge,
    forwarded: Family<DirectionLabel, Counter>,
    ended: Family<ReasonLabel, Counter>,
    reconnects: Family<ReplicaLabel, Counter>,
    pub upstream_buffer_full: Counter,
    pub unrouted: Counter,
    connections_closed: Family<ClosedLabels, Counter>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let agent_streams = Gauge::default();
        registry.register(
            "itw_relay_agent_streams",
            "Agent Report streams open through this relay (MAX_AGENT_STREAMS)",
            agent_streams.clone(),
        );
        let relay_streams_up = Family::<ReplicaLabel, Gauge>::default();
        registry.register(
            "itw_relay_relay_streams_up",
            "1 while the Relay stream to a scaler replica is up, by replica address",
            relay_streams_up.clone(),
        );
        let replicas = Gauge::default();
        registry.register(
            "itw_relay_replicas",
            "Scaler replicas resolved from SCALER_ADDR",
            replicas.clone(),
        );
        let forwarded = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "itw_relay_messages_forwarded",
            "Messages carried, by direction: to_replica (the agents' Hello, Snapshot, Batch) and to_agent (Welcome, Ack)",
            forwarded.clone(),
        );
        let ended = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "itw_relay_agent_streams_ended",
            "Agent streams ended or refused, by reason: agent_closed, agent_gone, agent_error, replica_ended, relay_stream_ended, response_buffer_full (AGENT_RESPONSE_BUFFER), stopping, replica_gone, unauthenticated, unknown_replica, replica_unreachable, max_agent_streams (MAX_AGENT_STREAMS)",
            ended.clone(),
        );
        let reconnects = Family::<ReplicaLabel, Counter>::default();
        registry.register(
            "itw_relay_upstream_reconnects",
            "Relay streams to a replica that failed or ended and were opened again, by replica address",
            reconnects.clone(),
        );
        let upstream_buffer_full = Counter::default();
        registry.register(
            "itw_relay_upstream_buffer_full",
            "Times an agent's message waited because UPSTREAM_BUFFER messages were queued towards its replica",
            upstream_buffer_full.clone(),
        );
        let unrouted = Counter::default();
        registry.register(
            "itw_relay_unrouted_responses",
            "Replica messages for a relayed stream that had already ended (dropped)",
            unrouted.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "itw_relay_connections_closed",
            "Connections the relay closed unasked, by listener (grpc, metrics) and reason: connection_cap (GRPC_MAX_CONNECTIONS, or 256 on /metrics), idle (IDLE_TIMEOUT on gRPC, 60s on /metrics)",
            connections_closed.clone(),
        );
        Self {
            registry,
            agent_streams,
            relay_streams_up,
            replicas,
            forwarded,
            ended,
            reconnects,
            upstream_buffer_full,
            unrouted,
            connections_closed,
        }
    }
}

impl RelayMetrics {
    pub fn ended(&self, reason: EndReason) {
        self.ended
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    pub fn ended_count(&self, reason: EndReason) -> u64 {
        self.ended
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .get()
    }

    pub fn to_replica(&self) {
        self.forwarded
            .get_or_create(&DirectionLabel {
                direction: "to_replica",
            })
            .inc();
    }

    pub fn to_agent(&self) {
        self.forwarded
            .get_or_create(&DirectionLabel {
                direction: "to_agent",
            })
            .inc();
    }

    pub fn relay_stream_up(&self, replica: SocketAddr, up: bool) {
        self.relay_streams_up
            .get_or_create(&label(replica))
            .set(i64::from(up));
    }

    /// Whether any Relay stream is up (`/readyz`).
    pub fn any_relay_stream_up(&self, replicas: &[SocketAddr]) -> bool {
        replicas
            .iter()
            .any(|r| self.relay_streams_up.get_or_create(&label(*r)).get() > 0)
    }

    /// A replica no longer resolved: its series go.
    pub fn replica_gone(&self, replica: SocketAddr) {
        self.relay_streams_up.remove(&label(replica));
        self.reconnects.remove(&label(replica));
    }

    /// A connection the guarded listener closed.
    pub fn connection_closed(&self, listener: &'static str, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ClosedLabels { listener, reason })
            .inc();
    }

    pub fn reconnect(&self, replica: SocketAddr) {
        self.reconnects.get_or_create(&label(replica)).inc();
    }

    pub fn encode(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
    }
}

fn label(replica: SocketAddr) -> ReplicaLabel {
    ReplicaLabel {
        replica: replica.to_string(),
    }
}

impl MetricsSource for RelayMetrics {
    fn encode(&self, out: &mut String, _view: &ScrapeView) -> std::fmt::Result {
        RelayMetrics::encode(self, out)
    }
}
