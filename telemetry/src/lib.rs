//! What `itw-agent` and `itw-scaler` must do the same way: log setup
//! ([`logging`]), the `/metrics` endpoint ([`http`], [`exposition`]), the
//! cold start histograms' labels and buckets ([`cold_start`]), and
//! reading duration flags ([`flags`]), and the guarded listener every server
//! of both binaries accepts on ([`listener`], and [`grpc_listener`] for tonic).
//!
//! Both binaries export `internal_tcp_attempts_total`, and Prometheus must see
//! the same thing from either, so the exposition rules live here once.

pub mod cold_start;
pub mod exposition;
pub mod flags;
pub mod grpc_listener;
pub mod http;
pub mod listener;
pub mod logging;
pub mod signals;
pub mod timeline;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("RUST_LOG: {0}")]
    LogFilter(#[from] tracing_subscriber::filter::ParseError),
    #[error("a global tracing subscriber is already installed")]
    LoggingAlreadyInstalled,
    #[error("METRICS_ADDR {addr}: cannot listen: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics server: {0}")]
    Serve(#[source] std::io::Error),
}
