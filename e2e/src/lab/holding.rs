//! The holding checks of a cell: a held connect released with the datapath
//! lagging, from its client pod's own address; a client a policy denies
//! never reaching the Service; a node process at a parking port never
//! handed on; the next connect direct; a flood past the caps not held,
//! counted, and the agent's memory back where it was.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::time::Instant;

use super::{
    Cell, Check, Settings,
    cell::{
        AGENT_METRICS, CLIENT_COMM, Running, SETTLE, client, client_args, expect, finish,
        replies_from,
    },
    netns::Netns,
    node::{NODE_IP, Node},
    observe::{self, settle, sum},
    procs::{self, Placement},
    scenario::{self, BATCH, CLIENT, DENIED, HELD, HELD_POD, HELD6, PORT},
};

/// `HOLD_MAX_PER_SERVICE` in the flood's cells.
pub const FLOOD_CAP: u32 = 100;
/// Connects of the flood, each sending [`FLOOD_PAYLOAD`] bytes.
const FLOOD_CONNECTS: u32 = 150;
const FLOOD_PAYLOAD: usize = 64 * 1024;

/// The policy: a CNI-style rule in the node's FORWARD chain that drops the
/// denied pod's traffic to the held Service's pod (after kube-proxy's DNAT,
/// as NetworkPolicy is enforced).
pub fn deny(node: &Node) -> anyhow::Result<()> {
    let denied = node.pod(DENIED)?.spec.ip.to_string();
    let server = node.pod(HELD_POD)?.spec.ip.to_string();
    node.netns.exec(
        "iptables",
        &[
            "-I", "FORWARD", "1", "-s", &denied, "-d", &server, "-j", "DROP",
        ],
    )
}

