//! Cgroup id -> pod UID, from the pods' cgroup subtree.
//!
//! On cgroup v2 a cgroup's id (what `bpf_get_current_cgroup_id` gives) is
//! the inode number of its directory, so the index is built by walking the
//! directories under the pods' cgroup (`kubepods.slice` or `kubepods`, or
//! `POD_CGROUP`): every directory at or below a pod's cgroup maps to that
//! pod's UID. Both kubelet cgroup drivers name pod cgroups:
//! - systemd: `kubepods-<qos>-pod<uid, '-' as '_'>.slice` below
//!   `kubepods-<qos>.slice`, guaranteed pods `kubepods-pod<uid>.slice`
//!   directly below the pods' cgroup;
//! - cgroupfs: `pod<uid>` below `<qos>`, guaranteed pods directly.
//!
//! Containers (`cri-containerd-<id>.scope`, `<id>`) and anything their
//! runtime nests below them belong to their pod. An id found nowhere below
//! is the node's. A miss rescans (a fresh container's cgroup exists before
//! its first connect), at most once per `min_rescan`; a rescan rebuilds the
//! index, so gone cgroups leave it. Never more than `max_cgroups` entries:
//! past that a scan stops indexing, counts what it left out and says so.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::DirEntryExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

/// Directories below a pod's cgroup are followed this deep: runtimes nest
/// a level or two; a deeper tree is not a pod's doing.
const MAX_POD_DEPTH: usize = 6;

/// How the index is bounded and refreshed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Cgroups indexed at most (`SOURCE_MAX_CGROUPS`).
    pub max_cgroups: usize,
    /// A miss rescans at most this often (`SOURCE_RESCAN_INTERVAL`).
    pub min_rescan: Duration,
}

/// What one scan found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub pods: usize,
    pub cgroups: usize,
    /// Cgroups left out because the index was full.
    pub left_out: usize,
}

/// How deep a scan reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// The QoS classes and the pods; a pod's containers only when the pod
    /// is new or its count of subdirectories (the directory's link count,
    /// kept by the kernel, read with one stat) changed; below a container
    /// only when it is new. What a miss does first: listing a cgroup
    /// directory is what costs (each lists dozens of interface files), and
    /// a new container changes its pod's count.
    Quick,
    /// Every directory below every pod.
    Full,
}

/// A full scan follows a quick one that missed at most once per this many
/// rescan intervals: cgroups nested later in an old container (a runtime
/// or systemd inside it) are found by it.
const FULL_SCAN_EVERY: u32 = 10;

/// The index. Not thread-safe on its own: the book keeps it behind a short
/// lock.
#[derive(Debug)]
pub struct CgroupIndex {
    /// The pods' cgroup; `None`: no pods on this node's hierarchy, every
    /// caller is the node.
    pods_dir: Option<PathBuf>,
    limits: CgroupLimits,
    by_id: HashMap<u64, Arc<str>>,
    /// What was found below each pod directory, carried from scan to scan
    /// by a quick scan.
    pod_dirs: HashMap<u64, PodDir>,
    /// Ids a full scan made after they were asked for did not find: the
    /// node's (cgroup ids are never reused, so they stay the node's).
    node_ids: HashSet<u64>,
    last_scan: Option<Instant>,
    last_full_scan: Option<Instant>,
    last_report: ScanReport,
}

/// The answer for one id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    Pod(Arc<str>),
    Node,
}

impl CgroupIndex {
    pub fn new(pods_dir: Option<PathBuf>, limits: CgroupLimits) -> Self {
        Self {
            pods_dir,
            limits,
            by_id: HashMap::new(),
            pod_dirs: HashMap::new(),
            node_ids: HashSet::new(),
            last_scan: None,
            last_full_scan: None,
            last_report: ScanReport::default(),
        }
    }

    pub fn pods_dir(&self) -> Option<&Path> {
        self.pods_dir.as_deref()
    }

