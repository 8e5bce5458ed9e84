//! The node's kube-proxy (or socket load balancer agent): watches Services
//! and EndpointSlices on the mock API server, as the agent does, and
//! programs the datapath from them `lag` after each change, as kube-proxy's
//! sync (and Cilium's agent) do on a busy node. The first sync, once both
//! lists are in, is applied at once: a node the lab starts is already
//! running.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{StreamExt, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api,
    runtime::watcher::{self, Event},
};
use parking_lot::Mutex;
use tokio::{sync::watch, time::Instant};

use super::{
    datapath::{
        Frontend, frontends,
        iptables::{self, Family},
        nftables,
        socklb::SocketLb,
    },
    netns::Netns,
};

/// What a sync writes to.
pub enum Programmer {
    Iptables {
        node: Arc<Netns>,
        chains4: std::collections::BTreeSet<String>,
        chains6: std::collections::BTreeSet<String>,
    },
    Nftables {
        node: Arc<Netns>,
    },
    SocketLb(Box<SocketLb>),
}

impl Programmer {
    fn program(&mut self, frontends: &[Frontend]) -> anyhow::Result<()> {
        match self {
            Self::Iptables {
                node,
                chains4,
                chains6,
            } => {
                for (family, chains) in [(Family::V4, chains4), (Family::V6, chains6)] {
                    let (rules, now) = iptables::render(frontends, family, chains);
                    iptables::apply(node, family, &rules)?;
                    *chains = now;
                }
                Ok(())
            }
            Self::Nftables { node } => nftables::apply(node, &nftables::render(frontends)),
            Self::SocketLb(lb) => lb.apply(frontends),
        }
    }
}

/// What the datapath says now, for the lab to wait on.
#[derive(Clone, Debug, Default)]
pub struct Synced {
    /// Syncs applied so far.
    pub syncs: u64,
    pub frontends: Vec<Frontend>,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    pub synced: watch::Receiver<Synced>,
    task: tokio::task::JoinHandle<()>,
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct Objects {
    services: BTreeMap<(String, String), Service>,
    slices: BTreeMap<(String, String), EndpointSlice>,
    services_listed: bool,
    slices_listed: bool,
}

impl Objects {
    fn frontends(&self) -> Vec<Frontend> {
        let services: Vec<Service> = self.services.values().cloned().collect();
        let slices: Vec<EndpointSlice> = self.slices.values().cloned().collect();
        frontends(&services, &slices)
    }
}

fn key<K: kube::Resource>(object: &K) -> (String, String) {
    let meta = object.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

enum Seen {
    Service(Box<Event<Service>>),
    Slice(Box<Event<EndpointSlice>>),
}

/// Starts watching and programming.
pub fn start(client: kube::Client, mut programmer: Programmer, lag: Duration) -> Proxy {
    let (tx, synced) = watch::channel(Synced::default());
    let errors = Arc::new(Mutex::new(Vec::new()));
    let reported = errors.clone();
    let task = tokio::spawn(async move {
        let services = watcher::watcher(Api::<Service>::all(client.clone()), Default::default())
            .map(|e| e.map(|e| Seen::Service(Box::new(e))))
            .boxed();
        let slices = watcher::watcher(Api::<EndpointSlice>::all(client), Default::default())
            .map(|e| e.map(|e| Seen::Slice(Box::new(e))))
            .boxed();
        let mut events = stream::select(services, slices);
        let mut objects = Objects::default();
        let mut pending: std::collections::VecDeque<(Instant, Vec<Frontend>)> = Default::default();
        let mut first = true;
        loop {
            let next_due = pending.front().map(|(at, _)| *at);
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { break };
                    let event = match event {
                        Ok(event) => event,
                        Err(error) => {
                            reported.lock().push(format!("watch: {error}"));
                            continue;
                        }
                    };
                    apply_event(&mut objects, event);
                    if !(objects.services_listed && objects.slices_listed) {
                        continue;
                    }
                    let at = if first { Instant::now() } else { Instant::now() + lag };
                    first = false;
                    pending.push_back((at, objects.frontends()));
                }
                () = sleep_until(next_due), if next_due.is_some() => {
                    let Some((_, frontends)) = pending.pop_front() else { continue };
                    if let Err(error) = programmer.program(&frontends) {
                        reported.lock().push(format!("programming the datapath: {error:#}"));
                        continue;
                    }
                    tx.send_modify(|s| {
                        s.syncs += 1;
                        s.frontends = frontends;
                    });
                }
            }
        }
    });
    Proxy {
        synced,
        task,
        errors,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn apply_event(objects: &mut Objects, event: Seen) {
    match event {
        Seen::Service(event) => apply(&mut objects.services, &mut objects.services_listed, *event),
        Seen::Slice(event) => apply(&mut objects.slices, &mut objects.slices_listed, *event),
    }
}

fn apply<K: kube::Resource + Clone>(
    store: &mut BTreeMap<(String, String), K>,
    listed: &mut bool,
    event: Event<K>,
) {
    match event {
        Event::Apply(object) | Event::InitApply(object) => {
            store.insert(key(&object), object);
        }
        Event::Delete(object) => {
            store.remove(&key(&object));
        }
        Event::Init => store.clear(),
        Event::InitDone => *listed = true,
    }
}
