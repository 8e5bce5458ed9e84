//! One agent's Report stream through the relay, as the response stream
//! tonic serves: each poll first carries what the agent sent into the Relay
//! stream (as far as there is room), then hands the agent what the replica
//! answered. So forwarding needs no task of its own: tonic polls this
//! stream for as long as the agent's call lives.
//!
//! It must never end the Relay stream or hold up other agents: its own
//! failures end only its own stream, and a replica answer it cannot take is
//! the link's to handle ([`crate::link`]).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::Stream;
use itw_proto::itw::v1::{RelayRequest, ReportRequest, ReportResponse};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::PollSender;
use tonic::{Code, Status, Streaming};

use crate::{
    link::{self, Link, RouteEnd},
    metrics::{EndReason, RelayMetrics},
};

/// The response stream of one agent's Report call.
pub struct AgentStream {
    link: Arc<Link>,
    upstream: PollSender<RelayRequest>,
    /// `None` once the agent finished sending (or failed).
    inbound: Option<Streaming<ReportRequest>>,
    /// Read from the agent, waiting for room in the Relay stream.
    held: Option<ReportRequest>,
    /// Set by the agent's first message.
    route: Option<RouteEnd>,
    /// How the stream ends once the answers queued before it are handed over.
    ending: Option<Status>,
    finished: bool,
    /// Whether the current wait for room was counted already.
    waiting: bool,
    max_report_bytes: usize,
    metrics: Arc<RelayMetrics>,
    _permit: OwnedSemaphorePermit,
}

impl AgentStream {
    /// `permit` is the agent's slot of MAX_AGENT_STREAMS, held for the stream's life.
    pub fn new(
        link: Arc<Link>,
        inbound: Streaming<ReportRequest>,
        max_report_bytes: usize,
        metrics: Arc<RelayMetrics>,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        metrics.agent_streams.inc();
        Self {
            upstream: PollSender::new(link.sender()),
            link,
            inbound: Some(inbound),
            held: None,
            route: None,
            ending: None,
            finished: false,
            waiting: false,
            max_report_bytes,
            metrics,
            _permit: permit,
        }
    }

    /// Carries the agent's messages into the Relay stream until the agent
    /// has nothing more ready or there is no room.
    fn forward(&mut self, cx: &mut Context<'_>) {
        while self.ending.is_none() {
            if self.held.is_some() {
                match self.upstream.poll_reserve(cx) {
                    Poll::Pending => {
                        if !self.waiting {
                            self.waiting = true;
                            self.metrics.upstream_buffer_full.inc();
                        }
                        return;
                    }
                    Poll::Ready(Err(_)) => {
                        // The Relay stream is gone; its end reaches an open
                        // route through the link.
                        self.held = None;
                        self.inbound = None;
                        if self.route.is_none() {
                            self.end_unopened();
                        }
                        return;
                    }
                    Poll::Ready(Ok(())) => {
                        self.waiting = false;
                        let Some(message) = self.held.take() else {
                            return;
                        };
                        self.send(message);
                        continue;
                    }
                }
            }
            let Some(inbound) = self.inbound.as_mut() else {
                return;
            };
            match Pin::new(inbound).poll_next(cx) {
                Poll::Pending => return,
                Poll::Ready(Some(Ok(message))) => self.held = Some(message),
                Poll::Ready(Some(Err(status))) => {
                    self.inbound = None;
                    self.agent_failed(status);
                    return;
                }
                Poll::Ready(None) => {
                    self.inbound = None;
                    self.agent_closed();
                    return;
                }
            }
        }
    }

    /// Sends one agent message into the reserved slot; the first one opens
    /// the relayed stream.
    fn send(&mut self, message: ReportRequest) {
        match &self.route {
            Some(route) => {
                if self
                    .upstream
                    .send_item(link::report(route.id, message))
                    .is_ok()
                {
                    self.metrics.to_replica();
                }
            }
            None => {
                let upstream = &mut self.upstream;
                match self
                    .link
                    .open(message, |request| upstream.send_item(request).is_ok())
                {
                    Some(route) => {
                        self.metrics.to_replica();
                        self.route = Some(route);
                    }
                    None => self.end_unopened(),
                }
            }
        }
    }

    fn end_unopened(&mut self) {
        self.metrics.ended(EndReason::RelayStreamEnded);
        self.ending = Some(Status::unavailable(format!(
            "the relay's stream to scaler replica {} ended; reconnect",
            self.link.replica()
        )));
    }

    /// The agent ended its side: the replica hears `closed`, and the
    /// agent's stream ends once the answers already here are handed over.
    fn agent_closed(&mut self) {
        match &self.route {
            Some(route) => {
                if self.link.close(route.id) {
                    self.metrics.ended(EndReason::AgentClosed);
                    self.ending = Some(Status::ok(""));
                }
                // Otherwise the link ended the stream already; its status follows.
            }
            None => {
                self.metrics.ended(EndReason::AgentClosed);
                self.ending = Some(Status::ok(""));
            }
        }
    }

    /// A message of the agent could not be read.
    fn agent_failed(&mut self, status: Status) {
        let closed = match &self.route {
            Some(route) => self.link.close(route.id),
            None => true,
        };
        if !closed {
            return;
        }
        self.metrics.ended(EndReason::AgentError);
        // tonic reports an oversized message as OUT_OF_RANGE or
        // RESOURCE_EXHAUSTED without naming the setting; the scaler names it.
        self.ending = Some(match status.code() {
            Code::OutOfRange | Code::ResourceExhausted => Status::resource_exhausted(format!(
                "report message too large (MAX_REPORT_BYTES={} on the relay): {}",
                self.max_report_bytes,
                status.message()
            )),
            _ => status,
        });
    }

    /// The replica's next answer, if one is here; notes the link's end of
    /// the stream in `ending`.
    fn next_answer(&mut self, cx: &mut Context<'_>) -> Option<ReportResponse> {
        let route = self.route.as_mut()?;
        if let Poll::Ready(Some(response)) = route.responses.poll_recv(cx) {
            self.metrics.to_agent();
            return Some(response);
        }
        if self.ending.is_none()
            && let Poll::Ready(end) = Pin::new(&mut route.end).poll(cx)
        {
            // The link drops a route's sender only with a status sent.
            let status = end.unwrap_or_else(|_| Status::unavailable("the relay stream ended"));
            self.inbound = None;
            self.held = None;
            self.ending = Some(status);
            // Answers sent before the end are in the buffer now.
            if let Poll::Ready(Some(response)) = route.responses.poll_recv(cx) {
                self.metrics.to_agent();
                return Some(response);
            }
        }
        None
    }
}

impl Stream for AgentStream {
    type Item = Result<ReportResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        this.forward(cx);
        if let Some(response) = this.next_answer(cx) {
            return Poll::Ready(Some(Ok(response)));
        }
        match this.ending.take() {
            Some(status) => {
                this.finished = true;
                this.route = None;
                if status.code() == Code::Ok {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(status)))
                }
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        self.metrics.agent_streams.dec();
        // Not finished: the agent reset its stream or its connection died.
        if let Some(route) = &self.route
            && self.link.close(route.id)
        {
            self.metrics.ended(EndReason::AgentGone);
        }
    }
}
