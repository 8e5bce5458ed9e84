//! The eBPF implementation of [`Kernel`]: loads the object built from
//! `ebpf/itw-ebpf` (embedded, so the agent builds with stable Rust alone),
//! attaches the programs of one capture mode, and reads their maps.
//!
//! Nothing is pinned: the programs, links and maps belong to this process's
//! file descriptors, so they are detached and freed when [`EbpfKernel`] is
//! dropped or the process exits in any way, a crash included.

use std::{
    collections::HashSet,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{CgroupAttachMode, CgroupSockAddr, KProbe, ProgramError, TracePoint},
};
use itw_common::{
    AttemptKey, Comm, Destination, Park, ParkKey, WakeEvent, Watch, capacity, comm_source,
    excluded_hint_bit, globals, maps, programs, stat,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    task::JoinHandle,
};

use super::{
    CaptureError, CaptureMode, Kernel, KernelCounts, KernelStats, Wake,
    btf::{self, TaskOffsets},
    mode::{self, Choice},
    order::{self, AttachOrder},
    tracefs::{self, SetStateOffsets},
};

/// The programs, built by `hack/build-ebpf` for this target's byte order.
#[cfg(target_endian = "little")]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/bpfel/itw.o"
));
#[cfg(target_endian = "big")]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/bpfeb/itw.o"
));

/// Wakes buffered between the ring buffer reader and the agent.
const WAKE_CHANNEL: usize = 4096;

/// What [`start`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    pub mode: CaptureMode,
    /// `CGROUP_ROOT`: where cgroup programs attach (default: detected).
    pub cgroup_root: Option<PathBuf>,
    /// `TRACEFS_PATH`, for the tracepoint mode.
    pub tracefs_path: PathBuf,
    /// `MAX_DESTINATIONS`: size of the watched-destinations map.
    pub max_destinations: u32,
    /// `MAX_ATTEMPT_COUNTERS`: size of the (destination, process) counters map.
    pub max_attempt_counters: u32,
    /// Count under the process's name (the thread-group leader's); false:
    /// under the calling thread's name.
    pub comm_from_leader: bool,
    /// The ways of reading the leader's name to try, in order (the first
    /// the verifier accepts is used).
    pub leader_reads: Vec<LeaderRead>,
    /// The kernel's BTF, for the offsets the leader's name is read with.
    pub btf_path: PathBuf,
    /// Holding connects to Services without a ready endpoint (cgroup mode
    /// only); `None`: the programs never rewrite anything.
    pub hold: Option<KernelHold>,
    /// The pods' cgroup, where the connect programs are attached too.
    pub pod_cgroup: PodCgroup,
}

/// What the programs need for holding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelHold {
    /// The agent's own connects carry it: never counted, never held.
    pub mark: u32,
    /// Parking addresses; a family without one is not held.
    pub park_ip4: Option<Ipv4Addr>,
    pub park_ip6: Option<Ipv6Addr>,
}

/// `POD_CGROUP`: a child of the cgroup v2 root whose processes (the pods)
/// get the connect programs attached to their own cgroup, so ours run before
/// any attached to the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodCgroup {
    /// `kubepods.slice` (systemd driver) or `kubepods` (cgroupfs driver)
    /// under the root, when present.
    Detect,
    /// Attach to the root only.
    None,
    /// This directory (absolute, or relative to the cgroup root).
    Path(PathBuf),
}

impl PodCgroup {
    /// The names kubelet gives the pods' cgroup.
    pub const KNOWN: [&'static str; 2] = ["kubepods.slice", "kubepods"];

    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("") => Self::Detect,
            Some("none") => Self::None,
            Some(path) => Self::Path(PathBuf::from(path)),
        }
    }

    /// The directory to attach to, if any, under `root`. A configured path
    /// must exist; a detected one may not.
    fn resolve(&self, root: &Path) -> Result<Option<PathBuf>, CaptureError> {
        match self {
            Self::None => Ok(None),
            Self::Detect => Ok(Self::KNOWN
                .iter()
                .map(|name| root.join(name))
                .find(|path| path.is_dir())),
            Self::Path(path) => {
                // Canonical, so `..` cannot lead outside the root.
                let canonical = |p: &Path| std::fs::canonicalize(p).ok();
                let path = root.join(path);
                let inside = match (canonical(&path), canonical(root)) {
                    (Some(p), Some(r)) => p.starts_with(&r) && p != r,
                    _ => false,
                };
                if path.is_dir() && inside {
                    Ok(Some(path))
                } else {
                    Err(CaptureError::Other(format!(
                        "POD_CGROUP {}: not a directory below the cgroup root {}",
                        path.display(),
                        root.display()
                    )))
                }
            }
        }
    }
}

