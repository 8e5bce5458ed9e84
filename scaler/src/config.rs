//! Every setting of `itw-scaler`: a flag, with the env var the deploy manifests set.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
pub use itw_proto::token::{Secret, TokenSource};
use itw_telemetry::{
    flags::{self, bounded_duration},
    logging::LogFormat,
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "itw-scaler",
    version,
    about = "Sums the agents' TCP connect attempts per Service and serves them to KEDA as an external scaler"
)]
pub struct Args {
    /// gRPC address: KEDA's external scaler, the agents' ingest stream, health and reflection.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:9090")]
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP endpoint serving /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9102")]
    pub metrics_addr: SocketAddr,

    /// File holding the bearer token agents must send (a mounted Secret);
    /// re-read when it changes, so rotating the Secret needs no restart.
    #[arg(long, env = "AGENT_TOKEN_FILE", conflicts_with = "agent_token")]
    pub agent_token_file: Option<PathBuf>,

    /// The bearer token itself (prefer AGENT_TOKEN_FILE). Unset, with no
    /// file either: agents are not asked for a token.
    #[arg(long, env = "AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<Secret>,

    /// Certificate chain (PEM) of the gRPC port; with TLS_KEY_FILE, serves TLS.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// Private key (PEM) of TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// CA bundle (PEM): every client must present a certificate it signed
    /// (mutual TLS; KEDA's tlsClientCert/tlsClientKey).
    #[arg(long, env = "TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Longest trigger window accepted, and the most per-second history kept
    /// per destination (whole seconds, 1s to 1h).
    #[arg(long, env = "MAX_WINDOW", default_value = "15m", value_parser = parse_max_window)]
    pub max_window: Duration,

    /// Most internal_tcp_attempts_total series per pod and process; beyond it
    /// new ones are counted in their service's "(other processes)" series.
    #[arg(long, env = "MAX_SERIES", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_series: u32,

    /// Most destinations (namespace, service, port) with a window; beyond it
    /// new destinations are counted in totals but not windowed.
    #[arg(long, env = "MAX_DESTINATIONS", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_destinations: u32,

    /// Most non-empty per-second counts held in all windows together (16
    /// bytes each); past it a window gaining a second forgets its own
    /// oldest, so long windows under-report before new attempts go missing.
    #[arg(long, env = "MAX_WINDOW_BUCKETS", default_value_t = 2_000_000, value_parser = clap::value_parser!(u32).range(1_000..=100_000_000))]
    pub max_window_buckets: u32,

    /// Most Services with series (each has its zero and overflow series);
    /// past it a new Service's entries are refused, counted in
    /// itw_scaler_refused_entries_total{reason="max_services"}.
    #[arg(long, env = "MAX_SERVICES", default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_services: u32,

    /// Most Services one agent instance may report; past it entries for
    /// further Services of that instance are refused, counted in
    /// itw_scaler_refused_entries_total{reason="max_services_per_agent"}.
    #[arg(long, env = "MAX_SERVICES_PER_AGENT", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_services_per_agent: u32,

    /// Largest message an agent may send (a snapshot is the big one);
    /// bytes or Ki/Mi, 64Ki to 256Mi. A larger one ends its stream.
    #[arg(long, env = "MAX_REPORT_BYTES", default_value = "16Mi", value_parser = parse_report_bytes)]
    pub max_report_bytes: usize,

    /// How long a disconnected agent instance is kept (so a reconnect resumes
    /// it) before its totals are folded into the retired sums. An instance
    /// whose node already has a newer connected instance is folded at once.
    #[arg(long, env = "INSTANCE_RETENTION", default_value = "1h", value_parser = parse_retention)]
    pub instance_retention: Duration,

    /// How long a folded instance (gone past INSTANCE_RETENTION, or replaced)
    /// is remembered (node, secret, sequence and totals) so that if it comes
    /// back its snapshot replaces what was folded instead of adding to it.
    #[arg(long, env = "FOLDED_RETENTION", default_value = "24h", value_parser = parse_retention)]
    pub folded_retention: Duration,

    /// Most folded instances remembered; past it the oldest is forgotten
    /// (itw_scaler_folded_instances_forgotten_total): should it ever come
    /// back, its counts would be added again.
    #[arg(long, env = "MAX_FOLDED_INSTANCES", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_folded_instances: u32,

    /// Most KEDA StreamIsActive and StreamMetricSpec streams open at once
    /// (about 11 KiB each); past it a new one is RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_KEDA_STREAMS", default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_keda_streams: u32,

