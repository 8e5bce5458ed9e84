//! The node lab: a Kubernetes-shaped node on this machine, built once per
//! cell of a matrix (datapath x kubelet cgroup driver x where the node's
//! cgroup root sits), with the real agent and scaler on it, checked with
//! exact numbers, and removed afterwards.
//!
//! - [`netns`]: network namespaces and the commands that build them.
//! - [`cgroups`]: the kubelet's cgroup layouts under a (nested) node root.
//! - [`node`]: the node's network and pods.
//! - [`scenario`]: the pods, Services and EndpointSlices of the cluster.
//! - [`datapath`]: kube-proxy's rules or a socket load balancer.
//! - [`proxy`]: the datapath fed from the mock API server, lagging.
//! - [`daemonset`]: the agent's env and capabilities, from `deploy/base`.
//! - [`procs`]: processes placed in pods, the kubelet's cgroup, the agent's.
//! - [`observe`]: `/metrics`, KEDA's stream, what pod processes printed.
//! - [`cell`]: one cell: setup, the counting checks, teardown.
//! - [`holding`]: the holding checks: release, policy, strangers, floods.
//! - [`sources`]: who woke a Service, and sources that never do.
//! - [`chain`]: a call chain woken at once by pre-wake, beside its serial wake-up.
//!
//! What it must never do: send a packet off the machine. The node's only
//! route out ends in a namespace that forwards nothing.

pub mod cell;
pub mod cgroups;
pub mod chain;
pub mod daemonset;
pub mod datapath;
pub mod holding;
pub mod netns;
pub mod node;
pub mod observe;
pub mod procs;
pub mod proxy;
pub mod scenario;
pub mod sources;

use std::{future::Future, path::PathBuf, time::Duration};

use self::{cgroups::Driver, datapath::Kind};

/// One node configuration of the matrix.
#[derive(Clone, Debug)]
pub struct Cell {
    pub name: String,
    pub datapath: Kind,
    pub driver: Driver,
    /// The node's cgroup root nested below the hierarchy's root (kind-style),
    /// or the hierarchy's root itself.
    pub nested: bool,
    /// IPv6 and dual-stack Services, and IPv6 holding.
    pub ipv6: bool,
    /// Agent env set on top of the DaemonSet's, as an overlay would.
    pub env: Vec<(String, String)>,
    /// A socket load balancer runs before our programs (the agent told to
    /// attach in the pods' order, behind a pre-order one): the agent must
    /// say it cannot hold, and a held Service's connect is refused.
    pub holding_blocked: bool,
    /// A NetworkPolicy-like rule (in the node's FORWARD chain, as an
    /// iptables CNI has it) denies one client pod the held Service's pod;
    /// and a node process tries the parking port itself.
    pub policy: bool,
    /// A flood of held connects past the agent's caps.
    pub flood: bool,
    /// The call chain woken by pre-wake, beside its serial wake-up.
    pub chain: bool,
}

impl Cell {
    pub fn new(datapath: Kind, driver: Driver) -> Self {
        let short = match datapath {
            Kind::Iptables => "iptables",
            Kind::Nftables => "nftables",
            Kind::SocketLb { preorder: false } => "socklb",
            Kind::SocketLb { preorder: true } => "socklb-preorder",
        };
        Self {
            name: format!("{short}-{}", driver.as_str()),
            datapath,
            driver,
            nested: true,
            ipv6: false,
            env: Vec::new(),
            holding_blocked: false,
            policy: false,
            flood: false,
            chain: false,
        }
    }

    /// The cells `hack/node-lab` runs: every datapath with both cgroup
    /// drivers under a nested node root, one at the hierarchy's root, one
    /// with IPv6 and dual-stack Services, and the agent in the pods' order
    /// (as on kernels without pre-order attachment) behind and after a
    /// socket load balancer.
    pub fn matrix() -> Vec<Self> {
        let mut cells = Vec::new();
        for datapath in [
            Kind::Iptables,
            Kind::Nftables,
            Kind::SocketLb { preorder: false },
            Kind::SocketLb { preorder: true },
        ] {
            for driver in [Driver::Systemd, Driver::Cgroupfs] {
                let mut cell = Self::new(datapath, driver);
                // The chain once, where kube-proxy's rules lag as they do.
                cell.chain = datapath == Kind::Iptables && driver == Driver::Systemd;
                // Policy in every datapath; the flood once per datapath.
                cell.policy = driver == Driver::Systemd;
                cell.flood = driver == Driver::Cgroupfs;
                if cell.flood {
                    cell.env = vec![(
                        "HOLD_MAX_PER_SERVICE".to_owned(),
                        holding::FLOOD_CAP.to_string(),
                    )];
                }
                cells.push(cell);
            }
        }
        let mut root = Self::new(Kind::Iptables, Driver::Systemd);
        root.name = "iptables-systemd-rootcg".to_owned();
        root.nested = false;
        cells.push(root);
        for preorder in [false, true] {
            let mut pods = Self::new(Kind::SocketLb { preorder }, Driver::Systemd);
            pods.name.push_str("-podsorder");
            pods.env = vec![("CGROUP_ORDER".to_owned(), "pods".to_owned())];
            // A pre-order program at the root runs before the pods' cgroup's.
            pods.holding_blocked = preorder;
            cells.push(pods);
        }
        let mut v6 = Self::new(Kind::Nftables, Driver::Systemd);
        v6.name = "nftables-systemd-ipv6".to_owned();
        v6.ipv6 = true;
        cells.push(v6);
        cells
    }
}

