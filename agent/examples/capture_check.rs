//! Loads each capture mode given on the command line, makes a known number of
//! connects to watched loopback destinations and prints what the kernel
//! counted, one line per counter, for `hack/vm-kprobe` to compare:
//!
//! ```text
//! capture-check mode=kprobe comm_source=leader dest=v4 count=50 comm_count=50 expected=50
//! ```
//!
//! `comm_count` is the part counted under the process's name (the connects
//! come from a thread with a name of its own).
//!
//! Usage: `capture_check [--connects N] MODE...` (as root). Connects go to
//! 127.77.x.y and ::1 only, where nothing listens.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, bail};
use itw_agent::capture::{self, CaptureMode, CaptureSettings, KernelCounts};
use itw_common::Destination;

/// The destinations, each reached in its own way.
struct Case {
    label: &'static str,
    dest_id: u32,
    /// The key the kernel counts it under.
    key: Destination,
    /// Where the connect goes.
    target: SocketAddr,
}

fn cases(port_base: u16) -> [Case; 3] {
    let v4 = Ipv4Addr::new(127, 77, 0, 1);
    let mapped = Ipv4Addr::new(127, 77, 0, 2);
    [
        Case {
            label: "v4",
            dest_id: 1,
            key: Destination::v4(v4.octets(), port_base),
            target: SocketAddr::new(IpAddr::V4(v4), port_base),
        },
        Case {
            label: "v6",
            dest_id: 2,
            key: Destination::new(Ipv6Addr::LOCALHOST.octets(), port_base + 1),
            target: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port_base + 1),
        },
        Case {
            // From an AF_INET6 socket; counted under the IPv4 key.
            label: "v4-mapped",
            dest_id: 3,
            key: Destination::v4(mapped.octets(), port_base + 2),
            target: SocketAddr::new(IpAddr::V6(mapped.to_ipv6_mapped()), port_base + 2),
        },
    ]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    let mut connects = 50u64;
    let mut modes = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--connects" {
            connects = args
                .next()
                .context("--connects needs a number")?
                .parse()
                .context("--connects")?;
            continue;
        }
        modes.push(match arg.as_str() {
            "cgroup" => CaptureMode::Cgroup,
            "kprobe" => CaptureMode::Kprobe,
            "tracepoint" => CaptureMode::Tracepoint,
            other => bail!("unknown mode {other:?}: use cgroup, kprobe or tracepoint"),
        });
    }
    if modes.is_empty() {
        bail!("usage: capture_check [--connects N] MODE...");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut failed = false;
    for (i, mode) in modes.into_iter().enumerate() {
        // Each mode its own ports, so a mode's counters cannot see another's.
        let port_base = 41_000 + 10 * u16::try_from(i)?;
        failed |= !runtime.block_on(check(mode, connects, port_base))?;
    }
    if failed {
        bail!("some counts were wrong");
    }
    Ok(())
}

async fn check(mode: CaptureMode, connects: u64, port_base: u16) -> anyhow::Result<bool> {
    let started = capture::start(&CaptureSettings::new(mode))
        .with_context(|| format!("starting capture mode {mode}"))?;
    if let capture::CommSource::Thread { reason } = &started.comm_source {
        println!("capture-check mode={mode} thread names because: {reason}");
    }
    let mut kernel = started.kernel;
    let mut wakes = kernel.take_wakes().context("wakes already taken")?;
    let cases = cases(port_base);
    for case in &cases {
        kernel.watch(&case.key, case.dest_id)?;
    }
    // From a thread with its own name: counted under the process's name
    // when the programs read the thread-group leader's.
    let targets: Vec<SocketAddr> = cases.iter().map(|c| c.target).collect();
    std::thread::Builder::new()
        .name("itw-worker".to_owned())
        .spawn(move || {
            for target in targets {
                for _ in 0..connects {
                    // Refused (nothing listens); the attempt is what counts.
                    let _refused = TcpStream::connect_timeout(&target, Duration::from_secs(1));
                }
            }
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?;
    let mut counts = KernelCounts::default();
    kernel.read(&mut counts)?;
    let process = std::fs::read_to_string("/proc/self/comm")?;
    let comm = match started.comm_source {
        capture::CommSource::Leader { .. } => process.trim_end(),
        capture::CommSource::Thread { .. } => "itw-worker",
    };
    let mut ok = true;
    for case in &cases {
        let counted: u64 = counts
            .attempts
            .iter()
            .filter(|(k, _)| k.dest_id == case.dest_id)
            .map(|(_, n)| n)
            .sum();
        let under_comm: u64 = counts
            .attempts
            .iter()
            .filter(|(k, _)| k.dest_id == case.dest_id && k.comm == capture::comm_bytes(comm))
            .map(|(_, n)| n)
            .sum();
        ok &= counted == connects && under_comm == connects;
        println!(
            "capture-check mode={mode} comm_source={} dest={} count={counted} comm_count={under_comm} expected={connects}",
            started.comm_source.as_str(),
            case.label
        );
    }
    // Each destination was armed: exactly one wake each.
    let mut woke = Vec::new();
    while let Ok(Some(wake)) = tokio::time::timeout(Duration::from_millis(500), wakes.recv()).await
    {
        let id = wake.key.dest_id;
        woke.push(id);
    }
    woke.sort_unstable();
    println!("capture-check mode={mode} wakes={woke:?} expected=[1, 2, 3]");
    ok &= woke == [1, 2, 3];
    let stats = kernel.stats()?;
    println!(
        "capture-check mode={mode} attempts_map_full={} overflow_map_full={} wakes_dropped={} leader_comm_failed={}",
        stats.attempts_map_full,
        stats.overflow_map_full,
        stats.wakes_dropped,
        stats.leader_comm_failed
    );
    println!(
        "capture-check mode={mode} result={}",
        if ok { "ok" } else { "FAILED" }
    );
    Ok(ok)
}