/// What the held Service's pod has accepted so far: peer addresses.
fn peers(running: &Running) -> Vec<String> {
    running
        .peer_logs
        .get(HELD_POD)
        .and_then(|log| std::fs::read_to_string(log).ok())
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

pub(super) async fn checks(
    cell: &Cell,
    settings: &Settings,
    running: &Running,
    expected_total: &mut u64,
) -> Vec<Check> {
    let mut out = Vec::new();
    let held = SocketAddr::new(HELD.1.into(), PORT);
    let (hold, policy) = if cell.holding_blocked {
        (Check::run("hold", blocked(running, cell, held)).await, None)
    } else {
        let mut policy = None;
        let hold = Check::run("hold", async {
            let (detail, denied) = hold(cell, settings, running, held).await?;
            policy = denied;
            Ok(detail)
        })
        .await;
        (
            hold,
            policy.map(|result| Check {
                name: "policy",
                result,
            }),
        )
    };
    out.push(hold);
    out.extend(policy);
    // Each held client's connect counts once; the denied one's too.
    *expected_total += if cell.holding_blocked {
        1
    } else {
        1 + u64::from(cell.ipv6) + u64::from(cell.policy)
    };

    out.push(
        Check::run("direct", async {
            // Once the datapath has the pod (the release may come before it).
            let mut synced = running.proxy.synced.clone();
            tokio::time::timeout(
                SETTLE + settings.lag,
                synced.wait_for(|s| {
                    s.frontends
                        .iter()
                        .any(|f| f.addr() == held && !f.backends.is_empty())
                }),
            )
            .await
            .context("the datapath never got the held Service's pod")??;
            let made = client(&running.node, CLIENT, CLIENT_COMM, held, 1, true).await?;
            let replies = replies_from(&made, HELD_POD);
            let samples = observe::metrics(AGENT_METRICS).await?;
            let ever_held = sum(
                &samples,
                "itw_agent_connections_held_total",
                &[("destination_service", HELD.0)],
            );
            let want = if cell.holding_blocked {
                0
            } else {
                1 + u64::from(cell.ipv6) + u64::from(cell.policy)
            };
            expect(
                replies == 1 && ever_held == want,
                format!("reply {replies}/1, held in all {ever_held} (want {want})"),
            )
        })
        .await,
    );
    *expected_total += 1;

    if cell.flood {
        out.push(Check::run("flood", flood(running)).await);
        *expected_total += u64::from(FLOOD_CONNECTS);
    }
    out
}

/// The held clients (and, in a policy cell, the denied one and a node
/// process at the parking port) before and after the pod is ready. Returns
/// the hold check's detail and, in a policy cell, the policy check's.
async fn hold(
    cell: &Cell,
    settings: &Settings,
    running: &Running,
    held: SocketAddr,
) -> anyhow::Result<(String, Option<Result<String, String>>)> {
    let node = &running.node;
    let mut held_clients = vec![(CLIENT, held)];
    if cell.ipv6 {
        held_clients.push((CLIENT, SocketAddr::new(HELD6.into(), PORT)));
    }
    if cell.policy {
        held_clients.push((DENIED, held));
    }
    let mut children = Vec::new();
    for (pod, to) in &held_clients {
        let pod = node.pod(pod)?;
        let path = pod.netns.path();
        let place = Placement {
            netns: Some(&path),
            cgroup: &pod.cgroup,
        };
        children.push(procs::pod_command(
            &place,
            &client_args(CLIENT_COMM, *to, 1, true),
        )?);
    }
    let want = held_clients.len() as u64;
    let parked = settle(AGENT_METRICS, SETTLE, want, |m| {
        sum(
            m,
            "itw_agent_held_connections",
            &[("destination_service", HELD.0)],
        )
    })
    .await;
    if parked != want {
        bail!("{parked} of {want} connects parked");
    }
    let stranger = if cell.policy {
        Some(stranger(&node.netns).await?)
    } else {
        None
    };
    let ready_at = Instant::now();
    for slice in scenario::held_slices(cell.ipv6, true) {
        running.mock.put(&slice);
    }
    let mut details = Vec::new();
    let mut denied_result = None;
    for ((pod, to), child) in held_clients.into_iter().zip(children) {
        let made = finish(child).await?;
        let elapsed = ready_at.elapsed();
        let Some(attempt) = made.first() else {
            bail!("the held client printed nothing")
        };
        let own_ip = &node.pod(pod)?.spec;
        let own_ip = if to.is_ipv4() {
            IpAddr::V4(own_ip.ip)
        } else {
            IpAddr::V6(own_ip.ip6)
        };
        let peer_ok = attempt.peer.as_deref() == Some(to.to_string().as_str());
        if pod == DENIED {
            // Denied: not delivered while held, and ends as its direct
            // connection would (it never reaches the server).
            let reached = peers(running)
                .iter()
                .any(|p| p.starts_with(&format!("{own_ip}:")));
            let ok = peer_ok && attempt.reply.is_none() && !reached;
            denied_result = Some(if ok {
                Ok(format!(
                    "denied pod held, never delivered ({}), ended after {} ms; {}",
                    attempt
                        .errno
                        .map_or("no error".to_owned(), |e| format!("errno {e}")),
                    elapsed.as_millis(),
                    stranger.clone().unwrap_or_default()
                ))
            } else {
                Err(format!(
                    "denied pod: {attempt:?}, reached the server: {reached}; {}",
                    stranger.clone().unwrap_or_default()
                ))
            });
            continue;
        }
        // The server saw the client pod's own address: released from its
        // network namespace, not from the node.
        let seen_as = match own_ip {
            IpAddr::V4(ip) => format!(" saw {ip}:"),
            IpAddr::V6(ip) => format!(" saw [{ip}]:"),
        };
        let from_pod = attempt
            .reply
            .as_deref()
            .is_some_and(|r| r.contains(&seen_as));
        let reply_ok = replies_from(&made, HELD_POD) == 1;
        if !(attempt.connected && peer_ok && reply_ok && from_pod) {
            bail!("{to}: {attempt:?} (the server must see {own_ip})");
        }
        details.push(format!(
            "{to} answered {} ms after ready, from {own_ip}",
            elapsed.as_millis()
        ));
    }
    let samples = observe::metrics(AGENT_METRICS).await?;
    let labels = [("destination_service", HELD.0)];
    let failed = sum(&samples, "itw_agent_held_release_failed_total", &labels);
    let retries = sum(&samples, "itw_agent_held_release_retries_total", &labels);
    details.push(format!(
        "{retries} release retries (lag {} ms)",
        settings.lag.as_millis()
    ));
    let want_failed = u64::from(cell.policy);
    let stranger_ok = stranger
        .as_deref()
        .is_none_or(|s| s.starts_with("stranger reset"));
    if !stranger_ok {
        denied_result = Some(Err(stranger.clone().unwrap_or_default()));
    }
    if cell.policy {
        // Whichever held Service's port it found.
        let not_redirected = sum(&samples, "itw_agent_hold_not_redirected_total", &[]);
        if not_redirected != 1 {
            denied_result = Some(Err(format!(
                "{not_redirected} connections counted as not redirected (want 1)"
            )));
        }
    }
    let detail = details.join(", ");
    Ok((
        expect(
            failed == want_failed,
            format!("{detail}; release failed {failed} (want {want_failed})"),
        )?,
        denied_result,
    ))
}

/// A process on the node connects straight to the parking port: it must be
/// reset, never handed to the Service.
async fn stranger(node: &Netns) -> anyhow::Result<String> {
    let port = parking_port(node)?;
    let to = SocketAddr::new(NODE_IP.into(), port);
    let outcome = match tokio::net::TcpStream::connect(to).await {
        Err(error) => format!("{:?}", error.kind()),
        Ok(mut stream) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.write_all(b"hello\n").await;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) => "EOF".to_owned(),
                Ok(Ok(n)) => format!("answered {n} bytes"),
                Ok(Err(error)) => format!("{:?}", error.kind()),
                Err(_) => "no answer within 5 s".to_owned(),
            }
        }
    };
    Ok(match outcome.as_str() {
        "ConnectionReset" | "EOF" => format!("stranger reset at parking port {port} ({outcome})"),
        _ => format!("stranger at parking port {port}: {outcome}"),
    })
}

