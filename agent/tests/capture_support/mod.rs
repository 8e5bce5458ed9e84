//! Shared by the eBPF capture tests: privilege checks, starting a mode, making
//! connects (to loopback only), and reading counts back by name.
//!
//! Without root or BPF these tests skip with the reason printed, unless
//! `ITW_REQUIRE_BPF=1` (CI), where that is a failure.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    collections::BTreeMap,
    ffi::CStr,
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use itw_agent::capture::{
    self, CaptureError, CaptureMode, CaptureSettings, Kernel, KernelCounts, Started, mode,
};
use itw_common::{COMM_LEN, Comm};

pub fn bpf_required() -> bool {
    std::env::var("ITW_REQUIRE_BPF").is_ok_and(|v| v == "1")
}

/// Skips (returns) or, under `ITW_REQUIRE_BPF=1`, fails.
pub fn skip(reason: &str) {
    if bpf_required() {
        panic!("ITW_REQUIRE_BPF=1 but {reason}");
    }
    eprintln!("skipped: {reason} (set ITW_REQUIRE_BPF=1 to make this a failure)");
}

/// A test whose subject this kernel does not have at all (not a missing
/// privilege or setting, which [`skip`] is for): it passes having checked
/// nothing, and says so in its output, which hack/vm-matrix lists
/// (`--show-output`) so that it is never read as run.
pub fn not_run(reason: &str) {
    eprintln!("not run: {reason}");
}

/// Loading programs needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The running kernel's (major, minor), for tests whose expectation is a
/// kernel fact (a helper or flag that came with a release): hack/vm-matrix
/// runs them on older kernels too.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("reading /proc/sys/kernel/osrelease");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| {
            p.parse::<u32>()
                .expect("a kernel release starts major.minor")
        });
    (
        parts.next().expect("a major version"),
        parts.next().expect("a minor version"),
    )
}

/// Whether the kernel takes `BPF_F_PREORDER` (Linux 6.15, and backported:
/// Debian's 6.12 has it). Asked of the kernel itself, not of the agent's own
/// detection: the lab's load balancer attaches with the flag to a scratch
/// cgroup, once per test binary.
pub fn kernel_has_preorder() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        let mut dir = capture::cgroup::find_root(None)
            .expect("a cgroup v2 root")
            .path;
        dir.push(format!("itw-test-preorder-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("creating the probe's cgroup");
        let answer = match itw_socket_lb::SocketLb::attach(&dir, true) {
            Ok(_) => true,
            Err(err) => {
                let os = err
                    .chain()
                    .find_map(|e| e.downcast_ref::<std::io::Error>()?.raw_os_error());
                assert_eq!(os, Some(libc::EINVAL), "probing BPF_F_PREORDER: {err:#}");
                false
            }
        };
        std::fs::remove_dir(&dir).expect("removing the probe's cgroup");
        answer
    })
}

/// Whether this host offers `mode`; prints why not, and under
/// ITW_REQUIRE_BPF=1 fails: a test for a mode this kernel lacks is marked
/// ignored (the kprobe ones, which hack/vm-matrix runs where kprobes exist),
/// so reaching here without the mode means it did not run what it names.
pub fn mode_available(mode: CaptureMode) -> bool {
    match mode::choose(mode, &mode::detect(None)) {
        Ok(_) => true,
        Err(err) => {
            skip(&format!("capture mode {mode} is not available: {err}"));
            false
        }
    }
}

/// Starts `mode` with test-sized maps, adjusted by `customize`. None: skipped.
pub fn start(mode: CaptureMode, customize: impl FnOnce(&mut CaptureSettings)) -> Option<Started> {
    if !is_root() {
        skip("not running as root, which loading eBPF programs needs");
        return None;
    }
    if !mode_available(mode) {
        return None;
    }
    let mut settings = CaptureSettings::new(mode);
    settings.max_destinations = 1024;
    settings.max_attempt_counters = 1024;
    customize(&mut settings);
    match capture::start(&settings) {
        Ok(started) => Some(started),
        Err(err) if err.is_permission_denied() => {
            skip(&format!("the kernel refused eBPF: {err}"));
            None
        }
        Err(err) => panic!("starting capture mode {mode}: {err}"),
    }
}

/// A comm as the text it holds.
pub fn comm_str(comm: &Comm) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// This process's name as the kernel keeps it (the thread-group leader's).
pub fn process_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("reading /proc/self/comm")
        .trim_end_matches('\n')
        .to_owned()
}

