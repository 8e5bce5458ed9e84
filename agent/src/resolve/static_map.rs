//! The static service map: a YAML file standing in for the Kubernetes API, for
//! the demo, tests and anyone without a cluster.
//!
//! ```yaml
//! services:
//!   - namespace: default
//!     name: my-svc
//!     clusterIPs: [127.10.0.1]        # one or more, IPv4 or IPv6; none = headless
//!     ports: [8429]                   # or {port: 80, targetPort: 8080}
//!     hold: true                      # optional: hold connects while no endpoint is ready
//!     holdTimeout: 30s                # optional: how long (default: the agent's HOLD_TIMEOUT)
//!     wakes: "other/api,db"           # optional: Services it calls (internal-tcp-watcher.io/wakes)
//!     endpoints:                      # optional: pods behind it
//!       - pod: my-svc-0
//!         ip: 127.10.1.1
//!         ports: [8429]               # optional: the service ports' targetPorts
//!         ready: false                # optional (default true): not taking connections yet
//! ```
//!
//! A malformed file is refused with the line and field at fault; names follow
//! Kubernetes' rules (a Service name starts with a letter), the ones the
//! scaler checks reports with. The file is re-read when it changes and on
//! SIGHUP; a bad edit keeps the last good map.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use itw_proto::names;
use serde::Deserialize;
use serde_saphyr::Spanned;
use tokio::sync::mpsc;

use super::{
    MapEvent, ServiceMap, ServiceRef, ServiceState, Target, canonical, parse_hold_timeout,
};

/// How often the file's modification time and size are checked.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StaticMapError {
    #[error("service map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("service map {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    services: Vec<ServiceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceEntry {
    namespace: Spanned<String>,
    name: Spanned<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<Spanned<IpAddr>>,
    ports: Spanned<Vec<Spanned<PortEntry>>>,
    #[serde(default)]
    hold: bool,
    #[serde(default)]
    hold_timeout: Option<Spanned<String>>,
    #[serde(default)]
    wakes: Option<Spanned<String>>,
    #[serde(default)]
    endpoints: Vec<EndpointEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortEntry {
    Plain(u32),
    Mapped {
        port: u32,
        #[serde(rename = "targetPort")]
        target_port: Option<u32>,
    },
}

impl PortEntry {
    fn port(&self) -> u32 {
        match self {
            Self::Plain(p) | Self::Mapped { port: p, .. } => *p,
        }
    }

