//! Where each capture mode's programs attach: [`Hooks`], resolved once from
//! the chosen mode, and one attach function per mode.
//!
//! Each function loads (verifies) every program of its mode before
//! attaching any, so a refusal leaves nothing attached. None of them may
//! attach a program of another mode.

use std::{
    fs::File,
    os::fd::{AsFd, OwnedFd},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, KProbe, Program, ProgramError, SockOps, TracePoint,
    },
};
use itw_common::programs;

use super::settings::{CaptureSettings, CgroupOrder, PodsAttachment};
use crate::capture::{
    CaptureError, CaptureMode,
    cgroup::CgroupRoot,
    mode::Chosen,
    order::{self, OrderWatch, WatchedHook},
    tracefs::{self, SetStateOffsets},
};

/// The action of a failed attach to the pods' cgroup.
pub(super) const ATTACH_PODS: &str = "attach to the pods' cgroup";

/// The chosen mode with everything attaching it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Hooks {
    /// The connect programs on the cgroup v2 root: put first there
    /// (`first`), or else also on the pods' cgroup when there is one.
    Cgroup {
        root: CgroupRoot,
        first: bool,
        pods: Option<PodsAttachment>,
    },
    Kprobe,
    /// The tracepoint, with the offsets of its record's fields.
    Tracepoint(SetStateOffsets),
}

impl Hooks {
    /// Cgroup mode with our connect programs put first.
    pub(super) fn first(&self) -> bool {
        matches!(self, Self::Cgroup { first: true, .. })
    }

    /// Resolves `chosen` against the host: the cgroup order and the pods'
    /// cgroup, or tracefs (mounted if need be) and the tracepoint's record
    /// layout.
    pub(super) fn resolve(
        chosen: Chosen,
        settings: &CaptureSettings,
    ) -> Result<Self, CaptureError> {
        Ok(match chosen {
            Chosen::Cgroup(root) => match settings.cgroup_order {
                CgroupOrder::Auto | CgroupOrder::First => Self::Cgroup {
                    root,
                    first: true,
                    pods: None,
                },
                CgroupOrder::Pods => Self::pods_order(root, settings)?,
            },
            Chosen::Kprobe => Self::Kprobe,
            Chosen::Tracepoint => {
                // Before anything attaches a tracepoint in this process: the
                // loader keeps a failed tracefs lookup for good.
                tracefs::ensure_mounted(&settings.tracefs_path)?;
                Self::Tracepoint(tracefs::set_state_offsets(&settings.tracefs_path)?)
            }
        })
    }

    fn pods_order(root: CgroupRoot, settings: &CaptureSettings) -> Result<Self, CaptureError> {
        Ok(Self::Cgroup {
            pods: settings.pod_cgroup.attachment(&root.path)?,
            first: false,
            root,
        })
    }

    pub(super) fn mode(&self) -> CaptureMode {
        match self {
            Self::Cgroup { .. } => CaptureMode::Cgroup,
            Self::Kprobe => CaptureMode::Kprobe,
            Self::Tracepoint(_) => CaptureMode::Tracepoint,
        }
    }

    /// What to try when attaching these hooks failed with `error`: the
    /// pods' order where `CGROUP_ORDER=auto` met a kernel that cannot put
    /// programs first, the root alone where the pods' cgroup refused us.
    pub(super) fn fallback(
        &self,
        error: &CaptureError,
        settings: &CaptureSettings,
    ) -> Result<Option<Self>, CaptureError> {
        Ok(match (self, error) {
            (
                Self::Cgroup {
                    root, first: true, ..
                },
                CaptureError::AttachFirst { source, .. },
            ) if settings.cgroup_order == CgroupOrder::Auto
                && source.raw_os_error() == Some(libc::EINVAL) =>
            {
                Some(Self::pods_order(root.clone(), settings)?)
            }
            (
                Self::Cgroup {
                    root,
                    first: false,
                    pods: Some(_),
                },
                CaptureError::Program {
                    action: ATTACH_PODS,
                    ..
                },
            ) => Some(Self::Cgroup {
                root: root.clone(),
                first: false,
                pods: None,
            }),
            _ => None,
        })
    }

