//! What the resolver tells source attribution: the Services of a pod, and
//! each Service's exclusion annotation.

use kube::runtime::watcher::Event;
use serde_json::json;

use super::{Harness, SERVICES, decode, service, service_json, slice, svc_ref};
use crate::{
    resolve::{MapChange, MapEvent, ServiceState},
    sources::exclude::SourceRules,
};

#[test]
fn a_pods_services_are_found_by_target_ref_or_by_address() {
    let (h, _) = Harness::start(
        vec![
            service("shop", "web", &["10.96.0.10"], &[("http", 80, 8080)]),
            service("shop", "web-canary", &["10.96.0.12"], &[("http", 80, 8080)]),
            service("shop", "api", &["10.96.0.11"], &[("http", 80, 8080)]),
            service("db", "postgres", &["10.96.5.1"], &[("pg", 5432, 5432)]),
        ],
        vec![
            slice(
                "shop",
                "web-1",
                "web",
                &[("http", 8080)],
                &[("10.244.1.5", Some("web-0"), true)],
            ),
            // Picks the same pod by address only (a hand-made slice).
            slice(
                "shop",
                "canary-1",
                "web-canary",
                &[("http", 8080)],
                &[("10.244.1.5", None, false)],
            ),
            slice(
                "shop",
                "api-1",
                "api",
                &[("http", 8080)],
                &[("10.244.1.9", Some("api-0"), true)],
            ),
            // Another namespace's pod of the same name is not ours.
            slice(
                "db",
                "pg-1",
                "postgres",
                &[("pg", 5432)],
                &[("10.244.3.3", Some("web-0"), true)],
            ),
            // A slice whose Service is unknown names no Service.
            slice(
                "shop",
                "ghost-1",
                "ghost",
                &[("http", 8080)],
                &[("10.244.1.5", Some("web-0"), true)],
            ),
        ],
    );
    let ip = |s: &str| s.parse().expect("ip");
    assert_eq!(
        h.resolver
            .pod_services("shop", "web-0", &[ip("10.244.1.5")]),
        vec![svc_ref("shop", "web"), svc_ref("shop", "web-canary")]
    );
    assert_eq!(
        h.resolver.pod_services("shop", "web-0", &[]),
        vec![svc_ref("shop", "web")]
    );
    assert_eq!(
        h.resolver
            .pod_services("shop", "client-0", &[ip("10.244.1.77")]),
        vec![]
    );
    assert_eq!(h.resolver.pod_services("nowhere", "web-0", &[]), vec![]);
}

#[test]
fn the_exclusion_annotation_is_part_of_the_service_state() {
    let (mut h, _) = Harness::start(vec![], vec![]);
    let mut annotated = service_json("shop", "web", &["10.96.0.10"], &[("http", 80, 8080)]);
    annotated["metadata"]["annotations"] = json!({
        "internal-tcp-watcher.io/exclude-sources": "monitoring, default/uptime-checker"
    });
    h.resolver
        .service_event(SERVICES, Event::Apply(decode(annotated.clone())));
    let expected: SourceRules = "default/uptime-checker,monitoring".parse().expect("valid");
    let map = h.resolver.map();
    assert_eq!(
        map.services[&svc_ref("shop", "web")].exclude_sources,
        expected
    );

    // A change of the annotation alone is a change of the Service's state.
    annotated["metadata"]["annotations"] =
        json!({ "internal-tcp-watcher.io/exclude-sources": "monitoring" });
    let outcome = h
        .resolver
        .service_event(SERVICES, Event::Apply(decode(annotated.clone())));
    let Some(MapEvent::Changes(changes)) = outcome.event else {
        panic!("a changed annotation must be sent: {outcome:?}");
    };
    assert_eq!(
        changes,
        vec![MapChange::ServiceSet(
            svc_ref("shop", "web"),
            ServiceState {
                ready_endpoints: Some(0),
                exclude_sources: "monitoring".parse().expect("valid"),
                ..ServiceState::default()
            }
        )]
    );

    annotated["metadata"]["annotations"] =
        json!({ "internal-tcp-watcher.io/exclude-sources": "monitoring,Bad_NS" });
    let outcome = h
        .resolver
        .service_event(SERVICES, Event::Apply(decode(annotated)));
    let found: Vec<(String, String, String)> = outcome
        .malformed
        .iter()
        .map(|m| (m.object.clone(), m.field.clone(), m.problem.clone()))
        .collect();
    assert_eq!(
        found,
        vec![(
            "shop/web".into(),
            "metadata.annotations[\"internal-tcp-watcher.io/exclude-sources\"]".into(),
            "\"Bad_NS\": namespace not a Kubernetes namespace name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters); no source is excluded".into()
        )]
    );
    let map = h.resolver.map();
    assert_eq!(
        map.services[&svc_ref("shop", "web")].exclude_sources,
        SourceRules::default(),
        "a bad list excludes nothing, and the Service stays mapped"
    );
}
