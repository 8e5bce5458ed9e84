//! The Kubernetes source through a real kube client against the mock API
//! server: lists and watches with resourceVersions, relists after 410 Gone,
//! server errors, dropped watches and an apiserver restart, namespaces and
//! selectors, malformed objects. After each step the destination table AND
//! the (fake) kernel's watched set are checked, and the events the source
//! sent are checked for what must never happen (an empty or partial map sent
//! because of an error).

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use itw_agent::{
    capture::fake::{FakeKernel, FakeKernelHandle},
    counting_loop::{AgentClock, Collected, CollectionSink, CountingLoop, Health},
    deltas::Collector,
    destinations::DestinationTable,
    metrics::{AttemptCounters, CountingMetrics},
    resolve::{
        self, MapChange, MapEvent, ServiceRef, ServiceState, Target,
        kube::{KubeSettings, KubeSourceMetrics},
    },
};
use itw_kube_mock::{self as kube_mock, MockApiServer, Resource};
use itw_telemetry::exposition::{AttemptLabels, parse_samples};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// A fixture from `agent/tests/fixtures/`: real objects as the apiserver
/// sends them.
fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// Long enough for kube-runtime's backoff (0.8 s doubling, jittered) to go
/// round a few times; steps normally take milliseconds.
const STEP: Duration = Duration::from_secs(20);

/// (address, namespace, service, service port, pod)
type Row = (
    &'static str,
    &'static str,
    &'static str,
    u16,
    Option<&'static str>,
);

struct Downstream {
    table: DestinationTable,
    kernel: FakeKernel,
    /// Every event the source sent, in order.
    events: Vec<MapEvent>,
}

