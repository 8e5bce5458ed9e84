//! The bearer token: agents must present it before anything is relayed,
//! and the relay presents the same one to the replicas (their
//! AGENT_TOKEN_FILE holds the same Secret). The rule and the comparison are
//! `itw_proto::token`'s; this module names the relay's settings in its
//! refusals and re-reads TOKEN_FILE for rotation.

use std::{sync::Arc, time::Duration};

use itw_proto::token::{ExpectedToken, Refusal};
use itw_telemetry::logging::LogBudget;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::{
    Error,
    config::TokenSource,
    metrics::{EndReason, RelayMetrics},
};

/// How often TOKEN_FILE is checked for a new token (as the scaler does).
pub const TOKEN_FILE_POLL: Duration = Duration::from_secs(2);

/// Refused agent streams: at most 10 log lines a minute, all counted.
static REFUSAL_LOG: LogBudget = LogBudget::new(10, Duration::from_secs(60));

/// The token agents present and the relay passes on.
pub struct AgentToken(ExpectedToken);

impl AgentToken {
    /// Reads the token; a file must exist and hold one.
    pub fn load(source: &TokenSource) -> Result<Self, Error> {
        Ok(Self(match source {
            TokenSource::None => ExpectedToken::none(),
            TokenSource::Value(secret) => ExpectedToken::value(&secret.0),
            TokenSource::File(path) => {
                ExpectedToken::file(path).map_err(|source| Error::TokenFile {
                    path: path.clone(),
                    source,
                })?
            }
        }))
    }

    pub fn required(&self) -> bool {
        self.0.required()
    }

    /// The token to present to the replicas.
    pub fn current(&self) -> Option<Arc<str>> {
        self.0.current()
    }

    /// Checks an agent's `authorization: Bearer <token>` header.
    pub fn check(&self, request: &Request<()>) -> Result<(), Status> {
        self.0.check(request.metadata()).map_err(|refusal| {
            Status::unauthenticated(match refusal {
                Refusal::Missing => {
                    "agent streams need an `authorization: Bearer <token>` header (TOKEN_FILE on the relay)"
                }
                Refusal::NotBearer => "the authorization header is not `Bearer <token>`",
                Refusal::Mismatch => "the bearer token is not the one this relay expects",
            })
        })
    }

    /// Re-reads TOKEN_FILE every [`TOKEN_FILE_POLL`] until `stop`; a file
    /// that turns unreadable or empty keeps the last good token.
    pub async fn watch_file(self: Arc<Self>, stop: CancellationToken) {
        let Some(path) = self.0.path().map(ToOwned::to_owned) else {
            return;
        };
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + TOKEN_FILE_POLL,
            TOKEN_FILE_POLL,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let token = Arc::clone(&self);
            // File reads block; keep them off the async workers.
            match tokio::task::spawn_blocking(move || token.0.reload()).await {
                Ok(Ok(true)) => tracing::info!(file = %path.display(), "token reloaded"),
                Ok(Ok(false)) | Err(_) => {}
                Ok(Err(error)) => {
                    tracing::warn!(file = %path.display(), %error, "keeping the previous token");
                }
            }
        }
    }

    /// The interceptor guarding the agents' Report streams.
    pub fn interceptor(
        self: &Arc<Self>,
        metrics: &Arc<RelayMetrics>,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
        let token = Arc::clone(self);
        let metrics = Arc::clone(metrics);
        move |request: Request<()>| match token.check(&request) {
            Ok(()) => Ok(request),
            Err(status) => {
                metrics.ended(EndReason::Unauthenticated);
                refused(&request, &status);
                Err(status)
            }
        }
    }
}

/// Logs a refused agent stream within the budget.
pub fn refused<T>(request: &Request<T>, status: &Status) {
    if let Some(left_out) = REFUSAL_LOG.allow() {
        tracing::warn!(peer = ?request.remote_addr(), reason = status.message(), left_out, "agent stream refused (at most 10 such lines a minute; all counted in itw_relay_agent_streams_ended_total)");
    }
}
