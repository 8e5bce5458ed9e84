//! Cold start by phase, end to end with the real binaries: one activation of
//! a Service is observed once in each phase the agent and the scaler see,
//! and the Grafana dashboard's cold start queries name series both binaries
//! expose. Counts only, never durations. Root only (CI); addresses
//! 127.103.x.y.

use std::time::Duration;

use itw_e2e::system::*;
use itw_telemetry::exposition::Sample;

const NS: &str = "coldstart";

/// `_count` of `family` for `service` in each of `phases`.
fn counts(samples: &[Sample], family: &str, service: &str, phases: &[&str]) -> Vec<Option<f64>> {
    phases
        .iter()
        .map(|phase| {
            exact(
                samples,
                &format!("{family}_count"),
                &[
                    ("destination_namespace", NS),
                    ("destination_service", service),
                    ("phase", phase),
                ],
            )
        })
        .collect()
}

/// The cold start series names the dashboard's queries use.
fn dashboard_cold_start_series() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/internal-tcp-watcher.json"
    );
    let text = std::fs::read_to_string(path).expect("reading the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|expr| expr.match_indices("itw_").map(|(at, _)| &expr[at..]))
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| name.contains("cold_start"))
        .collect();
    names.sort();
    names.dedup();
    names
}

fn collect_exprs(node: &serde_json::Value, out: &mut Vec<String>) {
    match node {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(expr) if key == "expr" => out.push(expr.clone()),
                    other => collect_exprs(other, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_activation_is_one_observation_in_every_phase_and_the_dashboard_reads_them() {
    if !bpf_available("one_activation_is_one_observation_in_every_phase") {
        return;
    }
    let target = addr("127.103.0.1:8080");
    let scaler = Scaler::start("cold-scaler").await;
    let agent = Agent::start(
        "cold-agent",
        &static_map(NS, "web", "127.103.0.1", 8080),
        &[scaler.grpc],
        &[],
    )
    .await;
    agent.wait_streams_up(1.0).await;
    let mut keda = scaler.keda().await;
    // Two ScaledObjects on one Service: one activation all the same.
    let mut streams = Vec::new();
    for name in ["web-a", "web-b"] {
        let mut object = scaled_object(NS, "web", &[("window", "60s")]);
        object.name = name.to_owned();
        let mut stream = keda
            .stream_is_active(object)
            .await
            .expect("StreamIsActive")
            .into_inner();
        assert!(
            !stream
                .message()
                .await
                .expect("stream")
                .expect("state")
                .result
        );
        streams.push(stream);
    }

    connect_refused(target);
    for stream in &mut streams {
        let activated = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("StreamIsActive true within 5 s of the connect")
            .expect("stream")
            .expect("a message");
        assert!(activated.result);
    }

    // Each side observed before it handed on: the agent before its batch
    // left, the scaler before `true` did.
    let agent_samples = scrape(agent.metrics).await;
    let scaler_samples = scrape(scaler.metrics).await;
    assert_eq!(
        counts(
            &agent_samples,
            "itw_agent_cold_start_seconds",
            "web",
            &[
                "first_connect_to_stream",
                "parked_to_endpoint_ready",
                "endpoint_ready_to_released",
                "released_to_first_byte",
            ]
        ),
        vec![Some(1.0), None, None, None],
        "agent: a Service that is not held has only the wake phase"
    );
    assert_eq!(
        counts(
            &scaler_samples,
            "itw_scaler_cold_start_seconds",
            "web",
            &["first_connect_to_received", "received_to_stream"]
        ),
        vec![Some(1.0), Some(1.0)],
        "scaler: once per activation, not once per stream"
    );
    assert_eq!(
        sum(&scaler_samples, "itw_scaler_cold_start_left_out_total", &[]),
        0.0,
        "nothing left out"
    );

    let wanted = dashboard_cold_start_series();
    assert_eq!(
        wanted,
        vec![
            "itw_agent_cold_start_seconds_bucket",
            "itw_scaler_cold_start_seconds_bucket"
        ]
    );
    for name in wanted {
        let samples = if name.starts_with("itw_agent_") {
            &agent_samples
        } else {
            &scaler_samples
        };
        assert!(
            samples.iter().any(|s| s.name == name),
            "the dashboard queries {name}, which /metrics does not show"
        );
    }
}
