//! What a capture is started with: [`CaptureSettings`], what the programs
//! need for holding ([`KernelHold`]), and the pods' cgroup ([`PodCgroup`])
//! with its resolution under the cgroup root.
//!
//! Nothing here loads or attaches anything; resolving the pods' cgroup only
//! looks at directories.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::LeaderRead;
use crate::capture::{CaptureError, CaptureMode, btf, tracefs};

/// What [`start`](super::start) needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    pub mode: CaptureMode,
    /// `CGROUP_ROOT`: where cgroup programs attach (default: detected).
    pub cgroup_root: Option<PathBuf>,
    /// `TRACEFS_PATH`, for the tracepoint mode.
    pub tracefs_path: PathBuf,
    /// `MAX_DESTINATIONS`: size of the watched-destinations map.
    pub max_destinations: u32,
    /// `MAX_ATTEMPT_COUNTERS`: how many (destination, cgroup, process) counters.
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
    /// How the connect programs are put first (`CGROUP_ORDER`).
    pub cgroup_order: CgroupOrder,
    /// The pods' cgroup, where the connect programs are attached too when
    /// they cannot be put first at the root.
    pub pod_cgroup: PodCgroup,
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
            cgroup_order: CgroupOrder::Auto,
            pod_cgroup: PodCgroup::Detect,
        }
    }
}

/// How the cgroup connect programs get ahead of other programs of their
/// hook, such as a socket load balancer's (`CGROUP_ORDER`). Ahead, they see
/// the ClusterIP a caller asked for and can hold it; behind a load balancer
/// they see a pod IP, or nothing to hold once it has refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum CgroupOrder {
    /// `first` where the kernel offers it (Linux 6.15 and later), else `pods`.
    #[default]
    Auto,
    /// Attached to the root with `BPF_F_PREORDER | BPF_F_BEFORE`: before
    /// every program of every cgroup below, and of the root's other
    /// pre-order programs then attached. One attachment, seen by everyone.
    First,
    /// Attached to the root and to the pods' cgroup (`POD_CGROUP`), whose
    /// programs run before the root's (unless a root program was attached
    /// with `BPF_F_PREORDER`). For kernels without pre-order attachment.
    Pods,
}

impl CgroupOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::First => "first",
            Self::Pods => "pods",
        }
    }
}

/// What the programs need for holding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelHold {
    /// The agent's own connects carry it: never counted, never held.
    pub mark: u32,
    /// Parking addresses; a family without one is not held.
    pub park_ip4: Option<Ipv4Addr>,
    pub park_ip6: Option<Ipv6Addr>,
    /// Connects parked at once, per held Service and per node; past them a
    /// connect goes on unheld.
    pub max_per_service: u32,
    pub max_per_node: u32,
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

    /// The pods' cgroup under `root` as the programs identify it, if any.
    pub(super) fn attachment(&self, root: &Path) -> Result<Option<PodsAttachment>, CaptureError> {
        match self.resolve(root)? {
            Some(path) => Ok(Some(PodsAttachment::new(path)?)),
            None => Ok(None),
        }
    }

    /// The directory to attach to, if any, under `root`. A configured path
    /// must exist; a detected one may not.
    pub fn resolve(&self, root: &Path) -> Result<Option<PathBuf>, CaptureError> {
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
pub(super) struct PodsAttachment {
    pub path: PathBuf,
    pub id: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
