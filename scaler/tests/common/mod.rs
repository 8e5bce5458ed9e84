//! Shared by the integration tests: the real server on loopback, a KEDA-role
//! client and an agent-role client, both generated from the same protos.
//! Everything here panics with a message rather than returning errors.

#![allow(dead_code)] // Each test binary uses its own part of this module.

pub mod relay;

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use itw_proto::{
    externalscaler::{
        GetMetricSpecResponse, IsActiveResponse, ScaledObjectRef,
        external_scaler_client::ExternalScalerClient,
    },
    itw::v1::{
        Batch, DestinationHistory, Hello, PROTOCOL_VERSION, ReportRequest, ReportResponse, Series,
        SeriesCount, Snapshot, Welcome, ingest_client::IngestClient, report_request,
        report_response,
    },
};
use itw_scaler::{Scaler, config::Config, store::Store};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status, Streaming,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

/// Longest wait for anything that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test with `what` if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Settings for a test server on loopback ports the kernel picks.
pub fn loopback() -> Config {
    Config {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    }
}

/// A running scaler, stopped by [`TestScaler::stop`].
pub struct TestScaler {
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub store: Arc<Store>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<Result<(), itw_scaler::Error>>,
}

impl TestScaler {
    pub async fn start(config: Config) -> Self {
        let scaler = Scaler::bind(config).await.expect("binding the test scaler");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (grpc, metrics, store) = (scaler.grpc_addr(), scaler.metrics_addr(), scaler.store());
        let task = tokio::spawn(scaler.serve(async {
            let _ = stopped.await;
        }));
        Self {
            grpc,
            metrics,
            store,
            stop: Some(stop),
            task,
        }
    }

    pub async fn keda(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        within(
            "connecting",
            Endpoint::from_shared(format!("http://{}", self.grpc))
                .unwrap()
                .connect(),
        )
        .await
        .expect("connecting to the test scaler")
    }

    /// Opens an agent stream (with a bearer token if given).
    pub async fn agent(&self, token: Option<&str>) -> Result<Agent, Status> {
        Agent::open(self.channel().await, token).await
    }

    /// Opens a relay's stream (with a bearer token if given).
    pub async fn relay(&self, token: Option<&str>) -> Result<relay::Relay, Status> {
        relay::Relay::open(self.channel().await, token).await
    }

    /// Waits until the `/metrics` sample `name` (no labels) reads `value`.
    pub async fn until_gauge(&self, name: &str, value: f64) {
        within(&format!("{name} to read {value}"), async {
            while sample(&self.metrics_body().await, name, &[]) != Some(value) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    pub async fn metrics_body(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics);
        within("GET /metrics", async {
            reqwest::get(&url).await.unwrap().text().await.unwrap()
        })
        .await
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("the scaler to stop", &mut self.task)
            .await
            .expect("serve task")
            .expect("serve result");
    }
}

/// The trigger metadata map of a ScaledObject in namespace `apps`.
pub fn object(pairs: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "so".into(),
        namespace: "apps".into(),
        scaler_metadata: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("scalerAddress".to_string(), "itw-scaler:9090".to_string())])
            .collect::<HashMap<_, _>>(),
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn series(service: &str, port: u32, pod: &str, comm: &str) -> Series {
    Series {
        namespace: "apps".into(),
        service: service.into(),
        port,
        pod: pod.into(),
        process_comm: comm.into(),
    }
}

pub fn count(series: Series, attempts: u64) -> SeriesCount {
    SeriesCount {
        series: Some(series),
        attempts,
    }
}

pub fn history(
    service: &str,
    port: u32,
    first_second: i64,
    per_second: Vec<u64>,
) -> DestinationHistory {
    DestinationHistory {
        namespace: "apps".into(),
        service: service.into(),
        port,
        first_second,
        per_second,
    }
}

/// Sends `authorization: Bearer <token>` on every call, if given one.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

pub type IngestWithToken =
    IngestClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// An Ingest client presenting `token`, if given.
pub fn ingest_client(channel: Channel, token: Option<&str>) -> IngestWithToken {
    let header = token.map(|t| MetadataValue::try_from(format!("Bearer {t}")).unwrap());
    IngestClient::with_interceptor(channel, Bearer(header))
}

/// An agent-role client of `itw.v1.Ingest/Report`.
pub struct Agent {
    tx: mpsc::Sender<ReportRequest>,
    rx: Streaming<ReportResponse>,
}

impl Agent {
    pub async fn open(channel: Channel, token: Option<&str>) -> Result<Self, Status> {
        let mut client = ingest_client(channel, token);
        let (tx, rx) = mpsc::channel(16);
        let response = within(
            "the report stream to open",
            client.report(ReceiverStream::new(rx)),
        )
        .await?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    pub async fn send(&self, message: report_request::Message) {
        within(
            "sending a report message",
            self.tx.send(ReportRequest {
                message: Some(message),
            }),
        )
        .await
        .expect("the report stream is open");
    }

    /// Sends a request as is (even one without a message).
    pub async fn tx_raw(&self, request: ReportRequest) {
        within("sending a report request", self.tx.send(request))
            .await
            .expect("the report stream is open");
    }

    /// The next response, or the stream's end status.
    pub async fn next(&mut self) -> Result<Option<report_response::Message>, Status> {
        within("a report response", self.rx.message())
            .await
            .map(|r| r.and_then(|r| r.message))
    }

    pub async fn hello(&mut self, node: &str, instance: &str) -> Welcome {
        self.hello_with_secret(node, instance, &secret_of(instance))
            .await
    }

    pub async fn hello_with_secret(&mut self, node: &str, instance: &str, secret: &str) -> Welcome {
        self.send(report_request::Message::Hello(Hello {
            node_name: node.into(),
            instance_id: instance.into(),
            protocol_version: PROTOCOL_VERSION,
            instance_secret: secret.into(),
        }))
        .await;
        match self.next().await {
            Ok(Some(report_response::Message::Welcome(w))) => w,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub async fn expect_ack(&mut self) -> u64 {
        match self.next().await {
            Ok(Some(report_response::Message::Ack(a))) => a.sequence,
            other => panic!("expected ack, got {other:?}"),
        }
    }

    /// Sends a snapshot taken now; returns the ack.
    pub async fn snapshot(
        &mut self,
        through: u64,
        totals: Vec<SeriesCount>,
        history: Vec<DestinationHistory>,
    ) -> u64 {
        self.send(report_request::Message::Snapshot(Snapshot {
            through_sequence: through,
            taken_at_unix_ms: now_ms(),
            totals,
            history,
            edges: Vec::new(),
        }))
        .await;
        self.expect_ack().await
    }

    /// Sends a batch collected now; returns the ack.
    pub async fn batch(&mut self, sequence: u64, deltas: Vec<SeriesCount>) -> u64 {
        self.batch_at(sequence, now_ms(), deltas).await
    }

    /// Sends a batch collected at `collected_at_ms` (agent clock); returns the ack.
    pub async fn batch_at(
        &mut self,
        sequence: u64,
        collected_at_ms: i64,
        deltas: Vec<SeriesCount>,
    ) -> u64 {
        self.send(report_request::Message::Batch(Batch {
            sequence,
            collected_at_unix_ms: collected_at_ms,
            wake: false,
            deltas,
            edges: Vec::new(),
        }))
        .await;
        self.expect_ack().await
    }

    /// Reads until the stream ends; returns its error status.
    pub async fn expect_error(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended with OK, expected an error"),
                Err(status) => return status,
            }
        }
    }

    /// Reads until the stream ends, which must be with status OK.
    pub async fn expect_end(&mut self) {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(status) => panic!("the stream ended with {status:?}, expected OK"),
            }
        }
    }
}

