//! The resolver's state: the Services and EndpointSlices it knows, in compact
//! form, and the claim book derived from them.
//!
//! Each change of an object is turned into the exact destination changes it
//! causes: the claims the object made before and after are compared and only
//! the difference reaches the book (and, when the book's winner moves, the
//! [`MapChange`]s). A slice whose Service is unknown (not seen yet, or not
//! selected) claims nothing until the Service comes; a Service whose ports
//! change re-maps its slices.
//!
//! Each Service entry also caches its ready count (distinct ready endpoint
//! addresses over its slices), recounted from its own slices when one of
//! them changes, so a [`MapChange::ServiceSet`] goes out exactly when a
//! known Service's [`ServiceState`] changes.

mod pod_services;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use itw_common::Destination;

use super::{
    book::{ClaimBook, Claimant, Claimants, Rank, Renewed, socket_addr},
    extract::{self, Extracted, Malformed, Names, ServiceSpec, SliceSpec},
    objects::EndpointSliceObject,
};
use crate::resolve::{MapChange, ServiceMap, ServiceRef, ServiceState, Target, destination};

/// A table whose slots keep their numbers while they live (the claim book
/// refers to objects by slot). Slots are in fixed pages: growing by a page
/// never copies the others (a doubling vector of 10k entries would keep up
/// to half of itself as slack, and need twice its size while it grows).
#[derive(Debug)]
struct Slab<T> {
    pages: Vec<Box<[Option<T>]>>,
    free: Vec<u32>,
    next: u32,
    len: usize,
}

const SLOTS_PER_PAGE: usize = 512;

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            pages: Vec::new(),
            free: Vec::new(),
            next: 0,
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    fn locate(slot: u32) -> (usize, usize) {
        let slot = slot as usize;
        (slot / SLOTS_PER_PAGE, slot % SLOTS_PER_PAGE)
    }

    fn insert(&mut self, item: T) -> u32 {
        let slot = self.free.pop().unwrap_or_else(|| {
            let slot = self.next;
            // Slots stay far below 2^32: each is a live Kubernetes object.
            self.next = self.next.saturating_add(1);
            slot
        });
        let (page, i) = Self::locate(slot);
        while self.pages.len() <= page {
            self.pages.push(
                std::iter::repeat_with(|| None)
                    .take(SLOTS_PER_PAGE)
                    .collect(),
            );
        }
        self.pages[page][i] = Some(item);
        self.len += 1;
        slot
    }

    fn remove(&mut self, slot: u32) -> Option<T> {
        let (page, i) = Self::locate(slot);
        let item = self.pages.get_mut(page)?.get_mut(i)?.take();
        if item.is_some() {
            self.free.push(slot);
            self.len -= 1;
        }
        item
    }

    fn get(&self, slot: u32) -> Option<&T> {
        let (page, i) = Self::locate(slot);
        self.pages.get(page)?.get(i)?.as_ref()
    }

    fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        let (page, i) = Self::locate(slot);
        self.pages.get_mut(page)?.get_mut(i)?.as_mut()
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.pages
            .iter()
            .flat_map(|page| page.iter())
            .enumerate()
            .filter_map(|(i, item)| Some((u32::try_from(i).ok()?, item.as_ref()?)))
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.pages
            .iter_mut()
            .flat_map(|page| page.iter_mut())
            .filter_map(Option::as_mut)
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[derive(Debug)]
struct ServiceEntry {
    service: ServiceRef,
    /// `None` while only slices name the Service (it is not seen yet, or not
    /// selected): the entry then only holds the slices waiting for it.
    spec: Option<ServiceSpec>,
    slices: Vec<u32>,
    /// Distinct ready endpoint addresses over `slices`; kept current while
    /// tracking (and recounted by a rebuild), for spec-less entries too, so
    /// a Service that comes after its slices is announced with its count.
    ready: u32,
}