/// The source running against the mock, its events applied to a
/// destination table and a fake kernel as the counting loop does.
struct Agent {
    mock: MockApiServer,
    downstream: Arc<Mutex<Downstream>>,
    kernel: FakeKernelHandle,
    applied: watch::Receiver<u64>,
    registry: Registry,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Agent {
    async fn start(mock: MockApiServer, settings: KubeSettings) -> Self {
        let kernel = FakeKernel::new(1024);
        let handle = kernel.handle();
        let downstream = Arc::new(Mutex::new(Downstream {
            table: DestinationTable::new(),
            kernel,
            events: Vec::new(),
        }));
        let metrics = Arc::new(KubeSourceMetrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let (tx, mut rx) = mpsc::channel(16);
        let (applied_tx, applied) = watch::channel(0u64);
        let source = tokio::spawn(resolve::kube::run(
            mock.client(),
            settings,
            tx,
            metrics.clone(),
            None,
        ));
        let sink = downstream.clone();
        let consumer = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let mut d = sink.lock();
                d.events.push(event.clone());
                let Downstream { table, kernel, .. } = &mut *d;
                let applied = table.apply(kernel, event);
                assert_eq!(applied.failed, 0, "the fake kernel refused a destination");
                drop(d);
                applied_tx.send_modify(|n| *n += 1);
            }
        });
        Self {
            mock,
            downstream,
            kernel: handle,
            applied,
            registry,
            tasks: vec![source, consumer],
        }
    }

    async fn all(mock: MockApiServer) -> Self {
        Self::start(mock, KubeSettings::default()).await
    }

    fn snapshot(&self) -> Vec<(SocketAddr, Target)> {
        self.downstream.lock().table.snapshot()
    }

    fn events(&self) -> Vec<MapEvent> {
        self.downstream.lock().events.clone()
    }

    fn services(&self) -> BTreeSet<ServiceRef> {
        self.downstream.lock().table.services().clone()
    }

    /// Waits until the table holds exactly `rows` and the known Services are
    /// `services`, then checks the kernel watches exactly those
    /// destinations, each under the table's id for it.
    async fn expect(&mut self, rows: &[Row], services: &[(&str, &str)]) {
        let want = expected(rows);
        let want_services: BTreeSet<ServiceRef> = services
            .iter()
            .map(|(ns, n)| ServiceRef::new(ns, n))
            .collect();
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if self.snapshot() == want && self.services() == want_services {
                break;
            }
            match tokio::time::timeout_at(deadline, self.applied.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => panic!("the consumer of the source's events ended"),
                Err(_) => panic!(
                    "map not reached within {STEP:?}\nwant: {want:#?}\nhave: {:#?}\nservices: {:?}\nrequests: {:#?}",
                    self.snapshot(),
                    self.services(),
                    self.mock.requests()
                ),
            }
        }
        let d = self.downstream.lock();
        let watched = self.kernel.watched();
        let want_keys: BTreeSet<_> = want.iter().map(|(a, _)| resolve::destination(*a)).collect();
        let have_keys: BTreeSet<_> = watched.keys().copied().collect();
        assert_eq!(
            have_keys, want_keys,
            "the kernel must watch exactly the map"
        );
        for (addr, _) in &want {
            let id = d
                .table
                .id_of(*addr)
                .expect("an id for every mapped address");
            assert_eq!(
                watched[&resolve::destination(*addr)].0,
                id,
                "{addr} watched under another id"
            );
        }
    }

    /// A Service's state as the events sent so far leave it.
    fn state(&self, service: &ServiceRef) -> Option<ServiceState> {
        let mut state = None;
        for event in self.events() {
            match event {
                MapEvent::Reset(map) => state = map.services.get(service).cloned(),
                MapEvent::Changes(changes) => {
                    for change in changes {
                        match change {
                            MapChange::ServiceSet(s, new) if s == *service => state = Some(new),
                            MapChange::ServiceRemoved(s) if s == *service => state = None,
                            _ => {}
                        }
                    }
                }
            }
        }
        state
    }

    /// Waits until the events sent give `service` the state `want`.
    async fn expect_state(&mut self, service: &ServiceRef, want: &ServiceState) {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.state(service).as_ref() != Some(want) {
            match tokio::time::timeout_at(deadline, self.applied.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("the consumer of the source's events ended"),
                Err(_) => panic!(
                    "{service}: state not reached within {STEP:?}\nwant: {want:?}\nhave: {:?}\nevents: {:#?}",
                    self.state(service),
                    self.events()
                ),
            }
        }
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        parse_samples(&text)
            .into_iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
            .map(|s| s.value)
    }

    fn errors(&self, kind: &str, reason: &str) -> f64 {
        self.metric(
            "itw_agent_kube_watch_errors_total",
            &[("kind", kind), ("reason", reason)],
        )
        .unwrap_or(0.0)
    }

    /// Waits for `n` requests matching `pred` in the mock's log.
    async fn seen(&self, n: usize, pred: impl Fn(&kube_mock::Request) -> bool) {
        self.mock
            .wait_until(STEP, |m| {
                m.requests().iter().filter(|r| pred(r)).count() >= n
            })
            .await;
    }
}

fn expected(rows: &[Row]) -> Vec<(SocketAddr, Target)> {
    let mut v: Vec<(SocketAddr, Target)> = rows
        .iter()
        .map(|(a, ns, svc, port, pod)| {
            (
                a.parse().unwrap_or_else(|e| panic!("{a}: {e}")),
                Target {
                    service: ServiceRef::new(ns, svc),
                    port: *port,
                    pod: pod.map(Into::into),
                },
            )
        })
        .collect();
    v.sort();
    v
}

fn is_list(resource: Resource) -> impl Fn(&kube_mock::Request) -> bool {
    move |r| r.resource == resource && !r.watch
}

fn is_watch(resource: Resource) -> impl Fn(&kube_mock::Request) -> bool {
    move |r| r.resource == resource && r.watch
}

const WEB: &[Row] = &[
    ("10.96.120.15:80", "shop", "web", 80, None),
    ("10.96.120.15:443", "shop", "web", 443, None),
    (
        "10.244.1.17:8080",
        "shop",
        "web",
        80,
        Some("web-6d4cf56db6-x7k2p"),
    ),
    (
        "10.244.1.17:8443",
        "shop",
        "web",
        443,
        Some("web-6d4cf56db6-x7k2p"),
    ),
    // Not ready: still mapped, a connect to a starting pod counts.
    (
        "10.244.2.9:8080",
        "shop",
        "web",
        80,
        Some("web-6d4cf56db6-q9z4m"),
    ),
    (
        "10.244.2.9:8443",
        "shop",
        "web",
        443,
        Some("web-6d4cf56db6-q9z4m"),
    ),
];

