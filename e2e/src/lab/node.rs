//! One lab node: its network namespace (node IP on `lo`, a default route
//! into a dead end), pods as network namespaces with a routed veth each
//! (Calico style: `/32`s, the node answering for 169.254.1.1 and fe80::1),
//! and the kubelet's cgroups under a node cgroup root.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;

use super::{
    cgroups::{self, Driver, NodeCgroups, Qos},
    netns::Netns,
};

/// The node's address (on its `lo`): what pods reach it at, and the
/// DaemonSet's `status.hostIP`.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x10);
/// The node's link to the dead end, and the dead end's side of it.
const UPLINK4: (&str, &str) = ("172.31.255.1/30", "172.31.255.2");
const UPLINK6: (&str, &str) = ("fd00:ffff::1/126", "fd00:ffff::2");
/// The gateway pods route through: the node's side of every pod veth.
const POD_GATEWAY4: &str = "169.254.1.1";
const POD_GATEWAY6: &str = "fe80::1";

/// A pod to create on the node.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub qos: Qos,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

/// A pod: its network namespace and its container's cgroup.
pub struct Pod {
    pub spec: PodSpec,
    pub netns: Netns,
    pub cgroup: PathBuf,
}

/// A node; everything it made is removed when it is dropped (processes in
/// its cgroups are killed first).
pub struct Node {
    // Declared first: dropped first, so processes die before their
    // namespaces go.
    pub cgroups: NodeCgroups,
    pub pods: Vec<Pod>,
    pub netns: Arc<Netns>,
    _dead_end: Netns,
    pub driver: Driver,
}

impl Node {
    /// Builds the node's network and cgroups. `prefix` names its namespaces
    /// (`<prefix>node`, `<prefix>dead`, `<prefix>p<i>`); `nest` is the node
    /// cgroup root below the hierarchy's root ("" for the root itself).
    pub fn build(
        prefix: &str,
        hierarchy: &Path,
        nest: &str,
        driver: Driver,
        pods: &[PodSpec],
    ) -> anyhow::Result<Self> {
        let cgroups = NodeCgroups::new(hierarchy, nest)?;
        let dead_end = Netns::create(&format!("{prefix}dead"))?;
        let netns = Arc::new(Netns::create(&format!("{prefix}node"))?);
        let mut node = Self {
            cgroups,
            pods: Vec::new(),
            netns,
            _dead_end: dead_end,
            driver,
        };
        node.network().context("building the node's network")?;
        for (i, spec) in pods.iter().enumerate() {
            let pod = node
                .add_pod(prefix, i, spec)
                .with_context(|| format!("building pod {}/{}", spec.namespace, spec.name))?;
            node.pods.push(pod);
        }
        Ok(node)
    }

    fn network(&self) -> anyhow::Result<()> {
        let node = &self.netns;
        let dead = &self._dead_end;
        crate::lab::netns::run(
            "ip",
            &[
                "link", "add", "up0", "netns", &node.name, "type", "veth", "peer", "name", "dn0",
                "netns", &dead.name,
            ],
        )?;
        node.ip(&["addr", "add", UPLINK4.0, "dev", "up0"])?;
        node.ip(&["-6", "addr", "add", UPLINK6.0, "dev", "up0", "nodad"])?;
        dead.ip(&["addr", "add", "172.31.255.2/30", "dev", "dn0"])?;
        dead.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:ffff::2/126",
            "dev",
            "dn0",
            "nodad",
        ])?;
        node.ip(&["link", "set", "up0", "up"])?;
        dead.ip(&["link", "set", "dn0", "up"])?;
        // The dead end forwards nothing: whatever the node sends past its
        // pods ends there.
        dead.sysctl("net.ipv4.ip_forward", "0")?;
        dead.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        node.ip(&["route", "add", "default", "via", UPLINK4.1])?;
        node.ip(&["-6", "route", "add", "default", "via", UPLINK6.1])?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE_IP6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // kube-proxy's REJECT answers with ICMP, which the kernel limits
        // per peer (about one a second past a small burst): a pod's burst of
        // connects to a Service without endpoints would be slowed by that
        // limit, not by what the lab measures.
        node.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        node.sysctl("net.ipv6.icmp.ratelimit", "0")?;
        Ok(())
    }

    fn add_pod(&mut self, prefix: &str, index: usize, spec: &PodSpec) -> anyhow::Result<Pod> {
        let netns = Netns::create(&format!("{prefix}p{index}"))?;
        let host_if = format!("cali{index}");
        crate::lab::netns::run(
            "ip",
            &[
                "link",
                "add",
                &host_if,
                "netns",
                &self.netns.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns.name,
            ],
        )?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["addr", "add", &format!("{}/32", spec.ip), "dev", "eth0"])?;
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/128", spec.ip6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.ip(&["route", "add", POD_GATEWAY4, "dev", "eth0", "scope", "link"])?;
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY4,
            "dev",
            "eth0",
        ])?;
        let node = &self.netns;
        node.ip(&["link", "set", &host_if, "up"])?;
        node.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{POD_GATEWAY6}/64"),
            "dev",
            &host_if,
            "nodad",
        ])?;
        node.ip(&["route", "add", &format!("{}/32", spec.ip), "dev", &host_if])?;
        node.ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/128", spec.ip6),
            "dev",
            &host_if,
        ])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY6,
            "dev",
            "eth0",
        ])?;
        let container = format!("{:0>64}", format!("{index:x}c0ffee"));
        let cgroup = self.cgroups.create(&cgroups::container_path(
            self.driver,
            spec.qos,
            &spec.uid,
            &container,
        ))?;
        Ok(Pod {
            spec: spec.clone(),
            netns,
            cgroup,
        })
    }

    pub fn pod(&self, name: &str) -> anyhow::Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .with_context(|| format!("no pod {name} on the node"))
    }

    /// The cgroup of a process that runs on the node outside any pod.
    pub fn system_cgroup(&mut self, unit: &str) -> anyhow::Result<PathBuf> {
        self.cgroups.create(Path::new(unit))
    }
}
