//! The real `itw-agent` and `itw-scaler` binaries started on loopback, for
//! the end-to-end tests and the activation bench: KEDA's side as a real gRPC
//! client, `/metrics` parsed, and connects made under a chosen process name.
//!
//! Every process started here is killed when its handle drops, so a failing
//! test leaves nothing attached to the kernel.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Mutex, OnceLock, PoisonError},
    time::Duration,
};

use itw_proto::externalscaler::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use itw_telemetry::exposition::{Sample, parse_samples};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// True when eBPF programs can be loaded (root). Otherwise the test is
/// skipped with a reason, unless `ITW_REQUIRE_BPF=1` (CI) makes it a failure.
pub fn bpf_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("ITW_REQUIRE_BPF").as_deref() == Ok("1") {
        panic!("{test}: loading eBPF programs needs root, and ITW_REQUIRE_BPF=1 forbids skipping");
    }
    eprintln!(
        "SKIPPED {test}: not root, eBPF programs cannot be loaded (ITW_REQUIRE_BPF=1 makes this a failure)"
    );
    false
}

/// True when a tool the test needs is installed; otherwise skipped, unless
/// `ITW_REQUIRE_TOOLS=1` (hack/test installs them) makes it a failure.
pub fn tool_available(test: &str, path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    if std::env::var("ITW_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!(
            "{test}: {path} is missing, and ITW_REQUIRE_TOOLS=1 forbids skipping (hack/test installs it)"
        );
    }
    eprintln!("SKIPPED {test}: {path} is not installed (hack/test installs it)");
    false
}

/// The binaries this harness starts. They live in other packages, where
/// cargo's `CARGO_BIN_EXE_<name>` cannot name them from here.
pub const BINARIES: [(&str, &str); 3] = [
    ("itw-agent", "itw-agent"),
    ("itw-scaler", "itw-scaler"),
    ("itw-relay", "itw-relay"),
];

/// Path of `itw-agent`, `itw-scaler` or `itw-relay`, built in the same
/// profile and target directory as the running test or bench. The first call
/// in a process runs `cargo build -p itw-agent -p itw-scaler -p itw-relay`
/// (all at once, so a test that starts several waits for one build); later
/// calls reuse that build. This is a
/// build from inside a test, said here because cargo offers no other way to
/// get another package's binary into a test (artifact dependencies are
/// unstable); with `cargo test --workspace` it only checks that they are
/// current.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    assert!(
        BINARIES.iter().any(|(_, bin)| *bin == name),
        "{name} is not one of the binaries this harness builds ({BINARIES:?})"
    );
    BUILT.get_or_init(build_binaries).join(name)
}

/// Builds [`BINARIES`] once; returns target/<profile>.
fn build_binaries() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => "dev",
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.args(["build", "--quiet", "--profile", profile]);
    for (package, bin) in BINARIES {
        command.args(["-p", package, "--bin", bin]);
    }
    let status = command
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .expect("running cargo build");
    assert!(
        status.success(),
        "cargo build of {BINARIES:?} ({profile}) failed"
    );
    profile_dir
}

/// A port free on loopback right now, and never handed out before by this
/// process: the kernel may give a just-closed port again at once, and two
/// calls for one binary's two listeners then collided ("Address already in
/// use" at its start).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if given.insert(port) {
            return port;
        }
    }
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A test's own address literal.
pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// A static service map (`SERVICE_MAP`) of one Service with one ClusterIP
/// and one port.
pub fn static_map(namespace: &str, service: &str, cluster_ip: &str, port: u16) -> String {
    format!(
        "services:\n  - namespace: {namespace}\n    name: {service}\n    clusterIPs: [{cluster_ip}]\n    ports: [{port}]\n"
    )
}

