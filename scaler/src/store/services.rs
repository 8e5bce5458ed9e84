//! The per-second windows of every service (one per port), the
//! subscribers waiting for a service's new attempts, and what KEDA's calls
//! read from them: attempts for the rate, and the activity rule
//! (`ServiceEntry::activity`) that IsActive and StreamIsActive both answer
//! with.
//!
//! Each service has its own entry in a sharded map and its own lock, held
//! only while a window is added to or summed: a batch and a KEDA call meet
//! only when they touch the same service. MAX_DESTINATIONS caps the windows;
//! past it attempts are still counted in the totals, never windowed.
//! MAX_WINDOW_BUCKETS caps the non-empty seconds of all windows together
//! (their memory: 16 bytes each, whatever window a trigger asks for); past
//! it a window that gains a second forgets its own oldest one, so a long
//! history shrinks before any new attempt goes unwindowed.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering::SeqCst},
};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::{Store, gauge_value};
use crate::window::{self, Window};

/// The windows of one service (one per port) and its subscribers' doorbell.
#[derive(Debug)]
pub struct ServiceEntry {
    namespace: Arc<str>,
    service: Arc<str>,
    windows: Mutex<PortWindows>,
    /// Rung after attempts were added, for StreamIsActive tasks.
    changed: watch::Sender<()>,
}

#[derive(Debug, Default)]
struct PortWindows {
    ports: Vec<(u16, Window)>,
    /// Taken out of the service map by a sweep: whoever still holds the
    /// entry must look the service up again.
    removed: bool,
}

impl ServiceEntry {
    fn new(namespace: &str, service: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service: service.into(),
            windows: Mutex::new(PortWindows::default()),
            changed: watch::Sender::new(()),
        }
    }

    /// Whether a StreamIsActive task waits on this service now.
    pub(super) fn subscribed(&self) -> bool {
        self.changed.receiver_count() > 0
    }

    pub(super) fn seconds_since(&self, port: Option<u16>, first: i64) -> Vec<(i64, u64)> {
        let windows = self.windows.lock();
        windows
            .ports
            .iter()
            .filter(|(p, _)| port.is_none_or(|want| want == *p))
            .flat_map(|(_, w)| w.seconds_since(first))
            .collect()
    }

    /// The activity rule, written here only: a service is active while the
    /// attempts in its activity window exceed the trigger's threshold, the
    /// activity window keeping one second more than the rate's (see
    /// [`window::activity_first_second`]), so an attempt made at the end of a
    /// second still activates a 1-second window. IsActive and StreamIsActive
    /// both answer with it, so a poll and a push never disagree.
    fn activity(
        &self,
        now_second: i64,
        port: Option<u16>,
        window_secs: u64,
        threshold: f64,
    ) -> Activity {
        let first = window::activity_first_second(now_second, window_secs);
        let seconds = self.seconds_since(port, first);
        let attempts = seconds
            .iter()
            .fold(0u64, |sum, (_, a)| sum.saturating_add(*a));
        Activity {
            attempts,
            inactive_at_ms: window::inactive_from(seconds, threshold, window_secs)
                .map(|s| s.saturating_mul(1000)),
        }
    }

    fn attempts_since(&self, port: Option<u16>, first: i64) -> u64 {
        let windows = self.windows.lock();
        windows
            .ports
            .iter()
            .filter(|(p, _)| port.is_none_or(|want| want == *p))
            .fold(0u64, |sum, (_, w)| {
                sum.saturating_add(w.attempts_since(first))
            })
    }
}

/// What a StreamIsActive task holds: the service entry (kept while
/// subscribed) and its doorbell.
pub struct Subscription {
    pub entry: Arc<ServiceEntry>,
    pub changes: watch::Receiver<()>,
}

/// Attempts in a trigger's window, and when they stop exceeding its threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    pub attempts: u64,
    /// Unix ms (scaler clock) at which the window stops exceeding the
    /// threshold if nothing new arrives; `None` when it does not exceed it now.
    pub inactive_at_ms: Option<i64>,
}

