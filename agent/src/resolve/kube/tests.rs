//! Reflector-level tests: synthetic watcher events built from objects shaped
//! as the apiserver sends them, and the exact [`MapEvent`]s and map that
//! result. Every step also checks that the events sent so far, applied in
//! order, give exactly the resolver's own map (nothing lost or stale
//! downstream), and that a fresh relist of the same objects gives that map
//! too (the winner of a contested IP:port does not depend on event order).

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use kube::runtime::watcher::Event;
use serde_json::{Value, json};

mod sources;

use super::{
    EndpointSliceObject as EndpointSlice, Kind, Resolver, ServiceObject as Service, StreamSpec,
};
use crate::resolve::{MapChange, MapEvent, ServiceMap, ServiceRef, ServiceState, Target};

mod wakes;

// ---- objects as the apiserver sends them -------------------------------

/// A Service port: (name, port, targetPort).
type Port<'a> = (&'a str, u16, u16);

fn service_json(ns: &str, name: &str, cluster_ips: &[&str], ports: &[Port<'_>]) -> Value {
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": format!("5d1c7e52-0000-4000-8000-{:012x}", name.len()),
            "resourceVersion": "1000",
            "creationTimestamp": "2025-03-01T09:00:00Z",
            "labels": { "app": name },
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\"}\n"
            },
            "managedFields": [{
                "manager": "kubectl-client-side-apply",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2025-03-01T09:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": { "f:spec": { "f:ports": {} } }
            }]
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ips.first().copied().unwrap_or("None"),
            "clusterIPs": if cluster_ips.is_empty() { json!(["None"]) } else { json!(cluster_ips) },
            "ipFamilies": if families.is_empty() { json!(["IPv4"]) } else { json!(families) },
            "ipFamilyPolicy": if cluster_ips.len() > 1 { "PreferDualStack" } else { "SingleStack" },
            "ports": ports.iter().map(|(n, p, t)| {
                let mut port = json!({ "protocol": "TCP", "port": p, "targetPort": t });
                if !n.is_empty() {
                    port["name"] = json!(n);
                }
                port
            }).collect::<Vec<_>>(),
            "selector": { "app": name },
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster"
        },
        "status": { "loadBalancer": {} }
    })
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("test object does not decode: {e}"))
}

fn service(ns: &str, name: &str, cluster_ips: &[&str], ports: &[Port<'_>]) -> Service {
    decode(service_json(ns, name, cluster_ips, ports))
}

/// An endpoint: (address, pod, ready).
type Ep<'a> = (&'a str, Option<&'a str>, bool);

fn slice_json(
    ns: &str,
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, u16)],
    endpoints: &[Ep<'_>],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": ns,
            "uid": "0b5c7a3e-1111-4000-8000-000000000001",
            "resourceVersion": "1001",
            "generation": 3,
            "creationTimestamp": "2025-03-01T09:00:01Z",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
                "app": service
            },
            "annotations": { "endpoints.kubernetes.io/last-change-trigger-time": "2025-03-01T09:00:01Z" },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Service",
                "name": service,
                "uid": "5d1c7e52-0000-4000-8000-000000000003",
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "addressType": address_type,
        "endpoints": if endpoints.is_empty() { Value::Null } else {
            json!(endpoints.iter().map(|(ip, pod, ready)| {
                let mut ep = json!({
                    "addresses": [ip],
                    "conditions": { "ready": ready, "serving": ready, "terminating": !ready },
                    "nodeName": "node-a",
                    "zone": "zone-1"
                });
                if let Some(pod) = pod {
                    ep["targetRef"] = json!({
                        "kind": "Pod",
                        "namespace": ns,
                        "name": pod,
                        "uid": "9f0e1d2c-2222-4000-8000-000000000002"
                    });
                }
                ep
            }).collect::<Vec<_>>())
        },
        "ports": ports.iter().map(|(n, p)| json!({ "name": n, "protocol": "TCP", "port": p })).collect::<Vec<_>>()
    })
}

fn slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[Ep<'_>],
) -> EndpointSlice {
    decode(slice_json(ns, name, service, "IPv4", ports, endpoints))
}

fn slice6(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[Ep<'_>],
) -> EndpointSlice {
    decode(slice_json(ns, name, service, "IPv6", ports, endpoints))
}

// ---- expectations ----------------------------------------------------------

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn svc_ref(ns: &str, name: &str) -> ServiceRef {
    ServiceRef::new(ns, name)
}

fn target(ns: &str, svc: &str, port: u16, pod: Option<&str>) -> Target {
    Target {
        service: svc_ref(ns, svc),
        port,
        pod: pod.map(Into::into),
    }
}

fn set(a: &str, ns: &str, svc: &str, port: u16, pod: Option<&str>) -> MapChange {
    MapChange::Set(addr(a), target(ns, svc, port, pod))
}

fn remove(a: &str) -> MapChange {
    MapChange::Remove(addr(a))
}

/// A Service that does not ask to be held, with `n` ready endpoints.
fn ready(n: u32) -> ServiceState {
    ServiceState {
        hold: false,
        hold_timeout: None,
        ready_endpoints: Some(n),
        wakes: Vec::new(),
        exclude_sources: Default::default(),
    }
}

fn service_set(ns: &str, name: &str, state: ServiceState) -> MapChange {
    MapChange::ServiceSet(svc_ref(ns, name), state)
}

/// `services`: (namespace, name, ready endpoints), none of them held.
fn map_of(
    services: &[(&str, &str, u32)],
    destinations: &[(&str, &str, &str, u16, Option<&str>)],
) -> ServiceMap {
    ServiceMap {
        destinations: destinations
            .iter()
            .map(|(a, ns, svc, port, pod)| (addr(a), target(ns, svc, *port, *pod)))
            .collect(),
        services: services
            .iter()
            .map(|(ns, n, r)| (svc_ref(ns, n), ready(*r)))
            .collect::<BTreeMap<_, _>>(),
    }
}

// ---- harness ---------------------------------------------------------------

/// A resolver on all namespaces (stream 0: Services, 1: EndpointSlices), and
/// the map as a consumer that applied every event sent would hold it.
struct Harness {
    resolver: Resolver,
    downstream: Option<ServiceMap>,
    /// Every object currently live, to check a relist reproduces the map.
    services: Live<Service>,
    slices: Live<EndpointSlice>,
    /// Whether each step is checked against a fresh relist (not for the
    /// harness that does that relist).
    verify: bool,
}

const SERVICES: usize = 0;
const SLICES: usize = 1;

/// The live objects of one kind as a watcher's events leave them, and the
/// objects of a list in progress.
struct Live<K> {
    objects: BTreeMap<(String, String), K>,
    listing: Option<BTreeMap<(String, String), K>>,
}

impl<K: kube::Resource + Clone> Live<K> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            listing: None,
        }
    }

    fn track(&mut self, event: &Event<K>) {
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                self.listing
                    .get_or_insert_default()
                    .insert(key(o.meta()), o.clone());
            }
            Event::InitDone => {
                if let Some(listed) = self.listing.take() {
                    self.objects = listed;
                }
            }
            Event::Apply(o) => {
                self.objects.insert(key(o.meta()), o.clone());
            }
            Event::Delete(o) => {
                self.objects.remove(&key(o.meta()));
            }
        }
    }

    /// The live objects, in the reverse of their key order.
    fn reversed(&self) -> Vec<K> {
        self.objects.values().rev().cloned().collect()
    }
}

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Harness {
    fn new() -> Self {
        Self::with_checks(true)
    }

    fn with_checks(verify: bool) -> Self {
        Self {
            resolver: Resolver::new(vec![
                StreamSpec {
                    kind: Kind::Service,
                    namespace: None,
                },
                StreamSpec {
                    kind: Kind::EndpointSlice,
                    namespace: None,
                },
            ]),
            downstream: None,
            services: Live::new(),
            slices: Live::new(),
            verify,
        }
    }

    /// Lists both kinds; returns the Reset.
    fn start(services: Vec<Service>, slices: Vec<EndpointSlice>) -> (Self, ServiceMap) {
        Self::start_with(true, services, slices)
    }

    fn start_with(
        verify: bool,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
    ) -> (Self, ServiceMap) {
        let mut h = Self::with_checks(verify);
        assert_eq!(h.svc(Event::Init), None);
        for s in services {
            assert_eq!(h.svc(Event::InitApply(s)), None);
        }
        assert_eq!(
            h.svc(Event::InitDone),
            None,
            "nothing before every stream listed"
        );
        assert_eq!(h.slice(Event::Init), None);
        for s in slices {
            assert_eq!(h.slice(Event::InitApply(s)), None);
        }
        let Some(MapEvent::Reset(map)) = h.slice(Event::InitDone) else {
            panic!("the last list must send the complete map");
        };
        (h, map)
    }

    fn svc(&mut self, event: Event<Service>) -> Option<MapEvent> {
        self.services.track(&event);
        let outcome = self.resolver.service_event(SERVICES, event);
        self.after(outcome.event)
    }

    fn slice(&mut self, event: Event<EndpointSlice>) -> Option<MapEvent> {
        self.slices.track(&event);
        let outcome = self.resolver.slice_event(SLICES, event);
        self.after(outcome.event)
    }

    fn after(&mut self, event: Option<MapEvent>) -> Option<MapEvent> {
        if let Some(event) = &event {
            apply(&mut self.downstream, event.clone());
        }
        if self.verify && self.resolver.synced() {
            let own = self.resolver.map();
            assert_eq!(
                self.downstream.as_ref(),
                Some(&own),
                "the events sent must add up to the resolver's map"
            );
            assert_eq!(self.resolver.destinations(), own.destinations.len());
            if let Some(downstream) = &self.downstream {
                assert_pods_in_the_same_blocks(downstream, &own);
            }
            // A relist of the same objects, in another order, rebuilds it.
            let (_, relisted) =
                Self::start_with(false, self.services.reversed(), self.slices.reversed());
            assert_eq!(relisted, own, "a relist must rebuild the same map");
        }
        event
    }

    fn map(&self) -> ServiceMap {
        self.resolver.map()
    }
}

