//! Reporting to the scaler: every collection becomes a batch in the
//! [`ledger`], and one [`stream`] per scaler replica keeps that replica
//! exactly up to date over the `itw.v1.Ingest/Report` stream.
//!
//! `SCALER_ADDR` is resolved to every address behind it (a headless Service
//! gives one per replica), again every `resolve_interval` and whenever a
//! stream fails, so replicas that come and go are followed. Replicas do not
//! talk to each other: each gets every batch, so each answers KEDA alike.

mod health;
pub mod ledger;
mod replicas;
mod stream;

use std::{path::PathBuf, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{sync::Notify, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, ClientTlsConfig, Identity},
};

use itw_proto::{addr::HostPort, token::bearer_token};
use itw_telemetry::timeline::{TARGET as TIMELINE, monotonic_us};

use crate::{
    coldstart::{ColdStartMetrics, Woken},
    counting_loop::{AgentClock, Collected, CollectionSink},
    edges::{EdgeKey, EdgeLimits},
};
use ledger::{Ledger, LogLimits};

pub use health::ReportHealth;

/// An error with each of its causes (`a: b: c`), a cause left out when the
/// text before already says it.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // A Status shows itself with every field; its message is enough.
        let said = match cause.downcast_ref::<tonic::Status>() {
            Some(status) => status.message().to_owned(),
            None => cause.to_string(),
        };
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Config(String),
    #[error("SCALER_TOKEN_FILE {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("scaler answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the scaler ended the stream")]
    EndedByScaler,
    #[error("protocol violation by the scaler: {0}")]
    Protocol(String),
    #[error("stopped")]
    Stopped,
}

impl ReportError {
    /// A label for the failure counter.
    fn reason(&self) -> &'static str {
        match self {
            Self::Config(_) | Self::TokenFile { .. } => "config",
            Self::Connect(_) => "connect",
            Self::Status(s) if s.code() == tonic::Code::Unauthenticated => "unauthenticated",
            Self::Status(_) => "status",
            Self::EndedByScaler => "ended_by_scaler",
            Self::Protocol(_) => "protocol",
            Self::Stopped => "stopped",
        }
    }
}

/// Where the bearer token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    None,
    Value(String),
    /// Re-read on every connect, so a rotated Secret is picked up.
    File(PathBuf),
}

/// The random secret sent with every hello; its Debug form hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct InstanceSecret(String);

impl InstanceSecret {
    /// A fresh random secret: 32 hex digits (122 random bits).
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for InstanceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InstanceSecret(..)")
    }
}

#[derive(Clone, Debug)]
pub struct ReportSettings {
    /// Every scaler address; each is resolved to all the replicas behind it.
    pub scalers: Vec<HostPort>,
    /// `RELAY_ADDR`: every replica's stream goes through this relay, naming
    /// the replica in [`itw_proto::itw::v1::REPLICA_HEADER`].
    pub relay: Option<HostPort>,
    pub node_name: String,
    /// New on every agent start.
    pub instance_id: String,
    /// New on every agent start; binds instance_id to this process at the
    /// scalers (see Hello.instance_secret). Never logged.
    pub instance_secret: InstanceSecret,
    pub token: TokenSource,
    pub tls: Option<TlsFiles>,
    pub resolve_interval: Duration,
    pub flush_timeout: Duration,
    pub log_limits: LogLimits,
    /// MAX_EDGES and EDGE_MAX_AGE of the edge book.
    pub edge_limits: EdgeLimits,
}

/// A bearer token as a gRPC header can carry it: printable ASCII, no spaces
/// (`SCALER_TOKEN`, and `SCALER_TOKEN_FILE` on every read).
pub fn checked_token(s: &str) -> Result<String, String> {
    bearer_token(s)
        .map(str::to_owned)
        .map_err(|problem| problem.message("unset it when the scaler asks for none", ""))
}

impl ReportSettings {
    /// Reads the token once, as every connect will: at start, so a missing
    /// or empty token file is an error naming SCALER_TOKEN_FILE rather than
    /// streams that fail in the background.
    pub fn check_token(&self) -> Result<(), ReportError> {
        self.token().map(|_| ())
    }

    fn token(&self) -> Result<Option<MetadataValue<Ascii>>, ReportError> {
        let token = match &self.token {
            TokenSource::None => return Ok(None),
            TokenSource::Value(v) => v.clone(),
            TokenSource::File(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ReportError::TokenFile {
                        path: path.clone(),
                        source,
                    })?;
                checked_token(&text).map_err(|problem| {
                    ReportError::Config(format!("SCALER_TOKEN_FILE {}: {problem}", path.display()))
                })?
            }
        };
        stream::bearer(&token).map(Some)
    }
}

/// TLS towards the scaler, from PEM files: a CA to verify the scaler, and
/// optionally a client certificate and key for mutual TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    ca: Certificate,
    identity: Option<Identity>,
}