/// One of each long-lived stream a shutdown must end: KEDA's StreamIsActive
/// and StreamMetricSpec, an agent's Report and a relay's Relay.
pub struct EveryStream {
    active: Streaming<IsActiveResponse>,
    specs: Streaming<GetMetricSpecResponse>,
    agent: Agent,
    relay: relay::Relay,
}

impl EveryStream {
    /// Opens them on `channel` (service apps/web, idle) and reads each one's
    /// first message.
    pub async fn open(channel: Channel) -> Self {
        let mut keda = ExternalScalerClient::new(channel.clone());
        let mut active = keda
            .stream_is_active(object(&[("service", "web")]))
            .await
            .unwrap()
            .into_inner();
        assert!(
            !within("the current state", active.message())
                .await
                .unwrap()
                .unwrap()
                .result
        );
        let mut specs = keda
            .stream_metric_spec(object(&[("service", "web")]))
            .await
            .unwrap()
            .into_inner();
        within("the spec", specs.message()).await.unwrap().unwrap();
        let mut agent = Agent::open(channel.clone(), None).await.unwrap();
        agent.hello("node-1", "i").await;
        agent.snapshot(0, vec![], vec![]).await;
        let mut relay = relay::Relay::open(channel, None).await.unwrap();
        relay.hello(1, "node-2", "relayed").await;
        relay.snapshot(1, 0, vec![], vec![]).await;
        Self {
            active,
            specs,
            agent,
            relay,
        }
    }

    /// Every one of them ends, with status OK.
    pub async fn expect_all_end(mut self) {
        assert_eq!(
            within("StreamIsActive to end", self.active.message())
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            within("StreamMetricSpec to end", self.specs.message())
                .await
                .unwrap(),
            None
        );
        self.agent.expect_end().await;
        self.relay.expect_end().await;
    }
}

/// `(pod, process_comm, value)` of every `internal_tcp_attempts_total` sample
/// of `apps/<service>`, in exposition order.
pub fn attempts(body: &str, service: &str) -> Vec<(String, String, f64)> {
    itw_telemetry::exposition::parse_samples(body)
        .into_iter()
        .filter(|s| {
            s.name == "internal_tcp_attempts_total"
                && s.label("destination_namespace") == Some("apps")
                && s.label("destination_service") == Some(service)
        })
        .map(|s| {
            (
                s.label("destination_pod").unwrap_or("?").to_owned(),
                s.label("process_comm").unwrap_or("?").to_owned(),
                s.value,
            )
        })
        .collect()
}

/// The value of the sample `name` whose labels are exactly `labels`.
pub fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    itw_telemetry::exposition::parse_samples(body)
        .into_iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.label(k) == Some(*v))
        })
        .map(|s| s.value)
}

pub fn row(pod: &str, comm: &str, value: f64) -> (String, String, f64) {
    (pod.into(), comm.into(), value)
}

/// The secret the test agents say hello with for an instance id.
pub fn secret_of(instance: &str) -> String {
    format!("secret-of-instance-{instance}")
}
