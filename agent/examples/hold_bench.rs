//! What holding costs (`hack/bench hold`; as root, release build).
//!
//! 1. The warm path: a loopback connect loop (connect refused at once, as in
//!    `capture_bench`) with nothing attached, with the counting programs,
//!    and with the holding programs (nothing held, then another destination
//!    held so the hold map is looked up and missed), interleaved in rounds;
//!    the loop thread's CPU time per connect and the programs' own run time.
//! 2. The held path, with the agent's own [`Holder`] and the real programs:
//!    the time from "an endpoint is ready" (the map event) to the first byte
//!    a held client receives; the parking runtime's CPU time per held
//!    connection (accept, park, release, connect upstream, splice one
//!    exchange); and the round trip of a spliced connection beside a direct
//!    one.
//!
//! Usage: `hold_bench [--seconds S] [--rounds R] [--releases N] [--batch N]`.
//! Connects go to 127.89.0.0/16 and 127.0.0.1 only.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bench_support::{cpu_time, percentile, program_run_time};
use itw_agent::{
    capture::{self, CaptureMode, CaptureSettings, Kernel, KernelHold, PodCgroup},
    hold::{HoldMetrics, HoldPolicy, HoldSettings, Holder},
    resolve::{MapChange, MapEvent, ServiceMap, ServiceRef, ServiceState, Target},
};
use itw_common::Destination;

const PORT: u16 = 9;
const MARK: u32 = 0x2a7c;

struct Options {
    seconds: f64,
    rounds: usize,
    releases: usize,
    batch: usize,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        seconds: 2.0,
        rounds: 5,
        releases: 200,
        batch: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--seconds" => options.seconds = value.parse().context("--seconds")?,
            "--rounds" => options.rounds = value.parse().context("--rounds")?,
            "--releases" => options.releases = value.parse().context("--releases")?,
            "--batch" => options.batch = value.parse().context("--batch")?,
            _ => bail!("unknown option {arg}; use --seconds, --rounds, --releases, --batch"),
        }
    }
    if options.rounds == 0 || options.releases == 0 || options.batch == 0 || options.seconds <= 0.0
    {
        bail!("every option must be positive");
    }
    Ok(options)
}

/// (connects, CPU ns per connect) of one thread's loop over `seconds`.
fn run(target: Ipv4Addr, seconds: f64) -> (u64, f64) {
    let measured = bench_support::run(target, PORT, 1, seconds);
    (measured.made, measured.cpu_ns)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    Bare,
    Counting,
    HoldNothingHeld,
    HoldOtherHeld,
}

impl Config {
    const ALL: [Config; 4] = [
        Config::Bare,
        Config::Counting,
        Config::HoldNothingHeld,
        Config::HoldOtherHeld,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Bare => "nothing attached",
            Self::Counting => "counting programs (HOLD=off)",
            Self::HoldNothingHeld => "holding programs, nothing held",
            Self::HoldOtherHeld => "holding programs, another Service held",
        }
    }
}

fn settings(hold: bool) -> CaptureSettings {
    let mut settings = CaptureSettings::new(CaptureMode::Cgroup);
    settings.pod_cgroup = PodCgroup::None;
    if hold {
        settings.hold = Some(KernelHold {
            mark: MARK,
            park_ip4: Some(Ipv4Addr::LOCALHOST),
            park_ip6: None,
            // The bench's batches are never refused.
            max_per_service: 65_536,
            max_per_node: 65_536,
        });
    }
    settings
}

/// Starts the programs of `config` with `watched` watched; `None` for bare.
fn attach(config: Config, watched: Ipv4Addr) -> anyhow::Result<Option<capture::Started>> {
    let hold = match config {
        Config::Bare => return Ok(None),
        Config::Counting => false,
        Config::HoldNothingHeld | Config::HoldOtherHeld => true,
    };
    let mut started = capture::start(&settings(hold))?;
    started
        .kernel
        .watch(&Destination::v4(watched.octets(), PORT), 1)?;
    if config == Config::HoldOtherHeld {
        started
            .kernel
            .hold(&Destination::v4([127, 89, 9, 9], PORT), 1, 1)?;
    }
    Ok(Some(started))
}

