//! The hold bookkeeping against the fake kernel, and parking listeners with
//! real loopback sockets (the client connects to the parking port itself,
//! standing in for the kernel's rewrite).

use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::{
    capture::fake::{FakeKernel, FakeKernelHandle},
    resolve::{ServiceMap, Target},
};

fn settings(policy: HoldPolicy) -> HoldSettings {
    HoldSettings {
        policy,
        default_timeout: Duration::from_secs(30),
        park_ip4: Some(Ipv4Addr::LOCALHOST),
        park_ip6: None,
        // No mark: these tests need no CAP_NET_ADMIN.
        mark: 0,
        max_per_service: 16,
        max_per_node: 64,
        max_buffered_bytes: 1 << 20,
        // Every client here is in the test's own network namespace, which
        // needs no file (nor CAP_SYS_ADMIN).
        netns_dir: "/nonexistent".into(),
    }
}

/// The inode of this process's network namespace, as the programs record it.
fn own_netns() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino() as u32
}

fn svc(name: &str) -> ServiceRef {
    ServiceRef::new("default", name)
}

fn state(hold: bool, ready: Option<u32>) -> ServiceState {
    ServiceState {
        hold,
        hold_timeout: None,
        ready_endpoints: ready,
        wakes: Vec::new(),
        exclude_sources: Default::default(),
    }
}

fn cluster(service: &str, port: u16) -> Target {
    Target {
        service: svc(service),
        port,
        pod: None,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Rig {
    holder: Holder,
    kernel: FakeKernel,
    handle: FakeKernelHandle,
    metrics: Arc<HoldMetrics>,
}

impl Rig {
    fn new(settings: HoldSettings) -> Self {
        let metrics = Arc::new(HoldMetrics::default());
        let kernel = FakeKernel::new(64);
        let handle = kernel.handle();
        Self {
            holder: Holder::new(
                settings,
                tokio::runtime::Handle::current(),
                metrics.clone(),
                kernel.redirects().unwrap(),
            )
            .unwrap(),
            kernel,
            handle,
            metrics,
        }
    }

    fn apply(&mut self, event: MapEvent) {
        self.holder.apply(&mut self.kernel, &event);
    }

    fn reap(&mut self) {
        self.holder.reap(&mut self.kernel);
    }

    /// Held destinations -> parking port, as the kernel has them.
    fn kernel_held(&self) -> HashMap<SocketAddr, u16> {
        self.handle
            .held()
            .into_iter()
            .map(|(dest, port)| (resolve::socket_addr(&dest), port))
            .collect()
    }

    fn park_port(&self, dest: &str) -> u16 {
        self.kernel_held()[&addr(dest)]
    }

    /// Service "web" (annotated) now has `ready` ready endpoints.
    fn web_ready(&mut self, ready: u32) {
        self.apply(MapEvent::Changes(vec![MapChange::ServiceSet(
            svc("web"),
            state(true, Some(ready)),
        )]));
    }

    /// A client of `dest` parked at `port` as the programs park one: its
    /// record made (with its address, once bound), then the connect.
    async fn client(&self, dest: &str, port: u16) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = socket.local_addr().unwrap();
        assert!(
            self.handle
                .park(resolve::destination(addr(dest)), local, own_netns()),
            "{dest} is held"
        );
        socket
            .connect(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
            .await
            .unwrap()
    }

    /// Waits until `n` connections of web are parked (5 s at most).
    async fn parked(&self, n: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.metrics.held.get_or_create(&labels()).get() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} parked connections within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A rig holding "web" on `dest` alone; the parking port.
    fn holding(dest: &str, hold_timeout: Option<Duration>) -> (Self, u16) {
        let mut rig = Self::new(settings(HoldPolicy::Annotated));
        rig.apply(MapEvent::Reset(single_service(dest, hold_timeout)));
        let port = rig.park_port(dest);
        (rig, port)
    }
}

/// Everything `client` receives until it closes (5 s at most).
async fn read_all(client: &mut TcpStream) -> String {
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut text))
        .await
        .expect("the reply within 5 s")
        .expect("reading the reply");
    text
}

