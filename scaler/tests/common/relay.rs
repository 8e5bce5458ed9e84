//! A relay-role client of `itw.v1.Ingest/Relay`: many agents' messages on
//! one stream, each relayed stream by the number the test gives it.

use itw_proto::itw::v1::{
    Batch, DestinationHistory, Hello, PROTOCOL_VERSION, RelayClosed, RelayEnded, RelayRequest,
    RelayResponse, ReportRequest, SeriesCount, Snapshot, Welcome, relay_request, relay_response,
    report_request, report_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};

use super::{ingest_client, now_ms, secret_of, within};

pub struct Relay {
    tx: mpsc::Sender<RelayRequest>,
    rx: Streaming<RelayResponse>,
}

impl Relay {
    /// Opens a Relay stream (with a bearer token if given).
    pub async fn open(channel: Channel, token: Option<&str>) -> Result<Self, Status> {
        let mut client = ingest_client(channel, token);
        let (tx, rx) = mpsc::channel(16);
        let response = within(
            "the relay stream to open",
            client.relay(ReceiverStream::new(rx)),
        )
        .await?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    /// Opens a Relay stream that sends each envelope in an HTTP/2 DATA frame
    /// of its own, as a relay forwarding agent messages one by one does.
    pub async fn open_one_frame_each(channel: Channel) -> Result<Self, Status> {
        use tokio_stream::StreamExt as _;
        let mut client = ingest_client(channel, None);
        let (tx, rx) = mpsc::channel(16);
        // Pending between envelopes: tonic's encoder sends what it holds
        // whenever its source is pending, so each goes alone.
        let one_each = ReceiverStream::new(rx).then(|request| async {
            tokio::task::yield_now().await;
            request
        });
        let response = within("the relay stream to open", client.relay(one_each)).await?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    /// Sends an envelope as is (even a broken one).
    pub async fn raw(&self, request: RelayRequest) {
        within("sending a relay request", self.tx.send(request))
            .await
            .expect("the relay stream is open");
    }

    /// Relays an agent's message on `stream`.
    pub async fn send(&self, stream: u64, message: report_request::Message) {
        self.raw(RelayRequest {
            stream,
            message: Some(relay_request::Message::Report(ReportRequest {
                message: Some(message),
            })),
        })
        .await;
    }

    /// Says the agent of `stream` left.
    pub async fn close(&self, stream: u64) {
        self.raw(RelayRequest {
            stream,
            message: Some(relay_request::Message::Closed(RelayClosed {})),
        })
        .await;
    }

    /// The next envelope, or the Relay stream's end status.
    pub async fn next(&mut self) -> Result<Option<RelayResponse>, Status> {
        within("a relay response", self.rx.message()).await
    }

    /// The next envelope, which must be for `stream` and carry an answer.
    pub async fn answer(&mut self, stream: u64) -> report_response::Message {
        match self.next().await {
            Ok(Some(RelayResponse {
                stream: got,
                message:
                    Some(relay_response::Message::Report(itw_proto::itw::v1::ReportResponse {
                        message: Some(message),
                    })),
            })) if got == stream => message,
            other => panic!("expected an answer on stream {stream}, got {other:?}"),
        }
    }

    /// The next envelope, which must end `stream`: its code and message.
    pub async fn expect_ended(&mut self, stream: u64) -> (tonic::Code, String) {
        match self.next().await {
            Ok(Some(RelayResponse {
                stream: got,
                message: Some(relay_response::Message::Ended(RelayEnded { code, message })),
            })) if got == stream => (tonic::Code::from_i32(code), message),
            other => panic!("expected stream {stream} to end, got {other:?}"),
        }
    }

    pub async fn hello(&mut self, stream: u64, node: &str, instance: &str) -> Welcome {
        self.send(stream, hello(node, instance)).await;
        match self.answer(stream).await {
            report_response::Message::Welcome(w) => w,
            other => panic!("expected welcome on stream {stream}, got {other:?}"),
        }
    }

    pub async fn expect_ack(&mut self, stream: u64) -> u64 {
        match self.answer(stream).await {
            report_response::Message::Ack(a) => a.sequence,
            other => panic!("expected an ack on stream {stream}, got {other:?}"),
        }
    }

    /// Relays a snapshot taken now; returns the ack.
    pub async fn snapshot(
        &mut self,
        stream: u64,
        through: u64,
        totals: Vec<SeriesCount>,
        history: Vec<DestinationHistory>,
    ) -> u64 {
        self.send(
            stream,
            report_request::Message::Snapshot(Snapshot {
                through_sequence: through,
                taken_at_unix_ms: now_ms(),
                totals,
                history,
                edges: Vec::new(),
            }),
        )
        .await;
        self.expect_ack(stream).await
    }

    /// Relays a batch collected now; returns the ack.
    pub async fn batch(&mut self, stream: u64, sequence: u64, deltas: Vec<SeriesCount>) -> u64 {
        self.send(stream, batch(sequence, false, deltas)).await;
        self.expect_ack(stream).await
    }

    /// Reads until the Relay stream ends; returns its error status.
    pub async fn expect_error(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the relay stream ended with OK, expected an error"),
                Err(status) => return status,
            }
        }
    }

    /// Reads until the Relay stream ends, which must be with status OK.
    pub async fn expect_end(&mut self) {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(status) => panic!("the relay stream ended with {status:?}, expected OK"),
            }
        }
    }
}

pub fn hello(node: &str, instance: &str) -> report_request::Message {
    report_request::Message::Hello(Hello {
        node_name: node.into(),
        instance_id: instance.into(),
        protocol_version: PROTOCOL_VERSION,
        instance_secret: secret_of(instance),
    })
}

pub fn batch(sequence: u64, wake: bool, deltas: Vec<SeriesCount>) -> report_request::Message {
    report_request::Message::Batch(Batch {
        sequence,
        collected_at_unix_ms: now_ms(),
        wake,
        deltas,
        edges: Vec::new(),
    })
}
