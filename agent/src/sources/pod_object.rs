//! The Pod as the source side decodes it: only what attribution needs
//! (identity, owners, the template hash label, the static-pod mirror
//! annotation, node name, IPs), straight from the apiserver's JSON. Every
//! field is optional, so an object the apiserver accepted always decodes;
//! what is missing or wrong is reported by [`super::pods`], field by field,
//! for that pod alone.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use serde::{Deserialize, Deserializer};

/// The label the Deployment controller gives a ReplicaSet's pods; the
/// ReplicaSet's name is the Deployment's, `-`, this hash.
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// On a static pod's mirror: the UID the kubelet runs it under (its cgroup
/// is named after this, not after the mirror's own UID).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodObject {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpecFields>,
    #[serde(default)]
    pub status: Option<PodStatusFields>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecFields {
    #[serde(default)]
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusFields {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIpFields>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIpFields {
    #[serde(default)]
    pub ip: Option<String>,
}

crate::resolve::kube::watched_as!(PodObject, Pod);

/// An owner reference with every field optional: k8s-openapi's requires
/// them all, and one bad reference must not fail the whole watch.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OwnerFields {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    controller: Option<bool>,
}

/// Name, namespace, uid, resourceVersion, owners, and of the labels and
/// annotations only the two keys attribution reads. A missing owner field
/// is kept empty, for the extraction to report.
fn metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Fields {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        annotations: Option<BTreeMap<String, String>>,
        #[serde(default)]
        owner_references: Option<Vec<OwnerFields>>,
    }
    let fields = Fields::deserialize(deserializer)?;
    let pick = |map: Option<BTreeMap<String, String>>, key: &str| {
        map.and_then(|mut m| m.remove_entry(key))
            .map(|entry| BTreeMap::from([entry]))
    };
    Ok(ObjectMeta {
        name: fields.name,
        namespace: fields.namespace,
        uid: fields.uid,
        resource_version: fields.resource_version,
        labels: pick(fields.labels, TEMPLATE_HASH_LABEL),
        annotations: pick(fields.annotations, MIRROR_ANNOTATION),
        owner_references: fields.owner_references.map(|owners| {
            owners
                .into_iter()
                .map(|o| OwnerReference {
                    api_version: o.api_version.unwrap_or_default(),
                    kind: o.kind.unwrap_or_default(),
                    name: o.name.unwrap_or_default(),
                    uid: o.uid.unwrap_or_default(),
                    controller: o.controller,
                    block_owner_deletion: None,
                })
                .collect()
        }),
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_attribution_reads_and_nothing_else() {
        let pod: PodObject = serde_json::from_str(
            r#"{
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": "web-7c9f6b8d4-x2x9q", "namespace": "shop", "uid": "u-1",
                    "resourceVersion": "77",
                    "labels": { "app": "web", "pod-template-hash": "7c9f6b8d4" },
                    "annotations": { "kubernetes.io/config.mirror": "abc", "other": "x" },
                    "ownerReferences": [{ "kind": "ReplicaSet", "name": "web-7c9f6b8d4", "controller": true }],
                    "managedFields": [{ "manager": "kubelet" }]
                },
                "spec": { "nodeName": "worker-1", "containers": [{ "name": "web" }] },
                "status": { "podIP": "10.244.1.5", "podIPs": [{ "ip": "10.244.1.5" }, { "ip": "fd00::5" }], "phase": "Running" }
            }"#,
        )
        .expect("decodes");
        let meta = &pod.metadata;
        assert_eq!(meta.uid.as_deref(), Some("u-1"));
        assert_eq!(
            meta.labels,
            Some(BTreeMap::from([(
                TEMPLATE_HASH_LABEL.into(),
                "7c9f6b8d4".into()
            )]))
        );
        assert_eq!(
            meta.annotations,
            Some(BTreeMap::from([(MIRROR_ANNOTATION.into(), "abc".into())]))
        );
        let owner = &meta.owner_references.as_ref().expect("owners")[0];
        assert_eq!(
            (
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str(),
                owner.controller
            ),
            ("ReplicaSet", "web-7c9f6b8d4", "", Some(true))
        );
        assert_eq!(meta.managed_fields, None);
        let status = pod.status.expect("status");
        let ips: Vec<_> = status
            .pod_ips
            .expect("podIPs")
            .into_iter()
            .map(|ip| ip.ip)
            .collect();
        assert_eq!(ips, vec![Some("10.244.1.5".into()), Some("fd00::5".into())]);
        assert_eq!(
            pod.spec.and_then(|s| s.node_name).as_deref(),
            Some("worker-1")
        );
    }

    #[test]
    fn is_the_resource_kube_expects() {
        use kube::Resource;
        assert_eq!(PodObject::plural(&()), "pods");
        assert_eq!(PodObject::api_version(&()), "v1");
        assert_eq!(PodObject::kind(&()), "Pod");
    }
}
