//! The Kubernetes source driving the real eBPF capture: the mock API server
//! announces a Service whose ClusterIP is a loopback address (127.64.0.10,
//! where nothing listens, as a pod-less ClusterIP), a connect to it is
//! counted under that Service's labels, then the Service is deleted and a
//! further connect is not counted.
//!
//! Needs root; without it the test skips with the reason printed, unless
//! `ITW_REQUIRE_BPF=1` (CI), where that is a failure (see capture_support).

mod capture_support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use itw_agent::{
    capture::CaptureMode,
    counting_loop::{AgentClock, Collected, CollectionSink, CountingLoop, Health},
    deltas::Collector,
    destinations::DestinationTable,
    metrics::{AttemptCounters, CountingMetrics, TriggerLabels},
    resolve::kube::{self as kube_source, KubeSettings, KubeSourceMetrics},
};
use itw_kube_mock::{MockApiServer, Resource};
use itw_telemetry::exposition::AttemptLabels;
use serde_json::json;
use tokio::sync::mpsc;

const NAMESPACE: &str = "itw-test";
const SERVICE: &str = "loopback-web";
const CLUSTER_IP: &str = "127.64.0.10";
const PORT: u16 = 8429;
const WAIT: Duration = Duration::from_secs(20);

struct ChannelSink(mpsc::UnboundedSender<Collected>);

impl CollectionSink for ChannelSink {
    fn record(&self, collected: Collected) {
        let _ = self.0.send(collected);
    }
}

/// Polls `check` until it holds: the counting loop applies map events and
/// collects on its own task, with no signal to wait on but its figures.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_service_cluster_ip_is_counted_until_the_service_is_deleted() {
    let Some(started) = capture_support::start(CaptureMode::Auto, |_| {}) else {
        return;
    };
    eprintln!("capture: {} ({})", started.mode, started.reason);

    let mock = MockApiServer::start().await;
    mock.load([json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": SERVICE,
            "namespace": NAMESPACE,
            "uid": "6f1d2c3b-4a59-4e68-9d7c-0b1a2c3d4e5f",
            "creationTimestamp": "2025-03-01T09:00:00Z",
            "labels": { "app.kubernetes.io/name": SERVICE }
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": CLUSTER_IP,
            "clusterIPs": [CLUSTER_IP],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{ "name": "http", "port": PORT, "protocol": "TCP", "targetPort": 8080 }],
            "selector": { "app.kubernetes.io/name": SERVICE },
            "sessionAffinity": "None"
        },
        "status": { "loadBalancer": {} }
    })]);

    let attempts = Arc::new(AttemptCounters::default());
    let metrics = Arc::new(CountingMetrics::default());
    let health = Arc::new(Health::default());
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let counting = CountingLoop {
        kernel: started.kernel,
        table: DestinationTable::new(),
        collector: Collector::new(8),
        attempts: attempts.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        clock: AgentClock::new(),
        reporter: Some(Arc::new(ChannelSink(report_tx))),
        holder: None,
        declarations: itw_agent::edges::declared::Declarations::default(),
    };
    let (events_tx, events_rx) = mpsc::channel(16);
    let source = tokio::spawn(kube_source::run(
        mock.client(),
        KubeSettings::default(),
        events_tx,
        Arc::new(KubeSourceMetrics::default()),
        None,
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let counting = tokio::spawn(counting.run(events_rx, Duration::from_millis(50), async {
        let _ = stop_rx.await;
    }));

    // The Service is known: watched, and its zero series exists.
    let zero = AttemptLabels::service(NAMESPACE, SERVICE);
    eventually("the Service's zero series", || {
        attempts.get(&zero) == Some(0)
    })
    .await;
    eventually("the ClusterIP watched", || {
        metrics.watched_destinations.get() == 1
    })
    .await;
    assert!(health.ready());

    let target: SocketAddr = format!("{CLUSTER_IP}:{PORT}").parse().expect("address");
    tokio::task::spawn_blocking(move || capture_support::connect_n(target, 1))
        .await
        .expect("connect");
    let counted = loop {
        let report = tokio::time::timeout(WAIT, reports.recv())
            .await
            .expect("the attempt is reported")
            .expect("the counting loop runs");
        if let Some((key, n)) = report.deltas.into_iter().next() {
            break (key, n);
        }
    };
    let (key, n) = counted;
    assert_eq!(n, 1);
    assert_eq!(
        (
            &*key.service.namespace,
            &*key.service.name,
            key.port,
            &*key.pod
        ),
        (NAMESPACE, SERVICE, PORT, "")
    );
    let labels = AttemptLabels {
        destination_namespace: NAMESPACE.into(),
        destination_service: SERVICE.into(),
        destination_pod: "".into(),
        process_comm: key.comm.clone(),
    };
    assert_eq!(attempts.get(&labels), Some(1));

    // The Service goes: the kernel stops counting its ClusterIP.
    assert!(mock.remove(Resource::Services, NAMESPACE, SERVICE));
    eventually("the ClusterIP unwatched", || {
        metrics.watched_destinations.get() == 0
    })
    .await;
    tokio::task::spawn_blocking(move || capture_support::connect_n(target, 1))
        .await
        .expect("connect");
    // Two collections after the connect have read whatever it could have
    // counted.
    let ticks = || {
        metrics
            .collections
            .get_or_create(&TriggerLabels { trigger: "tick" })
            .get()
    };
    let after = ticks();
    eventually("two collections", || ticks() >= after + 2).await;
    stop_tx.send(()).expect("stop");
    counting.await.expect("join").expect("counting loop");
    source.abort();
    assert_eq!(
        attempts.get(&labels),
        Some(1),
        "a connect after the deletion was counted"
    );
    while let Ok(report) = reports.try_recv() {
        for (key, n) in report.deltas {
            assert!(
                !(&*key.service.namespace == NAMESPACE && &*key.service.name == SERVICE),
                "{n} attempt(s) counted for the deleted Service (process {})",
                key.comm
            );
        }
    }
}
