//! The agents' Report stream against the real server on loopback: exactness
//! across resends, reconnects, new instances and fresh replicas; rejection of
//! bad messages, and refusal of bad names without ending the stream; the
//! bearer token.

mod common;

use std::time::Duration;

use common::{TestScaler, attempts, count, history, loopback, now_ms, object, row, sample, series};
use itw_proto::{
    externalscaler::GetMetricsRequest,
    itw::v1::{Batch, Hello, ReportRequest, SeriesCount, Snapshot, report_request},
};
use itw_scaler::config::{Config, Limits, Secret, TokenSource};
use tonic::Code;

/// Attempts per second over `window` for the trigger's metadata.
async fn rate(scaler: &TestScaler, pairs: &[(&str, &str)]) -> f64 {
    let mut keda = scaler.keda().await;
    let response = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(pairs)),
            metric_name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    response.metric_values[0].metric_value_float
}

const WEB_10S: [(&str, &str); 2] = [("service", "web"), ("window", "10s")];

#[tokio::test]
async fn resent_batches_are_applied_once() {
    let scaler = TestScaler::start(loopback()).await;
    let curl = || series("web", 80, "", "curl");
    let mut agent = scaler.agent(None).await.unwrap();
    assert_eq!(agent.hello("node-1", "a").await.applied_sequence, 0);
    assert_eq!(agent.snapshot(0, vec![], vec![]).await, 0);
    assert_eq!(agent.batch(1, vec![count(curl(), 5)]).await, 1);
    assert_eq!(
        agent.batch(1, vec![count(curl(), 5)]).await,
        1,
        "a resend is acked again"
    );
    assert_eq!(agent.batch(2, vec![count(curl(), 3)]).await, 2);
    assert_eq!(rate(&scaler, &WEB_10S).await, 0.8);
    drop(agent);

    // The agent reconnects without knowing what arrived: the replica says 2,
    // the agent snapshots through 2 and resends from 3 on, with 2 again.
    let mut agent = scaler.agent(None).await.unwrap();
    let welcome = agent.hello("node-1", "a").await;
    assert_eq!(welcome.applied_sequence, 2);
    let second = now_ms() / 1000;
    assert_eq!(
        agent
            .snapshot(
                2,
                vec![count(curl(), 8)],
                vec![history("web", 80, second - 1, vec![0, 8])]
            )
            .await,
        2
    );
    assert_eq!(agent.batch(2, vec![count(curl(), 3)]).await, 2);
    assert_eq!(agent.batch(3, vec![count(curl(), 2)]).await, 3);
    assert_eq!(rate(&scaler, &WEB_10S).await, 1.0);
    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 10.0)]
    );
    assert_eq!(
        sample(&body, "itw_scaler_batches_total", &[("result", "applied")]),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &body,
            "itw_scaler_batches_total",
            &[("result", "duplicate")]
        ),
        Some(2.0)
    );
    scaler.stop().await;
}

#[tokio::test]
async fn a_new_instance_on_the_same_node_adds_and_never_doubles() {
    let scaler = TestScaler::start(loopback()).await;
    let curl = || series("web", 80, "", "curl");
    let mut old = scaler.agent(None).await.unwrap();
    old.hello("node-1", "old").await;
    old.snapshot(0, vec![], vec![]).await;
    old.batch(1, vec![count(curl(), 4)]).await;
    old.batch(2, vec![count(curl(), 3)]).await;
    drop(old);

    // The agent restarted: a new instance counting from zero.
    let mut new = scaler.agent(None).await.unwrap();
    assert_eq!(new.hello("node-1", "new").await.applied_sequence, 0);
    new.snapshot(0, vec![], vec![]).await;
    new.batch(1, vec![count(curl(), 2)]).await;
    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 9.0)]
    );
    assert_eq!(rate(&scaler, &WEB_10S).await, 0.9);
    // The old instance was replaced, so it is gone from the table.
    assert_eq!(sample(&body, "itw_scaler_agent_instances", &[]), Some(1.0));
    assert_eq!(sample(&body, "itw_scaler_agents_connected", &[]), Some(1.0));
    scaler.stop().await;
}

