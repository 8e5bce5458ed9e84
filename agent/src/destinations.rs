//! The destination table: which IP:ports the kernel watches, under which id,
//! and what each id means.
//!
//! Ids are how the kernel keys its counters. An IP:port that changes owner
//! (an IP reused by another pod or Service) gets a new id in the same kernel
//! map update, so attempts before the change stay with the old owner and
//! attempts after it go to the new one, with no collection in between. An id
//! that is no longer watched retires: its counters are read one last time and
//! deleted a full collection later, so an attempt still in flight in the
//! kernel when it was unwatched is read too.

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
};

use crate::{
    capture::{CaptureError, Kernel},
    resolve::{self, DestMap, MapChange, MapEvent, ServiceMap, ServiceRef, Target},
};

/// What applying an event changed, for metrics and logs.
#[derive(Debug, Default)]
pub struct Applied {
    pub services_added: Vec<ServiceRef>,
    pub services_removed: Vec<ServiceRef>,
    pub watched: usize,
    pub unwatched: usize,
    /// Destinations the kernel refused (e.g. its map is full): skipped, the
    /// rest of the event still applies.
    pub failed: usize,
    /// The first refusal, for the log.
    pub first_error: Option<CaptureError>,
}

impl Applied {
    fn record(&mut self, result: Result<(), CaptureError>) {
        if let Err(e) = result {
            self.failed += 1;
            self.first_error.get_or_insert(e);
        }
    }
}

/// Compact for 100k+ destinations: keyed by the kernel's key (8 bytes for
/// IPv4), and per-id data in pages indexed by id (ids are dense: freed ids
/// are reused).
#[derive(Debug, Default)]
pub struct DestinationTable {
    by_addr: DestMap<u32>,
    /// What each id in use (watched or retiring) counts attempts to.
    ids: IdPages,
    services: BTreeSet<ServiceRef>,
    /// Ids the kernel has disarmed (they counted since they were armed).
    disarmed: HashSet<u32>,
    next_id: u32,
    free_ids: Vec<u32>,
    /// Ids unwatched since the last collection: read once more, then forgotten.
    retiring: Vec<u32>,
    /// Ids whose final read is done: deleted from the kernel after the next read.
    retired: Vec<u32>,
}

