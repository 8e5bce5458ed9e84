//! Types and names shared by the kernel side (`itw-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding, because the same bytes
//! are read by the eBPF programs and by userspace through the map syscalls.
//! Byte orders are fixed per field and stated on it.

#![no_std]

pub mod comm;
pub mod dest_table;

/// Length of a kernel task name, including its NUL (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// A process name as the kernel stores it: NUL-terminated, zero-padded.
pub type Comm = [u8; COMM_LEN];

/// A destination the kernel side watches.
///
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so one map holds
/// both families and a v4-mapped connect on an IPv6 socket matches the same
/// entry as a plain IPv4 connect.
///
/// Aligned to 4 (its size, 20, is unchanged) so that [`Destination::v4_word`]
/// can build it with word stores.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    /// IPv6 (or IPv4-mapped) address, network byte order.
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl Destination {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }

    /// The IPv4-mapped form of an IPv4 address given in network byte order.
    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        Self::new(
            [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
            ],
            port,
        )
    }

    /// [`Destination::v4`] from the address as one word loaded from memory
    /// that holds it in network byte order (`bpf_sock_addr.user_ip4`).
    ///
    /// For the programs, which build a key on every connect they see: from
    /// `v4`'s array the BPF backend makes a call to a byte-loop `memset`
    /// for the ten leading zeros and four byte stores for the address; this
    /// is five word stores (the port and padding as halves, so that the
    /// layout does not depend on byte order).
    #[inline(always)]
    pub fn v4_word(addr: u32, port: u16) -> Self {
        let mut dest = core::mem::MaybeUninit::<Self>::uninit();
        let words = dest.as_mut_ptr().cast::<u32>();
        // SAFETY: a Destination is 20 bytes aligned to 4: five aligned
        // words, every byte written before `assume_init`.
        unsafe {
            words.write(0);
            words.add(1).write(0);
            words.add(2).write(u32::from_ne_bytes([0, 0, 0xff, 0xff]));
            words.add(3).write(addr);
            let halves = words.add(4).cast::<u16>();
            halves.write(port);
            halves.add(1).write(0);
            dest.assume_init()
        }
    }

    /// Whether this is an IPv4 destination (stored IPv4-mapped).
    pub fn is_ipv4(&self) -> bool {
        self.addr[..10].iter().all(|b| *b == 0) && self.addr[10] == 0xff && self.addr[11] == 0xff
    }
}

/// Value of [`maps::WATCHED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The id counters of this destination are keyed by (assigned by the agent).
    pub dest_id: u32,
    /// Non-zero while the destination is idle: the next counted attempt clears
    /// it and sends one [`WakeEvent`]. The agent re-arms it once a collection
    /// finds the destination idle again.
    pub armed: u32,
    /// Which life of `dest_id` this is (never 0): the agent changes it
    /// whenever it has forgotten ids since, so a [`LastCaller`] entry left
    /// from an id's earlier life (its counter since given to another key)
    /// never matches the destination that reuses the id.
    pub generation: u32,
}

/// Key of [`maps::ATTEMPTS`]: one counter per destination, caller's cgroup
/// and process name.
///
/// The kernel hashes and compares keys bytewise, so the padding is a named
/// field, always zero: two attempts of one caller must land on one counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttemptKey {
    pub dest_id: u32,
    pub _pad: u32,
    /// The caller's cgroup v2 id (`bpf_get_current_cgroup_id`: the inode
    /// number of its cgroup's directory), which the agent maps to a pod.
    pub cgroup_id: u64,
    /// The calling process's name (thread-group leader's comm, see
    /// [`globals::COMM_FROM_LEADER`]).
    pub comm: Comm,
}

impl AttemptKey {
    pub const fn new(dest_id: u32, cgroup_id: u64, comm: Comm) -> Self {
        Self {
            dest_id,
            _pad: 0,
            cgroup_id,
            comm,
        }
    }
}