/// The pods' cgroup as the programs identify it: its id (the inode of its
/// directory). Its level in the hierarchy is not its depth below the root
/// (the root may itself be nested, as on kind): the programs learn it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodsAttachment {
    path: PathBuf,
    id: u64,
}

impl PodsAttachment {
    fn new(path: PathBuf) -> Result<Self, CaptureError> {
        let meta = std::fs::metadata(&path).map_err(|source| CaptureError::CgroupOpen {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            id: meta.ino(),
            path,
        })
    }
}

impl CaptureSettings {
    /// The defaults of the agent's flags, with `mode`.
    pub fn new(mode: CaptureMode) -> Self {
        Self {
            mode,
            cgroup_root: None,
            tracefs_path: PathBuf::from(tracefs::KNOWN_PATHS[0]),
            max_destinations: 262_144,
            max_attempt_counters: 16_384,
            comm_from_leader: true,
            leader_reads: vec![LeaderRead::Btf, LeaderRead::ProbeRead],
            btf_path: PathBuf::from(btf::VMLINUX_BTF),
            hold: None,
            pod_cgroup: PodCgroup::Detect,
        }
    }

    pub fn from_args(args: &crate::config::Args) -> Self {
        Self {
            mode: args.capture_mode,
            cgroup_root: args.cgroup_root.clone(),
            tracefs_path: args.tracefs_path.clone(),
            max_destinations: args.max_destinations,
            max_attempt_counters: args.max_attempt_counters,
            pod_cgroup: PodCgroup::parse(args.pod_cgroup.as_deref()),
            ..Self::new(args.capture_mode)
        }
    }
}

/// Where `process_comm` comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommSource {
    /// The thread-group leader's name, read with these offsets.
    Leader {
        offsets: TaskOffsets,
        read: LeaderRead,
    },
    /// The calling thread's name, and why not the leader's.
    Thread { reason: String },
}

/// How the programs read the leader's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaderRead {
    /// Plain loads through `bpf_get_current_task_btf` (the cheap way).
    Btf,
    /// `bpf_probe_read_kernel`, where the verifier refuses the BTF loads.
    ProbeRead,
}

impl CommSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Leader { .. } => "leader",
            Self::Thread { .. } => "thread",
        }
    }

    /// The value of the programs' `ITW_COMM_FROM_LEADER` global.
    fn global(&self) -> u32 {
        match self {
            Self::Leader {
                read: LeaderRead::Btf,
                ..
            } => comm_source::LEADER_BTF,
            Self::Leader {
                read: LeaderRead::ProbeRead,
                ..
            } => comm_source::LEADER_PROBE_READ,
            Self::Thread { .. } => comm_source::THREAD,
        }
    }
}

/// The kernel objects a [`Started`] capture holds, by kernel id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadedObjects {
    /// (name in the object, program id).
    pub programs: Vec<(&'static str, u32)>,
    /// Ids of the maps those programs use.
    pub maps: Vec<u32>,
}

/// A running capture.
pub struct Started {
    pub kernel: Box<dyn Kernel>,
    /// The mode in use (never [`CaptureMode::Auto`]).
    pub mode: CaptureMode,
    /// Why this mode.
    pub reason: String,
    /// What the programs are attached to.
    pub attached_to: String,
    pub comm_source: CommSource,
    pub objects: LoadedObjects,
    /// Cgroup mode: where our programs run among each hook's programs.
    pub attach_order: Vec<AttachOrder>,
    /// The programs rewrite held destinations' connects (cgroup mode with
    /// [`CaptureSettings::hold`]).
    pub holding: bool,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("mode", &self.mode)
            .field("reason", &self.reason)
            .field("attached_to", &self.attached_to)
            .field("comm_source", &self.comm_source)
            .field("objects", &self.objects)
            .field("attach_order", &self.attach_order)
            .field("holding", &self.holding)
            .finish_non_exhaustive()
    }
}