impl DestinationTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a source's event to the table and the kernel. A destination
    /// the kernel refuses is skipped and reported in [`Applied::failed`].
    pub fn apply(&mut self, kernel: &mut dyn Kernel, event: MapEvent) -> Applied {
        let mut applied = Applied::default();
        match event {
            MapEvent::Reset(map) => self.reset(kernel, map, &mut applied),
            MapEvent::Changes(changes) => {
                for change in changes {
                    self.change(kernel, change, &mut applied);
                }
            }
        }
        applied
    }

    fn reset(&mut self, kernel: &mut dyn Kernel, map: ServiceMap, applied: &mut Applied) {
        let stale: Vec<SocketAddr> = self
            .by_addr
            .iter()
            .map(|(dest, _)| resolve::socket_addr(&dest))
            .filter(|addr| !map.destinations.contains_key(addr))
            .collect();
        // Removals first: they free kernel map room for the additions.
        for addr in stale {
            let result = self.remove(kernel, addr, applied);
            applied.record(result);
        }
        for (addr, target) in map.destinations {
            let result = self.set(kernel, addr, target, applied);
            applied.record(result);
        }
        let gone: Vec<ServiceRef> = self
            .services
            .iter()
            .filter(|s| !map.services.contains_key(s))
            .cloned()
            .collect();
        for service in gone {
            self.services.remove(&service);
            applied.services_removed.push(service);
        }
        for service in map.services.into_keys() {
            if self.services.insert(service.clone()) {
                applied.services_added.push(service);
            }
        }
        release_free_memory();
    }

    fn change(&mut self, kernel: &mut dyn Kernel, change: MapChange, applied: &mut Applied) {
        match change {
            MapChange::Set(addr, target) => {
                let result = self.set(kernel, addr, target, applied);
                applied.record(result);
            }
            MapChange::Remove(addr) => {
                let result = self.remove(kernel, addr, applied);
                applied.record(result);
            }
            MapChange::ServiceSet(service, _) => {
                if self.services.insert(service.clone()) {
                    applied.services_added.push(service);
                }
            }
            MapChange::ServiceRemoved(service) => {
                if self.services.remove(&service) {
                    applied.services_removed.push(service);
                }
            }
        }
    }

    fn set(
        &mut self,
        kernel: &mut dyn Kernel,
        addr: SocketAddr,
        target: Target,
        applied: &mut Applied,
    ) -> Result<(), CaptureError> {
        let dest = resolve::destination(addr);
        let old = self.by_addr.get(&dest).copied();
        if let Some(id) = old
            && self.target(id) == Some(&target)
        {
            // The same target, its pod name perhaps in a new block of names:
            // hold that one, so the old block can be freed.
            self.ids.replace_target(id, target);
            return Ok(());
        }
        let id = self.allocate_id();
        if let Err(e) = kernel.watch(&dest, id) {
            self.free_ids.push(id);
            return Err(e);
        }
        self.ids.set(id, target);
        self.by_addr.insert(dest, id);
        if let Some(old) = old {
            // The kernel entry now points at the new id; the old id's
            // counters hold exactly the attempts made before the change.
            self.retiring.push(old);
        }
        applied.watched += 1;
        Ok(())
    }

    fn remove(
        &mut self,
        kernel: &mut dyn Kernel,
        addr: SocketAddr,
        applied: &mut Applied,
    ) -> Result<(), CaptureError> {
        let dest = resolve::destination(addr);
        let Some(&id) = self.by_addr.get(&dest) else {
            return Ok(());
        };
        kernel.unwatch(&dest)?;
        self.by_addr.remove(&dest);
        self.retiring.push(id);
        applied.unwatched += 1;
        Ok(())
    }

    fn allocate_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            let id = self.next_id;
            self.next_id += 1;
            id
        })
    }

    /// What an id's counters are attempts to (also for retiring ids).
    pub fn target(&self, id: u32) -> Option<&Target> {
        self.ids.target(id)
    }

    /// Notes that a counter of `id` moved or a wake came: the kernel has
    /// disarmed it.
    pub fn disarmed(&mut self, id: u32) {
        if self.ids.armed(id) == Some(true) {
            self.ids.set_armed(id, false);
            self.disarmed.insert(id);
        }
    }

    /// Re-arms `dest` (watched under `id`) at once: the wake that disarmed
    /// it was not demand. False when it is not watched under `id` any more.
    pub fn rearm(
        &mut self,
        kernel: &mut dyn Kernel,
        dest: &itw_common::Destination,
        id: u32,
    ) -> Result<bool, CaptureError> {
        if self.by_addr.get(dest).copied() != Some(id) {
            return Ok(false);
        }
        kernel.watch(dest, id)?;
        self.ids.set_armed(id, true);
        self.disarmed.remove(&id);
        Ok(true)
    }

    /// Re-arms watched destinations that saw no attempt in the last
    /// collection (`active` holds the ids that did) and are disarmed.
    /// Returns how many were re-armed.
    pub fn rearm_idle(
        &mut self,
        kernel: &mut dyn Kernel,
        active: &std::collections::HashSet<u32>,
    ) -> Result<Vec<u32>, CaptureError> {
        // Only destinations that were active are disarmed: the table is
        // walked (for their kernel keys) only on the tick one goes idle, not
        // on every tick.
        if self.disarmed.iter().all(|id| active.contains(id)) {
            return Ok(Vec::new());
        }
        let mut rearmed = Vec::new();
        for (dest, &id) in self.by_addr.iter() {
            if !self.disarmed.contains(&id) || active.contains(&id) {
                continue;
            }
            kernel.watch(&dest, id)?;
            self.ids.set_armed(id, true);
            rearmed.push(id);
        }
        for id in &rearmed {
            self.disarmed.remove(id);
        }
        // Ids no longer watched (retired or replaced) need no re-arming.
        self.disarmed
            .retain(|id| self.ids.armed(*id).is_some_and(|armed| !armed));
        Ok(rearmed)
    }

    /// Call after every read of the kernel counters: ids whose final read is
    /// now done move on, and those read twice since unwatching are deleted
    /// from the kernel. Returns the deleted ids (their last-seen values must
    /// be dropped too, as the ids may be reused).
    pub fn after_read(&mut self, kernel: &mut dyn Kernel) -> Result<Vec<u32>, CaptureError> {
        let done = std::mem::take(&mut self.retired);
        if !done.is_empty() {
            kernel.forget(&done)?;
            for id in &done {
                self.ids.clear(*id);
            }
            self.free_ids.extend(&done);
        }
        self.retired = std::mem::take(&mut self.retiring);
        Ok(done)
    }

    pub fn watched(&self) -> usize {
        self.by_addr.len()
    }

    pub fn services(&self) -> &BTreeSet<ServiceRef> {
        &self.services
    }

    /// Every watched IP:port and its target, for tests and debugging.
    pub fn snapshot(&self) -> Vec<(SocketAddr, Target)> {
        let mut all: Vec<_> = self
            .by_addr
            .iter()
            .filter_map(|(dest, id)| Some((resolve::socket_addr(&dest), self.target(*id)?.clone())))
            .collect();
        all.sort();
        all
    }

    /// The id an IP:port is watched under.
    pub fn id_of(&self, addr: SocketAddr) -> Option<u32> {
        self.by_addr.get(&resolve::destination(addr)).copied()
    }
}