/// Downstream holds every pod name in the block the resolver holds it in,
/// so no block outlives its slice's update (`maps` are equal).
fn assert_pods_in_the_same_blocks(downstream: &ServiceMap, own: &ServiceMap) {
    for ((at, held), (_, now)) in downstream.destinations.iter().zip(own.destinations.iter()) {
        if let (Some(held), Some(now)) = (&held.pod, &now.pod) {
            assert!(
                held.same_block(now),
                "{at}: downstream holds {held} in a block the resolver no longer uses"
            );
        }
    }
}

/// What a consumer does with the events (the DestinationTable's semantics).
fn apply(downstream: &mut Option<ServiceMap>, event: MapEvent) {
    match event {
        MapEvent::Reset(map) => *downstream = Some(map),
        MapEvent::Changes(changes) => {
            let map = downstream.as_mut().expect("changes before the first reset");
            for change in changes {
                match change {
                    MapChange::Set(a, t) => {
                        map.destinations.insert(a, t);
                    }
                    MapChange::Remove(a) => {
                        map.destinations.remove(&a);
                    }
                    MapChange::ServiceSet(s, state) => {
                        let before = map.services.insert(s.clone(), state.clone());
                        assert_ne!(
                            before,
                            Some(state),
                            "a ServiceSet of {s} that changes nothing"
                        );
                    }
                    MapChange::ServiceRemoved(s) => {
                        map.services.remove(&s);
                    }
                }
            }
        }
    }
}

fn changes(event: Option<MapEvent>) -> Vec<MapChange> {
    match event {
        Some(MapEvent::Changes(c)) => c,
        other => panic!("expected changes, got {other:?}"),
    }
}

fn web() -> Service {
    service("shop", "web", &["10.96.0.10"], &[("http", 80, 8080)])
}

fn web_slice(endpoints: &[Ep<'_>]) -> EndpointSlice {
    slice("shop", "web-abcde", "web", &[("http", 8080)], endpoints)
}

// ---- tests -----------------------------------------------------------------

#[test]
fn the_first_list_sends_one_complete_map() {
    let (h, map) = Harness::start(
        vec![
            web(),
            service(
                "shop",
                "api",
                &["10.96.0.11"],
                &[("http", 80, 8080), ("grpc", 9090, 9090)],
            ),
        ],
        vec![
            web_slice(&[
                ("10.244.1.5", Some("web-0"), true),
                ("10.244.2.7", Some("web-1"), false),
            ]),
            slice(
                "shop",
                "api-xyz12",
                "api",
                &[("grpc", 9090), ("http", 8080)],
                &[("10.244.1.9", Some("api-0"), true)],
            ),
        ],
    );
    let expected = map_of(
        // web-1 is not ready.
        &[("shop", "api", 1), ("shop", "web", 1)],
        &[
            ("10.96.0.10:80", "shop", "web", 80, None),
            ("10.96.0.11:80", "shop", "api", 80, None),
            ("10.96.0.11:9090", "shop", "api", 9090, None),
            // Pod IP:targetPort -> the Service port it serves; not-ready pods count too.
            ("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
            ("10.244.2.7:8080", "shop", "web", 80, Some("web-1")),
            ("10.244.1.9:8080", "shop", "api", 80, Some("api-0")),
            ("10.244.1.9:9090", "shop", "api", 9090, Some("api-0")),
        ],
    );
    assert_eq!(map, expected);
    assert_eq!(h.resolver.objects(Kind::Service), 2);
    assert_eq!(h.resolver.objects(Kind::EndpointSlice), 2);
    assert_eq!(h.resolver.destinations(), 7);
}

#[test]
fn add_modify_and_delete_send_only_what_changed() {
    let (mut h, _) = Harness::start(vec![], vec![]);

    // Add.
    assert_eq!(
        changes(h.svc(Event::Apply(web()))),
        vec![
            service_set("shop", "web", ready(0)),
            set("10.96.0.10:80", "shop", "web", 80, None),
        ]
    );
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[(
            "10.244.1.5",
            Some("web-0"),
            true
        )])))),
        vec![
            set("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
            service_set("shop", "web", ready(1)),
        ]
    );

    // An update that changes nothing mapped (a status write) sends nothing.
    let mut same = web();
    same.metadata.resource_version = Some("1002".into());
    assert_eq!(h.svc(Event::Apply(same)), None);

    // Modify the port: the ClusterIP entry moves and the slice is re-mapped
    // to the new Service port (same name, same targetPort).
    assert_eq!(
        changes(h.svc(Event::Apply(service(
            "shop",
            "web",
            &["10.96.0.10"],
            &[("http", 8000, 8080)]
        )))),
        vec![
            remove("10.96.0.10:80"),
            set("10.96.0.10:8000", "shop", "web", 8000, None),
            set("10.244.1.5:8080", "shop", "web", 8000, Some("web-0")),
        ]
    );

    // Modify the clusterIPs: a second family is added (dual stack).
    assert_eq!(
        changes(h.svc(Event::Apply(service(
            "shop",
            "web",
            &["10.96.0.10", "fd00:10:96::a"],
            &[("http", 8000, 8080)]
        )))),
        vec![set("[fd00:10:96::a]:8000", "shop", "web", 8000, None)]
    );

    // A slice change: one pod leaves, one comes (still one ready: the
    // Service's state is not sent again).
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[(
            "10.244.3.3",
            Some("web-2"),
            true
        )])))),
        vec![
            remove("10.244.1.5:8080"),
            set("10.244.3.3:8080", "shop", "web", 8000, Some("web-2")),
        ]
    );

    // Delete the slice, then the Service.
    assert_eq!(
        changes(h.slice(Event::Delete(web_slice(&[])))),
        vec![
            remove("10.244.3.3:8080"),
            service_set("shop", "web", ready(0)),
        ]
    );
    assert_eq!(
        changes(h.svc(Event::Delete(web()))),
        vec![
            remove("10.96.0.10:8000"),
            remove("[fd00:10:96::a]:8000"),
            MapChange::ServiceRemoved(svc_ref("shop", "web")),
        ]
    );
    assert_eq!(h.map(), ServiceMap::default());
    assert_eq!(h.resolver.objects(Kind::Service), 0);
    assert_eq!(h.resolver.objects(Kind::EndpointSlice), 0);
}

