//! The attempt counters and the programs' per-CPU last-caller cache, loaded
//! and attached for real: every connect of a test runs on CPU 0 (the cache
//! is per CPU), so a caller's second attempt takes the cache's path, and
//! each way a cached entry could add to the wrong counter is tried with
//! exact counts: the same caller again, two callers taking turns, an id
//! reused after it was forgotten, every counter taken, a name excluded
//! after it was cached.
//!
//! Addresses 127.<111 cgroup | 112 tracepoint>.<test>.x, apart from
//! capture_bpf's. Needs root; see capture_support for skipping.

mod capture_support;

use std::{
    collections::BTreeMap,
    ffi::CStr,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use capture_support as support;
use itw_agent::capture::{CaptureMode, KernelStats, comm_bytes};
use itw_common::Destination;

const PORT: u16 = 8431;

#[derive(Clone, Copy)]
struct Slot {
    mode: CaptureMode,
    mode_octet: u8,
    test: u8,
}

impl Slot {
    fn target(self, host: u8) -> (Destination, SocketAddrV4) {
        let ip = Ipv4Addr::new(127, self.mode_octet, self.test, host);
        (
            Destination::v4(ip.octets(), PORT),
            SocketAddrV4::new(ip, PORT),
        )
    }
}

fn expected(entries: &[(u32, &str, u64)]) -> BTreeMap<(u32, String), u64> {
    entries
        .iter()
        .map(|(id, comm, n)| ((*id, (*comm).to_owned()), *n))
        .collect()
}

/// Runs `f` on a thread of its own pinned to CPU 0 (children it forks
/// inherit the pinning), off the runtime's threads.
async fn on_cpu0<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            // SAFETY: a cpu_set_t is plain data; the call reads it only.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
                assert_eq!(
                    rc,
                    0,
                    "sched_setaffinity: {}",
                    std::io::Error::last_os_error()
                );
            }
            f()
        })
        .join()
        .expect("the pinned connect thread panicked")
    })
    .await
    .expect("the connect task panicked")
}

fn connect(target: SocketAddrV4, n: u64) {
    support::connect_n(SocketAddr::V4(target), n);
}

fn connect_as(name: &'static CStr, target: SocketAddrV4, n: u32) {
    support::connect_from_process(name, target, n);
}

/// The same caller again and again: the first attempt takes a counter,
/// the rest go to it through the cache.
async fn the_same_caller_again_counts_on_one_counter(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (dest, target) = slot.target(1);
    kernel.watch(&dest, 3).unwrap();
    on_cpu0(move || {
        connect(target, 1);
        connect(target, 6);
    })
    .await;
    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(3, &comm, 7)])
    );
    assert_eq!(kernel.stats().unwrap(), KernelStats::default());
}

/// Two callers (process names) taking turns on one CPU, to one destination
/// and so one cache entry: each replaces the other's entry, and each
/// attempt lands on its own caller's counter.
async fn two_callers_taking_turns_are_each_counted_exactly(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (dest, target) = slot.target(1);
    kernel.watch(&dest, 4).unwrap();
    on_cpu0(move || {
        for _ in 0..4 {
            connect(target, 2);
            connect_as(c"turn-b", target, 3);
        }
        connect(target, 1);
    })
    .await;
    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(4, &comm, 9), (4, "turn-b", 12)])
    );
}

