//! Following the scaler's replicas: each address in `SCALER_ADDR` resolved to
//! every address behind it, one stream per address, started and stopped as
//! the set changes.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ReportContext, stream};

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