#[test]
fn deleting_a_service_unmaps_its_endpoints_too() {
    let (mut h, _) = Harness::start(
        vec![web()],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );
    assert_eq!(
        changes(h.svc(Event::Delete(web()))),
        vec![
            remove("10.96.0.10:80"),
            remove("10.244.1.5:8080"),
            MapChange::ServiceRemoved(svc_ref("shop", "web")),
        ]
    );
    // The slice stays known and maps again when the Service comes back,
    // which comes with its ready count.
    assert_eq!(
        changes(h.svc(Event::Apply(web()))),
        vec![
            service_set("shop", "web", ready(1)),
            set("10.96.0.10:80", "shop", "web", 80, None),
            set("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
        ]
    );
}

#[test]
fn a_relist_swaps_the_map_whole_and_drops_what_is_gone() {
    let api = service("shop", "api", &["10.96.0.11"], &[("http", 80, 8080)]);
    let (mut h, _) = Harness::start(
        vec![web(), api.clone()],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );

    // A relist after a 410: web is gone (deleted while we were not
    // watching), api changed its port. Nothing is sent until InitDone.
    assert_eq!(h.svc(Event::Init), None);
    assert_eq!(
        h.svc(Event::InitApply(service(
            "shop",
            "api",
            &["10.96.0.11"],
            &[("http", 81, 8080)]
        ))),
        None
    );
    // Meanwhile the other stream keeps working on the current map (web-0
    // is re-sent: its name is in the slice's new block of names).
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[
            ("10.244.1.5", Some("web-0"), true),
            ("10.244.1.6", Some("web-1"), true),
        ])))),
        vec![
            set("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
            set("10.244.1.6:8080", "shop", "web", 80, Some("web-1")),
            service_set("shop", "web", ready(2)),
        ]
    );
    let Some(MapEvent::Reset(map)) = h.svc(Event::InitDone) else {
        panic!("a relist ends with a reset");
    };
    assert_eq!(
        map,
        map_of(
            &[("shop", "api", 0)],
            &[("10.96.0.11:81", "shop", "api", 81, None)]
        )
    );
    assert_eq!(h.resolver.objects(Kind::Service), 1);
    // web's slice is still held, waiting for its Service.
    assert_eq!(h.resolver.objects(Kind::EndpointSlice), 1);
}

#[test]
fn a_list_that_fails_half_way_changes_nothing() {
    let (mut h, before) = Harness::start(
        vec![web()],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );
    // Init, one page, then the list fails: the watcher starts over with Init.
    assert_eq!(h.slice(Event::Init), None);
    assert_eq!(h.slice(Event::InitApply(web_slice(&[]))), None);
    assert_eq!(h.resolver.map(), before);
    assert_eq!(h.slice(Event::Init), None);
    assert_eq!(
        h.slice(Event::InitApply(web_slice(&[(
            "10.244.1.5",
            Some("web-0"),
            true
        )]))),
        None
    );
    assert_eq!(h.slice(Event::InitDone), Some(MapEvent::Reset(before)));
}

#[test]
fn a_list_end_without_a_start_is_ignored() {
    let (mut h, before) = Harness::start(vec![web()], vec![]);
    assert_eq!(h.slice(Event::InitDone), None);
    assert_eq!(h.resolver.map(), before);
}

#[test]
fn an_ip_reused_by_another_pod_is_re_attributed_at_once() {
    let api = service("shop", "api", &["10.96.0.11"], &[("http", 80, 8080)]);
    let api_slice = |eps: &[Ep<'_>]| slice("shop", "api-xyz12", "api", &[("http", 8080)], eps);
    let (mut h, _) = Harness::start(
        vec![web(), api],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );

    // The usual order: the old pod's slice drops the IP, then the new pod's
    // slice lists it.
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[])))),
        vec![
            remove("10.244.1.5:8080"),
            service_set("shop", "web", ready(0)),
        ]
    );
    assert_eq!(
        changes(h.slice(Event::Apply(api_slice(&[(
            "10.244.1.5",
            Some("api-0"),
            true
        )])))),
        vec![
            set("10.244.1.5:8080", "shop", "api", 80, Some("api-0")),
            service_set("shop", "api", ready(1)),
        ]
    );

    // The other order, with the stale listing not ready (the old pod is
    // terminating): the new ready owner wins at once.
    assert_eq!(
        h.slice(Event::Apply(web_slice(&[(
            "10.244.1.5",
            Some("web-9"),
            false
        )]))),
        None
    );
    assert_eq!(
        h.map().destinations[&addr("10.244.1.5:8080")],
        target("shop", "api", 80, Some("api-0"))
    );
    // ...and the other way round: api's pod leaves, web's pod takes the IP.
    assert_eq!(
        changes(h.slice(Event::Apply(api_slice(&[])))),
        vec![
            set("10.244.1.5:8080", "shop", "web", 80, Some("web-9")),
            service_set("shop", "api", ready(0)),
        ]
    );
    // When the stale listing becomes ready it stays the owner (only web's
    // ready count moves); when it leaves, the IP is unwatched.
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[(
            "10.244.1.5",
            Some("web-9"),
            true
        )])))),
        vec![service_set("shop", "web", ready(1))]
    );
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[])))),
        vec![
            remove("10.244.1.5:8080"),
            service_set("shop", "web", ready(0)),
        ]
    );
}

