//! kube-proxy's iptables mode: `KUBE-SERVICES` in the nat table (from
//! PREROUTING for pods, OUTPUT for the node's own processes) jumps per
//! ClusterIP:port to a `KUBE-SVC-*` chain that picks a `KUBE-SEP-*` endpoint
//! chain at random (the `statistic` match), which DNATs; a frontend without
//! endpoints is rejected in the filter table's `KUBE-SERVICES` (from INPUT,
//! FORWARD and OUTPUT, new connections only), so the client gets
//! ECONNREFUSED at once.

use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr};

use super::{Frontend, short_hash};
use crate::lab::netns::Netns;

/// One address family's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn matches(self, ip: IpAddr) -> bool {
        ip.is_ipv4() == (self == Self::V4)
    }

    fn host_prefix(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    fn reject(self) -> &'static str {
        match self {
            Self::V4 => "icmp-port-unreachable",
            Self::V6 => "icmp6-port-unreachable",
        }
    }
}

/// The hooks into KUBE-SERVICES, installed once per node.
pub fn install(node: &Netns) -> anyhow::Result<()> {
    for family in [Family::V4, Family::V6] {
        let ipt = family.iptables();
        node.exec(ipt, &["-t", "nat", "-N", "KUBE-SERVICES"])?;
        for chain in ["PREROUTING", "OUTPUT"] {
            node.exec(ipt, &["-t", "nat", "-A", chain, "-j", "KUBE-SERVICES"])?;
        }
        node.exec(ipt, &["-t", "filter", "-N", "KUBE-SERVICES"])?;
        for chain in ["INPUT", "FORWARD", "OUTPUT"] {
            node.exec(
                ipt,
                &[
                    "-t",
                    "filter",
                    "-A",
                    chain,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "KUBE-SERVICES",
                ],
            )?;
        }
    }
    Ok(())
}

/// The rules of `frontends` in `family`, as `iptables-restore --noflush`
/// input; chains of an earlier sync that are gone (`previous`) are deleted.
/// Returns the input and the chains it defines.
pub fn render(
    frontends: &[Frontend],
    family: Family,
    previous: &BTreeSet<String>,
) -> (String, BTreeSet<String>) {
    let mut chains = BTreeSet::new();
    let mut nat_rules = String::new();
    let mut filter_rules = String::new();
    let prefix = family.host_prefix();
    for frontend in frontends.iter().filter(|f| family.matches(f.cluster_ip)) {
        let ip = frontend.cluster_ip;
        let port = frontend.port;
        let name = &frontend.name;
        if frontend.backends.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -d {ip}/{prefix} -p tcp -m comment --comment \"{name} has no endpoints\" -m tcp --dport {port} -j REJECT --reject-with {}",
                family.reject()
            );
            continue;
        }
        let svc = format!("KUBE-SVC-{}", short_hash(&format!("{name}{ip}")));
        chains.insert(svc.clone());
        let _ = writeln!(
            nat_rules,
            "-A KUBE-SERVICES -d {ip}/{prefix} -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j {svc}"
        );
        let count = frontend.backends.len();
        for (i, backend) in frontend.backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", short_hash(&format!("{svc}{backend}")));
            chains.insert(sep.clone());
            let remaining = count - i;
            if remaining > 1 {
                let _ = writeln!(
                    nat_rules,
                    "-A {svc} -m comment --comment \"{name} -> {backend}\" -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(
                    nat_rules,
                    "-A {svc} -m comment --comment \"{name} -> {backend}\" -j {sep}"
                );
            }
            let _ = writeln!(
                nat_rules,
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {backend}"
            );
        }
    }
    let mut text = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for chain in &chains {
        let _ = writeln!(text, ":{chain} - [0:0]");
    }
    // Flushed first (declared above), then deleted: a chain still holding
    // rules or referenced cannot go.
    let gone: Vec<&String> = previous.difference(&chains).collect();
    for chain in &gone {
        let _ = writeln!(text, ":{chain} - [0:0]");
    }
    text.push_str(&nat_rules);
    for chain in gone {
        let _ = writeln!(text, "-X {chain}");
    }
    text.push_str("COMMIT\n*filter\n:KUBE-SERVICES - [0:0]\n");
    text.push_str(&filter_rules);
    text.push_str("COMMIT\n");
    (text, chains)
}

/// Applies one family's rules in the node's namespace, atomically.
pub fn apply(node: &Netns, family: Family, rules: &str) -> anyhow::Result<()> {
    node.exec_with_input(family.restore(), &["--noflush"], Some(rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(name: &str, ip: &str, backends: &[&str]) -> Frontend {
        Frontend {
            name: name.into(),
            cluster_ip: ip.parse().expect("ip"),
            port: 80,
            backends: backends
                .iter()
                .map(|b| b.parse().expect("backend"))
                .collect(),
        }
    }

    #[test]
    fn renders_kube_proxys_chains_and_rejects() {
        let frontends = [
            frontend(
                "shop/web:http",
                "10.96.0.20",
                &["10.244.0.21:8080", "10.244.0.23:8080"],
            ),
            frontend("shop/cold:http", "10.96.0.21", &[]),
            frontend(
                "shop/web:http",
                "fd00:10:96::20",
                &["[fd00:10:244::21]:8080"],
            ),
        ];
        let (text, chains) = render(&frontends, Family::V4, &BTreeSet::new());
        assert_eq!(
            chains.len(),
            3,
            "one KUBE-SVC and two KUBE-SEP chains: {text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert!(
            text.contains("-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment \"shop/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"),
            "{text}"
        );
        assert!(
            text.contains("--probability 0.5000000000 -j KUBE-SEP-"),
            "{text}"
        );
        assert_eq!(
            text.matches("-j DNAT --to-destination 10.244.0.2").count(),
            2
        );
        assert!(text.contains("-A KUBE-SERVICES -d 10.96.0.21/32 -p tcp -m comment --comment \"shop/cold:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable"));
        assert!(
            !text.contains("fd00"),
            "IPv6 frontends stay out of iptables: {text}"
        );

        // The next sync: web lost its endpoints; its chains are deleted.
        let after = [frontend("shop/web:http", "10.96.0.20", &[])];
        let (text, now) = render(&after, Family::V4, &chains);
        assert!(now.is_empty());
        assert_eq!(text.matches("\n-X KUBE-").count(), 3, "{text}");

        let (v6, _) = render(&frontends, Family::V6, &BTreeSet::new());
        assert!(v6.contains("-d fd00:10:96::20/128"), "{v6}");
        assert!(
            v6.contains("--to-destination [fd00:10:244::21]:8080"),
            "{v6}"
        );
    }
}
