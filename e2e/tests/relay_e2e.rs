//! Relays end to end, with the real `itw-scaler` and `itw-relay`: two agents
//! (tonic clients speaking the Report protocol as the agent does: hello,
//! snapshot of their cumulative totals and per-second history, then
//! batches) stream through one relay; the scaler's `/metrics` and KEDA's
//! `GetMetrics` count every attempt exactly, and still do after the relay is
//! restarted (SIGTERM, then SIGKILL) while the agents keep counting: they
//! reconnect and resume with a snapshot, as after a replica restart.
//!
//! The agents are clients rather than `itw-agent` so the test needs no eBPF
//! (and no root): what it proves is the relay's, and the scaler's exactness
//! is proven with the real agent in e2e.rs.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use itw_e2e::system::*;
use itw_proto::itw::v1::{
    Batch, DestinationHistory, Hello, PROTOCOL_VERSION, ReportRequest, ReportResponse, Series,
    SeriesCount, Snapshot, ingest_client::IngestClient, report_request, report_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Streaming};

const NS: &str = "relay-e2e";
const SERVICE: &str = "relayed";
/// Long enough that every attempt of the test stays in it: GetMetrics is
/// then exactly the total / 600.
const WINDOW_SECS: f64 = 600.0;

fn series() -> Series {
    Series {
        namespace: NS.into(),
        service: SERVICE.into(),
        port: 8080,
        pod: String::new(),
        process_comm: "curl".into(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An agent instance's book: what it counted, by batch and by second.
struct TestAgent {
    node: String,
    instance: String,
    secret: String,
    /// Newest batch sequence recorded (sent or not).
    newest: u64,
    total: u64,
    per_second: BTreeMap<i64, u64>,
    /// Batches recorded but not yet sent (while no stream was up).
    unsent: Vec<Batch>,
    stream: Option<AgentStream>,
}

struct AgentStream {
    tx: mpsc::Sender<ReportRequest>,
    rx: Streaming<ReportResponse>,
}

impl TestAgent {
    fn new(node: &str) -> Self {
        Self {
            node: node.into(),
            instance: format!("{node}-instance-1"),
            secret: format!("{node}-secret-0123456789abcdef"),
            newest: 0,
            total: 0,
            per_second: BTreeMap::new(),
            unsent: Vec::new(),
            stream: None,
        }
    }

    /// Opens a stream through `relay` to `replica`: hello, welcome, a
    /// snapshot of everything recorded (the unsent batches included).
    async fn connect(&mut self, relay: SocketAddr, replica: SocketAddr) {
        let mut client = IngestClient::connect(format!("http://{relay}"))
            .await
            .expect("the relay's port");
        let (tx, rx) = mpsc::channel(64);
        let mut request = Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("itw-replica", replica.to_string().parse().unwrap());
        tx.send(message(report_request::Message::Hello(Hello {
            node_name: self.node.clone(),
            instance_id: self.instance.clone(),
            protocol_version: PROTOCOL_VERSION,
            instance_secret: self.secret.clone(),
        })))
        .await
        .unwrap();
        let mut rx = client.report(request).await.expect("relayed").into_inner();
        let welcome = match rx.message().await.expect("welcome") {
            Some(ReportResponse {
                message: Some(report_response::Message::Welcome(w)),
            }) => w,
            other => panic!("{}: expected a welcome, got {other:?}", self.node),
        };
        assert!(welcome.applied_sequence <= self.newest);
        // Cumulative through the newest batch: the unsent ones are in it.
        let first_second = self.per_second.keys().next().copied().unwrap_or(0);
        let last_second = self.per_second.keys().last().copied().unwrap_or(0);
        let history = (!self.per_second.is_empty()).then(|| DestinationHistory {
            namespace: NS.into(),
            service: SERVICE.into(),
            port: 8080,
            first_second,
            per_second: (first_second..=last_second)
                .map(|s| self.per_second.get(&s).copied().unwrap_or(0))
                .collect(),
        });
        tx.send(message(report_request::Message::Snapshot(Snapshot {
            through_sequence: self.newest,
            taken_at_unix_ms: now_ms(),
            totals: (self.total > 0)
                .then(|| SeriesCount {
                    series: Some(series()),
                    attempts: self.total,
                })
                .into_iter()
                .collect(),
            history: history.into_iter().collect(),
            edges: Vec::new(),
        })))
        .await
        .unwrap();
        self.unsent.clear();
        self.stream = Some(AgentStream { tx, rx });
    }

    /// Records `attempts` as the next batch and, with a stream up, sends it
    /// and waits for its ack.
    async fn count(&mut self, attempts: u64) {
        let at = now_ms();
        self.newest += 1;
        self.total += attempts;
        *self.per_second.entry(at.div_euclid(1000)).or_default() += attempts;
        let batch = Batch {
            sequence: self.newest,
            collected_at_unix_ms: at,
            wake: false,
            deltas: vec![SeriesCount {
                series: Some(series()),
                attempts,
            }],
            edges: Vec::new(),
        };
        let Some(stream) = self.stream.as_mut() else {
            self.unsent.push(batch);
            return;
        };
        stream
            .tx
            .send(message(report_request::Message::Batch(batch)))
            .await
            .unwrap();
        // Acks of what the snapshot covered may come first: wait for this one.
        loop {
            let ack = tokio::time::timeout(Duration::from_secs(10), stream.rx.message())
                .await
                .expect("an ack within 10 s");
            match ack {
                Ok(Some(ReportResponse {
                    message: Some(report_response::Message::Ack(ack)),
                })) if ack.sequence < self.newest => continue,
                Ok(Some(ReportResponse {
                    message: Some(report_response::Message::Ack(ack)),
                })) => {
                    assert_eq!(ack.sequence, self.newest, "{}", self.node);
                    return;
                }
                other => panic!("{}: expected ack {}, got {other:?}", self.node, self.newest),
            }
        }
    }

    /// Waits for the relay to end the stream; returns whether it ended OK.
    async fn ended(&mut self) -> bool {
        let mut stream = self.stream.take().expect("a stream");
        let end = tokio::time::timeout(Duration::from_secs(10), stream.rx.message())
            .await
            .expect("the stream's end within 10 s");
        match end {
            Ok(None) => true,
            Ok(Some(other)) => panic!("{}: expected the end, got {other:?}", self.node),
            Err(_) => false,
        }
    }
}

fn message(m: report_request::Message) -> ReportRequest {
    ReportRequest { message: Some(m) }
}

/// The scaler's total and rate for the service, once both reach `want`.
async fn counted(scaler: &Scaler, want: u64) {
    let object = scaled_object(NS, SERVICE, &[("window", "600s")]);
    let mut keda = scaler.keda().await;
    eventually(
        &format!("{want} attempts on the scaler"),
        Duration::from_secs(20),
        || async { (scaler.attempts(NS, SERVICE).await == want as f64).then_some(()) },
    )
    .await;
    assert_eq!(scaler.attempts(NS, SERVICE).await, want as f64);
    assert_eq!(
        get_metrics(&mut keda, &object).await,
        want as f64 / WINDOW_SECS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_through_a_relay_count_exactly_across_relay_restarts() {
    let scaler = Scaler::start("scaler").await;
    // A trigger asks for the window first, so the welcome wants its history.
    let object = scaled_object(NS, SERVICE, &[("window", "600s")]);
    assert_eq!(get_metrics(&mut scaler.keda().await, &object).await, 0.0);
    let (grpc, metrics) = (loopback(free_port()), loopback(free_port()));
    let mut relay = Relay::start_on("relay", grpc, metrics, &[scaler.grpc], &[]).await;

    let mut a = TestAgent::new("node-a");
    let mut b = TestAgent::new("node-b");
    a.connect(relay.grpc, scaler.grpc).await;
    b.connect(relay.grpc, scaler.grpc).await;
    for i in 1..=5 {
        a.count(i).await;
        b.count(10 * i).await;
    }
    let mut want = a.total + b.total;
    assert_eq!(want, 165);
    counted(&scaler, want).await;
    let samples = scrape(relay.metrics).await;
    assert_eq!(exact(&samples, "itw_relay_agent_streams", &[]), Some(2.0));
    let scaler_samples = scrape(scaler.metrics).await;
    assert_eq!(
        exact(&scaler_samples, "itw_scaler_agents_connected", &[]),
        Some(2.0)
    );

    for kill in [false, true] {
        if kill {
            relay.proc.kill().await;
            // A killed relay says nothing: the agents see their streams break.
            assert!(!a.ended().await && !b.ended().await);
        } else {
            let status = relay.proc.terminate().await;
            assert!(status.success(), "relay exit {status}");
            // SIGTERM ends every agent stream with OK.
            assert!(a.ended().await && b.ended().await);
        }
        // The agents keep counting while no relay is up.
        a.count(100).await;
        b.count(1000).await;
        relay = Relay::start_on("relay-again", grpc, metrics, &[scaler.grpc], &[]).await;
        // They come back with a snapshot of everything, then go on.
        a.connect(relay.grpc, scaler.grpc).await;
        b.connect(relay.grpc, scaler.grpc).await;
        a.count(7).await;
        b.count(70).await;
        want += 100 + 1000 + 7 + 70;
        assert_eq!(a.total + b.total, want);
        counted(&scaler, want).await;
    }
    assert_eq!(want, 165 + 2 * 1177);
}

/// The real agent with RELAY_ADDR: its connects reach the scaler through the
/// relay, exactly, and on both replicas (one Relay stream each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_agent_counts_exactly_through_a_relay() {
    if !bpf_available("the_real_agent_counts_exactly_through_a_relay") {
        return;
    }
    let target = addr("127.101.18.1:8080");
    let a = Scaler::start("scaler-a").await;
    let b = Scaler::start("scaler-b").await;
    let relay = Relay::start_on(
        "relay",
        loopback(free_port()),
        loopback(free_port()),
        &[a.grpc, b.grpc],
        &[],
    )
    .await;
    let agent = Agent::start(
        "agent",
        &static_map(NS, "real", "127.101.18.1", 8080),
        &[a.grpc, b.grpc],
        &[("RELAY_ADDR", relay.grpc.to_string())],
    )
    .await;
    for _ in 0..300 {
        connect_refused(target);
    }
    eventually(
        "300 attempts on both replicas",
        Duration::from_secs(20),
        || async {
            let (x, y) = (a.attempts(NS, "real").await, b.attempts(NS, "real").await);
            (x == 300.0 && y == 300.0).then_some(())
        },
    )
    .await;
    assert_eq!(agent.attempts(NS, "real").await, 300.0);
    let samples = scrape(relay.metrics).await;
    assert_eq!(exact(&samples, "itw_relay_agent_streams", &[]), Some(2.0));
    for replica in [a.grpc, b.grpc] {
        assert_eq!(
            exact(
                &samples,
                "itw_relay_relay_streams_up",
                &[("replica", &replica.to_string())]
            ),
            Some(1.0)
        );
    }
}
