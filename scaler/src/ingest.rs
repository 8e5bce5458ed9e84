//! The agents' `itw.v1.Ingest/Report` stream: hello, welcome, snapshot, then
//! batches and acks, under the rules of `proto/itw/v1/ingest.proto`.
//!
//! Every message is checked whole before anything of it is applied. A
//! malformed one (a port of 0, a gap in the sequence, a count of 0) ends its
//! own stream with a status naming the field (`batch.deltas[3].series.port`)
//! and leaves every other stream alone. An entry whose name Kubernetes would
//! not allow ([`itw_proto::names`]) is different: names come from the
//! cluster, not from a bug of the agent, and ending the stream for one would
//! end the node's reports on every reconnect. Such an entry is refused alone
//! (counted in `itw_scaler_refused_entries_total`, logged once per stream)
//! and the rest of its message is applied and acknowledged.
//!
//! This module never blocks a stream on another: all shared state is behind
//! [`crate::store`]'s short locks.
//!
//! - `session.rs`: one agent's rules, message by message ([`Session`]); a
//!   Report stream here and a relayed stream in [`crate::relay`] both run it.

use std::{net::SocketAddr, sync::Arc};

use itw_proto::{
    itw::v1::{
        Batch, Hello, PROTOCOL_VERSION, RelayRequest, RelayResponse, ReportRequest, ReportResponse,
        Series, Snapshot, ingest_server::Ingest, report_request, report_response,
    },
    names::{self, NameProblem},
};
use itw_telemetry::logging::LogBudget;
use tokio::{runtime::Handle, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{
    ingest_runtime::IngestRuntime,
    metrics::ScalerMetrics,
    relay::{AckGrid, RELAY_RESPONSE_BUFFER, RelayStream},
    store::{ApplyError, BatchView, HistoryView, SeriesName, SnapshotView, Store},
};

mod session;

pub use session::{Origin, Session};

/// Longest process name accepted: the kernel keeps 15 bytes, the agent's
/// overflow name is a little longer.
const MAX_COMM_BYTES: usize = 64;
/// Longest node name (a DNS subdomain) and instance id accepted.
const MAX_NODE_BYTES: usize = 253;
const MAX_INSTANCE_BYTES: usize = 128;
/// Bounds of an instance secret (the agent sends 32 hex digits).
const MIN_SECRET_BYTES: usize = 16;
const MAX_SECRET_BYTES: usize = 128;
/// Unix times after this (year 2286) are taken for garbage, not clocks.
const MAX_UNIX_MS: i64 = 9_999_999_999_999;

/// Largest count one report may carry for one series, total or second:
/// 2^48 (about 2.8e14, nine years of a million connects a second). A
/// thousand agents at this bound still sum far below 2^64, so the store's
/// saturating sums never reach their ceiling through honest reports.
pub const MAX_REPORTED_ATTEMPTS: u64 = 1 << 48;

/// Warnings for refused or rejected agent streams: any peer can provoke one
/// per connection, so at most 10 a minute are logged (the rest counted in the
/// next line's `left_out`; every one in itw_scaler_rejected_streams_total).
pub static REFUSAL_LOG: LogBudget = LogBudget::new(10, std::time::Duration::from_secs(60));

/// Acks queued for a slow agent before the stream stops reading it.
const RESPONSE_BUFFER: usize = 64;

/// Why an ingest stream ended with an error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    #[error("the first message of a report stream must be hello, got {got}")]
    HelloMissing { got: &'static str },
    #[error(
        "hello.protocol_version {got} is not supported; this scaler speaks version {supported}"
    )]
    ProtocolVersion { got: u32, supported: u32 },
    #[error("hello may only be the first message of a report stream")]
    HelloAgain,
    #[error(
        "batch {sequence} arrived before the snapshot; send hello, then a snapshot, then batches"
    )]
    SnapshotMissing { sequence: u64 },
    #[error("the report request holds no message")]
    Empty,
    #[error("{field} is missing")]
    Missing { field: String },
    #[error("{field} = {value}: {problem}")]
    Invalid {
        field: String,
        value: String,
        problem: String,
    },
    #[error(
        "batch.deltas has {count} entries; this scaler accepts at most {max} per batch (MAX_BATCH_DELTAS)"
    )]
    TooManyDeltas { count: usize, max: usize },
    #[error(
        "{field} has {count} entries; this scaler keeps at most {max} seconds of history (MAX_WINDOW)"
    )]
    TooMuchHistory {
        field: String,
        count: usize,
        max: usize,
    },
    #[error("{field} has {count} entries; this scaler holds at most {max} edges (MAX_EDGES)")]
    TooManyEdges {
        field: String,
        count: usize,
        max: usize,
    },
    #[error("report message too large (MAX_REPORT_BYTES): {0}")]
    Oversized(String),
    #[error("undecodable report message: {0}")]
    Malformed(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl IngestError {
    /// The `reason` label of `itw_scaler_rejected_streams_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::HelloMissing { .. }
            | Self::HelloAgain
            | Self::SnapshotMissing { .. }
            | Self::Empty => "protocol",
            Self::ProtocolVersion { .. } => "protocol_version",
            Self::Missing { .. } | Self::Invalid { .. } => "invalid_message",
            Self::TooManyDeltas { .. }
            | Self::TooMuchHistory { .. }
            | Self::TooManyEdges { .. }
            | Self::Oversized(_) => "oversized",
            Self::Malformed(_) => "malformed",
            Self::Apply(ApplyError::SequenceGap { .. }) => "sequence_gap",
            Self::Apply(ApplyError::SnapshotBehind { .. }) => "snapshot_behind",
            Self::Apply(ApplyError::NodeMismatch { .. }) => "node_mismatch",
            Self::Apply(ApplyError::SecretMismatch { .. }) => "secret_mismatch",
        }
    }

    pub fn status(&self) -> Status {
        let code = match self {
            Self::Apply(ApplyError::SecretMismatch { .. }) => Code::PermissionDenied,
            Self::ProtocolVersion { .. } | Self::Apply(_) => Code::FailedPrecondition,
            Self::Oversized(_)
            | Self::TooManyDeltas { .. }
            | Self::TooMuchHistory { .. }
            | Self::TooManyEdges { .. } => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

/// An entry of a batch or snapshot refused for a name Kubernetes would not
/// allow. Only the entry is dropped: the rest of its message is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value}: {problem}")]
pub struct RefusedEntry {
    /// The name at fault, as a path into the message
    /// (`batch.deltas[3].series.service`).
    pub field: String,
    /// The name as sent, quoted (cut after [`SHOWN_NAME_CHARS`] characters).
    pub value: String,
    pub problem: NameProblem,
    pub name: NameKind,
}

/// Which of a series' names a [`RefusedEntry`] was refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Namespace,
    Service,
    Pod,
}

/// Characters of a refused name shown in its message: a refusal does not end
/// the stream, so a long bad name may come back with every batch and must
/// not fill the log.
const SHOWN_NAME_CHARS: usize = 64;

impl RefusedEntry {
    fn new(field: String, value: &str, problem: NameProblem, name: NameKind) -> Self {
        let value = if value.chars().count() > SHOWN_NAME_CHARS {
            let shown: String = value.chars().take(SHOWN_NAME_CHARS).collect();
            format!("{shown:?}…")
        } else {
            format!("{value:?}")
        };
        Self {
            field,
            value,
            problem,
            name,
        }
    }

    /// The `reason` label of `itw_scaler_refused_entries_total`.
    pub fn metric_label(&self) -> &'static str {
        match self.name {
            NameKind::Namespace => "invalid_namespace",
            NameKind::Service => "invalid_service",
            NameKind::Pod => "invalid_pod",
        }
    }
}