    /// Most concurrent HTTP/2 streams on one gRPC connection (KEDA keeps one
    /// per external-push trigger on a shared connection).
    #[arg(long, env = "MAX_STREAMS_PER_CONNECTION", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_streams_per_connection: u32,

    /// Most gRPC connections open at once (agents, KEDA, anyone); past it a
    /// new connection is closed as it arrives. Keep it below the open-files
    /// limit (the scaler raises its soft limit to the hard one at start).
    #[arg(long, env = "GRPC_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub grpc_max_connections: u32,

    /// A gRPC connection whose peer sends nothing for this long is closed:
    /// an idle socket, a stalled TLS handshake or preface. Live clients
    /// answer the scaler's HTTP/2 pings (every 30s), so keep it above 40s.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "90s", value_parser = parse_idle_timeout)]
    pub idle_timeout: Duration,

    /// HTTP/2 receive window of each gRPC stream and connection: the most a
    /// peer may send that the scaler has not read yet (bytes or Ki/Mi, 16Ki
    /// to 16Mi). It bounds what thousands of agent connections can queue in
    /// a replica that falls behind; a steady batch (about 1 KB) flows in one
    /// round trip, a snapshot in about its size / window round trips.
    #[arg(long, env = "GRPC_WINDOW", default_value = "64Ki", value_parser = parse_grpc_window)]
    pub grpc_window: u32,

    /// Most agent streams live at once on one Relay stream (from one relay);
    /// past it a new relayed stream alone ends RESOURCE_EXHAUSTED, counted in
    /// itw_scaler_relayed_streams_refused_total{reason="max_relayed_streams"}.
    #[arg(long, env = "MAX_RELAYED_STREAMS", default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_relayed_streams: u32,

    /// Longest an ack of an ordinary batch waits on a Relay stream to leave
    /// with the others (0 to 100ms; 0 sends each at once). Each burst is one
    /// wake-up of a serving thread instead of one per ack; nothing waits on
    /// such an ack. Welcomes, `ended` and a wake batch's ack never wait.
    #[arg(long, env = "RELAY_ACK_DELAY", default_value = "5ms", value_parser = parse_relay_ack_delay)]
    pub relay_ack_delay: Duration,

    /// Most deltas in one batch from an agent; a larger batch ends its stream.
    #[arg(long, env = "MAX_BATCH_DELTAS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_batch_deltas: u32,

    /// Threads of their own for the agents' report streams (0 to 64), so
    /// the kernel, which preempts, shares the cores between decoding
    /// thousands of agents' batches and answering KEDA, rather than a KEDA
    /// call queueing behind every ready stream. 0 runs the streams on the
    /// threads that serve KEDA.
    #[arg(long, env = "INGEST_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=64))]
    pub ingest_threads: u16,

    /// How long an edge of the dependency graph (Service A calls Service B)
    /// is kept after an agent last saw the call (or the wakes annotation):
    /// long enough that a chain idle overnight still pre-wakes in the
    /// morning, short enough that a call removed from the code stops waking
    /// its callee within a day.
    #[arg(long, env = "EDGE_MAX_AGE", default_value = "24h", value_parser = parse_retention)]
    pub edge_max_age: Duration,

    /// Most edges of the dependency graph held (about 200 bytes each); past
    /// it new edges are refused, counted in
    /// itw_scaler_refused_entries_total{reason="max_edges"}.
    #[arg(long, env = "MAX_EDGES", default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_edges: u32,

    /// Log output: text or json (filter with RUST_LOG).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl Args {
    /// The settings the library runs with.
    pub fn config(&self) -> Config {
        let agent_token = match (&self.agent_token_file, &self.agent_token) {
            (Some(path), _) => TokenSource::File(path.clone()),
            (None, Some(token)) => TokenSource::Value(token.clone()),
            (None, None) => TokenSource::None,
        };
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca_file.clone(),
            }),
            _ => None,
        };
        Config {
            grpc_addr: self.grpc_addr,
            metrics_addr: self.metrics_addr,
            agent_token,
            tls,
            ingest_threads: usize::from(self.ingest_threads),
            limits: Limits {
                max_window: self.max_window,
                max_series: self.max_series as usize,
                max_destinations: self.max_destinations as usize,
                max_window_buckets: self.max_window_buckets as usize,
                max_services: self.max_services as usize,
                max_services_per_agent: self.max_services_per_agent as usize,
                max_report_bytes: self.max_report_bytes,
                instance_retention: self.instance_retention,
                folded_retention: self.folded_retention,
                max_folded_instances: self.max_folded_instances as usize,
                max_keda_streams: self.max_keda_streams as usize,
                max_streams_per_connection: self.max_streams_per_connection,
                grpc_max_connections: self.grpc_max_connections as usize,
                idle_timeout: self.idle_timeout,
                grpc_window: self.grpc_window,
                max_batch_deltas: self.max_batch_deltas as usize,
                max_relayed_streams: self.max_relayed_streams as usize,
                relay_ack_delay: self.relay_ack_delay,
                edge_max_age: self.edge_max_age,
                max_edges: self.max_edges as usize,
            },
        }
    }
}