/// Chooses the capture mode, loads and attaches its programs. Must be called
/// inside a tokio runtime: wakes are read on a task of it.
pub fn start(settings: &CaptureSettings) -> Result<Started, CaptureError> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| CaptureError::NoRuntime(e.to_string()))?;
    let features = mode::detect(settings.cgroup_root.as_deref());
    let choice = mode::choose(settings.mode, &features)?;
    tracing::info!(mode = %choice.mode, reason = %choice.reason, "capture mode chosen");

    // Before anything attaches a tracepoint in this process: the loader keeps
    // a failed tracefs lookup for good.
    let tracepoint = if choice.mode == CaptureMode::Tracepoint {
        tracefs::ensure_mounted(&settings.tracefs_path)?;
        Some(tracefs::set_state_offsets(&settings.tracefs_path)?)
    } else {
        None
    };

    // The cheapest process-name source this kernel's verifier accepts: BTF
    // loads, else probe reads, else the thread's own name.
    let mut sources = Vec::new();
    let mut thread_reason = match settings.comm_from_leader {
        true => match btf::task_offsets(&settings.btf_path) {
            Ok(offsets) => {
                for read in &settings.leader_reads {
                    sources.push(CommSource::Leader {
                        offsets,
                        read: *read,
                    });
                }
                String::new()
            }
            Err(reason) => reason,
        },
        false => "switched off (comm_from_leader = false)".to_owned(),
    };
    let mut attached = None;
    for source in sources {
        match Attached::with_fallback(settings, &choice, tracepoint, &source) {
            Ok(done) => {
                attached = Some((done, source));
                break;
            }
            // The verifier refused this way of reading the leader's name:
            // try the next one.
            Err(err @ CaptureError::Program { action: "load", .. })
                if !err.is_permission_denied() =>
            {
                tracing::warn!(source = ?source, error = %err, "this kernel refuses a way of reading process names; trying the next");
                thread_reason = format!("the verifier refused the leader-name reads: {err}");
            }
            Err(err) => return Err(err),
        }
    }
    let (attached, comm_source) = match attached {
        Some(done) => done,
        None => {
            tracing::warn!(reason = %thread_reason, "counting under thread names (a JVM's threads count apart)");
            let source = CommSource::Thread {
                reason: thread_reason,
            };
            (
                Attached::with_fallback(settings, &choice, tracepoint, &source)?,
                source,
            )
        }
    };
    let Attached {
        ebpf,
        attached_to,
        objects,
        attach_order,
        holding,
    } = attached;
    for order in &attach_order {
        match order.before_ours() {
            [] => {
                tracing::info!(hook = order.hook, programs = ?order.effective, "our program runs first for this hook")
            }
            before => tracing::warn!(
                hook = order.hook,
                before_ours = ?before,
                "other programs run before ours for this hook: a socket load balancer among them rewrites a ClusterIP to a pod IP before we see it (the attempt then counts under the pod), and refuses one of a Service without endpoints unrewritten (counted as usual)"
            ),
        }
    }
    let kernel = EbpfKernel::new(ebpf, settings, holding, &runtime)?;
    tracing::info!(
        mode = %choice.mode,
        attached_to = %attached_to,
        comm_source = ?comm_source,
        programs = ?objects.programs,
        "capture attached"
    );
    Ok(Started {
        kernel: Box::new(kernel),
        mode: choice.mode,
        reason: choice.reason,
        attached_to,
        comm_source,
        objects,
        attach_order,
        holding,
    })
}

/// The loaded object with the programs of one mode attached.
struct Attached {
    ebpf: Ebpf,
    attached_to: String,
    objects: LoadedObjects,
    attach_order: Vec<AttachOrder>,
    /// The programs hold (cgroup mode with holding asked for).
    holding: bool,
}

/// The action of a failed attach to the pods' cgroup.
const ATTACH_PODS: &str = "attach to the pods' cgroup";

