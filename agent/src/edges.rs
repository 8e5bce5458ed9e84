//! The agent's edges "Service A calls Service B": seen in attributed
//! attempts (`Collection.edges`) or declared by the annotation
//! `internal-tcp-watcher.io/wakes` on A. The [`EdgeBook`] decides which go
//! out with the next batch and which the snapshot carries.
//!
//! An edge is sent when it is new (or newly declared), then again at most
//! once per `EDGE_MAX_AGE / REFRESH_DIVISOR` while it is still seen, so
//! steady traffic sends no edges at all: the scalers keep an edge for their
//! own EDGE_MAX_AGE after its last refresh. An edge not seen for
//! EDGE_MAX_AGE is dropped here too; a declared edge is seen for as long as
//! the annotation says it. At most MAX_EDGES are held; a new one past that
//! is refused and counted (`itw_agent_edges_refused_total`).
//!
//! This module never blocks and never sends: the ledger calls it under its
//! own lock.
//!
//! - `declared.rs`: the declared edges, followed through the map events.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use itw_proto::itw::v1::Edge;

use crate::resolve::ServiceRef;

pub mod declared;

/// An edge is sent again at most once per this fraction of the age.
pub const REFRESH_DIVISOR: i64 = 4;

/// "from calls to".
pub type EdgeKey = (ServiceRef, ServiceRef);

/// Bounds of the edge book (MAX_EDGES, EDGE_MAX_AGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeLimits {
    pub max_edges: usize,
    pub max_age: Duration,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            max_edges: 10_000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Held {
    last_seen_ms: i64,
    /// When it last went out in a batch.
    sent_ms: i64,
    declared: bool,
}

/// The edges this agent holds.
#[derive(Debug)]
pub struct EdgeBook {
    max_edges: usize,
    max_age_ms: i64,
    held: HashMap<EdgeKey, Held>,
    /// What the wakes annotations declare now.
    declared: BTreeSet<EdgeKey>,
    /// New edges refused for MAX_EDGES, since start.
    refused: u64,
}

impl EdgeBook {
    pub fn new(limits: EdgeLimits) -> Self {
        Self {
            max_edges: limits.max_edges,
            max_age_ms: i64::try_from(limits.max_age.as_millis()).unwrap_or(i64::MAX),
            held: HashMap::new(),
            declared: BTreeSet::new(),
            refused: 0,
        }
    }

    /// Replaces the declared edges; they count as seen from the next
    /// [`EdgeBook::note`] on. An edge from a Service to itself is left out
    /// (a Service's own callers already wake it).
    pub fn declare(&mut self, edges: impl IntoIterator<Item = EdgeKey>) {
        self.declared = edges.into_iter().filter(|(a, b)| a != b).collect();
    }

    /// Notes the edges seen at `now_ms` (plus every declared one), drops
    /// those not seen for EDGE_MAX_AGE, and returns the ones due to go out:
    /// new, newly declared, or last sent a refresh interval ago.
    pub fn note(&mut self, seen: &[EdgeKey], now_ms: i64) -> Vec<Edge> {
        let refresh_ms = self.max_age_ms / REFRESH_DIVISOR;
        let oldest = now_ms.saturating_sub(self.max_age_ms);
        let declared = std::mem::take(&mut self.declared);
        self.held.retain(|key, h| {
            // No longer declared: kept while seen in traffic, or until it ages out.
            h.declared &= declared.contains(key);
            h.last_seen_ms >= oldest
        });
        let mut due = Vec::new();
        for key in seen.iter().chain(declared.iter()) {
            if key.0 == key.1 {
                continue;
            }
            let is_declared = declared.contains(key);
            let full = self.held.len() >= self.max_edges;
            match self.held.get_mut(key) {
                Some(held) => {
                    held.last_seen_ms = held.last_seen_ms.max(now_ms);
                    let newly_declared = is_declared && !held.declared;
                    held.declared = is_declared;
                    if newly_declared || now_ms.saturating_sub(held.sent_ms) >= refresh_ms {
                        held.sent_ms = now_ms;
                        due.push(wire(key, held));
                    }
                }
                None if full => self.refused += 1,
                None => {
                    let held = Held {
                        last_seen_ms: now_ms,
                        sent_ms: now_ms,
                        declared: is_declared,
                    };
                    due.push(wire(key, &held));
                    self.held.insert(key.clone(), held);
                }
            }
        }
        self.declared = declared;
        // An edge both seen and declared is noted twice: sent once.
        due.sort_by(|a, b| edge_order(a).cmp(&edge_order(b)));
        due.dedup_by(|a, b| edge_order(a) == edge_order(b));
        due
    }

    /// Every edge held, with its last_seen, for a snapshot.
    pub fn all(&self) -> Vec<Edge> {
        let mut all: Vec<Edge> = self.held.iter().map(|(k, h)| wire(k, h)).collect();
        all.sort_by(|a, b| edge_order(a).cmp(&edge_order(b)));
        all
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// New edges refused for MAX_EDGES since start.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

fn wire((from, to): &EdgeKey, held: &Held) -> Edge {
    Edge {
        from_namespace: from.namespace.to_string(),
        from_service: from.name.to_string(),
        to_namespace: to.namespace.to_string(),
        to_service: to.name.to_string(),
        last_seen_unix_ms: held.last_seen_ms,
        declared: held.declared,
    }
}

fn edge_order(e: &Edge) -> (&str, &str, &str, &str) {
    (
        &e.from_namespace,
        &e.from_service,
        &e.to_namespace,
        &e.to_service,
    )
}

#[cfg(test)]
mod tests;
