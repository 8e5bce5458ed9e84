//! The agent DaemonSet of deploy/ against the agent itself: every env var it
//! sets is a setting of `itw-agent` with a value the binary accepts, the
//! ports and probes are the ones it serves, the host paths are where its
//! settings point, its RBAC is exactly what the Kubernetes source watches,
//! and (as root) the real binary captures with exactly the capabilities the
//! DaemonSet grants, and not with one fewer.
//!
//! Each check is a function returning the problems it found, so the negative
//! tests can feed it a broken copy and see it fail.

mod deploy_support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::{CommandFactory, Parser};
use deploy_support::*;
use itw_agent::{config::Args, resolve::kube::Kind, sources::pod_object::PodObject};
use itw_e2e::system::{free_port, static_map};
use k8s_openapi::{
    Resource,
    api::{core::v1::Service, discovery::v1::EndpointSlice},
};
use serde_json::{Value, json};

/// The renders that configure the agent: the install, with TLS, with relays, with both.
const AGENT_RENDERS: [&str; 4] = [
    "",
    "examples/tls/install",
    "examples/relays",
    "examples/relays/tls",
];

/// The HTTP routes the agent (agent.rs) serves on METRICS_ADDR.
const LIVENESS_PATH: &str = "/healthz";
const READINESS_PATH: &str = "/readyz";

fn agent_objects(test: &str, dir: &str) -> Option<Vec<Value>> {
    render(test, dir)
}

/// The agent's settings as the DaemonSet gives them, parsed by the binary's
/// own definition; every problem on the way.
fn parse_agent(daemonset: &Value) -> Result<Args, Vec<String>> {
    let argv = argv_of(&Args::command(), container(daemonset, "itw-agent"))?;
    Args::try_parse_from(&argv).map_err(|e| vec![format!("itw-agent refuses {argv:?}: {e}")])
}

