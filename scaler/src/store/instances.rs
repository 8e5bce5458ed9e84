//! The agent instance table: which instances the store holds, on which
//! node, with which secret, how many streams each has open, and when a
//! departed one is folded into the retired sums (replaced by a newer
//! instance of its node, or gone longer than INSTANCE_RETENTION).
//!
//! An instance is its id *and* the secret its first hello carried: a hello
//! naming a known id (held or folded) with another secret or node is
//! refused, so an id seen in a log lets nobody lower or hide its counts.
//! Folded instances are remembered (FOLDED_RETENTION, MAX_FOLDED_INSTANCES):
//! one that comes back is taken out of the retired sums and resumes where it
//! was, so its snapshot replaces its folded totals instead of adding to them.
//!
//! The table's lock is taken on hello, disconnect and sweep only, never per
//! batch: a stream holds its instance's state through its [`Connection`].
//! Folding never loses nor repeats a count (see [`super::series`]). Instance
//! ids are logged by their first characters only ([`short_id`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use parking_lot::Mutex;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::{
    ApplyError, Store, agent_services::AgentServices, gauge_value, last_second::LastSecondCounts,
    totals::SeriesTotals,
};

/// Characters of an instance id shown in logs and statuses.
const SHOWN_ID_CHARS: usize = 8;

/// The first characters of an instance id, for logs: enough to tell
/// instances apart, not enough to name one in a hello.
pub fn short_id(id: &str) -> String {
    if id.chars().count() > SHOWN_ID_CHARS {
        format!("{}…", id.chars().take(SHOWN_ID_CHARS).collect::<String>())
    } else {
        id.to_owned()
    }
}

/// An agent instance: what it reported, and where its stream stands.
#[derive(Debug)]
pub(super) struct Instance {
    pub(super) applied_sequence: u64,
    /// Scaler clock minus agent clock, measured at the last snapshot.
    pub(super) offset_ms: Option<i64>,
    /// Newest agent-clock second of which counts were applied.
    pub(super) last_second: Option<i64>,
    /// Counts applied within `last_second`.
    pub(super) last_second_counts: LastSecondCounts,
    /// Cumulative attempts per series, keyed by the series' address.
    pub(super) totals: SeriesTotals,
    /// The Services it reported (MAX_SERVICES_PER_AGENT).
    pub(super) services: AgentServices,
}

/// Who an instance is: the node it reports from and its secret.
struct Identity {
    node: Arc<str>,
    secret: Box<[u8]>,
    first_seen: Instant,
}

impl Identity {
    fn check(&self, instance_id: &str, node: &str, secret: &str) -> Result<(), ApplyError> {
        if !bool::from(self.secret.ct_eq(secret.as_bytes())) {
            return Err(ApplyError::SecretMismatch {
                instance: short_id(instance_id),
            });
        }
        if *self.node != *node {
            return Err(ApplyError::NodeMismatch {
                instance: short_id(instance_id),
                node: node.to_owned(),
                known: self.node.to_string(),
            });
        }
        Ok(())
    }
}

/// The instance table's view of an instance.
pub(super) struct InstanceSlot {
    identity: Identity,
    streams: u32,
    disconnected_at: Option<Instant>,
    state: Arc<Mutex<Instance>>,
}

/// A folded instance, remembered in case it comes back.
struct Folded {
    identity: Identity,
    folded_at: Instant,
    state: Arc<Mutex<Instance>>,
}

/// Held and folded instances.
#[derive(Default)]
pub(super) struct Instances {
    held: HashMap<Arc<str>, InstanceSlot>,
    folded: HashMap<Arc<str>, Folded>,
    /// Folded ids, oldest first (an entry whose instance came back or was
    /// folded again later is skipped when its turn comes).
    folded_order: VecDeque<(Arc<str>, Instant)>,
}

/// An ingest stream's hold on its instance; dropping it records the disconnect.
pub struct Connection {
    store: Arc<Store>,
    id: Arc<str>,
    pub(super) state: Arc<Mutex<Instance>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.store.disconnect(&self.id);
    }
}