/// What reading `client` ends with (5 s at most): the error kind expected.
async fn read_error(client: &mut TcpStream) -> Result<usize, std::io::ErrorKind> {
    let mut buf = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("an end within 5 s")
        .map_err(|e| e.kind())
}

/// web (annotated, 2 ClusterIP ports, a pod), api (not annotated), v6 (an
/// IPv6 ClusterIP, annotated), all without a ready endpoint.
fn map() -> ServiceMap {
    let mut map = ServiceMap::default();
    map.services.insert(svc("web"), state(true, Some(0)));
    map.services.insert(svc("api"), state(false, Some(0)));
    map.services.insert(svc("v6"), state(true, Some(0)));
    map.destinations
        .insert(addr("127.50.0.1:80"), cluster("web", 80));
    map.destinations
        .insert(addr("127.50.0.1:443"), cluster("web", 443));
    map.destinations.insert(
        addr("127.50.1.1:8080"),
        Target {
            service: svc("web"),
            port: 80,
            pod: Some("web-0".into()),
        },
    );
    map.destinations
        .insert(addr("127.50.0.2:80"), cluster("api", 80));
    map.destinations
        .insert(addr("[fd00::1]:80"), cluster("v6", 80));
    map
}

#[tokio::test]
async fn annotated_services_without_ready_endpoints_are_held_on_their_cluster_ips() {
    let mut rig = Rig::new(settings(HoldPolicy::Annotated));
    rig.apply(MapEvent::Reset(map()));
    let held = rig.kernel_held();
    // Not the pod IP, not the unannotated Service, not IPv6 (no parking
    // address for it).
    assert_eq!(
        held.keys().copied().collect::<BTreeSet<_>>(),
        [addr("127.50.0.1:80"), addr("127.50.0.1:443")].into()
    );
    // A listener of its own per destination, known to getpeername().
    assert_ne!(held[&addr("127.50.0.1:80")], held[&addr("127.50.0.1:443")]);
    let parked = rig.handle.parked();
    assert_eq!(parked.len(), 2);
    for (dest, port) in &held {
        assert_eq!(
            parked.get(&(true, *port)).map(resolve::socket_addr),
            Some(*dest)
        );
    }
    assert_eq!(rig.metrics.held_destinations.get(), 2);
    assert_eq!(rig.holder.held(), held.keys().copied().collect());
}

#[tokio::test]
async fn policy_all_holds_every_service_and_off_none() {
    let mut all = Rig::new(settings(HoldPolicy::All));
    all.apply(MapEvent::Reset(map()));
    assert_eq!(all.kernel_held().len(), 3);
    assert!(all.kernel_held().contains_key(&addr("127.50.0.2:80")));

    let mut off = Rig::new(settings(HoldPolicy::Off));
    off.apply(MapEvent::Reset(map()));
    assert!(off.kernel_held().is_empty());
}

#[tokio::test]
async fn ipv6_cluster_ips_are_held_with_an_ipv6_parking_address() {
    let mut rig = Rig::new(HoldSettings {
        park_ip6: Some(Ipv6Addr::LOCALHOST),
        ..settings(HoldPolicy::Annotated)
    });
    rig.apply(MapEvent::Reset(map()));
    let port = rig.park_port("[fd00::1]:80");
    assert_eq!(
        rig.handle
            .parked()
            .get(&(false, port))
            .map(resolve::socket_addr),
        Some(addr("[fd00::1]:80"))
    );
}

#[tokio::test]
async fn unknown_readiness_or_ready_endpoints_never_hold() {
    let mut rig = Rig::new(settings(HoldPolicy::All));
    let mut map = map();
    map.services.insert(svc("web"), state(true, None));
    map.services.insert(svc("api"), state(true, Some(1)));
    map.services.insert(svc("v6"), state(true, Some(2)));
    rig.apply(MapEvent::Reset(map));
    assert!(rig.kernel_held().is_empty());
}

