use std::{collections::HashMap, sync::Arc, time::Duration};

use itw_proto::externalscaler::ScaledObjectRef;

use super::*;
use crate::{
    config::Limits,
    graph::EdgeView,
    metrics::ScalerMetrics,
    store::{BatchView, Connection, SeriesCache, SeriesName, SnapshotView},
    window::Clock,
};

/// Second 1_700_000_000 plus 100 ms: attempts never straddle a boundary by accident.
const START_MS: i64 = 1_700_000_000_100;

struct Fixture {
    store: Arc<Store>,
    conn: Connection,
    cache: SeriesCache,
    sequence: u64,
}

impl Fixture {
    fn new() -> Self {
        let store = Arc::new(Store::new(
            Clock::starting_at(START_MS),
            Limits::default(),
            Arc::new(ScalerMetrics::default()),
        ));
        let (conn, _) = store
            .hello("node-1", "instance-1", "secret-of-instance-1")
            .unwrap();
        let mut cache = SeriesCache::default();
        let snapshot = SnapshotView {
            through_sequence: 0,
            taken_at_ms: START_MS,
            totals: vec![],
            history: vec![],
        };
        store.apply_snapshot(&conn, &snapshot, &mut cache).unwrap();
        Self {
            store,
            conn,
            cache,
            sequence: 0,
        }
    }

    /// Edges `from -> to` in namespace apps, seen now.
    fn edges(&self, pairs: &[(&str, &str)]) {
        let now = self.store.clock().now_ms();
        let views: Vec<EdgeView<'_>> = pairs
            .iter()
            .map(|(from, to)| EdgeView {
                from: ("apps", from),
                to: ("apps", to),
                last_seen_ms: now,
                declared: false,
            })
            .collect();
        assert_eq!(self.store.learn_edges(&self.conn, "batch.edges", &views), 0);
    }

    fn attempts(&mut self, service: &str, attempts: u64) {
        self.sequence += 1;
        let batch = BatchView {
            sequence: self.sequence,
            collected_at_ms: self.store.clock().now_ms(),
            deltas: vec![(
                SeriesName {
                    namespace: "apps",
                    service,
                    port: 80,
                    pod: "",
                    process_comm: "curl",
                },
                attempts,
            )],
        };
        self.store
            .apply_batch(&self.conn, &batch, &mut self.cache)
            .unwrap();
    }
}

fn trigger(service: &str, window: &str) -> Trigger {
    let object = ScaledObjectRef {
        name: service.into(),
        namespace: "apps".into(),
        scaler_metadata: [
            ("service", service),
            ("window", window),
            ("prewake", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<HashMap<_, _>>(),
    };
    Trigger::parse(&object, Duration::from_secs(900)).unwrap()
}

type Rx = mpsc::Receiver<Result<IsActiveResponse, Status>>;

fn spawn_chain(store: &Arc<Store>, trigger: Trigger, shutdown: &CancellationToken) -> Rx {
    let (tx, rx) = mpsc::channel(16);
    let store = Arc::clone(store);
    let shutdown = shutdown.clone();
    tokio::spawn(async move { watch_chain(&store, &trigger, &tx, &shutdown).await });
    rx
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn drain(rx: &mut Rx) -> Vec<bool> {
    let mut out = Vec::new();
    while let Ok(message) = rx.try_recv() {
        out.push(
            message
                .map(|r| r.result)
                .unwrap_or_else(|s| panic!("stream error {s}")),
        );
    }
    out
}

#[tokio::test(start_paused = true)]
async fn one_wake_upstream_flips_the_whole_chain_and_its_end_flips_it_back() {
    let mut f = Fixture::new();
    f.edges(&[("a", "b"), ("b", "c")]);
    let shutdown = CancellationToken::new();
    let mut streams: Vec<Rx> = ["a", "b", "c"]
        .iter()
        .map(|s| spawn_chain(&f.store, trigger(s, "5s"), &shutdown))
        .collect();
    settle().await;
    for rx in &mut streams {
        assert_eq!(drain(rx), vec![false], "current state on open");
    }
    f.attempts("a", 1);
    settle().await;
    for rx in &mut streams {
        assert_eq!(drain(rx), vec![true], "one batch for a flips a, b and c");
    }
    for s in ["a", "b", "c"] {
        assert!(
            activity(&f.store, &trigger(s, "5s")).active(),
            "IsActive {s}"
        );
    }
    // Nothing upstream of a: c's own attempts do not wake a or b.
    // a's second ends at +1 s; a 5 s window lets go when +6 s begins.
    tokio::time::advance(Duration::from_millis(5_899)).await;
    settle().await;
    for rx in &mut streams {
        assert_eq!(drain(rx), Vec::<bool>::new());
    }
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    for rx in &mut streams {
        assert_eq!(drain(rx), vec![false]);
    }
    f.attempts("c", 1);
    settle().await;
    assert_eq!(
        drain(&mut streams[0]),
        Vec::<bool>::new(),
        "a is upstream of c, not down"
    );
    assert_eq!(drain(&mut streams[1]), Vec::<bool>::new());
    assert_eq!(drain(&mut streams[2]), vec![true]);
    assert!(!activity(&f.store, &trigger("a", "5s")).active());
}

#[tokio::test(start_paused = true)]
async fn a_stream_follows_edges_learned_after_it_opened() {
    let mut f = Fixture::new();
    let shutdown = CancellationToken::new();
    let mut c = spawn_chain(&f.store, trigger("c", "5s"), &shutdown);
    settle().await;
    assert_eq!(drain(&mut c), vec![false]);
    f.attempts("a", 1);
    settle().await;
    assert_eq!(drain(&mut c), Vec::<bool>::new(), "no edge yet");
    // The edges arrive while a is active: c is active at once.
    f.edges(&[("a", "b"), ("b", "c")]);
    settle().await;
    assert_eq!(drain(&mut c), vec![true]);
}

#[tokio::test(start_paused = true)]
async fn a_cycle_prewakes_each_member_once() {
    let mut f = Fixture::new();
    f.edges(&[("a", "b"), ("b", "a")]);
    let shutdown = CancellationToken::new();
    let mut a = spawn_chain(&f.store, trigger("a", "2s"), &shutdown);
    settle().await;
    assert_eq!(drain(&mut a), vec![false]);
    f.attempts("b", 1);
    f.attempts("b", 1);
    settle().await;
    assert_eq!(drain(&mut a), vec![true]);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_edge_that_ages_out_stops_prewaking() {
    let mut f = Fixture::new();
    f.edges(&[("a", "b")]);
    let shutdown = CancellationToken::new();
    let mut b = spawn_chain(&f.store, trigger("b", "5s"), &shutdown);
    settle().await;
    assert_eq!(drain(&mut b), vec![false]);
    // Past EDGE_MAX_AGE (24 h by default) the sweep drops a -> b.
    tokio::time::advance(Duration::from_secs(24 * 3600 + 1)).await;
    f.store.sweep();
    settle().await;
    assert_eq!(f.store.graph().len(), 0);
    f.attempts("a", 1);
    settle().await;
    assert_eq!(drain(&mut b), Vec::<bool>::new());
    assert!(!activity(&f.store, &trigger("b", "5s")).active());
}
