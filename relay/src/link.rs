//! One Relay stream to one replica: the numbering of the agent streams it
//! carries, the routing of the replica's answers to them by number, and the
//! end of all of them when the Relay stream ends.
//!
//! The link never waits on an agent: an answer goes into the agent's own
//! bounded buffer or, when that is full, the agent's stream ends
//! (RESOURCE_EXHAUSTED) and the replica is told `closed`, so one agent that
//! does not read cannot stall the others. It holds no task of its own; the
//! replica's task ([`crate::upstream`]) feeds it what the replica sends.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::Stream;
use itw_proto::itw::v1::{
    RelayClosed, RelayRequest, RelayResponse, ReportRequest, ReportResponse, relay_request,
    relay_response,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use crate::metrics::{EndReason, RelayMetrics};

/// One Relay stream's relayed streams.
pub struct Link {
    replica: SocketAddr,
    data: mpsc::Sender<RelayRequest>,
    closes: mpsc::UnboundedSender<u64>,
    routes: Mutex<Routes>,
    response_buffer: usize,
    metrics: Arc<RelayMetrics>,
}

struct Routes {
    /// The number the next relayed stream gets; 1 on a new Relay stream.
    next: u64,
    live: HashMap<u64, Route>,
    /// Set once the Relay stream is over: nothing opens on it any more.
    ended: bool,
}

/// The link's side of one relayed stream.
struct Route {
    responses: mpsc::Sender<ReportResponse>,
    end: oneshot::Sender<Status>,
}

/// The agent's side of one relayed stream: the replica's answers, then how
/// the stream ended (set by the link only; the agent's own end is its own).
pub struct RouteEnd {
    pub id: u64,
    pub responses: mpsc::Receiver<ReportResponse>,
    pub end: oneshot::Receiver<Status>,
}

impl Link {
    /// A link and the request stream of its Relay call. `buffer` agent
    /// messages may wait in it; each agent holds `response_buffer` answers.
    pub fn new(
        replica: SocketAddr,
        buffer: usize,
        response_buffer: usize,
        metrics: Arc<RelayMetrics>,
    ) -> (Arc<Self>, Outbound) {
        let (data, data_rx) = mpsc::channel(buffer);
        // Unbounded, yet at most one entry per relayed stream (a stream is
        // closed once): MAX_AGENT_STREAMS bounds it. A close must never wait,
        // since it is sent from a drop.
        let (closes, closes_rx) = mpsc::unbounded_channel();
        let link = Arc::new(Self {
            replica,
            data,
            closes,
            routes: Mutex::new(Routes {
                next: 1,
                live: HashMap::new(),
                ended: false,
            }),
            response_buffer,
            metrics,
        });
        let outbound = Outbound {
            data: data_rx,
            closes: closes_rx,
            held: VecDeque::new(),
        };
        (link, outbound)
    }

    pub fn replica(&self) -> SocketAddr {
        self.replica
    }

    /// A sender of agent messages into the Relay stream.
    pub fn sender(&self) -> mpsc::Sender<RelayRequest> {
        self.data.clone()
    }

    /// Opens a relayed stream with its first message: numbers it and hands
    /// the message to `send` under one lock, so numbers reach the replica in
    /// the order streams open (the replica ignores a first message numbered
    /// below one it has seen). `send` must not wait (a reserved slot).
    /// `None`: the Relay stream is over, or `send` failed.
    pub fn open(
        &self,
        first: ReportRequest,
        send: impl FnOnce(RelayRequest) -> bool,
    ) -> Option<RouteEnd> {
        let mut routes = self.routes.lock();
        if routes.ended {
            return None;
        }
        let id = routes.next;
        if !send(report(id, first)) {
            return None;
        }
        routes.next += 1;
        let (responses, responses_rx) = mpsc::channel(self.response_buffer);
        let (end, end_rx) = oneshot::channel();
        routes.live.insert(id, Route { responses, end });
        Some(RouteEnd {
            id,
            responses: responses_rx,
            end: end_rx,
        })
    }

    /// The agent's stream `id` is over: `closed` goes to the replica if the
    /// stream was still live. True when it was.
    pub fn close(&self, id: u64) -> bool {
        let removed = self.routes.lock().live.remove(&id).is_some();
        if removed {
            // Fails only when the Relay stream is gone, which ended the stream anyway.
            let _ = self.closes.send(id);
        }
        removed
    }

    /// Routes one message of the replica to its agent.
    pub fn deliver(&self, response: RelayResponse) {
        let id = response.stream;
        let mut routes = self.routes.lock();
        match response.message {
            Some(relay_response::Message::Report(report)) => {
                let Some(route) = routes.live.get(&id) else {
                    self.metrics.unrouted.inc();
                    return;
                };
                match route.responses.try_send(report) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if let Some(route) = routes.live.remove(&id) {
                            let _ = route.end.send(Status::resource_exhausted(format!(
                                "the agent left {} replica messages unread (AGENT_RESPONSE_BUFFER on the relay); reconnect",
                                self.response_buffer
                            )));
                            let _ = self.closes.send(id);
                            self.metrics.ended(EndReason::ResponseBufferFull);
                        }
                    }
                    // The agent's stream is being dropped; its drop closes it.
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.metrics.unrouted.inc();
                    }
                }
            }
            Some(relay_response::Message::Ended(ended)) => match routes.live.remove(&id) {
                Some(route) => {
                    let _ = route
                        .end
                        .send(Status::new(Code::from(ended.code), ended.message));
                    self.metrics.ended(EndReason::ReplicaEnded);
                }
                None => {
                    self.metrics.unrouted.inc();
                }
            },
            None => {
                self.metrics.unrouted.inc();
            }
        }
    }

    /// The Relay stream is over: every relayed stream ends with `status`,
    /// counted under `reason`, and nothing opens on this link any more.
    pub fn end_all(&self, status: &Status, reason: EndReason) {
        let live = {
            let mut routes = self.routes.lock();
            routes.ended = true;
            std::mem::take(&mut routes.live)
        };
        for (_, route) in live {
            let _ = route.end.send(status.clone());
            self.metrics.ended(reason);
        }
    }

    /// Relayed streams live now.
    pub fn live(&self) -> usize {
        self.routes.lock().live.len()
    }
}