#[tokio::test]
async fn a_ready_endpoint_releases_and_the_parking_port_is_forgotten_once_closed() {
    let mut rig = Rig::new(settings(HoldPolicy::Annotated));
    rig.apply(MapEvent::Reset(map()));
    let port = rig.park_port("127.50.0.1:80");
    rig.web_ready(1);
    // The hold entries go at once ...
    assert!(rig.kernel_held().is_empty());
    assert_eq!(rig.metrics.held_destinations.get(), 0);
    // ... getpeername() keeps mapping the ports until their listeners close
    // (after the release grace, nothing being parked).
    assert_eq!(rig.handle.parked().len(), 2);
    tokio::time::sleep(park::RELEASE_GRACE + Duration::from_millis(300)).await;
    rig.reap();
    assert!(rig.handle.parked().is_empty());
    // The port is closed.
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());

    // No ready endpoint again: held again, on a new listener.
    rig.web_ready(0);
    assert_eq!(rig.kernel_held().len(), 2);
}

#[tokio::test]
async fn cluster_ips_follow_changes_and_a_removed_service_is_released() {
    let mut rig = Rig::new(settings(HoldPolicy::Annotated));
    rig.apply(MapEvent::Reset(map()));
    rig.apply(MapEvent::Changes(vec![
        MapChange::Remove(addr("127.50.0.1:443")),
        MapChange::Set(addr("127.50.0.9:80"), cluster("web", 80)),
        // A ClusterIP re-attributed to a pod is no ClusterIP any more.
        MapChange::Set(
            addr("127.50.0.1:80"),
            Target {
                service: svc("web"),
                port: 80,
                pod: Some("web-1".into()),
            },
        ),
    ]));
    assert_eq!(
        rig.kernel_held().keys().copied().collect::<BTreeSet<_>>(),
        [addr("127.50.0.9:80")].into()
    );
    // The annotation taken away releases too.
    rig.apply(MapEvent::Changes(vec![MapChange::ServiceSet(
        svc("web"),
        state(false, Some(0)),
    )]));
    assert!(rig.kernel_held().is_empty());
    rig.web_ready(0);
    assert_eq!(rig.kernel_held().len(), 1);
    rig.apply(MapEvent::Changes(vec![MapChange::ServiceRemoved(svc(
        "web",
    ))]));
    assert!(rig.kernel_held().is_empty());
    // A relist without the Service at all releases as well.
    rig.apply(MapEvent::Reset(map()));
    assert_eq!(rig.kernel_held().len(), 2);
    rig.apply(MapEvent::Reset(ServiceMap::default()));
    assert!(rig.kernel_held().is_empty());
}

