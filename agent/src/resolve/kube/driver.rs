//! Runs the watches and feeds the [`Resolver`]: one kube-runtime watcher per
//! kind (per kind and namespace with WATCH_NAMESPACES), each with the
//! default backoff, merged into one loop that owns the resolver, so events
//! are applied one at a time in the order they came.
//!
//! Errors (a refused list, a 410 Gone, a dropped or timed-out watch, an
//! apiserver restart) are logged and counted; the watcher retries after its
//! backoff, and nothing is sent downstream until a list or watch succeeds, so
//! the last good map keeps being served.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use futures::{StreamExt, stream::BoxStream};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::mpsc;

use super::{
    KubeSettings,
    extract::Kind,
    metrics::{KubeSourceMetrics, WatchErrorLabels},
    objects::{EndpointSliceObject, ServiceObject},
    resolver::{Outcome, Resolver, StreamSpec},
};
use crate::{
    resolve::MapEvent,
    sources::{PodFeed, pod_object::PodObject},
};

/// Objects per list page. Smaller than client-go's 500 on purpose: a page
/// is decoded whole before its objects are applied, and with 10k slices a
/// page of 500 left ~5 MiB more resident in the agent than pages of 100
/// (hack/bench resolver). The apiserver serves the same objects either way,
/// in more, smaller requests, only at start and after a 410 Gone.
const LIST_PAGE_SIZE: u32 = 100;

enum Item {
    Service(watcher::Result<watcher::Event<ServiceObject>>),
    Slice(watcher::Result<watcher::Event<EndpointSliceObject>>),
    Pod(watcher::Result<watcher::Event<PodObject>>),
}

/// The Pod watch's stream index: not one of the resolver's.
const POD_STREAM: usize = usize::MAX;

/// Watches the cluster and sends the map to `events` until `events` closes
/// (the agent is shutting down). With `pods`, this node's Pods are watched
/// too, for source attribution. Never gives up on the apiserver: every
/// error is retried with kube-runtime's default backoff (0.8 s doubling to
/// 30 s, jittered).
pub async fn run(
    client: Client,
    settings: KubeSettings,
    events: mpsc::Sender<MapEvent>,
    metrics: Arc<KubeSourceMetrics>,
    mut pods: Option<PodFeed>,
) {
    let specs = settings.streams();
    let mut streams = futures::stream::SelectAll::new();
    for (index, spec) in specs.iter().enumerate() {
        streams.push(watch(&client, &settings, spec, index));
    }
    if let Some(feed) = &pods {
        tracing::info!(node = feed.node(), "watching this node's Pods");
        streams.push(
            feed.stream(&client)
                .map(|item| (POD_STREAM, Item::Pod(item)))
                .boxed(),
        );
    }
    tracing::info!(
        namespaces = %settings.namespaces_label(),
        service_selector = settings.selector_label(),
        "watching Services and EndpointSlices"
    );
    let mut resolver = Resolver::new(specs);
    loop {
        let (stream, item) = tokio::select! {
            () = events.closed() => return,
            next = streams.next() => match next {
                Some(next) => next,
                // Watchers never end; SelectAll only ends once all have.
                None => return,
            },
        };
        if let Item::Pod(item) = item {
            if let Some(feed) = &mut pods {
                feed.item(item, &resolver, &metrics);
            }
            continue;
        }
        let spec = resolver.streams().nth(stream).cloned();
        let Some(spec) = spec else { continue };
        let outcome = match item {
            Item::Service(Ok(event)) => resolver.service_event(stream, event),
            Item::Slice(Ok(event)) => resolver.slice_event(stream, event),
            Item::Service(Err(error)) | Item::Slice(Err(error)) => {
                watch_failed(&spec, &error, &metrics);
                continue;
            }
            Item::Pod(_) => continue,
        };
        record(&resolver, &spec, &outcome, &metrics);
        if let (Some(feed), Some(event)) = (&pods, &outcome.event) {
            feed.map_changed(event, &resolver);
        }
        if let Some(event) = outcome.event {
            if let MapEvent::Reset(map) = &event {
                tracing::info!(
                    services = map.services.len(),
                    destinations = map.destinations.len(),
                    "service map complete"
                );
            }
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

fn watch(
    client: &Client,
    settings: &KubeSettings,
    spec: &StreamSpec,
    index: usize,
) -> BoxStream<'static, (usize, Item)> {
    let config = watcher::Config::default().page_size(LIST_PAGE_SIZE);
    match spec.kind {
        Kind::Service => {
            let api: Api<ServiceObject> = match &spec.namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let config = match settings.selector() {
                Some(selector) => config.labels_from(selector),
                None => config,
            };
            watcher(api, config)
                .default_backoff()
                .map(move |item| (index, Item::Service(item)))
                .boxed()
        }
        Kind::EndpointSlice => {
            // Unfiltered: slices carry only the Service's name, not its
            // labels; the resolver maps those whose Service is selected.
            let api: Api<EndpointSliceObject> = match &spec.namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            watcher(api, config)
                .default_backoff()
                .map(move |item| (index, Item::Slice(item)))
                .boxed()
        }
    }
}

/// The metric label for a watcher error.
pub fn error_reason(error: &watcher::Error) -> &'static str {
    match error {
        watcher::Error::InitialListFailed(_) => "list_failed",
        watcher::Error::WatchStartFailed(_) => "watch_start_failed",
        watcher::Error::WatchError(status) if status.code == 410 => "gone",
        watcher::Error::WatchError(_) => "watch_error",
        watcher::Error::WatchFailed(_) => "watch_failed",
        watcher::Error::NoResourceVersion => "no_resource_version",
    }
}

fn watch_failed(spec: &StreamSpec, error: &watcher::Error, metrics: &KubeSourceMetrics) {
    let reason = error_reason(error);
    metrics
        .watch_errors
        .get_or_create(&WatchErrorLabels {
            kind: spec.kind.as_str(),
            reason,
        })
        .inc();
    let namespace = spec.namespace.as_deref().unwrap_or("*");
    if reason == "gone" {
        // Routine: the apiserver compacted past our resourceVersion.
        tracing::info!(kind = %spec.kind, namespace, "watch expired (410 Gone); relisting, the current map stays meanwhile");
    } else {
        tracing::warn!(kind = %spec.kind, namespace, reason, %error, "list/watch failed; retrying with backoff, the current map stays meanwhile");
    }
}

fn record(resolver: &Resolver, spec: &StreamSpec, outcome: &Outcome, metrics: &KubeSourceMetrics) {
    let labels = KubeSourceMetrics::kind(spec.kind);
    if !outcome.malformed.is_empty() {
        metrics
            .skipped
            .get_or_create(&labels)
            .inc_by(outcome.malformed.len() as u64);
    }
    if outcome.listed && resolver.kind_synced(spec.kind) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics.last_sync.get_or_create(&labels).set(now);
    }
    metrics
        .objects
        .get_or_create(&labels)
        .set(i64::try_from(resolver.objects(spec.kind)).unwrap_or(i64::MAX));
    metrics
        .destinations
        .set(i64::try_from(resolver.destinations()).unwrap_or(i64::MAX));
}
