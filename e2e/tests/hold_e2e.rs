//! Holding end to end, with the real binaries: a connect to a held Service
//! without a ready endpoint succeeds at once, waits at the agent, and gets
//! its reply once the service map says an endpoint is ready; the scaler sees
//! the activation meanwhile. Root only (CI); addresses 127.102.<test>.x.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use itw_e2e::system::*;
use parking_lot::Mutex;

const NS: &str = "hold";

/// A one-Service map: `cluster_ip:port`, held, with one endpoint (ready or
/// not) at the next address.
fn held_map(service: &str, cluster_ip: &str, port: u16, ready: bool, extra: &str) -> String {
    let pod_ip = match cluster_ip.rsplit_once('.') {
        Some((net, host)) => format!(
            "{net}.{}",
            host.parse::<u8>().expect("an IPv4 address") + 100
        ),
        None => panic!("{cluster_ip} is not IPv4"),
    };
    format!(
        "services:
  - namespace: {NS}
    name: {service}
    clusterIPs: [{cluster_ip}]
    ports: [{port}]
    hold: true
{extra}    endpoints:
      - {{pod: {service}-0, ip: {pod_ip}, ready: {ready}}}
"
    )
}

/// Rewrites the agent's service map and tells it to reload at once.
fn update_map(agent: &Agent, yaml: &str) {
    std::fs::write(agent.map_path(), yaml).expect("writing the service map");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(agent.proc.pid(), libc::SIGHUP) };
}

fn hold_env(park: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CAPTURE_MODE", "cgroup".to_owned()),
        ("POD_CGROUP", "none".to_owned()),
        ("HOLD_PARK_ADDR", park.to_owned()),
    ]
}

fn service_labels(service: &str) -> [(&'static str, &str); 2] {
    [
        ("destination_namespace", NS),
        ("destination_service", service),
    ]
}

async fn metric(agent: &Agent, name: &str, service: &str) -> f64 {
    sum(&scrape(agent.metrics).await, name, &service_labels(service))
}

async fn wait_metric(agent: &Agent, name: &str, labels: &[(&str, &str)], want: f64) {
    eventually(
        &format!("{name}{labels:?} = {want}"),
        Duration::from_secs(15),
        || async { (sum(&scrape(agent.metrics).await, name, labels) == want).then_some(()) },
    )
    .await;
}

/// A server on `at` answering each connection's first read with
/// "pong:<what it read>"; counts the connections it accepted.
fn pong_server(at: SocketAddr) -> Arc<AtomicU32> {
    pong_server_seeing(at).0
}

/// [`pong_server`], with the address each connection came from.
fn pong_server_seeing(at: SocketAddr) -> (Arc<AtomicU32>, Arc<Mutex<Vec<SocketAddr>>>) {
    let listener = TcpListener::bind(at).expect("binding the stand-in server");
    let accepted = Arc::new(AtomicU32::new(0));
    let count = accepted.clone();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = peers.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            if let Ok(peer) = stream.peer_addr() {
                seen.lock().push(peer);
            }
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                let n = stream.read(&mut buf).unwrap_or(0);
                let mut reply = b"pong:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = stream.write_all(&reply);
            });
        }
    });
    (accepted, peers)
}

