//! Processes on the lab node: pod processes (this binary's `pod`
//! subcommands, in a pod's network namespace and container cgroup), the
//! kubelet, and the real agent as its DaemonSet runs it.
//!
//! Every child is killed when its handle drops, and the node's cgroups are
//! killed as a whole when the node goes, so a failing run leaves nothing.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::Context;
use tokio::process::{Child, Command};

use super::cgroups::NodeCgroups;

/// Where a child runs: a network namespace to enter (`None`: the node's,
/// which the lab itself is in) and a cgroup to join, both before exec.
pub struct Placement<'a> {
    pub netns: Option<&'a Path>,
    pub cgroup: &'a Path,
}

/// Sets `command` to enter `placement` between fork and exec.
fn place(command: &mut Command, placement: &Placement<'_>) -> anyhow::Result<Vec<File>> {
    let netns = match placement.netns {
        Some(path) => {
            Some(File::open(path).with_context(|| format!("opening {}", path.display()))?)
        }
        None => None,
    };
    let procs = NodeCgroups::procs(placement.cgroup)?;
    let netns_fd = netns.as_ref().map(AsRawFd::as_raw_fd);
    let procs_fd = procs.as_raw_fd();
    // SAFETY: between fork and exec the closure only makes two syscalls on
    // descriptors the parent keeps open until spawn returns.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = netns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let me = b"0";
            if libc::write(procs_fd, me.as_ptr().cast(), me.len()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(netns.into_iter().chain([procs]).collect())
}

/// This binary's `pod` subcommand, placed.
pub fn pod_command(placement: &Placement<'_>, args: &[String]) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("this binary's path")?;
    let mut command = Command::new(exe);
    command
        .arg("pod")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let _keep = place(&mut command, placement)?;
    command.spawn().context("starting a pod process")
}

/// A long-running child whose output goes to a log file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// The log's last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Starts `command` placed, logging to `log`.
pub fn daemon(
    mut command: Command,
    placement: Option<&Placement<'_>>,
    log: &Path,
) -> anyhow::Result<Daemon> {
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true);
    let _keep = match placement {
        Some(placement) => place(&mut command, placement)?,
        None => Vec::new(),
    };
    let child = command
        .spawn()
        .with_context(|| format!("starting {:?}", command.as_std().get_program()))?;
    Ok(Daemon {
        child,
        log: log.to_owned(),
    })
}
