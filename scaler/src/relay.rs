//! `itw.v1.Ingest/Relay`: many agents' Report streams carried by one relay
//! on one stream, each relayed stream numbered by the relay (#18; the rules
//! are in `proto/itw/v1/ingest.proto`).
//!
//! A relayed stream runs the very rules of a Report stream ([`Session`]) but
//! costs the replica no task, channel, HTTP/2 stream or decode buffer of its
//! own: only its session in [`RelayedStreams`]. One task per Relay stream
//! reads the envelopes in order and answers through one bounded channel, so
//! a relay that stops reading stalls its own stream and nothing else; acks
//! leave in bursts ([`outbox`]).
//!
//! This module must never end a Relay stream for one agent's fault: a
//! relayed stream's error ends that relayed stream alone (`ended`); only a
//! broken envelope (no message, `stream` 0, undecodable) ends them all.

use std::{net::SocketAddr, sync::Arc};

use itw_proto::itw::v1::{
    RelayEnded, RelayRequest, RelayResponse, ReportRequest, ReportResponse, relay_response,
    report_request, report_response,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

use self::outbox::{Cause, Outbox};
use crate::{
    ingest::{IngestError, Origin, REFUSAL_LOG, Session},
    metrics::ScalerMetrics,
    store::Store,
};

pub mod outbox;
mod route;
mod streams;

pub use outbox::AckGrid;
pub use route::{IngestRoutes, RELAY_ENVELOPE_BYTES};
pub use streams::{Envelope, Refusal, RelayedStreams};

/// Responses queued for a slow relay before its stream stops reading.
pub const RELAY_RESPONSE_BUFFER: usize = 256;

/// Why a whole Relay stream ended with an error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RelayError {
    #[error("relay_request.stream is 0; the relay numbers its relayed streams from 1")]
    StreamZero,
    #[error("relay_request.message is missing (stream {stream}); send a report or closed")]
    NoMessage { stream: u64 },
    #[error("relay message too large (MAX_REPORT_BYTES plus the envelope): {0}")]
    Oversized(String),
    #[error("undecodable relay message: {0}")]
    Malformed(String),
}

