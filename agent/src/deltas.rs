//! Turning the kernel's cumulative counters into deltas per series.
//!
//! The kernel counters only grow while an id is watched, so a delta is the
//! new value minus the last one seen: no read-then-delete race, and a missed
//! collection only makes the next delta bigger. Process names are capped per
//! (Service, Pod): names beyond the cap count under
//! [`OVERFLOW_COMM`](itw_telemetry::exposition::OVERFLOW_COMM), as do attempts
//! the kernel could not give a counter of their own (its map was full).
//!
//! Each counter also names the caller's cgroup; [`Attribution`] turns it into
//! a source. Attempts from a source the book excludes are not demand: they
//! leave the seed's series and the deltas to the scaler, and are counted
//! apart. The seed's series sum over callers, so their labels and values
//! are what they were before callers were noted.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use itw_common::{AttemptKey, Comm};
use itw_telemetry::exposition::OVERFLOW_COMM;

use crate::{
    attribution::{Attributed, Attribution, SourceKey},
    capture::{CaptureError, Kernel, KernelCounts, Wake, comm_name},
    destinations::DestinationTable,
    resolve::{PodName, ServiceRef, Target},
    sources::Source,
};

/// One exported series, plus the Service port (windows are per port; the
/// metric sums over ports).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub service: ServiceRef,
    pub port: u16,
    /// Empty for ClusterIP attempts.
    pub pod: Arc<str>,
    pub comm: Arc<str>,
}

/// The result of one collection.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collection {
    /// New attempts per series since the previous collection (all > 0).
    pub deltas: Vec<(SeriesKey, u64)>,
    /// New filtered attempts per excluded process name.
    pub filtered: Vec<(Arc<str>, u64)>,
    /// New attempts per destination Service and caller, for
    /// `internal_tcp_source_attempts_total` (empty with `SOURCE_SERIES=off`).
    pub sources: Vec<(SourceKey, u64)>,
    /// New attempts from sources excluded for their destination: not demand.
    pub filtered_sources: Vec<(Source, u64)>,
    /// Attempts counted under the overflow source because of `MAX_SOURCE_SERIES`.
    pub sources_capped: u64,

    /// Attempts counted under the overflow name because of the per-destination cap.
    pub capped: u64,
    /// Attempts counted under the overflow name because the kernel map was full.
    pub kernel_overflow: u64,
    /// Counters of ids the table no longer knows (should stay 0).
    pub unattributed: u64,
    /// Calls seen in this collection: (caller's Service, destination Service),
    /// each pair once, attempts from excluded sources left out.
    pub edges: Vec<(ServiceRef, ServiceRef)>,
}

#[derive(Debug)]
pub struct Collector {
    counts: KernelCounts,
    last_attempts: HashMap<AttemptKey, u64>,
    last_overflow: HashMap<u32, u64>,
    last_filtered: HashMap<Comm, u64>,
    names: HashMap<Comm, Arc<str>>,
    overflow_name: Arc<str>,
    /// Distinct process names admitted per (Service, Pod).
    admitted: HashMap<(ServiceRef, Arc<str>), HashSet<Arc<str>>>,
    max_comms: usize,
    /// Ids that counted in the last collection (attempts from excluded
    /// sources left out: they do not keep a destination awake).
    active: HashSet<u32>,
    /// Ids whose attempts in the last collection came from excluded sources.
    excluded: HashSet<u32>,
    /// Ids re-armed at once after a wake from an excluded source since the
    /// last full collection: at most one each, so that a busy excluded
    /// caller costs at most two wakes per tick, not one per connect.
    rearmed_at_once: HashSet<u32>,
    attribution: Attribution,
}

impl Collector {
    /// A collector that takes every caller for the node ([`NodeOnly`]).
    ///
    /// [`NodeOnly`]: crate::sources::NodeOnly
    pub fn new(max_comms_per_destination: usize) -> Self {
        Self::with_sources(max_comms_per_destination, Attribution::default())
    }

