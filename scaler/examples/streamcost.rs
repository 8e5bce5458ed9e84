//! Where an agent stream's memory goes in a running `itw-scaler`, for
//! `hack/bench scaler_stream_cost` (issue #18): a controlled experiment, one
//! layer added to `--streams` agents at a time, the scaler's VmRSS read
//! after each (once it has settled), and the difference divided by the
//! streams printed per layer:
//!
//! 0. seed: one extra agent reports every Service's 4 series once, so the
//!    Services, their windows and the exported series exist before the
//!    measured agents come, and what those add is their own;
//! 1. connections: each agent opens its HTTP/2 connection (TCP, preface and
//!    SETTINGS; hyper and h2's per-connection state and buffers, tonic's
//!    service stack, the connection task);
//! 2. calls: each opens its Report call with a hello and reads the welcome
//!    (the call's h2 stream, tonic's decoder and encoder, the response
//!    channel and the stream task, the instance's identity);
//! 3. snapshots: each sends a snapshot of `--services-per-agent` x 4 series
//!    (the instance's per-series state, the stream's series cache, buffers
//!    grown to the snapshot's size);
//! 4. batches: each sends `--batches` steady batches of `--deltas-per-batch`
//!    deltas, one at a time, each acknowledged;
//! 5. calls ended (connections kept), then 6. connections closed: what
//!    comes back to the process, and so what was the call's and the
//!    connection's (the instances stay held: the scaler keeps a
//!    disconnected instance for INSTANCE_RETENTION).
//!
//! With `--relays R` the same agents arrive the way relays bring them
//! (#18): R Relay streams, each carrying its share of the agents as relayed
//! streams, so that layers 1 and 2 are R connections and calls plus the
//! agents' sessions, and what a relayed agent costs a replica can be put
//! beside what an agent's own connection costs ([`relayed`]).
//!
//! It only connects to the address it is given (hack/bench gives loopback).

mod bench_support;
#[path = "bench_support/fleet.rs"]
mod fleet;
#[path = "streamcost/relayed.rs"]
mod relayed;

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use futures::{StreamExt, stream};
use itw_proto::itw::v1::{
    ReportRequest, ingest_client::IngestClient, report_request, report_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use bench_support::{ScalerTarget, connect, load_average, memory};
use fleet::{hello, snapshot};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    scaler: ScalerTarget,
    /// Agent streams measured.
    #[arg(long, default_value_t = 2_000)]
    streams: usize,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Services each agent's snapshot names (4 series each).
    #[arg(long, default_value_t = 50)]
    services_per_agent: usize,
    #[arg(long, default_value_t = 3)]
    batches: u64,
    #[arg(long, default_value_t = 20)]
    deltas_per_batch: usize,
    /// Wait before each reading, for the scaler to finish the layer's work.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// Bring the agents over this many Relay streams instead of a
    /// connection each (0: a connection each).
    #[arg(long, default_value_t = 0)]
    relays: usize,
}

/// Agents opening at once, as a rollout would bring them.
const CONCURRENCY: usize = 64;

fn request(message: report_request::Message) -> ReportRequest {
    ReportRequest {
        message: Some(message),
    }
}

/// An open Report call.
struct Call {
    tx: mpsc::Sender<ReportRequest>,
    acks: tonic::Streaming<itw_proto::itw::v1::ReportResponse>,
}

impl Call {
    /// Hello as `node`'s instance, then the welcome.
    async fn open(channel: Channel, node: &str) -> anyhow::Result<Self> {
        let mut client = IngestClient::new(channel);
        let (tx, rx) = mpsc::channel(4);
        tx.send(request(hello(node, "streamcost"))).await?;
        let mut acks = client.report(ReceiverStream::new(rx)).await?.into_inner();
        match acks.message().await?.and_then(|r| r.message) {
            Some(report_response::Message::Welcome(_)) => Ok(Self { tx, acks }),
            other => bail!("{node}: expected welcome, got {other:?}"),
        }
    }

    /// Sends `message` and waits for the ack of `sequence`.
    async fn acked(
        &mut self,
        message: report_request::Message,
        sequence: u64,
    ) -> anyhow::Result<()> {
        self.tx.send(request(message)).await?;
        match self.acks.message().await?.and_then(|r| r.message) {
            Some(report_response::Message::Ack(ack)) if ack.sequence >= sequence => Ok(()),
            other => bail!("expected the ack of {sequence}, got {other:?}"),
        }
    }

    async fn snapshot(&mut self, services: impl Iterator<Item = usize>) -> anyhow::Result<()> {
        self.acked(snapshot(services), 0).await
    }
}

