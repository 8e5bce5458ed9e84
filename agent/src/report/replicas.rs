//! Following the scaler's replicas: each address in `SCALER_ADDR` resolved to
//! every address behind it, one stream per address, started and stopped as
//! the set changes.

use std::{collections::HashMap, net::SocketAddr, str::FromStr, sync::Arc};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ReportContext, stream};

/// `SCALER_ADDR`: a host (DNS name or IP) and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalerAddr {
    pub host: String,
    pub port: u16,
}

impl ScalerAddr {
    /// The name the scaler's certificate must carry.
    pub fn domain(&self) -> &str {
        &self.host
    }
}

impl std::fmt::Display for ScalerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for ScalerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, "itw-scaler-headless.itw-system:9090")
    }
}

impl ScalerAddr {
    /// Parses host:port; `example` is what the error suggests instead.
    pub fn parse(s: &str, example: &str) -> Result<Self, String> {
        let s = s.trim();
        let s = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
            .unwrap_or(s);
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port; use host:port, e.g. {example}"))?;
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let host = match bracketed {
            Some(h) if h.parse::<std::net::Ipv6Addr>().is_ok() => h,
            Some(_) => return Err(format!("{s:?}: not an IPv6 address in brackets")),
            // Unbracketed, "::1:9090" is itself an IPv6 address: refuse the guess.
            None if host.contains(':') => {
                return Err(format!(
                    "{s:?}: an IPv6 address must be in brackets, e.g. [fd00::1]:9090"
                ));
            }
            None => host,
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {port:?} is not a port (1-65535)"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// `SCALER_ADDR`: one or more addresses, comma-separated.
pub fn parse_scaler_addrs(list: &str) -> Result<Vec<ScalerAddr>, String> {
    let mut addrs = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr: ScalerAddr = item.parse()?;
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(format!("{list:?} names no scaler"));
    }
    Ok(addrs)
}

struct Replica {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub(super) async fn run(ctx: Arc<ReportContext>, stop: CancellationToken) {
    let mut replicas: HashMap<SocketAddr, Replica> = HashMap::new();
    loop {
        let mut found: Vec<(SocketAddr, String)> = Vec::new();
        let mut complete = true;
        for target in &ctx.settings.scalers {
            match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                Ok(addrs) => {
                    let before = found.len();
                    found.extend(addrs.map(|a| (a, target.host.clone())));
                    if found.len() == before {
                        complete = false;
                        tracing::warn!(scaler = %target, "resolved to no address");
                    }
                }
                Err(error) => {
                    complete = false;
                    tracing::warn!(scaler = %target, %error, "not resolved");
                }
            }
        }
        // A failed lookup says nothing about the replicas behind it: keep
        // their streams (they retry on their own) and only add new ones.
        reconcile(&ctx, &stop, &mut replicas, &found, complete);
        ctx.metrics
            .endpoints
            .set(i64::try_from(replicas.len()).unwrap_or(i64::MAX));
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(ctx.settings.resolve_interval) => {}
            () = ctx.replicas_changed.notified() => {}
        }
    }
    // Every stream's token is a child of `stop`: they are flushing now.
    for (_, replica) in replicas {
        let _ = replica.task.await;
    }
}

fn reconcile(
    ctx: &Arc<ReportContext>,
    stop: &CancellationToken,
    replicas: &mut HashMap<SocketAddr, Replica>,
    found: &[(SocketAddr, String)],
    complete: bool,
) {
    if complete {
        replicas.retain(|addr, replica| {
            let keep = found.iter().any(|(a, _)| a == addr);
            if !keep {
                tracing::info!(%addr, "scaler replica gone; closing its stream");
                replica.stop.cancel();
            }
            keep
        });
    }
    for (addr, domain) in found {
        if replicas.contains_key(addr) {
            continue;
        }
        tracing::info!(%addr, "scaler replica found; opening a stream");
        let token = stop.child_token();
        let task = tokio::spawn(stream::run(
            ctx.clone(),
            *addr,
            domain.clone(),
            token.clone(),
        ));
        replicas.insert(*addr, Replica { stop: token, task });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scaler_addresses() {
        let ok = |s: &str, host: &str, port: u16| {
            assert_eq!(
                s.parse::<ScalerAddr>().unwrap(),
                ScalerAddr {
                    host: host.into(),
                    port
                },
                "{s}"
            );
        };
        ok(
            "itw-scaler-headless.itw-system:9090",
            "itw-scaler-headless.itw-system",
            9090,
        );
        ok("127.0.0.1:9090", "127.0.0.1", 9090);
        ok("[::1]:9090", "::1", 9090);
        ok("http://scaler:1", "scaler", 1);
        for bad in [
            "scaler",
            "scaler:0",
            "scaler:http",
            ":9090",
            "::1:9090",
            "scaler:70000",
        ] {
            assert!(bad.parse::<ScalerAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "[::1]:9090".parse::<ScalerAddr>().unwrap().to_string(),
            "[::1]:9090"
        );
        let list = parse_scaler_addrs(" a:1, b:2 ,a:1,").unwrap();
        assert_eq!(
            list.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["a:1", "b:2"]
        );
        assert!(parse_scaler_addrs(" , ").is_err());
        assert!(
            parse_scaler_addrs("a:1,b")
                .unwrap_err()
                .contains("\"b\" has no port")
        );
    }
}