/// The attempt counters as (dest_id, process name) -> count.
pub fn attempts(kernel: &mut dyn Kernel) -> BTreeMap<(u32, String), u64> {
    let counts = read(kernel);
    let mut out = BTreeMap::new();
    for (key, n) in counts.attempts {
        let previous = out.insert((key.dest_id, comm_str(&key.comm)), n);
        assert_eq!(previous, None, "a key came twice from read()");
    }
    out
}

pub fn read(kernel: &mut dyn Kernel) -> KernelCounts {
    let mut counts = KernelCounts::default();
    kernel.read(&mut counts).expect("reading the kernel maps");
    counts
}

/// `n` connects to `target`, where nothing listens. Each is refused at once;
/// the attempt is what the programs count. Only loopback is allowed here.
pub fn connect_n(target: SocketAddr, n: u64) {
    assert_loopback(target);
    for _ in 0..n {
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!("connect to {target}: {e} (expected: refused)"),
            Ok(_) => panic!("something listens on {target}; the test needs a closed port"),
        }
    }
}

/// `n` connects to `listener`, each accepted, one byte each way, then closed
/// from both ends: the whole life of an established connection, every state
/// change of it on both sides. Only loopback is allowed here.
pub fn connect_accepted_n(listener: &TcpListener, n: u64) {
    let target = listener.local_addr().expect("the listener's address");
    assert_loopback(target);
    for _ in 0..n {
        let mut client = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to the listener on {target}: {e}"));
        let (mut server, _) = listener.accept().expect("accepting the connect");
        let mut byte = [0u8; 1];
        client.write_all(b"q").unwrap();
        server.read_exact(&mut byte).unwrap();
        server.write_all(b"a").unwrap();
        client.read_exact(&mut byte).unwrap();
        drop(client);
        // The client's FIN reached the server: it reads end of stream.
        assert_eq!(server.read(&mut byte).unwrap(), 0);
    }
}

/// `n` connect() calls of UDP sockets to `target`: no packet is sent, but the
/// cgroup connect hooks run for them as for TCP. Only loopback is allowed.
pub fn udp_connect_n(target: SocketAddr, n: u64) {
    assert_loopback(target);
    let any = match target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    for _ in 0..n {
        let socket = UdpSocket::bind(any).expect("binding a UDP socket");
        socket
            .connect(target)
            .unwrap_or_else(|e| panic!("UDP connect to {target}: {e}"));
    }
}

/// `n` connects of MPTCP sockets (`IPPROTO_MPTCP`) to an IPv4 loopback
/// `target` where nothing listens, each refused. `Err`, having made none,
/// when MPTCP sockets cannot be made: why.
pub fn mptcp_connect_n(target: std::net::SocketAddrV4, n: u64) -> Result<(), NoMptcp> {
    assert!(target.ip().is_loopback(), "loopback only, not {target}");
    let addr = sockaddr_in(target);
    for _ in 0..n {
        // SAFETY: plain system calls on a descriptor this loop owns, with a
        // sockaddr_in that lives across the call.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                libc::IPPROTO_MPTCP,
            );
            if fd < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EPROTONOSUPPORT | libc::EINVAL | libc::ENOPROTOOPT) => {
                        // Built without it (Debian's 5.10): no sysctl either.
                        return Err(if std::path::Path::new("/proc/sys/net/mptcp").exists() {
                            NoMptcp::Disabled
                        } else {
                            NoMptcp::NotBuilt
                        });
                    }
                    _ => panic!("an MPTCP socket: {err}"),
                }
            }
            let rc = libc::connect(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert!(
                rc < 0 && err.kind() == std::io::ErrorKind::ConnectionRefused,
                "MPTCP connect to {target}: rc {rc}, {err} (expected: refused)"
            );
        }
    }
    Ok(())
}

/// Why [`mptcp_connect_n`] made no connect.
#[derive(Debug)]
pub enum NoMptcp {
    /// The kernel has no MPTCP (`CONFIG_MPTCP` unset).
    NotBuilt,
    /// It has, but `net.mptcp.enabled` is 0.
    Disabled,
}