impl Activity {
    /// A service without attempts: what a service never reported reads as.
    pub const IDLE: Self = Self {
        attempts: 0,
        inactive_at_ms: None,
    };

    pub fn active(&self) -> bool {
        self.inactive_at_ms.is_some()
    }
}

impl Store {
    /// Attempts to the service (one port, or all) in the last `window_secs`:
    /// what its rate is computed from.
    pub fn attempts(
        &self,
        namespace: &str,
        service: &str,
        port: Option<u16>,
        window_secs: u64,
    ) -> u64 {
        let first = window::first_second(self.clock.now_second(), window_secs);
        self.attempts_from(namespace, service, port, first)
    }

    fn attempts_from(&self, namespace: &str, service: &str, port: Option<u16>, first: i64) -> u64 {
        self.known_entry(namespace, service)
            .map_or(0, |entry| entry.attempts_since(port, first))
    }

    /// The activity of a service for one trigger, as IsActive answers it.
    pub fn activity(
        &self,
        namespace: &str,
        service: &str,
        port: Option<u16>,
        window_secs: u64,
        threshold: f64,
    ) -> Activity {
        self.known_entry(namespace, service)
            .map_or(Activity::IDLE, |entry| {
                entry.activity(self.clock.now_second(), port, window_secs, threshold)
            })
    }

    /// The service's entry if it has one; KEDA's unary calls never create one.
    pub(super) fn known_entry(&self, namespace: &str, service: &str) -> Option<Arc<ServiceEntry>> {
        self.services
            .get(service_key(namespace, service).as_str())
            .map(|e| Arc::clone(&e))
    }

    /// Subscribes to a service's new attempts; the entry stays while subscribed.
    pub fn subscribe(&self, namespace: &str, service: &str) -> Subscription {
        let entry = self
            .services
            .entry(service_key(namespace, service).into_boxed_str())
            .or_insert_with(|| Arc::new(ServiceEntry::new(namespace, service)));
        let changes = entry.changed.subscribe();
        Subscription {
            entry: Arc::clone(&entry),
            changes,
        }
    }

    /// The activity of a subscribed service (its [`Subscription::entry`]) for
    /// one trigger, as StreamIsActive pushes it: the same rule as
    /// [`Store::activity`].
    pub fn subscribed_activity(
        &self,
        entry: &ServiceEntry,
        port: Option<u16>,
        window_secs: u64,
        threshold: f64,
    ) -> Activity {
        entry.activity(self.clock.now_second(), port, window_secs, threshold)
    }

    pub(super) fn service_entry(&self, namespace: &str, service: &str) -> Arc<ServiceEntry> {
        let key = service_key(namespace, service);
        if let Some(entry) = self.services.get(key.as_str()) {
            return Arc::clone(&entry);
        }
        self.services
            .entry(key.into_boxed_str())
            .or_insert_with(|| Arc::new(ServiceEntry::new(namespace, service)))
            .clone()
    }

    /// Counts attempts in a destination's window (scaler second `second`).
    pub(super) fn add_to_window(
        &self,
        entry: &mut Arc<ServiceEntry>,
        port: u16,
        second: i64,
        attempts: u64,
        first_kept: i64,
        wake: &mut Wakeups,
    ) {
        if second < first_kept {
            return;
        }
        loop {
            let mut windows = entry.windows.lock();
            if windows.removed {
                drop(windows);
                *entry = self.service_entry(&entry.namespace, &entry.service);
                continue;
            }
            match windows.ports.iter_mut().find(|(p, _)| *p == port) {
                Some((_, window)) => {
                    let forgotten = window.prune(first_kept);
                    if forgotten > 0 {
                        self.window_buckets.fetch_sub(forgotten, SeqCst);
                    }
                    if window.add(second, attempts) && !self.reserve_window_bucket() {
                        // MAX_WINDOW_BUCKETS reached: the window makes room
                        // with its own oldest second, so the newest always
                        // counts and no other destination loses anything.
                        window.forget_oldest();
                        self.metrics.window_buckets_evicted.inc();
                    }
                }
                None => {
                    let reserved = self
                        .windowed_destinations
                        .fetch_update(SeqCst, SeqCst, |n| {
                            (n < self.limits.max_destinations).then_some(n + 1)
                        })
                        .is_ok();
                    if !reserved {
                        self.metrics.window_overflow.inc_by(attempts);
                        return;
                    }
                    self.metrics.windowed_destinations.inc();
                    // A window's first second is always kept (MAX_DESTINATIONS
                    // bounds those), so a new destination is never blind.
                    let mut window = Window::default();
                    window.add(second, attempts);
                    self.window_buckets.fetch_add(1, SeqCst);
                    windows.ports.push((port, window));
                }
            }
            drop(windows);
            wake.note(entry);
            return;
        }
    }

