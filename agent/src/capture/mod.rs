//! The kernel side as the rest of the agent sees it.
//!
//! [`Kernel`] is everything the agent asks of the eBPF programs: which
//! destinations to count, which process names to filter, and the cumulative
//! counters. The eBPF implementation loads and attaches the programs of
//! `ebpf/itw-ebpf`; [`fake::FakeKernel`] stands in for it in tests that need no
//! privileges.
//!
//! What the kernel side must never do: block, slow beyond a map lookup or two,
//! or fail a caller's connect. Counts are cumulative and never reset while a
//! destination is watched, so reading them has no read-then-delete race; the
//! agent turns them into deltas.

pub mod btf;
pub mod cgroup;
pub mod comm;
pub mod ebpf;
pub mod fake;
pub mod mode;
pub mod order;
pub mod tracefs;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use itw_common::{AttemptKey, Comm, Destination, Redirect};
use tokio::sync::mpsc;

pub use comm::{ExcludeComms, comm_bytes, comm_name};
pub use ebpf::{
    CaptureSettings, CgroupOrder, CommSource, KernelHold, LeaderRead, LoadedObjects, PodCgroup,
    Started, start,
};

/// How connects are caught (`CAPTURE_MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum CaptureMode {
    /// The best mode this kernel and host allow, chosen and logged at start.
    Auto,
    /// `cgroup/connect4` and `cgroup/connect6` on the cgroup v2 root: sees the
    /// ClusterIP a caller asked for, before socket load balancers rewrite it.
    Cgroup,
    /// kprobes on `tcp_v4_connect`/`tcp_v6_connect`.
    Kprobe,
    /// The `sock:inet_sock_set_state` tracepoint, transitions to SYN_SENT.
    Tracepoint,
}

impl CaptureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cgroup => "cgroup",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
        }
    }
}

impl std::fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cumulative kernel counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Attempts per (destination id, caller's cgroup id, process name).
    pub attempts: Vec<(AttemptKey, u64)>,
    /// Attempts per destination id that found the attempts map full.
    pub overflow: Vec<(u32, u64)>,
    /// Filtered attempts per excluded process name.
    pub filtered: Vec<(Comm, u64)>,
}

impl KernelCounts {
    pub fn clear(&mut self) {
        self.attempts.clear();
        self.overflow.clear();
        self.filtered.clear();
    }
}

/// A destination went from idle to active: the counter its attempt went to
/// (which names the caller's cgroup) and the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wake {
    pub key: AttemptKey,
    /// The watched destination `key.dest_id` stands for, as the kernel keys it.
    pub dest: Destination,
    /// The attempt found the attempts map full and was counted in the
    /// overflow counter of `key.dest_id`.
    pub overflowed: bool,
    /// When userspace read it (CLOCK_MONOTONIC µs,
    /// [`itw_telemetry::timeline::monotonic_us`]): where the agent's cold
    /// start begins.
    pub read_at_us: u64,
}

/// The kernel side's own trouble counters (`ITW_STATS`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub wakes_dropped: u64,
    pub attempts_map_full: u64,
    pub overflow_map_full: u64,
    pub leader_comm_failed: u64,
    /// Held connects not parked: the caller's network namespace unreadable.
    pub hold_no_netns: u64,
    /// Held connects not parked: their Service's slot out of range.
    pub hold_bad_slot: u64,
}

