//! The attempt counters' maps as the agent keeps them: which counter index
//! each key has (`ITW_ATTEMPTS`), the counts at those indices
//! (`ITW_COUNTERS`, per CPU), and the indices free to take
//! (`ITW_FREE_COUNTERS`), which it fills at load and refills as it forgets
//! keys.
//!
//! What it must never do: give an index back while a program may still add
//! to it, or give one back that is not zero on every CPU (the programs take
//! a free index as a fresh, zero count).

use aya::maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuValues, Queue};
use itw_common::{AttemptKey, maps};

use super::kernel::{map_error, removed, sum};
use crate::capture::CaptureError;

pub(super) struct AttemptCounters {
    attempts: HashMap<MapData, AttemptKey, u32>,
    counters: PerCpuArray<MapData, u64>,
    free: Queue<MapData, u32>,
    /// Indices of keys deleted by the last `forget`, given back at the next
    /// read (see [`AttemptCounters::release`]).
    quarantined: Vec<u32>,
    /// [`itw_common::Watch::generation`] for destinations watched from now
    /// on; changes with every `forget` and is never 0.
    generation: u32,
    /// How many CPUs the per-CPU values have (the possible CPUs).
    cpus: usize,
}

impl AttemptCounters {
    /// Takes the maps and makes every index `0..capacity` free (the counters
    /// of a fresh array are zero).
    pub(super) fn new(
        attempts: HashMap<MapData, AttemptKey, u32>,
        counters: PerCpuArray<MapData, u64>,
        mut free: Queue<MapData, u32>,
        capacity: u32,
    ) -> Result<Self, CaptureError> {
        let cpus = aya::util::nr_cpus().map_err(|(path, source)| CaptureError::Map {
            map: maps::COUNTERS,
            source: std::io::Error::new(source.kind(), format!("{path}: {source}")),
        })?;
        for index in 0..capacity {
            free.push(index, 0)
                .map_err(map_error(maps::FREE_COUNTERS))?;
        }
        Ok(Self {
            attempts,
            counters,
            free,
            quarantined: Vec::new(),
            generation: 1,
            cpus,
        })
    }

    pub(super) fn generation(&self) -> u32 {
        self.generation
    }

    /// Every key's count, summed over CPUs, after giving back what the last
    /// `forget` quarantined.
    pub(super) fn read(&mut self, out: &mut Vec<(AttemptKey, u64)>) -> Result<(), CaptureError> {
        self.release()?;
        for item in self.attempts.iter() {
            let (key, index) = item.map_err(map_error(maps::ATTEMPTS))?;
            let values = self
                .counters
                .get(&index, 0)
                .map_err(map_error(maps::COUNTERS))?;
            out.push((key, sum(&values)));
        }
        Ok(())
    }

    /// One key's count; `None` when it has none (forgotten, or never
    /// counted).
    pub(super) fn read_key(&self, key: &AttemptKey) -> Result<Option<u64>, CaptureError> {
        let index = match self.attempts.get(key, 0) {
            Ok(index) => index,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(None);
            }
            Err(err) => return Err(map_error(maps::ATTEMPTS)(err)),
        };
        let values = self
            .counters
            .get(&index, 0)
            .map_err(map_error(maps::COUNTERS))?;
        Ok(Some(sum(&values)))
    }

    /// Deletes the keys of `ids` and quarantines their indices.
    ///
    /// Why not free them at once: a program that looked a key's index up
    /// (in ATTEMPTS or in its CPU's last-caller cache) just before the
    /// delete may still add one to it, until its run ends. Runs end within
    /// an RCU grace period, far shorter than a collection tick; an index
    /// given back at the next read is zeroed after any such add, so the
    /// next key to take it starts from zero.
    pub(super) fn forget(
        &mut self,
        ids: &std::collections::HashSet<u32>,
    ) -> Result<(), CaptureError> {
        let mut doomed = Vec::new();
        for item in self.attempts.iter() {
            let (key, index) = item.map_err(map_error(maps::ATTEMPTS))?;
            if ids.contains(&key.dest_id) {
                doomed.push((key, index));
            }
        }
        for (key, index) in &doomed {
            removed(self.attempts.remove(key), maps::ATTEMPTS)?;
            self.quarantined.push(*index);
        }
        // A destination watched from now on may reuse one of `ids`: its
        // programs' last-caller entries from the id's earlier life must not
        // match it (their indices are the ones just quarantined).
        self.generation = match self.generation.wrapping_add(1) {
            0 => 1,
            next => next,
        };
        Ok(())
    }

    /// Zeroes the quarantined counters on every CPU and makes them free.
    fn release(&mut self) -> Result<(), CaptureError> {
        while let Some(&index) = self.quarantined.last() {
            let zeros = PerCpuValues::try_from(vec![0u64; self.cpus]).map_err(|source| {
                CaptureError::Map {
                    map: maps::COUNTERS,
                    source,
                }
            })?;
            self.counters
                .set(index, zeros, 0)
                .map_err(map_error(maps::COUNTERS))?;
            self.free
                .push(index, 0)
                .map_err(map_error(maps::FREE_COUNTERS))?;
            self.quarantined.pop();
        }
        Ok(())
    }
}