    /// Takes one bucket of MAX_WINDOW_BUCKETS; false when none is left.
    fn reserve_window_bucket(&self) -> bool {
        self.window_buckets
            .fetch_update(SeqCst, SeqCst, |n| {
                (n < self.limits.max_window_buckets).then_some(n + 1)
            })
            .is_ok()
    }

    /// Service entries held (for tests and diagnostics).
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Drops window seconds older than the history and the service entries
    /// left empty (unless subscribed), and updates the window gauges.
    pub(super) fn sweep_services(&self) {
        let first_kept = window::first_second(self.clock.now_second(), self.history_secs());
        let mut active = 0usize;
        let mut empty = Vec::new();
        for item in self.services.iter() {
            let mut windows = item.value().windows.lock();
            let before = windows.ports.len();
            let mut forgotten = 0;
            windows.ports.retain_mut(|(_, w)| {
                forgotten += w.prune(first_kept);
                w.shrink();
                !w.is_empty()
            });
            if forgotten > 0 {
                self.window_buckets.fetch_sub(forgotten, SeqCst);
            }
            let dropped = before - windows.ports.len();
            if dropped > 0 {
                self.windowed_destinations.fetch_sub(dropped, SeqCst);
                self.metrics
                    .windowed_destinations
                    .dec_by(gauge_value(dropped));
            }
            if windows.ports.is_empty() {
                empty.push(item.key().clone());
            } else {
                active += 1;
            }
        }
        for key in empty {
            self.services.remove_if(&key, |_, entry| {
                let mut windows = entry.windows.lock();
                let unused = windows.ports.is_empty() && entry.changed.receiver_count() == 0;
                if unused {
                    windows.removed = true;
                }
                unused
            });
        }
        self.metrics.active_services.set(gauge_value(active));
        self.metrics
            .window_buckets
            .set(gauge_value(self.window_buckets.load(SeqCst)));
    }
}

/// Services whose subscribers must hear about new attempts, rung once per message.
#[derive(Default)]
pub(super) struct Wakeups {
    seen: HashSet<usize>,
    entries: Vec<Arc<ServiceEntry>>,
}

impl Wakeups {
    pub(super) fn note(&mut self, entry: &Arc<ServiceEntry>) {
        if entry.changed.receiver_count() > 0 && self.seen.insert(Arc::as_ptr(entry) as usize) {
            self.entries.push(Arc::clone(entry));
        }
    }

    pub(super) fn ring(self) {
        for entry in self.entries {
            entry.changed.send_replace(());
        }
    }
}

pub(super) fn service_key(namespace: &str, service: &str) -> String {
    // Kubernetes names hold no '/', so the key is unambiguous.
    let mut key = String::with_capacity(namespace.len() + service.len() + 1);
    key.push_str(namespace);
    key.push('/');
    key.push_str(service);
    key
}

pub(super) fn destination_key(namespace: &str, service: &str, port: u16) -> String {
    let mut key = String::new();
    destination_key_into(&mut key, namespace, service, port);
    key
}

