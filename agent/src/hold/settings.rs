//! What holding runs with: the policy (`HOLD`), and the parking addresses
//! as settled on this host from what the flags ask ([`HoldRequest`]).
//!
//! Owns the rule of which Services are held and the choice of parking
//! addresses. It never touches the kernel or a held connection:
//! [`super::Holder`] acts on what it says.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use super::net;
use crate::{capture::CaptureMode, process, resolve::ServiceState};

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

/// What the flags ask of holding (`HOLD` other than off, with `HOLD_*`):
/// checked, but not yet tried on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldRequest {
    pub policy: HoldPolicy,
    /// `HOLD_TIMEOUT`: for a Service that sets none.
    pub default_timeout: Duration,
    /// `HOLD_PARK_ADDR`, of either family; unset: the IPv4 address of the
    /// default route's interface.
    pub park_addr: Option<IpAddr>,
    /// `HOLD_PARK_ADDR6`: the IPv6 parking address of a dual-stack node.
    pub park_addr6: Option<Ipv6Addr>,
    /// `HOLD_MARK`.
    pub mark: u32,
    /// `HOLD_MAX_PER_SERVICE`, `HOLD_MAX_PER_NODE`: connections parked at once.
    pub max_per_service: u32,
    pub max_per_node: u32,
    /// `HOLD_MAX_BUFFERED_BYTES`: what parked clients sent, kept, in all.
    pub max_buffered_bytes: usize,
    /// `HOLD_NETNS_DIR`: the container runtime's network namespace files.
    pub netns_dir: PathBuf,
}

/// Why holding, as asked, cannot run here: a failed start, never a silent
/// fallback (releasing from the node would bypass the clients' policies).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HoldError {
    #[error(
        "HOLD={policy}: releasing a held connection from its client's network namespace needs CAP_SYS_ADMIN (setns), which this process lacks; add SYS_ADMIN to the agent's capabilities or set HOLD=off"
    )]
    NoSysAdmin { policy: &'static str },
    #[error(
        "HOLD={policy}: the agent's own connects to held Services carry a socket mark (HOLD_MARK), which needs CAP_NET_ADMIN: {reason}; add NET_ADMIN to the agent's capabilities or set HOLD=off"
    )]
    NoMark {
        policy: &'static str,
        reason: String,
    },
    #[error(
        "HOLD={policy}: HOLD_NETNS_DIR {}: {reason}; mount the node's network namespace directory there (the DaemonSet mounts /run/netns) or set HOLD=off",
        dir.display()
    )]
    NetnsDir {
        policy: &'static str,
        dir: PathBuf,
        reason: String,
    },
}

impl HoldPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Annotated => "annotated",
            Self::All => "all",
        }
    }
}

impl HoldRequest {
    /// What holding needs with capture mode `mode` on this host, or `None`
    /// (with the reason logged) when the mode cannot hold or no parking
    /// address is usable; an error when this process could not release a
    /// held connection from its client's network namespace.
    pub fn settle(&self, mode: CaptureMode) -> Result<Option<HoldSettings>, HoldError> {
        if !matches!(mode, CaptureMode::Auto | CaptureMode::Cgroup) {
            tracing::warn!(%mode, "HOLD needs the cgroup capture mode: connects are never held");
            return Ok(None);
        }
        let policy = self.policy.as_str();
        if !process::has_capability(process::CAP_SYS_ADMIN) {
            return Err(HoldError::NoSysAdmin { policy });
        }
        if let Err(error) = net::can_mark(self.mark) {
            return Err(HoldError::NoMark {
                policy,
                reason: error.to_string(),
            });
        }
        match std::fs::read_dir(&self.netns_dir) {
            Ok(_) => {}
            // A host without pods (a developer's machine, the demo): its own
            // processes are released from its own namespace, which needs no
            // file. On a node the DaemonSet mounts the directory.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(HOLD_NETNS_DIR = %self.netns_dir.display(), "no network namespace directory: only connects from this host's own network namespace can be released; others are reset at release");
            }
            Err(error) => {
                return Err(HoldError::NetnsDir {
                    policy,
                    dir: self.netns_dir.clone(),
                    reason: error.to_string(),
                });
            }
        }
        let (park_ip4, park_ip6) = match self.park_addr {
            Some(IpAddr::V4(ip)) => (Some(ip), self.park_addr6),
            Some(IpAddr::V6(ip)) => {
                if self.park_addr6.is_some_and(|other| other != ip) {
                    tracing::warn!(HOLD_PARK_ADDR = %ip, HOLD_PARK_ADDR6 = ?self.park_addr6, "two IPv6 parking addresses: using HOLD_PARK_ADDR");
                }
                (None, Some(ip))
            }
            None => match net::default_route_ipv4() {
                Ok(ip) => (Some(ip), self.park_addr6),
                Err(reason) => {
                    tracing::warn!(%reason, "no IPv4 parking address (set HOLD_PARK_ADDR to the node IP): IPv4 connects are not held");
                    (None, self.park_addr6)
                }
            },
        };
        let park_ip4 = park_ip4.filter(|ip| usable((*ip).into()));
        let park_ip6 = park_ip6.filter(|ip| usable((*ip).into()));
        if park_ip4.is_none() && park_ip6.is_none() {
            return Ok(None);
        }
        Ok(Some(HoldSettings {
            policy: self.policy,
            default_timeout: self.default_timeout,
            park_ip4,
            park_ip6,
            mark: self.mark,
            max_per_service: self.max_per_service,
            max_per_node: self.max_per_node,
            max_buffered_bytes: self.max_buffered_bytes,
            netns_dir: self.netns_dir.clone(),
        }))
    }
}

