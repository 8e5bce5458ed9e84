//! The fast path: capture, the counting loop and the streams to the scaler,
//! on one thread of its own with a single-threaded runtime.
//!
//! A wake reaches the scaler without a single cross-thread hand-off, and no
//! Kubernetes relist or /metrics scrape can stand in its way. Nothing else
//! may run on this thread; holding's parking tasks run on the main runtime.
//! It ends after shutdown with a last collection, the streams flushed and
//! every program detached.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    Error,
    attribution::{Attribution, SeriesSettings},
    capture::{self, CaptureSettings, ExcludeComms, order::OrderWatch},
    counting_loop::{AgentClock, CollectionSink, CountingLoop, Health},
    deltas::Collector,
    destinations::DestinationTable,
    hold::{HoldMetrics, HoldSettings, Holder},
    metrics::{AttemptCounters, CountingMetrics},
    report::{ReportMetrics, ReportSettings, Reporter},
    resolve::MapEvent,
    sources::SourceBook,
};

/// What runs on the fast-path thread.
pub struct FastPath {
    pub capture: CaptureSettings,
    /// Holding, when asked for: its parking tasks run on the main runtime,
    /// off the fast path.
    pub hold: Option<(HoldSettings, Arc<HoldMetrics>, tokio::runtime::Handle)>,
    pub exclude: ExcludeComms,
    pub max_comms: usize,
    /// `SOURCE_SERIES` and `MAX_SOURCE_SERIES`.
    pub source_series: SeriesSettings,
    /// Who each caller is; [`crate::sources::NodeOnly`] without a Pod watch.
    pub book: Arc<dyn SourceBook>,
    pub interval: Duration,
    pub report: Option<(ReportSettings, Arc<ReportMetrics>)>,
    pub attempts: Arc<AttemptCounters>,
    pub metrics: Arc<CountingMetrics>,
    pub health: Arc<Health>,
    pub clock: AgentClock,
    pub shutdown: CancellationToken,
}

impl FastPath {
    /// Runs until shutdown; `started` says whether capture came up.
    pub fn run(
        self,
        events: mpsc::Receiver<MapEvent>,
        started: oneshot::Sender<Result<(), Error>>,
    ) -> Result<(), Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::FastPathRuntime)?;
        runtime.block_on(self.serve(events, started))
    }

    async fn serve(
        mut self,
        events: mpsc::Receiver<MapEvent>,
        started: oneshot::Sender<Result<(), Error>>,
    ) -> Result<(), Error> {
        let hold = self.hold.take();
        let started_capture = self.start_capture().and_then(|(kernel, holding, order)| {
            let holder = holder(hold, holding, kernel.as_ref())?;
            Ok((kernel, holding, order, holder))
        });
        let (kernel, holding, order, holder) = match started_capture {
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

        tokio::spawn(watch_order(
            order,
            self.metrics.clone(),
            self.health.clone(),
            holding,
            self.shutdown.clone(),
        ));
        let counting = CountingLoop {
            kernel,
            holder,
            declarations: crate::edges::declared::Declarations::default(),
            table: DestinationTable::new(),
            collector: Collector::with_sources(
                self.max_comms,
                Attribution::new(self.book.clone(), self.source_series),
            ),
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
        counted.map_err(Error::Counting)
    }

    fn start_capture(&self) -> Result<(Box<dyn capture::Kernel>, bool, OrderWatch), Error> {
        let started = capture::start(&self.capture).map_err(Error::Capture)?;
        if let capture::CommSource::Thread { reason } = &started.comm_source {
            tracing::warn!(%reason, "process_comm is the calling thread's name, not the process's");
        }
        self.metrics.capture_started(
            started.mode,
            started.comm_source.as_str(),
            &started.objects.programs,
        );
        if let Some(reason) = self
            .metrics
            .attach_order(&started.attach_order, started.holding)
        {
            tracing::error!(%reason, "connects to held Services may be refused before our programs see them; /readyz says so");
            self.health.set_holding_blocked(Some(reason));
        }
        let mut kernel = started.kernel;
        kernel
            .set_excluded(&self.exclude.comms())
            .map_err(Error::Exclude)?;
        if !self.exclude.0.is_empty() {
            tracing::info!(exclude = ?self.exclude.0, "filtered process names");
        }
        Ok((kernel, started.holding, started.order_watch))
    }
}

/// The holder, when holding is asked for and the programs hold.
fn holder(
    hold: Option<(HoldSettings, Arc<HoldMetrics>, tokio::runtime::Handle)>,
    holding: bool,
    kernel: &dyn capture::Kernel,
) -> Result<Option<Holder>, Error> {
    let Some((settings, metrics, runtime)) = hold else {
        return Ok(None);
    };
    let redirects = match (holding, kernel.redirects()) {
        (true, Some(redirects)) => redirects,
        _ => {
            tracing::warn!(
                "HOLD is on but the capture mode is not cgroup: connects are never held"
            );
            return Ok(None);
        }
    };
    tracing::info!(
        policy = ?settings.policy,
        park_ip4 = ?settings.park_ip4,
        park_ip6 = ?settings.park_ip6,
        timeout = ?settings.default_timeout,
        max_per_service = settings.max_per_service,
        max_per_node = settings.max_per_node,
        max_buffered_bytes = settings.max_buffered_bytes,
        netns_dir = %settings.netns_dir.display(),
        "holding connects to Services without a ready endpoint"
    );
    Holder::new(settings, runtime, metrics, redirects)
        .map(Some)
        .map_err(Error::HoldDialer)
}

/// How often the cgroup hooks' order is looked at again: a CNI's agent
/// may attach (or re-attach) its programs after ours.
const ORDER_RECHECK: Duration = Duration::from_secs(10);

/// Looks at where our programs run every [`ORDER_RECHECK`], keeping the
/// metrics and `/readyz` true and logging each change of verdict.
async fn watch_order(
    order: OrderWatch,
    metrics: Arc<CountingMetrics>,
    health: Arc<Health>,
    holding: bool,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(ORDER_RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = metrics.attach_order(&order.check(), holding);
        if now != health.holding_blocked() {
            match &now {
                Some(reason) => {
                    tracing::error!(%reason, "another program now runs before ours: connects to held Services may be refused; /readyz says so")
                }
                None => tracing::info!("our programs run first again: held connects reach them"),
            }
            health.set_holding_blocked(now);
        }
    }
}