/// A parking listener's port: a TCP listener on the node IP.
fn parking_port(node: &Netns) -> anyhow::Result<u16> {
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "ss", "-Htln"])
        .output()
        .context("running ss in the node's namespace")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let prefix = format!("{NODE_IP}:");
    text.lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .find_map(|local| local.strip_prefix(&prefix)?.parse().ok())
        .with_context(|| format!("no parking listener on {NODE_IP}: {text}"))
}

/// A cell where a socket load balancer runs before our programs and the
/// agent must say it cannot hold: `/readyz` and the metric say so, and a
/// connect to the held Service is refused as without holding (and counted),
/// never parked in silence. Then the Service's pod becomes ready.
async fn blocked(running: &Running, cell: &Cell, held: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = observe::http_get(AGENT_METRICS, "/readyz").await?;
    if status != 503 || !body.starts_with("cannot hold: ") {
        bail!("/readyz answered {status} {body:?}");
    }
    let made = client(&running.node, CLIENT, CLIENT_COMM, held, 1, true).await?;
    let refused = made.iter().filter(|a| a.errno == Some(libc::EPERM)).count();
    let samples = observe::metrics(AGENT_METRICS).await?;
    let parked = sum(
        &samples,
        "itw_agent_connections_held_total",
        &[("destination_service", HELD.0)],
    );
    for slice in scenario::held_slices(cell.ipv6, true) {
        running.mock.put(&slice);
    }
    expect(
        refused == 1 && parked == 0,
        format!(
            "refused {refused}/1 (EPERM), parked {parked}; /readyz: {}",
            body.trim()
        ),
    )
}

/// The agent's resident set, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// A flood of connects to a held Service that never becomes ready, each
/// sending 64 KiB: the cap's worth are parked (and reset at the hold
/// timeout), the rest go on unheld (refused, as without holding) and are
/// counted; nothing stays buffered, and the agent's memory comes back.
async fn flood(running: &Running) -> anyhow::Result<String> {
    let pid = running
        .agent
        .as_ref()
        .and_then(|a| a.child.id())
        .context("no agent process")?;
    let before = rss_kib(pid)?;
    let pod = running.node.pod(CLIENT)?;
    let path = pod.netns.path();
    let to = SocketAddr::new(BATCH.1.into(), PORT);
    let child = procs::pod_command(
        &Placement {
            netns: Some(&path),
            cgroup: &pod.cgroup,
        },
        &[
            "flood".to_owned(),
            "--comm".to_owned(),
            CLIENT_COMM.to_owned(),
            "--to".to_owned(),
            to.to_string(),
            "--count".to_owned(),
            FLOOD_CONNECTS.to_string(),
            "--payload".to_owned(),
            FLOOD_PAYLOAD.to_string(),
        ],
    )?;
    let labels = [("destination_service", BATCH.0)];
    let parked = settle(AGENT_METRICS, SETTLE, u64::from(FLOOD_CAP), |m| {
        sum(m, "itw_agent_held_connections", &labels)
    })
    .await;
    let buffered_peak = sum(
        &observe::metrics(AGENT_METRICS).await?,
        "itw_agent_hold_buffered_bytes",
        &[],
    );
    let peak = rss_kib(pid)?;
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("the flood did not end within 60 s")??;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let refused = lines
        .iter()
        .filter(|l| {
            l["errno"]
                .as_i64()
                .is_some_and(|e| e as i32 == libc::ECONNREFUSED || e as i32 == libc::EPERM)
        })
        .count();
    let reset = lines
        .iter()
        .filter(|l| l["ended"].as_str().is_some_and(|e| e.contains("reset")))
        .count();
    // The agent reaps every collection; let it tell the kernel and trim.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = observe::metrics(AGENT_METRICS).await?;
    let over_cap = sum(&samples, "itw_agent_hold_over_cap_total", &labels);
    let timed_out = sum(&samples, "itw_agent_held_timed_out_total", &labels);
    let buffered = sum(&samples, "itw_agent_hold_buffered_bytes", &[]);
    let after = rss_kib(pid)?;
    let cap = u64::from(FLOOD_CAP);
    let rest = u64::from(FLOOD_CONNECTS) - cap;
    expect(
        parked == cap
            && over_cap == rest
            && refused as u64 == rest
            && timed_out == cap
            && reset as u64 == cap
            && buffered == 0
            // Back where it was (a few pages of slack): the buffers were
            // given back, not kept by the allocator.
            && after <= before + 4 * 1024,
        format!(
            "{FLOOD_CONNECTS} connects of 64 KiB: parked {parked} (cap {cap}), over the cap {over_cap} (refused {refused}), timed out {timed_out} (reset {reset}), buffered {buffered_peak} B at peak then {buffered} B; agent RSS {} -> {} -> {} MiB",
            before / 1024,
            peak / 1024,
            after / 1024
        ),
    )
}
