//! The cluster the lab's node belongs to: the pods on the node, and the
//! Services and EndpointSlices the mock API server serves, as the apiserver
//! would send them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use super::{cgroups::Qos, node::PodSpec};

pub const NAMESPACE: &str = "shop";
/// The Services' port, and their pods' target port.
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

/// The calling pod.
pub const CLIENT: &str = "checkout-7c9d5-x2kq8";
/// A calling pod a NetworkPolicy-like rule denies the held Service's pod.
pub const DENIED: &str = "reports-6b8c4-m7w2d";
/// A monitoring pod in a namespace of its own, which `EXCLUDE_SOURCES`
/// names: its probes are never demand.
pub const PROBER: &str = "uptime-checker-5d7f9-b4x8c";
pub const MONITORING: &str = "monitoring";
/// The pod behind `web` (and `web6`, `dual`).
pub const WEB_POD: &str = "web-6c5d8-qx2lm";
/// The pod behind `held`: running, listening, but not ready at first.
pub const HELD_POD: &str = "orders-5f6e7-z9k3p";

/// A ClusterIP Service with endpoints.
pub const WEB: (&str, Ipv4Addr) = ("web", Ipv4Addr::new(10, 96, 0, 20));
/// A ClusterIP Service scaled to zero, not held.
pub const COLD: (&str, Ipv4Addr) = ("cold", Ipv4Addr::new(10, 96, 0, 21));
/// A Service scaled to zero whose connects are held
/// (`internal-tcp-watcher.io/hold: "true"`); dual-stack in the IPv6 cell.
pub const HELD: (&str, Ipv4Addr) = ("orders", Ipv4Addr::new(10, 96, 0, 22));
pub const HELD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x22);
/// A Service held and never ready, with a short hold timeout: the flood's.
pub const BATCH: (&str, Ipv4Addr) = ("batch", Ipv4Addr::new(10, 96, 0, 24));
/// Its hold timeout, seconds.
pub const BATCH_HOLD_SECS: u64 = 8;
/// `orders`'s hold timeout, seconds: long enough for the datapath's lag, short
/// enough that a client a policy denies is reset within a check.
pub const HELD_HOLD_SECS: u64 = 10;

/// A Service scaled to zero that only the monitoring pod probes at first.
pub const QUIET: (&str, Ipv4Addr) = ("quiet", Ipv4Addr::new(10, 96, 0, 25));

/// A call chain, each scaled to zero: `front` calls `api`, which calls `db`.
pub const CHAIN: [(&str, Ipv4Addr, &str); 3] = [
    ("front", Ipv4Addr::new(10, 96, 0, 40), "front-7d8e9-a1b2c"),
    ("api", Ipv4Addr::new(10, 96, 0, 41), "api-6c7d8-d3e4f"),
    ("db", Ipv4Addr::new(10, 96, 0, 42), "db-5b6c7-g5h6j"),
];

/// IPv6 only.
pub const WEB6: (&str, Ipv6Addr) = ("web6", Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x30));
/// Dual-stack.
pub const DUAL: (&str, Ipv4Addr, Ipv6Addr) = (
    "dual",
    Ipv4Addr::new(10, 96, 0, 31),
    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x31),
);