impl ServiceEntry {
    fn state(&self) -> Option<ServiceState> {
        let spec = self.spec.as_ref()?;
        Some(ServiceState {
            hold: spec.hold,
            hold_timeout: spec.hold_timeout,
            ready_endpoints: Some(self.ready),
            wakes: spec.wakes.to_vec(),
            exclude_sources: spec.exclude_sources.clone(),
        })
    }
}

#[derive(Debug)]
struct SliceEntry {
    name: Arc<str>,
    /// Slot of the Service entry the slice's label names.
    service: u32,
    spec: SliceSpec,
}

/// One IP:port an object claims.
#[derive(Clone, Debug)]
struct Claim {
    dest: Destination,
    target: Target,
    ready: bool,
}

/// Slot tables by namespace, then name: lookups by `&str` allocate nothing.
type Slots = HashMap<Arc<str>, HashMap<Arc<str>, u32>>;

fn slot_of(slots: &Slots, namespace: &str, name: &str) -> Option<u32> {
    slots.get(namespace)?.get(name).copied()
}

fn forget_slot(slots: &mut Slots, namespace: &str, name: &str) {
    if let Some(names) = slots.get_mut(namespace) {
        names.remove(name);
        if names.is_empty() {
            slots.remove(namespace);
        }
    }
}

#[derive(Debug, Default)]
pub struct ClusterState {
    names: Names,
    services: Slab<ServiceEntry>,
    service_slots: Slots,
    slices: Slab<SliceEntry>,
    slice_slots: Slots,
    book: ClaimBook,
    /// Service entries with a spec.
    known_services: usize,
    /// Objects deleted since the names were last collected: names of
    /// deleted objects are dropped once these reach half the names held,
    /// so churn without relists cannot grow the interner without bound.
    deleted_since_collection: usize,
    /// Whether the book is kept in step. Off until the first complete sync
    /// (every stream listed once), which builds it from scratch: until then
    /// object changes only update the objects.
    tracking: bool,
}

/// The objects as the claim book sees them.
struct Objects<'a> {
    services: &'a Slab<ServiceEntry>,
    slices: &'a Slab<SliceEntry>,
}

impl Claimants for Objects<'_> {
    fn claim_of(&self, claimant: Claimant, dest: &Destination) -> Option<(Target, Rank<'_>)> {
        match claimant.split() {
            Ok(slot) => {
                let entry = self.services.get(slot)?;
                let spec = entry.spec.as_ref()?;
                let claim = cluster_claims(&entry.service, spec)
                    .into_iter()
                    .find(|c| c.dest == *dest)?;
                Some((claim.target, cluster_rank(&entry.service)))
            }
            Err(slot) => {
                let slice = self.slices.get(slot)?;
                let entry = self.services.get(slice.service)?;
                let spec = entry.spec.as_ref()?;
                let claim = slice_claims_at(&entry.service, spec, &slice.spec, Some(dest))
                    .into_iter()
                    .next()?;
                let rank = slice_rank(&entry.service, &slice.name, claim.ready);
                Some((claim.target, rank))
            }
        }
    }

    fn describe(&self, claimant: Claimant) -> String {
        match claimant.split() {
            Ok(slot) => match self.services.get(slot) {
                Some(entry) => format!("Service {}", entry.service),
                None => format!("Service slot {slot}"),
            },
            Err(slot) => match self
                .slices
                .get(slot)
                .and_then(|s| Some((s, self.services.get(s.service)?)))
            {
                Some((slice, entry)) => format!(
                    "EndpointSlice {}/{} (Service {})",
                    entry.service.namespace, slice.name, entry.service
                ),
                None => format!("EndpointSlice slot {slot}"),
            },
        }
    }
}

/// Whether a claim that stands must be sent again: its target changed, or
/// its pod name moved to the slice's new block of names (the old block is
/// freed once nothing downstream points into it).
fn resend(was: &Target, now: &Target) -> bool {
    was != now
        || match (&was.pod, &now.pod) {
            (Some(was), Some(now)) => !was.same_block(now),
            _ => false,
        }
}

