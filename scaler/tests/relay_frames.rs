//! A Relay connection survives many small HTTP/2 DATA frames that the
//! scaler has not read yet (#18): h2 closes a connection whose unread frames
//! under 256 bytes cost more than half its connection window, and a relay
//! forwards each agent message in a frame of its own.

mod common;

use common::{TestScaler, loopback, relay::hello, sample, within};
use itw_proto::itw::v1::{RelayClosed, RelayRequest, relay_request, report_response};
use tonic::transport::Endpoint;

/// Hellos sent before the others: enough that the scaler's answers fill
/// the relay's 1 KiB window and the 256 answers queued behind it, so the
/// Relay stream's task stops reading.
const HELLOS: u64 = 400;
/// Then this many `closed` (9-10 bytes each) wait unread: 1,500 x 246 bytes
/// of h2's small-frame budget, far past the 32 KiB it had with a connection
/// window of 64 KiB, within the window itself.
const CLOSES: u64 = 1_500;

#[tokio::test]
async fn many_small_frames_waiting_unread_do_not_close_the_relay_connection() {
    let scaler = TestScaler::start(loopback()).await;
    let channel = within(
        "connecting",
        Endpoint::from_shared(format!("http://{}", scaler.grpc))
            .unwrap()
            .initial_stream_window_size(1024)
            .connect(),
    )
    .await
    .unwrap();
    let mut relay = common::relay::Relay::open_one_frame_each(channel)
        .await
        .unwrap();
    for stream in 1..=HELLOS {
        relay
            .send(
                stream,
                hello(&format!("node-{stream}"), &format!("i{stream}")),
            )
            .await;
    }
    for stream in HELLOS + 1..=HELLOS + CLOSES {
        relay
            .raw(RelayRequest {
                stream,
                message: Some(relay_request::Message::Closed(RelayClosed {})),
            })
            .await;
    }
    // Reading now lets the scaler go on: every hello is answered, the
    // closes are ignored (closed before they opened) and the stream lives.
    for stream in 1..=HELLOS {
        match relay.answer(stream).await {
            report_response::Message::Welcome(welcome) => {
                assert_eq!(welcome.applied_sequence, 0)
            }
            other => panic!("expected a welcome on stream {stream}, got {other:?}"),
        }
    }
    assert_eq!(relay.snapshot(1, 0, vec![], vec![]).await, 0);
    let body = scaler.metrics_body().await;
    assert_eq!(
        sample(&body, "itw_scaler_agents_connected", &[]),
        Some(HELLOS as f64)
    );
    assert_eq!(sample(&body, "itw_scaler_relay_streams", &[]), Some(1.0));
    scaler.stop().await;
}
