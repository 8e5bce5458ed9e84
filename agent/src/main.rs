//! `itw-agent`: wiring only. See the library's modules for what each piece does.
//!
//! Two runtimes. The fast path (the kernel's wakes, the counting loop, the
//! streams to the scaler and their gRPC connections) runs on one thread of
//! its own with a single-threaded runtime: a wake reaches the scaler without
//! a single cross-thread hand-off, and no Kubernetes relist or /metrics
//! scrape can stand in its way. Everything else (the service map source, the
//! HTTP endpoint, signals) runs on the main runtime.

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use clap::Parser;
use itw_agent::{
    capture::{self, CaptureSettings, KernelHold},
    config::{Args, Config},
    counting_loop::{AgentClock, CollectionSink, CountingLoop, Health},
    deltas::Collector,
    destinations::DestinationTable,
    hold::{HoldMetrics, HoldSettings, Holder},
    metrics::{AttemptCounters, CountingMetrics, Exporter},
    report::{ReportMetrics, ReportSettings, Reporter},
    resolve::{MapEvent, MapSource, kube, static_map},
};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A liveness probe fails when no collection happened for this many ticks.
const LIVENESS_TICKS: u32 = 10;

fn main() -> ExitCode {
    limit_malloc_arenas();
    raise_open_files_limit();
    let args = Args::parse();
    if let Err(error) = itw_telemetry::logging::init(args.log_format) {
        eprintln!("itw-agent: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("itw-agent")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let clock = AgentClock::new();
    let config: Config = args.config()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %config.node_name,
        "itw-agent starting"
    );

    let mut registry = Registry::default();
    let counting_metrics = Arc::new(CountingMetrics::default());
    counting_metrics.register(&mut registry);
    let attempts = Arc::new(AttemptCounters::default());
    let health = Arc::new(Health::default());
    let report = match config.report {
        Some(settings) => {
            let metrics = Arc::new(ReportMetrics::default());
            metrics.register(&mut registry);
            Some((settings, metrics))
        }
        None => {
            tracing::info!("SCALER_ADDR not set: /metrics only");
            None
        }
    };

    let hold = config
        .hold
        .as_ref()
        .and_then(|request| request.settle(config.capture.mode))
        .map(|settings| {
            let metrics = Arc::new(HoldMetrics::default());
            metrics.register(&mut registry);
            (settings, metrics, tokio::runtime::Handle::current())
        });
    let mut capture = config.capture;
    capture.hold = hold.as_ref().map(|(settings, _, _)| KernelHold {
        mark: settings.mark,
        park_ip4: settings.park_ip4,
        park_ip6: settings.park_ip6,
    });

    let (events_tx, events_rx) = mpsc::channel::<MapEvent>(1024);
    let (started_tx, started_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let fast = FastPath {
        capture,
        hold,
        exclude: config.exclude,
        max_comms: config.max_comms_per_destination,
        interval: config.collect_interval,
        report,
        attempts: attempts.clone(),
        metrics: counting_metrics.clone(),
        health: health.clone(),
        clock,
        shutdown: shutdown.clone(),
    };
    std::thread::Builder::new()
        .name("itw-fast-path".to_owned())
        .spawn(move || {
            let _ = done_tx.send(fast.run(events_rx, started_tx));
        })
        .context("starting the fast-path thread")?;
    // Capture must be attached before anything else starts: a host where it
    // cannot be is a failed start.
    match started_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(error),
        Err(_) => anyhow::bail!("the fast-path thread ended before capture started"),
    }

    let _source = match config.service_map {
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
            tokio::spawn(kube::run(client, settings, events_tx, kube_metrics))
        }
    };

    let exporter = Arc::new(Exporter::new(registry, attempts));
    let liveness = config.collect_interval * LIVENESS_TICKS;
    let router = itw_telemetry::http::metrics_router(exporter).merge(
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state((health, clock, liveness)),
    );
    let listener = itw_telemetry::http::bind(config.metrics_addr).await?;
    tracing::info!(addr = %config.metrics_addr, "serving /metrics, /healthz and /readyz");
    let http_stop = CancellationToken::new();
    let http_done = http_stop.clone();
    let http = tokio::spawn(itw_telemetry::http::serve(listener, router, async move {
        http_done.cancelled().await;
    }));

    // The fast path ends after shutdown: last collection, streams flushed,
    // every program detached. A failure of its own ends the agent too.
    let mut done_rx = done_rx;
    let finished = tokio::select! {
        done = &mut done_rx => Some(done),
        () = shutdown.cancelled() => None,
    };
    shutdown.cancel();
    let finished = match finished {
        Some(done) => done,
        // Bounded by the fast path's own flush timeout.
        None => done_rx.await,
    };
    let counted =
        finished.unwrap_or_else(|_| Err(anyhow::anyhow!("the fast-path thread panicked")));
    http_stop.cancel();
    match http.await {
        Ok(result) => result?,
        Err(error) => tracing::warn!(%error, "metrics server task failed"),
    }
    counted?;
    tracing::info!("itw-agent stopped");
    Ok(())
}

