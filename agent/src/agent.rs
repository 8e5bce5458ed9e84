//! The agent as a whole: [`Agent::start`] brings every part up from a
//! checked [`Config`] and [`Agent::serve`] runs them until shutdown, then
//! stops them in order.
//!
//! Two runtimes. The fast path (`fast_path.rs`) runs on a thread of
//! its own; everything else (the service map source, the HTTP endpoint,
//! holding's parking tasks) runs on the runtime `start` is called on.
//! Capture is attached before anything else starts: a host where it cannot
//! be is a failed start, with nothing served.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::registry::Registry;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    Error,
    capture::KernelHold,
    coldstart::ColdStartMetrics,
    config::Config,
    counting_loop::{AgentClock, Health},
    fast_path::FastPath,
    hold::HoldMetrics,
    metrics::{AttemptCounters, CountingMetrics, Exporter},
    report::ReportMetrics,
    resolve::{MapEvent, MapSource, kube, static_map},
    sources::{KubeSources, NodeOnly, PodFeed, SourceBook, metrics::SourceMetrics},
};

/// A liveness probe fails when no collection happened for this many ticks.
const LIVENESS_TICKS: u32 = 10;

/// A started agent: capture attached, the service map source and the HTTP
/// endpoint running.
pub struct Agent {
    /// Cancelled to stop the fast path.
    stop: CancellationToken,
    fast_path_done: oneshot::Receiver<Result<(), Error>>,
    http: JoinHandle<Result<(), itw_telemetry::Error>>,
    http_stop: CancellationToken,
    /// The service map source; it ends once the fast path is gone.
    _source: JoinHandle<()>,
}

impl Agent {
    /// Starts the fast path (capture attached first), the service map
    /// source and the HTTP endpoint.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let stop = CancellationToken::new();
        let clock = AgentClock::new();

        let mut registry = Registry::default();
        let counting_metrics = Arc::new(CountingMetrics::default());
        counting_metrics.register(&mut registry);
        let cold_start = Arc::new(ColdStartMetrics::default());
        cold_start.register(&mut registry);
        let attempts = Arc::new(AttemptCounters::default());
        let health = Arc::new(Health::default());
        let mut reporting = None;
        let report = match config.report {
            Some(settings) => {
                let metrics = Arc::new(ReportMetrics::new(Arc::clone(&cold_start)));
                metrics.register(&mut registry);
                reporting = Some(ReportReadiness {
                    metrics: Arc::clone(&metrics),
                    not_ready_after: config.scaler_not_ready_after,
                });
                Some((settings, metrics))
            }
            None => {
                tracing::info!("SCALER_ADDR not set: /metrics only");
                None
            }
        };

        let hold = match &config.hold {
            Some(request) => request.settle(config.capture.mode)?,
            None => None,
        }
        .map(|settings| {
            let metrics = Arc::new(HoldMetrics::new(Arc::clone(&cold_start)));
            metrics.register(&mut registry);
            (settings, metrics, tokio::runtime::Handle::current())
        });
        let mut capture = config.capture;
        capture.hold = hold.as_ref().map(|(settings, _, _)| KernelHold {
            mark: settings.mark,
            park_ip4: settings.park_ip4,
            park_ip6: settings.park_ip6,
            max_per_service: settings.max_per_service,
            max_per_node: settings.max_per_node,
        });

        let kube_sources = match &config.service_map {
            MapSource::Kube(_) => {
                let metrics = Arc::new(SourceMetrics::default());
                metrics.register(&mut registry);
                let pods_dir = crate::sources::cgroups::pods_dir(
                    capture.cgroup_root.as_deref(),
                    &capture.pod_cgroup,
                )
                .unwrap_or_else(|reason| {
                    tracing::warn!(%reason, "no pods' cgroup to attribute connects with: every caller is the node");
                    None
                });
                match &pods_dir {
                    Some(dir) => {
                        tracing::info!(pods_cgroup = %dir.display(), exclude_sources = %config.sources.exclude, "attributing connects to pods")
                    }
                    None => tracing::warn!(
                        "no pods' cgroup (kubepods.slice or kubepods) under the cgroup root: every caller is the node"
                    ),
                }
                Some(Arc::new(KubeSources::new(
                    config.sources.clone(),
                    pods_dir,
                    metrics,
                )))
            }
            MapSource::File(_) => {
                if !config.sources.exclude.is_empty() {
                    tracing::warn!(
                        "EXCLUDE_SOURCES is ignored with SERVICE_MAP: a static map has no pods, every caller is the node"
                    );
                }
                None
            }
        };
        let sources: Arc<dyn SourceBook> = match &kube_sources {
            Some(book) => book.clone(),
            None => Arc::new(NodeOnly),
        };

