//! What the scaler's load examples (`loadgen`, `memflood`, `prewake`,
//! `streamcost`) share: the flags naming the scaler they drive, a channel to
//! a scaler that may still be starting, and the figures read about it and
//! the machine.

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

/// The machine's load averages over 1, 5 and 15 minutes, printed beside
/// every timing and memory figure: the cores are shared.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// A process's resident memory now and at its peak, as /proc reports them.
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmRSS {} kB, VmHWM {} kB", self.rss_kib, self.hwm_kib)
    }
}

/// The resident memory of `pid` now and at its peak.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("/proc/{pid}/status has no {name}"))?;
        let value = line.trim().trim_end_matches("kB").trim();
        value
            .parse()
            .with_context(|| format!("/proc/{pid}/status: {name} {line:?} is not a count of kB"))
    };
    Ok(Memory {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
    })
}
