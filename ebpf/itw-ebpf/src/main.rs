//! internal-tcp-watcher's kernel side: counts TCP connect attempts to watched
//! destinations, per destination, caller's cgroup and process name.
//!
//! Three hooks see the same attempt at different points; the agent attaches
//! the ones of one capture mode:
//! - `cgroup/connect4`, `cgroup/connect6` on the cgroup v2 root: the address the
//!   caller asked for, before any socket-level load balancer rewrites it;
//! - kprobes on `tcp_v4_connect`/`tcp_v6_connect`, reading their `uaddr`;
//! - the `sock:inet_sock_set_state` tracepoint, transitions to `TCP_SYN_SENT`.
//!
//! Each attempt: look the destination up in `ITW_WATCHED` (a miss ends it, the
//! cost every other connect on the machine pays), take the process's name,
//! count it as filtered (excluded names) or as an attempt (`counters`: the
//! same caller as last time on this CPU costs no map call), and when the
//! destination was armed (idle), send one wake record.
//!
//! What it must never do: fail or delay a caller's connect. The cgroup programs
//! return 1 (allow) on every path; counting never waits on anything, and a full
//! ring buffer only loses a wake, never a count.

#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write in `core`
// (no CAS), but the kernel has an atomic add (BPF_ATOMIC | BPF_ADD).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod counters;

use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
            bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_task_btf,
            bpf_get_socket_cookie, bpf_ktime_get_ns,
        },
    },
    macros::{cgroup_sock_addr, kprobe, map, sock_ops, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, SockAddrContext, SockOpsContext, TracePointContext},
};
use counters::{atomic_inc, count_attempt};
use itw_common::{
    AttemptKey, COMM_LEN, Comm, ConnKey, Destination, Park, ParkKey, Redirect, WakeEvent, Watch,
    capacity, comm::zero_after_nul, comm_source, excluded_hint_bit, stat,
};

// Map sizes here are defaults: the agent sets WATCHED and OVERFLOW from
// MAX_DESTINATIONS at load time (and the counters' maps, in counters.rs).
//
// BPF_F_NO_PREALLOC: memory is taken per entry in use instead of for every
// possible entry at load. A preallocated per-CPU map costs max_entries x CPUs
// x 8 bytes up front (16,384 counters on a 128-CPU node: 16 MiB) however few
// keys are in use; lookups of existing keys cost the same either way, and an
// insert allocates from the kernel's per-CPU BPF allocator only on a key's
// first attempt.

#[map(name = "ITW_WATCHED")]
static ITW_WATCHED: HashMap<Destination, Watch> =
    HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

#[map(name = "ITW_EXCLUDED")]
static ITW_EXCLUDED: HashMap<Comm, u8> = HashMap::with_max_entries(capacity::EXCLUDED, 0);

// One word, written by the agent: a name whose hint bit is clear here is not
// in ITW_EXCLUDED, so most connects skip that hash lookup. Array lookups are
// inlined by the verifier: a load, not a call.
#[map(name = "ITW_EXCLUDED_HINT")]
static ITW_EXCLUDED_HINT: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "ITW_OVERFLOW")]
static ITW_OVERFLOW: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

#[map(name = "ITW_FILTERED")]
static ITW_FILTERED: PerCpuHashMap<Comm, u64> =
    PerCpuHashMap::with_max_entries(capacity::FILTERED, BPF_F_NO_PREALLOC);

#[map(name = "ITW_WAKES")]
static ITW_WAKES: RingBuf = RingBuf::with_byte_size(capacity::WAKES_BYTES, 0);

#[map(name = "ITW_STATS")]
static ITW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

// Holding (cgroup mode): a held ClusterIP:port's connects go to a parking
// listener of the agent, which hands them over once a pod is ready.
#[map(name = "ITW_HOLD")]
static ITW_HOLD: HashMap<Destination, Park> =
    HashMap::with_max_entries(capacity::HOLD, BPF_F_NO_PREALLOC);

// How many entries ITW_HOLD has: 0 (nothing held, the usual case) skips the
// lookup on the warm path. An inlined array load, not a call.
#[map(name = "ITW_HOLD_COUNT")]
static ITW_HOLD_COUNT: Array<u64> = Array::with_max_entries(1, 0);

