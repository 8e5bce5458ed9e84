//! This node's Pods, from a watch with the field selector
//! `spec.nodeName=<NODE_NAME>`: per pod only what attribution needs (the
//! UID its cgroup is named after, namespace, name, workload, IPs).
//!
//! Workload: a ReplicaSet owner whose name ends in `-<pod-template-hash>`
//! (the pod's label) is a Deployment's, named without the suffix; else the
//! controller owner's name (StatefulSet, DaemonSet, Job, a bare ReplicaSet);
//! a pod without a controller is its own workload.
//!
//! Relists (kube-runtime's `Init`/`InitApply`/`InitDone`) are buffered and
//! swapped in whole, as the resolver does, so a half-listed node is never
//! seen. A malformed pod is refused alone with the field named, never the
//! watch.

use std::{collections::HashMap, fmt, net::IpAddr, sync::Arc};

use kube::runtime::watcher::Event;

use super::pod_object::{MIRROR_ANNOTATION, PodObject, TEMPLATE_HASH_LABEL};

/// What is kept of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    /// The UID the kubelet names the pod's cgroup after: the pod's own, or
    /// for a static pod's mirror, the UID in `kubernetes.io/config.mirror`.
    pub cgroup_uid: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub workload: Arc<str>,
    pub ips: Box<[IpAddr]>,
}

/// A pod refused: which one, which field, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadPod {
    pub object: String,
    pub field: String,
    pub problem: String,
}

impl fmt::Display for BadPod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pod {}: {}: {}", self.object, self.field, self.problem)
    }
}

/// Reads a pod; `Ok(None)` for a pod on another node (the field selector
/// keeps them away; a server that ignored it must not make them ours).
pub fn extract(pod: &PodObject, node: &str) -> Result<Option<PodRecord>, BadPod> {
    let meta = &pod.metadata;
    let object = format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("?"),
        meta.name.as_deref().unwrap_or("?")
    );
    let bad = |field: &str, problem: &str| BadPod {
        object: object.clone(),
        field: field.to_owned(),
        problem: problem.to_owned(),
    };
    let required = |value: Option<&str>, field: &str| match value {
        Some(v) if !v.is_empty() => Ok(v.to_owned()),
        _ => Err(bad(field, "missing")),
    };
    let namespace = required(meta.namespace.as_deref(), "metadata.namespace")?;
    let name = required(meta.name.as_deref(), "metadata.name")?;
    let uid = required(meta.uid.as_deref(), "metadata.uid")?;
    if let Some(on) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
        && on != node
    {
        return Ok(None);
    }
    let mirror = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .filter(|m| !m.is_empty());
    let cgroup_uid = mirror.cloned().unwrap_or(uid);
    let workload = workload(pod, &name).map_err(|(field, problem)| bad(&field, problem))?;
    let ips = ips(pod).map_err(|(field, problem)| bad(&field, &problem))?;
    Ok(Some(PodRecord {
        cgroup_uid: cgroup_uid.into(),
        namespace: namespace.into(),
        name: name.into(),
        workload: workload.into(),
        ips: ips.into(),
    }))
}

fn workload(pod: &PodObject, name: &str) -> Result<String, (String, &'static str)> {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let Some((i, owner)) = owners
        .iter()
        .enumerate()
        .find(|(_, o)| o.controller == Some(true))
    else {
        return Ok(name.to_owned());
    };
    if owner.name.is_empty() {
        return Err((format!("metadata.ownerReferences[{i}].name"), "missing"));
    }
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(TEMPLATE_HASH_LABEL))
        .filter(|h| !h.is_empty());
    if owner.kind == "ReplicaSet"
        && let Some(hash) = hash
        && let Some(deployment) = owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|rest| rest.strip_suffix('-'))
            .filter(|d| !d.is_empty())
    {
        return Ok(deployment.to_owned());
    }
    Ok(owner.name.clone())
}