/// What the scaler runs with; [`Args::config`] builds it from flags, tests build it directly.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub agent_token: TokenSource,
    pub tls: Option<TlsFiles>,
    /// Threads of the report streams' own runtime; 0: the serving runtime's.
    pub ingest_threads: usize,
    pub limits: Limits,
}

impl Default for Config {
    /// The defaults of the flags.
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 9102)),
            agent_token: TokenSource::None,
            tls: None,
            ingest_threads: 1,
            limits: Limits::default(),
        }
    }
}

/// Bounds on what the scaler holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_window: Duration,
    pub max_series: usize,
    pub max_destinations: usize,
    pub max_window_buckets: usize,
    pub max_services: usize,
    pub max_services_per_agent: usize,
    pub max_report_bytes: usize,
    pub instance_retention: Duration,
    pub folded_retention: Duration,
    pub max_folded_instances: usize,
    pub max_keda_streams: usize,
    pub max_streams_per_connection: u32,
    pub grpc_max_connections: usize,
    pub idle_timeout: Duration,
    pub grpc_window: u32,
    pub max_batch_deltas: usize,
    pub max_relayed_streams: usize,
    /// RELAY_ACK_DELAY ([`crate::relay::outbox`]).
    pub relay_ack_delay: Duration,
    pub edge_max_age: Duration,
    pub max_edges: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_window: Duration::from_secs(15 * 60),
            max_series: 100_000,
            max_destinations: 100_000,
            max_window_buckets: 2_000_000,
            max_services: 50_000,
            max_services_per_agent: 20_000,
            max_report_bytes: 16 << 20,
            instance_retention: Duration::from_secs(3600),
            folded_retention: Duration::from_secs(24 * 3600),
            max_folded_instances: 20_000,
            max_keda_streams: 5_000,
            max_streams_per_connection: 1_000,
            grpc_max_connections: 16_384,
            idle_timeout: Duration::from_secs(90),
            grpc_window: 64 << 10,
            max_batch_deltas: 10_000,
            max_relayed_streams: 4_096,
            relay_ack_delay: Duration::from_millis(5),
            edge_max_age: Duration::from_secs(24 * 3600),
            max_edges: 50_000,
        }
    }
}

/// PEM files of the gRPC port's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// What a duration flag's error suggests.
const DURATION_EXAMPLES: &str = "90s, 15m, 1h";

fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        Duration::from_millis(100),
        Duration::from_secs(24 * 3600),
        DURATION_EXAMPLES,
    )
}

fn parse_relay_ack_delay(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        Duration::ZERO,
        Duration::from_millis(100),
        "0, 5ms, 20ms",
    )
}

fn parse_max_window(s: &str) -> Result<Duration, String> {
    let d = bounded_duration(
        s,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        DURATION_EXAMPLES,
    )?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: must be a whole number of seconds"));
    }
    Ok(d)
}

fn parse_report_bytes(s: &str) -> Result<usize, String> {
    let n = flags::bytes(s)?;
    if !(64 << 10..=256 << 20).contains(&n) {
        return Err(format!("{:?}: must be between 64Ki and 256Mi", s.trim()));
    }
    Ok(n)
}