    pub fn with_sources(max_comms_per_destination: usize, attribution: Attribution) -> Self {
        Self {
            counts: KernelCounts::default(),
            last_attempts: HashMap::new(),
            last_overflow: HashMap::new(),
            last_filtered: HashMap::new(),
            names: HashMap::new(),
            overflow_name: OVERFLOW_COMM.into(),
            admitted: HashMap::new(),
            max_comms: max_comms_per_destination.max(1),
            active: HashSet::new(),
            excluded: HashSet::new(),
            rearmed_at_once: HashSet::new(),
            attribution,
        }
    }

    /// Reads every kernel counter and returns what changed since they were
    /// last read. Also re-arms destinations that went idle and retires
    /// unwatched ids.
    pub fn collect(
        &mut self,
        kernel: &mut dyn Kernel,
        table: &mut DestinationTable,
    ) -> Result<Collection, CaptureError> {
        kernel.read(&mut self.counts)?;
        let out = self.fold(table);
        // An id counted only from excluded sources may have been disarmed by
        // them: it is idle (not in `active`), so it is re-armed here.
        for id in self.active.iter().chain(&self.excluded) {
            table.disarmed(*id);
        }
        table.rearm_idle(kernel, &self.active)?;
        self.rearmed_at_once.clear();
        for id in table.after_read(kernel)? {
            self.last_overflow.remove(&id);
            self.last_attempts.retain(|k, _| k.dest_id != id);
        }
        Ok(out)
    }

    /// The fast path of a wake: reads only the counters the wakes name. The
    /// deltas are as exact as a full read's (last values are per counter);
    /// other counters wait for the next full read.
    pub fn collect_woken(
        &mut self,
        kernel: &mut dyn Kernel,
        table: &mut DestinationTable,
        wakes: &[Wake],
    ) -> Result<Collection, CaptureError> {
        kernel.read_woken(wakes, &mut self.counts)?;
        let out = self.fold(table);
        for wake in wakes {
            let id = wake.key.dest_id;
            // Woken only by excluded sources: not demand, and the next real
            // caller must wake it at once, not at the next tick.
            if !self.active.contains(&id)
                && self.excluded.contains(&id)
                && self.rearmed_at_once.insert(id)
                && table.rearm(kernel, &wake.dest, id)?
            {
                continue;
            }
            table.disarmed(id);
        }
        Ok(out)
    }

    /// Turns the counters just read (`self.counts`) into deltas.
    fn fold(&mut self, table: &DestinationTable) -> Collection {
        let mut out = Collection::default();
        let mut deltas: HashMap<SeriesKey, u64> = HashMap::new();
        let mut attributed = Attributed::default();
        self.active.clear();
        self.excluded.clear();
        self.attribution.begin();

        for i in 0..self.counts.attempts.len() {
            let (key, value) = self.counts.attempts[i];
            let delta = grow(&mut self.last_attempts, key, value);
            if delta == 0 {
                continue;
            }
            let Some(target) = table.target(key.dest_id).cloned() else {
                self.active.insert(key.dest_id);
                out.unattributed += delta;
                continue;
            };
            if !self
                .attribution
                .attempts(&mut attributed, key.cgroup_id, &target.service, delta)
            {
                self.excluded.insert(key.dest_id);
                continue;
            }
            self.active.insert(key.dest_id);
            let name = self.name(&key.comm);
            let comm = self.admit(&target, name);
            if Arc::ptr_eq(&comm, &self.overflow_name) {
                out.capped += delta;
            }
            *deltas.entry(series(&target, comm)).or_default() += delta;
        }

        for i in 0..self.counts.overflow.len() {
            let (id, value) = self.counts.overflow[i];
            let delta = grow(&mut self.last_overflow, id, value);
            if delta == 0 {
                continue;
            }
            self.active.insert(id);
            let Some(target) = table.target(id).cloned() else {
                out.unattributed += delta;
                continue;
            };
            out.kernel_overflow += delta;
            self.attribution
                .unknown_caller(&mut attributed, &target.service, delta);
            *deltas
                .entry(series(&target, self.overflow_name.clone()))
                .or_default() += delta;
        }

        for i in 0..self.counts.filtered.len() {
            let (comm, value) = self.counts.filtered[i];
            let delta = grow(&mut self.last_filtered, comm, value);
            if delta > 0 {
                out.filtered.push((self.name(&comm), delta));
            }
        }

        out.deltas = deltas.into_iter().collect();
        out.deltas.sort();
        out.filtered.sort();
        out.sources = attributed.sources.into_iter().collect();
        out.sources.sort();
        out.filtered_sources = attributed.filtered.into_iter().collect();
        out.filtered_sources.sort();
        out.sources_capped = attributed.capped;
        out.edges = attributed.edges.into_iter().collect();
        out
    }

