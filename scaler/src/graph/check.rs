//! The edges of an agent's snapshot or batch, checked before anything of the
//! message is applied, under the rules of `proto/itw/v1/ingest.proto`: an
//! edge with a name Kubernetes would not allow is refused alone (like a
//! series); too many edges, an edge without a time, or an edge from a
//! Service to itself ends the stream with a status naming the field.

use itw_proto::{itw::v1::Edge, names};

use crate::ingest::{Checked, IngestError, NameKind, RefusedEntry, check_name, check_unix_ms};

/// A checked edge, on the agent's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeView<'a> {
    /// (namespace, service)
    pub from: (&'a str, &'a str),
    pub to: (&'a str, &'a str),
    pub last_seen_ms: i64,
    pub declared: bool,
}

/// Checks the edges of one message; `list` names them (`batch.edges`) and
/// `max` is MAX_EDGES: a message with more edges than a replica may hold is
/// no honest agent's.
pub fn check_edges<'a>(
    list: &str,
    edges: &'a [Edge],
    max: usize,
) -> Result<Checked<Vec<EdgeView<'a>>>, IngestError> {
    if edges.len() > max {
        return Err(IngestError::TooManyEdges {
            field: list.to_owned(),
            count: edges.len(),
            max,
        });
    }
    let mut view = Vec::with_capacity(edges.len());
    let mut refused = Vec::new();
    for (i, edge) in edges.iter().enumerate() {
        let field = |name: &str| format!("{list}[{i}].{name}");
        check_unix_ms(&field("last_seen_unix_ms"), edge.last_seen_unix_ms)?;
        let named = names_of(edge, field);
        let (from, to) = match named {
            Ok(ends) => ends,
            Err(entry) => {
                refused.push(entry);
                continue;
            }
        };
        if from == to {
            return Err(IngestError::Invalid {
                field: format!("{list}[{i}]"),
                value: format!("{}/{} -> {}/{}", from.0, from.1, to.0, to.1),
                problem: "an edge joins two different Services".to_owned(),
            });
        }
        view.push(EdgeView {
            from,
            to,
            last_seen_ms: edge.last_seen_unix_ms,
            declared: edge.declared,
        });
    }
    Ok(Checked { view, refused })
}

type Ends<'a> = ((&'a str, &'a str), (&'a str, &'a str));

fn names_of<'a>(edge: &'a Edge, field: impl Fn(&str) -> String) -> Result<Ends<'a>, RefusedEntry> {
    let namespace = |name: &str, value: &'a str| {
        check_name(|| field(name), value, NameKind::Namespace, names::namespace)
    };
    let service = |name: &str, value: &'a str| {
        check_name(|| field(name), value, NameKind::Service, names::service)
    };
    Ok((
        (
            namespace("from_namespace", &edge.from_namespace)?,
            service("from_service", &edge.from_service)?,
        ),
        (
            namespace("to_namespace", &edge.to_namespace)?,
            service("to_service", &edge.to_service)?,
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(from: (&str, &str), to: (&str, &str), last_seen: i64) -> Edge {
        Edge {
            from_namespace: from.0.into(),
            from_service: from.1.into(),
            to_namespace: to.0.into(),
            to_service: to.1.into(),
            last_seen_unix_ms: last_seen,
            declared: false,
        }
    }

    const T: i64 = 1_700_000_000_000;

    #[test]
    fn good_edges_are_viewed_as_sent() {
        let mut declared = edge(("b", "api"), ("c", "db"), T + 1);
        declared.declared = true;
        let edges = [edge(("a", "web"), ("b", "api"), T), declared];
        let checked = check_edges("snapshot.edges", &edges, 2).unwrap();
        assert_eq!(checked.refused, vec![]);
        assert_eq!(
            checked.view,
            vec![
                EdgeView {
                    from: ("a", "web"),
                    to: ("b", "api"),
                    last_seen_ms: T,
                    declared: false,
                },
                EdgeView {
                    from: ("b", "api"),
                    to: ("c", "db"),
                    last_seen_ms: T + 1,
                    declared: true,
                },
            ]
        );
    }

    #[test]
    fn a_bad_name_refuses_only_its_edge() {
        let edges = [
            edge(("a", "web"), ("b", "Api"), T),
            edge(("a", "web"), ("b", "api"), T),
            edge(("A", "web"), ("b", "api"), T),
        ];
        let checked = check_edges("batch.edges", &edges, 10).unwrap();
        assert_eq!(checked.view.len(), 1);
        assert_eq!(checked.view[0].to, ("b", "api"));
        let refused: Vec<(String, String, &str)> = checked
            .refused
            .iter()
            .map(|r| (r.field.clone(), r.value.clone(), r.metric_label()))
            .collect();
        assert_eq!(
            refused,
            vec![
                (
                    "batch.edges[0].to_service".to_owned(),
                    "\"Api\"".to_owned(),
                    "invalid_service"
                ),
                (
                    "batch.edges[2].from_namespace".to_owned(),
                    "\"A\"".to_owned(),
                    "invalid_namespace"
                ),
            ]
        );
    }

    #[test]
    fn bad_messages_name_the_field() {
        let error =
            |edges: &[Edge], max: usize| check_edges("batch.edges", edges, max).unwrap_err();
        let too_many = error(
            &[
                edge(("a", "web"), ("b", "api"), T),
                edge(("a", "web"), ("b", "db"), T),
            ],
            1,
        );
        assert_eq!(
            too_many.to_string(),
            "batch.edges has 2 entries; this scaler holds at most 1 edges (MAX_EDGES)"
        );
        assert_eq!(too_many.status().code(), tonic::Code::ResourceExhausted);
        assert_eq!(too_many.metric_label(), "oversized");
        let no_time = error(&[edge(("a", "web"), ("b", "api"), 0)], 5);
        assert_eq!(
            no_time.to_string(),
            "batch.edges[0].last_seen_unix_ms = 0: not a Unix time in milliseconds"
        );
        assert_eq!(no_time.status().code(), tonic::Code::InvalidArgument);
        let to_itself = error(
            &[
                edge(("a", "web"), ("b", "api"), T),
                edge(("a", "web"), ("a", "web"), T),
            ],
            5,
        );
        assert_eq!(
            to_itself.to_string(),
            "batch.edges[1] = a/web -> a/web: an edge joins two different Services"
        );
    }
}