const API: &[Row] = &[
    ("10.96.77.4:9090", "shop", "api", 9090, None),
    ("[fd00:10:96::4d04]:9090", "shop", "api", 9090, None),
    // targetPort "grpc" (a named port): the slice says 50051.
    (
        "10.244.1.40:50051",
        "shop",
        "api",
        9090,
        Some("api-7f9b8c6d5-m2n3b"),
    ),
    (
        "[fd00:10:244:1::28]:50051",
        "shop",
        "api",
        9090,
        Some("api-7f9b8c6d5-m2n3b"),
    ),
];

const POSTGRES: &[Row] = &[(
    "10.244.3.5:5432",
    "db",
    "postgres",
    5432,
    Some("postgres-0"),
)];

fn rows(parts: &[&[Row]]) -> Vec<Row> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

fn cluster() -> Vec<Value> {
    [
        "service-shop-web.json",
        "endpointslice-shop-web.json",
        "service-shop-api-dualstack.json",
        "endpointslice-shop-api-ipv4.json",
        "endpointslice-shop-api-ipv6.json",
        "service-db-postgres-headless.json",
        "endpointslice-db-postgres.json",
        "service-db-legacy-externalname.json",
    ]
    .into_iter()
    .map(fixture)
    .collect()
}

const ALL_SERVICES: &[(&str, &str)] = &[
    ("db", "legacy"),
    ("db", "postgres"),
    ("shop", "api"),
    ("shop", "web"),
];

fn resets(events: &[MapEvent]) -> Vec<usize> {
    events
        .iter()
        .filter_map(|e| match e {
            MapEvent::Reset(map) => Some(map.destinations.len()),
            MapEvent::Changes(_) => None,
        })
        .collect()
}

#[tokio::test]
async fn lists_then_watches_and_follows_every_change() {
    let mock = MockApiServer::start().await;
    mock.load(cluster());
    let mut agent = Agent::all(mock).await;
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;

    // One complete map, first: a list per kind (paged), then a watch from
    // the list's resourceVersion, with bookmarks.
    assert_eq!(resets(&agent.events()), vec![11]);
    agent.seen(1, is_watch(Resource::Services)).await;
    agent.seen(1, is_watch(Resource::EndpointSlices)).await;
    let requests = agent.mock.requests();
    for resource in [Resource::Services, Resource::EndpointSlices] {
        let of: Vec<_> = requests.iter().filter(|r| r.resource == resource).collect();
        assert!(!of[0].watch, "{resource:?}: a list comes first");
        assert_eq!(of[0].query.get("limit").map(String::as_str), Some("100"));
        assert_eq!(of[0].namespace, None);
        assert!(of[1].watch);
        assert_eq!(
            of[1].query.get("resourceVersion").map(String::as_str),
            Some("8")
        );
        assert_eq!(
            of[1].query.get("allowWatchBookmarks").map(String::as_str),
            Some("true")
        );
    }
    assert_eq!(
        agent.metric("itw_agent_kube_objects", &[("kind", "Service")]),
        Some(4.0)
    );
    assert_eq!(
        agent.metric("itw_agent_kube_objects", &[("kind", "EndpointSlice")]),
        Some(4.0)
    );
    assert_eq!(agent.metric("itw_agent_kube_destinations", &[]), Some(11.0));
    let synced = agent
        .metric(
            "itw_agent_kube_last_sync_timestamp_seconds",
            &[("kind", "Service")],
        )
        .expect("a sync time");
    assert!(synced > 1.6e9, "{synced}");

    // A pod leaves web's slice and another comes.
    let mut slice = fixture("endpointslice-shop-web.json");
    slice["endpoints"][1] = json!({
        "addresses": ["10.244.2.33"],
        "conditions": { "ready": true, "serving": true, "terminating": false },
        "nodeName": "worker-2",
        "targetRef": { "kind": "Pod", "name": "web-6d4cf56db6-h8j9k", "namespace": "shop", "uid": "abcdabcd-0000-4000-8000-000000000001" },
        "zone": "eu-west-1b"
    });
    agent.mock.put(&slice);
    let web_now: Vec<Row> = WEB[..4]
        .iter()
        .copied()
        .chain([
            (
                "10.244.2.33:8080",
                "shop",
                "web",
                80,
                Some("web-6d4cf56db6-h8j9k"),
            ),
            (
                "10.244.2.33:8443",
                "shop",
                "web",
                443,
                Some("web-6d4cf56db6-h8j9k"),
            ),
        ])
        .collect();
    agent
        .expect(&rows(&[&web_now, API, POSTGRES]), ALL_SERVICES)
        .await;

    // web drops its https port: its ClusterIP and pod entries for it go.
    let mut web = fixture("service-shop-web.json");
    web["spec"]["ports"] =
        json!([{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }]);
    agent.mock.put(&web);
    let web_http: Vec<Row> = web_now.iter().copied().filter(|r| r.3 == 80).collect();
    agent
        .expect(&rows(&[&web_http, API, POSTGRES]), ALL_SERVICES)
        .await;

    // api is deleted: all its entries leave the map and the kernel.
    agent.mock.remove(Resource::Services, "shop", "api");
    agent
        .expect(
            &rows(&[&web_http, POSTGRES]),
            &[("db", "legacy"), ("db", "postgres"), ("shop", "web")],
        )
        .await;

    // Incremental changes only; the map was sent whole once.
    assert_eq!(resets(&agent.events()).len(), 1);
    assert_eq!(
        agent.metric("itw_agent_kube_objects", &[("kind", "Service")]),
        Some(3.0)
    );
    assert_eq!(agent.errors("Service", "gone"), 0.0);
}

