//! Test fixtures of the store's unit tests: a store on a pinned clock, and
//! builders for the views ingest would hand it.

use std::sync::Arc;

use super::{services::service_key, *};

/// Scaler clock at start: second S, 100 ms in.
/// The secret the fixtures' instances say hello with.
pub const SECRET: &str = "0123456789abcdef0123456789abcdef";

pub const S: i64 = 1_700_000_000;
pub const START_MS: i64 = S * 1000 + 100;

pub fn store_with(limits: Limits) -> Arc<Store> {
    Arc::new(Store::new(
        Clock::starting_at(START_MS),
        limits,
        Arc::new(ScalerMetrics::default()),
    ))
}

pub fn store() -> Arc<Store> {
    store_with(Limits::default())
}

pub fn name<'a>(service: &'a str, port: u16, pod: &'a str, comm: &'a str) -> SeriesName<'a> {
    SeriesName {
        namespace: "apps",
        service,
        port,
        pod,
        process_comm: comm,
    }
}

pub fn snapshot<'a>(
    through: u64,
    taken_at_ms: i64,
    totals: Vec<(SeriesName<'a>, u64)>,
    history: Vec<HistoryView<'a>>,
) -> SnapshotView<'a> {
    SnapshotView {
        through_sequence: through,
        taken_at_ms,
        totals,
        history,
    }
}

pub fn history<'a>(
    service: &'a str,
    port: u16,
    first_second: i64,
    per_second: &'a [u64],
) -> HistoryView<'a> {
    HistoryView {
        namespace: "apps",
        service,
        port,
        first_second,
        per_second,
    }
}

pub fn batch<'a>(
    sequence: u64,
    collected_at_ms: i64,
    deltas: Vec<(SeriesName<'a>, u64)>,
) -> BatchView<'a> {
    BatchView {
        sequence,
        collected_at_ms,
        deltas,
    }
}

/// The non-empty seconds of a destination's window, oldest first.
pub fn seconds(store: &Store, service: &str, port: u16) -> Vec<(i64, u64)> {
    let Some(entry) = store
        .services
        .get(service_key("apps", service).as_str())
        .map(|e| Arc::clone(&e))
    else {
        return vec![];
    };
    let mut v = entry.seconds_since(Some(port), i64::MIN);
    v.reverse();
    v
}

/// Exported value of every series, by (service, pod, comm).
pub fn exported(store: &Store) -> Vec<(String, String, String, u64)> {
    store
        .attempt_series()
        .iter()
        .map(|s| {
            let l = s.labels();
            (
                l.destination_service.to_string(),
                l.destination_pod.to_string(),
                l.process_comm.to_string(),
                s.exported(),
            )
        })
        .collect()
}

pub fn row(service: &str, pod: &str, comm: &str, value: u64) -> (String, String, String, u64) {
    (service.into(), pod.into(), comm.into(), value)
}

/// Connects an instance and applies an empty snapshot taken at `agent_ms`.
pub fn connect(
    store: &Arc<Store>,
    node: &str,
    id: &str,
    agent_ms: i64,
    cache: &mut SeriesCache,
) -> Connection {
    let (conn, applied) = store.hello(node, id, SECRET).unwrap();
    store
        .apply_snapshot(&conn, &snapshot(applied, agent_ms, vec![], vec![]), cache)
        .unwrap();
    conn
}
