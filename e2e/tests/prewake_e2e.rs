//! Pre-wake end to end with the real binaries: a static service map
//! declares the chain a -> b -> c (`wakes`, as the annotation does); the
//! agent reports the declared edges; one refused connect to a's stand-in
//! ClusterIP flips the `prewake: "true"` StreamIsActive streams of a, b and
//! c, and `itw.v1.Graph/ListEdges` lists the two edges. Root only (CI); its
//! stand-in ClusterIPs (127.103.x) are its own.

use std::time::Duration;

use itw_e2e::system::*;
use itw_proto::itw::v1::{ListEdgesRequest, graph_client::GraphClient};

const NS: &str = "e2e-prewake";

fn chain_map() -> String {
    let service = |name: &str, ip: &str, wakes: Option<&str>| {
        let wakes = wakes.map_or(String::new(), |w| format!("    wakes: \"{w}\"\n"));
        format!(
            "  - namespace: {NS}\n    name: {name}\n    clusterIPs: [{ip}]\n    ports: [8080]\n{wakes}"
        )
    };
    format!(
        "services:\n{}{}{}",
        service("a", "127.103.0.1", Some("b")),
        service("b", "127.103.0.2", Some("c")),
        service("c", "127.103.0.3", None),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_the_first_of_a_declared_chain_wakes_all_of_it() {
    if !bpf_available("a_connect_to_the_first_of_a_declared_chain_wakes_all_of_it") {
        return;
    }
    let scaler = Scaler::start("scaler").await;
    let _agent = Agent::start("agent", &chain_map(), &[scaler.grpc], &[]).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", scaler.grpc))
        .expect("endpoint")
        .connect()
        .await
        .expect("connecting to the scaler");
    let graph = GraphClient::new(channel);
    let edges = eventually(
        "the agent's declared edges at the scaler",
        Duration::from_secs(10),
        || {
            let mut graph = graph.clone();
            async move {
                let edges = graph
                    .list_edges(ListEdgesRequest {
                        namespace: NS.into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .edges;
                (edges.len() == 2).then_some(edges)
            }
        },
    )
    .await;
    let shown: Vec<(&str, &str, bool)> = edges
        .iter()
        .map(|e| (e.from_service.as_str(), e.to_service.as_str(), e.declared))
        .collect();
    assert_eq!(shown, vec![("a", "b", true), ("b", "c", true)]);

    let mut keda = scaler.keda().await;
    let mut streams = Vec::new();
    for service in ["a", "b", "c"] {
        let object = scaled_object(NS, service, &[("window", "60s"), ("prewake", "true")]);
        let mut stream = keda
            .stream_is_active(object)
            .await
            .expect("StreamIsActive")
            .into_inner();
        let first = stream.message().await.expect("stream").expect("a message");
        assert!(!first.result, "{service}: nobody called yet");
        streams.push((service, stream));
    }

    connect_refused(addr("127.103.0.1:8080"));
    for (service, stream) in &mut streams {
        let woken = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{service}: true within 5 s of the connect to a"))
            .expect("stream")
            .expect("a message");
        assert!(woken.result, "{service}");
    }
}