pub fn pods() -> Vec<PodSpec> {
    let pod = |name: &str, uid: &str, qos, last: u8| PodSpec {
        namespace: if name == PROBER {
            MONITORING
        } else {
            NAMESPACE
        }
        .to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        qos,
        ip: Ipv4Addr::new(10, 244, 0, last),
        ip6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, u16::from(last)),
    };
    vec![
        pod(
            CLIENT,
            "0d4f8a52-1c3b-4e6f-9a70-2b8c4d6e8f01",
            Qos::BestEffort,
            11,
        ),
        pod(
            DENIED,
            "5f7a9c1e-3b5d-4f7a-9c1e-3b5d7f9a1c3e",
            Qos::BestEffort,
            12,
        ),
        pod(
            WEB_POD,
            "7a2e9c14-5b6d-4f80-a1c3-d5e7f9a0b2c4",
            Qos::Burstable,
            21,
        ),
        pod(
            HELD_POD,
            "c3e5a7b9-0d2f-4a6c-8e1b-3d5f7a9c0e2d",
            Qos::Guaranteed,
            22,
        ),
        pod(
            PROBER,
            "9b1d3f5a-7c9e-4b1d-8f3a-5c7e9b1d3f5a",
            Qos::BestEffort,
            13,
        ),
        pod(
            CHAIN[0].2,
            "a1c3e5f7-0b2d-4f6a-8c0e-2a4c6e8a0c01",
            Qos::Burstable,
            40,
        ),
        pod(
            CHAIN[1].2,
            "a1c3e5f7-0b2d-4f6a-8c0e-2a4c6e8a0c02",
            Qos::Guaranteed,
            41,
        ),
        pod(
            CHAIN[2].2,
            "a1c3e5f7-0b2d-4f6a-8c0e-2a4c6e8a0c03",
            Qos::BestEffort,
            42,
        ),
    ]
}

/// The workload a lab pod belongs to: every lab pod is a Deployment's,
/// named `<deployment>-<pod-template-hash>-<suffix>` as the ReplicaSet
/// controller names them.
pub fn workload(pod: &str) -> &str {
    let replica_set = pod.rsplit_once('-').map_or(pod, |(rs, _)| rs);
    replica_set.rsplit_once('-').map_or(replica_set, |(d, _)| d)
}

/// The Pod object the apiserver holds for a lab pod: on this node, owned
/// by its Deployment's ReplicaSet, running with its IPs.
pub fn pod_object(pod: &PodSpec) -> Value {
    let replica_set = pod.name.rsplit_once('-').map_or(&*pod.name, |(rs, _)| rs);
    let hash = replica_set.rsplit_once('-').map_or("", |(_, h)| h);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
            "creationTimestamp": "2026-11-30T09:13:02Z",
            "labels": {
                "app.kubernetes.io/name": workload(&pod.name),
                "pod-template-hash": hash
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": replica_set,
                "uid": format!("{}-rs", &pod.uid[..pod.uid.len() - 3]),
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "nodeName": "lab-node",
            "containers": [{"name": "app", "image": "registry.example/app:1.0"}]
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ip.to_string(),
            "podIPs": [{"ip": pod.ip.to_string()}, {"ip": pod.ip6.to_string()}],
            "qosClass": match pod.qos {
                Qos::Guaranteed => "Guaranteed",
                Qos::Burstable => "Burstable",
                Qos::BestEffort => "BestEffort",
            }
        }
    })
}

/// The pod spec of `name` (one of [`pods`]).
pub fn pod(name: &str) -> PodSpec {
    pods()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no lab pod {name}"))
}

fn service(name: &str, ips: &[IpAddr], annotations: Value) -> Value {
    let families: Vec<&str> = ips
        .iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let policy = if ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": format!("5e1d0c3b-7f2a-4a2b-9c8d-{:012x}", name.bytes().fold(0u64, |h, b| (h * 31 + u64::from(b)) & 0xffff_ffff_ffff)),
            "creationTimestamp": "2026-11-30T09:12:44Z",
            "labels": {"app.kubernetes.io/name": name},
            "annotations": annotations
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips[0].to_string(),
            "clusterIPs": ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ipFamilies": families,
            "ipFamilyPolicy": policy,
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": TARGET_PORT}],
            "selector": {"app.kubernetes.io/name": name},
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster"
        },
        "status": {"loadBalancer": {}}
    })
}