impl Attached {
    /// [`Attached::new`], and again without the pods' cgroup when attaching
    /// there fails (another program may hold it exclusively): the root's
    /// programs then count everyone, as without one.
    fn with_fallback(
        settings: &CaptureSettings,
        choice: &Choice,
        tracepoint: Option<SetStateOffsets>,
        comm: &CommSource,
    ) -> Result<Self, CaptureError> {
        match Self::new(settings, choice, tracepoint, comm) {
            Err(
                error @ CaptureError::Program {
                    action: ATTACH_PODS,
                    ..
                },
            ) if settings.pod_cgroup != PodCgroup::None => {
                tracing::warn!(%error, "attaching to the root cgroup only: a socket load balancer there may run before our programs");
                let root_only = CaptureSettings {
                    pod_cgroup: PodCgroup::None,
                    ..settings.clone()
                };
                Self::new(&root_only, choice, tracepoint, comm)
            }
            other => other,
        }
    }

    fn new(
        settings: &CaptureSettings,
        choice: &Choice,
        tracepoint: Option<SetStateOffsets>,
        comm: &CommSource,
    ) -> Result<Self, CaptureError> {
        let comm_from_leader = comm.global();
        let leader = match comm {
            CommSource::Leader { offsets, .. } => *offsets,
            CommSource::Thread { .. } => TaskOffsets {
                group_leader: 0,
                comm: 0,
            },
        };
        let tp = tracepoint.unwrap_or(SetStateOffsets {
            newstate: 0,
            dport: 0,
            family: 0,
            protocol: 0,
            daddr: 0,
            daddr_v6: 0,
        });
        // The kernel wants a ring buffer of a power-of-two number of pages.
        let page_size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(4096);
        let wakes_bytes = capacity::WAKES_BYTES.max(page_size);

        let cgroup_root = match choice.mode {
            CaptureMode::Cgroup => Some(choice.cgroup.as_ref().ok_or_else(|| {
                CaptureError::Other("cgroup mode chosen without a cgroup root".to_owned())
            })?),
            _ => None,
        };
        let pods = match cgroup_root {
            Some(root) => match settings.pod_cgroup.resolve(&root.path)? {
                Some(path) => Some(PodsAttachment::new(path)?),
                None => None,
            },
            None => None,
        };
        // Rewriting needs the connect hooks: cgroup mode only.
        let hold = settings.hold.as_ref().filter(|_| cgroup_root.is_some());
        let hold_enabled = u32::from(hold.is_some());
        let hold_mark = hold.map_or(0, |h| h.mark);
        let park_ip4 = hold
            .and_then(|h| h.park_ip4)
            .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        let park_ip6 = hold.and_then(|h| h.park_ip6).map_or([0u32; 4], |ip| {
            let o = ip.octets();
            [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
        });
        let pods_id = pods.as_ref().map_or(0, |p| p.id);

        let mut loader = EbpfLoader::new();
        loader
            // The object carries no BTF and needs no relocation against the
            // kernel's. (aya 0.14's EbpfLoader::new parses the kernel's BTF
            // all the same; this only keeps it from being used.)
            .btf(None)
            .map_max_entries(maps::WATCHED, settings.max_destinations)
            .map_max_entries(maps::ATTEMPTS, settings.max_attempt_counters)
            .map_max_entries(maps::OVERFLOW, settings.max_destinations)
            .map_max_entries(maps::WAKES, wakes_bytes)
            .override_global(globals::COMM_FROM_LEADER, &comm_from_leader, true)
            .override_global(
                globals::TASK_GROUP_LEADER_OFFSET,
                &leader.group_leader,
                true,
            )
            .override_global(globals::TASK_COMM_OFFSET, &leader.comm, true)
            .override_global(globals::TP_NEWSTATE_OFFSET, &tp.newstate, true)
            .override_global(globals::TP_DPORT_OFFSET, &tp.dport, true)
            .override_global(globals::TP_FAMILY_OFFSET, &tp.family, true)
            .override_global(globals::TP_PROTOCOL_OFFSET, &tp.protocol, true)
            .override_global(globals::TP_DADDR_OFFSET, &tp.daddr, true)
            .override_global(globals::TP_DADDR_V6_OFFSET, &tp.daddr_v6, true)
            .override_global(globals::HOLD_ENABLED, &hold_enabled, true)
            .override_global(globals::HOLD_MARK, &hold_mark, true)
            .override_global(globals::PARK_IP4, &park_ip4, true)
            .override_global(globals::PARK_IP6, &park_ip6, true)
            .override_global(globals::POD_CGROUP_ID, &pods_id, true);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| CaptureError::Load(Box::new(e)))?;

        // Load (verify) every program of the mode before attaching any, so a
        // refusal leaves nothing attached.
        let mut attach_order = Vec::new();
        let attached_to = match choice.mode {
            CaptureMode::Cgroup => {
                let root = cgroup_root.ok_or_else(|| {
                    CaptureError::Other("cgroup mode chosen without a cgroup root".to_owned())
                })?;
                let cgroup = File::open(&root.path).map_err(|source| CaptureError::CgroupOpen {
                    path: root.path.clone(),
                    source,
                })?;
                let pods_cgroup =
                    match &pods {
                        Some(pods) => Some(File::open(&pods.path).map_err(|source| {
                            CaptureError::CgroupOpen {
                                path: pods.path.clone(),
                                source,
                            }
                        })?),
                        None => None,
                    };
                let mut root_programs = vec![programs::CONNECT4, programs::CONNECT6];
                if hold.is_some() {
                    // At the root only: the pods' sockets inherit it.
                    root_programs.extend([programs::GETPEERNAME4, programs::GETPEERNAME6]);
                }
                let pods_programs: &[&'static str] = match pods_cgroup {
                    Some(_) => &[programs::CONNECT4_PODS, programs::CONNECT6_PODS],
                    None => &[],
                };
                for name in root_programs.iter().chain(pods_programs) {
                    let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                    prog.load().map_err(program_error(name, "load"))?;
                }
                for name in &root_programs {
                    let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                    prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)
                        .map_err(program_error(name, "attach"))?;
                }
                if let Some(pods_cgroup) = &pods_cgroup {
                    for name in pods_programs {
                        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                        // A link (kernels >= 5.7) always runs alongside
                        // the others of its cgroup; the kernel refuses
                        // attach flags on links.
                        prog.attach(pods_cgroup.as_fd(), CgroupAttachMode::Single)
                            .map_err(program_error(name, ATTACH_PODS))?;
                    }
                }
                let mut hooks = vec![
                    (
                        &cgroup,
                        programs::CONNECT4,
                        "connect4",
                        order::BPF_CGROUP_INET4_CONNECT,
                    ),
                    (
                        &cgroup,
                        programs::CONNECT6,
                        "connect6",
                        order::BPF_CGROUP_INET6_CONNECT,
                    ),
                ];
                if let Some(pods_cgroup) = &pods_cgroup {
                    hooks.extend([
                        (
                            pods_cgroup,
                            programs::CONNECT4_PODS,
                            "connect4 (pods)",
                            order::BPF_CGROUP_INET4_CONNECT,
                        ),
                        (
                            pods_cgroup,
                            programs::CONNECT6_PODS,
                            "connect6 (pods)",
                            order::BPF_CGROUP_INET6_CONNECT,
                        ),
                    ]);
                }
                for (at, name, hook, attach_type) in hooks {
                    let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                    let ours = prog.info().map_err(program_error(name, "inspect"))?.id();
                    match order::effective(at, attach_type) {
                        Ok(effective) => attach_order.push(AttachOrder {
                            hook,
                            ours,
                            effective,
                        }),
                        Err(error) => {
                            tracing::warn!(hook, %error, "cannot tell where our program runs among this hook's programs")
                        }
                    }
                }
                match &pods {
                    Some(pods) => format!(
                        "cgroup {} and the pods' cgroup {}",
                        root.path.display(),
                        pods.path.display()
                    ),
                    None => format!("cgroup {}", root.path.display()),
                }
            }
            CaptureMode::Kprobe => {
                let probes = [
                    (programs::TCP_V4_CONNECT, "tcp_v4_connect"),
                    (programs::TCP_V6_CONNECT, "tcp_v6_connect"),
                ];
                for (name, _) in probes {
                    let prog: &mut KProbe = program(&mut ebpf, name)?;
                    prog.load().map_err(program_error(name, "load"))?;
                }
                for (name, function) in probes {
                    let prog: &mut KProbe = program(&mut ebpf, name)?;
                    prog.attach(function, 0)
                        .map_err(program_error(name, "attach"))?;
                }
                "kprobes tcp_v4_connect, tcp_v6_connect".to_owned()
            }
            CaptureMode::Tracepoint => {
                let name = programs::INET_SOCK_SET_STATE;
                let prog: &mut TracePoint = program(&mut ebpf, name)?;
                prog.load().map_err(program_error(name, "load"))?;
                prog.attach(tracefs::CATEGORY, tracefs::EVENT)
                    .map_err(program_error(name, "attach"))?;
                format!("tracepoint {}:{}", tracefs::CATEGORY, tracefs::EVENT)
            }
            CaptureMode::Auto => {
                return Err(CaptureError::Other(
                    "capture mode auto reached the loader unresolved".to_owned(),
                ));
            }
        };
        let objects = loaded_objects(&ebpf)?;
        Ok(Self {
            ebpf,
            attached_to,
            objects,
            attach_order,
            holding: hold.is_some(),
        })
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::ObjectMismatch {
        what: "program",
        name,
    })?;
    prog.try_into().map_err(program_error(name, "load"))
}

