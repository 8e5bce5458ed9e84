//! The loaded object's maps as a [`Kernel`]: [`EbpfKernel`] holds a handle
//! on each map and turns the agent's requests into map operations.
//!
//! It never attaches or detaches anything (dropping it does, with the
//! object it owns), and it never blocks: every call is a few map syscalls.

use std::{collections::HashSet, net::SocketAddr, os::fd::OwnedFd, sync::Arc};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use itw_common::{
    Comm, ConnKey, Destination, Park, ParkKey, Redirect, Watch, capacity, excluded_hint_bit, maps,
    stat,
};
use parking_lot::Mutex;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{counters::AttemptCounters, settings::CaptureSettings, wakes};
use crate::capture::{
    CaptureError, Kernel, KernelCounts, KernelStats, RedirectBook, SlotCounts, Wake, conn_key,
};

/// The eBPF [`Kernel`]: the loaded object (owning programs and links) and
/// handles on its maps.
pub struct EbpfKernel {
    // Dropping it detaches and unloads the programs.
    _ebpf: Ebpf,
    /// Links made outside aya (the programs put first); closing detaches.
    _links: Vec<OwnedFd>,
    watched: HashMap<MapData, Destination, Watch>,
    excluded: HashMap<MapData, Comm, u8>,
    excluded_hint: Array<MapData, u64>,
    attempts: AttemptCounters,
    overflow: PerCpuHashMap<MapData, u32, u64>,
    filtered: PerCpuHashMap<MapData, Comm, u64>,
    stats: PerCpuArray<MapData, u64>,
    excluded_now: HashSet<Comm>,
    max_destinations: u32,
    wakes: Option<mpsc::Receiver<Wake>>,
    wake_reader: JoinHandle<()>,
    /// Present when the programs hold.
    hold: Option<HoldMaps>,
}

struct HoldMaps {
    hold: HashMap<MapData, Destination, Park>,
    count: Array<MapData, u64>,
    parked: HashMap<MapData, ParkKey, Destination>,
    /// What `hold` holds, so the count is known without a walk.
    held: HashSet<Destination>,
    redirects: HashMap<MapData, u64, Redirect>,
    conns: Arc<ConnsBook>,
    admitted: Array<MapData, u64>,
    finished: Array<MapData, u64>,
    refused: Array<MapData, u64>,
}

/// The parked connections by 4-tuple, shared with the parking side (which
/// takes records as it accepts) and the expiry walk here.
#[derive(Debug)]
struct ConnsBook(Mutex<HashMap<MapData, ConnKey, Redirect>>);

impl RedirectBook for ConnsBook {
    fn take(&self, peer: SocketAddr, park_port: u16) -> Result<Option<Redirect>, CaptureError> {
        let key = conn_key(peer, park_port);
        let mut conns = self.0.lock();
        let record = match conns.get(&key, 0) {
            Ok(record) => record,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(None);
            }
            Err(err) => return Err(map_error(maps::HOLD_CONNS)(err)),
        };
        removed(conns.remove(&key), maps::HOLD_CONNS)?;
        Ok(Some(record))
    }
}

fn park_key(dest: &Destination, port: u16) -> ParkKey {
    ParkKey {
        family: if dest.is_ipv4() { 4 } else { 6 },
        port,
    }
}

/// An insert's error, naming the map; a full map (E2BIG) says which setting
/// makes room.
fn insert_error(
    map: &'static str,
    capacity: u32,
    setting: &'static str,
) -> impl Fn(MapError) -> CaptureError {
    move |err| match map_error(map)(err) {
        CaptureError::Map { source, .. } if source.raw_os_error() == Some(libc::E2BIG) => {
            CaptureError::MapFull {
                map,
                capacity,
                setting,
            }
        }
        other => other,
    }
}

/// The result of removing a key, an absent key being no error (a walk may
/// meet a key the kernel has just deleted, and removals are retried).
pub(super) fn removed(result: Result<(), MapError>, map: &'static str) -> Result<(), CaptureError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(err) => Err(map_error(map)(err)),
    }
}