#[test]
fn an_ip_moving_between_services_of_equal_rank_switches_when_the_winner_leaves() {
    // A stale slice still lists the IP as ready while the new one lists it
    // too: both claim; the winner is fixed by name (api < web), and when it
    // lets go, the other takes over in the same change.
    let api = service("shop", "api", &["10.96.0.11"], &[("http", 80, 8080)]);
    let api_slice = |eps: &[Ep<'_>]| slice("shop", "api-xyz12", "api", &[("http", 8080)], eps);
    let (mut h, _) = Harness::start(
        vec![web(), api],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );
    assert_eq!(
        changes(h.slice(Event::Apply(api_slice(&[(
            "10.244.1.5",
            Some("api-0"),
            true
        )])))),
        vec![
            set("10.244.1.5:8080", "shop", "api", 80, Some("api-0")),
            service_set("shop", "api", ready(1)),
        ]
    );
    assert_eq!(
        changes(h.slice(Event::Delete(api_slice(&[])))),
        vec![
            set("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
            service_set("shop", "api", ready(0)),
        ]
    );
}

#[test]
fn a_pod_in_two_services_is_attributed_to_one_and_switches_when_it_goes() {
    let both = |name: &str| service("shop", name, &[], &[("http", 80, 8080)]);
    let (mut h, map) = Harness::start(
        vec![both("web-canary"), both("web-stable")],
        vec![
            slice(
                "shop",
                "web-stable-1",
                "web-stable",
                &[("http", 8080)],
                &[("10.244.1.5", Some("web-0"), true)],
            ),
            slice(
                "shop",
                "web-canary-1",
                "web-canary",
                &[("http", 8080)],
                &[("10.244.1.5", Some("web-0"), true)],
            ),
        ],
    );
    assert_eq!(
        map.destinations[&addr("10.244.1.5:8080")],
        target("shop", "web-canary", 80, Some("web-0"))
    );
    assert_eq!(
        changes(h.svc(Event::Delete(both("web-canary")))),
        vec![
            set("10.244.1.5:8080", "shop", "web-stable", 80, Some("web-0")),
            MapChange::ServiceRemoved(svc_ref("shop", "web-canary")),
        ]
    );
}

#[test]
fn a_slice_before_its_service_waits_for_it() {
    let (mut h, map) = Harness::start(
        vec![],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );
    assert_eq!(map, ServiceMap::default());
    assert_eq!(
        h.slice(Event::Apply(web_slice(&[
            ("10.244.1.5", Some("web-0"), true),
            ("10.244.1.6", Some("web-1"), true),
        ]))),
        None
    );
    assert_eq!(
        changes(h.svc(Event::Apply(web()))),
        vec![
            service_set("shop", "web", ready(2)),
            set("10.96.0.10:80", "shop", "web", 80, None),
            set("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
            set("10.244.1.6:8080", "shop", "web", 80, Some("web-1")),
        ]
    );
}

#[test]
fn dual_stack_maps_both_families() {
    let svc = service(
        "shop",
        "web",
        &["10.96.0.10", "fd00:10:96::a"],
        &[("http", 80, 8080)],
    );
    let (_, map) = Harness::start(
        vec![svc],
        vec![
            web_slice(&[("10.244.1.5", Some("web-0"), true)]),
            slice6(
                "shop",
                "web-v6abc",
                "web",
                &[("http", 8080)],
                // An odd but valid spelling, and an IPv4-mapped address:
                // both are stored canonically.
                &[
                    ("FD00:10:244:1::5", Some("web-0"), true),
                    ("::ffff:10.244.9.9", Some("web-9"), true),
                ],
            ),
        ],
    );
    assert_eq!(
        map,
        map_of(
            // Every address counts, of both families; the IPv4-mapped one
            // as the IPv4 address it is.
            &[("shop", "web", 3)],
            &[
                ("10.96.0.10:80", "shop", "web", 80, None),
                ("[fd00:10:96::a]:80", "shop", "web", 80, None),
                ("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
                ("[fd00:10:244:1::5]:8080", "shop", "web", 80, Some("web-0")),
                ("10.244.9.9:8080", "shop", "web", 80, Some("web-9")),
            ]
        )
    );
}

#[test]
fn headless_and_external_name_services_have_no_cluster_ip_entries() {
    let headless = service("db", "postgres", &[], &[("pg", 5432, 5432)]);
    let mut external = service_json("db", "legacy", &[], &[("pg", 5432, 5432)]);
    external["spec"] = json!({
        "type": "ExternalName",
        "externalName": "db.example.com",
        "clusterIP": "10.96.0.99",
        "ports": [{ "name": "pg", "protocol": "TCP", "port": 5432, "targetPort": 5432 }],
        "sessionAffinity": "None"
    });
    let (mut h, map) = Harness::start(
        vec![headless.clone(), decode(external)],
        vec![slice(
            "db",
            "postgres-1",
            "postgres",
            &[("pg", 5432)],
            &[("10.244.4.4", Some("postgres-0"), true)],
        )],
    );
    // Both are known (zero series); only the headless one's pods are mapped.
    assert_eq!(
        map,
        map_of(
            &[("db", "legacy", 0), ("db", "postgres", 1)],
            &[(
                "10.244.4.4:5432",
                "db",
                "postgres",
                5432,
                Some("postgres-0")
            )]
        )
    );
    // Adding a headless Service announces it and maps nothing of its own.
    assert_eq!(
        changes(h.svc(Event::Apply(service(
            "db",
            "redis",
            &[],
            &[("redis", 6379, 6379)]
        )))),
        vec![service_set("db", "redis", ready(0))]
    );
    let _ = headless;
}

#[test]
fn a_service_with_no_endpoints_keeps_its_cluster_ip_entries() {
    let (mut h, map) = Harness::start(vec![web()], vec![web_slice(&[])]);
    assert_eq!(
        map,
        map_of(
            &[("shop", "web", 0)],
            &[("10.96.0.10:80", "shop", "web", 80, None)]
        )
    );
    // Scaled to zero: the slice empties, the ClusterIP stays watched.
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[(
            "10.244.1.5",
            Some("web-0"),
            true
        )])))),
        vec![
            set("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
            service_set("shop", "web", ready(1)),
        ]
    );
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[])))),
        vec![
            remove("10.244.1.5:8080"),
            service_set("shop", "web", ready(0)),
        ]
    );
    assert!(h.map().destinations.contains_key(&addr("10.96.0.10:80")));
}