/// A parking address must be one of this host's: tried once now rather than
/// failing each hold later.
fn usable(ip: IpAddr) -> bool {
    match std::net::TcpListener::bind((ip, 0)) {
        Ok(_) => {
            if !net::reachable_from_pods(ip) {
                tracing::warn!(park_addr = %ip, "the parking address is not reachable from pods (their loopback is their own): only this host's own processes can be held");
            }
            true
        }
        Err(error) => {
            tracing::error!(park_addr = %ip, %error, "cannot listen on the parking address (HOLD_PARK_ADDR must be an address of this host): connects of its family are not held");
            false
        }
    }
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
    /// Connections parked at once, per Service and per node.
    pub max_per_service: u32,
    pub max_per_node: u32,
    /// What parked clients sent, kept, in all.
    pub max_buffered_bytes: usize,
    /// The container runtime's network namespace files.
    pub netns_dir: PathBuf,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(park_addr: &str) -> HoldRequest {
        HoldRequest {
            policy: HoldPolicy::All,
            default_timeout: Duration::from_secs(30),
            park_addr: Some(park_addr.parse().unwrap()),
            park_addr6: None,
            mark: 0x2a7c,
            max_per_service: 16,
            max_per_node: 64,
            max_buffered_bytes: 1 << 20,
            netns_dir: std::env::temp_dir(),
        }
    }

    /// These tests settle only where this process may enter other network
    /// namespaces (root); elsewhere they check the refusal instead.
    fn privileged() -> bool {
        process::has_capability(process::CAP_SYS_ADMIN)
    }

    #[test]
    fn only_the_cgroup_mode_holds() {
        let loopback = request("127.0.0.1");
        assert_eq!(loopback.settle(CaptureMode::Kprobe), Ok(None));
        assert_eq!(loopback.settle(CaptureMode::Tracepoint), Ok(None));
        if !privileged() {
            return;
        }
        for mode in [CaptureMode::Auto, CaptureMode::Cgroup] {
            assert_eq!(
                loopback.settle(mode),
                Ok(Some(HoldSettings {
                    policy: HoldPolicy::All,
                    default_timeout: Duration::from_secs(30),
                    park_ip4: Some(Ipv4Addr::LOCALHOST),
                    park_ip6: None,
                    mark: 0x2a7c,
                    max_per_service: 16,
                    max_per_node: 64,
                    max_buffered_bytes: 1 << 20,
                    netns_dir: std::env::temp_dir(),
                })),
                "{mode}"
            );
        }
    }

    #[test]
    fn a_parking_address_this_host_cannot_listen_on_holds_nothing() {
        if !privileged() {
            return;
        }
        // TEST-NET-1: documentation only, never an address of this host.
        assert_eq!(request("192.0.2.1").settle(CaptureMode::Cgroup), Ok(None));
    }

    #[test]
    fn an_unreadable_namespace_directory_is_a_failed_start_naming_it() {
        if !privileged() {
            return;
        }
        // A file where the directory should be: not a missing directory
        // (a host without pods), a broken mount.
        let mut asked = request("127.0.0.1");
        asked.netns_dir = "/proc/self/status".into();
        let error = asked.settle(CaptureMode::Cgroup).unwrap_err();
        assert_eq!(
            error.to_string(),
            "HOLD=all: HOLD_NETNS_DIR /proc/self/status: Not a directory (os error 20); mount the node's network namespace directory there (the DaemonSet mounts /run/netns) or set HOLD=off"
        );
        asked.netns_dir = "/nonexistent/netns".into();
        assert!(asked.settle(CaptureMode::Cgroup).is_ok());
    }

    #[test]
    fn the_missing_capability_error_names_it_and_the_setting() {
        assert_eq!(
            HoldError::NoSysAdmin {
                policy: HoldPolicy::Annotated.as_str()
            }
            .to_string(),
            "HOLD=annotated: releasing a held connection from its client's network namespace needs CAP_SYS_ADMIN (setns), which this process lacks; add SYS_ADMIN to the agent's capabilities or set HOLD=off"
        );
        if !privileged() {
            assert_eq!(
                request("127.0.0.1").settle(CaptureMode::Cgroup),
                Err(HoldError::NoSysAdmin { policy: "all" })
            );
        }
    }
}
