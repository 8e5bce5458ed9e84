//! Holding: a connect to a Service that has no ready endpoint is parked at a
//! listener of the agent instead of being refused, and handed over to the
//! Service once an endpoint is ready.
//!
//! The kernel side (cgroup connect programs) rewrites a held ClusterIP:port
//! to `park address:port` after counting the attempt, so activation reaches
//! the scaler as before; each held destination gets a listener of its own,
//! so the listener knows the destination from its port. The programs also
//! record each connect they park (with its caller's network namespace), and
//! a listener hands on only connections so recorded. Release takes the
//! destination out of the kernel's hold map first (new connects go straight
//! to the Service from then on), then tells the listener, whose parked
//! connections connect to the ClusterIP from their client's own network
//! namespace, with the agent's socket mark (which the programs let
//! through), and are spliced both ways for their lifetime.
//!
//! Holding is bounded: connects parked at once per Service and per node
//! (the programs admit against the caps), and the bytes clients sent that
//! the agent keeps.
//!
//! [`Holder`] is the bookkeeping, driven by the counting loop (which owns the
//! kernel side) with every service map event; listeners and connections run
//! as tasks on the runtime it is given.
//!
//! - [`settings`]: the policy and what holding runs with.
//! - [`park`]: one parking listener and its connections.
//! - [`netns`]: sockets in a client's network namespace.
//! - [`budget`]: what parked connections may use; [`slots`]: the kernel's
//!   per-Service admission counters.
//! - [`net`]: socket details; [`metrics`]: what `/metrics` shows;
//!   [`cold_start`]: a held destination's cold start by phase.

pub mod budget;
pub mod cold_start;
pub mod metrics;
pub mod net;
pub mod netns;
pub mod park;
pub mod settings;
pub mod slots;

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::Bound,
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, watch};

use self::{
    budget::HoldBudget,
    cold_start::HeldColdStart,
    metrics::ServiceLabels,
    netns::Dialer,
    park::{Parking, Phase},
    slots::Slots,
};
pub use self::{
    metrics::HoldMetrics,
    net::connect_marked,
    settings::{HoldError, HoldPolicy, HoldRequest, HoldSettings},
};
use crate::{
    capture::{Kernel, RedirectBook},
    process,
    resolve::{self, DestMap, MapChange, MapEvent, ServiceRef, ServiceState},
};

/// How long a parked connect's record may wait for its connection to reach
/// the parking listener: past a client's SYN retries (about two minutes),
/// nothing will come, and its place under the caps is given back.
const UNTAKEN_EXPIRY: Duration = Duration::from_secs(180);
/// Reaps between walks of the records for expired ones.
const EXPIRY_EVERY: u32 = 10;

/// A destination whose connects are parked now.
struct Held {
    service: ServiceRef,
    port: u16,
    phase: watch::Sender<Phase>,
    cold_start: Arc<HeldColdStart>,
}

/// The hold bookkeeping: which Services are held, their ClusterIP:ports, and
/// a listener per held destination.
pub struct Holder {
    settings: HoldSettings,
    runtime: tokio::runtime::Handle,
    metrics: Arc<HoldMetrics>,
    /// The Services the policy holds when they have no ready endpoint (under
    /// `annotated`, only the annotated ones: most clusters have few).
    services: HashMap<ServiceRef, ServiceState>,
    /// ClusterIP:ports (destinations without a pod) of every Service, sorted
    /// by Service, and each one's owner: compact, as every Service of the
    /// cluster is here (an annotation may come later).
    cluster: BTreeSet<(ServiceRef, SocketAddr)>,
    owner: DestMap<ServiceRef>,
    held: HashMap<SocketAddr, Held>,
    /// The keys of `held` by Service.
    held_index: BTreeSet<(ServiceRef, SocketAddr)>,
    /// Listeners closed since the last [`Holder::reap`]: (destination, port).
    closed_tx: mpsc::UnboundedSender<(SocketAddr, u16)>,
    closed_rx: mpsc::UnboundedReceiver<(SocketAddr, u16)>,
    redirects: Arc<dyn RedirectBook>,
    budget: Arc<HoldBudget>,
    dialer: Arc<Dialer>,
    slots: Slots,
    reaps: u32,
    /// Bytes were kept since the heap was last trimmed.
    trim_pending: bool,
}

