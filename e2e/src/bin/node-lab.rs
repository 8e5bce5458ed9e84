//! `node-lab`: builds a Kubernetes-shaped node on this machine for each cell
//! of the matrix (datapath x cgroup layout), runs the real agent and scaler
//! on it, prints a table of cell x check with the measured figures, and
//! removes everything. Needs root. `hack/node-lab` builds the binaries and
//! runs it.
//!
//! `node-lab pod ...` is what runs inside the lab's pods (and as its kubelet):
//! a client making connects, a server answering them.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use itw_e2e::lab::{
    self, Cell, CellReport, Settings,
    cell::{HOST_CGROUP, HOST_NETNS},
    netns,
};

#[derive(Parser)]
#[command(
    name = "node-lab",
    about = "A Kubernetes-shaped node on this machine, every datapath proven"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Only the cells whose name contains one of these (repeatable).
    #[arg(long = "cell")]
    cells: Vec<String>,
    /// How long the datapath takes to follow an EndpointSlice change.
    #[arg(long, default_value = "700ms", value_parser = humantime::parse_duration)]
    lag: Duration,
    /// The itw-agent binary (default: beside this one).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The itw-scaler binary (default: beside this one).
    #[arg(long)]
    scaler: Option<PathBuf>,
    /// Where each cell's logs go (default: a fresh directory under /tmp).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Print the cells and exit.
    #[arg(long)]
    list: bool,
    /// Only the chain's cell, with this many rounds of its wake-up (serial
    /// and pre-woken), and their figures: `hack/bench chain`.
    #[arg(long)]
    chain_rounds: Option<u32>,
}

#[derive(Subcommand)]
enum Command {
    /// A pod's process (started by the lab inside a pod).
    #[command(subcommand, hide = true)]
    Pod(PodCommand),
}

#[derive(Subcommand)]
enum PodCommand {
    /// Connects `count` times, printing one JSON line per connect.
    Client {
        /// The process name to take (prctl), as the agent will see it.
        #[arg(long)]
        comm: String,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Send a line and wait for the server's reply line.
        #[arg(long)]
        send: bool,
        /// Retry a refused connect every 50 ms for this long, as a real
        /// client of a Service scaled to zero does (default: no retry).
        #[arg(long, value_parser = humantime::parse_duration)]
        retry_for: Option<Duration>,
    },
    /// Opens `count` connections at once, each sending `payload` bytes,
    /// and waits for each to end; one JSON line per connection.
    Flood {
        #[arg(long)]
        comm: String,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        payload: usize,
    },
    /// A link of a call chain: for each connection's line, connects to
    /// `next` (retrying a refused connect, as `client --retry-for` does),
    /// passes the line on and answers "<name> -> <next's reply>".
    Relay {
        #[arg(long)]
        name: String,
        /// The process name to take (prctl).
        #[arg(long)]
        comm: String,
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        next: SocketAddr,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        retry_for: Duration,
    },
    /// Answers each connection's line with "<name> saw <peer>".
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        /// Appends every accepted peer's address here, a line each.
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Command::Pod(pod)) => run_pod(pod).map(|()| true),
        None => run_matrix(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("node-lab: {error:#}");
            ExitCode::from(2)
        }
    }
}

const PREFIX: &str = "itwl";

