//! Activation latency, side by side: connect() on this node -> `StreamIsActive:
//! true` at a KEDA-role client (the direct path), first with only the caller,
//! the agent, the scaler and the KEDA-role streams on the machine (the goal's
//! conditions), then again with a real Prometheus scraping the agent every
//! second and the seed's query polled every 100 ms alongside, which also
//! measures the seed's path for the same first activations (the best that
//! path can do; KEDA's default polling adds up to 30 s more). Then the
//! agent's CPU and memory at 10k connects/s.
//!
//! Run with `hack/bench activation` (root: it loads eBPF programs).
//! Options: --activations N (default 1000), --services N (default 200),
//! --timeline (the binaries log each hand-off, and the phases of every
//! activation are summarised beside the timelines of the median, the p99 and
//! the slowest; the logging costs each step a few microseconds, so run
//! without it for the figures themselves), --stamps FILE (with --timeline:
//! every activation's caller stamps and every timeline event, one a line, to
//! line up with a scheduler trace such as `perf record -k mono -e 'sched:*'`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use itw_e2e::{
    system::*,
    timeline::{self, Activation},
};
use itw_telemetry::timeline::monotonic_us;
use parking_lot::Mutex;
use tokio::sync::mpsc;

const NS: &str = "bench";
const WINDOW: &str = "1s";

fn option(args: &[String], name: &str, default: usize) -> usize {
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn service_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 102, (i / 250) as u8, (i % 250 + 1) as u8], 8080))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(label: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p90, p99, max) = (
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        *samples.last().expect("samples"),
    );
    println!(
        "{label:<44} n={:<5} p50={:>10.3?} p90={:>10.3?} p99={:>10.3?} max={:>10.3?}",
        samples.len(),
        p50,
        p90,
        p99,
        max
    );
    (p50, p99)
}

/// Process CPU seconds (all threads, nanosecond precision from schedstat)
/// and RSS / peak RSS in KiB.
fn usage(pid: i32) -> (f64, u64, u64) {
    let mut cpu_ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            cpu_ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu_ns as f64 / 1e9, kib("VmRSS:"), kib("VmHWM:"))
}

/// Where the direct path's time goes: each phase's spread over every
/// activation, then the median, p99 and slowest activations step by step.
fn print_timeline(
    stamps: &[(u64, u64)],
    agent: &Agent,
    scaler: &Scaler,
    dump: Option<&std::path::Path>,
) {
    let mut events = timeline::events("agent", &agent.proc.log());
    events.extend(timeline::events("scaler", &scaler.proc.log()));
    events.sort_by_key(|e| e.t_us);
    if let Some(path) = dump {
        dump_stamps(path, stamps, &events);
    }
    let mut activations: Vec<Activation> = stamps
        .iter()
        .map(|&(connect, received)| Activation::new(connect, received, &events))
        .collect();
    activations.sort_by_key(|a| a.received_us - a.connect_us);
    println!();
    println!(
        "timeline (instrumented run): phases over {} activations, slowest p99 first",
        activations.len()
    );
    for (label, n, p50, p99, max) in timeline::phase_summary(&activations) {
        println!("  n={n:<5} p50={p50:>6} us p99={p99:>6} us max={max:>6} us  {label}");
    }
    let n = activations.len();
    for (name, index) in [
        ("median", n / 2),
        ("p99", (n - 1) * 99 / 100),
        ("slowest", n - 1),
    ] {
        if let Some(activation) = activations.get(index) {
            println!("the {name} activation:");
            print!("{}", activation.render(&events));
        }
    }
}

/// Writes `activation <connect_us> <received_us>` and `event <t_us>
/// <process> <message>` lines, CLOCK_MONOTONIC microseconds.
fn dump_stamps(path: &std::path::Path, stamps: &[(u64, u64)], events: &[timeline::Event]) {
    let mut text = String::new();
    for (connect, received) in stamps {
        text.push_str(&format!("activation {connect} {received}\n"));
    }
    for e in events {
        text.push_str(&format!("event {} {} {}\n", e.t_us, e.process, e.message));
    }
    match std::fs::write(path, text) {
        Ok(()) => println!("stamps written to {}", path.display()),
        Err(error) => eprintln!("--stamps {}: {error}", path.display()),
    }
}

