use super::*;

const T: i64 = 1_700_000_000_000;
const HOUR_MS: i64 = 3_600_000;

fn svc(name: &str) -> ServiceRef {
    ServiceRef::new("apps", name)
}

fn key(from: &str, to: &str) -> EdgeKey {
    (svc(from), svc(to))
}

fn book(max_edges: usize) -> EdgeBook {
    EdgeBook::new(EdgeLimits {
        max_edges,
        max_age: Duration::from_secs(4 * 3600),
    })
}

/// (from, to, last_seen, declared) of each edge, services in apps.
fn shown(edges: &[Edge]) -> Vec<(String, String, i64, bool)> {
    edges
        .iter()
        .map(|e| {
            assert_eq!((&*e.from_namespace, &*e.to_namespace), ("apps", "apps"));
            (
                e.from_service.clone(),
                e.to_service.clone(),
                e.last_seen_unix_ms,
                e.declared,
            )
        })
        .collect()
}

fn row(from: &str, to: &str, at: i64, declared: bool) -> (String, String, i64, bool) {
    (from.into(), to.into(), at, declared)
}

#[test]
fn a_new_edge_goes_out_once_then_only_after_a_quarter_of_the_age() {
    let mut book = book(10);
    let ab = [key("a", "b")];
    assert_eq!(shown(&book.note(&ab, T)), vec![row("a", "b", T, false)]);
    // Steady traffic: seen every second, nothing new to send for an hour.
    for s in 1..3600 {
        assert_eq!(book.note(&ab, T + s * 1000), vec![], "second {s}");
    }
    assert_eq!(
        shown(&book.all()),
        vec![row("a", "b", T + 3_599_000, false)]
    );
    // A quarter of 4 h after it was sent: refreshed with the newest time.
    assert_eq!(
        shown(&book.note(&ab, T + HOUR_MS)),
        vec![row("a", "b", T + HOUR_MS, false)]
    );
    assert_eq!(book.note(&ab, T + HOUR_MS + 1), vec![]);
}

#[test]
fn an_edge_not_seen_for_the_age_is_dropped() {
    let mut book = book(10);
    book.note(&[key("a", "b"), key("b", "c")], T);
    book.note(&[key("b", "c")], T + 2 * HOUR_MS);
    assert_eq!(book.note(&[], T + 4 * HOUR_MS), vec![]);
    assert_eq!(book.len(), 2, "exactly the age old: kept");
    assert_eq!(book.note(&[], T + 4 * HOUR_MS + 1), vec![]);
    assert_eq!(
        shown(&book.all()),
        vec![row("b", "c", T + 2 * HOUR_MS, false)]
    );
    // Seen again after it was dropped: new, so sent at once.
    assert_eq!(
        shown(&book.note(&[key("a", "b")], T + 5 * HOUR_MS)),
        vec![row("a", "b", T + 5 * HOUR_MS, false)]
    );
}

#[test]
fn past_max_edges_new_edges_are_refused_and_counted() {
    let mut book = book(2);
    let due = book.note(&[key("a", "b"), key("b", "c"), key("c", "d")], T);
    assert_eq!(
        shown(&due),
        vec![row("a", "b", T, false), row("b", "c", T, false)]
    );
    assert_eq!(book.refused(), 1);
    assert_eq!(book.note(&[key("a", "b"), key("x", "y")], T + 1), vec![]);
    assert_eq!(book.refused(), 2);
    assert_eq!(book.len(), 2);
}

#[test]
fn declared_edges_are_seen_while_declared_and_marked_so() {
    let mut book = book(10);
    book.note(&[key("a", "b")], T);
    book.declare([key("a", "b"), key("a", "c"), key("a", "a")]);
    // a -> b was sent as seen; declared now, it goes out again at once.
    assert_eq!(
        shown(&book.note(&[], T + 1000)),
        vec![row("a", "b", T + 1000, true), row("a", "c", T + 1000, true)]
    );
    // No traffic at all: the declaration keeps both fresh, sent once per
    // quarter of the age.
    assert_eq!(book.note(&[], T + HOUR_MS), vec![]);
    assert_eq!(
        shown(&book.note(&[], T + HOUR_MS + 1000)),
        vec![
            row("a", "b", T + HOUR_MS + 1000, true),
            row("a", "c", T + HOUR_MS + 1000, true)
        ]
    );
    // The annotation goes: the edges age out from their last declaration.
    book.declare([]);
    assert_eq!(book.note(&[], T + HOUR_MS + 2000), vec![]);
    assert_eq!(
        shown(&book.all()),
        vec![
            row("a", "b", T + HOUR_MS + 1000, false),
            row("a", "c", T + HOUR_MS + 1000, false)
        ]
    );
    assert_eq!(book.note(&[], T + 5 * HOUR_MS + 1001), vec![]);
    assert!(book.is_empty());
}

#[test]
fn a_service_calling_itself_is_no_edge() {
    let mut book = book(10);
    assert_eq!(book.note(&[key("a", "a")], T), vec![]);
    assert!(book.is_empty());
}
