//! The relay between real tonic agents and a fake replica serving
//! `Ingest.Relay`: what reaches the replica, what reaches each agent, and
//! how each kind of end travels.

mod support;

use itw_proto::itw::v1::{
    Ack, DestinationHistory, RelayClosed, RelayEnded, RelayRequest, RelayResponse, ReportRequest,
    ReportResponse, Series, SeriesCount, Snapshot, Welcome, relay_request, relay_response,
    report_request, report_response,
};
use itw_relay::{config::Limits, metrics::EndReason};
use support::{Agent, FakeReplica, RelayUnderTest, batch, hello, within};
use tonic::Code;

fn relayed(stream: u64, message: ReportRequest) -> RelayRequest {
    RelayRequest {
        stream,
        message: Some(relay_request::Message::Report(message)),
    }
}

fn closed(stream: u64) -> RelayRequest {
    RelayRequest {
        stream,
        message: Some(relay_request::Message::Closed(RelayClosed {})),
    }
}

fn answer(stream: u64, message: report_response::Message) -> RelayResponse {
    RelayResponse {
        stream,
        message: Some(relay_response::Message::Report(ReportResponse {
            message: Some(message),
        })),
    }
}

fn ack(sequence: u64) -> report_response::Message {
    report_response::Message::Ack(Ack { sequence })
}

fn snapshot() -> ReportRequest {
    ReportRequest {
        message: Some(report_request::Message::Snapshot(Snapshot {
            through_sequence: 4,
            taken_at_unix_ms: 1_700_000_000_000,
            totals: vec![SeriesCount {
                series: Some(Series {
                    namespace: "shop".into(),
                    service: "cart".into(),
                    port: 8080,
                    pod: String::new(),
                    process_comm: "curl".into(),
                }),
                attempts: 42,
            }],
            history: vec![DestinationHistory {
                namespace: "shop".into(),
                service: "cart".into(),
                port: 8080,
                first_second: 1_700_000_000,
                per_second: vec![1, 0, 41],
            }],
            edges: Vec::new(),
        })),
    }
}

async fn setup(
    token: Option<&str>,
    limits: Limits,
) -> (FakeReplica, support::RelayCall, RelayUnderTest, String) {
    let mut replica = FakeReplica::start("127.0.0.1:0".parse().unwrap());
    let relay = RelayUnderTest::start(replica.addr, token, limits).await;
    let call = replica.call().await;
    let header = replica.addr.to_string();
    (replica, call, relay, header)
}

#[tokio::test]
async fn messages_arrive_untouched_in_order_and_answers_reach_their_own_agent() {
    let (_replica, mut call, relay, header) = setup(None, Limits::default()).await;
    let mut a = Agent::connect(relay.grpc, &header, None).await.unwrap();
    a.send(hello("node-a")).await;
    // The first message opens the relayed stream: a is 1 before b opens.
    assert_eq!(call.next().await, relayed(1, hello("node-a")));
    let mut b = Agent::connect(relay.grpc, &header, None).await.unwrap();
    b.send(hello("node-b")).await;
    assert_eq!(call.next().await, relayed(2, hello("node-b")));

    a.send(snapshot()).await;
    for sequence in 5..=7 {
        a.send(batch(sequence)).await;
    }
    assert_eq!(call.next().await, relayed(1, snapshot()));
    for sequence in 5..=7 {
        assert_eq!(call.next().await, relayed(1, batch(sequence)));
    }

    let welcome = report_response::Message::Welcome(Welcome {
        applied_sequence: 4,
        history_seconds: 60,
    });
    call.send(answer(2, welcome)).await;
    call.send(answer(1, ack(7))).await;
    assert_eq!(
        b.next().await.unwrap(),
        Some(ReportResponse {
            message: Some(welcome)
        })
    );
    // a's first answer is its own ack, not b's welcome.
    assert_eq!(
        a.next().await.unwrap(),
        Some(ReportResponse {
            message: Some(ack(7))
        })
    );
    let page = relay.scrape().await;
    assert!(
        page.contains("itw_relay_messages_forwarded_total{direction=\"to_replica\"} 6\n"),
        "{page}"
    );
    assert!(
        page.contains("itw_relay_messages_forwarded_total{direction=\"to_agent\"} 2\n"),
        "{page}"
    );
    assert!(page.contains("itw_relay_agent_streams 2\n"), "{page}");
    assert!(
        page.contains(&format!(
            "itw_relay_relay_streams_up{{replica=\"{header}\"}} 1\n"
        )),
        "{page}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn ended_ends_exactly_that_agent_with_the_replicas_status() {
    let (_replica, mut call, relay, header) = setup(None, Limits::default()).await;
    let mut a = Agent::connect(relay.grpc, &header, None).await.unwrap();
    a.send(hello("node-a")).await;
    call.next().await;
    let mut b = Agent::connect(relay.grpc, &header, None).await.unwrap();
    b.send(hello("node-b")).await;
    call.next().await;

    call.send(RelayResponse {
        stream: 1,
        message: Some(relay_response::Message::Ended(RelayEnded {
            code: 9,
            message: "batch 3 follows 1: sequence gap".into(),
        })),
    })
    .await;
    let status = a.next().await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::FailedPrecondition, "batch 3 follows 1: sequence gap")
    );
    // b goes on, both ways.
    b.send(batch(1)).await;
    assert_eq!(call.next().await, relayed(2, batch(1)));
    call.send(answer(2, ack(1))).await;
    assert_eq!(
        b.next().await.unwrap(),
        Some(ReportResponse {
            message: Some(ack(1))
        })
    );
    assert_eq!(relay.figures.ended_count(EndReason::ReplicaEnded), 1);
    relay.stop().await;
}