/// An agent message as the replica gets it.
pub fn report(stream: u64, message: ReportRequest) -> RelayRequest {
    RelayRequest {
        stream,
        message: Some(relay_request::Message::Report(message)),
    }
}

/// The request stream of a Relay call: the agents' messages in the order
/// they were queued, and each `closed` after every message its stream
/// queued before it.
pub struct Outbound {
    data: mpsc::Receiver<RelayRequest>,
    closes: mpsc::UnboundedReceiver<u64>,
    /// Closes taken while messages may still have been queued before them.
    held: VecDeque<u64>,
}

impl Stream for Outbound {
    type Item = RelayRequest;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RelayRequest>> {
        let this = self.get_mut();
        loop {
            // Data first: whatever a stream queued before its close was in
            // the channel before the close was sent, so draining the data
            // before yielding a close keeps each stream's order.
            let data = this.data.poll_recv(cx);
            if let Poll::Ready(Some(request)) = data {
                return Poll::Ready(Some(request));
            }
            if let Some(id) = this.held.pop_front() {
                return Poll::Ready(Some(closed(id)));
            }
            match this.closes.poll_recv(cx) {
                Poll::Ready(Some(id)) => {
                    this.held.push_back(id);
                    continue;
                }
                // The link is gone (it holds the close sender): so is the call.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            return match data {
                Poll::Ready(None) => Poll::Ready(None),
                _ => Poll::Pending,
            };
        }
    }
}

