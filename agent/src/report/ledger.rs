//! What the agent has counted, kept so that any scaler replica can be brought
//! up to date exactly: cumulative totals, per-second history per destination,
//! and a bounded log of recent batches.
//!
//! Every collection becomes one batch with the next sequence number and is
//! folded into the totals and the history at once; the log only keeps the
//! batch for resending. A replica that says it applied up to `A` gets a
//! snapshot through `A` (totals and history minus the logged batches after
//! `A`) followed by those batches: a *resume*, cheap after a short break. If
//! the log no longer reaches back to `A + 1` (it overflowed during a long
//! outage: its oldest batches were merged away), or the replica knows nothing
//! of this instance, the replica gets a *full* snapshot through the newest
//! sequence instead. Either way its totals come out exact.
//!
//! Edges ride along: the [`EdgeBook`] puts the edges due (new or to be
//! refreshed) in the next batch, and every edge held in each snapshot.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use itw_proto::itw::v1::{Batch, DestinationHistory, Series, SeriesCount, Snapshot};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;

use crate::{
    coldstart::Woken,
    counting_loop::Collected,
    deltas::SeriesKey,
    edges::{EdgeBook, EdgeKey, EdgeLimits},
    resolve::ServiceRef,
};

/// Longest history kept, whatever a replica asks for (the scaler's default cap).
pub const MAX_HISTORY_SECONDS: u32 = 15 * 60;
/// History kept before any replica said what it needs (KEDA's default window
/// in our trigger metadata is 60 s).
pub const DEFAULT_HISTORY_SECONDS: u32 = 60;

/// Bounds of the batch log.
#[derive(Clone, Copy, Debug)]
pub struct LogLimits {
    pub max_batches: usize,
    pub max_bytes: usize,
}

/// A batch in the log.
#[derive(Debug)]
struct Logged {
    batch: Arc<Batch>,
    bytes: usize,
    /// The wake behind this batch; taken by the first stream that sends it,
    /// to measure wake -> send.
    woken: Option<Woken>,
}

/// A batch handed to a stream.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub batch: Arc<Batch>,
    pub woken: Option<Woken>,
}

/// How a stream starts.
#[derive(Debug)]
pub struct StreamStart {
    pub snapshot: Snapshot,
    /// Logged batches after the snapshot, in order.
    pub resend: Vec<Outgoing>,
    pub resumed: bool,
}

/// The log no longer holds the batch a stream needs next: it must restart
/// with a snapshot.
#[derive(Debug, PartialEq, Eq)]
pub struct FellBehind;

/// Counts of what the log did, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogFill {
    pub batches: usize,
    pub bytes: usize,
}

type DestKey = (ServiceRef, u16);

#[derive(Debug)]
struct Inner {
    latest: u64,
    totals: HashMap<SeriesKey, u64>,
    /// Per destination: (agent-clock second, attempts), oldest first, sparse.
    history: HashMap<DestKey, VecDeque<(i64, u64)>>,
    history_seconds: u32,
    last_second: i64,
    /// collected_at of the newest batch: batches of edges alone come from
    /// another task than the counting loop's, and must not go back in time.
    last_collected_ms: i64,
    log: VecDeque<Logged>,
    log_bytes: usize,
    limits: LogLimits,
    /// Batches evicted from the log (their counts stay in the totals).
    evicted: u64,
    edges: EdgeBook,
}

#[derive(Debug)]
pub struct Ledger {
    inner: Mutex<Inner>,
    latest: watch::Sender<u64>,
}

impl Ledger {
    pub fn new(limits: LogLimits) -> Self {
        Self::with_edges(limits, EdgeLimits::default())
    }

    pub fn with_edges(limits: LogLimits, edges: EdgeLimits) -> Self {
        Self {
            inner: Mutex::new(Inner {
                latest: 0,
                totals: HashMap::new(),
                history: HashMap::new(),
                history_seconds: DEFAULT_HISTORY_SECONDS,
                last_second: 0,
                last_collected_ms: 0,
                log: VecDeque::new(),
                log_bytes: 0,
                limits,
                evicted: 0,
                edges: EdgeBook::new(edges),
            }),
            latest: watch::channel(0).0,
        }
    }

