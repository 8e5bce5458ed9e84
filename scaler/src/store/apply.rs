//! What an ingest stream hands the store (checked views of its snapshots
//! and batches) and how they are applied: exactly once, in sequence, with
//! history merged so that nothing is counted twice.
//!
//! A message is applied under its own instance's lock; each destination's
//! window is locked only for the moment it is added to. Checking a message
//! is [`crate::ingest`]'s job: what reaches here holds only valid names.

use itw_telemetry::logging::LogBudget;

use super::{
    CapRefusal, Connection, SeriesCache, Store, Wakeups, agent_services::AgentServices,
    destination_key, series::Resolved, totals::SeriesTotals,
};
use crate::window;

/// Warnings for entries refused for a cap: at most 10 a minute over all
/// streams (every one counted in itw_scaler_refused_entries_total).
static CAP_LOG: LogBudget = LogBudget::new(10, std::time::Duration::from_secs(60));

/// One exported series as the store names it (checked by [`crate::ingest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesName<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub port: u16,
    pub pod: &'a str,
    pub process_comm: &'a str,
}

/// A checked batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchView<'a> {
    pub sequence: u64,
    pub collected_at_ms: i64,
    pub deltas: Vec<(SeriesName<'a>, u64)>,
}

/// A checked snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotView<'a> {
    pub through_sequence: u64,
    pub taken_at_ms: i64,
    pub totals: Vec<(SeriesName<'a>, u64)>,
    pub history: Vec<HistoryView<'a>>,
}

/// Per-second counts of one destination in a snapshot (agent clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryView<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub port: u16,
    pub first_second: i64,
    pub per_second: &'a [u64],
}

/// Why the store refused a message of an ingest stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "sequence gap: batch {got} arrived but this replica has applied through {applied}; reconnect and send a snapshot"
    )]
    SequenceGap { applied: u64, got: u64 },
    #[error(
        "snapshot.through_sequence {through} is below {applied}, the sequence this replica has already applied for the instance"
    )]
    SnapshotBehind { through: u64, applied: u64 },
    #[error(
        "hello.instance_secret does not match the secret instance {instance} first said hello with; a restarted agent must use a new instance_id"
    )]
    SecretMismatch { instance: String },
    #[error("hello.node_name {node:?}: instance {instance} reported from node {known:?} before")]
    NodeMismatch {
        instance: String,
        node: String,
        known: String,
    },
}

/// Result of a batch: the sequence to acknowledge, and whether it was new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    Applied { ack: u64 },
    Duplicate { ack: u64 },
}

