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
        namespace: NAMESPACE.to_owned(),
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
    ]
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
    ];
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
