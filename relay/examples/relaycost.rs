//! What a running `itw-relay` costs per agent stream, for `hack/bench
//! relay` (issue #18): this process plays a scaler replica (welcomes every
//! hello, acknowledges every batch, on the Relay stream the relay opens to
//! it) and `--agents` agents, each on its own connection to the relay, each
//! sending a hello, a snapshot and then a batch a second. It prints the
//! relay's resident memory before and with the agents (and per stream), its
//! CPU over the steady phase, and checks that every batch sent was
//! acknowledged exactly once, beside the load average (the cores are shared
//! with this process).
//!
//! It only connects to the addresses it is given (hack/bench gives loopback).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use itw_proto::itw::v1::{
    Ack, Batch, Hello, PROTOCOL_VERSION, RelayRequest, RelayResponse, ReportRequest,
    ReportResponse, Series, SeriesCount, Snapshot, Welcome,
    ingest_client::IngestClient,
    ingest_server::{Ingest, IngestServer},
    relay_request, relay_response, report_request, report_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming, transport::Server};

#[derive(Debug, Parser)]
struct Args {
    /// Where this process listens as the scaler replica (the relay's SCALER_ADDR).
    #[arg(long)]
    replica: SocketAddr,
    /// The relay's gRPC address.
    #[arg(long)]
    relay: SocketAddr,
    /// The relay's metrics address (/readyz).
    #[arg(long)]
    relay_metrics: SocketAddr,
    /// The relay's process id, for its memory and CPU.
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Seconds of batches (one per agent per second) measured for CPU.
    #[arg(long, default_value_t = 20)]
    steady_secs: u64,
    /// Deltas in each batch.
    #[arg(long, default_value_t = 20)]
    deltas_per_batch: usize,
}

/// Agents opening their stream at once.
const OPENING_AT_ONCE: usize = 100;

/// Replica-side tallies.
#[derive(Default)]
struct Tally {
    hellos: AtomicU64,
    batches: AtomicU64,
    closed: AtomicU64,
}

struct FakeReplica {
    tally: Arc<Tally>,
}

#[tonic::async_trait]
impl Ingest for FakeReplica {
    type ReportStream = ReceiverStream<Result<ReportResponse, Status>>;
    type RelayStream = ReceiverStream<Result<RelayResponse, Status>>;

    async fn report(
        &self,
        _request: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        Err(Status::unimplemented(
            "this replica only takes Relay streams",
        ))
    }