/// An EndpointSlice of `service` in one family, with `pods` (name, address,
/// ready) as its endpoints.
pub fn slice(service: &str, family: &str, pods: &[(&PodSpec, bool)]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(pod, ready)| {
            let address = if family == "IPv4" {
                pod.ip.to_string()
            } else {
                pod.ip6.to_string()
            };
            json!({
                "addresses": [address],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": "lab-node",
                "targetRef": {"kind": "Pod", "name": pod.name, "namespace": pod.namespace, "uid": pod.uid}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": family,
        "metadata": {
            "name": format!("{service}-{}", family.to_lowercase()),
            "namespace": NAMESPACE,
            "generateName": format!("{service}-"),
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            }
        },
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}]
    })
}

/// Every object at the start; `ipv6` adds the IPv6 and dual-stack Services
/// and makes `held` dual-stack.
pub fn objects(ipv6: bool) -> Vec<Value> {
    let web = pod(WEB_POD);
    let hold = json!({
        "internal-tcp-watcher.io/hold": "true",
        "internal-tcp-watcher.io/hold-timeout": format!("{HELD_HOLD_SECS}s")
    });
    let batch_hold = json!({
        "internal-tcp-watcher.io/hold": "true",
        "internal-tcp-watcher.io/hold-timeout": format!("{BATCH_HOLD_SECS}s")
    });
    let mut held_ips = vec![IpAddr::V4(HELD.1)];
    if ipv6 {
        held_ips.push(IpAddr::V6(HELD6));
    }
    let mut objects = vec![
        service(WEB.0, &[WEB.1.into()], json!({})),
        slice(WEB.0, "IPv4", &[(&web, true)]),
        service(COLD.0, &[COLD.1.into()], json!({})),
        slice(COLD.0, "IPv4", &[]),
        service(HELD.0, &held_ips, hold),
        service(BATCH.0, &[BATCH.1.into()], batch_hold),
        slice(BATCH.0, "IPv4", &[]),
        service(QUIET.0, &[QUIET.1.into()], json!({})),
        slice(QUIET.0, "IPv4", &[]),
    ];
    for (name, ip, _) in CHAIN {
        objects.push(service(name, &[ip.into()], json!({})));
    }
    objects.extend(chain_slices(false));
    objects.extend(pods().iter().map(pod_object));
    objects.extend(held_slices(ipv6, false));
    if ipv6 {
        objects.extend([
            service(WEB6.0, &[WEB6.1.into()], json!({})),
            slice(WEB6.0, "IPv6", &[(&web, true)]),
            service(DUAL.0, &[DUAL.1.into(), DUAL.2.into()], json!({})),
            slice(DUAL.0, "IPv4", &[(&web, true)]),
            slice(DUAL.0, "IPv6", &[(&web, true)]),
        ]);
    }
    objects
}

/// `held`'s slices, its pod ready or not.
pub fn held_slices(ipv6: bool, ready: bool) -> Vec<Value> {
    let held = pod(HELD_POD);
    let mut slices = vec![slice(HELD.0, "IPv4", &[(&held, ready)])];
    if ipv6 {
        slices.push(slice(HELD.0, "IPv6", &[(&held, ready)]));
    }
    slices
}

/// The chain's slices: each Service's one pod, ready, or none (scaled to
/// zero).
pub fn chain_slices(ready: bool) -> Vec<Value> {
    CHAIN
        .iter()
        .map(|(service, _, pod_name)| {
            let spec = pod(pod_name);
            if ready {
                slice(service, "IPv4", &[(&spec, true)])
            } else {
                slice(service, "IPv4", &[])
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lab_pod_belongs_to_the_deployment_its_name_says() {
        assert_eq!(workload(CLIENT), "checkout");
        assert_eq!(workload(PROBER), "uptime-checker");
        assert_eq!(workload(CHAIN[2].2), "db");
        let object = pod_object(&pod(CLIENT));
        assert_eq!(
            object["metadata"]["ownerReferences"][0]["name"],
            "checkout-7c9d5"
        );
        assert_eq!(object["metadata"]["labels"]["pod-template-hash"], "7c9d5");
        assert_eq!(object["spec"]["nodeName"], "lab-node");
        assert_eq!(pod(PROBER).namespace, MONITORING);
    }
}