#[test]
fn ports_match_by_name_and_udp_is_left_out() {
    let dns = service_json("kube-system", "kube-dns", &["10.96.0.10"], &[]);
    let mut dns = dns;
    dns["spec"]["ports"] = json!([
        { "name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53 },
        { "name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 53 },
        { "name": "metrics", "protocol": "TCP", "port": 9153, "targetPort": 9153 }
    ]);
    let mut dns_slice = slice_json(
        "kube-system",
        "kube-dns-abc",
        "kube-dns",
        "IPv4",
        &[],
        &[("10.244.0.2", Some("coredns-0"), true)],
    );
    dns_slice["ports"] = json!([
        { "name": "dns", "protocol": "UDP", "port": 53 },
        { "name": "metrics", "protocol": "TCP", "port": 9153 },
        { "name": "dns-tcp", "protocol": "TCP", "port": 53 },
        // A port the Service no longer has (update in flight): not mapped.
        { "name": "old", "protocol": "TCP", "port": 1234 }
    ]);
    let unnamed = service("shop", "one", &["10.96.0.12"], &[("", 80, 8080)]);
    let mut unnamed_slice = slice_json(
        "shop",
        "one-1",
        "one",
        "IPv4",
        &[],
        &[("10.244.5.5", None, true)],
    );
    unnamed_slice["ports"] = json!([{ "protocol": "TCP", "port": 8080 }]);
    let (_, map) = Harness::start(
        vec![decode(dns), unnamed],
        vec![decode(dns_slice), decode(unnamed_slice)],
    );
    assert_eq!(
        map,
        map_of(
            &[("kube-system", "kube-dns", 1), ("shop", "one", 1)],
            &[
                ("10.96.0.10:53", "kube-system", "kube-dns", 53, None),
                ("10.96.0.10:9153", "kube-system", "kube-dns", 9153, None),
                (
                    "10.244.0.2:53",
                    "kube-system",
                    "kube-dns",
                    53,
                    Some("coredns-0")
                ),
                (
                    "10.244.0.2:9153",
                    "kube-system",
                    "kube-dns",
                    9153,
                    Some("coredns-0")
                ),
                // No targetRef: no pod.
                ("10.96.0.12:80", "shop", "one", 80, None),
                ("10.244.5.5:8080", "shop", "one", 80, None),
            ]
        )
    );
}

#[test]
fn malformed_parts_are_skipped_with_the_object_and_field_named() {
    let mut h = Harness::new();
    let mut bad_service = service_json(
        "shop",
        "web",
        &["10.96.0.10", "10.96.0.300"],
        &[("http", 80, 8080), ("huge", 0, 1)],
    );
    bad_service["spec"]["ports"][1]["port"] = json!(70000);
    let outcome = h
        .resolver
        .service_event(SERVICES, Event::Apply(decode(bad_service.clone())));
    let found: Vec<(String, String, String)> = outcome
        .malformed
        .iter()
        .map(|m| (m.object.clone(), m.field.clone(), m.problem.clone()))
        .collect();
    assert_eq!(
        found,
        vec![
            (
                "shop/web".into(),
                "spec.clusterIPs[1]".into(),
                "\"10.96.0.300\" is not an IP address".into()
            ),
            (
                "shop/web".into(),
                "spec.ports[1].port".into(),
                "70000 is not a port (1-65535)".into()
            ),
        ]
    );
    assert_eq!(
        outcome.malformed[0].to_string(),
        "Service shop/web: spec.clusterIPs[1]: \"10.96.0.300\" is not an IP address"
    );

    let mut no_label = slice_json(
        "shop",
        "stray",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[("10.244.1.1", None, true)],
    );
    no_label["metadata"]["labels"] = json!({ "app": "web" });
    let mut fqdn = slice_json("shop", "web-fqdn", "web", "FQDN", &[("http", 8080)], &[]);
    fqdn["endpoints"] = json!([{ "addresses": ["web.example.com"] }]);
    let mut bad_addr = slice_json(
        "shop",
        "web-abcde",
        "web",
        "IPv4",
        &[("http", 8080), ("admin", 9000)],
        &[
            ("10.244.1.5", Some("web-0"), true),
            ("10.244.1.6", Some("web-1"), true),
        ],
    );
    bad_addr["endpoints"][1]["addresses"] = json!(["10.244.1.x"]);
    bad_addr["ports"][1]["port"] = json!(-1);

    let cases = [
        (
            no_label,
            "shop/stray",
            "metadata.labels[\"kubernetes.io/service-name\"]",
            "missing",
        ),
        (fqdn, "shop/web-fqdn", "addressType", "\"FQDN\""),
    ];
    for (object, name, field, problem) in cases {
        let outcome = h.resolver.slice_event(SLICES, Event::Apply(decode(object)));
        assert_eq!(outcome.malformed.len(), 1, "{:?}", outcome.malformed);
        let m = &outcome.malformed[0];
        assert_eq!(
            (m.kind, m.object.as_str(), m.field.as_str()),
            (Kind::EndpointSlice, name, field)
        );
        assert!(m.problem.contains(problem), "{}", m.problem);
    }
    let outcome = h
        .resolver
        .slice_event(SLICES, Event::Apply(decode(bad_addr.clone())));
    let fields: Vec<&str> = outcome.malformed.iter().map(|m| m.field.as_str()).collect();
    assert_eq!(fields, vec!["ports[1].port", "endpoints[1].addresses[0]"]);

    // The watch goes on: the good parts of those objects are mapped when
    // the list completes, and later events still apply.
    let mut h = Harness::new();
    h.svc(Event::Init);
    h.svc(Event::InitApply(decode(bad_service)));
    h.svc(Event::InitDone);
    h.slice(Event::Init);
    h.slice(Event::InitApply(decode(bad_addr)));
    let Some(MapEvent::Reset(map)) = h.slice(Event::InitDone) else {
        panic!("expected the map");
    };
    assert_eq!(
        map,
        map_of(
            // The endpoint with the bad address is not counted.
            &[("shop", "web", 1)],
            &[
                ("10.96.0.10:80", "shop", "web", 80, None),
                ("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
            ]
        )
    );
    assert_eq!(
        changes(h.svc(Event::Apply(service(
            "shop",
            "api",
            &["10.96.0.11"],
            &[("http", 80, 8080)]
        )))),
        vec![
            service_set("shop", "api", ready(0)),
            set("10.96.0.11:80", "shop", "api", 80, None),
        ]
    );
}

#[test]
fn a_slice_that_loses_its_service_label_is_unmapped() {
    let (mut h, _) = Harness::start(
        vec![web()],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );
    let mut relabelled = slice_json(
        "shop",
        "web-abcde",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[("10.244.1.5", Some("web-0"), true)],
    );
    relabelled["metadata"]["labels"] = json!({});
    let outcome = h
        .resolver
        .slice_event(SLICES, Event::Apply(decode(relabelled)));
    assert_eq!(outcome.malformed.len(), 1);
    assert_eq!(
        outcome.event,
        Some(MapEvent::Changes(vec![
            remove("10.244.1.5:8080"),
            service_set("shop", "web", ready(0)),
        ]))
    );
}

#[test]
fn objects_without_a_name_are_skipped() {
    let (mut h, before) = Harness::start(vec![web()], vec![]);
    let mut nameless = service_json("shop", "x", &["10.96.0.50"], &[("http", 80, 80)]);
    nameless["metadata"]
        .as_object_mut()
        .map(|m| m.remove("name"));
    let outcome = h
        .resolver
        .service_event(SERVICES, Event::Apply(decode(nameless.clone())));
    assert_eq!(outcome.event, None);
    assert_eq!(outcome.malformed[0].object, "shop/");
    assert_eq!(outcome.malformed[0].field, "metadata");
    let outcome = h
        .resolver
        .service_event(SERVICES, Event::Delete(decode(nameless)));
    assert_eq!(outcome.malformed.len(), 1);
    assert_eq!(h.resolver.map(), before);
}

#[test]
fn namespaced_streams_sync_and_relist_independently() {
    let spec = |kind, ns: &str| StreamSpec {
        kind,
        namespace: Some(ns.into()),
    };
    let mut resolver = Resolver::new(vec![
        spec(Kind::Service, "shop"),
        spec(Kind::EndpointSlice, "shop"),
        spec(Kind::Service, "db"),
        spec(Kind::EndpointSlice, "db"),
    ]);
    let pg = || service("db", "pg", &["10.96.1.1"], &[("pg", 5432, 5432)]);
    for (stream, obj) in [(0, Some(web())), (2, Some(pg()))] {
        assert_eq!(resolver.service_event(stream, Event::Init).event, None);
        if let Some(obj) = obj {
            assert_eq!(
                resolver.service_event(stream, Event::InitApply(obj)).event,
                None
            );
        }
        assert_eq!(resolver.service_event(stream, Event::InitDone).event, None);
    }
    assert_eq!(resolver.slice_event(1, Event::Init).event, None);
    assert_eq!(resolver.slice_event(1, Event::InitDone).event, None);
    assert!(!resolver.synced());
    assert!(resolver.kind_synced(Kind::Service));
    assert!(!resolver.kind_synced(Kind::EndpointSlice));
    assert_eq!(resolver.slice_event(3, Event::Init).event, None);
    let Some(MapEvent::Reset(map)) = resolver.slice_event(3, Event::InitDone).event else {
        panic!("the last of four lists sends the map");
    };
    assert_eq!(map.services.len(), 2);

    // A relist of db's Services leaves shop's alone.
    resolver.service_event(2, Event::Init);
    let Some(MapEvent::Reset(map)) = resolver.service_event(2, Event::InitDone).event else {
        panic!("a relist ends with a reset");
    };
    assert_eq!(
        map,
        map_of(
            &[("shop", "web", 0)],
            &[("10.96.0.10:80", "shop", "web", 80, None)]
        )
    );
    // An object of another namespace on a namespaced stream is ignored.
    assert_eq!(resolver.service_event(2, Event::Apply(web())).event, None);
    assert_eq!(resolver.map(), map);
}

#[test]
fn updates_keep_a_slices_block_of_pod_names_or_move_every_target_to_the_new_one() {
    let (mut h, first) = Harness::start(
        vec![web()],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );
    let web_0 = addr("10.244.1.5:8080");
    let pod = |map: &ServiceMap, at: SocketAddr| map.destinations[&at].pod.clone().expect("pod");
    let pod_before = pod(&first, web_0);

    // Readiness alone: the same names, the same block, nothing re-sent.
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[(
            "10.244.1.5",
            Some("web-0"),
            false
        )])))),
        vec![service_set("shop", "web", ready(0))]
    );
    assert!(pod(&h.map(), web_0).same_block(&pod_before));

    // A new pod: a new block, and web-0's target is sent again in it (the
    // harness checks downstream holds the resolver's blocks after each step).
    assert_eq!(
        changes(h.slice(Event::Apply(web_slice(&[
            ("10.244.1.5", Some("web-0"), false),
            ("10.244.1.6", Some("web-1"), true),
        ])))),
        vec![
            set("10.244.1.5:8080", "shop", "web", 80, Some("web-0")),
            set("10.244.1.6:8080", "shop", "web", 80, Some("web-1")),
            service_set("shop", "web", ready(1)),
        ]
    );
    let after = h.map();
    let pod_after = pod(&after, web_0);
    assert_eq!(pod_after, pod_before);
    assert!(!pod_after.same_block(&pod_before));
    assert!(pod_after.same_block(&pod(&after, addr("10.244.1.6:8080"))));
    // And Services are interned: every target of web shares one name.
    let names: Vec<_> = after
        .destinations
        .values()
        .map(|t| t.service.name.clone())
        .collect();
    assert!(names.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
}