/// What runs on the fast-path thread.
struct FastPath {
    capture: CaptureSettings,
    /// Holding, when asked for: its parking tasks run on the main runtime,
    /// off the fast path.
    hold: Option<(HoldSettings, Arc<HoldMetrics>, tokio::runtime::Handle)>,
    exclude: capture::ExcludeComms,
    max_comms: usize,
    interval: Duration,
    report: Option<(ReportSettings, Arc<ReportMetrics>)>,
    attempts: Arc<AttemptCounters>,
    metrics: Arc<CountingMetrics>,
    health: Arc<Health>,
    clock: AgentClock,
    shutdown: CancellationToken,
}

impl FastPath {
    /// Runs until shutdown; `started` says whether capture came up.
    fn run(
        self,
        events: mpsc::Receiver<MapEvent>,
        started: oneshot::Sender<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the fast-path runtime")?;
        runtime.block_on(self.serve(events, started))
    }

    async fn serve(
        self,
        events: mpsc::Receiver<MapEvent>,
        started: oneshot::Sender<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let (kernel, holding) = match self.start_capture() {
            Ok(started_capture) => {
                let _ = started.send(Ok(()));
                started_capture
            }
            Err(error) => {
                let _ = started.send(Err(error));
                return Ok(());
            }
        };

        let report_stop = CancellationToken::new();
        let (sink, reporter_task) = match self.report {
            Some((settings, metrics)) => {
                tracing::info!(
                    scalers = ?settings.scalers.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "reporting to the scaler"
                );
                let reporter = Arc::new(Reporter::new(settings, metrics, self.clock));
                let task = reporter.spawn(report_stop.clone());
                (Some(reporter as Arc<dyn CollectionSink>), Some(task))
            }
            None => (None, None),
        };

        let holder = match (self.hold, holding) {
            (Some((settings, metrics, runtime)), true) => {
                tracing::info!(
                    policy = ?settings.policy,
                    park_ip4 = ?settings.park_ip4,
                    park_ip6 = ?settings.park_ip6,
                    timeout = ?settings.default_timeout,
                    "holding connects to Services without a ready endpoint"
                );
                Some(Holder::new(settings, runtime, metrics))
            }
            (Some(_), false) => {
                tracing::warn!(
                    "HOLD is on but the capture mode is not cgroup: connects are never held"
                );
                None
            }
            (None, _) => None,
        };
        let counting = CountingLoop {
            kernel,
            holder,
            table: DestinationTable::new(),
            collector: Collector::new(self.max_comms),
            attempts: self.attempts,
            metrics: self.metrics,
            health: self.health,
            clock: self.clock,
            reporter: sink,
        };
        let shutdown = self.shutdown.clone();
        let counted = counting
            .run(events, self.interval, async move {
                shutdown.cancelled().await;
            })
            .await;
        // The kernel side was dropped with the loop: every program is detached.
        tracing::info!("capture detached");
        report_stop.cancel();
        if let Some(task) = reporter_task {
            let _ = task.await;
        }
        counted.context("counting")
    }

    fn start_capture(&self) -> anyhow::Result<(Box<dyn capture::Kernel>, bool)> {
        let started = capture::start(&self.capture).context("starting capture")?;
        if let capture::CommSource::Thread { reason } = &started.comm_source {
            tracing::warn!(%reason, "process_comm is the calling thread's name, not the process's");
        }
        self.metrics.capture_started(
            started.mode,
            started.comm_source.as_str(),
            &started.objects.programs,
        );
        self.metrics.attach_order(&started.attach_order);
        let mut kernel = started.kernel;
        kernel
            .set_excluded(&self.exclude.comms())
            .context("setting EXCLUDE_COMMS in the kernel")?;
        if !self.exclude.0.is_empty() {
            tracing::info!(exclude = ?self.exclude.0, "filtered process names");
        }
        Ok((kernel, started.holding))
    }
}

type ProbeState = (Arc<Health>, AgentClock, Duration);

async fn healthz(State((health, clock, grace)): State<ProbeState>) -> (StatusCode, &'static str) {
    if health.alive(&clock, grace) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no collection for too long\n",
        )
    }
}

async fn readyz(State((health, _, _)): State<ProbeState>) -> (StatusCode, &'static str) {
    if health.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the service map\n",
        )
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the agent with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

/// glibc gives each thread that allocates an arena of its own, and memory a
/// relist decode freed on one thread is not reused by another: one arena
/// takes the agent from 52 to 38 MiB RSS with 110k destinations mapped. The
/// agent allocates little after start, so contention does not matter.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: called first in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Each held connection takes two descriptors (client and upstream) for its
/// lifetime: take the hard limit the runtime grants rather than the usual
/// soft 1024.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