#[tokio::test]
async fn an_agent_closing_its_stream_sends_closed_after_its_messages() {
    let (_replica, mut call, relay, header) = setup(None, Limits::default()).await;
    let Agent { tx, mut rx } = Agent::connect(relay.grpc, &header, None).await.unwrap();
    tx.send(hello("node-a")).await.unwrap();
    tx.send(batch(1)).await.unwrap();
    drop(tx);
    assert_eq!(call.next().await, relayed(1, hello("node-a")));
    assert_eq!(call.next().await, relayed(1, batch(1)));
    assert_eq!(call.next().await, closed(1));
    // The agent's stream ends with OK.
    assert_eq!(within("the end", rx.message()).await.unwrap(), None);
    assert_eq!(relay.figures.ended_count(EndReason::AgentClosed), 1);

    // An agent that goes away without closing is closed for it too.
    let gone = Agent::connect(relay.grpc, &header, None).await.unwrap();
    gone.send(hello("node-b")).await;
    assert_eq!(call.next().await, relayed(2, hello("node-b")));
    drop(gone);
    assert_eq!(call.next().await, closed(2));
    assert_eq!(relay.figures.ended_count(EndReason::AgentGone), 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_broken_relay_stream_ends_every_agent_unavailable_and_a_new_one_counts_from_one() {
    let (replica, mut call, relay, header) = setup(None, Limits::default()).await;
    let mut a = Agent::connect(relay.grpc, &header, None).await.unwrap();
    a.send(hello("node-a")).await;
    call.next().await;
    let mut b = Agent::connect(relay.grpc, &header, None).await.unwrap();
    b.send(hello("node-b")).await;
    call.next().await;

    // Killed with the call's answer stream still open: no trailers, a break.
    let addr = replica.kill();
    drop(call);
    for agent in [&mut a, &mut b] {
        let status = agent.next().await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().starts_with(&format!(
                "the relay's stream to scaler replica {header} broke: "
            )),
            "{status:?}"
        );
    }
    assert_eq!(relay.figures.ended_count(EndReason::RelayStreamEnded), 2);

    // The replica comes back on the same address; the relay reopens.
    let mut replica = FakeReplica::start(addr);
    let mut call = replica.call().await;
    let mut c = Agent::connect(relay.grpc, &header, None).await.unwrap();
    c.send(hello("node-c")).await;
    assert_eq!(call.next().await, relayed(1, hello("node-c")));
    call.send(answer(1, ack(0))).await;
    assert_eq!(
        c.next().await.unwrap(),
        Some(ReportResponse {
            message: Some(ack(0))
        })
    );
    let page = relay.scrape().await;
    assert!(
        page.contains(&format!(
            "itw_relay_upstream_reconnects_total{{replica=\"{header}\"}} 1\n"
        )),
        "{page}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_replica_ending_the_relay_stream_passes_its_status_on() {
    let (mut replica, call, relay, header) = setup(None, Limits::default()).await;
    let mut call = call;
    let mut a = Agent::connect(relay.grpc, &header, None).await.unwrap();
    a.send(hello("node-a")).await;
    call.next().await;
    call.responses
        .send(Err(tonic::Status::resource_exhausted(
            "MAX_RELAYED_STREAMS reached",
        )))
        .await
        .unwrap();
    let status = a.next().await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::ResourceExhausted, "MAX_RELAYED_STREAMS reached")
    );
    // And the relay opens a new Relay stream.
    let _again = replica.call().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_replica_the_relay_did_not_resolve_is_refused_unavailable() {
    let (_replica, _call, relay, _header) = setup(None, Limits::default()).await;
    for (header, message) in [
        (
            "127.0.0.9:1".to_owned(),
            "itw-replica: 127.0.0.9:1 is not a scaler replica this relay resolved from its SCALER_ADDR",
        ),
        (
            "example.com:443".to_owned(),
            "itw-replica: \"example.com:443\" is not a replica address (ip:port, as resolved from SCALER_ADDR)",
        ),
    ] {
        let status = Agent::connect(relay.grpc, &header, None)
            .await
            .err()
            .unwrap();
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unavailable, message)
        );
    }
    assert_eq!(relay.figures.ended_count(EndReason::UnknownReplica), 2);
    relay.stop().await;
}

