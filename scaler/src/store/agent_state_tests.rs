//! Tests of what an agent instance holds, across its tables (totals,
//! Services, the last second's counts, the stream's cache): each answers
//! what the keyed maps it replaced did, and nothing outlives the instance.

use std::{sync::Arc, time::Duration};

use super::{fixtures::*, *};

fn strong_counts(store: &Store) -> Vec<(String, usize)> {
    store
        .attempt_series()
        .into_iter()
        .map(|s| {
            let l = s.labels();
            // Less the clone `attempt_series` handed out.
            let held = Arc::strong_count(&s) - 1;
            (
                format!("{}/{}", l.destination_service, l.process_comm),
                held,
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_last_seconds_counts_of_several_series_make_one_destination() {
    let store = store();
    let mut cache = SeriesCache::default();
    let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
    let (curl, wget, curl_tls) = (
        name("web", 80, "", "curl"),
        name("web", 80, "", "wget"),
        name("web", 443, "", "curl"),
    );
    store
        .apply_batch(
            &conn,
            &batch(1, START_MS, vec![(curl, 2), (wget, 3), (curl_tls, 1)]),
            &mut cache,
        )
        .unwrap();
    drop(conn);
    // Resumed within second S: web:80 had 5 applied there (two series),
    // web:443 had 1.
    let (conn, applied) = store.hello("node-1", "a", SECRET).unwrap();
    assert_eq!(applied, 1);
    let resend = |count_80: &'static [u64]| {
        snapshot(
            1,
            START_MS,
            vec![(curl, 2), (curl_tls, 1), (wget, 3)],
            vec![
                history("web", 80, S, count_80),
                history("web", 443, S, &[1]),
            ],
        )
    };
    store
        .apply_snapshot(&conn, &resend(&[7]), &mut cache)
        .unwrap();
    assert_eq!(seconds(&store, "web", 80), vec![(S, 7)]);
    assert_eq!(seconds(&store, "web", 443), vec![(S, 1)]);
    // The same second again: nothing more; a larger count: the difference.
    store
        .apply_snapshot(&conn, &resend(&[7]), &mut cache)
        .unwrap();
    assert_eq!(seconds(&store, "web", 80), vec![(S, 7)]);
    store
        .apply_snapshot(&conn, &resend(&[9]), &mut cache)
        .unwrap();
    assert_eq!(seconds(&store, "web", 80), vec![(S, 9)]);
    // A batch in S adds on top, and a snapshot that saw it adds nothing.
    store
        .apply_batch(&conn, &batch(2, START_MS, vec![(wget, 1)]), &mut cache)
        .unwrap();
    assert_eq!(seconds(&store, "web", 80), vec![(S, 10)]);
    let snap = snapshot(
        2,
        START_MS,
        vec![(curl, 2), (curl_tls, 1), (wget, 4)],
        vec![history("web", 80, S, &[10]), history("web", 443, S, &[1])],
    );
    store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
    assert_eq!(seconds(&store, "web", 80), vec![(S, 10)]);
    assert_eq!(seconds(&store, "web", 443), vec![(S, 1)]);
    // curl on both ports is one series.
    assert_eq!(
        exported(&store),
        vec![
            row("web", "", "", 0),
            row("web", "", "curl", 3),
            row("web", "", "wget", 4),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_instance_holds_no_series() {
    let store = store();
    let mut cache = SeriesCache::default();
    let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
    let deltas = vec![
        (name("web", 80, "", "curl"), 2),
        (name("db", 5432, "", "psql"), 3),
    ];
    store
        .apply_batch(&conn, &batch(1, START_MS, deltas), &mut cache)
        .unwrap();
    // Held by the store's map, the instance's totals and last second (and
    // Services, for a zero series) and the stream's cache.
    assert_eq!(
        strong_counts(&store),
        vec![
            ("db/".into(), 2),
            ("db/psql".into(), 4),
            ("web/".into(), 2),
            ("web/curl".into(), 4),
        ]
    );
    drop((conn, cache));
    tokio::time::advance(Limits::default().instance_retention).await;
    store.sweep();
    assert_eq!(store.folded_count(), 1);
    // Folded: kept whole in case it comes back, the cache gone.
    assert_eq!(
        strong_counts(&store),
        vec![
            ("db/".into(), 2),
            ("db/psql".into(), 3),
            ("web/".into(), 2),
            ("web/curl".into(), 3),
        ]
    );
    tokio::time::advance(Limits::default().folded_retention).await;
    store.sweep();
    assert_eq!(store.folded_count(), 0);
    assert!(
        strong_counts(&store).iter().all(|(_, held)| *held == 1),
        "{:?}",
        strong_counts(&store)
    );
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_naming_fewer_services_lets_the_others_go() {
    let store = store();
    let mut cache = SeriesCache::default();
    let conn = connect(&store, "node-1", "a", START_MS, &mut cache);
    let (curl, psql) = (name("web", 80, "", "curl"), name("db", 5432, "", "psql"));
    store
        .apply_batch(
            &conn,
            &batch(1, START_MS - 1000, vec![(curl, 1), (psql, 1)]),
            &mut cache,
        )
        .unwrap();
    assert_eq!(conn.state.lock().services.len(), 2);
    // A second later db is gone from the node: its snapshot names web only.
    tokio::time::advance(Duration::from_secs(1)).await;
    let snap = snapshot(
        1,
        START_MS + 1000,
        vec![(curl, 1)],
        vec![history("web", 80, S, &[1])],
    );
    store.apply_snapshot(&conn, &snap, &mut cache).unwrap();
    assert_eq!(conn.state.lock().services.len(), 1);
    // db's series are the store's alone; web's zero series also names the
    // Service for the instance and holds second S's count of web:80.
    assert_eq!(
        strong_counts(&store),
        vec![
            ("db/".into(), 1),
            ("db/psql".into(), 1),
            ("web/".into(), 3),
            ("web/curl".into(), 3),
        ]
    );
    // Its count stays exported (counters never decrease).
    assert_eq!(exported(&store)[1], row("db", "", "psql", 1));
}
