//! The scaler as a whole: one gRPC port (KEDA's service, the agents' ingest
//! stream behind the token check, the read-only dependency graph, health,
//! reflection v1 and v1alpha, optional TLS or mutual TLS) and the `/metrics`
//! port, started and stopped together.
//!
//! Stopping: the shutdown future resolving ends every KEDA stream and every
//! ingest stream with status OK, then the server drains its connections (at
//! most [`SHUTDOWN_GRACE`]) and [`Scaler::serve`] returns.

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use itw_proto::{
    externalscaler::external_scaler_server::ExternalScalerServer,
    itw::v1::{graph_server::GraphServer, ingest_server::IngestServer},
    window::connection_window,
};
use itw_telemetry::listener::{Guard, GuardedListener, OnClose};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    server::NamedService,
    service::interceptor::InterceptedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;

use crate::{
    Error,
    auth::AgentToken,
    call_timing::TimedGetMetrics,
    config::{Config, TlsFiles},
    export::Exporter,
    graph::service::GraphService,
    ingest::IngestService,
    ingest_runtime::IngestRuntime,
    keda::KedaService,
    metrics::ScalerMetrics,
    relay::IngestRoutes,
    store::Store,
    window::Clock,
};

/// How often idle windows and departed instances are cleaned up.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait for connections to close once every stream has ended.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// HTTP/2 pings find agents and KEDA instances that vanished without a FIN.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A scaler with its ports bound, ready to serve.
pub struct Scaler {
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
    tls: Option<ServerTlsConfig>,
    token: Arc<AgentToken>,
    store: Arc<Store>,
    metrics: Arc<ScalerMetrics>,
    ingest_runtime: IngestRuntime,
}

impl Scaler {
    /// Reads the token and TLS files and binds both ports; every problem
    /// with the settings shows up here, before anything is served.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let token = Arc::new(AgentToken::load(&config.agent_token)?);
        let tls = config.tls.as_ref().map(tls_config).transpose()?;
        if let Some(tls) = &tls {
            // Building the rustls config parses certificate and key: do it
            // now so a bad file fails the start, not the first connection.
            Server::builder()
                .tls_config(tls.clone())
                .map_err(Error::Tls)?;
        }
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.grpc_addr,
                source,
            })?;
        let grpc_addr = grpc.local_addr().map_err(|source| Error::Bind {
            addr: config.grpc_addr,
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
        let ingest_runtime =
            IngestRuntime::start(config.ingest_threads).map_err(|source| Error::IngestThreads {
                threads: config.ingest_threads,
                source,
            })?;
        let metrics = Arc::new(ScalerMetrics::default());
        let store = Arc::new(Store::new(
            Clock::system(),
            config.limits,
            Arc::clone(&metrics),
        ));
        Ok(Self {
            grpc,
            grpc_addr,
            metrics_listener,
            metrics_addr,
            tls,
            token,
            store,
            metrics,
            ingest_runtime,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The scaler's state (for tests and embedding).
    pub fn store(&self) -> Arc<Store> {
        Arc::clone(&self.store)
    }

    /// Serves until `shutdown` resolves, then ends every stream with OK and returns.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let stop = CancellationToken::new();
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<ExternalScalerServer<KedaService>>()
            .await;
        health
            .set_service_status(IngestServer::<IngestService>::NAME, ServingStatus::Serving)
            .await;
        health.set_serving::<GraphServer<GraphService>>().await;

        let descriptors: [&[u8]; 4] = [
            itw_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        // Each reflection version lists every service, the other version included.
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

        let keda = TimedGetMetrics::new(
            ExternalScalerServer::new(KedaService::new(
                Arc::clone(&self.store),
                Arc::clone(&self.metrics),
                stop.clone(),
            )),
            Arc::clone(&self.metrics),
        );
        let ingest = IngestRoutes::new(
            IngestService::new(
                Arc::clone(&self.store),
                Arc::clone(&self.metrics),
                stop.clone(),
                self.ingest_runtime.handle(),
            ),
            self.store.limits().max_report_bytes,
        );
        let ingest = InterceptedService::new(ingest, self.token.interceptor(&self.metrics));

        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(self.store.limits().max_streams_per_connection))
            // hyper's default is 1 MiB each: 5 GiB that 5,000 agent
            // connections could queue in a replica that falls behind.
            .initial_stream_window_size(self.store.limits().grpc_window)
            .initial_connection_window_size(connection_window(self.store.limits().grpc_window));
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls).map_err(Error::Tls)?;
        }
        let router = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(keda)
            .add_service(GraphServer::new(GraphService::new(Arc::clone(&self.store))))
            .add_service(ingest);
        let limits = *self.store.limits();
        let closed = |listener: &'static str| -> OnClose {
            let metrics = Arc::clone(&self.metrics);
            Arc::new(move |reason| metrics.connection_closed(listener, reason))
        };
        let incoming = itw_telemetry::grpc_listener::incoming(GuardedListener::new(
            self.grpc,
            Guard {
                max_connections: limits.grpc_max_connections,
                idle_timeout: limits.idle_timeout,
            },
            closed("grpc"),
        ));

        let sweeper = tokio::spawn(sweep(Arc::clone(&self.store), stop.clone()));
        let token_watch = tokio::spawn(Arc::clone(&self.token).watch_file(stop.clone()));
        let exporter = Arc::new(Exporter {
            metrics: Arc::clone(&self.metrics),
            store: Arc::clone(&self.store),
        });
        let metrics_http = tokio::spawn(itw_telemetry::http::serve_guarded(
            self.metrics_listener,
            Guard::default(),
            closed("metrics"),
            itw_telemetry::http::metrics_router(exporter),
            stop.clone().cancelled_owned(),
        ));
        tracing::info!(
            grpc = %self.grpc_addr,
            metrics = %self.metrics_addr,
            agent_token = self.token.required(),
            "serving"
        );

        let grpc = router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        tokio::pin!(grpc);
        let result = tokio::select! {
            result = &mut grpc => result.map_err(Error::Grpc),
            () = shutdown => {
                tracing::info!("ending KEDA and agent streams");
                health.set_not_serving::<ExternalScalerServer<KedaService>>().await;
                health.set_service_status(IngestServer::<IngestService>::NAME, ServingStatus::NotServing).await;
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
        let metrics_result = match metrics_http.await {
            Ok(result) => result.map_err(Error::from),
            Err(join) => {
                tracing::error!(error = %join, "metrics server task failed");
                Ok(())
            }
        };
        // Both end on `stop`; their results carry nothing.
        let _ = sweeper.await;
        let _ = token_watch.await;
        result.and(metrics_result)
    }
}

async fn sweep(store: Arc<Store>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                // A sweep walks every Service and instance: 1-5 ms at 10,000
                // Services, up to 25 ms on a busy machine. On a serving thread
                // it held back the KEDA calls queued behind it; on a thread of
                // the blocking pool the kernel preempts it instead.
                let store = Arc::clone(&store);
                if let Err(error) = tokio::task::spawn_blocking(move || store.sweep()).await {
                    tracing::error!(%error, "sweep failed");
                }
            }
        }
    }
}

fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::TlsFile {
        setting,
        path: path.to_owned(),
        source,
    })
}

fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, Error> {
    let cert = read_pem("TLS_CERT_FILE", &files.cert)?;
    let key = read_pem("TLS_KEY_FILE", &files.key)?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read_pem("TLS_CLIENT_CA_FILE", ca)?));
    }
    Ok(config)
}
