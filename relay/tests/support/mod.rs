//! A fake scaler replica serving `Ingest.Relay` in-process, a relay in
//! front of it, and agents as real tonic `IngestClient::report` calls.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use itw_proto::itw::v1::{
    Batch, Hello, RelayRequest, RelayResponse, ReportRequest, ReportResponse,
    ingest_client::IngestClient,
    ingest_server::{Ingest, IngestServer},
    report_request,
};
use itw_relay::{
    Relay,
    config::{Config, Limits, TokenSource},
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    metadata::MetadataMap,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Server, ServerTlsConfig},
};

/// Every wait of a test is bounded by this, so a bug fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

/// One Relay call the fake replica received.
pub struct RelayCall {
    pub metadata: MetadataMap,
    pub requests: Streaming<RelayRequest>,
    pub responses: mpsc::Sender<Result<RelayResponse, Status>>,
}

impl RelayCall {
    pub async fn next(&mut self) -> RelayRequest {
        within("relay request", self.requests.message())
            .await
            .expect("the relay's stream failed")
            .expect("the relay ended its stream")
    }

    pub async fn send(&self, response: RelayResponse) {
        self.responses.send(Ok(response)).await.unwrap();
    }
}

struct FakeService {
    calls: mpsc::Sender<RelayCall>,
}

#[tonic::async_trait]
impl Ingest for FakeService {
    type ReportStream = ReceiverStream<Result<ReportResponse, Status>>;
    type RelayStream = ReceiverStream<Result<RelayResponse, Status>>;

    async fn report(
        &self,
        _request: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        Err(Status::unimplemented("the fake replica only relays"))
    }

