//! What the capture programs cost a caller's `connect()`, and proof that they
//! lose no count at the fastest rate this machine connects (`hack/bench
//! capture`; as root, release build).
//!
//! 1. One thread connects in a loop (nonblocking socket, connect to a closed
//!    loopback port, close) with nothing attached, then with each available
//!    mode attached: once to a watched destination (the full counting path)
//!    and once to an unwatched one (what every other connect on the node
//!    pays: one map lookup). Rounds interleave the configurations, each round
//!    starting one configuration later, so drift in the machine's load and
//!    the cost of the previous teardown spread over all of them; the median
//!    round counts.
//!    Each is measured twice: connects per second of wall time, and the
//!    loop thread's own CPU time per connect (user + kernel), which other
//!    work on a busy machine disturbs far less.
//! 2. The programs' own run time per run, from the kernel's BPF run-time
//!    statistics (enabled for this step only), beside the floor of their
//!    hook (`capture-floor.o`): an empty program and a minimal counter (one
//!    hash lookup of the destination, one per-CPU array increment). Each
//!    program runs alone on the hook, rounds interleaved; the goal is the
//!    agent's program within 1.2x the minimal counter (cgroup mode) or 2x
//!    (tracepoint mode), for a watched destination.
//! 3. Several threads connect as fast as they can with each mode attached;
//!    the kernel's count must equal the connects made, exactly.
//!
//! Usage: `capture_bench [--seconds S] [--rounds R] [--threads N]
//! [--max-destinations N] [--thread-comm] [--run-time-only]` (the two before
//! the last change the agent's defaults: watched-map size, and thread names
//! instead of the process's; the last runs step 2 alone).
//! Connects go to 127.88.0.0/16 only.

#[path = "bench_support/mod.rs"]
mod bench_support;
#[path = "bench_support/dest_table.rs"]
mod dest_table;
#[path = "bench_support/floor.rs"]
mod floor;

use std::net::Ipv4Addr;

use anyhow::{Context, bail};
use bench_support::{loadavg, percentile, program_run_time};
use itw_agent::capture::{self, CaptureMode, CaptureSettings, KernelCounts, mode};
use itw_common::Destination;

const PORT: u16 = 9;

struct Options {
    seconds: f64,
    rounds: usize,
    threads: usize,
    /// Only the programs' run time beside their floor (step 2).
    run_time_only: bool,
    settings: CaptureSettings,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        seconds: 2.0,
        rounds: 5,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        run_time_only: false,
        settings: CaptureSettings::new(CaptureMode::Auto),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--thread-comm" {
            options.settings.comm_from_leader = false;
            continue;
        }
        if arg == "--run-time-only" {
            options.run_time_only = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--seconds" => options.seconds = value.parse().context("--seconds")?,
            "--rounds" => options.rounds = value.parse().context("--rounds")?,
            "--threads" => options.threads = value.parse().context("--threads")?,
            "--max-destinations" => {
                options.settings.max_destinations = value.parse().context("--max-destinations")?;
            }
            _ => bail!(
                "unknown option {arg}; use --seconds, --rounds, --threads, --max-destinations, --thread-comm, --run-time-only"
            ),
        }
    }
    if options.rounds == 0 || options.threads == 0 || options.seconds <= 0.0 {
        bail!("--seconds, --rounds and --threads must be positive");
    }
    Ok(options)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Bare,
    Watched(CaptureMode),
    Unwatched(CaptureMode),
}

impl Config {
    fn label(self) -> String {
        match self {
            Self::Bare => "nothing attached".to_owned(),
            Self::Watched(m) => format!("{m}, watched destination (counted)"),
            Self::Unwatched(m) => format!("{m}, other destination (lookup miss)"),
        }
    }
}

/// The attempts the kernel counted, summed over keys.
fn counted(kernel: &mut dyn capture::Kernel) -> anyhow::Result<u64> {
    let mut counts = KernelCounts::default();
    kernel.read(&mut counts)?;
    let overflow: u64 = counts.overflow.iter().map(|(_, n)| n).sum();
    Ok(counts.attempts.iter().map(|(_, n)| n).sum::<u64>() + overflow)
}

fn settings(options: &Options, mode: CaptureMode) -> CaptureSettings {
    CaptureSettings {
        mode,
        ..options.settings.clone()
    }
}

fn median(values: &mut [f64]) -> f64 {
    percentile(values, 0.5)
}

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _guard = runtime.enter();

    let features = mode::detect(None);
    let modes = features.available();
    let default_mode = mode::choose(CaptureMode::Auto, &features)?.mode();
    println!(
        "capture bench: modes here {:?}, default {default_mode}; {} rounds of {}s per configuration, 1 thread",
        modes.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        options.rounds,
        options.seconds
    );

    let watched = Ipv4Addr::new(127, 88, 0, 1);
    let other = Ipv4Addr::new(127, 88, 0, 2);
    if !options.run_time_only {
        loop_cost(&options, &modes, watched, other)?;
    }
    run_time(&options, &modes, watched, other)?;
    if !options.run_time_only {
        fastest_rate(&options, &modes, watched)?;
    }
    Ok(())
}

