//! Holding in the kernel, loaded and attached for real: the connect programs
//! rewrite a held ClusterIP:port to its parking listener after counting it,
//! getpeername() shows the ClusterIP, the agent's marked connects pass
//! untouched, and a pods' cgroup attachment counts each connect once.
//!
//! Addresses: 127.121.<test>.x (and ::1 with ports 44<test>xx). Needs root;
//! see capture_support for skipping.

mod capture_support;

use std::{
    ffi::CString,
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::ffi::OsStrExt,
    path::PathBuf,
    time::Duration,
};

use capture_support::{self as support, TestCgroup};
use itw_agent::{
    capture::{CaptureMode, CgroupOrder, KernelHold, PodCgroup, Started},
    hold::connect_marked,
};
use itw_common::Destination;

const MARK: u32 = 0x2a7c;

/// Programs attached first at the hierarchy's root run before every program
/// of a nested node root, so while the pre-order test reads which programs
/// run before its own, no other test of this binary may have programs there.
/// Tests that attach at the root share this; that one takes it alone.
static HIERARCHY_ROOT: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn start(order: CgroupOrder, pod_cgroup: PodCgroup) -> Option<Started> {
    support::start(CaptureMode::Cgroup, |s| {
        s.hold = Some(KernelHold {
            mark: MARK,
            park_ip4: Some(Ipv4Addr::LOCALHOST),
            park_ip6: Some(Ipv6Addr::LOCALHOST),
            max_per_service: 64,
            max_per_node: 64,
        });
        s.cgroup_order = order;
        s.pod_cgroup = pod_cgroup;
    })
}

