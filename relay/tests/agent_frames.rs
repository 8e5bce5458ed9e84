//! An agent's connection to the relay survives its small batches waiting
//! unread while the replica stalls: h2 closes a connection whose unread
//! DATA frames under 256 bytes cost more than half its connection window,
//! and an agent sends each batch in a frame of its own.

mod support;

use itw_proto::itw::v1::{
    Ack, Batch, RelayResponse, ReportRequest, ReportResponse, relay_request, relay_response,
    report_request, report_response,
};
use itw_relay::{config::Limits, metrics::EndReason};
use support::{Agent, FakeReplica, RelayUnderTest, hello, within};

/// The replica's stream window: a few dozen batches fill it.
const REPLICA_WINDOW: u32 = 1024;
/// Batches the agent sends while the replica reads nothing: 16 bytes each
/// in their frames, 2,000 of them within the agent's 64 KiB window, and
/// costing h2's small-frame budget 2,000 x 240 bytes, far past the 32 KiB
/// it had with a connection window of 64 KiB.
const BATCHES: u64 = 2_000;

/// The smallest batch an agent sends: no deltas, its sequence and time.
fn batch(sequence: u64) -> ReportRequest {
    ReportRequest {
        message: Some(report_request::Message::Batch(Batch {
            sequence,
            collected_at_unix_ms: 1_700_000_000_000,
            ..Batch::default()
        })),
    }
}

#[tokio::test]
async fn small_batches_waiting_unread_behind_a_stalled_replica_do_not_close_the_agents_connection()
{
    let mut replica =
        FakeReplica::start_with_window("127.0.0.1:0".parse().unwrap(), REPLICA_WINDOW);
    let limits = Limits {
        upstream_buffer: 1,
        ..Limits::default()
    };
    let relay = RelayUnderTest::start(replica.addr, None, limits).await;
    let mut agent = Agent::connect_one_frame_each(relay.grpc, &replica.addr.to_string())
        .await
        .unwrap();
    agent.send(hello("node-a")).await;
    let mut call = replica.call().await;
    for sequence in 1..=BATCHES {
        agent.send(batch(sequence)).await;
    }
    // Time for the batches to reach the relay and wait there unread; less
    // only makes the test weaker, never wrong.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // The replica reads now: every message arrives once, in order.
    let first = call.next().await;
    assert_eq!(first.stream, 1);
    assert!(
        matches!(&first.message, Some(relay_request::Message::Report(r)) if r == &hello("node-a")),
        "first: {first:?}"
    );
    for sequence in 1..=BATCHES {
        let envelope = call.next().await;
        assert_eq!(envelope.stream, 1);
        match envelope.message {
            Some(relay_request::Message::Report(report)) => assert_eq!(report, batch(sequence)),
            other => panic!("expected batch {sequence}, got {other:?}"),
        }
    }
    call.send(RelayResponse {
        stream: 1,
        message: Some(relay_response::Message::Report(ReportResponse {
            message: Some(report_response::Message::Ack(Ack { sequence: BATCHES })),
        })),
    })
    .await;
    let answer = within("the ack", agent.next()).await.unwrap();
    assert_eq!(
        answer.and_then(|a| a.message),
        Some(report_response::Message::Ack(Ack { sequence: BATCHES }))
    );
    for reason in [
        EndReason::AgentGone,
        EndReason::AgentError,
        EndReason::AgentClosed,
    ] {
        assert_eq!(relay.figures.ended_count(reason), 0, "{reason:?}");
    }
    relay.stop().await;
}
