//! One `Report` stream to one scaler replica, kept open for the agent's life.
//!
//! A session is: Hello, wait for Welcome, send the snapshot the ledger builds
//! for what the replica already holds (plus resends), then every new batch as
//! soon as the ledger records it, reading acks as they come. A session ends on
//! any error, when the replica ends it, or when the stream fell so far behind
//! that the log no longer holds its next batch; the next session starts with
//! a fresh snapshot after a jittered, exponential backoff (none after falling
//! behind: the replica is healthy, just slow).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use itw_proto::{
    addr::HostPort,
    itw::v1::{
        Hello, PROTOCOL_VERSION, REPLICA_HEADER, ReportRequest, ReportResponse,
        ingest_client::IngestClient, report_request, report_response,
    },
};
use rand::Rng;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

use super::{
    ReportContext, ReportError,
    ledger::{FellBehind, Outgoing},
};

/// First and longest pause between failed sessions.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Messages queued towards one replica before sending waits (HTTP/2 flow
/// control beyond that).
const OUTBOUND_QUEUE: usize = 64;

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum SessionEnd {
    /// Shutdown: everything sent was acknowledged, or the flush timed out.
    Stopped,
    /// The log no longer holds the next batch: start over with a snapshot.
    FellBehind,
}

/// Keeps a stream to `addr` open until `stop` is cancelled; `domain` is the
/// name `addr` was found under (what a TLS certificate must carry).
pub async fn run(
    ctx: Arc<ReportContext>,
    addr: SocketAddr,
    domain: String,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let outcome = session(&ctx, addr, &domain, &stop).await;
        match outcome {
            Ok(SessionEnd::Stopped) => return,
            Ok(SessionEnd::FellBehind) => {
                ctx.metrics.stream_failure("fell_behind");
                tracing::warn!(%addr, "scaler stream fell behind the resend buffer; resending a snapshot");
                backoff = BACKOFF_MIN;
                continue;
            }
            Err(error) => {
                ctx.metrics.stream_failure(error.reason());
                // A session that lived a while was healthy: start backing off afresh.
                if started.elapsed() > BACKOFF_MAX {
                    backoff = BACKOFF_MIN;
                }
                // The causes matter: tonic says only "transport error" for
                // a CA that does not match or a refused client certificate.
                let error = super::error_chain(&error);
                ctx.metrics.health().failed(&format!("{addr}: {error}"));
                tracing::warn!(%addr, %error, retry_in = ?backoff, "scaler stream failed");
            }
        }
        // Full jitter: replicas restarting together must not see every agent at once.
        let pause = rand::rng().random_range(backoff / 2..=backoff);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        ctx.replicas_changed.notify_one();
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    ctx: &ReportContext,
    addr: SocketAddr,
    domain: &str,
    stop: &CancellationToken,
) -> Result<SessionEnd, ReportError> {
    let channel = match &ctx.settings.relay {
        Some(relay) => connect_relay(ctx, relay).await?,
        None => connect(ctx, addr, domain).await?,
    };
    let token = ctx.settings.token()?;
    // Through a relay, the header says which replica the stream is for.
    let replica = match ctx.settings.relay {
        Some(_) => Some(replica_header(addr)?),
        None => None,
    };
    let mut client = IngestClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(token) = &token {
            req.metadata_mut().insert("authorization", token.clone());
        }
        if let Some(replica) = &replica {
            req.metadata_mut().insert(REPLICA_HEADER, replica.clone());
        }
        Ok(req)
    })
    .max_decoding_message_size(1 << 20);

    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let out = Outbound { tx, stop };
    out.send(report_request::Message::Hello(Hello {
        node_name: ctx.settings.node_name.clone(),
        instance_id: ctx.settings.instance_id.clone(),
        instance_secret: ctx.settings.instance_secret.expose().to_owned(),
        protocol_version: PROTOCOL_VERSION,
    }))
    .await?;
    let mut inbound = tokio::select! {
        () = stop.cancelled() => return Ok(SessionEnd::Stopped),
        response = client.report(ReceiverStream::new(rx)) => response?.into_inner(),
    };
    let welcome = match next(&mut inbound, stop).await? {
        None => return Ok(SessionEnd::Stopped),
        Some(report_response::Message::Welcome(welcome)) => welcome,
        Some(other) => {
            return Err(ReportError::Protocol(format!(
                "expected Welcome first, got {other:?}"
            )));
        }
    };

    ctx.ledger.want_history(welcome.history_seconds);
    let start = ctx.ledger.start_stream(
        welcome.applied_sequence,
        welcome.history_seconds,
        ctx.clock.now_ms(),
    );
    ctx.metrics.snapshot(start.resumed);
    tracing::info!(
        %addr,
        applied = welcome.applied_sequence,
        through = start.snapshot.through_sequence,
        resend = start.resend.len(),
        resumed = start.resumed,
        "scaler stream up"
    );
    let mut sent = start.snapshot.through_sequence;
    out.send(report_request::Message::Snapshot(start.snapshot))
        .await?;
    for outgoing in start.resend {
        sent = out.batch(ctx, outgoing).await?;
        ctx.metrics.resent();
    }
    let _up = ctx.metrics.stream_up();
    let mut acked = welcome.applied_sequence;
    let mut latest = ctx.ledger.subscribe();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return flush(ctx, &out, &mut inbound, acked, sent).await,
            message = inbound.message() => match message? {
                Some(ReportResponse { message: Some(report_response::Message::Ack(ack)) }) => {
                    if ack.sequence > acked {
                        ctx.metrics.acked(ack.sequence - acked);
                        acked = ack.sequence;
                    }
                }
                Some(other) => {
                    return Err(ReportError::Protocol(format!("expected Ack, got {other:?}")));
                }
                None => return Err(ReportError::EndedByScaler),
            },
            changed = latest.changed() => {
                if changed.is_err() {
                    return Ok(SessionEnd::Stopped);
                }
                match ctx.ledger.after(sent) {
                    Ok(batches) => {
                        for outgoing in batches {
                            sent = out.batch(ctx, outgoing).await?;
                        }
                    }
                    Err(FellBehind) => return Ok(SessionEnd::FellBehind),
                }
            }
        }
    }
}