/// Random sequences of Services and slices over a small address space, so
/// IPs collide, move and come back: after every event the events sent add up
/// to the resolver's map and a relist rebuilds it (checked by the harness).
#[test]
fn random_churn_keeps_downstream_and_relists_in_agreement() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(0x17c0_ffee);
    let (mut h, _) = Harness::start(vec![], vec![]);
    let names = ["a", "b", "c"];
    for _ in 0..400 {
        let svc = names[rng.random_range(0..names.len())];
        match rng.random_range(0..10) {
            0..=2 => {
                let port = [80u16, 81][rng.random_range(0..2)];
                let ips: &[&str] = match rng.random_range(0..3) {
                    0 => &[],
                    1 => &["10.96.0.1"],
                    _ => &["10.96.0.2", "fd00::2"],
                };
                h.svc(Event::Apply(service(
                    "ns",
                    svc,
                    ips,
                    &[("http", port, 8080)],
                )));
            }
            3 => {
                h.svc(Event::Delete(service("ns", svc, &[], &[])));
            }
            4..=8 => {
                let slice_name = format!("{svc}-{}", rng.random_range(0..2));
                let n = rng.random_range(0..3);
                let ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
                let pods = ["p1", "p2"];
                let eps: Vec<Ep<'_>> = (0..n)
                    .map(|_| {
                        (
                            ips[rng.random_range(0..ips.len())],
                            Some(pods[rng.random_range(0..pods.len())]),
                            rng.random_bool(0.7),
                        )
                    })
                    .collect();
                let port_name = ["http", "other"][usize::from(rng.random_bool(0.1))];
                h.slice(Event::Apply(slice(
                    "ns",
                    &slice_name,
                    svc,
                    &[(port_name, 8080)],
                    &eps,
                )));
            }
            9 if rng.random_bool(0.5) => {
                // One slice whose Service label moves between Services.
                let eps: Vec<Ep<'_>> = vec![("10.0.0.1", Some("p1"), rng.random_bool(0.5))];
                h.slice(Event::Apply(slice(
                    "ns",
                    "moving",
                    svc,
                    &[("http", 8080)],
                    &eps,
                )));
            }
            _ => {
                let slice_name = format!("{svc}-{}", rng.random_range(0..2));
                h.slice(Event::Delete(slice("ns", &slice_name, svc, &[], &[])));
            }
        }
    }
}

#[test]
fn names_of_deleted_objects_are_not_kept_forever() {
    let (mut h, _) = Harness::start(vec![], vec![]);
    h.verify = false;
    for i in 0..2000 {
        let name = format!("job-{i}");
        h.svc(Event::Apply(service(
            "batch",
            &name,
            &["10.96.9.1"],
            &[("http", 80, 80)],
        )));
        h.slice(Event::Apply(slice(
            "batch",
            &format!("{name}-x"),
            &name,
            &[("http", 80)],
            &[("10.244.9.1", Some("p"), true)],
        )));
        h.slice(Event::Delete(slice(
            "batch",
            &format!("{name}-x"),
            &name,
            &[],
            &[],
        )));
        h.svc(Event::Delete(service("batch", &name, &[], &[])));
    }
    assert_eq!(h.map(), ServiceMap::default());
    let held = h.resolver.names_held();
    assert!(held < 300, "{held} names held after churn");
}

#[test]
fn an_address_of_the_other_family_is_skipped_unless_it_is_ipv4_mapped() {
    let svc = service("shop", "web", &[], &[("http", 80, 8080)]);
    let v4 = slice(
        "shop",
        "web-v4",
        "web",
        &[("http", 8080)],
        &[
            ("fd00::7", Some("web-7"), true),
            ("::ffff:10.244.1.8", Some("web-8"), true),
        ],
    );
    let v6 = slice6(
        "shop",
        "web-v6",
        "web",
        &[("http", 8080)],
        &[("10.244.1.9", Some("web-9"), true)],
    );
    let mut h = Harness::new();
    h.svc(Event::Init);
    h.svc(Event::InitApply(svc));
    h.svc(Event::InitDone);
    h.slice(Event::Init);
    for (object, field, problem) in [
        (
            v4,
            "endpoints[0].addresses[0]",
            "\"fd00::7\" is not an IPv4 address (addressType IPv4)",
        ),
        (
            v6,
            "endpoints[0].addresses[0]",
            "\"10.244.1.9\" is not an IPv6 address (addressType IPv6)",
        ),
    ] {
        let outcome = h.resolver.slice_event(SLICES, Event::InitApply(object));
        let found: Vec<_> = outcome
            .malformed
            .iter()
            .map(|m| (m.field.as_str(), m.problem.as_str()))
            .collect();
        assert_eq!(found, vec![(field, problem)]);
    }
    let Some(MapEvent::Reset(map)) = h.resolver.slice_event(SLICES, Event::InitDone).event else {
        panic!("expected the map");
    };
    assert_eq!(
        map,
        map_of(
            &[("shop", "web", 1)],
            &[("10.244.1.8:8080", "shop", "web", 80, Some("web-8"))]
        )
    );
}

