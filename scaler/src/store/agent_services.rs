//! The Services one agent instance has reported (MAX_SERVICES_PER_AGENT).
//!
//! Each Service is named by its zero series, which the store creates with
//! the Service's first report and never removes: the `Arc` is the
//! Service's interned id, 8 bytes an entry, with no name kept per instance
//! and nothing to leak when a Service goes quiet (there are at most
//! MAX_SERVICES zero series, whoever reports them).

use std::sync::Arc;

use hashbrown::HashTable;

use super::{SeriesSlot, address::address_hash};

#[derive(Debug, Default)]
pub(super) struct AgentServices {
    /// Zero series, keyed by their address.
    table: HashTable<Arc<SeriesSlot>>,
}

impl AgentServices {
    pub(super) fn contains(&self, zero: &Arc<SeriesSlot>) -> bool {
        self.table
            .find(address_hash(zero), |s| Arc::ptr_eq(s, zero))
            .is_some()
    }

    /// Adds the Service whose zero series is `zero` (once).
    pub(super) fn insert(&mut self, zero: &Arc<SeriesSlot>) {
        self.table
            .entry(address_hash(zero), |s| Arc::ptr_eq(s, zero), address_hash)
            .or_insert_with(|| Arc::clone(zero));
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use itw_telemetry::exposition::AttemptLabels;

    use super::*;

    fn zero(service: &str) -> Arc<SeriesSlot> {
        Arc::new(SeriesSlot::new(AttemptLabels::service("apps", service)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_is_held_once_by_its_zero_series() {
        let (web, db) = (zero("web"), zero("db"));
        let mut services = AgentServices::default();
        assert!(!services.contains(&web));
        services.insert(&web);
        services.insert(&web);
        services.insert(&db);
        assert_eq!(services.len(), 2);
        assert!(services.contains(&web) && services.contains(&db));
        // The same labels in another series are another Service's zero
        // series: never confused with this one.
        assert!(!services.contains(&zero("web")));
        // The set holds the series, and nothing else does.
        assert_eq!(Arc::strong_count(&web), 2);
        drop(services);
        assert_eq!(Arc::strong_count(&web), 1);
    }
}