/// Ids per page of [`IdPages`].
const IDS_PER_PAGE: usize = 4096;

/// Per-id data, in fixed pages: ids are dense (freed ids are reused), and
/// growing by a page never copies the rest, where a doubling vector would
/// briefly need twice the memory and keep up to half of it as slack.
#[derive(Debug, Default)]
struct IdPages {
    pages: Vec<IdPage>,
}

#[derive(Debug)]
struct IdPage {
    targets: Box<[Option<Target>]>,
    /// Whether the kernel's entry is armed (its next attempt wakes us), as
    /// far as we know: cleared on any count or wake, set when we re-arm.
    armed: Box<[bool]>,
}

impl IdPages {
    fn locate(id: u32) -> (usize, usize) {
        let id = id as usize;
        (id / IDS_PER_PAGE, id % IDS_PER_PAGE)
    }

    fn target(&self, id: u32) -> Option<&Target> {
        let (page, i) = Self::locate(id);
        self.pages.get(page)?.targets.get(i)?.as_ref()
    }

    /// `None` for an id not in use.
    fn armed(&self, id: u32) -> Option<bool> {
        let (page, i) = Self::locate(id);
        let page = self.pages.get(page)?;
        page.targets.get(i)?.as_ref()?;
        page.armed.get(i).copied()
    }

    /// Puts `target` under `id`, armed.
    fn set(&mut self, id: u32, target: Target) {
        let (page, i) = Self::locate(id);
        while self.pages.len() <= page {
            self.pages.push(IdPage {
                targets: vec![None; IDS_PER_PAGE].into_boxed_slice(),
                armed: vec![false; IDS_PER_PAGE].into_boxed_slice(),
            });
        }
        let page = &mut self.pages[page];
        page.targets[i] = Some(target);
        page.armed[i] = true;
    }

    /// Puts an equal `target` in place of the one under `id`, armed or not.
    fn replace_target(&mut self, id: u32, target: Target) {
        let (page, i) = Self::locate(id);
        if let Some(slot) = self.pages.get_mut(page).and_then(|p| p.targets.get_mut(i))
            && slot.is_some()
        {
            *slot = Some(target);
        }
    }

