//! Load generator for `hack/bench scaler`: drives a running `itw-scaler` on
//! loopback the way a large cluster would, and prints what it measures.
//!
//! 1. Steady load: `--agents` agent streams (one connection each), every one
//!    sending a batch per second, spread over the second, for `--services`
//!    services; meanwhile a KEDA-role client, on a thread and runtime of its
//!    own, calls GetMetrics at `--keda-rps` and records each call's latency
//!    (p50/p99/max). The ingest rate printed
//!    beside it is the deltas the scaler applied (its `itw_scaler_deltas_total`
//!    before and after), not the deltas the agents queued.
//!
//!    The calls keep a fixed schedule (call i is due at t0 + i/rate, one in
//!    flight). A call held back behind a slower one is charged from the time
//!    it was due, not from when it could be sent, as wrk2 does: otherwise a
//!    stall is counted once and the calls it delayed look fast (coordinated
//!    omission). A call sent on time is charged from its send, so the load
//!    generator's timer (which wakes up to a millisecond late) is not charged
//!    to the scaler. The uncorrected figures (from each actual send) are
//!    printed too, labelled.
//!
//!    A steady agent whose stream fails (transport error, reset, a status)
//!    does what the agent does: it reopens the stream as the same instance
//!    (same id and secret) with a snapshot of its cumulative totals, which
//!    replaces what the scaler held for it, and goes on. The resets and
//!    resumptions are printed at the end.
//! 2. Ingest throughput: the steady agents pause, `--firehoses` streams send
//!    `--firehose-batch`-delta batches back to back (a few in flight each),
//!    and the applied deltas per second are printed, checked against the
//!    scaler's own `itw_scaler_deltas_total`.
//! 3. The scaler's memory: VmRSS and VmHWM of `--pid` from /proc, and the
//!    RSS the steady phase added per agent stream.
//! 4. Exactness: once every agent's last batch is acknowledged, the scaler's
//!    exported `internal_tcp_attempts_total` summed over the bench's
//!    namespace must equal the attempts the agents and firehoses generated;
//!    a lost or doubled count fails the run.
//! 5. One `sizing:` line with the figures of the README's sizing table
//!    (`hack/bench scaler_sizing` collects it from each run).
//!
//! With `--relay-streams R` the steady agents' streams reach the scaler as
//! relays carry them (#18): over R `Ingest.Relay` streams, each standing for
//! one itw-relay (`bench_support/relay_mux.rs`), instead of one connection
//! each. The relays' own cost is not the scaler's and is not measured here.
//! The firehoses stay direct streams.
//!
//! It only ever connects to the addresses it is given; hack/bench gives it
//! loopback ones. Every loop is bounded in time.

mod bench_support;
#[path = "bench_support/fleet.rs"]
mod fleet;
#[path = "bench_support/relay_mux.rs"]
mod relay_mux;
#[path = "bench_support/scaler_side.rs"]
mod scaler_side;
#[path = "bench_support/threads.rs"]
mod threads;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use itw_proto::{
    externalscaler::{
        GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
    },
    itw::v1::{
        Batch, Hello, PROTOCOL_VERSION, ReportRequest, ReportResponse, SeriesCount, Snapshot,
        ingest_client::IngestClient, report_request, report_response,
    },
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use bench_support::{ScalerTarget, connect, load_average, memory, now_ms};
use fleet::{COMMS, NAMESPACE, series, service_name};
use relay_mux::{RelayMux, Relayed};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    scaler: ScalerTarget,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Services each agent's node talks to.
    #[arg(long, default_value_t = 50)]
    services_per_agent: usize,
    /// Deltas in each steady batch.
    #[arg(long, default_value_t = 20)]
    deltas_per_batch: usize,
    /// Length of the steady phase, seconds.
    #[arg(long, default_value_t = 30)]
    steady_secs: u64,
    /// GetMetrics calls per second during the steady phase.
    #[arg(long, default_value_t = 200)]
    keda_rps: u64,
    #[arg(long, default_value_t = 4)]
    firehoses: usize,
    #[arg(long, default_value_t = 5_000)]
    firehose_batch: usize,
    /// Batches each firehose keeps in flight.
    #[arg(long, default_value_t = 4)]
    firehose_window: u64,
    /// Length of the throughput phase, seconds.
    #[arg(long, default_value_t = 10)]
    throughput_secs: u64,
    /// Carry the steady agents' streams over this many Relay streams, as
    /// relays would; 0: one connection per agent.
    #[arg(long, default_value_t = 0)]
    relay_streams: usize,
}

