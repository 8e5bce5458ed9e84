//! The demo's caller, like the seed's `nc -z` sample: connects to a Service's
//! ClusterIP a few times. Nothing listens there (the Service has no pods), so
//! each connect is refused, as a connect to a Service at zero replicas is.
//! Writes the wall-clock time just before its first connect() to a file, so
//! the KEDA-role watcher can say how long the scale signal took.
//!
//! Usage: demo_client ADDR COUNT INTERVAL_MS FIRST_CONNECT_FILE

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, addr, count, interval, file] => addr
            .parse::<SocketAddr>()
            .ok()
            .zip(count.parse::<u32>().ok())
            .zip(interval.parse::<u64>().ok())
            .map(|((a, c), i)| (a, c, i, file.clone())),
        _ => None,
    };
    let Some((addr, count, interval_ms, file)) = parsed else {
        eprintln!("usage: demo_client ADDR COUNT INTERVAL_MS FIRST_CONNECT_FILE");
        std::process::exit(2);
    };
    for i in 1..=count {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        if i == 1
            && let Err(error) = std::fs::write(&file, started.to_string())
        {
            eprintln!("cannot write {file}: {error}");
        }
        let result = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        let outcome = match result {
            Ok(_) => "connected".to_owned(),
            Err(e) => format!("{} (no pod behind the Service yet)", e.kind()),
        };
        println!("  client | connect #{i} to {addr}: {outcome}");
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
}
