//! Source attribution's figures on `/metrics`: how many pods and cgroups it
//! knows, and when its bound or its view of the node falls short.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DepthLabels {
    /// `quick` (pods and containers, below new containers only) or `full`.
    pub depth: &'static str,
}

#[derive(Debug, Default)]
pub struct SourceMetrics {
    pub pods: Gauge,
    pub cgroups: Gauge,
    pub rescans: Family<DepthLabels, Counter>,
    pub cgroups_left_out: Counter,
    pub unknown_pod: Counter,
}

impl SourceMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let sources = registry.sub_registry_with_prefix("itw_agent_sources");
        sources.register(
            "pods",
            "Pods on this node the Pod watch holds (field selector spec.nodeName=NODE_NAME)",
            self.pods.clone(),
        );
        sources.register(
            "cgroups",
            "Pod cgroups indexed at the last scan (at most SOURCE_MAX_CGROUPS)",
            self.cgroups.clone(),
        );
        sources.register(
            "rescans",
            "Scans of the pods' cgroup directories, each made by a cgroup id not indexed yet: quick (pods and containers) at most once per SOURCE_RESCAN_INTERVAL, full (every nested cgroup) when a quick one missed, at most once per 10 intervals",
            self.rescans.clone(),
        );
        sources.register(
            "cgroups_left_out",
            "Pod cgroups a scan left out because SOURCE_MAX_CGROUPS was reached; their connects are attributed to the node",
            self.cgroups_left_out.clone(),
        );
        sources.register(
            "unknown_pod",
            "Lookups of a pod cgroup whose pod the Pod watch does not hold (yet); attributed to the node",
            self.unknown_pod.clone(),
        );
    }
}
