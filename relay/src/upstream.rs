//! The Relay stream to one replica, kept open for as long as the replica is
//! resolved: opened, fed the replica's answers ([`Link::deliver`]), and
//! opened again with jittered exponential backoff when it ends or breaks.
//! Each opening is a new [`Link`], so its numbers start again from 1.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use itw_proto::itw::v1::ingest_client::IngestClient;
use rand::Rng;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{
    Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    auth::AgentToken,
    config::Limits,
    link::Link,
    metrics::{EndReason, RelayMetrics},
};

/// First and longest pause between failed Relay streams.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Largest answer of a replica (a Welcome or Ack is a few bytes).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// What every replica's Relay stream shares.
pub struct UpstreamContext {
    pub token: Arc<AgentToken>,
    pub tls: Option<ClientTlsConfig>,
    pub limits: Limits,
    pub metrics: Arc<RelayMetrics>,
}

/// Keeps the Relay stream to `replica` open until `stop`; `link` shows the
/// current one (`None` while there is none). `domain` is the name the
/// replica was resolved from (what its certificate must carry). `stop` is a
/// child of `shutdown`, the relay's own: cancelled alone, the replica is gone.
pub async fn run(
    ctx: Arc<UpstreamContext>,
    replica: SocketAddr,
    domain: String,
    link: watch::Sender<Option<Arc<Link>>>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        if !first {
            ctx.metrics.reconnect(replica);
        }
        first = false;
        let started = Instant::now();
        let outcome = session(&ctx, replica, &domain, &link, &stop, &shutdown).await;
        link.send_replace(None);
        ctx.metrics.relay_stream_up(replica, false);
        match outcome {
            Ok(()) => return,
            Err(error) => {
                if started.elapsed() > BACKOFF_MAX {
                    backoff = BACKOFF_MIN;
                }
                tracing::warn!(%replica, error = %chain(&error), retry_in = ?backoff, "Relay stream to the scaler replica ended");
            }
        }
        // Full jitter: relays restarting together must not hit a replica at once.
        let pause = rand::rng().random_range(backoff / 2..=backoff);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the bearer token cannot be sent in a header")]
    Token,
    #[error("replica answered {}: {}", .0.code(), .0.message())]
    Status(Status),
    #[error("the replica ended the Relay stream")]
    Ended,
}

/// One Relay stream, from connecting to its end; `Ok` on `stop`.
async fn session(
    ctx: &UpstreamContext,
    replica: SocketAddr,
    domain: &str,
    current: &watch::Sender<Option<Arc<Link>>>,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let channel = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        channel = connect(ctx, replica, domain) => channel?,
    };
    let token = match ctx.token.current() {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| SessionError::Token)?,
        ),
        None => None,
    };
    let mut client = IngestClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(token) = &token {
            req.metadata_mut().insert("authorization", token.clone());
        }
        Ok(req)
    })
    .max_decoding_message_size(MAX_ANSWER_BYTES);
    let (link, outbound) = Link::new(
        replica,
        ctx.limits.upstream_buffer,
        ctx.limits.agent_response_buffer,
        Arc::clone(&ctx.metrics),
    );
    let mut inbound = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        response = client.relay(outbound) => response.map_err(SessionError::Status)?.into_inner(),
    };
    current.send_replace(Some(Arc::clone(&link)));
    ctx.metrics.relay_stream_up(replica, true);
    tracing::info!(%replica, "Relay stream to the scaler replica up");
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => {
                let (status, reason) = stopped(replica, shutdown.is_cancelled());
                link.end_all(&status, reason);
                return Ok(());
            }
            message = inbound.message() => message,
        };
        match message {
            Ok(Some(response)) => link.deliver(response),
            Ok(None) => {
                // Ended with OK: the replica is stopping; its agents reconnect.
                link.end_all(
                    &Status::ok(format!("scaler replica {replica} ended the relay stream")),
                    EndReason::RelayStreamEnded,
                );
                return Err(SessionError::Ended);
            }
            Err(status) => {
                let status = relayed_status(replica, status);
                link.end_all(&status, EndReason::RelayStreamEnded);
                return Err(SessionError::Status(status));
            }
        }
    }
}

/// How the agents' streams end when the Relay stream is stopped: with OK when
/// the relay stops (as a replica stopping ends its own), UNAVAILABLE when only
/// the replica went out of SCALER_ADDR's answer, so agents look again.
fn stopped(replica: SocketAddr, relay_stopping: bool) -> (Status, EndReason) {
    if relay_stopping {
        (Status::ok("the relay is stopping"), EndReason::Stopping)
    } else {
        (
            Status::unavailable(format!(
                "scaler replica {replica} is no longer resolved from the relay's SCALER_ADDR; resolve the replicas again"
            )),
            EndReason::ReplicaGone,
        )
    }
}

/// The status the agents' streams end with: the replica's own status as it
/// sent it, or UNAVAILABLE when the stream broke (the client made the status
/// from a transport error, which it keeps as the source).
fn relayed_status(replica: SocketAddr, status: Status) -> Status {
    if std::error::Error::source(&status).is_some() {
        Status::unavailable(format!(
            "the relay's stream to scaler replica {replica} broke: {}; reconnect",
            status.message()
        ))
    } else {
        Status::new(status.code(), status.message().to_owned())
    }
}

async fn connect(
    ctx: &UpstreamContext,
    replica: SocketAddr,
    domain: &str,
) -> Result<Channel, tonic::transport::Error> {
    let scheme = if ctx.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{replica}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(tls) = &ctx.tls {
        endpoint = endpoint.tls_config(tls.clone().domain_name(domain))?;
    }
    endpoint.connect().await
}

/// An error with its causes: tonic says only "transport error" alone.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn the_replicas_own_status_passes_on_and_a_broken_stream_is_unavailable() {
        let replica: SocketAddr = "10.0.0.5:9090".parse().unwrap();
        let sent = relayed_status(replica, Status::unauthenticated("bad token"));
        assert_eq!(
            (sent.code(), sent.message()),
            (Code::Unauthenticated, "bad token")
        );
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        let sent = relayed_status(replica, broken);
        assert_eq!(sent.code(), Code::Unavailable);
        assert!(
            sent.message()
                .starts_with("the relay's stream to scaler replica 10.0.0.5:9090 broke: "),
            "{sent:?}"
        );
    }

    #[test]
    fn a_gone_replica_ends_its_agents_unavailable_and_a_stopping_relay_with_ok() {
        let replica: SocketAddr = "10.0.0.5:9090".parse().unwrap();
        let (status, reason) = stopped(replica, true);
        assert_eq!(
            (status.code(), status.message(), reason),
            (Code::Ok, "the relay is stopping", EndReason::Stopping)
        );
        let (status, reason) = stopped(replica, false);
        assert_eq!(
            (status.code(), status.message(), reason),
            (
                Code::Unavailable,
                "scaler replica 10.0.0.5:9090 is no longer resolved from the relay's SCALER_ADDR; resolve the replicas again",
                EndReason::ReplicaGone
            )
        );
        assert_eq!(reason.label(), "replica_gone");
    }
}
