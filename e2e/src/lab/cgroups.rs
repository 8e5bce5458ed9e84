//! The node's cgroups, laid out as the kubelet lays them out, under a node
//! root that is itself nested below the hierarchy's root (as on kind, k3d and
//! minikube-in-docker, where the node's `/sys/fs/cgroup` is a subtree of the
//! host's), or at the hierarchy's root.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The kubelet's cgroup driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/besteffort/pod<uid>/<id>`
    Cgroupfs,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Systemd => "systemd",
            Self::Cgroupfs => "cgroupfs",
        }
    }
}

/// A pod's QoS class, which decides its cgroup's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "guaranteed",
            Self::Burstable => "burstable",
            Self::BestEffort => "besteffort",
        }
    }
}

/// A container's cgroup below the node root, as the kubelet and containerd
/// name it. Guaranteed pods sit directly below the pods' cgroup.
pub fn container_path(driver: Driver, qos: Qos, pod_uid: &str, container_id: &str) -> PathBuf {
    match driver {
        Driver::Systemd => {
            let uid = pod_uid.replace('-', "_");
            let mut path = PathBuf::from("kubepods.slice");
            let pod = match qos {
                Qos::Guaranteed => format!("kubepods-pod{uid}.slice"),
                other => {
                    let q = other.as_str();
                    path.push(format!("kubepods-{q}.slice"));
                    format!("kubepods-{q}-pod{uid}.slice")
                }
            };
            path.push(pod);
            path.push(format!("cri-containerd-{container_id}.scope"));
            path
        }
        Driver::Cgroupfs => {
            let mut path = PathBuf::from("kubepods");
            if qos != Qos::Guaranteed {
                path.push(qos.as_str());
            }
            path.push(format!("pod{pod_uid}"));
            path.push(container_id);
            path
        }
    }
}

/// The pods' cgroup below the node root.
pub fn pods_path(driver: Driver) -> &'static str {
    match driver {
        Driver::Systemd => "kubepods.slice",
        Driver::Cgroupfs => "kubepods",
    }
}

/// Where the kubelet runs, in either driver (systemd starts it).
pub const KUBELET: &str = "system.slice/kubelet.service";

/// The node's cgroup root and everything the lab made below it, removed
/// (after killing what runs there) when dropped.
pub struct NodeCgroups {
    /// The node root: the hierarchy's root, or a directory nested below it.
    pub root: PathBuf,
    /// Directories the lab created, parents first.
    created: Vec<PathBuf>,
}

impl NodeCgroups {
    /// A node root at `hierarchy/<nest>` (created), or `hierarchy` itself
    /// when `nest` is empty.
    pub fn new(hierarchy: &Path, nest: &str) -> anyhow::Result<Self> {
        let mut cgroups = Self {
            root: hierarchy.to_owned(),
            created: Vec::new(),
        };
        if !nest.is_empty() {
            cgroups.root = cgroups.make(hierarchy, Path::new(nest))?;
        }
        Ok(cgroups)
    }

    /// Creates `relative` (and its parents) below the node root; returns its path.
    pub fn create(&mut self, relative: &Path) -> anyhow::Result<PathBuf> {
        let root = self.root.clone();
        self.make(&root, relative)
    }

    fn make(&mut self, base: &Path, relative: &Path) -> anyhow::Result<PathBuf> {
        let mut path = base.to_owned();
        for part in relative.components() {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .with_context(|| format!("creating cgroup {}", path.display()))?;
                self.created.push(path.clone());
            }
        }
        Ok(path)
    }

    /// `cgroup.procs` of a cgroup, opened for a child to write itself into
    /// between fork and exec.
    pub fn procs(path: &Path) -> anyhow::Result<File> {
        File::options()
            .write(true)
            .open(path.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", path.display()))
    }

    /// Kills every process in the lab's cgroups and removes them.
    pub fn remove(&mut self) -> anyhow::Result<()> {
        for dir in self.created.iter().rev() {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(dir) = self.created.last() {
            match std::fs::remove_dir(dir) {
                Ok(()) => {
                    self.created.pop();
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    self.created.pop();
                }
                // Busy until the killed processes are gone.
                Err(error) => {
                    if Instant::now() > deadline {
                        bail!("removing cgroup {}: {error}", dir.display());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }
}

impl Drop for NodeCgroups {
    fn drop(&mut self) {
        if let Err(error) = self.remove() {
            eprintln!("node lab: {error:#}");
        }
    }
}

/// The cgroup v2 hierarchy's mount point on this machine.
pub fn hierarchy() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    for line in mounts.lines() {
        // ... mount-point ... - fstype source options
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        if right.split(' ').next() == Some("cgroup2")
            && let Some(point) = left.split(' ').nth(4)
        {
            return Ok(PathBuf::from(point));
        }
    }
    bail!("no cgroup v2 hierarchy is mounted")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_paths_are_the_kubelets() {
        let uid = "4a1f0d6e-2b3c-4d5e-8f90-a1b2c3d4e5f6";
        assert_eq!(
            container_path(Driver::Systemd, Qos::BestEffort, uid, "abc"),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod4a1f0d6e_2b3c_4d5e_8f90_a1b2c3d4e5f6.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            container_path(Driver::Systemd, Qos::Guaranteed, uid, "abc"),
            PathBuf::from(
                "kubepods.slice/kubepods-pod4a1f0d6e_2b3c_4d5e_8f90_a1b2c3d4e5f6.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            container_path(Driver::Cgroupfs, Qos::Burstable, uid, "abc"),
            PathBuf::from("kubepods/burstable/pod4a1f0d6e-2b3c-4d5e-8f90-a1b2c3d4e5f6/abc")
        );
        assert_eq!(
            container_path(Driver::Cgroupfs, Qos::Guaranteed, uid, "abc"),
            PathBuf::from("kubepods/pod4a1f0d6e-2b3c-4d5e-8f90-a1b2c3d4e5f6/abc")
        );
    }
}