/// Step 1: the connect loop's speed and CPU per connect, bare and with each
/// mode attached.
fn loop_cost(
    options: &Options,
    modes: &[CaptureMode],
    watched: Ipv4Addr,
    other: Ipv4Addr,
) -> anyhow::Result<()> {
    let mut configs = vec![Config::Bare];
    for m in modes {
        configs.push(Config::Watched(*m));
        configs.push(Config::Unwatched(*m));
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..options.rounds {
        // Each round starts at a different configuration (rotating), so none
        // is always measured first, just after the previous round's
        // teardown, or always last.
        let order = (0..configs.len()).map(|k| (k + round) % configs.len());
        for i in order {
            let config = &configs[i];
            let (measured, exact) = match *config {
                Config::Bare => (bench_support::run(watched, PORT, 1, options.seconds), true),
                Config::Watched(m) | Config::Unwatched(m) => {
                    let started = capture::start(&settings(options, m))
                        .with_context(|| format!("starting {m}"))?;
                    let mut kernel = started.kernel;
                    kernel.watch(&Destination::v4(watched.octets(), PORT), 1)?;
                    let target = if matches!(config, Config::Watched(_)) {
                        watched
                    } else {
                        other
                    };
                    let measured = bench_support::run(target, PORT, 1, options.seconds);
                    let expected = if target == watched { measured.made } else { 0 };
                    let exact = counted(kernel.as_mut())? == expected;
                    (measured, exact)
                }
            };
            if !exact {
                bail!(
                    "round {round}, {}: the kernel's count is not the connects made",
                    config.label()
                );
            }
            rates[i].push(measured.rate);
            cpu[i].push(measured.cpu_ns);
        }
    }

    let bare_rate = median(&mut rates[0].clone());
    let bare_cpu = median(&mut cpu[0].clone());
    println!(
        "\n{:<44} {:>11} {:>8} {:>11} {:>11} {:>8}",
        "configuration", "connects/s", "vs bare", "CPU ns/conn", "ns added", "vs bare"
    );
    for (i, config) in configs.iter().enumerate() {
        let rate = median(&mut rates[i].clone());
        let cpu_ns = median(&mut cpu[i].clone());
        println!(
            "{:<44} {:>11.0} {:>7.1}% {:>11.0} {:>11.0} {:>7.1}%",
            config.label(),
            rate,
            100.0 * rate / bare_rate,
            cpu_ns,
            cpu_ns - bare_cpu,
            // Speed relative to bare, by CPU cost per connect.
            100.0 * bare_cpu / cpu_ns,
        );
    }
    println!("per-round CPU ns per connect:");
    for (config, values) in configs.iter().zip(&cpu) {
        let list: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
        println!("  {:<42} {}", config.label(), list.join(" "));
    }

    Ok(())
}

/// Step 2: each program's run time per run beside its hook's floor.
fn run_time(
    options: &Options,
    modes: &[CaptureMode],
    watched: Ipv4Addr,
    other: Ipv4Addr,
) -> anyhow::Result<()> {
    println!(
        "\nprogram run time per run (kernel BPF run-time statistics), each program alone on its hook, rounds interleaved; loadavg {}:",
        loadavg()
    );
    for m in modes {
        if matches!(m, CaptureMode::Cgroup | CaptureMode::Tracepoint) {
            let runs = floor::measure(
                *m,
                &settings(options, *m),
                watched,
                other,
                PORT,
                options.rounds,
                options.seconds,
            )?;
            runs.print();
            continue;
        }
        // No floor programs for this hook: the agent's programs alone.
        for (label, target) in [("watched", watched), ("other destination", other)] {
            let started = capture::start(&settings(options, *m))?;
            let ids: Vec<u32> = started.objects.programs.iter().map(|(_, id)| *id).collect();
            let mut kernel = started.kernel;
            kernel.watch(&Destination::v4(watched.octets(), PORT), 1)?;
            let before = program_run_time(&ids)?;
            let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enabling BPF run-time statistics")?;
            let measured = bench_support::run(target, PORT, 1, options.seconds);
            drop(stats_fd);
            let after = program_run_time(&ids)?;
            let (runs, ns) = (after.0 - before.0, after.1 - before.1);
            println!(
                "  {:<42} {:>6.0} ns per connect, {:>4.0} ns per program run ({runs} runs)",
                format!("{m}, {label}"),
                ns as f64 / measured.made.max(1) as f64,
                ns as f64 / runs.max(1) as f64,
            );
        }
    }
    println!("  (a tracepoint program runs on every TCP state change: twice per refused connect)");
    println!("loadavg after: {}", loadavg());

    Ok(())
}

/// Step 3: the fastest rate, and the kernel's count exact at it.
fn fastest_rate(options: &Options, modes: &[CaptureMode], watched: Ipv4Addr) -> anyhow::Result<()> {
    println!(
        "\nfastest rate, {} threads, {}s each, exact count check:",
        options.threads,
        options.seconds * 2.0
    );
    let bare = bench_support::run(watched, PORT, options.threads, options.seconds * 2.0);
    println!(
        "  {:<42} {:>10.0} connects/s",
        "nothing attached", bare.rate
    );
    for m in modes {
        let started = capture::start(&settings(options, *m))?;
        let mut kernel = started.kernel;
        kernel.watch(&Destination::v4(watched.octets(), PORT), 1)?;
        let measured = bench_support::run(watched, PORT, options.threads, options.seconds * 2.0);
        let stats = kernel.stats()?;
        let got = counted(kernel.as_mut())?;
        println!(
            "  {:<42} {:>10.0} connects/s ({:.1}% of bare), {} made, {got} counted, lost {}, map-full {}",
            format!("{m}, watched"),
            measured.rate,
            100.0 * measured.rate / bare.rate,
            measured.made,
            measured.made.saturating_sub(got),
            stats.attempts_map_full + stats.overflow_map_full
        );
        if got != measured.made {
            bail!("{m}: counted {got} of {} connects", measured.made);
        }
    }
    Ok(())
}
