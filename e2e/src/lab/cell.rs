//! One cell of the matrix: a node with one datapath and one cgroup layout,
//! the real scaler and agent on it, and the checks, each with exact numbers.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{process::Command, time::Instant};

use super::{
    Cell, Check, Settings,
    cgroups::{self, Qos},
    chain,
    daemonset::{self, Downward},
    datapath::{Kind, iptables, socklb::SocketLb},
    holding, netns,
    node::{NODE_IP, NODE_IP6, Node},
    observe::{self, Attempt, parse_attempts, settle, sum},
    procs::{self, Daemon, Placement},
    proxy::{self, Programmer},
    scenario::{self, CLIENT, COLD, DUAL, HELD_POD, NAMESPACE, PORT, WEB, WEB_POD, WEB6},
    sources,
};
use crate::kube_mock::MockApiServer;

pub(super) const AGENT_METRICS: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9102);
pub(super) const SCALER_GRPC: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);
pub(super) const SCALER_METRICS: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9103);
const API_SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 6443);
/// The callers' process name, as `internal_tcp_attempts_total` shows it.
pub(super) const CLIENT_COMM: &str = "checkout";
/// Where the DaemonSet mounts the node's cgroup root for the agent.
pub const HOST_CGROUP: &str = "/host/sys/fs/cgroup";
/// Where it mounts the node's network namespace files.
pub const HOST_NETNS: &str = "/host/run/netns";
pub(super) const SETTLE: Duration = Duration::from_secs(5);

/// Builds the cell's node, runs everything on it, removes it.
pub fn run(cell: &Cell, settings: &Settings, prefix: &str) -> anyhow::Result<Vec<Check>> {
    let hierarchy = cgroups::hierarchy()?;
    let nest = if cell.nested {
        format!("{prefix}host.slice/{prefix}node.scope")
    } else {
        String::new()
    };
    let node = Node::build(prefix, &hierarchy, &nest, cell.driver, &scenario::pods())
        .context("building the node")?;
    let home = netns::current()?;
    netns::enter(&node.netns.open()?)?;
    // Every thread of this runtime is born in the node's namespace.
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the cell's runtime")
        .and_then(|runtime| {
            let result = runtime.block_on(on_node(cell, settings, node));
            runtime.shutdown_timeout(Duration::from_secs(5));
            result
        });
    netns::enter(&home)?;
    outcome
}

/// Everything running on the node; dropped in this order.
pub(super) struct Running {
    pub(super) agent: Option<Daemon>,
    _servers: Vec<tokio::process::Child>,
    scaler: Daemon,
    pub(super) proxy: proxy::Proxy,
    pub(super) mock: MockApiServer,
    pub(super) node: Node,
    /// Where each server pod logs the peers it accepted.
    pub(super) peer_logs: std::collections::BTreeMap<&'static str, PathBuf>,
}

