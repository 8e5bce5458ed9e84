//! Pre-wake: a trigger with `prewake: "true"` is active while its own
//! Service is active (the usual rule, port and all) or while any Service
//! that reaches it through the dependency graph is active, judged with the
//! trigger's own window and threshold over all of that Service's ports. So
//! with A -> B -> C learned, the batch that wakes A flips the StreamIsActive
//! streams of A, B and C in one go, instead of C waiting for B's first pod
//! to call it.
//!
//! A pre-wake stream subscribes to its own Service and to every Service
//! upstream of it, and follows the graph: an edge added or aged out makes it
//! subscribe anew and answer again. It sends only transitions, like
//! [`crate::keda::watch_activity`], which a trigger without `prewake` keeps.
//! It never changes the graph or any count.

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    task::Poll,
};

use itw_proto::externalscaler::IsActiveResponse;
use itw_telemetry::timeline::{TARGET as TIMELINE, monotonic_us};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    graph::ServiceName,
    store::{Activity, Store, Subscription},
    trigger::Trigger,
};

/// Active if either is; active until the later of the two ends.
fn either(a: Activity, b: Activity) -> Activity {
    Activity {
        attempts: a.attempts.saturating_add(b.attempts),
        inactive_at_ms: a.inactive_at_ms.max(b.inactive_at_ms),
    }
}

/// What IsActive answers for a pre-wake trigger.
pub fn activity(store: &Store, trigger: &Trigger) -> Activity {
    let own = store.activity(
        &trigger.namespace,
        &trigger.service,
        trigger.port,
        trigger.window_secs(),
        trigger.activation_threshold,
    );
    let target = ServiceName::new(&trigger.namespace, &trigger.service);
    store
        .graph()
        .upstream(&target, store.clock().now_ms())
        .iter()
        .map(|s| {
            store.activity(
                &s.namespace,
                &s.service,
                None,
                trigger.window_secs(),
                trigger.activation_threshold,
            )
        })
        .fold(own, either)
}

/// The subscriptions of one pre-wake stream: its own Service and those
/// upstream of it now.
struct Chain {
    own: Subscription,
    upstream: Vec<(ServiceName, Subscription)>,
}

impl Chain {
    /// Follows the graph: keeps the subscriptions still upstream, adds the
    /// new ones, drops the rest (so a Service no longer upstream is freed).
    fn follow(&mut self, store: &Store, upstream: Vec<ServiceName>) {
        let mut kept = std::mem::take(&mut self.upstream);
        self.upstream = upstream
            .into_iter()
            .map(|name| match kept.iter().position(|(n, _)| *n == name) {
                Some(i) => kept.swap_remove(i),
                None => {
                    let sub = store.subscribe(&name.namespace, &name.service);
                    (name, sub)
                }
            })
            .collect();
    }

    /// Marks every doorbell seen, then reads the activity: attempts landing
    /// after the read ring again.
    fn evaluate(&mut self, store: &Store, trigger: &Trigger) -> Activity {
        self.own.changes.borrow_and_update();
        for (_, sub) in &mut self.upstream {
            sub.changes.borrow_and_update();
        }
        let own = store.subscribed_activity(
            &self.own.entry,
            trigger.port,
            trigger.window_secs(),
            trigger.activation_threshold,
        );
        self.upstream
            .iter()
            .map(|(_, sub)| {
                store.subscribed_activity(
                    &sub.entry,
                    None,
                    trigger.window_secs(),
                    trigger.activation_threshold,
                )
            })
            .fold(own, either)
    }

    /// Resolves when any Service of the chain has new attempts.
    async fn rung(&mut self) {
        let mut waits: Vec<Pin<Box<dyn Future<Output = _> + Send + '_>>> =
            std::iter::once(&mut self.own)
                .chain(self.upstream.iter_mut().map(|(_, s)| s))
                .map(|s| Box::pin(s.changes.changed()) as Pin<Box<dyn Future<Output = _> + Send>>)
                .collect();
        poll_fn(|cx| {
            // A doorbell lives in its entry, which the subscription holds:
            // it cannot close while waited on, so any answer means "rung".
            if waits.iter_mut().any(|w| w.as_mut().poll(cx).is_ready()) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// The StreamIsActive task of a pre-wake trigger: the current state at once,
/// then every transition of the chain's combined activity.
pub async fn watch_chain(
    store: &Store,
    trigger: &Trigger,
    tx: &mpsc::Sender<Result<IsActiveResponse, Status>>,
    shutdown: &CancellationToken,
) {
    let target = ServiceName::new(&trigger.namespace, &trigger.service);
    let mut graph = store.graph().changes();
    let mut chain = Chain {
        own: store.subscribe(&trigger.namespace, &trigger.service),
        upstream: Vec::new(),
    };
    let mut sent = None;
    loop {
        graph.borrow_and_update();
        chain.follow(
            store,
            store.graph().upstream(&target, store.clock().now_ms()),
        );
        let activity = chain.evaluate(store, trigger);
        let active = activity.active();
        if sent != Some(active) {
            if active {
                tracing::trace!(
                    target: TIMELINE,
                    t_us = monotonic_us(),
                    namespace = %trigger.namespace,
                    service = %trigger.service,
                    upstream = chain.upstream.len(),
                    "StreamIsActive true handed to the stream (prewake)"
                );
            }
            if tx
                .send(Ok(IsActiveResponse { result: active }))
                .await
                .is_err()
            {
                return;
            }
            sent = Some(active);
        }
        let deadline = activity
            .inactive_at_ms
            .map(|ms| store.clock().instant_at_ms(ms));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            changed = graph.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            // Active: new attempts only push the deadline out, which the
            // deadline branch finds out itself.
            () = chain.rung(), if !active => {}
            () = sleep_until(deadline), if active => {}
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
