//! Relays, as the scaler sees them, for the load examples (#18): many agents'
//! Report streams carried over a few `Ingest.Relay` streams ("lanes"), each
//! standing for one itw-relay. Each relayed stream gets the next id on its
//! lane as its hello goes out (ids must reach the replica in order), its
//! messages go out untouched, and the replica's answers come back
//! to it by id. The examples run the agents' side of the protocol over it
//! exactly as over a Report stream of their own.
//!
//! A lane that ends takes every relayed stream on it down with its status
//! (UNAVAILABLE when it broke), as a relay ends its agents' streams; the next
//! relayed stream opened on it opens a new Relay stream, numbered from 1.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use itw_proto::itw::v1::{
    RelayClosed, RelayRequest, RelayResponse, ReportRequest, ReportResponse,
    ingest_client::IngestClient, relay_request, relay_response,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// Where a relayed stream's answers go: the replica's messages, then the
/// status it ended with.
type Route = mpsc::UnboundedSender<Result<ReportResponse, Status>>;

/// The relayed streams of a lane by id; `None` once its Relay stream ended.
type Routes = Arc<Mutex<Option<HashMap<u64, Route>>>>;

/// Messages queued towards a lane's Relay stream before senders wait.
const LANE_QUEUE: usize = 1024;

pub struct RelayMux {
    addr: SocketAddr,
    lanes: Vec<tokio::sync::Mutex<Option<Lane>>>,
}

/// One Relay stream in use.
struct Lane {
    tx: mpsc::Sender<RelayRequest>,
    routes: Routes,
    /// The last id given out on this Relay stream. Held while a relayed
    /// stream's first message is queued: ids must reach the replica in the
    /// order they are given out, or it ignores the late ones.
    last: Arc<tokio::sync::Mutex<u64>>,
}

/// The answers of one relayed stream.
pub struct Relayed {
    rx: mpsc::UnboundedReceiver<Result<ReportResponse, Status>>,
}

impl Relayed {
    /// As `tonic::Streaming::message`: the next answer, `Ok(None)` when the
    /// replica closed the stream without a status, `Err` with the status it
    /// ended with.
    pub async fn message(&mut self) -> Result<Option<ReportResponse>, Status> {
        self.rx.recv().await.transpose()
    }
}

impl RelayMux {
    /// `lanes` Relay streams to the scaler at `addr`, opened when first used.
    pub fn new(addr: SocketAddr, lanes: usize) -> Self {
        Self {
            addr,
            lanes: (0..lanes.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        }
    }

    /// Opens a relayed stream on lane `index % lanes`. Messages sent on the
    /// returned sender travel as that stream's; dropping it closes the
    /// stream (`closed`).
    pub async fn open(
        &self,
        index: usize,
    ) -> anyhow::Result<(mpsc::Sender<ReportRequest>, Relayed)> {
        let mut slot = self.lanes[index % self.lanes.len()].lock().await;
        let lane = match slot.as_mut() {
            Some(lane) if lane.routes.lock().is_some() => lane,
            _ => slot.insert(Lane::open(self.addr).await?),
        };
        let (route, rx) = mpsc::unbounded_channel();
        let (tx, mut agent) = mpsc::channel::<ReportRequest>(64);
        let (upstream, routes, last) = (
            lane.tx.clone(),
            Arc::clone(&lane.routes),
            Arc::clone(&lane.last),
        );
        // Numbers the stream when its first message (the hello) goes out,
        // forwards until the agent drops its sender, then says so.
        tokio::spawn(async move {
            let Some(first) = agent.recv().await else {
                return;
            };
            let id = {
                let mut last = last.lock().await;
                *last += 1;
                let id = *last;
                match routes.lock().as_mut() {
                    Some(routes) => {
                        routes.insert(id, route);
                    }
                    None => {
                        let _ = route.send(Err(Status::unavailable("the Relay stream ended")));
                        return;
                    }
                }
                if upstream.send(report(id, first)).await.is_err() {
                    return;
                }
                id
            };
            while let Some(message) = agent.recv().await {
                if upstream.send(report(id, message)).await.is_err() {
                    return;
                }
            }
            let _ = upstream
                .send(RelayRequest {
                    stream: id,
                    message: Some(relay_request::Message::Closed(RelayClosed {})),
                })
                .await;
        });
        Ok((tx, Relayed { rx }))
    }
}

impl Lane {
    async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let channel = super::connect(addr).await?;
        let mut client = IngestClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        let mut inbound = client.relay(ReceiverStream::new(rx)).await?.into_inner();
        let routes: Routes = Arc::new(Mutex::new(Some(HashMap::new())));
        let demux = Arc::clone(&routes);
        tokio::spawn(async move {
            let end = loop {
                match inbound.message().await {
                    Ok(Some(RelayResponse { stream, message })) => match message {
                        Some(relay_response::Message::Report(report)) => {
                            if let Some(route) = demux.lock().as_ref().and_then(|r| r.get(&stream))
                            {
                                let _ = route.send(Ok(report));
                            }
                        }
                        Some(relay_response::Message::Ended(ended)) => {
                            let route = demux.lock().as_mut().and_then(|r| r.remove(&stream));
                            // OK (the replica stopping) closes it as a Report
                            // stream's end of stream would.
                            if let Some(route) = route
                                && ended.code != 0
                            {
                                let status = Status::new(Code::from(ended.code), ended.message);
                                let _ = route.send(Err(status));
                            }
                        }
                        None => {
                            break Status::internal(format!(
                                "relay response for stream {stream} without a message"
                            ));
                        }
                    },
                    Ok(None) => break Status::unavailable("the replica ended the Relay stream"),
                    Err(status) => break status,
                }
            };
            for (_, route) in demux.lock().take().into_iter().flatten() {
                let _ = route.send(Err(end.clone()));
            }
        });
        Ok(Self {
            tx,
            routes,
            last: Arc::default(),
        })
    }
}

fn report(stream: u64, report: ReportRequest) -> RelayRequest {
    RelayRequest {
        stream,
        message: Some(relay_request::Message::Report(report)),
    }
}
