//! An agent instance's cumulative attempts per series, the counts its
//! snapshot replaces and its batches add to.
//!
//! Every instance holds one with an entry per series it reported (about 200
//! for a node), so an entry is only the series and its count (16 bytes), in
//! a Vec sorted by the series' address and sized to its entries: 3.2 KiB for
//! 200 series, where a hash table took 4.3 (256 buckets and their control
//! bytes). A batch finds its series by binary search; series new to the
//! instance wait in `pending` until [`SeriesTotals::settle`] merges them in
//! once per message, so a message naming many new series costs one merge,
//! not one shift of the table per series. Nothing here touches the series'
//! exported counters.

use std::sync::Arc;

use super::{SeriesSlot, growth::reserve_by_an_eighth};

#[derive(Debug, Default)]
pub(super) struct SeriesTotals {
    /// Sorted by the series' address, each series once.
    sorted: Vec<(Arc<SeriesSlot>, u64)>,
    /// Series first counted since the last settle, in arrival order (a
    /// series may repeat).
    pending: Vec<(Arc<SeriesSlot>, u64)>,
}

fn address(entry: &(Arc<SeriesSlot>, u64)) -> usize {
    Arc::as_ptr(&entry.0) as usize
}

impl SeriesTotals {
    /// Room for `entries` new series before the next settle.
    pub(super) fn with_capacity(entries: usize) -> Self {
        Self {
            sorted: Vec::new(),
            pending: Vec::with_capacity(entries),
        }
    }

    /// Adds `attempts` to `series`' total (saturating), creating it at 0.
    /// A new series is seen by [`Self::get`] and [`Self::iter`] only after
    /// [`Self::settle`].
    pub(super) fn add(&mut self, series: &Arc<SeriesSlot>, attempts: u64) {
        match self.position(series) {
            Ok(i) => {
                let total = &mut self.sorted[i].1;
                *total = total.saturating_add(attempts);
            }
            Err(_) => self.pending.push((Arc::clone(series), attempts)),
        }
    }

    /// Merges the series added since the last settle into the table, which
    /// grows by what they need or an eighth (so that a series at a time
    /// costs amortised O(1) moves of the table, and wastes at most an eighth).
    pub(super) fn settle(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(address);
        pending.dedup_by(|later, kept| {
            let same = Arc::ptr_eq(&later.0, &kept.0);
            if same {
                kept.1 = kept.1.saturating_add(later.1);
            }
            same
        });
        reserve_by_an_eighth(&mut self.sorted, pending.len());
        self.sorted.append(&mut pending);
        // Two sorted runs: the stable sort merges them in one pass.
        self.sorted.sort_by_key(address);
    }

    fn position(&self, series: &Arc<SeriesSlot>) -> Result<usize, usize> {
        let wanted = Arc::as_ptr(series) as usize;
        self.sorted.binary_search_by_key(&wanted, address)
    }

    /// `series`' total; `None` if the instance never reported it.
    pub(super) fn get(&self, series: &Arc<SeriesSlot>) -> Option<u64> {
        debug_assert!(self.pending.is_empty(), "totals read before settle");
        self.position(series).ok().map(|i| self.sorted[i].1)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Arc<SeriesSlot>, u64)> {
        debug_assert!(self.pending.is_empty(), "totals read before settle");
        self.sorted.iter().map(|(series, total)| (series, *total))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.sorted.len()
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.sorted.capacity()
    }
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
        totals.settle();
        assert_eq!(totals.get(&web), Some(7));
        assert_eq!(totals.get(&api), Some(5));
        assert_eq!(totals.get(&slot("db")), None);
        assert_eq!(totals.len(), 2);
        totals.add(&api, u64::MAX);
        totals.settle();
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
        totals.settle();
        assert_eq!(totals.get(&first), Some(1));
        assert_eq!(totals.get(&again), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn many_series_grow_the_table_without_losing_any() {
        let slots: Vec<_> = (0..1_000).map(|i| slot(&format!("s{i}"))).collect();
        let mut totals = SeriesTotals::default();
        // One new series per message, as an agent finding processes would.
        for (i, s) in slots.iter().enumerate() {
            totals.add(s, i as u64);
            totals.settle();
        }
        // And all of them again, counted on the entries they have.
        for s in &slots {
            totals.add(s, 1);
        }
        totals.settle();
        assert_eq!(totals.len(), 1_000);
        assert!(
            slots
                .iter()
                .enumerate()
                .all(|(i, s)| totals.get(s) == Some(i as u64 + 1))
        );
        // Grown by an eighth at a time: never more than an eighth unused.
        assert!(
            totals.capacity() <= 1_000 + 1_000 / 8,
            "{}",
            totals.capacity()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshots_series_take_exactly_their_room() {
        let slots: Vec<_> = (0..200).map(|i| slot(&format!("s{i}"))).collect();
        let mut totals = SeriesTotals::with_capacity(slots.len() + 1);
        for s in &slots {
            totals.add(s, 2);
        }
        // A series named twice in one message is one entry with both counts.
        totals.add(&slots[7], 3);
        totals.settle();
        assert_eq!((totals.len(), totals.capacity()), (200, 200));
        assert_eq!(totals.get(&slots[7]), Some(5));
        assert_eq!(totals.get(&slots[8]), Some(2));
        // Each series once, in address order.
        let addresses: Vec<usize> = totals
            .iter()
            .map(|(s, _)| Arc::as_ptr(s) as usize)
            .collect();
        assert!(addresses.windows(2).all(|w| w[0] < w[1]));
    }
}
