//! An in-memory [`Kernel`] with the eBPF programs' semantics, for tests that
//! run without privileges. Its [`FakeKernel::connect`] does what the programs
//! do on a connect: look the destination up, filter excluded names, count,
//! overflow when every counter is taken (a forgotten key's counter is taken
//! until the next read: the kernel's quarantine), and wake once per idle ->
//! active. The kernel's per-CPU last-caller cache is invisible in counts,
//! so it has no counterpart here.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use itw_common::{AttemptKey, Comm, ConnKey, Destination, Redirect};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::{
    CaptureError, Kernel, KernelCounts, KernelStats, RedirectBook, SlotCounts, Wake, conn_key,
};

#[derive(Debug, Default)]
struct Maps {
    watched: HashMap<Destination, (u32, bool)>,
    excluded: HashSet<Comm>,
    attempts: HashMap<AttemptKey, u64>,
    /// Counters of keys forgotten since the last read: not free until the
    /// next read, as the kernel's quarantine has it.
    quarantined: usize,
    overflow: HashMap<u32, u64>,
    filtered: HashMap<Comm, u64>,
    stats: KernelStats,
    hold: HashMap<Destination, (u16, u16)>,
    parked: HashMap<(bool, u16), Destination>,
    /// Parked connections' records by 4-tuple, as sock_ops leaves them.
    conns: HashMap<ConnKey, Redirect>,
    admitted: HashMap<u16, u64>,
    finished: HashMap<u16, u64>,
}

/// The cgroup v2 root's id (the inode number of its directory), what
/// [`FakeKernelHandle::connect`] calls from.
pub const ROOT_CGROUP_ID: u64 = 1;

/// The test's handle on a [`FakeKernel`]: makes attempts and inspects maps
/// after the kernel itself has been handed to the agent.
#[derive(Clone, Debug)]
pub struct FakeKernelHandle {
    maps: Arc<Mutex<Maps>>,
    attempts_capacity: usize,
    wakes: mpsc::Sender<Wake>,
}

/// In-memory [`Kernel`].
#[derive(Debug)]
pub struct FakeKernel {
    handle: FakeKernelHandle,
    wakes: Option<mpsc::Receiver<Wake>>,
}

impl FakeKernel {
    /// A fake kernel whose attempts map holds `attempts_capacity` keys.
    pub fn new(attempts_capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        Self {
            handle: FakeKernelHandle {
                maps: Arc::default(),
                attempts_capacity,
                wakes: tx,
            },
            wakes: Some(rx),
        }
    }

    pub fn handle(&self) -> FakeKernelHandle {
        self.handle.clone()
    }
}

impl FakeKernelHandle {
    /// A connect attempt by a process named `comm` in the node's root
    /// cgroup ([`ROOT_CGROUP_ID`]) to `dest`, as the programs see it.
    pub fn connect(&self, dest: Destination, comm: &str) {
        self.connect_from(dest, comm, ROOT_CGROUP_ID);
    }

    /// A connect attempt by a process named `comm` in cgroup `cgroup_id`.
    pub fn connect_from(&self, dest: Destination, comm: &str, cgroup_id: u64) {
        let comm = super::comm_bytes(comm);
        let mut maps = self.maps.lock();
        let Some((dest_id, armed)) = maps.watched.get(&dest).copied() else {
            return;
        };
        if maps.excluded.contains(&comm) {
            *maps.filtered.entry(comm).or_default() += 1;
            return;
        }
        let key = AttemptKey::new(dest_id, cgroup_id, comm);
        let mut overflowed = false;
        if maps.attempts.contains_key(&key)
            || maps.attempts.len() + maps.quarantined < self.attempts_capacity
        {
            *maps.attempts.entry(key).or_default() += 1;
        } else {
            maps.stats.attempts_map_full += 1;
            *maps.overflow.entry(dest_id).or_default() += 1;
            overflowed = true;
        }
        if armed {
            maps.watched.insert(dest, (dest_id, false));
            let wake = Wake {
                key,
                dest,
                overflowed,
                read_at_us: itw_telemetry::timeline::monotonic_us(),
            };
            if self.wakes.try_send(wake).is_err() {
                maps.stats.wakes_dropped += 1;
            }
        }
    }

