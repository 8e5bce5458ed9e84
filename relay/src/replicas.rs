//! The replicas this relay serves: SCALER_ADDR resolved to every address
//! behind it, again every RESOLVE_INTERVAL and, at most once a second, when
//! an agent names an address not resolved yet. Each resolved replica gets
//! its Relay stream ([`crate::upstream`]); a replica no longer resolved
//! loses it (its agents' streams end and they follow the new set).
//!
//! An agent's `itw-replica` header is only ever looked up here: the relay
//! connects to nothing an agent names.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use itw_proto::addr::HostPort;
use parking_lot::{Mutex, RwLock};
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    link::Link,
    upstream::{self, UpstreamContext},
};

/// The request header naming the replica an agent's stream is for: the
/// contract's, one copy for the agent and the relay.
pub use itw_proto::itw::v1::REPLICA_HEADER;
/// Least time between two resolutions asked for by unknown replicas.
pub const MISS_RESOLVE_GAP: Duration = Duration::from_secs(1);
/// Longest an agent's stream waits for a resolution it asked for.
const MISS_RESOLVE_WAIT: Duration = Duration::from_secs(2);

/// One resolved replica and its Relay stream.
pub struct Replica {
    link: watch::Receiver<Option<Arc<Link>>>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Replica {
    /// The current Relay stream, waiting up to `wait` for one to come up.
    pub async fn link(&self, wait: Duration) -> Option<Arc<Link>> {
        let mut link = self.link.clone();
        let found = tokio::time::timeout(wait, link.wait_for(Option::is_some)).await;
        match found {
            Ok(Ok(current)) => current.clone(),
            _ => None,
        }
    }
}

/// The resolved replicas.
pub struct Replicas {
    scalers: Vec<HostPort>,
    resolve_interval: Duration,
    ctx: Arc<UpstreamContext>,
    known: RwLock<HashMap<SocketAddr, Arc<Replica>>>,
    /// Bumped after every resolution.
    resolved: watch::Sender<u64>,
    resolve_now: Notify,
    last_miss: Mutex<Option<Instant>>,
}

impl Replicas {
    pub fn new(
        scalers: Vec<HostPort>,
        resolve_interval: Duration,
        ctx: Arc<UpstreamContext>,
    ) -> Arc<Self> {
        Arc::new(Self {
            scalers,
            resolve_interval,
            ctx,
            known: RwLock::new(HashMap::new()),
            resolved: watch::Sender::new(0),
            resolve_now: Notify::new(),
            last_miss: Mutex::new(None),
        })
    }

    /// The replicas resolved now.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.known.read().keys().copied().collect()
    }

    /// The replica an agent's header names, if this relay resolved it; a
    /// miss asks for one resolution (at most every [`MISS_RESOLVE_GAP`]) and
    /// waits for it.
    pub async fn find(&self, addr: SocketAddr) -> Option<Arc<Replica>> {
        if let Some(replica) = self.known.read().get(&addr) {
            return Some(Arc::clone(replica));
        }
        {
            let mut last = self.last_miss.lock();
            let now = Instant::now();
            if last.is_some_and(|at| now.duration_since(at) < MISS_RESOLVE_GAP) {
                return None;
            }
            *last = Some(now);
        }
        let mut resolved = self.resolved.subscribe();
        resolved.mark_unchanged();
        self.resolve_now.notify_one();
        let _ = tokio::time::timeout(MISS_RESOLVE_WAIT, resolved.changed()).await;
        self.known.read().get(&addr).cloned()
    }