fn run_matrix(args: &Args) -> anyhow::Result<bool> {
    let cells: Vec<Cell> = Cell::matrix()
        .into_iter()
        .filter(|c| args.cells.is_empty() || args.cells.iter().any(|f| c.name.contains(f.as_str())))
        .filter(|c| args.chain_rounds.is_none() || c.chain)
        .collect();
    if args.list {
        for cell in &cells {
            println!("{}", cell.name);
        }
        return Ok(true);
    }
    if cells.is_empty() {
        bail!("no cell matches {:?}", args.cells);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the node lab needs root (network namespaces, cgroups, eBPF)");
    }
    for tool in [
        "ip",
        "iptables-restore",
        "ip6tables-restore",
        "nft",
        "unshare",
        "setpriv",
        "mount",
    ] {
        if which(tool).is_none() {
            bail!("{tool} is not installed (hack/test and hack/node-lab install it)");
        }
    }
    let beside = |name: &str| -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe().context("this binary's path")?;
        Ok(exe.with_file_name(name))
    };
    let settings = Settings {
        agent: args.agent.clone().map_or_else(|| beside("itw-agent"), Ok)?,
        scaler: args
            .scaler
            .clone()
            .map_or_else(|| beside("itw-scaler"), Ok)?,
        lag: args.lag,
        work: match &args.work {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!("itw-node-lab-{}", std::process::id())),
        },
        chain_rounds: args.chain_rounds.unwrap_or(1).max(1),
    };
    for binary in [&settings.agent, &settings.scaler] {
        if !binary.is_file() {
            bail!(
                "{} is missing: build it first (hack/node-lab does)",
                binary.display()
            );
        }
    }
    netns::remove_stale(PREFIX);
    let mount_points = [
        MountPoint::ensure(Path::new(HOST_CGROUP))?,
        MountPoint::ensure(Path::new(HOST_NETNS))?,
    ];
    println!(
        "node lab: {} cells, datapath lag {} ms, logs in {}",
        cells.len(),
        settings.lag.as_millis(),
        settings.work.display()
    );
    let pid = std::process::id();
    let mut reports = Vec::new();
    for (i, cell) in cells.into_iter().enumerate() {
        let started = Instant::now();
        let prefix = format!("{PREFIX}{pid}c{i}");
        let checks =
            lab::cell::run(&cell, &settings, &prefix).map_err(|e| lab::brief(&format!("{e:#}")));
        let report = CellReport {
            cell,
            checks,
            seconds: started.elapsed().as_secs_f64(),
        };
        println!(
            "{:<26} {} in {:.1}s",
            report.cell.name,
            if report.passed() { "ok" } else { "FAILED" },
            report.seconds
        );
        reports.push(report);
    }
    drop(mount_points);
    println!("\n{}", lab::table(&reports));
    let leftovers = leftovers(pid);
    if !leftovers.is_empty() {
        println!("left behind: {}", leftovers.join("; "));
    } else {
        println!("nothing left behind: no lab namespace, cgroup or eBPF program remains");
    }
    let failed = reports.iter().filter(|r| !r.passed()).count();
    println!(
        "node-lab summary: {} cells, {} passed, {failed} failed",
        reports.len(),
        reports.len() - failed
    );
    Ok(failed == 0 && leftovers.is_empty())
}

/// What the lab may have left: namespaces of this run, eBPF programs of
/// ours (the agent's and the stand-in load balancer's).
fn leftovers(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let ours = format!("{PREFIX}{pid}");
    if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&ours) {
                out.push(format!("network namespace {name}"));
            }
        }
    }
    if let Ok(output) = std::process::Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    {
        let programs: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_default();
        for program in programs.as_array().into_iter().flatten() {
            let name = program["name"].as_str().unwrap_or_default();
            if name.starts_with("itw_") || name.starts_with("lab_lb_") {
                out.push(format!("eBPF program {name} (id {})", program["id"]));
            }
        }
    }
    out
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}

/// `/host/sys/fs/cgroup`, where the agent's mount namespace mounts the
/// node's cgroup root: created if missing, and what was created removed
/// at the end.
struct MountPoint {
    created: Vec<PathBuf>,
}

impl MountPoint {
    fn ensure(path: &Path) -> anyhow::Result<Self> {
        let mut created = Vec::new();
        let mut at = PathBuf::from("/");
        for part in path.components().skip(1) {
            at.push(part);
            if !at.exists() {
                std::fs::create_dir(&at).with_context(|| format!("creating {}", at.display()))?;
                created.push(at.clone());
            }
        }
        Ok(Self { created })
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

// ------------------------------------------------------------ pod processes

fn run_pod(command: PodCommand) -> anyhow::Result<()> {
    match command {
        PodCommand::Client {
            comm,
            to,
            count,
            send,
            retry_for,
        } => {
            set_process_name(&comm)?;
            let stdout = std::io::stdout();
            for _ in 0..count {
                let line = connect_once(to, send, retry_for.unwrap_or_default());
                let mut out = stdout.lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Ok(())
        }
        PodCommand::Flood {
            comm,
            to,
            count,
            payload,
        } => {
            set_process_name(&comm)?;
            flood(to, count, payload)
        }
        PodCommand::Serve { name, listen, log } => serve(&name, &listen, log),
        PodCommand::Relay {
            name,
            comm,
            listen,
            next,
            retry_for,
        } => {
            set_process_name(&comm)?;
            relay(&name, &listen, next, retry_for)
        }
    }
}

/// Connects to `to`; a refused (or unreachable) connect is retried every
/// 50 ms until `retry_for` has passed.
fn connect_retrying(to: SocketAddr, retry_for: Duration) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + retry_for;
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            Ok(stream) => return Ok(stream),
            Err(error)
                if Instant::now() < deadline
                    && matches!(
                        error.raw_os_error(),
                        Some(libc::ECONNREFUSED | libc::EPERM | libc::EHOSTUNREACH)
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => return Err(error),
        }
    }
}

fn relay(
    name: &str,
    listen: &[SocketAddr],
    next: SocketAddr,
    retry_for: Duration,
) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for addr in listen {
        let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || pass_on(&name, stream, next, retry_for));
            }
        }));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn pass_on(name: &str, stream: TcpStream, next: SocketAddr, retry_for: Duration) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let exchange = || -> std::io::Result<String> {
        let onward = connect_retrying(next, retry_for)?;
        onward.set_read_timeout(Some(Duration::from_secs(45)))?;
        (&onward).write_all(line.as_bytes())?;
        let mut reply = String::new();
        BufReader::new(&onward).read_line(&mut reply)?;
        Ok(reply.trim_end().to_owned())
    };
    let answer = match exchange() {
        Ok(reply) => format!("{name} -> {reply}"),
        Err(error) => format!("{name} -> {next} failed: {error}"),
    };
    let mut writer = &stream;
    let _ = writeln!(writer, "{answer}");
}

