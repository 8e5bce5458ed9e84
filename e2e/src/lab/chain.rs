//! Waking a call chain at once (issue #15): `front` calls `api`, which
//! calls `db`, each scaled to zero. One warm run teaches the scaler the
//! edges; then a connect to `front` wakes all three through `prewake`
//! within the same second. Measured beside the chain's serial wake-up,
//! where each link wakes only when its caller has a pod that calls it.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use tokio::{sync::mpsc, time::Instant};

use super::{
    Check, Settings,
    cell::{AGENT_METRICS, CLIENT_COMM, Running, SCALER_GRPC, SETTLE, client, expect},
    observe,
    procs::{self, Placement},
    scenario::{self, CHAIN, CLIENT, NAMESPACE, PORT, TARGET_PORT},
};

/// The trigger window of the chain's ScaledObjects: short, so that the warm
/// run's activity has aged out within a check.
const WINDOW: &str = "2s";

fn cluster_ip(link: usize) -> SocketAddr {
    SocketAddr::new(CHAIN[link].1.into(), PORT)
}

/// Starts each link's process in its pod: relays for `front` and `api`, a
/// server for `db`. Killed when the returned children drop.
fn start_links(running: &Running) -> anyhow::Result<Vec<tokio::process::Child>> {
    let mut children = Vec::new();
    for (link, (service, _, pod_name)) in CHAIN.iter().enumerate() {
        let pod = running.node.pod(pod_name)?;
        let listen = SocketAddr::new(pod.spec.ip.into(), TARGET_PORT).to_string();
        let args: Vec<String> = match CHAIN.get(link + 1) {
            Some(_) => [
                "relay",
                "--name",
                service,
                "--comm",
                service,
                "--listen",
                &listen,
                "--next",
                &cluster_ip(link + 1).to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
            None => ["serve", "--name", service, "--listen", &listen]
                .map(str::to_owned)
                .to_vec(),
        };
        let path = pod.netns.path();
        children.push(procs::pod_command(
            &Placement {
                netns: Some(&path),
                cgroup: &pod.cgroup,
            },
            &args,
        )?);
    }
    Ok(children)
}

/// Puts the chain's slices (ready or scaled to zero) and waits until the
/// datapath has every link that way.
async fn scale(running: &Running, settings: &Settings, up: bool) -> anyhow::Result<()> {
    for slice in scenario::chain_slices(up) {
        running.mock.put(&slice);
    }
    synced(running, settings, |link| {
        scenario_frontend(running, link).is_some_and(|backends| (backends > 0) == up)
    })
    .await
}

/// How many backends the datapath has for `link`'s ClusterIP, if any rule.
fn scenario_frontend(running: &Running, link: usize) -> Option<usize> {
    let synced = running.proxy.synced.borrow();
    synced
        .frontends
        .iter()
        .find(|f| f.addr() == cluster_ip(link))
        .map(|f| f.backends.len())
}

async fn synced(
    running: &Running,
    settings: &Settings,
    done: impl Fn(usize) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE + settings.lag;
    let mut synced = running.proxy.synced.clone();
    while !(0..CHAIN.len()).all(&done) {
        if tokio::time::timeout_at(deadline, synced.changed())
            .await
            .is_err()
        {
            bail!("the datapath did not follow the chain's slices");
        }
    }
    Ok(())
}

/// One KEDA-role stream per link, with `prewake` or without.
async fn streams(prewake: bool) -> anyhow::Result<Vec<mpsc::UnboundedReceiver<bool>>> {
    let mut out = Vec::new();
    for (service, _, _) in CHAIN {
        let mut metadata = vec![("window", WINDOW)];
        if prewake {
            metadata.push(("prewake", "true"));
        }
        out.push(
            observe::stream_is_active_with(SCALER_GRPC, NAMESPACE, service, &metadata)
                .await
                .with_context(|| format!("StreamIsActive for {service}"))?,
        );
    }
    Ok(out)
}

/// Waits until every stream's latest value is `false` (the warm run's
/// attempts have left the window).
async fn all_inactive(streams: &mut [mpsc::UnboundedReceiver<bool>]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut latest = vec![None; streams.len()];
    while latest.iter().any(|v| *v != Some(false)) {
        for (i, stream) in streams.iter_mut().enumerate() {
            while let Ok(value) = stream.try_recv() {
                latest[i] = Some(value);
            }
        }
        if Instant::now() > deadline {
            bail!("the chain's streams did not go inactive: {latest:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// When each stream next says `true`, from `start`; `on_true` runs for each
/// link as it wakes (the serial run scales it up there).
async fn wake_times(
    streams: &mut [mpsc::UnboundedReceiver<bool>],
    start: Instant,
    limit: Duration,
    mut on_true: impl FnMut(usize),
) -> Vec<Option<Duration>> {
    let mut woke = vec![None; streams.len()];
    let deadline = start + limit;
    while woke.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, stream) in streams.iter_mut().enumerate() {
            while let Ok(value) = stream.try_recv() {
                if value && woke[i].is_none() {
                    woke[i] = Some(start.elapsed());
                    on_true(i);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    woke
}

fn show(woke: &[Option<Duration>]) -> String {
    CHAIN
        .iter()
        .zip(woke)
        .map(|((service, _, _), at)| match at {
            Some(at) => format!("{service} {:.0} ms", at.as_secs_f64() * 1e3),
            None => format!("{service} never"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The chain's figures of one round: when each link woke, serially and
/// with pre-wake.
pub(super) struct Round {
    pub(super) serial: Vec<Option<Duration>>,
    pub(super) prewake: Vec<Option<Duration>>,
}

/// One round: the serial wake-up (each link scaled up as it wakes, the
/// caller retrying), then, scaled back to zero, the pre-woken one. The
/// edges must be known already (a warm run).
pub(super) async fn round(running: &Running, settings: &Settings) -> anyhow::Result<Round> {
    let front = cluster_ip(0);
    // Serial: KEDA without prewake, each link's pod ready the moment its
    // Service is active (a pod that starts at once: the chain's floor).
    let mut plain = streams(false).await?;
    all_inactive(&mut plain).await?;
    let start = Instant::now();
    let node = &running.node;
    let caller = tokio::spawn({
        let placement_pod = node.pod(CLIENT)?;
        let path = placement_pod.netns.path();
        let child = procs::pod_command(
            &Placement {
                netns: Some(&path),
                cgroup: &placement_pod.cgroup,
            },
            &super::cell::client_args(CLIENT_COMM, front, 1, true)
                .into_iter()
                .chain(["--retry-for".to_owned(), "30s".to_owned()])
                .collect::<Vec<_>>(),
        )?;
        super::cell::finish(child)
    });
    let serial = wake_times(&mut plain, start, Duration::from_secs(30), |link| {
        let (service, _, pod_name) = CHAIN[link];
        running.mock.put(&scenario::slice(
            service,
            "IPv4",
            &[(&scenario::pod(pod_name), true)],
        ));
    })
    .await;
    let answered = caller.await.context("the chain's caller")??;
    let reply = answered
        .first()
        .and_then(|a| a.reply.clone())
        .unwrap_or_default();
    if !reply.starts_with("front -> api -> db saw ") {
        bail!("the serial run's caller got {reply:?} ({})", show(&serial));
    }
    drop(plain);
    scale(running, settings, false).await?;

    // Pre-wake: one refused connect to front.
    let mut pre = streams(true).await?;
    all_inactive(&mut pre).await?;
    let start = Instant::now();
    let made = client(node, CLIENT, CLIENT_COMM, front, 1, false).await?;
    if made.iter().any(|a| a.connected) {
        bail!("front answered while scaled to zero");
    }
    let prewake = wake_times(&mut pre, start, Duration::from_secs(5), |_| {}).await;
    Ok(Round { serial, prewake })
}

/// The warm run: the chain scaled up, one call through it, each link's call
/// attributed to its caller's workload; the scaler then knows front -> api
/// -> db. Returns the links' processes (kept running).
pub(super) async fn warm(
    running: &Running,
    settings: &Settings,
) -> anyhow::Result<Vec<tokio::process::Child>> {
    let links = start_links(running)?;
    scale(running, settings, true).await?;
    let made = client(&running.node, CLIENT, CLIENT_COMM, cluster_ip(0), 1, true).await?;
    let reply = made
        .first()
        .and_then(|a| a.reply.clone())
        .unwrap_or_default();
    if !reply.starts_with("front -> api -> db saw ") {
        bail!("the warm run's call got {reply:?}");
    }
    // Each link's one call attributed to the workload that made it.
    let from = |m: &[observe::Sample], to: &str, workload: &str| {
        observe::sum(
            m,
            "internal_tcp_source_attempts_total",
            &[
                ("destination_service", to),
                ("source_namespace", NAMESPACE),
                ("source_workload", workload),
            ],
        )
    };
    let calls = |m: &[observe::Sample]| {
        (
            from(m, "front", scenario::workload(CLIENT)),
            from(m, "api", "front"),
            from(m, "db", "api"),
        )
    };
    observe::settle(AGENT_METRICS, SETTLE, 3, |m| {
        let (a, b, c) = calls(m);
        a + b + c
    })
    .await;
    let attributed = calls(&observe::metrics(AGENT_METRICS).await?);
    if attributed != (1, 1, 1) {
        bail!(
            "the warm call attributed (checkout -> front, front -> api, api -> db) {attributed:?}, want (1, 1, 1)"
        );
    }
    // Sorted, as `observe::edges` returns them.
    let want = vec![
        (format!("{NAMESPACE}/api"), format!("{NAMESPACE}/db")),
        (format!("{NAMESPACE}/front"), format!("{NAMESPACE}/api")),
    ];
    let deadline = Instant::now() + SETTLE;
    loop {
        let edges = observe::edges(SCALER_GRPC, NAMESPACE).await?;
        if edges == want {
            break;
        }
        if Instant::now() > deadline {
            bail!("the scaler's graph is {edges:?}, want {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    scale(running, settings, false).await?;
    Ok(links)
}

/// When the last link woke, if every link did.
fn last(woke: &[Option<Duration>]) -> Option<Duration> {
    woke.iter()
        .try_fold(Duration::ZERO, |most, at| at.map(|at| most.max(at)))
}

/// Median and maximum of the rounds' last-link times, in ms.
fn summary(lasts: &mut [Duration]) -> String {
    lasts.sort();
    match (lasts.get(lasts.len() / 2), lasts.last()) {
        (Some(mid), Some(max)) => format!(
            "p50 {:.0} ms, max {:.0} ms",
            mid.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        ),
        _ => "none".to_owned(),
    }
}

/// The chain check: a warm run, then `settings.chain_rounds` rounds; passes
/// when in every round pre-wake woke every link within one second of the
/// connect to `front`, and the serial run woke every link too.
pub(super) async fn checks(running: &Running, settings: &Settings) -> Vec<Check> {
    vec![
        Check::run_for(
            "chain",
            Duration::from_secs(90) * (1 + settings.chain_rounds),
            async {
                let _links = warm(running, settings).await?;
                let mut rounds = Vec::new();
                for _ in 0..settings.chain_rounds {
                    rounds.push(round(running, settings).await?);
                }
                let within = rounds.iter().all(|r| {
                    last(&r.prewake).is_some_and(|at| at < Duration::from_secs(1))
                        && last(&r.serial).is_some()
                });
                let mut serial: Vec<Duration> =
                    rounds.iter().filter_map(|r| last(&r.serial)).collect();
                let mut prewake: Vec<Duration> =
                    rounds.iter().filter_map(|r| last(&r.prewake)).collect();
                let first = rounds.first().map_or_else(String::new, |r| {
                    format!(
                        "; first round, pre-wake: {}; serial: {}",
                        show(&r.prewake),
                        show(&r.serial)
                    )
                });
                expect(
                    within,
                    format!(
                        "{} rounds, last link woken: pre-wake {} (goal < 1 s), serial {}{first}",
                        rounds.len(),
                        summary(&mut prewake),
                        summary(&mut serial)
                    ),
                )
            },
        )
        .await,
    ]
}
