//! The `internal_tcp_attempts_total` series: cumulative, summed over ports.
//!
//! Every known Service has a series at 0 (no pod, no process) from the
//! moment it is seen, so a query for it answers 0 rather than nothing. With
//! 10k Services nearly all of them are only that, so they are kept apart
//! from the counted series as one small entry per Service (its reference
//! and when it was seen): as full label sets in the counted map they took
//! 1.6 MiB at 10k Services. Exposition merges both in label order, as one
//! map would list them.

use std::{cmp::Ordering, collections::BTreeMap, iter::Peekable};

use itw_telemetry::exposition::{AttemptLabels, AttemptSeries, ScrapeView, encode_attempts};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{deltas::SeriesKey, resolve::ServiceRef};

#[derive(Clone, Copy, Debug)]
struct SeriesState {
    attempts: u64,
    created: Instant,
}

#[derive(Debug, Default)]
struct Series {
    /// Series with attempts.
    counted: BTreeMap<AttemptLabels, SeriesState>,
    /// Services whose series without pod and process has no attempt yet,
    /// with when it was created; never also in `counted`.
    zero: BTreeMap<ServiceRef, Instant>,
}

/// The `internal_tcp_attempts_total` series.
#[derive(Debug, Default)]
pub struct AttemptCounters {
    series: Mutex<Series>,
}

/// Whether `labels` are those of a Service's zero series.
fn is_service_series(labels: &AttemptLabels) -> bool {
    labels.destination_pod.is_empty() && labels.process_comm.is_empty()
}

impl AttemptCounters {
    /// Adds a collection's deltas.
    pub fn add(&self, deltas: &[(SeriesKey, u64)]) {
        let now = Instant::now();
        let mut series = self.series.lock();
        let Series { counted, zero } = &mut *series;
        for (key, delta) in deltas {
            let labels = AttemptLabels {
                destination_namespace: key.service.namespace.clone(),
                destination_service: key.service.name.clone(),
                destination_pod: key.pod.clone(),
                process_comm: key.comm.clone(),
            };
            let state = counted.entry(labels).or_insert_with_key(|labels| {
                // A Service's zero series that counts keeps its creation time.
                let created = if is_service_series(labels) {
                    zero.remove(&key.service)
                } else {
                    None
                };
                SeriesState {
                    attempts: 0,
                    created: created.unwrap_or(now),
                }
            });
            state.attempts += delta;
        }
    }

    /// Creates a Service's zero series (no pod, no process) when the Service
    /// is first seen, so a query for it answers 0 rather than nothing.
    pub fn service_seen(&self, service: &ServiceRef) {
        let mut series = self.series.lock();
        let Series { counted, zero } = &mut *series;
        if zero.contains_key(service)
            || counted.contains_key(&AttemptLabels::shared_service(
                &service.namespace,
                &service.name,
            ))
        {
            return;
        }
        zero.insert(service.clone(), Instant::now());
    }

    /// Drops a departed Service's zero series. Series with attempts stay: a
    /// counter that vanished would read as a reset.
    pub fn service_gone(&self, service: &ServiceRef) {
        self.series.lock().zero.remove(service);
    }

    /// The count of one series (for tests and the demo).
    pub fn get(&self, labels: &AttemptLabels) -> Option<u64> {
        let series = self.series.lock();
        if let Some(state) = series.counted.get(labels) {
            return Some(state.attempts);
        }
        let service = ServiceRef::from_names(
            labels.destination_namespace.clone(),
            labels.destination_service.clone(),
        );
        (is_service_series(labels) && series.zero.contains_key(&service)).then_some(0)
    }