/// Ports, probes, host paths and the token file against the parsed settings.
fn check_agent_workload(daemonset: &Value) -> Vec<String> {
    let args = match parse_agent(daemonset) {
        Ok(args) => args,
        Err(problems) => return problems,
    };
    let mut problems = Vec::new();
    let c = container(daemonset, "itw-agent");
    let pod = pod_spec(daemonset);
    let metrics = args.metrics_addr.port();
    if container_port(c, &json!("metrics")) != Some(metrics) {
        problems.push(format!(
            "containerPort \"metrics\" is {:?}; METRICS_ADDR listens on {metrics}",
            container_port(c, &json!("metrics"))
        ));
    }
    if !args.metrics_addr.ip().is_unspecified() {
        problems.push(format!(
            "METRICS_ADDR {} does not listen on every address: the kubelet's probes and Prometheus reach the node IP",
            args.metrics_addr
        ));
    }
    for (probe, path) in [
        ("livenessProbe", LIVENESS_PATH),
        ("readinessProbe", READINESS_PATH),
    ] {
        let get = &c[probe]["httpGet"];
        if get.is_null() {
            problems.push(format!("{probe} is not an httpGet probe"));
            continue;
        }
        if get["path"] != path {
            problems.push(format!(
                "{probe} asks for {}, the agent serves {path}",
                get["path"]
            ));
        }
        if container_port(c, &get["port"]) != Some(metrics) {
            problems.push(format!(
                "{probe} port {} is not METRICS_ADDR's port {metrics}",
                get["port"]
            ));
        }
    }
    if pod["hostNetwork"] != true {
        problems.push(
            "hostNetwork is not true: /metrics would not be on the node's address".to_owned(),
        );
    }
    if pod["dnsPolicy"] != "ClusterFirstWithHostNet" {
        problems.push(format!(
            "dnsPolicy is {}: with hostNetwork only ClusterFirstWithHostNet resolves the scaler's Service",
            pod["dnsPolicy"]
        ));
    }
    if args.node_name.as_deref() != Some("node-a") {
        problems.push("NODE_NAME does not come from the downward API (spec.nodeName)".to_owned());
    }
    match &args.cgroup_root {
        None => problems.push(
            "CGROUP_ROOT is not set: inside the container the detected cgroup2 mount is the pod's own cgroup namespace"
                .to_owned(),
        ),
        Some(root) => {
            let host = host_path_of_dir(daemonset, c, root);
            if host != Some("/sys/fs/cgroup") {
                problems.push(format!(
                    "CGROUP_ROOT {} is not the node's /sys/fs/cgroup mounted from the host (hostPath {host:?})",
                    root.display()
                ));
            }
        }
    }
    if args.hold != itw_agent::hold::HoldPolicy::Off {
        if host_path_of_dir(daemonset, c, &args.hold_netns_dir) != Some("/run/netns") {
            problems.push(format!(
                "HOLD_NETNS_DIR {} is not the node's /run/netns (the runtime's pod network namespaces) mounted from the host",
                args.hold_netns_dir.display()
            ));
        }
        let propagation = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"].as_str() == args.hold_netns_dir.to_str())
            .map(|m| m["mountPropagation"].clone());
        if propagation != Some(serde_json::json!("HostToContainer")) {
            problems.push(format!(
                "HOLD_NETNS_DIR {} is mounted with mountPropagation {propagation:?}: pods started after the agent would not appear (HostToContainer)",
                args.hold_netns_dir.display()
            ));
        }
    }
    if host_path_of_dir(daemonset, c, &args.tracefs_path) != Some("/sys/kernel/tracing") {
        problems.push(format!(
            "TRACEFS_PATH {} is not the node's /sys/kernel/tracing mounted from the host",
            args.tracefs_path.display()
        ));
    }
    match &args.scaler_token_file {
        None => problems.push(
            "SCALER_TOKEN_FILE is not set: the scaler refuses agents without the token".to_owned(),
        ),
        Some(file) => match volume_of_file(daemonset, c, file) {
            Some((volume, key)) if volume["secret"]["secretName"].is_string() => {
                if key != "token" {
                    problems.push(format!(
                        "SCALER_TOKEN_FILE holds Secret key {key}, not token"
                    ));
                }
            }
            _ => problems.push(format!(
                "SCALER_TOKEN_FILE {} is not a file of a mounted Secret",
                file.display()
            )),
        },
    }
    if args.scaler_addr.is_none() {
        problems.push("SCALER_ADDR is not set: the agent would only serve /metrics".to_owned());
    }
    problems
}

/// The RBAC rules the Kubernetes source needs: get/list/watch on each kind
/// it watches, and on this node's Pods for source attribution. The match is
/// exhaustive, so a new kind in the source does not compile here until its
/// rule is added.
fn rule_for(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Service => (Service::GROUP, Service::URL_PATH_SEGMENT),
        Kind::EndpointSlice => (EndpointSlice::GROUP, EndpointSlice::URL_PATH_SEGMENT),
    }
}