/// #13 item 1: an instance folded (here replaced by a newer instance of its
/// node; INSTANCE_RETENTION folds the same way) reconnects with its
/// cumulative snapshot: counted once.
#[tokio::test]
async fn a_folded_instance_that_reconnects_is_not_counted_twice() {
    let scaler = TestScaler::start(loopback()).await;
    let curl = || series("web", 80, "", "curl");
    let mut old = scaler.agent(None).await.unwrap();
    old.hello("node-1", "old").await;
    old.snapshot(0, vec![], vec![]).await;
    old.batch(1, vec![count(curl(), 150)]).await;
    drop(old);
    let mut new = scaler.agent(None).await.unwrap();
    new.hello("node-1", "new").await;
    new.snapshot(0, vec![], vec![]).await;
    let body = scaler.metrics_body().await;
    assert_eq!(sample(&body, "itw_scaler_folded_instances", &[]), Some(1.0));

    let mut old = scaler.agent(None).await.unwrap();
    assert_eq!(old.hello("node-1", "old").await.applied_sequence, 1);
    old.snapshot(1, vec![count(curl(), 150)], vec![]).await;
    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 150.0)]
    );
    assert_eq!(sample(&body, "itw_scaler_folded_instances", &[]), Some(0.0));
    scaler.stop().await;
}

/// #13 item 7: a stream that knows an instance id but not its secret can
/// neither lower the instance's totals nor hide its next attempts.
#[tokio::test]
async fn a_stream_without_the_instance_secret_cannot_claim_its_id() {
    let scaler = TestScaler::start(loopback()).await;
    let curl = || series("web", 80, "", "curl");
    let mut agent = scaler.agent(None).await.unwrap();
    agent.hello("node-1", "a").await;
    agent.snapshot(0, vec![], vec![]).await;
    agent.batch(1, vec![count(curl(), 100)]).await;

    let mut forger = scaler.agent(None).await.unwrap();
    forger
        .send(report_request::Message::Hello(Hello {
            node_name: "node-1".into(),
            instance_id: "a".into(),
            protocol_version: itw_proto::itw::v1::PROTOCOL_VERSION,
            instance_secret: "guessed-guessed-guessed".into(),
        }))
        .await;
    let status = forger.expect_error().await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::PermissionDenied,
            "hello.instance_secret does not match the secret instance a first said hello with; a restarted agent must use a new instance_id"
        )
    );
    assert_eq!(agent.batch(2, vec![count(curl(), 50)]).await, 2);
    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 150.0)]
    );
    assert_eq!(
        sample(
            &body,
            "itw_scaler_rejected_streams_total",
            &[("reason", "secret_mismatch")]
        ),
        Some(1.0)
    );
    scaler.stop().await;
}

#[tokio::test]
async fn a_snapshot_replaces_what_the_replica_held_for_the_instance() {
    let scaler = TestScaler::start(loopback()).await;
    let curl = || series("web", 80, "", "curl");
    let mut agent = scaler.agent(None).await.unwrap();
    agent.hello("node-1", "a").await;
    agent.snapshot(0, vec![], vec![]).await;
    agent.batch(1, vec![count(curl(), 4)]).await;
    drop(agent);
    // Batches 2 and 3 (6 attempts) never arrived and cannot be resent: the
    // agent snapshots through 3 with its cumulative totals.
    let mut agent = scaler.agent(None).await.unwrap();
    assert_eq!(agent.hello("node-1", "a").await.applied_sequence, 1);
    let second = now_ms() / 1000;
    agent
        .snapshot(
            3,
            vec![count(curl(), 10), count(series("web", 80, "", "wget"), 1)],
            vec![history("web", 80, second, vec![11])],
        )
        .await;
    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![
            row("", "", 0.0),
            row("", "curl", 10.0),
            row("", "wget", 1.0)
        ]
    );
    assert_eq!(agent.batch(4, vec![count(curl(), 1)]).await, 4);
    assert_eq!(rate(&scaler, &WEB_10S).await, 1.2);
    scaler.stop().await;
}