fn cluster_rank(service: &ServiceRef) -> Rank<'_> {
    Rank {
        class: Rank::CLUSTER_IP,
        namespace: &service.namespace,
        service: &service.name,
        slice: "",
    }
}

fn slice_rank<'a>(service: &'a ServiceRef, slice: &'a str, ready: bool) -> Rank<'a> {
    Rank {
        class: if ready { Rank::READY } else { Rank::NOT_READY },
        namespace: &service.namespace,
        service: &service.name,
        slice,
    }
}

/// Distinct ready endpoint addresses over `of`, counted in `scratch` (a
/// buffer reused across Services by a rebuild). An address listed in both
/// an IPv4 and an IPv6 slice (IPv4-mapped) is one address.
fn count_ready(slices: &Slab<SliceEntry>, of: &[u32], scratch: &mut Vec<IpAddr>) -> u32 {
    scratch.clear();
    for slice in of.iter().filter_map(|slot| slices.get(*slot)) {
        scratch.extend(
            slice
                .spec
                .endpoints
                .iter()
                .filter(|ep| ep.ready)
                .map(|ep| ep.ip.to_canonical()),
        );
    }
    scratch.sort_unstable();
    scratch.dedup();
    u32::try_from(scratch.len()).unwrap_or(u32::MAX)
}

/// Every ClusterIP x Service port, sorted by destination.
fn cluster_claims(service: &ServiceRef, spec: &ServiceSpec) -> Vec<Claim> {
    let mut claims = Vec::with_capacity(spec.cluster_ips.len() * spec.ports.len());
    for ip in &spec.cluster_ips {
        for port in &spec.ports {
            claims.push(Claim {
                dest: destination(SocketAddr::new(*ip, port.port)),
                target: Target {
                    service: service.clone(),
                    port: port.port,
                    pod: None,
                },
                ready: true,
            });
        }
    }
    claims.sort_by_key(|c| c.dest);
    claims.dedup_by(|b, a| a.dest == b.dest);
    claims
}

fn slice_claims(service: &ServiceRef, spec: &ServiceSpec, slice: &SliceSpec) -> Vec<Claim> {
    slice_claims_at(service, spec, slice, None)
}

