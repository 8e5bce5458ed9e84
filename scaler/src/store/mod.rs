//! Everything the scaler knows: the agent instances and what each reported,
//! the exported totals per series, the per-second windows per destination,
//! and the subscribers waiting for a service to become active.
//!
//! Hot paths and their locks:
//! - a batch locks its own instance, then each destination's service entry
//!   for the moment it adds to a window; series totals are atomics.
//! - GetMetrics/IsActive look the service up in a sharded map and lock only
//!   that service's entry while summing its window.
//!
//! There is no lock that every batch and every KEDA call share. The instance
//! table's lock is taken on hello, disconnect and sweep only. The store never
//! checks names nor refuses a message for one: what reaches it was checked
//! by [`crate::ingest`].
//!
//! Exported counters never decrease: each series publishes
//! `max(previous, retired + sum over live instances)`.
//!
//! - `instances.rs`: the agent instance table (hello, disconnect, sweep).
//! - `series.rs`: the exported series, MAX_SERIES, MAX_SERVICES and
//!   MAX_SERVICES_PER_AGENT, each stream's cache.
//! - `totals.rs`: an instance's cumulative attempts per series.
//! - `agent_services.rs`: the Services an instance reported, by zero series.
//! - `last_second.rs`: the counts applied in an instance's newest second.
//! - `address.rs`: hashing the store's objects by address, for those tables.
//! - `services.rs`: per-service windows, subscriptions, wakeups, activity.
//! - `apply.rs`: the checked snapshot and batch views and how they apply.
//! - `cold_start.rs`: what the cold start histograms learn from the store
//!   (a wake batch's clock offset and subscribed Services).
//! - `edges.rs`: an agent message's edges, learned into the [`Graph`].
//! - `growth.rs`: how the per-agent tables grow (by an eighth).
//! - `fixtures.rs`: the unit tests' store and view builders (tests only).
//! - `agent_state_tests.rs`: an instance's tables together (tests only).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::{
    coldstart::ColdStarts,
    config::Limits,
    graph::Graph,
    metrics::ScalerMetrics,
    window::{Clock, DEFAULT_WINDOW},
};

mod address;
mod agent_services;
mod apply;
mod cold_start;
mod edges;
mod growth;
mod instances;
mod last_second;
mod series;
mod services;
mod totals;

pub use apply::{ApplyError, BatchOutcome, BatchView, HistoryView, SeriesName, SnapshotView};
pub use instances::Connection;
use instances::Instances;
pub use instances::short_id;
pub use series::{CapRefusal, SeriesCache, SeriesSlot};
pub use services::{Activity, ServiceEntry, Subscription};
use services::{Wakeups, destination_key};

/// The scaler's state, shared by every ingest stream and KEDA call.
pub struct Store {
    clock: Clock,
    limits: Limits,
    metrics: Arc<ScalerMetrics>,
    /// Longest window any trigger asked for, in seconds.
    longest_window: AtomicU64,
    /// Keyed `namespace/service`.
    services: DashMap<Box<str>, Arc<ServiceEntry>>,
    windowed_destinations: AtomicUsize,
    /// Non-empty seconds held in all windows (MAX_WINDOW_BUCKETS).
    window_buckets: AtomicUsize,
    /// Keyed by `series::series_key`.
    series: DashMap<Box<str>, Arc<SeriesSlot>>,
    /// Series with a pod or a process name: the ones MAX_SERIES caps.
    detailed_series: AtomicUsize,
    /// Services with a zero series: the ones MAX_SERVICES caps.
    services_with_series: AtomicUsize,
    instances: Mutex<Instances>,
    cold_starts: ColdStarts,
    graph: Graph,
}

impl Store {
    pub fn new(clock: Clock, limits: Limits, metrics: Arc<ScalerMetrics>) -> Self {
        Self {
            cold_starts: ColdStarts::new(limits.max_services, Arc::clone(&metrics.cold_start)),
            clock,
            limits,
            metrics,
            longest_window: AtomicU64::new(0),
            services: DashMap::new(),
            windowed_destinations: AtomicUsize::new(0),
            window_buckets: AtomicUsize::new(0),
            series: DashMap::new(),
            detailed_series: AtomicUsize::new(0),
            services_with_series: AtomicUsize::new(0),
            instances: Mutex::new(Instances::default()),
            graph: Graph::new(limits.edge_max_age, limits.max_edges),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The dependency graph the agents' edges teach.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Seconds of history kept and asked of agents: the longest window any
    /// trigger asked for (at least the default window), capped by MAX_WINDOW.
    pub fn history_secs(&self) -> u64 {
        self.longest_window
            .load(SeqCst)
            .max(DEFAULT_WINDOW.as_secs())
            .min(self.limits.max_window.as_secs())
    }

    /// Records a trigger's window. History only grows while the process
    /// runs: a trigger that goes away may come back.
    pub fn note_window(&self, window: Duration) {
        self.longest_window.fetch_max(window.as_secs(), SeqCst);
    }

    /// Housekeeping: folds instances gone longer than INSTANCE_RETENTION,
    /// drops window seconds older than the history and entries left empty,
    /// and updates the gauges.
    pub fn sweep(&self) {
        let started = Instant::now();
        self.sweep_instances();
        self.sweep_services();
        self.sweep_edges();
        self.metrics
            .sweep_time
            .observe(started.elapsed().as_secs_f64());
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod agent_state_tests;
#[cfg(test)]
mod fixtures;