#[tokio::test]
async fn a_410_gone_relists_and_the_map_stays_until_the_list_is_complete() {
    let mock = MockApiServer::start().await;
    mock.load(cluster());
    let mut agent = Agent::all(mock).await;
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;
    agent.seen(1, is_watch(Resource::Services)).await;
    let synced_before = agent
        .metric(
            "itw_agent_kube_last_sync_timestamp_seconds",
            &[("kind", "Service")],
        )
        .expect("a sync time");

    // The watch expires; api is deleted while no watch is open, and the
    // relist's first attempt fails.
    agent.mock.fail_next(Resource::Services, 500, 1);
    agent.mock.expire_watches(Resource::Services);
    agent.mock.remove(Resource::Services, "shop", "api");
    agent.seen(2, is_list(Resource::Services)).await;
    // The failed list changed nothing: the last good map stays, in the
    // table and in the kernel.
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;
    assert_eq!(resets(&agent.events()), vec![11]);

    agent
        .expect(
            &rows(&[WEB, POSTGRES]),
            &[("db", "legacy"), ("db", "postgres"), ("shop", "web")],
        )
        .await;
    // The relist came as one complete map, never a partial or empty one.
    assert_eq!(resets(&agent.events()), vec![11, 7]);
    assert_eq!(agent.errors("Service", "gone"), 1.0);
    assert_eq!(agent.errors("Service", "list_failed"), 1.0);
    assert_eq!(agent.errors("EndpointSlice", "gone"), 0.0);
    let synced_after = agent
        .metric(
            "itw_agent_kube_last_sync_timestamp_seconds",
            &[("kind", "Service")],
        )
        .expect("a sync time");
    assert!(synced_after >= synced_before);

    // And the new watch follows changes again.
    agent.mock.put(&fixture("service-shop-api-dualstack.json"));
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;
}

