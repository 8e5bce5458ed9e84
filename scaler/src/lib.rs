//! `itw-scaler`: sums the connect attempts every agent reports into
//! per-service windows and serves them to KEDA as an external scaler.
//!
//! - [`config`]: flags and env vars.
//! - [`trigger`]: a ScaledObject trigger's metadata, parsed and checked.
//! - [`window`]: per-second windows, the scaler clock, the default window.
//! - [`store`]: instances, series, windows, subscribers and the activity rule.
//! - [`ingest`]: the agents' `itw.v1.Ingest/Report` stream.
//! - [`relay`]: `itw.v1.Ingest/Relay`, many agents' streams carried by a
//!   relay on one stream, each run by the same rules as a Report stream.
//! - [`graph`]: the dependency graph (Service A calls Service B) and its
//!   read-only `itw.v1.Graph` service.
//! - [`prewake`]: StreamIsActive and IsActive for `prewake: "true"`
//!   triggers: active while anything upstream in the graph is.
//! - [`ingest_runtime`]: the threads those streams run on (INGEST_THREADS).
//! - [`keda`]: KEDA's `externalscaler.ExternalScaler` service.
//! - [`call_timing`]: GetMetrics timed from its request's hand-over to its
//!   answer, the serving runtime's queue included.
//! - [`coldstart`]: cold start by phase per Service, once per activation.
//! - [`auth`]: the agents' bearer token.
//! - [`metrics`]: the scaler's own figures (streams, batches, overflows, lag).
//! - [`export`]: the `/metrics` page: those figures and the store's series.
//! - [`server`]: the gRPC server (KEDA, ingest, health, reflection, TLS) and
//!   the metrics endpoint, started and stopped together.

pub mod auth;
pub mod call_timing;
pub mod coldstart;
pub mod config;
pub mod export;
pub mod graph;
pub mod ingest;
pub mod ingest_runtime;
pub mod keda;
pub mod metrics;
pub mod prewake;
pub mod relay;
pub mod server;
pub mod store;
pub mod trigger;
pub mod window;

use std::{net::SocketAddr, path::PathBuf};

pub use server::Scaler;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("AGENT_TOKEN_FILE {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: itw_proto::token::FileProblem,
    },
    #[error("{setting} {}: {source}", path.display())]
    TlsFile {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS_CERT_FILE/TLS_KEY_FILE/TLS_CLIENT_CA_FILE: {}", chain(.0))]
    Tls(#[source] tonic::transport::Error),
    #[error("GRPC_ADDR {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("INGEST_THREADS={threads}: cannot start the ingest threads: {source}")]
    IngestThreads {
        threads: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Telemetry(#[from] itw_telemetry::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {}", chain(.0))]
    Grpc(#[source] tonic::transport::Error),
}

/// An error with its causes, since tonic's transport errors say little alone.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