/// A checked message: the view to apply, and the entries refused for their
/// names (left out of the view).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked<V> {
    pub view: V,
    pub refused: Vec<RefusedEntry>,
}

/// The `Ingest` gRPC service.
pub struct IngestService {
    store: Arc<Store>,
    metrics: Arc<ScalerMetrics>,
    shutdown: CancellationToken,
    /// Where each stream's task runs ([`crate::ingest_runtime`]).
    streams: Handle,
    /// Shared by every Relay stream, so their acks leave together.
    ack_grid: AckGrid,
}

impl IngestService {
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<ScalerMetrics>,
        shutdown: CancellationToken,
        streams: Handle,
    ) -> Self {
        let ack_grid = AckGrid::new(tokio::time::Instant::now(), store.limits().relay_ack_delay);
        Self {
            store,
            metrics,
            shutdown,
            streams,
            ack_grid,
        }
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type ReportStream = ReceiverStream<Result<ReportResponse, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let stream = ReportStream {
            store: Arc::clone(&self.store),
            metrics: Arc::clone(&self.metrics),
            tx,
            peer,
        };
        IngestRuntime::spawn(&self.streams, stream.run(inbound, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type RelayStream = ReceiverStream<Result<RelayResponse, Status>>;

    async fn relay(
        &self,
        request: Request<Streaming<RelayRequest>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(RELAY_RESPONSE_BUFFER);
        let stream = RelayStream {
            store: Arc::clone(&self.store),
            metrics: Arc::clone(&self.metrics),
            tx,
            peer,
            grid: self.ack_grid,
        };
        IngestRuntime::spawn(&self.streams, stream.run(inbound, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One agent stream, owned by its own task.
struct ReportStream {
    store: Arc<Store>,
    metrics: Arc<ScalerMetrics>,
    tx: mpsc::Sender<Result<ReportResponse, Status>>,
    peer: Option<SocketAddr>,
}

/// How a stream's reading ended without a protocol error.
enum End {
    /// The agent closed its side or went away.
    Agent,
    /// The scaler is stopping: the stream ends with status OK.
    Shutdown,
}

impl ReportStream {
    async fn run(self, mut inbound: Streaming<ReportRequest>, shutdown: CancellationToken) {
        let result = tokio::select! {
            r = self.serve(&mut inbound) => r,
            () = shutdown.cancelled() => Ok(End::Shutdown),
            () = self.tx.closed() => Ok(End::Agent),
        };
        match result {
            Ok(End::Agent) => {
                tracing::debug!(peer = ?self.peer, "report stream ended by the agent")
            }
            Ok(End::Shutdown) => {
                tracing::debug!(peer = ?self.peer, "report stream ended: scaler stopping")
            }
            Err(error) => {
                self.metrics.rejected_stream(error.metric_label());
                if let Some(left_out) = REFUSAL_LOG.allow() {
                    tracing::warn!(peer = ?self.peer, %error, left_out, "report stream rejected (at most 10 such lines a minute; all counted in itw_scaler_rejected_streams_total)");
                }
                // The agent may be gone already; then nobody needs the status.
                let _ = self.tx.send(Err(error.status())).await;
            }
        }
    }

    async fn serve(&self, inbound: &mut Streaming<ReportRequest>) -> Result<End, IngestError> {
        let Some(first) = next(inbound).await? else {
            return Ok(End::Agent);
        };
        let (mut session, welcome) = Session::open(
            &self.store,
            &self.metrics,
            first,
            Origin::Report { peer: self.peer },
        )?;
        if !self.send(report_response::Message::Welcome(welcome)).await {
            return Ok(End::Agent);
        }
        while let Some(message) = next(inbound).await? {
            let ack = session.handle(&self.store, &self.metrics, message)?;
            if !self.send(report_response::Message::Ack(ack)).await {
                return Ok(End::Agent);
            }
        }
        session.leave();
        Ok(End::Agent)
    }

    /// Sends a response; false when the agent is gone.
    async fn send(&self, message: report_response::Message) -> bool {
        self.tx
            .send(Ok(ReportResponse {
                message: Some(message),
            }))
            .await
            .is_ok()
    }
}

/// The next message; `None` when the agent closed or left.
async fn next(
    inbound: &mut Streaming<ReportRequest>,
) -> Result<Option<report_request::Message>, IngestError> {
    match inbound.message().await {
        Ok(Some(ReportRequest { message: Some(m) })) => Ok(Some(m)),
        Ok(Some(ReportRequest { message: None })) => Err(IngestError::Empty),
        Ok(None) => Ok(None),
        Err(status) => match status.code() {
            Code::OutOfRange | Code::ResourceExhausted => {
                Err(IngestError::Oversized(status.message().to_owned()))
            }
            Code::Internal => Err(IngestError::Malformed(status.message().to_owned())),
            _ => {
                tracing::debug!(%status, "report stream broke");
                Ok(None)
            }
        },
    }
}

pub(crate) fn kind(message: &report_request::Message) -> &'static str {
    match message {
        report_request::Message::Hello(_) => "hello",
        report_request::Message::Snapshot(_) => "snapshot",
        report_request::Message::Batch(_) => "batch",
    }
}

fn invalid(field: impl Into<String>, value: impl std::fmt::Display, problem: &str) -> IngestError {
    IngestError::Invalid {
        field: field.into(),
        value: value.to_string(),
        problem: problem.to_owned(),
    }
}

pub fn check_hello(hello: &Hello) -> Result<(), IngestError> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(IngestError::ProtocolVersion {
            got: hello.protocol_version,
            supported: PROTOCOL_VERSION,
        });
    }
    check_token_like("hello.node_name", &hello.node_name, MAX_NODE_BYTES)?;
    check_token_like("hello.instance_id", &hello.instance_id, MAX_INSTANCE_BYTES)?;
    check_secret(&hello.instance_secret)
}

/// The instance secret: never echoed, as it is what proves the instance.
fn check_secret(secret: &str) -> Result<(), IngestError> {
    let problem = if secret.len() < MIN_SECRET_BYTES {
        format!(
            "shorter than {MIN_SECRET_BYTES} bytes; the agent sends a random secret with every hello"
        )
    } else if secret.len() > MAX_SECRET_BYTES {
        format!("longer than {MAX_SECRET_BYTES} bytes")
    } else if secret.chars().any(char::is_control) {
        "holds control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(IngestError::Invalid {
        field: "hello.instance_secret".into(),
        value: format!("({} bytes, not shown)", secret.len()),
        problem,
    })
}

/// A non-empty identifier without control characters.
fn check_token_like(field: &str, value: &str, max: usize) -> Result<(), IngestError> {
    if value.is_empty() {
        return Err(invalid(field, "\"\"", "must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(
            field,
            format!("{value:.40?}…"),
            &format!("longer than {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("{value:?}"),
            "holds control characters",
        ));
    }
    Ok(())
}

pub(crate) fn check_unix_ms(field: &str, value: i64) -> Result<(), IngestError> {
    if value <= 0 || value > MAX_UNIX_MS {
        return Err(invalid(field, value, "not a Unix time in milliseconds"));
    }
    Ok(())
}

/// A name of a series or destination, checked with `rule`; `field` is
/// formatted only for a refusal, since this runs for every delta.
pub(crate) fn check_name(
    field: impl FnOnce() -> String,
    value: &str,
    name: NameKind,
    rule: fn(&str) -> Result<(), NameProblem>,
) -> Result<&str, RefusedEntry> {
    let problem = if value.is_empty() {
        "must not be empty"
    } else {
        match rule(value) {
            Ok(()) => return Ok(value),
            Err(problem) => problem,
        }
    };
    Err(RefusedEntry::new(field(), value, problem, name))
}

fn check_port(field: impl FnOnce() -> String, value: u32) -> Result<u16, IngestError> {
    match u16::try_from(value) {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(invalid(
            field(),
            value,
            "must be a Service port number, 1-65535",
        )),
    }
}

/// Checks one series; `list` and `index` name it (`batch.deltas`, 3) in
/// errors, formatted only when there is one: this runs for every delta.
/// `Err` ends the stream; `Ok(Err)` refuses the entry for one of its names.
fn check_series<'a>(
    list: &str,
    index: usize,
    series: Option<&'a Series>,
) -> Result<Result<SeriesName<'a>, RefusedEntry>, IngestError> {
    let field = |name: &str| format!("{list}[{index}].series.{name}");
    let series = series.ok_or_else(|| IngestError::Missing {
        field: format!("{list}[{index}].series"),
    })?;
    let port = check_port(|| field("port"), series.port)?;
    if series.process_comm.len() > MAX_COMM_BYTES {
        return Err(invalid(
            field("process_comm"),
            format!("{:.40?}…", series.process_comm),
            &format!("longer than {MAX_COMM_BYTES} bytes; process names are capped by the agent"),
        ));
    }
    Ok(series_names(series, port, field))
}

/// The names of a checked series; `Err` refuses the entry.
fn series_names<'a>(
    series: &'a Series,
    port: u16,
    field: impl Fn(&str) -> String,
) -> Result<SeriesName<'a>, RefusedEntry> {
    let namespace = check_name(
        || field("namespace"),
        &series.namespace,
        NameKind::Namespace,
        names::namespace,
    )?;
    let service = check_name(
        || field("service"),
        &series.service,
        NameKind::Service,
        names::service,
    )?;
    if !series.pod.is_empty() {
        check_name(|| field("pod"), &series.pod, NameKind::Pod, names::pod)?;
    }
    Ok(SeriesName {
        namespace,
        service,
        port,
        pod: &series.pod,
        process_comm: &series.process_comm,
    })
}

