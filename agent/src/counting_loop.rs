//! The counting loop: the one task that owns the kernel side, the destination
//! table and the collector.
//!
//! It collects on every tick, at once on a kernel wake (a destination going
//! idle -> active: the scale-from-zero fast path), and applies service map
//! events as they come. Each collection updates `/metrics` and, when a scaler
//! is configured, goes to the reporter. It must never wait on the reporter:
//! the hand-off ([`CollectionSink::record`]) is synchronous and cheap, and the
//! reporter bounds its own buffer.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::mpsc,
    time::{Instant, MissedTickBehavior},
};

use itw_telemetry::timeline::{TARGET as TIMELINE, monotonic_us};

use crate::{
    capture::{CaptureError, Kernel, Wake},
    coldstart::Woken,
    deltas::{Collection, Collector, SeriesKey},
    destinations::{Applied, DestinationTable},
    edges::{EdgeKey, declared::Declarations},
    hold::Holder,
    metrics::{AttemptCounters, CommLabels, CountingMetrics, TriggerLabels},
    resolve::{MapEvent, ServiceRef},
};

/// One collection, as the reporter needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collected {
    /// Agent clock (see [`AgentClock`]); never decreases.
    pub collected_at_unix_ms: i64,
    /// The wake that triggered this collection; `None` for ticks.
    pub woken: Option<Woken>,
    /// New attempts per series (all > 0; may be empty).
    pub deltas: Vec<(SeriesKey, u64)>,
    /// Calls seen among those attempts (`Collection::edges`).
    pub edges: Vec<EdgeKey>,
}

/// Where collections go when a scaler is configured.
pub trait CollectionSink: Send + Sync + 'static {
    /// Takes one collection; must not block.
    fn record(&self, collected: Collected);

    /// Takes the edges the Services' wakes annotations declare now (the
    /// whole set, after each change of the map); must not block. A sink
    /// that reports no edges upstream has nothing to do with them.
    fn declare(&self, _edges: Vec<EdgeKey>) {}
}

/// Wall-clock milliseconds that never go backwards: the wall clock at start
/// plus monotonic time since, so a clock step on the node cannot reorder
/// collections.
#[derive(Clone, Copy, Debug)]
pub struct AgentClock {
    start_wall_ms: i64,
    start: Instant,
}

impl AgentClock {
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self {
            start_wall_ms: wall,
            start: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.start_wall_ms.saturating_add(elapsed)
    }
}