fn program_error(
    program: &'static str,
    action: &'static str,
) -> impl FnOnce(ProgramError) -> CaptureError {
    move |source| CaptureError::Program {
        program,
        action,
        source: Box::new(source),
    }
}

const ALL_PROGRAMS: [&str; 9] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::CONNECT4_PODS,
    programs::CONNECT6_PODS,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::TCP_V4_CONNECT,
    programs::TCP_V6_CONNECT,
    programs::INET_SOCK_SET_STATE,
];

/// The loaded programs' ids and the ids of the maps they use.
fn loaded_objects(ebpf: &Ebpf) -> Result<LoadedObjects, CaptureError> {
    let mut objects = LoadedObjects::default();
    for name in ALL_PROGRAMS {
        let Some(prog) = ebpf.program(name) else {
            continue;
        };
        // Programs of other modes are in the object but not in the kernel.
        if prog.fd().is_err() {
            continue;
        }
        let info = prog.info().map_err(program_error(name, "inspect"))?;
        objects.programs.push((name, info.id()));
        // aya 0.14 reads map ids by re-opening the program by id, which
        // needs CAP_SYS_ADMIN; the DaemonSet runs without it. The ids only
        // serve logs and tests (which run as full root), so go without.
        for id in info.map_ids().ok().flatten().unwrap_or_default() {
            if !objects.maps.contains(&id) {
                objects.maps.push(id);
            }
        }
    }
    objects.maps.sort_unstable();
    Ok(objects)
}

