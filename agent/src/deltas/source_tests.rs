//! The collector with callers: the seed's series sum over them, excluded
//! sources are not demand, source series and edges come out exact.

use std::{net::SocketAddr, sync::Arc};

use super::*;
use crate::{
    attribution::{OVERFLOW_SOURCE, SeriesSettings, fixtures::FakeBook},
    capture::fake::{FakeKernel, FakeKernelHandle, ROOT_CGROUP_ID},
    resolve::{self, MapChange, MapEvent},
};

/// Cgroup ids of the callers: two pods of `default/web` (backing Service
/// `web`), a prober excluded for Service `db`, and a pod with two Services.
const WEB_0: u64 = 101;
const WEB_1: u64 = 102;
const PROBER: u64 = 201;
const API: u64 = 301;

struct Rig {
    kernel: FakeKernel,
    handle: FakeKernelHandle,
    table: DestinationTable,
    collector: Collector,
}

impl Rig {
    fn new(settings: SeriesSettings) -> Self {
        let book = FakeBook::default()
            .pod(WEB_0, "default", "web", &["web"])
            .pod(WEB_1, "default", "web", &["web"])
            .pod(PROBER, "monitoring", "prober", &[])
            .pod(API, "default", "api", &["api", "api-admin"])
            .exclude("monitoring", "prober", "db");
        let kernel = FakeKernel::new(64);
        let handle = kernel.handle();
        let mut rig = Self {
            kernel,
            handle,
            table: DestinationTable::new(),
            collector: Collector::with_sources(8, Attribution::new(Arc::new(book), settings)),
        };
        for (addr, svc) in [("127.2.0.1:80", "db"), ("127.2.0.2:80", "web")] {
            let target = Target {
                service: ServiceRef::new("default", svc),
                port: 80,
                pod: None,
            };
            let applied = rig.table.apply(
                &mut rig.kernel,
                MapEvent::Changes(vec![MapChange::Set(addr.parse().unwrap(), target)]),
            );
            assert_eq!(applied.failed, 0);
        }
        rig
    }

    fn connect(&self, addr: &str, comm: &str, cgroup_id: u64, times: usize) {
        let addr: SocketAddr = addr.parse().unwrap();
        for _ in 0..times {
            self.handle
                .connect_from(resolve::destination(addr), comm, cgroup_id);
        }
    }

    fn collect(&mut self) -> Collection {
        self.collector
            .collect(&mut self.kernel, &mut self.table)
            .unwrap()
    }

    fn armed(&self, addr: &str) -> bool {
        self.handle.watched()[&resolve::destination(addr.parse().unwrap())].1
    }
}

const DB: &str = "127.2.0.1:80";
const WEB: &str = "127.2.0.2:80";

fn series(svc: &str, comm: &str) -> SeriesKey {
    SeriesKey {
        service: ServiceRef::new("default", svc),
        port: 80,
        pod: "".into(),
        comm: comm.into(),
    }
}

fn source_key(svc: &str, namespace: &str, workload: &str) -> SourceKey {
    SourceKey {
        service: ServiceRef::new("default", svc),
        source: Source {
            namespace: namespace.into(),
            workload: workload.into(),
        },
    }
}

fn svc(name: &str) -> ServiceRef {
    ServiceRef::new("default", name)
}

#[test]
fn callers_are_summed_into_the_seed_series_and_split_into_source_series() {
    let mut rig = Rig::new(SeriesSettings::default());
    rig.connect(DB, "java", WEB_0, 2);
    rig.connect(DB, "java", WEB_1, 3);
    rig.connect(DB, "java", ROOT_CGROUP_ID, 4);
    rig.connect(DB, "curl", API, 1);
    rig.connect(DB, "curl", PROBER, 7);
    // Excluded only for db: to web the prober is demand.
    rig.connect(WEB, "curl", PROBER, 1);
    // A pod calling its own Service makes no edge.
    rig.connect(WEB, "java", WEB_0, 5);
    let c = rig.collect();
    assert_eq!(
        c.deltas,
        vec![
            (series("db", "curl"), 1),
            (series("db", "java"), 9),
            (series("web", "curl"), 1),
            (series("web", "java"), 5),
        ]
    );
    assert_eq!(
        c.sources,
        vec![
            (source_key("db", "", "node"), 4),
            (source_key("db", "default", "api"), 1),
            (source_key("db", "default", "web"), 5),
            (source_key("web", "default", "web"), 5),
            (source_key("web", "monitoring", "prober"), 1),
        ]
    );
    assert_eq!(
        c.filtered_sources,
        vec![(
            Source {
                namespace: "monitoring".into(),
                workload: "prober".into()
            },
            7
        )]
    );
    assert_eq!(
        c.edges,
        vec![
            (svc("api"), svc("db")),
            (svc("api-admin"), svc("db")),
            (svc("web"), svc("db")),
        ]
    );
    assert_eq!((c.sources_capped, c.capped, c.unattributed), (0, 0, 0));
    // Nothing repeats.
    assert_eq!(rig.collect(), Collection::default());
}

