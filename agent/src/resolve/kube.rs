//! The Kubernetes source of the service map: Services (core/v1) and
//! EndpointSlices (discovery.k8s.io/v1) watched with kube-runtime, turned
//! into the same [`MapEvent`](super::MapEvent)s as the static file.
//!
//! What is mapped:
//! - every `spec.clusterIPs` entry (both families) x every TCP Service port
//!   -> the Service, no pod. Headless and ExternalName Services have none,
//!   but are still announced (`ServiceSet`), so their zero series exist.
//! - every EndpointSlice endpoint address x TCP port -> the Service named by
//!   its `kubernetes.io/service-name` label, the *Service* port of the same
//!   name, and the pod of its `targetRef`; ready or not (a connect to a
//!   starting pod still counts).
//! - UDP and SCTP ports are left out: only TCP connects are counted.
//! - every known Service comes with a [`ServiceState`](super::ServiceState),
//!   sent again (`ServiceSet`) whenever it changes:
//!   - `hold`: the annotation `internal-tcp-watcher.io/hold` is `"true"`
//!     (`"false"` or absent: not held);
//!   - `hold_timeout`: the annotation `internal-tcp-watcher.io/hold-timeout`
//!     (`30s`, `2m`; 1s to 1h), absent: the agent's default;
//!   - `ready_endpoints`: the distinct endpoint addresses (both families)
//!     that are ready over all the Service's slices; ready is
//!     `conditions.ready` true or unset, as the EndpointSlice API defines
//!     it. Always known: a Service without slices has 0.
//!
//!   - `exclude_sources`: the annotation
//!     `internal-tcp-watcher.io/exclude-sources` (the `EXCLUDE_SOURCES`
//!     syntax: `ns`, `ns/*`, `ns/workload`, `node`), absent: none.
//!
//!   Any other annotation value is warned about (Service, key and value) and
//!   read as absent; the Service is mapped all the same.
//! - SERVICE_SELECTOR filters Services on the apiserver; slices are watched
//!   unfiltered (they do not carry their Service's labels) and mapped only
//!   while their Service is known, so a slice that comes before its Service
//!   waits for it.
//!
//! When two objects claim one IP:port, one deterministic winner is taken
//! (the claim book's rank, in `book.rs`). The source keeps only compact
//! state (interned names, addresses, port numbers), never the objects, and
//! decodes only the fields it maps (`objects.rs`).
//!
//! k8s-openapi's version feature is `v1_33`, the oldest it offers, on
//! purpose: only fields GA since Kubernetes 1.21 are read, a newer server's
//! extra fields are ignored when decoding, and so the agent works against any
//! supported cluster. RBAC: get/list/watch on `services` and
//! `discovery.k8s.io/endpointslices`, and on `pods` for the Pod watch of
//! source attribution (`crate::sources::feed`), which runs in the same loop;
//! nothing else.

mod book;
mod driver;
mod extract;
mod metrics;
mod objects;
pub(crate) use objects::watched_as;
mod resolver;
mod selector;
mod state;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use driver::{error_reason, run};
pub use extract::{Kind, Malformed};
use kube::core::Selector;
pub use metrics::{KindLabels, KubeSourceMetrics, WatchErrorLabels};
pub use objects::{EndpointSliceObject, SERVICE_NAME_LABEL, ServiceObject};
pub use resolver::{Outcome, Resolver, StreamSpec};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("WATCH_NAMESPACES: {namespace:?}: {problem}")]
    Namespace {
        namespace: String,
        problem: itw_proto::names::NameProblem,
    },
    #[error("SERVICE_SELECTOR={selector:?}: {reason}")]
    Selector { selector: String, reason: String },
    /// kube's error text already holds its causes, so it is kept as text: as
    /// a source, every cause would be printed again.
    #[error(
        "no Kubernetes API to talk to ({reason}); in a pod the service account is used, elsewhere set KUBECONFIG, or set SERVICE_MAP to use a static service map instead"
    )]
    Connect { reason: String },
}

/// What to watch: checked settings of WATCH_NAMESPACES and SERVICE_SELECTOR.
#[derive(Clone, Debug, Default)]
pub struct KubeSettings {
    namespaces: Vec<Arc<str>>,
    selector: Option<Selector>,
}

impl KubeSettings {
    /// `namespaces`: empty for all; `selector`: `None` (or blank) for every
    /// Service.
    pub fn new(namespaces: &[String], selector: Option<&str>) -> Result<Self, KubeSourceError> {
        let mut checked: Vec<Arc<str>> = Vec::new();
        for namespace in namespaces
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
        {
            itw_proto::names::namespace(namespace).map_err(|problem| {
                KubeSourceError::Namespace {
                    namespace: namespace.to_owned(),
                    problem,
                }
            })?;
            if !checked.iter().any(|n| &**n == namespace) {
                checked.push(namespace.into());
            }
        }
        let selector = match selector.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(text) => {
                Some(
                    selector::parse(text).map_err(|reason| KubeSourceError::Selector {
                        selector: text.to_owned(),
                        reason,
                    })?,
                )
            }
        };
        Ok(Self {
            namespaces: checked,
            selector,
        })
    }

    /// The watch streams: Services and EndpointSlices, across all namespaces
    /// or once per namespace.
    pub fn streams(&self) -> Vec<StreamSpec> {
        let scopes: Vec<Option<Arc<str>>> = if self.namespaces.is_empty() {
            vec![None]
        } else {
            self.namespaces.iter().cloned().map(Some).collect()
        };
        let mut streams = Vec::with_capacity(scopes.len() * 2);
        for namespace in scopes {
            for kind in [Kind::Service, Kind::EndpointSlice] {
                streams.push(StreamSpec {
                    kind,
                    namespace: namespace.clone(),
                });
            }
        }
        streams
    }

    pub fn selector(&self) -> Option<&Selector> {
        self.selector.as_ref()
    }

    /// WATCH_NAMESPACES for logs: the list, or "all".
    pub fn namespaces_label(&self) -> String {
        if self.namespaces.is_empty() {
            "all".into()
        } else {
            self.namespaces.join(",")
        }
    }

    /// SERVICE_SELECTOR for logs: the selector, or "(every Service)".
    pub fn selector_label(&self) -> String {
        self.selector
            .as_ref()
            .map_or_else(|| "(every Service)".into(), ToString::to_string)
    }
}

/// A client for the cluster the agent runs in (its service account), or the
/// one of the current kubeconfig context elsewhere; rustls for TLS.
pub async fn connect() -> Result<kube::Client, KubeSourceError> {
    kube::Client::try_default()
        .await
        .map_err(|error| KubeSourceError::Connect {
            reason: error.to_string(),
        })
}