/// How a stream reaches the scaler.
enum Via<'a> {
    Direct(Channel),
    /// Relayed on lane `.1` of the relays.
    Relay(&'a RelayMux, usize),
}

/// The replica's answers on a direct or relayed stream.
enum Acks {
    Direct(Box<tonic::Streaming<ReportResponse>>),
    Relayed(Relayed),
}

impl Acks {
    async fn message(&mut self) -> Result<Option<ReportResponse>, tonic::Status> {
        match self {
            Self::Direct(acks) => acks.message().await,
            Self::Relayed(acks) => acks.message().await,
        }
    }
}

/// An open Report stream after hello and the snapshot.
struct Stream {
    tx: mpsc::Sender<ReportRequest>,
    acks: Acks,
}

/// Opens a Report stream as an agent does: Hello as `instance` (its secret
/// derived from the id, so a reopened stream names the same one), then a
/// snapshot of the instance's cumulative `totals` through `through_sequence`,
/// which replaces whatever the scaler held for the instance.
async fn open_stream(
    via: Via<'_>,
    node: &str,
    instance: &str,
    through_sequence: u64,
    totals: Vec<SeriesCount>,
) -> anyhow::Result<Stream> {
    let message = |m| ReportRequest { message: Some(m) };
    let hello = message(report_request::Message::Hello(Hello {
        node_name: node.into(),
        instance_id: instance.into(),
        protocol_version: PROTOCOL_VERSION,
        instance_secret: format!("loadgen-secret-{instance}"),
    }));
    let (tx, mut acks) = match via {
        Via::Direct(channel) => {
            let mut client = IngestClient::new(channel).max_decoding_message_size(64 << 20);
            let (tx, rx) = mpsc::channel(64);
            tx.send(hello).await?;
            let acks = client.report(ReceiverStream::new(rx)).await?.into_inner();
            (tx, Acks::Direct(Box::new(acks)))
        }
        Via::Relay(relays, lane) => {
            let (tx, acks) = relays.open(lane).await?;
            tx.send(hello).await?;
            (tx, Acks::Relayed(acks))
        }
    };
    match acks.message().await?.and_then(|r| r.message) {
        Some(report_response::Message::Welcome(_)) => {}
        other => bail!("expected welcome, got {other:?}"),
    }
    tx.send(message(report_request::Message::Snapshot(Snapshot {
        through_sequence,
        taken_at_unix_ms: now_ms(),
        totals,
        history: vec![],
        edges: Vec::new(),
    })))
    .await?;
    match acks.message().await?.and_then(|r| r.message) {
        Some(report_response::Message::Ack(ack)) if ack.sequence >= through_sequence => {}
        other => bail!("expected the snapshot's ack ({through_sequence}), got {other:?}"),
    }
    Ok(Stream { tx, acks })
}

fn batch(sequence: u64, deltas: Vec<SeriesCount>) -> ReportRequest {
    ReportRequest {
        message: Some(report_request::Message::Batch(Batch {
            sequence,
            collected_at_unix_ms: now_ms(),
            wake: false,
            deltas,
            edges: Vec::new(),
        })),
    }
}

/// What the steady agents did to get their streams up.
#[derive(Default)]
struct Opened {
    streams: AtomicU64,
    /// Opens that failed (a connection reset while a thousand connect at
    /// once) and were tried again, as a real agent reconnects.
    retried: AtomicU64,
    /// Streams that failed once up (transport error, reset, a status).
    resets: AtomicU64,
    /// Of those, the ones reopened with a snapshot of the agent's totals.
    resumed: AtomicU64,
    /// Why the first stream failed, for the report.
    first_reset: std::sync::OnceLock<String>,
    /// Why the first open failed, for the report.
    first_retry: std::sync::OnceLock<String>,
}

