//! The counts an instance's batches applied within its newest agent second,
//! which a snapshot's history of that second is measured against so that a
//! resent second adds only what was not applied yet (see
//! [`Store::apply_snapshot`](super::Store::apply_snapshot)).
//!
//! Kept per entry a delta resolved to, (series, port), rather than per
//! destination name: a batch adds to it without writing a
//! `namespace/service:port` key per delta, and an instance keeps no key
//! string per destination (24 bytes an entry, where a map of names took 24
//! plus a 40-byte string). A snapshot asks per destination and gets the sum
//! over that destination's series: every series of a Service (its zero,
//! overflow and detailed ones) carries the Service's namespace and name.

use std::{collections::HashMap, sync::Arc};

use hashbrown::HashTable;

use super::{SeriesSlot, address::address_hash, destination_key};

#[derive(Debug, Default)]
pub(super) struct LastSecondCounts {
    table: HashTable<(Arc<SeriesSlot>, u16, u64)>,
}

fn entry_hash(series: &Arc<SeriesSlot>, port: u16) -> u64 {
    address_hash(series) ^ u64::from(port).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl LastSecondCounts {
    /// A new second: nothing applied in it yet (the table keeps its room,
    /// which the next second's batches fill again).
    pub(super) fn clear(&mut self) {
        self.table.clear();
    }

    /// Adds `attempts` applied to `series` on `port` (saturating).
    pub(super) fn add(&mut self, series: &Arc<SeriesSlot>, port: u16, attempts: u64) {
        let entry = self
            .table
            .entry(
                entry_hash(series, port),
                |(s, p, _)| *p == port && Arc::ptr_eq(s, series),
                |(s, p, _)| entry_hash(s, *p),
            )
            .or_insert_with(|| (Arc::clone(series), port, 0))
            .into_mut();
        entry.2 = entry.2.saturating_add(attempts);
    }

    /// The counts per destination, keyed `namespace/service:port`.
    pub(super) fn per_destination(&self) -> HashMap<String, u64> {
        let mut sums = HashMap::with_capacity(self.table.len());
        for (series, port, count) in &self.table {
            let labels = series.labels();
            let key = destination_key(
                &labels.destination_namespace,
                &labels.destination_service,
                *port,
            );
            let sum: &mut u64 = sums.entry(key).or_default();
            *sum = sum.saturating_add(*count);
        }
        sums
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use itw_telemetry::exposition::AttemptLabels;

    use super::*;

    fn slot(service: &str, comm: &str) -> Arc<SeriesSlot> {
        let mut labels = AttemptLabels::service("apps", service);
        labels.process_comm = comm.into();
        Arc::new(SeriesSlot::new(labels))
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_is_the_sum_of_its_series_on_its_port() {
        let (zero, curl, db) = (slot("web", ""), slot("web", "curl"), slot("db", "psql"));
        let mut counts = LastSecondCounts::default();
        counts.add(&curl, 80, 2);
        counts.add(&zero, 80, 3);
        counts.add(&curl, 80, 4);
        counts.add(&curl, 443, 1);
        counts.add(&db, 5432, u64::MAX);
        counts.add(&db, 5432, 1);
        assert_eq!(counts.len(), 4);
        let mut sums: Vec<_> = counts.per_destination().into_iter().collect();
        sums.sort();
        assert_eq!(
            sums,
            [
                ("apps/db:5432".to_owned(), u64::MAX),
                ("apps/web:443".to_owned(), 1),
                ("apps/web:80".to_owned(), 9),
            ]
        );
        counts.clear();
        assert_eq!(counts.len(), 0);
        assert!(counts.per_destination().is_empty());
        // Cleared entries hold no series any more.
        assert_eq!(Arc::strong_count(&curl), 1);
    }
}
