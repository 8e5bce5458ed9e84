//! `itw-agent`: counts TCP connect attempts on one node and reports them.
//!
//! - [`config`]: flags and env vars, checked into a [`config::Config`].
//! - [`agent`]: the agent as a whole, started from a config and served until shutdown.
//! - `fast_path`: the thread of its own that runs capture, the counting loop and the reporter.
//! - [`capture`]: the eBPF programs, loaded and attached, behind the [`capture::Kernel`] trait.
//! - [`resolve`]: which namespace, Service and Pod an IP:port belongs to.
//! - [`destinations`]: the ids the kernel counts under, kept in step with the map.
//! - [`deltas`]: kernel counters turned into exact deltas per series.
//! - [`counting_loop`]: the loop that owns the kernel side and collects on ticks and wakes.
//! - [`sources`]: which pod and workload made a connect, from its cgroup.
//! - [`edges`]: the edges "Service A calls Service B" held and sent to the scalers.
//! - [`attribution`]: each counter's caller turned into source series, exclusion and edges.
//! - [`source_metrics`]: the source series and filtered-by-source counts on `/metrics`.
//! - [`hold`]: connects to a Service without a ready endpoint parked until one is ready.
//! - [`metrics`]: what `/metrics` serves.
//! - [`report`]: the streams to every scaler replica.
//! - [`coldstart`]: cold start by phase per Service, from the wake and the hold.
//! - [`process`]: process-wide setup: malloc arenas, the open-files limit, shutdown signals.

pub mod agent;
pub mod attribution;
pub mod capture;
pub mod coldstart;
pub mod config;
pub mod counting_loop;
pub mod deltas;
pub mod destinations;
pub mod edges;
mod fast_path;
pub mod hold;
pub mod metrics;
pub mod process;
pub mod report;
pub mod resolve;
pub mod source_metrics;
pub mod sources;

pub use agent::Agent;

use capture::CaptureError;

/// Why the agent could not start, or stopped on a failure of its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("starting the fast-path thread")]
    FastPathThread(#[source] std::io::Error),
    #[error("starting the fast-path runtime")]
    FastPathRuntime(#[source] std::io::Error),
    #[error("the fast-path thread ended before capture started")]
    FastPathEnded,
    #[error("the fast-path thread panicked")]
    FastPathPanicked,
    #[error("starting capture")]
    Capture(#[source] CaptureError),
    #[error("setting EXCLUDE_COMMS in the kernel")]
    Exclude(#[source] CaptureError),
    #[error("counting")]
    Counting(#[source] CaptureError),
    #[error(transparent)]
    StaticMap(#[from] resolve::static_map::StaticMapError),
    #[error(transparent)]
    Kube(#[from] resolve::kube::KubeSourceError),
    #[error(transparent)]
    Telemetry(#[from] itw_telemetry::Error),
    #[error(transparent)]
    Hold(#[from] hold::HoldError),
    #[error("starting holding's network namespace thread")]
    HoldDialer(#[source] std::io::Error),
}