/// [`destination_key`] written into a reused buffer.
pub(super) fn destination_key_into(key: &mut String, namespace: &str, service: &str, port: u16) {
    use std::fmt::Write;
    key.clear();
    // Writing to a String cannot fail.
    let _ = write!(key, "{namespace}/{service}:{port}");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{fixtures::*, *};

    #[tokio::test(start_paused = true)]
    async fn past_max_destinations_attempts_are_counted_but_not_windowed() {
        let store = store_with(Limits {
            max_destinations: 2,
            ..Limits::default()
        });
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let deltas = vec![
            (name("web", 80, "", "curl"), 1),
            (name("web", 443, "", "curl"), 2),
            (name("db", 5432, "", "psql"), 3),
            (name("web", 80, "", "wget"), 4),
        ];
        store
            .apply_batch(&conn, &batch(1, START_MS, deltas), &mut cache)
            .unwrap();
        assert_eq!(store.attempts("apps", "web", None, 60), 7);
        assert_eq!(store.attempts("apps", "db", None, 60), 0);
        assert_eq!(store.metrics.window_overflow.get(), 3);
        assert_eq!(exported(&store)[1], row("db", "", "psql", 3));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_windows_expire_and_free_their_slots() {
        let store = store_with(Limits {
            max_destinations: 1,
            ..Limits::default()
        });
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        store
            .apply_batch(
                &conn,
                &batch(1, START_MS, vec![(name("web", 80, "", "curl"), 1)]),
                &mut cache,
            )
            .unwrap();
        store.sweep();
        assert_eq!(store.service_count(), 1);
        assert_eq!(store.metrics.active_services.get(), 1);
        assert_eq!(store.metrics.windowed_destinations.get(), 1);
        // History is 60 s: second S leaves when S+60 begins.
        tokio::time::advance(Duration::from_millis(59_899)).await;
        store.sweep();
        assert_eq!(store.service_count(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        store.sweep();
        assert_eq!(store.service_count(), 0);
        assert_eq!(store.metrics.active_services.get(), 0);
        assert_eq!(store.metrics.windowed_destinations.get(), 0);
        // The slot is free again, and the stream's cached entry is replaced.
        let now = store.clock().now_ms();
        store
            .apply_batch(
                &conn,
                &batch(
                    2,
                    now,
                    vec![
                        (name("web", 80, "", "curl"), 1),
                        (name("db", 80, "", "x"), 1),
                    ],
                ),
                &mut cache,
            )
            .unwrap();
        assert_eq!(store.attempts("apps", "web", None, 1), 1);
        assert_eq!(
            store.attempts("apps", "db", None, 1),
            0,
            "one destination allowed"
        );
        // The series stay: counters are forever.
        assert_eq!(exported(&store)[3], row("web", "", "curl", 2));
    }

    /// #13 item 4: whatever window a trigger asks for, the windows hold at
    /// most MAX_WINDOW_BUCKETS seconds (plus a first one per destination):
    /// a window gaining a second past it forgets its own oldest.
    #[tokio::test(start_paused = true)]
    async fn past_max_window_buckets_a_window_forgets_its_own_oldest_seconds() {
        let store = store_with(Limits {
            max_window_buckets: 5,
            ..Limits::default()
        });
        // A KEDA caller asks for 15 minutes: history for every destination.
        store.note_window(Duration::from_secs(900));
        assert_eq!(store.history_secs(), 900);
        let mut cache = SeriesCache::default();
        let (conn, _) = store.hello("node-1", "a", SECRET).unwrap();
        let ones = [1u64; 10];
        let snap = snapshot(
            0,
            START_MS,
            vec![(name("web", 80, "", "curl"), 10)],
            vec![history("web", 80, S - 9, &ones)],
        );
        store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
        assert_eq!(
            seconds(&store, "web", 80),
            vec![(S - 4, 1), (S - 3, 1), (S - 2, 1), (S - 1, 1), (S, 1)]
        );
        assert_eq!(store.metrics.window_buckets_evicted.get(), 5);
        // A new destination still gets its first second, over the budget.
        store
            .apply_batch(
                &conn,
                &batch(1, START_MS, vec![(name("db", 80, "", "psql"), 2)]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(seconds(&store, "db", 80), vec![(S, 2)]);
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = store.clock().now_ms();
        let deltas = vec![
            (name("web", 80, "", "curl"), 3),
            (name("db", 80, "", "psql"), 4),
        ];
        store
            .apply_batch(&conn, &batch(2, now, deltas), &mut cache)
            .unwrap();
        assert_eq!(seconds(&store, "db", 80), vec![(S + 1, 4)]);
        assert_eq!(
            seconds(&store, "web", 80),
            vec![(S - 3, 1), (S - 2, 1), (S - 1, 1), (S, 1), (S + 1, 3)]
        );
        assert_eq!(store.attempts("apps", "web", None, 900), 7);
        assert_eq!(store.metrics.window_buckets_evicted.get(), 7);
        // The totals lose nothing.
        assert_eq!(exported(&store)[3], row("web", "", "curl", 13));
        store.sweep();
        assert_eq!(store.metrics.window_buckets.get(), 6);
        // Seconds that leave the history free their budget.
        tokio::time::advance(Duration::from_secs(900)).await;
        store.sweep();
        assert_eq!(store.metrics.window_buckets.get(), 0);
        let now = store.clock().now_ms();
        store
            .apply_batch(
                &conn,
                &batch(3, now, vec![(name("web", 80, "", "curl"), 1)]),
                &mut cache,
            )
            .unwrap();
        assert_eq!(store.attempts("apps", "web", None, 1), 1);
        assert_eq!(store.metrics.window_buckets_evicted.get(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn windows_follow_the_longest_trigger_window_up_to_max_window() {
        let store = store_with(Limits {
            max_window: Duration::from_secs(120),
            ..Limits::default()
        });
        assert_eq!(store.history_secs(), 60);
        store.note_window(Duration::from_secs(30));
        assert_eq!(store.history_secs(), 60);
        store.note_window(Duration::from_secs(90));
        assert_eq!(store.history_secs(), 90);
        store.note_window(Duration::from_secs(300));
        assert_eq!(store.history_secs(), 120);
        // Attempts older than the history are not windowed.
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let snap = snapshot(
            0,
            START_MS,
            vec![],
            vec![history("web", 80, S - 120, &[1, 1])],
        );
        store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
        assert_eq!(seconds(&store, "web", 80), vec![(S - 119, 1)]);
    }

    /// IsActive and the push stream read one rule: the same answer for the
    /// same window, the activity window one second longer than the rate's.
    #[tokio::test(start_paused = true)]
    async fn is_active_and_the_push_stream_read_one_activity_rule() {
        let store = store();
        let mut cache = SeriesCache::default();
        let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
        let deltas = vec![
            (name("web", 80, "", "curl"), 2),
            (name("web", 443, "", "curl"), 1),
        ];
        store
            .apply_batch(&conn, &batch(1, START_MS, deltas), &mut cache)
            .unwrap();
        let subscription = store.subscribe("apps", "web");
        let both = |port, threshold| {
            let polled = store.activity("apps", "web", port, 10, threshold);
            let pushed = store.subscribed_activity(&subscription.entry, port, 10, threshold);
            assert_eq!(polled, pushed, "port {port:?}, threshold {threshold}");
            polled
        };
        // Second S exceeds 2 with both ports; it leaves the 10 s activity
        // window when second S+11 begins.
        let active = Activity {
            attempts: 3,
            inactive_at_ms: Some((S + 11) * 1000),
        };
        assert_eq!(both(None, 2.0), active);
        assert_eq!(
            both(Some(80), 2.0),
            Activity {
                attempts: 2,
                inactive_at_ms: None
            },
            "2 does not exceed 2"
        );
        // At the last millisecond of S+10 the rate's window has let second S
        // go; activity still holds it.
        tokio::time::advance(Duration::from_millis(10_899)).await;
        assert_eq!(store.attempts("apps", "web", None, 10), 0);
        assert_eq!(both(None, 2.0), active);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(both(None, 2.0), Activity::IDLE);
        // A service nobody reported is idle, and asking creates no entry.
        assert_eq!(
            store.activity("apps", "nope", None, 10, 0.0),
            Activity::IDLE
        );
        assert_eq!(store.service_count(), 1);
    }
}