impl RelayError {
    /// The `reason` label of `itw_scaler_rejected_streams_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::StreamZero | Self::NoMessage { .. } => "relay_envelope",
            Self::Oversized(_) => "oversized",
            Self::Malformed(_) => "malformed",
        }
    }

    pub fn status(&self) -> Status {
        let code = match self {
            Self::Oversized(_) => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

/// One Relay stream, owned by its own task.
pub struct RelayStream {
    pub store: Arc<Store>,
    pub metrics: Arc<ScalerMetrics>,
    pub tx: mpsc::Sender<Result<RelayResponse, Status>>,
    pub peer: Option<SocketAddr>,
    /// When held acks leave ([`outbox`]).
    pub grid: AckGrid,
}

/// How a Relay stream's reading ended without an envelope error.
enum End {
    /// The relay closed its side, went away or stopped reading answers.
    Relay,
    /// The scaler is stopping: the stream ends with status OK.
    Shutdown,
}

impl RelayStream {
    pub async fn run(self, mut inbound: Streaming<RelayRequest>, shutdown: CancellationToken) {
        let _connected = self.metrics.relay_connected();
        let limits = *self.store.limits();
        let mut relayed = RelayedStreams::new(limits.max_relayed_streams);
        let mut outbox = Outbox::new(self.tx.clone(), self.grid, Arc::clone(&self.metrics));
        tracing::info!(peer = ?self.peer, "relay connected");
        let result = tokio::select! {
            r = self.serve(&mut inbound, &mut relayed, &mut outbox) => r,
            () = shutdown.cancelled() => Ok(End::Shutdown),
            () = self.tx.closed() => Ok(End::Relay),
        };
        // Whichever side ended it, every agent on it is gone from here on;
        // they reconnect and resume with a snapshot.
        let agents = relayed.leave_all();
        match result {
            Ok(End::Relay) => {
                tracing::info!(peer = ?self.peer, agents, "relay stream ended by the relay")
            }
            Ok(End::Shutdown) => {
                outbox.flush_ready();
                tracing::info!(peer = ?self.peer, agents, "relay stream ended: scaler stopping")
            }
            Err(error) => {
                self.metrics.rejected_stream(error.metric_label());
                if let Some(left_out) = REFUSAL_LOG.allow() {
                    tracing::warn!(peer = ?self.peer, %error, agents, left_out, "relay stream rejected (at most 10 such lines a minute; all counted in itw_scaler_rejected_streams_total)");
                }
                outbox.fail(error.status()).await;
            }
        }
    }

    async fn serve(
        &self,
        inbound: &mut Streaming<RelayRequest>,
        relayed: &mut RelayedStreams,
        outbox: &mut Outbox,
    ) -> Result<End, RelayError> {
        let max_report_bytes = self.store.limits().max_report_bytes;
        // One timer for the stream's life, moved to each burst's tick.
        let tick = tokio::time::sleep(std::time::Duration::ZERO);
        tokio::pin!(tick);
        let mut armed = None;
        loop {
            let due = outbox.due();
            if let Some(at) = due
                && armed != due
            {
                tick.as_mut().reset(at);
                armed = due;
            }
            let request = tokio::select! {
                biased;
                () = &mut tick, if due.is_some() => {
                    if outbox.flush(Cause::Tick).await.is_err() {
                        return Ok(End::Relay);
                    }
                    continue;
                }
                request = next(inbound) => request?,
            };
            let Some(request) = request else {
                outbox.flush_ready();
                return Ok(End::Relay);
            };
            let stream = request.stream;
            let mut wake = false;
            let response = match relayed.take(request)? {
                Envelope::Ignored => None,
                Envelope::Closed(session) => {
                    session.leave();
                    None
                }
                Envelope::Refused(reason) => {
                    self.metrics.relayed_refused(reason.metric_label());
                    let status = reason.status(relayed.max());
                    Some(ended(stream, &status))
                }
                Envelope::Open(report) => {
                    let opened = agent_message(report, max_report_bytes).and_then(|first| {
                        let origin = Origin::Relayed {
                            relay: self.peer,
                            stream,
                        };
                        Session::open(&self.store, &self.metrics, first, origin)
                    });
                    match opened {
                        Ok((session, welcome)) => {
                            relayed.insert(stream, session);
                            Some(answer(stream, report_response::Message::Welcome(welcome)))
                        }
                        Err(error) => Some(self.reject(stream, &error)),
                    }
                }
                Envelope::Live(session, report) => {
                    wake = is_wake(&report);
                    let handled = agent_message(report, max_report_bytes)
                        .and_then(|message| session.handle(&self.store, &self.metrics, message));
                    match handled {
                        Ok(ack) => Some(answer(stream, report_response::Message::Ack(ack))),
                        Err(error) => {
                            relayed.end(stream);
                            Some(self.reject(stream, &error))
                        }
                    }
                }
            };
            if let Some(response) = response
                && outbox.push(response, wake).await.is_err()
            {
                return Ok(End::Relay);
            }
        }
    }

    /// A relayed stream ended as its Report stream would have: counted and
    /// logged the same way, its status carried in `ended`.
    fn reject(&self, stream: u64, error: &IngestError) -> RelayResponse {
        self.metrics.rejected_stream(error.metric_label());
        if let Some(left_out) = REFUSAL_LOG.allow() {
            tracing::warn!(peer = ?self.peer, stream, %error, left_out, "relayed report stream rejected (at most 10 such lines a minute; all counted in itw_scaler_rejected_streams_total)");
        }
        ended(stream, &error.status())
    }
}

/// The agent's message out of its relayed request, held to the limit a
/// Report stream's decoder would have held it to, and refused in the words
/// of that decoder (tonic's), so that the agent reads the same status
/// whether it reached the replica directly or through a relay.
fn agent_message(
    report: ReportRequest,
    max_report_bytes: usize,
) -> Result<report_request::Message, IngestError> {
    let len = report.encoded_len();
    if len > max_report_bytes {
        return Err(IngestError::Oversized(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {max_report_bytes} bytes"
        )));
    }
    report.message.ok_or(IngestError::Empty)
}

/// Whether an agent's message is a wake batch, whose ack never waits.
fn is_wake(report: &ReportRequest) -> bool {
    matches!(&report.message, Some(report_request::Message::Batch(batch)) if batch.wake)
}

fn answer(stream: u64, message: report_response::Message) -> RelayResponse {
    RelayResponse {
        stream,
        message: Some(relay_response::Message::Report(ReportResponse {
            message: Some(message),
        })),
    }
}

fn ended(stream: u64, status: &Status) -> RelayResponse {
    RelayResponse {
        stream,
        message: Some(relay_response::Message::Ended(RelayEnded {
            code: status.code() as i32,
            message: status.message().to_owned(),
        })),
    }
}

/// The next envelope; `None` when the relay closed or left.
async fn next(inbound: &mut Streaming<RelayRequest>) -> Result<Option<RelayRequest>, RelayError> {
    match inbound.message().await {
        Ok(request) => Ok(request),
        Err(status) => match status.code() {
            Code::OutOfRange | Code::ResourceExhausted => {
                Err(RelayError::Oversized(status.message().to_owned()))
            }
            Code::Internal => Err(RelayError::Malformed(status.message().to_owned())),
            _ => {
                tracing::debug!(%status, "relay stream broke");
                Ok(None)
            }
        },
    }
}
