//! [`KubeSources`]: the [`SourceBook`] of an agent watching Kubernetes.
//!
//! Read on the fast path (once per new destination, process and cgroup key
//! per collection), written by the Kubernetes source's task. Reads take a
//! short lock and never wait on the apiserver: what the book answers is what
//! the watches had delivered by then. The one read that may do work is a
//! cgroup id the index has not seen: it rescans the pods' cgroup directories
//! (a few hundred readdirs on a full node), at most once per
//! `SOURCE_RESCAN_INTERVAL`.
//!
//! A cgroup inside a pod the Pod watch does not know (yet) is answered as
//! the node and counted in `itw_agent_sources_unknown_pod_total`.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use parking_lot::{Mutex, RwLock};

use super::{
    Caller, Source, SourceBook,
    cgroups::{CgroupIndex, CgroupLimits, Depth, Owner, ScanReport},
    exclude::SourceRules,
    metrics::{DepthLabels, SourceMetrics},
    pods::{PodChanges, PodRecord, PodTracker},
};
use crate::resolve::{MapChange, MapEvent, ServiceRef, canonical};

/// The Services whose endpoints include a pod (the resolver answers).
pub trait PodServices {
    fn pod_services(&self, namespace: &str, pod: &str, ips: &[IpAddr]) -> Vec<ServiceRef>;
}

impl PodServices for crate::resolve::kube::Resolver {
    fn pod_services(&self, namespace: &str, pod: &str, ips: &[IpAddr]) -> Vec<ServiceRef> {
        crate::resolve::kube::Resolver::pod_services(self, namespace, pod, ips)
    }
}

/// The checked source settings.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    /// `EXCLUDE_SOURCES`.
    pub exclude: SourceRules,
    /// `SOURCE_MAX_CGROUPS`, `SOURCE_RESCAN_INTERVAL`.
    pub limits: CgroupLimits,
}

#[derive(Debug)]
pub struct KubeSources {
    exclude: SourceRules,
    cgroups: Mutex<CgroupIndex>,
    /// By the UID the pod's cgroup is named after.
    pods: RwLock<HashMap<Arc<str>, Caller>>,
    /// Only Services that carry the exclusion annotation.
    service_rules: RwLock<HashMap<ServiceRef, SourceRules>>,
    metrics: Arc<SourceMetrics>,
    /// Built once: most callers of a busy node may be the node, and a clone
    /// only counts references.
    node: Caller,
}

impl KubeSources {
    /// `pods_dir`: the pods' cgroup (`None`: every caller is the node).
    pub fn new(
        settings: SourceSettings,
        pods_dir: Option<PathBuf>,
        metrics: Arc<SourceMetrics>,
    ) -> Self {
        Self {
            exclude: settings.exclude,
            cgroups: Mutex::new(CgroupIndex::new(pods_dir, settings.limits)),
            pods: RwLock::new(HashMap::new()),
            service_rules: RwLock::new(HashMap::new()),
            metrics,
            node: Caller::node(),
        }
    }

    /// Follows a Pod watch event: the pods that changed are looked up again.
    pub fn pods_changed(
        &self,
        tracker: &PodTracker,
        changes: &PodChanges,
        services: &impl PodServices,
    ) {
        let fresh: Vec<(Arc<str>, Caller)> = changes
            .upserted
            .iter()
            .filter_map(|uid| tracker.get(uid))
            .map(|pod| (pod.cgroup_uid.clone(), caller_of(pod, services)))
            .collect();
        let mut pods = self.pods.write();
        for uid in &changes.removed {
            pods.remove(uid);
        }
        pods.extend(fresh);
        self.metrics
            .pods
            .set(i64::try_from(pods.len()).unwrap_or(i64::MAX));
    }

    /// Follows the service map: exclusion annotations, and the Services of
    /// the node's pods whose endpoints may have moved.
    pub fn map_changed(&self, event: &MapEvent, tracker: &PodTracker, services: &impl PodServices) {
        let dirty = self.rules_and_dirty_pods(event, tracker);
        if dirty.is_empty() {
            return;
        }
        let fresh: Vec<(Arc<str>, Caller)> = dirty
            .into_iter()
            .filter_map(|uid| tracker.get(&uid))
            .map(|pod| (pod.cgroup_uid.clone(), caller_of(pod, services)))
            .collect();
        let mut pods = self.pods.write();
        for (uid, caller) in fresh {
            // A pod the watch removed meanwhile stays removed.
            if let Some(held) = pods.get_mut(&uid) {
                *held = caller;
            }
        }
    }