    /// The watched set: destination -> (id, armed).
    pub fn watched(&self) -> HashMap<Destination, (u32, bool)> {
        self.maps.lock().watched.clone()
    }

    /// The hold map: destination -> parking port.
    pub fn held(&self) -> HashMap<Destination, u16> {
        self.maps
            .lock()
            .hold
            .iter()
            .map(|(dest, (port, _))| (*dest, *port))
            .collect()
    }

    /// The hold map: destination -> its Service's slot.
    pub fn held_slots(&self) -> HashMap<Destination, u16> {
        self.maps
            .lock()
            .hold
            .iter()
            .map(|(dest, (_, slot))| (*dest, *slot))
            .collect()
    }

    /// What the programs do when they park a connect to a held `dest`
    /// from `client` (its local address, once bound) in the network
    /// namespace `netns`: admit it under the destination's slot and leave
    /// its record for the parking listener. False: `dest` is not held.
    pub fn park(&self, dest: Destination, client: SocketAddr, netns: u32) -> bool {
        let mut maps = self.maps.lock();
        let Some((park_port, slot)) = maps.hold.get(&dest).copied() else {
            return false;
        };
        *maps.admitted.entry(slot).or_default() += 1;
        *maps.admitted.entry(0).or_default() += 1;
        maps.conns.insert(
            conn_key(client, park_port),
            Redirect {
                dest,
                netns,
                tgid: std::process::id(),
                slot,
                _pad: [0; 10],
                parked_ns: 0,
            },
        );
        true
    }

    /// What the agent reported as ended, per slot.
    pub fn finished(&self, slot: u16) -> u64 {
        self.maps.lock().finished.get(&slot).copied().unwrap_or(0)
    }

    /// Records no listener has taken yet.
    pub fn untaken(&self) -> usize {
        self.maps.lock().conns.len()
    }

    /// The getpeername map: (IPv4?, parking port) -> destination.
    pub fn parked(&self) -> HashMap<(bool, u16), Destination> {
        self.maps.lock().parked.clone()
    }

    /// Number of (destination, process) counters in the attempts map.
    pub fn attempt_keys(&self) -> usize {
        self.maps.lock().attempts.len()
    }
}

impl Kernel for FakeKernel {
    fn watch(&mut self, dest: &Destination, dest_id: u32) -> Result<(), CaptureError> {
        self.handle
            .maps
            .lock()
            .watched
            .insert(*dest, (dest_id, true));
        Ok(())
    }

    fn unwatch(&mut self, dest: &Destination) -> Result<(), CaptureError> {
        self.handle.maps.lock().watched.remove(dest);
        Ok(())
    }

    fn set_excluded(&mut self, comms: &[Comm]) -> Result<(), CaptureError> {
        self.handle.maps.lock().excluded = comms.iter().copied().collect();
        Ok(())
    }

    fn read(&mut self, out: &mut KernelCounts) -> Result<(), CaptureError> {
        out.clear();
        let mut maps = self.handle.maps.lock();
        maps.quarantined = 0;
        out.attempts
            .extend(maps.attempts.iter().map(|(k, v)| (*k, *v)));
        out.overflow
            .extend(maps.overflow.iter().map(|(k, v)| (*k, *v)));
        out.filtered
            .extend(maps.filtered.iter().map(|(k, v)| (*k, *v)));
        Ok(())
    }

    fn read_woken(&mut self, wakes: &[Wake], out: &mut KernelCounts) -> Result<(), CaptureError> {
        out.clear();
        let maps = self.handle.maps.lock();
        for wake in wakes {
            if let Some(n) = maps.attempts.get(&wake.key) {
                out.attempts.push((wake.key, *n));
            }
            if wake.overflowed
                && let Some(n) = maps.overflow.get(&wake.key.dest_id)
            {
                out.overflow.push((wake.key.dest_id, *n));
            }
        }
        Ok(())
    }

