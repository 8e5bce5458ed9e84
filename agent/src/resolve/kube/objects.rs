//! The Service and EndpointSlice as the source decodes them: only the fields
//! it maps, read straight from the apiserver's JSON. Everything else
//! (managedFields, status, topology, every label but the Service name, every
//! annotation but the hold, wakes and exclusion ones) is skipped without being built, which makes a list of 10k
//! slices several times cheaper to decode and leaves far less freed memory
//! behind in the allocator than the full k8s-openapi types would.
//!
//! The field names and shapes are those of core/v1 Service and
//! discovery.k8s.io/v1 EndpointSlice; `kube` sees them as those resources
//! (same group, version, kind and plural, from k8s-openapi). Every field is
//! optional here, so an object the apiserver accepted always decodes; what
//! is missing or wrong is reported by `extract`, field by field.

use std::{borrow::Cow, collections::BTreeMap, fmt, marker::PhantomData};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

/// The label the EndpointSlice controller ties a slice to its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `"true"`: hold connects to the Service while it has no ready endpoint.
pub const HOLD_ANNOTATION: &str = "internal-tcp-watcher.io/hold";

/// How long a connect to the Service may be held (`30s`, `2m`; 1s to 1h).
pub const HOLD_TIMEOUT_ANNOTATION: &str = "internal-tcp-watcher.io/hold-timeout";

/// A core/v1 Service, as far as the resolver reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceObject {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<ServiceFields>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceFields {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Option<Vec<PortFields>>,
}

/// A Service port or an EndpointSlice port.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PortFields {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A discovery.k8s.io/v1 EndpointSlice, as far as the resolver reads it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceObject {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    /// `null` for a slice with no endpoints.
    #[serde(default)]
    pub endpoints: Option<Vec<EndpointFields>>,
    #[serde(default)]
    pub ports: Option<Vec<PortFields>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointFields {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<ConditionFields>,
    #[serde(default)]
    pub target_ref: Option<TargetRefFields>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConditionFields {
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct TargetRefFields {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// Makes `$object`, a partial decoding of `$kind` with a `metadata:
/// ObjectMeta` field, a resource kube-rs can list and watch as `$kind`.
macro_rules! watched_as {
    ($object:ty, $kind:ty) => {
        impl k8s_openapi::Resource for $object {
            const API_VERSION: &'static str = <$kind as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$kind as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$kind as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$kind as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$kind as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $object {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use watched_as;

watched_as!(ServiceObject, Service);
watched_as!(EndpointSliceObject, EndpointSlice);

/// The metadata the resolver and the watcher use: name, namespace,
/// resourceVersion, of the labels only the Service name, and of the
/// annotations only the hold and wakes ones.
fn metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Fields {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
        #[serde(default)]
        labels: Option<Picked<LabelKeys>>,
        #[serde(default)]
        annotations: Option<Picked<AnnotationKeys>>,
    }
    let fields = Fields::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: fields.name,
        namespace: fields.namespace,
        resource_version: fields.resource_version,
        labels: fields.labels.and_then(Picked::into_map),
        annotations: fields.annotations.and_then(Picked::into_map),
        ..ObjectMeta::default()
    })
}

/// The keys of a string map worth building.
trait Keys {
    const KEYS: &'static [&'static str];
}

struct LabelKeys;

impl Keys for LabelKeys {
    const KEYS: &'static [&'static str] = &[SERVICE_NAME_LABEL];
}

struct AnnotationKeys;

impl Keys for AnnotationKeys {
    const KEYS: &'static [&'static str] = &[
        HOLD_ANNOTATION,
        HOLD_TIMEOUT_ANNOTATION,
        crate::resolve::wakes::WAKES_ANNOTATION,
        crate::sources::exclude::EXCLUDE_SOURCES_ANNOTATION,
    ];
}

/// A label or annotation map reduced to the entries of `K::KEYS`.
struct Picked<K>(BTreeMap<String, String>, PhantomData<K>);

impl<K> Picked<K> {
    /// `None` when none of the keys is there, as for an absent map.
    fn into_map(self) -> Option<BTreeMap<String, String>> {
        (!self.0.is_empty()).then_some(self.0)
    }
}

