use std::time::Duration;

use super::*;

const T: i64 = 1_700_000_000_000;
const HOUR_MS: i64 = 3_600_000;

fn view<'a>(from: (&'a str, &'a str), to: (&'a str, &'a str), declared: bool) -> EdgeView<'a> {
    EdgeView {
        from,
        to,
        last_seen_ms: 0,
        declared,
    }
}

fn seen<'a>(from: &'a str, to: &'a str, at: i64) -> (EdgeView<'a>, i64) {
    (view(("apps", from), ("apps", to), false), at)
}

fn names(list: &[ServiceName]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

fn listed(graph: &Graph, namespace: Option<&str>, now: i64) -> Vec<(String, String, i64, bool)> {
    graph
        .list(namespace, now)
        .into_iter()
        .map(|e| {
            (
                e.from.to_string(),
                e.to.to_string(),
                e.last_seen_ms,
                e.declared,
            )
        })
        .collect()
}

#[test]
fn the_union_keeps_the_newest_last_seen_and_any_declaration() {
    let graph = Graph::new(Duration::from_secs(3600), 10);
    assert_eq!(
        graph.learn(&[seen("a", "b", T), seen("b", "c", T)], T),
        vec![Learned::Added, Learned::Added]
    );
    // Another instance: older for a -> b, newer and declared for b -> c.
    let declared = (view(("apps", "b"), ("apps", "c"), true), T + 5);
    assert_eq!(
        graph.learn(&[seen("a", "b", T - 10), declared], T + 5),
        vec![Learned::Refreshed, Learned::Refreshed]
    );
    // A time ahead of this replica's clock counts as now.
    assert_eq!(
        graph.learn(&[seen("a", "b", T + 99)], T + 6),
        vec![Learned::Refreshed]
    );
    assert_eq!(
        listed(&graph, None, T + 6),
        vec![
            ("apps/a".into(), "apps/b".into(), T + 6, false),
            ("apps/b".into(), "apps/c".into(), T + 5, true),
        ]
    );
    assert_eq!(graph.len(), 2);
}

#[test]
fn edges_age_out_after_the_max_age() {
    let graph = Graph::new(Duration::from_secs(3600), 10);
    graph.learn(
        &[seen("a", "b", T), seen("b", "c", T + HOUR_MS / 2)],
        T + HOUR_MS / 2,
    );
    // Seen longer ago than the age: nothing to keep.
    assert_eq!(
        graph.learn(&[seen("x", "y", T - HOUR_MS / 2 - 1)], T + HOUR_MS / 2),
        vec![Learned::Stale]
    );
    let mut changes = graph.changes();
    changes.borrow_and_update();
    // Exactly the age old: kept.
    assert_eq!(graph.sweep(T + HOUR_MS), 0);
    assert!(!changes.has_changed().unwrap());
    assert_eq!(graph.len(), 2);
    // One ms more: a -> b goes; listing and reach already leave it out.
    assert_eq!(listed(&graph, None, T + HOUR_MS + 1).len(), 1);
    assert_eq!(
        names(&graph.upstream(&ServiceName::new("apps", "c"), T + HOUR_MS + 1)),
        vec!["apps/b"]
    );
    assert_eq!(graph.sweep(T + HOUR_MS + 1), 1);
    assert!(
        changes.has_changed().unwrap(),
        "a dropped edge rings the watchers"
    );
    assert_eq!(graph.len(), 1);
    // A refresh moves the age: b -> c stays past its first time's age.
    graph.learn(&[seen("b", "c", T + 2 * HOUR_MS)], T + 2 * HOUR_MS);
    assert_eq!(graph.sweep(T + 2 * HOUR_MS + HOUR_MS / 2), 0);
    assert_eq!(graph.sweep(T + 3 * HOUR_MS + 1), 1);
    assert!(graph.is_empty());
}

#[test]
fn past_max_edges_new_edges_are_refused_and_known_ones_refreshed() {
    let graph = Graph::new(Duration::from_secs(3600), 2);
    assert_eq!(
        graph.learn(
            &[seen("a", "b", T), seen("b", "c", T), seen("c", "d", T)],
            T
        ),
        vec![Learned::Added, Learned::Added, Learned::Refused]
    );
    assert_eq!(
        graph.learn(&[seen("a", "b", T + 1), seen("x", "y", T + 1)], T + 1),
        vec![Learned::Refreshed, Learned::Refused]
    );
    assert_eq!(graph.len(), 2);
    // Room again once one ages out.
    graph.learn(&[seen("b", "c", T + HOUR_MS)], T + HOUR_MS);
    assert_eq!(graph.sweep(T + HOUR_MS + 2), 1);
    assert_eq!(
        graph.learn(&[seen("c", "d", T + HOUR_MS + 2)], T + HOUR_MS + 2),
        vec![Learned::Added]
    );
}

#[test]
fn only_a_new_edge_rings_the_watchers() {
    let graph = Graph::new(Duration::from_secs(3600), 10);
    let mut changes = graph.changes();
    changes.borrow_and_update();
    graph.learn(&[seen("a", "b", T)], T);
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    graph.learn(&[seen("a", "b", T + 1000)], T + 1000);
    assert!(!changes.has_changed().unwrap(), "a refresh is not a change");
}

#[test]
fn upstream_is_transitive_nearest_first_and_survives_a_cycle() {
    let graph = Graph::new(Duration::from_secs(3600), 100);
    // a -> b -> c -> a (a cycle), d -> c, e -> d, and x -> y elsewhere.
    graph.learn(
        &[
            seen("a", "b", T),
            seen("b", "c", T),
            seen("c", "a", T),
            seen("d", "c", T),
            seen("e", "d", T),
            seen("x", "y", T),
        ],
        T,
    );
    assert_eq!(
        names(&graph.upstream(&ServiceName::new("apps", "c"), T)),
        vec!["apps/b", "apps/d", "apps/a", "apps/e"]
    );
    assert_eq!(
        names(&graph.upstream(&ServiceName::new("apps", "a"), T)),
        vec!["apps/c", "apps/b", "apps/d", "apps/e"]
    );
    assert_eq!(
        names(&graph.upstream(&ServiceName::new("apps", "e"), T)),
        Vec::<String>::new()
    );
    assert_eq!(
        names(&graph.upstream(&ServiceName::new("apps", "unknown"), T)),
        Vec::<String>::new()
    );
}

#[test]
fn the_list_filters_by_namespace_at_either_end() {
    let graph = Graph::new(Duration::from_secs(3600), 10);
    graph.learn(
        &[
            (view(("shop", "web"), ("pay", "api"), false), T),
            (view(("pay", "api"), ("pay", "db"), true), T),
            (view(("ops", "cron"), ("ops", "db"), false), T),
        ],
        T,
    );
    assert_eq!(
        listed(&graph, Some("pay"), T),
        vec![
            ("pay/api".into(), "pay/db".into(), T, true),
            ("shop/web".into(), "pay/api".into(), T, false),
        ]
    );
    assert_eq!(listed(&graph, Some("shop"), T).len(), 1);
    assert_eq!(listed(&graph, Some("none"), T).len(), 0);
    assert_eq!(listed(&graph, None, T).len(), 3);
}
