//! Benchmark of the Kubernetes source (`hack/bench resolver`).
//!
//! `kube_resolver_bench [--services N] [--endpoints M] [--ports P]
//! [--changes K] [--kernel fake|null]` starts the mock API server in a child
//! process (`kube_resolver_bench serve ...`, so its objects are not in this
//! process's memory), serving N Services and their EndpointSlices with M
//! endpoints in all, then runs the real source, as the agent does (a
//! multi-threaded runtime with two workers), into a DestinationTable and a
//! kernel. It prints:
//! - the time from start to the first complete map applied,
//! - this process's RSS then (and its peak), and
//! - the time one change takes end to end (the write to the mock server,
//!   its watch event, decoding, the resolver, the channel, the table and the
//!   kernel), for a new Service and for a new endpoint in a slice.
//!
//! `--kernel fake` (default) applies to the in-memory FakeKernel, whose maps
//! are in this process; `--kernel null` discards the kernel calls, as the real
//! agent's RSS does not hold its kernel maps.
//!
//! Loopback only: the mock listens on 127.0.0.1; nothing connects to the
//! mapped addresses.
//!
//! With `ITW_BENCH_EXIT_AFTER_MAP=1` it exits right after the first map, so
//! a heap profiler (heaptrack) shows what is live then as never freed.

use itw_kube_mock as kube_mock;
use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    process::{Command, ExitCode, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use itw_agent::{
    capture::{CaptureError, Kernel, KernelCounts, KernelStats, Wake, fake::FakeKernel},
    destinations::DestinationTable,
    resolve::{
        MapEvent,
        kube::{KubeSettings, KubeSourceMetrics},
    },
};
use itw_common::{Comm, Destination};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{mpsc, watch};

/// Counts the heap in use, to tell live data from what the allocator keeps.
struct CountingAllocator;

static HEAP_IN_USE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static HEAP_PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only
// the sizes are added up.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: as the caller's contract for `alloc`.
        let ptr = unsafe { std::alloc::System.alloc(layout) };
        if !ptr.is_null() {
            let now = HEAP_IN_USE.fetch_add(layout.size(), Relaxed) + layout.size();
            HEAP_PEAK.fetch_max(now, Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        HEAP_IN_USE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as the caller's contract for `dealloc`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn heap() -> (f64, f64) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        mib(HEAP_IN_USE.load(Relaxed) as u64),
        mib(HEAP_PEAK.load(Relaxed) as u64),
    )
}

struct Options {
    services: usize,
    endpoints: usize,
    ports: usize,
    changes: usize,
    null_kernel: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        services: 10_000,
        endpoints: 100_000,
        ports: 1,
        changes: 20,
        null_kernel: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value"))
                .cloned()
        };
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--services" => o.services = number(value()?)?.max(1),
            "--endpoints" => o.endpoints = number(value()?)?,
            "--ports" => o.ports = number(value()?)?.clamp(1, 16),
            "--changes" => o.changes = number(value()?)?,
            "--kernel" => {
                o.null_kernel = match value()?.as_str() {
                    "fake" => false,
                    "null" => true,
                    other => return Err(format!("--kernel {other}: fake or null")),
                }
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (serve, rest) = match args.first().map(String::as_str) {
        Some("serve") => (true, &args[1..]),
        _ => (false, &args[..]),
    };
    let options = match parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kube_resolver_bench: {e}");
            return ExitCode::from(2);
        }
    };
    let result = if serve {
        serve_mock(&options)
    } else {
        bench(&options)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kube_resolver_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The child: serves the synthetic cluster until its stdin closes.
fn serve_mock(o: &Options) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mock = kube_mock::MockApiServer::start().await;
        mock.load(kube_mock::synthetic_cluster(
            o.services,
            o.endpoints,
            o.ports,
        ));
        println!("listening {}", mock.addr());
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        // Until the parent closes our stdin (or dies).
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// A kernel that keeps nothing: the real agent's kernel maps are not in its
/// memory.
struct NullKernel {
    wakes: Option<mpsc::Receiver<Wake>>,
    _tx: mpsc::Sender<Wake>,
}

impl Kernel for NullKernel {
    fn watch(&mut self, _: &Destination, _: u32) -> Result<(), CaptureError> {
        Ok(())
    }
    fn unwatch(&mut self, _: &Destination) -> Result<(), CaptureError> {
        Ok(())
    }
    fn set_excluded(&mut self, _: &[Comm]) -> Result<(), CaptureError> {
        Ok(())
    }
    fn read(&mut self, out: &mut KernelCounts) -> Result<(), CaptureError> {
        out.clear();
        Ok(())
    }
    fn read_woken(&mut self, _: &[Wake], out: &mut KernelCounts) -> Result<(), CaptureError> {
        out.clear();
        Ok(())
    }
    fn forget(&mut self, _: &[u32]) -> Result<(), CaptureError> {
        Ok(())
    }
    fn stats(&mut self) -> Result<KernelStats, CaptureError> {
        Ok(KernelStats::default())
    }
    fn hold(&mut self, _: &Destination, _: u16, _: u16) -> Result<(), CaptureError> {
        Ok(())
    }
    fn unhold(&mut self, _: &Destination) -> Result<(), CaptureError> {
        Ok(())
    }
    fn forget_park(&mut self, _: &Destination, _: u16) -> Result<(), CaptureError> {
        Ok(())
    }
    fn take_wakes(&mut self) -> Option<mpsc::Receiver<Wake>> {
        self.wakes.take()
    }
    fn redirects(&self) -> Option<std::sync::Arc<dyn itw_agent::capture::RedirectBook>> {
        None
    }
    fn hold_slot(&mut self, _: u16) -> Result<itw_agent::capture::SlotCounts, CaptureError> {
        Ok(Default::default())
    }
    fn set_hold_finished(&mut self, _: u16, _: u64) -> Result<(), CaptureError> {
        Ok(())
    }
    fn expire_redirects(&mut self, _: u64) -> Result<Vec<u16>, CaptureError> {
        Ok(Vec::new())
    }
}

struct Downstream {
    table: DestinationTable,
    kernel: Box<dyn Kernel>,
    first_map: Option<(Instant, usize, usize)>,
}

fn bench(o: &Options) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--services",
            &o.services.to_string(),
            "--endpoints",
            &o.endpoints.to_string(),
            "--ports",
            &o.ports.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the mock server: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or("no stdout from the mock server")?;
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .map_err(|e| e.to_string())?;
    let addr: SocketAddr = first
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("the mock server said {first:?}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not loopback"));
    }

    // As the agent: a multi-threaded runtime with two workers.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = runtime.block_on(measure(o, addr));
    drop(child.stdin.take());
    let _ = child.wait();
    result
}

