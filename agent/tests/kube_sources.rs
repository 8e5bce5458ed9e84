//! Source attribution through a real kube client against the mock API
//! server: this node's Pods (real Pod JSON: a Deployment's, a StatefulSet's,
//! a bare pod, one on another node, a malformed one) watched with the
//! `spec.nodeName` field selector, beside the Services and EndpointSlices,
//! and a pod cgroup tree (the systemd driver's layout, in a temporary
//! directory: directory inodes stand in for cgroup ids) mapping each
//! container to its pod.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use itw_agent::{
    resolve::{
        self, ServiceRef,
        kube::{KindLabels, KubeSettings, KubeSourceMetrics},
    },
    sources::{
        Caller, KubeSources, PodFeed, Source, SourceBook, SourceSettings, cgroups::CgroupLimits,
        metrics::SourceMetrics,
    },
};
use itw_kube_mock::{MockApiServer, Resource};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const NODE: &str = "worker-1";
const WEB_UID: &str = "c1a4e0b2-5b7e-4a43-9d55-0f1e2d3c4b5a";
const POSTGRES_UID: &str = "8a9b0c1d-2e3f-4a5b-8c6d-7e8f9a0b1c2d";
const DEBUG_UID: &str = "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f";
const OTHER_NODE_UID: &str = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b";
const BROKEN_UID: &str = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b";
const STEP: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// A container cgroup of pod `uid` under the systemd driver's layout; its id.
fn container(pods: &Path, uid: &str, qos: &str) -> u64 {
    let dir = pods
        .join(format!("kubepods-{qos}.slice"))
        .join(format!("kubepods-{qos}-pod{}.slice", uid.replace('-', "_")))
        .join(format!("cri-containerd-{}.scope", "ab".repeat(32)));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::metadata(&dir).expect("stat").ino()
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached within {STEP:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn caller(ns: &str, workload: &str, services: &[ServiceRef]) -> Caller {
    Caller {
        source: Source {
            namespace: ns.into(),
            workload: workload.into(),
        },
        services: services.into(),
    }
}

struct Node {
    root: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[tokio::test]
async fn attributes_this_nodes_pods_by_cgroup_and_follows_the_watch() {
    let mock = MockApiServer::start().await;
    mock.load(
        [
            "service-shop-web.json",
            "endpointslice-shop-web.json",
            "service-db-postgres-headless.json",
            "endpointslice-db-postgres.json",
            "pod-shop-web-deployment.json",
            "pod-shop-web-other-node.json",
            "pod-db-postgres-statefulset.json",
            "pod-monitoring-debug-bare.json",
            "pod-shop-broken.json",
        ]
        .map(fixture),
    );
    let node = Node {
        root: std::env::temp_dir().join(format!("itw-kube-sources-{}", std::process::id())),
    };
    // A nested node root, as on kind.
    let pods = node.root.join("kubelet.slice/kind-worker/kubepods.slice");
    let web = container(&pods, WEB_UID, "burstable");
    let postgres = container(&pods, POSTGRES_UID, "burstable");
    let debug = container(&pods, DEBUG_UID, "besteffort");
    let other_node = container(&pods, OTHER_NODE_UID, "burstable");
    let broken = container(&pods, BROKEN_UID, "burstable");
    let host = {
        let dir = node
            .root
            .join("kubelet.slice/kind-worker/system.slice/containerd.service");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::metadata(&dir).expect("stat").ino()
    };

    let source_metrics = Arc::new(SourceMetrics::default());
    let book = Arc::new(KubeSources::new(
        SourceSettings {
            exclude: "node".parse().expect("rules"),
            limits: CgroupLimits {
                max_cgroups: 1024,
                min_rescan: Duration::ZERO,
            },
        },
        Some(pods.clone()),
        source_metrics.clone(),
    ));
    let kube_metrics = Arc::new(KubeSourceMetrics::default());
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(resolve::kube::run(
        mock.client(),
        KubeSettings::default(),
        tx,
        kube_metrics.clone(),
        Some(PodFeed::new(NODE, book.clone())),
    ));
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });

    let shop_web = ServiceRef::new("shop", "web");
    let expected_web = caller("shop", "web", std::slice::from_ref(&shop_web));
    until("the Deployment's pod with its Service", || {
        book.caller(web) == expected_web
    })
    .await;
    assert_eq!(book.caller(postgres), caller("db", "postgres", &[]));
    assert_eq!(book.caller(debug), caller("monitoring", "debug", &[]));
    assert_eq!(book.caller(host), Caller::node());
    let unknown_before = source_metrics.unknown_pod.get();
    assert_eq!(
        book.caller(other_node),
        Caller::node(),
        "another node's pod"
    );
    assert_eq!(book.caller(broken), Caller::node(), "a malformed pod");
    assert_eq!(source_metrics.unknown_pod.get(), unknown_before + 2);
    let pod_kind = KindLabels { kind: "Pod" };
    assert_eq!(kube_metrics.skipped.get_or_create(&pod_kind).get(), 1);
    assert_eq!(kube_metrics.objects.get_or_create(&pod_kind).get(), 3);
    assert_eq!(source_metrics.pods.get(), 3);
    let pod_requests: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.resource == Resource::Pods)
        .collect();
    assert!(!pod_requests.is_empty());
    for r in &pod_requests {
        assert_eq!(r.namespace, None, "{r:?}");
        assert_eq!(
            r.query.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=worker-1"),
            "{r:?}"
        );
    }

    // Exclusion: EXCLUDE_SOURCES=node, then web's own annotation.
    let debug_source = book.caller(debug).source;
    assert!(book.excludes(&Source::node(), &shop_web));
    assert!(!book.excludes(&debug_source, &shop_web));
    let mut annotated = fixture("service-shop-web.json");
    annotated["metadata"]["annotations"] =
        json!({ "internal-tcp-watcher.io/exclude-sources": "monitoring/debug" });
    mock.put(&annotated);
    until("web's exclusion annotation", || {
        book.excludes(&debug_source, &shop_web)
    })
    .await;
    assert!(!book.excludes(&debug_source, &ServiceRef::new("db", "postgres-headless")));

    // A new pod of the StatefulSet joins postgres' slice: its Services follow.
    let mut slice = fixture("endpointslice-db-postgres.json");
    slice["endpoints"]
        .as_array_mut()
        .expect("endpoints")
        .push(json!({
            "addresses": ["10.244.1.23"],
            "conditions": { "ready": true },
            "targetRef": { "kind": "Pod", "name": "postgres-1", "namespace": "db" }
        }));
    mock.put(&slice);
    let postgres_service = ServiceRef::new("db", "postgres");
    until("postgres-1 in its Service's slice", || {
        book.caller(postgres).services.contains(&postgres_service)
    })
    .await;

    // The bare pod goes: its cgroup is the node's again.
    assert!(mock.remove(Resource::Pods, "monitoring", "debug"));
    until("the deleted pod forgotten", || {
        book.caller(debug) == Caller::node()
    })
    .await;
    assert_eq!(source_metrics.pods.get(), 2);

    source.abort();
    drain.abort();
}