    /// Who owns cgroup `id`. A miss scans quickly, unless a scan ran less
    /// than `min_rescan` before `now`; if that misses too, fully, unless a
    /// full scan ran less than [`FULL_SCAN_EVERY`] intervals before. Each
    /// scan made is reported to `scanned`.
    pub fn owner(
        &mut self,
        id: u64,
        now: Instant,
        scanned: &mut impl FnMut(Depth, ScanReport),
    ) -> Owner {
        if let Some(uid) = self.by_id.get(&id) {
            return Owner::Pod(uid.clone());
        }
        if self.node_ids.contains(&id) || self.pods_dir.is_none() {
            return Owner::Node;
        }
        let since = |at: Option<Instant>| at.map(|at| now.saturating_duration_since(at));
        if since(self.last_scan).is_some_and(|d| d < self.limits.min_rescan) {
            return Owner::Node;
        }
        scanned(Depth::Quick, self.rescan(Depth::Quick, now));
        if let Some(uid) = self.by_id.get(&id) {
            return Owner::Pod(uid.clone());
        }
        let full_every = self.limits.min_rescan * FULL_SCAN_EVERY;
        if since(self.last_full_scan).is_some_and(|d| d < full_every) {
            return Owner::Node;
        }
        scanned(Depth::Full, self.rescan(Depth::Full, now));
        if let Some(uid) = self.by_id.get(&id) {
            return Owner::Pod(uid.clone());
        }
        if self.node_ids.len() >= self.limits.max_cgroups {
            // Only a cache: forgetting it costs a rescan, never a wrong answer.
            self.node_ids.clear();
        }
        self.node_ids.insert(id);
        Owner::Node
    }

    /// Rebuilds the index from the directories as they are now.
    pub fn rescan(&mut self, depth: Depth, now: Instant) -> ScanReport {
        self.last_scan = Some(now);
        if depth == Depth::Full {
            self.last_full_scan = Some(now);
        }
        let mut scan = Scan {
            by_id: HashMap::with_capacity(self.by_id.len()),
            pod_dirs: HashMap::with_capacity(self.pod_dirs.len()),
            known: match depth {
                Depth::Quick => std::mem::take(&mut self.pod_dirs),
                Depth::Full => HashMap::new(),
            },
            max: self.limits.max_cgroups,
            report: ScanReport::default(),
        };
        if let Some(dir) = &self.pods_dir {
            scan.pods_below(dir);
        }
        scan.report.cgroups = scan.by_id.len();
        self.by_id = scan.by_id;
        self.pod_dirs = scan.pod_dirs;
        self.last_report = scan.report;
        scan.report
    }

