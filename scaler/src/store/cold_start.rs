//! What the cold start histograms ([`crate::coldstart`]) need from the
//! store: the clock offset of the instance that sent a wake batch, and which
//! of the batch's Services a StreamIsActive task waits on.

use std::time::Duration;

use super::{BatchView, Connection, Store};
use crate::coldstart::WakeReceipt;

impl Store {
    /// A wake batch, received at `receipt`, is about to be applied: called
    /// before [`Store::apply_batch`], whose doorbell wakes the streams that
    /// look for what is noted here. A resend (or a batch out of sequence,
    /// which apply refuses) notes nothing.
    pub fn note_wake_batch(&self, conn: &Connection, receipt: WakeReceipt, batch: &BatchView<'_>) {
        let offset_ms = {
            let state = conn.state.lock();
            if batch.sequence != state.applied_sequence.saturating_add(1) {
                return;
            }
            // Set by the snapshot every stream starts with; batches come after.
            state.offset_ms.unwrap_or(0)
        };
        let subscribed = batch
            .deltas
            .iter()
            .map(|(name, _)| (name.namespace, name.service))
            .filter(|(namespace, service)| {
                self.known_entry(namespace, service)
                    .is_some_and(|entry| entry.subscribed())
            });
        self.cold_starts
            .wake_batch(receipt, batch.collected_at_ms, offset_ms, subscribed);
    }

    /// `StreamIsActive` `true` was handed to a stream of a trigger on the
    /// Service with `window`, at `at_us` (the timeline's stamp).
    pub fn note_activation(&self, namespace: &str, service: &str, at_us: u64, window: Duration) {
        self.cold_starts
            .activated(namespace, service, at_us, window);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{fixtures::*, *};
    use super::*;

    /// The `_sum` lines, sorted (a family encodes in hash order).
    fn exposition(store: &Store) -> Vec<String> {
        let mut text = String::new();
        store.metrics.encode(&mut text).unwrap();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("itw_scaler_cold_start_seconds_sum"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_batch_counts_for_subscribed_services_with_its_instances_offset() {
        let store = store();
        let mut cache = SeriesCache::default();
        // The agent's clock is 2 s behind ours.
        let conn = connect(&store, "node-1", "a", START_MS - 2000, &mut cache);
        let _web = store.subscribe("apps", "web");
        // Collected 5 ms before it was received, by the agent's clock.
        let b = batch(
            1,
            START_MS - 2005,
            vec![
                (name("web", 80, "", "curl"), 1),
                (name("db", 5432, "", "psql"), 1),
            ],
        );
        let receipt = WakeReceipt {
            at_us: 1_000,
            at_ms: START_MS,
        };
        store.note_wake_batch(&conn, receipt, &b);
        store.apply_batch(&conn, &b, &mut cache).unwrap();
        // Its resend notes nothing (else a later activation would take it).
        let resent = WakeReceipt {
            at_us: 1_200,
            at_ms: START_MS + 1,
        };
        store.note_wake_batch(&conn, resent, &b);
        let window = Duration::from_secs(60);
        store.note_activation("apps", "web", 1_500, window);
        // db has no subscriber: its attempts were not noted.
        store.note_activation("apps", "db", 1_500, window);
        assert_eq!(
            exposition(&store),
            vec![
                "itw_scaler_cold_start_seconds_sum{destination_namespace=\"apps\",destination_service=\"web\",phase=\"first_connect_to_received\"} 0.005",
                "itw_scaler_cold_start_seconds_sum{destination_namespace=\"apps\",destination_service=\"web\",phase=\"received_to_stream\"} 0.0005",
            ]
        );
    }
}