/// A count above [`MAX_REPORTED_ATTEMPTS`] is a broken or hostile agent:
/// summed with the others it would wrap or pin the exported counter.
fn check_attempts(field: String, attempts: u64) -> Result<(), IngestError> {
    if attempts > MAX_REPORTED_ATTEMPTS {
        return Err(invalid(
            field,
            attempts,
            "more than 2^48 attempts in one report; no agent counts that many",
        ));
    }
    Ok(())
}

/// Checks a whole batch before any of it is applied.
pub fn check_batch(
    batch: &Batch,
    max_deltas: usize,
) -> Result<Checked<BatchView<'_>>, IngestError> {
    if batch.deltas.len() > max_deltas {
        return Err(IngestError::TooManyDeltas {
            count: batch.deltas.len(),
            max: max_deltas,
        });
    }
    if batch.sequence == 0 {
        return Err(invalid("batch.sequence", 0, "sequences start at 1"));
    }
    check_unix_ms("batch.collected_at_unix_ms", batch.collected_at_unix_ms)?;
    let mut deltas = Vec::with_capacity(batch.deltas.len());
    let mut refused = Vec::new();
    for (i, delta) in batch.deltas.iter().enumerate() {
        let name = check_series("batch.deltas", i, delta.series.as_ref())?;
        if delta.attempts == 0 {
            return Err(invalid(
                format!("batch.deltas[{i}].attempts"),
                0,
                "every delta counts at least one attempt",
            ));
        }
        check_attempts(format!("batch.deltas[{i}].attempts"), delta.attempts)?;
        match name {
            Ok(name) => deltas.push((name, delta.attempts)),
            Err(entry) => refused.push(entry),
        }
    }
    Ok(Checked {
        view: BatchView {
            sequence: batch.sequence,
            collected_at_ms: batch.collected_at_unix_ms,
            deltas,
        },
        refused,
    })
}

