//! Where our cgroup programs run among the others attached for the same hook.
//!
//! A socket-level load balancer (Cilium's kube-proxy replacement) has a
//! `cgroup/connect4` program of its own. Programs of one hook run one after
//! the other, all of them: one that runs before ours may rewrite a ClusterIP
//! to a pod IP before we see it (we then count the pod), and it refuses a
//! connect to a Service with no endpoints without rewriting it (we still see
//! the ClusterIP, and count it). Where we stand is reported at start, so an
//! operator can tell which attempts land under which labels.

use std::{fs::File, io, os::fd::AsRawFd};

/// `enum bpf_attach_type` values of the hooks we attach to.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
/// Effective programs asked for at most; more than this on one hook would be
/// unusual.
const MAX_PROGRAMS: usize = 64;

/// One hook's programs in the order they run, and ours among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachOrder {
    pub hook: &'static str,
    pub ours: u32,
    /// Program ids in run order.
    pub effective: Vec<u32>,
}

impl AttachOrder {
    /// Ids of the programs that run before ours.
    pub fn before_ours(&self) -> &[u32] {
        let at = self
            .effective
            .iter()
            .position(|id| *id == self.ours)
            .unwrap_or(self.effective.len());
        &self.effective[..at]
    }

    /// Whether ours is in the list at all (it must be, once attached).
    pub fn present(&self) -> bool {
        self.effective.contains(&self.ours)
    }
}

/// `bpf_attr` for `BPF_PROG_QUERY` (the fields before `prog_attach_flags`).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// The programs that run, in order, for `attach_type` on sockets of
/// `cgroup` (its own and its ancestors').
pub fn effective(cgroup: &File, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; MAX_PROGRAMS];
    let mut attr = QueryAttr {
        target_fd: u32::try_from(cgroup.as_raw_fd()).map_err(io::Error::other)?,
        attach_type,
        query_flags: BPF_F_QUERY_EFFECTIVE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_PROGRAMS as u32,
        ..QueryAttr::default()
    };
    // SAFETY: bpf(2) reads `attr` and writes at most prog_cnt ids into `ids`,
    // which lives until after the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate((attr.prog_cnt as usize).min(MAX_PROGRAMS));
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_before_ours_are_the_ones_earlier_in_run_order() {
        let order = AttachOrder {
            hook: "connect4",
            ours: 7,
            effective: vec![3, 5, 7, 9],
        };
        assert_eq!(order.before_ours(), [3, 5]);
        assert!(order.present());
        let first = AttachOrder {
            effective: vec![7, 9],
            ..order.clone()
        };
        assert!(first.before_ours().is_empty());
        let missing = AttachOrder {
            effective: vec![3],
            ..order
        };
        assert!(!missing.present());
        assert_eq!(missing.before_ours(), [3]);
    }
}
