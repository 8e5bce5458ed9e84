//! Watcher events in, [`MapEvent`]s out.
//!
//! [`Resolver`] follows every watch stream (one per kind, or per kind and
//! namespace with WATCH_NAMESPACES). Nothing is sent until every stream has
//! listed once; then one [`MapEvent::Reset`] carries the complete map. After
//! that, `Apply`/`Delete` events become [`MapEvent::Changes`] holding only
//! what changed, and a relist of any stream (kube-runtime's
//! `Init`/`InitApply`/`InitDone`, after a 410 Gone or a restart) is buffered
//! and swapped in whole at `InitDone`, with one `Reset`: a half-listed stream
//! is never visible downstream, and an error never empties the map (it only
//! ever ends a stream's events; the state stays as it was).

use std::sync::Arc;

use kube::runtime::watcher::Event;

use super::{
    extract::{self, Extracted, Kind, Malformed, ServiceSpec, SliceSpec},
    objects::{EndpointSliceObject, ServiceObject},
    state::ClusterState,
};
use crate::resolve::MapEvent;

/// One watch stream: a kind, in one namespace or all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    pub kind: Kind,
    /// `None`: all namespaces.
    pub namespace: Option<Arc<str>>,
}

#[derive(Debug)]
enum Relist {
    Services(Vec<Extracted<ServiceSpec>>),
    Slices(Vec<Extracted<SliceSpec>>),
}

#[derive(Debug)]
struct Stream {
    spec: StreamSpec,
    /// Objects of a list in progress (between `Init` and `InitDone`).
    relist: Option<Relist>,
    /// Listed completely at least once.
    synced: bool,
}

/// What one watcher event led to.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// What to send downstream, if anything.
    pub event: Option<MapEvent>,
    /// Parts of objects that were skipped (already logged).
    pub malformed: Vec<Malformed>,
    /// The event completed a list of its stream.
    pub listed: bool,
}

#[derive(Debug)]
pub struct Resolver {
    state: ClusterState,
    streams: Vec<Stream>,
}

impl Resolver {
    /// A resolver following `streams`, addressed by their index.
    pub fn new(streams: Vec<StreamSpec>) -> Self {
        Self {
            state: ClusterState::new(),
            streams: streams
                .into_iter()
                .map(|spec| Stream {
                    spec,
                    relist: None,
                    synced: false,
                })
                .collect(),
        }
    }

    pub fn streams(&self) -> impl Iterator<Item = &StreamSpec> {
        self.streams.iter().map(|s| &s.spec)
    }

    /// Whether the complete map has been sent.
    pub fn synced(&self) -> bool {
        self.state.tracking()
    }

    /// Whether every stream of `kind` has listed once.
    pub fn kind_synced(&self, kind: Kind) -> bool {
        self.streams
            .iter()
            .filter(|s| s.spec.kind == kind)
            .all(|s| s.synced)
    }

    /// Objects held of `kind`.
    pub fn objects(&self, kind: Kind) -> usize {
        match kind {
            Kind::Service => self.state.services(),
            Kind::EndpointSlice => self.state.slices(),
        }
    }

    /// Destinations mapped.
    pub fn destinations(&self) -> usize {
        self.state.destinations()
    }

    /// Interned names held (for tests).
    #[cfg(test)]
    pub(super) fn names_held(&mut self) -> usize {
        self.state.names().len()
    }

    /// The Services with pod `pod` of `namespace` (by targetRef) or one of
    /// `ips` among their endpoints, sorted.
    pub fn pod_services(
        &self,
        namespace: &str,
        pod: &str,
        ips: &[std::net::IpAddr],
    ) -> Vec<crate::resolve::ServiceRef> {
        self.state.pod_services(namespace, pod, ips)
    }

    /// The complete map as it stands (for tests and debugging).
    pub fn map(&self) -> crate::resolve::ServiceMap {
        self.state.map()
    }

    pub fn service_event(&mut self, stream: usize, event: Event<ServiceObject>) -> Outcome {
        let mut outcome = Outcome::default();
        let Some(scope) = self.scope_of(stream, Kind::Service) else {
            return outcome;
        };
        let mut changes = Vec::new();
        match event {
            Event::Init => self.begin_relist(stream, Relist::Services(Vec::new())),
            Event::InitApply(svc) => {
                if !in_scope(&scope, svc.metadata.namespace.as_deref()) {
                    return outcome;
                }
                let extracted = extract::service(&svc, self.state.names(), &mut outcome.malformed);
                if let Some(extracted) = extracted {
                    match self.relist_buffer(stream, || Relist::Services(Vec::new())) {
                        Some(Relist::Services(buffer)) => buffer.push(extracted),
                        _ => tracing::error!(stream, "Service list buffer of another kind"),
                    }
                }
            }
            Event::InitDone => {
                if let Some(Relist::Services(fresh)) = self.end_relist(stream) {
                    self.state.replace_services(scope.as_deref(), fresh);
                    outcome.listed = true;
                    outcome.event = self.after_list(stream);
                }
            }
            Event::Apply(svc) => {
                if !in_scope(&scope, svc.metadata.namespace.as_deref()) {
                    return outcome;
                }
                let extracted = extract::service(&svc, self.state.names(), &mut outcome.malformed);
                if let Some(extracted) = extracted {
                    self.state.apply_service(extracted, &mut changes);
                }
            }
            Event::Delete(svc) => {
                let meta = &svc.metadata;
                match extract::identity(meta.namespace.as_deref(), meta.name.as_deref()) {
                    Ok((ns, name)) if in_scope(&scope, Some(ns)) => {
                        self.state.delete_service(ns, name, &mut changes)
                    }
                    Ok(_) => {}
                    Err(object) => outcome.malformed.push(nameless(Kind::Service, object)),
                }
            }
        }
        self.finish(outcome, changes)
    }