    fn forget(&mut self, dest_ids: &[u32]) -> Result<(), CaptureError> {
        let mut maps = self.handle.maps.lock();
        let before = maps.attempts.len();
        maps.attempts.retain(|k, _| !dest_ids.contains(&k.dest_id));
        maps.quarantined += before - maps.attempts.len();
        maps.overflow.retain(|id, _| !dest_ids.contains(id));
        Ok(())
    }

    fn stats(&mut self) -> Result<KernelStats, CaptureError> {
        Ok(self.handle.maps.lock().stats)
    }

    fn take_wakes(&mut self) -> Option<mpsc::Receiver<Wake>> {
        self.wakes.take()
    }

    fn hold(&mut self, dest: &Destination, park_port: u16, slot: u16) -> Result<(), CaptureError> {
        let mut maps = self.handle.maps.lock();
        maps.hold.insert(*dest, (park_port, slot));
        maps.parked.insert((dest.is_ipv4(), park_port), *dest);
        Ok(())
    }

    fn unhold(&mut self, dest: &Destination) -> Result<(), CaptureError> {
        self.handle.maps.lock().hold.remove(dest);
        Ok(())
    }

    fn forget_park(&mut self, dest: &Destination, park_port: u16) -> Result<(), CaptureError> {
        self.handle
            .maps
            .lock()
            .parked
            .remove(&(dest.is_ipv4(), park_port));
        Ok(())
    }

    fn redirects(&self) -> Option<Arc<dyn RedirectBook>> {
        Some(Arc::new(self.handle.clone()))
    }

    fn hold_slot(&mut self, slot: u16) -> Result<SlotCounts, CaptureError> {
        let maps = self.handle.maps.lock();
        Ok(SlotCounts {
            admitted: maps.admitted.get(&slot).copied().unwrap_or(0),
            refused: 0,
        })
    }

    fn set_hold_finished(&mut self, slot: u16, finished: u64) -> Result<(), CaptureError> {
        self.handle.maps.lock().finished.insert(slot, finished);
        Ok(())
    }

    fn expire_redirects(&mut self, _parked_before_ns: u64) -> Result<Vec<u16>, CaptureError> {
        Ok(Vec::new())
    }
}

impl RedirectBook for FakeKernelHandle {
    fn take(&self, peer: SocketAddr, park_port: u16) -> Result<Option<Redirect>, CaptureError> {
        Ok(self.maps.lock().conns.remove(&conn_key(peer, park_port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(last: u8) -> Destination {
        Destination::v4([10, 96, 0, last], 80)
    }

    fn read(kernel: &mut FakeKernel) -> KernelCounts {
        let mut counts = KernelCounts::default();
        kernel.read(&mut counts).unwrap();
        counts
    }

    /// As the programs' counters: a forgotten key's counter is taken until
    /// the agent's next read gives it back (the kernel's quarantine).
    #[test]
    fn a_forgotten_keys_counter_is_free_only_after_the_next_read() {
        let mut kernel = FakeKernel::new(1);
        let handle = kernel.handle();
        kernel.watch(&dest(1), 1).unwrap();
        kernel.watch(&dest(2), 2).unwrap();
        handle.connect(dest(1), "a");
        kernel.unwatch(&dest(1)).unwrap();
        kernel.forget(&[1]).unwrap();
        handle.connect(dest(2), "b");
        assert_eq!(read(&mut kernel).overflow, vec![(2, 1)]);
        handle.connect(dest(2), "b");
        let counts = read(&mut kernel);
        assert_eq!(
            counts.attempts,
            vec![(
                AttemptKey::new(2, ROOT_CGROUP_ID, super::super::comm_bytes("b")),
                1
            )]
        );
        assert_eq!(counts.overflow, vec![(2, 1)]);
        assert_eq!(handle.maps.lock().stats.attempts_map_full, 1);
    }
}
