//! The relayed streams of one Relay stream, by the relay's number, and the
//! numbering rules: what a `stream` id means given the ids seen so far.
//!
//! This module only sorts envelopes; it never checks or applies an agent's
//! message (that is [`crate::ingest::Session`]'s job) and never sends.

use std::collections::HashMap;

use itw_proto::itw::v1::{RelayRequest, ReportRequest, relay_request};
use tonic::{Code, Status};

use super::RelayError;
use crate::ingest::Session;

/// What an envelope is for, given the relayed streams seen so far.
#[derive(Debug)]
pub enum Envelope<'a, S> {
    /// The first message of a new relayed stream: it must hold a hello.
    Open(ReportRequest),
    /// A message of a live relayed stream.
    Live(&'a mut S, ReportRequest),
    /// The agent's stream is over; its session, taken out of the map.
    Closed(S),
    /// A new relayed stream refused before its first message was read.
    Refused(Refusal),
    /// For a stream that ended already, or closed before it ever opened: the
    /// relay may send such messages before it learns of the end.
    Ignored,
}

/// Why a new relayed stream was refused, the `reason` label of
/// `itw_scaler_relayed_streams_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// MAX_RELAYED_STREAMS live on this Relay stream already.
    MaxRelayedStreams,
}

impl Refusal {
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::MaxRelayedStreams => "max_relayed_streams",
        }
    }

    /// The status the relayed stream ends with.
    pub fn status(self, max: usize) -> Status {
        match self {
            Self::MaxRelayedStreams => Status::new(
                Code::ResourceExhausted,
                format!(
                    "this Relay stream carries {max} agent streams already (MAX_RELAYED_STREAMS); spread the agents over more relays or raise the setting"
                ),
            ),
        }
    }
}

/// The live relayed streams of one Relay stream.
pub struct RelayedStreams<S = Session> {
    live: HashMap<u64, S>,
    /// The highest id ever opened: ids at or below it that are not live
    /// ended, and are never reused.
    highest: u64,
    max: usize,
}

impl<S> RelayedStreams<S> {
    pub fn new(max: usize) -> Self {
        Self {
            live: HashMap::new(),
            highest: 0,
            max,
        }
    }

    /// MAX_RELAYED_STREAMS.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Live relayed streams.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Sorts one envelope. An envelope without a message or with `stream` 0
    /// is an error of the relay itself, which ends the whole Relay stream.
    pub fn take(&mut self, request: RelayRequest) -> Result<Envelope<'_, S>, RelayError> {
        let stream = request.stream;
        if stream == 0 {
            return Err(RelayError::StreamZero);
        }
        let Some(message) = request.message else {
            return Err(RelayError::NoMessage { stream });
        };
        if self.live.contains_key(&stream) {
            return Ok(match message {
                relay_request::Message::Report(report) => match self.live.get_mut(&stream) {
                    Some(session) => Envelope::Live(session, report),
                    None => Envelope::Ignored,
                },
                relay_request::Message::Closed(_) => match self.live.remove(&stream) {
                    Some(session) => Envelope::Closed(session),
                    None => Envelope::Ignored,
                },
            });
        }
        if stream <= self.highest {
            return Ok(Envelope::Ignored);
        }
        self.highest = stream;
        Ok(match message {
            // Closed before it said anything: nothing to end.
            relay_request::Message::Closed(_) => Envelope::Ignored,
            relay_request::Message::Report(_) if self.live.len() >= self.max => {
                Envelope::Refused(Refusal::MaxRelayedStreams)
            }
            relay_request::Message::Report(report) => Envelope::Open(report),
        })
    }

    /// Holds the session of a relayed stream just opened.
    pub fn insert(&mut self, stream: u64, session: S) {
        self.live.insert(stream, session);
    }

    /// Ends a relayed stream (the replica refused it); its later messages
    /// are ignored.
    pub fn end(&mut self, stream: u64) -> Option<S> {
        self.live.remove(&stream)
    }
}

