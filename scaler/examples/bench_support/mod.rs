//! What the scaler's load examples (`loadgen`, `memflood`) share: the flags
//! naming the scaler they drive, a channel to a scaler that may still be
//! starting, and the figures read about it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

/// The running scaler an example drives (hack/bench passes loopback ones).
#[derive(Debug, clap::Args)]
pub struct ScalerTarget {
    /// The scaler's gRPC address (loopback).
    #[arg(long)]
    pub grpc: SocketAddr,
    /// The scaler's metrics address (loopback).
    #[arg(long)]
    pub metrics: SocketAddr,
    /// The scaler's process id, for its memory figures.
    #[arg(long)]
    pub pid: u32,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A channel to `addr`, tried for 30 s: the scaler may still be starting.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e).context(format!("connecting to {addr}")),
        }
    }
}

/// The process's resident memory now and at its peak.
pub fn memory(pid: u32) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    Ok(format!(
        "VmRSS {}, VmHWM {}",
        field("VmRSS:"),
        field("VmHWM:")
    ))
}