async fn on_node(cell: &Cell, settings: &Settings, mut node: Node) -> anyhow::Result<Vec<Check>> {
    let mock = MockApiServer::start_on(API_SERVER).await;
    mock.load(scenario::objects(cell.ipv6));
    let programmer = match cell.datapath {
        Kind::Iptables => {
            iptables::install(&node.netns)?;
            Programmer::Iptables {
                node: node.netns.clone(),
                chains4: Default::default(),
                chains6: Default::default(),
            }
        }
        Kind::Nftables => Programmer::Nftables {
            node: node.netns.clone(),
        },
        Kind::SocketLb { preorder } => {
            Programmer::SocketLb(Box::new(SocketLb::attach(&node.cgroups.root, preorder)?))
        }
    };
    if cell.policy {
        holding::deny(&node)?;
    }
    let proxy = proxy::start(mock.client(), programmer, settings.lag);
    let mut synced = proxy.synced.clone();
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| s.syncs > 0))
        .await
        .map_err(|_| anyhow::anyhow!("the datapath never synced: {:?}", proxy.errors.lock()))??;

    let work = settings.work.join(&cell.name);
    std::fs::create_dir_all(&work)?;
    let token = work.join("agent-token");
    std::fs::write(&token, "node-lab-token\n")?;
    let mut scaler_cmd = Command::new(&settings.scaler);
    scaler_cmd
        .env_clear()
        .env("GRPC_ADDR", SCALER_GRPC.to_string())
        .env("METRICS_ADDR", SCALER_METRICS.to_string())
        .env("AGENT_TOKEN_FILE", &token)
        .env("RUST_LOG", "info");
    let scaler = procs::daemon(scaler_cmd, None, &work.join("scaler.log"))?;

    let mut servers = Vec::new();
    let mut peer_logs = std::collections::BTreeMap::new();
    for name in [WEB_POD, HELD_POD] {
        let pod = node.pod(name)?;
        let log = work.join(format!("{name}.peers"));
        let mut args = vec![
            "serve".to_owned(),
            "--name".to_owned(),
            name.to_owned(),
            "--log".to_owned(),
            log.to_string_lossy().into_owned(),
        ];
        peer_logs.insert(name, log);
        for ip in [IpAddr::V4(pod.spec.ip), IpAddr::V6(pod.spec.ip6)] {
            args.push("--listen".to_owned());
            args.push(SocketAddr::new(ip, scenario::TARGET_PORT).to_string());
        }
        let path = pod.netns.path();
        servers.push(procs::pod_command(
            &Placement {
                netns: Some(&path),
                cgroup: &pod.cgroup,
            },
            &args,
        )?);
    }

    let agent_cgroup = node.cgroups.create(&cgroups::container_path(
        node.driver,
        Qos::Burstable,
        "e9b1c7d3-4f5a-4b6c-8d7e-9f0a1b2c3d4e",
        &format!("{:0>64}", "a9e47"),
    ))?;
    node.system_cgroup(cgroups::KUBELET)?;
    node.system_cgroup(sources::NODE_PROBE)?;
    let mut running = Running {
        agent: None,
        _servers: servers,
        scaler,
        proxy,
        mock,
        peer_logs,
        node,
    };
    let agent = start_agent(cell, settings, &running.node, &agent_cgroup, &work, &token)?;
    running.agent = Some(agent);
    wait_ready(&mut running, cell).await?;
    let checks = checks(cell, settings, &running).await;
    Ok(checks)
}

fn start_agent(
    cell: &Cell,
    settings: &Settings,
    node: &Node,
    cgroup: &Path,
    work: &Path,
    token: &Path,
) -> anyhow::Result<Daemon> {
    let mut pod = daemonset::agent_pod(&Downward {
        node_name: "lab-node",
        host_ip: &NODE_IP.to_string(),
    })?;
    // What a cluster provides differently: the scaler's address, the
    // token's path, the API server (in-cluster config there).
    pod.set("SCALER_ADDR", &SCALER_GRPC.to_string());
    pod.set("SCALER_TOKEN_FILE", &token.to_string_lossy());
    if cell.ipv6 {
        pod.set("HOLD_PARK_ADDR6", &NODE_IP6.to_string());
    }
    pod.set("EXCLUDE_SOURCES", sources::EXCLUDE_SOURCES);
    for (name, value) in &cell.env {
        pod.set(name, value);
    }
    if pod.get("HOLD_NETNS_DIR") != Some(HOST_NETNS) {
        bail!(
            "the DaemonSet's HOLD_NETNS_DIR is {:?}, the lab mounts the node's at {HOST_NETNS}",
            pod.get("HOLD_NETNS_DIR")
        );
    }
    if pod.get("CGROUP_ROOT") != Some(HOST_CGROUP) {
        bail!(
            "the DaemonSet's CGROUP_ROOT is {:?}, the lab mounts the node's at {HOST_CGROUP}",
            pod.get("CGROUP_ROOT")
        );
    }
    let kubeconfig = work.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{API_SERVER}\nusers:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\n"
        ),
    )?;
    let bounding = std::iter::once("-all".to_owned())
        .chain(pod.capabilities.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    // As in the pod: its own mount namespace with the node's cgroup root
    // read-only at /host/sys/fs/cgroup, root holding only the DaemonSet's
    // capabilities.
    let script = r#"mount --bind -o ro "$ITW_LAB_NODE_CGROUP" /host/sys/fs/cgroup || exit 97
mount --rbind /var/run/netns /host/run/netns || exit 96
exec setpriv --inh-caps=-all --ambient-caps=-all --bounding-set="$ITW_LAB_BOUNDING" -- "$ITW_LAB_AGENT""#;
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ITW_LAB_NODE_CGROUP", &node.cgroups.root)
        .env("ITW_LAB_BOUNDING", bounding)
        .env("ITW_LAB_AGENT", &settings.agent)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info");
    for (name, value) in &pod.env {
        command.env(name, value);
    }
    procs::daemon(
        command,
        Some(&Placement {
            netns: None,
            cgroup,
        }),
        &work.join("agent.log"),
    )
}