async fn measure(o: &Options, addr: SocketAddr) -> Result<(), String> {
    let baseline = rss();
    let start = Instant::now();
    let url = format!("http://{addr}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let client =
        kube::Client::try_from(kube::Config::new(url)).map_err(|e| format!("client: {e}"))?;
    let kernel: Box<dyn Kernel> = if o.null_kernel {
        let (tx, rx) = mpsc::channel(1);
        Box::new(NullKernel {
            wakes: Some(rx),
            _tx: tx,
        })
    } else {
        Box::new(FakeKernel::new(1024))
    };
    let downstream = Arc::new(Mutex::new(Downstream {
        table: DestinationTable::new(),
        kernel,
        first_map: None,
    }));
    let (tx, mut rx) = mpsc::channel(64);
    let (applied_tx, mut applied) = watch::channel(0u64);
    tokio::spawn(itw_agent::resolve::kube::run(
        client.clone(),
        KubeSettings::default(),
        tx,
        Arc::new(KubeSourceMetrics::default()),
        None,
    ));
    let sink = downstream.clone();
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let mut d = sink.lock();
            let reset = match &event {
                MapEvent::Reset(map) => Some((map.services.len(), map.destinations.len())),
                MapEvent::Changes(_) => None,
            };
            let Downstream { table, kernel, .. } = &mut *d;
            table.apply(kernel.as_mut(), event);
            if let (Some((services, destinations)), None) = (reset, d.first_map) {
                d.first_map = Some((Instant::now(), services, destinations));
            }
            drop(d);
            applied_tx.send_modify(|n| *n += 1);
        }
    });

    let deadline = Duration::from_secs(300);
    let (first_at, services, destinations) = loop {
        if let Some(first) = downstream.lock().first_map {
            break first;
        }
        tokio::time::timeout(deadline, applied.changed())
            .await
            .map_err(|_| "no complete map within 300 s".to_owned())?
            .map_err(|_| "the source stopped".to_owned())?;
    };
    let after_map = rss();
    println!(
        "resolver: {} Services, {} endpoints x {} port(s) served by the mock (separate process); kernel: {}",
        o.services,
        o.endpoints,
        o.ports,
        if o.null_kernel {
            "null (kernel maps not in RSS, as in the agent)"
        } else {
            "FakeKernel (its maps count in RSS)"
        },
    );
    println!(
        "resolver: first complete map: {:.0} ms ({services} Services, {destinations} destinations)",
        first_at.duration_since(start).as_secs_f64() * 1000.0
    );
    let heap_now = heap();
    println!(
        "resolver: RSS {:.1} MiB after the first map (peak {:.1} MiB; {:.1} MiB before the source started); heap in use {:.1} MiB (peak {:.1} MiB)",
        mib(after_map.0),
        mib(after_map.1),
        mib(baseline.0),
        heap_now.0,
        heap_now.1,
    );

    if std::env::var_os("ITW_BENCH_EXIT_AFTER_MAP").is_some() {
        // For heap profilers: what is live now shows as never freed.
        std::process::exit(0);
    }
    let mut service_times = Vec::new();
    let mut endpoint_times = Vec::new();
    for i in 0..o.changes {
        // A new Service (ClusterIP in 10.200/16, not used by the cluster).
        let ip = format!("10.200.{}.{}", i / 256, i % 256);
        let name = format!("bench-new-{i:04}");
        let service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": "team-00", "uid": format!("00000000-0000-4000-8000-{i:012}") },
            "spec": { "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                      "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }] }
        });
        let dest: SocketAddr = format!("{ip}:80").parse().map_err(|e| format!("{e}"))?;
        service_times.push(change(&client, &downstream, &mut applied, &service, dest).await?);

        // A new endpoint in the new Service's slice.
        let pod_ip = format!("10.201.{}.{}", i / 256, i % 256);
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": { "name": format!("{name}-x1"), "namespace": "team-00",
                          "labels": { "kubernetes.io/service-name": name } },
            "endpoints": [{ "addresses": [pod_ip], "conditions": { "ready": true },
                            "targetRef": { "kind": "Pod", "name": format!("{name}-0"), "namespace": "team-00" } }],
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }]
        });
        let dest: SocketAddr = format!("{pod_ip}:8080")
            .parse()
            .map_err(|e| format!("{e}"))?;
        endpoint_times.push(change(&client, &downstream, &mut applied, &slice, dest).await?);
    }
    for (what, times) in [
        ("a new Service", &mut service_times),
        ("a new endpoint", &mut endpoint_times),
    ] {
        if times.is_empty() {
            continue;
        }
        times.sort();
        println!(
            "resolver: one change end to end ({what}, {} runs): median {:.2} ms, max {:.2} ms",
            times.len(),
            times[times.len() / 2].as_secs_f64() * 1000.0,
            times[times.len() - 1].as_secs_f64() * 1000.0
        );
    }
    let end = rss();
    let heap_end = heap();
    println!(
        "resolver: RSS {:.1} MiB after the changes (peak {:.1} MiB); heap in use {:.1} MiB",
        mib(end.0),
        mib(end.1),
        heap_end.0
    );
    Ok(())
}

/// Writes `object` to the mock and waits until `dest` is in the table (and
/// so in the kernel: both are updated in one apply).
async fn change(
    client: &kube::Client,
    downstream: &Mutex<Downstream>,
    applied: &mut watch::Receiver<u64>,
    object: &serde_json::Value,
    dest: SocketAddr,
) -> Result<Duration, String> {
    let body = serde_json::to_vec(object).map_err(|e| e.to_string())?;
    let request = hyper::Request::post(kube_mock::PUT_PATH)
        .header("content-type", "application/json")
        .body(body)
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    client
        .request_text(request)
        .await
        .map_err(|e| format!("writing to the mock: {e}"))?;
    while downstream.lock().table.id_of(dest).is_none() {
        tokio::time::timeout(Duration::from_secs(30), applied.changed())
            .await
            .map_err(|_| format!("{dest} not watched within 30 s"))?
            .map_err(|_| "the source stopped".to_owned())?;
    }
    Ok(start.elapsed())
}

/// (VmRSS, VmHWM) in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