fn parse_grpc_window(s: &str) -> Result<u32, String> {
    let n = flags::bytes(s)?;
    if !(16 << 10..=16 << 20).contains(&n) {
        return Err(format!("{:?}: must be between 16Ki and 16Mi", s.trim()));
    }
    // The range keeps it far below u32::MAX.
    Ok(n as u32)
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        Duration::from_secs(1),
        Duration::from_secs(30 * 24 * 3600),
        DURATION_EXAMPLES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("itw-scaler").chain(args.iter().copied()))
    }

    fn error(args: &[&str]) -> String {
        parse(args).unwrap_err().to_string()
    }

    #[test]
    fn defaults_match_config_default() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.config(), Config::default());
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(Config::default().grpc_addr.to_string(), "0.0.0.0:9090");
        assert_eq!(Config::default().metrics_addr.to_string(), "0.0.0.0:9102");
    }

    #[test]
    fn every_flag() {
        let args = parse(&[
            "--grpc-addr=127.0.0.1:1",
            "--metrics-addr=127.0.0.1:2",
            "--agent-token= s3cret\n",
            "--tls-cert-file=/c.pem",
            "--tls-key-file=/k.pem",
            "--tls-client-ca-file=/ca.pem",
            "--max-window=2m",
            "--max-series=5",
            "--max-destinations=6",
            "--max-window-buckets=1000",
            "--max-services=12",
            "--max-services-per-agent=13",
            "--max-report-bytes=1Mi",
            "--instance-retention=90s",
            "--folded-retention=2h",
            "--max-folded-instances=8",
            "--max-keda-streams=9",
            "--max-streams-per-connection=10",
            "--grpc-max-connections=11",
            "--idle-timeout=45s",
            "--grpc-window=20Ki",
            "--max-batch-deltas=7",
            "--max-relayed-streams=15",
            "--relay-ack-delay=20ms",
            "--edge-max-age=2h",
            "--max-edges=14",
            "--ingest-threads=3",
            "--log-format=json",
        ])
        .unwrap();
        assert_eq!(
            args.config(),
            Config {
                grpc_addr: "127.0.0.1:1".parse().unwrap(),
                metrics_addr: "127.0.0.1:2".parse().unwrap(),
                agent_token: TokenSource::Value(Secret("s3cret".into())),
                tls: Some(TlsFiles {
                    cert: "/c.pem".into(),
                    key: "/k.pem".into(),
                    client_ca: Some("/ca.pem".into()),
                }),
                ingest_threads: 3,
                limits: Limits {
                    max_window: Duration::from_secs(120),
                    max_series: 5,
                    max_destinations: 6,
                    max_window_buckets: 1000,
                    max_services: 12,
                    max_services_per_agent: 13,
                    max_report_bytes: 1 << 20,
                    instance_retention: Duration::from_secs(90),
                    folded_retention: Duration::from_secs(7200),
                    max_folded_instances: 8,
                    max_keda_streams: 9,
                    max_streams_per_connection: 10,
                    grpc_max_connections: 11,
                    idle_timeout: Duration::from_secs(45),
                    grpc_window: 20 << 10,
                    max_batch_deltas: 7,
                    max_relayed_streams: 15,
                    relay_ack_delay: Duration::from_millis(20),
                    edge_max_age: Duration::from_secs(2 * 3600),
                    max_edges: 14,
                },
            }
        );
        assert_eq!(args.log_format, LogFormat::Json);
        let args = parse(&["--agent-token-file=/run/token"]).unwrap();
        assert_eq!(
            args.config().agent_token,
            TokenSource::File("/run/token".into())
        );
    }

    #[test]
    fn the_token_never_reaches_debug_output() {
        let args = parse(&["--agent-token=hunter2"]).unwrap();
        let shown = format!("{args:?} {:?}", args.config());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Secret(<redacted>)"), "{shown}");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--grpc-addr=9090"], "--grpc-addr <GRPC_ADDR>"),
            (
                &["--metrics-addr=localhost"],
                "--metrics-addr <METRICS_ADDR>",
            ),
            (&["--max-window=0s"], "--max-window <MAX_WINDOW>"),
            (&["--max-window=2h"], "--max-window <MAX_WINDOW>"),
            (&["--max-window=1500ms"], "--max-window <MAX_WINDOW>"),
            (&["--max-window=soon"], "--max-window <MAX_WINDOW>"),
            (&["--max-series=0"], "--max-series <MAX_SERIES>"),
            (&["--max-series=many"], "--max-series <MAX_SERIES>"),
            (
                &["--max-destinations=0"],
                "--max-destinations <MAX_DESTINATIONS>",
            ),
            (
                &["--instance-retention=0s"],
                "--instance-retention <INSTANCE_RETENTION>",
            ),
            (
                &["--instance-retention=forever"],
                "--instance-retention <INSTANCE_RETENTION>",
            ),
            (
                &["--max-batch-deltas=0"],
                "--max-batch-deltas <MAX_BATCH_DELTAS>",
            ),
            (
                &["--max-batch-deltas=2000000"],
                "--max-batch-deltas <MAX_BATCH_DELTAS>",
            ),
            (
                &["--max-window-buckets=999"],
                "--max-window-buckets <MAX_WINDOW_BUCKETS>",
            ),
            (&["--max-services=0"], "--max-services <MAX_SERVICES>"),
            (
                &["--max-services-per-agent=0"],
                "--max-services-per-agent <MAX_SERVICES_PER_AGENT>",
            ),
            (
                &["--max-report-bytes=1Gi"],
                "--max-report-bytes <MAX_REPORT_BYTES>",
            ),
            (
                &["--max-report-bytes=16MB"],
                "--max-report-bytes <MAX_REPORT_BYTES>",
            ),
            (&["--grpc-window=8Ki"], "--grpc-window <GRPC_WINDOW>"),
            (&["--grpc-window=32Mi"], "--grpc-window <GRPC_WINDOW>"),
            (
                &["--ingest-threads=65"],
                "--ingest-threads <INGEST_THREADS>",
            ),
            (
                &["--ingest-threads=-1"],
                "--ingest-threads <INGEST_THREADS>",
            ),
            (
                &["--ingest-threads=two"],
                "--ingest-threads <INGEST_THREADS>",
            ),
            (
                &["--relay-ack-delay=101ms"],
                "--relay-ack-delay <RELAY_ACK_DELAY>",
            ),
            (
                &["--relay-ack-delay=soon"],
                "--relay-ack-delay <RELAY_ACK_DELAY>",
            ),
            (&["--log-format=xml"], "--log-format <LOG_FORMAT>"),
            (&["--agent-token= "], "--agent-token <AGENT_TOKEN>"),
        ];
        for (args, flag) in cases {
            let message = error(args);
            assert!(message.contains(flag), "{args:?}: {message}");
        }
        assert!(error(&["--max-window=2h"]).contains("\"2h\": must be between 1s and 1h"));
        assert!(
            error(&["--max-window=1500ms"])
                .contains("\"1500ms\": must be a whole number of seconds")
        );
        assert!(error(&["--agent-token= "]).contains("the token is empty"));
        assert!(
            error(&["--max-report-bytes=1Gi"]).contains("\"1Gi\": must be between 64Ki and 256Mi")
        );
        assert!(error(&["--grpc-window=8Ki"]).contains("\"8Ki\": must be between 16Ki and 16Mi"));
        assert!(error(&["--ingest-threads=65"]).contains("65 is not in 0..=64"));
        assert!(error(&["--relay-ack-delay=1s"]).contains("\"1s\": must be between 0s and 100ms"));
        let delay = |v: &str| {
            parse(&[&format!("--relay-ack-delay={v}")])
                .unwrap()
                .relay_ack_delay
        };
        assert_eq!(
            (delay("0"), delay("100ms")),
            (Duration::ZERO, Duration::from_millis(100))
        );
        let threads = |v: &str| {
            parse(&[&format!("--ingest-threads={v}")])
                .unwrap()
                .config()
                .ingest_threads
        };
        assert_eq!((threads("0"), threads("64")), (0, 64));
        let window = |v: &str| parse(&[&format!("--grpc-window={v}")]).unwrap().grpc_window;
        assert_eq!((window("16Ki"), window("1Mi")), (16 << 10, 1 << 20));
    }

    #[test]
    fn tls_and_token_flags_go_together() {
        assert!(error(&["--tls-cert-file=/c"]).contains("--tls-key-file <TLS_KEY_FILE>"));
        assert!(error(&["--tls-key-file=/k"]).contains("--tls-cert-file <TLS_CERT_FILE>"));
        assert!(error(&["--tls-client-ca-file=/ca"]).contains("--tls-cert-file <TLS_CERT_FILE>"));
        let message = error(&["--agent-token=a", "--agent-token-file=/t"]);
        assert!(message.contains("cannot be used with"), "{message}");
    }

    /// #13 item 9: a token no agent could send is refused at start, naming
    /// the setting.
    #[test]
    fn a_non_ascii_token_is_refused_naming_the_setting() {
        let error = parse(&["--agent-token=jetón"]).unwrap_err().to_string();
        assert!(error.contains("--agent-token <AGENT_TOKEN>"), "{error}");
        assert!(
            error.contains("the token holds 'ó': a bearer token is printable ASCII without spaces"),
            "{error}"
        );
        assert!(parse(&["--agent-token=two words"]).is_err());
    }
}
