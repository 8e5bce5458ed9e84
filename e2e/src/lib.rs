//! The end-to-end harness: what tests and benchmarks that run the real
//! binaries share.
//!
//! - [`kube_mock`]: a mock Kubernetes API server serving real Service and
//!   EndpointSlice JSON, listed and watched.
//! - [`lab`]: a Kubernetes-shaped node on this machine (network namespaces as
//!   pods, kubelet cgroups, kube-proxy's rules or a socket load balancer),
//!   with the real agent and scaler on it (`hack/node-lab`).

pub mod kube_mock;
pub mod lab;
