//! Which callers are not demand: `EXCLUDE_SOURCES` for every destination,
//! and the same syntax per Service in the annotation
//! [`EXCLUDE_SOURCES_ANNOTATION`].
//!
//! A list is comma separated; each entry is a namespace (`monitoring`, or
//! `monitoring/*`, the same), a workload in a namespace
//! (`default/uptime-checker`), or `node` (callers outside every pod). A bad
//! entry is refused naming it: a typo must not silently let a prober keep a
//! Service awake.

use std::{fmt, str::FromStr, sync::Arc};

use super::Source;

/// Per Service: sources whose attempts to it are not demand.
pub const EXCLUDE_SOURCES_ANNOTATION: &str = "internal-tcp-watcher.io/exclude-sources";

/// One entry of an exclusion list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceRule {
    /// Callers outside every pod.
    Node,
    /// Every workload of a namespace.
    Namespace(Arc<str>),
    /// One workload of a namespace.
    Workload(Arc<str>, Arc<str>),
}

impl SourceRule {
    pub fn matches(&self, source: &Source) -> bool {
        match self {
            Self::Node => source.is_node(),
            Self::Namespace(ns) => !source.is_node() && *ns == source.namespace,
            Self::Workload(ns, workload) => {
                !source.is_node() && *ns == source.namespace && *workload == source.workload
            }
        }
    }
}

impl fmt::Display for SourceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node => f.write_str("node"),
            Self::Namespace(ns) => f.write_str(ns),
            Self::Workload(ns, workload) => write!(f, "{ns}/{workload}"),
        }
    }
}

/// A checked exclusion list; empty excludes nothing. Sorted and without
/// duplicates, so two spellings of one list compare equal (a Service whose
/// annotation is only reordered has not changed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRules(Arc<[SourceRule]>);

impl SourceRules {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn rules(&self) -> &[SourceRule] {
        &self.0
    }

    pub fn matches(&self, source: &Source) -> bool {
        self.0.iter().any(|rule| rule.matches(source))
    }
}

impl fmt::Display for SourceRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rule) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{rule}")?;
        }
        Ok(())
    }
}

/// Why an entry was refused: the entry, then the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?}: {problem}")]
pub struct BadSourceRule {
    pub entry: String,
    pub problem: String,
}

impl FromStr for SourceRules {
    type Err = BadSourceRule;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut rules = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            rules.push(rule(entry).map_err(|problem| BadSourceRule {
                entry: entry.to_owned(),
                problem,
            })?);
        }
        rules.sort();
        rules.dedup();
        Ok(Self(rules.into()))
    }
}

fn rule(entry: &str) -> Result<SourceRule, String> {
    if entry == super::NODE_WORKLOAD {
        return Ok(SourceRule::Node);
    }
    let (namespace, workload) = match entry.split_once('/') {
        None => (entry, None),
        Some((ns, "*")) => (ns, None),
        Some((ns, workload)) => (ns, Some(workload)),
    };
    itw_proto::names::namespace(namespace).map_err(|problem| format!("namespace {problem}"))?;
    match workload {
        None => Ok(SourceRule::Namespace(namespace.into())),
        Some(workload) => {
            // Workloads are named as pods are (a bare pod is its own).
            itw_proto::names::pod(workload).map_err(|_| {
                "the workload is not a Kubernetes object name (lowercase letters, digits, '-' and '.', at most 253 characters); entries are ns, ns/*, ns/workload or node".to_owned()
            })?;
            Ok(SourceRule::Workload(namespace.into(), workload.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, workload: &str) -> Source {
        Source {
            namespace: ns.into(),
            workload: workload.into(),
        }
    }

    #[test]
    fn parses_every_entry_form_sorted_without_duplicates() {
        let rules: SourceRules =
            " monitoring, kube-system/*, default/uptime-checker,node,,monitoring "
                .parse()
                .expect("valid");
        assert_eq!(
            rules.rules(),
            &[
                SourceRule::Node,
                SourceRule::Namespace("kube-system".into()),
                SourceRule::Namespace("monitoring".into()),
                SourceRule::Workload("default".into(), "uptime-checker".into()),
            ]
        );
        assert_eq!(
            rules.to_string(),
            "node,kube-system,monitoring,default/uptime-checker"
        );
        assert_eq!("".parse::<SourceRules>(), Ok(SourceRules::default()));
        assert!(" , ".parse::<SourceRules>().expect("blank").is_empty());
    }

    #[test]
    fn matches_namespaces_workloads_and_the_node_apart() {
        let rules: SourceRules = "monitoring,default/uptime-checker".parse().expect("valid");
        assert!(rules.matches(&pod("monitoring", "prometheus")));
        assert!(rules.matches(&pod("default", "uptime-checker")));
        assert!(!rules.matches(&pod("default", "web")));
        assert!(!rules.matches(&pod("shop", "uptime-checker")));
        assert!(!rules.matches(&Source::node()));
        let node: SourceRules = "node".parse().expect("valid");
        assert!(node.matches(&Source::node()));
        assert!(
            !node.matches(&pod("default", "node")),
            "a workload named node is a pod, not the node"
        );
        assert!(!SourceRules::default().matches(&Source::node()));
    }

    #[test]
    fn a_bad_entry_is_refused_by_name() {
        for (list, entry, problem) in [
            (
                "monitoring,Bad_NS",
                "Bad_NS",
                "namespace not a Kubernetes namespace name",
            ),
            ("default/", "default/", "the workload is not"),
            ("/web", "/web", "namespace not a Kubernetes namespace name"),
            ("ns/a/b", "ns/a/b", "the workload is not"),
            ("ns/Web", "ns/Web", "the workload is not"),
            ("*", "*", "namespace not"),
        ] {
            let err = list.parse::<SourceRules>().expect_err(list);
            assert_eq!(err.entry, entry, "{list}");
            assert!(err.problem.starts_with(problem), "{list}: {err}");
            assert!(
                err.to_string().starts_with(&format!("{entry:?}: ")),
                "{err}"
            );
        }
    }
}
