//! The exported series of `internal_tcp_attempts_total`: one [`SeriesSlot`]
//! per (namespace, service, pod, process), MAX_SERIES and its overflow
//! series, and each ingest stream's cache of what it has resolved.
//!
//! Exported counters never decrease: each series publishes
//! `max(previous, retired + sum over live instances)`, with atomics only, so
//! a scrape never waits for a batch nor a batch for a scrape. Nothing here
//! may ever lower an exported value.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::SeqCst},
    },
};

use hashbrown::HashTable;
use itw_telemetry::exposition::{AttemptLabels, OVERFLOW_COMM};
use tokio::time::Instant;

use super::{
    SeriesName, ServiceEntry, Store, agent_services::AgentServices, growth::reserve_by_an_eighth,
};

/// Most series a single ingest stream remembers it has resolved; past that it
/// starts over (only a cost, never a miscount).
const STREAM_CACHE_LIMIT: usize = 65_536;
// The index holds entry numbers as u16.
const _: () = assert!(STREAM_CACHE_LIMIT <= u16::MAX as usize + 1);

/// One series of `internal_tcp_attempts_total`.
#[derive(Debug)]
pub struct SeriesSlot {
    labels: AttemptLabels,
    created: Instant,
    /// Totals of instances that went away.
    retired: AtomicU64,
    /// Sum of the totals of the instances held now.
    live: AtomicU64,
    /// What `/metrics` shows: never decreases.
    exported: AtomicU64,
}

impl SeriesSlot {
    pub(super) fn new(labels: AttemptLabels) -> Self {
        Self {
            labels,
            created: Instant::now(),
            retired: AtomicU64::new(0),
            live: AtomicU64::new(0),
            exported: AtomicU64::new(0),
        }
    }

    pub fn labels(&self) -> &AttemptLabels {
        &self.labels
    }

    pub fn created(&self) -> Instant {
        self.created
    }

    pub fn exported(&self) -> u64 {
        self.exported.load(SeqCst)
    }

    pub(super) fn add_live(&self, attempts: u64) {
        saturating_add(&self.live, attempts);
        self.publish();
    }

    /// A snapshot lowered an instance's total: the export holds its value
    /// until the sum passes it again.
    pub(super) fn sub_live(&self, attempts: u64) {
        saturating_sub(&self.live, attempts);
    }

    /// Moves an instance's total from live to retired. Live goes down first,
    /// so a concurrent publish can only see too little (ignored by the max),
    /// never the same attempts twice.
    pub(super) fn retire(&self, attempts: u64) {
        saturating_sub(&self.live, attempts);
        saturating_add(&self.retired, attempts);
    }

    /// A folded instance came back: its total leaves the retired sum and is
    /// live again. Retired goes down first, so a concurrent publish can only
    /// see too little (ignored by the max), never the same attempts twice.
    pub(super) fn unretire(&self, attempts: u64) {
        saturating_sub(&self.retired, attempts);
        saturating_add(&self.live, attempts);
    }

    fn publish(&self) {
        // Retired is read first: whoever sees a retire's increment also sees
        // the live decrement that preceded it.
        let retired = self.retired.load(SeqCst);
        let computed = retired.saturating_add(self.live.load(SeqCst));
        self.exported.fetch_max(computed, SeqCst);
    }
}

/// Sums never wrap: a wrapped sum would hide other agents' attempts behind
/// a counter near 2^64 (ingest bounds each report far below that).
fn saturating_add(value: &AtomicU64, n: u64) {
    // The closure always returns Some, so the update cannot fail.
    let _ = value.fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_add(n)));
}

fn saturating_sub(value: &AtomicU64, n: u64) {
    let _ = value.fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(n)));
}