/// One steady agent's own counts, kept as an agent's ledger keeps them: what
/// it has generated, whatever became of the stream it sent them on.
struct Ledger {
    node: String,
    instance: String,
    /// The newest batch sequence generated.
    sequence: u64,
    /// Cumulative attempts per (service, comm index).
    totals: HashMap<(usize, usize), u64>,
}

impl Ledger {
    fn snapshot_totals(&self) -> Vec<SeriesCount> {
        self.totals
            .iter()
            .map(|(&(service, comm), &attempts)| SeriesCount {
                series: Some(series(service, COMMS[comm])),
                attempts,
            })
            .collect()
    }

    fn generated(&self) -> u64 {
        self.totals.values().sum()
    }
}

/// A steady agent's stream in use: the sending side, and the task reading
/// its acks, which ends with the reason the stream ended.
struct Session {
    tx: mpsc::Sender<ReportRequest>,
    acked: watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<String>,
}

/// Opens (or reopens) `ledger`'s stream with a snapshot of its totals,
/// trying for 30 s as an agent would keep trying.
async fn open_session(
    args: &Args,
    relays: Option<&RelayMux>,
    index: usize,
    ledger: &Ledger,
    opened: &Opened,
) -> anyhow::Result<Session> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        let attempt = async {
            let via = match relays {
                Some(relays) => Via::Relay(relays, index),
                None => Via::Direct(connect(args.scaler.grpc).await?),
            };
            open_stream(
                via,
                &ledger.node,
                &ledger.instance,
                ledger.sequence,
                ledger.snapshot_totals(),
            )
            .await
        };
        match attempt.await {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                opened.retried.fetch_add(1, Relaxed);
                let _ = opened.first_retry.set(format!("{}: {e:#}", ledger.node));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context(format!("{}: opening its stream", ledger.node)),
        }
    };
    let (acked_tx, acked) = watch::channel(ledger.sequence);
    let mut acks = stream.acks;
    // Acks are read as they come so the scaler's queue never fills.
    let reader = tokio::spawn(async move {
        loop {
            match acks.message().await {
                Ok(Some(ReportResponse {
                    message: Some(report_response::Message::Ack(ack)),
                })) => {
                    acked_tx.send_replace(ack.sequence);
                }
                Ok(Some(other)) => return format!("expected an ack, got {other:?}"),
                Ok(None) => return "the scaler ended the stream".into(),
                Err(status) => return failure(&status),
            }
        }
    });
    Ok(Session {
        tx: stream.tx,
        acked,
        reader,
    })
}

/// How a stream failed: the status and every cause under it (tonic's own
/// message says only "error reading a body from connection").
fn failure(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        text.push_str(&format!(" <- {cause} ({cause:?})"));
        source = cause.source();
    }
    text
}

