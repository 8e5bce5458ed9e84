//! `itw.v1.Ingest/Relay` against the real server on loopback, with a tonic
//! client in the relay's role: several agents on one stream counted exactly,
//! each relayed stream refused alone as its Report stream would have been,
//! the numbering rules, MAX_RELAYED_STREAMS, broken envelopes, a dropped
//! Relay stream and its resumption, the token, shutdown, a wake, and acks
//! sent in bursts.

mod common;

use common::{
    TestScaler, attempts, count, loopback, object,
    relay::{batch, hello},
    row, sample, series, within,
};
use itw_proto::{
    externalscaler::GetMetricsRequest,
    itw::v1::{
        Hello, RelayRequest, ReportRequest, relay_request, relay_response, report_request,
        report_response,
    },
};
use itw_scaler::config::{Config, Limits, Secret, TokenSource};
use tonic::Code;

const WEB_10S: [(&str, &str); 2] = [("service", "web"), ("window", "10s")];

fn curl() -> itw_proto::itw::v1::Series {
    series("web", 80, "", "curl")
}

/// Attempts per second over the trigger's window.
async fn rate(scaler: &TestScaler, pairs: &[(&str, &str)]) -> f64 {
    let mut keda = scaler.keda().await;
    let response = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(pairs)),
            metric_name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    response.metric_values[0].metric_value_float
}

fn rejected(body: &str, reason: &str) -> Option<f64> {
    sample(
        body,
        "itw_scaler_rejected_streams_total",
        &[("reason", reason)],
    )
}

#[tokio::test]
async fn two_agents_on_one_relay_stream_are_counted_exactly() {
    let scaler = TestScaler::start(loopback()).await;
    let mut relay = scaler.relay(None).await.unwrap();
    assert_eq!(relay.hello(1, "node-1", "a").await.applied_sequence, 0);
    assert_eq!(relay.hello(2, "node-2", "b").await.applied_sequence, 0);
    assert_eq!(relay.snapshot(1, 0, vec![], vec![]).await, 0);
    assert_eq!(relay.snapshot(2, 0, vec![], vec![]).await, 0);
    assert_eq!(relay.batch(1, 1, vec![count(curl(), 5)]).await, 1);
    assert_eq!(relay.batch(2, 1, vec![count(curl(), 4)]).await, 1);
    assert_eq!(relay.batch(1, 2, vec![count(curl(), 3)]).await, 2);
    assert_eq!(
        relay.batch(1, 2, vec![count(curl(), 3)]).await,
        2,
        "a resend is acked again"
    );
    assert_eq!(rate(&scaler, &WEB_10S).await, 1.2);
    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 12.0)]
    );
    assert_eq!(sample(&body, "itw_scaler_agents_connected", &[]), Some(2.0));
    assert_eq!(sample(&body, "itw_scaler_relay_streams", &[]), Some(1.0));
    assert_eq!(
        sample(&body, "itw_scaler_batches_total", &[("result", "applied")]),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &body,
            "itw_scaler_batches_total",
            &[("result", "duplicate")]
        ),
        Some(1.0)
    );
    // `closed` is an agent leaving: the other goes on.
    relay.close(1).await;
    assert_eq!(relay.batch(2, 2, vec![count(curl(), 1)]).await, 2);
    scaler.until_gauge("itw_scaler_agents_connected", 1.0).await;
    scaler.stop().await;
}

#[tokio::test]
async fn a_refused_relayed_stream_ends_alone_with_its_report_status() {
    let scaler = TestScaler::start(loopback()).await;
    let mut relay = scaler.relay(None).await.unwrap();
    relay.hello(1, "node-good", "good").await;
    relay.snapshot(1, 0, vec![], vec![]).await;

    relay
        .send(
            2,
            report_request::Message::Hello(Hello {
                protocol_version: 2,
                ..match hello("node-bad", "bad") {
                    report_request::Message::Hello(h) => h,
                    _ => unreachable!(),
                }
            }),
        )
        .await;
    assert_eq!(
        relay.expect_ended(2).await,
        (
            Code::FailedPrecondition,
            "hello.protocol_version 2 is not supported; this scaler speaks version 1".into()
        )
    );
    relay.send(3, batch(1, false, vec![])).await;
    assert_eq!(
        relay.expect_ended(3).await,
        (
            Code::InvalidArgument,
            "the first message of a report stream must be hello, got batch".into()
        )
    );
    relay
        .raw(RelayRequest {
            stream: 4,
            message: Some(relay_request::Message::Report(ReportRequest {
                message: None,
            })),
        })
        .await;
    assert_eq!(
        relay.expect_ended(4).await,
        (
            Code::InvalidArgument,
            "the report request holds no message".into()
        )
    );
    relay.hello(5, "node-gap", "gap").await;
    relay.snapshot(5, 0, vec![], vec![]).await;
    relay.send(5, batch(3, false, vec![count(curl(), 9)])).await;
    assert_eq!(
        relay.expect_ended(5).await,
        (
            Code::FailedPrecondition,
            "sequence gap: batch 3 arrived but this replica has applied through 0; reconnect and send a snapshot".into()
        )
    );
    // Messages the relay sent for an ended stream before it learned of the
    // end are ignored: the next answer is the good stream's ack.
    relay.send(5, batch(1, false, vec![count(curl(), 9)])).await;
    relay.close(5).await;
    relay.send(3, hello("node-late", "late")).await;
    assert_eq!(relay.batch(1, 1, vec![count(curl(), 2)]).await, 1);

    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 2.0)]
    );
    assert_eq!(rejected(&body, "protocol_version"), Some(1.0));
    assert_eq!(rejected(&body, "protocol"), Some(2.0));
    assert_eq!(rejected(&body, "sequence_gap"), Some(1.0));
    assert_eq!(
        sample(&body, "itw_scaler_batches_total", &[("result", "rejected")]),
        Some(1.0)
    );
    assert_eq!(sample(&body, "itw_scaler_agents_connected", &[]), Some(1.0));
    scaler.stop().await;
}