    async fn relay(
        &self,
        request: Request<Streaming<RelayRequest>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let (responses, rx) = mpsc::channel(64);
        let metadata = request.metadata().clone();
        let call = RelayCall {
            metadata,
            requests: request.into_inner(),
            responses,
        };
        self.calls
            .send(call)
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A fake replica on its own runtime and thread: killing it drops the
/// runtime, which drops every connection at once, as a crashed pod does.
pub struct FakeReplica {
    pub addr: SocketAddr,
    calls: mpsc::Receiver<RelayCall>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeReplica {
    pub fn start(addr: SocketAddr) -> Self {
        Self::start_with(addr, None)
    }

    /// A replica serving `tls` (certificate, key, and the CA clients' certificates must carry).
    pub fn start_with(addr: SocketAddr, tls: Option<ServerTlsConfig>) -> Self {
        Self::spawn(addr, tls, None)
    }

    /// A replica whose HTTP/2 streams take `window` bytes unread (hyper's
    /// default is 1 MiB): one that does not read stalls the relay soon.
    pub fn start_with_window(addr: SocketAddr, window: u32) -> Self {
        Self::spawn(addr, None, Some(window))
    }

    fn spawn(addr: SocketAddr, tls: Option<ServerTlsConfig>, window: Option<u32>) -> Self {
        let (calls_tx, calls) = mpsc::channel(8);
        let (kill, killed) = oneshot::channel::<()>();
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                bound_tx.send(listener.local_addr().unwrap()).unwrap();
                let mut builder = Server::builder().initial_stream_window_size(window);
                if let Some(tls) = tls {
                    builder = builder.tls_config(tls).unwrap();
                }
                let server = builder
                    .add_service(IngestServer::new(FakeService { calls: calls_tx }))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
                tokio::select! {
                    _ = server => {}
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every connection task.
            drop(runtime);
        });
        let addr = bound.recv().unwrap();
        Self {
            addr,
            calls,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    pub async fn call(&mut self) -> RelayCall {
        within("a Relay call", self.calls.recv())
            .await
            .expect("the fake replica stopped")
    }

    /// Drops every connection without a word.
    pub fn kill(mut self) -> SocketAddr {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.addr
    }
}

impl Drop for FakeReplica {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

/// A running relay.
pub struct RelayUnderTest {
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub figures: std::sync::Arc<itw_relay::metrics::RelayMetrics>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RelayUnderTest {
    pub async fn start(replica: SocketAddr, token: Option<&str>, limits: Limits) -> Self {
        Self::start_with(replica, token, limits, |_| {}).await
    }

    /// A relay whose config `adjust` changes last (TLS, say).
    pub async fn start_with(
        replica: SocketAddr,
        token: Option<&str>,
        limits: Limits,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::new(vec![format!("{replica}").parse().unwrap()]);
        config.listen_addr = "127.0.0.1:0".parse().unwrap();
        config.metrics_addr = "127.0.0.1:0".parse().unwrap();
        config.token = match token {
            Some(token) => TokenSource::Value(token.parse().unwrap()),
            None => TokenSource::None,
        };
        config.limits = limits;
        adjust(&mut config);
        let relay = Relay::bind(config).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let grpc = relay.grpc_addr();
        let metrics = relay.metrics_addr();
        let figures = relay.metrics();
        let task = tokio::spawn(async move {
            relay
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            grpc,
            metrics,
            figures,
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("the relay stopping", &mut self.task).await.unwrap();
    }

    /// The relay's /metrics page.
    pub async fn scrape(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// An agent's Report stream through the relay.
pub struct Agent {
    pub tx: mpsc::Sender<ReportRequest>,
    pub rx: Streaming<ReportResponse>,
}

impl Agent {
    /// Opens a stream naming `replica`, presenting `token` if any.
    pub async fn connect(
        relay: SocketAddr,
        replica: &str,
        token: Option<&str>,
    ) -> Result<Self, Status> {
        let client = IngestClient::connect(format!("http://{relay}"))
            .await
            .expect("the relay's port");
        Self::open(client, replica, token).await
    }

    /// Connects over TLS, verifying the relay with `ca` (PEM).
    pub async fn connect_tls(relay: SocketAddr, replica: &str, ca: &[u8]) -> Result<Self, Status> {
        let channel = Endpoint::from_shared(format!("https://{relay}"))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .unwrap()
            .connect()
            .await
            .expect("a TLS connection to the relay");
        Self::open(IngestClient::new(channel), replica, None).await
    }

    /// Connects with each message in an HTTP/2 DATA frame of its own, as
    /// an agent sends one batch a second.
    pub async fn connect_one_frame_each(relay: SocketAddr, replica: &str) -> Result<Self, Status> {
        use tokio_stream::StreamExt as _;
        let client = IngestClient::connect(format!("http://{relay}"))
            .await
            .expect("the relay's port");
        // Pending between messages: tonic's encoder sends what it holds
        // whenever its source is pending, so each goes alone.
        Self::open_with(client, replica, None, |rx| {
            ReceiverStream::new(rx).then(|message| async {
                tokio::task::yield_now().await;
                message
            })
        })
        .await
    }

    async fn open(
        client: IngestClient<Channel>,
        replica: &str,
        token: Option<&str>,
    ) -> Result<Self, Status> {
        Self::open_with(client, replica, token, ReceiverStream::new).await
    }

    async fn open_with<S>(
        mut client: IngestClient<Channel>,
        replica: &str,
        token: Option<&str>,
        stream: impl FnOnce(mpsc::Receiver<ReportRequest>) -> S,
    ) -> Result<Self, Status>
    where
        S: tokio_stream::Stream<Item = ReportRequest> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(16);
        let mut request = Request::new(stream(rx));
        request
            .metadata_mut()
            .insert("itw-replica", replica.parse().unwrap());
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let response = within("the relay's answer", client.report(request)).await?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    pub async fn send(&self, message: ReportRequest) {
        self.tx
            .send(message)
            .await
            .expect("the agent's stream is open (did the relay close the connection?)");
    }

    /// The next answer, or the status the stream ended with (`Ok(None)`: OK).
    pub async fn next(&mut self) -> Result<Option<ReportResponse>, Status> {
        within("an answer to the agent", self.rx.message()).await
    }
}

pub fn hello(node: &str) -> ReportRequest {
    ReportRequest {
        message: Some(report_request::Message::Hello(Hello {
            node_name: node.into(),
            instance_id: format!("{node}-instance"),
            protocol_version: 1,
            instance_secret: format!("{node}-secret-0123456789"),
        })),
    }
}

pub fn batch(sequence: u64) -> ReportRequest {
    ReportRequest {
        message: Some(report_request::Message::Batch(Batch {
            sequence,
            collected_at_unix_ms: 1_700_000_000_000 + sequence as i64,
            ..Default::default()
        })),
    }
}
