//! kube-proxy's nftables mode: a `kube-proxy` table per family whose
//! `services` chain looks ClusterIP . protocol . port up in the
//! `service-ips` verdict map, jumping to a per-frontend chain that picks an
//! endpoint chain with `numgen random`, which DNATs; frontends without
//! endpoints are in `no-endpoint-services`, checked by the filter hooks for
//! new connections, which reject them.
//!
//! Each sync replaces both tables in one `nft -f` transaction.

use std::{fmt::Write as _, net::IpAddr};

use super::{Frontend, short_hash};
use crate::lab::netns::Netns;

/// The whole ruleset of `frontends` as `nft -f` input.
pub fn render(frontends: &[Frontend]) -> String {
    let mut text = String::new();
    for (family, addr_type, daddr, v4) in [
        ("ip", "ipv4_addr", "ip daddr", true),
        ("ip6", "ipv6_addr", "ip6 daddr", false),
    ] {
        let ours: Vec<&Frontend> = frontends
            .iter()
            .filter(|f| f.cluster_ip.is_ipv4() == v4)
            .collect();
        // Create-then-delete makes the delete valid on the first sync too.
        let _ = writeln!(text, "table {family} kube-proxy {{}}");
        let _ = writeln!(text, "delete table {family} kube-proxy");
        let _ = writeln!(text, "table {family} kube-proxy {{");
        let mut services = Vec::new();
        let mut no_endpoints = Vec::new();
        let mut chains = String::new();
        for frontend in ours {
            let key = format!("{} . tcp . {}", frontend.cluster_ip, frontend.port);
            if frontend.backends.is_empty() {
                no_endpoints.push(format!("{key} : goto reject-chain"));
                continue;
            }
            let base = format!("{}/tcp/{}", frontend.name.replace(':', "/"), frontend.port);
            let service_chain = format!(
                "service-{}-{base}",
                &short_hash(&format!("{base}{}", frontend.cluster_ip))[..8]
            );
            let mut vmap = Vec::new();
            for (i, backend) in frontend.backends.iter().enumerate() {
                let endpoint_chain = format!(
                    "endpoint-{}-{base}__{}/{}",
                    &short_hash(&format!("{service_chain}{backend}"))[..8],
                    bare(backend.ip()),
                    backend.port()
                );
                vmap.push(format!("{i} : goto {endpoint_chain}"));
                let _ = writeln!(
                    chains,
                    "\tchain {endpoint_chain} {{\n\t\tmeta l4proto tcp dnat to {backend}\n\t}}"
                );
            }
            let _ = writeln!(
                chains,
                "\tchain {service_chain} {{\n\t\tnumgen random mod {} vmap {{ {} }}\n\t}}",
                frontend.backends.len(),
                vmap.join(", ")
            );
            services.push(format!("{key} : goto {service_chain}"));
        }
        for (map, elements) in [
            ("service-ips", &services),
            ("no-endpoint-services", &no_endpoints),
        ] {
            let _ = writeln!(
                text,
                "\tmap {map} {{\n\t\ttype {addr_type} . inet_proto . inet_service : verdict"
            );
            if !elements.is_empty() {
                let _ = writeln!(text, "\t\telements = {{ {} }}", elements.join(", "));
            }
            text.push_str("\t}\n");
        }
        text.push_str("\tchain reject-chain {\n\t\treject\n\t}\n");
        let _ = writeln!(
            text,
            "\tchain service-endpoints-check {{\n\t\t{daddr} . meta l4proto . th dport vmap @no-endpoint-services\n\t}}"
        );
        for hook in ["input", "forward", "output"] {
            let _ = writeln!(
                text,
                "\tchain filter-{hook} {{\n\t\ttype filter hook {hook} priority -110; policy accept;\n\t\tct state new jump service-endpoints-check\n\t}}"
            );
        }
        let _ = writeln!(
            text,
            "\tchain services {{\n\t\t{daddr} . meta l4proto . th dport vmap @service-ips\n\t}}"
        );
        for hook in ["prerouting", "output"] {
            let _ = writeln!(
                text,
                "\tchain nat-{hook} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n\t\tjump services\n\t}}"
            );
        }
        text.push_str(&chains);
        text.push_str("}\n");
    }
    text
}

/// An address as it can stand in a chain name: nft identifiers take no `:`.
fn bare(ip: IpAddr) -> String {
    ip.to_string().replace(':', ".")
}

/// Applies the ruleset in the node's namespace, atomically.
pub fn apply(node: &Netns, ruleset: &str) -> anyhow::Result<()> {
    node.exec_with_input("nft", &["-f", "-"], Some(ruleset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_families_with_reject_for_no_endpoints() {
        let frontends = [
            Frontend {
                name: "shop/web:http".into(),
                cluster_ip: "10.96.0.20".parse().expect("ip"),
                port: 80,
                backends: vec!["10.244.0.21:8080".parse().expect("backend")],
            },
            Frontend {
                name: "shop/cold:http".into(),
                cluster_ip: "10.96.0.21".parse().expect("ip"),
                port: 80,
                backends: vec![],
            },
            Frontend {
                name: "shop/web:http".into(),
                cluster_ip: "fd00:10:96::20".parse().expect("ip"),
                port: 80,
                backends: vec!["[fd00:10:244::21]:8080".parse().expect("backend")],
            },
        ];
        let text = render(&frontends);
        assert!(text.contains("table ip kube-proxy {\n"), "{text}");
        assert!(text.contains("table ip6 kube-proxy {\n"), "{text}");
        assert!(
            text.contains("elements = { 10.96.0.21 . tcp . 80 : goto reject-chain }"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto tcp dnat to 10.244.0.21:8080"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto tcp dnat to [fd00:10:244::21]:8080"),
            "{text}"
        );
        assert!(
            text.contains("numgen random mod 1 vmap { 0 : goto endpoint-"),
            "{text}"
        );
        assert!(text.contains("ip6 daddr . meta l4proto . th dport vmap @service-ips"));
    }
}