    /// The label a process name gets for this target: itself while the
    /// target has room, the overflow name after.
    fn admit(&mut self, target: &Target, name: Arc<str>) -> Arc<str> {
        let pod = pod_label(target);
        let admitted = self
            .admitted
            .entry((target.service.clone(), pod))
            .or_default();
        if admitted.contains(&name) {
            return name;
        }
        if admitted.len() < self.max_comms {
            admitted.insert(name.clone());
            return name;
        }
        self.overflow_name.clone()
    }

    fn name(&mut self, comm: &Comm) -> Arc<str> {
        self.names
            .entry(*comm)
            .or_insert_with(|| comm_name(comm).into())
            .clone()
    }

    /// Forgets the per-(Service, Pod) name sets and the source series of a
    /// Service that is gone, so a churning cluster does not grow them
    /// forever; returns the source series, for `/metrics` to drop.
    pub fn forget_service(&mut self, service: &ServiceRef) -> Vec<SourceKey> {
        self.admitted.retain(|(s, _), _| s != service);
        self.attribution.forget_service(service)
    }
}

/// The increase of a cumulative counter since its last value.
fn grow<K: std::hash::Hash + Eq>(last: &mut HashMap<K, u64>, key: K, value: u64) -> u64 {
    let previous = last.insert(key, value).unwrap_or(0);
    // A counter never shrinks while its id lives; if one ever did (an id
    // deleted and re-created behind our back), its whole value is new.
    value.checked_sub(previous).unwrap_or(value)
}

fn series(target: &Target, comm: Arc<str>) -> SeriesKey {
    SeriesKey {
        service: target.service.clone(),
        port: target.port,
        pod: pod_label(target),
        comm,
    }
}