/// Checks a whole snapshot before any of it is applied.
pub fn check_snapshot(
    snapshot: &Snapshot,
    max_window_secs: u64,
) -> Result<Checked<SnapshotView<'_>>, IngestError> {
    check_unix_ms("snapshot.taken_at_unix_ms", snapshot.taken_at_unix_ms)?;
    let mut totals = Vec::with_capacity(snapshot.totals.len());
    let mut refused = Vec::new();
    for (i, total) in snapshot.totals.iter().enumerate() {
        let name = check_series("snapshot.totals", i, total.series.as_ref())?;
        check_attempts(format!("snapshot.totals[{i}].attempts"), total.attempts)?;
        match name {
            Ok(name) => totals.push((name, total.attempts)),
            Err(entry) => refused.push(entry),
        }
    }
    // A window of W seconds spans W+1 partial seconds at most.
    let max_seconds = usize::try_from(max_window_secs)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let mut history = Vec::with_capacity(snapshot.history.len());
    let mut seen = std::collections::HashMap::with_capacity(snapshot.history.len());
    for (i, h) in snapshot.history.iter().enumerate() {
        let field = |name: &str| format!("snapshot.history[{i}].{name}");
        let port = check_port(|| field("port"), h.port)?;
        if h.per_second.len() > max_seconds {
            return Err(IngestError::TooMuchHistory {
                field: field("per_second"),
                count: h.per_second.len(),
                max: max_seconds,
            });
        }
        if let Some(s) = h.per_second.iter().position(|&c| c > MAX_REPORTED_ATTEMPTS) {
            check_attempts(field(&format!("per_second[{s}]")), h.per_second[s])?;
        }
        if h.first_second <= 0 || h.first_second > MAX_UNIX_MS / 1000 {
            return Err(invalid(
                field("first_second"),
                h.first_second,
                "not a Unix time in seconds",
            ));
        }
        let destination = check_name(
            || field("namespace"),
            &h.namespace,
            NameKind::Namespace,
            names::namespace,
        )
        .and_then(|namespace| {
            check_name(
                || field("service"),
                &h.service,
                NameKind::Service,
                names::service,
            )
            .map(|service| (namespace, service))
        });
        let (namespace, service) = match destination {
            Ok(destination) => destination,
            Err(entry) => {
                refused.push(entry);
                continue;
            }
        };
        if let Some(earlier) = seen.insert((namespace, service, port), i) {
            return Err(invalid(
                format!("snapshot.history[{i}]"),
                format!("{namespace}/{service}:{port}"),
                &format!("repeats the destination of snapshot.history[{earlier}]"),
            ));
        }
        history.push(HistoryView {
            namespace,
            service,
            port,
            first_second: h.first_second,
            per_second: &h.per_second,
        });
    }
    Ok(Checked {
        view: SnapshotView {
            through_sequence: snapshot.through_sequence,
            taken_at_ms: snapshot.taken_at_unix_ms,
            totals,
            history,
        },
        refused,
    })
}

