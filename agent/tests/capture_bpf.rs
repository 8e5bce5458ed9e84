//! The eBPF capture, loaded and attached for real, through the [`Kernel`]
//! trait: for each capture mode this kernel has, connects to stand-in
//! ClusterIPs and pod IPs on loopback are counted exactly per (destination,
//! process name).
//!
//! Every test loads its own copy of the programs with its own maps, and uses
//! its own addresses (127.<mode>.<test>.x) and IPv6 ports, so tests running in
//! parallel (and, for cgroup mode, every connect on the machine passing
//! through each copy) cannot touch each other's counts.
//!
//! Needs root; see capture_support for skipping.

mod capture_support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener},
    time::Duration,
};

use capture_support as support;
use itw_agent::capture::{
    CaptureMode, CommSource, KernelCounts, KernelStats, LeaderRead, Wake, comm_bytes, comm_name,
    mode,
};
use itw_common::Destination;
use tokio::sync::mpsc;

/// One mode's slice of the address space.
#[derive(Clone, Copy)]
struct Slot {
    mode: CaptureMode,
    /// Second octet of this mode's IPv4 addresses.
    mode_octet: u8,
    /// Third octet: the test's own.
    test: u8,
}

impl Slot {
    fn v4(self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, self.mode_octet, self.test, host)
    }

    fn v4_target(self, host: u8, port: u16) -> (Destination, SocketAddr) {
        let ip = self.v4(host);
        (
            Destination::v4(ip.octets(), port),
            SocketAddr::from((ip, port)),
        )
    }

    /// `::1` with a port no other test (or mode) uses.
    fn v6_target(self) -> (Destination, SocketAddr) {
        let port = 43_000 + u16::from(self.mode_octet - 100) * 256 + u16::from(self.test);
        (
            Destination::new(Ipv6Addr::LOCALHOST.octets(), port),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        )
    }
}

const PORT: u16 = 8429;

fn expected(entries: &[(u32, &str, u64)]) -> BTreeMap<(u32, String), u64> {
    entries
        .iter()
        .map(|(id, comm, n)| ((*id, (*comm).to_owned()), *n))
        .collect()
}

/// The destination id of the next wake, if one comes within `wait`.
async fn next_wake(wakes: &mut mpsc::Receiver<Wake>, wait: Duration) -> Option<u32> {
    next_wake_record(wakes, wait).await.map(|w| w.key.dest_id)
}

/// The next wake, if one comes within `wait`.
async fn next_wake_record(wakes: &mut mpsc::Receiver<Wake>, wait: Duration) -> Option<Wake> {
    tokio::time::timeout(wait, wakes.recv())
        .await
        .ok()
        .flatten()
}

/// Runs blocking connect code off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the connect task panicked")
}

async fn counts_each_destination_and_process_exactly(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    assert_eq!(started.mode, slot.mode);
    // The cheap way of reading process names where the kernel has it
    // (bpf_get_current_task_btf: Linux 5.11), else the probe-read fallback.
    let read = if support::kernel_version() >= (5, 11) {
        LeaderRead::Btf
    } else {
        LeaderRead::ProbeRead
    };
    assert!(
        matches!(started.comm_source, CommSource::Leader { read: r, .. } if r == read),
        "{:?}, expected a {read:?} leader read",
        started.comm_source
    );
    let mut kernel = started.kernel;
    let (service, service_addr) = slot.v4_target(1, PORT);
    let (pod, pod_addr) = slot.v4_target(2, PORT);
    let (v6, v6_addr) = slot.v6_target();
    let (mapped, mapped_v4) = slot.v4_target(3, PORT);
    let mapped_addr = SocketAddr::from((slot.v4(3).to_ipv6_mapped(), PORT));
    let (_, unwatched_addr) = slot.v4_target(4, PORT);
    // The watched IP on another port is another destination.
    let (_, other_port_addr) = slot.v4_target(1, PORT + 1);
    assert_ne!(mapped_v4, mapped_addr);
    for (dest, id) in [(service, 10), (pod, 11), (v6, 12), (mapped, 13)] {
        kernel.watch(&dest, id).unwrap();
    }
    blocking(move || {
        support::connect_n(service_addr, 7);
        support::connect_n(pod_addr, 5);
        support::connect_n(v6_addr, 3);
        support::connect_n(mapped_addr, 4);
        support::connect_n(unwatched_addr, 6);
        support::connect_n(other_port_addr, 2);
    })
    .await;

    // The test thread has its own name (the test's); the counts are under
    // the process's.
    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[
            (10, &comm, 7),
            (11, &comm, 5),
            (12, &comm, 3),
            (13, &comm, 4)
        ])
    );
    let counts = support::read(kernel.as_mut());
    assert!(counts.overflow.is_empty(), "{:?}", counts.overflow);
    assert!(counts.filtered.is_empty(), "{:?}", counts.filtered);
    assert_eq!(kernel.stats().unwrap(), KernelStats::default());
}

