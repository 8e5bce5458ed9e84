//! The capture bench's floor: what counting a connect cannot cost less than,
//! per hook, measured beside the agent's programs by the kernel's own
//! per-program statistics (`hack/bench capture`). Never loaded by the agent:
//! a separate object (`capture-floor.o`) so that the agent's embedded object
//! carries only programs it attaches.
//!
//! Per hook, two programs:
//! - empty: what any program on the hook costs (dispatch and the run-time
//!   statistics themselves);
//! - counter: the least a counter of watched destinations does: take the
//!   destination from the hook, one hash lookup of it in a map shaped like
//!   `ITW_WATCHED`, one per-CPU array increment on a hit. No process name, no
//!   filtering, no wake. The increment is the atomic add `itw.o` uses (the
//!   same reason holds here: cgroup programs run preemptible).
//!
//! For cgroup/connect4, variants of the counter that add one piece of what
//! the agent's program does, so that the bench prices each piece in the same
//! interleaved run:
//! - `+task`: the counter, then `bpf_get_current_task_btf` (a helper call);
//! - `+second lookup`: the counter, then a per-CPU hash lookup (insert on
//!   the first miss) of a 32-byte key shaped like `AttemptKey`, and an add;
//! - `+identity`: the counter, then the caller's identity as `itw.o` reads
//!   it: the task helper, `current->group_leader->comm` and
//!   `current->cgroups->dfl_cgrp->kn->id` by BTF loads (offsets from the
//!   kernel's BTF, set by the bench), folded into a per-CPU word.
//!
//! And two that price finding the destination in an open-addressed array
//! (`itw_common::dest_table`, issue #17) instead of the hash map: `table`,
//! the counter with that lookup, and `+identity table`, `+identity` with
//! it. The bench decides by the table's contents whether a lookup hits or
//! misses at the first slot or only after the last.
//!
//! Like the agent's, the cgroup programs return 1 (allow) on every path.

#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::read_volatile,
};

use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    macros::{cgroup_sock_addr, map, tracepoint},
    helpers::generated::bpf_get_current_task_btf,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{SockAddrContext, TracePointContext},
};
use itw_common::{
    AttemptKey, Destination, Watch,
    dest_table::{self, DestSlot, Found, SlotKey},
};

/// Shaped like `ITW_WATCHED` (key, value, flags); the bench sizes it as the
/// agent sizes that one.
#[map(name = "FLOOR_WATCHED")]
static FLOOR_WATCHED: HashMap<Destination, Watch> =
    HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

/// Index 0: the cgroup counters' hits (each variant runs alone); 1: the
/// tracepoint counter's; 2: where `+identity` folds what it read.
#[map(name = "FLOOR_COUNTS")]
static FLOOR_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// Shaped like `ITW_ATTEMPTS`, for the `+second lookup` variant.
#[map(name = "FLOOR_ATTEMPTS")]
static FLOOR_ATTEMPTS: PerCpuHashMap<AttemptKey, u64> =
    PerCpuHashMap::with_max_entries(16_384, BPF_F_NO_PREALLOC);

/// The table variants' destinations; the bench sizes it (a power of two) and
/// sets `FLOOR_TABLE_MASK` to its size less one.
#[map(name = "FLOOR_TABLE")]
static FLOOR_TABLE: Array<DestSlot> = Array::with_max_entries(262_144, 0);

#[unsafe(no_mangle)]
static FLOOR_TABLE_MASK: Global<u32> = Global::new(0);

// The tracepoint record's offsets, from this kernel's format file (as the
// agent sets itw.o's).
#[unsafe(no_mangle)]
static FLOOR_TP_NEWSTATE_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FLOOR_TP_DPORT_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FLOOR_TP_FAMILY_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FLOOR_TP_DADDR_OFFSET: Global<u32> = Global::new(0);

// task_struct and cgroup offsets, from this kernel's BTF (as the agent sets
// itw.o's).
#[unsafe(no_mangle)]
static FLOOR_TASK_GROUP_LEADER_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FLOOR_TASK_COMM_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FLOOR_TASK_CGROUPS_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FLOOR_CSS_SET_DFL_CGRP_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FLOOR_CGROUP_KN_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FLOOR_KERNFS_NODE_ID_OFFSET: Global<u32> = Global::new(0);

