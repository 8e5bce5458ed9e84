//! Who made the attempts a collection counts: each kernel counter carries
//! the caller's cgroup id, which a [`SourceBook`] turns into a [`Caller`].
//! This module owns what the counting side does with it: whether the
//! attempts are demand at all (`SourceBook::excludes`), the labels of
//! `internal_tcp_source_attempts_total` and of the filtered-by-source
//! counter under a cap on series, and the edges "Service A calls Service B".
//!
//! It never decides who a cgroup is (the book does) and never touches the
//! seed's `internal_tcp_attempts_total` labels (the collector sums callers
//! into them).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use crate::{
    resolve::ServiceRef,
    sources::{Caller, NodeOnly, Source, SourceBook},
};

/// The source that attempts past [`SeriesSettings::max_series`] are counted
/// under (empty namespace), and attempts the kernel could not count per
/// caller (its attempts map was full).
pub const OVERFLOW_SOURCE: &str = "(other sources)";

/// Default of `MAX_SOURCE_SERIES`: a node runs at most 110 pods by
/// default (the kubelet's `maxPods`); at about nine destination Services
/// per calling workload that is ~1,000 (Service, source) pairs, and at
/// ~150 bytes a line a scrape stays under 160 KB per node.
pub const DEFAULT_MAX_SOURCE_SERIES: usize = 1024;

/// `SOURCE_SERIES` and `MAX_SOURCE_SERIES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesSettings {
    /// Whether `internal_tcp_source_attempts_total` is kept at all.
    pub series: bool,
    /// Distinct (destination Service, source) series kept, and distinct
    /// sources in the filtered-by-source counter; more count under
    /// [`OVERFLOW_SOURCE`].
    pub max_series: usize,
}

impl Default for SeriesSettings {
    fn default() -> Self {
        Self {
            series: true,
            max_series: DEFAULT_MAX_SOURCE_SERIES,
        }
    }
}

/// One `internal_tcp_source_attempts_total` series: the destination Service
/// and the caller (or [`OVERFLOW_SOURCE`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub service: ServiceRef,
    pub source: Source,
}

/// What one collection learned of its callers.
#[derive(Debug, Default)]
pub struct Attributed {
    /// New attempts per source series (empty with `SOURCE_SERIES=off`).
    pub sources: HashMap<SourceKey, u64>,
    /// New attempts from excluded sources, per source label.
    pub filtered: HashMap<Source, u64>,
    /// Attempts counted under the overflow source because the cap was reached.
    pub capped: u64,
    /// (caller's Service, destination Service), each pair once.
    pub edges: BTreeSet<(ServiceRef, ServiceRef)>,
}

/// The counting side's use of a [`SourceBook`], with its cap on series.
pub struct Attribution {
    book: Arc<dyn SourceBook>,
    settings: SeriesSettings,
    overflow: Source,
    /// Source series admitted so far (the cap counts these).
    admitted: HashSet<SourceKey>,
    /// Sources admitted to the filtered-by-source counter.
    admitted_filtered: HashSet<Source>,
    /// The book's answers within one collection: many counters share a caller.
    callers: HashMap<u64, Caller>,
}

impl std::fmt::Debug for Attribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attribution")
            .field("settings", &self.settings)
            .field("admitted", &self.admitted.len())
            .field("admitted_filtered", &self.admitted_filtered.len())
            .finish_non_exhaustive()
    }
}

impl Default for Attribution {
    fn default() -> Self {
        Self::new(Arc::new(NodeOnly), SeriesSettings::default())
    }
}

impl Attribution {
    pub fn new(book: Arc<dyn SourceBook>, settings: SeriesSettings) -> Self {
        Self {
            book,
            settings: SeriesSettings {
                max_series: settings.max_series.max(1),
                ..settings
            },
            overflow: Source {
                namespace: Arc::from(""),
                workload: Arc::from(OVERFLOW_SOURCE),
            },
            admitted: HashSet::new(),
            admitted_filtered: HashSet::new(),
            callers: HashMap::new(),
        }
    }

    /// Starts a collection: the book may have learned new pods since the last.
    pub fn begin(&mut self) {
        self.callers.clear();
    }

