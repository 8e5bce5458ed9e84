//! The names the examples that play a fleet of agents (`loadgen`,
//! `streamcost`) report under, so their figures are of the same series.
//! Not in `mod.rs`: the other examples name their own.

use itw_proto::itw::v1::Series;

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
