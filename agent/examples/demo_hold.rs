//! The demo's holding scene: a client calls a held Service that has no ready
//! pod; its connect succeeds at once and its request waits at the agent;
//! then the "pod" starts (a server at the stand-in ClusterIP, where
//! kube-proxy would route) and the service map marks its endpoint ready;
//! the client gets its answer.
//!
//! Writes the wall-clock time just before its connect() to FIRST_CONNECT_FILE
//! for the KEDA-role watcher, as demo_client does.
//!
//! Usage: demo_hold ADDR AGENT_PID MAP_FILE READY_MAP_FILE WAIT_MS FIRST_CONNECT_FILE

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, addr, pid, map, ready_map, wait, first] => addr
            .parse::<SocketAddr>()
            .ok()
            .zip(pid.parse::<i32>().ok())
            .zip(wait.parse::<u64>().ok())
            .map(|((a, p), w)| (a, p, map.clone(), ready_map.clone(), w, first.clone())),
        _ => None,
    };
    let Some((addr, agent, map, ready_map, wait_ms, first)) = parsed else {
        eprintln!(
            "usage: demo_hold ADDR AGENT_PID MAP_FILE READY_MAP_FILE WAIT_MS FIRST_CONNECT_FILE"
        );
        std::process::exit(2);
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    if let Err(error) = std::fs::write(&first, now.to_string()) {
        eprintln!("cannot write {first}: {error}");
    }
    if let Err(error) = run(addr, agent, &map, &ready_map, wait_ms) {
        eprintln!("  client | {error}");
        std::process::exit(1);
    }
}

fn run(
    addr: SocketAddr,
    agent: i32,
    map: &str,
    ready_map: &str,
    wait_ms: u64,
) -> std::io::Result<()> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    println!(
        "  client | connect to {addr}: connected after {:.1} ms, though no pod is ready; getpeername() says {}",
        started.elapsed().as_secs_f64() * 1e3,
        stream.peer_addr()?
    );
    stream.write_all(b"SELECT stock FROM items WHERE id = 42\n")?;
    println!("  client | request sent; waiting for the answer");
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;

    let reader = std::thread::spawn(move || -> std::io::Result<(String, Instant)> {
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok((reply, Instant::now()))
    });

    std::thread::sleep(Duration::from_millis(wait_ms));
    let server = TcpListener::bind(addr)?;
    std::thread::spawn(move || {
        for mut conn in server.incoming().flatten() {
            let mut buf = [0u8; 256];
            let n = conn.read(&mut buf).unwrap_or(0);
            let query = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
            let _ = write!(conn, "stock=7 (answer to: {query})");
        }
    });
    std::fs::copy(ready_map, map)?;
    // SAFETY: a signal to the agent the demo started.
    unsafe { libc::kill(agent, libc::SIGHUP) };
    let ready_at = Instant::now();
    println!(
        "  pod    | inventory-0 is up and ready after {:.1} s (the map now says ready)",
        started.elapsed().as_secs_f64()
    );
    let (reply, answered) = reader
        .join()
        .map_err(|_| std::io::Error::other("the reader panicked"))??;
    println!(
        "  client | answer {reply:?}, {:.1} s after its connect ({:.1} ms after the pod was ready): nothing refused, nothing retried",
        (answered - started).as_secs_f64(),
        (answered - ready_at).as_secs_f64() * 1e3
    );
    Ok(())
}
