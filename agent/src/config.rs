//! Every setting of `itw-agent`: a flag, with the env var a Kubernetes
//! manifest sets, and [`Args::config`], which checks them all into a
//! [`Config`].
//!
//! Owns flags -> settings and nothing else: the setting types belong to the
//! modules that use them. It never touches the kernel or the network, so a
//! bad setting fails the start before anything is attached.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use itw_proto::addr::HostPort;
use itw_telemetry::{flags::bounded_duration, logging::LogFormat};

use crate::{
    attribution::{DEFAULT_MAX_SOURCE_SERIES, SeriesSettings},
    capture::{CaptureMode, CaptureSettings, CgroupOrder, ExcludeComms, PodCgroup},
    hold::{HoldPolicy, HoldRequest},
    report::{self, ReportError, ReportSettings, TokenSource, ledger::LogLimits},
    resolve::{
        MapSource,
        kube::{KubeSettings, KubeSourceError},
        parse_hold_timeout,
    },
    sources::{SourceSettings, cgroups::CgroupLimits, exclude::SourceRules},
};

/// A feature setting that is on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// How long shutdown waits for scaler replicas to acknowledge the last batches.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often SCALER_ADDR is resolved again to follow replicas.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(15);
/// Bounds of the log of recent batches kept for resending to a replica
/// after a short break (by count and by size).
const LOG_LIMITS: LogLimits = LogLimits {
    max_batches: 3600,
    max_bytes: 4 << 20,
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "itw-agent",
    version,
    about = "Counts TCP connect attempts to Kubernetes Services and Pods with eBPF, for scale-from-zero"
)]
pub struct Args {
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9102")]
    pub metrics_addr: SocketAddr,

    /// Process names whose attempts are not counted as traffic (comma list;
    /// empty for none). They are counted apart in internal_tcp_filtered_total.
    #[arg(long, env = "EXCLUDE_COMMS", default_value = "kubelet")]
    pub exclude_comms: ExcludeComms,

    /// How connects are caught: auto picks cgroup where cgroup v2 is mounted,
    /// else kprobe, else tracepoint.
    #[arg(long, env = "CAPTURE_MODE", value_enum, default_value_t = CaptureMode::Auto)]
    pub capture_mode: CaptureMode,

    /// The cgroup v2 mount to attach cgroup programs to (default: detected from
    /// /proc/self/mountinfo).
    #[arg(long, env = "CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Where tracefs is (mounted there if it is not) for tracepoint mode.
    #[arg(long, env = "TRACEFS_PATH", default_value = "/sys/kernel/tracing")]
    pub tracefs_path: PathBuf,

    /// Name of this node, as the scaler reports it (downward API
    /// spec.nodeName; default: the host name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// A static service map (YAML) instead of the Kubernetes API, for local
    /// use and the demo. Reloaded on change and on SIGHUP.
    #[arg(long, env = "SERVICE_MAP")]
    pub service_map: Option<PathBuf>,

    /// Kubernetes source: only these namespaces (comma list; default all).
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,

    /// Kubernetes source: only Services matching this label selector.
    #[arg(long, env = "SERVICE_SELECTOR")]
    pub service_selector: Option<String>,

    /// Scaler gRPC address(es), host:port, comma-separated. A name resolving
    /// to several addresses (a headless Service) gets one stream per address.
    /// Unset: no scaler, /metrics only.
    #[arg(long, env = "SCALER_ADDR")]
    pub scaler_addr: Option<String>,

    /// A relay (itw-relay, host:port, e.g. its Service) to reach the scaler
    /// replicas through: each replica resolved from SCALER_ADDR still gets a
    /// stream of its own, sent to the relay naming the replica. Unset: the
    /// agent connects to every replica itself. TLS and the token apply to
    /// the relay as they would to the scaler.
    #[arg(long, env = "RELAY_ADDR", requires = "scaler_addr", value_parser = parse_relay_addr)]
    pub relay_addr: Option<HostPort>,