/// Each attempt is counted under its caller's own cgroup: a child process
/// moved into a test cgroup under that cgroup's id (its directory's inode),
/// this process under its own; the wake names the caller's cgroup and the
/// destination. Where the kernel has it, read through the BTF-typed task.
async fn counts_under_the_callers_cgroup(slot: Slot) {
    callers_cgroup_ids(slot, &[LeaderRead::Btf, LeaderRead::ProbeRead], "btf").await;
}

/// The same through `bpf_get_current_cgroup_id`, which the programs call
/// when the process name is not read through the BTF-typed task.
async fn counts_under_the_callers_cgroup_through_the_helper(slot: Slot) {
    callers_cgroup_ids(slot, &[LeaderRead::ProbeRead], "helper").await;
}

async fn callers_cgroup_ids(slot: Slot, reads: &[LeaderRead], tag: &str) {
    let reads = reads.to_vec();
    let Some(started) = support::start(slot.mode, |s| s.leader_reads = reads) else {
        return;
    };
    // The BTF read where the kernel has bpf_get_current_task_btf (5.11).
    let read = if tag == "btf" && support::kernel_version() >= (5, 11) {
        LeaderRead::Btf
    } else {
        LeaderRead::ProbeRead
    };
    assert!(
        matches!(started.comm_source, CommSource::Leader { read: r, .. } if r == read),
        "{:?}, expected a {read:?} leader read",
        started.comm_source
    );
    let mut kernel = started.kernel;
    let mut wakes = kernel.take_wakes().expect("the wake channel");
    let (dest, addr) = slot.v4_target(1, PORT);
    let SocketAddr::V4(target) = addr else {
        unreachable!("an IPv4 target")
    };
    kernel.watch(&dest, 40).unwrap();
    let cgroup = support::TestCgroup::new(&format!(
        "itw-test-caller-{}-{tag}-{}",
        slot.mode,
        std::process::id()
    ));
    let (cgroup_id, procs) = (cgroup.id(), cgroup.procs());
    let own = support::own_cgroup_id();
    assert_ne!(cgroup_id, own);

    let made =
        blocking(move || support::connects_from_child(c"caller-child", target, 2, Some(&procs)))
            .await;
    assert_eq!(made, 0, "nothing listens on {target}");
    let wake = next_wake_record(&mut wakes, Duration::from_secs(5))
        .await
        .expect("the first attempt wakes");
    assert_eq!(
        (
            wake.key.dest_id,
            wake.key.cgroup_id,
            comm_name(&wake.key.comm)
        ),
        (40, cgroup_id, "caller-child".to_owned())
    );
    assert_eq!(wake.dest, dest);
    blocking(move || support::connect_n(addr, 1)).await;

    let mut counted: Vec<(u32, u64, String, u64)> = support::read(kernel.as_mut())
        .attempts
        .into_iter()
        .map(|(k, n)| (k.dest_id, k.cgroup_id, comm_name(&k.comm), n))
        .collect();
    counted.sort();
    let mut want = vec![
        (40, cgroup_id, "caller-child".to_owned(), 2),
        (40, own, support::process_comm(), 1),
    ];
    want.sort();
    assert_eq!(counted, want);
}

async fn a_thread_with_its_own_name_counts_under_the_process_name(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (dest, addr) = slot.v4_target(1, PORT);
    kernel.watch(&dest, 1).unwrap();
    let thread_comm = blocking(move || {
        std::thread::spawn(move || {
            support::name_this_thread(c"pool-3-thread-7");
            support::connect_n(addr, 9);
            std::fs::read_to_string("/proc/thread-self/comm").unwrap()
        })
        .join()
        .unwrap()
    })
    .await;
    assert_eq!(thread_comm, "pool-3-thread-7\n");
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(1, &support::process_comm(), 9)])
    );
}

