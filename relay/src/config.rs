//! Every setting of `itw-relay`: a flag, with the env var the deploy manifests set.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use itw_proto::addr::HostPort;
pub use itw_proto::token::{Secret, TokenSource};
use itw_telemetry::{
    flags::{self, bounded_duration},
    logging::LogFormat,
};

/// What an error about SCALER_ADDR suggests.
const SCALER_EXAMPLE: &str = "itw-scaler-ingest.itw-system.svc:9090";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "itw-relay",
    version,
    about = "Carries many agents' Report streams to each itw-scaler replica on one Relay stream"
)]
pub struct Args {
    /// gRPC address the agents' Report streams arrive on (with health and reflection).
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:9090")]
    pub listen_addr: SocketAddr,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9102")]
    pub metrics_addr: SocketAddr,

    /// The scaler replicas (host:port, comma-separated), each resolved to
    /// every address behind it (a headless Service gives one per replica).
    /// Agents may only name replicas resolved from here.
    #[arg(long, env = "SCALER_ADDR", default_value = "itw-scaler-ingest.itw-system.svc:9090", value_parser = parse_scalers)]
    pub scaler_addr: Scalers,

    /// How often SCALER_ADDR is resolved again (also once, at most every
    /// second, when an agent names a replica not resolved yet).
    #[arg(long, env = "RESOLVE_INTERVAL", default_value = "15s", value_parser = parse_resolve_interval)]
    pub resolve_interval: Duration,

    /// File holding the bearer token agents must send (the scaler's
    /// AGENT_TOKEN_FILE Secret); the relay presents the same token to the
    /// replicas. Re-read when it changes, so rotating the Secret needs no restart.
    #[arg(long, env = "TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// The bearer token itself (prefer TOKEN_FILE). Unset, with no file
    /// either: agents are not asked for one, and none is presented.
    #[arg(long, env = "TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// CA bundle (PEM) to verify the replicas' certificates; enables TLS to them.
    #[arg(long, env = "SCALER_CA_FILE")]
    pub scaler_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS with the replicas.
    #[arg(long, env = "SCALER_CERT_FILE", requires_all = ["scaler_key_file", "scaler_ca_file"])]
    pub scaler_cert_file: Option<PathBuf>,

    /// Client key (PEM) of SCALER_CERT_FILE.
    #[arg(long, env = "SCALER_KEY_FILE", requires = "scaler_cert_file")]
    pub scaler_key_file: Option<PathBuf>,

    /// Certificate chain (PEM) of the agents' port; with TLS_KEY_FILE, serves TLS.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// Private key (PEM) of TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// CA bundle (PEM): every agent must present a certificate it signed.
    #[arg(long, env = "TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Largest message an agent may send (a snapshot is the big one), as the
    /// scaler's setting of the same name; bytes or Ki/Mi, 64Ki to 256Mi. A
    /// larger one ends its stream (RESOURCE_EXHAUSTED).
    #[arg(long, env = "MAX_REPORT_BYTES", default_value = "16Mi", value_parser = parse_report_bytes)]
    pub max_report_bytes: usize,

    /// Most agent streams open through this relay at once (an agent keeps
    /// one per replica); past it a new one is RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_AGENT_STREAMS", default_value_t = 8_192, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_agent_streams: u32,

    /// Replica messages (Welcome, Acks) held for one agent that has not read
    /// them; past it that agent's stream ends (RESOURCE_EXHAUSTED) rather
    /// than stalling every other agent on the Relay stream.
    #[arg(long, env = "AGENT_RESPONSE_BUFFER", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub agent_response_buffer: u32,

    /// Agent messages queued towards one replica before agents wait
    /// (HTTP/2 flow control then pushes back on them).
    #[arg(long, env = "UPSTREAM_BUFFER", default_value_t = 1_024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub upstream_buffer: u32,

    /// Most agent connections open at once; past it a new connection is
    /// closed as it arrives. Keep it below the open-files limit (the relay
    /// raises its soft limit to the hard one at start).
    #[arg(long, env = "GRPC_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub grpc_max_connections: u32,

    /// An agent connection that sends nothing for this long is closed (an
    /// idle socket, a stalled TLS handshake). Live agents answer the
    /// relay's HTTP/2 pings (every 30s), so keep it above 40s.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "90s", value_parser = parse_idle_timeout)]
    pub idle_timeout: Duration,

    /// Log output: text or json (filter with RUST_LOG).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl Args {
    /// The settings the library runs with.
    pub fn config(&self) -> Config {
        let token = match (&self.token_file, &self.token) {
            (Some(path), _) => TokenSource::File(path.clone()),
            (None, Some(token)) => TokenSource::Value(token.clone()),
            (None, None) => TokenSource::None,
        };
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca_file.clone(),
            }),
            _ => None,
        };
        let scaler_tls = self.scaler_ca_file.as_ref().map(|ca| ClientTlsFiles {
            ca: ca.clone(),
            client: self
                .scaler_cert_file
                .clone()
                .zip(self.scaler_key_file.clone()),
        });
        Config {
            listen_addr: self.listen_addr,
            metrics_addr: self.metrics_addr,
            scalers: self.scaler_addr.0.clone(),
            resolve_interval: self.resolve_interval,
            token,
            tls,
            scaler_tls,
            limits: Limits {
                max_report_bytes: self.max_report_bytes,
                max_agent_streams: self.max_agent_streams as usize,
                agent_response_buffer: self.agent_response_buffer as usize,
                upstream_buffer: self.upstream_buffer as usize,
                grpc_max_connections: self.grpc_max_connections as usize,
                idle_timeout: self.idle_timeout,
            },
        }
    }
}