    /// Attributes `delta` attempts from cgroup `cgroup_id` to `service`.
    /// Returns false when the source is excluded: they are not demand.
    pub fn attempts(
        &mut self,
        out: &mut Attributed,
        cgroup_id: u64,
        service: &ServiceRef,
        delta: u64,
    ) -> bool {
        let book = &self.book;
        let caller = self
            .callers
            .entry(cgroup_id)
            .or_insert_with(|| book.caller(cgroup_id));
        if book.excludes(&caller.source, service) {
            let source = caller.source.clone();
            let label = if self.admitted_filtered.contains(&source) {
                source
            } else if self.admitted_filtered.len() < self.settings.max_series {
                self.admitted_filtered.insert(source.clone());
                source
            } else {
                self.overflow.clone()
            };
            *out.filtered.entry(label).or_default() += delta;
            return false;
        }
        for from in caller.services.iter() {
            if from != service {
                out.edges.insert((from.clone(), service.clone()));
            }
        }
        if self.settings.series {
            let key = SourceKey {
                service: service.clone(),
                source: caller.source.clone(),
            };
            let key = if self.admitted.contains(&key) {
                key
            } else if self.admitted.len() < self.settings.max_series {
                self.admitted.insert(key.clone());
                key
            } else {
                out.capped += delta;
                self.overflow_key(service)
            };
            *out.sources.entry(key).or_default() += delta;
        }
        true
    }

    /// Attempts to `service` whose caller the kernel did not note (they
    /// found its attempts map full): demand, under the overflow source.
    pub fn unknown_caller(&mut self, out: &mut Attributed, service: &ServiceRef, delta: u64) {
        if self.settings.series {
            *out.sources.entry(self.overflow_key(service)).or_default() += delta;
        }
    }

    fn overflow_key(&self, service: &ServiceRef) -> SourceKey {
        SourceKey {
            service: service.clone(),
            source: self.overflow.clone(),
        }
    }

    /// Forgets a departed Service's source series (freeing their room under
    /// the cap) and returns them, overflow included, for `/metrics` to drop.
    pub fn forget_service(&mut self, service: &ServiceRef) -> Vec<SourceKey> {
        let mut gone: Vec<SourceKey> = self
            .admitted
            .iter()
            .filter(|k| &k.service == service)
            .cloned()
            .collect();
        self.admitted.retain(|k| &k.service != service);
        gone.push(self.overflow_key(service));
        gone.sort();
        gone
    }
}

#[cfg(test)]
pub mod fixtures {
    //! A [`SourceBook`] for tests: cgroup ids mapped by hand.

    use std::collections::{HashMap, HashSet};

    use super::*;

    #[derive(Debug, Default)]
    pub struct FakeBook {
        pub callers: HashMap<u64, Caller>,
        /// (source namespace, source workload, destination Service name).
        pub excluded: HashSet<(String, String, String)>,
    }

    impl FakeBook {
        /// Cgroup `cgroup_id` is a pod of `namespace/workload` that backs `services`.
        pub fn pod(
            mut self,
            cgroup_id: u64,
            namespace: &str,
            workload: &str,
            services: &[&str],
        ) -> Self {
            self.callers.insert(
                cgroup_id,
                Caller {
                    source: source(namespace, workload),
                    services: services
                        .iter()
                        .map(|s| ServiceRef::new(namespace, s))
                        .collect(),
                },
            );
            self
        }

        /// Attempts from `namespace/workload` to Service `service` are not demand.
        pub fn exclude(mut self, namespace: &str, workload: &str, service: &str) -> Self {
            self.excluded
                .insert((namespace.into(), workload.into(), service.into()));
            self
        }
    }

    impl SourceBook for FakeBook {
        fn caller(&self, cgroup_id: u64) -> Caller {
            self.callers
                .get(&cgroup_id)
                .cloned()
                .unwrap_or_else(Caller::node)
        }

        fn excludes(&self, source: &Source, destination: &ServiceRef) -> bool {
            self.excluded.contains(&(
                source.namespace.to_string(),
                source.workload.to_string(),
                destination.name.to_string(),
            ))
        }
    }

