//! KEDA's five RPCs against the real server on loopback, with a KEDA-role
//! client generated from the same proto.

mod common;

use std::time::Duration;

use common::{EveryStream, TestScaler, count, loopback, object, sample, series, within};
use itw_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, IsActiveResponse, MetricSpec, MetricValue,
};
use itw_scaler::config::{Config, Limits};
use tonic::{Code, Streaming};

#[allow(deprecated)]
fn spec(name: &str, target_size: i64, target_size_float: f64) -> MetricSpec {
    MetricSpec {
        metric_name: name.into(),
        target_size,
        target_size_float,
    }
}

#[allow(deprecated)]
fn value(name: &str, metric_value: i64, metric_value_float: f64) -> MetricValue {
    MetricValue {
        metric_name: name.into(),
        metric_value,
        metric_value_float,
    }
}

/// A scaler holding 20 attempts to web:80 and 5 to web:443, just now.
async fn scaler_with_traffic() -> TestScaler {
    let scaler = TestScaler::start(loopback()).await;
    let mut agent = scaler.agent(None).await.unwrap();
    let welcome = agent.hello("node-1", "instance-1").await;
    assert_eq!(welcome.applied_sequence, 0);
    assert_eq!(welcome.history_seconds, 60);
    assert_eq!(agent.snapshot(0, vec![], vec![]).await, 0);
    let deltas = vec![
        count(series("web", 80, "", "curl"), 12),
        count(series("web", 80, "web-0", "curl"), 8),
        count(series("web", 443, "", "wget"), 5),
    ];
    assert_eq!(agent.batch(1, deltas).await, 1);
    scaler
}

#[tokio::test]
async fn get_metric_spec_and_get_metrics_return_exact_values() {
    let scaler = scaler_with_traffic().await;
    let mut keda = scaler.keda().await;

    let all_ports = [("service", "web"), ("window", "10s"), ("targetRate", "2.5")];
    let response = keda
        .get_metric_spec(object(&all_ports))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response,
        GetMetricSpecResponse {
            metric_specs: vec![spec("itw-apps-web", 3, 2.5)]
        }
    );
    let port_80 = [
        ("service", "web"),
        ("window", "10s"),
        ("port", "80"),
        ("targetRate", "0.2"),
    ];
    let response = keda
        .get_metric_spec(object(&port_80))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.metric_specs, vec![spec("itw-apps-web-80", 1, 0.2)]);

    // 25 attempts over a 10 s window: 2.5/s; KEDA's name is echoed.
    let response = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&all_ports)),
            metric_name: "s0-itw-apps-web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.metric_values,
        vec![value("s0-itw-apps-web", 3, 2.5)]
    );
    // Port 80 only, our own name when KEDA sends none.
    let response = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&port_80)),
            metric_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.metric_values,
        vec![value("itw-apps-web-80", 2, 2.0)]
    );
    // Default window 60 s: 25/60.
    let response = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&[("service", "web")])),
            metric_name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.metric_values, vec![value("m", 0, 25.0 / 60.0)]);
    // A service nobody connected to: rate 0, no error.
    let response = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&[("service", "quiet")])),
            metric_name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.metric_values, vec![value("m", 0, 0.0)]);
    scaler.stop().await;
}

#[tokio::test]
async fn is_active_compares_attempts_with_the_activation_threshold() {
    let scaler = scaler_with_traffic().await;
    let mut keda = scaler.keda().await;
    let active = |pairs: &[(&str, &str)]| {
        let mut keda = keda.clone();
        let request = object(pairs);
        async move { keda.is_active(request).await.unwrap().into_inner().result }
    };
    assert!(active(&[("service", "web")]).await);
    assert!(active(&[("service", "web"), ("activationThreshold", "24")]).await);
    assert!(!active(&[("service", "web"), ("activationThreshold", "25")]).await);
    assert!(
        active(&[
            ("service", "web"),
            ("port", "443"),
            ("activationThreshold", "4.5")
        ])
        .await
    );
    assert!(
        !active(&[
            ("service", "web"),
            ("port", "443"),
            ("activationThreshold", "5")
        ])
        .await
    );
    assert!(!active(&[("service", "web"), ("port", "8080")]).await);
    assert!(!active(&[("service", "quiet")]).await);
    assert!(!active(&[("service", "web"), ("namespace", "other")]).await);
    let response = keda
        .is_active(object(&[("service", "web")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response, IsActiveResponse { result: true });
    scaler.stop().await;
}

#[tokio::test]
async fn malformed_metadata_is_invalid_argument_naming_key_and_value() {
    let scaler = TestScaler::start(loopback()).await;
    let mut keda = scaler.keda().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[],
            "scalerMetadata.service is required: the name of the destination Service",
        ),
        (
            &[("service", "web"), ("port", "0")],
            "scalerMetadata.port = \"0\": must be a Service port number, 1-65535",
        ),
        (
            &[("service", "web"), ("window", "20m")],
            "scalerMetadata.window = \"20m\": is longer than this scaler's MAX_WINDOW of 15m",
        ),
        (
            &[("service", "web"), ("targetRate", "-1")],
            "scalerMetadata.targetRate = \"-1\": must be a number above 0",
        ),
        (
            &[("service", "web"), ("activationThreshold", "NaN")],
            "scalerMetadata.activationThreshold = \"NaN\": must be a number, 0 or more",
        ),
    ];
    for (pairs, message) in cases {
        let checks = [
            keda.is_active(object(pairs)).await.map(|_| ()),
            keda.get_metric_spec(object(pairs)).await.map(|_| ()),
            keda.get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(object(pairs)),
                metric_name: "m".into(),
            })
            .await
            .map(|_| ()),
            keda.stream_is_active(object(pairs)).await.map(|_| ()),
            keda.stream_metric_spec(object(pairs)).await.map(|_| ()),
        ];
        for result in checks {
            let status = result.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert_eq!(status.message(), *message);
        }
    }
    let mut no_namespace = object(&[("service", "web")]);
    no_namespace.namespace.clear();
    let status = keda.is_active(no_namespace).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "scalerMetadata.namespace is not set and the ScaledObject reference has no namespace: set namespace to the destination Service's namespace"
    );
    let status = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: None,
            metric_name: "m".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "the request has no scaledObjectRef");
    scaler.stop().await;
}