#[tokio::test]
async fn a_fresh_replica_answers_like_its_peer_after_the_snapshot() {
    let peer = TestScaler::start(loopback()).await;
    let fresh = TestScaler::start(loopback()).await;
    let curl = || series("web", 80, "", "curl");
    let psql = || series("db", 5432, "db-0", "psql");

    // The peer has been receiving batches over the last seconds.
    let mut agent = peer.agent(None).await.unwrap();
    agent.hello("node-1", "a").await;
    agent.snapshot(0, vec![], vec![]).await;
    let now = now_ms();
    let sent = [
        (now - 3000, 3, 1),
        (now - 2000, 1, 0),
        (now - 1000, 0, 4),
        (now, 2, 2),
    ];
    for (i, (at, web, db)) in sent.iter().enumerate() {
        let mut deltas = vec![];
        if *web > 0 {
            deltas.push(count(curl(), *web));
        }
        if *db > 0 {
            deltas.push(count(psql(), *db));
        }
        agent.batch_at(i as u64 + 1, *at, deltas).await;
    }

    // The agent opens its stream to the fresh replica with a snapshot of
    // totals and per-second history through batch 4.
    let first = (now - 3000).div_euclid(1000);
    let mut to_fresh = fresh.agent(None).await.unwrap();
    assert_eq!(to_fresh.hello("node-1", "a").await.applied_sequence, 0);
    to_fresh
        .snapshot(
            4,
            vec![count(curl(), 6), count(psql(), 7)],
            vec![
                history("web", 80, first, vec![3, 1, 0, 2]),
                history("db", 5432, first, vec![1, 0, 4, 2]),
            ],
        )
        .await;
    for pairs in [
        &[("service", "web"), ("window", "10s")][..],
        &[("service", "web"), ("window", "10s"), ("port", "80")],
        &[("service", "db"), ("window", "30s")],
    ] {
        assert_eq!(
            rate(&fresh, pairs).await,
            rate(&peer, pairs).await,
            "{pairs:?}"
        );
    }
    assert_eq!(rate(&fresh, &WEB_10S).await, 0.6);
    assert_eq!(
        rate(&fresh, &[("service", "db"), ("window", "10s")]).await,
        0.7
    );
    let (peer_body, fresh_body) = (peer.metrics_body().await, fresh.metrics_body().await);
    for service in ["web", "db"] {
        assert_eq!(
            attempts(&fresh_body, service),
            attempts(&peer_body, service)
        );
    }
    assert_eq!(
        attempts(&fresh_body, "db"),
        vec![row("", "", 0.0), row("db-0", "psql", 7.0)]
    );

    // Both go on alike.
    agent.batch(5, vec![count(curl(), 4)]).await;
    to_fresh.batch(5, vec![count(curl(), 4)]).await;
    assert_eq!(rate(&fresh, &WEB_10S).await, rate(&peer, &WEB_10S).await);
    assert_eq!(rate(&fresh, &WEB_10S).await, 1.0);
    peer.stop().await;
    fresh.stop().await;
}

fn tight() -> Config {
    Config {
        limits: Limits {
            max_batch_deltas: 3,
            max_window: Duration::from_secs(5),
            ..Limits::default()
        },
        ..loopback()
    }
}

