//! Which namespace, Service and Pod an IP:port belongs to.
//!
//! A source (the static file in [`static_map`], the Kubernetes API in `kube`)
//! sends [`MapEvent`]s; the agent applies them to its destination table and
//! the kernel's watched set. Sources are interchangeable: nothing downstream
//! knows which one is running.

pub mod kube;
mod map_destinations;
pub mod pod_name;
pub mod static_map;
pub mod wakes;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use itw_common::Destination;
pub use map_destinations::MapDestinations;
pub use pod_name::PodName;

/// Where the service map comes from.
#[derive(Clone, Debug)]
pub enum MapSource {
    /// `SERVICE_MAP`: a static file, reloaded on change.
    File(std::path::PathBuf),
    /// The Kubernetes API, with checked `WATCH_NAMESPACES` and `SERVICE_SELECTOR`.
    Kube(kube::KubeSettings),
}

/// A Kubernetes Service, by namespace and name.
///
/// One pointer wide (every watched destination's [`Target`] holds one), and
/// shared: clones of one `ServiceRef` are one allocation. It reads as the
/// [`ServiceName`] it points to (`service.namespace`, `service.name`), and
/// compares, orders and hashes by those names.
#[derive(Clone)]
pub struct ServiceRef(Arc<ServiceName>);

/// The names a [`ServiceRef`] stands for.
#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self::from_names(namespace.into(), name.into())
    }

    /// From names already shared elsewhere (a source that interns them).
    pub fn from_names(namespace: Arc<str>, name: Arc<str>) -> Self {
        Self(Arc::new(ServiceName { namespace, name }))
    }
}

impl std::ops::Deref for ServiceRef {
    type Target = ServiceName;

    fn deref(&self) -> &ServiceName {
        &self.0
    }
}

impl PartialEq for ServiceRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for ServiceRef {}

impl std::hash::Hash for ServiceRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialOrd for ServiceRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ServiceRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl fmt::Debug for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceRef")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish()
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
    pub pod: Option<PodName>,
}

/// A complete map: every watched destination and every known Service (a
/// Service with no endpoints and no ClusterIP still gets its zero series).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMap {
    pub destinations: MapDestinations,
    /// Every known Service (one with no endpoints and no ClusterIP still
    /// gets its zero series) and what the hold logic needs to know of it.
    pub services: BTreeMap<ServiceRef, ServiceState>,
}

/// What the agent needs to know of a Service beyond its destinations: whether
/// it asks to be held while it has no ready endpoint, and how many it has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    /// The Service asks to be held (annotation
    /// `internal-tcp-watcher.io/hold: "true"`, or `hold: true` in the static
    /// map).
    pub hold: bool,
    /// How long a connection may be held (annotation
    /// `internal-tcp-watcher.io/hold-timeout`, or `holdTimeout`); `None`:
    /// the agent's default.
    pub hold_timeout: Option<Duration>,
    /// Endpoints ready to take connections, counted once per address (not
    /// per port); `None` when the source cannot tell, which never holds.
    pub ready_endpoints: Option<u32>,
    /// Services this one calls by declaration (annotation
    /// `internal-tcp-watcher.io/wakes`): edges the scalers pre-wake along
    /// even before traffic taught them.
    pub wakes: Vec<ServiceRef>,
    /// Sources whose attempts to this Service are not demand (annotation
    /// `internal-tcp-watcher.io/exclude-sources`); empty: none.
    pub exclude_sources: crate::sources::exclude::SourceRules,
}

/// A hold timeout (`HOLD_TIMEOUT`, and a Service's own): between 1 s and 1 h.
pub fn parse_hold_timeout(s: &str) -> Result<Duration, String> {
    itw_telemetry::flags::bounded_duration(
        s.trim(),
        Duration::from_secs(1),
        Duration::from_secs(3600),
        "30s, 2m",
    )
}

/// One incremental change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapChange {
    /// Watch `addr` as `target` (new, or re-attributed).
    Set(SocketAddr, Target),
    /// Stop watching `addr`.
    Remove(SocketAddr),
    /// A Service is known, or its state changed.
    ServiceSet(ServiceRef, ServiceState),
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

/// A map keyed by kernel destination, compact for the 100k+ destinations of
/// a large cluster: IPv4 keys (nearly all of them) take 8 bytes rather than
/// the 20 of a [`Destination`].
#[derive(Clone, Debug)]
pub struct DestMap<V> {
    v4: HashMap<(u32, u16), V>,
    other: HashMap<Destination, V>,
}

impl<V> Default for DestMap<V> {
    fn default() -> Self {
        Self {
            v4: HashMap::new(),
            other: HashMap::new(),
        }
    }
}

/// The IPv4 key of an IPv4-mapped destination.
fn v4_key(dest: &Destination) -> Option<(u32, u16)> {
    let [a, b, c, d] = [dest.addr[12], dest.addr[13], dest.addr[14], dest.addr[15]];
    (dest.addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff])
        .then(|| (u32::from_be_bytes([a, b, c, d]), dest.port))
}

impl<V> DestMap<V> {
    pub fn get(&self, dest: &Destination) -> Option<&V> {
        match v4_key(dest) {
            Some(key) => self.v4.get(&key),
            None => self.other.get(dest),
        }
    }

    pub fn get_mut(&mut self, dest: &Destination) -> Option<&mut V> {
        match v4_key(dest) {
            Some(key) => self.v4.get_mut(&key),
            None => self.other.get_mut(dest),
        }
    }

    pub fn contains_key(&self, dest: &Destination) -> bool {
        self.get(dest).is_some()
    }

    pub fn insert(&mut self, dest: Destination, value: V) -> Option<V> {
        match v4_key(&dest) {
            Some(key) => self.v4.insert(key, value),
            None => self.other.insert(dest, value),
        }
    }

    pub fn remove(&mut self, dest: &Destination) -> Option<V> {
        match v4_key(dest) {
            Some(key) => self.v4.remove(&key),
            None => self.other.remove(dest),
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.other.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.v4.clear();
        self.other.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = (Destination, &V)> {
        self.v4
            .iter()
            .map(|(&(ip, port), v)| (Destination::v4(ip.to_be_bytes(), port), v))
            .chain(self.other.iter().map(|(d, v)| (*d, v)))
    }
}

/// The address a kernel key stands for, in canonical form (the inverse of
/// [`destination`]).
pub fn socket_addr(dest: &Destination) -> SocketAddr {
    canonical(SocketAddr::new(
        IpAddr::V6(std::net::Ipv6Addr::from(dest.addr)),
        dest.port,
    ))
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
        assert_eq!(socket_addr(&destination(mapped)), v4);
        assert_eq!(socket_addr(&destination(v6)), v6);
    }

    #[test]
    fn a_dest_map_files_both_families_under_their_kernel_keys() {
        let v4: SocketAddr = "127.10.0.1:8429".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.10.0.1]:8429".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        let mut map = DestMap::default();
        assert_eq!(map.insert(destination(v4), 1), None);
        assert_eq!(map.insert(destination(mapped), 2), Some(1));
        assert_eq!(map.insert(destination(v6), 3), None);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(&destination(v4)), Some(&2));
        *map.get_mut(&destination(v6)).unwrap() += 1;
        let mut all: Vec<_> = map.iter().map(|(d, v)| (socket_addr(&d), *v)).collect();
        all.sort();
        assert_eq!(all, vec![(v4, 2), (v6, 4)]);
        assert_eq!(map.remove(&destination(v4)), Some(2));
        assert!(!map.contains_key(&destination(v4)));
        map.clear();
        assert!(map.is_empty());
    }
}
