//! The names the examples that play a fleet of agents (`loadgen`,
//! `streamcost`, `statesize`) report under, so their figures are of the
//! same series, and the messages of their agents. Not in `mod.rs`: the
//! other examples name their own.

use itw_proto::itw::v1::{
    Batch, Hello, PROTOCOL_VERSION, Series, SeriesCount, Snapshot, report_request,
};

pub const NAMESPACE: &str = "bench";
pub const COMMS: [&str; 4] = ["java", "curl", "python3", "envoy"];

pub fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// Service `service`'s series for the process `comm`, port 8080, no pod.
pub fn series(service: usize, comm: &str) -> Series {
    Series {
        namespace: NAMESPACE.into(),
        service: service_name(service),
        port: 8080,
        pod: String::new(),
        process_comm: comm.into(),
    }
}

/// Node `node`'s hello, its instance and secret marked with the example's
/// name.
#[allow(dead_code)] // not loadgen's
pub fn hello(node: &str, example: &str) -> report_request::Message {
    report_request::Message::Hello(Hello {
        node_name: node.into(),
        instance_id: format!("{node}-{example}"),
        protocol_version: PROTOCOL_VERSION,
        instance_secret: format!("{example}-secret-{node}"),
    })
}

/// A snapshot through 0 naming every comm of each of `services`.
#[allow(dead_code)] // not loadgen's
pub fn snapshot(services: impl Iterator<Item = usize>) -> report_request::Message {
    let totals = services
        .flat_map(|s| {
            COMMS.map(|comm| SeriesCount {
                series: Some(series(s, comm)),
                attempts: 1,
            })
        })
        .collect();
    report_request::Message::Snapshot(Snapshot {
        through_sequence: 0,
        taken_at_unix_ms: crate::bench_support::now_ms(),
        totals,
        history: vec![],
        edges: vec![],
    })
}

/// Steady batch `sequence` of the agent whose Services are the `own` from
/// `first` on (of `services`): `deltas` deltas, one attempt each, spread
/// over its Services and the comms.
#[allow(dead_code)] // not loadgen's
pub fn batch(
    first: usize,
    own: usize,
    services: usize,
    deltas: usize,
    sequence: u64,
) -> report_request::Message {
    let deltas = (0..deltas)
        .map(|k| SeriesCount {
            series: Some(series(
                (first + (k * 7) % own) % services,
                COMMS[k % COMMS.len()],
            )),
            attempts: 1,
        })
        .collect();
    report_request::Message::Batch(Batch {
        sequence,
        collected_at_unix_ms: crate::bench_support::now_ms(),
        wake: false,
        deltas,
        edges: vec![],
    })
}
