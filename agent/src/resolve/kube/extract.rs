//! Translation of Service and EndpointSlice objects into the compact state the
//! resolver keeps.
//!
//! Owns the reading of every field the resolver depends on and the checks on
//! them. It never keeps an object: what it returns holds only interned names,
//! addresses and port numbers. A malformed part of an object (a bad IP, a
//! port out of range, an FQDN slice, a slice without its Service label) is
//! skipped and reported as a [`Malformed`] naming the object and the field;
//! the rest of the object, and the watch, go on. A bad hold annotation is
//! reported the same way and read as absent.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use super::objects::{
    EndpointSliceObject, HOLD_ANNOTATION, HOLD_TIMEOUT_ANNOTATION, SERVICE_NAME_LABEL,
    ServiceObject,
};
use crate::resolve::{
    ServiceRef,
    pod_name::{PodName, PodNames, PodNamesBuilder},
};
use crate::sources::exclude::{EXCLUDE_SOURCES_ANNOTATION, SourceRules};

/// The two kinds of object the resolver watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A part of an object that was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub kind: Kind,
    /// `namespace/name` (as much of it as the object has).
    pub object: String,
    /// The field at fault, as a path into the object (`spec.ports[1].port`).
    pub field: String,
    pub problem: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.kind, self.object, self.field, self.problem
        )
    }
}

/// Interned strings: namespaces, Service names, port names and slice names
/// are shared by every structure that holds them, and by the targets sent
/// downstream.
#[derive(Debug, Default)]
pub struct Names {
    strings: HashSet<Arc<str>>,
}

impl Names {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(found) = self.strings.get(s) {
            return found.clone();
        }
        let new: Arc<str> = s.into();
        self.strings.insert(new.clone());
        new
    }

    pub fn len(&self) -> usize {
        self.strings.len()
    }

    /// Drops the strings nothing else holds any more.
    pub fn collect_garbage(&mut self) {
        self.strings.retain(|s| Arc::strong_count(s) > 1);
    }
}

/// A Service port the resolver maps: TCP only, since only TCP connects are
/// counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    /// Empty for an unnamed port.
    pub name: Arc<str>,
    pub port: u16,
}

/// What the resolver keeps of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Empty for headless and ExternalName Services.
    pub cluster_ips: Box<[IpAddr]>,
    pub ports: Box<[NamedPort]>,
    /// [`HOLD_ANNOTATION`] is `"true"`. Kept with the spec so that a change
    /// of the annotations alone is a change of the Service.
    pub hold: bool,
    /// [`HOLD_TIMEOUT_ANNOTATION`]; `None`: the agent's default.
    pub hold_timeout: Option<Duration>,
    /// The Services the wakes annotation declares this one calls.
    pub wakes: Box<[ServiceRef]>,
    /// [`EXCLUDE_SOURCES_ANNOTATION`](crate::sources::exclude::EXCLUDE_SOURCES_ANNOTATION).
    pub exclude_sources: SourceRules,
}

/// What the resolver keeps of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    /// The `kubernetes.io/service-name` label.
    pub service: Arc<str>,
    /// Ports on the endpoints, named as the Service ports they serve.
    pub ports: Box<[NamedPort]>,
    pub endpoints: Endpoints,
}

/// A slice's endpoint addresses, stored by column because they are most of
/// what the resolver holds: a slice has one address family (its
/// addressType), so an IPv4 address takes 4 bytes, a pod name its text
/// and an offset in the slice's one block of names, readiness a bit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    addresses: Addresses,
    /// A name where the endpoint's `targetRef` is a Pod.
    pods: Arc<PodNames>,
    /// Bit `i` set: address `i` is not ready.
    not_ready: Box<[u64]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Addresses {
    V4(Box<[Ipv4Addr]>),
    /// IPv6, or IPv4-mapped as an IPv6 slice may spell it (the kernel key
    /// and the map's canonical address are the same as for IPv4).
    V6(Box<[Ipv6Addr]>),
}

impl Default for Addresses {
    fn default() -> Self {
        Self::V4(Box::default())
    }
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            addresses: Addresses::default(),
            pods: PodNamesBuilder::default().build(None),
            not_ready: Box::default(),
        }
    }
}

/// One endpoint address.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub ip: IpAddr,
    /// `conditions.ready`, unknown read as ready (as the API asks). Picks
    /// the winner when two objects claim one IP:port, and makes the
    /// Service's ready count.
    pub ready: bool,
    pods: &'a Arc<PodNames>,
    index: usize,
}