impl Store {
    /// Registers a stream of an instance; returns its connection and the
    /// sequence this replica has applied for it (0 for an unknown instance).
    /// A known or folded instance must come with its secret and node.
    pub fn hello(
        self: &Arc<Self>,
        node: &str,
        instance_id: &str,
        secret: &str,
    ) -> Result<(Connection, u64), ApplyError> {
        let now = Instant::now();
        let mut table = self.instances.lock();
        let table = &mut *table;
        if let Some(slot) = table.held.get(instance_id) {
            slot.identity.check(instance_id, node, secret)?;
        } else if let Some(folded) = table.folded.get(instance_id) {
            folded.identity.check(instance_id, node, secret)?;
            if let Some((id, folded)) = table.folded.remove_entry(instance_id) {
                self.unfold(&folded.state);
                tracing::info!(
                    node,
                    instance = %short_id(&id),
                    "folded agent instance came back; its folded counts are its own again"
                );
                table.held.insert(
                    id,
                    InstanceSlot {
                        identity: folded.identity,
                        streams: 0,
                        disconnected_at: None,
                        state: folded.state,
                    },
                );
            }
        } else {
            table.held.insert(
                Arc::from(instance_id),
                InstanceSlot {
                    identity: Identity {
                        node: node.into(),
                        secret: secret.as_bytes().into(),
                        first_seen: now,
                    },
                    streams: 0,
                    disconnected_at: None,
                    state: Arc::new(Mutex::new(Instance {
                        applied_sequence: 0,
                        offset_ms: None,
                        last_second: None,
                        last_second_counts: LastSecondCounts::default(),
                        totals: SeriesTotals::default(),
                        services: AgentServices::default(),
                    })),
                },
            );
        }
        // Held now: found, brought back or inserted above under this lock.
        let id = table
            .held
            .get_key_value(instance_id)
            .map(|(id, _)| Arc::clone(id));
        let Some((id, slot)) = id.and_then(|id| table.held.get_mut(&id).map(|slot| (id, slot)))
        else {
            return Err(ApplyError::SecretMismatch {
                instance: short_id(instance_id),
            });
        };
        slot.streams += 1;
        slot.disconnected_at = None;
        let first_seen = slot.identity.first_seen;
        let state = Arc::clone(&slot.state);
        let applied = state.lock().applied_sequence;
        // An older instance of this node that is gone has been replaced: its
        // counts move to the retired sums now rather than after the retention.
        let superseded: Vec<Arc<str>> = table
            .held
            .iter()
            .filter(|(other, slot)| {
                **other != id
                    && *slot.identity.node == *node
                    && slot.streams == 0
                    && slot.identity.first_seen < first_seen
            })
            .map(|(other, _)| Arc::clone(other))
            .collect();
        for other in superseded {
            tracing::info!(node, instance = %short_id(&other), by = %short_id(&id), "agent instance replaced; its counts stay in the totals");
            self.fold(table, &other, now);
        }
        self.instance_gauges(table);
        Ok((
            Connection {
                store: Arc::clone(self),
                id,
                state,
            },
            applied,
        ))
    }

    fn disconnect(&self, id: &str) {
        let now = Instant::now();
        let mut table = self.instances.lock();
        let table = &mut *table;
        let Some(slot) = table.held.get_mut(id) else {
            return;
        };
        slot.streams = slot.streams.saturating_sub(1);
        if slot.streams > 0 {
            return;
        }
        slot.disconnected_at = Some(now);
        let (node, first_seen) = (Arc::clone(&slot.identity.node), slot.identity.first_seen);
        let superseded = table.held.iter().any(|(other, o)| {
            **other != *id
                && o.identity.node == node
                && o.streams > 0
                && o.identity.first_seen > first_seen
        });
        if superseded {
            tracing::info!(node = %node, instance = %short_id(id), "superseded agent instance disconnected; its counts stay in the totals");
            self.fold(table, id, now);
        }
        self.instance_gauges(table);
    }

    /// Moves a held instance's totals into the retired sums and remembers it
    /// as folded.
    fn fold(&self, table: &mut Instances, id: &str, now: Instant) {
        let Some((id, slot)) = table.held.remove_entry(id) else {
            return;
        };
        {
            let state = slot.state.lock();
            for (series, total) in state.totals.iter() {
                series.retire(total);
            }
        }
        if self.limits.max_folded_instances == 0 {
            self.metrics.folded_instances_forgotten.inc();
            return;
        }
        while table.folded.len() >= self.limits.max_folded_instances {
            self.forget_oldest_folded(table);
        }
        table.folded_order.push_back((Arc::clone(&id), now));
        table.folded.insert(
            id,
            Folded {
                identity: slot.identity,
                folded_at: now,
                state: slot.state,
            },
        );
    }