impl Store {
    /// Applies a snapshot: the instance's totals are replaced, its history
    /// merged into the windows without counting anything twice.
    ///
    /// History merge (agent clock, L = newest second already applied): a
    /// second after L is added whole; second L adds what exceeds the count
    /// already applied in L; earlier seconds were applied already.
    pub fn apply_snapshot(
        &self,
        conn: &Connection,
        snapshot: &SnapshotView<'_>,
        cache: &mut SeriesCache,
    ) -> Result<u64, ApplyError> {
        let mut state = conn.state.lock();
        if snapshot.through_sequence < state.applied_sequence {
            return Err(ApplyError::SnapshotBehind {
                through: snapshot.through_sequence,
                applied: state.applied_sequence,
            });
        }
        let now_ms = self.clock.now_ms();
        let offset = now_ms.saturating_sub(snapshot.taken_at_ms);
        state.offset_ms = Some(offset);

        // The snapshot says anew which Services the instance reports: the
        // stream's cache starts over so each is admitted again.
        *cache = SeriesCache::with_capacity(snapshot.totals.len());
        let mut services = AgentServices::default();
        let mut totals = SeriesTotals::with_capacity(snapshot.totals.len());
        for (i, (name, attempts)) in snapshot.totals.iter().enumerate() {
            let Some(resolved) = self.admit(cache, name, &mut services, || {
                format!("snapshot.totals[{i}]")
            }) else {
                continue;
            };
            if resolved.folded {
                self.metrics.series_overflow.inc();
            }
            totals.add(&resolved.series, *attempts);
        }
        totals.settle();
        cache.shrink_to_fit();
        // Each admitted destination with its Service's zero series, under
        // which its counts of the newest second are kept.
        let mut history = Vec::with_capacity(snapshot.history.len());
        for (i, h) in snapshot.history.iter().enumerate() {
            match self.admit_service(h.namespace, h.service, &mut services) {
                Ok(zero) => history.push((h, zero)),
                Err(cap) => self.refuse(
                    || format!("snapshot.history[{i}]"),
                    h.namespace,
                    h.service,
                    cap,
                ),
            }
        }
        state.services = services;
        let previous = std::mem::replace(&mut state.totals, totals);
        for (series, new) in state.totals.iter() {
            let old = previous.get(series).unwrap_or(0);
            if new > old {
                series.add_live(new - old);
            } else if old > new {
                series.sub_live(old - new);
            }
        }
        for (series, old) in previous.iter() {
            if state.totals.get(series).is_none() {
                series.sub_live(old);
            }
        }

        let now_second = now_ms.div_euclid(1000);
        let first_kept = window::first_second(now_second, self.history_secs());
        let shift = offset.div_euclid(1000);
        let mut wake = Wakeups::default();
        let last_second = state.last_second;
        let applied_in_last_second = state.last_second_counts.per_destination();
        let applied_in = |h: &HistoryView<'_>| {
            let destination = destination_key(h.namespace, h.service, h.port);
            applied_in_last_second
                .get(&destination)
                .copied()
                .unwrap_or(0)
        };
        for (history, _) in &history {
            let applied_in_last = applied_in(history);
            let mut entry = self.service_entry(history.namespace, history.service);
            for (second, &count) in (history.first_second..).zip(history.per_second) {
                let add = match last_second {
                    None => count,
                    Some(l) if second > l => count,
                    Some(l) if second == l => count.saturating_sub(applied_in_last),
                    Some(_) => 0,
                };
                if add == 0 {
                    continue;
                }
                let placed = second.saturating_add(shift).min(now_second);
                self.add_to_window(&mut entry, history.port, placed, add, first_kept, &mut wake);
            }
        }
        let newest = history
            .iter()
            .filter(|(h, _)| !h.per_second.is_empty())
            .map(|(h, _)| h.first_second.saturating_add(h.per_second.len() as i64 - 1))
            .max();
        if let Some(newest) = newest {
            let counts_at = |second: i64| {
                history.iter().filter_map(move |(h, zero)| {
                    let i = usize::try_from(second.checked_sub(h.first_second)?).ok()?;
                    let count = *h.per_second.get(i)?;
                    (count > 0).then_some((*h, zero, count))
                })
            };
            match last_second {
                Some(l) if newest < l => {}
                Some(l) if newest == l => {
                    // What a destination applied in L becomes the larger
                    // of its sum and the snapshot's count: the difference
                    // is kept under its zero series.
                    for (h, zero, count) in counts_at(l) {
                        let applied = applied_in(h);
                        if count > applied {
                            state.last_second_counts.add(zero, h.port, count - applied);
                        }
                    }
                }
                _ => {
                    state.last_second = Some(newest);
                    state.last_second_counts.clear();
                    for (h, zero, count) in counts_at(newest) {
                        state.last_second_counts.add(zero, h.port, count);
                    }
                }
            }
        }
        state.applied_sequence = snapshot.through_sequence;
        drop(state);
        wake.ring();
        Ok(snapshot.through_sequence)
    }

    /// Applies a batch if it is the next in sequence; acknowledges a resend.
    pub fn apply_batch(
        &self,
        conn: &Connection,
        batch: &BatchView<'_>,
        cache: &mut SeriesCache,
    ) -> Result<BatchOutcome, ApplyError> {
        let mut state = conn.state.lock();
        let applied = state.applied_sequence;
        if batch.sequence <= applied {
            return Ok(BatchOutcome::Duplicate { ack: applied });
        }
        if batch.sequence > applied + 1 {
            return Err(ApplyError::SequenceGap {
                applied,
                got: batch.sequence,
            });
        }
        let offset = state.offset_ms.unwrap_or(0);
        let now_ms = self.clock.now_ms();
        let now_second = now_ms.div_euclid(1000);
        let placed_ms = batch.collected_at_ms.saturating_add(offset);
        // A corrected time slightly ahead of ours (the offset includes one
        // transit delay) belongs to our current second, which the windows count.
        let placed = placed_ms.div_euclid(1000).min(now_second);
        let first_kept = window::first_second(now_second, self.history_secs());
        let lag_ms = now_ms.saturating_sub(placed_ms).max(0);
        self.metrics.ingest_lag.observe(lag_ms as f64 / 1000.0);

        let agent_second = batch.collected_at_ms.div_euclid(1000);
        let in_last_second = match state.last_second {
            Some(l) if agent_second < l => false,
            Some(l) if agent_second == l => true,
            _ => {
                state.last_second = Some(agent_second);
                state.last_second_counts.clear();
                true
            }
        };
        let mut wake = Wakeups::default();
        let mut guard = state;
        let state = &mut *guard;
        for (i, (name, attempts)) in batch.deltas.iter().enumerate() {
            let attempts = *attempts;
            let Some(resolved) = self.admit(cache, name, &mut state.services, || {
                format!("batch.deltas[{i}]")
            }) else {
                continue;
            };
            if resolved.folded {
                self.metrics.series_overflow.inc();
            }
            state.totals.add(&resolved.series, attempts);
            resolved.series.add_live(attempts);
            if in_last_second {
                state
                    .last_second_counts
                    .add(&resolved.series, resolved.port, attempts);
            }
            let port = resolved.port;
            self.add_to_window(
                &mut resolved.service,
                port,
                placed,
                attempts,
                first_kept,
                &mut wake,
            );
        }
        state.totals.settle();
        state.applied_sequence = batch.sequence;
        drop(guard);
        wake.ring();
        Ok(BatchOutcome::Applied {
            ack: batch.sequence,
        })
    }

    /// The series of the entry at `field`, or `None` when a cap refuses it
    /// ([`Self::refuse`]).
    fn admit<'c>(
        &self,
        cache: &'c mut SeriesCache,
        name: &SeriesName<'_>,
        services: &mut AgentServices,
        field: impl FnOnce() -> String,
    ) -> Option<&'c mut Resolved> {
        match self.resolve(cache, name, services) {
            Ok(resolved) => Some(resolved),
            Err(cap) => {
                self.refuse(field, name.namespace, name.service, cap);
                None
            }
        }
    }

    /// An entry refused for a cap: counted, and logged within [`CAP_LOG`].
    /// The rest of its message is applied; the stream stays up.
    fn refuse(
        &self,
        field: impl FnOnce() -> String,
        namespace: &str,
        service: &str,
        cap: CapRefusal,
    ) {
        self.metrics.refused_entry(cap.metric_label());
        if let Some(left_out) = CAP_LOG.allow() {
            let limit = match cap {
                CapRefusal::MaxServices => self.limits.max_services,
                CapRefusal::MaxServicesPerAgent => self.limits.max_services_per_agent,
            };
            tracing::warn!(
                field = %field(),
                service = %format_args!("{namespace}/{service}"),
                setting = cap.setting(),
                limit,
                left_out,
                "report entry refused: {} Services reached; the rest of the message applied (at most 10 such lines a minute; all counted in itw_scaler_refused_entries_total)",
                cap.setting(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{fixtures::*, *};

    #[tokio::test(start_paused = true)]
    async fn an_unknown_instance_snapshot_is_added_whole() {
        let store = store();
        let mut cache = SeriesCache::default();
        let (conn, applied) = store.hello("node-1", "a", SECRET).unwrap();
        assert_eq!(applied, 0);
        // Agent clock 2 s ahead of ours.
        let snap = snapshot(
            7,
            START_MS + 2000,
            vec![
                (name("web", 80, "", "curl"), 9),
                (name("web", 443, "", "curl"), 1),
                (name("db", 5432, "db-0", "psql"), 4),
            ],
            vec![
                history("web", 80, S - 8, &[1, 0, 3, 5]),
                history("db", 5432, S - 1, &[4]),
                history("web", 443, S + 2, &[1]),
            ],
        );
        assert_eq!(store.apply_snapshot(&conn, &snap, &mut cache), Ok(7));
        // Shifted 2 s back into scaler seconds; the newest lands in our current second.
        assert_eq!(
            seconds(&store, "web", 80),
            vec![(S - 10, 1), (S - 8, 3), (S - 7, 5)]
        );
        assert_eq!(seconds(&store, "web", 443), vec![(S, 1)]);
        assert_eq!(seconds(&store, "db", 5432), vec![(S - 3, 4)]);
        assert_eq!(
            exported(&store),
            vec![
                row("db", "", "", 0),
                row("db", "db-0", "psql", 4),
                row("web", "", "", 0),
                row("web", "", "curl", 10),
            ]
        );
        // Batch 8 follows; 7 again is a resend.
        let b = batch(8, START_MS + 2000, vec![(name("web", 80, "", "curl"), 2)]);
        assert_eq!(
            store.apply_batch(&conn, &b, &mut cache),
            Ok(BatchOutcome::Applied { ack: 8 })
        );
        assert_eq!(
            store.apply_batch(&conn, &b, &mut cache),
            Ok(BatchOutcome::Duplicate { ack: 8 })
        );
        let old = batch(7, START_MS, vec![(name("web", 80, "", "curl"), 100)]);
        assert_eq!(
            store.apply_batch(&conn, &old, &mut cache),
            Ok(BatchOutcome::Duplicate { ack: 8 })
        );
        assert_eq!(
            store.apply_batch(&conn, &batch(10, START_MS, vec![]), &mut cache),
            Err(ApplyError::SequenceGap {
                applied: 8,
                got: 10
            })
        );
        assert_eq!(
            seconds(&store, "web", 80),
            vec![(S - 10, 1), (S - 8, 3), (S - 7, 5), (S, 2)]
        );
        assert_eq!(exported(&store)[3], row("web", "", "curl", 12));
        assert_eq!(store.attempts("apps", "web", None, 60), 12);
        assert_eq!(store.attempts("apps", "web", Some(80), 8), 7);
        assert_eq!(store.attempts("apps", "web", Some(80), 1), 2);
        assert_eq!(store.attempts("apps", "nope", None, 60), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_stream_with_the_same_history_adds_nothing() {
        let store = store();
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let curl = name("web", 80, "", "curl");
        store
            .apply_batch(
                &conn,
                &batch(1, START_MS - 2000, vec![(curl, 1)]),
                &mut cache,
            )
            .unwrap();
        store
            .apply_batch(
                &conn,
                &batch(2, START_MS - 1000, vec![(curl, 2)]),
                &mut cache,
            )
            .unwrap();
        store
            .apply_batch(&conn, &batch(3, START_MS, vec![(curl, 3)]), &mut cache)
            .unwrap();
        drop(conn);

        // The agent reconnects to the same replica, which says it holds 3,
        // and snapshots through 3.
        let (conn, applied) = store.hello("node-1", "a", SECRET).unwrap();
        assert_eq!(applied, 3);
        let snap = snapshot(
            3,
            START_MS,
            vec![(curl, 6)],
            vec![history("web", 80, S - 2, &[1, 2, 3])],
        );
        store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
        assert_eq!(
            seconds(&store, "web", 80),
            vec![(S - 2, 1), (S - 1, 2), (S, 3)]
        );
        assert_eq!(
            exported(&store),
            vec![row("web", "", "", 0), row("web", "", "curl", 6)]
        );
        // A snapshot behind what was applied is refused.
        assert_eq!(
            store.apply_snapshot(&conn, &snapshot(2, START_MS, vec![], vec![]), &mut cache),
            Err(ApplyError::SnapshotBehind {
                through: 2,
                applied: 3
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_past_lost_batches_adds_exactly_what_was_missed() {
        let store = store();
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let curl = name("web", 80, "", "curl");
        let wget = name("web", 80, "", "wget");
        // Batches 1 and 2 land; L = S, with 2 applied in it for web:80.
        store
            .apply_batch(
                &conn,
                &batch(1, START_MS - 1000, vec![(curl, 4)]),
                &mut cache,
            )
            .unwrap();
        store
            .apply_batch(&conn, &batch(2, START_MS, vec![(curl, 2)]), &mut cache)
            .unwrap();
        drop(conn);
        // Batches 3 (second S, 3 more) and 4 (second S+1, 5) never arrived;
        // the agent can no longer resend them and snapshots through 4.
        let (conn, applied) = store.hello("node-1", "a", SECRET).unwrap();
        assert_eq!(applied, 2);
        tokio::time::advance(Duration::from_millis(1000)).await;
        let snap = snapshot(
            4,
            START_MS + 1000,
            vec![(curl, 9), (wget, 5)],
            // S-1 was applied (skipped); S had 2 applied of 5; S+1 is new.
            vec![history("web", 80, S - 1, &[4, 5, 5])],
        );
        store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
        assert_eq!(
            seconds(&store, "web", 80),
            vec![(S - 1, 4), (S, 5), (S + 1, 5)]
        );
        assert_eq!(
            exported(&store),
            vec![
                row("web", "", "", 0),
                row("web", "", "curl", 9),
                row("web", "", "wget", 5)
            ]
        );
        // L is now S+1 with 5 applied: batch 5 in S+1 adds on top, and a
        // repeat of the same snapshot changes nothing.
        store
            .apply_batch(
                &conn,
                &batch(5, START_MS + 1000, vec![(wget, 1)]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(
            seconds(&store, "web", 80),
            vec![(S - 1, 4), (S, 5), (S + 1, 6)]
        );
        drop(conn);
        let (conn, _) = store.hello("node-1", "a", SECRET).unwrap();
        let snap = snapshot(
            5,
            START_MS + 1000,
            vec![(curl, 9), (wget, 6)],
            vec![history("web", 80, S - 1, &[4, 5, 6])],
        );
        store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
        assert_eq!(
            seconds(&store, "web", 80),
            vec![(S - 1, 4), (S, 5), (S + 1, 6)]
        );
        assert_eq!(store.attempts("apps", "web", Some(80), 60), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn history_in_the_last_second_for_a_new_destination_is_added() {
        let store = store();
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        store
            .apply_batch(
                &conn,
                &batch(1, START_MS, vec![(name("web", 80, "", "curl"), 2)]),
                &mut cache,
            )
            .unwrap();
        drop(conn);
        let (conn, _) = store.hello("node-1", "a", SECRET).unwrap();
        // L = S: web:80 had 2 applied there, db:5432 none.
        let snap = snapshot(
            2,
            START_MS,
            vec![],
            vec![
                history("web", 80, S, &[2]),
                history("db", 5432, S - 1, &[7, 3]),
            ],
        );
        store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
        assert_eq!(seconds(&store, "web", 80), vec![(S, 2)]);
        assert_eq!(
            seconds(&store, "db", 5432),
            vec![(S, 3)],
            "S-1 is before L: taken as applied"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn batches_land_in_scaler_seconds_whatever_the_agent_clock() {
        let store = store();
        let mut cache = SeriesCache::default();
        // The agent's clock is 1 h behind.
        let agent_ms = START_MS - 3_600_000;
        let conn = connect(&store, "node-1", "a", agent_ms, &mut cache);
        tokio::time::advance(Duration::from_millis(2500)).await;
        // Collected 0.5 s ago by the agent's clock.
        let b = batch(1, agent_ms + 2000, vec![(name("web", 80, "", "curl"), 1)]);
        store.apply_batch(&conn, &b, &mut cache).unwrap();
        assert_eq!(seconds(&store, "web", 80), vec![(S + 2, 1)]);
        // A time a little ahead of ours lands in our current second.
        let b = batch(2, agent_ms + 3400, vec![(name("web", 80, "", "curl"), 1)]);
        store.apply_batch(&conn, &b, &mut cache).unwrap();
        assert_eq!(seconds(&store, "web", 80), vec![(S + 2, 2)]);
    }
}