    fn set_armed(&mut self, id: u32, armed: bool) {
        let (page, i) = Self::locate(id);
        if let Some(page) = self.pages.get_mut(page)
            && page.targets.get(i).is_some_and(Option::is_some)
        {
            page.armed[i] = armed;
        }
    }

    fn clear(&mut self, id: u32) {
        let (page, i) = Self::locate(id);
        if let Some(slot) = self.pages.get_mut(page).and_then(|p| p.targets.get_mut(i)) {
            *slot = None;
        }
    }
}

/// Hands the allocator's free pages back to the system. A reset is when a
/// whole map's worth of memory has just been freed (the map itself, and the
/// source's list of the cluster before it), and glibc's malloc would keep
/// most of it as free space in its arenas: measured with 10k Services and
/// 100k endpoints, RSS stayed ~13 MiB higher without this.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; no live
    // allocation is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::capture::fake::FakeKernel;

    fn target(svc: &str, pod: Option<&str>) -> Target {
        Target {
            service: ServiceRef::new("default", svc),
            port: 80,
            pod: pod.map(Into::into),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn map(entries: &[(&str, Target)]) -> ServiceMap {
        let mut map = ServiceMap::default();
        for (a, t) in entries {
            map.services.insert(t.service.clone(), Default::default());
            map.destinations.insert(addr(a), t.clone());
        }
        map
    }

    #[test]
    fn reset_watches_exactly_the_map() {
        let mut kernel = FakeKernel::new(16);
        let handle = kernel.handle();
        let mut table = DestinationTable::new();
        let applied = table.apply(
            &mut kernel,
            MapEvent::Reset(map(&[
                ("127.1.0.1:80", target("a", None)),
                ("127.1.0.2:80", target("b", None)),
            ])),
        );
        assert_eq!(applied.watched, 2);
        assert_eq!(
            applied.services_added,
            vec![
                ServiceRef::new("default", "a"),
                ServiceRef::new("default", "b")
            ]
        );
        let watched = handle.watched();
        assert_eq!(watched.len(), 2);
        let id_a = table.id_of(addr("127.1.0.1:80")).unwrap();
        assert_eq!(
            watched[&resolve::destination(addr("127.1.0.1:80"))],
            (id_a, true)
        );

        // A second reset keeps what stays (same id), drops what left.
        let applied = table.apply(
            &mut kernel,
            MapEvent::Reset(map(&[("127.1.0.1:80", target("a", None))])),
        );
        assert_eq!(applied.watched, 0);
        assert_eq!(applied.unwatched, 1);
        assert_eq!(
            applied.services_removed,
            vec![ServiceRef::new("default", "b")]
        );
        assert_eq!(table.id_of(addr("127.1.0.1:80")), Some(id_a));
        assert_eq!(handle.watched().len(), 1);
    }

    #[test]
    fn an_equal_target_from_a_new_block_of_names_takes_the_held_ones_place() {
        let mut kernel = FakeKernel::new(16);
        let handle = kernel.handle();
        let mut table = DestinationTable::new();
        let web_0 = addr("10.244.1.5:8080");
        let first = target("web", Some("web-0"));
        table.apply(
            &mut kernel,
            MapEvent::Changes(vec![MapChange::Set(web_0, first.clone())]),
        );
        let id = table.id_of(web_0).unwrap();
        // `From<&str>` makes a block of its own: equal names, other blocks.
        let again = target("web", Some("web-0"));
        let applied = table.apply(
            &mut kernel,
            MapEvent::Changes(vec![MapChange::Set(web_0, again.clone())]),
        );
        assert_eq!((applied.watched, applied.unwatched), (0, 0));
        assert_eq!(table.id_of(web_0), Some(id));
        assert_eq!(handle.watched()[&resolve::destination(web_0)], (id, true));
        let held = table.target(id).unwrap().pod.clone().unwrap();
        assert!(held.same_block(again.pod.as_ref().unwrap()));
        assert!(!held.same_block(first.pod.as_ref().unwrap()));
    }

    #[test]
    fn a_reused_ip_gets_a_new_id_and_the_old_one_retires_after_two_reads() {
        let mut kernel = FakeKernel::new(16);
        let handle = kernel.handle();
        let mut table = DestinationTable::new();
        let pod_ip = addr("127.1.1.1:80");
        table.apply(
            &mut kernel,
            MapEvent::Changes(vec![MapChange::Set(pod_ip, target("a", Some("a-0")))]),
        );
        let old = table.id_of(pod_ip).unwrap();
        handle.connect(resolve::destination(pod_ip), "curl");

        table.apply(
            &mut kernel,
            MapEvent::Changes(vec![MapChange::Set(pod_ip, target("b", Some("b-0")))]),
        );
        let new = table.id_of(pod_ip).unwrap();
        assert_ne!(old, new);
        // The old id still resolves to the old owner for its final reads.
        assert_eq!(table.target(old), Some(&target("a", Some("a-0"))));
        assert_eq!(table.target(new), Some(&target("b", Some("b-0"))));
        assert_eq!(handle.watched()[&resolve::destination(pod_ip)], (new, true));

        assert_eq!(table.after_read(&mut kernel).unwrap(), Vec::<u32>::new());
        assert_eq!(handle.attempt_keys(), 1);
        assert_eq!(table.after_read(&mut kernel).unwrap(), vec![old]);
        assert_eq!(handle.attempt_keys(), 0);
        assert_eq!(table.target(old), None);
        // The freed id is reused.
        table.apply(
            &mut kernel,
            MapEvent::Changes(vec![MapChange::Set(
                addr("127.1.1.2:80"),
                target("c", None),
            )]),
        );
        assert_eq!(table.id_of(addr("127.1.1.2:80")), Some(old));
        assert_eq!(table.target(old), Some(&target("c", None)));
    }

    #[test]
    fn setting_the_same_target_again_changes_nothing() {
        let mut kernel = FakeKernel::new(16);
        let mut table = DestinationTable::new();
        let a = addr("[::ffff:127.1.0.1]:80");
        let set = || MapEvent::Changes(vec![MapChange::Set(a, target("a", None))]);
        assert_eq!(table.apply(&mut kernel, set()).watched, 1);
        assert_eq!(table.apply(&mut kernel, set()).watched, 0);
        // Stored canonically: the IPv4 spelling finds it.
        assert!(table.id_of(addr("127.1.0.1:80")).is_some());
    }

    #[test]
    fn rearms_only_idle_disarmed_destinations() {
        let mut kernel = FakeKernel::new(16);
        let handle = kernel.handle();
        let mut table = DestinationTable::new();
        table.apply(
            &mut kernel,
            MapEvent::Reset(map(&[
                ("127.1.0.1:80", target("a", None)),
                ("127.1.0.2:80", target("b", None)),
            ])),
        );
        let a = table.id_of(addr("127.1.0.1:80")).unwrap();
        let b = table.id_of(addr("127.1.0.2:80")).unwrap();
        handle.connect(resolve::destination(addr("127.1.0.1:80")), "curl");
        handle.connect(resolve::destination(addr("127.1.0.2:80")), "curl");
        table.disarmed(a);
        table.disarmed(b);
        // a was active in the last collection, b idle: only b is re-armed.
        let rearmed = table.rearm_idle(&mut kernel, &HashSet::from([a])).unwrap();
        assert_eq!(rearmed, vec![b]);
        let watched = handle.watched();
        assert_eq!(
            watched[&resolve::destination(addr("127.1.0.1:80"))],
            (a, false)
        );
        assert_eq!(
            watched[&resolve::destination(addr("127.1.0.2:80"))],
            (b, true)
        );
        // Nothing to do the next time.
        assert!(table.rearm_idle(&mut kernel, &HashSet::new()).unwrap() == vec![a]);
        assert!(
            table
                .rearm_idle(&mut kernel, &HashSet::new())
                .unwrap()
                .is_empty()
        );
    }
}
