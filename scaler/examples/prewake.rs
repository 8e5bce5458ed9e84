//! Pre-wake bench for `hack/bench prewake`: how long after the wake batch of
//! a chain's first Service every `prewake: "true"` stream of the chain says
//! `true`, beside the first Service's own plain stream.
//!
//! Each round teaches a fresh chain s0 -> s1 -> ... (`--chain` Services) with
//! a batch of edges alone, opens one prewake StreamIsActive per Service and a
//! plain one for s0 (each read to its first `false`), then sends one wake
//! batch for s0 and times each stream's `true` from just before the send.
//! Issue #15's goal: the whole chain active within the same second as s0;
//! the design's activation target for one Service is p99 <= 1 ms, so the
//! chain's last `true` is printed beside s0's plain one.
//!
//! It only connects to the scaler it is given (loopback, from hack/bench);
//! every wait is bounded.

mod bench_support;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bench_support::{ScalerTarget, connect, load_average, now_ms};
use clap::Parser;
use itw_proto::{
    externalscaler::{ScaledObjectRef, external_scaler_client::ExternalScalerClient},
    itw::v1::{
        Batch, Edge, Hello, PROTOCOL_VERSION, ReportRequest, ReportResponse, Series, SeriesCount,
        Snapshot, ingest_client::IngestClient, report_request, report_response,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    target: ScalerTarget,
    /// Rounds, each with a chain of its own.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Services in each chain.
    #[arg(long, default_value_t = 3)]
    chain: usize,
}

const NAMESPACE: &str = "prewake-bench";
/// Longest wait for any one answer.
const PATIENCE: Duration = Duration::from_secs(10);

struct Agent {
    tx: mpsc::Sender<ReportRequest>,
    rx: Streaming<ReportResponse>,
    sequence: u64,
}

impl Agent {
    async fn open(channel: Channel) -> anyhow::Result<Self> {
        let (tx, requests) = mpsc::channel(16);
        let rx = IngestClient::new(channel)
            .report(ReceiverStream::new(requests))
            .await
            .context("opening the report stream")?
            .into_inner();
        let mut agent = Self {
            tx,
            rx,
            sequence: 0,
        };
        let instance = format!("prewake-bench-{}", std::process::id());
        agent
            .send(report_request::Message::Hello(Hello {
                node_name: "bench-node".into(),
                instance_id: instance,
                protocol_version: PROTOCOL_VERSION,
                instance_secret: format!("secret-of-the-prewake-bench-{}", now_ms()),
            }))
            .await?;
        match agent.next().await? {
            report_response::Message::Welcome(_) => {}
            other => bail!("expected welcome, got {other:?}"),
        }
        agent
            .send(report_request::Message::Snapshot(Snapshot {
                through_sequence: 0,
                taken_at_unix_ms: now_ms(),
                totals: vec![],
                history: vec![],
                edges: vec![],
            }))
            .await?;
        agent.ack().await?;
        Ok(agent)
    }

    async fn send(&self, message: report_request::Message) -> anyhow::Result<()> {
        self.tx
            .send(ReportRequest {
                message: Some(message),
            })
            .await
            .context("the report stream closed")
    }

    async fn next(&mut self) -> anyhow::Result<report_response::Message> {
        tokio::time::timeout(PATIENCE, self.rx.message())
            .await
            .context("no answer from the scaler")??
            .and_then(|r| r.message)
            .context("the report stream ended")
    }

    async fn ack(&mut self) -> anyhow::Result<()> {
        match self.next().await? {
            report_response::Message::Ack(_) => Ok(()),
            other => bail!("expected an ack, got {other:?}"),
        }
    }

    async fn batch(
        &mut self,
        wake: bool,
        deltas: Vec<SeriesCount>,
        edges: Vec<Edge>,
    ) -> anyhow::Result<()> {
        self.sequence += 1;
        self.send(report_request::Message::Batch(Batch {
            sequence: self.sequence,
            collected_at_unix_ms: now_ms(),
            wake,
            deltas,
            edges,
        }))
        .await
    }
}

fn service(round: usize, i: usize) -> String {
    format!("r{round}-s{i}")
}

fn trigger(service: &str, prewake: bool) -> ScaledObjectRef {
    let mut metadata = HashMap::from([
        ("service".to_owned(), service.to_owned()),
        ("namespace".to_owned(), NAMESPACE.to_owned()),
        ("window".to_owned(), "5s".to_owned()),
    ]);
    if prewake {
        metadata.insert("prewake".into(), "true".into());
    }
    ScaledObjectRef {
        name: service.to_owned(),
        namespace: NAMESPACE.to_owned(),
        scaler_metadata: metadata,
    }
}

/// Opens a StreamIsActive and reads its first answer, which must be `false`.
async fn idle_stream(
    keda: &mut ExternalScalerClient<Channel>,
    object: ScaledObjectRef,
) -> anyhow::Result<Streaming<itw_proto::externalscaler::IsActiveResponse>> {
    let mut stream = keda.stream_is_active(object).await?.into_inner();
    let first = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .context("no first answer")??
        .context("stream ended")?;
    if first.result {
        bail!("a fresh Service said active before any attempt");
    }
    Ok(stream)
}

/// Time from `t0` to the stream's `true`.
async fn until_true(
    mut stream: Streaming<itw_proto::externalscaler::IsActiveResponse>,
    t0: Instant,
) -> anyhow::Result<Duration> {
    let answer = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .context("no true within 10 s")??
        .context("stream ended")?;
    if !answer.result {
        bail!("expected true, got false");
    }
    Ok(t0.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn line(name: &str, mut values: Vec<Duration>, goal: &str) {
    values.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<34} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms   goal: {goal}",
        ms(percentile(&values, 0.5)),
        ms(percentile(&values, 0.99)),
        ms(percentile(&values, 1.0)),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.chain < 2 || args.rounds == 0 {
        bail!("--chain must be at least 2 and --rounds at least 1");
    }
    let channel = connect(args.target.grpc).await?;
    let mut agent = Agent::open(channel.clone()).await?;
    let mut keda = ExternalScalerClient::new(connect(args.target.grpc).await?);
    let (mut plain, mut head, mut tail, mut spread) = (vec![], vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let edges = (1..args.chain)
            .map(|i| Edge {
                from_namespace: NAMESPACE.into(),
                from_service: service(round, i - 1),
                to_namespace: NAMESPACE.into(),
                to_service: service(round, i),
                last_seen_unix_ms: now_ms(),
                declared: false,
            })
            .collect();
        agent.batch(false, vec![], edges).await?;
        agent.ack().await?;
        let first = service(round, 0);
        let plain_stream = idle_stream(&mut keda, trigger(&first, false)).await?;
        let mut chain = Vec::with_capacity(args.chain);
        for i in 0..args.chain {
            chain.push(idle_stream(&mut keda, trigger(&service(round, i), true)).await?);
        }
        let delta = SeriesCount {
            series: Some(Series {
                namespace: NAMESPACE.into(),
                service: first,
                port: 80,
                pod: String::new(),
                process_comm: "bench".into(),
            }),
            attempts: 1,
        };
        let t0 = Instant::now();
        agent.batch(true, vec![delta], vec![]).await?;
        let plain_task = tokio::spawn(until_true(plain_stream, t0));
        let tasks: Vec<_> = chain
            .into_iter()
            .map(|s| tokio::spawn(until_true(s, t0)))
            .collect();
        let mut times = Vec::with_capacity(tasks.len());
        for task in tasks {
            times.push(task.await??);
        }
        plain.push(plain_task.await??);
        agent.ack().await?;
        head.push(times[0]);
        let (min, max) = (
            times.iter().min().copied().unwrap_or_default(),
            times.iter().max().copied().unwrap_or_default(),
        );
        tail.push(max);
        spread.push(max - min);
    }
    println!(
        "prewake: {} rounds, chains of {} Services, one wake batch each (load average {})",
        args.rounds,
        args.chain,
        load_average()
    );
    line(
        "first Service, plain stream",
        plain,
        "p99 <= 1 ms (design: activation)",
    );
    line("first Service, prewake stream", head, "as the plain stream");
    line(
        "last of the chain true",
        tail,
        "within the same second as the first (issue #15)",
    );
    line(
        "first to last of the chain",
        spread,
        "<= 1000 ms (issue #15)",
    );
    println!(
        "scaler after the run ({} edges held): {}",
        args.rounds * (args.chain - 1),
        bench_support::memory(args.target.pid)?
    );
    Ok(())
}