fn check_agent_rbac(objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let daemonset = find(objects, "DaemonSet", "itw-agent");
    let account = pod_spec(daemonset)["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let namespace = namespace_of(daemonset).to_owned();
    let mut expected: Vec<(String, String, String)> = Vec::new();
    let watched = [Kind::Service, Kind::EndpointSlice].map(rule_for);
    let pods = (PodObject::GROUP, PodObject::URL_PATH_SEGMENT);
    for (group, resource) in watched.into_iter().chain([pods]) {
        for verb in ["get", "list", "watch"] {
            expected.push((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    expected.sort();

    let bindings: Vec<&Value> = objects
        .iter()
        .filter(|o| matches!(kind_of(o), "ClusterRoleBinding" | "RoleBinding"))
        .filter(|b| {
            b["subjects"].as_array().into_iter().flatten().any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"] == account.as_str()
                    && s["namespace"] == namespace.as_str()
            })
        })
        .collect();
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for binding in &bindings {
        if kind_of(binding) != "ClusterRoleBinding" || binding["roleRef"]["kind"] != "ClusterRole" {
            problems.push(format!(
                "{} {} binds the agent in one namespace only; it watches all of them",
                kind_of(binding),
                name_of(binding)
            ));
            continue;
        }
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role = objects
            .iter()
            .find(|o| kind_of(o) == "ClusterRole" && name_of(o) == role_name);
        let Some(role) = role else {
            problems.push(format!(
                "ClusterRoleBinding {} names no ClusterRole {role_name} in the render",
                name_of(binding)
            ));
            continue;
        };
        for rule in role["rules"].as_array().into_iter().flatten() {
            if rule.get("resourceNames").is_some() || rule.get("nonResourceURLs").is_some() {
                problems.push(format!(
                    "ClusterRole {role_name} has a rule the agent does not need: {rule}"
                ));
            }
            for group in rule["apiGroups"].as_array().into_iter().flatten() {
                for resource in rule["resources"].as_array().into_iter().flatten() {
                    for verb in rule["verbs"].as_array().into_iter().flatten() {
                        granted.push((
                            group.as_str().unwrap_or_default().to_owned(),
                            resource.as_str().unwrap_or_default().to_owned(),
                            verb.as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                }
            }
        }
    }
    granted.sort();
    granted.dedup();
    if granted != expected {
        problems.push(format!(
            "the agent's ServiceAccount {namespace}/{account} may {granted:?}; the Kubernetes source needs exactly {expected:?}"
        ));
    }
    problems
}

#[test]
fn every_agent_setting_in_the_manifests_is_one_the_binary_takes() {
    for dir in AGENT_RENDERS {
        let Some(objects) = agent_objects("agent settings", dir) else {
            return;
        };
        let daemonset = find(&objects, "DaemonSet", "itw-agent");
        let problems = check_agent_workload(daemonset);
        assert!(
            problems.is_empty(),
            "deploy/{dir}: the agent DaemonSet:\n  {}",
            problems.join("\n  ")
        );
    }
}

#[test]
fn agent_rbac_is_exactly_what_the_kubernetes_source_watches() {
    let Some(objects) = agent_objects("agent rbac", "") else {
        return;
    };
    let problems = check_agent_rbac(&objects);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The negative side: broken copies of the DaemonSet and the RBAC make the
/// checks above fail, so they can.
#[test]
fn broken_agent_manifests_fail_the_checks() {
    let Some(objects) = agent_objects("broken agent manifests", "") else {
        return;
    };
    let daemonset = find(&objects, "DaemonSet", "itw-agent");
    let fails = |broken: &Value, expected: &str| {
        let problems = check_agent_workload(broken);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "expected a problem containing {expected:?}, got {problems:?}"
        );
    };
    // An env var the binary does not know (a typo): it would be ignored.
    fails(
        &with_env(daemonset, "itw-agent", "SCALER_ADRR", "x:9090"),
        "env SCALER_ADRR is not a setting of itw-agent",
    );
    // A value the binary refuses.
    fails(
        &with_env(daemonset, "itw-agent", "CAPTURE_MODE", "xdp"),
        "itw-agent refuses",
    );
    // The port moves but the probes and containerPort do not.
    fails(
        &with_env(daemonset, "itw-agent", "METRICS_ADDR", "0.0.0.0:9103"),
        "containerPort \"metrics\" is Some(9102)",
    );
    // The container's own cgroup namespace instead of the node's root.
    fails(
        &with_env(daemonset, "itw-agent", "CGROUP_ROOT", "/sys/fs/cgroup"),
        "CGROUP_ROOT /sys/fs/cgroup is not the node's",
    );
    fails(
        &with_env(
            daemonset,
            "itw-agent",
            "SCALER_TOKEN_FILE",
            "/etc/itw/elsewhere/token",
        ),
        "is not a file of a mounted Secret",
    );
    let mut broken = daemonset.clone();
    broken["spec"]["template"]["spec"]["dnsPolicy"] = json!("ClusterFirst");
    fails(&broken, "dnsPolicy");
    let mut broken = daemonset.clone();
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] =
        json!("/ready");
    fails(&broken, "readinessProbe asks for \"/ready\"");

    // RBAC: one resource too many, and one missing.
    let mut extra = objects.clone();
    let role = extra
        .iter_mut()
        .find(|o| kind_of(o) == "ClusterRole" && name_of(o) == "itw-agent")
        .expect("ClusterRole itw-agent");
    role["rules"][0]["resources"] = json!(["services", "pods", "nodes"]);
    assert!(
        check_agent_rbac(&extra)
            .iter()
            .any(|p| p.contains("\"nodes\"")),
        "an extra resource passed"
    );
    let mut missing = objects.clone();
    let role = missing
        .iter_mut()
        .find(|o| kind_of(o) == "ClusterRole" && name_of(o) == "itw-agent")
        .expect("ClusterRole itw-agent");
    role["rules"][1]["verbs"] = json!(["get", "list"]);
    assert!(
        !check_agent_rbac(&missing).is_empty(),
        "a missing watch verb passed"
    );
}

// ------------------------------------------------------------ capabilities --

/// The capabilities the DaemonSet adds, as setpriv names them (`bpf`).
fn granted_capabilities(daemonset: &Value) -> Vec<String> {
    let security = &container(daemonset, "itw-agent")["securityContext"];
    assert_ne!(
        security["privileged"], true,
        "the agent must not run privileged"
    );
    assert_eq!(
        security["capabilities"]["drop"],
        json!(["ALL"]),
        "the agent must drop every capability it is not granted"
    );
    security["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| {
            c.as_str()
                .expect("capability name")
                .trim_start_matches("CAP_")
                .to_lowercase()
        })
        .collect()
}

fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("ITW_REQUIRE_BPF").as_deref() == Ok("1") {
        panic!("{test}: needs root to load eBPF programs, and ITW_REQUIRE_BPF=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: not root");
    false
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A running agent, killed when dropped.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run of the real agent with only `caps` did.
enum Outcome {
    /// Ready, and counted this many attempts to the stand-in Service.
    Counted(u64),
    /// Exited or never became ready; the log's last lines.
    Failed(String),
}

fn run_agent_with(
    caps: &[String],
    mode: &str,
    hold: &str,
    work: &Path,
    stand_in: SocketAddr,
) -> Outcome {
    let map = work.join("services.yaml");
    std::fs::write(
        &map,
        static_map(
            "deploy-test",
            "caps",
            &stand_in.ip().to_string(),
            stand_in.port(),
        ),
    )
    .expect("writing the service map");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let log = work.join(format!("agent-{mode}-{hold}-{}.log", caps.join("_")));
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let cgroup_root = itw_agent::capture::cgroup::find_root(None)
        .expect("a cgroup v2 mount on this machine")
        .path;
    // As in the pod: the node's tracefs at /sys/kernel/tracing (mounted here
    // in a private mount namespace when the host has none), then the agent
    // as root holding only `caps`.
    let script = r#"mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing || exit 97
exec setpriv --inh-caps=-all --ambient-caps=-all --bounding-set="$BOUNDING" -- "$AGENT""#;
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BOUNDING", &bounding)
        .env("AGENT", itw_e2e::system::binary("itw-agent"))
        .env("SERVICE_MAP", &map)
        .env("METRICS_ADDR", metrics.to_string())
        .env("CAPTURE_MODE", mode)
        .env("HOLD", hold)
        .env("HOLD_PARK_ADDR", "127.0.0.1")
        .env("CGROUP_ROOT", &cgroup_root)
        .env("NODE_NAME", "deploy-test")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("starting unshare/setpriv/itw-agent");
    let mut agent = Agent { child, log };
    let tail = |agent: &Agent| {
        let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(3)..].join("\n")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = agent.child.try_wait() {
            return Outcome::Failed(format!("exited with {status}: {}", tail(&agent)));
        }
        if http_get(metrics, READINESS_PATH).is_some_and(|(s, _)| s == 200) {
            break;
        }
        if Instant::now() > deadline {
            return Outcome::Failed(format!("not ready within 30 s: {}", tail(&agent)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..3 {
        // Nothing listens at the stand-in ClusterIP: refused, as a connect to a
        // Service with no pods is under kube-proxy, and counted all the same.
        let _ = TcpStream::connect_timeout(&stand_in, Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counted: u64 = http_get(metrics, "/metrics")
            .map(|(_, body)| {
                body.lines()
                    .filter(|l| {
                        l.starts_with("internal_tcp_attempts_total{")
                            && l.contains("destination_service=\"caps\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        if counted >= 3 || Instant::now() > deadline {
            return Outcome::Counted(counted);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The capability set of the DaemonSet, measured: the real agent attaches and
/// counts in cgroup mode (what auto picks on a cgroup v2 node) and in
/// tracepoint mode with exactly those capabilities; in cgroup mode, which
/// needs them all, dropping any one of them makes it fail.
#[test]
fn the_daemonset_capabilities_are_the_smallest_that_capture() {
    if !require_root("the DaemonSet's capabilities") {
        return;
    }
    let Some(objects) = agent_objects("the DaemonSet's capabilities", "") else {
        return;
    };
    let caps = granted_capabilities(find(&objects, "DaemonSet", "itw-agent"));
    let work = tempfile_dir();
    // A stand-in address of its own: parallel tests cannot add to its count.
    let stand_in: SocketAddr = format!("127.89.{}.{}:8429", std::process::id() % 250, 7)
        .parse()
        .expect("addr");
    // As the DaemonSet runs it: holding Services that ask for it.
    for mode in ["cgroup", "tracepoint"] {
        match run_agent_with(&caps, mode, "annotated", &work, stand_in) {
            Outcome::Counted(n) if n >= 3 => {}
            Outcome::Counted(n) => {
                panic!("CAPTURE_MODE={mode} with {caps:?}: ready, but counted {n} of 3 attempts")
            }
            Outcome::Failed(why) => {
                panic!("CAPTURE_MODE={mode} with only the DaemonSet's capabilities {caps:?}: {why}")
            }
        }
    }
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        if let Outcome::Counted(n @ 3..) =
            run_agent_with(&fewer, "cgroup", "annotated", &work, stand_in)
        {
            panic!(
                "CAPTURE_MODE=cgroup works without {dropped} (counted {n}): the DaemonSet grants more than it needs"
            );
        }
    }
    // With HOLD=off (an overlay) counting needs no SYS_ADMIN: BPF, PERFMON
    // and NET_ADMIN, each of them necessary; holding without SYS_ADMIN is
    // refused at start, naming it.
    let counting: Vec<String> = ["bpf", "perfmon", "net_admin"].map(str::to_owned).to_vec();
    match run_agent_with(&counting, "cgroup", "off", &work, stand_in) {
        Outcome::Counted(n) if n >= 3 => {}
        other => panic!(
            "HOLD=off with {counting:?} should count: {}",
            match other {
                Outcome::Counted(n) => format!("counted {n}"),
                Outcome::Failed(why) => why,
            }
        ),
    }
    for dropped in &counting {
        let fewer: Vec<String> = counting.iter().filter(|c| *c != dropped).cloned().collect();
        if let Outcome::Counted(n @ 3..) = run_agent_with(&fewer, "cgroup", "off", &work, stand_in)
        {
            panic!(
                "HOLD=off counts without {dropped} (counted {n}): README's counting set is too large"
            );
        }
    }
    match run_agent_with(&counting, "cgroup", "annotated", &work, stand_in) {
        Outcome::Failed(why) => assert!(
            why.contains("needs CAP_SYS_ADMIN (setns)") && why.contains("HOLD=annotated"),
            "the start error names the capability and the setting: {why}"
        ),
        Outcome::Counted(n) => {
            panic!("HOLD=annotated without SYS_ADMIN started (counted {n}): it must fail at start")
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("itw-deploy-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