fn closed(stream: u64) -> RelayRequest {
    RelayRequest {
        stream,
        message: Some(relay_request::Message::Closed(RelayClosed {})),
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use itw_proto::itw::v1::{Ack, Hello, RelayEnded, Welcome, report_request, report_response};

    use super::*;

    fn hello(node: &str) -> ReportRequest {
        ReportRequest {
            message: Some(report_request::Message::Hello(Hello {
                node_name: node.into(),
                ..Default::default()
            })),
        }
    }

    fn ack(stream: u64, sequence: u64) -> RelayResponse {
        RelayResponse {
            stream,
            message: Some(relay_response::Message::Report(ReportResponse {
                message: Some(report_response::Message::Ack(Ack { sequence })),
            })),
        }
    }

    fn link(buffer: usize, response_buffer: usize) -> (Arc<Link>, Outbound, Arc<RelayMetrics>) {
        let metrics = Arc::new(RelayMetrics::default());
        let (link, outbound) = Link::new(
            "127.0.0.1:9090".parse().unwrap(),
            buffer,
            response_buffer,
            Arc::clone(&metrics),
        );
        (link, outbound, metrics)
    }

    fn open(link: &Link, node: &str) -> RouteEnd {
        let tx = link.sender();
        link.open(hello(node), |r| tx.try_send(r).is_ok()).unwrap()
    }

    #[tokio::test]
    async fn streams_are_numbered_from_one_in_the_order_they_open() {
        let (link, mut outbound, _) = link(8, 4);
        let a = open(&link, "a");
        let b = open(&link, "b");
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(outbound.next().await, Some(report(1, hello("a"))));
        assert_eq!(outbound.next().await, Some(report(2, hello("b"))));
        // A failed send numbers nothing: the next stream still gets 3.
        assert!(link.open(hello("c"), |_| false).is_none());
        assert_eq!(open(&link, "d").id, 3);
    }

    #[tokio::test]
    async fn answers_go_to_their_own_agent_and_ended_ends_only_it() {
        let (link, _outbound, metrics) = link(8, 4);
        let mut a = open(&link, "a");
        let mut b = open(&link, "b");
        let welcome = ReportResponse {
            message: Some(report_response::Message::Welcome(Welcome {
                applied_sequence: 7,
                history_seconds: 60,
            })),
        };
        link.deliver(RelayResponse {
            stream: 2,
            message: Some(relay_response::Message::Report(welcome)),
        });
        assert_eq!(b.responses.recv().await, Some(welcome));
        assert!(a.responses.try_recv().is_err());
        link.deliver(RelayResponse {
            stream: 1,
            message: Some(relay_response::Message::Ended(RelayEnded {
                code: 3,
                message: "hello.node_name: empty".into(),
            })),
        });
        let status = (&mut a.end).await.unwrap();
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, "hello.node_name: empty")
        );
        assert!(b.end.try_recv().is_err(), "b goes on");
        assert_eq!(link.live(), 1);
        assert_eq!(metrics.ended_count(EndReason::ReplicaEnded), 1);
        // Answers for an ended or unknown stream are dropped and counted.
        link.deliver(ack(1, 1));
        link.deliver(ack(9, 1));
        assert_eq!(metrics.unrouted.get(), 2);
    }

    #[tokio::test]
    async fn an_agent_that_does_not_read_is_ended_and_closed_without_stalling() {
        let (link, mut outbound, metrics) = link(8, 2);
        let mut slow = open(&link, "slow");
        let mut quick = open(&link, "quick");
        outbound.next().await;
        outbound.next().await;
        link.deliver(ack(1, 1));
        link.deliver(ack(1, 2));
        link.deliver(ack(2, 1));
        // The third unread answer ends the slow agent's stream.
        link.deliver(ack(1, 3));
        let status = (&mut slow.end).await.unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the agent left 2 replica messages unread (AGENT_RESPONSE_BUFFER on the relay); reconnect"
        );
        assert_eq!(outbound.next().await, Some(closed(1)));
        assert_eq!(metrics.ended_count(EndReason::ResponseBufferFull), 1);
        assert!(quick.responses.try_recv().is_ok());
        assert!(quick.end.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_close_follows_every_message_its_stream_queued_before_it() {
        let (link, mut outbound, _) = link(8, 2);
        let a = open(&link, "a");
        let tx = link.sender();
        tx.try_send(report(a.id, hello("again"))).unwrap();
        assert!(link.close(a.id));
        assert!(!link.close(a.id), "closed once");
        assert_eq!(outbound.next().await, Some(report(1, hello("a"))));
        assert_eq!(outbound.next().await, Some(report(1, hello("again"))));
        assert_eq!(outbound.next().await, Some(closed(1)));
    }

    #[tokio::test]
    async fn the_end_of_the_relay_stream_ends_every_agent_and_opens_nothing() {
        let (link, _outbound, metrics) = link(8, 2);
        let mut a = open(&link, "a");
        let mut b = open(&link, "b");
        link.end_all(
            &Status::unavailable("the Relay stream broke"),
            EndReason::RelayStreamEnded,
        );
        for end in [&mut a.end, &mut b.end] {
            let status = end.await.unwrap();
            assert_eq!(
                (status.code(), status.message()),
                (Code::Unavailable, "the Relay stream broke")
            );
        }
        assert_eq!(metrics.ended_count(EndReason::RelayStreamEnded), 2);
        let tx = link.sender();
        assert!(link.open(hello("c"), |r| tx.try_send(r).is_ok()).is_none());
    }
}