#[tokio::test]
async fn a_bad_message_ends_only_its_own_stream_with_a_clear_status() {
    let scaler = TestScaler::start(tight()).await;
    let mut good = scaler.agent(None).await.unwrap();
    good.hello("node-good", "good").await;
    good.snapshot(0, vec![], vec![]).await;
    let hello = |version| {
        report_request::Message::Hello(Hello {
            node_name: "node-bad".into(),
            instance_id: format!("bad-{version}"),
            protocol_version: version,
            instance_secret: "a-secret-of-sixteen-bytes".into(),
        })
    };
    let snapshot = || {
        report_request::Message::Snapshot(Snapshot {
            through_sequence: 0,
            taken_at_unix_ms: now_ms(),
            totals: vec![],
            history: vec![],
            edges: Vec::new(),
        })
    };
    let batch = |sequence, deltas: Vec<_>| {
        report_request::Message::Batch(Batch {
            sequence,
            collected_at_unix_ms: now_ms(),
            wake: false,
            deltas,
            edges: Vec::new(),
        })
    };
    let ok = || count(series("web", 80, "", "curl"), 1);
    let cases: Vec<(Vec<report_request::Message>, Code, String)> = vec![
        (
            vec![batch(1, vec![ok()])],
            Code::InvalidArgument,
            "the first message of a report stream must be hello, got batch".into(),
        ),
        (
            vec![hello(7)],
            Code::FailedPrecondition,
            "hello.protocol_version 7 is not supported; this scaler speaks version 1".into(),
        ),
        (
            vec![hello(1), batch(1, vec![ok()])],
            Code::InvalidArgument,
            "batch 1 arrived before the snapshot; send hello, then a snapshot, then batches".into(),
        ),
        (
            vec![hello(1), snapshot(), batch(1, vec![ok(), count(series("web", 0, "", "curl"), 1)])],
            Code::InvalidArgument,
            "batch.deltas[1].series.port = 0: must be a Service port number, 1-65535".into(),
        ),
        (
            vec![hello(1), snapshot(), batch(1, vec![ok(), SeriesCount { series: None, attempts: 1 }])],
            Code::InvalidArgument,
            "batch.deltas[1].series is missing".into(),
        ),
        (
            vec![hello(1), snapshot(), batch(1, vec![ok(), ok(), count(series("web", 80, "", "curl"), 0)])],
            Code::InvalidArgument,
            "batch.deltas[2].attempts = 0: every delta counts at least one attempt".into(),
        ),
        (
            vec![hello(1), snapshot(), batch(1, vec![ok(), ok(), ok(), ok()])],
            Code::ResourceExhausted,
            "batch.deltas has 4 entries; this scaler accepts at most 3 per batch (MAX_BATCH_DELTAS)".into(),
        ),
        (
            vec![hello(1), snapshot(), batch(1, vec![ok()]), batch(3, vec![ok()])],
            Code::FailedPrecondition,
            "sequence gap: batch 3 arrived but this replica has applied through 1; reconnect and send a snapshot".into(),
        ),
        (
            vec![
                hello(1),
                report_request::Message::Snapshot(Snapshot {
                    through_sequence: 0,
                    taken_at_unix_ms: now_ms(),
                    totals: vec![],
                    history: vec![history("web", 80, now_ms() / 1000 - 6, vec![1; 7])],
                    edges: Vec::new(),
                }),
            ],
            Code::ResourceExhausted,
            "snapshot.history[0].per_second has 7 entries; this scaler keeps at most 6 seconds of history (MAX_WINDOW)".into(),
        ),
        (vec![hello(1), hello(1)], Code::InvalidArgument, "hello may only be the first message of a report stream".into()),
    ];
    for (i, (messages, code, message)) in cases.into_iter().enumerate() {
        let mut bad = scaler.agent(None).await.unwrap();
        for m in messages {
            bad.send(m).await;
        }
        let status = bad.expect_error().await;
        assert_eq!(
            (status.code(), status.message()),
            (code, message.as_str()),
            "case {i}"
        );
        // Everyone else keeps being served.
        assert_eq!(good.batch(i as u64 + 1, vec![ok()]).await, i as u64 + 1);
    }

    // A request without a message, and one past the size limit.
    let mut bad = scaler.agent(None).await.unwrap();
    bad.send(hello(1)).await;
    bad.next().await.unwrap();
    bad.tx_raw(ReportRequest { message: None }).await;
    let status = bad.expect_error().await;
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "the report request holds no message")
    );

    let mut bad = scaler.agent(None).await.unwrap();
    bad.send(hello(1)).await;
    bad.next().await.unwrap();
    // A process name of 17 MiB: over the 16 MiB MAX_REPORT_BYTES default.
    bad.send(batch(
        1,
        vec![count(series("web", 80, "", &"x".repeat(17 << 20)), 1)],
    ))
    .await;
    let status = bad.expect_error().await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .starts_with("report message too large (MAX_REPORT_BYTES): ")
            && status.message().ends_with("the limit is: 16777216 bytes"),
        "{}",
        status.message()
    );
    assert_eq!(good.batch(11, vec![ok()]).await, 11);

    let body = scaler.metrics_body().await;
    for (reason, n) in [
        ("protocol", 4.0),
        ("protocol_version", 1.0),
        ("invalid_message", 3.0),
        ("oversized", 3.0),
        ("sequence_gap", 1.0),
    ] {
        assert_eq!(
            sample(
                &body,
                "itw_scaler_rejected_streams_total",
                &[("reason", reason)]
            ),
            Some(n),
            "{reason}"
        );
    }
    assert_eq!(
        sample(&body, "itw_scaler_batches_total", &[("result", "rejected")]),
        Some(6.0)
    );
    assert_eq!(
        sample(&body, "itw_scaler_batches_total", &[("result", "applied")]),
        Some(12.0)
    );
    scaler.stop().await;
}