/// Agent `i`'s share of the fleet: the first of its Services.
fn first_service(args: &Args, i: usize) -> usize {
    i * args.services / args.streams
}

/// Agent `i`'s snapshot.
fn agent_snapshot(args: &Args, i: usize) -> report_request::Message {
    let first = first_service(args, i);
    snapshot((0..args.services_per_agent).map(|k| (first + k) % args.services))
}

/// Agent `i`'s steady batch `sequence`.
fn agent_batch(args: &Args, i: usize, sequence: u64) -> report_request::Message {
    fleet::batch(
        first_service(args, i),
        args.services_per_agent,
        args.services,
        args.deltas_per_batch,
        sequence,
    )
}

/// Runs `each` on every item, `CONCURRENCY` at a time, results in order.
async fn for_each<T, U, F, Fut>(items: Vec<T>, each: F) -> anyhow::Result<Vec<U>>
where
    F: Fn(usize, T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<U>>,
{
    stream::iter(items.into_iter().enumerate().map(|(i, item)| each(i, item)))
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Reads the scaler's RSS once it has settled, and prints what the layer
/// added per stream.
struct Readings {
    pid: u32,
    streams: usize,
    settle: Duration,
    last_kib: u64,
    rows: Vec<(String, i64)>,
}

impl Readings {
    async fn read(&mut self, layer: &str) -> anyhow::Result<()> {
        tokio::time::sleep(self.settle).await;
        let now = memory(self.pid)?;
        let added = now.rss_kib as i64 - self.last_kib as i64;
        println!(
            "{layer}: {now}; {added:+} kB, {:+.1} KiB per stream",
            added as f64 / self.streams as f64
        );
        self.rows.push((layer.to_owned(), added));
        self.last_kib = now.rss_kib;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let grpc = args.scaler.grpc;
    println!(
        "stream cost: {} agents, {} Services x 4 series each (machine load average {})",
        args.streams,
        args.services_per_agent,
        load_average()
    );

    let mut seed = Call::open(connect(grpc).await?, "seed").await?;
    let mut readings = Readings {
        pid: args.scaler.pid,
        streams: args.streams,
        settle: Duration::from_secs(args.settle_secs),
        last_kib: memory(args.scaler.pid)?.rss_kib,
        rows: Vec::new(),
    };
    println!("before the seed: VmRSS {} kB", readings.last_kib);
    seed.snapshot(0..args.services)
        .await
        .context("seed snapshot")?;
    readings
        .read("0. seed (every Service's 4 series, one agent)")
        .await?;

    if args.relays > 0 {
        relayed::layers(&args, &mut readings).await?;
    } else {
        connections(&args, &mut readings).await?;
    }
    drop(seed);

    let total: i64 = readings
        .rows
        .iter()
        .skip(1)
        .take(4)
        .map(|(_, kib)| kib)
        .sum();
    let over = if args.relays > 0 {
        format!("{} Relay streams", args.relays)
    } else {
        "a connection each".to_owned()
    };
    println!(
        "per agent stream (layers 1-4, {over}): {:.1} KiB (goal <= 30)",
        total as f64 / args.streams as f64
    );
    Ok(())
}

/// The layers with a connection and a Report call per agent.
async fn connections(args: &Args, readings: &mut Readings) -> anyhow::Result<()> {
    let grpc = args.scaler.grpc;
    let channels = for_each((0..args.streams).collect(), |_, _| connect(grpc)).await?;
    readings.read("1. HTTP/2 connections").await?;

    let calls = for_each(channels, |i, channel| async move {
        let call = Call::open(channel.clone(), &format!("node-{i:05}")).await?;
        Ok((channel, call))
    })
    .await?;
    readings.read("2. Report calls (hello, welcome)").await?;

    let calls = for_each(calls, |i, (channel, mut call)| async move {
        call.acked(agent_snapshot(args, i), 0).await?;
        Ok((channel, call))
    })
    .await?;
    readings.read("3. snapshots").await?;

    let mut calls = calls;
    for sequence in 1..=args.batches {
        calls = for_each(calls, |i, (channel, mut call)| async move {
            call.acked(agent_batch(args, i, sequence), sequence).await?;
            Ok((channel, call))
        })
        .await?;
    }
    readings.read("4. batches").await?;

    let channels: Vec<Channel> = calls.into_iter().map(|(channel, _call)| channel).collect();
    readings.read("5. calls ended (connections kept)").await?;
    drop(channels);
    readings.read("6. connections closed").await?;
    Ok(())
}