/// What the agent asks of the kernel side.
pub trait Kernel: Send + 'static {
    /// Counts attempts to `dest` under `dest_id` from now on, armed: its next
    /// attempt sends a wake. Calling it again for a watched destination
    /// re-arms it (or moves it to another id).
    fn watch(&mut self, dest: &Destination, dest_id: u32) -> Result<(), CaptureError>;

    /// Stops counting attempts to `dest`. Its counters stay readable until
    /// [`Kernel::forget`].
    fn unwatch(&mut self, dest: &Destination) -> Result<(), CaptureError>;

    /// Replaces the set of process names whose attempts are filtered.
    fn set_excluded(&mut self, comms: &[Comm]) -> Result<(), CaptureError>;

    /// Reads every cumulative counter into `out` (cleared first).
    fn read(&mut self, out: &mut KernelCounts) -> Result<(), CaptureError>;

    /// Reads only the counters the wakes name into `out` (cleared first):
    /// the fast path of a wake, one lookup instead of a walk of every map.
    fn read_woken(&mut self, wakes: &[Wake], out: &mut KernelCounts) -> Result<(), CaptureError>;

    /// Deletes the counters of destination ids that are no longer watched,
    /// once their final values have been read.
    fn forget(&mut self, dest_ids: &[u32]) -> Result<(), CaptureError>;

    /// The kernel side's trouble counters.
    fn stats(&mut self) -> Result<KernelStats, CaptureError>;

    /// The wakes (destinations going idle -> active), delivered as they
    /// happen. Yields the receiver once; later calls return `None`.
    fn take_wakes(&mut self) -> Option<mpsc::Receiver<Wake>>;

    /// Holding: connects to `dest` go to the parking listener on
    /// `park_port` from now on, within the caps, counted under `slot` (its
    /// Service's, 1 and up), and getpeername() on them shows `dest`.
    fn hold(&mut self, dest: &Destination, park_port: u16, slot: u16) -> Result<(), CaptureError>;

    /// Connects to `dest` go where they asked again. Connections parked
    /// before keep showing `dest` to getpeername() until
    /// [`Kernel::forget_park`].
    fn unhold(&mut self, dest: &Destination) -> Result<(), CaptureError>;

    /// The parking listener of `dest` on `park_port` is closed.
    fn forget_park(&mut self, dest: &Destination, park_port: u16) -> Result<(), CaptureError>;

    /// Where the parking side looks up what the programs parked; `None`
    /// when they do not hold.
    fn redirects(&self) -> Option<Arc<dyn RedirectBook>>;

    /// Slot `slot`'s counters (0: the node's).
    fn hold_slot(&mut self, slot: u16) -> Result<SlotCounts, CaptureError>;

    /// How many connects parked under `slot` have ended: what the caps
    /// subtract from the admitted.
    fn set_hold_finished(&mut self, slot: u16, finished: u64) -> Result<(), CaptureError>;

    /// Deletes the records of connects parked before `parked_before_ns`
    /// (`CLOCK_MONOTONIC`) that nobody took (the client gave up, a policy
    /// dropped its handshake); returns each one's slot.
    fn expire_redirects(&mut self, parked_before_ns: u64) -> Result<Vec<u16>, CaptureError>;
}

/// One slot's counters in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounts {
    /// Connects parked ever.
    pub admitted: u64,
    /// Connects not parked because a cap was reached.
    pub refused: u64,
}

/// What the programs recorded of the connects they parked, for the parking
/// side: only a connection with a record is handed on.
pub trait RedirectBook: Send + Sync + std::fmt::Debug {
    /// Takes (removes) the record of the connection from `peer` that the
    /// parking listener on `park_port` accepted.
    fn take(&self, peer: SocketAddr, park_port: u16) -> Result<Option<Redirect>, CaptureError>;
}

/// The key the programs record a parked connection under.
pub fn conn_key(peer: SocketAddr, park_port: u16) -> itw_common::ConnKey {
    let addr = match peer {
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
        SocketAddr::V6(a) => a.ip().octets(),
    };
    itw_common::ConnKey {
        addr,
        port: peer.port(),
        park_port,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("kernel map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel map {map} is full ({capacity} entries); raise {setting}")]
    MapFull {
        map: &'static str,
        capacity: u32,
        setting: &'static str,
    },
    #[error("{0}")]
    Other(String),
    /// A forced `CAPTURE_MODE` this host cannot do.
    #[error("CAPTURE_MODE={mode}: {missing}; {instead}")]
    ModeUnavailable {
        mode: CaptureMode,
        missing: String,
        instead: String,
    },
    #[error("no capture mode works on this host: {reasons}")]
    NoMode { reasons: String },
    #[error("tracefs at {}: {reason}", path.display())]
    Tracefs { path: PathBuf, reason: String },
    #[error("tracepoint format {}: {reason}", path.display())]
    TracepointFormat { path: PathBuf, reason: String },
    #[error("cgroup v2 root {}: {source}", path.display())]
    CgroupOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Parsing the embedded object or creating its maps failed.
    #[error("loading the eBPF object (creating its maps): {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {program}: {action} failed: {source}")]
    Program {
        program: &'static str,
        action: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// `CGROUP_ORDER=first` on a kernel without pre-order attachment, or
    /// another refusal of the ordered link.
    #[error(
        "eBPF program {program}: attaching it first (BPF_F_PREORDER | BPF_F_BEFORE) failed: {source}{}",
        if source.raw_os_error() == Some(libc::EINVAL) {
            " (this kernel cannot order cgroup programs: Linux 6.15 or later can; set CGROUP_ORDER=pods or auto)"
        } else {
            ""
        }
    )]
    AttachFirst {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the eBPF object has no {what} {name}; it does not match this agent (rebuild it with hack/build-ebpf)"
    )]
    ObjectMismatch {
        what: &'static str,
        name: &'static str,
    },
    #[error("kernel map {map}: {source}")]
    MapHandle {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("capture must start inside a tokio runtime (it reads wakes on a task): {0}")]
    NoRuntime(String),
}

impl CaptureError {
    /// The error comes from missing privileges (not root, no CAP_BPF /
    /// CAP_PERFMON / CAP_NET_ADMIN / CAP_SYS_ADMIN as needed).
    pub fn is_permission_denied(&self) -> bool {
        use std::error::Error;
        let mut source: Option<&(dyn Error + 'static)> = Some(self);
        while let Some(err) = source {
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
            {
                return true;
            }
            source = err.source();
        }
        false
    }
}