/// What one ingest stream has resolved (series, window), so a steady agent
/// costs one local hash lookup per delta.
///
/// Every agent stream holds one, so it stores no names and no hashes: the
/// index holds entry numbers under a keyed hash of (namespace, service, pod,
/// port, process), recomputed from an entry's own series labels when the
/// index grows, and a hit counts only once the entry's labels and port equal
/// the name (a collision is a miss, never another series' count). An entry
/// folded into the overflow series by MAX_SERIES does not carry the name it
/// was asked for, so it is never cached: past MAX_SERIES a new series costs
/// a lookup in the store per delta, and is still counted.
///
/// A snapshot sizes the cache to its series and later series grow it by an
/// eighth, not by doubling: a node's ~200 entries take 200 slots (4.7 KiB)
/// rather than the 256 of a Vec grown one push at a time, or 400 after
/// one new series.
#[derive(Default)]
pub struct SeriesCache {
    index: HashTable<u16>,
    entries: Vec<Resolved>,
    /// The last folded entry resolved (not cached, see above).
    uncached: Option<Resolved>,
    hasher: RandomState,
}

impl SeriesCache {
    /// An empty cache with room for `series` entries.
    pub(super) fn with_capacity(series: usize) -> Self {
        let series = series.min(STREAM_CACHE_LIMIT);
        Self {
            index: HashTable::with_capacity(series),
            entries: Vec::with_capacity(series),
            ..Self::default()
        }
    }

    /// Gives back the room a snapshot's refused or folded series did not use.
    pub(super) fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
    }
}
/// Why an entry was refused for a cap rather than counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapRefusal {
    /// MAX_SERVICES Services already have series on this replica.
    MaxServices,
    /// The instance already reported MAX_SERVICES_PER_AGENT Services.
    MaxServicesPerAgent,
}

impl CapRefusal {
    /// The `reason` label of `itw_scaler_refused_entries_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::MaxServices => "max_services",
            Self::MaxServicesPerAgent => "max_services_per_agent",
        }
    }

    pub fn setting(self) -> &'static str {
        match self {
            Self::MaxServices => "MAX_SERVICES",
            Self::MaxServicesPerAgent => "MAX_SERVICES_PER_AGENT",
        }
    }
}

pub(super) struct Resolved {
    pub(super) series: Arc<SeriesSlot>,
    /// Counted in the overflow series because MAX_SERIES was reached.
    pub(super) folded: bool,
    pub(super) service: Arc<ServiceEntry>,
    pub(super) port: u16,
}

/// The cache's keyed hash of a series name.
fn name_hash(hasher: &RandomState, name: &SeriesName<'_>) -> u64 {
    hasher.hash_one((
        name.namespace,
        name.service,
        name.pod,
        name.port,
        name.process_comm,
    ))
}

impl Resolved {
    /// The name this entry answers to (the one it was cached under: only
    /// entries whose labels and port are that name are ever hits).
    fn name(&self) -> SeriesName<'_> {
        let labels = self.series.labels();
        SeriesName {
            namespace: &labels.destination_namespace,
            service: &labels.destination_service,
            port: self.port,
            pod: &labels.destination_pod,
            process_comm: &labels.process_comm,
        }
    }

    /// Whether this entry is the one `name` resolves to.
    fn is(&self, name: &SeriesName<'_>) -> bool {
        let labels = self.series.labels();
        !self.folded
            && self.port == name.port
            && *labels.process_comm == *name.process_comm
            && *labels.destination_service == *name.service
            && *labels.destination_pod == *name.pod
            && *labels.destination_namespace == *name.namespace
    }
}