async fn the_probe_read_fallback_counts_under_the_process_name_too(slot: Slot) {
    let Some(started) = support::start(slot.mode, |s| {
        s.leader_reads = vec![LeaderRead::ProbeRead];
    }) else {
        return;
    };
    assert!(
        matches!(
            started.comm_source,
            CommSource::Leader {
                read: LeaderRead::ProbeRead,
                ..
            }
        ),
        "{:?}",
        started.comm_source
    );
    let mut kernel = started.kernel;
    let (dest, addr) = slot.v4_target(1, PORT);
    kernel.watch(&dest, 1).unwrap();
    blocking(move || {
        std::thread::spawn(move || {
            support::name_this_thread(c"grpc-worker-3");
            support::connect_n(addr, 5);
        })
        .join()
        .unwrap()
    })
    .await;
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(1, &support::process_comm(), 5)])
    );
}

async fn thread_names_when_reading_the_leader_is_off(slot: Slot) {
    let Some(started) = support::start(slot.mode, |s| s.comm_from_leader = false) else {
        return;
    };
    assert_eq!(started.comm_source.as_str(), "thread");
    let mut kernel = started.kernel;
    let (dest, addr) = slot.v4_target(1, PORT);
    kernel.watch(&dest, 1).unwrap();
    blocking(move || {
        std::thread::spawn(move || {
            support::name_this_thread(c"worker-a");
            support::connect_n(addr, 2);
        })
        .join()
        .unwrap()
    })
    .await;
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(1, "worker-a", 2)])
    );
}

async fn an_excluded_process_is_counted_apart_and_never_wakes(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let mut wakes = kernel.take_wakes().unwrap();
    kernel
        .set_excluded(&[comm_bytes("kubelet"), comm_bytes("k3s")])
        .unwrap();
    let (dest, _) = slot.v4_target(1, PORT);
    let target = SocketAddrV4::new(slot.v4(1), PORT);
    kernel.watch(&dest, 20).unwrap();

    blocking(move || support::connect_from_process(c"kubelet", target, 6)).await;
    assert_eq!(
        next_wake(&mut wakes, Duration::from_millis(300)).await,
        None
    );
    blocking(move || support::connect_from_process(c"other-proc", target, 2)).await;
    assert_eq!(
        next_wake(&mut wakes, Duration::from_secs(5)).await,
        Some(20)
    );

    // A name no longer excluded counts as traffic again; its old filtered
    // count stays readable.
    kernel.set_excluded(&[comm_bytes("k3s")]).unwrap();
    blocking(move || support::connect_from_process(c"kubelet", target, 1)).await;

    let counts = support::read(kernel.as_mut());
    let filtered: Vec<_> = counts
        .filtered
        .iter()
        .map(|(c, n)| (support::comm_str(c), *n))
        .collect();
    assert_eq!(filtered, vec![("kubelet".to_owned(), 6)]);
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(20, "kubelet", 1), (20, "other-proc", 2)])
    );
}

async fn wakes_once_per_idle_to_active_until_rearmed(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let mut wakes = kernel.take_wakes().unwrap();
    assert!(kernel.take_wakes().is_none());
    let (a, a_addr) = slot.v4_target(1, PORT);
    let (b, b_addr) = slot.v6_target();
    let (_, unwatched) = slot.v4_target(9, PORT);
    kernel.watch(&a, 30).unwrap();
    kernel.watch(&b, 31).unwrap();

    blocking(move || support::connect_n(unwatched, 3)).await;
    assert_eq!(
        next_wake(&mut wakes, Duration::from_millis(300)).await,
        None
    );

    blocking(move || support::connect_n(a_addr, 3)).await;
    let wake = next_wake_record(&mut wakes, Duration::from_secs(5))
        .await
        .expect("a wake for the first attempt to a");
    // The wake names the counter the attempt went to, and reading just that
    // counter gives the whole burst so far.
    let comm = support::process_comm();
    assert_eq!(wake.key.dest_id, 30);
    assert_eq!(comm_name(&wake.key.comm), comm);
    assert!(!wake.overflowed);
    let mut woken = KernelCounts::default();
    kernel.read_woken(&[wake], &mut woken).unwrap();
    assert_eq!(woken.attempts, vec![(wake.key, 3)]);
    assert!(woken.overflow.is_empty());
    blocking(move || support::connect_n(a_addr, 4)).await;
    assert_eq!(
        next_wake(&mut wakes, Duration::from_millis(300)).await,
        None
    );

    blocking(move || support::connect_n(b_addr, 1)).await;
    assert_eq!(
        next_wake(&mut wakes, Duration::from_secs(5)).await,
        Some(31)
    );

    // The agent found it idle and re-armed it.
    kernel.watch(&a, 30).unwrap();
    blocking(move || support::connect_n(a_addr, 2)).await;
    assert_eq!(
        next_wake(&mut wakes, Duration::from_secs(5)).await,
        Some(30)
    );
    assert_eq!(
        next_wake(&mut wakes, Duration::from_millis(300)).await,
        None
    );

    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(30, &comm, 9), (31, &comm, 1)])
    );
    assert_eq!(kernel.stats().unwrap().wakes_dropped, 0);
}