/// One simulated node: a batch per second at its own offset in the second.
/// When its stream fails it reopens it as the agent does (same instance,
/// a snapshot of its totals) and goes on. Once `stop` is set it waits for
/// its last batch's ack, then returns the attempts it generated.
#[allow(clippy::too_many_arguments)]
async fn steady_agent(
    args: Arc<Args>,
    relays: Option<Arc<RelayMux>>,
    index: usize,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    opened: Arc<Opened>,
) -> anyhow::Result<u64> {
    let node = format!("node-{index:04}");
    let mut ledger = Ledger {
        instance: format!("{node}-bench"),
        node,
        sequence: 0,
        totals: HashMap::new(),
    };
    let relays = relays.as_deref();
    let mut session = open_session(&args, relays, index, &ledger, &opened).await?;
    opened.streams.fetch_add(1, Relaxed);
    let offset = Duration::from_micros((index as u64 * 1_000_000) / args.agents as u64);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + offset, Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let first = index * args.services / args.agents;
    let mut drain_deadline = None;
    loop {
        let stopping = stop.load(Relaxed);
        if stopping && *session.acked.borrow() >= ledger.sequence {
            break;
        }
        tokio::select! {
            biased;
            reason = &mut session.reader => {
                let reason = reason.unwrap_or_else(|e| format!("ack reader: {e}"));
                opened.resets.fetch_add(1, Relaxed);
                let _ = opened.first_reset.set(format!("{}: {reason}", ledger.node));
                session = open_session(&args, relays, index, &ledger, &opened)
                    .await
                    .with_context(|| format!("resuming after {reason}"))?;
                opened.resumed.fetch_add(1, Relaxed);
                continue;
            }
            _ = session.acked.changed(), if stopping => continue,
            _ = tick.tick() => {}
        }
        if stopping {
            let deadline =
                *drain_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(30));
            ensure!(
                Instant::now() < deadline,
                "{}: batch {} not acknowledged 30 s after the run (acked {})",
                ledger.node,
                ledger.sequence,
                *session.acked.borrow()
            );
            continue;
        }
        if paused.load(Relaxed) {
            continue;
        }
        ledger.sequence += 1;
        let sequence = ledger.sequence;
        let deltas = (0..args.deltas_per_batch)
            .map(|k| {
                let pick = (sequence as usize * 7 + k * 13) % args.services_per_agent;
                let service = (first + pick) % args.services;
                let comm = k % COMMS.len();
                let attempts = 1 + (k as u64 % 3);
                *ledger.totals.entry((service, comm)).or_default() += attempts;
                SeriesCount {
                    series: Some(series(service, COMMS[comm])),
                    attempts,
                }
            })
            .collect::<Vec<_>>();
        let n = deltas.len() as u64;
        // A failed send means the stream has ended: the reader says why on
        // the next turn, and the reopened stream's snapshot holds this batch.
        let _ = session.tx.send(batch(sequence, deltas)).await;
        sent.fetch_add(n, Relaxed);
    }
    drop(session.tx);
    session.reader.abort();
    Ok(ledger.generated())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// GetMetrics latencies, each sorted: `corrected` from the time a call was
/// due when an earlier call held it back, `uncorrected` from its send.
struct Latencies {
    corrected: Vec<Duration>,
    uncorrected: Vec<Duration>,
    /// Calls sent after their due time because the previous one was still out.
    held_back: usize,
}

async fn get_metrics_latencies(args: &Args) -> anyhow::Result<Latencies> {
    let mut keda = ExternalScalerClient::new(connect(args.scaler.grpc).await?);
    let rate = args.keda_rps.max(1);
    let calls = (rate * args.steady_secs) as usize;
    // Calls left when the scaler falls far behind are still sent, back to
    // back; past this the bench gives up rather than run on.
    let give_up = Duration::from_secs(args.steady_secs * 2 + 30);
    let t0 = Instant::now();
    let mut latencies = Latencies {
        corrected: Vec::with_capacity(calls),
        uncorrected: Vec::with_capacity(calls),
        held_back: 0,
    };
    let mut previous_done = t0;
    for i in 1..=calls {
        let due = t0 + Duration::from_micros((i as u64 - 1) * 1_000_000 / rate);
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
        }
        ensure!(
            t0.elapsed() < give_up,
            "GetMetrics fell {} s behind its schedule of {rate}/s; gave up after {i} of {calls} calls",
            give_up.as_secs()
        );
        let service = (i * 7919) % args.services;
        let request = GetMetricsRequest {
            scaled_object_ref: Some(ScaledObjectRef {
                name: format!("so-{service}"),
                namespace: NAMESPACE.into(),
                scaler_metadata: [
                    ("service".to_string(), service_name(service)),
                    ("window".to_string(), "60s".to_string()),
                ]
                .into_iter()
                .collect(),
            }),
            metric_name: format!("s0-itw-{NAMESPACE}-{}", service_name(service)),
        };
        let sent = Instant::now();
        keda.get_metrics(request).await.context("GetMetrics")?;
        let done = Instant::now();
        let held_back = previous_done > due;
        latencies.held_back += usize::from(held_back);
        latencies
            .corrected
            .push(done - if held_back { due } else { sent });
        latencies.uncorrected.push(done - sent);
        previous_done = done;
    }
    latencies.corrected.sort_unstable();
    latencies.uncorrected.sort_unstable();
    Ok(latencies)
}

