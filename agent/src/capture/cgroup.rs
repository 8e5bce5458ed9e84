//! Finding the cgroup v2 hierarchy the connect programs attach to.
//!
//! A `cgroup/connect4` program attached to a cgroup runs for connects from
//! every process in it and its descendants, so the agent attaches to the root
//! of the v2 hierarchy: `/sys/fs/cgroup` on most Kubernetes nodes,
//! `/sys/fs/cgroup/unified` on hosts with the hybrid v1/v2 layout. `CGROUP_ROOT`
//! overrides the detection.

use std::path::{Path, PathBuf};

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the connect programs attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRoot {
    pub path: PathBuf,
    /// The mount shows a sub-tree of the hierarchy (a container's cgroup
    /// namespace or a bind mount): connects from outside it are not seen.
    pub subtree: Option<String>,
}

/// The cgroup v2 root: `override_path` when given (checked to be a cgroup v2
/// directory), else the v2 mount found in `/proc/self/mountinfo`. The error
/// says why there is none, for the capture mode choice to report.
pub fn find_root(override_path: Option<&Path>) -> Result<CgroupRoot, String> {
    if let Some(path) = override_path {
        check_cgroup2_dir(path)
            .map_err(|reason| format!("CGROUP_ROOT={}: {reason}", path.display()))?;
        return Ok(CgroupRoot {
            path: path.to_owned(),
            subtree: None,
        });
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    root_from_mountinfo(&mountinfo).ok_or_else(|| {
        "no cgroup v2 hierarchy is mounted (no cgroup2 entry in /proc/self/mountinfo)".to_owned()
    })
}

/// The cgroup v2 mount in a `/proc/<pid>/mountinfo` text. A mount of the whole
/// hierarchy (root `/`) wins over a mount of a sub-tree; among equals, the first.
pub fn root_from_mountinfo(mountinfo: &str) -> Option<CgroupRoot> {
    let mut subtree_mount = None;
    for line in mountinfo.lines() {
        let Some(entry) = MountEntry::parse(line) else {
            continue;
        };
        if entry.fstype != "cgroup2" {
            continue;
        }
        let root = CgroupRoot {
            path: PathBuf::from(unescape(entry.mount_point)),
            subtree: (entry.root != "/").then(|| unescape(entry.root)),
        };
        if root.subtree.is_none() {
            return Some(root);
        }
        subtree_mount.get_or_insert(root);
    }
    subtree_mount
}

/// The fields of one mountinfo line that matter here (proc(5)): mount ID,
/// parent ID, major:minor, root, mount point, options, optional fields ended by
/// `-`, then filesystem type, source, super options.
struct MountEntry<'a> {
    root: &'a str,
    mount_point: &'a str,
    fstype: &'a str,
}

impl<'a> MountEntry<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        // Skip the mount options and the variable number of optional fields.
        fields.find(|f| *f == "-")?;
        let fstype = fields.next()?;
        Some(Self {
            root,
            mount_point,
            fstype,
        })
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn check_cgroup2_dir(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "the path contains a NUL byte".to_owned())?;
    // SAFETY: libc::statfs is a C struct of integers, for which all zero
    // bytes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a NUL-terminated string that outlives the call, and
    // statfs writes only into the struct we lend it.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(format!("{}", std::io::Error::last_os_error()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between targets"
    )]
    if stat.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err("not a cgroup v2 directory (a cgroup2 mount or a directory in one)".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 master:3 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn finds_the_v2_mount_of_a_hybrid_layout() {
        assert_eq!(
            root_from_mountinfo(HYBRID),
            Some(CgroupRoot {
                path: "/sys/fs/cgroup/unified".into(),
                subtree: None
            })
        );
    }

    #[test]
    fn a_whole_hierarchy_wins_over_an_earlier_subtree() {
        let text = "\
50 40 0:30 /kubepods/pod1 /run/pod\\040cg rw - cgroup2 cgroup2 rw
51 40 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            root_from_mountinfo(text),
            Some(CgroupRoot {
                path: "/sys/fs/cgroup".into(),
                subtree: None
            })
        );
        let only_subtree = text.lines().next().unwrap_or_default();
        assert_eq!(
            root_from_mountinfo(only_subtree),
            Some(CgroupRoot {
                path: "/run/pod cg".into(),
                subtree: Some("/kubepods/pod1".into())
            })
        );
    }

    #[test]
    fn no_v2_mount_and_garbage_lines_give_none() {
        let text = "\
garbage
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:29 / /mnt rw,relatime shared:1 no-separator cgroup2
";
        assert_eq!(root_from_mountinfo(text), None);
        assert_eq!(root_from_mountinfo(""), None);
    }

    #[test]
    fn unescapes_octal_and_keeps_stray_backslashes() {
        assert_eq!(unescape(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape(r"/a\9b\04"), r"/a\9b\04");
    }

    #[test]
    fn an_override_must_be_a_cgroup2_directory() {
        let err = find_root(Some(Path::new("/proc"))).unwrap_err();
        assert!(
            err.starts_with("CGROUP_ROOT=/proc: not a cgroup v2 directory"),
            "{err}"
        );
        let err = find_root(Some(Path::new("/nonexistent/cg"))).unwrap_err();
        assert!(err.contains("No such file or directory"), "{err}");
    }
}