/// The eBPF [`Kernel`]: the loaded object (owning programs and links) and
/// handles on its maps.
pub struct EbpfKernel {
    // Dropping it detaches and unloads the programs.
    _ebpf: Ebpf,
    watched: HashMap<MapData, Destination, Watch>,
    excluded: HashMap<MapData, Comm, u8>,
    excluded_hint: Array<MapData, u64>,
    attempts: PerCpuHashMap<MapData, AttemptKey, u64>,
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
fn removed(result: Result<(), MapError>, map: &'static str) -> Result<(), CaptureError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(err) => Err(map_error(map)(err)),
    }
}

impl EbpfKernel {
    fn new(
        mut ebpf: Ebpf,
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
            }),
            false => None,
        };
        let ring: RingBuf<MapData> = take_map(&mut ebpf, maps::WAKES)?;
        // Registering with the reactor needs the runtime's context.
        let ring = {
            let _guard = runtime.enter();
            // SAFETY: the RingBuf owns its map's descriptor, which stays open
            // and the same for as long as the RingBuf lives inside the AsyncFd.
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|err| {
                CaptureError::Map {
                    map: maps::WAKES,
                    source: err.into(),
                }
            })?
        };
        let (tx, rx) = mpsc::channel(WAKE_CHANNEL);
        let wake_reader = runtime.spawn(forward_wakes(ring, tx));
        Ok(Self {
            watched: take_map(&mut ebpf, maps::WATCHED)?,
            excluded: take_map(&mut ebpf, maps::EXCLUDED)?,
            excluded_hint: take_map(&mut ebpf, maps::EXCLUDED_HINT)?,
            attempts: take_map(&mut ebpf, maps::ATTEMPTS)?,
            overflow: take_map(&mut ebpf, maps::OVERFLOW)?,
            filtered: take_map(&mut ebpf, maps::FILTERED)?,
            stats: take_map(&mut ebpf, maps::STATS)?,
            _ebpf: ebpf,
            excluded_now: HashSet::new(),
            max_destinations: settings.max_destinations,
            wakes: Some(rx),
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
fn map_error(map: &'static str) -> impl Fn(MapError) -> CaptureError {
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

/// Reads wake records as the kernel writes them and hands them on. Ends when
/// the receiver is gone.
async fn forward_wakes(mut ring: AsyncFd<RingBuf<MapData>>, tx: mpsc::Sender<Wake>) {
    let mut ids = Vec::new();
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::error!(%error, "waiting on the wake ring buffer failed; wakes now come with the next collection only");
                return;
            }
        };
        // Clear first, then drain: a record written after the drain raises
        // readiness again, so none is left behind until the next one.
        guard.clear_ready();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match parse_wake(&item) {
                Some(wake) => ids.push(Wake {
                    key: AttemptKey {
                        dest_id: wake.dest_id,
                        comm: wake.comm,
                    },
                    overflowed: wake.overflowed != 0,
                }),
                None => tracing::warn!(len = item.len(), "ignoring a malformed wake record"),
            }
        }
        for id in ids.drain(..) {
            // Waiting here (rather than dropping) lets the ring buffer absorb
            // a burst; past its size the kernel counts what it drops.
            if tx.send(id).await.is_err() {
                return;
            }
        }
    }
}

