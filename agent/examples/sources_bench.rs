//! Source attribution's cost on a full node (`hack/bench sources`): the
//! resolver holds a design-size cluster (10k Services, 100k endpoints, fed
//! straight in, no HTTP), the node runs `--pods` pods (110: the kubelet's
//! default maximum) of `--containers` containers each (3), laid out as the
//! systemd cgroup driver does: under the real cgroup v2 hierarchy when run
//! as root (what the agent scans), else in a temporary directory.
//!
//! Prints, each beside its goal: the heap attribution holds per pod (the Pod
//! watch's records, the book's callers, the cgroup index), one rescan of the
//! pods' cgroups (it runs on the fast-path thread, on a miss), a `caller()`
//! that hits, a pod change and a complete map's worth of Service lookups.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use itw_agent::{
    resolve::{
        MapEvent,
        kube::{EndpointSliceObject, Kind, Resolver, ServiceObject, StreamSpec},
    },
    sources::{
        KubeSources, SourceBook, SourceSettings,
        cgroups::{CgroupIndex, CgroupLimits, Depth},
        metrics::SourceMetrics,
        pod_object::PodObject,
        pods::PodTracker,
    },
};
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

/// Counts the heap in use.
struct CountingAllocator;

static HEAP_IN_USE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only
// the sizes are added up.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as the caller's contract for `alloc`.
        let ptr = unsafe { std::alloc::System.alloc(layout) };
        if !ptr.is_null() {
            HEAP_IN_USE.fetch_add(layout.size(), Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        HEAP_IN_USE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: as the caller's contract for `dealloc`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const NODE: &str = "worker-0";

struct Options {
    pods: usize,
    containers: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        pods: 110,
        containers: 3,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value: usize = it
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag}: not a number"))?;
        match flag.as_str() {
            "--pods" => o.pods = value,
            "--containers" => o.containers = value,
            other => bail!("unknown option {other} (--pods N, --containers N)"),
        }
    }
    Ok(o)
}

/// One of the node's pods, from an endpoint of the synthetic cluster.
struct NodePod {
    namespace: String,
    name: String,
    ip: String,
    uid: String,
}

fn resolver_with(objects: &[Value]) -> Resolver {
    let mut resolver = Resolver::new(vec![
        StreamSpec {
            kind: Kind::Service,
            namespace: None,
        },
        StreamSpec {
            kind: Kind::EndpointSlice,
            namespace: None,
        },
    ]);
    resolver.service_event(0, Event::Init);
    resolver.slice_event(1, Event::Init);
    for object in objects {
        match object["kind"].as_str() {
            Some("Service") => {
                let svc: ServiceObject = serde_json::from_value(object.clone()).expect("Service");
                resolver.service_event(0, Event::InitApply(svc));
            }
            _ => {
                let slice: EndpointSliceObject =
                    serde_json::from_value(object.clone()).expect("EndpointSlice");
                resolver.slice_event(1, Event::InitApply(slice));
            }
        }
    }
    resolver.service_event(0, Event::InitDone);
    resolver.slice_event(1, Event::InitDone);
    resolver
}

fn node_pods(objects: &[Value], count: usize) -> Vec<NodePod> {
    objects
        .iter()
        .filter(|o| o["kind"] == "EndpointSlice")
        .flat_map(|slice| slice["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|ep| ep["nodeName"] == NODE)
        .take(count)
        .map(|ep| NodePod {
            namespace: ep["targetRef"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .into(),
            name: ep["targetRef"]["name"].as_str().unwrap_or_default().into(),
            ip: ep["addresses"][0].as_str().unwrap_or_default().into(),
            uid: ep["targetRef"]["uid"].as_str().unwrap_or_default().into(),
        })
        .collect()
}

/// The pod as the apiserver sends it: a Deployment's, with the fields a
/// real one has (most of which the decoder skips).
fn pod_json(pod: &NodePod) -> Value {
    let (deployment_and_hash, _) = pod.name.rsplit_once('-').unwrap_or((&pod.name, ""));
    let (_, hash) = deployment_and_hash
        .rsplit_once('-')
        .unwrap_or(("", deployment_and_hash));
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
            "resourceVersion": "1", "creationTimestamp": "2025-02-11T08:14:01Z",
            "generateName": format!("{deployment_and_hash}-"),
            "labels": { "app.kubernetes.io/name": "bench", "pod-template-hash": hash },
            "annotations": { "kubectl.kubernetes.io/restartedAt": "2025-02-11T08:14:01Z" },
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": deployment_and_hash,
                                  "uid": "2f3e4d5c-6b7a-4988-a7b6-c5d4e3f2a1b0", "controller": true, "blockOwnerDeletion": true }],
            "managedFields": [{ "manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1",
                                "fieldsV1": { "f:status": { "f:podIPs": {} } } }]
        },
        "spec": {
            "nodeName": NODE,
            "containers": [{ "name": "main", "image": "registry.example/bench:1.0",
                             "ports": [{ "containerPort": 8080, "protocol": "TCP" }] }]
        },
        "status": { "phase": "Running", "podIP": pod.ip, "podIPs": [{ "ip": pod.ip }],
                    "hostIP": "172.18.0.3", "qosClass": "Burstable" }
    })
}

/// The pods' cgroup tree; returns the container cgroup ids.
fn cgroup_tree(pods_dir: &Path, pods: &[NodePod], containers: usize) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for pod in pods {
        let dir = pods_dir.join("kubepods-burstable.slice").join(format!(
            "kubepods-burstable-pod{}.slice",
            pod.uid.replace('-', "_")
        ));
        for c in 0..containers {
            let container = dir.join(format!("cri-containerd-{c:064x}.scope"));
            std::fs::create_dir_all(&container)
                .with_context(|| format!("mkdir {}", container.display()))?;
            ids.push(std::fs::metadata(&container)?.ino());
        }
    }
    Ok(ids)
}