    fn target_port(&self) -> u32 {
        match self {
            Self::Plain(p) => *p,
            Self::Mapped {
                port, target_port, ..
            } => target_port.unwrap_or(*port),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    pod: Spanned<String>,
    ip: Spanned<IpAddr>,
    #[serde(default)]
    ports: Option<Spanned<Vec<Spanned<u32>>>>,
    #[serde(default = "ready_by_default")]
    ready: bool,
}

fn ready_by_default() -> bool {
    true
}

/// A Service's `wakes`, every entry good or an error naming its line.
fn static_wakes(svc: &ServiceEntry, field: &str) -> Result<Vec<ServiceRef>, String> {
    let Some(given) = &svc.wakes else {
        return Ok(Vec::new());
    };
    let (wakes, problems) =
        super::wakes::parse(&given.value, &svc.namespace.value, &svc.name.value);
    if let Some(problem) = problems.first() {
        return Err(format!(
            "line {}: {field}: {problem}",
            given.referenced.line()
        ));
    }
    Ok(wakes
        .into_iter()
        .map(|(ns, name)| ServiceRef::new(ns, name))
        .collect())
}

/// Parses a service map; `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<ServiceMap, StaticMapError> {
    let invalid = |message: String| StaticMapError::Invalid {
        path: path.to_owned(),
        message,
    };
    let is_blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    if text.lines().all(is_blank) {
        return Err(invalid(
            "the file is empty; it needs a `services:` list (see the README for the format)".into(),
        ));
    }
    let file: File = serde_saphyr::from_str_with_options(text, parser_options(text.len()))
        .map_err(|e| invalid(e.to_string()))?;

    let mut map = ServiceMap::default();
    // Who claimed each IP:port first, to name both sides of a conflict.
    let mut claimed: BTreeMap<SocketAddr, (String, u64)> = BTreeMap::new();
    // Sorted once at the end (conflicts are refused, so no address repeats).
    let mut destinations = Vec::new();
    let mut claim = |addr: SocketAddr, target: Target, field: String, line: u64| {
        let addr = canonical(addr);
        if let Some((first, first_line)) = claimed.get(&addr) {
            return Err(invalid(format!(
                "line {line}: {field}: {addr} is already mapped by {first} (line {first_line}); an IP:port can belong to one destination only"
            )));
        }
        claimed.insert(addr, (field, line));
        destinations.push((addr, target));
        Ok(())
    };

    for (i, svc) in file.services.iter().enumerate() {
        let at = |field: &str| format!("services[{i}].{field}");
        check_name(&svc.namespace, &at("namespace"), names::namespace).map_err(&invalid)?;
        check_name(&svc.name, &at("name"), names::service).map_err(&invalid)?;
        let service = ServiceRef::new(&svc.namespace.value, &svc.name.value);
        let hold_timeout = match &svc.hold_timeout {
            None => None,
            Some(t) => Some(parse_hold_timeout(&t.value).map_err(|e| {
                invalid(format!(
                    "line {}: {}: {e}",
                    t.referenced.line(),
                    at("holdTimeout")
                ))
            })?),
        };
        let ready: std::collections::BTreeSet<IpAddr> = svc
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| e.ip.value)
            .collect();
        let state = ServiceState {
            hold: svc.hold,
            hold_timeout,
            ready_endpoints: Some(u32::try_from(ready.len()).unwrap_or(u32::MAX)),
            wakes: static_wakes(svc, &at("wakes")).map_err(&invalid)?,
            exclude_sources: Default::default(),
        };
        if map.services.insert(service.clone(), state).is_some() {
            return Err(invalid(format!(
                "line {}: {}: service {service} is listed twice",
                svc.name.referenced.line(),
                at("name"),
            )));
        }

        if svc.ports.value.is_empty() {
            return Err(invalid(format!(
                "line {}: {}: a service needs at least one port",
                svc.ports.referenced.line(),
                at("ports"),
            )));
        }
        let mut ports = Vec::with_capacity(svc.ports.value.len());
        for (j, entry) in svc.ports.value.iter().enumerate() {
            let line = entry.referenced.line();
            let port = check_port(entry.value.port(), line, &at(&format!("ports[{j}]")))
                .map_err(&invalid)?;
            let target_port = check_port(
                entry.value.target_port(),
                line,
                &at(&format!("ports[{j}].targetPort")),
            )
            .map_err(&invalid)?;
            if ports.iter().any(|(p, _)| *p == port) {
                return Err(invalid(format!(
                    "line {line}: {}: port {port} is listed twice",
                    at(&format!("ports[{j}]"))
                )));
            }
            ports.push((port, target_port));
        }

        for (j, ip) in svc.cluster_ips.iter().enumerate() {
            for &(port, _) in &ports {
                let target = Target {
                    service: service.clone(),
                    port,
                    pod: None,
                };
                claim(
                    SocketAddr::new(ip.value, port),
                    target,
                    at(&format!("clusterIPs[{j}]")),
                    ip.referenced.line(),
                )?;
            }
        }

        for (k, ep) in svc.endpoints.iter().enumerate() {
            let ep_at = |field: &str| at(&format!("endpoints[{k}].{field}"));
            check_name(&ep.pod, &ep_at("pod"), names::pod).map_err(&invalid)?;
            let pod = crate::resolve::PodName::from(ep.pod.value.as_str());
            // (service port, port on the pod)
            let pairs: Vec<(u16, u16)> = match &ep.ports {
                None => ports.clone(),
                Some(given) => {
                    let line = given.referenced.line();
                    if given.value.len() != ports.len() {
                        return Err(invalid(format!(
                            "line {line}: {}: {} ports given for a service with {} ports; list one pod port per service port, in the same order",
                            ep_at("ports"),
                            given.value.len(),
                            ports.len(),
                        )));
                    }
                    let mut pairs = Vec::with_capacity(ports.len());
                    for (n, (p, (service_port, _))) in given.value.iter().zip(&ports).enumerate() {
                        let pod_port = check_port(
                            p.value,
                            p.referenced.line(),
                            &ep_at(&format!("ports[{n}]")),
                        )
                        .map_err(&invalid)?;
                        pairs.push((*service_port, pod_port));
                    }
                    pairs
                }
            };
            for (service_port, pod_port) in pairs {
                let target = Target {
                    service: service.clone(),
                    port: service_port,
                    pod: Some(pod.clone()),
                };
                claim(
                    SocketAddr::new(ep.ip.value, pod_port),
                    target,
                    ep_at("ip"),
                    ep.ip.referenced.line(),
                )?;
            }
        }
    }
    map.destinations = destinations.into_iter().collect();
    Ok(map)
}

