//! The Kubernetes source's figures on `/metrics`: how fresh its view of the
//! cluster is and what troubles it met, so a stale map is visible before it
//! misattributes anything.

use std::sync::{Arc, atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::extract::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchErrorLabels {
    pub kind: &'static str,
    /// What failed (see [`super::driver::error_reason`]).
    pub reason: &'static str,
}

#[derive(Debug, Default)]
pub struct KubeSourceMetrics {
    /// Unix time of the last complete list of a kind.
    pub last_sync: Family<KindLabels, Gauge<f64, AtomicU64>>,
    pub objects: Family<KindLabels, Gauge>,
    pub watch_errors: Family<WatchErrorLabels, Counter>,
    pub skipped: Family<KindLabels, Counter>,
    pub destinations: Gauge,
}

impl KubeSourceMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let agent = registry.sub_registry_with_prefix("itw_agent_kube");
        agent.register(
            "last_sync_timestamp_seconds",
            "Unix time at which every watch of this kind last completed a list (at start and after each relist); the map keeps being updated by watch events in between",
            self.last_sync.clone(),
        );
        agent.register(
            "objects",
            "Objects of this kind the resolver holds (Services: seen and selected)",
            self.objects.clone(),
        );
        agent.register(
            "watch_errors",
            "Errors of the list/watch of this kind, by reason; each is retried with backoff and the last good map stays",
            self.watch_errors.clone(),
        );
        agent.register(
            "skipped",
            "Malformed parts of objects of this kind that were skipped (logged with the object and field)",
            self.skipped.clone(),
        );
        agent.register(
            "destinations",
            "IP:port destinations the Kubernetes source maps",
            self.destinations.clone(),
        );
    }

    pub fn kind(kind: Kind) -> KindLabels {
        KindLabels {
            kind: kind.as_str(),
        }
    }
}
