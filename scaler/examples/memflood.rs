//! Memory floods for `hack/bench scaler_memory` (#13 items 4 and 5): drives a
//! running `itw-scaler` on loopback with one oversized report and prints the
//! scaler's memory (VmRSS, VmHWM of `--pid`) before and after.
//!
//! - `history`: a KEDA-role GetMetrics asks for a `--window` (15m) window,
//!   which raises the history every destination keeps, then one agent sends
//!   a snapshot of `--destinations` destinations with `--seconds` seconds of
//!   per-second history each (about 14.9 MB with the defaults).
//! - `services`: one agent reports `--services` Services (one series each)
//!   in batches of `--batch` deltas, then `/metrics` is read once.
//!
//! It only ever connects to the addresses it is given; hack/bench gives it
//! loopback ones. Every wait is bounded.

mod bench_support;

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, ValueEnum};
use itw_proto::{
    externalscaler::{
        GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
    },
    itw::v1::{
        Batch, DestinationHistory, Hello, PROTOCOL_VERSION, ReportRequest, Series, SeriesCount,
        Snapshot, ingest_client::IngestClient, report_request, report_response,
    },
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use bench_support::{ScalerTarget, connect, load_average, memory, now_ms};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Flood {
    History,
    Services,
}

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    scaler: ScalerTarget,
    #[arg(long, value_enum)]
    flood: Flood,
    /// history: the window the KEDA-role call asks for.
    #[arg(long, default_value = "15m")]
    window: String,
    /// history: destinations in the snapshot.
    #[arg(long, default_value_t = 15_000)]
    destinations: usize,
    /// history: seconds of history per destination.
    #[arg(long, default_value_t = 901)]
    seconds: usize,
    /// services: Services reported.
    #[arg(long, default_value_t = 300_000)]
    services: usize,
    /// services: deltas per batch.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
}

fn request(m: report_request::Message) -> ReportRequest {
    ReportRequest { message: Some(m) }
}

fn series(service: String) -> Series {
    Series {
        namespace: "flood".into(),
        service,
        port: 80,
        pod: String::new(),
        process_comm: "curl".into(),
    }
}

/// The outcome of one message: its ack, or the status that ended the stream.
async fn outcome(responses: &mut tonic::Streaming<itw_proto::itw::v1::ReportResponse>) -> String {
    match tokio::time::timeout(Duration::from_secs(120), responses.message()).await {
        Err(_) => "no answer within 120 s".into(),
        Ok(Ok(Some(r))) => match r.message {
            Some(report_response::Message::Ack(a)) => format!("acked {}", a.sequence),
            other => format!("unexpected {other:?}"),
        },
        Ok(Ok(None)) => "stream ended".into(),
        Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = connect(args.scaler.grpc).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "scaler at start: {} (machine load average {})",
        memory(args.scaler.pid)?,
        load_average()
    );

    if let Flood::History = args.flood {
        let mut keda = ExternalScalerClient::new(channel.clone());
        let reply = keda
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(ScaledObjectRef {
                    name: "flood".into(),
                    namespace: "flood".into(),
                    scaler_metadata: [
                        ("service".to_owned(), "svc-0".to_owned()),
                        ("window".to_owned(), args.window.clone()),
                    ]
                    .into(),
                }),
                metric_name: "flood".into(),
            })
            .await;
        println!(
            "GetMetrics window={}: {}",
            args.window,
            match reply {
                Ok(_) => "ok".to_owned(),
                Err(status) => format!("{:?}: {}", status.code(), status.message()),
            }
        );
    }

    let mut client = IngestClient::new(channel).max_encoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(4);
    tx.send(request(report_request::Message::Hello(Hello {
        node_name: "flood-node".into(),
        instance_id: "flood-instance".into(),
        protocol_version: PROTOCOL_VERSION,
        instance_secret: "flood-secret-0123456789".into(),
    })))
    .await?;
    let mut responses = client.report(ReceiverStream::new(rx)).await?.into_inner();
    let history_seconds = match responses.message().await?.and_then(|r| r.message) {
        Some(report_response::Message::Welcome(w)) => w.history_seconds,
        other => bail!("expected welcome, got {other:?}"),
    };
    println!("welcome: history_seconds {history_seconds}");

    let started = Instant::now();
    match args.flood {
        Flood::History => {
            let now = now_ms();
            let first_second = now / 1000 - i64::try_from(args.seconds).unwrap_or(0) + 1;
            let snapshot = Snapshot {
                through_sequence: 0,
                taken_at_unix_ms: now,
                totals: (0..args.destinations)
                    .map(|i| SeriesCount {
                        series: Some(series(format!("svc-{i}"))),
                        attempts: args.seconds as u64,
                    })
                    .collect(),
                history: (0..args.destinations)
                    .map(|i| DestinationHistory {
                        namespace: "flood".into(),
                        service: format!("svc-{i}"),
                        port: 80,
                        first_second,
                        per_second: vec![1; args.seconds],
                    })
                    .collect(),
                edges: Vec::new(),
            };
            let message = request(report_request::Message::Snapshot(snapshot));
            println!(
                "snapshot: {} destinations x {} s, {:.1} MB encoded",
                args.destinations,
                args.seconds,
                message.encoded_len() as f64 / 1e6
            );
            tx.send(message).await?;
            println!("snapshot: {}", outcome(&mut responses).await);
        }
        Flood::Services => {
            tx.send(request(report_request::Message::Snapshot(Snapshot {
                through_sequence: 0,
                taken_at_unix_ms: now_ms(),
                totals: vec![],
                history: vec![],
                edges: Vec::new(),
            })))
            .await?;
            println!("empty snapshot: {}", outcome(&mut responses).await);
            let mut sequence = 0u64;
            let mut last = String::new();
            for start in (0..args.services).step_by(args.batch.max(1)) {
                sequence += 1;
                let end = (start + args.batch).min(args.services);
                tx.send(request(report_request::Message::Batch(Batch {
                    sequence,
                    collected_at_unix_ms: now_ms(),
                    wake: false,
                    deltas: (start..end)
                        .map(|i| SeriesCount {
                            series: Some(series(format!("svc-{i}"))),
                            attempts: 1,
                        })
                        .collect(),
                    edges: Vec::new(),
                })))
                .await?;
                last = outcome(&mut responses).await;
            }
            println!(
                "{} Services in {sequence} batches: last {last}",
                args.services
            );
        }
    }
    println!("applied in {:.1} s", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("scaler after the flood: {}", memory(args.scaler.pid)?);
    let body = reqwest::get(format!("http://{}/metrics", args.scaler.metrics))
        .await?
        .text()
        .await?;
    let pick = |name: &str| {
        body.lines()
            .filter(|l| l.starts_with(name))
            .collect::<Vec<_>>()
            .join("; ")
    };
    println!(
        "/metrics: {:.1} MB, {} internal_tcp_attempts_total series",
        body.len() as f64 / 1e6,
        body.lines()
            .filter(|l| l.starts_with("internal_tcp_attempts_total{"))
            .count()
    );
    for name in [
        "itw_scaler_window_buckets",
        "itw_scaler_services",
        "itw_scaler_refused_entries_total",
        "itw_scaler_rejected_streams_total",
    ] {
        let found = pick(name);
        if !found.is_empty() {
            println!("  {found}");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("scaler after /metrics: {}", memory(args.scaler.pid)?);
    drop(tx);
    Ok(())
}