// ---- hold annotations and readiness ----------------------------------------

const HOLD: &str = "internal-tcp-watcher.io/hold";
const HOLD_TIMEOUT: &str = "internal-tcp-watcher.io/hold-timeout";

/// web, with `annotations` added to the ones it already has.
fn web_annotated(annotations: &[(&str, &str)]) -> Service {
    let mut svc = service_json("shop", "web", &["10.96.0.10"], &[("http", 80, 8080)]);
    for (key, value) in annotations {
        svc["metadata"]["annotations"][*key] = json!(value);
    }
    decode(svc)
}

fn held(timeout: Option<u64>, n: u32) -> ServiceState {
    ServiceState {
        hold: true,
        hold_timeout: timeout.map(std::time::Duration::from_secs),
        ready_endpoints: Some(n),
        wakes: Vec::new(),
        exclude_sources: Default::default(),
    }
}

#[test]
fn hold_annotations_make_the_service_state() {
    let pg = |annotations: Value| {
        let mut svc = service_json("db", "pg", &["10.96.1.1"], &[("pg", 5432, 5432)]);
        svc["metadata"]["annotations"] = annotations;
        decode::<Service>(svc)
    };
    let (mut h, map) = Harness::start(
        vec![
            web_annotated(&[(HOLD, "true"), (HOLD_TIMEOUT, "45s")]),
            pg(json!({ HOLD: "false", HOLD_TIMEOUT: "2m" })),
        ],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), false)])],
    );
    assert_eq!(
        map.services,
        BTreeMap::from([
            (
                svc_ref("db", "pg"),
                ServiceState {
                    hold: false,
                    hold_timeout: Some(std::time::Duration::from_secs(120)),
                    ready_endpoints: Some(0),
                    wakes: Vec::new(),
                    exclude_sources: Default::default(),
                }
            ),
            (svc_ref("shop", "web"), held(Some(45), 0)),
        ])
    );
    // Announced with its annotations when it comes after the first list.
    assert_eq!(
        changes(h.svc(Event::Apply(pg(json!({ HOLD: "true" }))))),
        vec![service_set("db", "pg", held(None, 0))]
    );
    // No annotations at all (the map absent, or null): not held.
    let mut bare = service_json("db", "bare", &[], &[("pg", 5432, 5432)]);
    bare["metadata"]
        .as_object_mut()
        .map(|m| m.remove("annotations"));
    assert_eq!(
        changes(h.svc(Event::Apply(decode(bare)))),
        vec![service_set("db", "bare", ready(0))]
    );
    let mut null = service_json("db", "null", &[], &[("pg", 5432, 5432)]);
    null["metadata"]["annotations"] = Value::Null;
    assert_eq!(
        changes(h.svc(Event::Apply(decode(null)))),
        vec![service_set("db", "null", ready(0))]
    );
}

#[test]
fn an_annotation_change_alone_sends_one_service_set() {
    let (mut h, map) = Harness::start(
        vec![web()],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );
    assert_eq!(map.services[&svc_ref("shop", "web")], ready(1));

    assert_eq!(
        changes(h.svc(Event::Apply(web_annotated(&[(HOLD, "true")])))),
        vec![service_set("shop", "web", held(None, 1))]
    );
    assert_eq!(
        changes(h.svc(Event::Apply(web_annotated(&[
            (HOLD, "true"),
            (HOLD_TIMEOUT, "30s")
        ])))),
        vec![service_set("shop", "web", held(Some(30), 1))]
    );
    // Another annotation, or a new resourceVersion: nothing to send.
    let mut same = web_annotated(&[(HOLD, "true"), (HOLD_TIMEOUT, "30s"), ("x/y", "z")]);
    same.metadata.resource_version = Some("2000".into());
    assert_eq!(h.svc(Event::Apply(same)), None);
    // Removed: back to the default.
    assert_eq!(
        changes(h.svc(Event::Apply(web()))),
        vec![service_set("shop", "web", ready(1))]
    );
    assert_eq!(h.map().services[&svc_ref("shop", "web")], ready(1));
}