// The pods' cgroup's level in the whole hierarchy, as the pods' program
// learns it on the first pod connect (0: not yet). It cannot be known from
// the agent's side: the node's cgroup root may itself be nested in the host's
// hierarchy (kind, k3d), seen through a cgroup namespace.
#[map(name = "ITW_POD_LEVEL")]
static ITW_POD_LEVEL: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "ITW_PARKED")]
static ITW_PARKED: HashMap<ParkKey, Destination> =
    HashMap::with_max_entries(capacity::HOLD, BPF_F_NO_PREALLOC);

// What was parked, first by socket cookie (the connect hook runs before the
// source port is chosen), then by 4-tuple (sock_ops at tcp_connect): the
// parking side hands on only connections it finds here.
#[map(name = "ITW_HOLD_REDIRECTS")]
static ITW_HOLD_REDIRECTS: LruHashMap<u64, Redirect> =
    LruHashMap::with_max_entries(capacity::HOLD_CONNS, 0);

#[map(name = "ITW_HOLD_CONNS")]
static ITW_HOLD_CONNS: LruHashMap<ConnKey, Redirect> =
    LruHashMap::with_max_entries(capacity::HOLD_CONNS, 0);

// Per held Service's slot (0: the node): connects parked ever (here),
// parked connects ended (the agent), connects not parked over a cap.
#[map(name = "ITW_HOLD_ADMITTED")]
static ITW_HOLD_ADMITTED: Array<u64> = Array::with_max_entries(capacity::HOLD_SLOTS, 0);

#[map(name = "ITW_HOLD_FINISHED")]
static ITW_HOLD_FINISHED: Array<u64> = Array::with_max_entries(capacity::HOLD_SLOTS, 0);

#[map(name = "ITW_HOLD_REFUSED")]
static ITW_HOLD_REFUSED: Array<u64> = Array::with_max_entries(capacity::HOLD_SLOTS, 0);

// Read-only globals, set by the agent at load (itw_common::globals). The
// verifier sees their values as constants and skips the branches they switch
// off, so a kernel refusing one process-name path still loads the program
// with another (ITW_COMM_FROM_LEADER, itw_common::comm_source).
#[unsafe(no_mangle)]
static ITW_COMM_FROM_LEADER: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TASK_GROUP_LEADER_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TASK_COMM_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TP_NEWSTATE_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TP_DPORT_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TP_FAMILY_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TP_PROTOCOL_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TP_DADDR_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TP_DADDR_V6_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_HOLD_ENABLED: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_HOLD_MARK: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_PARK_IP4: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_PARK_IP6: Global<[u32; 4]> = Global::new([0; 4]);
#[unsafe(no_mangle)]
static ITW_POD_CGROUP_ID: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_HOLD_MAX_PER_SERVICE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_HOLD_MAX_PER_NODE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TASK_NSPROXY_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_NSPROXY_NET_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_NET_INUM_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_TASK_CGROUPS_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_CSS_SET_DFL_CGRP_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_CGROUP_KN_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static ITW_KERNFS_NODE_ID_OFFSET: Global<u32> = Global::new(0);

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u16 = 6;
const TCP_SYN_SENT: i32 = 2;

/// The cgroup programs' verdict: let the connect proceed. Never anything else.
const ALLOW: i32 = 1;

