//! Which namespace, Service and Pod an IP:port belongs to.
//!
//! A source (the static file in [`static_map`], the Kubernetes API in `kube`)
//! sends [`MapEvent`]s; the agent applies them to its destination table and
//! the kernel's watched set. Sources are interchangeable: nothing downstream
//! knows which one is running.

pub mod static_map;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use itw_common::Destination;

/// A Kubernetes Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a connect to one IP:port reaches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub service: ServiceRef,
    /// The Service port the destination serves (for a pod IP, the Service
    /// port its target port belongs to), so windows are per Service port
    /// whichever way the caller came in.
    pub port: u16,
    /// Set for pod IPs, `None` for ClusterIPs.
    pub pod: Option<Arc<str>>,
}

/// A complete map: every watched destination and every known Service (a
/// Service with no endpoints and no ClusterIP still gets its zero series).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMap {
    pub destinations: BTreeMap<SocketAddr, Target>,
    pub services: BTreeSet<ServiceRef>,
}

/// One incremental change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapChange {
    /// Watch `addr` as `target` (new, or re-attributed).
    Set(SocketAddr, Target),
    /// Stop watching `addr`.
    Remove(SocketAddr),
    ServiceAdded(ServiceRef),
    ServiceRemoved(ServiceRef),
}

/// What a source sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapEvent {
    /// The whole map (start, reload, relist): it replaces the current one.
    /// Destinations in both keep being counted throughout.
    Reset(ServiceMap),
    /// Changes applied in order.
    Changes(Vec<MapChange>),
}

/// The kernel's key for an IP:port (IPv4 stored IPv4-mapped).
pub fn destination(addr: SocketAddr) -> Destination {
    match addr.ip() {
        IpAddr::V4(ip) => Destination::v4(ip.octets(), addr.port()),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => Destination::v4(v4.octets(), addr.port()),
            None => Destination::new(ip.octets(), addr.port()),
        },
    }
}

/// The canonical form of an address: IPv4-mapped IPv6 becomes IPv4, so a
/// source cannot list one destination twice under two spellings.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_its_mapped_form_are_one_destination() {
        let v4: SocketAddr = "127.10.0.1:8429".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.10.0.1]:8429".parse().unwrap();
        assert_eq!(destination(v4), destination(mapped));
        assert_eq!(canonical(mapped), v4);
        assert_eq!(
            destination(v4).addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 10, 0, 1]
        );
        assert_eq!(destination(v4).port, 8429);
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(destination(v6).addr[15], 1);
        assert_eq!(canonical(v6), v6);
    }
}