impl Endpoint<'_> {
    /// The pod's name as a target holds it.
    pub fn pod_name(&self) -> Option<PodName> {
        PodName::at(self.pods, self.index)
    }

    /// Whether the endpoint's pod is `name`.
    pub fn pod_is(&self, name: &str) -> bool {
        self.pods.is(self.index, name)
    }
}

impl Endpoints {
    pub fn iter(&self) -> impl Iterator<Item = Endpoint<'_>> {
        (0..self.pods.len()).filter_map(|i| self.get(i))
    }

    pub fn get(&self, i: usize) -> Option<Endpoint<'_>> {
        let ip = match &self.addresses {
            Addresses::V4(ips) => IpAddr::V4(*ips.get(i)?),
            Addresses::V6(ips) => IpAddr::V6(*ips.get(i)?),
        };
        let not_ready = self
            .not_ready
            .get(i / 64)
            .is_some_and(|word| word & (1 << (i % 64)) != 0);
        if i >= self.pods.len() {
            return None;
        }
        Some(Endpoint {
            ip,
            ready: !not_ready,
            pods: &self.pods,
            index: i,
        })
    }
}

/// Collects a slice's endpoints of one family.
struct EndpointsBuilder {
    v4: Option<Vec<Ipv4Addr>>,
    v6: Vec<Ipv6Addr>,
    /// Addresses pushed.
    addresses: usize,
    pods: PodNamesBuilder,
    not_ready: Vec<u64>,
}

impl EndpointsBuilder {
    fn new(ipv6: bool, capacity: usize) -> Self {
        Self {
            v4: (!ipv6).then(|| Vec::with_capacity(capacity)),
            v6: Vec::with_capacity(if ipv6 { capacity } else { 0 }),
            addresses: 0,
            pods: PodNamesBuilder::with_capacity(capacity),
            not_ready: Vec::new(),
        }
    }

    /// Adds an address; `Err` names the family it should have been.
    fn push(&mut self, ip: IpAddr, pod: Option<&str>, ready: bool) -> Result<(), &'static str> {
        match (&mut self.v4, ip) {
            (Some(v4), IpAddr::V4(ip)) => v4.push(ip),
            (Some(v4), IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(ip) => v4.push(ip),
                None => return Err("IPv4"),
            },
            (None, IpAddr::V6(ip)) => self.v6.push(ip),
            (None, IpAddr::V4(_)) => return Err("IPv6"),
        }
        let i = self.addresses;
        self.addresses += 1;
        self.pods.push(pod);
        if !ready {
            self.not_ready.resize(i / 64 + 1, 0);
            self.not_ready[i / 64] |= 1 << (i % 64);
        }
        Ok(())
    }

    /// The endpoints; the pod names are `previous`'s block when they are
    /// the same.
    fn build(self, previous: Option<&Endpoints>) -> Endpoints {
        Endpoints {
            addresses: match self.v4 {
                Some(v4) => Addresses::V4(v4.into()),
                None => Addresses::V6(self.v6.into()),
            },
            pods: self.pods.build(previous.map(|p| &p.pods)),
            not_ready: self.not_ready.into(),
        }
    }
}

/// An object's identity and what the resolver keeps of it.
#[derive(Debug)]
pub struct Extracted<S> {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub spec: S,
}

/// The namespace and name of an object, for keys and messages.
pub fn identity<'a>(
    namespace: Option<&'a str>,
    name: Option<&'a str>,
) -> Result<(&'a str, &'a str), String> {
    match (namespace, name) {
        (Some(ns), Some(n)) if !ns.is_empty() && !n.is_empty() => Ok((ns, n)),
        (ns, n) => Err(format!("{}/{}", ns.unwrap_or(""), n.unwrap_or(""))),
    }
}

struct Report<'a> {
    kind: Kind,
    object: String,
    out: &'a mut Vec<Malformed>,
}

impl Report<'_> {
    fn skip(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.out.push(Malformed {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            problem: problem.into(),
        });
    }
}

