//! What holding runs with: the policy (`HOLD`) and the parking addresses.
//!
//! Owns the rule of which Services are held. It never touches the kernel or
//! a connection: [`super::Holder`] acts on what it says.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use crate::resolve::ServiceState;

/// `HOLD`: which Services are held while they have no ready endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HoldPolicy {
    /// Never: connects to a Service with no endpoint are refused as usual.
    Off,
    /// Services that ask for it (annotation or static map).
    Annotated,
    /// Every Service.
    All,
}

/// What holding needs, once the agent has decided it can hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldSettings {
    pub policy: HoldPolicy,
    /// For a Service that sets none.
    pub default_timeout: Duration,
    /// Parking addresses; a family without one is not held.
    pub park_ip4: Option<Ipv4Addr>,
    pub park_ip6: Option<Ipv6Addr>,
    /// The agent's own connects carry it.
    pub mark: u32,
}

impl HoldSettings {
    /// Whether the policy holds `service` while it has no ready endpoint.
    pub(super) fn asks(&self, state: &ServiceState) -> bool {
        match self.policy {
            HoldPolicy::Off => false,
            HoldPolicy::Annotated => state.hold,
            HoldPolicy::All => true,
        }
    }

    /// Whether connects to `service` are held now.
    pub fn holds(&self, state: &ServiceState) -> bool {
        // A source that cannot tell readiness never holds.
        self.asks(state) && state.ready_endpoints == Some(0)
    }

    pub(super) fn park_ip(&self, dest: SocketAddr) -> Option<IpAddr> {
        match dest {
            SocketAddr::V4(_) => self.park_ip4.map(IpAddr::V4),
            SocketAddr::V6(_) => self.park_ip6.map(IpAddr::V6),
        }
    }
}
