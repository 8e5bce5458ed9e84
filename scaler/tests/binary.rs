//! The real `itw-scaler` binary: it starts from env vars, serves on loopback,
//! and on SIGTERM ends KEDA's, the agents' and the relays' streams with
//! status OK and exits 0. Bad settings stop it at start with a message
//! naming them.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::{EveryStream, PATIENCE, within};
use tonic::transport::Endpoint;

const SETTINGS: [&str; 13] = [
    "GRPC_ADDR",
    "METRICS_ADDR",
    "AGENT_TOKEN_FILE",
    "AGENT_TOKEN",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "TLS_CLIENT_CA_FILE",
    "MAX_WINDOW",
    "MAX_SERIES",
    "MAX_DESTINATIONS",
    "INSTANCE_RETENTION",
    "MAX_BATCH_DELTAS",
    "LOG_FORMAT",
];

/// The binary with only the given settings (none inherited from the test's env).
fn scaler(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_itw-scaler"));
    for key in SETTINGS {
        command.env_remove(key);
    }
    command.env("RUST_LOG", "info").envs(env.iter().copied());
    command
}

/// Kills the child if a test fails before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.0.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.0.try_wait().expect("waiting for itw-scaler") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "itw-scaler did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The value of `"key":"..."` in a JSON log line.
fn json_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// Starts the binary on loopback ports it picks; returns it and its gRPC address.
fn start() -> (Running, SocketAddr, mpsc::Receiver<String>) {
    let mut child = scaler(&[
        ("GRPC_ADDR", "127.0.0.1:0"),
        ("METRICS_ADDR", "127.0.0.1:0"),
        ("LOG_FORMAT", "json"),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting itw-scaler");
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let running = Running(child);
    let addr = loop {
        let line = lines
            .recv_timeout(PATIENCE)
            .expect("itw-scaler logs that it listens");
        if json_field(&line, "message") == Some("listening") {
            break json_field(&line, "grpc")
                .expect("grpc address")
                .parse()
                .expect("an address");
        }
    };
    (running, addr, lines)
}

#[tokio::test]
async fn sigterm_ends_streams_with_ok_and_exits_zero() {
    let (mut running, addr, lines) = start();
    let channel = within(
        "connecting",
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let streams = EveryStream::open(channel).await;
    running.signal("TERM");
    streams.expect_all_end().await;
    let status = tokio::task::spawn_blocking(move || {
        let status = running.wait();
        drop(running);
        status
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    let logged: Vec<String> = lines.try_iter().collect();
    assert!(
        logged
            .iter()
            .any(|l| json_field(l, "message") == Some("SIGTERM: stopping")),
        "{logged:#?}"
    );
    assert!(
        logged
            .iter()
            .any(|l| json_field(l, "message") == Some("stopped")),
        "{logged:#?}"
    );
}

#[test]
fn bad_settings_stop_the_start_with_a_message_naming_them() {
    let output = scaler(&[("MAX_WINDOW", "2h")]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "invalid value '2h' for '--max-window <MAX_WINDOW>': \"2h\": must be between 1s and 1h"
        ),
        "{stderr}"
    );

    let output = scaler(&[
        ("AGENT_TOKEN_FILE", "/nonexistent/itw-token"),
        ("GRPC_ADDR", "127.0.0.1:0"),
        ("METRICS_ADDR", "127.0.0.1:0"),
    ])
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "Error: AGENT_TOKEN_FILE /nonexistent/itw-token: No such file or directory (os error 2)"
        ),
        "{stderr}"
    );

    let output = scaler(&[("RUST_LOG", "info,=bad=")]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Error: RUST_LOG: "));
}