fn ips(pod: &PodObject) -> Result<Vec<IpAddr>, (String, String)> {
    let Some(status) = &pod.status else {
        return Ok(Vec::new());
    };
    let mut ips = Vec::new();
    let given: Vec<(String, &str)> = match &status.pod_ips {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .filter_map(|(i, ip)| Some((format!("status.podIPs[{i}].ip"), ip.ip.as_deref()?)))
            .collect(),
        _ => status
            .pod_ip
            .as_deref()
            .filter(|ip| !ip.is_empty())
            .map(|ip| ("status.podIP".to_owned(), ip))
            .into_iter()
            .collect(),
    };
    for (field, text) in given {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| (field, format!("{text:?} is not an IP address")))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// What one watch event changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodChanges {
    /// Pods (by cgroup UID) added or changed.
    pub upserted: Vec<Arc<str>>,
    /// Pods (by cgroup UID) gone.
    pub removed: Vec<Arc<str>>,
    pub malformed: Vec<BadPod>,
    /// The event completed a list.
    pub listed: bool,
}

/// The node's pods as the watch has them.
#[derive(Debug)]
pub struct PodTracker {
    node: String,
    pods: HashMap<Arc<str>, PodRecord>,
    relist: Option<HashMap<Arc<str>, PodRecord>>,
    synced: bool,
}