async fn firehose(
    args: Arc<Args>,
    index: usize,
    end: Instant,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let channel = connect(args.scaler.grpc).await?;
    let node = format!("firehose-{index}");
    let Stream { tx, mut acks } = open_stream(
        Via::Direct(channel),
        &node,
        &format!("{node}-bench"),
        0,
        vec![],
    )
    .await?;
    let deltas: Vec<SeriesCount> = (0..args.firehose_batch)
        .map(|k| SeriesCount {
            series: Some(series(
                (index * 2_503 + k) % args.services,
                COMMS[k % COMMS.len()],
            )),
            attempts: 1,
        })
        .collect();
    let per_batch = deltas.len() as u64;
    let mut sequence = 0u64;
    let mut applied = 0u64;
    while Instant::now() < end {
        while sequence < applied + args.firehose_window {
            sequence += 1;
            tx.send(batch(sequence, deltas.clone()))
                .await
                .context("firehose stream closed")?;
        }
        match acks.message().await?.and_then(|r| r.message) {
            Some(report_response::Message::Ack(ack)) => {
                acked.fetch_add((ack.sequence - applied) * per_batch, Relaxed);
                applied = ack.sequence;
            }
            other => bail!("expected an ack, got {other:?}"),
        }
    }
    // Collect the acks of what is still in flight.
    while applied < sequence {
        match acks.message().await?.and_then(|r| r.message) {
            Some(report_response::Message::Ack(ack)) => {
                acked.fetch_add((ack.sequence - applied) * per_batch, Relaxed);
                applied = ack.sequence;
            }
            other => bail!("expected an ack, got {other:?}"),
        }
    }
    Ok(())
}

async fn scaler_deltas_total(metrics: SocketAddr) -> anyhow::Result<f64> {
    let body = reqwest::get(format!("http://{metrics}/metrics"))
        .await?
        .text()
        .await?;
    itw_telemetry::exposition::parse_samples(&body)
        .into_iter()
        .find(|s| s.name == "itw_scaler_deltas_total")
        .map(|s| s.value)
        .context("itw_scaler_deltas_total missing from /metrics")
}

/// The scaler's exported `internal_tcp_attempts_total` summed over the
/// bench's namespace: what it counts for the bench's Services. Unlike
/// `itw_scaler_deltas_total` (deltas applied, so a resent batch would count
/// twice), a snapshot replaces an instance's totals here.
async fn scaler_bench_attempts(metrics: SocketAddr) -> anyhow::Result<u64> {
    let body = reqwest::get(format!("http://{metrics}/metrics"))
        .await?
        .text()
        .await?;
    let samples = itw_telemetry::exposition::parse_samples(&body);
    let bench = samples.iter().filter(|s| {
        s.name == "internal_tcp_attempts_total"
            && s.label("destination_namespace") == Some(NAMESPACE)
    });
    Ok(bench.map(|s| s.value as u64).sum())
}

/// `itw_scaler_connections_closed_total` by listener and reason: a Relay
/// connection the scaler's guard closed shows here, one that broke
/// elsewhere does not.
async fn scaler_closed_connections(metrics: SocketAddr) -> anyhow::Result<String> {
    let body = reqwest::get(format!("http://{metrics}/metrics"))
        .await?
        .text()
        .await?;
    let closed: Vec<String> = itw_telemetry::exposition::parse_samples(&body)
        .iter()
        .filter(|s| s.name == "itw_scaler_connections_closed_total")
        .map(|s| {
            format!(
                "{}/{} {}",
                s.label("listener").unwrap_or("?"),
                s.label("reason").unwrap_or("?"),
                s.value
            )
        })
        .collect();
    Ok(if closed.is_empty() {
        "none".into()
    } else {
        closed.join(", ")
    })
}

