//! The attempt counters: one per (destination, caller's cgroup, process
//! name) key, at a stable index of a per-CPU array, so that counting the
//! same caller again costs no helper call.
//!
//! - `ITW_ATTEMPTS` maps a key to its counter's index; the programs insert a
//!   key on its first attempt, taking an index from `ITW_FREE_COUNTERS`, and
//!   only the agent deletes keys.
//! - `ITW_COUNTERS[index]` is the count, per CPU, added to atomically.
//! - `ITW_LAST_CALLERS` remembers, per CPU and destination slot, the last
//!   key counted and its index: the common case (the same caller as last
//!   time on this CPU) is a few loads and compares, then the add. The
//!   per-CPU array lookups are inlined by the verifier (6.10 and later), so
//!   the hit path has no call at all.
//!
//! What it must never do: lose a count or add one to another key's counter.
//! A key it cannot give a counter (none free, or ATTEMPTS out of memory)
//! tells the caller, which counts the attempt per destination instead.
//! Everything is `#[inline(always)]`, as in main.rs: a function of its own
//! would carry the crate's hash in its symbol and the kept object would not
//! rebuild byte for byte from another checkout.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    macros::map,
    maps::{HashMap, PerCpuArray, Queue},
};
use itw_common::{AttemptKey, LastCaller, capacity::LAST_CALLER_SLOTS};

// Sizes here are defaults: the agent sets all three from
// MAX_ATTEMPT_COUNTERS at load time (and fills the queue).

#[map(name = "ITW_ATTEMPTS")]
static ITW_ATTEMPTS: HashMap<AttemptKey, u32> =
    HashMap::with_max_entries(16_384, BPF_F_NO_PREALLOC);

// Preallocated on every CPU (8 bytes per counter per CPU): the price of a
// lookup the verifier turns into a few instructions.
#[map(name = "ITW_COUNTERS")]
static ITW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(16_384, 0);

#[map(name = "ITW_FREE_COUNTERS")]
static ITW_FREE_COUNTERS: Queue<u32> = Queue::with_max_entries(16_384, 0);

#[map(name = "ITW_LAST_CALLERS")]
static ITW_LAST_CALLERS: PerCpuArray<LastCaller> =
    PerCpuArray::with_max_entries(LAST_CALLER_SLOTS, 0);

/// Counts one attempt under `key`, whose destination is watched in its
/// `generation`. False when the key has no counter and can get none: the
/// caller counts the attempt elsewhere.
#[inline(always)]
pub fn count_attempt(key: &AttemptKey, generation: u32) -> bool {
    let slot = ITW_LAST_CALLERS.get_ptr_mut(key.dest_id & (LAST_CALLER_SLOTS - 1));
    if let Some(slot) = slot
        && let Some(counter) = remembered(slot, key, generation)
    {
        return add(counter);
    }
    let Some(counter) = counter_of(key) else {
        return false;
    };
    if let Some(slot) = slot {
        remember(slot, key, generation, counter);
    }
    add(counter)
}

/// The counter `slot` remembers for `key` in `generation`, if it holds
/// exactly that, read consistently (see [`LastCaller`]).
#[inline(always)]
fn remembered(slot: *mut LastCaller, key: &AttemptKey, generation: u32) -> Option<u32> {
    // SAFETY: `slot` points to this CPU's value of a per-CPU array, live for
    // the program's run; `key.comm` is 8-aligned (AttemptKey's layout test).
    unsafe {
        let seq = read_volatile(&raw const (*slot).seq);
        if seq & 1 != 0 {
            return None;
        }
        let comm = (&raw const (*slot).comm).cast::<u64>();
        let wanted = (&raw const key.comm).cast::<u64>();
        let same = read_volatile(&raw const (*slot).dest_id) == key.dest_id
            && read_volatile(&raw const (*slot).generation) == generation
            && read_volatile(&raw const (*slot).cgroup_id) == key.cgroup_id
            && read_volatile(comm) == *wanted
            && read_volatile(comm.add(1)) == *wanted.add(1);
        let counter = read_volatile(&raw const (*slot).counter);
        (same && read_volatile(&raw const (*slot).seq) == seq).then_some(counter)
    }
}

/// Makes `slot` remember `key` in `generation` and its counter, unless
/// another run on this CPU is writing it (then it stays as that one leaves
/// it: remembering is only a shortcut).
#[inline(always)]
fn remember(slot: *mut LastCaller, key: &AttemptKey, generation: u32, counter: u32) {
    // SAFETY: as in `remembered`. One CPU only touches its own value, so a
    // single-instruction add and a load after it are ordered: the writer
    // that reads back 1 is the only one between its add and its subtract.
    unsafe {
        let writers = &raw mut (*slot).writers;
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(writers, 1);
        if read_volatile(writers) == 1 {
            let seq = read_volatile(&raw const (*slot).seq);
            write_volatile(&raw mut (*slot).seq, seq.wrapping_add(1));
            write_volatile(&raw mut (*slot).dest_id, key.dest_id);
            write_volatile(&raw mut (*slot).generation, generation);
            write_volatile(&raw mut (*slot).cgroup_id, key.cgroup_id);
            let comm = (&raw mut (*slot).comm).cast::<u64>();
            let from = (&raw const key.comm).cast::<u64>();
            write_volatile(comm, *from);
            write_volatile(comm.add(1), *from.add(1));
            write_volatile(&raw mut (*slot).counter, counter);
            write_volatile(&raw mut (*slot).seq, seq.wrapping_add(2));
        }
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(writers, u32::MAX);
    }
}

/// `key`'s counter index, taking a free one for a new key.
#[inline(always)]
fn counter_of(key: &AttemptKey) -> Option<u32> {
    // SAFETY: reading the value of a present key; values are never changed
    // in place (the agent deletes keys, never rewrites them).
    if let Some(counter) = unsafe { ITW_ATTEMPTS.get(key) } {
        return Some(*counter);
    }
    // Empty (all in use or quarantined) or busy: no counter this time.
    let Ok(Some(fresh)) = ITW_FREE_COUNTERS.pop() else {
        return None;
    };
    if ITW_ATTEMPTS.insert(key, &fresh, BPF_NOEXIST.into()).is_ok() {
        return Some(fresh);
    }
    // Another task made the key between the lookup and the insert (EEXIST):
    // give the index back and use the winner's. Otherwise ATTEMPTS is out of
    // memory. The index is still zero: nothing was added to it.
    let _ = ITW_FREE_COUNTERS.push(&fresh, 0);
    // SAFETY: as above.
    unsafe { ITW_ATTEMPTS.get(key) }.map(|counter| *counter)
}

/// Adds one to counter `counter` on this CPU; false if there is no such
/// index (the agent filled the free queue with indices of this array only).
#[inline(always)]
fn add(counter: u32) -> bool {
    match ITW_COUNTERS.get_ptr_mut(counter) {
        Some(value) => {
            atomic_inc(value);
            true
        }
        None => false,
    }
}

/// Adds one to a per-CPU counter atomically. Per-CPU alone is not enough:
/// cgroup programs run with migration, not preemption, disabled, so another
/// task on the same CPU can run the program between a load and a store.
#[inline(always)]
pub fn atomic_inc(value: *mut u64) {
    // SAFETY: `value` points into a map value this program holds; the result
    // is unused, which the BPF backend emits as a plain atomic add.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(value, 1);
    }
}