/// What the relay runs with; [`Args::config`] builds it from flags, tests build it directly.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub scalers: Vec<HostPort>,
    pub resolve_interval: Duration,
    pub token: TokenSource,
    pub tls: Option<ServerTlsFiles>,
    pub scaler_tls: Option<ClientTlsFiles>,
    pub limits: Limits,
}

impl Config {
    /// The flags' defaults, with the replicas behind `scalers`.
    pub fn new(scalers: Vec<HostPort>) -> Self {
        Self {
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 9102)),
            scalers,
            resolve_interval: Duration::from_secs(15),
            token: TokenSource::None,
            tls: None,
            scaler_tls: None,
            limits: Limits::default(),
        }
    }
}

/// Bounds on what the relay holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_report_bytes: usize,
    pub max_agent_streams: usize,
    pub agent_response_buffer: usize,
    pub upstream_buffer: usize,
    pub grpc_max_connections: usize,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_report_bytes: 16 << 20,
            max_agent_streams: 8_192,
            agent_response_buffer: 64,
            upstream_buffer: 1_024,
            grpc_max_connections: 16_384,
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// SCALER_ADDR: one or more replicas' names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalers(pub Vec<HostPort>);

fn parse_scalers(s: &str) -> Result<Scalers, String> {
    HostPort::parse_list(s, SCALER_EXAMPLE).map(Scalers)
}

/// PEM files of the agents' port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: agents must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// PEM files of the connections to the replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    /// Certificate and key for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

fn parse_resolve_interval(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        "15s, 1m",
    )
}

fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        Duration::from_millis(100),
        Duration::from_secs(24 * 3600),
        "90s, 5m",
    )
}

fn parse_report_bytes(s: &str) -> Result<usize, String> {
    let n = flags::bytes(s)?;
    if !(64 << 10..=256 << 20).contains(&n) {
        return Err(format!("{s:?}: must be between 64Ki and 256Mi"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("itw-relay").chain(args.iter().copied()))
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let config = parse(&[]).unwrap().config();
        let mut expected = Config::new(vec![HostPort {
            host: "itw-scaler-ingest.itw-system.svc".into(),
            port: 9090,
        }]);
        expected.limits = Limits::default();
        assert_eq!(config, expected);
        assert_eq!(
            Limits::default(),
            Limits {
                max_report_bytes: 16 << 20,
                max_agent_streams: 8192,
                agent_response_buffer: 64,
                upstream_buffer: 1024,
                grpc_max_connections: 16_384,
                idle_timeout: Duration::from_secs(90),
            }
        );
    }

    #[test]
    fn settings_are_read_and_checked() {
        let config = parse(&[
            "--scaler-addr=a:1,b:2",
            "--max-report-bytes=64Ki",
            "--max-agent-streams=3",
            "--agent-response-buffer=2",
            "--upstream-buffer=5",
            "--grpc-max-connections=7",
            "--idle-timeout=45s",
            "--resolve-interval=2s",
            "--token=s3cret",
            "--scaler-ca-file=/ca.pem",
        ])
        .unwrap()
        .config();
        assert_eq!(
            config
                .scalers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["a:1", "b:2"]
        );
        assert_eq!(
            config.limits,
            Limits {
                max_report_bytes: 64 << 10,
                max_agent_streams: 3,
                agent_response_buffer: 2,
                upstream_buffer: 5,
                grpc_max_connections: 7,
                idle_timeout: Duration::from_secs(45),
            }
        );
        assert_eq!(config.resolve_interval, Duration::from_secs(2));
        assert_eq!(config.token, TokenSource::Value(Secret("s3cret".into())));
        assert_eq!(
            config.scaler_tls,
            Some(ClientTlsFiles {
                ca: "/ca.pem".into(),
                client: None
            })
        );
        for bad in [
            "--scaler-addr=scaler",
            "--max-report-bytes=1Ki",
            "--max-agent-streams=0",
            "--agent-response-buffer=0",
            "--resolve-interval=10ms",
            "--idle-timeout=1ms",
            "--grpc-max-connections=0",
            "--token=two words",
            "--scaler-cert-file=/c.pem",
        ] {
            assert!(parse(&[bad]).is_err(), "{bad}");
        }
        let error = parse(&["--scaler-addr=scaler"]).unwrap_err().to_string();
        assert!(
            error.contains(
                "\"scaler\" has no port; use host:port, e.g. itw-scaler-ingest.itw-system.svc:9090"
            ),
            "{error}"
        );
    }
}