    /// Resolves SCALER_ADDR until `stop`, then stops every Relay stream.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let mut found: Vec<(SocketAddr, String)> = Vec::new();
            let mut complete = true;
            for target in &self.scalers {
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
            self.reconcile(&found, complete, &stop);
            self.resolved.send_modify(|n| *n += 1);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.resolve_interval) => {}
                () = self.resolve_now.notified() => {}
            }
        }
        let replicas: Vec<_> = self.known.write().drain().collect();
        for (_, replica) in replicas {
            replica.stop.cancel();
            let task = replica.task.lock().take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
    }

    /// Starts Relay streams to new replicas; stops those of replicas gone,
    /// but only after a complete resolution (a failed lookup says nothing
    /// about the replicas behind it).
    fn reconcile(&self, found: &[(SocketAddr, String)], complete: bool, stop: &CancellationToken) {
        let mut known = self.known.write();
        if complete {
            known.retain(|addr, replica| {
                let keep = found.iter().any(|(a, _)| a == addr);
                if !keep {
                    tracing::info!(replica = %addr, "scaler replica gone; ending its Relay stream");
                    replica.stop.cancel();
                    self.ctx.metrics.replica_gone(*addr);
                }
                keep
            });
        }
        for (addr, domain) in found {
            if known.contains_key(addr) {
                continue;
            }
            tracing::info!(replica = %addr, "scaler replica found; opening its Relay stream");
            let (link_tx, link_rx) = watch::channel(None);
            let token = stop.child_token();
            let task = tokio::spawn(upstream::run(
                Arc::clone(&self.ctx),
                *addr,
                domain.clone(),
                link_tx,
                token.clone(),
                stop.clone(),
            ));
            known.insert(
                *addr,
                Arc::new(Replica {
                    link: link_rx,
                    stop: token,
                    task: Mutex::new(Some(task)),
                }),
            );
        }
        self.ctx
            .metrics
            .replicas
            .set(i64::try_from(known.len()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use crate::{auth::AgentToken, config::Limits, config::TokenSource, metrics::RelayMetrics};

    use super::*;

    fn replicas(scalers: &str) -> Arc<Replicas> {
        Replicas::new(
            HostPort::parse_list(scalers, "x:1").unwrap(),
            Duration::from_secs(3600),
            Arc::new(UpstreamContext {
                token: Arc::new(AgentToken::load(&TokenSource::None).unwrap()),
                tls: None,
                limits: Limits::default(),
                metrics: Arc::new(RelayMetrics::default()),
            }),
        )
    }

    #[tokio::test]
    async fn only_resolved_replicas_are_found_and_a_miss_resolves_at_most_once_a_second() {
        // Nothing listens on port 9 of these: the Relay streams just retry.
        let replicas = replicas("127.0.0.1:9,127.0.0.2:9");
        let stop = CancellationToken::new();
        let mut resolved = replicas.resolved.subscribe();
        let run = tokio::spawn(Arc::clone(&replicas).run(stop.clone()));
        resolved.wait_for(|n| *n == 1).await.unwrap();
        let mut addrs = replicas.addrs();
        addrs.sort();
        assert_eq!(
            addrs,
            [
                "127.0.0.1:9".parse().unwrap(),
                "127.0.0.2:9".parse().unwrap()
            ] as [SocketAddr; 2]
        );
        assert!(
            replicas
                .find("127.0.0.1:9".parse().unwrap())
                .await
                .is_some()
        );
        assert_eq!(*resolved.borrow(), 1, "a hit resolves nothing");
        // A miss asks for one resolution and waits for it...
        assert!(
            replicas
                .find("127.0.0.3:9".parse().unwrap())
                .await
                .is_none()
        );
        assert_eq!(*resolved.borrow(), 2);
        // ...but not again within MISS_RESOLVE_GAP, however many agents miss.
        assert!(
            replicas
                .find("127.0.0.4:9".parse().unwrap())
                .await
                .is_none()
        );
        assert_eq!(*resolved.borrow(), 2);
        assert_eq!(replicas.ctx.metrics.replicas.get(), 2);
        stop.cancel();
        run.await.unwrap();
        assert!(
            replicas.addrs().is_empty(),
            "stopping ends every Relay stream"
        );
    }
}