fn dest_of(addr: SocketAddr) -> Destination {
    itw_agent::resolve::destination(addr)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_ipv4_destination_is_parked_counted_and_keeps_its_address() {
    let _root = HIERARCHY_ROOT.read().await;
    let Some(started) = start(CgroupOrder::Auto, PodCgroup::None) else {
        return;
    };
    assert!(started.holding);
    let mut kernel = started.kernel;
    let cluster: SocketAddr = "127.121.1.1:8080".parse().unwrap();
    let park = TcpListener::bind("127.0.0.1:0").unwrap();
    let park_port = park.local_addr().unwrap().port();
    kernel.watch(&dest_of(cluster), 21).unwrap();
    kernel.hold(&dest_of(cluster), park_port, 1).unwrap();

    // Nothing listens on the ClusterIP, yet the connect succeeds: it went
    // to the parking listener, and the client still sees where it asked to go.
    let mut client = TcpStream::connect_timeout(&cluster, Duration::from_secs(2)).unwrap();
    assert_eq!(client.peer_addr().unwrap(), cluster);
    let (mut parked, from) = park.accept().unwrap();
    assert_eq!(from, client.local_addr().unwrap());
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    parked.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // Counted first, as any attempt.
    let comm = support::process_comm();
    assert_eq!(
        support::attempts(kernel.as_mut()),
        [((21, comm.clone()), 1)].into()
    );

    // The agent's own connect (marked) goes where it asked, uncounted.
    let server = TcpListener::bind(cluster).unwrap();
    let upstream = connect_marked(cluster, MARK).await.unwrap();
    assert_eq!(upstream.peer_addr().unwrap(), cluster);
    let (_, from) = server.accept().unwrap();
    assert_eq!(from, upstream.local_addr().unwrap());
    // An unmarked one is still parked, though a server listens now.
    let second = TcpStream::connect(cluster).unwrap();
    let (_, from) = park.accept().unwrap();
    assert_eq!(from, second.local_addr().unwrap());
    assert_eq!(
        support::attempts(kernel.as_mut()),
        [((21, comm.clone()), 2)].into()
    );

    // Unheld: connects go straight to the server; parked ones keep their
    // ClusterIP for getpeername() until the port is forgotten.
    kernel.unhold(&dest_of(cluster)).unwrap();
    let direct = TcpStream::connect(cluster).unwrap();
    let (_, from) = server.accept().unwrap();
    assert_eq!(from, direct.local_addr().unwrap());
    assert_eq!(client.peer_addr().unwrap(), cluster);
    kernel.forget_park(&dest_of(cluster), park_port).unwrap();
    assert_eq!(
        client.peer_addr().unwrap(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, park_port))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_ipv6_and_v4_mapped_destinations_are_parked_in_their_family() {
    let _root = HIERARCHY_ROOT.read().await;
    let Some(started) = start(CgroupOrder::Auto, PodCgroup::None) else {
        return;
    };
    let mut kernel = started.kernel;
    let v6: SocketAddr = SocketAddr::from((Ipv6Addr::LOCALHOST, 44_201));
    let park6 = TcpListener::bind("[::1]:0").unwrap();
    kernel
        .hold(&dest_of(v6), park6.local_addr().unwrap().port(), 1)
        .unwrap();
    let client = TcpStream::connect(v6).unwrap();
    assert_eq!(client.peer_addr().unwrap(), v6);
    let (_, from) = park6.accept().unwrap();
    assert_eq!(from, client.local_addr().unwrap());

    // An IPv6 socket to a v4-mapped ClusterIP reaches the IPv4 listener.
    let cluster4 = SocketAddrV4::new(Ipv4Addr::new(127, 121, 2, 1), 8080);
    let park4 = TcpListener::bind("127.0.0.1:0").unwrap();
    kernel
        .hold(
            &dest_of(SocketAddr::V4(cluster4)),
            park4.local_addr().unwrap().port(),
            1,
        )
        .unwrap();
    let mapped = SocketAddr::from((cluster4.ip().to_ipv6_mapped(), cluster4.port()));
    let client = TcpStream::connect(mapped).unwrap();
    assert_eq!(client.peer_addr().unwrap(), mapped);
    let (_, from) = park4.accept().unwrap();
    assert_eq!(from.port(), client.local_addr().unwrap().port());
}

/// A child cgroup of the root standing in for kubepods.slice; removed on drop.
/// Connects once to `target` from a child process named `name` in `cgroup`;
/// whether the connect succeeded.
fn connect_from_cgroup(cgroup: &TestCgroup, name: &str, target: SocketAddrV4) -> bool {
    let name = CString::new(name).unwrap();
    support::connects_from_child(&name, target, 1, Some(&cgroup.procs())) == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_cgroup_programs_run_first_and_each_connect_counts_once() {
    let _root = HIERARCHY_ROOT.read().await;
    if !support::is_root() {
        support::skip("not running as root, which loading eBPF programs needs");
        return;
    }
    let pods = TestCgroup::new(&format!("itw-test-pods-{}", std::process::id()));
    let Some(started) = start(CgroupOrder::Pods, PodCgroup::Path(pods.0.clone())) else {
        return;
    };
    let hooks: Vec<&str> = started.attach_order.iter().map(|o| o.hook).collect();
    assert_eq!(
        hooks,
        ["connect4", "connect6", "connect4 (pods)", "connect6 (pods)"]
    );
    // In the pods' cgroup, ours runs before the root's (ours among them).
    let root4 = started.attach_order[0].ours;
    let pods4 = &started.attach_order[2];
    let position = |id| pods4.effective.iter().position(|p| *p == id);
    assert!(
        matches!((position(pods4.ours), position(root4)), (Some(p), Some(r)) if p < r),
        "{pods4:?}"
    );
    assert!(
        started.attached_to.contains("pods' cgroup"),
        "{}",
        started.attached_to
    );

    let mut kernel = started.kernel;
    let refused = SocketAddrV4::new(Ipv4Addr::new(127, 121, 3, 1), 8080);
    let held = SocketAddrV4::new(Ipv4Addr::new(127, 121, 3, 2), 8080);
    kernel.watch(&dest_of(refused.into()), 31).unwrap();
    kernel.watch(&dest_of(held.into()), 32).unwrap();
    let park = TcpListener::bind("127.0.0.1:0").unwrap();
    kernel
        .hold(&dest_of(held.into()), park.local_addr().unwrap().port(), 1)
        .unwrap();

    let pods_cgroup = TestCgroup(pods.0.clone());
    let (refused_ok, held_ok) = blocking(move || {
        let a = connect_from_cgroup(&pods_cgroup, "pod-client", refused);
        let b = connect_from_cgroup(&pods_cgroup, "pod-client", held);
        std::mem::forget(pods_cgroup);
        (a, b)
    })
    .await;
    assert!(!refused_ok, "nothing listens on {refused}");
    assert!(
        held_ok,
        "the held connect from the pods' cgroup was not parked"
    );
    park.accept().unwrap();
    // From outside the pods' cgroup, the root's programs count.
    let _ = TcpStream::connect(SocketAddr::V4(refused));
    assert_eq!(
        support::attempts(kernel.as_mut()),
        [
            ((31, "pod-client".to_owned()), 1),
            ((31, support::process_comm()), 1),
            ((32, "pod-client".to_owned()), 1),
        ]
        .into()
    );
}

/// A node's cgroup root nested below the hierarchy's root, as on kind and
/// k3d (the node's /sys/fs/cgroup is a subtree of the host's), with the pods'
/// cgroup and a pod below it; removed on drop, deepest first.
struct NestedNode {
    dirs: Vec<PathBuf>,
}

impl NestedNode {
    fn new() -> Self {
        let hierarchy = itw_agent::capture::cgroup::find_root(None).expect("a cgroup v2 root");
        let mut dirs = Vec::new();
        let mut path = hierarchy.path;
        for part in [
            format!("itw-test-host-{}.slice", std::process::id()),
            "node.scope".to_owned(),
            "kubepods.slice".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            "kubepods-besteffort-pod1.slice".to_owned(),
        ] {
            path.push(part);
            let _ = std::fs::remove_dir(&path);
            std::fs::create_dir(&path).expect("creating a test cgroup");
            dirs.push(path.clone());
        }
        Self { dirs }
    }

    fn node_root(&self) -> PathBuf {
        self.dirs[1].clone()
    }

    fn pods(&self) -> PathBuf {
        self.dirs[2].clone()
    }

    fn pod(&self) -> TestCgroup {
        TestCgroup(self.dirs[4].clone())
    }
}

impl Drop for NestedNode {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Issue 11: with the node's cgroup root nested two levels down, a pod's
/// connect was counted by the pods' program and again by the root's, whose
/// "already counted" test used the pods' cgroup level below the node root
/// where the kernel's helper wants the level in the whole hierarchy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_nested_node_root_each_pod_connect_counts_once() {
    let _root = HIERARCHY_ROOT.read().await;
    if !support::is_root() {
        support::skip("not running as root, which loading eBPF programs needs");
        return;
    }
    let node = NestedNode::new();
    let root = node.node_root();
    let pods = node.pods();
    let Some(started) = support::start(CaptureMode::Cgroup, |s| {
        s.cgroup_root = Some(root);
        s.cgroup_order = CgroupOrder::Pods;
        s.pod_cgroup = PodCgroup::Path(pods);
    }) else {
        return;
    };
    assert!(
        started.attached_to.contains("pods' cgroup"),
        "{}",
        started.attached_to
    );
    let mut kernel = started.kernel;
    let refused = SocketAddrV4::new(Ipv4Addr::new(127, 121, 4, 1), 8080);
    kernel.watch(&dest_of(refused.into()), 41).unwrap();
    let pod = node.pod();
    let procs = CString::new(pod.0.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    std::mem::forget(pod);
    let connected = blocking(move || {
        support::connects_from_child(
            &CString::new("pod-client").unwrap(),
            refused,
            3,
            Some(&procs),
        )
    })
    .await;
    assert_eq!(connected, 0, "nothing listens on {refused}");
    assert_eq!(
        support::attempts(kernel.as_mut()),
        [((41, "pod-client".to_owned()), 3)].into()
    );
}

/// A socket load balancer attached to the node's root with BPF_F_PREORDER
/// (the node lab's stand-in for Cilium's) refuses connects to a Service
/// without endpoints before any program of a child cgroup runs. Put first
/// (CGROUP_ORDER=auto on this kernel), our programs still park the connect;
/// in the pods' order they run behind it, and the capture says holding is
/// blocked rather than letting the refusal pass silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ahead_of_a_preorder_load_balancer_a_held_connect_is_parked() {
    let _alone = HIERARCHY_ROOT.write().await;
    use itw_socket_lb::{Frontend, SocketLb};
    if !support::is_root() {
        support::skip("not running as root, which loading eBPF programs needs");
        return;
    }
    let node = NestedNode::new();
    let held = SocketAddrV4::new(Ipv4Addr::new(127, 121, 5, 1), 8080);
    if !support::kernel_has_preorder() {
        // Where the kernel refuses the flag no balancer can run ahead of the
        // pods' programs: there is nothing to get ahead of.
        eprintln!("no BPF_F_PREORDER on this kernel: no pre-order balancer can exist");
        return;
    }
    let mut lb = SocketLb::attach(&node.node_root(), true).expect("the stand-in load balancer");
    lb.apply(&[Frontend {
        name: "default/cold:http".to_owned(),
        cluster_ip: (*held.ip()).into(),
        port: held.port(),
        backends: Vec::new(),
    }])
    .expect("a Service without endpoints");

    for (order, parked) in [(CgroupOrder::Auto, true), (CgroupOrder::Pods, false)] {
        let root = node.node_root();
        let pods = node.pods();
        let Some(started) = support::start(CaptureMode::Cgroup, |s| {
            s.cgroup_root = Some(root);
            s.cgroup_order = order;
            s.pod_cgroup = PodCgroup::Path(pods);
            s.hold = Some(KernelHold {
                mark: MARK,
                park_ip4: Some(Ipv4Addr::LOCALHOST),
                park_ip6: None,
                max_per_service: 64,
                max_per_node: 64,
            });
        }) else {
            return;
        };
        let blocked: Vec<String> = started
            .attach_order
            .iter()
            .filter_map(|o| o.holding_blocked())
            .collect();
        assert_eq!(started.first, parked, "{order:?}");
        assert_eq!(blocked.is_empty(), parked, "{order:?}: {blocked:?}");
        let mut kernel = started.kernel;
        kernel.watch(&dest_of(held.into()), 51).unwrap();
        let park = TcpListener::bind("127.0.0.1:0").unwrap();
        kernel
            .hold(&dest_of(held.into()), park.local_addr().unwrap().port(), 1)
            .unwrap();
        let pod = node.pod();
        let procs = CString::new(pod.0.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        std::mem::forget(pod);
        let connected = blocking(move || {
            support::connects_from_child(
                &CString::new("pod-client").unwrap(),
                held,
                1,
                Some(&procs),
            )
        })
        .await;
        assert_eq!(connected == 1, parked, "{order:?}: parked or refused");
        // Counted either way: activation never depends on the order.
        assert_eq!(
            support::attempts(kernel.as_mut()),
            [((51, "pod-client".to_owned()), 1)].into(),
            "{order:?}"
        );
    }
}

/// The inode of this process's network namespace, as the programs record it.
fn own_netns() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino() as u32
}

/// Issue 12: the programs record each connect they park (its ClusterIP, its
/// caller's network namespace, its Service's slot), found by the 4-tuple
/// the parking listener accepts; a connection to the parking port that no
/// program parked has no record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_parked_connect_is_recorded_under_the_4_tuple_the_listener_sees() {
    let _root = HIERARCHY_ROOT.read().await;
    let Some(started) = start(CgroupOrder::Auto, PodCgroup::None) else {
        return;
    };
    let mut kernel = started.kernel;
    let book = kernel.redirects().expect("the programs hold");
    let cluster: SocketAddr = "127.121.6.1:8080".parse().unwrap();
    let park = TcpListener::bind("127.0.0.1:0").unwrap();
    let park_port = park.local_addr().unwrap().port();
    kernel.watch(&dest_of(cluster), 61).unwrap();
    kernel.hold(&dest_of(cluster), park_port, 3).unwrap();

    let _client = TcpStream::connect_timeout(&cluster, Duration::from_secs(2)).unwrap();
    let (_, from) = park.accept().unwrap();
    let record = book.take(from, park_port).unwrap().expect("a record");
    assert_eq!(record.dest, dest_of(cluster));
    assert_eq!(record.netns, own_netns());
    assert_eq!(record.tgid, std::process::id());
    assert_eq!(record.slot, 3);
    assert_eq!(book.take(from, park_port).unwrap(), None, "taken once");

    // Straight to the parking port: no program parked it.
    let _stranger = TcpStream::connect(("127.0.0.1", park_port)).unwrap();
    let (_, from) = park.accept().unwrap();
    assert_eq!(book.take(from, park_port).unwrap(), None);
}

/// Issue 12: the programs park at most the caps' worth at once, per
/// Service slot and per node; past a cap a connect goes on unheld (here:
/// refused, nothing listens at the ClusterIP) and is counted; a parked
/// connection the agent reports ended makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_a_connect_goes_on_unheld_and_an_ended_one_makes_room() {
    let _root = HIERARCHY_ROOT.read().await;
    let Some(started) = support::start(CaptureMode::Cgroup, |s| {
        s.hold = Some(KernelHold {
            mark: MARK,
            park_ip4: Some(Ipv4Addr::LOCALHOST),
            park_ip6: None,
            max_per_service: 2,
            max_per_node: 64,
        });
    }) else {
        return;
    };
    let mut kernel = started.kernel;
    let cluster: SocketAddr = "127.121.7.1:8080".parse().unwrap();
    let park = TcpListener::bind("127.0.0.1:0").unwrap();
    let park_port = park.local_addr().unwrap().port();
    kernel.watch(&dest_of(cluster), 71).unwrap();
    kernel.hold(&dest_of(cluster), park_port, 5).unwrap();
    let connect = || TcpStream::connect_timeout(&cluster, Duration::from_secs(2));

    let first = connect().expect("parked");
    let second = connect().expect("parked");
    let third = connect().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(third, Err(std::io::ErrorKind::ConnectionRefused));
    let counts = kernel.hold_slot(5).unwrap();
    assert_eq!((counts.admitted, counts.refused), (2, 1));
    // Every attempt counted, parked or not.
    assert_eq!(
        support::attempts(kernel.as_mut()),
        [((71, support::process_comm()), 3)].into()
    );

    // One of them ends (the agent says so, for the slot and the node).
    drop(first);
    kernel.set_hold_finished(5, 1).unwrap();
    kernel.set_hold_finished(0, 1).unwrap();
    let fourth = connect().expect("room again");
    assert_eq!(kernel.hold_slot(5).unwrap().admitted, 3);
    drop((second, fourth));

    // The node's cap binds too: slot 0 counts every Service's. With the
    // Service's slot all ended, tell the node's that 64 more are parked
    // than were admitted here (the programs subtract with wrapping).
    kernel.set_hold_finished(5, 3).unwrap();
    kernel.set_hold_finished(0, 3u64.wrapping_sub(64)).unwrap();
    assert!(connect().is_err(), "the node cap refuses");
    assert_eq!(kernel.hold_slot(5).unwrap().refused, 2);
}