impl Holder {
    /// `redirects`: what the programs parked, as the kernel side offers it.
    pub fn new(
        settings: HoldSettings,
        runtime: tokio::runtime::Handle,
        metrics: Arc<HoldMetrics>,
        redirects: Arc<dyn RedirectBook>,
    ) -> std::io::Result<Self> {
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        Ok(Self {
            budget: Arc::new(HoldBudget::new(settings.max_buffered_bytes)),
            dialer: Arc::new(Dialer::start(settings.netns_dir.clone())?),
            settings,
            runtime,
            metrics,
            services: HashMap::new(),
            cluster: BTreeSet::new(),
            owner: DestMap::default(),
            held: HashMap::new(),
            held_index: BTreeSet::new(),
            closed_tx,
            closed_rx,
            redirects,
            slots: Slots::default(),
            reaps: 0,
            trim_pending: false,
        })
    }

    /// Destinations held now.
    pub fn held(&self) -> BTreeSet<SocketAddr> {
        self.held.keys().copied().collect()
    }

    /// Takes in a service map event (before or after the destination table
    /// does) and holds or releases what it changed.
    pub fn apply(&mut self, kernel: &mut dyn Kernel, event: &MapEvent) {
        let touched = self.observe(event);
        for service in touched {
            self.reconcile(kernel, &service);
        }
        self.metrics
            .held_destinations
            .set(i64::try_from(self.held.len()).unwrap_or(i64::MAX));
    }

    /// Records what `event` says; returns the Services it may have changed.
    fn observe(&mut self, event: &MapEvent) -> BTreeSet<ServiceRef> {
        let mut touched = BTreeSet::new();
        match event {
            MapEvent::Reset(map) => {
                touched.extend(self.services.keys().cloned());
                touched.extend(self.held_index.iter().map(|(s, _)| s.clone()));
                self.services = map
                    .services
                    .iter()
                    .filter(|(_, state)| self.settings.asks(state))
                    .map(|(s, state)| (s.clone(), state.clone()))
                    .collect();
                self.cluster.clear();
                self.owner.clear();
                for (addr, target) in &map.destinations {
                    if target.pod.is_none() {
                        self.claim(*addr, &target.service);
                    }
                }
                touched.extend(self.services.keys().cloned());
            }
            MapEvent::Changes(changes) => {
                for change in changes {
                    match change {
                        MapChange::Set(addr, target) => {
                            if let Some(old) = self.unclaim(*addr) {
                                touched.insert(old);
                            }
                            if target.pod.is_none() {
                                self.claim(*addr, &target.service);
                                touched.insert(target.service.clone());
                            }
                        }
                        MapChange::Remove(addr) => {
                            if let Some(old) = self.unclaim(*addr) {
                                touched.insert(old);
                            }
                        }
                        MapChange::ServiceSet(service, state) => {
                            if self.settings.asks(state) {
                                self.services.insert(service.clone(), state.clone());
                            } else {
                                self.services.remove(service);
                            }
                            touched.insert(service.clone());
                        }
                        MapChange::ServiceRemoved(service) => {
                            self.services.remove(service);
                            touched.insert(service.clone());
                        }
                    }
                }
            }
        }
        // Only Services that are or were held can change anything.
        touched.retain(|s| self.services.contains_key(s) || self.held_by(s));
        touched
    }

    fn held_by(&self, service: &ServiceRef) -> bool {
        self.held_of(service).next().is_some()
    }

    /// `service`'s held destinations.
    fn held_of<'a>(&'a self, service: &'a ServiceRef) -> impl Iterator<Item = SocketAddr> + 'a {
        by_service(&self.held_index, service)
    }