    /// Records one collection as the next batch, with the edges due.
    /// Collections without attempts or edges due make no batch. Returns the
    /// batch's sequence.
    pub fn record(&self, collected: Collected) -> Option<u64> {
        let mut inner = self.inner.lock();
        let edges = inner
            .edges
            .note(&collected.edges, collected.collected_at_unix_ms);
        let collected_at = collected.collected_at_unix_ms.max(inner.last_collected_ms);
        if collected.deltas.is_empty() && edges.is_empty() {
            return None;
        }
        inner.last_collected_ms = collected_at;
        let second = collected_at.div_euclid(1000);
        inner.last_second = inner.last_second.max(second);
        let sequence = inner.latest + 1;
        let mut deltas = Vec::with_capacity(collected.deltas.len());
        for (key, n) in &collected.deltas {
            *inner.totals.entry(key.clone()).or_default() += n;
            let slots = inner
                .history
                .entry((key.service.clone(), key.port))
                .or_default();
            match slots.back_mut() {
                Some((s, count)) if *s == second => *count += n,
                _ => slots.push_back((second, *n)),
            }
            deltas.push(SeriesCount {
                series: Some(series(key)),
                attempts: *n,
            });
        }
        let batch = Batch {
            sequence,
            collected_at_unix_ms: collected_at,
            wake: collected.woken.is_some(),
            deltas,
            edges,
        };
        let bytes = batch.encoded_len();
        inner.log.push_back(Logged {
            batch: Arc::new(batch),
            bytes,
            woken: collected.woken,
        });
        inner.log_bytes += bytes;
        inner.latest = sequence;
        inner.trim();
        drop(inner);
        self.latest.send_replace(sequence);
        Some(sequence)
    }

    /// Replaces the declared edges (the wakes annotations); the new ones go
    /// out at once in a batch of their own, at agent time `now_ms`.
    pub fn declare(&self, edges: Vec<EdgeKey>, now_ms: i64) -> Option<u64> {
        self.inner.lock().edges.declare(edges);
        self.refresh_edges(now_ms)
    }

    /// Sends the edges due at `now_ms` without attempts: declared edges stay
    /// fresh at the scalers while nothing calls, and aged ones are dropped.
    pub fn refresh_edges(&self, now_ms: i64) -> Option<u64> {
        self.record(Collected {
            collected_at_unix_ms: now_ms,
            woken: None,
            deltas: Vec::new(),
            edges: Vec::new(),
        })
    }

    /// Edges held, and new edges refused for MAX_EDGES since start.
    pub fn edge_counts(&self) -> (usize, u64) {
        let inner = self.inner.lock();
        (inner.edges.len(), inner.edges.refused())
    }

