//! `/metrics` of the scaler, parsed and checked series by series.

mod common;

use common::{TestScaler, attempts, count, loopback, object, row, sample, series};
use itw_proto::externalscaler::GetMetricsRequest;
use itw_scaler::config::{Config, Limits};
use itw_telemetry::exposition::{OVERFLOW_COMM, parse_samples};

#[tokio::test]
async fn metrics_show_summed_attempts_and_the_scaler_figures() {
    let scaler = TestScaler::start(Config {
        limits: Limits {
            max_series: 3,
            ..Limits::default()
        },
        ..loopback()
    })
    .await;
    let body = scaler.metrics_body().await;
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(
        parse_samples(&body)
            .iter()
            .filter(|s| s.name == "internal_tcp_attempts_total")
            .count(),
        0
    );

    // Two nodes report the same series; their counts add up.
    let mut one = scaler.agent(None).await.unwrap();
    one.hello("node-1", "a").await;
    one.snapshot(0, vec![count(series("web", 80, "", "curl"), 4)], vec![])
        .await;
    one.batch(
        1,
        vec![
            count(series("web", 80, "", "curl"), 1),
            count(series("web", 443, "web-0", "curl"), 2),
        ],
    )
    .await;
    let mut two = scaler.agent(None).await.unwrap();
    two.hello("node-2", "b").await;
    two.snapshot(0, vec![], vec![]).await;
    two.batch(1, vec![count(series("web", 80, "", "curl"), 3)])
        .await;
    two.batch(1, vec![count(series("web", 80, "", "curl"), 3)])
        .await;
    // Past MAX_SERIES (3 with pod or process): folded, never lost.
    two.batch(
        2,
        vec![
            count(series("db", 5432, "", "psql"), 5),
            count(series("db", 5432, "", "java"), 6),
        ],
    )
    .await;
    let mut keda = scaler.keda().await;
    let mut stream = keda
        .stream_is_active(object(&[("service", "web")]))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();

    let body = scaler.metrics_body().await;
    assert_eq!(
        attempts(&body, "web"),
        vec![
            row("", "", 0.0),
            row("", "curl", 8.0),
            row("web-0", "curl", 2.0)
        ]
    );
    assert_eq!(
        attempts(&body, "db"),
        vec![
            row("", "", 0.0),
            row("", OVERFLOW_COMM, 6.0),
            row("", "psql", 5.0)
        ]
    );
    type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);
    let expected: &[Expected] = &[
        ("itw_scaler_agents_connected", &[], 2.0),
        ("itw_scaler_agent_instances", &[], 2.0),
        ("itw_scaler_batches_total", &[("result", "applied")], 3.0),
        ("itw_scaler_batches_total", &[("result", "duplicate")], 1.0),
        ("itw_scaler_deltas_total", &[], 5.0),
        ("itw_scaler_snapshots_total", &[], 2.0),
        ("itw_scaler_keda_streams", &[], 1.0),
        ("itw_scaler_ingest_lag_seconds_count", &[], 3.0),
        ("itw_scaler_series_overflow_total", &[], 1.0),
        ("itw_scaler_window_overflow_total", &[], 0.0),
        ("itw_scaler_windowed_destinations", &[], 3.0),
    ];
    for (name, labels, value) in expected {
        assert_eq!(
            sample(&body, name, labels),
            Some(*value),
            "{name}{labels:?}\n{body}"
        );
    }
    assert_eq!(
        sample(&body, "itw_scaler_batches_total", &[("result", "rejected")]),
        None
    );
    // A family without samples yet (no stream was rejected) is left out.
    assert!(!body.contains("itw_scaler_rejected_streams"));
    // Every family the scaler owns is there, with HELP and TYPE.
    for family in [
        "itw_scaler_agents_connected gauge",
        "itw_scaler_agent_instances gauge",
        "itw_scaler_batches counter",
        "itw_scaler_deltas counter",
        "itw_scaler_snapshots counter",
        "itw_scaler_keda_streams gauge",
        "itw_scaler_ingest_lag_seconds histogram",
        "itw_scaler_series_overflow counter",
        "itw_scaler_window_overflow counter",
        "itw_scaler_active_services gauge",
        "itw_scaler_windowed_destinations gauge",
        "internal_tcp_attempts counter",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family}\n")),
            "{family}\n{body}"
        );
    }

    // Agents leaving: the counts stay, the gauges follow.
    drop(one);
    drop(two);
    drop(stream);
    common::within("the gauges to drop", async {
        loop {
            let body = scaler.metrics_body().await;
            if sample(&body, "itw_scaler_agents_connected", &[]) == Some(0.0)
                && sample(&body, "itw_scaler_keda_streams", &[]) == Some(0.0)
            {
                assert_eq!(attempts(&body, "web")[1], row("", "curl", 8.0));
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    scaler.stop().await;
}

#[tokio::test]
async fn get_metrics_calls_and_sweeps_are_timed() {
    let scaler = TestScaler::start(loopback()).await;
    let mut keda = scaler.keda().await;
    for _ in 0..3 {
        keda.get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&[("service", "web")])),
            metric_name: String::new(),
        })
        .await
        .unwrap();
    }
    // A call KEDA gets an error for never reached the store: not timed.
    let refused = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&[("window", "90")])),
            metric_name: String::new(),
        })
        .await;
    assert!(refused.is_err());
    keda.is_active(object(&[("service", "web")])).await.unwrap();
    let body = scaler.metrics_body().await;
    // The handler times the three it answered; the call timing all four
    // (an error is an answer too), and nothing else on the KEDA service.
    assert_eq!(
        sample(&body, "itw_scaler_get_metrics_handler_seconds_count", &[]),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "itw_scaler_get_metrics_seconds_count", &[]),
        Some(4.0),
        "{body}"
    );
    for family in [
        "itw_scaler_get_metrics_handler_seconds histogram",
        "itw_scaler_get_metrics_seconds histogram",
        "itw_scaler_sweep_seconds histogram",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family}\n")),
            "{family}\n{body}"
        );
    }
}
