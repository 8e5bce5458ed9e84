//! The `itw.v1.Ingest` service with a decode limit per method: a Report
//! message is held to MAX_REPORT_BYTES exactly, a Relay envelope to that plus
//! [`RELAY_ENVELOPE_BYTES`], so that a relay can carry every message an
//! agent may send. tonic sets one limit per generated server, so two servers
//! share the one [`IngestService`] and this routes each call by its path.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use itw_proto::itw::v1::ingest_server::IngestServer;
use tonic::{
    body::Body,
    codegen::{Service, http},
    server::NamedService,
};

use crate::ingest::IngestService;

/// What a Relay envelope adds around the agent's message: the `stream`
/// field (1 tag byte and up to 10 varint bytes) and the `report` field's
/// tag and length (1 byte and up to 5).
pub const RELAY_ENVELOPE_BYTES: usize = 17;

const RELAY_PATH: &str = "/itw.v1.Ingest/Relay";

/// `itw.v1.Ingest`, each method under its own decode limit.
#[derive(Clone)]
pub struct IngestRoutes {
    report: IngestServer<IngestService>,
    relay: IngestServer<IngestService>,
}

impl IngestRoutes {
    pub fn new(service: IngestService, max_report_bytes: usize) -> Self {
        let service = Arc::new(service);
        Self {
            report: IngestServer::from_arc(Arc::clone(&service))
                .max_decoding_message_size(max_report_bytes),
            relay: IngestServer::from_arc(service)
                .max_decoding_message_size(max_report_bytes + RELAY_ENVELOPE_BYTES),
        }
    }
}

impl NamedService for IngestRoutes {
    const NAME: &'static str = <IngestServer<IngestService> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for IngestRoutes
where
    IngestServer<IngestService>: Service<http::Request<B>, Response = http::Response<Body>, Error = std::convert::Infallible>,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = <IngestServer<IngestService> as Service<http::Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match (self.report.poll_ready(cx), self.relay.poll_ready(cx)) {
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            _ => Poll::Pending,
        }
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == RELAY_PATH {
            self.relay.call(request)
        } else {
            self.report.call(request)
        }
    }
}

#[cfg(test)]
mod tests {
    use itw_proto::itw::v1::{RelayRequest, ReportRequest, relay_request};
    use prost::Message;

    use super::*;

    #[test]
    fn the_envelope_allowance_covers_the_largest_envelope() {
        // The largest stream number and an agent message of 256 MiB, the
        // largest MAX_REPORT_BYTES.
        let agent_bytes = 256 << 20;
        let envelope = RelayRequest {
            stream: u64::MAX,
            message: Some(relay_request::Message::Report(ReportRequest::default())),
        };
        let around = envelope.encoded_len() + prost::length_delimiter_len(agent_bytes) - 1;
        assert_eq!(around, RELAY_ENVELOPE_BYTES);
    }
}
