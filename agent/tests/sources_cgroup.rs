//! Cgroup id -> pod UID on the real cgroup v2 hierarchy: a kubelet-style
//! pod cgroup tree (systemd driver) under a scratch node root, a process
//! moved into its container cgroup, and the id the kernel gives that
//! process's cgroup (the one `bpf_get_current_cgroup_id` returns, which
//! `name_to_handle_at` exports) found in the index as the pod's.
//!
//! Needs root; skips without it, unless `ITW_REQUIRE_BPF=1` (CI), where that
//! is a failure (see capture_support). Run it under /work/wt/.bpf.lock with
//! the other tests that change the hierarchy.

mod capture_support;

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use capture_support::{is_root, skip};
use itw_agent::{
    capture,
    sources::cgroups::{CgroupIndex, CgroupLimits, Depth, Owner, ScanReport},
};

const UID: &str = "4b7e2c1d-9a8f-4e6d-b5c4-3a2b1c0d9e8f";

/// The cgroup id of the cgroup directory `path`, as the kernel hands it
/// out: the 8-byte handle `name_to_handle_at` gives on cgroupfs.
fn kernel_cgroup_id(path: &Path) -> u64 {
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: [u8; 8],
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    let mut handle = Handle {
        bytes: 8,
        kind: 0,
        id: [0; 8],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: the path is NUL-terminated, `handle` has room for the 8 bytes
    // announced in `bytes`, and both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            &mut handle as *mut Handle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "name_to_handle_at {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    u64::from_ne_bytes(handle.id)
}

struct Scratch {
    dirs: Vec<PathBuf>,
    child: Option<std::process::Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deepest first: a cgroup with children cannot be removed.
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_process_in_a_pods_container_cgroup_is_that_pods() {
    if !is_root() {
        skip("creating cgroups needs root");
        return;
    }
    let root = match capture::cgroup::find_root(None) {
        Ok(root) if root.subtree.is_none() => root.path,
        Ok(root) => {
            skip(&format!(
                "only a sub-tree of the cgroup v2 hierarchy is mounted ({root:?})"
            ));
            return;
        }
        Err(reason) => {
            skip(&reason);
            return;
        }
    };
    let node = root.join(format!("itw-test-sources-{}", std::process::id()));
    let pods = node.join("kubepods.slice");
    let qos = pods.join("kubepods-burstable.slice");
    let pod = qos.join(format!(
        "kubepods-burstable-pod{}.slice",
        UID.replace('-', "_")
    ));
    let container = pod.join(format!("cri-containerd-{}.scope", "5e".repeat(32)));
    let mut scratch = Scratch {
        dirs: Vec::new(),
        child: None,
    };
    for dir in [&node, &pods, &qos, &pod, &container] {
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        scratch.dirs.push(dir.clone());
    }
    let child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    scratch.child = Some(child);
    std::fs::write(container.join("cgroup.procs"), pid.to_string())
        .expect("move into the container cgroup");

    // Where the kernel says the process is, and that cgroup's id.
    let membership =
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/pid/cgroup");
    let relative = membership
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let own = root.join(relative.trim_start_matches('/'));
    assert_eq!(own, container);
    let id = kernel_cgroup_id(&own);
    assert_eq!(
        id,
        std::fs::metadata(&own).expect("stat").ino(),
        "cgroup id is the directory's inode"
    );

    let mut index = CgroupIndex::new(
        Some(pods.clone()),
        CgroupLimits {
            max_cgroups: 64,
            min_rescan: Duration::from_secs(1),
        },
    );
    let mut scans = Vec::new();
    assert_eq!(
        index.owner(id, Instant::now(), &mut |depth, report| scans
            .push((depth, report))),
        Owner::Pod(UID.into())
    );
    assert_eq!(
        scans,
        vec![(
            Depth::Quick,
            ScanReport {
                pods: 1,
                cgroups: 2,
                left_out: 0
            }
        )],
        "the first miss scans"
    );
    let node_id = kernel_cgroup_id(&node);
    assert_eq!(
        index.owner(
            node_id,
            Instant::now() + Duration::from_secs(2),
            &mut |_, _| {}
        ),
        Owner::Node,
        "the node's own cgroup is not a pod's"
    );
}
