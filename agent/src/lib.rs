//! `itw-agent`: counts TCP connect attempts on one node and reports them.
//!
//! - [`capture`]: the eBPF programs, loaded and attached, behind the [`capture::Kernel`] trait.
//! - [`resolve`]: which namespace, Service and Pod an IP:port belongs to.
//! - [`destinations`]: the ids the kernel counts under, kept in step with the map.
//! - [`deltas`]: kernel counters turned into exact deltas per series.
//! - [`counting_loop`]: the loop that owns the kernel side and collects on ticks and wakes.
//! - [`hold`]: connects to a Service without a ready endpoint parked until one is ready.
//! - [`metrics`]: what `/metrics` serves.
//! - [`report`]: the streams to every scaler replica.
//! - [`config`]: flags and env vars.

pub mod capture;
pub mod config;
pub mod counting_loop;
pub mod deltas;
pub mod destinations;
pub mod hold;
pub mod metrics;
pub mod report;
pub mod resolve;
