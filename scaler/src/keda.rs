//! KEDA's `externalscaler.ExternalScaler` service.
//!
//! Unary calls read the windows and return. Each `StreamIsActive` and
//! `StreamMetricSpec` stream is one task that sleeps until something it must
//! say happens: the service's doorbell (new attempts), the moment its window
//! empties, the client leaving, or shutdown, which ends the stream with
//! status OK so KEDA reconnects in 2 s instead of backing off.
//!
//! A trigger with `prewake: "true"` is answered by [`crate::prewake`]
//! instead (IsActive and StreamIsActive); its GetMetrics is the same.

use std::{sync::Arc, time::Instant};

use itw_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricValue,
    ScaledObjectRef, external_scaler_server::ExternalScaler,
};
use itw_telemetry::timeline::{TARGET as TIMELINE, monotonic_us};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    metrics::{GaugeGuard, ScalerMetrics},
    prewake,
    store::{Activity, Store},
    trigger::Trigger,
};

/// Responses queued for a slow KEDA before a stream task waits.
const STREAM_BUFFER: usize = 4;

pub struct KedaService {
    store: Arc<Store>,
    metrics: Arc<ScalerMetrics>,
    shutdown: CancellationToken,
}

impl KedaService {
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<ScalerMetrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            metrics,
            shutdown,
        }
    }

    /// A place for one more stream, or RESOURCE_EXHAUSTED past MAX_KEDA_STREAMS.
    fn stream_slot(&self) -> Result<GaugeGuard, Status> {
        let max = self.store.limits().max_keda_streams;
        self.metrics.keda_stream(max).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{max} KEDA streams are open on this scaler (MAX_KEDA_STREAMS); close some or raise the setting"
            ))
        })
    }

    /// Parses a call's trigger and records its window for the history kept.
    /// A bad trigger is logged: KEDA shows the status in the ScaledObject's
    /// events, and the scaler's log says which object sent it.
    fn trigger(&self, object: Option<&ScaledObjectRef>) -> Result<Trigger, Status> {
        let trigger =
            Trigger::parse_ref(object, self.store.limits().max_window).inspect_err(|error| {
                let (name, namespace) =
                    object.map_or(("", ""), |o| (o.name.as_str(), o.namespace.as_str()));
                tracing::info!(
                    scaled_object = %crate::trigger::shown(name),
                    namespace = %crate::trigger::shown(namespace),
                    %error,
                    "bad trigger metadata"
                );
            })?;
        self.store.note_window(trigger.window);
        Ok(trigger)
    }

    fn attempts(&self, trigger: &Trigger) -> u64 {
        self.store.attempts(
            &trigger.namespace,
            &trigger.service,
            trigger.port,
            trigger.window_secs(),
        )
    }
}

