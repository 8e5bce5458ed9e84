//! The source side of `/metrics`: `internal_tcp_source_attempts_total` (per
//! destination Service and calling workload), the attempts filtered by
//! source, and how many went to the overflow source. The series and their
//! cap are decided by [`crate::attribution`]; this only adds what a
//! collection brings and drops a departed Service's series.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{attribution::SourceKey, sources::Source};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub destination_namespace: String,
    pub destination_service: String,
    pub source_namespace: String,
    pub source_workload: String,
}

impl SourceLabels {
    pub fn new(key: &SourceKey) -> Self {
        Self {
            destination_namespace: key.service.namespace.to_string(),
            destination_service: key.service.name.to_string(),
            source_namespace: key.source.namespace.to_string(),
            source_workload: key.source.workload.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilteredSourceLabels {
    pub source_namespace: String,
    pub source_workload: String,
}

impl FilteredSourceLabels {
    pub fn new(source: &Source) -> Self {
        Self {
            source_namespace: source.namespace.to_string(),
            source_workload: source.workload.to_string(),
        }
    }
}

#[derive(Debug, Default)]
pub struct SourceMetrics {
    pub attempts: Family<SourceLabels, Counter>,
    pub filtered: Family<FilteredSourceLabels, Counter>,
    pub capped: Counter,
}

impl SourceMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "internal_tcp_source_attempts",
            "Attempts per destination Service and calling workload (SOURCE_SERIES; past MAX_SOURCE_SERIES under the overflow source)",
            self.attempts.clone(),
        );
        registry.register(
            "internal_tcp_filtered_source_attempts",
            "Attempts from sources excluded for their destination (EXCLUDE_SOURCES, the Service's annotation), not counted as traffic",
            self.filtered.clone(),
        );
        registry.sub_registry_with_prefix("itw_agent").register(
            "source_overflow_attempts",
            "Attempts counted under the overflow source because MAX_SOURCE_SERIES was reached",
            self.capped.clone(),
        );
    }

    /// Adds one collection's figures.
    pub fn add(&self, sources: &[(SourceKey, u64)], filtered: &[(Source, u64)], capped: u64) {
        for (key, n) in sources {
            self.attempts
                .get_or_create(&SourceLabels::new(key))
                .inc_by(*n);
        }
        for (source, n) in filtered {
            self.filtered
                .get_or_create(&FilteredSourceLabels::new(source))
                .inc_by(*n);
        }
        self.capped.inc_by(capped);
    }

    /// Drops series of a Service that is gone.
    pub fn forget(&self, keys: &[SourceKey]) {
        for key in keys {
            self.attempts.remove(&SourceLabels::new(key));
        }
    }
}

#[cfg(test)]
mod tests {
    use itw_telemetry::exposition::parse_samples;

    use super::*;
    use crate::resolve::ServiceRef;

    fn key(service: &str, namespace: &str, workload: &str) -> SourceKey {
        SourceKey {
            service: ServiceRef::new("shop", service),
            source: Source {
                namespace: namespace.into(),
                workload: workload.into(),
            },
        }
    }

    /// (name, sorted labels, value).
    type Row = (String, Vec<(String, String)>, f64);

    fn samples(metrics: &SourceMetrics) -> Vec<Row> {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
        let mut all: Vec<_> = parse_samples(&body)
            .into_iter()
            .map(|mut s| {
                s.labels.sort();
                (s.name, s.labels, s.value)
            })
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn collections_add_up_and_a_departed_service_takes_its_series() {
        let metrics = SourceMetrics::default();
        let prober = Source {
            namespace: "monitoring".into(),
            workload: "prober".into(),
        };
        metrics.add(
            &[(key("cart", "shop", "web"), 2)],
            &[(prober.clone(), 4)],
            0,
        );
        metrics.add(
            &[(key("cart", "shop", "web"), 3), (key("pay", "", "node"), 1)],
            &[],
            1,
        );
        let cart_web = labels(&[
            ("destination_namespace", "shop"),
            ("destination_service", "cart"),
            ("source_namespace", "shop"),
            ("source_workload", "web"),
        ]);
        let pay_node = labels(&[
            ("destination_namespace", "shop"),
            ("destination_service", "pay"),
            ("source_namespace", ""),
            ("source_workload", "node"),
        ]);
        let filtered = labels(&[
            ("source_namespace", "monitoring"),
            ("source_workload", "prober"),
        ]);
        assert_eq!(
            samples(&metrics),
            vec![
                (
                    "internal_tcp_filtered_source_attempts_total".into(),
                    filtered.clone(),
                    4.0
                ),
                ("internal_tcp_source_attempts_total".into(), cart_web, 5.0),
                (
                    "internal_tcp_source_attempts_total".into(),
                    pay_node.clone(),
                    1.0
                ),
                (
                    "itw_agent_source_overflow_attempts_total".into(),
                    vec![],
                    1.0
                ),
            ]
        );
        metrics.forget(&[
            key("cart", "shop", "web"),
            key("cart", "", "(other sources)"),
        ]);
        assert_eq!(
            samples(&metrics),
            vec![
                (
                    "internal_tcp_filtered_source_attempts_total".into(),
                    filtered,
                    4.0
                ),
                ("internal_tcp_source_attempts_total".into(), pay_node, 1.0),
                (
                    "itw_agent_source_overflow_attempts_total".into(),
                    vec![],
                    1.0
                ),
            ]
        );
    }
}