    /// Notified with the newest sequence whenever a batch is recorded.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    pub fn latest(&self) -> u64 {
        self.inner.lock().latest
    }

    /// Raises the history kept to what a replica asked for (capped).
    pub fn want_history(&self, seconds: u32) {
        let mut inner = self.inner.lock();
        inner.history_seconds = inner.history_seconds.max(seconds.min(MAX_HISTORY_SECONDS));
    }

    /// How to bring a replica that has applied up to `applied` (0: knows
    /// nothing of this instance) up to date, with `history_seconds` of history.
    pub fn start_stream(&self, applied: u64, history_seconds: u32, now_ms: i64) -> StreamStart {
        let mut inner = self.inner.lock();
        let resumable = applied > 0
            && applied <= inner.latest
            && (applied == inner.latest || inner.first_logged().is_some_and(|f| f <= applied + 1));
        let through = if resumable { applied } else { inner.latest };
        let mut totals = inner.totals.clone();
        let mut history: HashMap<DestKey, VecDeque<(i64, u64)>> = inner.history.clone();
        let mut resend = Vec::new();
        for logged in inner.log.iter_mut().filter(|l| l.batch.sequence > through) {
            let second = logged.batch.collected_at_unix_ms.div_euclid(1000);
            for d in &logged.batch.deltas {
                let Some(key) = d.series.as_ref().map(series_key) else {
                    continue;
                };
                if let Some(total) = totals.get_mut(&key) {
                    *total = total.saturating_sub(d.attempts);
                }
                if let Some(slots) = history.get_mut(&(key.service.clone(), key.port))
                    && let Some((_, count)) = slots.iter_mut().find(|(s, _)| *s == second)
                {
                    *count = count.saturating_sub(d.attempts);
                }
            }
            resend.push(Outgoing {
                batch: logged.batch.clone(),
                woken: logged.woken.take(),
            });
        }
        let seconds = history_seconds.clamp(1, MAX_HISTORY_SECONDS);
        let oldest = inner.last_second - i64::from(seconds) + 1;
        let snapshot = Snapshot {
            through_sequence: through,
            taken_at_unix_ms: now_ms,
            totals: totals
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(key, attempts)| SeriesCount {
                    series: Some(series(&key)),
                    attempts,
                })
                .collect(),
            history: history
                .into_iter()
                .filter_map(|((service, port), slots)| dense(&service, port, &slots, oldest))
                .collect(),
            edges: inner.edges.all(),
        };
        StreamStart {
            snapshot,
            resend,
            resumed: resumable,
        }
    }

    /// The logged batches after `sequence`, or [`FellBehind`] when the log
    /// no longer reaches back to `sequence + 1`.
    pub fn after(&self, sequence: u64) -> Result<Vec<Outgoing>, FellBehind> {
        let mut inner = self.inner.lock();
        if sequence >= inner.latest {
            return Ok(Vec::new());
        }
        match inner.first_logged() {
            Some(first) if first <= sequence + 1 => {}
            _ => return Err(FellBehind),
        }
        Ok(inner
            .log
            .iter_mut()
            .filter(|l| l.batch.sequence > sequence)
            .map(|l| Outgoing {
                batch: l.batch.clone(),
                woken: l.woken.take(),
            })
            .collect())
    }

    pub fn fill(&self) -> LogFill {
        let inner = self.inner.lock();
        LogFill {
            batches: inner.log.len(),
            bytes: inner.log_bytes,
        }
    }

    /// Batches evicted from the log so far (counted in totals and history,
    /// but no longer resendable one by one).
    pub fn evicted(&self) -> u64 {
        self.inner.lock().evicted
    }

    /// Cumulative attempts of one series (for tests and the demo).
    pub fn total(&self, key: &SeriesKey) -> u64 {
        self.inner.lock().totals.get(key).copied().unwrap_or(0)
    }
}

impl Inner {
    fn first_logged(&self) -> Option<u64> {
        self.log.front().map(|l| l.batch.sequence)
    }

    /// Keeps the log within its limits and the history within its window.
    fn trim(&mut self) {
        while self.log.len() > self.limits.max_batches
            || (self.log_bytes > self.limits.max_bytes && self.log.len() > 1)
        {
            let Some(old) = self.log.pop_front() else {
                break;
            };
            self.log_bytes -= old.bytes;
            self.evicted += 1;
        }
        let oldest = self.last_second - i64::from(self.history_seconds) + 1;
        self.history.retain(|_, slots| {
            while slots.front().is_some_and(|(s, _)| *s < oldest) {
                slots.pop_front();
            }
            !slots.is_empty()
        });
    }
}

fn series(key: &SeriesKey) -> Series {
    Series {
        namespace: key.service.namespace.to_string(),
        service: key.service.name.to_string(),
        port: u32::from(key.port),
        pod: key.pod.to_string(),
        process_comm: key.comm.to_string(),
    }
}

