//! The eBPF implementation of [`Kernel`]: loads the object built from
//! `ebpf/itw-ebpf` (embedded, so the agent builds with stable Rust alone),
//! attaches the programs of one capture mode, and reads their maps.
//!
//! Nothing is pinned: the programs, links and maps belong to this process's
//! file descriptors, so they are detached and freed when [`EbpfKernel`] is
//! dropped or the process exits in any way, a crash included.
//!
//! - `settings`: what a capture starts with, the pods' cgroup resolved.
//! - `attach`: where each mode's programs attach, one function per mode.
//! - `load`: the object loaded with its globals set, and the fallbacks.
//! - `kernel`: [`EbpfKernel`], the maps behind the [`Kernel`] trait.
//! - `counters`: the attempt counters' maps (key -> index, counts, free
//!   indices) and their quarantine.
//! - `wakes`: the ring buffer of wakes, read and forwarded.

mod attach;
mod counters;
mod kernel;
mod load;
mod settings;
mod wakes;

use itw_common::comm_source;

use self::{
    attach::{Attachment, Hooks},
    load::Attached,
};
pub use self::{
    kernel::EbpfKernel,
    load::OBJECT,
    settings::{CaptureSettings, CgroupOrder, KernelHold, PodCgroup},
};
use super::{
    CaptureError, CaptureMode, Kernel,
    btf::{self, TaskOffsets},
    mode,
    order::{AttachOrder, OrderWatch},
};

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
    /// Cgroup mode: our connect programs were put first at the root
    /// (`CGROUP_ORDER` first, or auto on a kernel that can).
    pub first: bool,
    /// Cgroup mode: where our programs run among each hook's programs.
    pub attach_order: Vec<AttachOrder>,
    /// Cgroup mode: the hooks, to look at their order again later.
    pub order_watch: OrderWatch,
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
            .field("first", &self.first)
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
    tracing::info!(mode = %choice.mode(), reason = %choice.reason, "capture mode chosen");
    let hooks = Hooks::resolve(choice.chosen, settings)?;

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
        match Attached::with_fallback(settings, &hooks, &source) {
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
            (Attached::with_fallback(settings, &hooks, &source)?, source)
        }
    };
    let Attached {
        ebpf,
        hooks,
        attachment,
        objects,
        holding,
    } = attached;
    let Attachment {
        attached_to,
        order: order_watch,
        links,
    } = attachment;
    let attach_order = order_watch.check();
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
    let kernel = EbpfKernel::new(ebpf, links, settings, holding, &runtime)?;
    tracing::info!(
        mode = %hooks.mode(),
        attached_to = %attached_to,
        first = hooks.first(),
        comm_source = ?comm_source,
        programs = ?objects.programs,
        "capture attached"
    );
    Ok(Started {
        kernel: Box::new(kernel),
        mode: hooks.mode(),
        reason: choice.reason,
        attached_to,
        comm_source,
        objects,
        first: hooks.first(),
        attach_order,
        order_watch,
        holding,
    })
}