impl PodTracker {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            pods: HashMap::new(),
            relist: None,
            synced: false,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn get(&self, cgroup_uid: &str) -> Option<&PodRecord> {
        self.pods.get(cgroup_uid)
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodRecord> {
        self.pods.values()
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Listed completely at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn event(&mut self, event: Event<PodObject>) -> PodChanges {
        let mut changes = PodChanges::default();
        match event {
            Event::Init => self.relist = Some(HashMap::new()),
            Event::InitApply(pod) => {
                if let Some(record) = self.read(&pod, &mut changes) {
                    self.relist
                        .get_or_insert_with(HashMap::new)
                        .insert(record.cgroup_uid.clone(), record);
                }
            }
            Event::InitDone => match self.relist.take() {
                Some(fresh) => {
                    for (uid, record) in &fresh {
                        if self.pods.get(uid) != Some(record) {
                            changes.upserted.push(uid.clone());
                        }
                    }
                    changes.removed = self
                        .pods
                        .keys()
                        .filter(|uid| !fresh.contains_key(*uid))
                        .cloned()
                        .collect();
                    self.pods = fresh;
                    self.synced = true;
                    changes.listed = true;
                }
                // A list end without its start lists nothing: swapping in
                // an empty list would forget every pod.
                None => tracing::error!("Pod list end without a list start ignored"),
            },
            Event::Apply(pod) => match self.read(&pod, &mut changes) {
                Some(record) => {
                    let uid = record.cgroup_uid.clone();
                    if self.pods.get(&uid) != Some(&record) {
                        self.pods.insert(uid.clone(), record);
                        changes.upserted.push(uid);
                    }
                }
                None => self.forget(&pod, &mut changes),
            },
            Event::Delete(pod) => self.forget(&pod, &mut changes),
        }
        changes
    }

    fn read(&self, pod: &PodObject, changes: &mut PodChanges) -> Option<PodRecord> {
        match extract(pod, &self.node) {
            Ok(record) => record,
            Err(bad) => {
                tracing::warn!(object = %bad.object, field = %bad.field, "{}; pod skipped", bad.problem);
                changes.malformed.push(bad);
                None
            }
        }
    }

    /// Drops the pod held under the same namespace and name: a pod that is
    /// deleted, moved off the node, or became unreadable.
    fn forget(&mut self, pod: &PodObject, changes: &mut PodChanges) {
        let meta = &pod.metadata;
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return;
        };
        let gone: Vec<Arc<str>> = self
            .pods
            .values()
            .filter(|p| &*p.namespace == ns && &*p.name == name)
            .map(|p| p.cgroup_uid.clone())
            .collect();
        for uid in gone {
            self.pods.remove(&uid);
            changes.removed.push(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> PodObject {
        serde_json::from_value(value).expect("decodes")
    }

    fn deployment_pod(name: &str, uid: &str, ip: &str) -> PodObject {
        pod(json!({
            "metadata": {
                "name": name, "namespace": "shop", "uid": uid,
                "labels": { "pod-template-hash": "7c9f6b8d4" },
                "ownerReferences": [
                    { "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7c9f6b8d4", "uid": "rs", "controller": true }
                ]
            },
            "spec": { "nodeName": "worker-1" },
            "status": { "podIP": ip, "podIPs": [{ "ip": ip }] }
        }))
    }

    fn workload_of(value: serde_json::Value) -> String {
        let record = extract(&pod(value), "worker-1")
            .expect("valid")
            .expect("ours");
        record.workload.to_string()
    }

    #[test]
    fn names_the_workload_as_its_controller_does() {
        let record = extract(
            &deployment_pod("web-7c9f6b8d4-x2x9q", "u1", "10.244.1.5"),
            "worker-1",
        )
        .expect("valid")
        .expect("ours");
        assert_eq!(
            record,
            PodRecord {
                cgroup_uid: "u1".into(),
                namespace: "shop".into(),
                name: "web-7c9f6b8d4-x2x9q".into(),
                workload: "web".into(),
                ips: Box::new(["10.244.1.5".parse().expect("ip")]),
            }
        );
        let meta = |owners: serde_json::Value, labels: serde_json::Value| json!({ "metadata": { "name": "p", "namespace": "n", "uid": "u", "labels": labels, "ownerReferences": owners } });
        let rs = |name: &str| json!([{ "kind": "ReplicaSet", "name": name, "controller": true }]);
        let hash = json!({ "pod-template-hash": "abc12" });
        assert_eq!(workload_of(meta(rs("api-abc12"), hash.clone())), "api");
        assert_eq!(
            workload_of(meta(rs("api-abc12"), json!({}))),
            "api-abc12",
            "a ReplicaSet's pod without the hash label: the ReplicaSet"
        );
        assert_eq!(
            workload_of(meta(rs("api-other"), hash.clone())),
            "api-other",
            "a ReplicaSet not named after the hash is not a Deployment's"
        );
        assert_eq!(workload_of(meta(rs("abc12"), hash.clone())), "abc12");
        for kind in ["StatefulSet", "DaemonSet", "Job"] {
            let owners = json!([{ "kind": kind, "name": "db-abc12", "controller": true }]);
            assert_eq!(
                workload_of(meta(owners, hash.clone())),
                "db-abc12",
                "{kind}"
            );
        }
        let not_controller = json!([{ "kind": "ConfigMap", "name": "cm" }]);
        assert_eq!(workload_of(meta(not_controller, json!({}))), "p");
        assert_eq!(
            workload_of(json!({ "metadata": { "name": "bare", "namespace": "n", "uid": "u" } })),
            "bare"
        );
    }

    #[test]
    fn a_static_pod_is_known_by_its_mirror_uid() {
        let record = extract(
            &pod(json!({
                "metadata": {
                    "name": "etcd-worker-1", "namespace": "kube-system", "uid": "mirror-uid",
                    "annotations": { "kubernetes.io/config.mirror": "6d3d4f5b9a0c8e7f1a2b3c4d5e6f7a8b" },
                    "ownerReferences": [{ "kind": "Node", "name": "worker-1", "controller": true }]
                },
                "status": { "podIPs": [{ "ip": "172.18.0.2" }, { "ip": "fd00::2" }, { "ip": "172.18.0.2" }] }
            })),
            "worker-1",
        )
        .expect("valid")
        .expect("ours");
        assert_eq!(&*record.cgroup_uid, "6d3d4f5b9a0c8e7f1a2b3c4d5e6f7a8b");
        assert_eq!(&*record.workload, "worker-1");
        assert_eq!(record.ips.len(), 2);
    }

    #[test]
    fn a_malformed_pod_is_refused_naming_the_field() {
        for (value, field, problem) in [
            (
                json!({ "metadata": { "name": "p", "uid": "u" } }),
                "metadata.namespace",
                "missing",
            ),
            (
                json!({ "metadata": { "namespace": "n", "uid": "u" } }),
                "metadata.name",
                "missing",
            ),
            (
                json!({ "metadata": { "name": "p", "namespace": "n" } }),
                "metadata.uid",
                "missing",
            ),
            (
                json!({ "metadata": { "name": "p", "namespace": "n", "uid": "u", "ownerReferences": [{ "kind": "Job", "controller": true }] } }),
                "metadata.ownerReferences[0].name",
                "missing",
            ),
            (
                json!({ "metadata": { "name": "p", "namespace": "n", "uid": "u" }, "status": { "podIPs": [{ "ip": "10.0.0.1" }, { "ip": "10.0.0.x" }] } }),
                "status.podIPs[1].ip",
                "\"10.0.0.x\" is not an IP address",
            ),
            (
                json!({ "metadata": { "name": "p", "namespace": "n", "uid": "u" }, "status": { "podIP": "nope" } }),
                "status.podIP",
                "\"nope\" is not an IP address",
            ),
        ] {
            let bad = extract(&pod(value), "worker-1").expect_err(field);
            assert_eq!((bad.field.as_str(), bad.problem.as_str()), (field, problem));
        }
        let other_node = deployment_pod("web-1", "u", "10.0.0.1");
        assert_eq!(extract(&other_node, "worker-2"), Ok(None));
    }

    #[test]
    fn follows_lists_applies_and_deletes() {
        let mut tracker = PodTracker::new("worker-1");
        assert_eq!(tracker.event(Event::Init), PodChanges::default());
        tracker.event(Event::InitApply(deployment_pod(
            "web-a",
            "ua",
            "10.244.1.5",
        )));
        let bad = pod(json!({ "metadata": { "name": "broken", "namespace": "shop" } }));
        let refused = tracker.event(Event::InitApply(bad));
        assert_eq!(refused.malformed.len(), 1);
        assert!(tracker.is_empty(), "nothing is seen before the list ends");
        let listed = tracker.event(Event::InitDone);
        assert_eq!(
            (listed.upserted, listed.removed, listed.listed),
            (vec![Arc::from("ua")], vec![], true)
        );
        assert!(tracker.synced());

        let same = tracker.event(Event::Apply(deployment_pod("web-a", "ua", "10.244.1.5")));
        assert_eq!(same, PodChanges::default(), "an unchanged pod is no change");
        let moved = tracker.event(Event::Apply(deployment_pod("web-a", "ua", "10.244.1.6")));
        assert_eq!(moved.upserted, vec![Arc::from("ua")]);
        tracker.event(Event::Apply(deployment_pod("web-b", "ub", "10.244.1.7")));
        assert_eq!(tracker.len(), 2);

        // A relist that no longer has web-a.
        tracker.event(Event::Init);
        tracker.event(Event::InitApply(deployment_pod(
            "web-b",
            "ub",
            "10.244.1.7",
        )));
        let relisted = tracker.event(Event::InitDone);
        assert_eq!(
            (relisted.upserted, relisted.removed),
            (vec![], vec![Arc::from("ua")])
        );
        let deleted = tracker.event(Event::Delete(deployment_pod("web-b", "ub", "10.244.1.7")));
        assert_eq!(deleted.removed, vec![Arc::from("ub")]);
        assert!(tracker.is_empty());
        assert_eq!(
            tracker.event(Event::InitDone),
            PodChanges::default(),
            "a list end without a start replaces nothing"
        );
    }
}
