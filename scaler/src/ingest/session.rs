//! One agent instance's report session: hello, then snapshot and batches,
//! each checked and applied under the rules of `proto/itw/v1/ingest.proto`.
//!
//! A [`Session`] is fed one message at a time and returns the response to
//! send, or the [`IngestError`] that ends it. It owns only the small state a
//! connected instance needs (its store [`Connection`], series cache,
//! snapshot flag, refusals, connected-gauge guard and log span), so a Report
//! stream and a relayed stream run the very same rules. It never awaits and
//! never sends: the caller owns the transport.

use std::net::SocketAddr;

use itw_proto::itw::v1::{Ack, Batch, Snapshot, Welcome, report_request};
use itw_telemetry::timeline::{TARGET as TIMELINE, monotonic_us};

use super::{Checked, IngestError, RefusedEntry, check_batch, check_hello, check_snapshot, kind};
use crate::{
    coldstart::WakeReceipt,
    graph::check::check_edges,
    metrics::{BatchResult, GaugeGuard, ScalerMetrics},
    store::{BatchOutcome, Connection, SeriesCache, Store, short_id},
};

/// Where an agent's messages come from, for its logs.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    /// Its own Report stream, from `peer`.
    Report { peer: Option<SocketAddr> },
    /// Relayed stream `stream` of the Relay stream from `relay`.
    Relayed {
        relay: Option<SocketAddr>,
        stream: u64,
    },
}

/// A connected agent instance.
pub struct Session {
    conn: Connection,
    cache: SeriesCache,
    snapshot_applied: bool,
    refusals: Refusals,
    /// Keeps `itw_scaler_agents_connected` up while the session lives.
    _connected: GaugeGuard,
    span: tracing::Span,
}

impl Session {
    /// Opens a session with a stream's first message, which must be a hello;
    /// returns it with the welcome to send.
    pub fn open(
        store: &std::sync::Arc<Store>,
        metrics: &ScalerMetrics,
        first: report_request::Message,
        origin: Origin,
    ) -> Result<(Self, Welcome), IngestError> {
        let hello = match first {
            report_request::Message::Hello(hello) => hello,
            other => return Err(IngestError::HelloMissing { got: kind(&other) }),
        };
        check_hello(&hello)?;
        let (conn, applied) =
            store.hello(&hello.node_name, &hello.instance_id, &hello.instance_secret)?;
        let span = tracing::info_span!(
            "agent",
            node = %hello.node_name,
            instance = %short_id(&hello.instance_id)
        );
        let connected = metrics.agent_connected();
        span.in_scope(|| match origin {
            Origin::Report { peer } => tracing::info!(peer = ?peer, applied, "agent connected"),
            Origin::Relayed { relay, stream } => {
                tracing::info!(relay = ?relay, stream, applied, "agent connected through a relay")
            }
        });
        let welcome = Welcome {
            applied_sequence: applied,
            history_seconds: u32::try_from(store.history_secs()).unwrap_or(u32::MAX),
        };
        let session = Self {
            conn,
            cache: SeriesCache::default(),
            snapshot_applied: false,
            refusals: Refusals::default(),
            _connected: connected,
            span,
        };
        Ok((session, welcome))
    }

    /// Checks and applies one message after the hello; returns the ack.
    pub fn handle(
        &mut self,
        store: &Store,
        metrics: &ScalerMetrics,
        message: report_request::Message,
    ) -> Result<Ack, IngestError> {
        let span = self.span.clone();
        let _entered = span.enter();
        let sequence = match message {
            report_request::Message::Hello(_) => return Err(IngestError::HelloAgain),
            report_request::Message::Snapshot(snapshot) => {
                self.snapshot(store, metrics, &snapshot)?
            }
            report_request::Message::Batch(batch) => self.batch(store, metrics, &batch)?,
        };
        Ok(Ack { sequence })
    }

    /// The agent closed its stream or went away.
    pub fn leave(self) {
        self.span.in_scope(|| tracing::info!("agent disconnected"));
    }