impl Store {
    /// The series, window and destination a report names, from the stream's
    /// cache when it has them. A Service new to the instance (a cache miss
    /// whose Service is not in `services`) is admitted only under
    /// MAX_SERVICES_PER_AGENT, and a Service new to the replica only under
    /// MAX_SERVICES; a refusal creates nothing.
    pub(super) fn resolve<'c>(
        &self,
        cache: &'c mut SeriesCache,
        name: &SeriesName<'_>,
        services: &mut AgentServices,
    ) -> Result<&'c mut Resolved, CapRefusal> {
        let hash = name_hash(&cache.hasher, name);
        let cached = cache
            .index
            .find(hash, |&i| {
                cache.entries.get(i as usize).is_some_and(|e| e.is(name))
            })
            .map(|&i| i as usize);
        if let Some(i) = cached {
            return Ok(&mut cache.entries[i]);
        }
        let zero = self.admit_service(name.namespace, name.service, services)?;
        let (series, folded) = self.series_slot(name, zero);
        let resolved = Resolved {
            series,
            folded,
            service: self.service_entry(name.namespace, name.service),
            port: name.port,
        };
        if resolved.folded {
            return Ok(cache.uncached.insert(resolved));
        }
        if cache.entries.len() >= STREAM_CACHE_LIMIT {
            cache.index.clear();
            cache.entries.clear();
        }
        let i = cache.entries.len();
        reserve_by_an_eighth(&mut cache.entries, 1);
        cache.entries.push(resolved);
        // STREAM_CACHE_LIMIT keeps the index within u16.
        let (index, entries, hasher) = (&mut cache.index, &cache.entries, &cache.hasher);
        index.insert_unique(hash, i as u16, |&j| {
            entries
                .get(j as usize)
                .map_or(0, |e| name_hash(hasher, &e.name()))
        });
        Ok(&mut cache.entries[i])
    }

    /// Admits a Service to the instance (a batch's or snapshot's entry, a
    /// snapshot's history) and returns its zero series: a Service new to
    /// the instance is admitted only under MAX_SERVICES_PER_AGENT, and one
    /// new to the replica only under MAX_SERVICES (its zero series created
    /// then); a refusal creates nothing.
    pub(super) fn admit_service(
        &self,
        namespace: &str,
        service: &str,
        services: &mut AgentServices,
    ) -> Result<Arc<SeriesSlot>, CapRefusal> {
        // A Service without a zero series yet is new to every instance.
        let existing = self.existing_series(&series_key(namespace, service, "", ""));
        if let Some(zero) = &existing
            && services.contains(zero)
        {
            return Ok(Arc::clone(zero));
        }
        if services.len() >= self.limits.max_services_per_agent {
            return Err(CapRefusal::MaxServicesPerAgent);
        }
        let zero = match existing {
            Some(zero) => zero,
            None => self.zero_series(namespace, service)?,
        };
        services.insert(&zero);
        Ok(zero)
    }

    fn existing_series(&self, key: &str) -> Option<Arc<SeriesSlot>> {
        self.series.get(key).map(|slot| Arc::clone(&slot))
    }

    /// The series a report counts in: its own, or (past MAX_SERIES) its
    /// service's overflow series. `zero` is the Service's zero series,
    /// created with its first report so that `rate()` sees the Service's
    /// first attempt. A new series shares the zero series' namespace, name
    /// and empty pod label: one string allocated per series (its process
    /// name, or pod), not four.
    fn series_slot(&self, name: &SeriesName<'_>, zero: Arc<SeriesSlot>) -> (Arc<SeriesSlot>, bool) {
        let (ns, svc) = (name.namespace, name.service);
        if name.pod.is_empty() && name.process_comm.is_empty() {
            return (zero, false);
        }
        if name.pod.is_empty() && name.process_comm == OVERFLOW_COMM {
            return (self.service_level_series(&zero, OVERFLOW_COMM), false);
        }
        let key = series_key(ns, svc, name.pod, name.process_comm);
        if let Some(slot) = self.series.get(key.as_str()) {
            return (Arc::clone(&slot), false);
        }
        let reserved = self
            .detailed_series
            .fetch_update(SeqCst, SeqCst, |n| {
                (n < self.limits.max_series).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            return (self.service_level_series(&zero, OVERFLOW_COMM), true);
        }
        let mut created = false;
        let slot = self
            .series
            .entry(key.into_boxed_str())
            .or_insert_with(|| {
                created = true;
                let mut labels = zero.labels().clone();
                if !name.pod.is_empty() {
                    labels.destination_pod = name.pod.into();
                }
                labels.process_comm = name.process_comm.into();
                Arc::new(SeriesSlot::new(labels))
            })
            .clone();
        if !created {
            self.detailed_series.fetch_sub(1, SeqCst);
        }
        (slot, false)
    }

    /// The Service's zero series (`process_comm` empty, no pod), created
    /// with its first report unless MAX_SERVICES Services have series.
    /// Series are never removed, so a Service admitted once stays admitted.
    fn zero_series(&self, ns: &str, svc: &str) -> Result<Arc<SeriesSlot>, CapRefusal> {
        let key = series_key(ns, svc, "", "");
        if let Some(slot) = self.series.get(key.as_str()) {
            return Ok(Arc::clone(&slot));
        }
        let reserved = self
            .services_with_series
            .fetch_update(SeqCst, SeqCst, |n| {
                (n < self.limits.max_services).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            return Err(CapRefusal::MaxServices);
        }
        let mut created = false;
        let slot = self
            .series
            .entry(key.into_boxed_str())
            .or_insert_with(|| {
                created = true;
                Arc::new(SeriesSlot::new(AttemptLabels::service(ns, svc)))
            })
            .clone();
        if created {
            self.metrics.services.inc();
        } else {
            self.services_with_series.fetch_sub(1, SeqCst);
        }
        Ok(slot)
    }

    /// A series without a pod: the overflow series (or the zero series of a
    /// Service that has one). At most two per Service, outside MAX_SERIES, so
    /// that cap never loses a count.
    fn service_level_series(&self, zero: &SeriesSlot, comm: &str) -> Arc<SeriesSlot> {
        let labels = zero.labels();
        let key = series_key(
            &labels.destination_namespace,
            &labels.destination_service,
            "",
            comm,
        );
        if let Some(slot) = self.series.get(key.as_str()) {
            return Arc::clone(&slot);
        }
        self.series
            .entry(key.into_boxed_str())
            .or_insert_with(|| {
                let mut labels = labels.clone();
                labels.process_comm = comm.into();
                Arc::new(SeriesSlot::new(labels))
            })
            .clone()
    }

    /// Every exported series, ordered by labels.
    pub fn attempt_series(&self) -> Vec<Arc<SeriesSlot>> {
        let mut all: Vec<_> = self.series.iter().map(|e| Arc::clone(e.value())).collect();
        all.sort_unstable_by(|a, b| a.labels.cmp(&b.labels));
        all
    }
}

/// Key of an exported series. Namespace, service and pod are Kubernetes
/// names (no NUL); the process name, which may hold anything, comes last.
fn series_key(namespace: &str, service: &str, pod: &str, comm: &str) -> String {
    let mut key =
        String::with_capacity(namespace.len() + service.len() + pod.len() + comm.len() + 3);
    for part in [namespace, service, pod] {
        key.push_str(part);
        key.push('\0');
    }
    key.push_str(comm);
    key
}

#[cfg(test)]
mod tests {
    use super::super::{fixtures::*, *};
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sums_saturate_instead_of_wrapping() {
        let slot = SeriesSlot::new(AttemptLabels::service("apps", "web"));
        slot.add_live(u64::MAX - 500);
        slot.add_live(100);
        assert_eq!(slot.exported(), u64::MAX - 400);
        slot.add_live(1000);
        assert_eq!(slot.exported(), u64::MAX);
        slot.retire(u64::MAX);
        slot.add_live(7);
        assert_eq!(slot.live.load(SeqCst), 7);
        assert_eq!(slot.retired.load(SeqCst), u64::MAX);
        assert_eq!(slot.exported(), u64::MAX);
        slot.sub_live(10);
        assert_eq!(slot.live.load(SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn exported_counters_never_decrease() {
        let store = store();
        let mut cache = SeriesCache::default();
        let curl = name("web", 80, "", "curl");
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        store
            .apply_batch(&conn, &batch(1, START_MS, vec![(curl, 10)]), &mut cache)
            .unwrap();
        drop(conn);
        // The agent lost acks and under-reports: the export holds at 10.
        let (conn, _) = store.hello("node-1", "a", SECRET).unwrap();
        store
            .apply_snapshot(
                &conn,
                &snapshot(1, START_MS, vec![(curl, 7)], vec![]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 10));
        store
            .apply_batch(&conn, &batch(2, START_MS, vec![(curl, 2)]), &mut cache)
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 10));
        store
            .apply_batch(&conn, &batch(3, START_MS, vec![(curl, 2)]), &mut cache)
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 11));
        // A snapshot leaving a series out counts it as 0 for the instance:
        // still no decrease.
        store
            .apply_snapshot(&conn, &snapshot(3, START_MS, vec![], vec![]), &mut cache)
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 11));
    }

    #[tokio::test(start_paused = true)]
    async fn past_max_series_counts_fold_into_the_service_overflow_series() {
        let store = store_with(Limits {
            max_series: 2,
            ..Limits::default()
        });
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let deltas = vec![
            (name("web", 80, "", "curl"), 1),
            (name("web", 80, "web-0", "curl"), 2),
            (name("web", 80, "", "wget"), 3),
            (name("web", 80, "", "nc"), 4),
            (name("db", 5432, "", "psql"), 5),
            (name("web", 80, "", ""), 6),
            (name("web", 443, "", "curl"), 7),
        ];
        store
            .apply_batch(&conn, &batch(1, START_MS, deltas), &mut cache)
            .unwrap();
        assert_eq!(
            exported(&store),
            vec![
                row("db", "", "", 0),
                row("db", "", OVERFLOW_COMM, 5),
                row("web", "", "", 6),
                row("web", "", OVERFLOW_COMM, 7),
                row("web", "", "curl", 8),
                row("web", "web-0", "curl", 2),
            ]
        );
        assert_eq!(store.metrics.series_overflow.get(), 3);
        // Folded counts still count in the windows.
        assert_eq!(store.attempts("apps", "web", None, 60), 23);
    }

    /// #13 item 5: past MAX_SERVICES a new Service's entries are refused
    /// alone and counted; the rest of the batch is applied.
    #[tokio::test(start_paused = true)]
    async fn past_max_services_a_new_services_entries_are_refused_alone() {
        let store = store_with(Limits {
            max_services: 2,
            ..Limits::default()
        });
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let deltas = vec![
            (name("web", 80, "", "curl"), 1),
            (name("db", 5432, "", "psql"), 2),
            (name("cache", 6379, "", "redis"), 3),
            (name("web", 443, "web-0", "curl"), 4),
            (name("cache", 6379, "", ""), 5),
        ];
        assert_eq!(
            store.apply_batch(&conn, &batch(1, START_MS, deltas), &mut cache),
            Ok(BatchOutcome::Applied { ack: 1 })
        );
        assert_eq!(
            exported(&store),
            vec![
                row("db", "", "", 0),
                row("db", "", "psql", 2),
                row("web", "", "", 0),
                row("web", "", "curl", 1),
                row("web", "web-0", "curl", 4),
            ]
        );
        assert_eq!(store.metrics.refused_entries("max_services"), 2);
        assert_eq!(store.metrics.services.get(), 2);
        assert_eq!(store.attempts("apps", "cache", None, 60), 0);
        // Known Services keep counting, from any instance.
        let mut other = SeriesCache::default();
        let conn_b = connect(&store, "node-2", "b", START_MS, &mut other);
        let deltas = vec![
            (name("cache", 6379, "", "redis"), 1),
            (name("db", 5432, "", "psql"), 7),
        ];
        store
            .apply_batch(&conn_b, &batch(1, START_MS, deltas), &mut other)
            .unwrap();
        assert_eq!(exported(&store)[1], row("db", "", "psql", 9));
        assert_eq!(store.metrics.refused_entries("max_services"), 3);
        drop((conn, conn_b));
    }

    /// #13 item 5: one instance reports at most MAX_SERVICES_PER_AGENT
    /// Services; its snapshot says anew which ones.
    #[tokio::test(start_paused = true)]
    async fn past_max_services_per_agent_the_instances_further_services_are_refused() {
        let store = store_with(Limits {
            max_services_per_agent: 2,
            ..Limits::default()
        });
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let deltas = vec![
            (name("web", 80, "", "curl"), 1),
            (name("db", 5432, "", "psql"), 2),
            (name("cache", 6379, "", "redis"), 3),
            (name("web", 443, "", "wget"), 4),
        ];
        store
            .apply_batch(&conn, &batch(1, START_MS, deltas), &mut cache)
            .unwrap();
        assert_eq!(store.metrics.refused_entries("max_services_per_agent"), 1);
        assert_eq!(store.attempts("apps", "web", None, 60), 5);
        assert_eq!(store.attempts("apps", "cache", None, 60), 0);
        // Another instance has its own allowance.
        let mut other = SeriesCache::default();
        let conn_b = connect(&store, "node-2", "b", START_MS, &mut other);
        store
            .apply_batch(
                &conn_b,
                &batch(1, START_MS, vec![(name("cache", 6379, "", "redis"), 3)]),
                &mut other,
            )
            .unwrap();
        assert_eq!(store.attempts("apps", "cache", None, 60), 3);
        // A's snapshot names cache and web: db is now its third Service.
        let snap = snapshot(
            1,
            START_MS,
            vec![
                (name("cache", 6379, "", "redis"), 1),
                (name("web", 80, "", "curl"), 1),
                (name("db", 5432, "", "psql"), 2),
            ],
            vec![
                history("cache", 6379, S, &[1]),
                history("db", 5432, S, &[2]),
            ],
        );
        store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
        assert_eq!(store.metrics.refused_entries("max_services_per_agent"), 3);
        assert_eq!(store.attempts("apps", "cache", None, 60), 4);
        store
            .apply_batch(
                &conn,
                &batch(2, START_MS, vec![(name("db", 5432, "", "psql"), 1)]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(store.metrics.refused_entries("max_services_per_agent"), 4);
        assert_eq!(store.attempts("apps", "db", None, 60), 2);
        drop((conn, conn_b));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cache_entry_under_another_names_hash_is_a_miss_not_its_count() {
        let store = store();
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let (curl, wget) = (name("web", 80, "", "curl"), name("web", 80, "", "wget"));
        store
            .apply_batch(&conn, &batch(1, START_MS, vec![(curl, 1)]), &mut cache)
            .unwrap();
        // Make wget's hash find curl's entry, as a 64-bit collision would.
        let wget_hash = name_hash(&cache.hasher, &wget);
        cache.index.insert_unique(wget_hash, 0, |_| wget_hash);
        store
            .apply_batch(&conn, &batch(2, START_MS, vec![(wget, 5)]), &mut cache)
            .unwrap();
        let mut rows = exported(&store);
        rows.sort();
        assert_eq!(
            rows,
            vec![
                row("web", "", "", 0),
                row("web", "", "curl", 1),
                row("web", "", "wget", 5),
            ]
        );
        assert_eq!(cache.entries.len(), 2);
        // The same port on another Service or port is another entry too.
        store
            .apply_batch(
                &conn,
                &batch(3, START_MS, vec![(name("web", 81, "", "curl"), 2)]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(cache.entries.len(), 3);
        assert_eq!(store.attempts("apps", "web", Some(80), 60), 6);
        assert_eq!(store.attempts("apps", "web", Some(81), 60), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grown_cache_still_finds_every_entry() {
        // 1,000 series grow the index through several rehashes, each
        // entry's hash recomputed from its labels: a second pass over the
        // same names must hit every entry (no new entry) and count exactly.
        let store = store();
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let services: Vec<String> = (0..250).map(|i| format!("s{i}")).collect();
        let comms = ["curl", "wget", "java", ""];
        let names: Vec<_> = services
            .iter()
            .flat_map(|s| comms.map(|c| name(s, 80, "", c)))
            .collect();
        for sequence in 1..=2 {
            let deltas = names.iter().map(|n| (*n, 1)).collect();
            store
                .apply_batch(&conn, &batch(sequence, START_MS, deltas), &mut cache)
                .unwrap();
            assert_eq!(cache.entries.len(), 1_000);
            assert_eq!(cache.index.len(), 1_000);
        }
        assert_eq!(store.attempts("apps", "s0", Some(80), 60), 8);
        assert_eq!(store.attempts("apps", "s249", Some(80), 60), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_sizes_the_cache_to_its_series_and_new_ones_grow_it_by_an_eighth() {
        let store = store();
        let mut cache = SeriesCache::default();
        let (conn, _) = store.hello("node-1", "a", SECRET).unwrap();
        let services: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
        let comms = ["curl", "wget", "java", ""];
        let totals = services
            .iter()
            .flat_map(|s| comms.map(|c| (name(s, 80, "", c), 1)))
            .collect();
        store
            .apply_snapshot(&conn, &snapshot(0, START_MS, totals, vec![]), &mut cache)
            .unwrap();
        assert_eq!((cache.entries.len(), cache.entries.capacity()), (200, 200));
        assert_eq!(conn.state.lock().services.len(), 50);
        let new = name("s0", 80, "", "python3");
        store
            .apply_batch(&conn, &batch(1, START_MS, vec![(new, 2)]), &mut cache)
            .unwrap();
        assert_eq!((cache.entries.len(), cache.entries.capacity()), (201, 225));
        assert_eq!(store.attempts("apps", "s0", Some(80), 60), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn folded_entries_are_counted_every_time_and_never_cached() {
        let store = store_with(Limits {
            max_series: 1,
            ..Limits::default()
        });
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let (curl, wget) = (name("web", 80, "", "curl"), name("web", 80, "", "wget"));
        for sequence in 1..=3 {
            store
                .apply_batch(
                    &conn,
                    &batch(sequence, START_MS, vec![(curl, 1), (wget, 10)]),
                    &mut cache,
                )
                .unwrap();
        }
        assert_eq!(
            exported(&store),
            vec![
                row("web", "", "", 0),
                row("web", "", OVERFLOW_COMM, 30),
                row("web", "", "curl", 3),
            ]
        );
        assert_eq!(store.metrics.series_overflow.get(), 3);
        assert_eq!(cache.entries.len(), 1, "only curl's entry is cached");
        assert_eq!(cache.index.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_services_series_share_its_names_with_its_zero_series() {
        let store = store_with(Limits {
            max_series: 2,
            ..Limits::default()
        });
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let deltas = vec![
            (name("web", 80, "", "curl"), 1),
            (name("web", 80, "web-0", "curl"), 2),
            // Past MAX_SERIES: the overflow series.
            (name("web", 80, "", "wget"), 3),
        ];
        store
            .apply_batch(&conn, &batch(1, START_MS, deltas), &mut cache)
            .unwrap();
        let series = store.attempt_series();
        assert_eq!(series.len(), 4);
        let zero = series[0].labels();
        assert_eq!(
            (&*zero.destination_service, &*zero.process_comm),
            ("web", "")
        );
        for other in &series[1..] {
            let labels = other.labels();
            assert!(Arc::ptr_eq(
                &labels.destination_namespace,
                &zero.destination_namespace
            ));
            assert!(Arc::ptr_eq(
                &labels.destination_service,
                &zero.destination_service
            ));
        }
        let pods: Vec<_> = series
            .iter()
            .map(|s| {
                let l = s.labels();
                let shared = Arc::ptr_eq(&l.destination_pod, &zero.destination_pod);
                (
                    l.process_comm.to_string(),
                    l.destination_pod.to_string(),
                    shared,
                )
            })
            .collect();
        assert_eq!(
            pods,
            vec![
                ("".into(), "".into(), true),
                (OVERFLOW_COMM.into(), "".into(), true),
                ("curl".into(), "".into(), true),
                ("curl".into(), "web-0".into(), false),
            ]
        );
    }

    #[test]
    fn keys_are_unambiguous() {
        assert_ne!(series_key("a", "b", "", "c"), series_key("a", "b", "c", ""));
    }
}
