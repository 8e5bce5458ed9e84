//! What stands between a pod's `connect()` and a Service on a real node, as
//! the node lab builds it: kube-proxy's rules in iptables or nftables mode,
//! or a socket load balancer in the kernel. Each is programmed from the
//! Services and EndpointSlices the mock API server serves (by [`super::proxy`],
//! some time after each change, as kube-proxy and Cilium's agent are).
//!
//! - [`iptables`], [`nftables`]: kube-proxy's chain and table shapes, rendered
//!   as `iptables-restore` / `nft -f` input and applied atomically.
//! - [`socklb`] (crate `itw-socket-lb`): the `lab-lb.o` programs at the node's cgroup root, with or
//!   without `BPF_F_PREORDER`, and their backend map.

pub mod iptables;
pub mod nftables;
pub use itw_socket_lb::{self as socklb, Frontend};

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// Which datapath a lab node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Iptables,
    Nftables,
    /// A socket load balancer at the node's cgroup root; `preorder`: attached
    /// with `BPF_F_PREORDER`, so it runs before the programs of child cgroups.
    SocketLb {
        preorder: bool,
    },
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Iptables => "kube-proxy iptables",
            Self::Nftables => "kube-proxy nftables",
            Self::SocketLb { preorder: false } => "socket LB",
            Self::SocketLb { preorder: true } => "socket LB (preorder)",
        })
    }
}

/// The frontends of every ClusterIP Service, as kube-proxy computes them:
/// each TCP port on each ClusterIP, with the ready endpoints of the slices
/// labelled with the Service's name, of the ClusterIP's family, on the port
/// of the same name.
pub fn frontends(services: &[Service], slices: &[EndpointSlice]) -> Vec<Frontend> {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        by_service
            .entry((namespace, service.clone()))
            .or_default()
            .push(slice);
    }
    let mut out = Vec::new();
    for service in services {
        let (Some(namespace), Some(name), Some(spec)) = (
            service.metadata.namespace.as_ref(),
            service.metadata.name.as_ref(),
            service.spec.as_ref(),
        ) else {
            continue;
        };
        let ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let slices = by_service
            .get(&(namespace.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let port_name = port.name.clone().unwrap_or_default();
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            for ip in &ips {
                let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                let mut backends: Vec<SocketAddr> = slices
                    .iter()
                    .filter(|s| s.address_type == family)
                    .flat_map(|slice| {
                        let target = slice
                            .ports
                            .iter()
                            .flatten()
                            .find(|p| p.name.clone().unwrap_or_default() == port_name)
                            .and_then(|p| p.port)
                            .and_then(|p| u16::try_from(p).ok());
                        slice
                            .endpoints
                            .iter()
                            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                            .flat_map(move |e| {
                                e.addresses.iter().filter_map(move |a| {
                                    Some(SocketAddr::new(a.parse().ok()?, target?))
                                })
                            })
                    })
                    .collect();
                backends.sort();
                backends.dedup();
                out.push(Frontend {
                    name: format!("{namespace}/{name}:{port_name}"),
                    cluster_ip: *ip,
                    port: service_port,
                    backends,
                });
            }
        }
    }
    out.sort();
    out
}

/// A stable, kube-proxy-like short hash of `text` for chain names (base32 of
/// FNV-1a; kube-proxy uses SHA-256, only the shape matters here).
fn short_hash(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (0..16)
        .map(|i| ALPHABET[((hash >> (i * 4)) & 31) as usize] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(name: &str, ips: &[&str]) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": name},
            "spec": {
                "clusterIP": ips[0], "clusterIPs": ips,
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
            }
        }))
        .expect("service")
    }

    fn slice(service: &str, family: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": format!("{service}-{family}"),
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": family,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .expect("slice")
    }

    #[test]
    fn frontends_take_ready_endpoints_of_the_clusterips_family() {
        let services = [
            service("web", &["10.96.0.20", "fd00:10:96::20"]),
            service("cold", &["10.96.0.21"]),
        ];
        let slices = [
            slice(
                "web",
                "IPv4",
                json!([
                    {"addresses": ["10.244.0.21"], "conditions": {"ready": true}},
                    {"addresses": ["10.244.0.22"], "conditions": {"ready": false}},
                    {"addresses": ["10.244.0.23"]}
                ]),
            ),
            slice("web", "IPv6", json!([{"addresses": ["fd00:10:244::21"]}])),
            slice("cold", "IPv4", json!([])),
        ];
        let got = frontends(&services, &slices);
        let view: Vec<(String, String, Vec<String>)> = got
            .iter()
            .map(|f| {
                (
                    f.name.clone(),
                    f.addr().to_string(),
                    f.backends.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            view,
            vec![
                ("shop/cold:http".into(), "10.96.0.21:80".into(), vec![]),
                (
                    "shop/web:http".into(),
                    "10.96.0.20:80".into(),
                    vec!["10.244.0.21:8080".into(), "10.244.0.23:8080".into()]
                ),
                (
                    "shop/web:http".into(),
                    "[fd00:10:96::20]:80".into(),
                    vec!["[fd00:10:244::21]:8080".into()]
                ),
            ]
        );
    }

    #[test]
    fn short_hashes_are_stable_and_distinct() {
        assert_eq!(short_hash("shop/web:http"), short_hash("shop/web:http"));
        assert_ne!(short_hash("shop/web:http"), short_hash("shop/cold:http"));
        assert_eq!(short_hash("x").len(), 16);
    }
}