async fn next_state(stream: &mut Streaming<IsActiveResponse>) -> bool {
    within("a StreamIsActive message", stream.message())
        .await
        .expect("stream status")
        .expect("stream open")
        .result
}

/// Whether the stream stays silent for `quiet`.
async fn silent_for(stream: &mut Streaming<IsActiveResponse>, quiet: Duration) -> bool {
    tokio::time::timeout(quiet, stream.message()).await.is_err()
}

#[tokio::test]
async fn stream_is_active_sends_one_true_per_burst_then_false() {
    let scaler = TestScaler::start(loopback()).await;
    let mut keda = scaler.keda().await;
    let mut agent = scaler.agent(None).await.unwrap();
    agent.hello("node-1", "instance-1").await;
    agent.snapshot(0, vec![], vec![]).await;

    let mut stream = keda
        .stream_is_active(object(&[("service", "web"), ("window", "2s")]))
        .await
        .unwrap()
        .into_inner();
    assert!(!next_state(&mut stream).await, "the current state on open");

    // A burst of batches: the first activates, the rest keep it active.
    for sequence in 1..=4 {
        agent
            .batch(sequence, vec![count(series("web", 80, "", "curl"), 1)])
            .await;
    }
    assert!(next_state(&mut stream).await, "true on inactive -> active");
    // Nothing more until the window has passed without attempts.
    assert!(
        !next_state(&mut stream).await,
        "false once the window is empty"
    );
    assert!(
        silent_for(&mut stream, Duration::from_millis(500)).await,
        "then quiet"
    );

    // A second burst: exactly one more true.
    agent
        .batch(5, vec![count(series("web", 80, "", "curl"), 1)])
        .await;
    agent
        .batch(6, vec![count(series("web", 80, "", "curl"), 1)])
        .await;
    assert!(next_state(&mut stream).await);
    assert!(!next_state(&mut stream).await);

    // Another service's attempts wake nobody here.
    agent
        .batch(7, vec![count(series("db", 5432, "", "psql"), 9)])
        .await;
    assert!(silent_for(&mut stream, Duration::from_millis(500)).await);
    scaler.stop().await;
}

