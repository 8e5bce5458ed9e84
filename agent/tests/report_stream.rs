//! The reporter against a scripted Ingest server over real gRPC on loopback:
//! what it sends at stream start (full snapshot or resume + resends), live
//! batches, reconnection after the scaler drops the stream, the bearer token,
//! and the flush on shutdown.

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use itw_agent::{
    counting_loop::{AgentClock, Collected, CollectionSink},
    deltas::SeriesKey,
    report::{
        InstanceSecret, ReportMetrics, ReportSettings, Reporter, TokenSource, ledger::LogLimits,
    },
    resolve::ServiceRef,
};
use itw_proto::{
    addr::HostPort,
    itw::v1::{
        Ack, REPLICA_HEADER, RelayRequest, RelayResponse, ReportRequest, ReportResponse, Welcome,
        ingest_server::{Ingest, IngestServer},
        report_request, report_response,
    },
};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// What the scripted server saw and how it answers.
#[derive(Default)]
struct Script {
    /// Messages per session, in order.
    sessions: Mutex<Vec<Vec<report_request::Message>>>,
    /// Authorization header of each session.
    auth: Mutex<Vec<Option<String>>>,
    /// The itw-replica header of each session (set when sent to a relay).
    replica: Mutex<Vec<Option<String>>>,
    /// Welcome.applied_sequence to answer (per session, then the last one).
    applied: Mutex<Vec<u64>>,
    /// Fail the current session after this many batches in it.
    fail_after_batches: Mutex<Option<usize>>,
    /// Ended sessions (request stream closed by the agent).
    closed: Mutex<usize>,
    changed: Notify,
}

#[derive(Clone)]
struct FakeIngest(Arc<Script>);

#[tonic::async_trait]
impl Ingest for FakeIngest {
    type ReportStream = Pin<Box<dyn Stream<Item = Result<ReportResponse, Status>> + Send>>;