/// Connects, sends `request`, and reads the whole reply (or the error).
fn request(target: SocketAddr, request: &[u8]) -> (SocketAddr, std::io::Result<String>) {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {target}: {e}"));
    let peer = stream.peer_addr().expect("getpeername");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request).expect("writing the request");
    let mut reply = String::new();
    let result = stream.read_to_string(&mut reply).map(|_| reply);
    (peer, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_connect_gets_its_reply_once_the_service_is_ready() {
    if !bpf_available("a_held_connect_gets_its_reply_once_the_service_is_ready") {
        return;
    }
    let target = addr("127.102.1.1:18080");
    let scaler = Scaler::start("hold-scaler").await;
    let agent = Agent::start(
        "hold-agent",
        &held_map("cold", "127.102.1.1", 18080, false, ""),
        &[scaler.grpc],
        &hold_env("127.0.0.1"),
    )
    .await;
    wait_metric(&agent, "itw_agent_held_destinations", &[], 1.0).await;
    let mut keda = scaler.keda().await;
    let object = scaled_object(NS, "cold", &[("window", "60s")]);
    let mut stream = keda
        .stream_is_active(object.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    assert!(!stream.message().await.unwrap().unwrap().result);

    // Nothing listens at the ClusterIP; the connect succeeds all the same.
    let started = Instant::now();
    let client = tokio::task::spawn_blocking(move || request(target, b"ping"));
    let activated = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("StreamIsActive true within 5 s of the held connect")
        .unwrap()
        .unwrap();
    assert!(activated.result);
    wait_metric(
        &agent,
        "itw_agent_held_connections",
        &service_labels("cold"),
        1.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // The pod comes up (standing at the ClusterIP, where kube-proxy would
    // send it) and the map says it is ready.
    let server = pong_server(target);
    let ready_at = Instant::now();
    update_map(&agent, &held_map("cold", "127.102.1.1", 18080, true, ""));
    let (peer, reply) = client.await.unwrap();
    let waited = started.elapsed();
    assert_eq!(peer, target, "getpeername() on the held client");
    assert_eq!(reply.expect("the reply"), "pong:ping");
    assert_eq!(server.load(Ordering::SeqCst), 1);
    eprintln!(
        "held for {waited:?}; reply {:?} after the map said ready",
        ready_at.elapsed()
    );

    let samples = scrape(agent.metrics).await;
    let labels = service_labels("cold");
    assert_eq!(
        sum(&samples, "itw_agent_connections_held_total", &labels),
        1.0
    );
    assert_eq!(sum(&samples, "itw_agent_held_released_total", &labels), 1.0);
    assert_eq!(
        sum(&samples, "itw_agent_held_timed_out_total", &labels),
        0.0
    );
    assert_eq!(sum(&samples, "itw_agent_held_connections", &labels), 0.0);
    assert_eq!(sum(&samples, "itw_agent_hold_seconds_count", &labels), 1.0);
    // Cold start by phase: this one activation once in each phase (the
    // durations are the unit tests' business).
    let scaler_samples = scrape(scaler.metrics).await;
    for (samples, family, phase) in [
        (&samples, "itw_agent", "first_connect_to_stream"),
        (&samples, "itw_agent", "parked_to_endpoint_ready"),
        (&samples, "itw_agent", "endpoint_ready_to_released"),
        (&samples, "itw_agent", "released_to_first_byte"),
        (&scaler_samples, "itw_scaler", "first_connect_to_received"),
        (&scaler_samples, "itw_scaler", "received_to_stream"),
    ] {
        let labels = [labels[0], labels[1], ("phase", phase)];
        assert_eq!(
            exact(
                samples,
                &format!("{family}_cold_start_seconds_count"),
                &labels
            ),
            Some(1.0),
            "{family} {phase}"
        );
    }
    let held_for = sum(&samples, "itw_agent_hold_seconds_sum", &labels);
    assert!(
        held_for >= 1.0 && held_for <= waited.as_secs_f64(),
        "hold time {held_for} s, the client waited {waited:?}"
    );
    assert_eq!(
        exact(&samples, "itw_agent_held_destinations", &[]),
        Some(0.0)
    );

    // Warm now: a new connect goes straight to the server.
    let (peer, reply) = tokio::task::spawn_blocking(move || request(target, b"again"))
        .await
        .unwrap();
    assert_eq!(peer, target);
    assert_eq!(reply.unwrap(), "pong:again");
    assert_eq!(server.load(Ordering::SeqCst), 2);
    assert_eq!(
        metric(&agent, "itw_agent_connections_held_total", "cold").await,
        1.0
    );
    // Both connects counted, once each; the agent's own connect not at all.
    eventually(
        "2 attempts at the scaler",
        Duration::from_secs(10),
        || async { (scaler.attempts(NS, "cold").await == 2.0).then_some(()) },
    )
    .await;
    assert_eq!(agent.attempts(NS, "cold").await, 2.0);
}

/// Open descriptors of a process.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_held_past_its_timeout_is_reset_and_nothing_leaks() {
    if !bpf_available("a_connect_held_past_its_timeout_is_reset_and_nothing_leaks") {
        return;
    }
    let target = addr("127.102.2.1:18080");
    let timeout = "    holdTimeout: 2s\n";
    let agent = Agent::start(
        "hold-timeout",
        &held_map("slow", "127.102.2.1", 18080, true, timeout),
        &[],
        &hold_env("127.0.0.1"),
    )
    .await;
    // Settled and not holding: the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = open_fds(agent.proc.pid());

    update_map(
        &agent,
        &held_map("slow", "127.102.2.1", 18080, false, timeout),
    );
    wait_metric(&agent, "itw_agent_held_destinations", &[], 1.0).await;
    let started = Instant::now();
    let (peer, result) = tokio::task::spawn_blocking(move || request(target, b"ping"))
        .await
        .unwrap();
    assert_eq!(peer, target);
    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "reset after {waited:?}"
    );
    let samples = scrape(agent.metrics).await;
    let labels = service_labels("slow");
    assert_eq!(
        sum(&samples, "itw_agent_held_timed_out_total", &labels),
        1.0
    );
    assert_eq!(sum(&samples, "itw_agent_held_connections", &labels), 0.0);
    assert_eq!(sum(&samples, "itw_agent_hold_seconds_count", &labels), 0.0);

    // Ready again: the listener closes, its port is forgotten, and the agent
    // is back to the descriptors it had before.
    update_map(
        &agent,
        &held_map("slow", "127.102.2.1", 18080, true, timeout),
    );
    wait_metric(&agent, "itw_agent_held_destinations", &[], 0.0).await;
    wait_metric(&agent, "itw_agent_parking_listeners", &[], 0.0).await;
    eventually(
        "the descriptors of before",
        Duration::from_secs(10),
        || async { (open_fds(agent.proc.pid()) == baseline).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_held_clients_are_released_together() {
    if !bpf_available("hundreds_of_held_clients_are_released_together") {
        return;
    }
    const CLIENTS: usize = 300;
    let target = addr("127.102.3.1:18080");
    let mut env = hold_env("127.0.0.1");
    // Past the default cap per Service (256): all of them are to be held.
    env.push(("HOLD_MAX_PER_SERVICE", "512".to_owned()));
    let agent = Agent::start(
        "hold-many",
        &held_map("many", "127.102.3.1", 18080, false, ""),
        &[],
        &env,
    )
    .await;
    wait_metric(&agent, "itw_agent_held_destinations", &[], 1.0).await;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| std::thread::spawn(move || request(target, format!("client-{i}").as_bytes())))
        .collect();
    wait_metric(
        &agent,
        "itw_agent_held_connections",
        &service_labels("many"),
        CLIENTS as f64,
    )
    .await;
    let server = pong_server(target);
    update_map(&agent, &held_map("many", "127.102.3.1", 18080, true, ""));
    for (i, client) in clients.into_iter().enumerate() {
        let (peer, reply) = client.join().expect("client thread");
        assert_eq!(peer, target);
        assert_eq!(reply.expect("a reply"), format!("pong:client-{i}"));
    }
    assert_eq!(server.load(Ordering::SeqCst), CLIENTS as u32);
    let samples = scrape(agent.metrics).await;
    let labels = service_labels("many");
    assert_eq!(
        sum(&samples, "itw_agent_held_released_total", &labels),
        CLIENTS as f64
    );
    assert_eq!(
        sum(&samples, "itw_agent_hold_seconds_count", &labels),
        CLIENTS as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hold_off_a_connect_is_refused_as_before() {
    if !bpf_available("with_hold_off_a_connect_is_refused_as_before") {
        return;
    }
    let target = addr("127.102.4.1:18080");
    let mut env = hold_env("127.0.0.1");
    env.push(("HOLD", "off".to_owned()));
    let agent = Agent::start(
        "hold-off",
        &held_map("off", "127.102.4.1", 18080, false, ""),
        &[],
        &env,
    )
    .await;
    connect_refused(target);
    eventually("1 attempt", Duration::from_secs(10), || async {
        (agent.attempts(NS, "off").await == 1.0).then_some(())
    })
    .await;
    let samples = scrape(agent.metrics).await;
    assert!(
        !samples.iter().any(|s| s.name.starts_with("itw_agent_held")),
        "no hold metrics with HOLD=off"
    );
    // Only the counting programs are loaded.
    let mut programs: Vec<String> = samples
        .iter()
        .filter(|s| s.name == "itw_agent_bpf_programs")
        .filter_map(|s| s.label("program").map(str::to_owned))
        .collect();
    programs.sort();
    assert_eq!(programs, ["itw_connect4", "itw_connect6"]);
}

/// A network namespace with a veth pair to the host: host end `host_ip`,
/// namespace end `ns_ip` (/30), loopback up. Deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: &str, host_ip: &str, ns_ip: &str) -> Netns {
        let netns = Netns {
            name: name.to_owned(),
        };
        let host_if = format!("{name}-h");
        let ns_if = format!("{name}-n");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .status();
        for args in [
            vec!["netns", "add", name],
            vec![
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
            vec!["link", "set", &ns_if, "netns", name],
            vec!["addr", "add", &format!("{host_ip}/30"), "dev", &host_if],
            vec!["link", "set", &host_if, "up"],
            vec![
                "-n",
                name,
                "addr",
                "add",
                &format!("{ns_ip}/30"),
                "dev",
                &ns_if,
            ],
            vec!["-n", name, "link", "set", &ns_if, "up"],
            vec!["-n", name, "link", "set", "lo", "up"],
        ] {
            let status = std::process::Command::new("ip")
                .args(&args)
                .status()
                .expect("running ip");
            assert!(status.success(), "ip {args:?}: {status}");
        }
        netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_another_network_namespace_is_held_and_released() {
    if !bpf_available("a_client_in_another_network_namespace_is_held_and_released")
        || !tool_available(
            "a_client_in_another_network_namespace_is_held_and_released",
            "/usr/sbin/ip",
        )
    {
        return;
    }
    // The pair's host end stands for both the node (parking address) and a
    // ClusterIP the namespace routes to the node: nothing leaves the pair.
    let target = addr("169.254.77.1:18080");
    let netns = Netns::new(
        &format!("itwh{}", std::process::id()),
        "169.254.77.1",
        "169.254.77.2",
    );
    let agent = Agent::start(
        "hold-netns",
        &held_map("remote", "169.254.77.1", 18080, false, ""),
        &[],
        &hold_env("169.254.77.1"),
    )
    .await;
    wait_metric(&agent, "itw_agent_held_destinations", &[], 1.0).await;
    // bash's /dev/tcp, run inside the namespace: connect, send, print the reply.
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf remote >&3 && timeout 30 cat <&3",
        target.ip(),
        target.port()
    );
    let ns = netns.name.clone();
    let client = tokio::task::spawn_blocking(move || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "bash", "-c", &script])
            .output()
            .expect("running the client in the namespace")
    });
    wait_metric(
        &agent,
        "itw_agent_held_connections",
        &service_labels("remote"),
        1.0,
    )
    .await;
    let (server, peers) = pong_server_seeing(target);
    update_map(&agent, &held_map("remote", "169.254.77.1", 18080, true, ""));
    let output = client.await.unwrap();
    assert!(
        output.status.success(),
        "client: {:?} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "pong:remote");
    assert_eq!(server.load(Ordering::SeqCst), 1);
    // Issue 12: released from the client's own network namespace, so the
    // server sees the client's address, not the host's.
    let seen: Vec<IpAddr> = peers.lock().iter().map(SocketAddr::ip).collect();
    assert_eq!(seen, vec!["169.254.77.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        metric(&agent, "itw_agent_held_released_total", "remote").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_holding_leaves_connects_as_without_it() {
    if !bpf_available("an_agent_killed_while_holding_leaves_connects_as_without_it") {
        return;
    }
    let target = addr("127.102.6.1:18080");
    let mut agent = Agent::start(
        "hold-killed",
        &held_map("orphan", "127.102.6.1", 18080, false, ""),
        &[],
        &hold_env("127.0.0.1"),
    )
    .await;
    wait_metric(&agent, "itw_agent_held_destinations", &[], 1.0).await;
    let programs = agent.program_ids().await;
    assert_eq!(
        programs.len(),
        5,
        "two connect, two getpeername and the sock_ops programs"
    );
    let mut parked = TcpStream::connect(target).expect("a held connect succeeds");
    wait_metric(
        &agent,
        "itw_agent_held_connections",
        &service_labels("orphan"),
        1.0,
    )
    .await;

    agent.proc.kill().await;
    // The parked client learns its connection is gone ...
    parked
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    // An end (EOF or reset) before the 5 s timeout: a timeout is the
    // connection outliving the agent.
    let ended = parked.read(&mut buf).map_err(|e| e.kind());
    assert!(
        matches!(ended, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
        "the parked connection outlived the agent: {ended:?}"
    );
    // ... the programs went with the agent, and a new connect is refused,
    // as without it.
    for id in programs {
        assert!(!program_loaded(id), "program {id} still loaded");
    }
    connect_refused(target);
}