#[tokio::test]
async fn server_errors_and_a_dropped_watch_resume_from_the_last_resource_version() {
    let mock = MockApiServer::start().await;
    mock.load(cluster());
    let mut agent = Agent::all(mock).await;
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;
    agent.seen(1, is_watch(Resource::EndpointSlices)).await;

    // The slice watch breaks mid-stream, and the next watch attempt gets a
    // 500; meanwhile postgres' pod goes away.
    agent.mock.fail_next(Resource::EndpointSlices, 500, 1);
    agent.mock.drop_watches(Resource::EndpointSlices);
    let mut slice = fixture("endpointslice-db-postgres.json");
    slice["endpoints"] = Value::Null;
    agent.mock.put(&slice);
    agent.seen(2, is_watch(Resource::EndpointSlices)).await;
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;

    // The next attempt gets through, resumes from where the stream broke
    // and replays the change: no relist was needed.
    agent.expect(&rows(&[WEB, API]), ALL_SERVICES).await;
    assert_eq!(resets(&agent.events()), vec![11]);
    // kube-client ends a cut watch stream as it ends an expired one and the
    // watcher resumes it: only the refused restart counts as an error.
    assert_eq!(agent.errors("EndpointSlice", "watch_failed"), 0.0);
    assert_eq!(agent.errors("EndpointSlice", "watch_start_failed"), 1.0);
    let resumed = agent
        .mock
        .requests()
        .into_iter()
        .filter(|r| r.resource == Resource::EndpointSlices && r.watch)
        .map(|r| r.query.get("resourceVersion").cloned().unwrap_or_default())
        .collect::<Vec<_>>();
    assert_eq!(resumed, vec!["8", "8", "8"]);
}

#[tokio::test]
async fn the_first_map_waits_for_a_successful_list() {
    let mock = MockApiServer::start().await;
    mock.load(cluster());
    mock.fail_next(Resource::Services, 500, 2);
    let mut agent = Agent::all(mock).await;
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;
    // Nothing at all was sent while the Services could not be listed.
    assert_eq!(agent.events().len(), 1);
    assert_eq!(resets(&agent.events()), vec![11]);
    assert_eq!(agent.errors("Service", "list_failed"), 2.0);
}

#[tokio::test]
async fn an_apiserver_restart_keeps_the_map_and_catches_up() {
    let mock = MockApiServer::start().await;
    mock.load(cluster());
    let mut agent = Agent::all(mock).await;
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;
    agent.seen(1, is_watch(Resource::Services)).await;
    agent.seen(1, is_watch(Resource::EndpointSlices)).await;

    agent.mock.set_down(true);
    agent.mock.remove(Resource::Services, "db", "postgres");
    // While it is down (the client's retries find every connection closed),
    // the map stays.
    agent.mock.wait_until(STEP, |m| m.refused() >= 2).await;
    agent
        .expect(&rows(&[WEB, API, POSTGRES]), ALL_SERVICES)
        .await;
    let before = agent.mock.requests().len();
    agent.mock.set_down(false);
    agent
        .expect(
            &rows(&[WEB, API]),
            &[("db", "legacy"), ("shop", "api"), ("shop", "web")],
        )
        .await;
    assert!(agent.mock.requests().len() > before);
    assert_eq!(resets(&agent.events()), vec![11]);
}

#[tokio::test]
async fn namespaces_and_the_selector_limit_what_is_watched_and_mapped() {
    let mock = MockApiServer::start().await;
    mock.load(cluster());
    let settings =
        KubeSettings::new(&["shop".into()], Some("scale-from-zero=true")).expect("valid settings");
    let mut agent = Agent::start(mock, settings).await;
    // Only web is selected; api's slices are held but not mapped; db is
    // not watched at all.
    agent.expect(WEB, &[("shop", "web")]).await;
    agent.seen(1, is_watch(Resource::Services)).await;
    agent.seen(1, is_watch(Resource::EndpointSlices)).await;
    for r in agent.mock.requests() {
        assert_eq!(r.namespace.as_deref(), Some("shop"), "{r:?}");
        let selector = r.query.get("labelSelector").map(String::as_str);
        match r.resource {
            Resource::Services => assert_eq!(selector, Some("scale-from-zero=true")),
            Resource::EndpointSlices => assert_eq!(selector, None),
            Resource::Pods => panic!("no Pod watch without source attribution: {r:?}"),
        }
    }

    // api gets the label: it enters the selection and its waiting slices map.
    let mut api = fixture("service-shop-api-dualstack.json");
    api["metadata"]["labels"]["scale-from-zero"] = json!("true");
    agent.mock.put(&api);
    agent
        .expect(&rows(&[WEB, API]), &[("shop", "api"), ("shop", "web")])
        .await;

    // web loses it: the apiserver sends DELETED, and web leaves the map.
    let mut web = fixture("service-shop-web.json");
    web["metadata"]["labels"] = json!({ "app.kubernetes.io/name": "web" });
    agent.mock.put(&web);
    agent.expect(API, &[("shop", "api")]).await;
}

