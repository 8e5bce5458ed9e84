//! The end-to-end harness: what tests and benchmarks that run the real
//! binaries share.
//!
//! - [`kube_mock`]: the mock Kubernetes API server (crate `itw-kube-mock`,
//!   its own so the agent's tests can use it without depending on this one).
//! - [`system`]: the real `itw-agent` and `itw-scaler` started on loopback,
//!   KEDA's side as a gRPC client, `/metrics` parsed (the tests in `tests/`
//!   and `benches/activation.rs`).
//! - [`timeline`]: the activation timeline read back from their logs.
//! - [`lab`]: a Kubernetes-shaped node on this machine (network namespaces as
//!   pods, kubelet cgroups, kube-proxy's rules or a socket load balancer),
//!   with the real agent and scaler on it (`hack/node-lab`).

pub use itw_kube_mock as kube_mock;
pub mod lab;
pub mod system;
pub mod timeline;
