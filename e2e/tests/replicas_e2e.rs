//! Following the scaler's replicas, with the real binaries: `SCALER_ADDR`
//! names a host that resolves to two replicas, and the agent streams every
//! count to each; when the name's addresses change (one gone, one new), the
//! agent closes its stream to the one gone and opens one to the new one,
//! which gets the totals in a snapshot.
//!
//! The name is resolved from a private hosts file bind-mounted over
//! /etc/hosts in the agent's own mount namespace (the machine's stays
//! untouched); the replicas listen on 127.101.9.2-4, one port for all, as
//! pods behind a headless Service do. Root only (CI).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    time::Duration,
};

use itw_e2e::system::*;

const NS: &str = "replicas";
const SERVICE: &str = "svc";
const CLUSTER_IP: &str = "127.101.9.1";
/// The headless Service's name, as `SCALER_ADDR` gives it.
const NAME: &str = "itw-scaler-ingest.replicas-e2e";
const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 101, 9, 2));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 101, 9, 3));
const C: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 101, 9, 4));

fn map() -> String {
    static_map(NS, SERVICE, CLUSTER_IP, 8080)
}

/// A port free on every one of `ips` right now.
fn port_free_on(ips: &[IpAddr]) -> u16 {
    for _ in 0..50 {
        let port = free_port();
        if ips
            .iter()
            .all(|ip| TcpListener::bind(SocketAddr::new(*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// A scaler replica: gRPC on `ip:port`, /metrics on `ip` too.
async fn replica(name: &str, ip: IpAddr, port: u16) -> Scaler {
    Scaler::start_on(
        name,
        SocketAddr::new(ip, port),
        SocketAddr::new(ip, free_port()),
        &[],
    )
    .await
}

/// What the agent and each replica say about the streams and the counts.
#[derive(Debug, PartialEq)]
struct View {
    /// `itw_agent_scaler_endpoints`, `itw_agent_scaler_streams_up`.
    agent_endpoints: Option<f64>,
    agent_streams_up: Option<f64>,
    /// Per replica: `itw_scaler_agents_connected` and the service's attempts.
    connected: Vec<Option<f64>>,
    attempts: Vec<f64>,
}

async fn view(agent: &Agent, replicas: &[&Scaler]) -> View {
    let samples = scrape(agent.metrics).await;
    let mut view = View {
        agent_endpoints: exact(&samples, "itw_agent_scaler_endpoints", &[]),
        agent_streams_up: exact(&samples, "itw_agent_scaler_streams_up", &[]),
        connected: Vec::new(),
        attempts: Vec::new(),
    };
    for replica in replicas {
        let samples = scrape(replica.metrics).await;
        view.connected
            .push(exact(&samples, "itw_scaler_agents_connected", &[]));
        view.attempts.push(service_attempts(&samples, NS, SERVICE));
    }
    view
}

/// Waits until `want` is what is seen, failing after `timeout` with what
/// was seen last.
async fn wait_for_view(what: &str, agent: &Agent, replicas: &[&Scaler], want: &View) {
    let timeout = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = view(agent, replicas).await;
        if seen == *want {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: not seen within {timeout:?}\nwanted {want:?}\nseen   {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// KEDA's GetMetrics on one replica over a 60 s window: `attempts` of them.
async fn assert_keda_sees(what: &str, replica: &Scaler, attempts: f64) {
    let object = scaled_object(NS, SERVICE, &[("window", "60s")]);
    let rate = get_metrics(&mut replica.keda().await, &object).await;
    assert!(
        (rate - attempts / 60.0).abs() < 1e-9,
        "{what}: GetMetrics {rate}, want {attempts} attempts in 60 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_streams_to_every_replica_its_scaler_name_resolves_to() {
    let test = "the_agent_streams_to_every_replica_its_scaler_name_resolves_to";
    if !bpf_available(test) || !tool_available(test, UNSHARE) {
        return;
    }
    let target = addr(&format!("{CLUSTER_IP}:8080"));
    let port = port_free_on(&[A, B, C]);
    let a = replica("scaler-a", A, port).await;
    let b = replica("scaler-b", B, port).await;
    // Up from the start, but not behind the name yet.
    let c = replica("scaler-c", C, port).await;
    let hosts = HostsFile::new("replicas-hosts", &[(A, NAME), (B, NAME)]);
    let agent = Agent::start_with_hosts(
        "agent-replicas",
        &map(),
        &hosts,
        &[("SCALER_ADDR", format!("{NAME}:{port}"))],
    )
    .await;

    // One stream to each address behind the name, none elsewhere.
    wait_for_view(
        "a stream to A and to B",
        &agent,
        &[&a, &b, &c],
        &View {
            agent_endpoints: Some(2.0),
            agent_streams_up: Some(2.0),
            connected: vec![Some(1.0), Some(1.0), Some(0.0)],
            attempts: vec![0.0, 0.0, 0.0],
        },
    )
    .await;
    for _ in 0..3 {
        connect_refused(target);
    }
    let first = View {
        agent_endpoints: Some(2.0),
        agent_streams_up: Some(2.0),
        connected: vec![Some(1.0), Some(1.0), Some(0.0)],
        attempts: vec![3.0, 3.0, 0.0],
    };
    wait_for_view("3 attempts on A and on B", &agent, &[&a, &b, &c], &first).await;
    // Several collections later: nothing doubled.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(view(&agent, &[&a, &b, &c]).await, first, "still exactly 3");
    assert_eq!(agent.attempts(NS, SERVICE).await, 3.0, "agent /metrics");
    assert_keda_sees("A", &a, 3.0).await;
    assert_keda_sees("B", &b, 3.0).await;

    // The name changes: B leaves (still running, as a pod no longer ready
    // does), C joins. The agent resolves again every 15 s and whenever a
    // stream fails; A restarting (a container restart keeps its pod's
    // address) makes that now instead of at the interval.
    hosts.set(&[(A, NAME), (C, NAME)]);
    let mut a = a;
    a.proc.kill().await;
    let a = replica("scaler-a-restarted", A, port).await;

    // B's stream closed, C's opened; C and the restarted A got the totals
    // in a snapshot, and B keeps what it had.
    wait_for_view(
        "streams to A and C only, each with the 3 attempts",
        &agent,
        &[&a, &b, &c],
        &View {
            agent_endpoints: Some(2.0),
            agent_streams_up: Some(2.0),
            connected: vec![Some(1.0), Some(0.0), Some(1.0)],
            attempts: vec![3.0, 3.0, 3.0],
        },
    )
    .await;
    for _ in 0..2 {
        connect_refused(target);
    }
    let second = View {
        agent_endpoints: Some(2.0),
        agent_streams_up: Some(2.0),
        connected: vec![Some(1.0), Some(0.0), Some(1.0)],
        attempts: vec![5.0, 3.0, 5.0],
    };
    wait_for_view(
        "2 more on A and C, none on B",
        &agent,
        &[&a, &b, &c],
        &second,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(view(&agent, &[&a, &b, &c]).await, second, "still exactly");
    assert_eq!(agent.attempts(NS, SERVICE).await, 5.0, "agent /metrics");
    assert_keda_sees("A restarted", &a, 5.0).await;
    assert_keda_sees("B, no longer behind the name", &b, 3.0).await;
    assert_keda_sees("C, new behind the name", &c, 5.0).await;
}
