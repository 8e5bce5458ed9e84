//! The dependency graph: edges "Service A calls Service B" that agents
//! learned from attributed attempts or from the `internal-tcp-watcher.io/wakes`
//! annotation, as this replica holds them.
//!
//! The graph is a union over every agent instance: one entry per edge with
//! the newest `last_seen` any instance reported (on this replica's clock),
//! and whether any instance declared it. An edge not seen for EDGE_MAX_AGE
//! is dropped; past MAX_EDGES a new edge is refused (the caller counts it).
//! Agents' snapshots carry their edges, so a restarted replica learns the
//! graph again as it learns the counts.
//!
//! It never holds a lock while anything waits: lookups copy what they need.
//! Watchers (pre-wake streams) hear of a change of the *set* of edges (one
//! added or dropped) through [`Graph::changes`]; a refresh of a known edge
//! rings nothing, so steady traffic wakes no task.
//!
//! - `check.rs`: an agent message's edges, checked (names, times, sizes).
//! - `service.rs`: the read-only `itw.v1.Graph` gRPC service.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use parking_lot::RwLock;
use tokio::sync::watch;

pub mod check;
pub mod service;

pub use check::EdgeView;

/// A Service, as an end of an edge.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
}

impl ServiceName {
    pub fn new(namespace: &str, service: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service: service.into(),
        }
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service)
    }
}

/// One edge as the graph holds it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    pub from: ServiceName,
    pub to: ServiceName,
    /// Unix ms, this replica's clock.
    pub last_seen_ms: i64,
    pub declared: bool,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    last_seen_ms: i64,
    declared: bool,
}

/// What [`Graph::learn`] did with one edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// A new edge.
    Added,
    /// A known edge; its last_seen moved forward if this one is newer.
    Refreshed,
    /// Seen longer ago than EDGE_MAX_AGE: nothing to keep.
    Stale,
    /// New, but MAX_EDGES edges are held.
    Refused,
}

/// The edges held, keyed by their destination (pre-wake walks them
/// backwards, from the Service it wakes to its callers).
pub struct Graph {
    max_age_ms: i64,
    max_edges: usize,
    edges: RwLock<Edges>,
    changed: watch::Sender<()>,
}

#[derive(Default)]
struct Edges {
    /// to -> (from -> seen)
    callers: HashMap<ServiceName, HashMap<ServiceName, Seen>>,
    count: usize,
}

impl Graph {
    /// A graph keeping edges for `max_age` (EDGE_MAX_AGE), at most
    /// `max_edges` (MAX_EDGES) of them.
    pub fn new(max_age: Duration, max_edges: usize) -> Self {
        Self {
            max_age_ms: i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX),
            max_edges,
            edges: RwLock::new(Edges::default()),
            changed: watch::Sender::new(()),
        }
    }

    /// Edges held now.
    pub fn len(&self) -> usize {
        self.edges.read().count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rung whenever an edge is added or dropped.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Oldest last_seen still kept at `now_ms`.
    fn oldest_kept(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.max_age_ms)
    }

    /// Learns one message's edges, seen at `last_seen_ms` on this replica's
    /// clock (the caller corrects the agent's clock); one answer per edge,
    /// in order. Rings the watchers once if any edge was added.
    pub fn learn(&self, edges: &[(EdgeView<'_>, i64)], now_ms: i64) -> Vec<Learned> {
        let oldest = self.oldest_kept(now_ms);
        let mut out = Vec::with_capacity(edges.len());
        let mut added = false;
        let mut held = self.edges.write();
        for (edge, last_seen_ms) in edges {
            let last_seen_ms = (*last_seen_ms).min(now_ms);
            if last_seen_ms < oldest {
                out.push(Learned::Stale);
                continue;
            }
            let key_to = ServiceName::new(edge.to.0, edge.to.1);
            let key_from = ServiceName::new(edge.from.0, edge.from.1);
            let Edges { callers, count } = &mut *held;
            if let Some(seen) = callers.get_mut(&key_to).and_then(|c| c.get_mut(&key_from)) {
                seen.last_seen_ms = seen.last_seen_ms.max(last_seen_ms);
                seen.declared |= edge.declared;
                out.push(Learned::Refreshed);
                continue;
            }
            if *count >= self.max_edges {
                out.push(Learned::Refused);
                continue;
            }
            callers.entry(key_to).or_default().insert(
                key_from,
                Seen {
                    last_seen_ms,
                    declared: edge.declared,
                },
            );
            *count += 1;
            added = true;
            out.push(Learned::Added);
        }
        drop(held);
        if added {
            self.changed.send_replace(());
        }
        out
    }

    /// Drops the edges not seen for EDGE_MAX_AGE; returns how many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let oldest = self.oldest_kept(now_ms);
        let mut held = self.edges.write();
        let Edges { callers, count } = &mut *held;
        let before = *count;
        callers.retain(|_, from| {
            from.retain(|_, seen| seen.last_seen_ms >= oldest);
            !from.is_empty()
        });
        *count = callers.values().map(HashMap::len).sum();
        let dropped = before - *count;
        drop(held);
        if dropped > 0 {
            self.changed.send_replace(());
        }
        dropped
    }

    /// Every edge kept at `now_ms`, touching `namespace` at either end if
    /// given, sorted by from then to.
    pub fn list(&self, namespace: Option<&str>, now_ms: i64) -> Vec<Edge> {
        let oldest = self.oldest_kept(now_ms);
        let held = self.edges.read();
        let mut out: Vec<Edge> = held
            .callers
            .iter()
            .flat_map(|(to, from)| {
                from.iter().map(move |(from, seen)| Edge {
                    from: from.clone(),
                    to: to.clone(),
                    last_seen_ms: seen.last_seen_ms,
                    declared: seen.declared,
                })
            })
            .filter(|e| e.last_seen_ms >= oldest)
            .filter(|e| {
                namespace.is_none_or(|ns| &*e.from.namespace == ns || &*e.to.namespace == ns)
            })
            .collect();
        drop(held);
        out.sort();
        out
    }

    /// Every Service that reaches `target` through edges kept at `now_ms`
    /// (its callers, their callers, ...), nearest first, `target` itself
    /// left out even when a cycle leads back to it.
    pub fn upstream(&self, target: &ServiceName, now_ms: i64) -> Vec<ServiceName> {
        let oldest = self.oldest_kept(now_ms);
        let held = self.edges.read();
        let mut seen: HashSet<&ServiceName> = HashSet::from([target]);
        let mut queue: VecDeque<&ServiceName> = VecDeque::from([target]);
        let mut out = Vec::new();
        while let Some(next) = queue.pop_front() {
            let Some(callers) = held.callers.get(next) else {
                continue;
            };
            let mut fresh: Vec<&ServiceName> = callers
                .iter()
                .filter(|(from, s)| s.last_seen_ms >= oldest && !seen.contains(*from))
                .map(|(from, _)| from)
                .collect();
            // Sorted so the answer does not depend on hashing.
            fresh.sort();
            for from in fresh {
                seen.insert(from);
                queue.push_back(from);
                out.push(from.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
