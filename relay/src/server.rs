//! The relay as a whole: the agents' gRPC port (the relayed Report stream
//! behind the token check, health, reflection, optional TLS), the replicas'
//! Relay streams, and the `/metrics`, `/healthz`, `/readyz` port, started
//! and stopped together.
//!
//! Stopping: every agent stream ends with OK (the agents reconnect, to
//! another relay behind the Service), every Relay stream is dropped (the
//! replicas treat the agents as gone), then the server drains its
//! connections for at most [`SHUTDOWN_GRACE`].

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use itw_proto::{itw::v1::ingest_server::IngestServer, window::connection_window};
use itw_telemetry::listener::{Guard, GuardedListener, OnClose};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    server::NamedService,
    service::interceptor::InterceptedService,
    transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;

use crate::{
    Error,
    auth::AgentToken,
    config::{ClientTlsFiles, Config, ServerTlsFiles},
    metrics::RelayMetrics,
    replicas::Replicas,
    service::RelayService,
    upstream::UpstreamContext,
};

/// Longest wait for connections to close once every stream has ended.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// HTTP/2 pings find agents that vanished without a FIN.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 receive window of each agent stream: what an agent may send that
/// the relay has not forwarded yet. hyper's default (1 MiB) would let
/// thousands of agents queue gigabytes; a steady batch is about 1 KB and a
/// snapshot flows in about its size / window round trips. The connection
/// window is larger ([`connection_window`]) so that an agent's small batches
/// waiting unread while the replica stalls do not trip h2's guard against
/// floods of small frames; an agent has one stream, held to this window.
const AGENT_WINDOW: u32 = 64 << 10;

/// A relay with its ports bound, ready to serve.
pub struct Relay {
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
    tls: Option<ServerTlsConfig>,
    token: Arc<AgentToken>,
    replicas: Arc<Replicas>,
    config: Config,
    metrics: Arc<RelayMetrics>,
}

