//! HTTP/2 receive windows for the ingest streams, one rule for the scaler
//! and the relay.
//!
//! h2 ends a connection (GOAWAY `ENHANCE_YOUR_CALM`, "too_many_data_frames")
//! once the DATA frames under 256 bytes it holds unread cost more than half
//! the connection window, each costing 256 bytes less its size. Ingest
//! messages are small and sent one per frame as they come (an agent's
//! batch, a relay's hello or `closed`), and a reader that cannot go on (the
//! scaler's ingest thread busy with 5,000 snapshots, a relay whose replica
//! stalls) leaves them unread. With the connection window equal to the
//! stream window, that closed Relay connections in 2 of 3 startups at 5,000
//! agents (#18). A stream holds at most its window unread; the smallest
//! message is a relay's `closed` (9 bytes in its gRPC frame; an agent's
//! smallest is a batch with no deltas, 16), so one stream's window of them
//! costs 27 times the window, under half of 64 times. The larger connection window lets a
//! connection with many streams queue more (KEDA's share one), never one
//! stream.

/// The connection window as a multiple of the stream window.
const CONNECTION_WINDOW_FACTOR: u32 = 64;

/// The HTTP/2 connection window for a stream window of `stream_window`.
pub fn connection_window(stream_window: u32) -> u32 {
    // h2's largest window is 2^31 - 1.
    stream_window
        .saturating_mul(CONNECTION_WINDOW_FACTOR)
        .min(i32::MAX as u32)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::itw::v1::{
        Batch, RelayClosed, RelayRequest, ReportRequest, relay_request, report_request,
    };

    /// What h2 charges a window of unread frames of `size` bytes each,
    /// against half the connection window it may not exceed.
    fn cost_and_budget(window: u32, size: u32) -> (u64, u64) {
        let cost = u64::from(window / size) * u64::from(256 - size);
        (cost, u64::from(connection_window(window) / 2))
    }

    #[test]
    fn a_streams_window_of_the_smallest_messages_stays_within_h2s_small_frame_budget() {
        // The smallest envelope a relay sends and the smallest message an
        // agent sends (a batch has a sequence from 1 and its time), each in
        // its gRPC frame (5 bytes).
        let closed = RelayRequest {
            stream: 1,
            message: Some(relay_request::Message::Closed(RelayClosed {})),
        };
        let empty_batch = ReportRequest {
            message: Some(report_request::Message::Batch(Batch {
                sequence: 1,
                collected_at_unix_ms: 1_700_000_000_000,
                ..Batch::default()
            })),
        };
        let sizes = [closed.encoded_len(), empty_batch.encoded_len()].map(|len| 5 + len as u32);
        assert_eq!(sizes, [9, 16]);
        for window in [16 << 10, 64 << 10, 16 << 20] {
            for size in sizes {
                let (cost, budget) = cost_and_budget(window, size);
                assert!(
                    cost <= budget,
                    "window {window}, {size} B: {cost} > {budget}"
                );
            }
        }
        // With the connection window equal to the stream window, a fifth
        // of a window of them was enough.
        let (cost, _) = cost_and_budget(64 << 10, 9);
        assert!(cost > u64::from((64u32 << 10) / 2));
    }

    #[test]
    fn the_connection_window_is_64_stream_windows_up_to_h2s_largest() {
        assert_eq!(connection_window(64 << 10), 4 << 20);
        assert_eq!(connection_window(16 << 20), 1 << 30);
        assert_eq!(connection_window(64 << 20), i32::MAX as u32);
        assert_eq!(connection_window(u32::MAX), i32::MAX as u32);
    }
}
