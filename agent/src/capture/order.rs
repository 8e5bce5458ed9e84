//! Where our cgroup programs run among the others attached for the same hook.
//!
//! A socket-level load balancer (Cilium's kube-proxy replacement) has a
//! `cgroup/connect4` program of its own. Programs of one hook run one after
//! the other, all of them: one that runs before ours may rewrite a ClusterIP
//! to a pod IP before we see it (we then count the pod), and it refuses a
//! connect to a Service with no endpoints without rewriting it (we still see
//! the ClusterIP, and count it). Where we stand is reported at start, so an
//! operator can tell which attempts land under which labels.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// `enum bpf_attach_type` values of the hooks we attach to.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;

/// Attach flags (include/uapi/linux/bpf.h): before the programs already
/// attached at the same cgroup (Linux 6.16's cgroup mprog ordering), and
/// before every program of descendant cgroups (Linux 6.15).
pub const BPF_F_BEFORE: u32 = 1 << 3;
pub const BPF_F_PREORDER: u32 = 1 << 6;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
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
    /// The pods' connects meet our program at this hook: where it must run
    /// before a socket load balancer to hold them.
    pub pods_meet_ours: bool,
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

    /// Why held connects of pods cannot be trusted to reach our program
    /// unrefused, if they cannot: another program runs first where the
    /// pods' connects meet ours (a socket load balancer would refuse a
    /// Service without endpoints before we could park the connect).
    pub fn holding_blocked(&self) -> Option<String> {
        match self.before_ours() {
            [] => None,
            _ if !self.pods_meet_ours => None,
            before => Some(format!(
                "program(s) {before:?} run before ours on {}: a socket load balancer among them refuses connects to a Service without endpoints before they can be held",
                self.hook
            )),
        }
    }
}

/// A hook our program is attached to, kept open to look at its order again
/// (another agent, such as a CNI's, may attach after ours).
#[derive(Debug)]
pub struct WatchedHook {
    /// The cgroup whose effective programs the pods' (or the root's)
    /// connects run.
    pub cgroup: File,
    pub attach_type: u32,
    pub hook: &'static str,
    pub ours: u32,
    pub pods_meet_ours: bool,
}

/// The cgroup hooks of a capture.
#[derive(Debug, Default)]
pub struct OrderWatch {
    hooks: Vec<WatchedHook>,
}

impl OrderWatch {
    pub fn push(&mut self, hook: WatchedHook) {
        self.hooks.push(hook);
    }

    /// Where ours runs now on each hook (a hook that cannot be asked is
    /// logged and left out).
    pub fn check(&self) -> Vec<AttachOrder> {
        self.hooks
            .iter()
            .filter_map(|h| match effective(&h.cgroup, h.attach_type) {
                Ok(effective) => Some(AttachOrder {
                    hook: h.hook,
                    ours: h.ours,
                    effective,
                    pods_meet_ours: h.pods_meet_ours,
                }),
                Err(error) => {
                    tracing::warn!(hook = h.hook, %error, "cannot tell where our program runs among this hook's programs");
                    None
                }
            })
            .collect()
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

/// Links `program` to `cgroup` for `attach_type` with `flags`, which aya
/// 0.14 cannot pass. The link detaches when the descriptor closes.
pub fn link_first(program: BorrowedFd<'_>, cgroup: &File, attach_type: u32) -> io::Result<OwnedFd> {
    // bpf_attr.link_create: prog_fd, target_fd, attach_type, flags; the
    // relative program (none: before all) and revision stay zero.
    let mut attr = [0u32; 16];
    attr[0] = u32::try_from(program.as_raw_fd()).map_err(io::Error::other)?;
    attr[1] = u32::try_from(cgroup.as_raw_fd()).map_err(io::Error::other)?;
    attr[2] = attach_type;
    attr[3] = BPF_F_PREORDER | BPF_F_BEFORE;
    // SAFETY: bpf(2) reads `size` bytes of `attr`, which is that long.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
            pods_meet_ours: true,
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

    #[test]
    fn holding_is_blocked_only_where_pods_meet_ours_behind_another() {
        let behind = AttachOrder {
            hook: "connect4 (pods)",
            ours: 7,
            effective: vec![3, 7],
            pods_meet_ours: true,
        };
        assert_eq!(
            behind.holding_blocked().as_deref(),
            Some(
                "program(s) [3] run before ours on connect4 (pods): a socket load balancer among them refuses connects to a Service without endpoints before they can be held"
            )
        );
        // The root's hook when the pods' cgroup has programs of its own.
        let root = AttachOrder {
            pods_meet_ours: false,
            ..behind.clone()
        };
        assert_eq!(root.holding_blocked(), None);
        let first = AttachOrder {
            effective: vec![7, 3],
            ..behind
        };
        assert_eq!(first.holding_blocked(), None);
    }
}