impl EbpfKernel {
    pub(super) fn new(
        mut ebpf: Ebpf,
        links: Vec<OwnedFd>,
        settings: &CaptureSettings,
        holding: bool,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, CaptureError> {
        let hold = match holding {
            true => Some(HoldMaps {
                hold: take_map(&mut ebpf, maps::HOLD)?,
                count: take_map(&mut ebpf, maps::HOLD_COUNT)?,
                parked: take_map(&mut ebpf, maps::PARKED)?,
                held: HashSet::new(),
                redirects: take_map(&mut ebpf, maps::HOLD_REDIRECTS)?,
                conns: Arc::new(ConnsBook(Mutex::new(take_map(
                    &mut ebpf,
                    maps::HOLD_CONNS,
                )?))),
                admitted: take_map(&mut ebpf, maps::HOLD_ADMITTED)?,
                finished: take_map(&mut ebpf, maps::HOLD_FINISHED)?,
                refused: take_map(&mut ebpf, maps::HOLD_REFUSED)?,
            }),
            false => None,
        };
        let (wakes, wake_reader) = wakes::spawn_reader(take_map(&mut ebpf, maps::WAKES)?, runtime)?;
        Ok(Self {
            watched: take_map(&mut ebpf, maps::WATCHED)?,
            excluded: take_map(&mut ebpf, maps::EXCLUDED)?,
            excluded_hint: take_map(&mut ebpf, maps::EXCLUDED_HINT)?,
            attempts: AttemptCounters::new(
                take_map(&mut ebpf, maps::ATTEMPTS)?,
                take_map(&mut ebpf, maps::COUNTERS)?,
                take_map(&mut ebpf, maps::FREE_COUNTERS)?,
                settings.max_attempt_counters,
            )?,
            overflow: take_map(&mut ebpf, maps::OVERFLOW)?,
            filtered: take_map(&mut ebpf, maps::FILTERED)?,
            stats: take_map(&mut ebpf, maps::STATS)?,
            _ebpf: ebpf,
            _links: links,
            excluded_now: HashSet::new(),
            max_destinations: settings.max_destinations,
            wakes: Some(wakes),
            wake_reader,
            hold,
        })
    }
}

impl Drop for EbpfKernel {
    fn drop(&mut self) {
        // The reader owns the ring buffer's descriptor; the rest closes with self.
        self.wake_reader.abort();
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, CaptureError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(CaptureError::ObjectMismatch { what: "map", name })?;
    M::try_from(map).map_err(|source| CaptureError::MapHandle {
        map: name,
        source: Box::new(source),
    })
}

/// A map operation's error, naming the map.
pub(super) fn map_error(map: &'static str) -> impl Fn(MapError) -> CaptureError {
    move |err| match err {
        MapError::SyscallError(e) => CaptureError::Map {
            map,
            source: e.io_error,
        },
        other => CaptureError::MapHandle {
            map,
            source: Box::new(other),
        },
    }
}

pub(super) fn sum(values: &[u64]) -> u64 {
    values.iter().fold(0u64, |total, v| total.wrapping_add(*v))
}

impl Kernel for EbpfKernel {
    fn watch(&mut self, dest: &Destination, dest_id: u32) -> Result<(), CaptureError> {
        let watch = Watch {
            dest_id,
            armed: 1,
            generation: self.attempts.generation(),
        };
        self.watched.insert(dest, watch, 0).map_err(insert_error(
            maps::WATCHED,
            self.max_destinations,
            "MAX_DESTINATIONS",
        ))
    }

    fn unwatch(&mut self, dest: &Destination) -> Result<(), CaptureError> {
        removed(self.watched.remove(dest), maps::WATCHED)
    }