#[tokio::test]
async fn malformed_objects_are_skipped_and_the_watch_goes_on() {
    let mock = MockApiServer::start().await;
    mock.load(
        [
            "service-shop-web.json",
            "endpointslice-shop-web.json",
            "service-shop-broken.json",
            "endpointslice-shop-fqdn.json",
        ]
        .into_iter()
        .map(fixture),
    );
    let mut agent = Agent::all(mock).await;
    let broken: &[Row] = &[("10.96.200.30:80", "shop", "broken", 80, None)];
    agent
        .expect(
            &rows(&[WEB, broken]),
            &[("shop", "broken"), ("shop", "web")],
        )
        .await;
    // The bad clusterIP and the port out of range; the FQDN slice.
    assert_eq!(
        agent.metric("itw_agent_kube_skipped_total", &[("kind", "Service")]),
        Some(2.0)
    );
    assert_eq!(
        agent.metric("itw_agent_kube_skipped_total", &[("kind", "EndpointSlice")]),
        Some(1.0)
    );
    agent
        .mock
        .put(&fixture("service-db-postgres-headless.json"));
    agent.mock.put(&fixture("endpointslice-db-postgres.json"));
    agent
        .expect(
            &rows(&[WEB, broken, POSTGRES]),
            &[("db", "postgres"), ("shop", "broken"), ("shop", "web")],
        )
        .await;
}

#[tokio::test]
async fn hold_annotations_and_ready_endpoints_make_the_service_state() {
    let mock = MockApiServer::start().await;
    mock.load(
        [
            "service-shop-cold-held.json",
            "endpointslice-shop-cold-starting.json",
        ]
        .into_iter()
        .map(fixture),
    );
    let mut agent = Agent::all(mock).await;
    let cold = ServiceRef::new("shop", "cold");
    let pod = Some("cold-5f8d9c7b6-t4w2r");
    agent
        .expect(
            &[
                ("10.96.140.7:80", "shop", "cold", 80, None),
                // Not ready: mapped all the same.
                ("10.244.2.51:8080", "shop", "cold", 80, pod),
            ],
            &[("shop", "cold")],
        )
        .await;
    let starting = ServiceState {
        hold: true,
        hold_timeout: Some(Duration::from_secs(45)),
        ready_endpoints: Some(0),
        wakes: Vec::new(),
        exclude_sources: Default::default(),
    };
    let Some(MapEvent::Reset(first)) = agent.events().first().cloned() else {
        panic!("the first event must be the complete map");
    };
    assert_eq!(first.services.get(&cold), Some(&starting));
    agent.expect_state(&cold, &starting).await;
    agent.seen(1, is_watch(Resource::EndpointSlices)).await;

    // The pod becomes ready: the Service's new state comes as a change.
    let mut slice = fixture("endpointslice-shop-cold-starting.json");
    slice["endpoints"][0]["conditions"] =
        json!({ "ready": true, "serving": true, "terminating": false });
    agent.mock.put(&slice);
    let ready = ServiceState {
        ready_endpoints: Some(1),
        ..starting
    };
    agent.expect_state(&cold, &ready).await;
    let sent: Vec<MapChange> = agent
        .events()
        .into_iter()
        .flat_map(|e| match e {
            MapEvent::Changes(changes) => changes,
            MapEvent::Reset(_) => Vec::new(),
        })
        .collect();
    assert_eq!(sent, vec![MapChange::ServiceSet(cold.clone(), ready)]);
    assert_eq!(resets(&agent.events()), vec![2]);
}

struct ChannelSink(mpsc::UnboundedSender<Collected>);