/// Reads a Service. `None` (with a report) only when it has no
/// namespace/name; any other fault skips just the faulty part.
pub fn service(
    svc: &ServiceObject,
    names: &mut Names,
    malformed: &mut Vec<Malformed>,
) -> Option<Extracted<ServiceSpec>> {
    let meta = &svc.metadata;
    let (namespace, name) = match identity(meta.namespace.as_deref(), meta.name.as_deref()) {
        Ok(id) => id,
        Err(object) => {
            malformed.push(Malformed {
                kind: Kind::Service,
                object,
                field: "metadata".into(),
                problem: "namespace and name are required; object skipped".into(),
            });
            return None;
        }
    };
    let mut report = Report {
        kind: Kind::Service,
        object: format!("{namespace}/{name}"),
        out: malformed,
    };
    let (hold, hold_timeout) = hold_annotations(meta.annotations.as_ref(), &mut report);
    let wakes = wakes_annotation(
        meta.annotations.as_ref(),
        namespace,
        name,
        names,
        &mut report,
    );
    let exclude_sources = exclude_annotation(meta.annotations.as_ref(), &mut report);
    let mut cluster_ips = Vec::new();
    let mut ports = Vec::new();
    match &svc.spec {
        None => report.skip("spec", "missing; the Service maps no destination"),
        Some(spec) => {
            // ExternalName Services are a DNS alias: any clusterIP field on
            // them is not an address the Service answers on.
            if spec.type_.as_deref() != Some("ExternalName") {
                // clusterIPs holds every family; clusterIP alone is what an
                // apiserver older than dual stack (or a hand-made object) sends.
                let (field, given): (&str, Vec<&str>) = match &spec.cluster_ips {
                    Some(ips) if !ips.is_empty() => {
                        ("spec.clusterIPs", ips.iter().map(String::as_str).collect())
                    }
                    _ => (
                        "spec.clusterIP",
                        spec.cluster_ip.as_deref().into_iter().collect(),
                    ),
                };
                for (i, ip) in given.iter().enumerate() {
                    // "None": headless; "": not allocated yet.
                    if *ip == "None" || ip.is_empty() {
                        continue;
                    }
                    let at = if field == "spec.clusterIPs" {
                        format!("{field}[{i}]")
                    } else {
                        field.to_owned()
                    };
                    match parse_ip(ip) {
                        Some(ip) if !cluster_ips.contains(&ip) => cluster_ips.push(ip),
                        Some(_) => {}
                        None => report.skip(at, format!("{ip:?} is not an IP address")),
                    }
                }
            }
            for (i, port) in spec.ports.iter().flatten().enumerate() {
                if !is_tcp(port.protocol.as_deref()) {
                    continue;
                }
                let Some(given) = port.port else {
                    report.skip(format!("spec.ports[{i}].port"), "missing");
                    continue;
                };
                let Some(number) = valid_port(given) else {
                    report.skip(
                        format!("spec.ports[{i}].port"),
                        format!("{given} is not a port (1-65535)"),
                    );
                    continue;
                };
                ports.push(NamedPort {
                    name: names.get(port.name.as_deref().unwrap_or("")),
                    port: number,
                });
            }
        }
    }
    Some(Extracted {
        namespace: names.get(namespace),
        name: names.get(name),
        spec: ServiceSpec {
            cluster_ips: cluster_ips.into(),
            ports: ports.into(),
            hold,
            hold_timeout,
            wakes,
            exclude_sources,
        },
    })
}

/// Reads the wakes annotation; each bad entry is reported and left out.
fn wakes_annotation(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    namespace: &str,
    name: &str,
    names: &mut Names,
    report: &mut Report<'_>,
) -> Box<[ServiceRef]> {
    let Some(value) = annotations.and_then(|a| a.get(crate::resolve::wakes::WAKES_ANNOTATION))
    else {
        return Box::default();
    };
    let (wakes, problems) = crate::resolve::wakes::parse(value, namespace, name);
    for problem in problems {
        report.skip(
            format!(
                "metadata.annotations[\"{}\"]",
                crate::resolve::wakes::WAKES_ANNOTATION
            ),
            problem,
        );
    }
    wakes
        .into_iter()
        .map(|(ns, svc)| ServiceRef::from_names(names.get(ns), names.get(svc)))
        .collect()
}

/// Reads the exclusion annotation; a bad list is reported (naming the
/// entry) and read as absent: the Service is mapped, nothing excluded.
fn exclude_annotation(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    report: &mut Report<'_>,
) -> SourceRules {
    let Some(given) = annotations.and_then(|a| a.get(EXCLUDE_SOURCES_ANNOTATION)) else {
        return SourceRules::default();
    };
    given.parse().unwrap_or_else(|bad| {
        report.skip(
            format!("metadata.annotations[\"{EXCLUDE_SOURCES_ANNOTATION}\"]"),
            format!("{bad}; no source is excluded"),
        );
        SourceRules::default()
    })
}