    fn set_excluded(&mut self, comms: &[Comm]) -> Result<(), CaptureError> {
        let wanted: HashSet<Comm> = comms.iter().copied().collect();
        if wanted.len() > capacity::EXCLUDED as usize {
            return Err(CaptureError::MapFull {
                map: maps::EXCLUDED,
                capacity: capacity::EXCLUDED,
                setting: "EXCLUDE_COMMS (fewer names)",
            });
        }
        // The hint covers old and new names while the map changes, so a name
        // in the map is never skipped for a missing bit; it narrows after.
        let hint = |names: &HashSet<Comm>| names.iter().fold(0u64, |h, c| h | excluded_hint_bit(c));
        self.excluded_hint
            .set(0, hint(&self.excluded_now) | hint(&wanted), 0)
            .map_err(map_error(maps::EXCLUDED_HINT))?;
        // Remove first so the map never holds more than its capacity.
        for comm in self.excluded_now.difference(&wanted) {
            removed(self.excluded.remove(comm), maps::EXCLUDED)?;
        }
        for comm in wanted.difference(&self.excluded_now) {
            self.excluded
                .insert(comm, 1, 0)
                .map_err(map_error(maps::EXCLUDED))?;
        }
        self.excluded_hint
            .set(0, hint(&wanted), 0)
            .map_err(map_error(maps::EXCLUDED_HINT))?;
        self.excluded_now = wanted;
        Ok(())
    }

    fn read(&mut self, out: &mut KernelCounts) -> Result<(), CaptureError> {
        out.clear();
        self.attempts.read(&mut out.attempts)?;
        for item in self.overflow.iter() {
            let (dest_id, values) = item.map_err(map_error(maps::OVERFLOW))?;
            out.overflow.push((dest_id, sum(&values)));
        }
        for item in self.filtered.iter() {
            let (comm, values) = item.map_err(map_error(maps::FILTERED))?;
            out.filtered.push((comm, sum(&values)));
        }
        // A hash map walk restarts from the first bucket when the key it
        // stood on is deleted under it (OVERFLOW and FILTERED entries can
        // be, by forget), so a key can come twice: keep the larger (later)
        // of the cumulative values.
        dedup_max(&mut out.attempts, |k| (k.dest_id, k.cgroup_id, k.comm));
        dedup_max(&mut out.overflow, |k| *k);
        dedup_max(&mut out.filtered, |k| *k);
        Ok(())
    }

    fn read_woken(&mut self, wakes: &[Wake], out: &mut KernelCounts) -> Result<(), CaptureError> {
        out.clear();
        for wake in wakes {
            // None: forgotten meanwhile; the next full read settles it.
            if let Some(count) = self.attempts.read_key(&wake.key)? {
                out.attempts.push((wake.key, count));
            }
            if wake.overflowed {
                match self.overflow.get(&wake.key.dest_id, 0) {
                    Ok(values) => out.overflow.push((wake.key.dest_id, sum(&values))),
                    Err(MapError::KeyNotFound) => {}
                    Err(err) => return Err(map_error(maps::OVERFLOW)(err)),
                }
            }
        }
        Ok(())
    }

    fn forget(&mut self, dest_ids: &[u32]) -> Result<(), CaptureError> {
        let ids: HashSet<u32> = dest_ids.iter().copied().collect();
        self.attempts.forget(&ids)?;
        for id in &ids {
            removed(self.overflow.remove(id), maps::OVERFLOW)?;
        }
        Ok(())
    }

    fn stats(&mut self) -> Result<KernelStats, CaptureError> {
        let get = |index: u32| -> Result<u64, CaptureError> {
            let values = self.stats.get(&index, 0).map_err(map_error(maps::STATS))?;
            Ok(sum(&values))
        };
        Ok(KernelStats {
            wakes_dropped: get(stat::WAKE_DROPPED)?,
            attempts_map_full: get(stat::ATTEMPTS_FULL)?,
            overflow_map_full: get(stat::OVERFLOW_FULL)?,
            leader_comm_failed: get(stat::LEADER_COMM_FAILED)?,
            hold_no_netns: get(stat::HOLD_NO_NETNS)?,
            hold_bad_slot: get(stat::HOLD_BAD_SLOT)?,
        })
    }

    fn take_wakes(&mut self) -> Option<mpsc::Receiver<Wake>> {
        self.wakes.take()
    }