#[tokio::test]
async fn stream_is_active_opened_on_an_active_service_says_true() {
    let scaler = scaler_with_traffic().await;
    let mut keda = scaler.keda().await;
    let mut stream = keda
        .stream_is_active(object(&[
            ("service", "web"),
            ("window", "2s"),
            ("port", "443"),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(next_state(&mut stream).await);
    assert!(!next_state(&mut stream).await);
    scaler.stop().await;
}

#[tokio::test]
async fn stream_metric_spec_sends_the_spec_once_and_stays_open() {
    let scaler = TestScaler::start(loopback()).await;
    let mut keda = scaler.keda().await;
    let mut stream = keda
        .stream_metric_spec(object(&[
            ("service", "web"),
            ("port", "8080"),
            ("targetRate", "10"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let first = within("the spec", stream.message()).await.unwrap().unwrap();
    assert_eq!(
        first.metric_specs,
        vec![spec("itw-apps-web-8080", 10, 10.0)]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.message())
            .await
            .is_err(),
        "no second spec for unchanged metadata, and the stream stays open"
    );
    scaler.stop().await;
    assert_eq!(
        within("the end", stream.message()).await.unwrap(),
        None,
        "ended with OK"
    );
}

#[tokio::test]
async fn trigger_windows_set_the_history_asked_of_agents() {
    let scaler = TestScaler::start(loopback()).await;
    let mut keda = scaler.keda().await;
    keda.is_active(object(&[("service", "web"), ("window", "2m")]))
        .await
        .unwrap();
    keda.is_active(object(&[("service", "web"), ("window", "30s")]))
        .await
        .unwrap();
    let mut agent = scaler.agent(None).await.unwrap();
    assert_eq!(agent.hello("node-1", "i").await.history_seconds, 120);
    scaler.stop().await;
}

#[tokio::test]
async fn shutdown_ends_every_stream_with_ok() {
    let scaler = TestScaler::start(loopback()).await;
    let streams = EveryStream::open(scaler.channel().await).await;
    scaler.stop().await;
    streams.expect_all_end().await;
}

#[tokio::test]
async fn a_departed_stream_client_frees_its_stream() {
    let scaler = TestScaler::start(loopback()).await;
    let mut keda = scaler.keda().await;
    let open_streams = |body: &str| {
        itw_telemetry::exposition::parse_samples(body)
            .into_iter()
            .find(|s| s.name == "itw_scaler_keda_streams")
            .map(|s| s.value)
    };
    let mut stream = keda
        .stream_is_active(object(&[("service", "web")]))
        .await
        .unwrap()
        .into_inner();
    next_state(&mut stream).await;
    let specs = keda
        .stream_metric_spec(object(&[("service", "web")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open_streams(&scaler.metrics_body().await), Some(2.0));
    drop(stream);
    drop(specs);
    within("the streams to be freed", async {
        while open_streams(&scaler.metrics_body().await) != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    scaler.stop().await;
}

/// #13 item 3: KEDA streams are capped in all (MAX_KEDA_STREAMS) and per
/// connection (MAX_STREAMS_PER_CONNECTION), so one client cannot grow the
/// scaler's memory without bound.
#[tokio::test]
async fn keda_streams_are_capped_in_all_and_per_connection() {
    let scaler = TestScaler::start(Config {
        limits: Limits {
            max_keda_streams: 3,
            max_streams_per_connection: 2,
            ..Limits::default()
        },
        ..loopback()
    })
    .await;
    let web = || object(&[("service", "web")]);
    let mut one = scaler.keda().await;
    let a = one.stream_is_active(web()).await.unwrap().into_inner();
    let _b = one.stream_is_active(web()).await.unwrap().into_inner();
    // The connection is full: a third stream on it waits for a free slot.
    let mut on_one = one.clone();
    let waiting =
        tokio::time::timeout(Duration::from_millis(300), on_one.stream_is_active(web())).await;
    assert!(
        waiting.is_err(),
        "a third stream opened on a full connection"
    );

    let _c = scaler
        .keda()
        .await
        .stream_is_active(web())
        .await
        .unwrap()
        .into_inner();
    let refused = scaler
        .keda()
        .await
        .stream_is_active(web())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (
            Code::ResourceExhausted,
            "3 KEDA streams are open on this scaler (MAX_KEDA_STREAMS); close some or raise the setting"
        )
    );
    let body = scaler.metrics_body().await;
    assert_eq!(
        sample(&body, "itw_scaler_keda_streams_refused_total", &[]),
        Some(1.0)
    );
    assert_eq!(sample(&body, "itw_scaler_keda_streams", &[]), Some(3.0));
    // A stream that ends frees its place.
    drop(a);
    within("a freed stream place", async {
        loop {
            let mut keda = scaler.keda().await;
            if keda.stream_is_active(web()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    scaler.stop().await;
}

/// #13 item 2: anonymous sockets that send nothing neither stay open nor
/// lock KEDA out: past GRPC_MAX_CONNECTIONS they are closed as they come,
/// and each is closed after IDLE_TIMEOUT; KEDA is served again at once.
#[tokio::test]
async fn idle_grpc_sockets_are_capped_and_closed() {
    use tokio::io::AsyncReadExt;

    let scaler = TestScaler::start(Config {
        limits: Limits {
            grpc_max_connections: 4,
            idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
        ..loopback()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(tokio::net::TcpStream::connect(scaler.grpc).await.unwrap());
    }
    // The server speaks first (its HTTP/2 settings), then closes.
    for socket in &mut idle {
        let mut sink = Vec::new();
        let _ = within(
            "the server closing an idle socket",
            socket.read_to_end(&mut sink),
        )
        .await;
    }
    let body = scaler.metrics_body().await;
    assert_eq!(
        sample(
            &body,
            "itw_scaler_connections_closed_total",
            &[("listener", "grpc"), ("reason", "connection_cap")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &body,
            "itw_scaler_connections_closed_total",
            &[("listener", "grpc"), ("reason", "idle")]
        ),
        Some(4.0)
    );
    let response = scaler
        .keda()
        .await
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&[("service", "web")])),
            metric_name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.metric_values, vec![value("m", 0, 0.0)]);
    scaler.stop().await;
}