fn parse_wake(record: &[u8]) -> Option<WakeEvent> {
    if record.len() != size_of::<WakeEvent>() {
        return None;
    }
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(record.get(at..at + 4)?.try_into().ok()?))
    };
    Some(WakeEvent {
        dest_id: word(0)?,
        overflowed: word(4)?,
        comm: record.get(8..24)?.try_into().ok()?,
    })
}

fn sum(values: &[u64]) -> u64 {
    values.iter().fold(0u64, |total, v| total.wrapping_add(*v))
}

impl Kernel for EbpfKernel {
    fn watch(&mut self, dest: &Destination, dest_id: u32) -> Result<(), CaptureError> {
        let watch = Watch { dest_id, armed: 1 };
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
        for item in self.attempts.iter() {
            let (key, values) = item.map_err(map_error(maps::ATTEMPTS))?;
            out.attempts.push((key, sum(&values)));
        }
        for item in self.overflow.iter() {
            let (dest_id, values) = item.map_err(map_error(maps::OVERFLOW))?;
            out.overflow.push((dest_id, sum(&values)));
        }
        for item in self.filtered.iter() {
            let (comm, values) = item.map_err(map_error(maps::FILTERED))?;
            out.filtered.push((comm, sum(&values)));
        }
        // A hash map walk restarts from the first bucket when the key it
        // stood on is deleted under it, so a key can come twice: keep the
        // larger (later) of the cumulative values.
        dedup_max(&mut out.attempts, |k| (k.dest_id, k.comm));
        dedup_max(&mut out.overflow, |k| *k);
        dedup_max(&mut out.filtered, |k| *k);
        Ok(())
    }

    fn read_woken(&mut self, wakes: &[Wake], out: &mut KernelCounts) -> Result<(), CaptureError> {
        out.clear();
        for wake in wakes {
            match self.attempts.get(&wake.key, 0) {
                Ok(values) => out.attempts.push((wake.key, sum(&values))),
                // Forgotten meanwhile: the next full read settles it.
                Err(MapError::KeyNotFound) => {}
                Err(err) => return Err(map_error(maps::ATTEMPTS)(err)),
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
        let mut doomed = Vec::new();
        for key in self.attempts.keys() {
            let key = key.map_err(map_error(maps::ATTEMPTS))?;
            if ids.contains(&key.dest_id) {
                doomed.push(key);
            }
        }
        for key in &doomed {
            removed(self.attempts.remove(key), maps::ATTEMPTS)?;
        }
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
        })
    }