/// Value of [`maps::LAST_CALLERS`] (per CPU, at `dest_id` modulo
/// [`capacity::LAST_CALLER_SLOTS`]): the last caller counted for a
/// destination on this CPU and its counter's index in [`maps::COUNTERS`], so
/// that the same caller's next attempt counts with no hash lookup.
///
/// Written and read only by the programs, on their own CPU. Cgroup programs
/// run preemptible, so a task can stop anywhere in a read or a write of the
/// entry and another run the program meanwhile: `seq` is odd while an entry
/// is being written (a reader that sees it odd, or changed after its reads,
/// takes the slow path), and `writers` admits one writer at a time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastCaller {
    pub seq: u32,
    pub writers: u32,
    pub dest_id: u32,
    /// [`Watch::generation`] when it was written (0: never written).
    pub generation: u32,
    pub cgroup_id: u64,
    pub comm: Comm,
    /// The key's index in [`maps::COUNTERS`].
    pub counter: u32,
    pub _pad: u32,
}

/// Record of [`maps::WAKES`]: a watched destination went from idle to active.
/// It names the counter the attempt went to, so the agent reads that one
/// counter at once instead of the whole map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WakeEvent {
    pub dest_id: u32,
    /// Non-zero when the attempt found ATTEMPTS full and was counted in
    /// OVERFLOW under `dest_id`.
    pub overflowed: u32,
    /// The process name the attempt was counted under.
    pub comm: Comm,
    /// The caller's cgroup v2 id the attempt was counted under.
    pub cgroup_id: u64,
    /// The destination itself: a wake that turns out not to be demand (its
    /// caller is excluded) is re-armed by this key at once.
    pub dest: Destination,
    pub _pad: u32,
}

/// The bit of [`maps::EXCLUDED_HINT`] a process name sets: a one-word Bloom
/// filter, so that most connects skip the excluded-names hash lookup. Both
/// the programs and the agent compute it with this function.
#[inline(always)]
pub fn excluded_hint_bit(comm: &Comm) -> u64 {
    let mut low = [0u8; 8];
    let mut high = [0u8; 8];
    low.copy_from_slice(&comm[..8]);
    high.copy_from_slice(&comm[8..]);
    let folded = u64::from_le_bytes(low) ^ u64::from_le_bytes(high).rotate_left(29);
    1u64 << (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58)
}

/// Value of [`maps::HOLD`]: where a held destination's connects are parked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Park {
    /// The parking listener's port, host byte order (its address is
    /// [`globals::PARK_IP4`] or [`globals::PARK_IP6`]).
    pub port: u16,
    /// The held Service's counters in [`maps::HOLD_ADMITTED`],
    /// [`maps::HOLD_FINISHED`] and [`maps::HOLD_REFUSED`] (1 and up; 0 is
    /// the node's).
    pub slot: u16,
}

/// What the connect programs record of a connect they park: the agent hands
/// on only connections with such a record, from the network namespace in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The ClusterIP:port the caller asked for.
    pub dest: Destination,
    /// The inode number of the caller's network namespace (as `stat` of a
    /// netns file or `/proc/<pid>/ns/net` shows it).
    pub netns: u32,
    /// The calling process (thread-group id).
    pub tgid: u32,
    /// [`Park::slot`] of the held Service.
    pub slot: u16,
    pub _pad: [u8; 10],
    /// When it was parked, `bpf_ktime_get_ns`: a record the agent never
    /// takes (the client gave up, a policy dropped its SYN) expires.
    pub parked_ns: u64,
}

/// Key of [`maps::HOLD_CONNS`]: a parked connection as the parking listener
/// sees it when it accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The client's address (IPv4 stored v4-mapped), network byte order.
    pub addr: [u8; 16],
    /// The client's port, host byte order.
    pub port: u16,
    /// The parking listener's port, host byte order.
    pub park_port: u16,
}

/// Key of [`maps::PARKED`]: a parking listener, by family and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParkKey {
    /// 4 or 6: which parking address the port belongs to.
    pub family: u16,
    /// Host byte order.
    pub port: u16,
}

