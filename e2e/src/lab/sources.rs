//! Who woke a Service (issue #15): each attempt attributed to the calling
//! pod's workload, or to the node; a monitoring namespace that
//! `EXCLUDE_SOURCES` names never activates anything.

use std::net::SocketAddr;

use anyhow::Context;

use super::{
    Check,
    cell::{AGENT_METRICS, CLIENT_COMM, Running, SETTLE, client, client_args, expect, finish},
    observe::{self, Sample, settle, sum},
    procs::{self, Placement},
    scenario::{self, CLIENT, COLD, DENIED, MONITORING, NAMESPACE, PORT, PROBER, QUIET, WEB_POD},
};

/// A node process outside every pod (a host daemon), in a cgroup of its own.
pub const NODE_PROBE: &str = "system.slice/node-probe.service";
/// What the cells' agents get as `EXCLUDE_SOURCES`, as an overlay would set it.
pub const EXCLUDE_SOURCES: &str = MONITORING;

const SOURCE_SERIES: &str = "internal_tcp_source_attempts_total";
const FILTERED_SOURCES: &str = "internal_tcp_filtered_source_attempts_total";

fn from(samples: &[Sample], service: &str, namespace: &str, workload: &str) -> u64 {
    let mut labels = vec![
        ("source_namespace", namespace),
        ("source_workload", workload),
    ];
    if !service.is_empty() {
        labels.push(("destination_service", service));
    }
    sum(samples, SOURCE_SERIES, &labels)
}

/// The source checks; `expected_total` grows by the attempts they count.
pub(super) async fn checks(running: &Running, expected_total: &mut u64) -> Vec<Check> {
    let node = &running.node;
    let cold = SocketAddr::new(COLD.1.into(), PORT);
    let quiet = SocketAddr::new(QUIET.1.into(), PORT);
    let web_pod = SocketAddr::new(scenario::pod(WEB_POD).ip.into(), scenario::TARGET_PORT);
    let checkout = scenario::workload(CLIENT);
    let reports = scenario::workload(DENIED);
    let mut out = Vec::new();

    out.push(
        Check::run("sources", async {
            let before = observe::metrics(AGENT_METRICS).await?;
            let was = |s: &[Sample]| {
                (
                    from(s, COLD.0, NAMESPACE, checkout),
                    from(s, COLD.0, NAMESPACE, reports),
                    from(s, "", "", "node"),
                )
            };
            let (checkout0, reports0, node0) = was(&before);
            client(node, CLIENT, CLIENT_COMM, cold, 3, false).await?;
            client(node, DENIED, "reports", cold, 2, false).await?;
            let cgroup = node.cgroups.root.join(NODE_PROBE);
            let child = procs::pod_command(
                &Placement {
                    netns: None,
                    cgroup: &cgroup,
                },
                &client_args("node-probe", web_pod, 2, true),
            )?;
            finish(child).await?;
            let node_n = settle(AGENT_METRICS, SETTLE, node0 + 2, |m| from(m, "", "", "node")).await
                - node0;
            let after = observe::metrics(AGENT_METRICS).await?;
            let (checkout1, reports1, _) = was(&after);
            let (checkout_n, reports_n) = (checkout1 - checkout0, reports1 - reports0);
            let series: Vec<String> = after
                .iter()
                .filter(|s| s.name == SOURCE_SERIES)
                .map(|s| format!("{:?}={}", s.labels, s.value))
                .collect();
            let ok = checkout_n == 3 && reports_n == 2 && node_n == 2;
            expect(
                ok,
                format!(
                    "cold from {NAMESPACE}/{checkout} {checkout_n}/3, from {NAMESPACE}/{reports} {reports_n}/2, web from the node {node_n}/2{}",
                    if ok { String::new() } else { format!("; series: {series:?}") }
                ),
            )
        })
        .await,
    );
    *expected_total += 7;

    out.push(
        Check::run("exclude", async {
            let mut active =
                observe::stream_is_active(super::cell::SCALER_GRPC, NAMESPACE, QUIET.0).await?;
            let prober = scenario::workload(PROBER);
            let made = client(node, PROBER, "prober", quiet, 4, false).await?;
            let filtered = settle(AGENT_METRICS, SETTLE, 4, |m| {
                sum(
                    m,
                    FILTERED_SOURCES,
                    &[("source_namespace", MONITORING), ("source_workload", prober)],
                )
            })
            .await;
            let samples = observe::metrics(AGENT_METRICS).await?;
            let counted = sum(
                &samples,
                "internal_tcp_attempts_total",
                &[("destination_service", QUIET.0)],
            );
            let mut pushed = Vec::new();
            while let Ok(value) = active.try_recv() {
                pushed.push(value);
            }
            // A real caller then wakes it at once: the probes did not leave
            // the destination disarmed.
            client(node, CLIENT, CLIENT_COMM, quiet, 1, false).await?;
            let woke = tokio::time::timeout(SETTLE, async {
                while let Some(value) = active.recv().await {
                    if value {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            expect(
                made.len() == 4 && filtered == 4 && counted == 0 && !pushed.contains(&true) && woke,
                format!(
                    "probes from {MONITORING}/{prober}: filtered {filtered}/4, counted {counted}, pushed {pushed:?}; then a call from {CLIENT}: woke {woke}"
                ),
            )
            .context("EXCLUDE_SOURCES=monitoring")
        })
        .await,
    );
    *expected_total += 1;
    out
}