        let (events_tx, events_rx) = mpsc::channel::<MapEvent>(1024);
        let (started_tx, started_rx) = oneshot::channel();
        let (done_tx, fast_path_done) = oneshot::channel();
        let fast = FastPath {
            capture,
            hold,
            exclude: config.exclude,
            max_comms: config.max_comms_per_destination,
            source_series: config.source_series,
            book: sources,
            interval: config.collect_interval,
            report,
            attempts: attempts.clone(),
            metrics: counting_metrics.clone(),
            health: health.clone(),
            clock,
            shutdown: stop.clone(),
        };
        std::thread::Builder::new()
            .name("itw-fast-path".to_owned())
            .spawn(move || {
                let _ = done_tx.send(fast.run(events_rx, started_tx));
            })
            .map_err(Error::FastPathThread)?;
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(Error::FastPathEnded),
        }

        let source = match config.service_map {
            MapSource::File(path) => {
                let failures = counting_metrics.service_map_reload_failures.clone();
                static_map::watch(path, events_tx, move || {
                    failures.inc();
                })
                .await?
            }
            MapSource::Kube(settings) => {
                let client = kube::connect().await?;
                let kube_metrics = Arc::new(kube::KubeSourceMetrics::default());
                kube_metrics.register(&mut registry);
                tracing::info!(
                    namespaces = %settings.namespaces_label(),
                    selector = %settings.selector_label(),
                    "watching Services and EndpointSlices"
                );
                let pods = kube_sources.map(|book| PodFeed::new(&config.node_name, book));
                tokio::spawn(kube::run(client, settings, events_tx, kube_metrics, pods))
            }
        };

        let exporter = Arc::new(Exporter::new(registry, attempts));
        let liveness = config.collect_interval * LIVENESS_TICKS;
        let router = itw_telemetry::http::metrics_router(exporter).merge(
            Router::new()
                .route("/healthz", get(healthz))
                .route("/readyz", get(readyz))
                .with_state(ProbeState {
                    health,
                    clock,
                    liveness,
                    reporting,
                }),
        );
        let listener = itw_telemetry::http::bind(config.metrics_addr).await?;
        tracing::info!(addr = %config.metrics_addr, "serving /metrics, /healthz and /readyz");
        let http_stop = CancellationToken::new();
        let http = tokio::spawn(itw_telemetry::http::serve(
            listener,
            router,
            http_stop.clone().cancelled_owned(),
        ));

        Ok(Self {
            stop,
            fast_path_done,
            http,
            http_stop,
            _source: source,
        })
    }

    /// Runs until `shutdown` resolves or the fast path fails, then stops:
    /// the fast path's last collection, streams flushed and programs
    /// detached first, the HTTP endpoint last.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Self {
            stop,
            mut fast_path_done,
            http,
            http_stop,
            _source,
        } = self;
        // A failure of the fast path's own ends the agent too.
        let finished = tokio::select! {
            done = &mut fast_path_done => Some(done),
            () = shutdown => None,
        };
        stop.cancel();
        let finished = match finished {
            Some(done) => done,
            // Bounded by the fast path's own flush timeout.
            None => fast_path_done.await,
        };
        let counted = finished.unwrap_or(Err(Error::FastPathPanicked));
        http_stop.cancel();
        match http.await {
            Ok(result) => result?,
            Err(error) => tracing::warn!(%error, "metrics server task failed"),
        }
        counted
    }
}

/// What the probes read.
#[derive(Clone)]
struct ProbeState {
    health: Arc<Health>,
    clock: AgentClock,
    /// A liveness probe fails after this long without a collection.
    liveness: Duration,
    /// With SCALER_ADDR set: whether any scaler stream is up.
    reporting: Option<ReportReadiness>,
}

/// Readiness from the scaler streams (`SCALER_NOT_READY_AFTER`).
#[derive(Clone)]
struct ReportReadiness {
    metrics: Arc<ReportMetrics>,
    not_ready_after: Duration,
}

async fn healthz(State(probe): State<ProbeState>) -> (StatusCode, &'static str) {
    if probe.health.alive(&probe.clock, probe.liveness) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no collection for too long\n",
        )
    }
}

async fn readyz(State(probe): State<ProbeState>) -> (StatusCode, String) {
    match unready(&probe) {
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        None => (StatusCode::OK, "ready\n".to_owned()),
    }
}

/// Why `/readyz` answers 503, if it does: no service map yet, holding
/// that cannot be trusted, or no scaler stream up for SCALER_NOT_READY_AFTER.
fn unready(probe: &ProbeState) -> Option<String> {
    if !probe.health.ready() {
        return Some("waiting for the service map".to_owned());
    }
    if let Some(reason) = probe.health.holding_blocked() {
        return Some(format!("cannot hold: {reason}"));
    }
    let reporting = probe.reporting.as_ref()?;
    reporting
        .metrics
        .health()
        .unready(reporting.not_ready_after)
}