/// What every cell shares.
#[derive(Clone, Debug)]
pub struct Settings {
    pub agent: PathBuf,
    pub scaler: PathBuf,
    /// How long the datapath takes to follow a change.
    pub lag: Duration,
    /// Logs and files of each cell, under a directory of its name.
    pub work: PathBuf,
    /// Rounds of the chain's wake-up, serial then pre-woken (at least 1).
    pub chain_rounds: u32,
}

/// One check's outcome: what was measured, either way.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub result: Result<String, String>,
}

impl Check {
    /// Runs a check, bounded in time (90 s).
    pub async fn run(
        name: &'static str,
        check: impl Future<Output = anyhow::Result<String>>,
    ) -> Self {
        Self::run_for(name, Duration::from_secs(90), check).await
    }

    /// Runs a check, bounded by `limit`.
    pub async fn run_for(
        name: &'static str,
        limit: Duration,
        check: impl Future<Output = anyhow::Result<String>>,
    ) -> Self {
        let result = match tokio::time::timeout(limit, check).await {
            Ok(Ok(detail)) => Ok(detail),
            Ok(Err(error)) => Err(brief(&format!("{error:#}"))),
            Err(_) => Err(format!("did not finish within {} s", limit.as_secs())),
        };
        Self { name, result }
    }

    pub fn passed(&self) -> bool {
        self.result.is_ok()
    }
}

/// At most a few lines of `text` (a verifier log can run to hundreds): its
/// start and its end, which say what failed and why.
pub fn brief(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 8 {
        return text.to_owned();
    }
    format!(
        "{}\n  [... {} lines ...]\n{}",
        lines[..3].join("\n"),
        lines.len() - 7,
        lines[lines.len() - 4..].join("\n")
    )
}

/// A cell's checks, or why it could not run.
pub struct CellReport {
    pub cell: Cell,
    pub checks: Result<Vec<Check>, String>,
    pub seconds: f64,
}

impl CellReport {
    pub fn passed(&self) -> bool {
        self.checks
            .as_ref()
            .is_ok_and(|checks| checks.iter().all(Check::passed))
    }
}

/// The matrix as a table (cells x checks), then every measured figure.
pub fn table(reports: &[CellReport]) -> String {
    let mut columns: Vec<&'static str> = Vec::new();
    for report in reports {
        for check in report.checks.iter().flatten() {
            if !columns.contains(&check.name) {
                columns.push(check.name);
            }
        }
    }
    let width = reports
        .iter()
        .map(|r| r.cell.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!("{:<width$}  {:<22}", "cell", "datapath");
    for column in &columns {
        out.push_str(&format!("  {column:<10}"));
    }
    out.push_str("  time\n");
    for report in reports {
        out.push_str(&format!(
            "{:<width$}  {:<22}",
            report.cell.name,
            report.cell.datapath.to_string()
        ));
        for column in &columns {
            let mark = match &report.checks {
                Err(_) => "SETUP",
                Ok(checks) => match checks.iter().find(|c| c.name == *column) {
                    Some(check) if check.passed() => "ok",
                    Some(_) => "FAIL",
                    None => "-",
                },
            };
            out.push_str(&format!("  {mark:<10}"));
        }
        out.push_str(&format!("  {:.1}s\n", report.seconds));
    }
    out.push('\n');
    for report in reports {
        match &report.checks {
            Err(error) => out.push_str(&format!("{}: could not run: {error}\n", report.cell.name)),
            Ok(checks) => {
                for check in checks {
                    let (mark, detail) = match &check.result {
                        Ok(detail) => ("ok", detail),
                        Err(detail) => ("FAIL", detail),
                    };
                    out.push_str(&format!(
                        "{}: {} {mark}: {detail}\n",
                        report.cell.name, check.name
                    ));
                }
            }
        }
    }
    out
}
