//! What holding may use, shared by the parking tasks and the holder: how
//! many parked connections have ended per Service slot (the kernel admits a
//! connect only while admitted minus ended is under the caps), and the bytes
//! of what parked clients sent that the agent keeps.
//!
//! It never blocks: a parking task that finds the byte budget spent stops
//! reading (the client's socket buffers and TCP flow control hold the rest).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use itw_common::capacity;

/// The node's slot: every parked connection counts there too.
pub const NODE_SLOT: u16 = 0;

#[derive(Debug)]
pub struct HoldBudget {
    /// Parked connections ended, per slot (index 0: the node).
    finished: Box<[AtomicU64]>,
    buffered: AtomicUsize,
    max_buffered: usize,
}

impl HoldBudget {
    pub fn new(max_buffered: usize) -> Self {
        Self {
            finished: (0..capacity::HOLD_SLOTS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            buffered: AtomicUsize::new(0),
            max_buffered,
        }
    }

    /// A connection parked under `slot` is no longer parked (released,
    /// timed out, gone, or never taken).
    pub fn finish(&self, slot: u16) {
        for index in [slot, NODE_SLOT] {
            if let Some(count) = self.finished.get(usize::from(index)) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Connections parked under `slot` that have ended, ever.
    pub fn finished(&self, slot: u16) -> u64 {
        self.finished
            .get(usize::from(slot))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Takes up to `want` bytes of the budget; returns how many it got.
    pub fn reserve(&self, want: usize) -> usize {
        let mut granted = 0;
        let _ = self
            .buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                granted = want.min(self.max_buffered.saturating_sub(now));
                (granted > 0).then_some(now + granted)
            });
        granted
    }

    /// Gives back `n` bytes taken with [`HoldBudget::reserve`].
    pub fn release(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes kept now.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_budget_grants_what_is_left_and_no_more() {
        let budget = HoldBudget::new(100_000);
        assert_eq!(budget.reserve(65_536), 65_536);
        assert_eq!(budget.reserve(65_536), 34_464);
        assert_eq!(budget.reserve(1), 0);
        budget.release(65_536);
        assert_eq!(budget.buffered(), 34_464);
        assert_eq!(budget.reserve(70_000), 65_536);
    }

    #[test]
    fn an_ended_connection_counts_for_its_slot_and_the_node() {
        let budget = HoldBudget::new(1);
        budget.finish(7);
        budget.finish(7);
        budget.finish(3);
        assert_eq!(budget.finished(7), 2);
        assert_eq!(budget.finished(3), 1);
        assert_eq!(budget.finished(NODE_SLOT), 3);
        // A slot past the arrays is ignored, not a panic.
        budget.finish(u16::MAX);
        assert_eq!(budget.finished(u16::MAX), 0);
        assert_eq!(budget.finished(NODE_SLOT), 4);
    }
}