/// Names of the maps, as the agent looks them up in the loaded object.
pub mod maps {
    /// `HashMap<Destination, Watch>`: the destinations to count.
    pub const WATCHED: &str = "ITW_WATCHED";
    /// `HashMap<Comm, u8>`: process names whose attempts are filtered (EXCLUDE_COMMS).
    pub const EXCLUDED: &str = "ITW_EXCLUDED";
    /// `Array<u64>` of one: the OR of [`super::excluded_hint_bit`] over
    /// EXCLUDED's names. A name whose bit is clear is not excluded.
    pub const EXCLUDED_HINT: &str = "ITW_EXCLUDED_HINT";
    /// `HashMap<AttemptKey, u32>`: each (destination, caller's cgroup,
    /// process) key's index in COUNTERS. Written by the programs on a key's
    /// first attempt; keys are deleted by the agent only (`forget`).
    pub const ATTEMPTS: &str = "ITW_ATTEMPTS";
    /// `PerCpuArray<u64>`: the attempt counters, at the indices ATTEMPTS
    /// gives (a per-CPU array lookup is inlined by the verifier where the
    /// kernel can, 6.10 and later: no helper call to count).
    pub const COUNTERS: &str = "ITW_COUNTERS";
    /// `Queue<u32>`: COUNTERS indices free to take (all zero on every CPU).
    /// The agent fills it at load and gives forgotten keys' indices back,
    /// zeroed, one collection after it deleted the keys.
    pub const FREE_COUNTERS: &str = "ITW_FREE_COUNTERS";
    /// `PerCpuArray<LastCaller>` of [`super::capacity::LAST_CALLER_SLOTS`]:
    /// per CPU, each destination slot's last caller and its counter.
    pub const LAST_CALLERS: &str = "ITW_LAST_CALLERS";
    /// `PerCpuHashMap<u32, u64>`: attempts per destination id that found
    /// ATTEMPTS full; counted under the overflow process name.
    pub const OVERFLOW: &str = "ITW_OVERFLOW";
    /// `PerCpuHashMap<Comm, u64>`: filtered attempts per excluded process name.
    pub const FILTERED: &str = "ITW_FILTERED";
    /// `RingBuf` of [`super::WakeEvent`].
    pub const WAKES: &str = "ITW_WAKES";
    /// `PerCpuArray<u64>` indexed by [`super::stat`].
    pub const STATS: &str = "ITW_STATS";
    /// `HashMap<Destination, Park>`: held destinations (a Service with no
    /// ready endpoint): their connects are rewritten to a parking listener.
    pub const HOLD: &str = "ITW_HOLD";
    /// `Array<u64>` of one: how many entries HOLD has; 0 skips the lookup.
    pub const HOLD_COUNT: &str = "ITW_HOLD_COUNT";
    /// `HashMap<ParkKey, Destination>`: a parking listener's destination, so
    /// getpeername() on a held client shows the ClusterIP it asked for.
    pub const PARKED: &str = "ITW_PARKED";
    /// `Array<u32>` of one: the pods' cgroup's level in the whole hierarchy,
    /// learned by the pods' program on the first pod connect (0: not yet);
    /// the root's programs skip connects whose ancestor at that level is the
    /// pods' cgroup. The agent cannot know it: the node's cgroup root may be
    /// nested in the host's hierarchy, behind a cgroup namespace.
    pub const POD_LEVEL: &str = "ITW_POD_LEVEL";
    /// `LruHashMap<u64, Redirect>`: parked connects by socket cookie, from
    /// the connect program until `sock_ops` sees the 4-tuple.
    pub const HOLD_REDIRECTS: &str = "ITW_HOLD_REDIRECTS";
    /// `LruHashMap<ConnKey, Redirect>`: parked connects by 4-tuple, until the
    /// agent accepts them.
    pub const HOLD_CONNS: &str = "ITW_HOLD_CONNS";
    /// `Array<u64>` of [`super::capacity::HOLD_SLOTS`]: connects parked ever,
    /// per held Service's slot (slot 0: the node), counted by the programs.
    pub const HOLD_ADMITTED: &str = "ITW_HOLD_ADMITTED";
    /// `Array<u64>`: parked connects that ended (released, timed out, left,
    /// expired), per slot, written by the agent. Admitted minus finished is
    /// what is parked now, which the caps bound.
    pub const HOLD_FINISHED: &str = "ITW_HOLD_FINISHED";
    /// `Array<u64>`: connects not parked because a cap was reached, per slot.
    pub const HOLD_REFUSED: &str = "ITW_HOLD_REFUSED";
}

