//! An agent instance's cumulative attempts per series, the counts its
//! snapshot replaces and its batches add to.
//!
//! Every instance holds one with an entry per series it reported (about 200
//! for a node), so an entry is only the series and its count: the table is
//! keyed by the series' address, computed from the entry rather than stored
//! beside it (16 bytes an entry instead of the 24 of a map keyed by the
//! address). Nothing here touches the series' exported counters.

use std::sync::Arc;

use hashbrown::HashTable;

use super::SeriesSlot;

#[derive(Debug, Default)]
pub(super) struct SeriesTotals {
    table: HashTable<(Arc<SeriesSlot>, u64)>,
}

impl SeriesTotals {
    pub(super) fn with_capacity(entries: usize) -> Self {
        Self {
            table: HashTable::with_capacity(entries),
        }
    }

    /// Adds `attempts` to `series`' total (saturating), creating it at 0.
    pub(super) fn add(&mut self, series: &Arc<SeriesSlot>, attempts: u64) {
        let entry = self
            .table
            .entry(
                address_hash(series),
                |(s, _)| Arc::ptr_eq(s, series),
                |(s, _)| address_hash(s),
            )
            .or_insert_with(|| (Arc::clone(series), 0))
            .into_mut();
        entry.1 = entry.1.saturating_add(attempts);
    }

    /// `series`' total; `None` if the instance never reported it.
    pub(super) fn get(&self, series: &Arc<SeriesSlot>) -> Option<u64> {
        self.table
            .find(address_hash(series), |(s, _)| Arc::ptr_eq(s, series))
            .map(|&(_, total)| total)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Arc<SeriesSlot>, u64)> {
        self.table.iter().map(|(series, total)| (series, *total))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }
}

/// Spreads a series' address over the table: allocations are aligned, so
/// the address' low bits, which pick the bucket, are mostly zero. Addresses
/// are the scaler's own, never chosen by a peer. (SplitMix64's finalizer.)
fn address_hash(series: &Arc<SeriesSlot>) -> u64 {
    let mut z = Arc::as_ptr(series) as usize as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use itw_telemetry::exposition::AttemptLabels;

    use super::*;

    fn slot(service: &str) -> Arc<SeriesSlot> {
        Arc::new(SeriesSlot::new(AttemptLabels::service("apps", service)))
    }

    #[tokio::test(start_paused = true)]
    async fn totals_are_kept_per_series_and_saturate() {
        let (web, api) = (slot("web"), slot("api"));
        let mut totals = SeriesTotals::default();
        totals.add(&web, 3);
        totals.add(&api, 5);
        totals.add(&web, 4);
        assert_eq!(totals.get(&web), Some(7));
        assert_eq!(totals.get(&api), Some(5));
        assert_eq!(totals.get(&slot("db")), None);
        assert_eq!(totals.len(), 2);
        totals.add(&api, u64::MAX);
        assert_eq!(totals.get(&api), Some(u64::MAX));
        let mut all: Vec<_> = totals
            .iter()
            .map(|(s, n)| (s.labels().destination_service.to_string(), n))
            .collect();
        all.sort();
        assert_eq!(all, [("api".into(), u64::MAX), ("web".into(), 7)]);
    }

    #[tokio::test(start_paused = true)]
    async fn two_series_with_the_same_labels_are_two_entries() {
        // Keyed by the series itself, not its labels: a series recreated
        // after a sweep is a new entry.
        let (first, again) = (slot("web"), slot("web"));
        let mut totals = SeriesTotals::with_capacity(2);
        totals.add(&first, 1);
        totals.add(&again, 2);
        assert_eq!(totals.get(&first), Some(1));
        assert_eq!(totals.get(&again), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn many_series_grow_the_table_without_losing_any() {
        let slots: Vec<_> = (0..1_000).map(|i| slot(&format!("s{i}"))).collect();
        let mut totals = SeriesTotals::default();
        for (i, s) in slots.iter().enumerate() {
            totals.add(s, i as u64);
        }
        assert_eq!(totals.len(), 1_000);
        assert!(
            slots
                .iter()
                .enumerate()
                .all(|(i, s)| totals.get(s) == Some(i as u64))
        );
    }
}