    fn claim(&mut self, addr: SocketAddr, service: &ServiceRef) {
        let addr = resolve::canonical(addr);
        if let Some(old) = self
            .owner
            .insert(resolve::destination(addr), service.clone())
        {
            self.cluster.remove(&(old, addr));
        }
        self.cluster.insert((service.clone(), addr));
    }

    fn unclaim(&mut self, addr: SocketAddr) -> Option<ServiceRef> {
        let addr = resolve::canonical(addr);
        let service = self.owner.remove(&resolve::destination(addr))?;
        self.cluster.remove(&(service.clone(), addr));
        Some(service)
    }

    /// `service`'s ClusterIP:ports.
    fn cluster_addrs<'a>(
        &'a self,
        service: &'a ServiceRef,
    ) -> impl Iterator<Item = SocketAddr> + 'a {
        by_service(&self.cluster, service)
    }

    /// Holds `service`'s destinations or releases them, as its state says.
    fn reconcile(&mut self, kernel: &mut dyn Kernel, service: &ServiceRef) {
        let state = self.services.get(service);
        let wanted: BTreeSet<SocketAddr> = match state {
            Some(state) if self.settings.holds(state) => self
                .cluster_addrs(service)
                .filter(|a| self.settings.park_ip(*a).is_some())
                .collect(),
            _ => BTreeSet::new(),
        };
        let timeout = state
            .and_then(|s| s.hold_timeout)
            .unwrap_or(self.settings.default_timeout);
        let releasing: Vec<SocketAddr> = self
            .held_of(service)
            .filter(|addr| !wanted.contains(addr))
            .collect();
        let endpoint_ready =
            state.is_some_and(|s| s.ready_endpoints.is_some_and(|ready| ready > 0));
        for addr in releasing {
            self.release(kernel, addr, endpoint_ready);
        }
        for addr in wanted {
            match self.held.get(&addr) {
                Some(held) if &held.service == service => {
                    // The Service's hold timeout may have changed.
                    held.phase.send_if_modified(|phase| match phase {
                        Phase::Holding { timeout: now } if *now != timeout => {
                            *now = timeout;
                            true
                        }
                        _ => false,
                    });
                }
                Some(_) => {
                    // Re-attributed to this Service while held for another.
                    self.release(kernel, addr, false);
                    self.hold(kernel, addr, service, timeout);
                }
                None => self.hold(kernel, addr, service, timeout),
            }
        }
    }

    fn hold(
        &mut self,
        kernel: &mut dyn Kernel,
        dest: SocketAddr,
        service: &ServiceRef,
        timeout: Duration,
    ) {
        let Some(ip) = self.settings.park_ip(dest) else {
            return;
        };
        let listener = match std::net::TcpListener::bind((ip, 0))
            .and_then(net::widen_backlog)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(|l| Ok((l.local_addr()?.port(), l)))
        {
            Ok(listener) => listener,
            Err(error) => {
                self.metrics.hold_failures.inc();
                tracing::error!(%dest, service = %service, park_addr = %ip, %error, "cannot open a parking listener; connects to this destination are not held");
                return;
            }
        };
        let (port, listener) = listener;
        let Some(slot) = self.slots.take(service) else {
            self.metrics.hold_failures.inc();
            tracing::error!(%dest, service = %service, "every held-Service slot is in use; connects to this destination are not held");
            return;
        };
        if let Err(error) = kernel.hold(&resolve::destination(dest), port, slot) {
            self.metrics.hold_failures.inc();
            tracing::error!(%dest, service = %service, %error, "the kernel refused to hold this destination");
            let _ = kernel.forget_park(&resolve::destination(dest), port);
            return;
        }
        let (phase, phase_rx) = watch::channel(Phase::Holding { timeout });
        let cold_start = Arc::new(HeldColdStart::new(
            service.clone(),
            Arc::clone(&self.metrics.cold_start),
        ));
        let parking = Parking {
            cold_start: Arc::clone(&cold_start),
            dest,
            port,
            labels: ServiceLabels::of(service),
            mark: self.settings.mark,
            metrics: self.metrics.clone(),
            redirects: self.redirects.clone(),
            budget: self.budget.clone(),
            dialer: self.dialer.clone(),
        };
        let closed = self.closed_tx.clone();
        self.metrics.parking_listeners.inc();
        self.runtime.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => park::run(listener, parking, phase_rx).await,
                Err(error) => {
                    tracing::error!(%dest, %error, "cannot register a parking listener")
                }
            }
            let _ = closed.send((dest, port));
        });
        tracing::info!(%dest, service = %service, park = %SocketAddr::new(ip, port), ?timeout, "holding connects: the Service has no ready endpoint");
        self.held_index.insert((service.clone(), dest));
        self.held.insert(
            dest,
            Held {
                service: service.clone(),
                port,
                phase,
                cold_start,
            },
        );
    }

    /// New connects go straight to `dest` first, then the parked ones are
    /// handed over. `endpoint_ready`: because the Service has a ready
    /// endpoint now (not because it stopped asking to be held or left).
    fn release(&mut self, kernel: &mut dyn Kernel, dest: SocketAddr, endpoint_ready: bool) {
        let Some(held) = self.held.remove(&dest) else {
            return;
        };
        if endpoint_ready {
            held.cold_start.endpoint_ready(tokio::time::Instant::now());
        }
        self.held_index.remove(&(held.service.clone(), dest));
        if !self.held_by(&held.service) {
            self.slots.drain(&held.service);
        }
        if let Err(error) = kernel.unhold(&resolve::destination(dest)) {
            tracing::error!(%dest, %error, "the kernel refused to stop holding this destination");
        }
        tracing::info!(%dest, service = %held.service, park_port = held.port, "releasing held connects");
        // The listener ends (and reports to reap) once its connections have.
        let _ = held.phase.send(Phase::Released);
    }

    /// Forgets the parking ports of listeners that have closed (so
    /// getpeername() no longer maps them), tells the kernel which parked
    /// connections ended, forgets records nobody took, and gives memory
    /// back after a burst.
    pub fn reap(&mut self, kernel: &mut dyn Kernel) {
        while let Ok((dest, port)) = self.closed_rx.try_recv() {
            self.metrics.parking_listeners.dec();
            if let Err(error) = kernel.forget_park(&resolve::destination(dest), port) {
                tracing::warn!(%dest, port, %error, "forgetting a parking port failed");
            }
        }
        self.reaps = self.reaps.wrapping_add(1);
        if self.reaps.is_multiple_of(EXPIRY_EVERY) {
            self.expire(kernel);
        }
        self.slots.sync(kernel, &self.budget, &self.metrics);
        let buffered = self.budget.buffered();
        self.metrics
            .buffered_bytes
            .set(i64::try_from(buffered).unwrap_or(i64::MAX));
        if buffered > 0 {
            self.trim_pending = true;
        } else if self.trim_pending {
            self.trim_pending = false;
            process::return_freed_memory();
        }
    }

    fn expire(&mut self, kernel: &mut dyn Kernel) {
        let Some(cutoff) = process::monotonic_ns().checked_sub(UNTAKEN_EXPIRY.as_nanos() as u64)
        else {
            return;
        };
        match kernel.expire_redirects(cutoff) {
            Ok(slots) => {
                for slot in slots {
                    self.budget.finish(slot);
                    if let Some(service) = self.slots.owner(slot) {
                        self.metrics
                            .expired
                            .get_or_create(&ServiceLabels::of(service))
                            .inc();
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "forgetting parked connects nobody took failed"),
        }
    }
}

/// The addresses of `service` in a set sorted by Service.
fn by_service<'a>(
    set: &'a BTreeSet<(ServiceRef, SocketAddr)>,
    service: &'a ServiceRef,
) -> impl Iterator<Item = SocketAddr> + 'a {
    // The smallest SocketAddr: every address of `service` sorts after it.
    let first = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    set.range((Bound::Included((service.clone(), first)), Bound::Unbounded))
        .take_while(move |(s, _)| s == service)
        .map(|(_, addr)| *addr)
}

#[cfg(test)]
mod tests;