/// CPU seconds the process has used (user + system). /proc counts in
/// USER_HZ ticks, which Linux fixes at 100 for userspace.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    ensure!(
        args.scaler.grpc.ip().is_loopback() && args.scaler.metrics.ip().is_loopback(),
        "the load generator only targets loopback addresses"
    );
    ensure!(
        args.agents > 0 && args.services > 0 && args.services_per_agent > 0,
        "agents, services and services per agent must be > 0"
    );
    println!(
        "machine load average at start: {} ({} cores)",
        load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "scaler bench: {} services, {} agent streams x 1 batch/s x {} deltas, GetMetrics at {}/s for {} s",
        args.services, args.agents, args.deltas_per_batch, args.keda_rps, args.steady_secs
    );
    let relays = (args.relay_streams > 0).then(|| {
        println!(
            "  the agent streams reach the scaler over {} Relay streams (as {} relays carry them)",
            args.relay_streams, args.relay_streams
        );
        Arc::new(RelayMux::new(args.scaler.grpc, args.relay_streams))
    });

    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(Opened::default());
    // Read once the scaler serves: a scaler still starting reads low.
    drop(connect(args.scaler.grpc).await?);
    let rss_at_start = memory(args.scaler.pid)?.rss_kib;
    let started = Instant::now();
    let agents: Vec<_> = (0..args.agents)
        .map(|i| {
            tokio::spawn(steady_agent(
                Arc::clone(&args),
                relays.clone(),
                i,
                Arc::clone(&paused),
                Arc::clone(&stop),
                Arc::clone(&sent),
                Arc::clone(&opened),
            ))
        })
        .collect();
    // Every service reported once before KEDA starts asking.
    let warm_up = Duration::from_secs(3);
    tokio::time::sleep(warm_up).await;
    println!(
        "  {} of {} agent streams connected and sending after {:.1} s ({} opens retried{}; {} deltas sent)",
        opened.streams.load(Relaxed),
        args.agents,
        started.elapsed().as_secs_f64(),
        opened.retried.load(Relaxed),
        opened
            .first_retry
            .get()
            .map(|r| format!(", the first after {r}"))
            .unwrap_or_default(),
        sent.load(Relaxed)
    );

    let sent_before = sent.load(Relaxed);
    let applied_before = scaler_deltas_total(args.scaler.metrics).await?;
    let side_before = scaler_side::ScalerSide::scrape(args.scaler.metrics).await?;
    let steady_started = Instant::now();
    let cpu_before = cpu_secs(args.scaler.pid)?;
    let threads_before = threads::Threads::sample(args.scaler.pid)?;
    // KEDA runs elsewhere in a cluster: its calls get a thread of their own
    // here, so the time they wait is the scaler's, not this process's
    // thousands of simulated agents'.
    let keda_args = Arc::clone(&args);
    let latencies = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(get_metrics_latencies(&keda_args))
    })
    .await??;
    let steady_secs = steady_started.elapsed().as_secs_f64();
    let cpu_after = cpu_secs(args.scaler.pid)?;
    let threads_after = threads::Threads::sample(args.scaler.pid)?;
    let applied = scaler_deltas_total(args.scaler.metrics).await? - applied_before;
    let side_after = scaler_side::ScalerSide::scrape(args.scaler.metrics).await?;
    let queued = sent.load(Relaxed) - sent_before;
    let steady_cpu = (cpu_after - cpu_before) / steady_secs;
    let summary = |sorted: &[Duration]| {
        format!(
            "p50 {}, p99 {}, max {}",
            ms(percentile(sorted, 50.0)),
            ms(percentile(sorted, 99.0)),
            ms(sorted.last().copied().unwrap_or_default())
        )
    };
    println!(
        "GetMetrics latency ({} calls, ingest {:.0} deltas/s applied alongside): {}",
        latencies.corrected.len(),
        applied / steady_secs,
        summary(&latencies.corrected)
    );
    println!(
        "  corrected for coordinated omission: {} calls held back behind a slower one are charged from when they were due; uncorrected (from each send): {}",
        latencies.held_back,
        summary(&latencies.uncorrected)
    );
    println!("  {}", side_after.summary_since(&side_before));
    for line in threads_after.summary_since(&threads_before, steady_secs) {
        println!("  scaler threads: {line}");
    }
    println!(
        "  ingest: the scaler applied {applied:.0} deltas in {steady_secs:.1} s; the agents queued {queued} ({:.0}/s)",
        queued as f64 / steady_secs
    );
    println!(
        "scaler CPU in the steady phase: {:.1}% of one core; machine load average now {}",
        steady_cpu * 100.0,
        load_average()
    );
    let after_steady = memory(args.scaler.pid)?;
    let per_stream_kib =
        after_steady.rss_kib.saturating_sub(rss_at_start) as f64 / args.agents as f64;
    println!("scaler memory after the steady phase: {after_steady}");
    println!(
        "scaler RSS per agent stream: {:.1} KiB ((VmRSS {} kB after the steady phase - {rss_at_start} kB at start) / {} streams; includes the series they report)",
        per_stream_kib, after_steady.rss_kib, args.agents
    );

    paused.store(true, Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = scaler_deltas_total(args.scaler.metrics).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_secs(args.scaler.pid)?;
    let begin = Instant::now();
    let end = begin + Duration::from_secs(args.throughput_secs);
    let hoses: Vec<_> = (0..args.firehoses)
        .map(|i| tokio::spawn(firehose(Arc::clone(&args), i, end, Arc::clone(&acked))))
        .collect();
    for hose in hoses {
        hose.await??;
    }
    let elapsed = begin.elapsed().as_secs_f64();
    let cpu = cpu_secs(args.scaler.pid)? - cpu_before;
    let after = scaler_deltas_total(args.scaler.metrics).await?;
    let acked = acked.load(Relaxed);
    println!(
        "ingest throughput: {:.0} deltas/s ({} deltas in {:.2} s over {} streams, batches of {}; scaler counted {})",
        acked as f64 / elapsed,
        acked,
        elapsed,
        args.firehoses,
        args.firehose_batch,
        after - before
    );
    ensure!(
        (after - before) as u64 == acked,
        "the scaler counted {} deltas, the load generator {acked}",
        after - before
    );
    println!(
        "scaler CPU in the throughput phase: {:.2} s ({:.0} deltas per CPU-second); machine load average now {}",
        cpu,
        acked as f64 / cpu.max(0.01),
        load_average()
    );
    let after_throughput = memory(args.scaler.pid)?;
    println!("scaler memory after the throughput phase: {after_throughput}");

    stop.store(true, Relaxed);
    paused.store(false, Relaxed);
    let mut generated = acked;
    for agent in agents {
        generated += agent.await??;
    }
    println!(
        "stream resets: {}, resumed: {}{}",
        opened.resets.load(Relaxed),
        opened.resumed.load(Relaxed),
        opened
            .first_reset
            .get()
            .map(|r| format!(" (first: {r})"))
            .unwrap_or_default()
    );
    println!(
        "  the scaler's closed connections (itw_scaler_connections_closed_total): {}",
        scaler_closed_connections(args.scaler.metrics).await?
    );
    let counted = scaler_bench_attempts(args.scaler.metrics).await?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    // One line per run for the README's sizing table; hack/bench
    // scaler_sizing collects them. Goals: design.md section 5, issue #18.
    println!(
        "sizing: {} agents x {} Services{}: RSS {:.0} MiB after the steady phase (goal <= 200 MiB), {:.1} KiB per agent stream (goal <= 30), peak {:.0} MiB; CPU {:.1}% of a core; GetMetrics p50 {} p99 {} (goal <= 1 ms); stream resets {}",
        args.agents,
        args.services,
        match args.relay_streams {
            0 => String::new(),
            n => format!(" over {n} Relay streams"),
        },
        mib(after_steady.rss_kib),
        per_stream_kib,
        mib(after_throughput.hwm_kib.max(after_steady.hwm_kib)),
        steady_cpu * 100.0,
        ms(percentile(&latencies.corrected, 50.0)),
        ms(percentile(&latencies.corrected, 99.0)),
        opened.resets.load(Relaxed)
    );
    println!(
        "attempts to namespace {NAMESPACE}: the agents and firehoses generated {generated}, the scaler's internal_tcp_attempts_total sums {counted}"
    );
    ensure!(
        counted == generated,
        "the scaler {} attempts: it counts {counted}, the load generator generated {generated}",
        if counted < generated {
            "lost"
        } else {
            "counted extra"
        }
    );
    Ok(())
}