/// The `destination_pod` label of a target: empty for a ClusterIP.
fn pod_label(target: &Target) -> Arc<str> {
    target
        .pod
        .as_ref()
        .map_or_else(itw_telemetry::exposition::empty_label, PodName::to_label)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        capture::fake::{FakeKernel, FakeKernelHandle},
        resolve::{self, MapChange, MapEvent},
    };

    struct Rig {
        kernel: FakeKernel,
        handle: FakeKernelHandle,
        table: DestinationTable,
        collector: Collector,
    }

    impl Rig {
        fn new(attempts_capacity: usize, max_comms: usize) -> Self {
            let kernel = FakeKernel::new(attempts_capacity);
            let handle = kernel.handle();
            Self {
                kernel,
                handle,
                table: DestinationTable::new(),
                collector: Collector::new(max_comms),
            }
        }

        fn set(&mut self, addr: &str, svc: &str, pod: Option<&str>) {
            let target = Target {
                service: ServiceRef::new("default", svc),
                port: 80,
                pod: pod.map(Into::into),
            };
            let applied = self.table.apply(
                &mut self.kernel,
                MapEvent::Changes(vec![MapChange::Set(addr.parse().unwrap(), target)]),
            );
            assert_eq!(applied.failed, 0);
        }

        fn remove(&mut self, addr: &str) {
            self.table.apply(
                &mut self.kernel,
                MapEvent::Changes(vec![MapChange::Remove(addr.parse().unwrap())]),
            );
        }

        fn connect(&self, addr: &str, comm: &str, times: usize) {
            let addr: SocketAddr = addr.parse().unwrap();
            for _ in 0..times {
                self.handle.connect(resolve::destination(addr), comm);
            }
        }

        fn collect(&mut self) -> Collection {
            self.collector
                .collect(&mut self.kernel, &mut self.table)
                .unwrap()
        }
    }

    fn key(svc: &str, pod: &str, comm: &str) -> SeriesKey {
        SeriesKey {
            service: ServiceRef::new("default", svc),
            port: 80,
            pod: pod.into(),
            comm: comm.into(),
        }
    }

    #[test]
    fn deltas_are_exact_and_never_repeat() {
        let mut rig = Rig::new(64, 8);
        rig.set("127.1.0.1:80", "a", None);
        rig.set("127.1.1.1:80", "a", Some("a-0"));
        rig.connect("127.1.0.1:80", "curl", 3);
        rig.connect("127.1.0.1:80", "java", 2);
        rig.connect("127.1.1.1:80", "curl", 1);
        rig.connect("127.9.9.9:80", "curl", 5); // not watched
        let c = rig.collect();
        assert_eq!(
            c.deltas,
            vec![
                (key("a", "", "curl"), 3),
                (key("a", "", "java"), 2),
                (key("a", "a-0", "curl"), 1),
            ]
        );
        assert_eq!(rig.collect(), Collection::default());
        rig.connect("127.1.0.1:80", "curl", 4);
        assert_eq!(rig.collect().deltas, vec![(key("a", "", "curl"), 4)]);
    }

    #[test]
    fn filtered_names_are_counted_apart() {
        let mut rig = Rig::new(64, 8);
        rig.kernel
            .set_excluded(&[crate::capture::comm_bytes("kubelet")])
            .unwrap();
        rig.set("127.1.0.1:80", "a", None);
        rig.connect("127.1.0.1:80", "kubelet", 7);
        rig.connect("127.1.0.1:80", "curl", 1);
        let c = rig.collect();
        assert_eq!(c.deltas, vec![(key("a", "", "curl"), 1)]);
        assert_eq!(c.filtered, vec![("kubelet".into(), 7)]);
        assert_eq!(rig.collect().filtered, vec![]);
    }

    #[test]
    fn names_beyond_the_cap_count_under_the_overflow_name() {
        let mut rig = Rig::new(64, 2);
        rig.set("127.1.0.1:80", "a", None);
        rig.set("127.1.0.2:80", "b", None);
        for (comm, n) in [("one", 1), ("two", 2), ("three", 3), ("four", 4)] {
            rig.connect("127.1.0.1:80", comm, n);
        }
        rig.connect("127.1.0.2:80", "four", 1);
        let c = rig.collect();
        // Kernel order decides which names get in first; the totals do not
        // depend on it.
        let a: Vec<_> = c
            .deltas
            .iter()
            .filter(|(k, _)| &*k.service.name == "a")
            .collect();
        assert_eq!(a.len(), 3);
        assert_eq!(a.iter().map(|(_, n)| n).sum::<u64>(), 10);
        let overflow = a.iter().find(|(k, _)| &*k.comm == OVERFLOW_COMM).unwrap();
        assert_eq!(overflow.1, c.capped);
        // The other service has its own room.
        assert!(c.deltas.contains(&(key("b", "", "four"), 1)));
        // An admitted name stays admitted.
        let admitted = a
            .iter()
            .find(|(k, _)| &*k.comm != OVERFLOW_COMM)
            .unwrap()
            .0
            .comm
            .clone();
        rig.connect("127.1.0.1:80", &admitted, 1);
        assert_eq!(rig.collect().deltas, vec![(key("a", "", &admitted), 1)]);
    }

    #[test]
    fn a_full_kernel_map_still_counts_every_attempt() {
        let mut rig = Rig::new(1, 8);
        rig.set("127.1.0.1:80", "a", None);
        rig.connect("127.1.0.1:80", "curl", 2);
        rig.connect("127.1.0.1:80", "java", 3);
        let c = rig.collect();
        assert_eq!(
            c.deltas,
            vec![(key("a", "", OVERFLOW_COMM), 3), (key("a", "", "curl"), 2)]
        );
        assert_eq!(c.kernel_overflow, 3);
    }

    #[test]
    fn a_reattributed_ip_splits_its_counts_at_the_change() {
        let mut rig = Rig::new(64, 8);
        rig.set("127.1.1.1:80", "a", Some("a-0"));
        rig.connect("127.1.1.1:80", "curl", 2);
        rig.set("127.1.1.1:80", "b", Some("b-0"));
        rig.connect("127.1.1.1:80", "curl", 5);
        assert_eq!(
            rig.collect().deltas,
            vec![(key("a", "a-0", "curl"), 2), (key("b", "b-0", "curl"), 5)]
        );
        // The old id's counters go after one more read, and nothing repeats.
        assert_eq!(rig.collect(), Collection::default());
        assert_eq!(rig.handle.attempt_keys(), 1);
    }

    #[test]
    fn a_removed_destination_is_read_once_more_then_deleted() {
        let mut rig = Rig::new(64, 8);
        rig.set("127.1.0.1:80", "a", None);
        rig.connect("127.1.0.1:80", "curl", 1);
        rig.remove("127.1.0.1:80");
        rig.connect("127.1.0.1:80", "curl", 9); // no longer watched
        assert_eq!(rig.collect().deltas, vec![(key("a", "", "curl"), 1)]);
        assert_eq!(rig.handle.attempt_keys(), 1);
        assert_eq!(rig.collect(), Collection::default());
        assert_eq!(rig.handle.attempt_keys(), 0);
        // The id is reused from a clean slate.
        rig.set("127.1.0.2:80", "c", None);
        rig.connect("127.1.0.2:80", "curl", 1);
        assert_eq!(rig.collect().deltas, vec![(key("c", "", "curl"), 1)]);
    }

    #[tokio::test]
    async fn wakes_once_per_idle_to_active_and_rearms_when_idle() {
        let mut rig = Rig::new(64, 8);
        let mut wakes = rig.kernel.take_wakes().unwrap();
        rig.set("127.1.0.1:80", "a", None);
        let id = rig.table.id_of("127.1.0.1:80".parse().unwrap()).unwrap();
        rig.connect("127.1.0.1:80", "curl", 3);
        assert_eq!(wakes.try_recv().map(|w| w.key.dest_id), Ok(id));
        assert!(wakes.try_recv().is_err(), "one wake per burst");
        rig.collect();
        // Still active: no re-arm, so steady traffic sends no wakes.
        rig.connect("127.1.0.1:80", "curl", 1);
        rig.collect();
        assert!(wakes.try_recv().is_err());
        // A whole collection with no attempt: re-armed, and the next attempt wakes.
        rig.collect();
        rig.connect("127.1.0.1:80", "curl", 1);
        assert_eq!(wakes.try_recv().map(|w| w.key.dest_id), Ok(id));
    }

    #[tokio::test]
    async fn a_wake_reads_its_own_counter_and_the_next_full_read_the_rest() {
        let mut rig = Rig::new(64, 8);
        let mut wakes = rig.kernel.take_wakes().unwrap();
        rig.set("127.1.0.1:80", "a", None);
        rig.set("127.1.0.2:80", "b", None);
        rig.collect();
        rig.connect("127.1.0.1:80", "curl", 1);
        let wake = wakes.try_recv().unwrap();
        // Attempts after the wake, to the same and to other counters.
        rig.connect("127.1.0.1:80", "curl", 2);
        rig.connect("127.1.0.1:80", "java", 1);
        rig.connect("127.1.0.2:80", "curl", 4);
        let woken = rig
            .collector
            .collect_woken(&mut rig.kernel, &mut rig.table, &[wake])
            .unwrap();
        assert_eq!(woken.deltas, vec![(key("a", "", "curl"), 3)]);
        // The full read brings the rest, and nothing twice.
        assert_eq!(
            rig.collect().deltas,
            vec![(key("a", "", "java"), 1), (key("b", "", "curl"), 4)]
        );
        assert_eq!(rig.collect(), Collection::default());
    }

    #[tokio::test]
    async fn a_wake_for_an_overflowed_attempt_reads_the_overflow_counter() {
        let mut rig = Rig::new(1, 8);
        let mut wakes = rig.kernel.take_wakes().unwrap();
        rig.set("127.1.0.1:80", "a", None);
        rig.set("127.1.0.2:80", "b", None);
        rig.connect("127.1.0.1:80", "curl", 1);
        rig.collect();
        let _first = wakes.try_recv().unwrap();
        rig.connect("127.1.0.2:80", "java", 2);
        let wake = wakes.try_recv().unwrap();
        assert!(wake.overflowed);
        let woken = rig
            .collector
            .collect_woken(&mut rig.kernel, &mut rig.table, &[wake])
            .unwrap();
        assert_eq!(woken.deltas, vec![(key("b", "", OVERFLOW_COMM), 2)]);
        assert_eq!(woken.kernel_overflow, 2);
    }
}

#[cfg(test)]
mod source_tests;