    pub fn slice_event(&mut self, stream: usize, event: Event<EndpointSliceObject>) -> Outcome {
        let mut outcome = Outcome::default();
        let Some(scope) = self.scope_of(stream, Kind::EndpointSlice) else {
            return outcome;
        };
        let mut changes = Vec::new();
        match event {
            Event::Init => self.begin_relist(stream, Relist::Slices(Vec::new())),
            Event::InitApply(slice) => {
                if !in_scope(&scope, slice.metadata.namespace.as_deref()) {
                    return outcome;
                }
                if let Some(extracted) = self.extract_slice(&slice, &mut outcome.malformed) {
                    match self.relist_buffer(stream, || Relist::Slices(Vec::new())) {
                        Some(Relist::Slices(buffer)) => buffer.push(extracted),
                        _ => tracing::error!(stream, "EndpointSlice list buffer of another kind"),
                    }
                }
            }
            Event::InitDone => {
                if let Some(Relist::Slices(fresh)) = self.end_relist(stream) {
                    self.state.replace_slices(scope.as_deref(), fresh);
                    outcome.listed = true;
                    outcome.event = self.after_list(stream);
                }
            }
            Event::Apply(slice) => {
                if !in_scope(&scope, slice.metadata.namespace.as_deref()) {
                    return outcome;
                }
                match self.extract_slice(&slice, &mut outcome.malformed) {
                    Some(extracted) => self.state.apply_slice(extracted, &mut changes),
                    None => {
                        // A slice that became unusable (its label removed,
                        // say) must not keep its old endpoints mapped.
                        if let Ok((ns, name)) = extract::identity(
                            slice.metadata.namespace.as_deref(),
                            slice.metadata.name.as_deref(),
                        ) {
                            self.state.delete_slice(ns, name, &mut changes);
                        }
                    }
                }
            }
            Event::Delete(slice) => {
                let meta = &slice.metadata;
                match extract::identity(meta.namespace.as_deref(), meta.name.as_deref()) {
                    Ok((ns, name)) if in_scope(&scope, Some(ns)) => {
                        self.state.delete_slice(ns, name, &mut changes)
                    }
                    Ok(_) => {}
                    Err(object) => outcome
                        .malformed
                        .push(nameless(Kind::EndpointSlice, object)),
                }
            }
        }
        self.finish(outcome, changes)
    }

    fn extract_slice(
        &mut self,
        slice: &EndpointSliceObject,
        malformed: &mut Vec<Malformed>,
    ) -> Option<Extracted<SliceSpec>> {
        self.state.extract_slice(slice, malformed)
    }

    fn scope_of(&self, stream: usize, kind: Kind) -> Option<Option<Arc<str>>> {
        match self.streams.get(stream) {
            Some(s) if s.spec.kind == kind => Some(s.spec.namespace.clone()),
            _ => {
                tracing::error!(stream, %kind, "event from an unknown stream ignored");
                None
            }
        }
    }

    fn begin_relist(&mut self, stream: usize, empty: Relist) {
        if let Some(s) = self.streams.get_mut(stream) {
            // A list that failed half-way is dropped: the watcher starts over
            // with a new Init.
            s.relist = Some(empty);
        }
    }

    fn relist_buffer(
        &mut self,
        stream: usize,
        empty: impl FnOnce() -> Relist,
    ) -> Option<&mut Relist> {
        let s = self.streams.get_mut(stream)?;
        Some(s.relist.get_or_insert_with(empty))
    }

    fn end_relist(&mut self, stream: usize) -> Option<Relist> {
        let s = self.streams.get_mut(stream)?;
        let relist = s.relist.take();
        if relist.is_none() {
            // InitDone without Init: nothing was listed, so nothing may be
            // replaced (an empty swap would unmap everything).
            tracing::error!(stream, "list end without a list start ignored");
        }
        relist
    }

    /// After a stream's list is swapped in: the complete map, once every
    /// stream has listed.
    fn after_list(&mut self, stream: usize) -> Option<MapEvent> {
        if let Some(s) = self.streams.get_mut(stream) {
            s.synced = true;
        }
        if !self.streams.iter().all(|s| s.synced) {
            return None;
        }
        Some(MapEvent::Reset(self.state.rebuild()))
    }

    fn finish(&self, mut outcome: Outcome, changes: Vec<crate::resolve::MapChange>) -> Outcome {
        for m in &outcome.malformed {
            tracing::warn!(
                kind = %m.kind,
                object = %m.object,
                field = %m.field,
                "{}; skipped",
                m.problem
            );
        }
        if outcome.event.is_none() && !changes.is_empty() && self.state.tracking() {
            outcome.event = Some(MapEvent::Changes(changes));
        }
        outcome
    }
}

fn in_scope(scope: &Option<Arc<str>>, namespace: Option<&str>) -> bool {
    match scope {
        None => true,
        Some(s) => namespace == Some(&**s),
    }
}

fn nameless(kind: Kind, object: String) -> Malformed {
    Malformed {
        kind,
        object,
        field: "metadata".into(),
        problem: "namespace and name are required; object skipped".into(),
    }
}