    /// Updates the per-Service rules; returns the node's pods (by cgroup
    /// UID) whose Services may have changed.
    fn rules_and_dirty_pods(&self, event: &MapEvent, tracker: &PodTracker) -> HashSet<Arc<str>> {
        let mut dirty = HashSet::new();
        let by_ip: HashMap<IpAddr, &PodRecord> = tracker
            .pods()
            .flat_map(|pod| pod.ips.iter().map(move |ip| (*ip, pod)))
            .collect();
        let in_namespace = |ns: &str, dirty: &mut HashSet<Arc<str>>| {
            dirty.extend(
                tracker
                    .pods()
                    .filter(|p| &*p.namespace == ns)
                    .map(|p| p.cgroup_uid.clone()),
            );
        };
        let mut rules = self.service_rules.write();
        match event {
            MapEvent::Reset(map) => {
                rules.clear();
                rules.extend(
                    map.services
                        .iter()
                        .filter(|(_, state)| !state.exclude_sources.is_empty())
                        .map(|(service, state)| (service.clone(), state.exclude_sources.clone())),
                );
                dirty.extend(tracker.pods().map(|p| p.cgroup_uid.clone()));
            }
            MapEvent::Changes(changes) => {
                for change in changes {
                    match change {
                        MapChange::Set(addr, target) => {
                            if let Some(pod) = by_ip.get(&canonical(*addr).ip()) {
                                dirty.insert(pod.cgroup_uid.clone());
                            }
                            if let Some(name) = &target.pod {
                                dirty.extend(
                                    tracker
                                        .pods()
                                        .filter(|p| {
                                            *name == *p.name
                                                && p.namespace == target.service.namespace
                                        })
                                        .map(|p| p.cgroup_uid.clone()),
                                );
                            }
                        }
                        MapChange::Remove(addr) => {
                            if let Some(pod) = by_ip.get(&canonical(*addr).ip()) {
                                dirty.insert(pod.cgroup_uid.clone());
                            }
                        }
                        MapChange::ServiceSet(service, state) => {
                            if state.exclude_sources.is_empty() {
                                rules.remove(service);
                            } else {
                                rules.insert(service.clone(), state.exclude_sources.clone());
                            }
                            in_namespace(&service.namespace, &mut dirty);
                        }
                        MapChange::ServiceRemoved(service) => {
                            rules.remove(service);
                            in_namespace(&service.namespace, &mut dirty);
                        }
                    }
                }
            }
        }
        dirty
    }

    fn scanned(&self, depth: Depth, report: ScanReport) {
        let depth = match depth {
            Depth::Quick => "quick",
            Depth::Full => "full",
        };
        self.metrics
            .rescans
            .get_or_create(&DepthLabels { depth })
            .inc();
        self.metrics
            .cgroups
            .set(i64::try_from(report.cgroups).unwrap_or(i64::MAX));
        if report.left_out > 0 {
            self.metrics.cgroups_left_out.inc_by(report.left_out as u64);
            tracing::warn!(
                indexed = report.cgroups,
                left_out = report.left_out,
                "SOURCE_MAX_CGROUPS reached: connects from the cgroups left out are attributed to the node"
            );
        }
    }
}

fn caller_of(pod: &PodRecord, services: &impl PodServices) -> Caller {
    Caller {
        source: Source {
            namespace: pod.namespace.clone(),
            workload: pod.workload.clone(),
        },
        services: services
            .pod_services(&pod.namespace, &pod.name, &pod.ips)
            .into(),
    }
}

impl SourceBook for KubeSources {
    fn caller(&self, cgroup_id: u64) -> Caller {
        let owner = self
            .cgroups
            .lock()
            .owner(cgroup_id, Instant::now(), &mut |depth, report| {
                self.scanned(depth, report)
            });
        match owner {
            Owner::Node => self.node.clone(),
            Owner::Pod(uid) => match self.pods.read().get(&uid) {
                Some(caller) => caller.clone(),
                None => {
                    self.metrics.unknown_pod.inc();
                    self.node.clone()
                }
            },
        }
    }

    fn excludes(&self, source: &Source, destination: &ServiceRef) -> bool {
        self.exclude.matches(source)
            || self
                .service_rules
                .read()
                .get(destination)
                .is_some_and(|rules| rules.matches(source))
    }
}

#[cfg(test)]
mod tests;