    pub fn last_report(&self) -> ScanReport {
        self.last_report
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// A pod directory as the last scan found it.
#[derive(Debug, Default)]
struct PodDir {
    /// Its link count: 2 + its subdirectories.
    links: u64,
    /// Its containers' ids, each with the ids below it.
    containers: Vec<(u64, Vec<u64>)>,
}

struct Scan {
    by_id: HashMap<u64, Arc<str>>,
    pod_dirs: HashMap<u64, PodDir>,
    /// A quick scan's knowledge of pods seen before.
    known: HashMap<u64, PodDir>,
    max: usize,
    report: ScanReport,
}

impl Scan {
    /// Pods directly below `dir`, or one level down (the QoS classes).
    fn pods_below(&mut self, dir: &Path) {
        for (name, path, ino) in subdirs(dir) {
            match pod_uid(&name) {
                Some(uid) => self.pod(&path, ino, uid),
                None => {
                    for (name, path, ino) in subdirs(&path) {
                        if let Some(uid) = pod_uid(&name) {
                            self.pod(&path, ino, uid);
                        }
                    }
                }
            }
        }
    }

    fn pod(&mut self, dir: &Path, id: u64, uid: String) {
        use std::os::unix::fs::MetadataExt;
        let uid: Arc<str> = uid.into();
        // Gone between the listing and now: the pod ended.
        let Ok(links) = std::fs::metadata(dir).map(|m| m.nlink()) else {
            return;
        };
        self.report.pods += 1;
        self.add(id, &uid);
        let mut known = self.known.remove(&id).unwrap_or_default();
        let containers = if known.links == links && !known.containers.is_empty() {
            known.containers
        } else {
            let mut before: HashMap<u64, Vec<u64>> = known.containers.drain(..).collect();
            subdirs(dir)
                .into_iter()
                .map(|(_, path, container)| {
                    let below_it = before.remove(&container).unwrap_or_else(|| {
                        let mut found = Vec::new();
                        below(&path, 1, &mut found);
                        found
                    });
                    (container, below_it)
                })
                .collect()
        };
        for (container, below_it) in &containers {
            self.add(*container, &uid);
            for id in below_it {
                self.add(*id, &uid);
            }
        }
        self.pod_dirs.insert(id, PodDir { links, containers });
    }

    fn add(&mut self, id: u64, uid: &Arc<str>) {
        if self.by_id.len() >= self.max && !self.by_id.contains_key(&id) {
            self.report.left_out += 1;
            return;
        }
        self.by_id.insert(id, uid.clone());
    }
}

/// The ids of every directory below `dir`, to [`MAX_POD_DEPTH`].
fn below(dir: &Path, depth: usize, found: &mut Vec<u64>) {
    if depth >= MAX_POD_DEPTH {
        return;
    }
    for (_, path, id) in subdirs(dir) {
        found.push(id);
        below(&path, depth + 1, found);
    }
}

/// The pods' cgroup directory to index: `POD_CGROUP` as capture reads it
/// (`none`, which only stops programs being attached there, still detects),
/// under `CGROUP_ROOT` or the detected cgroup v2 mount. `None` when the
/// node has none; the error says why it cannot be known.
pub fn pods_dir(
    cgroup_root: Option<&Path>,
    pod_cgroup: &crate::capture::PodCgroup,
) -> Result<Option<PathBuf>, String> {
    use crate::capture::PodCgroup;
    let root = crate::capture::cgroup::find_root(cgroup_root)?;
    let pods = match pod_cgroup {
        PodCgroup::None => &PodCgroup::Detect,
        other => other,
    };
    pods.resolve(&root.path).map_err(|e| e.to_string())
}

/// The subdirectories of `dir` with their inode numbers, as readdir gives
/// them (no stat per entry); an unreadable directory has none (it went away
/// mid-scan).
fn subdirs(dir: &Path) -> Vec<(String, PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((name, e.path(), e.ino()))
        })
        .collect()
}