fn flood(to: SocketAddr, count: u32, payload: usize) -> anyhow::Result<()> {
    let bytes = vec![b'x'; payload];
    let mut open = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..count {
        match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Ok(mut stream) => {
                stream.set_write_timeout(Some(Duration::from_secs(5)))?;
                let _ = stream.write_all(&bytes);
                open.push(stream);
            }
            Err(error) => lines.push(serde_json::json!({
                "connected": false, "errno": error.raw_os_error()
            })),
        }
    }
    for stream in open {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut sink = [0u8; 1024];
        let ended = loop {
            match (&stream).read(&mut sink) {
                Ok(0) => break "eof".to_owned(),
                Ok(_) => {}
                Err(error) => break error.kind().to_string(),
            }
        };
        lines.push(serde_json::json!({"connected": true, "ended": ended}));
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn set_process_name(name: &str) -> anyhow::Result<()> {
    let name = std::ffi::CString::new(name).context("a process name without NUL")?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (up to 16 bytes);
    // on the main thread it names the process.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("prctl(PR_SET_NAME)");
    }
    Ok(())
}

fn connect_once(to: SocketAddr, send: bool, retry_for: Duration) -> serde_json::Value {
    let stream = match connect_retrying(to, retry_for) {
        Ok(stream) => stream,
        Err(error) => {
            return serde_json::json!({"connected": false, "errno": error.raw_os_error(), "error": error.to_string()});
        }
    };
    let peer = stream.peer_addr().ok().map(|p| p.to_string());
    if !send {
        return serde_json::json!({"connected": true, "peer": peer});
    }
    let exchange = || -> std::io::Result<String> {
        let mut writer = stream.try_clone()?;
        writer.write_all(b"hello\n")?;
        // A held connection waits here until its Service has a ready pod.
        stream.set_read_timeout(Some(Duration::from_secs(45)))?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        Ok(reply.trim_end().to_owned())
    };
    match exchange() {
        Ok(reply) => serde_json::json!({"connected": true, "peer": peer, "reply": reply}),
        Err(error) => serde_json::json!({
            "connected": true, "peer": peer, "errno": error.raw_os_error(), "error": error.to_string()
        }),
    }
}

fn serve(name: &str, listen: &[SocketAddr], log: Option<PathBuf>) -> anyhow::Result<()> {
    let log = match log {
        Some(path) => Some(std::sync::Arc::new(std::sync::Mutex::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        ))),
        None => None,
    };
    let mut threads = Vec::new();
    for addr in listen {
        let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        let name = name.to_owned();
        let log = log.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let (Some(log), Ok(peer)) = (&log, stream.peer_addr())
                    && let Ok(mut file) = log.lock()
                {
                    let _ = writeln!(file, "{peer}");
                }
                let name = name.clone();
                std::thread::spawn(move || answer(&name, stream));
            }
        }));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn answer(name: &str, stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |p| p.to_string());
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_ok() && !line.is_empty() {
        let mut writer = &stream;
        let _ = writeln!(writer, "{name} saw {peer}");
    }
}
