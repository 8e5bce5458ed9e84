//! The wakes annotation through the resolver: parsed into the Service's
//! state, announced when it alone changes, bad entries reported.

use super::*;

const WAKES: &str = "internal-tcp-watcher.io/wakes";

fn waking(n: u32, wakes: &[(&str, &str)]) -> ServiceState {
    ServiceState {
        wakes: wakes.iter().map(|(ns, name)| svc_ref(ns, name)).collect(),
        ..ready(n)
    }
}

#[test]
fn the_wakes_annotation_makes_the_service_state_and_its_change_is_sent() {
    let (mut h, map) = Harness::start(
        vec![web_annotated(&[(WAKES, "db/pg, cache")])],
        vec![web_slice(&[("10.244.1.5", Some("web-0"), true)])],
    );
    assert_eq!(
        map.services[&svc_ref("shop", "web")],
        waking(1, &[("db", "pg"), ("shop", "cache")])
    );
    assert_eq!(
        changes(h.svc(Event::Apply(web_annotated(&[(WAKES, "db/pg")])))),
        vec![service_set("shop", "web", waking(1, &[("db", "pg")]))]
    );
    assert_eq!(
        h.svc(Event::Apply(web_annotated(&[(WAKES, " db/pg ")]))),
        None
    );
    assert_eq!(
        changes(h.svc(Event::Apply(web()))),
        vec![service_set("shop", "web", ready(1))]
    );
}

#[test]
fn a_bad_wakes_entry_is_reported_and_left_out() {
    let (mut h, _) = Harness::start(vec![], vec![]);
    let outcome = h.resolver.service_event(
        SERVICES,
        Event::Apply(web_annotated(&[(WAKES, "db/PG,web,cache")])),
    );
    let found: Vec<(&str, &str, &str)> = outcome
        .malformed
        .iter()
        .map(|m| (m.object.as_str(), m.field.as_str(), m.problem.as_str()))
        .collect();
    let field = "metadata.annotations[\"internal-tcp-watcher.io/wakes\"]";
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!((found[0].0, found[0].1), ("shop/web", field));
    assert!(
        found[0].2.starts_with("\"db/PG\": service \"PG\" "),
        "{}",
        found[0].2
    );
    assert_eq!(
        found[1],
        (
            "shop/web",
            field,
            "\"web\" is the Service itself; entry left out"
        )
    );
    assert_eq!(
        h.map().services[&svc_ref("shop", "web")],
        waking(0, &[("shop", "cache")])
    );
}