impl TlsFiles {
    pub fn read(
        ca_file: &std::path::Path,
        client: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Self, ReportError> {
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| ReportError::Config(format!("{what} {}: {e}", path.display())))
        };
        let identity = match client {
            Some((cert, key)) => Some(Identity::from_pem(
                read("SCALER_CERT_FILE", cert)?,
                read("SCALER_KEY_FILE", key)?,
            )),
            None => None,
        };
        Ok(Self {
            ca: Certificate::from_pem(read("SCALER_CA_FILE", ca_file)?),
            identity,
        })
    }

    /// The client configuration for a scaler reached under `domain` (the
    /// name its certificate must carry).
    fn config(&self, domain: &str) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new()
            .domain_name(domain)
            .ca_certificate(self.ca.clone());
        match &self.identity {
            Some(identity) => tls.identity(identity.clone()),
            None => tls,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// `/metrics` figures of the reporter.
#[derive(Debug)]
pub struct ReportMetrics {
    endpoints: Gauge,
    streams_up: Gauge,
    batches: Family<ResultLabels, Counter>,
    snapshots: Family<KindLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    buffer_batches: Gauge,
    buffer_bytes: Gauge,
    merged: Counter,
    wake_to_send: Histogram,
    /// Registered by the agent, shared with holding.
    cold_start: Arc<ColdStartMetrics>,
    edges_held: Gauge,
    edges_refused: Counter,
    /// Whether any stream is up, for `/readyz`: kept beside the up gauge so
    /// the two never disagree.
    health: ReportHealth,
}

impl Default for ReportMetrics {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl ReportMetrics {
    /// `cold_start`: where the wake batches' `first_connect_to_stream` goes
    /// (registered by whoever shares it, not by [`Self::register`]).
    pub fn new(cold_start: Arc<ColdStartMetrics>) -> Self {
        Self {
            endpoints: Gauge::default(),
            streams_up: Gauge::default(),
            batches: Family::default(),
            snapshots: Family::default(),
            failures: Family::default(),
            buffer_batches: Gauge::default(),
            buffer_bytes: Gauge::default(),
            merged: Counter::default(),
            edges_held: Gauge::default(),
            edges_refused: Counter::default(),
            // 10 µs .. ~80 ms: the fast path lives in the first buckets.
            wake_to_send: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_01, 2.0, 14),
            ),
            health: ReportHealth::default(),
            cold_start,
        }
    }
}

/// Counts a stream down again when its session ends.
struct UpGuard<'a>(&'a ReportMetrics);

impl Drop for UpGuard<'_> {
    fn drop(&mut self) {
        self.0.streams_up.dec();
        self.0.health.stream_down();
    }
}