#[tokio::test]
async fn past_max_relayed_streams_the_next_one_is_refused_alone() {
    let scaler = TestScaler::start(Config {
        limits: Limits {
            max_relayed_streams: 2,
            ..Limits::default()
        },
        ..loopback()
    })
    .await;
    let mut relay = scaler.relay(None).await.unwrap();
    relay.hello(1, "node-1", "a").await;
    relay.hello(2, "node-2", "b").await;
    relay.send(3, hello("node-3", "c")).await;
    assert_eq!(
        relay.expect_ended(3).await,
        (
            Code::ResourceExhausted,
            "this Relay stream carries 2 agent streams already (MAX_RELAYED_STREAMS); spread the agents over more relays or raise the setting".into()
        )
    );
    relay.snapshot(2, 0, vec![], vec![]).await;
    relay.close(1).await;
    assert_eq!(relay.hello(4, "node-3", "c").await.applied_sequence, 0);
    let body = scaler.metrics_body().await;
    assert_eq!(
        sample(
            &body,
            "itw_scaler_relayed_streams_refused_total",
            &[("reason", "max_relayed_streams")]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&body, "itw_scaler_agents_connected", &[]), Some(2.0));
    // The limit is per Relay stream: another relay has its own.
    let mut other = scaler.relay(None).await.unwrap();
    other.hello(1, "node-4", "d").await;
    other.hello(2, "node-5", "e").await;
    scaler.stop().await;
}

#[tokio::test]
async fn a_broken_envelope_ends_the_whole_relay_stream() {
    let scaler = TestScaler::start(loopback()).await;
    for (request, message) in [
        (
            RelayRequest {
                stream: 0,
                message: Some(relay_request::Message::Closed(Default::default())),
            },
            "relay_request.stream is 0; the relay numbers its relayed streams from 1",
        ),
        (
            RelayRequest {
                stream: 2,
                message: None,
            },
            "relay_request.message is missing (stream 2); send a report or closed",
        ),
    ] {
        let mut relay = scaler.relay(None).await.unwrap();
        relay.hello(1, "node-1", "a").await;
        relay.raw(request).await;
        let status = relay.expect_error().await;
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, message)
        );
        // Its agents left with it, before the status was sent.
        let body = scaler.metrics_body().await;
        assert_eq!(sample(&body, "itw_scaler_agents_connected", &[]), Some(0.0));
    }
    let body = scaler.metrics_body().await;
    assert_eq!(rejected(&body, "relay_envelope"), Some(2.0));
    scaler.stop().await;
}

