//! What the agent sets up in its own process: the allocator's arenas, the
//! open-files limit, and the shutdown signals; and what it asks of it: its
//! capabilities, and giving freed memory back.
//!
//! The setup is process-wide and called once, from `main`, before anything
//! else runs; nothing else in the agent may change these.

use std::future::Future;

/// glibc gives each thread that allocates an arena of its own, and memory a
/// relist decode freed on one thread is not reused by another: one arena
/// takes the agent from 52 to 38 MiB RSS with 110k destinations mapped. The
/// agent allocates little after start, so contention does not matter.
///
/// Blocks of 128 KiB and more get pages of their own, given back
/// whole when freed. glibc would otherwise raise that threshold each time
/// such a block is freed (up to 32 MiB), so the big buffers of a list (the
/// apiserver's pages, the complete map's vector, hash tables as they grow)
/// land in the heap between long-lived entries, and the holes they leave
/// stay resident.
pub fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: called first in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// See [`limit_malloc_arenas`]: 128 KiB, glibc's starting value, held fixed.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Each held connection takes two descriptors (client and upstream) for its
/// lifetime: take the hard limit the runtime grants rather than the usual
/// soft 1024.
pub fn raise_open_files_limit() {
    itw_telemetry::listener::raise_open_files_limit();
}

/// `CAP_SYS_ADMIN` (include/uapi/linux/capability.h).
pub const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process holds capability `cap` in its effective set
/// (`CapEff` of /proc/self/status).
pub fn has_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|set| set & (1 << cap) != 0)
}

/// Gives the heap's free memory back to the kernel: after a burst of held
/// connections (each with its buffer) ends, glibc with one arena would keep
/// it for good.
pub fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the programs'
/// `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct passed.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Resolves on SIGTERM or SIGINT ([`itw_telemetry::signals::stop_signal`]:
/// the handlers are installed at once, so a signal during the start stops
/// the agent once started rather than killing it mid-attach). Without
/// handlers the agent runs on, and only SIGKILL stops it.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    let stop = itw_telemetry::signals::stop_signal().map_err(|error| {
        tracing::error!(%error, "cannot listen for SIGTERM/SIGINT; stop the agent with SIGKILL");
    });
    async move {
        match stop {
            Ok(stop) => stop.await,
            Err(()) => std::future::pending().await,
        }
    }
}
