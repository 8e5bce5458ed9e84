//! Where each capture mode's programs attach: [`Hooks`], resolved once from
//! the chosen mode, and one attach function per mode.
//!
//! Each function loads (verifies) every program of its mode before
//! attaching any, so a refusal leaves nothing attached. None of them may
//! attach a program of another mode.

use std::{fs::File, os::fd::AsFd};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, KProbe, Program, ProgramError, TracePoint},
};
use itw_common::programs;

use super::settings::{CaptureSettings, PodsAttachment};
use crate::capture::{
    CaptureError, CaptureMode,
    cgroup::CgroupRoot,
    mode::Chosen,
    order::{self, AttachOrder},
    tracefs::{self, SetStateOffsets},
};

/// The action of a failed attach to the pods' cgroup.
pub(super) const ATTACH_PODS: &str = "attach to the pods' cgroup";

/// The chosen mode with everything attaching it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Hooks {
    /// The connect programs on the cgroup v2 root, and on the pods' cgroup
    /// when there is one.
    Cgroup {
        root: CgroupRoot,
        pods: Option<PodsAttachment>,
    },
    Kprobe,
    /// The tracepoint, with the offsets of its record's fields.
    Tracepoint(SetStateOffsets),
}

impl Hooks {
    /// Resolves `chosen` against the host: the pods' cgroup, or tracefs
    /// (mounted if need be) and the tracepoint's record layout.
    pub(super) fn resolve(
        chosen: Chosen,
        settings: &CaptureSettings,
    ) -> Result<Self, CaptureError> {
        Ok(match chosen {
            Chosen::Cgroup(root) => Self::Cgroup {
                pods: settings.pod_cgroup.attachment(&root.path)?,
                root,
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

    pub(super) fn mode(&self) -> CaptureMode {
        match self {
            Self::Cgroup { .. } => CaptureMode::Cgroup,
            Self::Kprobe => CaptureMode::Kprobe,
            Self::Tracepoint(_) => CaptureMode::Tracepoint,
        }
    }

    /// The same hooks without the pods' cgroup.
    pub(super) fn root_only(&self) -> Option<Self> {
        match self {
            Self::Cgroup {
                root,
                pods: Some(_),
            } => Some(Self::Cgroup {
                root: root.clone(),
                pods: None,
            }),
            _ => None,
        }
    }

    /// Attaches the loaded object's programs of this mode; returns what
    /// they are attached to and, for cgroup hooks, where ours run.
    pub(super) fn attach(
        &self,
        ebpf: &mut Ebpf,
        holding: bool,
    ) -> Result<(String, Vec<AttachOrder>), CaptureError> {
        match self {
            Self::Cgroup { root, pods } => cgroup(ebpf, root, pods.as_ref(), holding),
            Self::Kprobe => Ok((kprobes(ebpf)?, Vec::new())),
            Self::Tracepoint(_) => Ok((tracepoint(ebpf)?, Vec::new())),
        }
    }
}

/// `cgroup/connect4` and `cgroup/connect6` on the root (with the
/// getpeername programs when `holding`), and on the pods' cgroup.
fn cgroup(
    ebpf: &mut Ebpf,
    root: &CgroupRoot,
    pods: Option<&PodsAttachment>,
    holding: bool,
) -> Result<(String, Vec<AttachOrder>), CaptureError> {
    let cgroup = File::open(&root.path).map_err(|source| CaptureError::CgroupOpen {
        path: root.path.clone(),
        source,
    })?;
    let pods_cgroup = match pods {
        Some(pods) => Some(
            File::open(&pods.path).map_err(|source| CaptureError::CgroupOpen {
                path: pods.path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let mut root_programs = vec![programs::CONNECT4, programs::CONNECT6];
    if holding {
        // At the root only: the pods' sockets inherit it.
        root_programs.extend([programs::GETPEERNAME4, programs::GETPEERNAME6]);
    }
    let pods_programs: &[&'static str] = match pods_cgroup {
        Some(_) => &[programs::CONNECT4_PODS, programs::CONNECT6_PODS],
        None => &[],
    };
    for name in root_programs.iter().chain(pods_programs) {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load().map_err(program_error(name, "load"))?;
    }
    for name in &root_programs {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
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
    let mut attach_order = Vec::new();
    for (at, name, hook, attach_type) in hooks {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
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
    let attached_to = match pods {
        Some(pods) => format!(
            "cgroup {} and the pods' cgroup {}",
            root.path.display(),
            pods.path.display()
        ),
        None => format!("cgroup {}", root.path.display()),
    };
    Ok((attached_to, attach_order))
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