fn warm_path(options: &Options) -> anyhow::Result<()> {
    let watched = Ipv4Addr::new(127, 89, 0, 1);
    println!(
        "1. warm path: refused loopback connects to a watched, ready destination, 1 thread, {} rounds of {}s",
        options.rounds, options.seconds
    );
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); Config::ALL.len()];
    for _ in 0..options.rounds {
        for (i, config) in Config::ALL.iter().enumerate() {
            let _attached = attach(*config, watched)?;
            cpu[i].push(run(watched, options.seconds).1);
        }
    }
    let bare = percentile(&mut cpu[0].clone(), 0.5);
    let counting = percentile(&mut cpu[1].clone(), 0.5);
    println!(
        "   {:<42} {:>12} {:>10} {:>14}",
        "configuration", "CPU ns/conn", "vs bare", "vs counting"
    );
    for (i, config) in Config::ALL.iter().enumerate() {
        let ns = percentile(&mut cpu[i].clone(), 0.5);
        println!(
            "   {:<42} {:>12.0} {:>+10.0} {:>+14.0}",
            config.label(),
            ns,
            ns - bare,
            ns - counting
        );
    }
    println!("   program run time per connect (BPF run-time statistics):");
    for config in &Config::ALL[1..] {
        let Some(started) = attach(*config, watched)? else {
            continue;
        };
        let ids: Vec<u32> = started.objects.programs.iter().map(|(_, id)| *id).collect();
        let before = program_run_time(&ids)?;
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run-time statistics")?;
        let (made, _) = run(watched, options.seconds);
        drop(stats);
        let after = program_run_time(&ids)?;
        println!(
            "   {:<42} {:>12.0} ns",
            config.label(),
            (after.1 - before.1) as f64 / made.max(1) as f64
        );
    }
    Ok(())
}

/// An echo server on `at`: every connection gets back what it sends.
fn echo_server(at: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(at).with_context(|| format!("binding {at}"))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

fn state(ready: u32) -> ServiceState {
    ServiceState {
        hold: true,
        hold_timeout: Some(Duration::from_secs(60)),
        ready_endpoints: Some(ready),
        wakes: Vec::new(),
        exclude_sources: Default::default(),
    }
}

/// The CPU clocks of the parking runtime's worker threads.
type Clocks = Arc<Mutex<Vec<libc::clockid_t>>>;

fn runtime_cpu(clocks: &Clocks) -> Duration {
    clocks
        .lock()
        .map(|c| c.iter().map(|clock| cpu_time(*clock)).sum())
        .unwrap_or_default()
}

/// The runtime threads' CPU once they are quiet: less than 20 us used in
/// 50 ms. Fails after 10 s of work that does not end.
fn settled_runtime_cpu(clocks: &Clocks) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = runtime_cpu(clocks);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = runtime_cpu(clocks);
        if now.saturating_sub(last) < Duration::from_micros(20) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("the parking runtime was still busy 10 s after its clients left");
        }
        last = now;
    }
}