impl<'de, K: Keys> Deserialize<'de> for Picked<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PickVisitor<K>(PhantomData<K>);

        impl<'de, K: Keys> Visitor<'de> for PickVisitor<K> {
            type Value = Picked<K>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = BTreeMap::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if K::KEYS.contains(&&*key.0) {
                        found.insert(key.0.into_owned(), map.next_value::<String>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Picked(found, PhantomData))
            }
        }

        deserializer.deserialize_map(PickVisitor(PhantomData))
    }
}

/// A map key, borrowed from the input when it can be.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a label key")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_is_mapped_and_nothing_else() {
        let slice: EndpointSliceObject = serde_json::from_str(
            r#"{
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "addressType": "IPv4",
                "metadata": {
                    "name": "web-8lq2d", "namespace": "shop", "resourceVersion": "48877",
                    "labels": { "app": "web", "kubernetes.io/service-name": "web", "k\u0065y": "x" },
                    "annotations": { "a": "b" },
                    "managedFields": [{ "manager": "kube-controller-manager" }]
                },
                "endpoints": [{
                    "addresses": ["10.244.1.17"],
                    "conditions": { "ready": false, "serving": true },
                    "nodeName": "worker-1",
                    "targetRef": { "kind": "Pod", "name": "web-0", "uid": "u" }
                }],
                "ports": [{ "name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http" }]
            }"#,
        )
        .expect("decodes");
        let meta = &slice.metadata;
        assert_eq!(meta.name.as_deref(), Some("web-8lq2d"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(meta.resource_version.as_deref(), Some("48877"));
        assert_eq!(
            meta.labels,
            Some(BTreeMap::from([(SERVICE_NAME_LABEL.into(), "web".into())]))
        );
        assert_eq!(meta.annotations, None);
        assert_eq!(meta.managed_fields, None);
        let ep = &slice.endpoints.as_ref().expect("endpoints")[0];
        assert_eq!(ep.addresses, vec!["10.244.1.17".to_owned()]);
        assert_eq!(ep.conditions.as_ref().and_then(|c| c.ready), Some(false));
        let target = ep.target_ref.as_ref().expect("targetRef");
        assert_eq!(
            (target.kind.as_deref(), target.name.as_deref()),
            (Some("Pod"), Some("web-0"))
        );
        let port = &slice.ports.as_ref().expect("ports")[0];
        assert_eq!(
            (port.name.as_deref(), port.port),
            (Some("http"), Some(8080))
        );

        let empty: EndpointSliceObject =
            serde_json::from_str(r#"{"metadata": {"labels": null}, "endpoints": null}"#)
                .expect("nulls decode");
        assert!(empty.endpoints.is_none());
        assert_eq!(empty.metadata.labels, None);
    }

    #[test]
    fn keeps_only_the_hold_annotations() {
        let svc: ServiceObject = serde_json::from_str(
            r#"{
                "metadata": {
                    "name": "web", "namespace": "shop",
                    "annotations": {
                        "kubectl.kubernetes.io/last-applied-configuration": "{}",
                        "internal-tcp-watcher.io/hold": "true",
                        "internal-tcp-watcher.io/holdx": "x",
                        "internal-tcp-watcher.io/hold-timeout": "45s"
                    }
                }
            }"#,
        )
        .expect("decodes");
        assert_eq!(
            svc.metadata.annotations,
            Some(BTreeMap::from([
                (HOLD_ANNOTATION.into(), "true".into()),
                (HOLD_TIMEOUT_ANNOTATION.into(), "45s".into()),
            ]))
        );
        let other: ServiceObject =
            serde_json::from_str(r#"{"metadata": {"annotations": {"a": "b"}}}"#).expect("decodes");
        assert_eq!(other.metadata.annotations, None);
    }

    #[test]
    fn is_the_resource_kube_expects() {
        use kube::Resource;
        assert_eq!(ServiceObject::plural(&()), "services");
        assert_eq!(ServiceObject::api_version(&()), "v1");
        assert_eq!(EndpointSliceObject::plural(&()), "endpointslices");
        assert_eq!(EndpointSliceObject::api_version(&()), "discovery.k8s.io/v1");
        assert_eq!(EndpointSliceObject::kind(&()), "EndpointSlice");
    }
}