fn series_key(s: &Series) -> SeriesKey {
    SeriesKey {
        service: ServiceRef::new(&s.namespace, &s.service),
        port: u16::try_from(s.port).unwrap_or(0),
        pod: s.pod.as_str().into(),
        comm: s.process_comm.as_str().into(),
    }
}

/// Sparse slots from `oldest` on as the dense per-second list the contract
/// carries; `None` when nothing is left.
fn dense(
    service: &ServiceRef,
    port: u16,
    slots: &VecDeque<(i64, u64)>,
    oldest: i64,
) -> Option<DestinationHistory> {
    let kept: Vec<(i64, u64)> = slots
        .iter()
        .copied()
        .filter(|(s, n)| *s >= oldest && *n > 0)
        .collect();
    let (first, _) = *kept.first()?;
    let (last, _) = *kept.last()?;
    let mut per_second = vec![0; usize::try_from(last - first + 1).ok()?];
    for (s, n) in kept {
        per_second[usize::try_from(s - first).ok()?] += n;
    }
    Some(DestinationHistory {
        namespace: service.namespace.to_string(),
        service: service.name.to_string(),
        port: u32::from(port),
        first_second: first,
        per_second,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: LogLimits = LogLimits {
        max_batches: 100,
        max_bytes: 1 << 20,
    };

    fn key(svc: &str, comm: &str) -> SeriesKey {
        SeriesKey {
            service: ServiceRef::new("default", svc),
            port: 80,
            pod: "".into(),
            comm: comm.into(),
        }
    }

    fn collected(at_ms: i64, deltas: &[(&str, u64)]) -> Collected {
        Collected {
            collected_at_unix_ms: at_ms,
            woken: None,
            deltas: deltas.iter().map(|(s, n)| (key(s, "curl"), *n)).collect(),
            edges: Vec::new(),
        }
    }

    fn totals(s: &Snapshot) -> Vec<(String, u64)> {
        let mut t: Vec<_> = s
            .totals
            .iter()
            .map(|c| (c.series.as_ref().unwrap().service.clone(), c.attempts))
            .collect();
        t.sort();
        t
    }

    fn history(s: &Snapshot) -> Vec<(String, i64, Vec<u64>)> {
        let mut h: Vec<_> = s
            .history
            .iter()
            .map(|d| (d.service.clone(), d.first_second, d.per_second.clone()))
            .collect();
        h.sort();
        h
    }

    #[test]
    fn batches_are_numbered_without_gaps_and_empty_collections_make_none() {
        let ledger = Ledger::new(LIMITS);
        assert_eq!(ledger.record(collected(1_000, &[("a", 1)])), Some(1));
        assert_eq!(ledger.record(collected(1_500, &[])), None);
        assert_eq!(
            ledger.record(collected(2_000, &[("a", 2), ("b", 1)])),
            Some(2)
        );
        assert_eq!(*ledger.subscribe().borrow(), 2);
        assert_eq!(ledger.total(&key("a", "curl")), 3);
    }

    #[test]
    fn a_fresh_replica_gets_everything_in_one_snapshot() {
        let ledger = Ledger::new(LIMITS);
        ledger.record(collected(10_200, &[("a", 1)]));
        ledger.record(collected(10_900, &[("a", 2)]));
        ledger.record(collected(12_100, &[("b", 4)]));
        let start = ledger.start_stream(0, 60, 12_500);
        assert!(!start.resumed);
        assert!(start.resend.is_empty());
        assert_eq!(start.snapshot.through_sequence, 3);
        assert_eq!(start.snapshot.taken_at_unix_ms, 12_500);
        assert_eq!(
            totals(&start.snapshot),
            vec![("a".into(), 3), ("b".into(), 4)]
        );
        assert_eq!(
            history(&start.snapshot),
            vec![("a".into(), 10, vec![3]), ("b".into(), 12, vec![4])]
        );
    }

    #[test]
    fn a_known_replica_resumes_from_what_it_applied() {
        let ledger = Ledger::new(LIMITS);
        ledger.record(collected(10_000, &[("a", 1)]));
        ledger.record(collected(11_000, &[("a", 2)]));
        ledger.record(collected(11_500, &[("a", 4), ("b", 1)]));
        let start = ledger.start_stream(1, 60, 12_000);
        assert!(start.resumed);
        assert_eq!(start.snapshot.through_sequence, 1);
        // Through batch 1 only: the rest comes as batches.
        assert_eq!(totals(&start.snapshot), vec![("a".into(), 1)]);
        assert_eq!(history(&start.snapshot), vec![("a".into(), 10, vec![1])]);
        let resent: Vec<u64> = start.resend.iter().map(|o| o.batch.sequence).collect();
        assert_eq!(resent, vec![2, 3]);
        // Snapshot + resends == a fresh snapshot.
        let fresh = ledger.start_stream(0, 60, 12_000);
        assert_eq!(
            totals(&fresh.snapshot),
            vec![("a".into(), 7), ("b".into(), 1)]
        );
    }

    #[test]
    fn a_replica_up_to_date_resumes_with_nothing_to_resend() {
        let ledger = Ledger::new(LIMITS);
        ledger.record(collected(10_000, &[("a", 1)]));
        let start = ledger.start_stream(1, 60, 11_000);
        assert!(start.resumed);
        assert!(start.resend.is_empty());
        assert_eq!(totals(&start.snapshot), vec![("a".into(), 1)]);
    }

    #[test]
    fn an_overflowed_log_falls_back_to_a_full_snapshot() {
        let ledger = Ledger::new(LogLimits {
            max_batches: 2,
            max_bytes: 1 << 20,
        });
        for i in 0..5 {
            ledger.record(collected(10_000 + i * 1000, &[("a", 1)]));
        }
        assert_eq!(ledger.fill().batches, 2);
        assert_eq!(ledger.evicted(), 3);
        // The replica applied 1; batches 2 and 3 are gone from the log.
        let start = ledger.start_stream(1, 60, 15_000);
        assert!(!start.resumed);
        assert_eq!(start.snapshot.through_sequence, 5);
        assert!(start.resend.is_empty());
        assert_eq!(totals(&start.snapshot), vec![("a".into(), 5)]);
        // Streaming from 1 is no longer possible either; from 3 it is.
        assert_eq!(ledger.after(1).unwrap_err(), FellBehind);
        let after: Vec<u64> = ledger
            .after(3)
            .unwrap()
            .iter()
            .map(|o| o.batch.sequence)
            .collect();
        assert_eq!(after, vec![4, 5]);
        assert!(ledger.after(5).unwrap().is_empty());
    }

    #[test]
    fn the_log_is_bounded_by_bytes_too() {
        let ledger = Ledger::new(LogLimits {
            max_batches: 1000,
            max_bytes: 100,
        });
        for i in 0..10 {
            ledger.record(collected(10_000 + i, &[("a", 1)]));
        }
        let fill = ledger.fill();
        assert!(fill.bytes <= 100, "{fill:?}");
        assert!(fill.batches >= 1);
        assert_eq!(ledger.evicted() as usize + fill.batches, 10);
    }

    #[test]
    fn history_keeps_the_window_asked_for() {
        let ledger = Ledger::new(LIMITS);
        ledger.record(collected(1_000, &[("a", 1)]));
        ledger.record(collected(100_000, &[("a", 1)]));
        // Default window (60 s): the first second is gone.
        let start = ledger.start_stream(0, 600, 100_000);
        assert_eq!(history(&start.snapshot), vec![("a".into(), 100, vec![1])]);
        assert_eq!(totals(&start.snapshot), vec![("a".into(), 2)]);

        ledger.want_history(600);
        ledger.record(collected(120_000, &[("a", 1)]));
        ledger.record(collected(122_000, &[("a", 2)]));
        let start = ledger.start_stream(0, 30, 122_000);
        // Asked for 30 s: only seconds 93..=122.
        assert_eq!(
            history(&start.snapshot),
            vec![("a".into(), 100, {
                let mut v = vec![0; 23];
                v[0] = 1;
                v[20] = 1;
                v[22] = 2;
                v
            })]
        );
    }

    #[test]
    fn the_first_sender_of_a_wake_batch_gets_its_wake_time() {
        let ledger = Ledger::new(LIMITS);
        let woken = Woken {
            at: tokio::time::Instant::now(),
            read_at_us: 7,
            services: Arc::from([ServiceRef::new("apps", "a")]),
        };
        ledger.record(Collected {
            collected_at_unix_ms: 1_000,
            woken: Some(woken.clone()),
            deltas: vec![(key("a", "curl"), 1)],
            edges: Vec::new(),
        });
        let first = ledger.after(0).unwrap();
        assert_eq!(first[0].woken, Some(woken));
        assert!(first[0].batch.wake);
        assert_eq!(ledger.after(0).unwrap()[0].woken, None);
    }

    fn edge_names(edges: &[itw_proto::itw::v1::Edge]) -> Vec<(String, String, i64, bool)> {
        edges
            .iter()
            .map(|e| {
                (
                    format!("{}/{}", e.from_namespace, e.from_service),
                    format!("{}/{}", e.to_namespace, e.to_service),
                    e.last_seen_unix_ms,
                    e.declared,
                )
            })
            .collect()
    }

    #[test]
    fn edges_go_out_when_new_and_every_one_held_is_in_the_snapshot() {
        let ledger = Ledger::new(LIMITS);
        let call = (
            ServiceRef::new("default", "a"),
            ServiceRef::new("default", "b"),
        );
        let mut with_edge = collected(1_000, &[("b", 1)]);
        with_edge.edges = vec![call.clone()];
        assert_eq!(ledger.record(with_edge.clone()), Some(1));
        with_edge.collected_at_unix_ms = 2_000;
        assert_eq!(ledger.record(with_edge), Some(2));
        let sent = ledger.after(0).unwrap();
        let a_b = ("default/a".to_owned(), "default/b".to_owned(), 1_000, false);
        assert_eq!(edge_names(&sent[0].batch.edges), vec![a_b]);
        assert_eq!(
            edge_names(&sent[1].batch.edges),
            vec![],
            "steady: no resend"
        );

        // A declaration goes out at once, in a batch without attempts.
        let declared = (
            ServiceRef::new("default", "b"),
            ServiceRef::new("other", "c"),
        );
        assert_eq!(ledger.declare(vec![declared], 3_000), Some(3));
        let batch = &ledger.after(2).unwrap()[0].batch;
        assert_eq!(batch.deltas, vec![]);
        assert_eq!(
            edge_names(&batch.edges),
            vec![("default/b".into(), "other/c".into(), 3_000, true)]
        );
        assert_eq!(ledger.refresh_edges(4_000), None, "nothing due");
        // Taken before the newest batch, recorded after it: not back in time.
        let late = (
            ServiceRef::new("default", "c"),
            ServiceRef::new("default", "d"),
        );
        assert_eq!(ledger.declare(vec![late], 2_500), Some(4));
        assert_eq!(
            ledger.after(3).unwrap()[0].batch.collected_at_unix_ms,
            3_000
        );
        ledger.declare(
            vec![(
                ServiceRef::new("default", "b"),
                ServiceRef::new("other", "c"),
            )],
            4_000,
        );
        assert_eq!(ledger.edge_counts(), (3, 0));

        let start = ledger.start_stream(0, 60, 4_000);
        assert_eq!(
            edge_names(&start.snapshot.edges),
            vec![
                ("default/a".into(), "default/b".into(), 2_000, false),
                ("default/b".into(), "other/c".into(), 4_000, true),
                ("default/c".into(), "default/d".into(), 2_500, false),
            ]
        );
    }
}