    fn forget_oldest_folded(&self, table: &mut Instances) {
        while let Some((id, at)) = table.folded_order.pop_front() {
            if table.folded.get(&id).is_some_and(|f| f.folded_at == at) {
                table.folded.remove(&id);
                self.metrics.folded_instances_forgotten.inc();
                tracing::debug!(instance = %short_id(&id), "folded agent instance forgotten (MAX_FOLDED_INSTANCES)");
                return;
            }
        }
    }

    /// A folded instance came back: its totals leave the retired sums and
    /// are live again. Retired goes down first, so a concurrent publish can
    /// only see too little (ignored by the max), never the counts twice.
    fn unfold(&self, state: &Mutex<Instance>) {
        let state = state.lock();
        for (series, total) in state.totals.iter() {
            series.unretire(total);
        }
    }

    fn instance_gauges(&self, table: &Instances) {
        self.metrics
            .agent_instances
            .set(gauge_value(table.held.len()));
        self.metrics
            .folded_instances
            .set(gauge_value(table.folded.len()));
    }

    /// Folds instances gone longer than INSTANCE_RETENTION, and forgets
    /// folded ones older than FOLDED_RETENTION.
    pub(super) fn sweep_instances(&self) {
        let now = Instant::now();
        let mut table = self.instances.lock();
        let table = &mut *table;
        let retention = self.limits.instance_retention;
        let expired: Vec<Arc<str>> = table
            .held
            .iter()
            .filter(|(_, slot)| {
                slot.streams == 0
                    && slot
                        .disconnected_at
                        .is_some_and(|at| now.saturating_duration_since(at) >= retention)
            })
            .map(|(id, _)| Arc::clone(id))
            .collect();
        for id in expired {
            if let Some(slot) = table.held.get(&id) {
                tracing::info!(node = %slot.identity.node, instance = %short_id(&id), "agent instance gone longer than INSTANCE_RETENTION; its counts stay in the totals");
            }
            self.fold(table, &id, now);
        }
        let folded_retention = self.limits.folded_retention;
        while let Some((id, at)) = table.folded_order.front() {
            if now.saturating_duration_since(*at) < folded_retention {
                break;
            }
            if table.folded.get(id).is_some_and(|f| f.folded_at == *at) {
                table.folded.remove(id);
            }
            table.folded_order.pop_front();
        }
        self.instance_gauges(table);
    }

    /// Agent instances held (for tests and diagnostics).
    pub fn instance_count(&self) -> usize {
        self.instances.lock().held.len()
    }