/// `struct sockaddr_in` (UAPI).
#[repr(C)]
#[derive(Clone, Copy)]
struct SockaddrIn {
    family: u16,
    /// Network byte order.
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

/// `struct sockaddr_in6` (UAPI).
#[repr(C)]
#[derive(Clone, Copy)]
struct SockaddrIn6 {
    family: u16,
    /// Network byte order.
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

/// Which attachment a connect program serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Attached to the cgroup v2 root: every process on the node, except the
    /// pods' when the pods' cgroup has its own attachment.
    Root,
    /// Attached to the pods' cgroup: runs before the root's programs (and so
    /// before a socket load balancer attached there), which matters for
    /// holding.
    Pods,
}

#[cgroup_sock_addr(connect4)]
pub fn itw_connect4(ctx: SockAddrContext) -> i32 {
    connect4(&ctx, Role::Root);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn itw_connect4_pods(ctx: SockAddrContext) -> i32 {
    connect4(&ctx, Role::Pods);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn itw_connect6(ctx: SockAddrContext) -> i32 {
    connect6(&ctx, Role::Root);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn itw_connect6_pods(ctx: SockAddrContext) -> i32 {
    connect6(&ctx, Role::Pods);
    ALLOW
}

#[inline(always)]
fn connect4(ctx: &SockAddrContext, role: Role) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr; each field is read
    // with the one-word load the verifier allows for it.
    unsafe {
        // connect4 also runs for UDP (and raw) sockets' connect().
        if read_ctx(&raw const (*sa).type_) != SOCK_STREAM || handled_elsewhere(ctx, role) {
            return;
        }
        let addr = read_ctx(&raw const (*sa).user_ip4);
        let port = u16::from_be(read_ctx(&raw const (*sa).user_port) as u16);
        let dest = Destination::v4_word(addr, port);
        on_attempt(&dest);
        if let Some(park) = held(&dest) {
            let ip = ITW_PARK_IP4.load();
            if ip != 0 && admit(ctx, &dest, &park) {
                write_ctx(&raw mut (*sa).user_ip4, ip);
                write_ctx(&raw mut (*sa).user_port, u32::from(park.port.to_be()));
            }
        }
    }
}

#[inline(always)]
fn connect6(ctx: &SockAddrContext, role: Role) {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4.
    unsafe {
        if read_ctx(&raw const (*sa).type_) != SOCK_STREAM || handled_elsewhere(ctx, role) {
            return;
        }
        let mut addr = [0u8; 16];
        let words = &raw mut (*sa).user_ip6;
        for (i, chunk) in addr.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&read_ctx(words.cast::<u32>().add(i)).to_ne_bytes());
        }
        let port = u16::from_be(read_ctx(&raw const (*sa).user_port) as u16);
        // A v4-mapped address is already the key its IPv4 form is watched under.
        let dest = Destination::new(addr, port);
        on_attempt(&dest);
        if let Some(park) = held(&dest) {
            // A v4-mapped ClusterIP parks at the v4-mapped parking address:
            // the socket can only reach IPv4 through that form.
            let park_words = if is_v4_mapped(&addr) {
                let ip = ITW_PARK_IP4.load();
                [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip]
            } else {
                ITW_PARK_IP6.load()
            };
            let parkable =
                park_words[3] != 0 || park_words[2] != 0 || park_words[1] != 0 || park_words[0] != 0;
            if parkable && admit(ctx, &dest, &park) {
                for (i, word) in park_words.iter().enumerate() {
                    write_ctx(words.cast::<u32>().add(i), *word);
                }
                write_ctx(&raw mut (*sa).user_port, u32::from(park.port.to_be()));
            }
        }
    }
}

/// Whether this connect is not ours to count: the agent's own (marked), or,
/// for the root's program, a pod's that the pods' cgroup program handled.
#[inline(always)]
unsafe fn handled_elsewhere(ctx: &SockAddrContext, role: Role) -> bool {
    if ITW_HOLD_ENABLED.load() != 0 {
        // SAFETY: `sk` of a connect hook's context is the connecting socket
        // (the verifier types it as such and still wants a null check).
        let sk = unsafe { core::ptr::read_volatile(&raw const (*ctx.sock_addr).__bindgen_anon_1.sk) };
        if !sk.is_null() && unsafe { core::ptr::read_volatile(&raw const (*sk).mark) } == ITW_HOLD_MARK.load() {
            return true;
        }
    }
    let pods = ITW_POD_CGROUP_ID.load();
    if pods == 0 {
        return false;
    }
    let Some(level) = ITW_POD_LEVEL.get_ptr_mut(0) else {
        return false;
    };
    match role {
        Role::Pods => {
            // SAFETY: the one entry of an array map, written only here.
            if unsafe { *level } == 0 {
                learn_pods_level(pods, level);
            }
            false
        }
        // SAFETY: a helper call with a level; it returns 0 past the task's
        // depth. A pod's connect reaches the root's program only after the
        // pods' program has run for it and learned the level.
        Role::Root => unsafe {
            let known = *level;
            known != 0 && bpf_get_current_ancestor_cgroup_id(known as i32) == pods
        },
    }
}

/// Deepest level searched for the pods' cgroup.
const MAX_CGROUP_LEVEL: u32 = 32;

/// Finds the pods' cgroup among the calling task's ancestors (it is one: the
/// pods' program runs only below it) and stores its level. Inlined like
/// everything here: a function of its own would carry the crate's hash in
/// its symbol, which depends on the checkout's path, and the kept object
/// would not rebuild byte for byte elsewhere.
#[inline(always)]
fn learn_pods_level(pods: u64, level: *mut u32) {
    for candidate in 1..=MAX_CGROUP_LEVEL {
        // SAFETY: a helper call with a level; `level` points into a map value.
        unsafe {
            if bpf_get_current_ancestor_cgroup_id(candidate as i32) == pods {
                *level = candidate;
                return;
            }
        }
    }
}

/// Whether this connect to `dest` may be parked under `park`'s caps; if so,
/// it is counted as admitted and recorded by socket cookie, for `sock_ops`
/// to join to its 4-tuple. Over a cap it goes on unheld, counted as refused.
#[inline(always)]
fn admit(ctx: &SockAddrContext, dest: &Destination, park: &Park) -> bool {
    // A connection the agent could not hand on from the caller's own
    // network namespace is not parked at all.
    let netns = caller_netns();
    if netns == 0 {
        add_stat(stat::HOLD_NO_NETNS);
        return false;
    }
    let slot = u32::from(park.slot);
    let (Some(admitted), Some(finished), Some(node_admitted), Some(node_finished)) = (
        ITW_HOLD_ADMITTED.get_ptr_mut(slot),
        ITW_HOLD_FINISHED.get(slot),
        ITW_HOLD_ADMITTED.get_ptr_mut(0),
        ITW_HOLD_FINISHED.get(0),
    ) else {
        add_stat(stat::HOLD_BAD_SLOT);
        return false;
    };
    // SAFETY: pointers to array values, live for the program's run. Racing
    // CPUs may each pass a cap by one: a bound, not an exact count.
    unsafe {
        let parked = (*admitted).wrapping_sub(*finished);
        let node_parked = (*node_admitted).wrapping_sub(*node_finished);
        if parked >= u64::from(ITW_HOLD_MAX_PER_SERVICE.load())
            || node_parked >= u64::from(ITW_HOLD_MAX_PER_NODE.load())
        {
            if let Some(refused) = ITW_HOLD_REFUSED.get_ptr_mut(slot) {
                atomic_inc(refused);
            }
            return false;
        }
        atomic_inc(admitted);
        atomic_inc(node_admitted);
        let record = Redirect {
            dest: *dest,
            netns,
            tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
            slot: park.slot,
            _pad: [0; 10],
            parked_ns: bpf_ktime_get_ns(),
        };
        let cookie = bpf_get_socket_cookie(ctx.sock_addr.cast());
        // An LRU map makes room by itself.
        let _ = ITW_HOLD_REDIRECTS.insert(&cookie, &record, 0);
    }
    true
}

/// The inode number of the calling task's network namespace
/// (`current->nsproxy->net_ns->ns.inum`), read the way the process name is
/// (BTF loads or probe reads); 0 when it cannot be read.
#[inline(always)]
fn caller_netns() -> u32 {
    let source = ITW_COMM_FROM_LEADER.load();
    let nsproxy_at = ITW_TASK_NSPROXY_OFFSET.load() as usize;
    let net_at = ITW_NSPROXY_NET_OFFSET.load() as usize;
    let inum_at = ITW_NET_INUM_OFFSET.load() as usize;
    if source == comm_source::LEADER_BTF {
        // SAFETY: as in leader_comm_btf: loads the verifier checks against
        // the kernel's BTF, fault-safe.
        unsafe {
            let task = bpf_get_current_task_btf() as *const u8;
            let nsproxy = core::ptr::read_volatile(task.add(nsproxy_at).cast::<*const u8>());
            if nsproxy.is_null() {
                return 0;
            }
            let net = core::ptr::read_volatile(nsproxy.add(net_at).cast::<*const u8>());
            if net.is_null() {
                return 0;
            }
            core::ptr::read_volatile(net.add(inum_at).cast::<u32>())
        }
    } else if source == comm_source::LEADER_PROBE_READ {
        // SAFETY: bpf_probe_read_kernel checks every address it is given.
        unsafe {
            let task = bpf_get_current_task() as usize as *const u8;
            let Ok(nsproxy) =
                bpf_probe_read_kernel(task.wrapping_add(nsproxy_at).cast::<*const u8>())
            else {
                return 0;
            };
            let Ok(net) = bpf_probe_read_kernel(nsproxy.wrapping_add(net_at).cast::<*const u8>())
            else {
                return 0;
            };
            bpf_probe_read_kernel(net.wrapping_add(inum_at).cast::<u32>()).unwrap_or(0)
        }
    } else {
        0
    }
}

/// `BPF_SOCK_OPS_TCP_CONNECT_CB`: `tcp_connect()` of an active socket, its
/// source port chosen.
const TCP_CONNECT_CB: u32 = 3;
const AF_INET_U32: u32 = 2;

/// Joins a parked connect's record (by socket cookie) to its 4-tuple, which
/// the parking listener sees at accept. Runs for every active TCP open under
/// the root; a cookie lookup for the rest.
#[sock_ops]
pub fn itw_sock_ops(ctx: SockOpsContext) -> u32 {
    // SAFETY: as below.
    if unsafe { read_ctx(&raw const (*ctx.ops).op) } != TCP_CONNECT_CB
        || ITW_HOLD_ENABLED.load() == 0
    {
        return 1;
    }
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: a copy of the value, taken under the program's RCU section.
    let Some(record) = (unsafe { ITW_HOLD_REDIRECTS.get(&cookie) }).copied() else {
        return 1;
    };
    let ops = ctx.ops;
    // Every field read unconditionally: a load on each branch would be
    // merged into one through a computed context pointer, which the
    // verifier refuses.
    // SAFETY: the kernel passes a valid bpf_sock_ops; each field is read
    // with a one-word load at a constant offset from the context.
    let (family, ip4, ip6, local_port, remote_port) = unsafe {
        (
            read_ctx(&raw const (*ops).family),
            read_ctx(&raw const (*ops).local_ip4),
            [
                read_ctx(&raw const (*ops).local_ip6[0]),
                read_ctx(&raw const (*ops).local_ip6[1]),
                read_ctx(&raw const (*ops).local_ip6[2]),
                read_ctx(&raw const (*ops).local_ip6[3]),
            ],
            read_ctx(&raw const (*ops).local_port),
            read_ctx(&raw const (*ops).remote_port),
        )
    };
    let mut addr = [0u8; 16];
    if family == AF_INET_U32 {
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&ip4.to_ne_bytes());
    } else {
        for (i, word) in ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    let key = ConnKey {
        addr,
        port: local_port as u16,
        // Network byte order in the context's upper half on little-endian
        // machines, as the kernel documents it: one swap gives the port.
        park_port: u32::from_be(remote_port) as u16,
    };
    let _ = ITW_HOLD_CONNS.insert(&key, &record, 0);
    let _ = ITW_HOLD_REDIRECTS.remove(&cookie);
    1
}

/// Where `dest`'s connects are parked, if it is held.
#[inline(always)]
fn held(dest: &Destination) -> Option<Park> {
    if ITW_HOLD_ENABLED.load() == 0 {
        return None;
    }
    if ITW_HOLD_COUNT.get(0).is_none_or(|n| *n == 0) {
        return None;
    }
    // SAFETY: a copy of the value, taken under the program's RCU section.
    unsafe { ITW_HOLD.get(dest) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn itw_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4.
    unsafe {
        let park_ip = ITW_PARK_IP4.load();
        if ITW_HOLD_ENABLED.load() == 0 || park_ip == 0 || read_ctx(&raw const (*sa).user_ip4) != park_ip {
            return ALLOW;
        }
        let port = u16::from_be(read_ctx(&raw const (*sa).user_port) as u16);
        if let Some(dest) = ITW_PARKED.get(&ParkKey { family: 4, port }) {
            let a = dest.addr;
            write_ctx(&raw mut (*sa).user_ip4, u32::from_ne_bytes([a[12], a[13], a[14], a[15]]));
            write_ctx(&raw mut (*sa).user_port, u32::from(dest.port.to_be()));
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn itw_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4.
    unsafe {
        if ITW_HOLD_ENABLED.load() == 0 {
            return ALLOW;
        }
        let words = &raw mut (*sa).user_ip6;
        let mut peer = [0u32; 4];
        for (i, word) in peer.iter_mut().enumerate() {
            *word = read_ctx(words.cast::<u32>().add(i));
        }
        let mapped4 = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ITW_PARK_IP4.load()];
        let family = if peer[3] != 0 && peer == mapped4 {
            4
        } else if peer == ITW_PARK_IP6.load() && peer != [0; 4] {
            6
        } else {
            return ALLOW;
        };
        let port = u16::from_be(read_ctx(&raw const (*sa).user_port) as u16);
        if let Some(dest) = ITW_PARKED.get(&ParkKey { family, port }) {
            for (i, chunk) in dest.addr.chunks_exact(4).enumerate() {
                let word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                write_ctx(words.cast::<u32>().add(i), word);
            }
            write_ctx(&raw mut (*sa).user_port, u32::from(dest.port.to_be()));
        }
    }
    ALLOW
}

/// Writes a field of the cgroup programs' context (the one-word store the
/// verifier allows for the writable ones).
#[inline(always)]
unsafe fn write_ctx(field: *mut u32, value: u32) {
    // SAFETY: the caller passes a writable field of the context.
    unsafe { core::ptr::write_volatile(field, value) }
}

/// A field of the cgroup programs' context. Volatile so that the compiler
/// keeps the 4-byte load the verifier checks instead of merging neighbours.
#[inline(always)]
unsafe fn read_ctx(field: *const u32) -> u32 {
    // SAFETY: the caller passes a field of the context.
    unsafe { core::ptr::read_volatile(field) }
}

#[kprobe]
pub fn itw_tcp_v4_connect(ctx: ProbeContext) -> u32 {
    // tcp_v4_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len):
    // uaddr is the kernel's copy of the caller's address.
    let Some(uaddr) = ctx.arg::<*const SockaddrIn>(1) else {
        return 0;
    };
    // SAFETY: bpf_probe_read_kernel checks the address.
    let Ok(sin) = (unsafe { bpf_probe_read_kernel(uaddr) }) else {
        return 0;
    };
    // tcp_v4_connect refuses any other family before it does anything.
    if sin.family == AF_INET {
        on_attempt(&Destination::v4(sin.addr, u16::from_be(sin.port)));
    }
    0
}

#[kprobe]
pub fn itw_tcp_v6_connect(ctx: ProbeContext) -> u32 {
    let Some(uaddr) = ctx.arg::<*const SockaddrIn6>(1) else {
        return 0;
    };
    // SAFETY: bpf_probe_read_kernel checks the address.
    let Ok(sin6) = (unsafe { bpf_probe_read_kernel(uaddr) }) else {
        return 0;
    };
    // A v4-mapped destination is handed on to tcp_v4_connect, whose probe
    // counts it: counting it here too would count it twice.
    if sin6.family == AF_INET6 && !is_v4_mapped(&sin6.addr) {
        on_attempt(&Destination::new(sin6.addr, u16::from_be(sin6.port)));
    }
    0
}

fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

#[tracepoint]
pub fn itw_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // This runs for every TCP state change on the machine: test the new state
    // first, then the protocol (the event also fires for other protocols).
    // SAFETY: the offsets come from this kernel's format file for the event;
    // bpf_probe_read_kernel checks the addresses.
    unsafe {
        let Ok(newstate) = ctx.read_at::<i32>(ITW_TP_NEWSTATE_OFFSET.load() as usize) else {
            return 0;
        };
        if newstate != TCP_SYN_SENT {
            return 0;
        }
        let Ok(protocol) = ctx.read_at::<u16>(ITW_TP_PROTOCOL_OFFSET.load() as usize) else {
            return 0;
        };
        if protocol != IPPROTO_TCP {
            return 0;
        }
        let (Ok(family), Ok(port)) = (
            ctx.read_at::<u16>(ITW_TP_FAMILY_OFFSET.load() as usize),
            // Host byte order in this event.
            ctx.read_at::<u16>(ITW_TP_DPORT_OFFSET.load() as usize),
        ) else {
            return 0;
        };
        if family == AF_INET {
            if let Ok(addr) = ctx.read_at::<u32>(ITW_TP_DADDR_OFFSET.load() as usize) {
                on_attempt(&Destination::v4_word(addr, port));
            }
        } else if family == AF_INET6 {
            // An IPv6 socket connecting to a v4-mapped address reports it here
            // in its mapped form: the key its IPv4 form is watched under.
            if let Ok(addr) = ctx.read_at::<[u8; 16]>(ITW_TP_DADDR_V6_OFFSET.load() as usize) {
                on_attempt(&Destination::new(addr, port));
            }
        }
    }
    0
}

/// One connect attempt to `dest`, from the current task.
#[inline(always)]
fn on_attempt(dest: &Destination) {
    let Some(watch) = ITW_WATCHED.get_ptr_mut(dest) else {
        return;
    };
    // One call for the task, shared by the name and the cgroup id below.
    let task = if ITW_COMM_FROM_LEADER.load() == comm_source::LEADER_BTF {
        // SAFETY: a helper without arguments.
        unsafe { bpf_get_current_task_btf() as *const u8 }
    } else {
        core::ptr::null()
    };
    let comm = process_comm(task);
    // SAFETY: reading the value of a present key; the map is only written by
    // the agent (whole-value updates) and by the armed flag below.
    if maybe_excluded(&comm) && unsafe { ITW_EXCLUDED.get(comm) }.is_some() {
        if !increment(&ITW_FILTERED, &comm) {
            add_stat(stat::OVERFLOW_FULL);
        }
        return;
    }
    // SAFETY: `watch` points to a live value of WATCHED (freed only after
    // this program's RCU read section if the agent deletes it meanwhile).
    let (dest_id, generation) = unsafe { ((*watch).dest_id, (*watch).generation) };
    // The caller's own cgroup: the agent maps it to the calling pod. Taken
    // only for watched destinations, like the name.
    let cgroup_id = caller_cgroup_id(task);
    let mut overflowed = 0;
    if !count_attempt(&AttemptKey::new(dest_id, cgroup_id, comm), generation) {
        add_stat(stat::ATTEMPTS_FULL);
        overflowed = 1;
        if !increment(&ITW_OVERFLOW, &dest_id) {
            add_stat(stat::OVERFLOW_FULL);
        }
    }
    // Read after counting rather than before: it would otherwise live
    // across the helper calls above and be spilled to the stack.
    // SAFETY: as above.
    if unsafe { (*watch).armed } != 0 {
        // Two CPUs racing here may both send a wake; the agent takes a
        // duplicate as a no-op, and the common case costs no atomic.
        // SAFETY: as above.
        unsafe { (*watch).armed = 0 };
        match ITW_WAKES.reserve::<WakeEvent>(0) {
            Some(mut entry) => {
                // The counter it went to: the agent reads that one at once.
                entry.write(WakeEvent {
                    dest_id,
                    overflowed,
                    comm,
                    cgroup_id,
                    dest: *dest,
                    _pad: 0,
                });
                // Flags 0: the kernel wakes the reader when it has caught up,
                // which is what a rare, latency-critical record wants.
                entry.submit(0);
            }
            None => add_stat(stat::WAKE_DROPPED),
        }
    }
}

/// Whether `comm` may be an excluded name (false: it surely is not).
#[inline(always)]
fn maybe_excluded(comm: &Comm) -> bool {
    match ITW_EXCLUDED_HINT.get(0) {
        Some(hint) => *hint & excluded_hint_bit(comm) != 0,
        // Unreachable for a one-entry array; check the map rather than guess.
        None => true,
    }
}

/// Adds one to `key`'s counter on this CPU, creating it if absent. False when
/// the map is full (or out of memory): the caller counts the attempt elsewhere.
#[inline(always)]
fn increment<K>(map: &PerCpuHashMap<K, u64>, key: &K) -> bool {
    if let Some(value) = map.get_ptr_mut(key) {
        atomic_inc(value);
        return true;
    }
    if map.insert(key, 1, BPF_NOEXIST.into()).is_ok() {
        return true;
    }
    // Another task created the key between the lookup and the insert (EEXIST):
    // add to that one. Otherwise the map is full.
    match map.get_ptr_mut(key) {
        Some(value) => {
            atomic_inc(value);
            true
        }
        None => false,
    }
}

#[inline(always)]
fn add_stat(index: u32) {
    if let Some(value) = ITW_STATS.get_ptr_mut(index) {
        atomic_inc(value);
    }
}

/// The caller's cgroup v2 id, `current->cgroups->dfl_cgrp->kn->id`: what
/// `bpf_get_current_cgroup_id` returns. Through `task` (the BTF-typed
/// current task, null when the name is not read that way) with plain loads
/// where the agent found the offsets, else the helper: a call costs more
/// than the four loads, the more so where every return from the kernel is
/// mitigated (SRSO's safe RET).
#[inline(always)]
fn caller_cgroup_id(task: *const u8) -> u64 {
    let cgroups_at = ITW_TASK_CGROUPS_OFFSET.load() as usize;
    if !task.is_null() && cgroups_at != 0 {
        // SAFETY: as in leader_comm_btf: loads the verifier checks against
        // the kernel's BTF, fault-safe; each pointer is tested before use.
        unsafe {
            let cgroups = core::ptr::read_volatile(task.add(cgroups_at).cast::<*const u8>());
            if !cgroups.is_null() {
                let dfl = ITW_CSS_SET_DFL_CGRP_OFFSET.load() as usize;
                let cgroup = core::ptr::read_volatile(cgroups.add(dfl).cast::<*const u8>());
                if !cgroup.is_null() {
                    let kn_at = ITW_CGROUP_KN_OFFSET.load() as usize;
                    let kn = core::ptr::read_volatile(cgroup.add(kn_at).cast::<*const u8>());
                    if !kn.is_null() {
                        let id_at = ITW_KERNFS_NODE_ID_OFFSET.load() as usize;
                        return core::ptr::read_volatile(kn.add(id_at).cast::<u64>());
                    }
                }
            }
        }
    }
    // SAFETY: a helper without arguments, allowed in every program type here.
    unsafe { bpf_get_current_cgroup_id() }
}

/// The calling process's name: the thread-group leader's `comm` (a JVM
/// thread `pool-3-thread-7` counts under `java`), or the thread's own name
/// when the agent switched that off or the read fails. `task` is the
/// BTF-typed current task when the name is read through it.
#[inline(always)]
fn process_comm(task: *const u8) -> Comm {
    let source = ITW_COMM_FROM_LEADER.load();
    let leader = if source == comm_source::LEADER_BTF {
        Some(leader_comm_btf(task))
    } else if source == comm_source::LEADER_PROBE_READ {
        leader_comm_probe_read()
    } else {
        None
    };
    match leader {
        Some(comm) => comm,
        None => {
            if source != comm_source::THREAD {
                add_stat(stat::LEADER_COMM_FAILED);
            }
            // The helper copies the name NUL-padded (strncpy, or strscpy_pad
            // on newer kernels): nothing to clean.
            bpf_get_current_comm().unwrap_or([0; COMM_LEN])
        }
    }
}

/// `current->group_leader->comm` through the BTF-typed pointer
/// `bpf_get_current_task_btf` returns: plain loads, which the verifier
/// checks against the kernel's BTF (the offsets are read-only globals, so it
/// sees them as constants) and turns into fault-safe loads. A quarter of what
/// two `bpf_probe_read_kernel` calls cost on every counted connect.
#[inline(always)]
fn leader_comm_btf(task: *const u8) -> Comm {
    // SAFETY: the verifier allows only loads of fields the kernel's BTF has
    // at these offsets; a faulting load yields zero instead of an oops.
    unsafe {
        let leader = core::ptr::read_volatile(
            task.add(ITW_TASK_GROUP_LEADER_OFFSET.load() as usize)
                .cast::<*const u8>(),
        );
        let name = leader
            .add(ITW_TASK_COMM_OFFSET.load() as usize)
            .cast::<u64>();
        let words = [
            core::ptr::read_volatile(name),
            core::ptr::read_volatile(name.add(1)),
        ];
        let mut comm = [0u8; COMM_LEN];
        comm.as_mut_ptr().cast::<[u64; 2]>().write_unaligned(words);
        zero_after_nul(&mut comm);
        comm
    }
}

/// `current->group_leader->comm` through `bpf_probe_read_kernel`, with the
/// offsets the agent read from this kernel's BTF: for kernels whose verifier
/// refuses the BTF loads.
#[inline(always)]
fn leader_comm_probe_read() -> Option<Comm> {
    // SAFETY: bpf_get_current_task returns the current task_struct (as an
    // integer); bpf_probe_read_kernel checks every address it is given.
    unsafe {
        let task = bpf_get_current_task() as usize as *const u8;
        let leader_field = task
            .wrapping_add(ITW_TASK_GROUP_LEADER_OFFSET.load() as usize)
            .cast::<*const u8>();
        let leader = bpf_probe_read_kernel(leader_field).ok()?;
        let comm_field = leader
            .wrapping_add(ITW_TASK_COMM_OFFSET.load() as usize)
            .cast::<Comm>();
        let mut comm = bpf_probe_read_kernel(comm_field).ok()?;
        zero_after_nul(&mut comm);
        Some(comm)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No path above can panic; if one could, the verifier would reject this
    // endless loop at load instead of letting a program run it.
    loop {}
}

/// bpf_probe_read_kernel and bpf_get_current_task are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