/// The YAML parser's budget for a file of `len` bytes. Its defaults (a
/// million events, 250,000 nodes) refuse a map of about 20,000 Services, so
/// the counts grow with the file instead: every node takes at least one byte
/// of it, and an event at most two per node. Aliases stay capped at the
/// defaults, which is what keeps a small file from expanding into a huge
/// one; this file is the operator's own, read whole already.
fn parser_options(len: usize) -> serde_saphyr::Options {
    let defaults = serde_saphyr::Budget::default();
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: defaults.max_nodes.max(len),
            max_events: defaults.max_events.max(len.saturating_mul(2)),
        },
    }
}

/// Kubernetes object names, by the rules the scaler checks them with too
/// ([`itw_proto::names`]): a name Kubernetes would refuse is refused here,
/// with its line, rather than counted under a name the scaler cannot take.
fn check_name(
    name: &Spanned<String>,
    field: &str,
    rule: fn(&str) -> Result<(), names::NameProblem>,
) -> Result<(), String> {
    rule(&name.value).map_err(|problem| {
        format!(
            "line {}: {field} = {:?}: {problem}",
            name.referenced.line(),
            name.value
        )
    })
}

fn check_port(port: u32, line: u64, field: &str) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!(
            "line {line}: {field}: {port} is not a port (1-65535)"
        )),
    }
}