#[tokio::test]
async fn a_dropped_relay_stream_leaves_its_agents_and_a_new_one_resumes_them() {
    let scaler = TestScaler::start(loopback()).await;
    let mut relay = scaler.relay(None).await.unwrap();
    relay.hello(1, "node-1", "a").await;
    relay.hello(2, "node-2", "b").await;
    relay.snapshot(1, 0, vec![], vec![]).await;
    relay.snapshot(2, 0, vec![], vec![]).await;
    relay.batch(1, 1, vec![count(curl(), 5)]).await;
    relay.batch(1, 2, vec![count(curl(), 3)]).await;
    relay.batch(2, 1, vec![count(curl(), 4)]).await;
    drop(relay);
    scaler.until_gauge("itw_scaler_agents_connected", 0.0).await;
    scaler.until_gauge("itw_scaler_relay_streams", 0.0).await;
    // Disconnected, not forgotten: INSTANCE_RETENTION keeps them.
    let body = scaler.metrics_body().await;
    assert_eq!(sample(&body, "itw_scaler_agent_instances", &[]), Some(2.0));

    // The relay reconnects; the agents resume with their cumulative
    // snapshots (their numbers on the new stream are the new relay's).
    let mut relay = scaler.relay(None).await.unwrap();
    assert_eq!(relay.hello(7, "node-1", "a").await.applied_sequence, 2);
    assert_eq!(relay.hello(9, "node-2", "b").await.applied_sequence, 1);
    assert_eq!(
        relay.snapshot(7, 2, vec![count(curl(), 8)], vec![]).await,
        2
    );
    assert_eq!(
        relay.snapshot(9, 1, vec![count(curl(), 4)], vec![]).await,
        1
    );
    assert_eq!(relay.batch(7, 3, vec![count(curl(), 2)]).await, 3);
    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 14.0)]
    );
    assert_eq!(sample(&body, "itw_scaler_agents_connected", &[]), Some(2.0));
    assert_eq!(
        sample(&body, "itw_scaler_batches_total", &[("result", "applied")]),
        Some(4.0)
    );
    scaler.stop().await;
}

#[tokio::test]
async fn a_relay_needs_the_agents_token() {
    let scaler = TestScaler::start(Config {
        agent_token: TokenSource::Value(Secret("s3cret".into())),
        ..loopback()
    })
    .await;
    for (token, message) in [
        (
            None,
            "agent streams need an `authorization: Bearer <token>` header (AGENT_TOKEN on the scaler)",
        ),
        (
            Some("wrong"),
            "the bearer token is not the one this scaler expects",
        ),
    ] {
        let status = scaler.relay(token).await.err().expect("refused");
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unauthenticated, message)
        );
    }
    let mut relay = scaler.relay(Some("s3cret")).await.unwrap();
    assert_eq!(relay.hello(1, "node-1", "a").await.applied_sequence, 0);
    scaler.stop().await;
}

#[tokio::test]
async fn shutdown_ends_the_relay_stream_with_ok() {
    let scaler = TestScaler::start(loopback()).await;
    let mut relay = scaler.relay(None).await.unwrap();
    relay.hello(1, "node-1", "a").await;
    relay.snapshot(1, 0, vec![], vec![]).await;
    scaler.stop().await;
    relay.expect_end().await;
}

#[tokio::test]
async fn a_wake_batch_through_a_relay_activates_stream_is_active() {
    let scaler = TestScaler::start(loopback()).await;
    let mut keda = scaler.keda().await;
    let mut active = keda
        .stream_is_active(object(&[("service", "web")]))
        .await
        .unwrap()
        .into_inner();
    let mut state = async || {
        within("a StreamIsActive message", active.message())
            .await
            .unwrap()
            .unwrap()
            .result
    };
    assert!(!state().await);
    let mut relay = scaler.relay(None).await.unwrap();
    relay.hello(1, "node-1", "a").await;
    relay.snapshot(1, 0, vec![], vec![]).await;
    relay.send(1, batch(1, true, vec![count(curl(), 1)])).await;
    assert_eq!(relay.expect_ack(1).await, 1);
    assert!(state().await);
    scaler.stop().await;
}

/// A relayed agent message is held to MAX_REPORT_BYTES as on a Report
/// stream, with the very status (its stream alone ends); only an envelope past that plus its own
/// few bytes, which cannot be told apart from garbage, ends the Relay stream.
#[tokio::test]
async fn an_oversized_relayed_message_ends_its_stream_alone() {
    use prost::Message;
    let max = 64 << 10;
    let scaler = TestScaler::start(Config {
        limits: Limits {
            max_report_bytes: max,
            ..Limits::default()
        },
        ..loopback()
    })
    .await;
    let mut relay = scaler.relay(None).await.unwrap();
    relay.hello(1, "node-1", "a").await;
    relay.snapshot(1, 0, vec![], vec![]).await;
    relay.hello(2, "node-2", "b").await;
    relay.snapshot(2, 0, vec![], vec![]).await;
    // An agent message of `bytes` bytes, encoded.
    let sized = |bytes: usize| {
        let with = |comm: usize| ReportRequest {
            message: Some(batch(
                1,
                false,
                vec![count(series("web", 80, "", &"x".repeat(comm)), 1)],
            )),
        };
        // The nested length prefixes grow with the name: close in on it.
        let mut comm = bytes;
        loop {
            let message = with(comm);
            match message.encoded_len() {
                len if len == bytes => return message.message.unwrap(),
                len if len > bytes => comm -= len - bytes,
                len => comm += bytes - len,
            }
        }
    };
    relay.send(2, sized(max + 1)).await;
    assert_eq!(
        relay.expect_ended(2).await,
        (
            Code::ResourceExhausted,
            format!(
                "report message too large (MAX_REPORT_BYTES): Error, decoded message length too large: found {} bytes, the limit is: {max} bytes",
                max + 1
            )
        )
    );
    assert_eq!(relay.batch(1, 1, vec![count(curl(), 1)]).await, 1);
    let body = scaler.metrics_body().await;
    assert_eq!(rejected(&body, "oversized"), Some(1.0));

    relay.send(1, sized(max + 64)).await;
    let status = relay.expect_error().await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .starts_with("relay message too large (MAX_REPORT_BYTES plus the envelope): "),
        "{}",
        status.message()
    );
    let body = scaler.metrics_body().await;
    assert_eq!(rejected(&body, "oversized"), Some(2.0));
    assert_eq!(sample(&body, "itw_scaler_agents_connected", &[]), Some(0.0));
    scaler.stop().await;
}