fn wait_held(metrics: &HoldMetrics, service: &ServiceRef, n: i64) -> anyhow::Result<()> {
    let labels = itw_agent::hold::metrics::ServiceLabels::of(service);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.held.get_or_create(&labels).get() != n {
        if Instant::now() > deadline {
            bail!("{n} connections were not parked within 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Connects to `target`, sends one byte, returns the stream and when the
/// first byte came back.
fn held_client(target: SocketAddr) -> anyhow::Result<(TcpStream, Instant)> {
    let mut stream = TcpStream::connect(target)?;
    stream.set_nodelay(true)?;
    stream.write_all(b"x")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok((stream, Instant::now()))
}

fn round_trips(stream: &mut TcpStream, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let start = Instant::now();
        stream.write_all(&buf)?;
        stream.read_exact(&mut buf)?;
        out.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

fn held_path(options: &Options) -> anyhow::Result<()> {
    let clocks: Clocks = Arc::default();
    let registered = clocks.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || {
            let mut clock: libc::clockid_t = 0;
            // SAFETY: the calling thread's own id and a clock id out-parameter.
            if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0
                && let Ok(mut clocks) = registered.lock()
            {
                clocks.push(clock);
            }
        })
        .build()?;
    let mut started = {
        let _guard = runtime.enter();
        capture::start(&settings(true))?
    };
    let kernel: &mut dyn Kernel = started.kernel.as_mut();
    let metrics = Arc::new(HoldMetrics::default());
    let mut holder = Holder::new(
        HoldSettings {
            policy: HoldPolicy::Annotated,
            default_timeout: Duration::from_secs(60),
            park_ip4: Some(Ipv4Addr::LOCALHOST),
            park_ip6: None,
            mark: MARK,
            max_per_service: 65_536,
            max_per_node: 65_536,
            max_buffered_bytes: 1 << 30,
            // The bench's clients are in its own network namespace.
            netns_dir: "/var/run/netns".into(),
        },
        runtime.handle().clone(),
        metrics.clone(),
        kernel
            .redirects()
            .ok_or_else(|| anyhow::anyhow!("the programs do not hold"))?,
    )?;
    let service = ServiceRef::new("bench", "cold");
    let target: SocketAddr = "127.89.1.1:18080".parse()?;
    echo_server(target)?;
    let mut map = ServiceMap::default();
    map.services.insert(service.clone(), state(1));
    map.destinations.insert(
        target,
        Target {
            service: service.clone(),
            port: 18080,
            pod: None,
        },
    );
    holder.apply(kernel, &MapEvent::Reset(map));
    let set = |ready| MapEvent::Changes(vec![MapChange::ServiceSet(service.clone(), state(ready))]);

    println!(
        "\n2. held path ({} single releases; batches of {} clients)",
        options.releases, options.batch
    );
    let mut to_first_byte = Vec::new();
    let mut hold_us = Vec::new();
    let mut release_us = Vec::new();
    for _ in 0..options.releases {
        let t = Instant::now();
        holder.apply(kernel, &set(0));
        hold_us.push(t.elapsed().as_secs_f64() * 1e6);
        let client = std::thread::spawn(move || held_client(target));
        wait_held(&metrics, &service, 1)?;
        let ready = Instant::now();
        holder.apply(kernel, &set(1));
        release_us.push(ready.elapsed().as_secs_f64() * 1e6);
        let (_stream, first_byte) = client
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))??;
        to_first_byte.push((first_byte - ready).as_secs_f64() * 1e6);
        holder.reap(kernel);
    }
    println!(
        "   endpoint ready -> first byte at the held client: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        percentile(&mut to_first_byte, 0.5),
        percentile(&mut to_first_byte, 0.99),
        percentile(&mut to_first_byte, 1.0)
    );
    println!(
        "   bookkeeping per held destination (counting loop): hold p50 {:.0} us (listener + 2 map updates), release p50 {:.0} us",
        percentile(&mut hold_us, 0.5),
        percentile(&mut release_us, 0.5)
    );

    // Parking runtime CPU per connection: batches parked and released together.
    let mut per_conn = Vec::new();
    for _ in 0..5 {
        holder.apply(kernel, &set(0));
        let cpu_before = runtime_cpu(&clocks);
        let clients: Vec<_> = (0..options.batch)
            .map(|_| std::thread::spawn(move || held_client(target)))
            .collect();
        wait_held(&metrics, &service, options.batch as i64)?;
        holder.apply(kernel, &set(1));
        let mut streams = Vec::new();
        for client in clients {
            let (stream, _) = client
                .join()
                .map_err(|_| anyhow::anyhow!("client panicked"))??;
            streams.push(stream);
        }
        drop(streams);
        // Until the splices have seen the clients' ends and finished: the
        // runtime's CPU stops growing (not a fixed sleep, which either cuts
        // their work off or charges idle time).
        let cpu_after = settled_runtime_cpu(&clocks)?;
        per_conn.push((cpu_after - cpu_before).as_secs_f64() * 1e6 / options.batch as f64);
        holder.reap(kernel);
    }
    println!(
        "   parking runtime CPU per held connection (accept, park, release, upstream connect, one exchange, close): median {:.0} us over 5 batches",
        percentile(&mut per_conn, 0.5)
    );

    // A spliced connection's round trip beside a direct one.
    holder.apply(kernel, &set(0));
    let client = std::thread::spawn(move || held_client(target));
    wait_held(&metrics, &service, 1)?;
    holder.apply(kernel, &set(1));
    let (mut spliced, _) = client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    let mut direct = TcpStream::connect(target)?;
    direct.set_nodelay(true)?;
    let mut via_agent = round_trips(&mut spliced, 2000)?;
    let mut straight = round_trips(&mut direct, 2000)?;
    println!(
        "   64-byte round trip: direct p50 {:.1} us, through the agent's splice p50 {:.1} us (+{:.1} us), p99 {:.1} vs {:.1} us",
        percentile(&mut straight, 0.5),
        percentile(&mut via_agent, 0.5),
        percentile(&mut via_agent, 0.5) - percentile(&mut straight, 0.5),
        percentile(&mut straight, 0.99),
        percentile(&mut via_agent, 0.99)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    if let Err(reason) = capture::mode::detect(None).cgroup {
        bail!("holding needs the cgroup capture mode: {reason}");
    }
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let _guard = runtime.enter();
        warm_path(&options)?;
    }
    held_path(&options)?;
    Ok(())
}