impl Default for AgentClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Liveness and readiness of the counting loop, for `/healthz` and `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    map_applied: AtomicBool,
    last_collection_ms: AtomicI64,
    /// Why connects to held Services may be refused before our programs
    /// see them (holding on, another program first); `None`: they are not.
    holding_blocked: parking_lot::Mutex<Option<String>>,
}

impl Health {
    /// Ready once the first service map is applied: before that, nothing is counted.
    pub fn ready(&self) -> bool {
        self.map_applied.load(Ordering::Acquire)
    }

    /// Why holding cannot be trusted now, if it cannot: the agent is then
    /// not ready, so a rollout stops and the cause is seen.
    pub fn holding_blocked(&self) -> Option<String> {
        self.holding_blocked.lock().clone()
    }

    pub fn set_holding_blocked(&self, reason: Option<String>) {
        *self.holding_blocked.lock() = reason;
    }

    /// Alive while collections keep happening (within `grace` of the clock).
    pub fn alive(&self, clock: &AgentClock, grace: Duration) -> bool {
        let last = self.last_collection_ms.load(Ordering::Acquire);
        let grace = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        last == 0 || clock.now_ms().saturating_sub(last) <= grace
    }
}

pub struct CountingLoop {
    pub kernel: Box<dyn Kernel>,
    pub table: DestinationTable,
    pub collector: Collector,
    pub attempts: Arc<AttemptCounters>,
    pub metrics: Arc<CountingMetrics>,
    pub health: Arc<Health>,
    pub clock: AgentClock,
    /// Where collections go when a scaler is configured.
    pub reporter: Option<Arc<dyn CollectionSink>>,
    /// Holding connects to Services without a ready endpoint, when on.
    pub holder: Option<Holder>,
    /// The edges the wakes annotations declare, told to the reporter.
    pub declarations: Declarations,
}

impl CountingLoop {
    /// Runs until `shutdown` resolves, then collects one last time so nothing
    /// counted is left unreported.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<MapEvent>,
        interval: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CaptureError> {
        let mut wakes = self.kernel.take_wakes().ok_or_else(|| {
            CaptureError::Other("the kernel's wake channel was already taken".into())
        })?;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut events_open = true;
        let mut woken = Vec::new();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(wake) = wakes.recv() => {
                    let woken_at = Instant::now();
                    woken.clear();
                    woken.push(wake);
                    while let Ok(wake) = wakes.try_recv() {
                        woken.push(wake);
                    }
                    self.metrics.wakes.inc_by(woken.len() as u64);
                    tracing::trace!(
                        target: TIMELINE,
                        t_us = monotonic_us(),
                        wakes = woken.len(),
                        "wakes taken by the counting loop"
                    );
                    self.collect_woken(&woken, woken_at)?;
                }
                event = events.recv(), if events_open => match event {
                    Some(event) => {
                        self.apply(event);
                        // A relist or a burst of changes arrives as many
                        // events: apply them all before the next collection.
                        while let Ok(event) = events.try_recv() {
                            self.apply(event);
                        }
                    }
                    None => {
                        // The source ended (it only does on shutdown); keep
                        // counting with the last map.
                        events_open = false;
                    }
                },
                _ = tick.tick() => self.collect("tick")?,
            }
        }
        self.collect("shutdown")?;
        Ok(())
    }

    /// Applies a map event to the table, the kernel and the zero series.
    pub fn apply(&mut self, event: MapEvent) {
        if let Some(holder) = &mut self.holder {
            holder.apply(self.kernel.as_mut(), &event);
        }
        if self.declarations.apply(&event)
            && let Some(reporter) = &self.reporter
        {
            reporter.declare(self.declarations.edges());
        }
        let applied = self.table.apply(self.kernel.as_mut(), event);
        self.after_apply(applied);
        self.health.map_applied.store(true, Ordering::Release);
    }

    fn after_apply(&mut self, applied: Applied) {
        for service in &applied.services_added {
            self.attempts.service_seen(service);
        }
        for service in &applied.services_removed {
            self.attempts.service_gone(service);
            let gone = self.collector.forget_service(service);
            self.metrics.sources.forget(&gone);
        }
        if applied.failed > 0 {
            self.metrics
                .map_apply_failures
                .inc_by(applied.failed as u64);
            if let Some(error) = &applied.first_error {
                tracing::error!(failed = applied.failed, %error, "destinations not watched");
            }
        }
        self.metrics
            .watched_destinations
            .set(i64::try_from(self.table.watched()).unwrap_or(i64::MAX));
        self.metrics
            .services
            .set(i64::try_from(self.table.services().len()).unwrap_or(i64::MAX));
        tracing::debug!(
            watched = applied.watched,
            unwatched = applied.unwatched,
            services_added = applied.services_added.len(),
            services_removed = applied.services_removed.len(),
            "service map applied"
        );
    }

    /// One full collection: every kernel counter -> deltas -> metrics and
    /// reporter.
    pub fn collect(&mut self, trigger: &'static str) -> Result<(), CaptureError> {
        if let Some(holder) = &mut self.holder {
            holder.reap(self.kernel.as_mut());
        }
        let collection = self
            .collector
            .collect(self.kernel.as_mut(), &mut self.table)?;
        self.health
            .last_collection_ms
            .store(self.clock.now_ms(), Ordering::Release);
        self.metrics
            .collections
            .get_or_create(&TriggerLabels { trigger })
            .inc();
        match self.kernel.stats() {
            Ok(stats) => self.metrics.kernel_stats(stats),
            Err(error) => tracing::warn!(%error, "kernel stats not read"),
        }
        self.publish(collection, None);
        Ok(())
    }

    /// The fast path: only the counters the wakes name, reported at once.
    pub fn collect_woken(&mut self, wakes: &[Wake], woken_at: Instant) -> Result<(), CaptureError> {
        let collection =
            self.collector
                .collect_woken(self.kernel.as_mut(), &mut self.table, wakes)?;
        self.metrics
            .collections
            .get_or_create(&TriggerLabels { trigger: "wake" })
            .inc();
        let read_at_us = wakes.iter().map(|w| w.read_at_us).min().unwrap_or(0);
        self.publish(collection, Some((woken_at, read_at_us)));
        Ok(())
    }

    /// `woken`: when the counting loop took the wakes behind the
    /// collection, and when the first was read from the ring.
    fn publish(&mut self, collection: Collection, woken: Option<(Instant, u64)>) {
        self.metrics.capped.inc_by(collection.capped);
        self.metrics.unattributed.inc_by(collection.unattributed);
        for (comm, n) in &collection.filtered {
            tracing::debug!(process_comm = %comm, attempts = n, "filtered attempts (EXCLUDE_COMMS)");
            self.metrics
                .filtered
                .get_or_create(&CommLabels {
                    process_comm: comm.to_string(),
                })
                .inc_by(*n);
        }
        if !collection.deltas.is_empty() {
            self.attempts.add(&collection.deltas);
            if let Some(reporter) = &self.reporter {
                let woken = woken.map(|(at, read_at_us)| Woken {
                    at,
                    read_at_us,
                    services: woken_services(&collection.deltas),
                });
                reporter.record(Collected {
                    collected_at_unix_ms: self.clock.now_ms(),
                    woken,
                    deltas: collection.deltas,
                    edges: collection.edges,
                });
            }
        }
        // After the hand-off: a wake's way to the scaler does not wait on
        // the source series (label strings, the family's lock).
        for (source, n) in &collection.filtered_sources {
            tracing::debug!(
                source_namespace = %source.namespace,
                source_workload = %source.workload,
                attempts = n,
                "filtered attempts (excluded source)"
            );
        }
        self.metrics.sources.add(
            &collection.sources,
            &collection.filtered_sources,
            collection.sources_capped,
        );
    }
}

/// The Services of a wake collection's deltas, each once.
fn woken_services(deltas: &[(SeriesKey, u64)]) -> std::sync::Arc<[ServiceRef]> {
    let mut services: Vec<ServiceRef> = deltas.iter().map(|(k, _)| k.service.clone()).collect();
    services.sort();
    services.dedup();
    services.into()
}

#[cfg(test)]
mod tests {
    use itw_telemetry::exposition::AttemptLabels;

    use super::*;
    use crate::{
        capture::fake::FakeKernel,
        deltas::Collector,
        resolve::{self, ServiceMap, ServiceRef, Target},
    };

    struct ChannelSink(mpsc::UnboundedSender<Collected>);

    impl CollectionSink for ChannelSink {
        fn record(&self, collected: Collected) {
            let _ = self.0.send(collected);
        }
    }

    fn labels(svc: &str, comm: &str) -> AttemptLabels {
        AttemptLabels {
            destination_namespace: "default".into(),
            destination_service: svc.into(),
            destination_pod: "".into(),
            process_comm: comm.into(),
        }
    }

    /// A counting loop on a fake kernel whose map holds `default/web` at
    /// 127.1.0.1:80, reporting into a channel, with a tick long enough that
    /// anything reported before it comes from the wake path.
    struct WakeRig {
        handle: crate::capture::fake::FakeKernelHandle,
        addr: std::net::SocketAddr,
        attempts: Arc<AttemptCounters>,
        metrics: Arc<CountingMetrics>,
        health: Arc<Health>,
        report_rx: mpsc::UnboundedReceiver<Collected>,
        stop_tx: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), CaptureError>>,
    }

    async fn wake_rig(collector: Collector) -> WakeRig {
        let kernel = FakeKernel::new(64);
        let handle = kernel.handle();
        let attempts = Arc::new(AttemptCounters::default());
        let metrics = Arc::new(CountingMetrics::default());
        let health = Arc::new(Health::default());
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let counting = CountingLoop {
            kernel: Box::new(kernel),
            table: DestinationTable::new(),
            collector,
            attempts: attempts.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            clock: AgentClock::new(),
            reporter: Some(Arc::new(ChannelSink(report_tx))),
            holder: None,
            declarations: Declarations::default(),
        };
        let addr = "127.1.0.1:80".parse().unwrap();
        let mut map = ServiceMap::default();
        map.services
            .insert(ServiceRef::new("default", "web"), Default::default());
        map.destinations.insert(
            addr,
            Target {
                service: ServiceRef::new("default", "web"),
                port: 80,
                pod: None,
            },
        );
        let (events_tx, events_rx) = mpsc::channel(4);
        events_tx.send(MapEvent::Reset(map)).await.unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(counting.run(events_rx, Duration::from_secs(3600), async {
            let _ = stop_rx.await;
        }));
        WakeRig {
            handle,
            addr,
            attempts,
            metrics,
            health,
            report_rx,
            stop_tx,
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_is_collected_and_reported_at_once() {
        let WakeRig {
            handle,
            addr,
            attempts,
            health,
            mut report_rx,
            stop_tx,
            task,
            ..
        } = wake_rig(Collector::new(8)).await;
        // The first tick fires at once; let it and the map through.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(health.ready());
        assert_eq!(attempts.get(&labels("web", "")), Some(0));

        handle.connect(resolve::destination(addr), "curl");
        let report = tokio::time::timeout(Duration::from_secs(1), report_rx.recv())
            .await
            .expect("the wake must be reported long before the next tick")
            .unwrap();
        let woken = report.woken.expect("a wake collection carries its wake");
        assert_eq!(&*woken.services, &[ServiceRef::new("default", "web")]);
        assert!(woken.read_at_us > 0, "the fake stamps its wakes");
        assert_eq!(report.deltas.len(), 1);
        assert_eq!(report.deltas[0].1, 1);
        assert_eq!(attempts.get(&labels("web", "curl")), Some(1));

        // Shutdown collects once more: the attempt made since is not lost.
        handle.connect(resolve::destination(addr), "curl");
        stop_tx.send(()).unwrap();
        task.await.unwrap().unwrap();
        let last = report_rx.recv().await.unwrap();
        assert_eq!(last.woken, None);
        assert_eq!(last.deltas[0].1, 1);
        assert_eq!(attempts.get(&labels("web", "curl")), Some(2));
    }

    /// A prober excluded for the Service: its wake reaches neither the
    /// reporter nor the seed's counter, only the filtered-by-source count;
    /// the next real caller is reported at once, with its source series.
    #[tokio::test(start_paused = true)]
    async fn an_excluded_sources_wake_is_not_reported_and_a_real_caller_is() {
        use crate::{
            attribution::{Attribution, SeriesSettings, fixtures::FakeBook},
            source_metrics::{FilteredSourceLabels, SourceLabels},
        };
        let book = FakeBook::default()
            .pod(7, "monitoring", "prober", &[])
            .pod(8, "default", "shop", &["shop"])
            .exclude("monitoring", "prober", "web");
        let WakeRig {
            handle,
            addr,
            attempts,
            metrics,
            mut report_rx,
            stop_tx,
            task,
            ..
        } = wake_rig(Collector::with_sources(
            8,
            Attribution::new(Arc::new(book), SeriesSettings::default()),
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;

        handle.connect_from(resolve::destination(addr), "curl", 7);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            report_rx.try_recv().is_err(),
            "an excluded wake is not demand"
        );
        let prober = FilteredSourceLabels {
            source_namespace: "monitoring".into(),
            source_workload: "prober".into(),
        };
        assert_eq!(metrics.sources.filtered.get_or_create(&prober).get(), 1);

        handle.connect_from(resolve::destination(addr), "java", 8);
        let report = tokio::time::timeout(Duration::from_secs(1), report_rx.recv())
            .await
            .expect("re-armed: the real caller's wake is reported at once")
            .unwrap();
        assert!(report.woken.is_some());
        assert_eq!(report.deltas.len(), 1);
        assert_eq!((&*report.deltas[0].0.comm, report.deltas[0].1), ("java", 1));
        assert_eq!(attempts.get(&labels("web", "java")), Some(1));
        assert_eq!(attempts.get(&labels("web", "curl")), None);
        let shop = SourceLabels {
            destination_namespace: "default".into(),
            destination_service: "web".into(),
            source_namespace: "default".into(),
            source_workload: "shop".into(),
        };
        assert_eq!(metrics.sources.attempts.get_or_create(&shop).get(), 1);
        stop_tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn the_agent_clock_never_goes_back() {
        let clock = AgentClock::new();
        let a = clock.now_ms();
        let b = clock.now_ms();
        assert!(b >= a);
        assert!(a > 1_600_000_000_000, "{a} is not a wall-clock time in ms");
    }
}
