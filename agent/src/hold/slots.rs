//! The held Services' slots in the kernel's admission counters: the caps
//! count per slot (and slot 0, the node), so each held Service gets one,
//! kept while it is held and until every connection parked under it has
//! ended, then given back.
//!
//! Owned by the holder on the fast path, with the kernel: it is the only
//! writer of the "finished" counters the programs subtract.

use std::collections::{BTreeSet, HashMap};

use itw_common::capacity;

use super::{
    budget::{HoldBudget, NODE_SLOT},
    metrics::{HoldMetrics, ServiceLabels},
};
use crate::{capture::Kernel, resolve::ServiceRef};

#[derive(Debug)]
pub struct Slots {
    by_service: HashMap<ServiceRef, u16>,
    owner: HashMap<u16, ServiceRef>,
    free: Vec<u16>,
    /// Slots of Services no longer held, still counting connections parked
    /// under them.
    draining: BTreeSet<u16>,
    /// Finished counts last written to the kernel, per slot.
    written: HashMap<u16, u64>,
    /// Over-cap refusals last read from the kernel, per slot.
    refused: HashMap<u16, u64>,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            by_service: HashMap::new(),
            owner: HashMap::new(),
            free: (1..u16::try_from(capacity::HOLD_SLOTS).unwrap_or(u16::MAX))
                .rev()
                .collect(),
            draining: BTreeSet::new(),
            written: HashMap::new(),
            refused: HashMap::new(),
        }
    }
}

impl Slots {
    /// `service`'s slot, taken now if it has none; `None` when every slot
    /// is in use.
    pub fn take(&mut self, service: &ServiceRef) -> Option<u16> {
        if let Some(slot) = self.by_service.get(service) {
            self.draining.remove(slot);
            return Some(*slot);
        }
        let slot = self.free.pop()?;
        self.by_service.insert(service.clone(), slot);
        self.owner.insert(slot, service.clone());
        Some(slot)
    }

    /// `service` holds nothing now: its slot goes back once its parked
    /// connections have all ended.
    pub fn drain(&mut self, service: &ServiceRef) {
        if let Some(slot) = self.by_service.get(service) {
            self.draining.insert(*slot);
        }
    }

    pub fn owner(&self, slot: u16) -> Option<&ServiceRef> {
        self.owner.get(&slot)
    }

    /// Tells the kernel what has ended, counts over-cap refusals per
    /// Service, and gives back drained slots.
    pub fn sync(&mut self, kernel: &mut dyn Kernel, budget: &HoldBudget, metrics: &HoldMetrics) {
        let in_use: Vec<u16> = std::iter::once(NODE_SLOT)
            .chain(self.owner.keys().copied())
            .collect();
        for slot in in_use {
            let finished = budget.finished(slot);
            if self.written.get(&slot) != Some(&finished) {
                match kernel.set_hold_finished(slot, finished) {
                    Ok(()) => {
                        self.written.insert(slot, finished);
                    }
                    Err(error) => {
                        tracing::warn!(slot, %error, "telling the kernel which parked connections ended failed");
                    }
                }
            }
            if slot == NODE_SLOT {
                continue;
            }
            let counts = match kernel.hold_slot(slot) {
                Ok(counts) => counts,
                Err(error) => {
                    tracing::warn!(slot, %error, "reading a held Service's counters failed");
                    continue;
                }
            };
            let seen = self.refused.insert(slot, counts.refused).unwrap_or(0);
            if let Some(service) = self.owner.get(&slot) {
                let new = counts.refused.saturating_sub(seen);
                if new > 0 {
                    metrics
                        .over_cap
                        .get_or_create(&ServiceLabels::of(service))
                        .inc_by(new);
                    tracing::warn!(service = %service, refused = new, "connects not held: HOLD_MAX_PER_SERVICE or HOLD_MAX_PER_NODE reached");
                }
            }
            if self.draining.contains(&slot) && counts.admitted == finished {
                self.draining.remove(&slot);
                if let Some(service) = self.owner.remove(&slot) {
                    self.by_service.remove(&service);
                }
                self.refused.remove(&slot);
                self.free.push(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::fake::FakeKernel;

    #[test]
    fn a_slot_goes_back_only_when_its_connections_have_ended() {
        let mut slots = Slots::default();
        let web = ServiceRef::new("default", "web");
        let db = ServiceRef::new("default", "db");
        let first = slots.take(&web).unwrap();
        assert_eq!(slots.take(&web), Some(first), "one slot per Service");
        let other = slots.take(&db).unwrap();
        assert_ne!(first, other);

        let mut kernel = FakeKernel::new(8);
        let handle = kernel.handle();
        let dest = crate::resolve::destination("10.96.0.1:80".parse().unwrap());
        kernel.hold(&dest, 4000, first).unwrap();
        // Two connects parked under web's slot; one has ended.
        assert!(handle.park(dest, "10.244.0.5:40000".parse().unwrap(), 1));
        assert!(handle.park(dest, "10.244.0.5:40001".parse().unwrap(), 1));
        let budget = HoldBudget::new(1 << 20);
        let metrics = HoldMetrics::default();
        budget.finish(first);
        slots.drain(&web);
        slots.sync(&mut kernel, &budget, &metrics);
        assert_eq!(handle.finished(first), 1);
        assert_eq!(handle.finished(NODE_SLOT), 1);
        assert_eq!(slots.owner(first), Some(&web), "still counting");

        budget.finish(first);
        slots.sync(&mut kernel, &budget, &metrics);
        assert_eq!(handle.finished(first), 2);
        assert_eq!(slots.owner(first), None, "given back");
        // The next Service may get it; web held again gets a slot anew.
        let again = slots.take(&web).unwrap();
        assert_eq!(slots.owner(again), Some(&web));
    }
}