    async fn report(
        &self,
        request: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let script = self.0.clone();
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        script.auth.lock().push(auth);
        let replica = request
            .metadata()
            .get(REPLICA_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        script.replica.lock().push(replica);
        let session = {
            let mut sessions = script.sessions.lock();
            sessions.push(Vec::new());
            sessions.len() - 1
        };
        let applied = {
            let applied = script.applied.lock();
            applied
                .get(session)
                .or(applied.last())
                .copied()
                .unwrap_or(0)
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut batches = 0;
            while let Some(Ok(message)) = inbound.next().await {
                let Some(message) = message.message else {
                    continue;
                };
                let reply = match &message {
                    report_request::Message::Hello(_) => {
                        Some(report_response::Message::Welcome(Welcome {
                            applied_sequence: applied,
                            history_seconds: 60,
                        }))
                    }
                    report_request::Message::Batch(b) => {
                        batches += 1;
                        Some(report_response::Message::Ack(Ack {
                            sequence: b.sequence,
                        }))
                    }
                    report_request::Message::Snapshot(_) => None,
                };
                script.sessions.lock()[session].push(message);
                script.changed.notify_waiters();
                if let Some(reply) = reply {
                    let _ = tx
                        .send(Ok(ReportResponse {
                            message: Some(reply),
                        }))
                        .await;
                }
                let fail_after = *script.fail_after_batches.lock();
                if fail_after.is_some_and(|n| batches >= n) {
                    let _ = tx.send(Err(Status::unavailable("scripted failure"))).await;
                    return;
                }
            }
            *script.closed.lock() += 1;
            script.changed.notify_waiters();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type RelayStream = Pin<Box<dyn Stream<Item = Result<RelayResponse, Status>> + Send>>;

    // This fake stands for a replica an agent talks to; agents never call Relay.
    async fn relay(
        &self,
        _request: Request<Streaming<RelayRequest>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        Err(Status::unimplemented(
            "the agent tests' fake scaler serves Report only",
        ))
    }
}

async fn start_server(script: Arc<Script>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IngestServer::new(FakeIngest(script)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

fn settings(addr: SocketAddr, token: TokenSource) -> ReportSettings {
    ReportSettings {
        scalers: vec![HostPort {
            host: addr.ip().to_string(),
            port: addr.port(),
        }],
        relay: None,
        node_name: "node-a".into(),
        instance_id: "instance-1".into(),
        instance_secret: InstanceSecret::random(),
        token,
        tls: None,
        resolve_interval: Duration::from_secs(60),
        flush_timeout: Duration::from_secs(5),
        log_limits: LogLimits {
            max_batches: 100,
            max_bytes: 1 << 20,
        },
        edge_limits: itw_agent::edges::EdgeLimits::default(),
    }
}

fn collected(at_ms: i64, n: u64) -> Collected {
    Collected {
        collected_at_unix_ms: at_ms,
        woken: None,
        deltas: vec![(
            SeriesKey {
                service: ServiceRef::new("default", "web"),
                port: 80,
                pod: "".into(),
                comm: "curl".into(),
            },
            n,
        )],
        edges: Vec::new(),
    }
}

/// Waits until `check` holds for the script, or fails after 10 s.
async fn until(script: &Script, what: &str, check: impl Fn(&Script) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let changed = script.changed.notified();
        if check(script) {
            return;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            panic!("timed out waiting for: {what}");
        }
    }
}

/// A compact view of a session: H, S(through, total), B(seq).
fn view(messages: &[report_request::Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| match m {
            report_request::Message::Hello(h) => {
                // The secret is the same on every hello of the instance.
                let secret_sent = h.instance_secret.len() == 32;
                format!(
                    "H({},{},v{}{})",
                    h.node_name,
                    h.instance_id,
                    h.protocol_version,
                    if secret_sent { "" } else { ",no secret" }
                )
            }
            report_request::Message::Snapshot(s) => format!(
                "S({},{})",
                s.through_sequence,
                s.totals.iter().map(|t| t.attempts).sum::<u64>()
            ),
            report_request::Message::Batch(b) => format!("B({})", b.sequence),
        })
        .collect()
}

#[tokio::test]
async fn a_fresh_replica_gets_a_full_snapshot_then_live_batches() {
    let script = Arc::new(Script::default());
    let addr = start_server(script.clone()).await;
    let metrics = Arc::new(ReportMetrics::default());
    let reporter = Reporter::new(
        settings(addr, TokenSource::Value("s3cret".into())),
        metrics.clone(),
        AgentClock::new(),
    );
    assert!(!metrics.health().any_up());
    reporter.record(collected(1_000, 2));
    reporter.record(collected(2_000, 3));
    let stop = CancellationToken::new();
    let task = reporter.spawn(stop.clone());

    until(&script, "snapshot", |s| {
        s.sessions.lock().first().is_some_and(|m| m.len() >= 2)
    })
    .await;
    reporter.record(collected(3_000, 4));
    until(&script, "live batch", |s| s.sessions.lock()[0].len() >= 3).await;
    assert_eq!(
        view(&script.sessions.lock()[0]),
        vec!["H(node-a,instance-1,v1)", "S(2,5)", "B(3)"]
    );
    assert_eq!(script.auth.lock()[0].as_deref(), Some("Bearer s3cret"));
    // #13 item 9: /readyz reads this; up once the replica has the snapshot.
    assert!(metrics.health().any_up());

    stop.cancel();
    task.await.unwrap();
    until(&script, "stream closed", |s| *s.closed.lock() == 1).await;
    assert!(!metrics.health().any_up());
}

#[tokio::test]
async fn through_a_relay_each_replica_stream_names_its_replica() {
    // The fake stands for the relay; the replicas are only resolved (two
    // loopback addresses nothing listens on), never connected to.
    let script = Arc::new(Script::default());
    let relay = start_server(script.clone()).await;
    let mut settings = settings(relay, TokenSource::Value("s3cret".into()));
    settings.scalers = HostPort::parse_list("127.0.0.2:9090,[::1]:9091", "").unwrap();
    settings.relay = Some(HostPort {
        host: relay.ip().to_string(),
        port: relay.port(),
    });
    let reporter = Reporter::new(
        settings,
        Arc::new(ReportMetrics::default()),
        AgentClock::new(),
    );
    reporter.record(collected(1_000, 2));
    let stop = CancellationToken::new();
    let task = reporter.spawn(stop.clone());

    until(&script, "a snapshot on both streams", |s| {
        let sessions = s.sessions.lock();
        sessions.len() == 2 && sessions.iter().all(|m| m.len() >= 2)
    })
    .await;
    let mut replicas = script.replica.lock().clone();
    replicas.sort();
    assert_eq!(
        replicas,
        [
            Some("127.0.0.2:9090".to_owned()),
            Some("[::1]:9091".to_owned())
        ]
    );
    for session in script.sessions.lock().iter() {
        assert_eq!(view(session), ["H(node-a,instance-1,v1)", "S(1,2)"]);
    }
    assert_eq!(
        *script.auth.lock(),
        [
            Some("Bearer s3cret".to_owned()),
            Some("Bearer s3cret".to_owned())
        ]
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_known_replica_resumes_and_gets_the_missing_batches_resent() {
    let script = Arc::new(Script::default());
    *script.applied.lock() = vec![1];
    let addr = start_server(script.clone()).await;
    let reporter = Reporter::new(
        settings(addr, TokenSource::None),
        Arc::new(ReportMetrics::default()),
        AgentClock::new(),
    );
    for i in 1..=3 {
        reporter.record(collected(i * 1_000, 1));
    }
    let stop = CancellationToken::new();
    let task = reporter.spawn(stop.clone());
    until(&script, "resends", |s| {
        s.sessions.lock().first().is_some_and(|m| m.len() >= 4)
    })
    .await;
    assert_eq!(
        view(&script.sessions.lock()[0]),
        vec!["H(node-a,instance-1,v1)", "S(1,1)", "B(2)", "B(3)"]
    );
    assert_eq!(script.auth.lock()[0], None);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn after_the_scaler_drops_the_stream_the_agent_comes_back_and_resumes() {
    let script = Arc::new(Script::default());
    // Second session: the replica says it applied batch 2.
    *script.applied.lock() = vec![0, 2];
    *script.fail_after_batches.lock() = Some(2);
    let addr = start_server(script.clone()).await;
    let reporter = Reporter::new(
        settings(addr, TokenSource::None),
        Arc::new(ReportMetrics::default()),
        AgentClock::new(),
    );
    let stop = CancellationToken::new();
    let task = reporter.spawn(stop.clone());
    until(&script, "first snapshot", |s| {
        s.sessions.lock().first().is_some_and(|m| m.len() >= 2)
    })
    .await;
    reporter.record(collected(1_000, 1));
    reporter.record(collected(2_000, 1));
    until(&script, "second session", |s| s.sessions.lock().len() >= 2).await;
    *script.fail_after_batches.lock() = None;
    reporter.record(collected(3_000, 5));
    until(&script, "batch 3 in the second session", |s| {
        s.sessions.lock()[1].len() >= 3
    })
    .await;
    let sessions = script.sessions.lock().clone();
    assert_eq!(
        view(&sessions[0]),
        vec!["H(node-a,instance-1,v1)", "S(0,0)", "B(1)", "B(2)"]
    );
    assert_eq!(
        view(&sessions[1]),
        vec!["H(node-a,instance-1,v1)", "S(2,2)", "B(3)"]
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_sends_the_last_collection_and_closes_the_stream() {
    let script = Arc::new(Script::default());
    let addr = start_server(script.clone()).await;
    let reporter = Reporter::new(
        settings(addr, TokenSource::None),
        Arc::new(ReportMetrics::default()),
        AgentClock::new(),
    );
    let stop = CancellationToken::new();
    let task = reporter.spawn(stop.clone());
    until(&script, "snapshot", |s| {
        s.sessions.lock().first().is_some_and(|m| m.len() >= 2)
    })
    .await;
    // The final collection is recorded and shutdown begins in the same
    // instant, before the stream task has seen the new batch.
    reporter.record(collected(1_000, 7));
    stop.cancel();
    task.await.unwrap();
    until(&script, "stream closed", |s| *s.closed.lock() == 1).await;
    assert_eq!(
        view(&script.sessions.lock()[0]),
        vec!["H(node-a,instance-1,v1)", "S(0,0)", "B(1)"]
    );
}

#[tokio::test]
async fn a_token_file_is_read_at_every_connect() {
    let script = Arc::new(Script::default());
    *script.fail_after_batches.lock() = Some(1);
    let addr = start_server(script.clone()).await;
    let dir = std::env::temp_dir().join(format!("itw-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, "first\n").unwrap();
    let reporter = Reporter::new(
        settings(addr, TokenSource::File(path.clone())),
        Arc::new(ReportMetrics::default()),
        AgentClock::new(),
    );
    let stop = CancellationToken::new();
    let task = reporter.spawn(stop.clone());
    until(&script, "snapshot", |s| {
        s.sessions.lock().first().is_some_and(|m| m.len() >= 2)
    })
    .await;
    // Rotate the Secret, then make the scaler drop the stream.
    std::fs::write(&path, "second\n").unwrap();
    reporter.record(collected(1_000, 1));
    until(&script, "second session", |s| s.auth.lock().len() >= 2).await;
    assert_eq!(
        script.auth.lock()[..2],
        [
            Some("Bearer first".to_owned()),
            Some("Bearer second".to_owned())
        ]
    );
    stop.cancel();
    task.await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