    pub fn source(namespace: &str, workload: &str) -> Source {
        Source {
            namespace: namespace.into(),
            workload: workload.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    fn svc(name: &str) -> ServiceRef {
        ServiceRef::new("default", name)
    }

    fn key(service: &str, namespace: &str, workload: &str) -> SourceKey {
        SourceKey {
            service: svc(service),
            source: source(namespace, workload),
        }
    }

    fn sorted<K: Ord + Clone, V: Clone>(map: &HashMap<K, V>) -> Vec<(K, V)> {
        let mut all: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    #[test]
    fn two_pods_of_one_workload_are_one_source_and_the_node_is_its_own() {
        let book = FakeBook::default().pod(11, "default", "web", &["web"]).pod(
            12,
            "default",
            "web",
            &["web"],
        );
        let mut attribution = Attribution::new(Arc::new(book), SeriesSettings::default());
        let mut out = Attributed::default();
        attribution.begin();
        assert!(attribution.attempts(&mut out, 11, &svc("db"), 2));
        assert!(attribution.attempts(&mut out, 12, &svc("db"), 3));
        assert!(attribution.attempts(&mut out, 99, &svc("db"), 4));
        // A Service calling itself is no edge.
        assert!(attribution.attempts(&mut out, 12, &svc("web"), 1));
        assert_eq!(
            sorted(&out.sources),
            vec![
                (key("db", "", "node"), 4),
                (key("db", "default", "web"), 5),
                (key("web", "default", "web"), 1)
            ]
        );
        assert_eq!(out.edges, BTreeSet::from([(svc("web"), svc("db"))]));
        assert_eq!((out.capped, out.filtered.len()), (0, 0));
    }

    #[test]
    fn an_excluded_source_is_filtered_and_makes_no_edge() {
        let book = FakeBook::default()
            .pod(21, "monitoring", "prober", &["prober"])
            .exclude("monitoring", "prober", "db");
        let mut attribution = Attribution::new(Arc::new(book), SeriesSettings::default());
        let mut out = Attributed::default();
        assert!(!attribution.attempts(&mut out, 21, &svc("db"), 6));
        // Only that destination excludes it.
        assert!(attribution.attempts(&mut out, 21, &svc("cache"), 1));
        assert_eq!(
            sorted(&out.filtered),
            vec![(source("monitoring", "prober"), 6)]
        );
        assert_eq!(
            sorted(&out.sources),
            vec![(key("cache", "monitoring", "prober"), 1)]
        );
        assert_eq!(
            out.edges,
            BTreeSet::from([(ServiceRef::new("monitoring", "prober"), svc("cache"))])
        );
    }

    #[test]
    fn series_past_the_cap_count_under_the_overflow_source() {
        let book = FakeBook::default()
            .pod(1, "a", "one", &[])
            .pod(2, "b", "two", &[])
            .pod(3, "c", "three", &[]);
        let settings = SeriesSettings {
            series: true,
            max_series: 2,
        };
        let mut attribution = Attribution::new(Arc::new(book), settings);
        let mut out = Attributed::default();
        attribution.attempts(&mut out, 1, &svc("db"), 1);
        attribution.attempts(&mut out, 2, &svc("db"), 2);
        attribution.attempts(&mut out, 3, &svc("db"), 3);
        attribution.attempts(&mut out, 3, &svc("web"), 4);
        attribution.unknown_caller(&mut out, &svc("web"), 5);
        // An admitted series stays admitted.
        attribution.attempts(&mut out, 1, &svc("db"), 10);
        assert_eq!(
            sorted(&out.sources),
            vec![
                (key("db", "", OVERFLOW_SOURCE), 3),
                (key("db", "a", "one"), 11),
                (key("db", "b", "two"), 2),
                (key("web", "", OVERFLOW_SOURCE), 9),
            ]
        );
        assert_eq!(out.capped, 7);
        // A departed Service frees its room.
        assert_eq!(
            attribution.forget_service(&svc("db")),
            vec![
                key("db", "", OVERFLOW_SOURCE),
                key("db", "a", "one"),
                key("db", "b", "two")
            ]
        );
        let mut out = Attributed::default();
        attribution.attempts(&mut out, 3, &svc("web"), 1);
        assert_eq!(sorted(&out.sources), vec![(key("web", "c", "three"), 1)]);
        assert_eq!(out.capped, 0);
    }

    #[test]
    fn filtered_sources_share_the_cap_and_series_can_be_off() {
        let book = FakeBook::default()
            .pod(1, "m", "one", &["one"])
            .pod(2, "m", "two", &[])
            .exclude("m", "one", "db")
            .exclude("m", "two", "db");
        let settings = SeriesSettings {
            series: false,
            max_series: 1,
        };
        let mut attribution = Attribution::new(Arc::new(book), settings);
        let mut out = Attributed::default();
        assert!(!attribution.attempts(&mut out, 1, &svc("db"), 1));
        assert!(!attribution.attempts(&mut out, 2, &svc("db"), 2));
        assert!(attribution.attempts(&mut out, 1, &svc("web"), 3));
        attribution.unknown_caller(&mut out, &svc("web"), 4);
        assert_eq!(
            sorted(&out.filtered),
            vec![(source("", OVERFLOW_SOURCE), 2), (source("m", "one"), 1)]
        );
        // Off: no source series, but exclusion and edges still work.
        assert!(out.sources.is_empty());
        assert_eq!(
            out.edges,
            BTreeSet::from([(ServiceRef::new("m", "one"), svc("web"))])
        );
    }
}
