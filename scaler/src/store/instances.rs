//! The agent instance table: which instances the store holds, on which
//! node, how many streams each has open, and when a departed one is folded
//! into the retired sums (replaced by a newer instance of its node, or gone
//! longer than INSTANCE_RETENTION).
//!
//! The table's lock is taken on hello, disconnect and sweep only, never per
//! batch: a stream holds its instance's state through its [`Connection`].
//! Folding never loses nor repeats a count (see [`super::series`]).

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{ApplyError, SeriesSlot, Store, gauge_value};

/// An agent instance: what it reported, and where its stream stands.
#[derive(Debug)]
pub(super) struct Instance {
    pub(super) applied_sequence: u64,
    /// Scaler clock minus agent clock, measured at the last snapshot.
    pub(super) offset_ms: Option<i64>,
    /// Newest agent-clock second of which counts were applied.
    pub(super) last_second: Option<i64>,
    /// Counts applied within `last_second`, per destination.
    pub(super) applied_in_last_second: HashMap<Arc<str>, u64>,
    /// Cumulative attempts per series, keyed by the series' address.
    pub(super) totals: HashMap<usize, (Arc<SeriesSlot>, u64)>,
}

/// The instance table's view of an instance.
pub(super) struct InstanceSlot {
    node: Arc<str>,
    first_seen: Instant,
    streams: u32,
    disconnected_at: Option<Instant>,
    state: Arc<Mutex<Instance>>,
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
    pub fn hello(
        self: &Arc<Self>,
        node: &str,
        instance_id: &str,
    ) -> Result<(Connection, u64), ApplyError> {
        let now = Instant::now();
        let mut instances = self.instances.lock();
        let (id, slot) = match instances.entry(Arc::from(instance_id)) {
            std::collections::hash_map::Entry::Occupied(known) => {
                (Arc::clone(known.key()), known.into_mut())
            }
            std::collections::hash_map::Entry::Vacant(new) => {
                let id = Arc::clone(new.key());
                let slot = new.insert(InstanceSlot {
                    node: node.into(),
                    first_seen: now,
                    streams: 0,
                    disconnected_at: None,
                    state: Arc::new(Mutex::new(Instance {
                        applied_sequence: 0,
                        offset_ms: None,
                        last_second: None,
                        applied_in_last_second: HashMap::new(),
                        totals: HashMap::new(),
                    })),
                });
                (id, slot)
            }
        };
        if *slot.node != *node {
            return Err(ApplyError::NodeMismatch {
                instance: instance_id.to_owned(),
                node: node.to_owned(),
                known: slot.node.to_string(),
            });
        }
        slot.streams += 1;
        slot.disconnected_at = None;
        let (state, first_seen) = (Arc::clone(&slot.state), slot.first_seen);
        let applied = state.lock().applied_sequence;
        // An older instance of this node that is gone has been replaced: its
        // counts move to the retired sums now rather than after the retention.
        let superseded: Vec<Arc<str>> = instances
            .iter()
            .filter(|(other, slot)| {
                **other != id
                    && *slot.node == *node
                    && slot.streams == 0
                    && slot.first_seen < first_seen
            })
            .map(|(other, _)| Arc::clone(other))
            .collect();
        for other in superseded {
            if let Some(slot) = instances.remove(&other) {
                tracing::info!(node, instance = %other, by = %id, "agent instance replaced; its counts stay in the totals");
                self.fold(&slot);
            }
        }
        self.metrics
            .agent_instances
            .set(gauge_value(instances.len()));
        drop(instances);
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
        let mut instances = self.instances.lock();
        let Some(slot) = instances.get_mut(id) else {
            return;
        };
        slot.streams = slot.streams.saturating_sub(1);
        if slot.streams > 0 {
            return;
        }
        slot.disconnected_at = Some(now);
        let (node, first_seen) = (Arc::clone(&slot.node), slot.first_seen);
        let superseded = instances.iter().any(|(other, o)| {
            **other != *id && o.node == node && o.streams > 0 && o.first_seen > first_seen
        });
        if superseded && let Some(slot) = instances.remove(id) {
            tracing::info!(node = %node, instance = id, "superseded agent instance disconnected; its counts stay in the totals");
            self.fold(&slot);
        }
        self.metrics
            .agent_instances
            .set(gauge_value(instances.len()));
    }

    /// Moves an instance's totals into the retired sums.
    fn fold(&self, slot: &InstanceSlot) {
        let state = slot.state.lock();
        for (series, total) in state.totals.values() {
            series.retire(*total);
        }
    }

    /// Folds instances gone longer than INSTANCE_RETENTION.
    pub(super) fn sweep_instances(&self) {
        let now = Instant::now();
        let mut instances = self.instances.lock();
        let retention = self.limits.instance_retention;
        let expired: Vec<Arc<str>> = instances
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
            if let Some(slot) = instances.remove(&id) {
                tracing::info!(node = %slot.node, instance = %id, "agent instance gone longer than INSTANCE_RETENTION; its counts stay in the totals");
                self.fold(&slot);
            }
        }
        self.metrics
            .agent_instances
            .set(gauge_value(instances.len()));
    }

    /// Agent instances held (for tests and diagnostics).
    pub fn instance_count(&self) -> usize {
        self.instances.lock().len()
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
        let (new, applied) = store.hello("node-1", "new").unwrap();
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
        let (new, applied) = store.hello("node-1", "new").unwrap();
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

    #[tokio::test(start_paused = true)]
    async fn an_instance_id_stays_on_its_node() {
        let store = store();
        let (_conn, _) = store.hello("node-1", "a").unwrap();
        assert_eq!(
            store.hello("node-2", "a").err(),
            Some(ApplyError::NodeMismatch {
                instance: "a".into(),
                node: "node-2".into(),
                known: "node-1".into()
            })
        );
    }
}