async fn unwatch_stops_counting_and_forget_removes_counters(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (a, a_addr) = slot.v4_target(1, PORT);
    let (b, b_addr) = slot.v4_target(2, PORT);
    kernel.watch(&a, 1).unwrap();
    kernel.watch(&b, 2).unwrap();
    blocking(move || {
        support::connect_n(a_addr, 3);
        support::connect_n(b_addr, 1);
    })
    .await;
    kernel.unwatch(&a).unwrap();
    // Unwatching what is not watched is not an error.
    kernel.unwatch(&a).unwrap();
    blocking(move || support::connect_n(a_addr, 4)).await;
    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(1, &comm, 3), (2, &comm, 1)])
    );
    kernel.forget(&[1]).unwrap();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(2, &comm, 1)])
    );
}

async fn a_full_attempts_map_counts_in_overflow(slot: Slot) {
    let Some(started) = support::start(slot.mode, |s| s.max_attempt_counters = 2) else {
        return;
    };
    let mut kernel = started.kernel;
    let (a, a_addr) = slot.v4_target(1, PORT);
    let (b, b_addr) = slot.v4_target(2, PORT);
    kernel.watch(&a, 40).unwrap();
    kernel.watch(&b, 41).unwrap();
    blocking(move || {
        support::connect_n(a_addr, 1);
        support::connect_n(b_addr, 1);
    })
    .await;
    // Two keys: the map is full. A new (destination, process) overflows...
    let target = SocketAddrV4::new(slot.v4(1), PORT);
    blocking(move || support::connect_from_process(c"ovf-child", target, 5)).await;
    // ...while existing keys still count.
    blocking(move || support::connect_n(a_addr, 2)).await;

    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(40, &comm, 3), (41, &comm, 1)])
    );
    assert_eq!(support::read(kernel.as_mut()).overflow, vec![(40, 5)]);
    assert_eq!(
        kernel.stats().unwrap(),
        KernelStats {
            attempts_map_full: 5,
            ..KernelStats::default()
        }
    );
    // Forgetting a destination frees its keys for others and drops its overflow.
    kernel.forget(&[40]).unwrap();
    assert!(support::read(kernel.as_mut()).overflow.is_empty());
    blocking(move || support::connect_from_process(c"ovf-child", target, 1)).await;
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(40, "ovf-child", 1), (41, &comm, 1)])
    );
}

async fn many_threads_lose_nothing(slot: Slot) {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 25_000;
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (dest, addr) = slot.v4_target(1, PORT);
    kernel.watch(&dest, 7).unwrap();
    blocking(move || {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| std::thread::spawn(move || support::connect_n(addr, PER_THREAD)))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    })
    .await;
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(7, &support::process_comm(), THREADS * PER_THREAD)])
    );
    assert_eq!(kernel.stats().unwrap(), KernelStats::default());
}

/// The cgroup connect hooks run for a UDP socket's connect() too (no packet
/// is sent): the programs count stream sockets only. The tracepoint and the
/// kprobes never see a UDP connect; the case checks that for them as well.
async fn a_udp_connect_is_not_counted(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (v4, v4_addr) = slot.v4_target(1, PORT);
    let (v6, v6_addr) = slot.v6_target();
    kernel.watch(&v4, 50).unwrap();
    kernel.watch(&v6, 51).unwrap();
    blocking(move || {
        support::udp_connect_n(v4_addr, 4);
        support::connect_n(v4_addr, 2);
        support::udp_connect_n(v6_addr, 3);
        support::connect_n(v6_addr, 1);
    })
    .await;
    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(50, &comm, 2), (51, &comm, 1)])
    );
    assert_eq!(kernel.stats().unwrap(), KernelStats::default());
}