    /// Folded instances remembered (for tests and diagnostics).
    pub fn folded_count(&self) -> usize {
        self.instances.lock().folded.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{fixtures::*, *};

    #[tokio::test(start_paused = true)]
    async fn a_new_instance_of_a_node_adds_to_the_old_one() {
        let store = store();
        let mut cache = SeriesCache::default();
        let curl = name("web", 80, "", "curl");
        let old = connect(&store, "node-1", "old", START_MS, &mut cache);
        store
            .apply_batch(&old, &batch(1, START_MS, vec![(curl, 5)]), &mut cache)
            .unwrap();
        drop(old);
        assert_eq!(
            store.instance_count(),
            1,
            "kept for a reconnect within the retention"
        );

        // The agent restarted: a new instance, counting from zero.
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut cache = SeriesCache::default();
        let (new, applied) = store.hello("node-1", "new", SECRET).unwrap();
        assert_eq!(applied, 0);
        assert_eq!(
            store.instance_count(),
            1,
            "the replaced instance is folded at once"
        );
        store
            .apply_snapshot(
                &new,
                &snapshot(
                    0,
                    START_MS + 1000,
                    vec![(curl, 3)],
                    vec![history("web", 80, S + 1, &[3])],
                ),
                &mut cache,
            )
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 8));
        store
            .apply_batch(
                &new,
                &batch(1, START_MS + 1000, vec![(curl, 1)]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 9));
        assert_eq!(seconds(&store, "web", 80), vec![(S, 5), (S + 1, 4)]);
        // The new instance's own resend and reconnect change nothing.
        drop(new);
        let (new, applied) = store.hello("node-1", "new", SECRET).unwrap();
        assert_eq!(applied, 1);
        store
            .apply_snapshot(
                &new,
                &snapshot(
                    1,
                    START_MS + 1000,
                    vec![(curl, 4)],
                    vec![history("web", 80, S + 1, &[4])],
                ),
                &mut cache,
            )
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 9));
        assert_eq!(seconds(&store, "web", 80), vec![(S, 5), (S + 1, 4)]);
    }

    #[tokio::test(start_paused = true)]
    async fn instances_of_a_rolling_update_coexist_until_the_old_one_leaves() {
        let store = store();
        let mut cache = SeriesCache::default();
        let curl = name("web", 80, "", "curl");
        let old = connect(&store, "node-1", "old", START_MS, &mut cache);
        store
            .apply_batch(&old, &batch(1, START_MS, vec![(curl, 5)]), &mut cache)
            .unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut new_cache = SeriesCache::default();
        let new = connect(&store, "node-1", "new", START_MS + 1000, &mut new_cache);
        store
            .apply_batch(
                &new,
                &batch(1, START_MS + 1000, vec![(curl, 2)]),
                &mut new_cache,
            )
            .unwrap();
        assert_eq!(store.instance_count(), 2);
        assert_eq!(exported(&store)[1], row("web", "", "curl", 7));
        drop(old);
        assert_eq!(store.instance_count(), 1, "superseded: folded as it leaves");
        assert_eq!(exported(&store)[1], row("web", "", "curl", 7));
        // The new one leaving alone is kept for INSTANCE_RETENTION.
        drop(new);
        store.sweep();
        assert_eq!(store.instance_count(), 1);
        tokio::time::advance(Limits::default().instance_retention - Duration::from_millis(1)).await;
        store.sweep();
        assert_eq!(store.instance_count(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        store.sweep();
        assert_eq!(store.instance_count(), 0);
        assert_eq!(exported(&store)[1], row("web", "", "curl", 7));
        assert_eq!(store.metrics.agent_instances.get(), 0);
    }

    /// #13 item 1: an instance folded after INSTANCE_RETENTION reconnects
    /// with its cumulative snapshot: counted once, not twice.
    #[tokio::test(start_paused = true)]
    async fn a_folded_instance_that_comes_back_is_counted_once() {
        let store = store();
        let mut cache = SeriesCache::default();
        let curl = name("web", 80, "", "curl");
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        store
            .apply_batch(&conn, &batch(1, START_MS, vec![(curl, 150)]), &mut cache)
            .unwrap();
        drop(conn);
        tokio::time::advance(Limits::default().instance_retention).await;
        store.sweep();
        assert_eq!((store.instance_count(), store.folded_count()), (0, 1));
        assert_eq!(store.metrics.folded_instances.get(), 1);
        assert_eq!(exported(&store)[1], row("web", "", "curl", 150));

        // Back with the same id and secret: it resumes where it was.
        let (conn, applied) = store.hello("node-1", "a", SECRET).unwrap();
        assert_eq!(applied, 1);
        assert_eq!((store.instance_count(), store.folded_count()), (1, 0));
        store
            .apply_snapshot(
                &conn,
                &snapshot(1, START_MS + 3_600_000, vec![(curl, 150)], vec![]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 150));
        store
            .apply_batch(
                &conn,
                &batch(2, START_MS + 3_600_000, vec![(curl, 10)]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 160));
        // Folded again, then a second instance of the node: still 160.
        drop(conn);
        tokio::time::advance(Limits::default().instance_retention).await;
        store.sweep();
        let other = connect(&store, "node-1", "b", START_MS, &mut SeriesCache::default());
        assert_eq!(exported(&store)[1], row("web", "", "curl", 160));
        drop(other);
    }

    /// #13 item 1, the other way to fold: an instance replaced by a newer
    /// one of its node (two agents with one NODE_NAME, or a partition during
    /// a rolling update) comes back: its counts are not added again.
    #[tokio::test(start_paused = true)]
    async fn a_replaced_instance_that_comes_back_is_counted_once() {
        let store = store();
        let curl = name("web", 80, "", "curl");
        let mut cache = SeriesCache::default();
        let old = connect(&store, "node-1", "old", START_MS, &mut cache);
        store
            .apply_batch(&old, &batch(1, START_MS, vec![(curl, 100)]), &mut cache)
            .unwrap();
        drop(old);
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut new_cache = SeriesCache::default();
        let new = connect(&store, "node-1", "new", START_MS + 1000, &mut new_cache);
        assert_eq!(store.folded_count(), 1, "the old one is folded at once");
        let (old, applied) = store.hello("node-1", "old", SECRET).unwrap();
        assert_eq!(applied, 1);
        store
            .apply_snapshot(
                &old,
                &snapshot(1, START_MS + 2000, vec![(curl, 100)], vec![]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 100));
        drop((old, new));
    }

    /// #13 item 7: an id seen in a log does not let another stream lower or
    /// hide the instance's counts, held or folded.
    #[tokio::test(start_paused = true)]
    async fn a_known_id_with_another_secret_is_refused() {
        let store = store();
        let mut cache = SeriesCache::default();
        let curl = name("web", 80, "", "curl");
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        store
            .apply_batch(&conn, &batch(1, START_MS, vec![(curl, 100)]), &mut cache)
            .unwrap();
        let refused = Some(ApplyError::SecretMismatch {
            instance: "a".into(),
        });
        let forged = "fedcba9876543210fedcba9876543210";
        assert_eq!(store.hello("node-1", "a", forged).err(), refused);
        // Right secret, wrong node: still refused.
        assert_eq!(
            store.hello("node-2", "a", SECRET).err(),
            Some(ApplyError::NodeMismatch {
                instance: "a".into(),
                node: "node-2".into(),
                known: "node-1".into()
            })
        );
        store
            .apply_batch(&conn, &batch(2, START_MS, vec![(curl, 50)]), &mut cache)
            .unwrap();
        assert_eq!(exported(&store)[1], row("web", "", "curl", 150));
        drop(conn);
        tokio::time::advance(Limits::default().instance_retention).await;
        store.sweep();
        assert_eq!(store.folded_count(), 1);
        assert_eq!(store.hello("node-1", "a", forged).err(), refused);
        assert_eq!(store.folded_count(), 1, "a refused hello changes nothing");
        assert_eq!(exported(&store)[1], row("web", "", "curl", 150));
        // The error names the instance by its first characters only.
        let long_id = "0123456789abcdef-instance";
        let _held = store.hello("node-1", long_id, SECRET).unwrap();
        assert_eq!(
            store
                .hello("node-1", long_id, forged)
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some(
                "hello.instance_secret does not match the secret instance 01234567… first said hello with; a restarted agent must use a new instance_id"
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn folded_instances_are_forgotten_past_their_cap_and_retention() {
        let store = store_with(Limits {
            max_folded_instances: 2,
            ..Limits::default()
        });
        let retention = Limits::default().instance_retention;
        for id in ["a", "b", "c"] {
            drop(connect(
                &store,
                "node-1",
                id,
                START_MS,
                &mut SeriesCache::default(),
            ));
            // Each is replaced by the next; the last leaves after the retention.
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        tokio::time::advance(retention).await;
        store.sweep();
        assert_eq!((store.instance_count(), store.folded_count()), (0, 2));
        assert_eq!(store.metrics.folded_instances_forgotten.get(), 1);
        // "a" was forgotten; "b" is remembered and comes back from the folded.
        assert_eq!(
            store.hello("node-1", "b", SECRET).map(|(_, a)| a).ok(),
            Some(0)
        );
        assert_eq!(store.folded_count(), 1);
        // "c" is forgotten after FOLDED_RETENTION; "b", gone again, was
        // folded again in this sweep and is remembered for as long.
        tokio::time::advance(Limits::default().folded_retention).await;
        store.sweep();
        assert_eq!((store.instance_count(), store.folded_count()), (0, 1));
        tokio::time::advance(Limits::default().folded_retention).await;
        store.sweep();
        assert_eq!(store.folded_count(), 0);
        assert_eq!(store.metrics.folded_instances.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_id_stays_on_its_node() {
        let store = store();
        let (_conn, _) = store.hello("node-1", "a", SECRET).unwrap();
        assert_eq!(
            store.hello("node-2", "a", SECRET).err(),
            Some(ApplyError::NodeMismatch {
                instance: "a".into(),
                node: "node-2".into(),
                known: "node-1".into()
            })
        );
    }
}