    fn hold(&mut self, dest: &Destination, park_port: u16, slot: u16) -> Result<(), CaptureError> {
        let hold = self.hold.as_mut().ok_or_else(not_holding)?;
        // getpeername() must know the port before any connect lands there.
        hold.parked
            .insert(park_key(dest, park_port), dest, 0)
            .map_err(map_error(maps::PARKED))?;
        let park = Park {
            port: park_port,
            slot,
        };
        hold.hold.insert(dest, park, 0).map_err(insert_error(
            maps::HOLD,
            capacity::HOLD,
            "HOLD=annotated with fewer held Services",
        ))?;
        hold.held.insert(*dest);
        hold.count
            .set(0, hold.held.len() as u64, 0)
            .map_err(map_error(maps::HOLD_COUNT))
    }

    fn unhold(&mut self, dest: &Destination) -> Result<(), CaptureError> {
        let hold = self.hold.as_mut().ok_or_else(not_holding)?;
        removed(hold.hold.remove(dest), maps::HOLD)?;
        hold.held.remove(dest);
        hold.count
            .set(0, hold.held.len() as u64, 0)
            .map_err(map_error(maps::HOLD_COUNT))
    }

    fn forget_park(&mut self, dest: &Destination, park_port: u16) -> Result<(), CaptureError> {
        let hold = self.hold.as_mut().ok_or_else(not_holding)?;
        removed(hold.parked.remove(&park_key(dest, park_port)), maps::PARKED)
    }

    fn redirects(&self) -> Option<Arc<dyn RedirectBook>> {
        self.hold
            .as_ref()
            .map(|h| h.conns.clone() as Arc<dyn RedirectBook>)
    }

    fn hold_slot(&mut self, slot: u16) -> Result<SlotCounts, CaptureError> {
        let hold = self.hold.as_mut().ok_or_else(not_holding)?;
        let index = u32::from(slot);
        Ok(SlotCounts {
            admitted: hold
                .admitted
                .get(&index, 0)
                .map_err(map_error(maps::HOLD_ADMITTED))?,
            refused: hold
                .refused
                .get(&index, 0)
                .map_err(map_error(maps::HOLD_REFUSED))?,
        })
    }

    fn set_hold_finished(&mut self, slot: u16, finished: u64) -> Result<(), CaptureError> {
        let hold = self.hold.as_mut().ok_or_else(not_holding)?;
        hold.finished
            .set(u32::from(slot), finished, 0)
            .map_err(map_error(maps::HOLD_FINISHED))
    }

    fn expire_redirects(&mut self, parked_before_ns: u64) -> Result<Vec<u16>, CaptureError> {
        let hold = self.hold.as_mut().ok_or_else(not_holding)?;
        let mut slots = Vec::new();
        let stale: Vec<u64> = hold
            .redirects
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| r.parked_ns < parked_before_ns)
            .map(|(cookie, r)| {
                slots.push(r.slot);
                cookie
            })
            .collect();
        for cookie in &stale {
            removed(hold.redirects.remove(cookie), maps::HOLD_REDIRECTS)?;
        }
        let mut conns = hold.conns.0.lock();
        let stale: Vec<ConnKey> = conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| r.parked_ns < parked_before_ns)
            .map(|(key, r)| {
                slots.push(r.slot);
                key
            })
            .collect();
        for key in &stale {
            removed(conns.remove(key), maps::HOLD_CONNS)?;
        }
        Ok(slots)
    }
}

fn not_holding() -> CaptureError {
    CaptureError::Other("holding is off in the loaded programs".to_owned())
}

fn dedup_max<K, O: Ord>(entries: &mut Vec<(K, u64)>, order: impl Fn(&K) -> O) {
    entries.sort_by(|a, b| order(&a.0).cmp(&order(&b.0)).then(b.1.cmp(&a.1)));
    entries.dedup_by(|later, earlier| order(&later.0) == order(&earlier.0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_from_a_restarted_walk_keep_the_larger_value() {
        let mut entries = vec![(3u32, 5), (1, 2), (3, 9), (2, 4), (1, 1)];
        dedup_max(&mut entries, |k| *k);
        assert_eq!(entries, vec![(1, 2), (2, 4), (3, 9)]);
    }
}