/// Acks of ordinary batches leave in bursts (RELAY_ACK_DELAY): sent without
/// waiting for any, every relayed stream still gets each of its acks, with
/// the right sequence and in order, and the count of answers is exact.
#[tokio::test]
async fn burst_acks_each_carry_their_streams_sequence_in_order() {
    let scaler = TestScaler::start(loopback()).await;
    let mut relay = scaler.relay(None).await.unwrap();
    for stream in 1..=3 {
        relay
            .hello(stream, &format!("node-{stream}"), &format!("i{stream}"))
            .await;
        relay.snapshot(stream, 0, vec![], vec![]).await;
    }
    for sequence in 1..=4 {
        for stream in 1..=3 {
            relay
                .send(stream, batch(sequence, false, vec![count(curl(), stream)]))
                .await;
        }
    }
    let mut acks = std::collections::BTreeMap::<u64, Vec<u64>>::new();
    for _ in 0..12 {
        match relay.next().await {
            Ok(Some(itw_proto::itw::v1::RelayResponse {
                stream,
                message:
                    Some(relay_response::Message::Report(itw_proto::itw::v1::ReportResponse {
                        message: Some(report_response::Message::Ack(ack)),
                    })),
            })) => acks.entry(stream).or_default().push(ack.sequence),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let each = vec![1, 2, 3, 4];
    assert_eq!(
        acks,
        [(1, each.clone()), (2, each.clone()), (3, each)].into()
    );
    let body = scaler.metrics_body().await;
    // 3 welcomes, 3 snapshot acks, 12 batch acks.
    assert_eq!(
        sample(&body, "itw_scaler_relay_answers_total", &[]),
        Some(18.0)
    );
    assert_eq!(
        attempts(&body, "web"),
        vec![row("", "", 0.0), row("", "curl", 24.0)]
    );
    scaler.stop().await;
}

/// A wake batch's ack is not held back, and takes the acks held before it
/// along in order: with RELAY_ACK_DELAY far longer than the test may take,
/// stream 1's ordinary ack arrives only because stream 2's wake ack left.
#[tokio::test]
async fn a_wake_batchs_ack_leaves_at_once_with_the_acks_held_before_it() {
    let mut config = loopback();
    config.limits.relay_ack_delay = std::time::Duration::from_secs(3600);
    let scaler = TestScaler::start(config).await;
    let mut relay = scaler.relay(None).await.unwrap();
    relay.hello(1, "node-1", "a").await;
    relay.hello(2, "node-2", "b").await;
    relay.send(1, snapshot_now()).await;
    relay.send(2, snapshot_now()).await;
    relay.send(1, batch(1, false, vec![count(curl(), 1)])).await;
    relay.send(2, batch(1, true, vec![count(curl(), 1)])).await;
    assert_eq!(relay.expect_ack(1).await, 0, "stream 1's snapshot");
    assert_eq!(relay.expect_ack(2).await, 0, "stream 2's snapshot");
    assert_eq!(relay.expect_ack(1).await, 1, "stream 1's batch");
    assert_eq!(relay.expect_ack(2).await, 1, "stream 2's wake batch");
    let body = scaler.metrics_body().await;
    assert_eq!(
        sample(
            &body,
            "itw_scaler_relay_answer_bursts_total",
            &[("cause", "tick")]
        ),
        None,
        "no tick came"
    );
    assert_eq!(
        sample(&body, "itw_scaler_relay_answers_total", &[]),
        Some(6.0)
    );
    scaler.stop().await;
}

fn snapshot_now() -> itw_proto::itw::v1::report_request::Message {
    report_request::Message::Snapshot(itw_proto::itw::v1::Snapshot {
        through_sequence: 0,
        taken_at_unix_ms: common::now_ms(),
        totals: vec![],
        history: vec![],
        edges: Vec::new(),
    })
}
