//! Who made a connect: the calling pod's namespace and workload, found from
//! the cgroup id the programs note with every attempt (issue #15).
//!
//! The counting side (deltas, metrics, edges) asks a [`SourceBook`]; the
//! Kubernetes side (the pods' cgroups on this node and a watch of this node's
//! Pods) answers it.

use std::sync::Arc;

use crate::resolve::ServiceRef;

/// The caller of a connect, as `internal_tcp_source_attempts_total` labels it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    /// The calling pod's namespace; empty for the node.
    pub namespace: Arc<str>,
    /// The pod's owning workload (a Deployment's name for a ReplicaSet's pod,
    /// else the owner's or the pod's own name); [`NODE_WORKLOAD`] for the node.
    pub workload: Arc<str>,
}

/// The workload of connects made outside every pod (host processes, the
/// kubelet, hostNetwork pods without their own cgroup are still pods).
pub const NODE_WORKLOAD: &str = "node";

impl Source {
    /// A caller outside every pod.
    pub fn node() -> Self {
        Self {
            namespace: Arc::from(""),
            workload: Arc::from(NODE_WORKLOAD),
        }
    }

    pub fn is_node(&self) -> bool {
        self.namespace.is_empty() && &*self.workload == NODE_WORKLOAD
    }
}

/// What a cgroup id stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub source: Source,
    /// The Services whose endpoints include the calling pod: the callers'
    /// side of the edges "Service A calls Service B". Empty for the node.
    pub services: Arc<[ServiceRef]>,
}

impl Caller {
    pub fn node() -> Self {
        Self {
            source: Source::node(),
            services: Arc::from([]),
        }
    }
}

/// What the counting side asks of the source side.
pub trait SourceBook: Send + Sync + 'static {
    /// The caller behind attempts noted with cgroup id `cgroup_id` (the
    /// caller's own cgroup v2 id, as `bpf_get_current_cgroup_id` gives it).
    fn caller(&self, cgroup_id: u64) -> Caller;

    /// Whether attempts from `source` to `destination` are not demand
    /// (EXCLUDE_SOURCES, or the destination Service's own exclusion
    /// annotation): counted as filtered, never a wake.
    fn excludes(&self, source: &Source, destination: &ServiceRef) -> bool;
}

/// No attribution: every caller is the node and nothing is excluded. What
/// the agent uses with a static service map (no Pods to watch).
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeOnly;

impl SourceBook for NodeOnly {
    fn caller(&self, _cgroup_id: u64) -> Caller {
        Caller::node()
    }

    fn excludes(&self, _source: &Source, _destination: &ServiceRef) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_the_empty_namespace_and_the_node_workload() {
        let node = Source::node();
        assert_eq!((&*node.namespace, &*node.workload), ("", "node"));
        assert!(node.is_node());
        let pod = Source {
            namespace: "default".into(),
            workload: "node".into(),
        };
        assert!(
            !pod.is_node(),
            "a workload named node in a namespace is a pod"
        );
        assert_eq!(NodeOnly.caller(12345), Caller::node());
    }
}