#[test]
fn with_source_series_off_the_seed_series_and_exclusion_stay() {
    let mut rig = Rig::new(SeriesSettings {
        series: false,
        max_series: 16,
    });
    rig.connect(DB, "java", WEB_0, 2);
    rig.connect(DB, "curl", PROBER, 3);
    let c = rig.collect();
    assert_eq!(c.deltas, vec![(series("db", "java"), 2)]);
    assert_eq!(c.sources, vec![]);
    assert_eq!(c.filtered_sources.len(), 1);
    assert_eq!(c.filtered_sources[0].1, 3);
    assert_eq!(c.edges, vec![(svc("web"), svc("db"))]);
}

#[test]
fn source_series_past_the_cap_go_to_the_overflow_source_with_the_full_map() {
    let mut rig = Rig::new(SeriesSettings {
        series: true,
        max_series: 1,
    });
    rig.connect(DB, "java", WEB_0, 2);
    rig.connect(DB, "java", API, 3);
    let c = rig.collect();
    let first = c
        .sources
        .iter()
        .find(|(k, _)| &*k.source.workload != OVERFLOW_SOURCE);
    let overflow = c
        .sources
        .iter()
        .find(|(k, _)| &*k.source.workload == OVERFLOW_SOURCE);
    // Kernel order decides which caller gets in first; the sum does not.
    assert_eq!(c.sources.len(), 2);
    assert_eq!(
        first.map(|s| s.1).unwrap_or(0) + overflow.map(|s| s.1).unwrap_or(0),
        5
    );
    assert_eq!(overflow.map(|s| s.1), Some(c.sources_capped));
    assert_eq!(c.deltas, vec![(series("db", "java"), 5)]);
}

#[tokio::test]
async fn a_wake_from_an_excluded_source_is_not_reported_and_rearms_at_once() {
    let mut rig = Rig::new(SeriesSettings::default());
    let mut wakes = rig.kernel.take_wakes().unwrap();
    rig.collect();
    rig.connect(DB, "curl", PROBER, 1);
    let wake = wakes.try_recv().unwrap();
    assert_eq!(wake.key.cgroup_id, PROBER);
    assert!(!rig.armed(DB));
    let woken = rig
        .collector
        .collect_woken(&mut rig.kernel, &mut rig.table, &[wake])
        .unwrap();
    assert_eq!(woken.deltas, vec![]);
    assert_eq!(woken.filtered_sources.len(), 1);
    assert!(rig.armed(DB), "re-armed at once");
    // The next real caller wakes it at once.
    rig.connect(DB, "java", WEB_0, 1);
    let wake = wakes.try_recv().unwrap();
    assert_eq!(wake.key.cgroup_id, WEB_0);
    let woken = rig
        .collector
        .collect_woken(&mut rig.kernel, &mut rig.table, &[wake])
        .unwrap();
    assert_eq!(woken.deltas, vec![(series("db", "java"), 1)]);
    assert!(!rig.armed(DB));
}

#[tokio::test]
async fn a_busy_excluded_source_rearms_at_once_only_once_per_tick() {
    let mut rig = Rig::new(SeriesSettings::default());
    let mut wakes = rig.kernel.take_wakes().unwrap();
    rig.collect();
    for _ in 0..2 {
        rig.connect(DB, "curl", PROBER, 1);
        let wake = wakes.try_recv().unwrap();
        rig.collector
            .collect_woken(&mut rig.kernel, &mut rig.table, &[wake])
            .unwrap();
    }
    // The second wake of the tick leaves it disarmed ...
    assert!(!rig.armed(DB));
    rig.connect(DB, "curl", PROBER, 5);
    assert!(wakes.try_recv().is_err());
    // ... and the tick, which finds only excluded attempts, re-arms it: a
    // prober never keeps a destination from waking for a real caller.
    let c = rig.collect();
    assert_eq!(c.deltas, vec![]);
    assert_eq!(c.filtered_sources[0].1, 5);
    assert!(rig.armed(DB));
    rig.connect(DB, "curl", PROBER, 1);
    let wake = wakes.try_recv().unwrap();
    rig.collector
        .collect_woken(&mut rig.kernel, &mut rig.table, &[wake])
        .unwrap();
    assert!(rig.armed(DB), "a new tick: re-armed at once again");
}

#[test]
fn a_destination_with_real_and_excluded_callers_stays_active() {
    let mut rig = Rig::new(SeriesSettings::default());
    rig.connect(DB, "java", WEB_0, 1);
    rig.connect(DB, "curl", PROBER, 1);
    rig.collect();
    // Active in that collection: not re-armed, so steady traffic sends no wakes.
    assert!(!rig.armed(DB));
    // A collection with only the prober: idle, re-armed.
    rig.connect(DB, "curl", PROBER, 1);
    rig.collect();
    assert!(rig.armed(DB));
}