    /// File holding the bearer token the scaler expects from agents (a mounted Secret).
    #[arg(long, env = "SCALER_TOKEN_FILE", conflicts_with = "scaler_token")]
    pub scaler_token_file: Option<PathBuf>,

    /// The bearer token itself (prefer SCALER_TOKEN_FILE).
    #[arg(long, env = "SCALER_TOKEN", hide_env_values = true, value_parser = crate::report::checked_token)]
    pub scaler_token: Option<String>,

    /// CA bundle (PEM) to verify the scaler's certificate; enables TLS to the scaler.
    #[arg(long, env = "SCALER_CA_FILE")]
    pub scaler_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS with the scaler.
    #[arg(long, env = "SCALER_CERT_FILE", requires = "scaler_key_file")]
    pub scaler_cert_file: Option<PathBuf>,

    /// Client key (PEM) for mutual TLS with the scaler.
    #[arg(long, env = "SCALER_KEY_FILE", requires = "scaler_cert_file")]
    pub scaler_key_file: Option<PathBuf>,

    /// /readyz answers 503 once no stream to any scaler replica has been up
    /// for this long (since start, or since the last one went down); 0s:
    /// readiness ignores the scaler. Counting and reporting go on either way.
    #[arg(long, env = "SCALER_NOT_READY_AFTER", default_value = "5m", value_parser = parse_not_ready_after)]
    pub scaler_not_ready_after: Duration,

    /// How often kernel counts are collected and sent as a batch. A destination
    /// going idle -> active is sent at once, not at the next tick.
    #[arg(long, env = "COLLECT_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    pub collect_interval: Duration,

    /// Distinct process names kept per destination; more are counted under
    /// the overflow name, so no process can blow up label cardinality.
    #[arg(long, env = "MAX_COMMS_PER_DESTINATION", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_comms_per_destination: u32,

    /// `internal_tcp_source_attempts_total` (attempts per destination
    /// Service and calling workload): on, or off to keep only the seed's
    /// counter. Exclusion by source works either way.
    #[arg(long, env = "SOURCE_SERIES", value_enum, default_value_t = Switch::On)]
    pub source_series: Switch,

    /// Distinct (destination Service, source) series kept, and distinct
    /// sources counted as filtered; more count under the overflow source.
    #[arg(long, env = "MAX_SOURCE_SERIES", default_value_t = DEFAULT_MAX_SOURCE_SERIES as u32, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_source_series: u32,

    /// Kernel map size: destinations (IP:port) that can be watched.
    #[arg(long, env = "MAX_DESTINATIONS", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_destinations: u32,

    /// Kernel counters of (destination, caller's cgroup, process), each
    /// preallocated on every CPU (8 bytes per CPU). When all are taken,
    /// attempts are still counted per destination under the overflow name.
    #[arg(long, env = "MAX_ATTEMPT_COUNTERS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempt_counters: u32,

    /// Which Services have connects held while they have no ready endpoint:
    /// off, annotated (internal-tcp-watcher.io/hold: "true", or `hold: true`
    /// in a static map) or all. Needs the cgroup capture mode.
    #[arg(long, env = "HOLD", value_enum, default_value_t = HoldPolicy::Annotated)]
    pub hold: HoldPolicy,

    /// How long a connection is held before it is reset, unless the Service
    /// says otherwise (internal-tcp-watcher.io/hold-timeout).
    #[arg(long, env = "HOLD_TIMEOUT", default_value = "60s", value_parser = parse_hold_timeout)]
    pub hold_timeout: Duration,

    /// Address the parking listeners of held connections listen on: one
    /// every pod reaches, such as the node's IP (the downward API's
    /// status.hostIP), of either family. Default: the IPv4 address of the
    /// interface of the default route. Never a 127.x address when pods are
    /// to be held: it is each pod's own loopback.
    #[arg(long, env = "HOLD_PARK_ADDR")]
    pub hold_park_addr: Option<std::net::IpAddr>,

