use std::{collections::BTreeMap, os::unix::fs::MetadataExt, path::Path, time::Duration};

use kube::runtime::watcher::Event;
use serde_json::json;

use super::*;
use crate::resolve::{ServiceMap, ServiceState, Target};

/// The resolver's answer, faked: Services by pod name.
struct Endpoints(Vec<(&'static str, ServiceRef)>);

impl PodServices for Endpoints {
    fn pod_services(&self, _namespace: &str, pod: &str, _ips: &[IpAddr]) -> Vec<ServiceRef> {
        self.0
            .iter()
            .filter(|(name, _)| *name == pod)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

const UID: &str = "0f2c9a1e-5b7d-4c3a-9e8f-1a2b3c4d5e6f";

fn pod_json(name: &str, uid: &str, ip: &str) -> crate::sources::pod_object::PodObject {
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "shop", "uid": uid,
            "labels": { "pod-template-hash": "5d8f7" },
            "ownerReferences": [{ "kind": "ReplicaSet", "name": "web-5d8f7", "controller": true }]
        },
        "spec": { "nodeName": "worker-1" },
        "status": { "podIPs": [{ "ip": ip }] }
    }))
    .expect("decodes")
}

struct Fixture {
    root: PathBuf,
    book: KubeSources,
    metrics: Arc<SourceMetrics>,
    tracker: PodTracker,
    container: u64,
}

fn fixture(name: &str, exclude: &str) -> Fixture {
    let root = std::env::temp_dir().join(format!("itw-book-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pods = root.join("kubepods");
    let container = pods.join(format!("burstable/pod{UID}/c1"));
    std::fs::create_dir_all(&container).expect("mkdir");
    let container = std::fs::metadata(&container).expect("stat").ino();
    let metrics = Arc::new(SourceMetrics::default());
    let book = KubeSources::new(
        SourceSettings {
            exclude: exclude.parse().expect("rules"),
            limits: CgroupLimits {
                max_cgroups: 100,
                min_rescan: Duration::ZERO,
            },
        },
        Some(pods),
        metrics.clone(),
    );
    Fixture {
        root,
        book,
        metrics,
        tracker: PodTracker::new("worker-1"),
        container,
    }
}

fn cleanup(root: &Path) {
    std::fs::remove_dir_all(root).expect("cleanup");
}

fn web() -> Source {
    Source {
        namespace: "shop".into(),
        workload: "web".into(),
    }
}

#[test]
fn a_pods_cgroup_names_its_workload_and_services() {
    let mut f = fixture("caller", "");
    let front = ServiceRef::new("shop", "front");
    let services = Endpoints(vec![("web-5d8f7-abcde", front.clone())]);
    assert_eq!(
        f.book.caller(f.container),
        Caller::node(),
        "a pod the watch does not hold yet"
    );
    assert_eq!(f.metrics.unknown_pod.get(), 1);

    let changes = f
        .tracker
        .event(Event::Apply(pod_json("web-5d8f7-abcde", UID, "10.244.1.5")));
    f.book.pods_changed(&f.tracker, &changes, &services);
    assert_eq!(
        f.book.caller(f.container),
        Caller {
            source: web(),
            services: Arc::from([front]),
        }
    );
    assert_eq!(f.metrics.pods.get(), 1);
    assert_eq!(
        f.metrics.cgroups.get(),
        2,
        "the pod's cgroup and its container's"
    );
    assert_eq!(
        f.book.caller(1),
        Caller::node(),
        "not below the pods' cgroup"
    );

    let changes = f.tracker.event(Event::Delete(pod_json(
        "web-5d8f7-abcde",
        UID,
        "10.244.1.5",
    )));
    f.book.pods_changed(&f.tracker, &changes, &services);
    assert_eq!(f.book.caller(f.container), Caller::node());
    assert_eq!(f.metrics.pods.get(), 0);
    cleanup(&f.root);
}

#[test]
fn a_change_of_endpoints_at_a_pods_ip_looks_its_services_up_again() {
    let mut f = fixture("endpoints", "");
    let changes = f
        .tracker
        .event(Event::Apply(pod_json("web-5d8f7-abcde", UID, "10.244.1.5")));
    f.book
        .pods_changed(&f.tracker, &changes, &Endpoints(vec![]));
    assert_eq!(f.book.caller(f.container).services.len(), 0);

    let front = ServiceRef::new("shop", "front");
    let now = Endpoints(vec![("web-5d8f7-abcde", front.clone())]);
    let elsewhere = MapEvent::Changes(vec![MapChange::Set(
        "10.244.9.9:8080".parse().expect("addr"),
        Target {
            service: ServiceRef::new("db", "pg"),
            port: 5432,
            pod: Some("pg-0".into()),
        },
    )]);
    f.book.map_changed(&elsewhere, &f.tracker, &now);
    assert_eq!(
        f.book.caller(f.container).services.len(),
        0,
        "a change at another pod's address is not looked at"
    );
    let here = MapEvent::Changes(vec![MapChange::Set(
        "10.244.1.5:8080".parse().expect("addr"),
        Target {
            service: front.clone(),
            port: 80,
            pod: Some("web-5d8f7-abcde".into()),
        },
    )]);
    f.book.map_changed(&here, &f.tracker, &now);
    assert_eq!(&*f.book.caller(f.container).services, &[front]);
    cleanup(&f.root);
}

#[test]
fn exclusion_comes_from_the_setting_and_from_the_destinations_annotation() {
    let f = fixture("exclude", "monitoring,node");
    let front = ServiceRef::new("shop", "front");
    let api = ServiceRef::new("shop", "api");
    let prober = Source {
        namespace: "monitoring".into(),
        workload: "blackbox".into(),
    };
    assert!(f.book.excludes(&prober, &front));
    assert!(f.book.excludes(&Source::node(), &front));
    assert!(!f.book.excludes(&web(), &front));

    let annotated = ServiceState {
        exclude_sources: "shop/web".parse().expect("rules"),
        ..ServiceState::default()
    };
    let reset = MapEvent::Reset(ServiceMap {
        destinations: Default::default(),
        services: BTreeMap::from([
            (front.clone(), annotated.clone()),
            (api.clone(), ServiceState::default()),
        ]),
    });
    f.book.map_changed(&reset, &f.tracker, &Endpoints(vec![]));
    assert!(f.book.excludes(&web(), &front));
    assert!(!f.book.excludes(&web(), &api), "only the annotated Service");

    let cleared = MapEvent::Changes(vec![MapChange::ServiceSet(
        front.clone(),
        ServiceState::default(),
    )]);
    f.book.map_changed(&cleared, &f.tracker, &Endpoints(vec![]));
    assert!(!f.book.excludes(&web(), &front));
    let again = MapEvent::Changes(vec![
        MapChange::ServiceSet(api.clone(), annotated),
        MapChange::ServiceRemoved(api.clone()),
    ]);
    f.book.map_changed(&again, &f.tracker, &Endpoints(vec![]));
    assert!(
        !f.book.excludes(&web(), &api),
        "a removed Service's rules go with it"
    );
    cleanup(&f.root);
}
