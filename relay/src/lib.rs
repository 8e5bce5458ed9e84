//! `itw-relay`: accepts the agents' Report streams and carries them to each
//! scaler replica on one Relay stream of its own, so a replica holds a few
//! relays' connections instead of one per node (`proto/itw/v1/ingest.proto`
//! has the contract). It keeps no counts: every message travels untouched.
//!
//! - [`config`]: flags and env vars.
//! - [`auth`]: the agents' bearer token, checked here and presented upstream.
//! - [`replicas`]: SCALER_ADDR resolved; the only replicas an agent may name.
//! - [`upstream`]: one replica's Relay stream, reopened with backoff.
//! - [`link`]: one Relay stream's numbering, routing and end.
//! - [`agent_stream`]: one agent's stream, forwarded without a task of its own.
//! - [`service`]: `itw.v1.Ingest` as agents see it (header, limits).
//! - [`metrics`]: the relay's own figures.
//! - [`server`]: the gRPC port, health, reflection, TLS, the metrics and
//!   probe endpoint, started and stopped together.

pub mod agent_stream;
pub mod auth;
pub mod config;
pub mod link;
pub mod metrics;
pub mod replicas;
pub mod server;
pub mod service;
pub mod upstream;

use std::{net::SocketAddr, path::PathBuf};

pub use server::Relay;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TOKEN_FILE {}: {source}", path.display())]
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
    #[error("TLS_CERT_FILE/TLS_KEY_FILE/TLS_CLIENT_CA_FILE: {}", upstream::chain(.0))]
    Tls(#[source] tonic::transport::Error),
    #[error("LISTEN_ADDR {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Telemetry(#[from] itw_telemetry::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {}", upstream::chain(.0))]
    Grpc(#[source] tonic::transport::Error),
}