    /// A second, IPv6 parking address on a dual-stack node (IPv6 ClusterIPs
    /// are held only with an IPv6 parking address).
    #[arg(long, env = "HOLD_PARK_ADDR6")]
    pub hold_park_addr6: Option<std::net::Ipv6Addr>,

    /// Socket mark of the agent's own connects to held Services (after
    /// release), so its programs neither count nor hold them. Pick a value no
    /// CNI rule on the node matches (decimal or 0x-hex).
    #[arg(long, env = "HOLD_MARK", default_value = "0x2a7c", value_parser = parse_mark)]
    pub hold_mark: u32,

    /// Connections parked at once for one Service; past it a connect goes
    /// on unheld (refused as without holding) and is counted.
    #[arg(long, env = "HOLD_MAX_PER_SERVICE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub hold_max_per_service: u32,

    /// Connections parked at once on this node, all Services together.
    #[arg(long, env = "HOLD_MAX_PER_NODE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub hold_max_per_node: u32,

    /// Bytes of what parked clients sent that the agent keeps, all
    /// connections together (each keeps at most 64 KiB); past it, the
    /// clients' own socket buffers and TCP flow control hold the rest.
    /// Bytes, or with a Ki/Mi suffix.
    #[arg(long, env = "HOLD_MAX_BUFFERED_BYTES", default_value = "16Mi", value_parser = parse_bytes)]
    pub hold_max_buffered_bytes: usize,

    /// Where the node's pod network namespaces are (the container runtime's
    /// netns files): a released connection is made from its client's.
    #[arg(long, env = "HOLD_NETNS_DIR", default_value = "/var/run/netns")]
    pub hold_netns_dir: PathBuf,

    /// How the connect programs run before other programs of their hook
    /// (a socket load balancer's): first (pre-order at the root, Linux
    /// 6.15+), pods (attached to the pods' cgroup too), or auto (first where
    /// the kernel offers it).
    #[arg(long, env = "CGROUP_ORDER", value_enum, default_value_t)]
    pub cgroup_order: CgroupOrder,

    /// The cgroup of the pods (a child of the cgroup v2 root), for
    /// CGROUP_ORDER=pods: the programs are attached there too, so they run
    /// before a socket load balancer attached to the root. Default:
    /// kubepods.slice or kubepods under the root, when present; `none` to
    /// attach to the root only.
    #[arg(long, env = "POD_CGROUP")]
    pub pod_cgroup: Option<String>,

    /// How long an edge "Service A calls Service B" is kept after it was
    /// last seen (or declared by internal-tcp-watcher.io/wakes); it is sent
    /// to the scalers when new and again at most once per quarter of this.
    /// Keep it equal to the scalers' EDGE_MAX_AGE.
    #[arg(long, env = "EDGE_MAX_AGE", default_value = "24h", value_parser = parse_edge_max_age)]
    pub edge_max_age: Duration,

    /// Most edges held (about 200 bytes each); past it new edges are not
    /// reported, counted in itw_agent_edges_refused_total. Keep it at or
    /// below the scalers' MAX_EDGES: a snapshot with more is refused.
    #[arg(long, env = "MAX_EDGES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_edges: u32,
    /// Callers whose attempts are not demand, for every Service (comma
    /// list): a namespace (`monitoring`, or `monitoring/*`), a workload
    /// (`default/uptime-checker`), or `node` for callers outside every pod.
    /// Counted as filtered, never a wake. Kubernetes source only.
    #[arg(long, env = "EXCLUDE_SOURCES", default_value = "")]
    pub exclude_sources: SourceRules,

    /// Pod cgroups indexed at most for source attribution; past it, the
    /// rest are attributed to the node (counted in
    /// itw_agent_sources_cgroups_left_out_total).
    #[arg(long, env = "SOURCE_MAX_CGROUPS", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub source_max_cgroups: u32,