impl RelayedStreams<Session> {
    /// Ends every relayed stream as its agent leaving; returns how many.
    pub fn leave_all(&mut self) -> usize {
        let count = self.live.len();
        for (_, session) in self.live.drain() {
            session.leave();
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use itw_proto::itw::v1::{Hello, RelayClosed, report_request};

    use super::*;

    fn report(stream: u64) -> RelayRequest {
        RelayRequest {
            stream,
            message: Some(relay_request::Message::Report(ReportRequest {
                message: Some(report_request::Message::Hello(Hello::default())),
            })),
        }
    }

    fn closed(stream: u64) -> RelayRequest {
        RelayRequest {
            stream,
            message: Some(relay_request::Message::Closed(RelayClosed {})),
        }
    }

    /// What `take` said, in short: the session's name for `Live`/`Closed`.
    fn sort(streams: &mut RelayedStreams<&'static str>, request: RelayRequest) -> String {
        match streams.take(request) {
            Ok(Envelope::Open(_)) => "open".into(),
            Ok(Envelope::Live(session, _)) => format!("live {session}"),
            Ok(Envelope::Closed(session)) => format!("closed {session}"),
            Ok(Envelope::Refused(refusal)) => format!("refused {}", refusal.metric_label()),
            Ok(Envelope::Ignored) => "ignored".into(),
            Err(error) => format!("error {error}"),
        }
    }

    #[test]
    fn new_ids_open_and_live_ids_reach_their_session() {
        let mut streams = RelayedStreams::new(10);
        assert_eq!(sort(&mut streams, report(1)), "open");
        streams.insert(1, "a");
        // Ids need not be consecutive, only increasing.
        assert_eq!(sort(&mut streams, report(5)), "open");
        streams.insert(5, "b");
        assert_eq!(sort(&mut streams, report(1)), "live a");
        assert_eq!(sort(&mut streams, report(5)), "live b");
        assert_eq!(streams.len(), 2);
        assert_eq!(sort(&mut streams, closed(1)), "closed a");
        assert_eq!(streams.len(), 1);
        assert_eq!(sort(&mut streams, report(5)), "live b");
    }

    #[test]
    fn ended_and_skipped_ids_are_ignored_for_good() {
        let mut streams = RelayedStreams::new(10);
        assert_eq!(sort(&mut streams, report(2)), "open");
        streams.insert(2, "a");
        assert_eq!(sort(&mut streams, report(4)), "open");
        // Refused by the replica (a bad hello): never inserted.
        assert_eq!(sort(&mut streams, report(4)), "ignored");
        assert_eq!(sort(&mut streams, closed(4)), "ignored");
        // Ended by the replica after it opened.
        assert_eq!(streams.end(2), Some("a"));
        assert_eq!(sort(&mut streams, report(2)), "ignored");
        assert_eq!(sort(&mut streams, closed(2)), "ignored");
        // Below the highest, never seen: the relay cannot open it any more.
        assert_eq!(sort(&mut streams, report(3)), "ignored");
        assert_eq!(sort(&mut streams, report(1)), "ignored");
        assert!(streams.is_empty());
        assert_eq!(sort(&mut streams, report(5)), "open");
    }

    #[test]
    fn closed_before_opening_uses_up_its_id() {
        let mut streams = RelayedStreams::<&str>::new(10);
        assert_eq!(sort(&mut streams, closed(3)), "ignored");
        assert_eq!(sort(&mut streams, report(3)), "ignored");
        assert_eq!(sort(&mut streams, report(4)), "open");
    }

    #[test]
    fn past_the_limit_a_new_stream_is_refused_alone() {
        let mut streams = RelayedStreams::new(2);
        for (id, name) in [(1, "a"), (2, "b")] {
            assert_eq!(sort(&mut streams, report(id)), "open");
            streams.insert(id, name);
        }
        assert_eq!(sort(&mut streams, report(3)), "refused max_relayed_streams");
        // The refused id is used up; the live ones go on.
        assert_eq!(sort(&mut streams, report(3)), "ignored");
        assert_eq!(sort(&mut streams, report(2)), "live b");
        assert_eq!(sort(&mut streams, closed(1)), "closed a");
        assert_eq!(sort(&mut streams, report(4)), "open");
        let status = Refusal::MaxRelayedStreams.status(streams.max());
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "this Relay stream carries 2 agent streams already (MAX_RELAYED_STREAMS); spread the agents over more relays or raise the setting"
        );
    }

    #[test]
    fn a_broken_envelope_is_an_error_of_the_whole_relay_stream() {
        let mut streams = RelayedStreams::<&str>::new(10);
        assert_eq!(
            sort(&mut streams, report(0)),
            "error relay_request.stream is 0; the relay numbers its relayed streams from 1"
        );
        assert_eq!(
            sort(
                &mut streams,
                RelayRequest {
                    stream: 7,
                    message: None
                }
            ),
            "error relay_request.message is missing (stream 7); send a report or closed"
        );
        assert_eq!(
            RelayError::StreamZero.status().code(),
            Code::InvalidArgument
        );
        assert_eq!(RelayError::StreamZero.metric_label(), "relay_envelope");
        // Neither used up an id.
        assert_eq!(sort(&mut streams, report(7)), "open");
    }
}