#[cfg(test)]
mod tests {
    use itw_proto::itw::v1::{DestinationHistory, SeriesCount};

    use super::*;

    fn series(ns: &str, svc: &str, port: u32, pod: &str, comm: &str) -> Series {
        Series {
            namespace: ns.into(),
            service: svc.into(),
            port,
            pod: pod.into(),
            process_comm: comm.into(),
        }
    }

    fn good() -> Series {
        series("apps", "web", 80, "", "curl")
    }

    fn batch(deltas: Vec<SeriesCount>) -> Batch {
        Batch {
            sequence: 1,
            collected_at_unix_ms: 1_700_000_000_000,
            wake: false,
            deltas,
            edges: Vec::new(),
        }
    }

    fn delta(series: Option<Series>, attempts: u64) -> SeriesCount {
        SeriesCount { series, attempts }
    }

    fn batch_error(b: &Batch) -> String {
        check_batch(b, 3).unwrap_err().to_string()
    }

    #[test]
    fn a_good_batch_is_viewed_as_sent() {
        let b = batch(vec![
            delta(Some(good()), 2),
            delta(
                Some(series("apps", "web", 443, "web-0", "(other processes)")),
                1,
            ),
        ]);
        let checked = check_batch(&b, 3).unwrap();
        assert_eq!(checked.refused, vec![]);
        assert_eq!(
            checked.view,
            BatchView {
                sequence: 1,
                collected_at_ms: 1_700_000_000_000,
                deltas: vec![
                    (
                        SeriesName {
                            namespace: "apps",
                            service: "web",
                            port: 80,
                            pod: "",
                            process_comm: "curl"
                        },
                        2
                    ),
                    (
                        SeriesName {
                            namespace: "apps",
                            service: "web",
                            port: 443,
                            pod: "web-0",
                            process_comm: "(other processes)"
                        },
                        1
                    ),
                ],
            }
        );
    }