/// A connect that succeeds, is used and closed counts once: the tracepoint
/// sees every state change of the connection (SYN_SENT, ESTABLISHED, the
/// FIN states, on both ends), and only the one to SYN_SENT is an attempt.
async fn an_accepted_connect_counts_once(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (v4, v4_addr) = slot.v4_target(1, PORT);
    let (v6, v6_addr) = slot.v6_target();
    let v4_listener = TcpListener::bind(v4_addr).unwrap();
    let v6_listener = TcpListener::bind(v6_addr).unwrap();
    kernel.watch(&v4, 60).unwrap();
    kernel.watch(&v6, 61).unwrap();
    blocking(move || {
        support::connect_accepted_n(&v4_listener, 3);
        support::connect_accepted_n(&v6_listener, 2);
    })
    .await;
    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(60, &comm, 3), (61, &comm, 2)])
    );
    assert_eq!(kernel.stats().unwrap(), KernelStats::default());
}

// One test per (mode, case); each case gets its own third octet.
//
// The kprobe tests are ignored by default: this project's machines run a
// kernel without kprobe events, and a test that cannot run there must show
// as not run, not as passed. `hack/vm-matrix` runs them (`--include-ignored`)
// under kernels that have kprobes, on x86_64 and arm64.
support::per_mode!(
    [
        cgroup: Cgroup = 101 [],
        tracepoint: Tracepoint = 102 [],
        kprobe: Kprobe = 103 [ignore = "kprobe mode: hack/vm-matrix runs it under kernels with kprobes"],
    ],
    {
    counts_each_destination_and_process_exactly = 1,
    a_thread_with_its_own_name_counts_under_the_process_name = 2,
    thread_names_when_reading_the_leader_is_off = 3,
    an_excluded_process_is_counted_apart_and_never_wakes = 4,
    wakes_once_per_idle_to_active_until_rearmed = 5,
    unwatch_stops_counting_and_forget_removes_counters = 6,
    a_full_attempts_map_counts_in_overflow = 7,
    many_threads_lose_nothing = 8,
    the_probe_read_fallback_counts_under_the_process_name_too = 9,
    a_udp_connect_is_not_counted = 10,
    an_accepted_connect_counts_once = 11,
    counts_under_the_callers_cgroup = 12,
    counts_under_the_callers_cgroup_through_the_helper = 13,
    }
);

/// The tracepoint fires for every protocol that keeps TCP's states, MPTCP
/// among them (SCTP too where it is built; DCCP before Linux 6.16); the
/// program counts only `IPPROTO_TCP` events (and only the change to
/// SYN_SENT, of the AF_INET and AF_INET6 families, the only ones this event
/// has). An MPTCP connect is counted once, by its first subflow, a TCP
/// socket. The MPTCP socket's own change to SYN_SENT comes before it has an
/// address (0.0.0.0:0 on the kernels tested): watching that too shows the
/// event is dropped for its protocol, not for want of a watched address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracepoint_mode_counts_an_mptcp_connect_once_by_its_tcp_subflow() {
    let slot = Slot {
        mode: CaptureMode::Tracepoint,
        mode_octet: 102,
        test: 12,
    };
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (dest, _) = slot.v4_target(1, PORT);
    let target = SocketAddrV4::new(slot.v4(1), PORT);
    kernel.watch(&dest, 70).unwrap();
    kernel.watch(&Destination::v4([0, 0, 0, 0], 0), 71).unwrap();
    match blocking(move || support::mptcp_connect_n(target, 4)).await {
        Ok(()) => {}
        Err(support::NoMptcp::NotBuilt) => {
            // Nor SCTP or DCCP, modules where built: TCP is the only
            // protocol this event carries here, so there is nothing to drop.
            support::not_run("this kernel has no MPTCP (CONFIG_MPTCP unset)");
            return;
        }
        Err(support::NoMptcp::Disabled) => {
            support::skip("net.mptcp.enabled=0");
            return;
        }
    }
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(70, &support::process_comm(), 4)])
    );
    assert_eq!(kernel.stats().unwrap(), KernelStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_mode_reports_which_programs_run_before_ours() {
    let Some(first) = support::start(CaptureMode::Cgroup, |_| {}) else {
        return;
    };
    let Some(second) = support::start(CaptureMode::Cgroup, |_| {}) else {
        return;
    };
    let hooks = |s: &itw_agent::capture::Started| -> Vec<&'static str> {
        s.attach_order.iter().map(|o| o.hook).collect()
    };
    assert_eq!(hooks(&first), ["connect4", "connect6"]);
    assert_eq!(hooks(&second), ["connect4", "connect6"]);
    if !support::kernel_has_preorder() {
        // Without the flag `auto` takes the pods' order (the next test).
        assert!(!first.first && !second.first, "no BPF_F_PREORDER here");
        return;
    }
    assert!(
        first.first && second.first,
        "this kernel puts programs first"
    );
    for (a, b) in first.attach_order.iter().zip(&second.attach_order) {
        assert!(a.present() && b.present(), "{a:?} {b:?}");
        // Put first (BPF_F_PREORDER | BPF_F_BEFORE), the second capture's
        // program runs before the first's, and before everything else.
        assert!(b.before_ours().is_empty(), "{b:?}");
        let now = itw_agent::capture::order::effective(
            &std::fs::File::open(itw_agent::capture::cgroup::find_root(None).unwrap().path)
                .unwrap(),
            if a.hook == "connect4" { 10 } else { 11 },
        )
        .unwrap();
        let position = |id| now.iter().position(|p| *p == id);
        assert!(
            position(b.ours) < position(a.ours),
            "{}: {} should run before {} in {now:?}",
            b.hook,
            b.ours,
            a.ours
        );
    }
}