#[test]
fn bad_hold_annotations_are_reported_and_read_as_absent() {
    let (mut h, _) = Harness::start(vec![], vec![]);
    let outcome = h.resolver.service_event(
        SERVICES,
        Event::Apply(web_annotated(&[(HOLD, "yes"), (HOLD_TIMEOUT, "soon")])),
    );
    let found: Vec<(Kind, &str, &str)> = outcome
        .malformed
        .iter()
        .map(|m| (m.kind, m.object.as_str(), m.field.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![
            (
                Kind::Service,
                "shop/web",
                "metadata.annotations[\"internal-tcp-watcher.io/hold\"]"
            ),
            (
                Kind::Service,
                "shop/web",
                "metadata.annotations[\"internal-tcp-watcher.io/hold-timeout\"]"
            ),
        ]
    );
    assert!(
        outcome.malformed[0].problem.contains("\"yes\""),
        "{}",
        outcome.malformed[0].problem
    );
    assert!(
        outcome.malformed[1].problem.contains("\"soon\""),
        "{}",
        outcome.malformed[1].problem
    );
    // The Service itself is mapped as ever, not held, with the default
    // timeout.
    assert_eq!(
        outcome.event,
        Some(MapEvent::Changes(vec![
            service_set("shop", "web", ready(0)),
            set("10.96.0.10:80", "shop", "web", 80, None),
        ]))
    );

    // A timeout out of range, and a hold value in the wrong case: the same.
    for (annotations, field, problem) in [
        (
            [(HOLD, "true"), (HOLD_TIMEOUT, "100ms")],
            HOLD_TIMEOUT,
            "\"100ms\": must be between 1s and 1h",
        ),
        (
            [(HOLD, "True"), (HOLD_TIMEOUT, "2h")],
            HOLD,
            "\"True\" is neither",
        ),
    ] {
        let outcome = h
            .resolver
            .service_event(SERVICES, Event::Apply(web_annotated(&annotations)));
        assert!(
            outcome
                .malformed
                .iter()
                .any(|m| m.field.contains(field) && m.problem.contains(problem)),
            "{:?}",
            outcome.malformed
        );
        let state = &h.map().services[&svc_ref("shop", "web")];
        assert_eq!(state.hold_timeout, None);
        assert!(h.map().destinations.contains_key(&addr("10.96.0.10:80")));
    }
    assert_eq!(h.map().services[&svc_ref("shop", "web")], ready(0));
}

#[test]
fn ready_endpoints_count_distinct_ready_addresses() {
    let api = service("shop", "api", &["10.96.0.11"], &[("http", 80, 8080)]);
    // conditions.ready absent (no conditions, or ready null) means ready.
    let mut first = slice_json(
        "shop",
        "web-abcde",
        "web",
        "IPv4",
        &[("http", 8080)],
        &[
            ("10.244.1.1", Some("web-1"), true),
            ("10.244.1.2", Some("web-2"), true),
            ("10.244.1.3", Some("web-3"), true),
            ("10.244.1.4", Some("web-4"), false),
        ],
    );
    first["endpoints"][1]
        .as_object_mut()
        .map(|e| e.remove("conditions"));
    first["endpoints"][2]["conditions"]["ready"] = Value::Null;
    let (mut h, map) = Harness::start(vec![web(), api], vec![decode(first)]);
    assert_eq!(map.services[&svc_ref("shop", "web")], ready(3));
    assert_eq!(map.services[&svc_ref("shop", "api")], ready(0));

    // A second slice of web: one new ready address, one listed in the first
    // slice too (counted once), one not ready.
    let second = |eps: &[Ep<'_>]| slice("shop", "web-fghij", "web", &[("http", 8080)], eps);
    assert_eq!(
        changes(h.slice(Event::Apply(second(&[
            ("10.244.1.1", Some("web-1"), true),
            ("10.244.2.1", Some("web-5"), true),
            ("10.244.2.2", Some("web-6"), false),
        ])))),
        vec![
            set("10.244.2.1:8080", "shop", "web", 80, Some("web-5")),
            set("10.244.2.2:8080", "shop", "web", 80, Some("web-6")),
            service_set("shop", "web", ready(4)),
        ]
    );
    // The same address twice in one slice is one too; an address that goes
    // not ready here is still ready in the first slice. (The names are
    // listed anew, so the slice's targets are re-sent in its new block.)
    assert_eq!(
        changes(h.slice(Event::Apply(second(&[
            ("10.244.1.1", Some("web-1"), false),
            ("10.244.2.1", Some("web-5"), true),
            ("10.244.2.1", Some("web-5"), true),
            ("10.244.2.2", Some("web-6"), true),
        ])))),
        vec![
            set("10.244.2.1:8080", "shop", "web", 80, Some("web-5")),
            set("10.244.2.2:8080", "shop", "web", 80, Some("web-6")),
            service_set("shop", "web", ready(5)),
        ]
    );

    // A slice of another Service leaves web alone.
    let api_slice = slice(
        "shop",
        "api-xyz12",
        "api",
        &[("http", 8080)],
        &[("10.244.3.1", Some("api-0"), true)],
    );
    assert_eq!(
        changes(h.slice(Event::Apply(api_slice.clone()))),
        vec![
            set("10.244.3.1:8080", "shop", "api", 80, Some("api-0")),
            service_set("shop", "api", ready(1)),
        ]
    );
    assert_eq!(h.map().services[&svc_ref("shop", "web")], ready(5));

    // A slice deleted: its addresses no longer count (10.244.1.1 still
    // does, through the first slice).
    assert_eq!(
        changes(h.slice(Event::Delete(second(&[])))),
        vec![
            remove("10.244.2.1:8080"),
            remove("10.244.2.2:8080"),
            service_set("shop", "web", ready(3)),
        ]
    );
    assert_eq!(
        changes(h.slice(Event::Delete(api_slice))),
        vec![
            remove("10.244.3.1:8080"),
            service_set("shop", "api", ready(0)),
        ]
    );
    // A slice whose ports alone change (no readiness change): no state.
    let mut ports_only = slice_json(
        "shop",
        "web-abcde",
        "web",
        "IPv4",
        &[("http", 8081)],
        &[
            ("10.244.1.1", Some("web-1"), true),
            ("10.244.1.2", Some("web-2"), true),
            ("10.244.1.3", Some("web-3"), true),
            ("10.244.1.4", Some("web-4"), false),
        ],
    );
    ports_only["endpoints"][1]
        .as_object_mut()
        .map(|e| e.remove("conditions"));
    let sent = changes(h.slice(Event::Apply(decode(ports_only))));
    assert!(
        !sent.iter().any(|c| matches!(c, MapChange::ServiceSet(..))),
        "{sent:?}"
    );
    assert_eq!(h.map().services[&svc_ref("shop", "web")], ready(3));
}

#[test]
fn a_slice_moving_to_another_service_moves_its_count() {
    let api = service("shop", "api", &["10.96.0.11"], &[("http", 80, 8080)]);
    let eps: &[Ep<'_>] = &[("10.244.1.5", Some("web-0"), true)];
    let (mut h, _) = Harness::start(
        vec![web(), api],
        vec![slice("shop", "moving", "web", &[("http", 8080)], eps)],
    );
    assert_eq!(
        changes(h.slice(Event::Apply(slice(
            "shop",
            "moving",
            "api",
            &[("http", 8080)],
            eps
        )))),
        vec![
            set("10.244.1.5:8080", "shop", "api", 80, Some("web-0")),
            service_set("shop", "api", ready(1)),
            service_set("shop", "web", ready(0)),
        ]
    );
}

#[test]
fn a_relist_gives_the_states_incremental_application_gives() {
    let web_held = || web_annotated(&[(HOLD, "true"), (HOLD_TIMEOUT, "45s")]);
    let first = || {
        web_slice(&[
            ("10.244.1.5", Some("web-0"), true),
            ("10.244.1.6", Some("web-1"), false),
        ])
    };
    let second = || {
        slice6(
            "shop",
            "web-v6",
            "web",
            &[("http", 8080)],
            &[
                ("fd00::5", Some("web-0"), true),
                ("::ffff:10.244.1.5", Some("web-0"), true),
            ],
        )
    };
    // Incrementally: the slices first (waiting), then the Service.
    let (mut h, _) = Harness::start(vec![], vec![]);
    assert_eq!(h.slice(Event::Apply(first())), None);
    assert_eq!(h.slice(Event::Apply(second())), None);
    let sent = changes(h.svc(Event::Apply(web_held())));
    assert_eq!(sent[0], service_set("shop", "web", held(Some(45), 2)));
    let incremental = h.map();
    assert_eq!(
        incremental.services,
        BTreeMap::from([(svc_ref("shop", "web"), held(Some(45), 2))])
    );

    // A first list of the same objects.
    let (_, listed) = Harness::start(vec![web_held()], vec![second(), first()]);
    assert_eq!(listed, incremental);

    // A relist of the slices in a running resolver, during which one pod
    // became ready: the Reset carries the new count.
    assert_eq!(h.slice(Event::Init), None);
    assert_eq!(h.slice(Event::InitApply(second())), None);
    assert_eq!(
        h.slice(Event::InitApply(web_slice(&[
            ("10.244.1.5", Some("web-0"), true),
            ("10.244.1.6", Some("web-1"), true),
        ]))),
        None
    );
    let Some(MapEvent::Reset(map)) = h.slice(Event::InitDone) else {
        panic!("a relist ends with a reset");
    };
    assert_eq!(map.services[&svc_ref("shop", "web")], held(Some(45), 3));
    assert_eq!(map, h.map());
    // And counting goes on from there.
    assert_eq!(
        changes(h.slice(Event::Delete(second()))),
        vec![
            remove("[fd00::5]:8080"),
            service_set("shop", "web", held(Some(45), 2)),
        ]
    );
}