/// Reads the hold annotations; a bad value is reported and read as absent,
/// so a typo never holds a Service nor stops it from being mapped.
fn hold_annotations(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    report: &mut Report<'_>,
) -> (bool, Option<Duration>) {
    let value = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let field = |key: &str| format!("metadata.annotations[\"{key}\"]");
    let hold = match value(HOLD_ANNOTATION) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            report.skip(
                field(HOLD_ANNOTATION),
                format!("{other:?} is neither \"true\" nor \"false\"; the Service is not held"),
            );
            false
        }
    };
    let hold_timeout = value(HOLD_TIMEOUT_ANNOTATION).and_then(|given| {
        crate::resolve::parse_hold_timeout(given)
            .map_err(|problem| {
                report.skip(
                    field(HOLD_TIMEOUT_ANNOTATION),
                    format!("{problem}; the agent's default applies"),
                );
            })
            .ok()
    });
    (hold, hold_timeout)
}

/// Reads an EndpointSlice. `None` (with a report) when the slice cannot be
/// mapped at all: no namespace/name, no Service label, or an address type
/// other than IPv4/IPv6. `previous` is the slice as held before, whose block
/// of pod names is kept when the names are the same.
pub fn slice(
    slice: &EndpointSliceObject,
    previous: Option<&SliceSpec>,
    names: &mut Names,
    malformed: &mut Vec<Malformed>,
) -> Option<Extracted<SliceSpec>> {
    let meta = &slice.metadata;
    let (namespace, name) = match identity(meta.namespace.as_deref(), meta.name.as_deref()) {
        Ok(id) => id,
        Err(object) => {
            malformed.push(Malformed {
                kind: Kind::EndpointSlice,
                object,
                field: "metadata".into(),
                problem: "namespace and name are required; object skipped".into(),
            });
            return None;
        }
    };
    let mut report = Report {
        kind: Kind::EndpointSlice,
        object: format!("{namespace}/{name}"),
        out: malformed,
    };
    let service = meta
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty());
    let Some(service) = service else {
        report.skip(
            format!("metadata.labels[\"{SERVICE_NAME_LABEL}\"]"),
            "missing; the slice cannot be tied to a Service and is skipped",
        );
        return None;
    };
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        other => {
            report.skip(
                "addressType",
                format!("{other:?}: only IPv4 and IPv6 slices have addresses a connect can go to; slice skipped"),
            );
            return None;
        }
    };

    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if !is_tcp(port.protocol.as_deref()) {
            continue;
        }
        let Some(given) = port.port else {
            report.skip(format!("ports[{i}].port"), "missing");
            continue;
        };
        let Some(number) = valid_port(given) else {
            report.skip(
                format!("ports[{i}].port"),
                format!("{given} is not a port (1-65535)"),
            );
            continue;
        };
        ports.push(NamedPort {
            name: names.get(port.name.as_deref().unwrap_or("")),
            port: number,
        });
    }

    let listed = slice.endpoints.as_deref().unwrap_or_default();
    let addresses = listed.iter().map(|e| e.addresses.len()).sum();
    let mut endpoints = EndpointsBuilder::new(ipv6, addresses);
    for (i, ep) in listed.iter().enumerate() {
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.as_deref())
            .filter(|n| !n.is_empty());
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        for (j, address) in ep.addresses.iter().enumerate() {
            let Some(ip) = parse_endpoint_ip(address) else {
                report.skip(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{address:?} is not an IP address"),
                );
                continue;
            };
            if let Err(family) = endpoints.push(ip, pod, ready) {
                report.skip(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!(
                        "{address:?} is not an {family} address (addressType {})",
                        slice.address_type
                    ),
                );
            }
        }
    }

    Some(Extracted {
        namespace: names.get(namespace),
        // Unique per slice: interning would only add a table entry.
        name: Arc::from(name),
        spec: SliceSpec {
            service: names.get(service),
            ports: ports.into(),
            endpoints: endpoints.build(previous.map(|p| &p.endpoints)),
        },
    })
}

/// Parses an address as the apiserver writes it, in canonical form: an
/// IPv4-mapped IPv6 address becomes IPv4, so one destination has one
/// spelling (see [`crate::resolve::canonical`]).
fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip: IpAddr = s.parse().ok()?;
    Some(crate::resolve::canonical(std::net::SocketAddr::new(ip, 0)).ip())
}

/// An endpoint address: parsed as written (an IPv6 slice may spell an IPv4
/// address mapped; the builder files it by family).
fn parse_endpoint_ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// Kubernetes defaults an unset protocol to TCP.
fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}
