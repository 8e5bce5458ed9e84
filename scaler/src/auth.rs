//! The bearer token agents must present on the ingest stream.
//!
//! Only `itw.v1.Ingest` is guarded; KEDA, health and reflection never need a
//! token. A token from a file (a mounted Secret) is re-read when the file
//! changes, so rotating the Secret needs no restart; a file that turns
//! unreadable or empty keeps the last good token rather than locking every
//! agent out or letting everyone in.

use std::{sync::Arc, time::Duration};

use itw_proto::token::{ExpectedToken, Refusal};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, metadata::MetadataMap};

use crate::{Error, config::TokenSource, metrics::ScalerMetrics};

/// How often a token file is checked for a new token. Kubernetes updates a
/// mounted Secret within a minute or so; a few seconds more do not matter.
pub const TOKEN_FILE_POLL: Duration = Duration::from_secs(2);

/// The token agents must send, if any: the rule and file handling the
/// relay shares ([`ExpectedToken`]), phrased for the scaler's operator.
pub struct AgentToken(ExpectedToken);

impl AgentToken {
    /// Reads the token from its source; a file must exist and hold a token.
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

    /// Whether agents must send a token.
    pub fn required(&self) -> bool {
        self.0.required()
    }

    /// Checks a request's `authorization: Bearer <token>` header.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        self.0.check(metadata).map_err(|refusal| {
            Status::unauthenticated(match refusal {
                Refusal::Missing => {
                    "agent streams need an `authorization: Bearer <token>` header (AGENT_TOKEN on the scaler)"
                }
                Refusal::NotBearer => "the authorization header is not `Bearer <token>`",
                Refusal::Mismatch => "the bearer token is not the one this scaler expects",
            })
        })
    }

    /// Re-reads the token file; true when the token changed.
    pub fn reload(&self) -> bool {
        match self.0.reload() {
            Ok(changed) => {
                if changed && let Some(path) = self.0.path() {
                    tracing::info!(file = %path.display(), "agent token reloaded");
                }
                changed
            }
            Err(error) => {
                tracing::warn!(%error, "keeping the previous agent token");
                false
            }
        }
    }

    /// Re-reads the token file every [`TOKEN_FILE_POLL`] until shutdown.
    /// Polling rather than inotify: Kubernetes swaps a Secret's files
    /// through symlinks, which file watches follow badly.
    pub async fn watch_file(self: Arc<Self>, shutdown: CancellationToken) {
        if self.0.path().is_none() {
            return;
        }
        // The file was read at load: the first check is one period later.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + TOKEN_FILE_POLL,
            TOKEN_FILE_POLL,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let token = Arc::clone(&self);
                    // File reads block; keep them off the async workers.
                    let _ = tokio::task::spawn_blocking(move || token.reload()).await;
                }
            }
        }
    }

    /// The tonic interceptor guarding the ingest service.
    pub fn interceptor(
        self: &Arc<Self>,
        metrics: &Arc<ScalerMetrics>,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
        let token = Arc::clone(self);
        let metrics = Arc::clone(metrics);
        move |request: Request<()>| match token.check(request.metadata()) {
            Ok(()) => Ok(request),
            Err(status) => {
                metrics.rejected_stream("unauthenticated");
                if let Some(left_out) = crate::ingest::REFUSAL_LOG.allow() {
                    tracing::warn!(peer = ?request.remote_addr(), reason = status.message(), left_out, "agent stream refused (at most 10 such lines a minute; all counted in itw_scaler_rejected_streams_total)");
                }
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;
    use crate::config::Secret;

    fn metadata(value: Option<&str>) -> MetadataMap {
        let mut map = MetadataMap::new();
        if let Some(v) = value {
            map.insert("authorization", MetadataValue::try_from(v).unwrap());
        }
        map
    }

    fn message(result: Result<(), Status>) -> String {
        let status = result.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        status.message().to_owned()
    }

    #[test]
    fn no_token_configured_lets_everyone_in() {
        let token = AgentToken::load(&TokenSource::None).unwrap();
        assert!(!token.required());
        assert!(token.check(&metadata(None)).is_ok());
        assert!(token.check(&metadata(Some("Bearer whatever"))).is_ok());
    }

    #[test]
    fn a_configured_token_must_match() {
        let token = AgentToken::load(&TokenSource::Value(Secret("s3cret".into()))).unwrap();
        assert!(token.required());
        assert!(token.check(&metadata(Some("Bearer s3cret"))).is_ok());
        assert!(token.check(&metadata(Some("bearer s3cret"))).is_ok());
        assert_eq!(
            message(token.check(&metadata(None))),
            "agent streams need an `authorization: Bearer <token>` header (AGENT_TOKEN on the scaler)"
        );
        assert_eq!(
            message(token.check(&metadata(Some("Bearer s3cre")))),
            "the bearer token is not the one this scaler expects"
        );
        assert_eq!(
            message(token.check(&metadata(Some("Bearer s3cretx")))),
            "the bearer token is not the one this scaler expects"
        );
        assert_eq!(
            message(token.check(&metadata(Some("Basic s3cret")))),
            "the authorization header is not `Bearer <token>`"
        );
        assert_eq!(
            message(token.check(&metadata(Some("s3cret")))),
            "the authorization header is not `Bearer <token>`"
        );
    }

    #[test]
    fn a_token_file_is_read_trimmed_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("itw-scaler-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let token = AgentToken::load(&TokenSource::File(path.clone())).unwrap();
        assert!(token.check(&metadata(Some("Bearer first"))).is_ok());
        assert!(!token.reload(), "unchanged file");

        std::fs::write(&path, "second").unwrap();
        assert!(token.reload());
        assert!(token.check(&metadata(Some("Bearer second"))).is_ok());
        assert!(token.check(&metadata(Some("Bearer first"))).is_err());

        // Emptied or removed: the last good token stays.
        std::fs::write(&path, "  \n").unwrap();
        assert!(!token.reload());
        assert!(token.check(&metadata(Some("Bearer second"))).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(!token.reload());
        assert!(token.check(&metadata(Some("Bearer second"))).is_ok());

        // At start, a missing or empty file is an error naming it.
        let error = AgentToken::load(&TokenSource::File(path.clone()))
            .err()
            .unwrap();
        assert!(
            error
                .to_string()
                .starts_with(&format!("AGENT_TOKEN_FILE {}: ", path.display())),
            "{error}"
        );
        std::fs::write(&path, "\n").unwrap();
        let error = AgentToken::load(&TokenSource::File(path.clone()))
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            format!(
                "AGENT_TOKEN_FILE {}: the token is empty; put the token in it",
                path.display()
            )
        );
        // One no agent could send (a header carries printable ASCII only).
        std::fs::write(&path, "caf\u{e9}\n").unwrap();
        let error = AgentToken::load(&TokenSource::File(path.clone()))
            .err()
            .unwrap();
        assert!(
            error.to_string().starts_with(&format!(
                "AGENT_TOKEN_FILE {}: the token holds '\u{e9}'",
                path.display()
            )),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