    #[test]
    fn bad_batches_name_the_field() {
        let ok = || delta(Some(good()), 1);
        let cases: Vec<(Batch, &str)> = vec![
            (
                batch(vec![
                    ok(),
                    ok(),
                    ok(),
                    delta(Some(series("", "web", 80, "", "x")), 1),
                ]),
                "batch.deltas has 4 entries; this scaler accepts at most 3 per batch (MAX_BATCH_DELTAS)",
            ),
            (
                batch(vec![ok(), delta(None, 1)]),
                "batch.deltas[1].series is missing",
            ),
            (
                batch(vec![
                    ok(),
                    delta(Some(series("apps", "web", 0, "", "x")), 1),
                ]),
                "batch.deltas[1].series.port = 0: must be a Service port number, 1-65535",
            ),
            (
                batch(vec![delta(Some(series("apps", "web", 65536, "", "x")), 1)]),
                "batch.deltas[0].series.port = 65536: must be a Service port number, 1-65535",
            ),
            (
                batch(vec![ok(), ok(), delta(Some(good()), 0)]),
                "batch.deltas[2].attempts = 0: every delta counts at least one attempt",
            ),
            // A bad name does not excuse a malformed entry: that still ends
            // the stream.
            (
                batch(vec![delta(Some(series("Apps", "9web", 0, "", "x")), 1)]),
                "batch.deltas[0].series.port = 0: must be a Service port number, 1-65535",
            ),
            (
                batch(vec![delta(Some(series("apps", "9web", 80, "", "x")), 0)]),
                "batch.deltas[0].attempts = 0: every delta counts at least one attempt",
            ),
            (
                batch(vec![ok(), delta(Some(good()), u64::MAX - 499)]),
                "batch.deltas[1].attempts = 18446744073709551116: more than 2^48 attempts in one report; no agent counts that many",
            ),
            (
                Batch {
                    sequence: 0,
                    ..batch(vec![ok()])
                },
                "batch.sequence = 0: sequences start at 1",
            ),
            (
                Batch {
                    collected_at_unix_ms: -5,
                    ..batch(vec![ok()])
                },
                "batch.collected_at_unix_ms = -5: not a Unix time in milliseconds",
            ),
        ];
        for (b, expected) in cases {
            assert_eq!(batch_error(&b), expected);
        }
        let long_comm = "c".repeat(65);
        let message = batch_error(&batch(vec![delta(
            Some(series("apps", "web", 80, "", &long_comm)),
            1,
        )]));
        assert!(
            message.starts_with("batch.deltas[0].series.process_comm = \"cccc"),
            "{message}"
        );
        assert!(
            message.ends_with("longer than 64 bytes; process names are capped by the agent"),
            "{message}"
        );
        // 64 bytes and odd characters are fine: any process may name itself.
        let comm = "\"weird\\name\n".to_owned() + &"x".repeat(52);
        assert_eq!(comm.len(), 64);
        assert!(
            check_batch(
                &batch(vec![delta(Some(series("apps", "web", 80, "", &comm)), 1)]),
                3
            )
            .is_ok()
        );
    }

    fn snapshot(totals: Vec<SeriesCount>, history: Vec<DestinationHistory>) -> Snapshot {
        Snapshot {
            through_sequence: 4,
            taken_at_unix_ms: 1_700_000_000_000,
            totals,
            history,
            edges: Vec::new(),
        }
    }

    fn history(
        ns: &str,
        svc: &str,
        port: u32,
        first: i64,
        per_second: Vec<u64>,
    ) -> DestinationHistory {
        DestinationHistory {
            namespace: ns.into(),
            service: svc.into(),
            port,
            first_second: first,
            per_second,
        }
    }

    #[test]
    fn a_good_snapshot_is_viewed_as_sent() {
        let s = snapshot(
            vec![delta(Some(good()), 0), delta(Some(good()), 7)],
            vec![
                history("apps", "web", 80, 1_700_000_000, vec![1, 0, 2]),
                history("apps", "web", 81, 1_700_000_000, vec![]),
            ],
        );
        let Checked { view, refused } = check_snapshot(&s, 3).unwrap();
        assert_eq!(refused, vec![]);
        assert_eq!(view.through_sequence, 4);
        assert_eq!(view.taken_at_ms, 1_700_000_000_000);
        assert_eq!(
            view.totals.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
            vec![0, 7]
        );
        assert_eq!(
            view.history,
            vec![
                HistoryView {
                    namespace: "apps",
                    service: "web",
                    port: 80,
                    first_second: 1_700_000_000,
                    per_second: &[1, 0, 2]
                },
                HistoryView {
                    namespace: "apps",
                    service: "web",
                    port: 81,
                    first_second: 1_700_000_000,
                    per_second: &[]
                },
            ]
        );
    }