/// Sizes of the maps the agent does not size at load time (it sizes
/// [`maps::WATCHED`], [`maps::ATTEMPTS`] and [`maps::OVERFLOW`] from its settings).
pub mod capacity {
    /// Distinct names in `EXCLUDE_COMMS`.
    pub const EXCLUDED: u32 = 256;
    /// Distinct excluded names ever counted (a reload may exclude new names;
    /// old counters stay until read). Allocated on use, so a large bound costs nothing.
    pub const FILTERED: u32 = 4096;
    /// Held destinations at once (ClusterIP:ports of Services with no ready
    /// endpoint that ask to be held). Allocated on use.
    pub const HOLD: u32 = 65_536;
    /// Held Services at once, plus the node's slot 0 (the admission
    /// counters are preallocated arrays: 32 KiB each).
    pub const HOLD_SLOTS: u32 = 4096;
    /// Parked connects whose records the kernel keeps at once (LRU: past
    /// this the oldest go, and their connections are reset as unknown).
    pub const HOLD_CONNS: u32 = 65_536;
    /// Default byte size of [`maps::WAKES`] (the agent raises it to the page
    /// size where pages are larger). One wake takes 64 bytes with its header,
    /// so 2,048 destinations can wake before the agent reads one.
    pub const WAKES_BYTES: u32 = 128 * 1024;
    /// Entries of [`maps::LAST_CALLERS`] per CPU, a power of two (indexed by
    /// `dest_id` masked). 48 bytes each, preallocated on every CPU: 48 KiB
    /// per CPU. Destination ids are dense, so up to this many destinations
    /// never share a slot; past it two that do only cost each other the
    /// hash lookup of the slow path.
    pub const LAST_CALLER_SLOTS: u32 = 1024;
}

