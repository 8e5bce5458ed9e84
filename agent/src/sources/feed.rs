//! The Pod watch's side of the Kubernetes source: its stream (this node's
//! Pods only, by the field selector `spec.nodeName=<NODE_NAME>`, in every
//! namespace whatever WATCH_NAMESPACES says: a caller may live anywhere) and
//! what each event does to the book. Run by the source's loop beside the
//! Service and EndpointSlice watches, so the Services of a pod are read from
//! the resolver's own state, between two of its events.
//!
//! Errors are counted and logged as the other watches' are
//! (`itw_agent_kube_watch_errors_total{kind="Pod"}`), retried with the same
//! backoff; the last good view of the node's pods stays meanwhile.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use futures::{StreamExt, stream::BoxStream};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};

use super::{KubeSources, PodServices, pod_object::PodObject, pods::PodTracker};
use crate::resolve::{
    MapEvent,
    kube::{KindLabels, KubeSourceMetrics, WatchErrorLabels, error_reason},
};

const KIND: &str = "Pod";

/// Pods per list page: a node holds at most a few hundred.
const LIST_PAGE_SIZE: u32 = 100;

/// The Pod watch's state in the source's loop.
pub struct PodFeed {
    tracker: PodTracker,
    book: Arc<KubeSources>,
}

impl PodFeed {
    pub fn new(node: &str, book: Arc<KubeSources>) -> Self {
        Self {
            tracker: PodTracker::new(node),
            book,
        }
    }

    pub fn node(&self) -> &str {
        self.tracker.node()
    }

    /// The watch of this node's Pods.
    pub fn stream(
        &self,
        client: &Client,
    ) -> BoxStream<'static, watcher::Result<watcher::Event<PodObject>>> {
        let api: Api<PodObject> = Api::all(client.clone());
        let config = watcher::Config::default()
            .page_size(LIST_PAGE_SIZE)
            .fields(&format!("spec.nodeName={}", self.tracker.node()));
        watcher(api, config).default_backoff().boxed()
    }

    /// Applies one item of the Pod watch.
    pub fn item(
        &mut self,
        item: watcher::Result<watcher::Event<PodObject>>,
        services: &impl PodServices,
        metrics: &KubeSourceMetrics,
    ) {
        let labels = KindLabels { kind: KIND };
        let event = match item {
            Ok(event) => event,
            Err(error) => {
                let reason = error_reason(&error);
                metrics
                    .watch_errors
                    .get_or_create(&WatchErrorLabels { kind: KIND, reason })
                    .inc();
                if reason == "gone" {
                    tracing::info!(
                        kind = KIND,
                        "watch expired (410 Gone); relisting, the node's pods stay meanwhile"
                    );
                } else {
                    tracing::warn!(kind = KIND, reason, %error, "list/watch failed; retrying with backoff, the node's pods stay meanwhile");
                }
                return;
            }
        };
        let changes = self.tracker.event(event);
        if !changes.malformed.is_empty() {
            metrics
                .skipped
                .get_or_create(&labels)
                .inc_by(changes.malformed.len() as u64);
        }
        if changes.listed {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            metrics.last_sync.get_or_create(&labels).set(now);
            tracing::info!(
                pods = self.tracker.len(),
                node = self.tracker.node(),
                "this node's pods listed"
            );
        }
        metrics
            .objects
            .get_or_create(&labels)
            .set(i64::try_from(self.tracker.len()).unwrap_or(i64::MAX));
        self.book.pods_changed(&self.tracker, &changes, services);
    }

    /// After the resolver sent `event`.
    pub fn map_changed(&self, event: &MapEvent, services: &impl PodServices) {
        self.book.map_changed(event, &self.tracker, services);
    }
}
