//! `itw-agent`: counts TCP connect attempts on one node and reports them.
//!
//! - [`capture`]: the eBPF programs, loaded and attached, behind the [`capture::Kernel`] trait.
//! - [`config`]: flags and env vars.

pub mod capture;
pub mod config;