    #[test]
    fn bad_snapshots_name_the_field() {
        let h = |port, n| history("apps", "web", port, 1_700_000_000, vec![1; n]);
        let cases: Vec<(Snapshot, &str)> = vec![
            (
                Snapshot {
                    taken_at_unix_ms: 0,
                    ..snapshot(vec![], vec![])
                },
                "snapshot.taken_at_unix_ms = 0: not a Unix time in milliseconds",
            ),
            (
                snapshot(vec![delta(Some(good()), 1), delta(None, 1)], vec![]),
                "snapshot.totals[1].series is missing",
            ),
            (
                snapshot(
                    vec![delta(Some(series("apps", "web", 70000, "", "")), 1)],
                    vec![],
                ),
                "snapshot.totals[0].series.port = 70000: must be a Service port number, 1-65535",
            ),
            (
                snapshot(vec![], vec![h(80, 1), h(81, 5)]),
                "snapshot.history[1].per_second has 5 entries; this scaler keeps at most 4 seconds of history (MAX_WINDOW)",
            ),
            (
                snapshot(
                    vec![],
                    vec![history("apps", "9web", 80, 1_700_000_000, vec![1; 5])],
                ),
                "snapshot.history[0].per_second has 5 entries; this scaler keeps at most 4 seconds of history (MAX_WINDOW)",
            ),
            (
                snapshot(
                    vec![],
                    vec![history("apps", "web", 0, 1_700_000_000, vec![])],
                ),
                "snapshot.history[0].port = 0: must be a Service port number, 1-65535",
            ),
            (
                snapshot(vec![delta(Some(good()), (1 << 48) + 1)], vec![]),
                "snapshot.totals[0].attempts = 281474976710657: more than 2^48 attempts in one report; no agent counts that many",
            ),
            (
                snapshot(
                    vec![],
                    vec![history("apps", "web", 80, 1_700_000_000, vec![1, u64::MAX])],
                ),
                "snapshot.history[0].per_second[1] = 18446744073709551615: more than 2^48 attempts in one report; no agent counts that many",
            ),
            (
                snapshot(vec![], vec![history("apps", "web", 80, -1, vec![])]),
                "snapshot.history[0].first_second = -1: not a Unix time in seconds",
            ),
            (
                snapshot(vec![], vec![h(80, 1), h(81, 1), h(80, 2)]),
                "snapshot.history[2] = apps/web:80: repeats the destination of snapshot.history[0]",
            ),
        ];
        for (s, expected) in cases {
            assert_eq!(check_snapshot(&s, 3).unwrap_err().to_string(), expected);
        }
    }

    const BAD_NAMESPACE: &str = "not a Kubernetes namespace name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)";
    const BAD_SERVICE: &str = "not a Kubernetes Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters)";
    const BAD_POD: &str = "not a Kubernetes pod name (lowercase letters, digits, '-' and '.', at most 253 characters)";

    fn refused_entry(
        field: &str,
        value: &str,
        problem: NameProblem,
        name: NameKind,
    ) -> RefusedEntry {
        RefusedEntry {
            field: field.into(),
            value: value.into(),
            problem,
            name,
        }
    }

    #[test]
    fn a_bad_name_refuses_only_its_entry() {
        let b = batch(vec![
            delta(Some(series("Apps", "web", 80, "", "x")), 1),
            delta(Some(good()), 2),
            delta(Some(series("apps", "", 80, "", "x")), 1),
            delta(Some(series("apps", "9web", 80, "", "x")), 1),
            delta(Some(series("apps", "web", 80, "Web_0", "x")), 1),
            delta(Some(series("", "web", 80, "", "x")), 1),
            delta(Some(series("apps", "web", 443, "web-0", "x")), 3),
        ]);
        let checked = check_batch(&b, 7).unwrap();
        assert_eq!(
            checked.view.deltas,
            vec![
                (
                    SeriesName {
                        namespace: "apps",
                        service: "web",
                        port: 80,
                        pod: "",
                        process_comm: "curl"
                    },
                    2
                ),
                (
                    SeriesName {
                        namespace: "apps",
                        service: "web",
                        port: 443,
                        pod: "web-0",
                        process_comm: "x"
                    },
                    3
                ),
            ]
        );
        let expected = vec![
            refused_entry(
                "batch.deltas[0].series.namespace",
                "\"Apps\"",
                BAD_NAMESPACE,
                NameKind::Namespace,
            ),
            refused_entry(
                "batch.deltas[2].series.service",
                "\"\"",
                "must not be empty",
                NameKind::Service,
            ),
            refused_entry(
                "batch.deltas[3].series.service",
                "\"9web\"",
                BAD_SERVICE,
                NameKind::Service,
            ),
            refused_entry(
                "batch.deltas[4].series.pod",
                "\"Web_0\"",
                BAD_POD,
                NameKind::Pod,
            ),
            refused_entry(
                "batch.deltas[5].series.namespace",
                "\"\"",
                "must not be empty",
                NameKind::Namespace,
            ),
        ];
        assert_eq!(checked.refused, expected);
        // The messages read as the stream statuses did, field first.
        assert_eq!(
            checked.refused[2].to_string(),
            format!("batch.deltas[3].series.service = \"9web\": {BAD_SERVICE}")
        );
        assert_eq!(
            checked
                .refused
                .iter()
                .map(RefusedEntry::metric_label)
                .collect::<Vec<_>>(),
            vec![
                "invalid_namespace",
                "invalid_service",
                "invalid_service",
                "invalid_pod",
                "invalid_namespace"
            ]
        );
        // A long bad name is shown cut short: it may come back with every
        // batch.
        let long = "A".repeat(300);
        let long_batch = batch(vec![delta(Some(series(&long, "web", 80, "", "x")), 1)]);
        assert_eq!(
            check_batch(&long_batch, 1).unwrap().refused,
            vec![refused_entry(
                "batch.deltas[0].series.namespace",
                &format!("{:?}…", "A".repeat(64)),
                BAD_NAMESPACE,
                NameKind::Namespace,
            )]
        );
    }