    /// How many series there are, zero series included.
    pub fn len(&self) -> usize {
        let series = self.series.lock();
        series.counted.len() + series.zero.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn encode(&self, out: &mut String, view: &ScrapeView) -> std::fmt::Result {
        let series = self.series.lock();
        let zero: Vec<(AttemptLabels, Instant)> = series
            .zero
            .iter()
            .map(|(service, created)| {
                (
                    AttemptLabels::shared_service(&service.namespace, &service.name),
                    *created,
                )
            })
            .collect();
        let counted = series.counted.iter().map(|(labels, state)| AttemptSeries {
            labels,
            attempts: state.attempts,
            created: state.created,
        });
        let zero = zero.iter().map(|(labels, created)| AttemptSeries {
            labels,
            attempts: 0,
            created: *created,
        });
        encode_attempts(out, view, InLabelOrder::new(counted, zero))
    }
}

/// Two series iterators, each in label order, merged into one.
struct InLabelOrder<
    'a,
    A: Iterator<Item = AttemptSeries<'a>>,
    B: Iterator<Item = AttemptSeries<'a>>,
> {
    a: Peekable<A>,
    b: Peekable<B>,
}

impl<'a, A, B> InLabelOrder<'a, A, B>
where
    A: Iterator<Item = AttemptSeries<'a>>,
    B: Iterator<Item = AttemptSeries<'a>>,
{
    fn new(a: A, b: B) -> Self {
        Self {
            a: a.peekable(),
            b: b.peekable(),
        }
    }
}

impl<'a, A, B> Iterator for InLabelOrder<'a, A, B>
where
    A: Iterator<Item = AttemptSeries<'a>>,
    B: Iterator<Item = AttemptSeries<'a>>,
{
    type Item = AttemptSeries<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let order = match (self.a.peek(), self.b.peek()) {
            (Some(a), Some(b)) => a.labels.cmp(b.labels),
            (Some(_), None) => Ordering::Less,
            (None, _) => Ordering::Greater,
        };
        if order == Ordering::Greater {
            self.b.next()
        } else {
            self.a.next()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(svc: &str, pod: &str, comm: &str) -> SeriesKey {
        SeriesKey {
            service: ServiceRef::new("default", svc),
            port: 80,
            pod: pod.into(),
            comm: comm.into(),
        }
    }

    fn labels(svc: &str, pod: &str, comm: &str) -> AttemptLabels {
        AttemptLabels {
            destination_namespace: "default".into(),
            destination_service: svc.into(),
            destination_pod: pod.into(),
            process_comm: comm.into(),
        }
    }

    fn listed(counters: &AttemptCounters) -> Vec<(String, String, String, u64)> {
        let series = counters.series.lock();
        let zero: Vec<_> = series
            .zero
            .iter()
            .map(|(s, created)| {
                (
                    AttemptLabels::shared_service(&s.namespace, &s.name),
                    *created,
                )
            })
            .collect();
        InLabelOrder::new(
            series.counted.iter().map(|(labels, state)| AttemptSeries {
                labels,
                attempts: state.attempts,
                created: state.created,
            }),
            zero.iter().map(|(labels, created)| AttemptSeries {
                labels,
                attempts: 0,
                created: *created,
            }),
        )
        .map(|s| {
            (
                s.labels.destination_service.to_string(),
                s.labels.destination_pod.to_string(),
                s.labels.process_comm.to_string(),
                s.attempts,
            )
        })
        .collect()
    }

    fn row(svc: &str, pod: &str, comm: &str, n: u64) -> (String, String, String, u64) {
        (svc.into(), pod.into(), comm.into(), n)
    }

    #[test]
    fn zero_series_and_counted_ones_list_in_label_order() {
        let counters = AttemptCounters::default();
        for svc in ["c", "a", "e"] {
            counters.service_seen(&ServiceRef::new("default", svc));
        }
        counters.add(&[
            (key("a", "a-0", "curl"), 2),
            (key("b", "", "curl"), 1),
            (key("d", "", "wget"), 4),
        ]);
        assert_eq!(
            listed(&counters),
            vec![
                row("a", "", "", 0),
                row("a", "a-0", "curl", 2),
                row("b", "", "curl", 1),
                row("c", "", "", 0),
                row("d", "", "wget", 4),
                row("e", "", "", 0),
            ]
        );
        assert_eq!(counters.len(), 6);
        assert_eq!(counters.get(&labels("c", "", "")), Some(0));
        assert_eq!(counters.get(&labels("b", "", "")), None);
        assert_eq!(counters.get(&labels("d", "", "wget")), Some(4));
    }

    #[test]
    fn a_zero_series_that_counts_moves_once_and_keeps_its_creation() {
        let counters = AttemptCounters::default();
        let web = ServiceRef::new("default", "web");
        counters.service_seen(&web);
        let seen = counters.series.lock().zero[&web];
        counters.add(&[(key("web", "", ""), 3)]);
        counters.service_seen(&web);
        {
            let series = counters.series.lock();
            assert!(series.zero.is_empty());
            let state = series.counted[&labels("web", "", "")];
            assert_eq!((state.attempts, state.created), (3, seen));
        }
        // A counter that vanished would read as a reset: it stays.
        counters.service_gone(&web);
        assert_eq!(listed(&counters), vec![row("web", "", "", 3)]);
    }

    #[test]
    fn a_departed_service_loses_only_its_zero_series() {
        let counters = AttemptCounters::default();
        let idle = ServiceRef::new("default", "idle");
        let busy = ServiceRef::new("default", "busy");
        counters.service_seen(&idle);
        counters.service_seen(&busy);
        counters.add(&[(key("busy", "busy-0", "curl"), 1)]);
        counters.service_gone(&idle);
        counters.service_gone(&busy);
        assert_eq!(listed(&counters), vec![row("busy", "busy-0", "curl", 1)]);
        assert_eq!(counters.get(&labels("idle", "", "")), None);
    }

    #[test]
    fn counted_series_share_the_names_they_are_given() {
        let counters = AttemptCounters::default();
        let attempt = key("web", "web-0", "curl");
        counters.add(&[(attempt.clone(), 2)]);
        let series = counters.series.lock();
        let (labels, _) = series.counted.iter().next().expect("the counted series");
        assert!(Arc::ptr_eq(&labels.destination_pod, &attempt.pod));
        assert!(Arc::ptr_eq(&labels.process_comm, &attempt.comm));
        assert!(Arc::ptr_eq(
            &labels.destination_service,
            &attempt.service.name
        ));
    }
}