/// Reads and parses the file.
pub fn load(path: &Path) -> Result<ServiceMap, StaticMapError> {
    let text = std::fs::read_to_string(path).map_err(|source| StaticMapError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Loads the file once (an error stops the agent's start), sends it, then
/// keeps watching it: a change or SIGHUP re-reads it and sends the new map; a
/// bad edit is logged and counted, and the last good map stays.
pub async fn watch(
    path: PathBuf,
    events: mpsc::Sender<MapEvent>,
    reload_failures: impl Fn() + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, StaticMapError> {
    let map = load(&path)?;
    let mut stamp = file_stamp(&path);
    tracing::info!(
        path = %path.display(),
        services = map.services.len(),
        destinations = map.destinations.len(),
        "static service map loaded"
    );
    let mut current = map.clone();
    if events.send(MapEvent::Reset(map)).await.is_err() {
        return Ok(tokio::spawn(async {}));
    }
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|source| StaticMapError::Read {
            path: path.clone(),
            source,
        })?;
    Ok(tokio::spawn(async move {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = poll.tick() => false,
                _ = hangups.recv() => true,
                _ = events.closed() => return,
            };
            let now = file_stamp(&path);
            if !forced && now == stamp {
                continue;
            }
            stamp = now;
            match load(&path) {
                Ok(map) if map == current => {}
                Ok(map) => {
                    tracing::info!(
                        path = %path.display(),
                        services = map.services.len(),
                        destinations = map.destinations.len(),
                        "static service map reloaded"
                    );
                    current = map.clone();
                    if events.send(MapEvent::Reset(map)).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    reload_failures();
                    tracing::error!(%error, "service map not reloaded; keeping the last good one");
                }
            }
        }
    }))
}

/// Modification time and length: enough to notice an edit or a replaced file
/// (a ConfigMap update swaps a symlink, which changes both).
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> ServiceMap {
        parse(Path::new("map.yaml"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> String {
        parse(Path::new("map.yaml"), text).unwrap_err().to_string()
    }

    fn target(ns: &str, svc: &str, port: u16, pod: Option<&str>) -> Target {
        Target {
            service: ServiceRef::new(ns, svc),
            port,
            pod: pod.map(Into::into),
        }
    }

    const EXAMPLE: &str = "\
services:
  - namespace: default
    name: my-svc
    clusterIPs: [127.10.0.1, \"::1\"]
    ports: [8429, {port: 80, targetPort: 8080}]
    endpoints:
      - pod: my-svc-0
        ip: 127.10.1.1
      - pod: my-svc-1
        ip: 127.10.1.2
        ports: [9000, 9001]
  - namespace: other
    name: headless
    ports: [53]
";

    /// #13 item 9: a map of 100,000 Services loads (the parser's default
    /// budget refused it as "budget breached").
    #[test]
    fn a_map_of_100k_services_loads() {
        let mut text = String::from("services:\n");
        for i in 0..100_000u32 {
            let [_, a, b, c] = i.to_be_bytes();
            text.push_str(&format!(
                "  - namespace: ns-{}\n    name: svc-{i}\n    clusterIPs: [10.{a}.{b}.{c}]\n    ports: [80, {{port: 443, targetPort: 8443}}]\n",
                i % 100
            ));
        }
        let map = parse_ok(&text);
        assert_eq!(map.services.len(), 100_000);
        assert_eq!(map.destinations.len(), 200_000);
        let last = SocketAddr::from(([10, 1, 134, 159], 443));
        assert_eq!(
            map.destinations.get(&last).map(|t| t.service.to_string()),
            Some("ns-99/svc-99999".to_owned())
        );
    }

    #[test]
    fn parses_every_destination_exactly() {
        let map = parse_ok(EXAMPLE);
        let expected: crate::resolve::MapDestinations = [
            ("127.10.0.1:8429", target("default", "my-svc", 8429, None)),
            ("127.10.0.1:80", target("default", "my-svc", 80, None)),
            ("[::1]:8429", target("default", "my-svc", 8429, None)),
            ("[::1]:80", target("default", "my-svc", 80, None)),
            // Default pod ports: each service port's targetPort.
            (
                "127.10.1.1:8429",
                target("default", "my-svc", 8429, Some("my-svc-0")),
            ),
            (
                "127.10.1.1:8080",
                target("default", "my-svc", 80, Some("my-svc-0")),
            ),
            // Given pod ports pair with the service ports in order.
            (
                "127.10.1.2:9000",
                target("default", "my-svc", 8429, Some("my-svc-1")),
            ),
            (
                "127.10.1.2:9001",
                target("default", "my-svc", 80, Some("my-svc-1")),
            ),
        ]
        .into_iter()
        .map(|(a, t)| (a.parse().unwrap(), t))
        .collect();
        assert_eq!(map.destinations, expected);
        let ready = |n| ServiceState {
            ready_endpoints: Some(n),
            ..ServiceState::default()
        };
        assert_eq!(
            map.services,
            [
                (ServiceRef::new("default", "my-svc"), ready(2)),
                (ServiceRef::new("other", "headless"), ready(0)),
            ]
            .into_iter()
            .collect()
        );
    }

    #[test]
    fn hold_settings_and_endpoint_readiness() {
        let map = parse_ok(
            "services:
  - namespace: default
    name: cold
    clusterIPs: [127.1.0.1]
    ports: [80]
    hold: true
    holdTimeout: 45s
    wakes: \"other/api, warm\"
    endpoints:
      - {pod: cold-0, ip: 127.1.1.1, ready: false}
      - {pod: cold-1, ip: 127.1.1.2, ready: false, ports: [81]}
  - namespace: default
    name: warm
    ports: [80]
    hold: true
    endpoints:
      - {pod: warm-0, ip: 127.1.2.1}
      - {pod: warm-1, ip: 127.1.2.2, ready: false}
",
        );
        assert_eq!(
            map.services[&ServiceRef::new("default", "cold")],
            ServiceState {
                hold: true,
                hold_timeout: Some(Duration::from_secs(45)),
                ready_endpoints: Some(0),
                wakes: vec![
                    ServiceRef::new("other", "api"),
                    ServiceRef::new("default", "warm")
                ],
                exclude_sources: Default::default(),
            }
        );
        assert_eq!(
            map.services[&ServiceRef::new("default", "warm")],
            ServiceState {
                hold: true,
                hold_timeout: None,
                ready_endpoints: Some(1),
                wakes: Vec::new(),
                exclude_sources: Default::default(),
            }
        );
        // Not-ready endpoints are still watched: a connect to a starting pod counts.
        assert!(
            map.destinations
                .contains_key(&"127.1.1.2:81".parse().unwrap())
        );
        for (bad, needles) in [
            (
                "holdTimeout: soon",
                &["line 6", "services[0].holdTimeout", "\"soon\""][..],
            ),
            ("holdTimeout: 100ms", &["line 6", "between 1s and 1h"][..]),
            ("hold: maybe", &["line 6", "hold"][..]),
            (
                "wakes: \"b,Bad\"",
                &["line 6", "services[0].wakes", "\"Bad\""][..],
            ),
            ("wakes: a", &["line 6", "the Service itself"][..]),
        ] {
            let text = format!(
                "services:\n  - namespace: default\n    name: a\n    clusterIPs: [127.1.0.1]\n    ports: [80]\n    {bad}\n"
            );
            let msg = parse_err(&text);
            for needle in needles {
                assert!(msg.contains(needle), "missing {needle:?} in {msg}");
            }
        }
    }

    #[test]
    fn a_mapped_ipv6_cluster_ip_is_stored_as_ipv4() {
        let map = parse_ok(
            "services:\n  - {namespace: a, name: b, clusterIPs: [\"::ffff:127.1.2.3\"], ports: [1]}\n",
        );
        assert_eq!(
            map.destinations.keys().copied().collect::<Vec<_>>(),
            vec!["127.1.2.3:1".parse().unwrap()]
        );
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let cases: &[(&str, &[&str])] = &[
            (
                "services:\n  - namespace: default\n    name: a\n    clusterIPs: [127.0.0.300]\n    ports: [80]\n",
                &["line 4", "127.0.0.300"],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: [0]\n",
                &["line 4", "services[0].ports[0]", "0 is not a port"],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: [70000]\n",
                &["line 4", "services[0].ports[0]", "70000"],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: [{port: 80, targetPort: 0}]\n",
                &["line 4", "services[0].ports[0].targetPort"],
            ),
            (
                "services:\n  - namespace: Default\n    name: a\n    ports: [80]\n",
                &["line 2", "services[0].namespace", "\"Default\""],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: []\n",
                &["line 4", "services[0].ports", "at least one port"],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: [80, 80]\n",
                &["services[0].ports[1]", "listed twice"],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: [80]\n    clusterIP: 127.0.0.1\n",
                &["line 5", "clusterIP"],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: [80]\n  - namespace: default\n    name: a\n    ports: [81]\n",
                &["line 6", "services[1].name", "default/a is listed twice"],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    clusterIPs: [127.0.0.1]\n    ports: [80]\n  - namespace: default\n    name: b\n    clusterIPs: [127.0.0.1]\n    ports: [80]\n",
                &[
                    "line 8",
                    "services[1].clusterIPs[0]",
                    "127.0.0.1:80",
                    "services[0].clusterIPs[0] (line 4)",
                ],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: [80, 81]\n    endpoints:\n      - pod: a-0\n        ip: 127.0.0.2\n        ports: [8080]\n",
                &[
                    "line 8",
                    "services[0].endpoints[0].ports",
                    "1 ports given for a service with 2 ports",
                ],
            ),
            (
                "services:\n  - namespace: default\n    name: a\n    ports: [80]\n    endpoints:\n      - pod: a-0\n",
                &["ip"],
            ),
            ("services: 3\n", &["services"]),
            ("", &["services"]),
        ];
        for (text, needles) in cases {
            let msg = parse_err(text);
            if std::env::var_os("ITW_PRINT_ERRORS").is_some() {
                println!("---\n{msg}");
            }
            assert!(msg.contains("map.yaml"), "{msg}");
            for needle in *needles {
                assert!(
                    msg.contains(needle),
                    "missing {needle:?} in:\n{msg}\nfor:\n{text}"
                );
            }
        }
    }

    /// The scaler takes only Kubernetes' names; a map it would refuse
    /// counts must be refused here, at the line at fault.
    #[test]
    fn names_follow_the_kubernetes_rules_the_scaler_checks() {
        assert_eq!(
            parse_err("services:\n  - namespace: default\n    name: 9web\n    ports: [80]\n"),
            "service map map.yaml: line 3: services[0].name = \"9web\": not a Kubernetes Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters)"
        );
        assert_eq!(
            parse_err(
                "services:\n  - namespace: default\n    name: web\n    ports: [80]\n    endpoints:\n      - {pod: web..0, ip: 127.0.0.2}\n"
            ),
            "service map map.yaml: line 6: services[0].endpoints[0].pod = \"web..0\": not a Kubernetes pod name (lowercase letters, digits, '-' and '.', at most 253 characters)"
        );
        // A leading digit is fine for a namespace and a pod.
        let map = parse_ok(
            "services:\n  - namespace: 9ns\n    name: web\n    ports: [80]\n    endpoints:\n      - {pod: 9web-0, ip: 127.0.0.2}\n",
        );
        assert_eq!(
            map.destinations.values().collect::<Vec<_>>(),
            vec![&target("9ns", "web", 80, Some("9web-0"))]
        );
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_map() {
        let dir = std::env::temp_dir().join(format!("itw-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("map.yaml");
        let one = "services:\n  - {namespace: a, name: b, clusterIPs: [127.1.0.1], ports: [80]}\n";
        let two = "services:\n  - {namespace: a, name: b, clusterIPs: [127.1.0.2], ports: [80]}\n";
        std::fs::write(&path, one).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let failures = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = failures.clone();
        let task = watch(path.clone(), tx, move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .await
        .unwrap();
        let MapEvent::Reset(first) = rx.recv().await.unwrap() else {
            panic!("expected a reset")
        };
        assert_eq!(first, parse_ok(one));

        // A broken edit: counted, nothing sent.
        std::fs::write(&path, "services: [oops\n").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while failures.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reload failure not noticed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(rx.try_recv().is_err());

        // A good edit: the new map.
        std::fs::write(&path, two).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next, MapEvent::Reset(parse_ok(two)));
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_bad_file_stops_the_start() {
        let (tx, _rx) = mpsc::channel(1);
        let err = watch(PathBuf::from("/nonexistent/map.yaml"), tx, || {})
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/map.yaml"), "{err}");
    }
}
