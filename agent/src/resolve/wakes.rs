//! The `internal-tcp-watcher.io/wakes` annotation on a Service A:
//! `"ns/svc,svc2,..."` declares the edges A -> each named Service (a name
//! without `ns/` is in A's namespace), so the scalers pre-wake them along
//! with A even before traffic taught the edges.
//!
//! From the Kubernetes API a bad entry is reported (naming the annotation)
//! and left out; the others stand, so one typo never drops a whole
//! declaration nor the Service. A static map's `wakes` uses the same
//! syntax, and a bad entry there refuses the file like any bad field.

use itw_proto::names;

/// The annotation's key.
pub const WAKES_ANNOTATION: &str = "internal-tcp-watcher.io/wakes";

/// Most Services one annotation may name: an annotation is user input, and
/// each entry is an edge every scaler holds.
pub const MAX_WAKES: usize = 64;

/// The declared callees of Service `namespace/service`, as (namespace,
/// name), in the order given and without repeats, and a problem for each
/// entry left out.
pub fn parse<'a>(
    value: &'a str,
    namespace: &'a str,
    service: &str,
) -> (Vec<(&'a str, &'a str)>, Vec<String>) {
    let mut wakes: Vec<(&str, &str)> = Vec::new();
    let mut problems = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (ns, name) = entry.split_once('/').unwrap_or((namespace, entry));
        let checked = names::namespace(ns)
            .map_err(|p| format!("{entry:?}: namespace {ns:?} {p}"))
            .and_then(|()| {
                names::service(name).map_err(|p| format!("{entry:?}: service {name:?} {p}"))
            });
        if let Err(problem) = checked {
            problems.push(format!("{problem}; entry left out"));
        } else if (ns, name) == (namespace, service) {
            problems.push(format!("{entry:?} is the Service itself; entry left out"));
        } else if wakes.len() == MAX_WAKES {
            problems.push(format!(
                "more than {MAX_WAKES} Services named; {entry:?} and the rest left out"
            ));
            break;
        } else if !wakes.contains(&(ns, name)) {
            wakes.push((ns, name));
        }
    }
    (wakes, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_and_without_a_namespace() {
        let (wakes, problems) = parse(" shop/api, db ,,db, other/cache", "apps", "web");
        assert_eq!(
            wakes,
            vec![("shop", "api"), ("apps", "db"), ("other", "cache")]
        );
        assert_eq!(problems, Vec::<String>::new());
        assert_eq!(parse("", "apps", "web"), (vec![], vec![]));
    }

    #[test]
    fn bad_entries_are_left_out_and_named() {
        let (wakes, problems) = parse("Api,shop/db,x/y/z,web,apps/web,-ns/a", "apps", "web");
        assert_eq!(wakes, vec![("shop", "db")]);
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(
            problems[0].starts_with("\"Api\": service \"Api\" "),
            "{}",
            problems[0]
        );
        assert!(
            problems[1].starts_with("\"x/y/z\": service \"y/z\" "),
            "{}",
            problems[1]
        );
        assert_eq!(problems[2], "\"web\" is the Service itself; entry left out");
        assert_eq!(
            problems[3],
            "\"apps/web\" is the Service itself; entry left out"
        );
        assert!(
            problems[4].starts_with("\"-ns/a\": namespace \"-ns\" "),
            "{}",
            problems[4]
        );
    }

    #[test]
    fn at_most_max_wakes() {
        let value: Vec<String> = (0..MAX_WAKES + 2).map(|i| format!("s{i}")).collect();
        let value = value.join(",");
        let (wakes, problems) = parse(&value, "apps", "web");
        assert_eq!(wakes.len(), MAX_WAKES);
        assert_eq!(
            problems,
            vec![format!(
                "more than {MAX_WAKES} Services named; \"s{MAX_WAKES}\" and the rest left out"
            )]
        );
    }
}
