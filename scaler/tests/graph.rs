//! The dependency graph and pre-wake through the real server on loopback:
//! an agent-role client teaches edges, KEDA-role clients (generated from
//! KEDA's proto) hold `prewake: "true"` streams, and a graph client reads
//! `itw.v1.Graph/ListEdges`.

mod common;

use common::{TestScaler, count, loopback, now_ms, object, sample, series, within};
use itw_proto::{
    externalscaler::IsActiveResponse,
    itw::v1::{Batch, Edge, ListEdgesRequest, Snapshot, graph_client::GraphClient, report_request},
};
use tonic::{Code, Streaming};

fn edge(from: &str, to: &str, last_seen_unix_ms: i64) -> Edge {
    Edge {
        from_namespace: "apps".into(),
        from_service: from.into(),
        to_namespace: "apps".into(),
        to_service: to.into(),
        last_seen_unix_ms,
        declared: false,
    }
}

async fn next(stream: &mut Streaming<IsActiveResponse>, which: &str) -> bool {
    within(which, stream.message())
        .await
        .unwrap_or_else(|s| panic!("{which}: stream error {s}"))
        .unwrap_or_else(|| panic!("{which}: stream ended"))
        .result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_teaches_a_chain_and_one_wake_batch_flips_all_of_it() {
    let scaler = TestScaler::start(loopback()).await;
    let mut keda = scaler.keda().await;
    let mut streams = Vec::new();
    for service in ["a", "b", "c"] {
        let trigger = object(&[("service", service), ("window", "30s"), ("prewake", "true")]);
        let mut stream = keda.stream_is_active(trigger).await.unwrap().into_inner();
        assert!(!next(&mut stream, service).await, "{service} idle on open");
        streams.push((service, stream));
    }

    let mut agent = scaler.agent(None).await.unwrap();
    agent.hello("node-1", "instance-1").await;
    let seen = now_ms() - 1_000;
    agent
        .send(report_request::Message::Snapshot(Snapshot {
            through_sequence: 0,
            taken_at_unix_ms: now_ms(),
            totals: vec![],
            history: vec![],
            edges: vec![edge("a", "b", seen), edge("b", "c", seen)],
        }))
        .await;
    assert_eq!(agent.expect_ack().await, 0);

    agent
        .send(report_request::Message::Batch(Batch {
            sequence: 1,
            collected_at_unix_ms: now_ms(),
            wake: true,
            deltas: vec![count(series("a", 80, "", "curl"), 1)],
            edges: vec![],
        }))
        .await;
    assert_eq!(agent.expect_ack().await, 1);
    for (service, stream) in &mut streams {
        assert!(
            next(stream, service).await,
            "{service} active from a's batch"
        );
    }
    let body = scaler.metrics_body().await;
    assert_eq!(
        sample(&body, "itw_scaler_batches_total", &[("result", "applied")]),
        Some(1.0),
        "one batch did it"
    );
    assert_eq!(sample(&body, "itw_scaler_service_edges", &[]), Some(2.0));
    for service in ["a", "b", "c"] {
        let trigger = object(&[("service", service), ("window", "30s"), ("prewake", "true")]);
        assert!(
            keda.is_active(trigger).await.unwrap().into_inner().result,
            "IsActive {service}"
        );
    }
    // Without prewake, c is only as active as its own attempts.
    let plain = object(&[("service", "c"), ("window", "30s")]);
    assert!(!keda.is_active(plain).await.unwrap().into_inner().result);

    let mut graph = GraphClient::new(scaler.channel().await);
    let listed = graph
        .list_edges(ListEdgesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .edges;
    let names: Vec<(String, String, bool)> = listed
        .iter()
        .map(|e| {
            (
                format!("{}/{}", e.from_namespace, e.from_service),
                format!("{}/{}", e.to_namespace, e.to_service),
                e.declared,
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("apps/a".to_owned(), "apps/b".to_owned(), false),
            ("apps/b".to_owned(), "apps/c".to_owned(), false),
        ]
    );
    // On the scaler's clock, corrected by the agent's offset (both are this
    // machine's clock here, so within the test's own run).
    for e in &listed {
        assert!(
            (seen - 1_000..=now_ms()).contains(&e.last_seen_unix_ms),
            "{e:?}"
        );
    }
    let other = graph
        .list_edges(ListEdgesRequest {
            namespace: "other".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.edges, vec![]);
    let bad = graph
        .list_edges(ListEdgesRequest {
            namespace: "Apps".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().starts_with("namespace = \"Apps\": "),
        "{}",
        bad.message()
    );
    scaler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_edge_is_refused_alone_and_a_bad_prewake_names_the_key() {
    let scaler = TestScaler::start(loopback()).await;
    let mut agent = scaler.agent(None).await.unwrap();
    agent.hello("node-1", "instance-1").await;
    agent.snapshot(0, vec![], vec![]).await;
    let now = now_ms();
    agent
        .send(report_request::Message::Batch(Batch {
            sequence: 1,
            collected_at_unix_ms: now,
            wake: false,
            deltas: vec![count(series("a", 80, "", "curl"), 1)],
            edges: vec![edge("a", "B_bad", now), edge("a", "b", now)],
        }))
        .await;
    assert_eq!(agent.expect_ack().await, 1, "the rest of the batch applied");
    let body = scaler.metrics_body().await;
    assert_eq!(
        sample(
            &body,
            "itw_scaler_refused_entries_total",
            &[("reason", "invalid_service")]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&body, "itw_scaler_service_edges", &[]), Some(1.0));

    // An edge to itself ends the stream, naming the field.
    agent
        .send(report_request::Message::Batch(Batch {
            sequence: 2,
            collected_at_unix_ms: now,
            wake: false,
            deltas: vec![],
            edges: vec![edge("a", "a", now)],
        }))
        .await;
    let status = agent.expect_error().await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "batch.edges[0] = apps/a -> apps/a: an edge joins two different Services"
    );

    let mut keda = scaler.keda().await;
    let status = keda
        .stream_is_active(object(&[("service", "b"), ("prewake", "yes")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "scalerMetadata.prewake = \"yes\": must be \"true\" or \"false\""
    );
    scaler.stop().await;
}

async fn list(scaler: &TestScaler) -> Vec<Edge> {
    GraphClient::new(scaler.channel().await)
        .list_edges(ListEdgesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .edges
}

async fn snapshot_with(agent: &mut common::Agent, edges: Vec<Edge>) {
    agent
        .send(report_request::Message::Snapshot(Snapshot {
            through_sequence: 0,
            taken_at_unix_ms: now_ms(),
            totals: vec![],
            history: vec![],
            edges,
        }))
        .await;
    assert_eq!(agent.expect_ack().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_replica_learns_the_union_of_the_agents_graphs_from_their_snapshots() {
    let seen = now_ms() - 10_000;
    let mut declared = edge("a", "b", seen + 5_000);
    declared.declared = true;
    for _replica in 0..2 {
        let scaler = TestScaler::start(loopback()).await;
        assert_eq!(list(&scaler).await, vec![], "a fresh replica knows no edge");
        let mut node1 = scaler.agent(None).await.unwrap();
        node1.hello("node-1", "instance-1").await;
        snapshot_with(&mut node1, vec![edge("a", "b", seen), edge("b", "c", seen)]).await;
        let mut node2 = scaler.agent(None).await.unwrap();
        node2.hello("node-2", "instance-2").await;
        snapshot_with(&mut node2, vec![declared.clone()]).await;

        let edges = list(&scaler).await;
        let shown: Vec<(&str, &str, bool)> = edges
            .iter()
            .map(|e| (e.from_service.as_str(), e.to_service.as_str(), e.declared))
            .collect();
        assert_eq!(shown, vec![("a", "b", true), ("b", "c", false)]);
        // The newest last_seen of the two nodes (both on this machine's
        // clock, so the offsets are about 0).
        assert!(
            edges[0].last_seen_unix_ms >= seen + 4_000,
            "{} should be node-2's {}",
            edges[0].last_seen_unix_ms,
            seen + 5_000
        );
        assert!((seen - 1_000..seen + 1_000).contains(&edges[1].last_seen_unix_ms));
        let body = scaler.metrics_body().await;
        assert_eq!(sample(&body, "itw_scaler_service_edges", &[]), Some(2.0));
        scaler.stop().await;
    }
}