/// An id forgotten and given to another destination: the cache still holds
/// the old life's entry (same id, same caller) with a counter that has been
/// given back, zeroed. The old caller's attempts to the new destination must
/// not match that entry (they would add to a counter no key has, and the
/// next key to take it would start with them): with one counter in all,
/// they take it under their own key, and the next caller overflows.
async fn a_reused_id_counts_nothing_on_its_old_counter(slot: Slot) {
    let Some(started) = support::start(slot.mode, |s| s.max_attempt_counters = 1) else {
        return;
    };
    let mut kernel = started.kernel;
    let (old, old_target) = slot.target(1);
    let (new, new_target) = slot.target(2);
    kernel.watch(&old, 5).unwrap();
    on_cpu0(move || connect(old_target, 3)).await;
    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(5, &comm, 3)])
    );
    // As the agent retires an id: unwatched, read, forgotten, read again
    // (which gives its counter back, zeroed), then reused.
    kernel.unwatch(&old).unwrap();
    support::read(kernel.as_mut());
    kernel.forget(&[5]).unwrap();
    assert_eq!(support::attempts(kernel.as_mut()), BTreeMap::new());
    kernel.watch(&new, 5).unwrap();
    on_cpu0(move || {
        connect(new_target, 2);
        connect(old_target, 4);
        connect_as(c"second-new", new_target, 1);
    })
    .await;
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(5, &comm, 2)])
    );
    assert_eq!(support::read(kernel.as_mut()).overflow, vec![(5, 1)]);
    assert_eq!(kernel.stats().unwrap().attempts_map_full, 1);
}

/// Every counter taken: a new caller's attempts go to the destination's
/// overflow counter, each one (none is cached), while cached callers keep
/// counting; a forgotten destination's counters are free again only after
/// the next read (their quarantine).
async fn with_every_counter_taken_new_callers_overflow_exactly(slot: Slot) {
    let Some(started) = support::start(slot.mode, |s| s.max_attempt_counters = 2) else {
        return;
    };
    let mut kernel = started.kernel;
    let (a, a_target) = slot.target(1);
    let (b, b_target) = slot.target(2);
    kernel.watch(&a, 40).unwrap();
    kernel.watch(&b, 41).unwrap();
    on_cpu0(move || {
        connect(a_target, 1);
        connect(b_target, 1);
        connect_as(c"ovf-new", a_target, 5);
        connect(a_target, 2);
    })
    .await;
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

    kernel.unwatch(&b).unwrap();
    kernel.forget(&[41]).unwrap();
    // Quarantined: still taken until the next read.
    on_cpu0(move || connect_as(c"ovf-new", a_target, 2)).await;
    assert_eq!(support::read(kernel.as_mut()).overflow, vec![(40, 7)]);
    // That read gave it back.
    on_cpu0(move || connect_as(c"ovf-new", a_target, 3)).await;
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(40, &comm, 3), (40, "ovf-new", 3)])
    );
    assert_eq!(kernel.stats().unwrap().attempts_map_full, 7);
}

/// A caller cached before its name was excluded: its next attempts are
/// filtered, not added to its cached counter.
async fn a_name_excluded_after_it_was_cached_is_filtered(slot: Slot) {
    let Some(started) = support::start(slot.mode, |_| {}) else {
        return;
    };
    let mut kernel = started.kernel;
    let (dest, target) = slot.target(1);
    kernel.watch(&dest, 6).unwrap();
    on_cpu0(move || connect_as(c"soon-excluded", target, 2)).await;
    kernel.set_excluded(&[comm_bytes("soon-excluded")]).unwrap();
    on_cpu0(move || connect_as(c"soon-excluded", target, 3)).await;
    let counts = support::read(kernel.as_mut());
    let filtered: Vec<_> = counts
        .filtered
        .iter()
        .map(|(c, n)| (support::comm_str(c), *n))
        .collect();
    assert_eq!(filtered, vec![("soon-excluded".to_owned(), 3)]);
    assert_eq!(
        support::attempts(kernel.as_mut()),
        expected(&[(6, "soon-excluded", 2)])
    );
}

support::per_mode!(
    [cgroup: Cgroup = 111 [], tracepoint: Tracepoint = 112 []],
    {
    the_same_caller_again_counts_on_one_counter = 1,
    two_callers_taking_turns_are_each_counted_exactly = 2,
    a_reused_id_counts_nothing_on_its_old_counter = 3,
    with_every_counter_taken_new_callers_overflow_exactly = 4,
    a_name_excluded_after_it_was_cached_is_filtered = 5,
    }
);