/// What a direct-path run measured: each activation's time, the caller's
/// monotonic stamps around it, and each service's first connect.
struct DirectRun {
    times: Vec<Duration>,
    stamps: Vec<(u64, u64)>,
    first_connect: Vec<Option<Instant>>,
}

/// The KEDA-role side: one StreamIsActive per service, as KEDA holds one
/// per external-push trigger, each push delivered with when it arrived.
struct Streams {
    state: Arc<Mutex<Vec<Option<bool>>>>,
    events: mpsc::UnboundedReceiver<(usize, bool, Instant, u64)>,
}

impl Streams {
    async fn open(scaler: &Scaler, services: usize) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let state: Arc<Mutex<Vec<Option<bool>>>> = Arc::new(Mutex::new(vec![None; services]));
        for i in 0..services {
            let mut keda = scaler.keda().await;
            let object = scaled_object(NS, &format!("svc-{i:05}"), &[("window", WINDOW)]);
            let mut stream = keda
                .stream_is_active(object)
                .await
                .expect("StreamIsActive")
                .into_inner();
            let tx = events_tx.clone();
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            let (at, at_us) = (Instant::now(), monotonic_us());
                            state.lock()[i] = Some(message.result);
                            let _ = tx.send((i, message.result, at, at_us));
                        }
                        end => {
                            eprintln!("StreamIsActive of svc-{i:05} ended: {end:?}");
                            return;
                        }
                    }
                }
            });
        }
        let streams = Self { state, events };
        eventually(
            "every stream's first state",
            Duration::from_secs(20),
            || async { streams.all(false).then_some(()) },
        )
        .await;
        streams
    }

    fn all(&self, active: bool) -> bool {
        self.state.lock().iter().all(|s| *s == Some(active))
    }

    /// Each activation on a service that is idle again (its window passed
    /// and the stream said false; the agent re-arms it within two ticks,
    /// which the spacing leaves).
    async fn direct(
        &mut self,
        activations: usize,
        services: usize,
        agent: &Agent,
        scaler: &Scaler,
    ) -> DirectRun {
        let spacing = Duration::from_millis((3000 / services as u64).max(5));
        let mut run = DirectRun {
            times: Vec::with_capacity(activations),
            stamps: Vec::with_capacity(activations),
            first_connect: vec![None; services],
        };
        let started = Instant::now();
        for n in 0..activations {
            let i = n % services;
            eventually(
                "the service to be idle again",
                Duration::from_secs(30),
                || {
                    let state = self.state.clone();
                    async move { (state.lock()[i] == Some(false)).then_some(()) }
                },
            )
            .await;
            while let Ok(_stale) = self.events.try_recv() {}
            let addr = service_addr(i);
            // A refused loopback connect returns in microseconds: made
            // inline, like a caller's connect(), with no thread hand-off in
            // the timing.
            let (t0, t0_us) = (Instant::now(), monotonic_us());
            connect_refused(addr);
            run.first_connect[i].get_or_insert(t0);
            let (at, at_us) = loop {
                match tokio::time::timeout(Duration::from_secs(10), self.events.recv()).await {
                    Ok(Some((j, true, at, at_us))) if j == i => break (at, at_us),
                    Ok(Some(_)) => continue,
                    other => {
                        let service = format!("svc-{i:05}");
                        let mut keda = scaler.keda().await;
                        let object = scaled_object(NS, &service, &[("window", WINDOW)]);
                        panic!(
                            "activation {n} of {service}: no true within 10 s ({other:?}); attempts at the agent {}, at the scaler {}, IsActive now {}\n--- agent log:\n{}\n--- scaler log:\n{}",
                            agent.attempts(NS, &service).await,
                            scaler.attempts(NS, &service).await,
                            is_active(&mut keda, &object).await,
                            agent.proc.log(),
                            scaler.proc.log()
                        )
                    }
                }
            };
            run.times.push(at - t0);
            run.stamps.push((t0_us, at_us));
            tokio::time::sleep(spacing.saturating_sub(t0.elapsed())).await;
        }
        println!("{activations} activations in {:.1?}", started.elapsed());
        run
    }
}

/// Renames the calling thread (the main thread: the direct path connects
/// from it), which is the process name the agent counts its connects under.
fn name_this_thread(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // (longer ones are cut) and changes only the calling thread's name.
    let renamed = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    assert_eq!(renamed, 0, "prctl(PR_SET_NAME)");
}