    async fn relay(
        &self,
        request: Request<Streaming<RelayRequest>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4096);
        let tally = Arc::clone(&self.tally);
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                let answer = match request.message {
                    Some(relay_request::Message::Report(ReportRequest {
                        message: Some(report_request::Message::Hello(_)),
                    })) => {
                        tally.hellos.fetch_add(1, Relaxed);
                        report_response::Message::Welcome(Welcome {
                            applied_sequence: 0,
                            history_seconds: 0,
                        })
                    }
                    Some(relay_request::Message::Report(ReportRequest {
                        message: Some(report_request::Message::Batch(batch)),
                    })) => {
                        tally.batches.fetch_add(1, Relaxed);
                        report_response::Message::Ack(Ack {
                            sequence: batch.sequence,
                        })
                    }
                    Some(relay_request::Message::Closed(_)) => {
                        tally.closed.fetch_add(1, Relaxed);
                        continue;
                    }
                    _ => continue,
                };
                let response = RelayResponse {
                    stream: request.stream,
                    message: Some(relay_response::Message::Report(ReportResponse {
                        message: Some(answer),
                    })),
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// The process's user + system CPU time in clock ticks (100 a second).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ").context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn series(agent: usize, i: usize) -> Series {
    Series {
        namespace: "bench".into(),
        service: format!("svc-{}", (agent * 7 + i) % 10_000),
        port: 8080,
        pod: String::new(),
        process_comm: "curl".into(),
    }
}

/// One agent: hello, welcome, snapshot, then a batch a second until
/// `until`; returns the batches acknowledged.
async fn agent(
    args: Arc<Args>,
    n: usize,
    up: mpsc::Sender<()>,
    until: Arc<tokio::sync::Notify>,
    opening: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<u64> {
    let opening = opening.acquire_owned().await?;
    let mut client = IngestClient::connect(format!("http://{}", args.relay)).await?;
    let (tx, rx) = mpsc::channel(8);
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("itw-replica", args.replica.to_string().parse()?);
    tx.send(ReportRequest {
        message: Some(report_request::Message::Hello(Hello {
            node_name: format!("node-{n}"),
            instance_id: format!("bench-{n}"),
            protocol_version: PROTOCOL_VERSION,
            instance_secret: format!("bench-secret-{n:016}"),
        })),
    })
    .await?;
    let mut inbound = client.report(request).await?.into_inner();
    match inbound.message().await? {
        Some(ReportResponse {
            message: Some(report_response::Message::Welcome(_)),
        }) => {}
        other => bail!("agent {n}: expected a welcome, got {other:?}"),
    }
    tx.send(ReportRequest {
        message: Some(report_request::Message::Snapshot(Snapshot {
            through_sequence: 0,
            taken_at_unix_ms: 1,
            totals: (0..args.deltas_per_batch)
                .map(|i| SeriesCount {
                    series: Some(series(n, i)),
                    attempts: 1,
                })
                .collect(),
            ..Default::default()
        })),
    })
    .await?;
    drop(opening);
    let _ = up.send(()).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sequence = 0;
    let stop = until.notified();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {}
        }
        sequence += 1;
        tx.send(ReportRequest {
            message: Some(report_request::Message::Batch(Batch {
                sequence,
                collected_at_unix_ms: 1 + sequence as i64,
                wake: false,
                deltas: (0..args.deltas_per_batch)
                    .map(|i| SeriesCount {
                        series: Some(series(n, i)),
                        attempts: 1,
                    })
                    .collect(),
                edges: Vec::new(),
            })),
        })
        .await?;
        match inbound.message().await? {
            Some(ReportResponse {
                message: Some(report_response::Message::Ack(ack)),
            }) if ack.sequence == sequence => {}
            other => bail!("agent {n}: expected ack {sequence}, got {other:?}"),
        }
    }
    drop(tx);
    Ok(sequence)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let tally = Arc::new(Tally::default());
    let listener = tokio::net::TcpListener::bind(args.replica)
        .await
        .with_context(|| format!("listening on {}", args.replica))?;
    tokio::spawn(
        Server::builder()
            .add_service(IngestServer::new(FakeReplica {
                tally: Arc::clone(&tally),
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The relay is ready once its Relay stream to this replica is up.
    let ready = format!("http://{}/readyz", args.relay_metrics);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(&ready).await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the relay was not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kib(args.pid)?;
    println!(
        "relay: RSS with its Relay stream up and no agent: {:.1} MiB (load {})",
        base as f64 / 1024.0,
        load_average()
    );

    let (up_tx, mut up_rx) = mpsc::channel(args.agents);
    let until = Arc::new(tokio::sync::Notify::new());
    let mut agents = tokio::task::JoinSet::new();
    let started = Instant::now();
    // Agents come up a batch at a time, as a DaemonSet's do, rather than
    // 2,000 SYNs at once overflowing the relay's listen backlog.
    let opening = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
    for n in 0..args.agents {
        let (args, up, until, opening) = (
            Arc::clone(&args),
            up_tx.clone(),
            Arc::clone(&until),
            Arc::clone(&opening),
        );
        agents.spawn(async move {
            agent(args, n, up, until, opening)
                .await
                .with_context(|| format!("agent {n}"))
        });
    }
    drop(up_tx);
    let mut up = 0;
    while up < args.agents {
        tokio::select! {
            ready = up_rx.recv() => match ready {
                Some(()) => up += 1,
                None => bail!("an agent ended before its stream was up"),
            },
            Some(done) = agents.join_next() => {
                done??;
                bail!("an agent ended before the steady phase");
            }
        }
    }
    println!(
        "relay: {} agent streams up (hello, welcome, snapshot) in {:.2} s",
        args.agents,
        started.elapsed().as_secs_f64()
    );
    // Settle: a few batches through every stream.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_start = cpu_ticks(args.pid)?;
    let steady_start = Instant::now();
    let batches_start = tally.batches.load(Relaxed);
    tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
    let cpu = (cpu_ticks(args.pid)? - cpu_start) as f64 / 100.0;
    let wall = steady_start.elapsed().as_secs_f64();
    let batches = tally.batches.load(Relaxed) - batches_start;
    let with = rss_kib(args.pid)?;
    let per_stream = (with.saturating_sub(base)) as f64 / args.agents as f64;
    until.notify_waiters();
    let mut sent = 0;
    while let Some(done) = agents.join_next().await {
        sent += done??;
    }
    let load = load_average();
    println!(
        "relay: RSS with {} agent streams: {:.1} MiB, {:.1} KiB per stream (load {load})",
        args.agents,
        with as f64 / 1024.0,
        per_stream
    );
    println!(
        "relay: CPU {:.1}% of a core relaying {:.0} batches/s ({} deltas each) over {:.0} s (load {load})",
        100.0 * cpu / wall,
        batches as f64 / wall,
        args.deltas_per_batch,
        wall
    );
    // Every ack an agent awaited came back; the closes follow the agents' ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tally.closed.load(Relaxed) < args.agents as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (hellos, seen, closed) = (
        tally.hellos.load(Relaxed),
        tally.batches.load(Relaxed),
        tally.closed.load(Relaxed),
    );
    println!(
        "relay: replica saw {hellos} hellos, {seen} batches, {closed} closed; agents sent {sent} batches, each acknowledged"
    );
    if hellos != args.agents as u64 || seen != sent || closed != args.agents as u64 {
        bail!("the replica's tallies do not match what the agents sent");
    }
    println!(
        "sizing: relay agents={} rss_mib={:.1} per_stream_kib={:.1} cpu_percent={:.1} load=\"{load}\"",
        args.agents,
        with as f64 / 1024.0,
        per_stream,
        100.0 * cpu / wall
    );
    Ok(())
}