    #[test]
    fn a_bad_name_refuses_only_its_snapshot_entry() {
        let s = snapshot(
            vec![
                delta(Some(series("apps", "9web", 80, "", "curl")), 4),
                delta(Some(good()), 7),
            ],
            vec![
                history("", "web", 81, 1_700_000_000, vec![1]),
                history("apps", "web", 80, 1_700_000_000, vec![2]),
                // Refused, so not a repeat of history[1].
                history("apps", "web/x", 80, 1_700_000_000, vec![3]),
            ],
        );
        let Checked { view, refused } = check_snapshot(&s, 3).unwrap();
        assert_eq!(
            view.totals
                .iter()
                .map(|(n, a)| (n.service, *a))
                .collect::<Vec<_>>(),
            vec![("web", 7)]
        );
        assert_eq!(
            view.history,
            vec![HistoryView {
                namespace: "apps",
                service: "web",
                port: 80,
                first_second: 1_700_000_000,
                per_second: &[2]
            }]
        );
        assert_eq!(
            refused,
            vec![
                refused_entry(
                    "snapshot.totals[0].series.service",
                    "\"9web\"",
                    BAD_SERVICE,
                    NameKind::Service
                ),
                refused_entry(
                    "snapshot.history[0].namespace",
                    "\"\"",
                    "must not be empty",
                    NameKind::Namespace
                ),
                refused_entry(
                    "snapshot.history[2].service",
                    "\"web/x\"",
                    BAD_SERVICE,
                    NameKind::Service
                ),
            ]
        );
    }

    #[test]
    fn bad_hellos() {
        let hello = |node: &str, id: &str, version| Hello {
            node_name: node.into(),
            instance_id: id.into(),
            protocol_version: version,
            instance_secret: "0123456789abcdef".into(),
        };
        assert_eq!(check_hello(&hello("node-1", "abc", 1)), Ok(()));
        let e = check_hello(&hello("node-1", "abc", 2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hello.protocol_version 2 is not supported; this scaler speaks version 1"
        );
        assert_eq!(e.status().code(), Code::FailedPrecondition);
        assert_eq!(
            check_hello(&hello("", "abc", 1)).unwrap_err().to_string(),
            "hello.node_name = \"\": must not be empty"
        );
        assert_eq!(
            check_hello(&hello("n", "", 1)).unwrap_err().to_string(),
            "hello.instance_id = \"\": must not be empty"
        );
        assert_eq!(
            check_hello(&hello("n", "a\nb", 1)).unwrap_err().to_string(),
            "hello.instance_id = \"a\\nb\": holds control characters"
        );
        let with_secret = |secret: &str| Hello {
            instance_secret: secret.into(),
            ..hello("n", "abc", 1)
        };
        assert_eq!(
            check_hello(&with_secret("")).unwrap_err().to_string(),
            "hello.instance_secret = (0 bytes, not shown): shorter than 16 bytes; the agent sends a random secret with every hello"
        );
        assert_eq!(
            check_hello(&with_secret(&"s".repeat(129)))
                .unwrap_err()
                .to_string(),
            "hello.instance_secret = (129 bytes, not shown): longer than 128 bytes"
        );
        assert_eq!(
            check_hello(&with_secret("0123456789abcdef")).map_err(|e| e.to_string()),
            Ok(())
        );
        assert_eq!(
            check_hello(&with_secret("0123456789abcdef\n"))
                .unwrap_err()
                .to_string(),
            "hello.instance_secret = (17 bytes, not shown): holds control characters"
        );
        assert!(
            check_hello(&hello("n", &"i".repeat(129), 1))
                .unwrap_err()
                .to_string()
                .ends_with(": longer than 128 bytes")
        );
    }

    #[test]
    fn status_codes_and_labels() {
        let gap = IngestError::from(ApplyError::SequenceGap { applied: 3, got: 5 });
        assert_eq!(gap.status().code(), Code::FailedPrecondition);
        assert_eq!(
            gap.status().message(),
            "sequence gap: batch 5 arrived but this replica has applied through 3; reconnect and send a snapshot"
        );
        assert_eq!(gap.metric_label(), "sequence_gap");
        let too_many = IngestError::TooManyDeltas { count: 4, max: 3 };
        assert_eq!(too_many.status().code(), Code::ResourceExhausted);
        assert_eq!(too_many.metric_label(), "oversized");
        assert_eq!(
            IngestError::HelloMissing { got: "batch" }.status().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            invalid("batch.sequence", 0, "x").metric_label(),
            "invalid_message"
        );
    }
}
