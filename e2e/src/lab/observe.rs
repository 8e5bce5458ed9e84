//! What the lab reads back: `/metrics` and probes over HTTP, KEDA's
//! `StreamIsActive` as a real gRPC client, and what pod processes printed.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use itw_proto::externalscaler::{ScaledObjectRef, external_scaler_client::ExternalScalerClient};
pub use itw_telemetry::exposition::Sample;
use itw_telemetry::exposition::parse_samples;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    time::Instant,
};

/// `GET path` on `addr`: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("HTTP request timed out")??;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub async fn metrics(addr: SocketAddr) -> anyhow::Result<Vec<Sample>> {
    let (status, body) = http_get(addr, "/metrics").await?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(parse_samples(&body))
}

/// The sum of `name`'s samples whose labels include every pair of `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value as u64)
        .sum()
}

/// How long after reaching a count the agent is read again: past its next
/// full collection (COLLECT_INTERVAL, 1 s by default), so a count beyond the
/// one wanted shows too. A wake alone publishes only the woken counter.
const QUIET: Duration = Duration::from_millis(1300);

/// Polls `addr`'s metrics until `value` of them reaches `want` (or `limit`
/// passes); returns the value after a further [`QUIET`], which the caller
/// compares exactly.
pub async fn settle(
    addr: SocketAddr,
    limit: Duration,
    want: u64,
    value: impl Fn(&[Sample]) -> u64,
) -> u64 {
    let deadline = Instant::now() + limit;
    let mut last = 0;
    loop {
        if let Ok(samples) = metrics(addr).await {
            last = value(&samples);
            if last >= want {
                tokio::time::sleep(QUIET).await;
                return metrics(addr).await.map_or(last, |s| value(&s));
            }
        }
        if Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A KEDA-role `StreamIsActive` subscription: each value the scaler pushes.
pub async fn stream_is_active(
    scaler: SocketAddr,
    namespace: &str,
    service: &str,
) -> anyhow::Result<mpsc::UnboundedReceiver<bool>> {
    stream_is_active_with(scaler, namespace, service, &[]).await
}

/// [`stream_is_active`] with more trigger metadata than `service`.
pub async fn stream_is_active_with(
    scaler: SocketAddr,
    namespace: &str,
    service: &str,
    metadata: &[(&str, &str)],
) -> anyhow::Result<mpsc::UnboundedReceiver<bool>> {
    let mut client = ExternalScalerClient::connect(format!("http://{scaler}"))
        .await
        .context("connecting to the scaler as KEDA")?;
    let request = ScaledObjectRef {
        name: service.to_owned(),
        namespace: namespace.to_owned(),
        scaler_metadata: std::iter::once(("service", service))
            .chain(metadata.iter().copied())
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    };
    let mut stream = client
        .stream_is_active(request)
        .await
        .context("StreamIsActive")?
        .into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            if tx.send(message.result).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// What one connect of a pod process did (`pod client` prints one JSON line
/// per connect).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attempt {
    pub connected: bool,
    /// The errno of a failed connect (or of the exchange after it).
    pub errno: Option<i32>,
    /// getpeername() after connecting.
    pub peer: Option<String>,
    /// The server's reply line.
    pub reply: Option<String>,
}

pub fn parse_attempts(stdout: &str) -> anyhow::Result<Vec<Attempt>> {
    stdout
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("a pod process printed {line:?}"))?;
            Ok(Attempt {
                connected: v["connected"].as_bool().unwrap_or(false),
                errno: v["errno"].as_i64().map(|e| e as i32),
                peer: v["peer"].as_str().map(str::to_owned),
                reply: v["reply"].as_str().map(str::to_owned),
            })
        })
        .collect()
}

/// The scaler's dependency graph (`itw.v1.Graph/ListEdges`) with
/// `namespace` at either end, as sorted ("ns/from", "ns/to") pairs.
pub async fn edges(scaler: SocketAddr, namespace: &str) -> anyhow::Result<Vec<(String, String)>> {
    use itw_proto::itw::v1::{ListEdgesRequest, graph_client::GraphClient};
    let mut client = GraphClient::connect(format!("http://{scaler}"))
        .await
        .context("connecting to the scaler's Graph service")?;
    let response = client
        .list_edges(ListEdgesRequest {
            namespace: namespace.to_owned(),
        })
        .await
        .context("ListEdges")?
        .into_inner();
    let mut edges: Vec<(String, String)> = response
        .edges
        .into_iter()
        .map(|e| {
            (
                format!("{}/{}", e.from_namespace, e.from_service),
                format!("{}/{}", e.to_namespace, e.to_service),
            )
        })
        .collect();
    edges.sort();
    Ok(edges)
}