/// A child process whose output goes to a log file, killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, env: &[(&str, String)]) -> Proc {
        Self::spawn_with_args(name, program, &[], env)
    }

    pub fn spawn_with_args(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Proc {
        let dir = TempDir::new(name);
        let log = dir.path().join("log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("ITW_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
        Proc {
            name: name.to_owned(),
            child,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().map_or(0, |p| p as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGTERM, then the exit status (fails the test after 20 s).
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(Ok(status)) => status,
            _ => panic!(
                "{} did not stop within 20 s of SIGTERM:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// Waits for `url` (its `/readyz`) to answer 200, for at most `timeout`.
    /// A timeout fails the test with what `/readyz` last answered and the
    /// process's log, so that a slow start says where it stopped.
    pub async fn wait_ready(&mut self, url: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.assert_running();
            let last = match reqwest::get(url).await {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    format!("{status}: {}", body.trim())
                }
                Err(e) => format!("no answer: {e}"),
            };
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {} to be ready; /readyz last answered {last}; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails the test if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early ({status}):\n{}", self.name, self.log());
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("itw-e2e-{}-{n}-{name}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET a URL; `Some(body)` when it answered 200.
pub async fn get(url: &str) -> Option<String> {
    let response = reqwest::get(url).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

pub async fn scrape(metrics: SocketAddr) -> Vec<Sample> {
    let body = get(&format!("http://{metrics}/metrics"))
        .await
        .unwrap_or_else(|| panic!("scraping http://{metrics}/metrics failed"));
    parse_samples(&body)
}

/// Sum of the samples of `name` whose labels include every pair in `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

/// The one sample of `name` with exactly these labels.
pub fn exact(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.label(k) == Some(*v))
        })
        .map(|s| s.value)
}

/// `internal_tcp_attempts_total` of one service, over pods and processes.
pub fn service_attempts(samples: &[Sample], namespace: &str, service: &str) -> f64 {
    sum(
        samples,
        "internal_tcp_attempts_total",
        &[
            ("destination_namespace", namespace),
            ("destination_service", service),
        ],
    )
}

/// The running scaler binary.
pub struct Scaler {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

impl Scaler {
    pub async fn start(name: &str) -> Scaler {
        Self::start_on(name, loopback(free_port()), loopback(free_port()), &[]).await
    }

    pub async fn start_on(
        name: &str,
        grpc: SocketAddr,
        metrics: SocketAddr,
        env: &[(&str, String)],
    ) -> Scaler {
        let mut all = vec![
            ("GRPC_ADDR", grpc.to_string()),
            ("METRICS_ADDR", metrics.to_string()),
        ];
        all.extend(env.iter().cloned());
        let mut proc = Proc::spawn(name, &binary("itw-scaler"), &all);
        let url = format!("http://{metrics}/metrics");
        eventually(
            &format!("{name} to serve {url}"),
            Duration::from_secs(20),
            || {
                proc.assert_running();
                let url = url.clone();
                async move { get(&url).await }
            },
        )
        .await;
        Scaler {
            proc,
            grpc,
            metrics,
        }
    }

    pub async fn keda(&self) -> ExternalScalerClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .expect("endpoint")
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.grpc));
        ExternalScalerClient::new(channel)
    }

    /// Attempts of one service on this scaler's /metrics.
    pub async fn attempts(&self, namespace: &str, service: &str) -> f64 {
        service_attempts(&scrape(self.metrics).await, namespace, service)
    }
}

/// The running relay binary.
pub struct Relay {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

impl Relay {
    /// Starts a relay in front of `scalers` (its SCALER_ADDR) on the given
    /// ports; returns once it is ready (a Relay stream to a replica is up).
    pub async fn start_on(
        name: &str,
        grpc: SocketAddr,
        metrics: SocketAddr,
        scalers: &[SocketAddr],
        env: &[(&str, String)],
    ) -> Relay {
        let list: Vec<String> = scalers.iter().map(ToString::to_string).collect();
        let mut all = vec![
            ("LISTEN_ADDR", grpc.to_string()),
            ("METRICS_ADDR", metrics.to_string()),
            ("SCALER_ADDR", list.join(",")),
        ];
        all.extend(env.iter().cloned());
        let mut proc = Proc::spawn(name, &binary("itw-relay"), &all);
        proc.wait_ready(&format!("http://{metrics}/readyz"), Duration::from_secs(20))
            .await;
        Relay {
            proc,
            grpc,
            metrics,
        }
    }
}

/// The running agent binary.
pub struct Agent {
    pub proc: Proc,
    pub metrics: SocketAddr,
    map: PathBuf,
    _map: TempDir,
}

impl Agent {
    /// Starts the agent with a static service map and, when `scalers` is not
    /// empty, streams to them; returns once it is ready and every stream is up.
    pub async fn start(
        name: &str,
        map_yaml: &str,
        scalers: &[SocketAddr],
        env: &[(&str, String)],
    ) -> Agent {
        let mut all = Vec::new();
        if !scalers.is_empty() {
            let list: Vec<String> = scalers.iter().map(ToString::to_string).collect();
            all.push(("SCALER_ADDR", list.join(",")));
        }
        all.extend(env.iter().cloned());
        let agent = Self::launch(name, map_yaml, None, &all).await;
        let want = scalers.len() as f64;
        if want > 0.0 {
            agent.wait_streams_up(want).await;
        }
        agent
    }

    /// Starts the agent in its own mount namespace with `hosts` bind-mounted
    /// over /etc/hosts there, so the names in `SCALER_ADDR` (given in `env`)
    /// resolve to what the test writes; returns once it is ready, without
    /// waiting for streams. Needs root (`unshare`, `mount`).
    pub async fn start_with_hosts(
        name: &str,
        map_yaml: &str,
        hosts: &HostsFile,
        env: &[(&str, String)],
    ) -> Agent {
        Self::launch(name, map_yaml, Some(hosts.path()), env).await
    }

    async fn launch(
        name: &str,
        map_yaml: &str,
        hosts: Option<&Path>,
        env: &[(&str, String)],
    ) -> Agent {
        let dir = TempDir::new(name);
        let map = dir.path().join("services.yaml");
        std::fs::write(&map, map_yaml).expect("writing the service map");
        let metrics = loopback(free_port());
        let mut all = vec![
            ("SERVICE_MAP", map.display().to_string()),
            ("METRICS_ADDR", metrics.to_string()),
            ("NODE_NAME", format!("node-{name}")),
        ];
        all.extend(env.iter().cloned());
        let agent = binary("itw-agent");
        let mut proc = match hosts {
            None => Proc::spawn(name, &agent, &all),
            // unshare and sh each exec the next: the process started here
            // is the agent itself (its pid, its signals, killed on drop).
            Some(hosts) => Proc::spawn_with_args(
                name,
                Path::new(UNSHARE),
                &[
                    "--mount".into(),
                    "--propagation".into(),
                    "private".into(),
                    "sh".into(),
                    "-c".into(),
                    r#"mount --bind "$1" /etc/hosts && exec "$2""#.into(),
                    "sh".into(),
                    hosts.display().to_string(),
                    agent.display().to_string(),
                ],
                &all,
            ),
        };
        proc.wait_ready(&format!("http://{metrics}/readyz"), Duration::from_secs(30))
            .await;
        Agent {
            proc,
            metrics,
            map,
            _map: dir,
        }
    }

    /// The static service map file the agent reads.
    pub fn map_path(&self) -> &Path {
        &self.map
    }

    pub async fn wait_streams_up(&self, want: f64) {
        eventually(
            &format!("{} streams to be up", self.proc.name),
            Duration::from_secs(20),
            || async {
                let samples = scrape(self.metrics).await;
                (exact(&samples, "itw_agent_scaler_streams_up", &[]) == Some(want)).then_some(())
            },
        )
        .await;
    }

    pub async fn attempts(&self, namespace: &str, service: &str) -> f64 {
        service_attempts(&scrape(self.metrics).await, namespace, service)
    }

    /// Kernel ids of the programs this agent attached (from its /metrics).
    pub async fn program_ids(&self) -> Vec<u32> {
        scrape(self.metrics)
            .await
            .iter()
            .filter(|s| s.name == "itw_agent_bpf_programs")
            .filter_map(|s| s.label("id")?.parse().ok())
            .collect()
    }
}

/// `unshare(1)`, which [`Agent::start_with_hosts`] starts the agent under.
pub const UNSHARE: &str = "/usr/bin/unshare";

/// A hosts file for one agent's own mount namespace, bind-mounted over
/// /etc/hosts there by [`Agent::start_with_hosts`]: a name resolves to the
/// loopback addresses a test chooses (glibc's getaddrinfo returns every line
/// that names it), and the machine's own /etc/hosts is never touched.
pub struct HostsFile {
    path: PathBuf,
    _dir: TempDir,
}

impl HostsFile {
    pub fn new(name: &str, entries: &[(IpAddr, &str)]) -> Self {
        let dir = TempDir::new(name);
        let hosts = HostsFile {
            path: dir.path().join("hosts"),
            _dir: dir,
        };
        hosts.set(entries);
        hosts
    }

    /// Rewrites the file in place (truncated and written in one write, same
    /// inode, which the bind mount follows): the agent's next lookup sees
    /// these addresses. A lookup racing the write may find the file empty
    /// (the name not resolved: the agent then keeps its streams).
    pub fn set(&self, entries: &[(IpAddr, &str)]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(&self.path, text).expect("writing the hosts file");
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether a BPF program with this id is loaded in the kernel.
pub fn program_loaded(id: u32) -> bool {
    // BPF_PROG_GET_FD_BY_ID: succeeds only while the program exists.
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let attr = Attr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // SAFETY: bpf(2) reads `size_of::<Attr>()` bytes of a valid struct.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &attr as *const Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the fd was just returned to us.
        unsafe {
            libc::close(fd as i32);
        }
        true
    } else {
        false
    }
}

/// KEDA's ScaledObjectRef for a trigger on `namespace/service`.
pub fn scaled_object(namespace: &str, service: &str, extra: &[(&str, &str)]) -> ScaledObjectRef {
    let mut metadata = HashMap::from([
        (
            "scalerAddress".to_owned(),
            "itw-scaler.itw-system:9090".to_owned(),
        ),
        ("service".to_owned(), service.to_owned()),
    ]);
    for (k, v) in extra {
        metadata.insert((*k).to_owned(), (*v).to_owned());
    }
    ScaledObjectRef {
        name: format!("{service}-so"),
        namespace: namespace.to_owned(),
        scaler_metadata: metadata,
    }
}

pub async fn get_metrics(
    keda: &mut ExternalScalerClient<Channel>,
    object: &ScaledObjectRef,
) -> f64 {
    let response = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object.clone()),
            metric_name: String::new(),
        })
        .await
        .expect("GetMetrics")
        .into_inner();
    assert_eq!(response.metric_values.len(), 1, "{response:?}");
    response.metric_values[0].metric_value_float
}

pub async fn is_active(keda: &mut ExternalScalerClient<Channel>, object: &ScaledObjectRef) -> bool {
    keda.is_active(object.clone())
        .await
        .expect("IsActive")
        .into_inner()
        .result
}

/// One connect to a stand-in ClusterIP where nothing listens: refused, as a
/// connect to a Service with no pods is.
pub fn connect_refused(addr: SocketAddr) {
    match TcpStream::connect(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("connect to {addr}: expected connection refused, got {other:?}"),
    }
}

/// Connects `times` times from a separate process named `comm` (a bash
/// started under that name, connecting with its own /dev/tcp, so the
/// connects are made by that process itself). Returns when all are done.
pub fn connect_as(comm: &str, addr: SocketAddr, times: u32) {
    let dir = TempDir::new(comm);
    let link = dir.path().join(comm);
    std::os::unix::fs::symlink("/bin/bash", &link).expect("symlink to bash");
    let script = format!(
        "for ((i = 0; i < {times}; i++)); do : 2>/dev/null 3<>/dev/tcp/{}/{}; done",
        addr.ip(),
        addr.port()
    );
    let status = std::process::Command::new(&link)
        .arg("-c")
        .arg(script)
        .stderr(Stdio::null())
        .status()
        .expect("running bash");
    assert!(status.success() || status.code() == Some(1), "{status}");
}

/// The name this test process counts under (its thread-group leader's comm).
pub fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("/proc/self/comm")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        // 500 draws from the ~28k ephemeral ports: the kernel alone repeats
        // some (a few by the birthday bound), the harness must not.
        let ports: Vec<u16> = (0..500).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