/// Attached as before (`CGROUP_ORDER=pods`), programs of one cgroup run in
/// the order they were attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_pods_order_a_later_capture_runs_after_an_earlier_one() {
    let pods_order = |s: &mut itw_agent::capture::CaptureSettings| {
        s.cgroup_order = itw_agent::capture::CgroupOrder::Pods;
        s.pod_cgroup = itw_agent::capture::PodCgroup::None;
    };
    let Some(first) = support::start(CaptureMode::Cgroup, pods_order) else {
        return;
    };
    let Some(second) = support::start(CaptureMode::Cgroup, pods_order) else {
        return;
    };
    assert!(!first.first && !second.first);
    for (a, b) in first.attach_order.iter().zip(&second.attach_order) {
        assert!(
            b.before_ours().contains(&a.ours),
            "{}: {:?} should run before {} in {:?}",
            b.hook,
            a.ours,
            b.ours,
            b.effective
        );
        assert!(!a.before_ours().contains(&b.ours));
    }
}

/// On a kernel without kprobe events the kprobe mode is a start error that
/// says what to use instead; on one with them (hack/vm-matrix), it starts.
#[tokio::test]
async fn kprobe_mode_starts_where_the_kernel_has_kprobes_and_says_why_not_elsewhere() {
    let features = mode::detect(None);
    if features.kprobes {
        let Some(started) = support::start(CaptureMode::Kprobe, |_| {}) else {
            return;
        };
        assert_eq!(started.mode, CaptureMode::Kprobe);
        assert_eq!(
            started
                .objects
                .programs
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>(),
            ["itw_tcp_v4_connect", "itw_tcp_v6_connect"]
        );
        return;
    }
    let err = itw_agent::capture::start(&itw_agent::capture::CaptureSettings::new(
        CaptureMode::Kprobe,
    ))
    .unwrap_err();
    let others: Vec<_> = features.available().iter().map(|m| m.as_str()).collect();
    assert_eq!(
        err.to_string(),
        format!(
            "CAPTURE_MODE=kprobe: this kernel has no kprobe events (CONFIG_KPROBE_EVENTS; /sys/bus/event_source/devices/kprobe/type is missing); use {}",
            others.join(" or ")
        )
    );
}

#[tokio::test]
async fn auto_takes_cgroup_where_cgroup_v2_is_mounted() {
    let features = mode::detect(None);
    let Ok(root) = features.cgroup.clone() else {
        eprintln!("skipped: no cgroup v2 here; mode::tests cover the choice");
        return;
    };
    let Some(started) = support::start(CaptureMode::Auto, |_| {}) else {
        return;
    };
    assert_eq!(started.mode, CaptureMode::Cgroup);
    assert_eq!(
        started.attached_to,
        format!("cgroup {}", root.path.display())
    );
    assert!(
        started
            .reason
            .starts_with(&format!("cgroup v2 is mounted at {}", root.path.display())),
        "{}",
        started.reason
    );
    assert_eq!(
        started
            .objects
            .programs
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>(),
        ["itw_connect4", "itw_connect6"]
    );
}

#[test]
fn start_outside_a_tokio_runtime_is_an_error() {
    let err = itw_agent::capture::start(&itw_agent::capture::CaptureSettings::new(
        CaptureMode::Cgroup,
    ))
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("capture must start inside a tokio runtime"),
        "{err}"
    );
}
