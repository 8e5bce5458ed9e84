//! Every setting of `itw-agent`: a flag, with the env var a Kubernetes manifest sets.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use itw_telemetry::{flags::bounded_duration, logging::LogFormat};

use crate::{
    capture::{CaptureMode, ExcludeComms},
    hold::HoldPolicy,
    resolve::parse_hold_timeout,
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

    /// File holding the bearer token the scaler expects from agents (a mounted Secret).
    #[arg(long, env = "SCALER_TOKEN_FILE", conflicts_with = "scaler_token")]
    pub scaler_token_file: Option<PathBuf>,

    /// The bearer token itself (prefer SCALER_TOKEN_FILE).
    #[arg(long, env = "SCALER_TOKEN", hide_env_values = true)]
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

    /// How often kernel counts are collected and sent as a batch. A destination
    /// going idle -> active is sent at once, not at the next tick.
    #[arg(long, env = "COLLECT_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    pub collect_interval: Duration,

    /// Distinct process names kept per destination; more are counted under
    /// the overflow name, so no process can blow up label cardinality.
    #[arg(long, env = "MAX_COMMS_PER_DESTINATION", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_comms_per_destination: u32,

    /// Kernel map size: destinations (IP:port) that can be watched.
    #[arg(long, env = "MAX_DESTINATIONS", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_destinations: u32,

    /// Kernel map size: (destination, process) counters. When full, attempts
    /// are still counted per destination under the overflow name.
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

    /// The cgroup of the pods (a child of the cgroup v2 root): the programs
    /// are attached there too, so they run before a socket load balancer
    /// attached to the root. Default: kubepods.slice or kubepods under the
    /// root, when present; `none` to attach to the root only.
    #[arg(long, env = "POD_CGROUP")]
    pub pod_cgroup: Option<String>,

    /// Log output: text or json.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
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
        assert_eq!(args.hold_mark, 0x2a7c);
    }

    #[test]
    fn exclude_comms_names_a_name_the_kernel_would_truncate() {
        let err = parse(&["--exclude-comms", "kube-controller-manager"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--exclude-comms"), "{msg}");
        assert!(msg.contains("\"kube-controller\""), "{msg}");
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
            (&["--hold-mark", "0xzz"][..], "--hold-mark"),
            (&["--hold-park-addr", "node"][..], "--hold-park-addr"),
            (&["--hold-park-addr6", "10.0.0.1"][..], "--hold-park-addr6"),
        ] {
            let msg = parse(args).unwrap_err().to_string();
            assert!(msg.contains(setting), "{args:?}: {msg}");
        }
    }
}