    /// A cgroup id not indexed yet rescans the pods' cgroups at most this
    /// often (a fresh container's connects in between count as the node's).
    #[arg(long, env = "SOURCE_RESCAN_INTERVAL", default_value = "1s", value_parser = parse_rescan_interval)]
    pub source_rescan_interval: Duration,

    /// Log output: text or json.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl Args {
    /// The settings the agent runs with, every one checked: a bad value is
    /// an error naming its flag's env var and the value.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let node_name = match &self.node_name {
            Some(name) => name.clone(),
            None => host_name()?,
        };
        let service_map = match &self.service_map {
            Some(path) => MapSource::File(path.clone()),
            None => MapSource::Kube(KubeSettings::new(
                &self.watch_namespaces,
                self.service_selector.as_deref(),
            )?),
        };
        let report = match &self.scaler_addr {
            Some(scalers) => Some(self.report_settings(scalers, &node_name)?),
            None => None,
        };
        let hold = (self.hold != HoldPolicy::Off).then_some(HoldRequest {
            policy: self.hold,
            default_timeout: self.hold_timeout,
            park_addr: self.hold_park_addr,
            park_addr6: self.hold_park_addr6,
            mark: self.hold_mark,
            max_per_service: self.hold_max_per_service,
            max_per_node: self.hold_max_per_node,
            max_buffered_bytes: self.hold_max_buffered_bytes,
            netns_dir: self.hold_netns_dir.clone(),
        });
        Ok(Config {
            metrics_addr: self.metrics_addr,
            node_name,
            capture: CaptureSettings {
                cgroup_root: self.cgroup_root.clone(),
                tracefs_path: self.tracefs_path.clone(),
                max_destinations: self.max_destinations,
                max_attempt_counters: self.max_attempt_counters,
                cgroup_order: self.cgroup_order,
                pod_cgroup: PodCgroup::parse(self.pod_cgroup.as_deref()),
                ..CaptureSettings::new(self.capture_mode)
            },
            exclude: self.exclude_comms.clone(),
            max_comms_per_destination: self.max_comms_per_destination as usize,
            source_series: SeriesSettings {
                series: self.source_series == Switch::On,
                max_series: self.max_source_series as usize,
            },
            collect_interval: self.collect_interval,
            service_map,
            report,
            scaler_not_ready_after: self.scaler_not_ready_after,
            hold,
            sources: SourceSettings {
                exclude: self.exclude_sources.clone(),
                limits: CgroupLimits {
                    max_cgroups: self.source_max_cgroups as usize,
                    min_rescan: self.source_rescan_interval,
                },
            },
        })
    }

    fn report_settings(
        &self,
        scalers: &str,
        node_name: &str,
    ) -> Result<ReportSettings, ConfigError> {
        let scalers = HostPort::parse_list(scalers, "itw-scaler-ingest.itw-system:9090")
            .map_err(ConfigError::ScalerAddr)?;
        let token = match (&self.scaler_token_file, &self.scaler_token) {
            (Some(path), _) => TokenSource::File(path.clone()),
            (None, Some(token)) => TokenSource::Value(token.clone()),
            (None, None) => TokenSource::None,
        };
        let tls = match &self.scaler_ca_file {
            Some(ca) => Some(report::TlsFiles::read(
                ca,
                self.scaler_cert_file
                    .as_deref()
                    .zip(self.scaler_key_file.as_deref()),
            )?),
            None => None,
        };
        let settings = ReportSettings {
            scalers,
            relay: self.relay_addr.clone(),
            node_name: node_name.to_owned(),
            instance_id: uuid::Uuid::new_v4().to_string(),
            instance_secret: report::InstanceSecret::random(),
            token,
            tls,
            resolve_interval: RESOLVE_INTERVAL,
            flush_timeout: FLUSH_TIMEOUT,
            log_limits: LOG_LIMITS,
            edge_limits: crate::edges::EdgeLimits {
                max_edges: self.max_edges as usize,
                max_age: self.edge_max_age,
            },
        };
        // A missing, empty or unsendable token file stops the start, naming
        // SCALER_TOKEN_FILE; it is read again on every connect (rotation).
        settings.check_token()?;
        Ok(settings)
    }
}