/// Indices of [`maps::STATS`].
pub mod stat {
    /// A wake could not be reserved in the ring buffer (the attempt still counted).
    pub const WAKE_DROPPED: u32 = 0;
    /// An attempt of a new key found no free counter (all
    /// MAX_ATTEMPT_COUNTERS in use or quarantined) or no room in ATTEMPTS,
    /// and went to OVERFLOW.
    pub const ATTEMPTS_FULL: u32 = 1;
    /// An attempt found OVERFLOW (or a filtered one found FILTERED) full too:
    /// the only way a count can be lost.
    pub const OVERFLOW_FULL: u32 = 2;
    /// Reading the thread-group leader's name failed; the thread's name was used.
    pub const LEADER_COMM_FAILED: u32 = 3;
    /// A held connect found no slot of its Service (a bad [`super::Park`]):
    /// it was not parked.
    pub const HOLD_BAD_SLOT: u32 = 4;
    /// A held connect's network namespace could not be read: it was not
    /// parked (the agent could not hand it on from there).
    pub const HOLD_NO_NETNS: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Names of the programs in the object.
pub mod programs {
    pub const CONNECT4: &str = "itw_connect4";
    pub const CONNECT6: &str = "itw_connect6";
    pub const TCP_V4_CONNECT: &str = "itw_tcp_v4_connect";
    pub const TCP_V6_CONNECT: &str = "itw_tcp_v6_connect";
    pub const INET_SOCK_SET_STATE: &str = "itw_inet_sock_set_state";
    /// The connect programs for the pods' cgroup (they run before the root's;
    /// the root's then skip the pods' connects).
    pub const CONNECT4_PODS: &str = "itw_connect4_pods";
    pub const CONNECT6_PODS: &str = "itw_connect6_pods";
    /// Restore the ClusterIP for getpeername() on held connections.
    pub const GETPEERNAME4: &str = "itw_getpeername4";
    pub const GETPEERNAME6: &str = "itw_getpeername6";
    /// `sock_ops`: joins a parked connect's record to its 4-tuple.
    pub const SOCK_OPS: &str = "itw_sock_ops";
}

/// Values of [`globals::COMM_FROM_LEADER`].
pub mod comm_source {
    /// The calling thread's name (`bpf_get_current_comm`).
    pub const THREAD: u32 = 0;
    /// `task->group_leader->comm` through `bpf_probe_read_kernel` (two
    /// helper calls, about 140 ns per attempt).
    pub const LEADER_PROBE_READ: u32 = 1;
    /// `task->group_leader->comm` through the BTF-typed task pointer of
    /// `bpf_get_current_task_btf`: plain loads the verifier checks against
    /// the kernel's BTF (about 30 ns per attempt).
    pub const LEADER_BTF: u32 = 2;
}

/// Read-only globals the agent sets at load time (the verifier sees them as
/// constants and prunes what they switch off).
pub mod globals {
    /// Where the process name comes from, one of [`super::comm_source`].
    pub const COMM_FROM_LEADER: &str = "ITW_COMM_FROM_LEADER";
    /// Byte offset of `task_struct.group_leader` (from the kernel's BTF).
    pub const TASK_GROUP_LEADER_OFFSET: &str = "ITW_TASK_GROUP_LEADER_OFFSET";
    /// Byte offset of `task_struct.comm` (from the kernel's BTF).
    pub const TASK_COMM_OFFSET: &str = "ITW_TASK_COMM_OFFSET";
    /// Offsets in the `sock:inet_sock_set_state` record, from its format file.
    pub const TP_NEWSTATE_OFFSET: &str = "ITW_TP_NEWSTATE_OFFSET";
    pub const TP_DPORT_OFFSET: &str = "ITW_TP_DPORT_OFFSET";
    pub const TP_FAMILY_OFFSET: &str = "ITW_TP_FAMILY_OFFSET";
    pub const TP_PROTOCOL_OFFSET: &str = "ITW_TP_PROTOCOL_OFFSET";
    pub const TP_DADDR_OFFSET: &str = "ITW_TP_DADDR_OFFSET";
    pub const TP_DADDR_V6_OFFSET: &str = "ITW_TP_DADDR_V6_OFFSET";
    /// 1: holding is on (HOLD map, rewrite, exempt mark); 0: the programs
    /// never look at any of it.
    pub const HOLD_ENABLED: &str = "ITW_HOLD_ENABLED";
    /// The agent's own connects carry this socket mark: never counted, never held.
    pub const HOLD_MARK: &str = "ITW_HOLD_MARK";
    /// Parking IPv4 address, as `bpf_sock_addr.user_ip4` holds it (network
    /// byte order in memory); 0: IPv4 destinations are not held.
    pub const PARK_IP4: &str = "ITW_PARK_IP4";
    /// Parking IPv6 address, as `user_ip6` holds it; all zero: not held.
    pub const PARK_IP6: &str = "ITW_PARK_IP6";
    /// Caps on connects parked at once, per held Service and per node: past
    /// them a connect goes on unheld (and is counted in HOLD_REFUSED).
    pub const HOLD_MAX_PER_SERVICE: &str = "ITW_HOLD_MAX_PER_SERVICE";
    pub const HOLD_MAX_PER_NODE: &str = "ITW_HOLD_MAX_PER_NODE";
    /// Byte offsets (from the kernel's BTF) of `task_struct.nsproxy`,
    /// `nsproxy.net_ns`, and `net.ns.inum`: the caller's network namespace.
    pub const TASK_NSPROXY_OFFSET: &str = "ITW_TASK_NSPROXY_OFFSET";
    pub const NSPROXY_NET_OFFSET: &str = "ITW_NSPROXY_NET_OFFSET";
    pub const NET_INUM_OFFSET: &str = "ITW_NET_INUM_OFFSET";
    /// Byte offsets (from the kernel's BTF) of `task_struct.cgroups`,
    /// `css_set.dfl_cgrp`, `cgroup.kn` and `kernfs_node.id`: the caller's
    /// cgroup v2 id read with the process name's BTF loads instead of a
    /// `bpf_get_current_cgroup_id` call. `TASK_CGROUPS_OFFSET` 0: the call.
    pub const TASK_CGROUPS_OFFSET: &str = "ITW_TASK_CGROUPS_OFFSET";
    pub const CSS_SET_DFL_CGRP_OFFSET: &str = "ITW_CSS_SET_DFL_CGRP_OFFSET";
    pub const CGROUP_KN_OFFSET: &str = "ITW_CGROUP_KN_OFFSET";
    pub const KERNFS_NODE_ID_OFFSET: &str = "ITW_KERNFS_NODE_ID_OFFSET";
    /// The pods' cgroup id (inode of its directory); 0: no pods cgroup
    /// attachment, the root programs count everyone. Its level in the
    /// hierarchy is learned by the programs ([`super::maps::POD_LEVEL`]).
    pub const POD_CGROUP_ID: &str = "ITW_POD_CGROUP_ID";
}

/// The node lab's stand-in for a socket load balancer (Cilium's kube-proxy
/// replacement): a `cgroup/connect4`/`connect6` program of its own object
/// (`lab-lb.o`), never loaded by the agent. It shares these types with the lab
/// that drives it.
pub mod lab {
    use super::Destination;

    /// Backends one Service port can have in the stand-in.
    pub const MAX_BACKENDS: usize = 8;