    /// Attaches the loaded object's programs of this mode.
    pub(super) fn attach(
        &self,
        ebpf: &mut Ebpf,
        holding: bool,
    ) -> Result<Attachment, CaptureError> {
        match self {
            Self::Cgroup { root, first, pods } => {
                cgroup(ebpf, root, *first, pods.as_ref(), holding)
            }
            Self::Kprobe => Ok(Attachment::described(kprobes(ebpf)?)),
            Self::Tracepoint(_) => Ok(Attachment::described(tracepoint(ebpf)?)),
        }
    }
}

/// What attaching made.
pub(super) struct Attachment {
    pub attached_to: String,
    /// Cgroup hooks: where ours run among their programs, to look again at.
    pub order: OrderWatch,
    /// Links made outside aya; closing them detaches their programs.
    pub links: Vec<OwnedFd>,
}

impl Attachment {
    fn described(attached_to: String) -> Self {
        Self {
            attached_to,
            order: OrderWatch::default(),
            links: Vec::new(),
        }
    }
}

/// `cgroup/connect4` and `cgroup/connect6` on the root, first among every
/// program there and below (`first`), or as usual and on the pods' cgroup
/// too; the getpeername and sock_ops programs on the root when `holding`.
fn cgroup(
    ebpf: &mut Ebpf,
    root: &CgroupRoot,
    first: bool,
    pods: Option<&PodsAttachment>,
    holding: bool,
) -> Result<Attachment, CaptureError> {
    let open = |path: &std::path::Path| {
        File::open(path).map_err(|source| CaptureError::CgroupOpen {
            path: path.to_owned(),
            source,
        })
    };
    let cgroup = open(&root.path)?;
    let pods_cgroup = pods.map(|p| open(&p.path)).transpose()?;
    let connect = [
        (programs::CONNECT4, order::BPF_CGROUP_INET4_CONNECT),
        (programs::CONNECT6, order::BPF_CGROUP_INET6_CONNECT),
    ];
    let getpeername: &[&'static str] = if holding {
        // At the root only: the pods' sockets inherit it.
        &[programs::GETPEERNAME4, programs::GETPEERNAME6]
    } else {
        &[]
    };
    let pods_programs: &[&'static str] = match pods_cgroup {
        Some(_) => &[programs::CONNECT4_PODS, programs::CONNECT6_PODS],
        None => &[],
    };
    let everything = connect
        .iter()
        .map(|(name, _)| name)
        .chain(getpeername)
        .chain(pods_programs);
    for name in everything {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load().map_err(program_error(name, "load"))?;
    }
    let mut links = Vec::new();
    for (name, attach_type) in connect {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        if first {
            let fd = prog.fd().map_err(program_error(name, "inspect"))?;
            links.push(
                order::link_first(fd.as_fd(), &cgroup, attach_type).map_err(|source| {
                    CaptureError::AttachFirst {
                        program: name,
                        source,
                    }
                })?,
            );
        } else {
            prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(program_error(name, "attach"))?;
        }
    }
    for name in getpeername {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .map_err(program_error(name, "attach"))?;
    }
    if holding {
        // Joins what the connect programs parked to the 4-tuple the parking
        // listener sees; at the root, it sees every pod's socket.
        let name = programs::SOCK_OPS;
        let prog: &mut SockOps = program(ebpf, name)?;
        prog.load().map_err(program_error(name, "load"))?;
        prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .map_err(program_error(name, "attach"))?;
    }
    if let Some(pods_cgroup) = &pods_cgroup {
        for name in pods_programs {
            let prog: &mut CgroupSockAddr = program(ebpf, name)?;
            // A link (kernels >= 5.7) always runs alongside the others of
            // its cgroup; the kernel refuses attach flags on links.
            prog.attach(pods_cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(program_error(name, ATTACH_PODS))?;
        }
    }
    // The hooks whose order is watched, and which one the pods' connects
    // meet our program at (where it must run before a load balancer to
    // hold): the root's, unless the pods' cgroup has programs of its own.
    let mut hooks = Vec::new();
    for (name, hook, attach_type) in [
        (
            programs::CONNECT4,
            "connect4",
            order::BPF_CGROUP_INET4_CONNECT,
        ),
        (
            programs::CONNECT6,
            "connect6",
            order::BPF_CGROUP_INET6_CONNECT,
        ),
    ] {
        hooks.push((
            cgroup.try_clone(),
            name,
            hook,
            attach_type,
            pods_cgroup.is_none(),
        ));
    }
    if let Some(pods_cgroup) = &pods_cgroup {
        hooks.push((
            pods_cgroup.try_clone(),
            programs::CONNECT4_PODS,
            "connect4 (pods)",
            order::BPF_CGROUP_INET4_CONNECT,
            true,
        ));
        hooks.push((
            pods_cgroup.try_clone(),
            programs::CONNECT6_PODS,
            "connect6 (pods)",
            order::BPF_CGROUP_INET6_CONNECT,
            true,
        ));
    }
    let mut watch = OrderWatch::default();
    for (at, name, hook, attach_type, pods_meet_ours) in hooks {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        let ours = prog.info().map_err(program_error(name, "inspect"))?.id();
        let at = at.map_err(|source| CaptureError::CgroupOpen {
            path: root.path.clone(),
            source,
        })?;
        watch.push(WatchedHook {
            cgroup: at,
            attach_type,
            hook,
            ours,
            pods_meet_ours,
        });
    }
    let attached_to = match pods {
        Some(pods) => format!(
            "cgroup {} and the pods' cgroup {}",
            root.path.display(),
            pods.path.display()
        ),
        None => format!("cgroup {}", root.path.display()),
    };
    Ok(Attachment {
        attached_to,
        order: watch,
        links,
    })
}

/// kprobes on `tcp_v4_connect` and `tcp_v6_connect`.
fn kprobes(ebpf: &mut Ebpf) -> Result<String, CaptureError> {
    let probes = [
        (programs::TCP_V4_CONNECT, "tcp_v4_connect"),
        (programs::TCP_V6_CONNECT, "tcp_v6_connect"),
    ];
    for (name, _) in probes {
        let prog: &mut KProbe = program(ebpf, name)?;
        prog.load().map_err(program_error(name, "load"))?;
    }
    for (name, function) in probes {
        let prog: &mut KProbe = program(ebpf, name)?;
        prog.attach(function, 0)
            .map_err(program_error(name, "attach"))?;
    }
    Ok("kprobes tcp_v4_connect, tcp_v6_connect".to_owned())
}

/// The `sock:inet_sock_set_state` tracepoint.
fn tracepoint(ebpf: &mut Ebpf) -> Result<String, CaptureError> {
    let name = programs::INET_SOCK_SET_STATE;
    let prog: &mut TracePoint = program(ebpf, name)?;
    prog.load().map_err(program_error(name, "load"))?;
    prog.attach(tracefs::CATEGORY, tracefs::EVENT)
        .map_err(program_error(name, "attach"))?;
    Ok(format!(
        "tracepoint {}:{}",
        tracefs::CATEGORY,
        tracefs::EVENT
    ))
}

/// The program `name` of the object, as the kind `P` the mode expects.
pub(super) fn program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::ObjectMismatch {
        what: "program",
        name,
    })?;
    prog.try_into().map_err(program_error(name, "load"))
}

pub(super) fn program_error(
    program: &'static str,
    action: &'static str,
) -> impl FnOnce(ProgramError) -> CaptureError {
    move |source| CaptureError::Program {
        program,
        action,
        source: Box::new(source),
    }
}