const SOCK_STREAM: u32 = 1;
const AF_INET: u16 = 2;
const TCP_SYN_SENT: i32 = 2;
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4_empty(_ctx: SockAddrContext) -> i32 {
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4_counter(ctx: SockAddrContext) -> i32 {
    if let Some(dest) = tcp_destination(&ctx) {
        count(&dest, 0);
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4_task(ctx: SockAddrContext) -> i32 {
    if let Some(dest) = tcp_destination(&ctx)
        && count(&dest, 0)
    {
        // SAFETY: a helper without arguments (a call the compiler keeps:
        // helpers are opaque to it).
        unsafe { bpf_get_current_task_btf() };
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4_second_lookup(ctx: SockAddrContext) -> i32 {
    if let Some(dest) = tcp_destination(&ctx)
        && count(&dest, 0)
    {
        let key = AttemptKey::new(1, 0, [0; 16]);
        match FLOOR_ATTEMPTS.get_ptr_mut(&key) {
            Some(value) => atomic_inc(value),
            None => {
                let _ = FLOOR_ATTEMPTS.insert(&key, &1, 0);
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4_identity(ctx: SockAddrContext) -> i32 {
    if let Some(dest) = tcp_destination(&ctx)
        && count(&dest, 0)
    {
        keep_identity();
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4_table(ctx: SockAddrContext) -> i32 {
    if let Some(dest) = tcp_destination(&ctx) {
        count_in_table(&dest);
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4_identity_table(ctx: SockAddrContext) -> i32 {
    if let Some(dest) = tcp_destination(&ctx)
        && count_in_table(&dest)
    {
        keep_identity();
    }
    ALLOW
}

/// [`count`] with the destination looked up in `FLOOR_TABLE` (and in
/// `FLOOR_WATCHED` only where the table says an entry overflowed there).
#[inline(always)]
fn count_in_table(dest: &Destination) -> bool {
    let found = dest_table::find(
        &SlotKey::of(dest),
        FLOOR_TABLE_MASK.load(),
        |i| FLOOR_TABLE.get_ptr(i),
        // SAFETY: a slot of the table, live for the run.
        |slot| dest_table::slot_words(unsafe { &*slot }),
    );
    let watched = match found {
        Found::Hit(_) => true,
        // SAFETY: only the presence of the key is used.
        Found::Overflow => unsafe { FLOOR_WATCHED.get(dest) }.is_some(),
        Found::Miss => false,
    };
    if watched && let Some(value) = FLOOR_COUNTS.get_ptr_mut(0) {
        atomic_inc(value);
    }
    watched
}

/// Reads the caller's identity and stores it where the compiler cannot
/// drop it.
#[inline(always)]
fn keep_identity() {
    let folded = identity();
    if let Some(sink) = FLOOR_COUNTS.get_ptr_mut(2) {
        // SAFETY: this CPU's value of a per-CPU array, live for the run.
        unsafe { *sink = folded };
    }
}

/// The leader's comm and the caller's cgroup id, read as `itw.o` reads them
/// (BTF loads the verifier checks and makes fault-safe), folded into a word.
#[inline(always)]
fn identity() -> u64 {
    let load = |ptr: *const u8, at: &Global<u32>| {
        // SAFETY: loads of fields the kernel's BTF has at these offsets.
        unsafe { read_volatile(ptr.add(at.load() as usize).cast::<u64>()) }
    };
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let leader = load(task, &FLOOR_TASK_GROUP_LEADER_OFFSET) as *const u8;
    // SAFETY: as in `load`; the second word of the 16-byte name.
    let comm = load(leader, &FLOOR_TASK_COMM_OFFSET)
        ^ unsafe { read_volatile(leader.add(FLOOR_TASK_COMM_OFFSET.load() as usize + 8).cast::<u64>()) };
    let cgroups = load(task, &FLOOR_TASK_CGROUPS_OFFSET) as *const u8;
    let cgroup = load(cgroups, &FLOOR_CSS_SET_DFL_CGRP_OFFSET) as *const u8;
    let kn = load(cgroup, &FLOOR_CGROUP_KN_OFFSET) as *const u8;
    comm ^ load(kn, &FLOOR_KERNFS_NODE_ID_OFFSET)
}

/// The destination of a TCP connect (None for the UDP connects this hook
/// also sees: the one check a counter of TCP connects cannot skip).
#[inline(always)]
fn tcp_destination(ctx: &SockAddrContext) -> Option<Destination> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr; each field is read
    // with the one-word load the verifier allows for it.
    unsafe {
        if read_ctx(&raw const (*sa).type_) != SOCK_STREAM {
            return None;
        }
        let addr = read_ctx(&raw const (*sa).user_ip4);
        let port = u16::from_be(read_ctx(&raw const (*sa).user_port) as u16);
        Some(Destination::v4_word(addr, port))
    }
}

#[tracepoint]
pub fn floor_set_state_empty(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint]
pub fn floor_set_state_counter(ctx: TracePointContext) -> u32 {
    // SAFETY: the offsets come from this kernel's format file for the event;
    // bpf_probe_read_kernel checks the addresses.
    unsafe {
        let Ok(newstate) = ctx.read_at::<i32>(FLOOR_TP_NEWSTATE_OFFSET.load() as usize) else {
            return 0;
        };
        if newstate != TCP_SYN_SENT {
            return 0;
        }
        let (Ok(family), Ok(port), Ok(addr)) = (
            ctx.read_at::<u16>(FLOOR_TP_FAMILY_OFFSET.load() as usize),
            ctx.read_at::<u16>(FLOOR_TP_DPORT_OFFSET.load() as usize),
            ctx.read_at::<u32>(FLOOR_TP_DADDR_OFFSET.load() as usize),
        ) else {
            return 0;
        };
        if family == AF_INET {
            count(&Destination::v4_word(addr, port), 1);
        }
    }
    0
}

/// Counts a connect to `dest` at `index` if `dest` is watched; whether it is.
#[inline(always)]
fn count(dest: &Destination, index: u32) -> bool {
    // SAFETY: only the presence of the key is used.
    if unsafe { FLOOR_WATCHED.get(dest) }.is_none() {
        return false;
    }
    if let Some(value) = FLOOR_COUNTS.get_ptr_mut(index) {
        atomic_inc(value);
    }
    true
}

#[inline(always)]
fn atomic_inc(value: *mut u64) {
    // SAFETY: `value` points into a map value this program holds; the result
    // is unused, which the BPF backend emits as a plain atomic add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(value, 1) };
}

/// A field of the cgroup programs' context. Volatile so that the compiler
/// keeps the 4-byte load the verifier checks instead of merging neighbours.
#[inline(always)]
unsafe fn read_ctx(field: *const u32) -> u32 {
    // SAFETY: the caller passes a field of the context.
    unsafe { core::ptr::read_volatile(field) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