    /// Value of [`SERVICES`]: a ClusterIP:port's ready backends. `count` 0
    /// refuses the connect, as Cilium does for a Service without backends.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct LbService {
        pub count: u32,
        pub _pad: u32,
        pub backends: [Destination; MAX_BACKENDS],
    }

    /// `HashMap<Destination, LbService>`, keyed by ClusterIP:port (IPv4
    /// stored v4-mapped, as [`Destination::v4`] does).
    pub const SERVICES: &str = "LAB_LB_SERVICES";
    /// Capacity of [`SERVICES`].
    pub const SERVICES_CAPACITY: u32 = 4096;
    pub const CONNECT4: &str = "lab_lb_connect4";
    pub const CONNECT6: &str = "lab_lb_connect6";
}

/// The capture bench's floor (`capture-floor.o`, `hack/bench capture`): per
/// hook an empty program and a minimal counter (one hash lookup of the
/// destination, one per-CPU array increment), measured beside the agent's
/// programs. Never loaded by the agent.
pub mod floor {
    /// `HashMap<Destination, Watch>`, shaped like [`super::maps::WATCHED`].
    pub const WATCHED: &str = "FLOOR_WATCHED";
    /// `PerCpuArray<u64>` of 3: the cgroup counters' hits (0), the
    /// tracepoint counter's (1), what the identity variant read (2).
    pub const COUNTS: &str = "FLOOR_COUNTS";
    pub const CONNECT4_EMPTY: &str = "floor_connect4_empty";
    pub const CONNECT4_COUNTER: &str = "floor_connect4_counter";
    /// The counter, then `bpf_get_current_task_btf`.
    pub const CONNECT4_TASK: &str = "floor_connect4_task";
    /// The counter, then a per-CPU hash lookup of an `AttemptKey`.
    pub const CONNECT4_SECOND_LOOKUP: &str = "floor_connect4_second_lookup";
    /// The counter, then the caller's identity read as `itw.o` reads it.
    pub const CONNECT4_IDENTITY: &str = "floor_connect4_identity";
    /// The counter with the destination in [`TABLE`] (`dest_table`).
    pub const CONNECT4_TABLE: &str = "floor_connect4_table";
    /// The identity variant with the destination in [`TABLE`].
    pub const CONNECT4_IDENTITY_TABLE: &str = "floor_connect4_identity_table";
    /// `Array<DestSlot>`: the open-addressed destination table.
    pub const TABLE: &str = "FLOOR_TABLE";
    /// The table's size less one (a power of two less one).
    pub const TABLE_MASK: &str = "FLOOR_TABLE_MASK";
    /// `PerCpuHashMap<AttemptKey, u64>`, shaped like [`super::maps::ATTEMPTS`].
    pub const ATTEMPTS: &str = "FLOOR_ATTEMPTS";
    pub const SET_STATE_EMPTY: &str = "floor_set_state_empty";
    pub const SET_STATE_COUNTER: &str = "floor_set_state_counter";
    /// Offsets in the `sock:inet_sock_set_state` record (format file).
    pub const TP_NEWSTATE_OFFSET: &str = "FLOOR_TP_NEWSTATE_OFFSET";
    pub const TP_DPORT_OFFSET: &str = "FLOOR_TP_DPORT_OFFSET";
    pub const TP_FAMILY_OFFSET: &str = "FLOOR_TP_FAMILY_OFFSET";
    pub const TP_DADDR_OFFSET: &str = "FLOOR_TP_DADDR_OFFSET";
    /// task_struct and cgroup offsets from the kernel's BTF.
    pub const TASK_GROUP_LEADER_OFFSET: &str = "FLOOR_TASK_GROUP_LEADER_OFFSET";
    pub const TASK_COMM_OFFSET: &str = "FLOOR_TASK_COMM_OFFSET";
    pub const TASK_CGROUPS_OFFSET: &str = "FLOOR_TASK_CGROUPS_OFFSET";
    pub const CSS_SET_DFL_CGRP_OFFSET: &str = "FLOOR_CSS_SET_DFL_CGRP_OFFSET";
    pub const CGROUP_KN_OFFSET: &str = "FLOOR_CGROUP_KN_OFFSET";
    pub const KERNFS_NODE_ID_OFFSET: &str = "FLOOR_KERNFS_NODE_ID_OFFSET";
}