#[tonic::async_trait]
impl ExternalScaler for KedaService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let trigger = self.trigger(Some(request.get_ref()))?;
        let activity = if trigger.prewake {
            prewake::activity(&self.store, &trigger)
        } else {
            self.store.activity(
                &trigger.namespace,
                &trigger.service,
                trigger.port,
                trigger.window_secs(),
                trigger.activation_threshold,
            )
        };
        Ok(Response::new(IsActiveResponse {
            result: activity.active(),
        }))
    }

    type StreamIsActiveStream = ReceiverStream<Result<IsActiveResponse, Status>>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let object = request.into_inner();
        let trigger = self.trigger(Some(&object))?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let guard = self.stream_slot()?;
        let store = Arc::clone(&self.store);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _open = guard;
            tracing::debug!(scaled_object = %object.name, namespace = %object.namespace, "StreamIsActive opened");
            if trigger.prewake {
                prewake::watch_chain(&store, &trigger, &tx, &shutdown).await;
            } else {
                watch_activity(&store, &trigger, &tx, &shutdown).await;
            }
            tracing::debug!(scaled_object = %object.name, namespace = %object.namespace, "StreamIsActive closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let trigger = self.trigger(Some(request.get_ref()))?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![trigger.metric_spec()],
        }))
    }

    #[allow(deprecated)] // metricValue is deprecated in the proto but older KEDA reads it.
    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let trigger = self.trigger(request.scaled_object_ref.as_ref())?;
        let rate = self.attempts(&trigger) as f64 / trigger.window.as_secs_f64();
        let metric_name = if request.metric_name.is_empty() {
            trigger.metric_name()
        } else {
            request.metric_name
        };
        let response = GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                // `as` saturates; a rate is finite and non-negative.
                metric_value: rate.round() as i64,
                metric_value_float: rate,
            }],
        };
        // Set beside the latency KEDA sees, this tells the handler's share
        // from the time a call waits for a thread.
        self.metrics
            .get_metrics_time
            .observe(started.elapsed().as_secs_f64());
        Ok(Response::new(response))
    }

    type StreamMetricSpecStream = ReceiverStream<Result<GetMetricSpecResponse, Status>>;

    async fn stream_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        let trigger = self.trigger(Some(request.get_ref()))?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let guard = self.stream_slot()?;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _open = guard;
            let spec = GetMetricSpecResponse {
                metric_specs: vec![trigger.metric_spec()],
            };
            if tx.send(Ok(spec)).await.is_err() {
                return;
            }
            // The spec follows from the trigger metadata alone, which a stream
            // cannot change, so there is never a second one to send: the
            // stream only waits for its end.
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tx.closed() => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The StreamIsActive task: the current state at once, then `true` the moment
/// attempts make the service active, `false` when its window empties.
pub async fn watch_activity(
    store: &Store,
    trigger: &Trigger,
    tx: &mpsc::Sender<Result<IsActiveResponse, Status>>,
    shutdown: &CancellationToken,
) {
    let mut subscription = store.subscribe(&trigger.namespace, &trigger.service);
    let evaluate = |store: &Store| -> Activity {
        store.subscribed_activity(
            &subscription.entry,
            trigger.port,
            trigger.window_secs(),
            trigger.activation_threshold,
        )
    };
    subscription.changes.borrow_and_update();
    let mut activity = evaluate(store);
    if tx
        .send(Ok(IsActiveResponse {
            result: activity.active(),
        }))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let deadline = activity
            .inactive_at_ms
            .map(|ms| store.clock().instant_at_ms(ms));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            // Inactive: wait for the doorbell. Active: new attempts only push
            // the deadline out, which the deadline branch finds out itself,
            // so the doorbell is not even listened to.
            changed = subscription.changes.changed(), if !activity.active() => {
                if changed.is_err() {
                    return;
                }
                activity = evaluate(store);
                if activity.active() {
                    let handed_us = monotonic_us();
                    tracing::trace!(
                        target: TIMELINE,
                        t_us = handed_us,
                        namespace = %trigger.namespace,
                        service = %trigger.service,
                        "StreamIsActive true handed to the stream"
                    );
                    store.note_activation(&trigger.namespace, &trigger.service, handed_us, trigger.window);
                    if tx.send(Ok(IsActiveResponse { result: true })).await.is_err() {
                        return;
                    }
                }
            }
            () = sleep_until(deadline), if activity.active() => {
                // Marked seen before reading, so attempts landing after the
                // read ring again.
                subscription.changes.borrow_and_update();
                activity = evaluate(store);
                if !activity.active() && tx.send(Ok(IsActiveResponse { result: false })).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use super::*;
    use crate::{
        config::Limits,
        store::{BatchView, SeriesCache, SeriesName, SnapshotView},
        window::Clock,
    };

    /// Second 1_700_000_000 plus 100 ms: attempts never straddle a boundary by accident.
    const START_MS: i64 = 1_700_000_000_100;

    struct Fixture {
        store: Arc<Store>,
        conn: crate::store::Connection,
        cache: SeriesCache,
        sequence: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let metrics = Arc::new(ScalerMetrics::default());
            let store = Arc::new(Store::new(
                Clock::starting_at(START_MS),
                Limits::default(),
                metrics,
            ));
            let (conn, _) = store
                .hello("node-1", "instance-1", "secret-of-instance-1")
                .unwrap();
            let mut cache = SeriesCache::default();
            store
                .apply_snapshot(
                    &conn,
                    &SnapshotView {
                        through_sequence: 0,
                        taken_at_ms: START_MS,
                        totals: vec![],
                        history: vec![],
                    },
                    &mut cache,
                )
                .unwrap();
            Self {
                store,
                conn,
                cache,
                sequence: 0,
            }
        }

        /// A batch collected now (agent and scaler clocks agree).
        fn attempts(&mut self, port: u16, attempts: u64) {
            let now = self.store.clock().now_ms();
            self.attempts_collected_at(port, attempts, now);
        }

        /// A batch the agent collected at `collected_at_ms`, applied now.
        fn attempts_collected_at(&mut self, port: u16, attempts: u64, collected_at_ms: i64) {
            self.sequence += 1;
            let batch = BatchView {
                sequence: self.sequence,
                collected_at_ms,
                deltas: vec![(
                    SeriesName {
                        namespace: "apps",
                        service: "web",
                        port,
                        pod: "",
                        process_comm: "curl",
                    },
                    attempts,
                )],
            };
            self.store
                .apply_batch(&self.conn, &batch, &mut self.cache)
                .unwrap();
        }
    }

    fn trigger(pairs: &[(&str, &str)]) -> Trigger {
        let object = ScaledObjectRef {
            name: "so".into(),
            namespace: "apps".into(),
            scaler_metadata: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        };
        Trigger::parse(&object, Duration::from_secs(900)).unwrap()
    }

    /// Lets every ready task run without moving paused time.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn drain(rx: &mut mpsc::Receiver<Result<IsActiveResponse, Status>>) -> Vec<bool> {
        let mut out = Vec::new();
        while let Ok(message) = rx.try_recv() {
            out.push(
                message
                    .map(|r| r.result)
                    .unwrap_or_else(|s| panic!("stream error {s}")),
            );
        }
        out
    }

    fn spawn_watch(
        store: &Arc<Store>,
        trigger: Trigger,
        shutdown: &CancellationToken,
    ) -> (
        mpsc::Receiver<Result<IsActiveResponse, Status>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let store = Arc::clone(store);
        let shutdown = shutdown.clone();
        let task =
            tokio::spawn(async move { watch_activity(&store, &trigger, &tx, &shutdown).await });
        (rx, task)
    }

    #[tokio::test(start_paused = true)]
    async fn one_true_per_burst_then_false_when_the_window_empties() {
        let mut f = Fixture::new();
        let shutdown = CancellationToken::new();
        let (mut rx, task) = spawn_watch(
            &f.store,
            trigger(&[("service", "web"), ("window", "10s")]),
            &shutdown,
        );
        settle().await;
        assert_eq!(drain(&mut rx), vec![false], "current state on open");

        // A burst: three batches in the same and the next second.
        f.attempts(80, 1);
        settle().await;
        assert_eq!(
            drain(&mut rx),
            vec![true],
            "true the moment the first delta lands"
        );
        f.attempts(80, 5);
        tokio::time::advance(Duration::from_millis(1000)).await;
        f.attempts(443, 2);
        settle().await;
        assert_eq!(
            drain(&mut rx),
            Vec::<bool>::new(),
            "no more true while active"
        );

        // The last attempt is in second +1 (1_700_000_001), which ends at
        // 1_700_000_002; activity over a 10 s window drops it when second
        // 1_700_000_012 begins, 10.9 s from now.
        tokio::time::advance(Duration::from_millis(10_899)).await;
        settle().await;
        assert_eq!(drain(&mut rx), Vec::<bool>::new());
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(drain(&mut rx), vec![false]);
        assert_eq!(f.store.clock().now_ms(), 1_700_000_012_000);

        // Next burst: exactly one more true.
        f.attempts(80, 1);
        f.attempts(80, 1);
        settle().await;
        assert_eq!(drain(&mut rx), vec![true]);

        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(drain(&mut rx), Vec::<bool>::new());
        assert!(rx.recv().await.is_none(), "stream ended");
    }

    #[tokio::test(start_paused = true)]
    async fn new_attempts_while_active_extend_the_activity() {
        let mut f = Fixture::new();
        let shutdown = CancellationToken::new();
        let (mut rx, _task) = spawn_watch(
            &f.store,
            trigger(&[("service", "web"), ("window", "2s")]),
            &shutdown,
        );
        settle().await;
        f.attempts(80, 1);
        settle().await;
        assert_eq!(drain(&mut rx), vec![false, true]);
        // Second +1: another attempt; the first alone would expire at +2.
        tokio::time::advance(Duration::from_millis(1000)).await;
        f.attempts(80, 1);
        tokio::time::advance(Duration::from_millis(1000)).await;
        settle().await;
        assert_eq!(drain(&mut rx), Vec::<bool>::new(), "still active at +2");
        // The second attempt's second ends at +2: active for 2 s after that.
        tokio::time::advance(Duration::from_millis(1899)).await;
        settle().await;
        assert_eq!(drain(&mut rx), Vec::<bool>::new(), "still active at +3.999");
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(
            drain(&mut rx),
            vec![false],
            "inactive when second +4 begins"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_and_port_filter() {
        let mut f = Fixture::new();
        let shutdown = CancellationToken::new();
        let (mut rx, _task) = spawn_watch(
            &f.store,
            trigger(&[
                ("service", "web"),
                ("window", "5s"),
                ("port", "80"),
                ("activationThreshold", "2"),
            ]),
            &shutdown,
        );
        settle().await;
        assert_eq!(drain(&mut rx), vec![false]);
        f.attempts(443, 10);
        f.attempts(80, 2);
        settle().await;
        assert_eq!(
            drain(&mut rx),
            Vec::<bool>::new(),
            "2 on port 80 does not exceed 2; 443 does not count"
        );
        f.attempts(80, 1);
        settle().await;
        assert_eq!(drain(&mut rx), vec![true]);
        // Activity keeps the second for 5 s after it ended: false at +6.
        tokio::time::advance(Duration::from_millis(4900)).await;
        settle().await;
        assert_eq!(drain(&mut rx), Vec::<bool>::new());
        tokio::time::advance(Duration::from_millis(1000)).await;
        settle().await;
        assert_eq!(drain(&mut rx), vec![false]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_departed_client_frees_the_task_and_its_subscription() {
        let f = Fixture::new();
        let shutdown = CancellationToken::new();
        let (rx, task) = spawn_watch(&f.store, trigger(&[("service", "idle")]), &shutdown);
        settle().await;
        assert_eq!(
            f.store.service_count(),
            1,
            "the subscription keeps an entry"
        );
        drop(rx);
        task.await.unwrap();
        f.store.sweep();
        assert_eq!(
            f.store.service_count(),
            0,
            "nothing left once the client is gone"
        );
    }

    /// KEDA opens StreamIsActive when it builds its scaler cache, often long
    /// before the first attempt; the housekeeping sweep runs every second
    /// meanwhile. The subscription's entry must outlive those sweeps, or the
    /// first attempt lands in a new entry the stream never hears about.
    #[tokio::test(start_paused = true)]
    async fn a_stream_opened_before_the_first_attempt_survives_the_sweeps() {
        let mut f = Fixture::new();
        let shutdown = CancellationToken::new();
        let (mut rx, _task) = spawn_watch(
            &f.store,
            trigger(&[("service", "web"), ("window", "10s")]),
            &shutdown,
        );
        settle().await;
        assert_eq!(drain(&mut rx), vec![false], "current state on open");
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(1)).await;
            f.store.sweep();
        }
        settle().await;
        assert_eq!(
            f.store.service_count(),
            1,
            "the subscribed entry is kept through 5 sweeps"
        );
        assert_eq!(drain(&mut rx), Vec::<bool>::new());
        f.attempts(80, 1);
        settle().await;
        assert_eq!(
            drain(&mut rx),
            vec![true],
            "the first attempt, 5 s and 5 sweeps after the stream opened"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_stream_on_an_active_service_says_true_at_once() {
        let mut f = Fixture::new();
        f.attempts(80, 1);
        let shutdown = CancellationToken::new();
        let (mut rx, _task) = spawn_watch(
            &f.store,
            trigger(&[("service", "web"), ("window", "1s")]),
            &shutdown,
        );
        settle().await;
        assert_eq!(drain(&mut rx), vec![true]);
        tokio::time::advance(Duration::from_millis(900)).await;
        settle().await;
        assert_eq!(drain(&mut rx), Vec::<bool>::new());
        tokio::time::advance(Duration::from_millis(1000)).await;
        settle().await;
        assert_eq!(drain(&mut rx), vec![false]);
    }

    /// The bench found it: with a 1 s window, an attempt made at the end of
    /// a second and evaluated just after the next began was already outside
    /// the window, and no `true` was ever sent for it.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_at_the_end_of_a_second_still_activates_a_one_second_window() {
        let mut f = Fixture::new();
        let shutdown = CancellationToken::new();
        let (mut rx, _task) = spawn_watch(
            &f.store,
            trigger(&[("service", "web"), ("window", "1s")]),
            &shutdown,
        );
        settle().await;
        assert_eq!(drain(&mut rx), vec![false]);
        // Collected at .999 of its second, applied after the next began.
        tokio::time::advance(Duration::from_millis(899)).await;
        let collected_at = f.store.clock().now_ms();
        assert_eq!(collected_at % 1000, 999);
        tokio::time::advance(Duration::from_millis(2)).await;
        f.attempts_collected_at(80, 1, collected_at);
        settle().await;
        assert_eq!(drain(&mut rx), vec![true]);
    }
}