/// What the agent runs with; [`Args::config`] builds it from flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// `METRICS_ADDR`: /metrics, /healthz and /readyz.
    pub metrics_addr: SocketAddr,
    /// `NODE_NAME`, or the host name.
    pub node_name: String,
    /// How connects are caught; `hold` is left unset, for the agent to
    /// settle on the host.
    pub capture: CaptureSettings,
    /// `EXCLUDE_COMMS`.
    pub exclude: ExcludeComms,
    /// `MAX_COMMS_PER_DESTINATION`.
    pub max_comms_per_destination: usize,
    /// `SOURCE_SERIES` and `MAX_SOURCE_SERIES`.
    pub source_series: SeriesSettings,
    /// `COLLECT_INTERVAL`.
    pub collect_interval: Duration,
    /// `SERVICE_MAP`, or the Kubernetes API.
    pub service_map: MapSource,
    /// `SCALER_ADDR` and its token and TLS; `None`: /metrics only.
    pub report: Option<ReportSettings>,
    /// `SCALER_NOT_READY_AFTER` (zero: readiness ignores the scaler).
    pub scaler_not_ready_after: Duration,
    /// `HOLD` and its settings; `None`: `HOLD=off`.
    pub hold: Option<HoldRequest>,
    /// `EXCLUDE_SOURCES`, `SOURCE_MAX_CGROUPS`, `SOURCE_RESCAN_INTERVAL`.
    pub sources: SourceSettings,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("NODE_NAME is not set and the host name cannot be read")]
    HostName(#[source] std::io::Error),
    /// `WATCH_NAMESPACES` or `SERVICE_SELECTOR`.
    #[error(transparent)]
    Kube(#[from] KubeSourceError),
    #[error("SCALER_ADDR: {0}")]
    ScalerAddr(String),
    /// A `SCALER_*_FILE` that cannot be read.
    #[error(transparent)]
    Report(#[from] ReportError),
}

fn host_name() -> Result<String, ConfigError> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(ConfigError::HostName)?;
    Ok(name.trim().to_owned())
}

/// A byte count (`itw_telemetry::flags::bytes`) of at least 64 KiB.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let n = itw_telemetry::flags::bytes(s)?;
    if n < 64 * 1024 {
        return Err(format!(
            "{:?}: at least 64Ki (one connection's buffer), at most what fits a usize",
            s.trim()
        ));
    }
    Ok(n)
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(0) => Err("0 is no mark (every socket has it)".to_owned()),
        Ok(mark) => Ok(mark),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn parse_relay_addr(s: &str) -> Result<HostPort, String> {
    HostPort::parse(s, "itw-relay.itw-system:9090")
}

fn parse_not_ready_after(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    bounded_duration(
        s,
        Duration::ZERO,
        Duration::from_secs(24 * 3600),
        "0s, 5m, 1h",
    )
}

/// At least 10 minutes: edges are refreshed once per quarter of the age,
/// and looked at once a minute while nothing is collected.
fn parse_edge_max_age(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        Duration::from_secs(600),
        Duration::from_secs(30 * 24 * 3600),
        "24h, 2h, 30m",
    )
}