#[tokio::test]
async fn a_bad_token_is_refused_and_the_good_one_is_presented_upstream() {
    let (_replica, call, relay, header) = setup(Some("s3cret"), Limits::default()).await;
    assert_eq!(
        call.metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer s3cret")
    );
    for (token, message) in [
        (
            Some("wrong"),
            "the bearer token is not the one this relay expects",
        ),
        (
            None,
            "agent streams need an `authorization: Bearer <token>` header (TOKEN_FILE on the relay)",
        ),
    ] {
        let status = Agent::connect(relay.grpc, &header, token)
            .await
            .err()
            .unwrap();
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unauthenticated, message)
        );
    }
    assert_eq!(relay.figures.ended_count(EndReason::Unauthenticated), 2);
    assert!(
        Agent::connect(relay.grpc, &header, Some("s3cret"))
            .await
            .is_ok()
    );
    relay.stop().await;
}

#[tokio::test]
async fn max_agent_streams_refuses_the_next_until_one_ends() {
    let limits = Limits {
        max_agent_streams: 1,
        ..Limits::default()
    };
    let (_replica, mut call, relay, header) = setup(None, limits).await;
    let first = Agent::connect(relay.grpc, &header, None).await.unwrap();
    first.send(hello("node-a")).await;
    call.next().await;
    let status = Agent::connect(relay.grpc, &header, None)
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::ResourceExhausted,
            "this relay carries at most 1 agent streams (MAX_AGENT_STREAMS)"
        )
    );
    assert_eq!(relay.figures.ended_count(EndReason::MaxAgentStreams), 1);
    drop(first);
    assert_eq!(call.next().await, closed(1));
    let again = within("a slot", async {
        loop {
            if let Ok(agent) = Agent::connect(relay.grpc, &header, None).await {
                return agent;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    again.send(hello("node-b")).await;
    assert_eq!(call.next().await, relayed(2, hello("node-b")));
    relay.stop().await;
}

#[tokio::test]
async fn a_message_past_max_report_bytes_ends_that_agent_and_closes_it() {
    let limits = Limits {
        max_report_bytes: 64 << 10,
        ..Limits::default()
    };
    let (_replica, mut call, relay, header) = setup(None, limits).await;
    let mut a = Agent::connect(relay.grpc, &header, None).await.unwrap();
    a.send(hello("node-a")).await;
    call.next().await;
    let mut big = hello("node-a");
    if let Some(report_request::Message::Hello(hello)) = &mut big.message {
        hello.node_name = "n".repeat(70 << 10);
    }
    a.send(big).await;
    let status = a.next().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("report message too large (MAX_REPORT_BYTES=65536 on the relay): "),
        "{status:?}"
    );
    assert_eq!(call.next().await, closed(1));
    relay.stop().await;
}

#[tokio::test]
async fn stopping_the_relay_ends_agents_with_ok() {
    let (_replica, mut call, relay, header) = setup(None, Limits::default()).await;
    let mut a = Agent::connect(relay.grpc, &header, None).await.unwrap();
    a.send(hello("node-a")).await;
    call.next().await;
    relay.stop().await;
    assert_eq!(a.next().await.unwrap(), None);
}

#[tokio::test]
async fn idle_and_excess_agent_connections_are_closed_and_counted() {
    use tokio::io::AsyncReadExt;

    let limits = Limits {
        grpc_max_connections: 2,
        idle_timeout: std::time::Duration::from_millis(300),
        ..Limits::default()
    };
    let (_replica, _call, relay, _header) = setup(None, limits).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(relay.grpc).await.unwrap());
    }
    // The third is closed at once, the first two after the idle timeout
    // (the server's HTTP/2 settings may come first).
    for socket in &mut idle {
        let mut bytes = Vec::new();
        let _ = within(
            "the relay closing an idle socket",
            socket.read_to_end(&mut bytes),
        )
        .await;
    }
    let page = relay.scrape().await;
    for (reason, n) in [("connection_cap", 1), ("idle", 2)] {
        assert!(
            page.contains(&format!(
                "itw_relay_connections_closed_total{{listener=\"grpc\",reason=\"{reason}\"}} {n}\n"
            )),
            "{page}"
        );
    }
    relay.stop().await;
}