impl Relay {
    /// Reads the token and TLS files and binds both ports; every problem
    /// with the settings shows up here, before anything is served.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let token = Arc::new(AgentToken::load(&config.token)?);
        let tls = config.tls.as_ref().map(server_tls).transpose()?;
        if let Some(tls) = &tls {
            // Parses certificate and key now: a bad file fails the start.
            Server::builder()
                .tls_config(tls.clone())
                .map_err(Error::Tls)?;
        }
        let client_tls = config.scaler_tls.as_ref().map(client_tls).transpose()?;
        let grpc = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen_addr,
                source,
            })?;
        let grpc_addr = grpc.local_addr().map_err(|source| Error::Bind {
            addr: config.listen_addr,
            source,
        })?;
        let metrics_listener = itw_telemetry::http::bind(config.metrics_addr).await?;
        let metrics_addr =
            metrics_listener
                .local_addr()
                .map_err(|source| itw_telemetry::Error::Bind {
                    addr: config.metrics_addr,
                    source,
                })?;
        let metrics = Arc::new(RelayMetrics::default());
        let replicas = Replicas::new(
            config.scalers.clone(),
            config.resolve_interval,
            Arc::new(UpstreamContext {
                token: Arc::clone(&token),
                tls: client_tls,
                limits: config.limits,
                metrics: Arc::clone(&metrics),
            }),
        );
        Ok(Self {
            grpc,
            grpc_addr,
            metrics_listener,
            metrics_addr,
            tls,
            token,
            replicas,
            config,
            metrics,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The relay's figures (for tests and embedding).
    pub fn metrics(&self) -> Arc<RelayMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Serves until `shutdown` resolves, then ends every stream and returns.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let stop = CancellationToken::new();
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(IngestServer::<RelayService>::NAME, ServingStatus::Serving)
            .await;
        let descriptors: [&[u8]; 4] = [
            itw_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let reflection = || {
            descriptors
                .iter()
                .fold(tonic_reflection::server::Builder::configure(), |b, set| {
                    b.register_encoded_file_descriptor_set(set)
                })
                .include_reflection_service(false)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let limits = self.config.limits;
        let ingest = IngestServer::new(RelayService::new(
            Arc::clone(&self.replicas),
            limits,
            Arc::clone(&self.metrics),
        ))
        .max_decoding_message_size(limits.max_report_bytes);
        let ingest = InterceptedService::new(ingest, self.token.interceptor(&self.metrics));
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .initial_stream_window_size(AGENT_WINDOW)
            .initial_connection_window_size(connection_window(AGENT_WINDOW));
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls).map_err(Error::Tls)?;
        }
        let router = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(ingest);

        let resolver = tokio::spawn(Arc::clone(&self.replicas).run(stop.clone()));
        let token_watch = tokio::spawn(Arc::clone(&self.token).watch_file(stop.clone()));
        let probes = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(Probe {
                replicas: Arc::clone(&self.replicas),
                metrics: Arc::clone(&self.metrics),
            });
        let closed = |listener: &'static str| -> OnClose {
            let metrics = Arc::clone(&self.metrics);
            Arc::new(move |reason| metrics.connection_closed(listener, reason))
        };
        let http_stop = CancellationToken::new();
        let metrics_http = tokio::spawn(itw_telemetry::http::serve_guarded(
            self.metrics_listener,
            Guard::default(),
            closed("metrics"),
            itw_telemetry::http::metrics_router(self.metrics.clone()).merge(probes),
            http_stop.clone().cancelled_owned(),
        ));
        tracing::info!(
            grpc = %self.grpc_addr,
            metrics = %self.metrics_addr,
            agent_token = self.token.required(),
            scalers = ?self.config.scalers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "serving"
        );

        let incoming = itw_telemetry::grpc_listener::incoming(GuardedListener::new(
            self.grpc,
            Guard {
                max_connections: limits.grpc_max_connections,
                idle_timeout: limits.idle_timeout,
            },
            closed("grpc"),
        ));
        let grpc = router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        tokio::pin!(grpc);
        let result = tokio::select! {
            result = &mut grpc => result.map_err(Error::Grpc),
            () = shutdown => {
                tracing::info!("ending agent and Relay streams");
                health.set_service_status(IngestServer::<RelayService>::NAME, ServingStatus::NotServing).await;
                stop.cancel();
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut grpc).await {
                    Ok(result) => result.map_err(Error::Grpc),
                    Err(_) => {
                        tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
                        Ok(())
                    }
                }
            }
        };
        stop.cancel();
        // Both end on `stop`; their results carry nothing.
        let _ = resolver.await;
        let _ = token_watch.await;
        http_stop.cancel();
        let metrics_result = match metrics_http.await {
            Ok(result) => result.map_err(Error::from),
            Err(join) => {
                tracing::error!(error = %join, "metrics server task failed");
                Ok(())
            }
        };
        result.and(metrics_result)
    }
}

#[derive(Clone)]
struct Probe {
    replicas: Arc<Replicas>,
    metrics: Arc<RelayMetrics>,
}

/// Ready while a Relay stream to at least one replica is up: a relay with
/// none could only refuse the agents sent to it.
async fn readyz(State(probe): State<Probe>) -> (StatusCode, String) {
    let replicas = probe.replicas.addrs();
    if probe.metrics.any_relay_stream_up(&replicas) {
        (StatusCode::OK, "ok\n".into())
    } else if replicas.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no scaler replica resolved from SCALER_ADDR yet\n".into(),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no Relay stream up to any of {} resolved scaler replicas\n",
                replicas.len()
            ),
        )
    }
}

fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::TlsFile {
        setting,
        path: path.to_owned(),
        source,
    })
}

fn server_tls(files: &ServerTlsFiles) -> Result<ServerTlsConfig, Error> {
    let cert = read_pem("TLS_CERT_FILE", &files.cert)?;
    let key = read_pem("TLS_KEY_FILE", &files.key)?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read_pem("TLS_CLIENT_CA_FILE", ca)?));
    }
    Ok(config)
}

fn client_tls(files: &ClientTlsFiles) -> Result<ClientTlsConfig, Error> {
    let ca = read_pem("SCALER_CA_FILE", &files.ca)?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = &files.client {
        config = config.identity(Identity::from_pem(
            read_pem("SCALER_CERT_FILE", cert)?,
            read_pem("SCALER_KEY_FILE", key)?,
        ));
    }
    Ok(config)
}