    fn take_wakes(&mut self) -> Option<mpsc::Receiver<Wake>> {
        self.wakes.take()
    }

    fn hold(&mut self, dest: &Destination, park_port: u16) -> Result<(), CaptureError> {
        let hold = self.hold.as_mut().ok_or_else(not_holding)?;
        // getpeername() must know the port before any connect lands there.
        hold.parked
            .insert(park_key(dest, park_port), dest, 0)
            .map_err(map_error(maps::PARKED))?;
        let park = Park {
            port: park_port,
            _pad: 0,
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
    fn wake_records_must_have_the_shared_layout() {
        let mut record = 7u32.to_ne_bytes().to_vec();
        record.extend_from_slice(&1u32.to_ne_bytes());
        record.extend_from_slice(b"java\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(
            parse_wake(&record),
            Some(WakeEvent {
                dest_id: 7,
                overflowed: 1,
                comm: *b"java\0\0\0\0\0\0\0\0\0\0\0\0",
            })
        );
        assert_eq!(parse_wake(&record[..8]), None);
        record.push(0);
        assert_eq!(parse_wake(&record), None);
    }

    #[test]
    fn the_pods_cgroup_is_detected_or_must_be_below_the_root() {
        assert_eq!(PodCgroup::parse(None), PodCgroup::Detect);
        assert_eq!(PodCgroup::parse(Some(" ")), PodCgroup::Detect);
        assert_eq!(PodCgroup::parse(Some("none")), PodCgroup::None);
        assert_eq!(
            PodCgroup::parse(Some("kubepods.slice")),
            PodCgroup::Path(PathBuf::from("kubepods.slice"))
        );

        let base = std::env::temp_dir().join(format!("itw-pods-cgroup-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("kubepods")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        assert_eq!(PodCgroup::None.resolve(&root).unwrap(), None);
        // The cgroupfs driver's name; the systemd driver's comes first.
        assert_eq!(
            PodCgroup::Detect.resolve(&root).unwrap(),
            Some(root.join("kubepods"))
        );
        std::fs::create_dir_all(root.join("kubepods.slice")).unwrap();
        assert_eq!(
            PodCgroup::Detect.resolve(&root).unwrap(),
            Some(root.join("kubepods.slice"))
        );
        assert_eq!(
            PodCgroup::Path(root.join("kubepods"))
                .resolve(&root)
                .unwrap(),
            Some(root.join("kubepods"))
        );
        for bad in ["missing", "../outside", ".", "/"] {
            let err = PodCgroup::Path(PathBuf::from(bad))
                .resolve(&root)
                .unwrap_err()
                .to_string();
            assert!(err.contains("POD_CGROUP"), "{bad}: {err}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn duplicates_from_a_restarted_walk_keep_the_larger_value() {
        let mut entries = vec![(3u32, 5), (1, 2), (3, 9), (2, 4), (1, 1)];
        dedup_max(&mut entries, |k| *k);
        assert_eq!(entries, vec![(1, 2), (2, 4), (3, 9)]);
    }

    #[test]
    fn the_embedded_object_has_every_program_and_map() {
        let obj = aya_obj::Object::parse(OBJECT).unwrap();
        for name in ALL_PROGRAMS {
            assert!(obj.programs.contains_key(name), "no program {name}");
        }
        for name in [
            maps::WATCHED,
            maps::EXCLUDED,
            maps::EXCLUDED_HINT,
            maps::ATTEMPTS,
            maps::OVERFLOW,
            maps::FILTERED,
            maps::WAKES,
            maps::STATS,
            maps::HOLD,
            maps::HOLD_COUNT,
            maps::PARKED,
            maps::POD_LEVEL,
        ] {
            assert!(obj.maps.contains_key(name), "no map {name}");
        }
    }
}
