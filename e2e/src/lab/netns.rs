//! Network namespaces for the lab's node and pods, and the commands that
//! build them (`ip`, `sysctl`).
//!
//! The node namespace's only way out is a veth to a dead-end namespace that
//! forwards nothing and has no route anywhere: cluster-like addresses can be
//! used freely, and no packet can leave the machine.

use std::{
    fs::File,
    io::Write,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

/// Runs a command to completion; its stderr is the error.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    run_with_input(program, args, None)
}

/// [`run`] with `input` on stdin.
pub fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace (`ip netns add`), deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `/var/run/netns/<name>`: what `setns` takes, as a CRI's netns file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    pub fn open(&self) -> anyhow::Result<File> {
        File::open(self.path()).with_context(|| format!("opening {}", self.path().display()))
    }

    /// `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A sysctl of this namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ],
        )
    }

    /// Runs `program ARGS` inside this namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        self.exec_with_input(program, args, None)
    }

    pub fn exec_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run_with_input("ip", &all, input)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "delete", &self.name]);
    }
}

/// Moves the calling thread into the namespace of `file` (a netns file).
/// Threads it starts afterwards are born there too.
pub fn enter(file: &File) -> anyhow::Result<()> {
    // SAFETY: setns with a valid descriptor and a namespace type.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns into a network namespace");
    }
    Ok(())
}

/// The namespace this thread is in now, to come back to.
pub fn current() -> anyhow::Result<File> {
    File::open("/proc/thread-self/ns/net").context("opening this thread's network namespace")
}

/// Deletes the lab's namespaces left behind by runs that were killed: those
/// whose name carries the pid of a process that no longer exists.
pub fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !PathBuf::from("/proc").join(&pid).exists() {
            let _ = run("ip", &["netns", "delete", &name]);
        }
    }
}