fn parse_rescan_interval(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        Duration::from_millis(10),
        Duration::from_secs(60),
        "1s, 200ms",
    )
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        Duration::from_millis(10),
        Duration::from_secs(60),
        "1s, 500ms",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("itw-agent").chain(args.iter().copied()))
    }

    /// #13 item 9: a token file the agent cannot send from stops the start,
    /// naming SCALER_TOKEN_FILE, instead of streams failing in the background.
    #[test]
    fn a_missing_or_empty_token_file_stops_the_start() {
        let error = |args: &[&str]| checked(args).unwrap_err().to_string();
        let missing = error(&[
            "--scaler-addr=127.0.0.1:9090",
            "--scaler-token-file=/nonexistent/itw-token",
        ]);
        assert_eq!(
            missing,
            "SCALER_TOKEN_FILE /nonexistent/itw-token: No such file or directory (os error 2)"
        );
        let dir = std::env::temp_dir().join(format!("itw-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "\n").unwrap();
        let arg = format!("--scaler-token-file={}", file.display());
        assert_eq!(
            error(&["--scaler-addr=127.0.0.1:9090", &arg]),
            format!(
                "SCALER_TOKEN_FILE {}: the token is empty; unset it when the scaler asks for none",
                file.display()
            )
        );
        std::fs::write(&file, "jetón\n").unwrap();
        assert_eq!(
            error(&["--scaler-addr=127.0.0.1:9090", &arg]),
            format!(
                "SCALER_TOKEN_FILE {}: the token holds 'ó': a bearer token is printable ASCII without spaces (a gRPC header cannot carry anything else)",
                file.display()
            )
        );
        std::fs::write(&file, "s3cret\n").unwrap();
        let config = checked(&["--scaler-addr=127.0.0.1:9090", &arg]).unwrap();
        assert!(config.report.is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn scaler_not_ready_after_defaults_to_5m_and_0_turns_it_off() {
        let config = checked(&[]).unwrap();
        assert_eq!(config.scaler_not_ready_after, Duration::from_secs(300));
        let config = checked(&["--scaler-not-ready-after=0"]).unwrap();
        assert_eq!(config.scaler_not_ready_after, Duration::ZERO);
        let config = checked(&["--scaler-not-ready-after=90s"]).unwrap();
        assert_eq!(config.scaler_not_ready_after, Duration::from_secs(90));
        let error = parse(&["--scaler-not-ready-after=2d"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--scaler-not-ready-after <SCALER_NOT_READY_AFTER>")
                && error.contains("\"2d\": must be between 0s and 1day"),
            "{error}"
        );
    }

    /// #13 item 9: a token the agent could never send is refused at start,
    /// naming the setting.
    #[test]
    fn a_non_ascii_token_is_refused_naming_the_setting() {
        let error = parse(&["--scaler-token=jetón"]).unwrap_err().to_string();
        assert!(error.contains("--scaler-token <SCALER_TOKEN>"), "{error}");
        assert!(
            error.contains("the token holds 'ó': a bearer token is printable ASCII without spaces"),
            "{error}"
        );
        assert_eq!(
            parse(&["--scaler-token= s3cret\n"])
                .unwrap()
                .scaler_token
                .as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn defaults_work_with_no_settings() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.metrics_addr, "0.0.0.0:9102".parse().unwrap());
        assert_eq!(args.exclude_comms, ExcludeComms(vec!["kubelet".into()]));
        assert_eq!(args.capture_mode, CaptureMode::Auto);
        assert_eq!(args.collect_interval, Duration::from_secs(1));
        assert_eq!(args.scaler_addr, None);
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.hold, HoldPolicy::Annotated);
        assert_eq!(args.hold_timeout, Duration::from_secs(60));
        assert_eq!(args.source_series, Switch::On);
        assert_eq!(args.max_source_series, 1024);
        assert_eq!(args.hold_mark, 0x2a7c);
        assert_eq!(args.edge_max_age, Duration::from_secs(24 * 3600));
        assert_eq!(args.max_edges, 10_000);
        assert_eq!(
            crate::edges::EdgeLimits::default(),
            crate::edges::EdgeLimits {
                max_edges: args.max_edges as usize,
                max_age: args.edge_max_age,
            }
        );
    }

    #[test]
    fn edge_settings() {
        let args = parse(&["--edge-max-age=2h", "--max-edges=5"]).unwrap();
        assert_eq!(args.edge_max_age, Duration::from_secs(7200));
        assert_eq!(args.max_edges, 5);
        let err = parse(&["--edge-max-age=10s"]).unwrap_err().to_string();
        assert!(err.contains("--edge-max-age"), "{err}");
        assert!(err.contains("10m"), "{err}");
        assert!(parse(&["--max-edges=0"]).is_err());
    }

    #[test]
    fn exclude_comms_names_a_name_the_kernel_would_truncate() {
        let err = parse(&["--exclude-comms", "kube-controller-manager"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--exclude-comms"), "{msg}");
        assert!(msg.contains("\"kube-controller\""), "{msg}");
    }

    /// The checked settings of `args`, with a node name so the host's is not needed.
    fn checked(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["--node-name", "node-a"];
        all.extend_from_slice(args);
        parse(&all).unwrap().config()
    }

    #[test]
    fn source_series_can_be_turned_off_and_capped() {
        assert_eq!(
            checked(&[]).unwrap().source_series,
            SeriesSettings::default()
        );
        let config = checked(&["--source-series", "off", "--max-source-series", "10"]).unwrap();
        assert_eq!(
            config.source_series,
            SeriesSettings {
                series: false,
                max_series: 10
            }
        );
        let error = parse(&["--max-source-series", "0"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--max-source-series"), "{error}");
        let error = parse(&["--source-series", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--source-series"), "{error}");
    }

    #[test]
    fn defaults_make_a_config_watching_kubernetes() {
        let config = checked(&[]).unwrap();
        assert_eq!(config.node_name, "node-a");
        assert_eq!(config.capture, CaptureSettings::new(CaptureMode::Auto));
        assert!(matches!(config.service_map, MapSource::Kube(_)));
        assert!(config.report.is_none());
        assert_eq!(
            config.hold,
            Some(HoldRequest {
                policy: HoldPolicy::Annotated,
                default_timeout: Duration::from_secs(60),
                park_addr: None,
                park_addr6: None,
                mark: 0x2a7c,
                max_per_service: 256,
                max_per_node: 1024,
                max_buffered_bytes: 16 << 20,
                netns_dir: PathBuf::from("/var/run/netns"),
            })
        );
        assert_eq!(checked(&["--hold", "off"]).unwrap().hold, None);
        assert!(config.sources.exclude.is_empty());
        assert_eq!(
            config.sources.limits,
            CgroupLimits {
                max_cgroups: 8192,
                min_rescan: Duration::from_secs(1),
            }
        );
    }

    #[test]
    fn exclude_sources_names_the_bad_entry() {
        let config = checked(&["--exclude-sources", "monitoring,default/uptime-checker"]).unwrap();
        assert_eq!(
            config.sources.exclude.to_string(),
            "monitoring,default/uptime-checker"
        );
        let err = parse(&["--exclude-sources", "monitoring,kube_system"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--exclude-sources"), "{msg}");
        assert!(
            msg.contains("\"kube_system\": namespace not a Kubernetes namespace name"),
            "{msg}"
        );
        let err = parse(&["--source-rescan-interval", "5ms"]).unwrap_err();
        assert!(
            err.to_string().contains("--source-rescan-interval"),
            "{err}"
        );
        let err = parse(&["--source-max-cgroups", "0"]).unwrap_err();
        assert!(err.to_string().contains("--source-max-cgroups"), "{err}");
    }

    #[test]
    fn a_bad_namespace_in_watch_namespaces_fails_naming_it() {
        let err = checked(&["--watch-namespaces", "shop,Shop_2"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "WATCH_NAMESPACES: \"Shop_2\": not a Kubernetes namespace name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
        );
    }

    #[test]
    fn a_bad_service_selector_fails_naming_it() {
        let err = checked(&["--service-selector", "env in (a"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SERVICE_SELECTOR=\"env in (a\": unbalanced '('"
        );
    }

    #[test]
    fn a_static_map_needs_no_kubernetes_settings() {
        // As before: WATCH_NAMESPACES and SERVICE_SELECTOR only concern the
        // Kubernetes source.
        let config = checked(&[
            "--service-map",
            "/etc/itw/map.yaml",
            "--service-selector",
            "env in (a",
        ])
        .unwrap();
        assert!(matches!(
            config.service_map,
            MapSource::File(path) if path == std::path::Path::new("/etc/itw/map.yaml")
        ));
    }

    #[test]
    fn a_bad_scaler_addr_fails_naming_it() {
        let err = checked(&["--scaler-addr", "itw-scaler"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SCALER_ADDR: \"itw-scaler\" has no port; use host:port, e.g. itw-scaler-ingest.itw-system:9090"
        );
        let report = checked(&["--scaler-addr", "itw-scaler:9090"])
            .unwrap()
            .report
            .unwrap();
        assert_eq!(report.scalers[0].to_string(), "itw-scaler:9090");
        assert_eq!(report.node_name, "node-a");
    }

    #[test]
    fn a_relay_is_taken_only_with_a_scaler_and_a_port() {
        let report = checked(&[
            "--scaler-addr",
            "itw-scaler-headless:9090",
            "--relay-addr",
            "itw-relay.itw-system:9090",
        ])
        .unwrap()
        .report
        .unwrap();
        assert_eq!(
            report.relay.map(|r| r.to_string()).as_deref(),
            Some("itw-relay.itw-system:9090")
        );
        assert_eq!(report.scalers[0].to_string(), "itw-scaler-headless:9090");

        let err = parse(&["--scaler-addr", "s:1", "--relay-addr", "itw-relay"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "\"itw-relay\" has no port; use host:port, e.g. itw-relay.itw-system:9090"
            ),
            "{err}"
        );
        // A relay without replicas to name would relay nothing.
        let err = parse(&["--relay-addr", "itw-relay:9090"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--scaler-addr <SCALER_ADDR>"), "{err}");
    }

    #[test]
    fn an_unreadable_tls_file_fails_naming_it() {
        let err = checked(&[
            "--scaler-addr",
            "itw-scaler:9090",
            "--scaler-ca-file",
            "/nonexistent/ca.pem",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("SCALER_CA_FILE /nonexistent/ca.pem: "),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (args, setting) in [
            (&["--capture-mode", "xdp"][..], "--capture-mode"),
            (&["--metrics-addr", "9102"][..], "--metrics-addr"),
            (&["--collect-interval", "5ms"][..], "--collect-interval"),
            (&["--collect-interval", "soon"][..], "--collect-interval"),
            (
                &["--max-comms-per-destination", "0"][..],
                "--max-comms-per-destination",
            ),
            (&["--scaler-cert-file", "c.pem"][..], "--scaler-key-file"),
            (&["--hold", "sometimes"][..], "--hold"),
            (&["--hold-timeout", "500ms"][..], "--hold-timeout"),
            (&["--hold-timeout", "2h"][..], "--hold-timeout"),
            (&["--hold-mark", "0"][..], "--hold-mark"),
            (&["--hold-max-per-node", "0"][..], "--hold-max-per-node"),
            (
                &["--hold-max-buffered-bytes", "1Ki"][..],
                "--hold-max-buffered-bytes",
            ),
            (
                &["--hold-max-buffered-bytes", "16MB"][..],
                "--hold-max-buffered-bytes",
            ),
            (&["--hold-mark", "0xzz"][..], "--hold-mark"),
            (&["--hold-park-addr", "node"][..], "--hold-park-addr"),
            (&["--hold-park-addr6", "10.0.0.1"][..], "--hold-park-addr6"),
        ] {
            let msg = parse(args).unwrap_err().to_string();
            assert!(msg.contains(setting), "{args:?}: {msg}");
        }
    }
}