/// A name Kubernetes would not allow (a Service starting with a digit, as an
/// older agent's static map let through) is refused alone: the stream stays
/// up, the rest of each message is applied and acknowledged, and a reconnect
/// resends nothing.
#[tokio::test]
async fn a_bad_name_is_refused_alone_and_the_stream_goes_on() {
    let scaler = TestScaler::start(loopback()).await;
    let bad = || series("9web", 80, "", "curl");
    let curl = || series("web", 80, "", "curl");
    let mut agent = scaler.agent(None).await.unwrap();
    assert_eq!(agent.hello("node-1", "a").await.applied_sequence, 0);
    let second = now_ms() / 1000;
    assert_eq!(
        agent
            .snapshot(
                0,
                vec![count(bad(), 4)],
                vec![history("9web", 80, second, vec![4])]
            )
            .await,
        0
    );
    assert_eq!(
        agent
            .batch(1, vec![count(bad(), 5), count(curl(), 3)])
            .await,
        1
    );
    assert_eq!(agent.batch(2, vec![count(curl(), 2)]).await, 2);
    assert_eq!(rate(&scaler, &WEB_10S).await, 0.5);
    assert_eq!(
        rate(
            &scaler,
            &[("service", "web"), ("window", "10s"), ("port", "443")]
        )
        .await,
        0.0
    );

    // The agent reconnects with its cumulative totals, the bad one again:
    // the replica holds through 2, so nothing is resent.
    drop(agent);
    let mut agent = scaler.agent(None).await.unwrap();
    assert_eq!(agent.hello("node-1", "a").await.applied_sequence, 2);
    assert_eq!(
        agent
            .snapshot(2, vec![count(bad(), 9), count(curl(), 5)], vec![])
            .await,
        2
    );
    assert_eq!(agent.batch(3, vec![count(curl(), 1)]).await, 3);

    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 6.0)]
    );
    assert_eq!(attempts(&body, "9web"), vec![]);
    for (name, labels, value) in [
        (
            "itw_scaler_refused_entries_total",
            &[("reason", "invalid_service")][..],
            Some(4.0),
        ),
        (
            "itw_scaler_refused_entries_total",
            &[("reason", "invalid_namespace")],
            None,
        ),
        (
            "itw_scaler_batches_total",
            &[("result", "applied")],
            Some(3.0),
        ),
        ("itw_scaler_batches_total", &[("result", "rejected")], None),
        ("itw_scaler_deltas_total", &[], Some(3.0)),
        ("itw_scaler_snapshots_total", &[], Some(2.0)),
        ("itw_scaler_agents_connected", &[], Some(1.0)),
    ] {
        assert_eq!(sample(&body, name, labels), value, "{name} {labels:?}");
    }
    assert!(
        !body.contains("itw_scaler_rejected_streams_total{"),
        "no stream was ended:\n{body}"
    );
    scaler.stop().await;
}

fn with_token(source: TokenSource) -> Config {
    Config {
        agent_token: source,
        ..loopback()
    }
}

#[tokio::test]
async fn agents_need_the_token_and_keda_does_not() {
    let scaler = TestScaler::start(with_token(TokenSource::Value(Secret("s3cret".into())))).await;
    for (token, message) in [
        (
            None,
            "agent streams need an `authorization: Bearer <token>` header (AGENT_TOKEN on the scaler)",
        ),
        (
            Some("wrong"),
            "the bearer token is not the one this scaler expects",
        ),
    ] {
        let status = scaler.agent(token).await.err().expect("refused");
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unauthenticated, message)
        );
    }
    let mut agent = scaler.agent(Some("s3cret")).await.unwrap();
    agent.hello("node-1", "a").await;
    agent.snapshot(0, vec![], vec![]).await;
    agent
        .batch(1, vec![count(series("web", 80, "", "curl"), 1)])
        .await;

    // KEDA, the graph, health and reflection need nothing.
    let mut graph = itw_proto::itw::v1::graph_client::GraphClient::new(scaler.channel().await);
    let edges = graph
        .list_edges(itw_proto::itw::v1::ListEdgesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .edges;
    assert_eq!(edges, vec![]);
    let mut keda = scaler.keda().await;
    assert!(
        keda.is_active(object(&[("service", "web")]))
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(scaler.channel().await);
    for service in [
        "",
        "externalscaler.ExternalScaler",
        "itw.v1.Ingest",
        "itw.v1.Graph",
    ] {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    let body = scaler.metrics_body().await;
    assert_eq!(
        sample(
            &body,
            "itw_scaler_rejected_streams_total",
            &[("reason", "unauthenticated")]
        ),
        Some(2.0)
    );
    scaler.stop().await;
}

#[tokio::test]
async fn a_rotated_token_file_takes_effect_without_restart() {
    let dir = std::env::temp_dir().join(format!("itw-scaler-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, "first\n").unwrap();
    let scaler = TestScaler::start(with_token(TokenSource::File(path.clone()))).await;
    scaler.agent(Some("first")).await.unwrap();
    assert_eq!(
        scaler.agent(Some("second")).await.err().map(|s| s.code()),
        Some(Code::Unauthenticated)
    );

    std::fs::write(&path, "second\n").unwrap();
    common::within("the new token to be accepted", async {
        while scaler.agent(Some("second")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(
        scaler.agent(Some("first")).await.err().map(|s| s.code()),
        Some(Code::Unauthenticated)
    );
    scaler.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
