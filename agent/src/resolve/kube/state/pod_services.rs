//! The Services a pod serves, read from the slices the state already holds
//! (no second copy of the endpoints): what source attribution names as the
//! caller's side of an edge "Service A calls Service B".

use std::net::IpAddr;

use super::ClusterState;
use crate::resolve::ServiceRef;

impl ClusterState {
    /// The known Services of `namespace` with an endpoint whose targetRef
    /// is pod `pod` or whose address is one of `ips`, sorted. Only the
    /// pod's namespace is read: a Service's selector picks pods of its own
    /// namespace, so the cost is that namespace's endpoints, not the
    /// cluster's.
    pub fn pod_services(&self, namespace: &str, pod: &str, ips: &[IpAddr]) -> Vec<ServiceRef> {
        let Some(slots) = self.service_slots.get(namespace) else {
            return Vec::new();
        };
        let mut found: Vec<ServiceRef> = slots
            .values()
            .filter_map(|slot| self.services.get(*slot))
            .filter(|entry| entry.spec.is_some())
            .filter(|entry| {
                entry
                    .slices
                    .iter()
                    .filter_map(|slot| self.slices.get(*slot))
                    .any(|slice| {
                        slice
                            .spec
                            .endpoints
                            .iter()
                            .any(|endpoint| endpoint.pod_is(pod) || ips.contains(&endpoint.ip))
                    })
            })
            .map(|entry| entry.service.clone())
            .collect();
        found.sort();
        found
    }
}