#[cfg(feature = "user")]
mod pod {
    /// `aya::Pod` for the map types above.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: `aya::Pod` asks for Copy data that any bit pattern is a
            // valid value of, with no uninitialised bytes. Each type here is
            // #[repr(C)] and Copy, made only of integers and integer arrays,
            // and its padding is named `_pad` fields, not left implicit (the
            // layout tests below pin sizes and offsets).
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        super::Destination,
        super::Watch,
        super::AttemptKey,
        super::LastCaller,
        super::WakeEvent,
        super::Park,
        super::ParkKey,
        super::lab::LbService,
        super::Redirect,
        super::ConnKey,
        super::dest_table::DestSlot,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_what_both_sides_expect() {
        assert_eq!(core::mem::size_of::<Destination>(), 20);
        assert_eq!(core::mem::align_of::<Destination>(), 4);
        assert_eq!(core::mem::offset_of!(Destination, port), 16);
        assert_eq!(core::mem::offset_of!(lab::LbService, backends), 8);
        assert_eq!(core::mem::offset_of!(Redirect, netns), 20);
        assert_eq!(core::mem::size_of::<Watch>(), 12);
        assert_eq!(core::mem::offset_of!(Watch, generation), 8);
        assert_eq!(core::mem::size_of::<LastCaller>(), 48);
        assert_eq!(core::mem::offset_of!(LastCaller, cgroup_id), 16);
        assert_eq!(core::mem::offset_of!(LastCaller, comm), 24);
        assert_eq!(core::mem::offset_of!(LastCaller, counter), 40);
        assert!(capacity::LAST_CALLER_SLOTS.is_power_of_two());
        assert_eq!(core::mem::size_of::<AttemptKey>(), 32);
        assert_eq!(core::mem::align_of::<AttemptKey>(), 8);
        assert_eq!(core::mem::offset_of!(AttemptKey, cgroup_id), 8);
        assert_eq!(core::mem::offset_of!(AttemptKey, comm), 16);
        assert_eq!(core::mem::size_of::<WakeEvent>(), 56);
        assert_eq!(core::mem::offset_of!(WakeEvent, dest), 32);
        assert_eq!(core::mem::offset_of!(WakeEvent, comm), 8);
        assert_eq!(core::mem::offset_of!(WakeEvent, cgroup_id), 24);
        assert_eq!(core::mem::size_of::<Park>(), 4);
        assert_eq!(core::mem::size_of::<ParkKey>(), 4);
        assert_eq!(core::mem::size_of::<lab::LbService>(), 168);
        assert_eq!(core::mem::size_of::<Redirect>(), 48);
        assert_eq!(core::mem::size_of::<ConnKey>(), 20);
    }

    #[test]
    fn a_destination_built_from_a_word_is_the_one_built_from_bytes() {
        for (addr, port) in [
            ([10, 96, 0, 1], 80),
            ([127, 88, 0, 1], 9),
            ([255, 255, 255, 255], 65_535),
            ([0, 0, 0, 0], 0),
            ([192, 168, 1, 254], 0x1234),
        ] {
            let word = u32::from_ne_bytes(addr);
            assert_eq!(
                Destination::v4_word(word, port),
                Destination::v4(addr, port),
                "{addr:?}:{port}"
            );
            let dest = Destination::v4_word(word, port);
            assert!(dest.is_ipv4());
            assert_eq!(dest.addr[12..], addr);
            assert_eq!((dest.port, dest._pad), (port, 0));
        }
    }

    #[test]
    fn the_excluded_hint_sets_one_bit_per_name_and_spreads_names() {
        let comm = |s: &str| {
            let mut c = [0u8; COMM_LEN];
            c[..s.len()].copy_from_slice(s.as_bytes());
            c
        };
        let kubelet = excluded_hint_bit(&comm("kubelet"));
        assert_eq!(kubelet.count_ones(), 1);
        // Common callers should rarely share kubelet's bit.
        let others = [
            "java",
            "python3",
            "curl",
            "nc",
            "node",
            "envoy",
            "nginx",
            "redis-cli",
        ];
        let collisions = others
            .iter()
            .filter(|n| excluded_hint_bit(&comm(n)) == kubelet)
            .count();
        assert!(
            collisions <= 1,
            "{collisions} of {} share kubelet's bit",
            others.len()
        );
        assert_ne!(
            excluded_hint_bit(&comm("kubelet")),
            excluded_hint_bit(&comm("k3s"))
        );
    }
}