fn sockaddr_in(target: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(target.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn assert_loopback(target: SocketAddr) {
    let ok = match target {
        SocketAddr::V4(a) => a.ip().is_loopback(),
        SocketAddr::V6(a) => {
            a.ip().is_loopback() || a.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    assert!(ok, "tests connect to loopback only, not {target}");
}

/// Runs `n` connects to an IPv4 loopback `target` in a child process whose
/// only (so main) thread is named `name`, as a separate program would be.
/// Each connect is expected to be refused (nothing listens).
pub fn connect_from_process(name: &CStr, target: std::net::SocketAddrV4, n: u32) {
    let connected = connects_from_child(name, target, n, None);
    assert_eq!(connected, 0, "something listens on {target}");
}

/// Runs `n` connects to an IPv4 loopback `target` from a child process named
/// `name`, which first moves itself into the cgroup whose `cgroup.procs` is
/// given, if any. Returns how many connects succeeded. The child makes raw
/// system calls only: it is forked from a threaded process.
pub fn connects_from_child(
    name: &CStr,
    target: std::net::SocketAddrV4,
    n: u32,
    cgroup_procs: Option<&CStr>,
) -> u32 {
    assert!(target.ip().is_loopback(), "loopback only, not {target}");
    assert!(n <= 200, "the child reports its count in its exit status");
    assert!(
        name.to_bytes().len() < COMM_LEN,
        "{name:?} is too long for a comm"
    );
    let addr = sockaddr_in(target);
    // SAFETY: the child calls only async-signal-safe functions (open, write,
    // prctl, socket, connect, close, _exit) on data prepared before the fork.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            if let Some(procs) = cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                // "0" moves the writer itself.
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(251);
                }
                libc::close(fd);
            }
            if libc::prctl(libc::PR_SET_NAME, name.as_ptr()) != 0 {
                libc::_exit(252);
            }
            let mut connected = 0;
            for _ in 0..n {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    libc::_exit(253);
                }
                let rc = libc::connect(
                    fd,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                if rc == 0 {
                    connected += 1;
                }
                libc::close(fd);
            }
            libc::_exit(connected);
        }
        let mut status = 0;
        let waited = libc::waitpid(pid, &mut status, 0);
        assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) <= 200,
            "the child {name:?} failed (status {status:#x}; exit 251: joining the cgroup, 252: prctl, 253: socket)"
        );
        libc::WEXITSTATUS(status) as u32
    }
}

/// A cgroup of its own under the cgroup v2 root, removed when dropped (once
/// every process in it has exited).
pub struct TestCgroup(pub std::path::PathBuf);

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let root = capture::cgroup::find_root(None).expect("a cgroup v2 root");
        let path = root.path.join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).expect("creating a test cgroup");
        Self(path)
    }

    /// Its cgroup id, as `bpf_get_current_cgroup_id` gives it for a task in
    /// it: the inode number of its directory.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.0).expect("the test cgroup").ino()
    }

    /// `cgroup.procs`, for [`connects_from_child`].
    pub fn procs(&self) -> std::ffi::CString {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(self.0.join("cgroup.procs").as_os_str().as_bytes())
            .expect("a path without NUL")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// This process's own cgroup v2 id: the inode of its cgroup's directory
/// (`0::/path` in /proc/self/cgroup, under the cgroup v2 root).
pub fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let root = capture::cgroup::find_root(None).expect("a cgroup v2 root");
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let path = cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup");
    let dir = root.path.join(path.trim_start_matches('/'));
    std::fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .ino()
}

/// Sets the calling thread's name (its own comm, not the process's).
pub fn name_this_thread(name: &CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    assert_eq!(rc, 0, "prctl: {}", std::io::Error::last_os_error());
}

pub fn is_mode_unavailable(err: &CaptureError) -> bool {
    matches!(err, CaptureError::ModeUnavailable { .. })
}

/// One test per (mode, case) of a suite whose cases are
/// `async fn case(slot: Slot)` at the test file's root: each mode is a
/// module of its own, with its own third octet, and may carry one attribute
/// (`ignore = "..."`, for a mode this machine's kernel lacks). The cases go
/// as one group so that every mode repeats all of them.
#[allow(unused_macros, reason = "only the per-mode suites use it")]
macro_rules! per_mode {
    ([$($module:ident: $mode:ident = $octet:literal $attrs:tt),* $(,)?], $cases:tt) => {
        $($crate::capture_support::per_mode!(@mode $module, $mode, $octet, $attrs, $cases);)*
    };
    (@mode $module:ident, $mode:ident, $octet:literal, $attrs:tt, {$($case:ident = $test:literal),* $(,)?}) => {
        mod $module {
            $($crate::capture_support::per_mode!(@case $mode, $octet, $attrs, $case = $test);)*
        }
    };
    (@case $mode:ident, $octet:literal, [$($attr:meta)?], $case:ident = $test:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn $case() {
            super::$case(super::Slot {
                mode: itw_agent::capture::CaptureMode::$mode,
                mode_octet: $octet,
                test: $test,
            })
            .await;
        }
    };
}
#[allow(unused_imports, reason = "only the per-mode suites use it")]
pub(crate) use per_mode;
