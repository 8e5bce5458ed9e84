//! What the eBPF benches share: the connect loop they measure, CPU clocks,
//! the programs' own run time, and percentiles. Included by each bench
//! (`#[path]`), not an example of its own.

#![allow(dead_code, reason = "each bench uses a different part")]

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;

/// The time of a CPU clock (a thread's, or `CLOCK_THREAD_CPUTIME_ID` for the
/// caller's own).
pub fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The loop under test: socket, connect (refused at once: nothing may listen
/// on `target:port`), close. Returns the connects made until `stop` and the
/// thread's CPU time for them.
pub fn connect_loop(target: Ipv4Addr, port: u16, stop: &AtomicBool) -> (u64, Duration) {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(target.octets()),
        },
        sin_zero: [0; 8],
    };
    let cpu_start = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: plain system calls on a socket this loop owns.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let rc = libc::connect(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert!(rc != 0, "something listens on {target}:{port}");
            libc::close(fd);
        }
        n += 1;
    }
    (
        n,
        cpu_time(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(cpu_start),
    )
}

/// One measurement of `threads` connect loops over `seconds`.
pub struct Run {
    /// Connects per second of wall time, all threads.
    pub rate: f64,
    /// CPU time per connect of the connecting threads, in ns.
    pub cpu_ns: f64,
    pub made: u64,
}

pub fn run(target: Ipv4Addr, port: u16, threads: usize, seconds: f64) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || connect_loop(target, port, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let (made, cpu) = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .fold((0, Duration::ZERO), |(n, t), (dn, dt)| (n + dn, t + dt));
    Run {
        rate: made as f64 / start.elapsed().as_secs_f64(),
        cpu_ns: cpu.as_nanos() as f64 / made.max(1) as f64,
        made,
    }
}

/// Total (runs, run time in ns) of the programs with these ids, from the
/// kernel's BPF run-time statistics.
pub fn program_run_time(ids: &[u32]) -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded programs")?;
        if ids.contains(&info.id()) {
            total.0 += info.run_count();
            total.1 += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        }
    }
    Ok(total)
}

/// The `p` quantile (0..=1) of `values`, nearest rank; sorts them.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let at = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[at.min(values.len() - 1)]
}

/// `/proc/loadavg`'s first three figures, printed beside timings: the
/// machine's cores are shared.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}