/// Waits until the agent has its map and a stream to the scaler. A cell
/// where the agent cannot hold waits for `/readyz` to say exactly that.
async fn wait_ready(running: &mut Running, cell: &Cell) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let agent = running.agent.as_mut().context("no agent")?;
    loop {
        if let Ok(Some(status)) = agent.child.try_wait() {
            bail!("the agent exited with {status}:\n{}", agent.tail(8));
        }
        if let Ok(Some(status)) = running.scaler.child.try_wait() {
            bail!(
                "the scaler exited with {status}:\n{}",
                running.scaler.tail(8)
            );
        }
        let ready = match observe::http_get(AGENT_METRICS, "/readyz").await {
            Ok((200, _)) => !cell.holding_blocked,
            Ok((503, body)) => cell.holding_blocked && body.starts_with("cannot hold: "),
            _ => false,
        };
        let connected = observe::metrics(SCALER_METRICS)
            .await
            .is_ok_and(|m| sum(&m, "itw_scaler_agents_connected", &[]) == 1);
        if ready && connected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not ready within 30 s (agent ready: {ready}, connected to the scaler: {connected}):\n{}",
                agent.tail(8)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `pod client` in `pod`: `count` connects to `to`, each sending a
/// line when `send`, with `comm` as the process name.
pub(super) async fn client(
    node: &Node,
    pod: &str,
    comm: &str,
    to: SocketAddr,
    count: u32,
    send: bool,
) -> anyhow::Result<Vec<Attempt>> {
    let pod = node.pod(pod)?;
    let path = pod.netns.path();
    let child = procs::pod_command(
        &Placement {
            netns: Some(&path),
            cgroup: &pod.cgroup,
        },
        &client_args(comm, to, count, send),
    )?;
    finish(child).await
}

pub(super) fn client_args(comm: &str, to: SocketAddr, count: u32, send: bool) -> Vec<String> {
    let mut args = vec![
        "client".to_owned(),
        "--comm".to_owned(),
        comm.to_owned(),
        "--to".to_owned(),
        to.to_string(),
        "--count".to_owned(),
        count.to_string(),
    ];
    if send {
        args.push("--send".to_owned());
    }
    args
}

pub(super) async fn finish(child: tokio::process::Child) -> anyhow::Result<Vec<Attempt>> {
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("a pod process did not finish within 60 s")??;
    if !output.status.success() {
        bail!(
            "a pod process failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_attempts(&String::from_utf8_lossy(&output.stdout))
}

pub(super) fn attempts(samples: &[observe::Sample], service: &str, pod: &str, comm: &str) -> u64 {
    sum(
        samples,
        "internal_tcp_attempts_total",
        &[
            ("destination_namespace", NAMESPACE),
            ("destination_service", service),
            ("destination_pod", pod),
            ("process_comm", comm),
        ],
    )
}

pub(super) fn replies_from(attempts: &[Attempt], pod: &str) -> usize {
    attempts
        .iter()
        .filter(|a| a.reply.as_deref().is_some_and(|r| r.starts_with(pod)))
        .count()
}

async fn checks(cell: &Cell, settings: &Settings, running: &Running) -> Vec<Check> {
    let mut out = Vec::new();
    let mut expected_total = 0;
    let node = &running.node;
    let cold = SocketAddr::new(COLD.1.into(), PORT);
    let web = SocketAddr::new(WEB.1.into(), PORT);
    let web_pod = SocketAddr::new(scenario::pod(WEB_POD).ip.into(), scenario::TARGET_PORT);
    let refused_errno = match cell.datapath {
        Kind::SocketLb { .. } => libc::EPERM,
        _ => libc::ECONNREFUSED,
    };

    let mut active = observe::stream_is_active(SCALER_GRPC, NAMESPACE, COLD.0).await;

    // ClusterIP of a Service without endpoints.
    out.push(
        Check::run("cold", async {
            let made = client(node, CLIENT, CLIENT_COMM, cold, 5, false).await?;
            let refused = made
                .iter()
                .filter(|a| a.errno == Some(refused_errno))
                .count();
            let counted = settle(AGENT_METRICS, SETTLE, 5, |m| {
                attempts(m, COLD.0, "", CLIENT_COMM)
            })
            .await;
            expect(
                refused == 5 && counted == 5,
                format!(
                    "refused {refused}/5 ({}), counted {counted}/5",
                    errno_name(refused_errno)
                ),
            )
        })
        .await,
    );
    expected_total += 5;

    out.push(
        Check::run("activation", async {
            let stream = active.as_mut().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let deadline = Instant::now() + SETTLE;
            let mut seen = Vec::new();
            while !seen.contains(&true) {
                match tokio::time::timeout_at(deadline, stream.recv()).await {
                    Ok(Some(value)) => seen.push(value),
                    _ => break,
                }
            }
            expect(
                seen.contains(&true),
                format!("StreamIsActive sent {seen:?}"),
            )
        })
        .await,
    );

    out.push(
        Check::run("clusterip", async {
            let made = client(node, CLIENT, CLIENT_COMM, web, 5, true).await?;
            let replies = replies_from(&made, WEB_POD);
            // Behind a load balancer that rewrites first, our program sees
            // (and counts) the backend it chose.
            let under = if cell.holding_blocked { WEB_POD } else { "" };
            let counted = settle(AGENT_METRICS, SETTLE, 5, |m| {
                attempts(m, WEB.0, under, CLIENT_COMM)
            })
            .await;
            expect(
                replies == 5 && counted == 5,
                format!("replies {replies}/5, counted {counted}/5 (destination_pod {under:?})"),
            )
        })
        .await,
    );
    expected_total += 5;

    out.push(
        Check::run("pod-ip", async {
            // Under whichever Service the agent maps the pod's address to
            // (in the IPv6 cell it backs `dual` too).
            let under_pod = |m: &[observe::Sample]| {
                sum(
                    m,
                    "internal_tcp_attempts_total",
                    &[("destination_pod", WEB_POD), ("process_comm", CLIENT_COMM)],
                )
            };
            let before = under_pod(&observe::metrics(AGENT_METRICS).await?);
            let made = client(node, CLIENT, CLIENT_COMM, web_pod, 3, true).await?;
            let replies = replies_from(&made, WEB_POD);
            let counted = settle(AGENT_METRICS, SETTLE, before + 3, under_pod).await - before;
            let series: Vec<String> = observe::metrics(AGENT_METRICS)
                .await?
                .iter()
                .filter(|s| {
                    s.name == "internal_tcp_attempts_total"
                        && s.label("destination_pod").is_some_and(|p| !p.is_empty())
                })
                .map(|s| format!("{:?}={}", s.labels, s.value))
                .collect();
            let ok = replies == 3 && counted == 3;
            expect(
                ok,
                format!(
                    "replies {replies}/3, counted under the pod {counted}/3{}",
                    if ok {
                        String::new()
                    } else {
                        format!("; pod series: {series:?}")
                    }
                ),
            )
        })
        .await,
    );
    expected_total += 3;

    out.push(
        Check::run("kubelet", async {
            let cgroup = running_kubelet_cgroup(node)?;
            let child = procs::pod_command(
                &Placement {
                    netns: None,
                    cgroup: &cgroup,
                },
                &client_args("kubelet", web_pod, 4, true),
            )?;
            let made = finish(child).await?;
            let replies = replies_from(&made, WEB_POD);
            let filtered = settle(AGENT_METRICS, SETTLE, 4, |m| {
                sum(
                    m,
                    "internal_tcp_filtered_total",
                    &[("process_comm", "kubelet")],
                )
            })
            .await;
            let samples = observe::metrics(AGENT_METRICS).await?;
            let counted = sum(
                &samples,
                "internal_tcp_attempts_total",
                &[("process_comm", "kubelet")],
            );
            expect(
                replies == 4 && filtered == 4 && counted == 0,
                format!("probes answered {replies}/4, filtered {filtered}/4, counted {counted}"),
            )
        })
        .await,
    );

    out.extend(holding::checks(cell, settings, running, &mut expected_total).await);

    if cell.ipv6 {
        out.push(
            Check::run("ipv6", async {
                let web6 = SocketAddr::new(WEB6.1.into(), PORT);
                let dual4 = SocketAddr::new(DUAL.1.into(), PORT);
                let dual6 = SocketAddr::new(DUAL.2.into(), PORT);
                let mut replies = 0;
                for to in [web6, dual4, dual6] {
                    replies += replies_from(
                        &client(node, CLIENT, CLIENT_COMM, to, 2, true).await?,
                        WEB_POD,
                    );
                }
                let web6_n = settle(AGENT_METRICS, SETTLE, 2, |m| {
                    attempts(m, WEB6.0, "", CLIENT_COMM)
                })
                .await;
                let dual_n = settle(AGENT_METRICS, SETTLE, 4, |m| {
                    attempts(m, DUAL.0, "", CLIENT_COMM)
                })
                .await;
                expect(
                    replies == 6 && web6_n == 2 && dual_n == 4,
                    format!("replies {replies}/6, web6 {web6_n}/2, dual-stack {dual_n}/4"),
                )
            })
            .await,
        );
        expected_total += 6;
    }

    out.extend(sources::checks(running, &mut expected_total).await);

    out.push(
        Check::run("once", async {
            let agent = settle(AGENT_METRICS, SETTLE, expected_total, |m| {
                sum(m, "internal_tcp_attempts_total", &[])
            })
            .await;
            let scaler = settle(SCALER_METRICS, SETTLE, expected_total, |m| {
                sum(m, "internal_tcp_attempts_total", &[])
            })
            .await;
            expect(
                agent == expected_total && scaler == expected_total,
                format!("agent {agent}, scaler {scaler}, connects {expected_total}"),
            )
        })
        .await,
    );

    out.push(
        Check::run("order", async {
            let samples = observe::metrics(AGENT_METRICS).await?;
            let blocked = sum(&samples, "itw_agent_cgroup_holding_blocked", &[]);
            let before: Vec<String> = samples
                .iter()
                .filter(|s| s.name == "itw_agent_cgroup_programs_before_ours" && s.value > 0.0)
                .map(|s| format!("{}={}", s.label("hook").unwrap_or("?"), s.value))
                .collect();
            let want = u64::from(cell.holding_blocked);
            expect(
                blocked == want,
                format!(
                    "holding blocked {blocked} (want {want}); programs before ours: {}",
                    if before.is_empty() {
                        "none".to_owned()
                    } else {
                        before.join(", ")
                    }
                ),
            )
        })
        .await,
    );
    // Last: its callers retry, so it makes more attempts than "once" counts.
    if cell.chain {
        out.extend(chain::checks(running, settings).await);
    }
    out
}

fn running_kubelet_cgroup(node: &Node) -> anyhow::Result<PathBuf> {
    let path = node.cgroups.root.join(cgroups::KUBELET);
    if path.is_dir() {
        Ok(path)
    } else {
        bail!("no kubelet cgroup at {}", path.display())
    }
}

pub(super) fn expect(ok: bool, detail: String) -> anyhow::Result<String> {
    if ok { Ok(detail) } else { bail!(detail) }
}

pub(super) fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ECONNREFUSED => "ECONNREFUSED",
        _ => "?",
    }
}