impl ReportMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("itw_agent");
        r.register(
            "scaler_endpoints",
            "Scaler replica addresses SCALER_ADDR resolves to",
            self.endpoints.clone(),
        );
        r.register(
            "scaler_streams_up",
            "Report streams to scaler replicas that are up",
            self.streams_up.clone(),
        );
        r.register(
            "report_batches",
            "Batches sent, acknowledged and resent to scaler replicas (summed over replicas)",
            self.batches.clone(),
        );
        r.register(
            "report_snapshots",
            "Snapshots sent at stream start: resume (with resends) or full",
            self.snapshots.clone(),
        );
        r.register(
            "report_stream_failures",
            "Report sessions that ended in failure, by reason",
            self.failures.clone(),
        );
        r.register(
            "report_buffer_batches",
            "Batches kept for resending",
            self.buffer_batches.clone(),
        );
        r.register(
            "report_buffer_bytes",
            "Encoded bytes of the batches kept for resending",
            self.buffer_bytes.clone(),
        );
        r.register(
            "report_merged_batches",
            "Batches dropped from the full resend buffer: their counts stay in the totals and reach replicas through the next snapshot",
            self.merged.clone(),
        );
        r.register(
            "report_wake_to_send_seconds",
            "From a kernel wake (idle -> active) to its batch handed to a scaler stream",
            self.wake_to_send.clone(),
        );
        r.register(
            "edges",
            "Edges \"Service A calls Service B\" held and reported to the scalers (MAX_EDGES, EDGE_MAX_AGE)",
            self.edges_held.clone(),
        );
        r.register(
            "edges_refused",
            "New edges not held nor reported because MAX_EDGES edges were held",
            self.edges_refused.clone(),
        );
    }

    /// The edge book's figures.
    fn edges(&self, ledger: &Ledger) {
        let (held, refused) = ledger.edge_counts();
        self.edges_held.set(i64::try_from(held).unwrap_or(i64::MAX));
        let before = self.edges_refused.get();
        if refused > before {
            self.edges_refused.inc_by(refused - before);
            if before == 0 {
                tracing::warn!(
                    held,
                    "MAX_EDGES edges held: new edges are not reported (counted in itw_agent_edges_refused_total)"
                );
            }
        }
    }

    fn stream_up(&self) -> UpGuard<'_> {
        self.streams_up.inc();
        self.health.stream_up();
        UpGuard(self)
    }

    /// Whether any scaler stream is up (`/readyz`).
    pub fn health(&self) -> &ReportHealth {
        &self.health
    }

    fn sent(&self, sequence: u64, woken: Option<&Woken>) {
        self.batches
            .get_or_create(&ResultLabels { result: "sent" })
            .inc();
        if let Some(woken) = woken {
            self.wake_to_send.observe(woken.at.elapsed().as_secs_f64());
            let handed_us = monotonic_us();
            tracing::trace!(
                target: TIMELINE,
                t_us = handed_us,
                sequence,
                "wake batch handed to a scaler stream"
            );
            self.cold_start.handed(woken, handed_us);
        }
    }

    fn resent(&self) {
        self.batches
            .get_or_create(&ResultLabels { result: "resent" })
            .inc();
    }

    fn acked(&self, n: u64) {
        self.batches
            .get_or_create(&ResultLabels { result: "acked" })
            .inc_by(n);
    }

    fn snapshot(&self, resumed: bool) {
        let kind = if resumed { "resume" } else { "full" };
        self.snapshots.get_or_create(&KindLabels { kind }).inc();
    }

    fn stream_failure(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// What every stream task shares.
#[derive(Debug)]
pub struct ReportContext {
    settings: ReportSettings,
    ledger: Arc<Ledger>,
    metrics: Arc<ReportMetrics>,
    clock: AgentClock,
    /// Poked when a stream fails, so addresses are resolved again at once.
    replicas_changed: Notify,
}

/// The reporter: records collections, and runs the streams.
#[derive(Debug)]
pub struct Reporter {
    ctx: Arc<ReportContext>,
}

impl Reporter {
    pub fn new(settings: ReportSettings, metrics: Arc<ReportMetrics>, clock: AgentClock) -> Self {
        let ledger = Arc::new(Ledger::with_edges(
            settings.log_limits,
            settings.edge_limits,
        ));
        Self {
            ctx: Arc::new(ReportContext {
                settings,
                ledger,
                metrics,
                clock,
                replicas_changed: Notify::new(),
            }),
        }
    }

    /// Starts following the scaler's replicas; runs until `stop` is
    /// cancelled, then flushes every stream (bounded by the flush timeout).
    pub fn spawn(&self, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(refresh_edges(self.ctx.clone(), stop.clone()));
        tokio::spawn(replicas::run(self.ctx.clone(), stop))
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ctx.ledger
    }
}

/// How often edges due are looked for while no attempt is collected: a
/// declared edge must reach the scalers again before it ages out there, and
/// an edge is due at most once per quarter of EDGE_MAX_AGE (a minute at least).
const EDGE_REFRESH_CHECK: Duration = Duration::from_secs(60);

/// Sends the edges due when nothing else would carry them, until `stop`.
async fn refresh_edges(ctx: Arc<ReportContext>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EDGE_REFRESH_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                ctx.ledger.refresh_edges(ctx.clock.now_ms());
                ctx.metrics.edges(&ctx.ledger);
            }
        }
    }
}

impl CollectionSink for Reporter {
    fn declare(&self, edges: Vec<EdgeKey>) {
        let declared = edges.len();
        self.ctx.ledger.declare(edges, self.ctx.clock.now_ms());
        self.ctx.metrics.edges(&self.ctx.ledger);
        tracing::debug!(
            declared,
            "declared edges (internal-tcp-watcher.io/wakes) taken"
        );
    }

    fn record(&self, collected: Collected) {
        let ledger = &self.ctx.ledger;
        let evicted_before = ledger.evicted();
        let with_edges = !collected.edges.is_empty();
        ledger.record(collected);
        if with_edges {
            self.ctx.metrics.edges(ledger);
        }
        let fill = ledger.fill();
        let metrics = &self.ctx.metrics;
        metrics
            .buffer_batches
            .set(i64::try_from(fill.batches).unwrap_or(i64::MAX));
        metrics
            .buffer_bytes
            .set(i64::try_from(fill.bytes).unwrap_or(i64::MAX));
        let evicted = ledger.evicted() - evicted_before;
        if evicted > 0 {
            // Log the first merge and then every thousandth: an outage
            // long enough to fill the buffer would otherwise flood the log.
            let before = metrics.merged.get();
            metrics.merged.inc_by(evicted);
            if before == 0 || before / 1000 != (before + evicted) / 1000 {
                tracing::warn!(
                    merged_total = before + evicted,
                    "resend buffer full: oldest batches merged into the totals; replicas behind get a full snapshot"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceSecret;

    /// #13 item 9: a transport failure is logged with its cause.
    #[test]
    fn errors_are_shown_with_their_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Transport(#[source] std::io::Error);
        let tls = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let status = tonic::Status::from_error(Box::new(Transport(tls)));
        let error = super::ReportError::Status(status);
        assert_eq!(
            super::error_chain(&error),
            "scaler answered Unknown error: transport error: invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn the_instance_secret_is_random_and_never_shown() {
        let (a, b) = (InstanceSecret::random(), InstanceSecret::random());
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 32);
        assert!(a.expose().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(format!("{a:?}"), "InstanceSecret(..)");
    }
}