/// Removes the tree deepest first (cgroupfs refuses to remove a cgroup
/// with children, and has no recursive removal).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let objects = itw_kube_mock::synthetic_cluster(10_000, 100_000, 1);
    let resolver = resolver_with(&objects);
    let pods = node_pods(&objects, o.pods);
    drop(objects);
    if pods.len() < o.pods {
        bail!(
            "the synthetic cluster has only {} pods on {NODE}",
            pods.len()
        );
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let base: PathBuf = if root {
        itw_agent::capture::cgroup::find_root(None)
            .map_err(anyhow::Error::msg)?
            .path
    } else {
        std::env::temp_dir()
    };
    let node_dir = base.join(format!("itw-bench-sources-{}", std::process::id()));
    let pods_dir = node_dir.join("kubepods.slice");
    let ids = cgroup_tree(&pods_dir, &pods, o.containers);
    let result = ids.and_then(|ids| run(&o, &resolver, &pods, &pods_dir, &ids, root));
    remove_tree(&node_dir);
    result
}

fn run(
    o: &Options,
    resolver: &Resolver,
    pods: &[NodePod],
    pods_dir: &Path,
    ids: &[u64],
    real_cgroups: bool,
) -> anyhow::Result<()> {
    let limits = CgroupLimits {
        max_cgroups: 8192,
        min_rescan: Duration::from_secs(1),
    };
    let pod_objects: Vec<PodObject> = pods
        .iter()
        .map(|p| serde_json::from_value(pod_json(p)).expect("Pod"))
        .collect();

    let before = HEAP_IN_USE.load(Relaxed);
    let book = Arc::new(KubeSources::new(
        SourceSettings {
            exclude: Default::default(),
            limits,
        },
        Some(pods_dir.to_owned()),
        Arc::new(SourceMetrics::default()),
    ));
    let mut tracker = PodTracker::new(NODE);
    tracker.event(Event::Init);
    for pod in pod_objects.iter().cloned() {
        tracker.event(Event::InitApply(pod));
    }
    let changes = tracker.event(Event::InitDone);
    book.pods_changed(&tracker, &changes, resolver);
    drop(changes);
    // The first lookup scans the tree.
    let first = book.caller(ids[0]);
    let held = HEAP_IN_USE.load(Relaxed).saturating_sub(before);
    let with_services = ids
        .iter()
        .filter(|id| !book.caller(**id).services.is_empty())
        .count();
    if first.source.is_node() || with_services != ids.len() {
        bail!(
            "attribution failed: {} of {} containers have their pod's Service",
            with_services,
            ids.len()
        );
    }

    let mut index = CgroupIndex::new(Some(pods_dir.to_owned()), limits);
    let mut scan = |depth| {
        let samples = (0..21)
            .map(|_| {
                let t = Instant::now();
                index.rescan(depth, Instant::now());
                t.elapsed()
            })
            .collect();
        median(samples)
    };
    let full = scan(Depth::Full);
    let quick = scan(Depth::Quick);

    let calls = 1_000_000;
    let t = Instant::now();
    let mut services = 0usize;
    for i in 0..calls {
        services += book.caller(ids[i % ids.len()]).services.len();
    }
    let per_call = t.elapsed() / calls as u32;
    std::hint::black_box(services);

    let changed = pod_objects[0].clone();
    let pod_change: Vec<Duration> = (0..21)
        .map(|i| {
            let mut pod = changed.clone();
            pod.metadata.resource_version = Some(format!("{}", i + 2));
            if let Some(status) = &mut pod.status {
                status.pod_ips = None;
                status.pod_ip = Some(format!("10.250.0.{i}"));
            }
            let t = Instant::now();
            let changes = tracker.event(Event::Apply(pod));
            book.pods_changed(&tracker, &changes, resolver);
            t.elapsed()
        })
        .collect();
    let map = MapEvent::Reset(resolver.map());
    let resets: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            book.map_changed(&map, &tracker, resolver);
            t.elapsed()
        })
        .collect();

    println!(
        "sources: {} pods x {} containers on {NODE}, resolver at 10k Services / 100k endpoints; cgroups: {}",
        o.pods,
        o.containers,
        if real_cgroups {
            "the real cgroup v2 hierarchy"
        } else {
            "a temporary directory (not root)"
        }
    );
    println!("loadavg: {}", loadavg());
    println!(
        "heap held by attribution: {:.1} KiB, {} bytes per pod    (goal: a small share of the agent's RSS <= 30 MiB, #17)",
        held as f64 / 1024.0,
        held / o.pods
    );
    println!(
        "quick rescan of the pods' cgroups (a stat per pod; lists only new or changed pods): {quick:?} median of 21    (goal: <= 1 ms; on the fast-path thread, on a miss, at most once per SOURCE_RESCAN_INTERVAL)"
    );
    println!(
        "full rescan (every nested cgroup): {full:?} median of 21    (goal: <= 1 ms; when a quick one missed, at most once per 10 intervals)"
    );
    println!(
        "caller() hit: {per_call:?} per call    (goal: <= 1 us; once per new destination, process and cgroup key per collection)"
    );
    println!(
        "a pod change (its Services looked up again): {:?} median of 21    (goal: off the fast path; <= 1 ms)",
        median(pod_change)
    );
    println!(
        "a complete map (every pod's Services looked up again): {:?} median of 5    (goal: off the fast path; <= 100 ms)",
        median(resets)
    );
    Ok(())
}
