//! What the cold start histograms ([`crate::coldstart`]) need from the
//! store: the clock offset of the instance that sent a wake batch, and which
//! of the batch's Services a StreamIsActive task waits on.

use std::time::Duration;

use super::{BatchView, Connection, Store};
use crate::coldstart::WakeReceipt;

impl Store {
    /// A wake batch, received at `receipt`, was applied.
    pub fn note_wake_batch(&self, conn: &Connection, receipt: WakeReceipt, batch: &BatchView<'_>) {
        // Set by the snapshot every stream starts with; batches come after.
        let offset_ms = conn.state.lock().offset_ms.unwrap_or(0);
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

    fn exposition(store: &Store) -> Vec<String> {
        let mut text = String::new();
        store.metrics.encode(&mut text).unwrap();
        text.lines()
            .filter(|l| l.starts_with("itw_scaler_cold_start_seconds_sum"))
            .map(str::to_owned)
            .collect()
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
        store.apply_batch(&conn, &b, &mut cache).unwrap();
        let receipt = WakeReceipt {
            at_us: 1_000,
            at_ms: START_MS,
        };
        store.note_wake_batch(&conn, receipt, &b);
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