    fn snapshot(
        &mut self,
        store: &Store,
        metrics: &ScalerMetrics,
        snapshot: &Snapshot,
    ) -> Result<u64, IngestError> {
        let limits = store.limits();
        let Checked { view, refused } = check_snapshot(snapshot, limits.max_window.as_secs())?;
        let edges = check_edges("snapshot.edges", &snapshot.edges, limits.max_edges)?;
        let ack = store.apply_snapshot(&self.conn, &view, &mut self.cache)?;
        store.learn_edges(&self.conn, "snapshot.edges", &edges.view);
        metrics.snapshots.inc();
        self.refusals.note(metrics, &refused);
        self.refusals.note(metrics, &edges.refused);
        self.snapshot_applied = true;
        tracing::info!(
            through = snapshot.through_sequence,
            series = view.totals.len(),
            destinations = view.history.len(),
            "snapshot applied"
        );
        Ok(ack)
    }

    fn batch(
        &mut self,
        store: &Store,
        metrics: &ScalerMetrics,
        batch: &Batch,
    ) -> Result<u64, IngestError> {
        let receipt = batch.wake.then(|| {
            let receipt = WakeReceipt {
                at_us: monotonic_us(),
                at_ms: store.clock().now_ms(),
            };
            tracing::trace!(
                target: TIMELINE,
                t_us = receipt.at_us,
                sequence = batch.sequence,
                "wake batch received"
            );
            receipt
        });
        if !self.snapshot_applied {
            metrics.batch(BatchResult::Rejected);
            return Err(IngestError::SnapshotMissing {
                sequence: batch.sequence,
            });
        }
        let limits = store.limits();
        let outcome = check_batch(batch, limits.max_batch_deltas).and_then(
            |Checked { view, mut refused }| {
                let edges = check_edges("batch.edges", &batch.edges, limits.max_edges)?;
                // Before the batch rings the doorbell: the stream it
                // activates looks for the record.
                if let Some(receipt) = receipt {
                    store.note_wake_batch(&self.conn, receipt, &view);
                }
                let outcome = store.apply_batch(&self.conn, &view, &mut self.cache)?;
                if let BatchOutcome::Applied { .. } = outcome {
                    store.learn_edges(&self.conn, "batch.edges", &edges.view);
                    refused.extend(edges.refused);
                }
                Ok((outcome, view.deltas.len(), refused))
            },
        );
        match outcome {
            Ok((BatchOutcome::Applied { ack }, applied, refused)) => {
                if batch.wake {
                    tracing::trace!(
                        target: TIMELINE,
                        t_us = monotonic_us(),
                        sequence = batch.sequence,
                        "wake batch applied"
                    );
                }
                metrics.batch(BatchResult::Applied);
                metrics.deltas.inc_by(applied as u64);
                self.refusals.note(metrics, &refused);
                Ok(ack)
            }
            // A resend's refusals were counted when it was first applied.
            Ok((BatchOutcome::Duplicate { ack }, _, _)) => {
                metrics.batch(BatchResult::Duplicate);
                tracing::debug!(
                    sequence = batch.sequence,
                    ack,
                    "resent batch acknowledged again"
                );
                Ok(ack)
            }
            Err(error) => {
                metrics.batch(BatchResult::Rejected);
                Err(error)
            }
        }
    }
}

/// The refused entries of one session: each is counted; the first is logged
/// as a warning, the rest at debug, so a node reporting a bad name on every
/// batch does not flood the log.
#[derive(Default)]
struct Refusals {
    warned: bool,
}

impl Refusals {
    fn note(&mut self, metrics: &ScalerMetrics, refused: &[RefusedEntry]) {
        for entry in refused {
            metrics.refused_entry(entry.metric_label());
            if self.warned {
                tracing::debug!(%entry, "report entry refused");
            } else {
                self.warned = true;
                tracing::warn!(
                    %entry,
                    "report entry refused, the rest of its message applied; further refusals on this stream are counted in itw_scaler_refused_entries_total and logged at debug"
                );
            }
        }
    }
}