/// Every endpoint address x slice port, each slice port standing for the
/// Service port of the same name, sorted by destination; only those at
/// `only` when given. One claim per destination: when two Service ports share
/// a target port the lower Service port is taken, when an address is listed
/// twice the ready listing (then the first pod name) is.
fn slice_claims_at(
    service: &ServiceRef,
    spec: &ServiceSpec,
    slice: &SliceSpec,
    only: Option<&Destination>,
) -> Vec<Claim> {
    // (port on the endpoint, Service port), lowest Service port first.
    let mut ports: Vec<(u16, u16)> = slice
        .ports
        .iter()
        .filter_map(|p| {
            let served = spec.ports.iter().find(|s| s.name == p.name)?;
            Some((p.port, served.port))
        })
        .collect();
    ports.sort_unstable();
    ports.dedup_by_key(|(on_endpoint, _)| *on_endpoint);

    let mut claims = Vec::new();
    for ep in slice.endpoints.iter() {
        for &(on_endpoint, served) in &ports {
            let dest = destination(SocketAddr::new(ep.ip, on_endpoint));
            if only.is_some_and(|o| *o != dest) {
                continue;
            }
            claims.push(Claim {
                dest,
                target: Target {
                    service: service.clone(),
                    port: served,
                    pod: ep.pod_name(),
                },
                ready: ep.ready,
            });
        }
    }
    claims.sort_by(|a, b| {
        a.dest
            .cmp(&b.dest)
            .then(b.ready.cmp(&a.ready))
            .then_with(|| a.target.pod.cmp(&b.target.pod))
    });
    claims.dedup_by(|b, a| a.dest == b.dest);
    claims
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn names(&mut self) -> &mut Names {
        &mut self.names
    }

    /// Services known (seen and selected).
    pub fn services(&self) -> usize {
        self.known_services
    }

    pub fn slices(&self) -> usize {
        self.slices.len()
    }

    /// Destinations mapped (once tracking).
    pub fn destinations(&self) -> usize {
        self.book.len()
    }

    pub fn tracking(&self) -> bool {
        self.tracking
    }

    /// Reads a slice, reusing the pod names of the slice as held now.
    pub fn extract_slice(
        &mut self,
        slice: &EndpointSliceObject,
        malformed: &mut Vec<Malformed>,
    ) -> Option<Extracted<SliceSpec>> {
        let meta = &slice.metadata;
        let previous = extract::identity(meta.namespace.as_deref(), meta.name.as_deref())
            .ok()
            .and_then(|(ns, name)| slot_of(&self.slice_slots, ns, name))
            .and_then(|slot| self.slices.get(slot))
            .map(|held| &held.spec);
        extract::slice(slice, previous, &mut self.names, malformed)
    }

    /// The slot of a Service entry, created (without spec) if absent.
    fn service_slot(&mut self, namespace: &Arc<str>, name: &Arc<str>) -> u32 {
        if let Some(slot) = slot_of(&self.service_slots, namespace, name) {
            return slot;
        }
        let slot = self.services.insert(ServiceEntry {
            service: ServiceRef::from_names(namespace.clone(), name.clone()),
            spec: None,
            slices: Vec::new(),
            ready: 0,
        });
        self.service_slots
            .entry(namespace.clone())
            .or_default()
            .insert(name.clone(), slot);
        slot
    }

    /// Counts a deletion; collects unused names now and then.
    fn deleted(&mut self) {
        self.deleted_since_collection += 1;
        if self.deleted_since_collection > self.names.len() / 2 + 64 {
            self.names.collect_garbage();
            self.deleted_since_collection = 0;
        }
    }

    /// Drops a Service entry that holds nothing any more.
    fn release_service(&mut self, slot: u32) {
        let Some(entry) = self.services.get(slot) else {
            return;
        };
        if entry.spec.is_some() || !entry.slices.is_empty() {
            return;
        }
        if let Some(entry) = self.services.remove(slot) {
            forget_slot(
                &mut self.service_slots,
                &entry.service.namespace,
                &entry.service.name,
            );
        }
    }

    /// Recounts a Service entry's ready endpoints after one of its slices
    /// came, changed or went, and announces a known Service whose count
    /// moved. Only while tracking: a rebuild recounts every entry.
    fn recount(&mut self, slot: u32, out: &mut Vec<MapChange>) {
        if !self.tracking {
            return;
        }
        let Some(entry) = self.services.get_mut(slot) else {
            return;
        };
        let ready = count_ready(&self.slices, &entry.slices, &mut Vec::new());
        if ready == entry.ready {
            return;
        }
        entry.ready = ready;
        if let Some(state) = entry.state() {
            out.push(MapChange::ServiceSet(entry.service.clone(), state));
        }
    }

    fn slice_claims_of(&self, slot: u32) -> Vec<Claim> {
        let Some(slice) = self.slices.get(slot) else {
            return Vec::new();
        };
        match self.services.get(slice.service) {
            Some(ServiceEntry {
                service,
                spec: Some(spec),
                ..
            }) => slice_claims(service, spec, &slice.spec),
            _ => Vec::new(),
        }
    }

    /// Brings the book from an object's `old` claims to its `new` ones (both
    /// sorted by destination); the objects already hold the new state.
    fn diff(
        &mut self,
        claimant: Claimant,
        old: Vec<Claim>,
        new: Vec<Claim>,
        out: &mut Vec<MapChange>,
    ) {
        let objects = Objects {
            services: &self.services,
            slices: &self.slices,
        };
        let rank = |claim: &Claim| -> Option<Rank<'_>> {
            match claimant.split() {
                Ok(slot) => Some(cluster_rank(&objects.services.get(slot)?.service)),
                Err(slot) => {
                    let slice = objects.slices.get(slot)?;
                    let entry = objects.services.get(slice.service)?;
                    Some(slice_rank(&entry.service, &slice.name, claim.ready))
                }
            }
        };
        let book = &mut self.book;
        let mut old = old.into_iter().peekable();
        let mut new = new.into_iter().peekable();
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(o), Some(n)) => o.dest.cmp(&n.dest),
            };
            match order {
                std::cmp::Ordering::Less => {
                    if let Some(gone) = old.next() {
                        book.unclaim(&objects, gone.dest, claimant, Some(out));
                    }
                }
                std::cmp::Ordering::Greater => {
                    if let Some(came) = new.next()
                        && let Some(r) = rank(&came)
                    {
                        book.claim(&objects, came.dest, claimant, came.target, r, Some(out));
                    }
                }
                std::cmp::Ordering::Equal => {
                    if let (Some(was), Some(now)) = (old.next(), new.next()) {
                        let target_changed = resend(&was.target, &now.target);
                        if (target_changed || was.ready != now.ready)
                            && let Some(r) = rank(&now)
                        {
                            book.reclaim(
                                &objects,
                                now.dest,
                                claimant,
                                Renewed {
                                    target: now.target,
                                    rank: r,
                                    target_changed,
                                },
                                Some(out),
                            );
                        }
                    }
                }
            }
        }
    }

    /// A Service was added or changed.
    pub fn apply_service(&mut self, svc: Extracted<ServiceSpec>, out: &mut Vec<MapChange>) {
        let slot = self.service_slot(&svc.namespace, &svc.name);
        let Some(entry) = self.services.get_mut(slot) else {
            return;
        };
        if entry.spec.as_ref() == Some(&svc.spec) {
            return;
        }
        let old = entry.spec.replace(svc.spec);
        if old.is_none() {
            self.known_services += 1;
        }
        if !self.tracking {
            return;
        }
        let service = entry.service.clone();
        let new_spec = entry.spec.as_ref();
        // New, or its annotations changed: its ready count is the entry's,
        // and a change of that is sent by the slice that made it.
        let announce = match (&old, new_spec) {
            (Some(o), Some(n)) => {
                (o.hold, o.hold_timeout, &o.wakes, &o.exclude_sources)
                    != (n.hold, n.hold_timeout, &n.wakes, &n.exclude_sources)
            }
            _ => true,
        };
        if announce && let Some(state) = entry.state() {
            out.push(MapChange::ServiceSet(service.clone(), state));
        }
        let new_claims = new_spec
            .map(|s| cluster_claims(&service, s))
            .unwrap_or_default();
        let ports_changed = old.as_ref().map(|o| &o.ports) != new_spec.map(|n| &n.ports);
        let slices = if ports_changed {
            entry.slices.clone()
        } else {
            Vec::new()
        };
        let old_claims = old
            .as_ref()
            .map(|s| cluster_claims(&service, s))
            .unwrap_or_default();
        self.diff(Claimant::service(slot), old_claims, new_claims, out);
        for slice in slices {
            let before = match (&old, self.slices.get(slice)) {
                (Some(old), Some(s)) => slice_claims(&service, old, &s.spec),
                _ => Vec::new(),
            };
            let after = self.slice_claims_of(slice);
            self.diff(Claimant::slice(slice), before, after, out);
        }
    }

    /// A Service was deleted (or stopped matching the selector).
    pub fn delete_service(&mut self, namespace: &str, name: &str, out: &mut Vec<MapChange>) {
        let Some(slot) = slot_of(&self.service_slots, namespace, name) else {
            return;
        };
        let Some(entry) = self.services.get_mut(slot) else {
            return;
        };
        let Some(old) = entry.spec.take() else {
            return;
        };
        self.known_services -= 1;
        if self.tracking {
            let service = entry.service.clone();
            let slices = entry.slices.clone();
            self.diff(
                Claimant::service(slot),
                cluster_claims(&service, &old),
                Vec::new(),
                out,
            );
            for slice in slices {
                let before = match self.slices.get(slice) {
                    Some(s) => slice_claims(&service, &old, &s.spec),
                    None => Vec::new(),
                };
                self.diff(Claimant::slice(slice), before, Vec::new(), out);
            }
            out.push(MapChange::ServiceRemoved(service));
        }
        self.release_service(slot);
        self.deleted();
    }

    /// An EndpointSlice was added or changed.
    pub fn apply_slice(&mut self, slice: Extracted<SliceSpec>, out: &mut Vec<MapChange>) {
        let service = self.service_slot(&slice.namespace, &slice.spec.service);
        let (slot, before, previous_service) =
            match slot_of(&self.slice_slots, &slice.namespace, &slice.name) {
                Some(slot) => {
                    let Some(held) = self.slices.get(slot) else {
                        return;
                    };
                    if held.service == service && held.spec == slice.spec {
                        return;
                    }
                    let before = if self.tracking {
                        self.slice_claims_of(slot)
                    } else {
                        Vec::new()
                    };
                    let previous = held.service;
                    if let Some(held) = self.slices.get_mut(slot) {
                        held.spec = slice.spec;
                        held.service = service;
                    }
                    (slot, before, Some(previous))
                }
                None => {
                    let slot = self.slices.insert(SliceEntry {
                        name: slice.name.clone(),
                        service,
                        spec: slice.spec,
                    });
                    self.slice_slots
                        .entry(slice.namespace.clone())
                        .or_default()
                        .insert(slice.name.clone(), slot);
                    (slot, Vec::new(), None)
                }
            };
        if previous_service != Some(service) {
            // New, or relabelled to another Service.
            if let Some(previous) = previous_service
                && let Some(entry) = self.services.get_mut(previous)
            {
                entry.slices.retain(|s| *s != slot);
            }
            if let Some(entry) = self.services.get_mut(service) {
                entry.slices.push(slot);
            }
        }
        if self.tracking {
            let after = self.slice_claims_of(slot);
            self.diff(Claimant::slice(slot), before, after, out);
        }
        self.recount(service, out);
        if let Some(previous) = previous_service
            && previous != service
        {
            self.recount(previous, out);
            self.release_service(previous);
        }
    }

    /// An EndpointSlice was deleted.
    pub fn delete_slice(&mut self, namespace: &str, name: &str, out: &mut Vec<MapChange>) {
        let Some(slot) = slot_of(&self.slice_slots, namespace, name) else {
            return;
        };
        let before = if self.tracking {
            self.slice_claims_of(slot)
        } else {
            Vec::new()
        };
        // Withdraw the claims while the slice still exists, so the book can
        // describe it; then forget it.
        if self.tracking {
            self.diff(Claimant::slice(slot), before, Vec::new(), out);
        }
        forget_slot(&mut self.slice_slots, namespace, name);
        if let Some(slice) = self.slices.remove(slot) {
            if let Some(entry) = self.services.get_mut(slice.service) {
                entry.slices.retain(|s| *s != slot);
            }
            self.recount(slice.service, out);
            self.release_service(slice.service);
        }
        self.deleted();
    }

    /// Replaces every Service in `scope` (one namespace, or all) with a fresh
    /// list. The book is stale afterwards: [`ClusterState::rebuild`] follows.
    pub fn replace_services(&mut self, scope: Option<&str>, fresh: Vec<Extracted<ServiceSpec>>) {
        let mut stale: HashSet<u32> = self
            .services
            .iter()
            .filter(|(_, e)| e.spec.is_some() && in_scope(scope, &e.service.namespace))
            .map(|(slot, _)| slot)
            .collect();
        for svc in fresh {
            let slot = self.service_slot(&svc.namespace, &svc.name);
            if let Some(entry) = self.services.get_mut(slot)
                && entry.spec.replace(svc.spec).is_none()
            {
                self.known_services += 1;
            }
            stale.remove(&slot);
        }
        for slot in stale {
            if let Some(entry) = self.services.get_mut(slot)
                && entry.spec.take().is_some()
            {
                self.known_services -= 1;
            }
            self.release_service(slot);
        }
    }

    /// Replaces every EndpointSlice in `scope` with a fresh list; as
    /// [`ClusterState::replace_services`].
    pub fn replace_slices(&mut self, scope: Option<&str>, fresh: Vec<Extracted<SliceSpec>>) {
        let mut stale: HashSet<(Arc<str>, Arc<str>)> = HashSet::new();
        for (namespace, names) in &self.slice_slots {
            if in_scope(scope, namespace) {
                stale.extend(names.keys().map(|n| (namespace.clone(), n.clone())));
            }
        }
        let mut ignored = Vec::new();
        let tracking = std::mem::replace(&mut self.tracking, false);
        for slice in fresh {
            stale.remove(&(slice.namespace.clone(), slice.name.clone()));
            self.apply_slice(slice, &mut ignored);
        }
        for (namespace, name) in stale {
            self.delete_slice(&namespace, &name, &mut ignored);
        }
        self.tracking = tracking;
    }

    /// Rebuilds the book from the objects and returns the complete map. From
    /// here on every object change is tracked.
    pub fn rebuild(&mut self) -> ServiceMap {
        self.book.clear();
        self.tracking = true;
        let mut scratch = Vec::new();
        for entry in self.services.values_mut() {
            entry.ready = count_ready(&self.slices, &entry.slices, &mut scratch);
        }
        let objects = Objects {
            services: &self.services,
            slices: &self.slices,
        };
        for (slot, entry) in self.services.iter() {
            let Some(spec) = &entry.spec else { continue };
            for claim in cluster_claims(&entry.service, spec) {
                self.book.claim(
                    &objects,
                    claim.dest,
                    Claimant::service(slot),
                    claim.target,
                    cluster_rank(&entry.service),
                    None,
                );
            }
        }
        for (slot, slice) in self.slices.iter() {
            let Some(entry) = self.services.get(slice.service) else {
                continue;
            };
            let Some(spec) = &entry.spec else { continue };
            for claim in slice_claims(&entry.service, spec, &slice.spec) {
                let rank = slice_rank(&entry.service, &slice.name, claim.ready);
                self.book.claim(
                    &objects,
                    claim.dest,
                    Claimant::slice(slot),
                    claim.target,
                    rank,
                    None,
                );
            }
        }
        self.names.collect_garbage();
        self.deleted_since_collection = 0;
        self.map()
    }

    /// The complete map as the book has it.
    pub fn map(&self) -> ServiceMap {
        let mut map = ServiceMap::default();
        // The book has one winner per destination: exactly this many.
        let mut destinations = Vec::with_capacity(self.book.len());
        for (slot, entry) in self.services.iter() {
            let (Some(spec), Some(state)) = (&entry.spec, entry.state()) else {
                continue;
            };
            map.services.insert(entry.service.clone(), state);
            for claim in cluster_claims(&entry.service, spec) {
                if self.book.winner(&claim.dest) == Some(Claimant::service(slot)) {
                    destinations.push((socket_addr(&claim.dest), claim.target));
                }
            }
        }
        for (slot, _) in self.slices.iter() {
            for claim in self.slice_claims_of(slot) {
                if self.book.winner(&claim.dest) == Some(Claimant::slice(slot)) {
                    destinations.push((socket_addr(&claim.dest), claim.target));
                }
            }
        }
        map.destinations = destinations.into_iter().collect();
        map
    }
}

fn in_scope(scope: Option<&str>, namespace: &str) -> bool {
    scope.is_none_or(|s| s == namespace)
}
