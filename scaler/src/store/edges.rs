//! An agent message's checked edges, learned into the [`Graph`] on this
//! replica's clock, and the graph's part of the housekeeping sweep.
//!
//! [`Graph`]: crate::graph::Graph

use itw_telemetry::logging::LogBudget;

use super::{Connection, Store, gauge_value};
use crate::graph::{EdgeView, Learned};

/// Warnings for edges refused for MAX_EDGES: at most 10 a minute over all
/// streams (every one counted in itw_scaler_refused_entries_total).
static EDGE_CAP_LOG: LogBudget = LogBudget::new(10, std::time::Duration::from_secs(60));

impl Store {
    /// Learns the edges of a message the instance's stream has applied;
    /// `list` names them in a warning (`batch.edges`). The agent's times are
    /// corrected by the clock offset measured at its snapshot. Returns how
    /// many were refused for MAX_EDGES (each counted and, within a budget,
    /// logged).
    pub fn learn_edges(&self, conn: &Connection, list: &str, edges: &[EdgeView<'_>]) -> usize {
        if edges.is_empty() {
            return 0;
        }
        let offset = conn.state.lock().offset_ms.unwrap_or(0);
        let timed: Vec<_> = edges
            .iter()
            .map(|e| (*e, e.last_seen_ms.saturating_add(offset)))
            .collect();
        let learned = self.graph.learn(&timed, self.clock.now_ms());
        let mut refused = 0;
        for (i, outcome) in learned.iter().enumerate() {
            if *outcome != Learned::Refused {
                continue;
            }
            refused += 1;
            self.metrics.refused_entry("max_edges");
            if let Some(left_out) = EDGE_CAP_LOG.allow() {
                let e = &edges[i];
                tracing::warn!(
                    field = %format_args!("{list}[{i}]"),
                    edge = %format_args!("{}/{} -> {}/{}", e.from.0, e.from.1, e.to.0, e.to.1),
                    setting = "MAX_EDGES",
                    limit = self.limits.max_edges,
                    left_out,
                    "edge refused: MAX_EDGES edges held; the rest of the message applied (at most 10 such lines a minute; all counted in itw_scaler_refused_entries_total)",
                );
            }
        }
        if learned.contains(&Learned::Added) {
            self.metrics
                .service_edges
                .set(gauge_value(self.graph.len()));
        }
        refused
    }

    /// Drops edges older than EDGE_MAX_AGE and updates their gauge.
    pub(super) fn sweep_edges(&self) {
        self.graph.sweep(self.clock.now_ms());
        self.metrics
            .service_edges
            .set(gauge_value(self.graph.len()));
    }
}