/// On shutdown: send what the final collection recorded, then wait (bounded)
/// for the replica to acknowledge everything, so a rolling restart of the
/// agent loses nothing in flight.
async fn flush(
    ctx: &ReportContext,
    out: &Outbound<'_>,
    inbound: &mut tonic::Streaming<ReportResponse>,
    mut acked: u64,
    mut sent: u64,
) -> Result<SessionEnd, ReportError> {
    let deadline = Instant::now() + ctx.settings.flush_timeout;
    // If the stream fell behind the log there is nothing resendable; the
    // replica keeps exact totals up to what it acknowledged.
    for outgoing in ctx.ledger.after(sent).unwrap_or_default() {
        let request = ReportRequest {
            message: Some(report_request::Message::Batch((*outgoing.batch).clone())),
        };
        match tokio::time::timeout_at(deadline, out.tx.send(request)).await {
            Ok(Ok(())) => {
                sent = outgoing.batch.sequence;
                ctx.metrics.sent(sent, outgoing.woken.as_ref());
            }
            Ok(Err(_)) | Err(_) => break,
        }
    }
    while acked < sent {
        let message = tokio::time::timeout_at(deadline, inbound.message()).await;
        match message {
            Ok(Ok(Some(ReportResponse {
                message: Some(report_response::Message::Ack(ack)),
            }))) => {
                if ack.sequence > acked {
                    ctx.metrics.acked(ack.sequence - acked);
                    acked = ack.sequence;
                }
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None) | Err(_)) | Err(_) => break,
        }
    }
    if acked < sent {
        tracing::warn!(
            acked,
            sent,
            "scaler did not acknowledge every batch before shutdown"
        );
    }
    Ok(SessionEnd::Stopped)
}

struct Outbound<'a> {
    tx: mpsc::Sender<ReportRequest>,
    stop: &'a CancellationToken,
}

impl Outbound<'_> {
    async fn send(&self, message: report_request::Message) -> Result<(), ReportError> {
        let request = ReportRequest {
            message: Some(message),
        };
        tokio::select! {
            () = self.stop.cancelled() => Err(ReportError::Stopped),
            sent = self.tx.send(request) => sent.map_err(|_| ReportError::EndedByScaler),
        }
    }

    /// Sends a batch; returns its sequence.
    async fn batch(&self, ctx: &ReportContext, outgoing: Outgoing) -> Result<u64, ReportError> {
        let sequence = outgoing.batch.sequence;
        self.send(report_request::Message::Batch((*outgoing.batch).clone()))
            .await?;
        ctx.metrics.sent(sequence, outgoing.woken.as_ref());
        Ok(sequence)
    }
}

async fn next(
    inbound: &mut tonic::Streaming<ReportResponse>,
    stop: &CancellationToken,
) -> Result<Option<report_response::Message>, ReportError> {
    tokio::select! {
        () = stop.cancelled() => Ok(None),
        message = inbound.message() => match message? {
            Some(ReportResponse { message: Some(m) }) => Ok(Some(m)),
            Some(ReportResponse { message: None }) => {
                Err(ReportError::Protocol("empty response message".into()))
            }
            None => Err(ReportError::EndedByScaler),
        }
    }
}

async fn connect(
    ctx: &ReportContext,
    addr: SocketAddr,
    domain: &str,
) -> Result<Channel, ReportError> {
    let endpoint = endpoint(ctx, &addr.to_string(), domain)
        .map_err(|e| ReportError::Config(format!("SCALER_ADDR {addr}: {e}")))?;
    Ok(endpoint.connect().await?)
}

/// A connection to the relay, resolved anew on every session: a relay
/// Service's address may change, and a relay that went away is replaced.
async fn connect_relay(ctx: &ReportContext, relay: &HostPort) -> Result<Channel, ReportError> {
    let endpoint = endpoint(ctx, &relay.to_string(), relay.domain())
        .map_err(|e| ReportError::Config(format!("RELAY_ADDR {relay}: {e}")))?;
    Ok(endpoint.connect().await?)
}

/// The `itw-replica` header value naming `addr`.
fn replica_header(addr: SocketAddr) -> Result<MetadataValue<Ascii>, ReportError> {
    addr.to_string()
        .parse()
        .map_err(|_| ReportError::Config(format!("{REPLICA_HEADER}: {addr} cannot be a header")))
}

fn endpoint(ctx: &ReportContext, authority: &str, domain: &str) -> Result<Endpoint, String> {
    let scheme = if ctx.settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(tls) = &ctx.settings.tls {
        endpoint = endpoint
            .tls_config(tls.config(domain))
            .map_err(|e| format!("TLS: {e}"))?;
    }
    Ok(endpoint)
}

/// The `authorization` header value for a token.
pub fn bearer(token: &str) -> Result<MetadataValue<tonic::metadata::Ascii>, ReportError> {
    format!("Bearer {}", token.trim()).parse().map_err(|_| {
        ReportError::Config("the scaler token has characters a header cannot carry".into())
    })
}