impl CollectionSink for ChannelSink {
    fn record(&self, collected: Collected) {
        let _ = self.0.send(collected);
    }
}

/// The source feeding the real counting loop: each Service's zero series
/// exists as soon as it is known, a connect to its ClusterIP is counted
/// under its labels, and after its deletion a connect is not counted.
#[tokio::test]
async fn the_counting_loop_counts_under_the_services_labels() {
    let mock = MockApiServer::start().await;
    mock.load(cluster());
    let kernel = FakeKernel::new(1024);
    let handle = kernel.handle();
    let attempts = Arc::new(AttemptCounters::default());
    let health = Arc::new(Health::default());
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let counting = CountingLoop {
        kernel: Box::new(kernel),
        table: DestinationTable::new(),
        collector: Collector::new(8),
        attempts: attempts.clone(),
        metrics: Arc::new(CountingMetrics::default()),
        health: health.clone(),
        clock: AgentClock::new(),
        reporter: Some(Arc::new(ChannelSink(report_tx))),
        holder: None,
        declarations: itw_agent::edges::declared::Declarations::default(),
    };
    let (tx, rx) = mpsc::channel(16);
    let source = tokio::spawn(resolve::kube::run(
        mock.client(),
        KubeSettings::default(),
        tx,
        Arc::new(KubeSourceMetrics::default()),
        None,
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(counting.run(rx, Duration::from_secs(3600), async {
        let _ = stop_rx.await;
    }));

    let web_ip: SocketAddr = "10.96.120.15:80".parse().expect("address");
    let deadline = tokio::time::Instant::now() + STEP;
    while !handle.watched().contains_key(&resolve::destination(web_ip)) {
        assert!(tokio::time::Instant::now() < deadline, "web never watched");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(health.ready());
    for (ns, svc) in ALL_SERVICES {
        assert_eq!(
            attempts.get(&AttemptLabels::service(ns, svc)),
            Some(0),
            "{ns}/{svc}"
        );
    }

    handle.connect(resolve::destination(web_ip), "curl");
    let report = tokio::time::timeout(STEP, reports.recv())
        .await
        .expect("the wake is reported")
        .expect("a report");
    assert_eq!(report.deltas.len(), 1);
    let labels = AttemptLabels {
        destination_namespace: "shop".into(),
        destination_service: "web".into(),
        destination_pod: "".into(),
        process_comm: "curl".into(),
    };
    assert_eq!(attempts.get(&labels), Some(1));

    mock.remove(Resource::Services, "shop", "web");
    let deadline = tokio::time::Instant::now() + STEP;
    while handle.watched().contains_key(&resolve::destination(web_ip)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "web never unwatched"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    handle.connect(resolve::destination(web_ip), "curl");
    stop_tx.send(()).expect("stop");
    task.await.expect("join").expect("counting loop");
    assert_eq!(
        attempts.get(&labels),
        Some(1),
        "a connect after the deletion must not count"
    );
    source.abort();
}

#[test]
fn settings_name_the_setting_at_fault() {
    let err = KubeSettings::new(&["Shop".into()], None).expect_err("bad namespace");
    assert!(err.to_string().contains("WATCH_NAMESPACES"), "{err}");
    assert!(err.to_string().contains("\"Shop\""), "{err}");
    let err = KubeSettings::new(&[], Some("app in web")).expect_err("bad selector");
    assert!(
        err.to_string()
            .starts_with("SERVICE_SELECTOR=\"app in web\": "),
        "{err}"
    );
    let ok = KubeSettings::new(&["shop".into(), " shop".into(), "db".into()], Some("  "))
        .expect("valid");
    assert_eq!(ok.streams().len(), 4);
    assert!(ok.selector().is_none());
}

/// Real clusters are reached over TLS with rustls: building a client for an
/// https apiserver must find its crypto provider (ring) without any setup.
#[tokio::test]
async fn an_https_client_builds_with_rustls() {
    let mut config = kube::Config::new("https://127.0.0.1:6443".parse().expect("url"));
    config.accept_invalid_certs = true;
    kube::Client::try_from(config).expect("a TLS client");
}