/// A server on `dest` answering each request line with "reply:<line>".
async fn echo_server(dest: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(dest).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let reply = format!("reply:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    })
}

fn single_service(dest: &str, hold_timeout: Option<Duration>) -> ServiceMap {
    let mut map = ServiceMap::default();
    map.services.insert(
        svc("web"),
        ServiceState {
            hold_timeout,
            ..state(true, Some(0))
        },
    );
    map.destinations.insert(addr(dest), cluster("web", 80));
    map
}

fn labels() -> ServiceLabels {
    ServiceLabels::of(&svc("web"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_gets_its_reply_once_released() {
    let dest = "127.50.2.1:18080";
    let (mut rig, port) = Rig::holding(dest, None);

    let mut client = rig.client(dest, port).await;
    client.write_all(b"ping").await.unwrap();
    rig.parked(1).await;
    assert_eq!(rig.metrics.held.get_or_create(&labels()).get(), 1);
    assert_eq!(rig.metrics.held_total.get_or_create(&labels()).get(), 1);

    let _server = echo_server(addr(dest)).await;
    rig.web_ready(1);
    assert_eq!(read_all(&mut client).await, "reply:ping");
    assert_eq!(rig.metrics.held.get_or_create(&labels()).get(), 0);
    assert_eq!(rig.metrics.released.get_or_create(&labels()).get(), 1);
    assert_eq!(rig.metrics.timed_out.get_or_create(&labels()).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_speaks_first_to_a_released_client() {
    let dest = "127.50.2.2:18080";
    let (mut rig, port) = Rig::holding(dest, None);
    let mut client = rig.client(dest, port).await;
    rig.parked(1).await;

    let listener = TcpListener::bind(dest).await.unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"220 hello\r\n").await.unwrap();
    });
    rig.web_ready(1);
    assert_eq!(read_all(&mut client).await, "220 hello\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_past_its_timeout_is_reset() {
    let dest = "127.50.2.3:18080";
    let (rig, port) = Rig::holding(dest, Some(Duration::from_millis(300)));
    let mut client = rig.client(dest, port).await;
    client.write_all(b"ping").await.unwrap();
    assert_eq!(
        read_error(&mut client).await,
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert_eq!(rig.metrics.timed_out.get_or_create(&labels()).get(), 1);
    assert_eq!(rig.metrics.held.get_or_create(&labels()).get(), 0);
    assert_eq!(rig.metrics.released.get_or_create(&labels()).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_hold_timeout_applies_to_connections_already_parked() {
    let dest = "127.50.2.6:18080";
    let (mut rig, port) = Rig::holding(dest, Some(Duration::from_secs(30)));
    let mut client = rig.client(dest, port).await;
    client.write_all(b"ping").await.unwrap();
    rig.parked(1).await;
    let started = std::time::Instant::now();
    rig.apply(MapEvent::Changes(vec![MapChange::ServiceSet(
        svc("web"),
        ServiceState {
            hold_timeout: Some(Duration::from_millis(300)),
            ..state(true, Some(0))
        },
    )]));
    assert_eq!(
        read_error(&mut client).await,
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(rig.metrics.timed_out.get_or_create(&labels()).get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_parked_is_freed() {
    let dest = "127.50.2.4:18080";
    let (mut rig, port) = Rig::holding(dest, None);
    // `nc -z`: connect, close.
    drop(rig.client(dest, port).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rig.metrics.left.get_or_create(&labels()).get() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "let go within 5 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rig.metrics.left.get_or_create(&labels()).get(), 1);
    assert_eq!(rig.metrics.held.get_or_create(&labels()).get(), 0);

    // One that half-closes after its request still gets the reply.
    let mut client = rig.client(dest, port).await;
    client.write_all(b"req").await.unwrap();
    client.shutdown().await.unwrap();
    rig.parked(1).await;
    assert_eq!(rig.metrics.held.get_or_create(&labels()).get(), 1);
    let _server = echo_server(addr(dest)).await;
    rig.web_ready(1);
    assert_eq!(read_all(&mut client).await, "reply:req");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_service_refuses_until_the_hold_timeout_resets_the_client() {
    let dest = "127.50.2.5:18080";
    let (mut rig, port) = Rig::holding(dest, Some(Duration::from_millis(800)));
    let mut client = rig.client(dest, port).await;
    client.write_all(b"ping").await.unwrap();
    rig.parked(1).await;
    // Ready, says the map, but nothing listens, ever.
    rig.web_ready(1);
    assert_eq!(
        read_error(&mut client).await,
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert_eq!(rig.metrics.release_failed.get_or_create(&labels()).get(), 1);
    assert!(
        rig.metrics.release_retries.get_or_create(&labels()).get() >= 2,
        "it kept trying until the hold timeout"
    );
}

/// Issue 11: kube-proxy (or a socket load balancer) follows a ready
/// endpoint later than the agent does; until then the Service refuses. A
/// released connection keeps trying, its bytes kept, and gets its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_datapath_refuses_for_a_while_reaches_the_service_when_it_answers() {
    let dest = "127.50.2.6:18080";
    let (mut rig, port) = Rig::holding(dest, None);
    let mut client = rig.client(dest, port).await;
    client.write_all(b"late").await.unwrap();
    client.shutdown().await.unwrap();
    rig.parked(1).await;
    rig.web_ready(1);
    // The "datapath" answers 700 ms after the map said ready.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _server = echo_server(addr(dest)).await;
    assert_eq!(read_all(&mut client).await, "reply:late");
    assert_eq!(rig.metrics.release_failed.get_or_create(&labels()).get(), 0);
    assert_eq!(rig.metrics.released.get_or_create(&labels()).get(), 1);
    assert!(
        rig.metrics.release_retries.get_or_create(&labels()).get() >= 3,
        "refused connects were made again"
    );
}

/// Issue 12: a parking port accepts anyone who reaches the node address; only
/// a connection the programs parked (a record of theirs) is handed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_no_program_parked_is_reset_and_never_handed_on() {
    let dest = "127.50.2.7:18080";
    let (mut rig, port) = Rig::holding(dest, None);
    let server = TcpListener::bind(dest).await.unwrap();
    // Straight to the parking port: no record.
    // On loopback the reset can come back before connect() returns.
    let ended = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(mut stranger) => {
            let _ = stranger.write_all(b"let me in").await;
            read_error(&mut stranger).await
        }
        Err(error) => Err(error.kind()),
    };
    assert!(
        matches!(ended, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
        "{ended:?}"
    );
    assert_eq!(rig.metrics.not_redirected.get_or_create(&labels()).get(), 1);
    assert_eq!(rig.metrics.held_total.get_or_create(&labels()).get(), 0);
    // Released now, the stranger is still not handed to the Service.
    rig.web_ready(1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), server.accept())
            .await
            .is_err(),
        "the Service was reached"
    );
}

/// The node's byte budget bounds what parked clients' bytes the agent keeps;
/// past it a connection stops reading (its client's buffers hold the rest)
/// and still gets everything to the Service on release. Every parked
/// connection that ends is counted for its slot, for the kernel's caps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_bounds_what_is_kept_and_nothing_is_lost() {
    let dest = "127.50.2.8:18080";
    let mut settings = settings(HoldPolicy::Annotated);
    settings.max_buffered_bytes = 80 * 1024;
    let mut rig = Rig::new(settings);
    rig.apply(MapEvent::Reset(single_service(dest, None)));
    let port = rig.park_port(dest);
    let request = vec![b'x'; 60 * 1024];
    // One after the other, so exactly one of them finds the budget spent
    // (two reading at once may both stop short of their 60 KiB).
    let mut clients = Vec::new();
    for (parked, buffered) in [(1, 60 * 1024), (2, 80 * 1024)] {
        let mut client = rig.client(dest, port).await;
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        clients.push(client);
        rig.parked(parked).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while rig.holder.budget.buffered() < buffered {
            assert!(tokio::time::Instant::now() < deadline, "kept {buffered}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rig.holder.budget.buffered(), 80 * 1024, "never past it");
    assert_eq!(rig.metrics.buffer_full.get(), 1);

    // The echo server answers with the length it got.
    let server = TcpListener::bind(dest).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = server.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = conn.read_to_end(&mut got).await;
                let _ = conn.write_all(got.len().to_string().as_bytes()).await;
            });
        }
    });
    rig.web_ready(1);
    for client in &mut clients {
        assert_eq!(read_all(client).await, (60 * 1024).to_string());
    }
    assert_eq!(rig.holder.budget.buffered(), 0);
    let slot = rig.handle.held_slots().into_values().next();
    // Released: the destination left the hold map; its slot is the one
    // records were made under (1, the first).
    assert_eq!(slot, None);
    assert_eq!(rig.holder.budget.finished(1), 2);
    rig.reap();
    assert_eq!(rig.handle.finished(1), 2, "the kernel is told");
    assert_eq!(rig.handle.untaken(), 0);
}