/// The seed's path for the same kind of event: a real Prometheus scraping
/// the agent every second, the seed's query polled every 100 ms; while it
/// runs, the direct path again, sharing the cores with it.
async fn seed_path(
    activations: usize,
    services: usize,
    agent: &Agent,
    scaler: &Scaler,
    streams: &mut Streams,
    direct_p50: Duration,
    direct_p99: Duration,
) {
    let prometheus_dir = TempDir::new("prometheus");
    let web = loopback(free_port());
    let config = prometheus_dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: itw-agent\n    static_configs:\n      - targets: ['{}']\n",
            agent.metrics
        ),
    )
    .expect("prometheus config");
    let _prometheus = Proc::spawn_with_args(
        "prometheus",
        std::path::Path::new("/usr/bin/prometheus"),
        &[
            format!("--config.file={}", config.display()),
            format!(
                "--storage.tsdb.path={}",
                prometheus_dir.path().join("data").display()
            ),
            format!("--web.listen-address={web}"),
            "--log.level=warn".into(),
        ],
        &[],
    );
    let query = move |q: String| async move {
        let url =
            reqwest::Url::parse_with_params(&format!("http://{web}/api/v1/query"), &[("query", q)])
                .ok()?;
        let body = get(url.as_str()).await?;
        serde_json::from_str::<serde_json::Value>(&body).ok()
    };
    // Two scrapes before the first connect: every count the direct run left
    // is then already flat in Prometheus, so rate() > 0 means a new attempt.
    eventually(
        "prometheus to scrape the agent twice",
        Duration::from_secs(60),
        || async move {
            let v = query("count_over_time(up{job=\"itw-agent\"}[1m])".into()).await?;
            (v["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()?
                >= 2.0)
                .then_some(())
        },
    )
    .await;

    // The first time each service's rate() goes above 0.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let poller = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let q = format!(
                "sum by (destination_service) (rate(internal_tcp_attempts_total{{destination_namespace=\"{NS}\"}}[1m])) > 0"
            );
            loop {
                if let Some(v) = query(q.clone()).await {
                    let now = Instant::now();
                    for r in v["data"]["result"].as_array().into_iter().flatten() {
                        if let Some(svc) = r["metric"]["destination_service"].as_str() {
                            seen.lock().entry(svc.to_owned()).or_insert(now);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The seed's first activation is a caller's first connect: a series
    // Prometheus has never seen. This phase's connects come from a process
    // name the first phase did not use, so each service's series is new,
    // as it was for the seed.
    name_this_thread(c"seed-caller");
    let run = streams.direct(activations, services, agent, scaler).await;
    summary("direct, with that Prometheus alongside", run.times);

    // Let the slowest first activation reach the seed query.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().len() < services && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    poller.abort();
    let stopped = Instant::now();
    let seen = seen.lock().clone();
    // A first activation the seed query never showed is charged with its
    // whole wait (until the poll stopped), a lower bound, rather than
    // dropped: dropping the slowest would flatter the seed path.
    let mut missed = 0usize;
    let seed: Vec<Duration> = (0..services)
        .filter_map(|i| {
            let t0 = run.first_connect[i]?;
            Some(match seen.get(&format!("svc-{i:05}")) {
                Some(at) => *at - t0,
                None => {
                    missed += 1;
                    stopped - t0
                }
            })
        })
        .collect();
    let (seed_p50, seed_p99) = summary(
        "seed: connect() -> rate() > 0 (1s scrape, 100ms poll)",
        seed,
    );
    let at_least = if missed > 0 {
        println!(
            "  ({missed} first activations never showed in the seed query within 30 s; each is counted as its wait until the poll stopped, so the seed figures above and the ratios below are lower bounds)"
        );
        ">="
    } else {
        ""
    };
    println!(
        "seed / direct (alone): p50 x{at_least}{:.0}, p99 x{at_least}{:.0}",
        seed_p50.as_secs_f64() / direct_p50.as_secs_f64(),
        seed_p99.as_secs_f64() / direct_p99.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !bpf_available("activation bench") {
        std::process::exit(1);
    }
    let activations = option(&args, "--activations", 1000);
    let services = option(&args, "--services", 200).clamp(10, 60_000);
    let prometheus_available = std::path::Path::new("/usr/bin/prometheus").exists();
    let with_timeline = args.iter().any(|a| a == "--timeline");
    let stamps_file = args
        .windows(2)
        .find(|w| w[0] == "--stamps")
        .map(|w| std::path::PathBuf::from(&w[1]));
    // Logging each hand-off costs the path a few microseconds per step, so
    // the figures come from runs without it.
    let log_env: Vec<(&str, String)> = if with_timeline {
        timeline::log_env().to_vec()
    } else {
        Vec::new()
    };
    // The scaler's thread settings from the bench's environment, so they
    // can be compared (the scaler starts with a cleared one).
    let mut scaler_env = log_env.clone();
    for setting in ["INGEST_THREADS", "TOKIO_WORKER_THREADS"] {
        if let Ok(threads) = std::env::var(setting) {
            println!("scaler {setting}={threads}");
            scaler_env.push((setting, threads));
        }
    }
    // Only the goal's figure (connect -> StreamIsActive), for alternating
    // runs of two builds.
    let direct_only = args.iter().any(|a| a == "--direct-only");

    let mut map = String::from("services:\n");
    for i in 0..=services {
        let a = service_addr(i);
        map.push_str(&format!(
            "  - {{namespace: {NS}, name: svc-{i:05}, clusterIPs: [{}], ports: [{}]}}\n",
            a.ip(),
            a.port()
        ));
    }
    let scaler = Scaler::start_on(
        "scaler",
        loopback(free_port()),
        loopback(free_port()),
        &scaler_env,
    )
    .await;
    let agent = Agent::start("agent", &map, &[scaler.grpc], &log_env).await;
    println!(
        "itw-scaler pid {} and itw-agent pid {} on loopback (the bench: pid {}); {services} services, window {WINDOW}, agent tick 1s",
        scaler.proc.pid(),
        agent.proc.pid(),
        std::process::id()
    );

    let mut streams = Streams::open(&scaler, services).await;
    // The goal's conditions: the caller, the agent, the scaler and the
    // KEDA-role streams on this machine's cores, nothing else.
    let run = streams.direct(activations, services, &agent, &scaler).await;
    println!();
    let (direct_p50, direct_p99) = summary("direct: connect() -> StreamIsActive true", run.times);
    println!(
        "  goal: p99 <= 1 ms: {}",
        if direct_p99 <= Duration::from_millis(1) {
            "met"
        } else {
            "MISSED"
        }
    );
    if with_timeline {
        print_timeline(&run.stamps, &agent, &scaler, stamps_file.as_deref());
    }
    if direct_only {
        return;
    }
    if prometheus_available {
        println!();
        seed_path(
            activations,
            services,
            &agent,
            &scaler,
            &mut streams,
            direct_p50,
            direct_p99,
        )
        .await;
    } else {
        println!(
            "(prometheus not installed: the seed path is not measured; hack/test installs it)"
        );
    }

    // The agent's cost at 10k connects/s (connects to one watched Service).
    let rate = 10_000u64;
    let seconds = 10u64;
    let target = service_addr(services);
    let (cpu0, _, _) = usage(agent.proc.pid());
    let t0 = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            std::thread::spawn(move || {
                let per_thread = rate / 2;
                let start = Instant::now();
                for k in 0..per_thread * seconds {
                    let due = Duration::from_micros(k * 1_000_000 / per_thread);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    connect_refused(target);
                }
                let _ = w;
            })
        })
        .collect();
    for w in workers {
        w.join().expect("connect worker");
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, rss, peak) = usage(agent.proc.pid());
    let achieved = (rate * seconds) as f64 / elapsed;
    println!();
    println!(
        "agent at {achieved:.0} connects/s for {elapsed:.1}s: {:.3}% of one core ({:.3}% per 10k connects/s; the counting itself runs in the callers' connect()); RSS {rss} KiB, peak {peak} KiB, with {} services mapped",
        (cpu1 - cpu0) / elapsed * 100.0,
        (cpu1 - cpu0) / elapsed * 100.0 * 10_000.0 / achieved,
        services + 1
    );
    let counted = eventually(
        "the load to be counted",
        Duration::from_secs(10),
        || async {
            let n = scaler.attempts(NS, &format!("svc-{services:05}")).await;
            (n >= (rate * seconds) as f64).then_some(n)
        },
    )
    .await;
    println!(
        "scaler counted {counted} of {} load connects",
        rate * seconds
    );
}
