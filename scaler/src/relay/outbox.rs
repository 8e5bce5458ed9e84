//! The answers of one Relay stream on their way to the relay, sent in
//! bursts: each answer handed to the response channel wakes a serving
//! thread to write it, so one ack per agent batch (5,000 a second at 5,000
//! nodes) was 5,000 wake-ups a second of the threads that answer KEDA (#18).
//!
//! An ack of an ordinary batch or a snapshot waits here at most
//! RELAY_ACK_DELAY, until the next tick of a grid shared by every Relay
//! stream of this scaler, so the streams' bursts leave at the same moments
//! and a woken serving thread writes several. Nothing waits on such an
//! ack: an agent only advances its `applied_sequence` with it (and, when it
//! stops, waits up to its flush timeout for the last one). Every other
//! answer (a welcome, an `ended`, the ack of a wake batch) leaves at once
//! and takes everything queued before it along, so answers keep their
//! order on the stream.
//!
//! This module only holds and sends answers; it never reads the relay's
//! messages, and it never drops an answer: a full channel makes the Relay
//! stream's task wait, as a single send did.

use std::{sync::Arc, time::Duration};

use itw_proto::itw::v1::{RelayResponse, relay_response, report_response};
use tokio::{sync::mpsc, time::Instant};
use tonic::Status;

use crate::metrics::ScalerMetrics;

/// Most answers held before they leave without waiting for the tick:
/// bounds the burst, which must fit the response channel whole.
pub const MAX_BURST: usize = 64;

/// Why a burst left, the `cause` label of
/// `itw_scaler_relay_answer_bursts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The tick came.
    Tick,
    /// An answer that must not wait.
    Urgent,
    /// MAX_BURST answers were held.
    Full,
}

impl Cause {
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::Tick => "tick",
            Self::Urgent => "urgent",
            Self::Full => "full",
        }
    }
}

/// The relay stopped reading: the response channel is closed.
#[derive(Debug, PartialEq, Eq)]
pub struct Gone;

/// The grid the held answers leave on: every Relay stream of one scaler
/// shares its start, so their ticks coincide.
#[derive(Debug, Clone, Copy)]
pub struct AckGrid {
    start: Instant,
    delay: Duration,
}

impl AckGrid {
    /// RELAY_ACK_DELAY `delay` from `start`; zero holds nothing.
    pub fn new(start: Instant, delay: Duration) -> Self {
        Self { start, delay }
    }

    /// The first tick after `now`: at most `delay` later.
    pub fn next_tick(&self, now: Instant) -> Instant {
        let step = self.delay.as_nanos().max(1);
        let since = now.saturating_duration_since(self.start).as_nanos();
        let ticks = since / step + 1;
        // u64 nanoseconds last 584 years; a scaler restarts sooner.
        self.start + Duration::from_nanos(u64::try_from(ticks * step).unwrap_or(u64::MAX))
    }
}

/// One Relay stream's answers not sent yet.
pub struct Outbox {
    tx: mpsc::Sender<Result<RelayResponse, Status>>,
    held: Vec<RelayResponse>,
    grid: AckGrid,
    /// When the held answers leave; `None` while none is held.
    due: Option<Instant>,
    metrics: Arc<ScalerMetrics>,
}

impl Outbox {
    pub fn new(
        tx: mpsc::Sender<Result<RelayResponse, Status>>,
        grid: AckGrid,
        metrics: Arc<ScalerMetrics>,
    ) -> Self {
        Self {
            tx,
            held: Vec::new(),
            grid,
            due: None,
            metrics,
        }
    }

    /// When the held answers must leave, if any is held.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Queues `response`; `wake` says it answers a wake batch. It leaves
    /// now, with everything held before it, unless it is an ack that may
    /// wait (see the module's docs).
    pub async fn push(&mut self, response: RelayResponse, wake: bool) -> Result<(), Gone> {
        let may_wait = !wake && !self.grid.delay.is_zero() && is_ack(&response);
        self.held.push(response);
        if !may_wait {
            return self.flush(Cause::Urgent).await;
        }
        if self.held.len() >= MAX_BURST {
            return self.flush(Cause::Full).await;
        }
        if self.due.is_none() {
            self.due = Some(self.grid.next_tick(Instant::now()));
        }
        Ok(())
    }

    /// Sends every held answer, in order, as one burst: the channel's
    /// receiver is woken once for all of them.
    pub async fn flush(&mut self, cause: Cause) -> Result<(), Gone> {
        self.due = None;
        if self.held.is_empty() {
            return Ok(());
        }
        let sent = self.held.len();
        // MAX_BURST keeps a burst within the channel; a larger one (a
        // smaller channel) goes in parts rather than never.
        while !self.held.is_empty() {
            let part = self.held.len().min(self.tx.max_capacity());
            let permits = self.tx.reserve_many(part).await.map_err(|_| Gone)?;
            for (permit, response) in permits.zip(self.held.drain(..part)) {
                permit.send(Ok(response));
            }
        }
        self.metrics.relay_burst(cause.metric_label(), sent);
        Ok(())
    }

    /// Sends what is held and fits in the channel now, without waiting:
    /// the stream is ending, and a relay that does not read would hold the
    /// end up.
    pub fn flush_ready(&mut self) {
        self.due = None;
        let fits = self.held.len().min(self.tx.capacity());
        if fits == 0 {
            return;
        }
        if let Ok(permits) = self.tx.try_reserve_many(fits) {
            for (permit, response) in permits.zip(self.held.drain(..fits)) {
                permit.send(Ok(response));
            }
            self.metrics.relay_burst(Cause::Urgent.metric_label(), fits);
        }
    }

    /// Ends the stream with `status` after what is held.
    pub async fn fail(mut self, status: Status) {
        if self.flush(Cause::Urgent).await.is_ok() {
            let _ = self.tx.send(Err(status)).await;
        }
    }
}

fn is_ack(response: &RelayResponse) -> bool {
    matches!(
        &response.message,
        Some(relay_response::Message::Report(report))
            if matches!(report.message, Some(report_response::Message::Ack(_)))
    )
}

#[cfg(test)]
mod tests;