/// The pod UID a kubelet cgroup name carries, if it is a pod's: systemd
/// `kubepods[-<qos>]-pod<uid with '_'>.slice`, cgroupfs `pod<uid>`.
pub fn pod_uid(name: &str) -> Option<String> {
    let uid = match name.strip_suffix(".slice") {
        Some(unit) => unit
            .rsplit_once("-pod")
            .filter(|(prefix, _)| prefix.starts_with("kubepods"))?
            .1
            .replace('_', "-"),
        None => name.strip_prefix("pod")?.to_owned(),
    };
    // UIDs are UUIDs; a static pod's is a 32-digit hash. Anything else is
    // some other cgroup that happens to start with "pod".
    let valid = !uid.is_empty()
        && uid.len() <= 36
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const UID_A: &str = "0f2c9a1e-5b7d-4c3a-9e8f-1a2b3c4d5e6f";
    const UID_B: &str = "7d3e1c2b-aaaa-4bbb-8ccc-0123456789ab";
    const UID_G: &str = "c0ffee00-1111-4222-8333-444455556666";
    const STATIC: &str = "6d3d4f5b9a0c8e7f1a2b3c4d5e6f7a8b";
    const CONTAINER: &str = "3b2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f";

    fn limits(max: usize) -> CgroupLimits {
        CgroupLimits {
            max_cgroups: max,
            min_rescan: Duration::from_secs(1),
        }
    }

    fn mkdir(path: &Path) -> u64 {
        std::fs::create_dir_all(path).expect("mkdir");
        std::fs::metadata(path).expect("stat").ino()
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("itw-cgroups-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn ask(index: &mut CgroupIndex, id: u64, now: Instant) -> (Owner, bool) {
        let mut scans = Vec::new();
        let owner = index.owner(id, now, &mut |depth, _| scans.push(depth));
        (owner, !scans.is_empty())
    }

    fn pod(uid: &str) -> Owner {
        Owner::Pod(uid.into())
    }

    #[test]
    fn reads_pod_uids_from_both_drivers_names() {
        let underscored = UID_A.replace('-', "_");
        for (name, uid) in [
            (
                format!("kubepods-burstable-pod{underscored}.slice"),
                Some(UID_A),
            ),
            (
                format!("kubepods-besteffort-pod{underscored}.slice"),
                Some(UID_A),
            ),
            (format!("kubepods-pod{underscored}.slice"), Some(UID_A)),
            (format!("pod{UID_A}"), Some(UID_A)),
            (format!("pod{STATIC}"), Some(STATIC)),
            ("kubepods-burstable.slice".into(), None),
            ("burstable".into(), None),
            ("podman.slice".into(), None),
            ("system-pod123.slice".into(), None),
            (format!("cri-containerd-{CONTAINER}.scope"), None),
            ("pod".into(), None),
            ("podzzz".into(), None),
        ] {
            assert_eq!(pod_uid(&name).as_deref(), uid, "{name}");
        }
    }

    /// The systemd driver under a nested node root (kind/k3d).
    #[test]
    fn indexes_every_cgroup_of_a_pod_with_the_systemd_driver() {
        let root = tmp("systemd");
        let node = root.join("kubelet.slice/kubelet-kind.slice/node-root");
        let pods = node.join("kubepods.slice");
        let qos = pods.join("kubepods-burstable.slice");
        let a = qos.join(format!(
            "kubepods-burstable-pod{}.slice",
            UID_A.replace('-', "_")
        ));
        let a_pod = mkdir(&a);
        let a_ctr = mkdir(&a.join(format!("cri-containerd-{CONTAINER}.scope")));
        let a_nested = mkdir(&a.join(format!("cri-containerd-{CONTAINER}.scope/init")));
        let g = pods.join(format!("kubepods-pod{}.slice", UID_G.replace('-', "_")));
        let g_ctr = mkdir(&g.join("cri-containerd-aa.scope"));
        let qos_id = mkdir(&qos);
        let system = mkdir(&node.join("system.slice/containerd.service"));

        let mut index = CgroupIndex::new(Some(pods.clone()), limits(100));
        let now = Instant::now();
        assert_eq!(
            index.rescan(Depth::Full, now),
            ScanReport {
                pods: 2,
                cgroups: 5,
                left_out: 0
            }
        );
        for (id, owner) in [
            (a_pod, pod(UID_A)),
            (a_ctr, pod(UID_A)),
            (a_nested, pod(UID_A)),
            (g_ctr, pod(UID_G)),
        ] {
            assert_eq!(ask(&mut index, id, now), (owner, false), "{id}");
        }
        // Not a pod's: the QoS class and the node's own services. The first
        // miss finds the last scan too recent to rescan.
        assert_eq!(ask(&mut index, qos_id, now), (Owner::Node, false));
        // Past the full scan interval: the miss scans quickly, then fully,
        // and only then is the id the node's for good.
        let later = now + Duration::from_secs(10);
        assert_eq!(ask(&mut index, system, later), (Owner::Node, true));
        assert_eq!(
            ask(&mut index, system, later + Duration::from_secs(5)),
            (Owner::Node, false),
            "an id a fresh scan did not find is the node's for good"
        );
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn a_fresh_container_is_found_by_the_rescan_its_first_miss_makes() {
        let root = tmp("cgroupfs");
        let pods = root.join("kubepods");
        let b = pods.join(format!("besteffort/pod{UID_B}"));
        let b_ctr = mkdir(&b.join(CONTAINER));
        let static_ctr = mkdir(&pods.join(format!("pod{STATIC}/{CONTAINER}")));
        let mut index = CgroupIndex::new(Some(pods.clone()), limits(100));
        let start = Instant::now();
        assert_eq!(ask(&mut index, b_ctr, start), (pod(UID_B), true));
        assert_eq!(ask(&mut index, static_ctr, start), (pod(STATIC), false));
        assert_eq!(index.len(), 4);

        // A new container of pod B, and pod B's first container gone.
        let fresh = mkdir(&b.join("f00d"));
        std::fs::remove_dir(b.join(CONTAINER)).expect("rmdir");
        assert_eq!(
            ask(&mut index, fresh, start),
            (Owner::Node, false),
            "rate-limited: no rescan within min_rescan"
        );
        let later = start + Duration::from_secs(1);
        assert_eq!(ask(&mut index, fresh, later), (pod(UID_B), true));
        assert_eq!(index.len(), 4, "the gone container left the index");
        assert_eq!(ask(&mut index, b_ctr, later), (Owner::Node, false));
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn a_quick_scan_reads_below_new_containers_only_and_a_full_one_finds_the_rest() {
        let root = tmp("depth");
        let pods = root.join("kubepods");
        let pod_dir = pods.join(format!("burstable/pod{UID_A}"));
        let old = pod_dir.join("old");
        mkdir(&old.join("init"));
        let mut index = CgroupIndex::new(Some(pods.clone()), limits(100));
        let start = Instant::now();
        assert_eq!(index.rescan(Depth::Full, start).cgroups, 3);

        let nested_later = mkdir(&old.join("later"));
        let new_nested = mkdir(&pod_dir.join("new/inner"));
        let mut scans = Vec::new();
        let at = start + Duration::from_secs(1);
        assert_eq!(
            index.owner(new_nested, at, &mut |depth, report| scans
                .push((depth, report.cgroups))),
            pod(UID_A),
            "a new container is read to the bottom"
        );
        assert_eq!(scans, vec![(Depth::Quick, 5)]);
        let mut scans = Vec::new();
        assert_eq!(
            index.owner(
                nested_later,
                at + Duration::from_secs(1),
                &mut |depth, _| scans.push(depth)
            ),
            Owner::Node,
            "below an old container only a full scan looks, at most every 10 intervals"
        );
        assert_eq!(scans, vec![Depth::Quick]);
        scans.clear();
        assert_eq!(
            index.owner(
                nested_later,
                start + Duration::from_secs(10),
                &mut |depth, _| scans.push(depth)
            ),
            pod(UID_A)
        );
        assert_eq!(scans, vec![Depth::Quick, Depth::Full]);

        // A container replaced between two scans leaves its pod's count
        // as it was: only a full scan sees the new one. (Made before the
        // old one goes: a temporary directory, unlike cgroupfs, may give a
        // freed inode number again.)
        let replaced = mkdir(&pod_dir.join("restarted"));
        std::fs::remove_dir(pod_dir.join("new/inner")).expect("rmdir");
        std::fs::remove_dir(pod_dir.join("new")).expect("rmdir");
        let mut scans = Vec::new();
        let at = start + Duration::from_secs(11);
        assert_eq!(
            index.owner(replaced, at, &mut |depth, _| scans.push(depth)),
            Owner::Node
        );
        assert_eq!(scans, vec![Depth::Quick]);
        let mut scans = Vec::new();
        assert_eq!(
            index.owner(
                replaced,
                start + Duration::from_secs(20),
                &mut |depth, _| scans.push(depth)
            ),
            pod(UID_A)
        );
        assert_eq!(scans, vec![Depth::Quick, Depth::Full]);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn the_index_is_bounded_and_says_what_it_left_out() {
        let root = tmp("bounded");
        let pods = root.join("kubepods");
        for i in 0..3 {
            mkdir(&pods.join(format!("pod{i:08x}-0000-4000-8000-000000000000/c{i}")));
        }
        let mut index = CgroupIndex::new(Some(pods.clone()), limits(4));
        assert_eq!(
            index.rescan(Depth::Full, Instant::now()),
            ScanReport {
                pods: 3,
                cgroups: 4,
                left_out: 2
            }
        );
        assert_eq!(index.last_report().left_out, 2);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn without_a_pods_cgroup_everything_is_the_node() {
        let mut index = CgroupIndex::new(None, limits(10));
        assert_eq!(ask(&mut index, 1, Instant::now()), (Owner::Node, false));
        assert!(index.is_empty());
        assert_eq!(index.pods_dir(), None);
    }
}
