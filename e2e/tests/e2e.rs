//! End to end, with the real binaries: connects on this machine, caught by the
//! agent's eBPF programs, streamed to real scalers, answered to a KEDA-role
//! gRPC client. Root only (CI); each test has its own stand-in ClusterIPs, so
//! tests running at once never see each other's counts.

use std::{net::SocketAddr, time::Duration};

use itw_e2e::system::*;

const NS: &str = "e2e";

fn map(service: &str, cluster_ip: &str, port: u16) -> String {
    static_map(NS, service, cluster_ip, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_connect_activates_the_service_exactly_once() {
    if !bpf_available("first_connect_activates_the_service_exactly_once") {
        return;
    }
    let target = addr("127.101.0.1:8080");
    let scaler = Scaler::start("scaler").await;
    let agent = Agent::start(
        "agent",
        &map("act", "127.101.0.1", 8080),
        &[scaler.grpc],
        &[],
    )
    .await;
    let mut keda = scaler.keda().await;
    let object = scaled_object(NS, "act", &[("window", "60s")]);
    let mut stream = keda
        .stream_is_active(object.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    // The current state comes first.
    let first = stream
        .message()
        .await
        .expect("stream")
        .expect("a first message");
    assert!(!first.result, "a Service nobody called is not active");

    connect_refused(target);
    let activated = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("StreamIsActive true within 5 s of the connect")
        .expect("stream")
        .expect("a message");
    assert!(activated.result);
    // Exactly one `true`: nothing more while the service stays active.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), stream.message())
            .await
            .is_err(),
        "a second message arrived after the activation"
    );
    assert!(is_active(&mut keda, &object).await);
    let rate = get_metrics(&mut keda, &object).await;
    assert!((rate - 1.0 / 60.0).abs() < 1e-9, "rate {rate}");

    let comm = own_comm();
    let labels = [
        ("destination_namespace", NS),
        ("destination_service", "act"),
        ("destination_pod", ""),
        ("process_comm", comm.as_str()),
    ];
    for (what, metrics) in [("agent", agent.metrics), ("scaler", scaler.metrics)] {
        let samples = scrape(metrics).await;
        assert_eq!(
            exact(&samples, "internal_tcp_attempts_total", &labels),
            Some(1.0),
            "{what} /metrics"
        );
        assert_eq!(
            service_attempts(&samples, NS, "act"),
            1.0,
            "{what} /metrics"
        );
    }

    // kubelet's health checks: filtered, counted apart, no activation.
    connect_as("kubelet", target, 3);
    eventually("the filtered counter", Duration::from_secs(10), || async {
        let samples = scrape(agent.metrics).await;
        (exact(
            &samples,
            "internal_tcp_filtered_total",
            &[("process_comm", "kubelet")],
        ) == Some(3.0))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(agent.attempts(NS, "act").await, 1.0);
    assert_eq!(scaler.attempts(NS, "act").await, 1.0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.message())
            .await
            .is_err(),
        "filtered attempts must not reach KEDA"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_under_load_reaches_the_scaler_exactly() {
    if !bpf_available("every_attempt_under_load_reaches_the_scaler_exactly") {
        return;
    }
    let target = addr("127.101.1.1:8080");
    let scaler = Scaler::start("scaler").await;
    let agent = Agent::start(
        "agent",
        &map("load", "127.101.1.1", 8080),
        &[scaler.grpc],
        &[],
    )
    .await;

    const THREADS: u32 = 4;
    const PER_THREAD: u32 = 5_000;
    const PROCESSES: u32 = 2;
    const PER_PROCESS: u32 = 2_500;
    let expected = f64::from(THREADS * PER_THREAD + PROCESSES * PER_PROCESS);
    let mut workers = Vec::new();
    for _ in 0..THREADS {
        workers.push(std::thread::spawn(move || {
            for _ in 0..PER_THREAD {
                connect_refused(target);
            }
        }));
    }
    for _ in 0..PROCESSES {
        workers.push(std::thread::spawn(move || {
            connect_as("loadgen", target, PER_PROCESS);
        }));
    }
    for worker in workers {
        worker.join().expect("connect worker");
    }
    let counted = eventually("the scaler's total", Duration::from_secs(20), || async {
        let n = scaler.attempts(NS, "load").await;
        (n >= expected).then_some(n)
    })
    .await;
    // Settle one more tick: nothing beyond N may arrive either.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(counted, expected);
    assert_eq!(scaler.attempts(NS, "load").await, expected);
    assert_eq!(agent.attempts(NS, "load").await, expected);
    let samples = scrape(scaler.metrics).await;
    assert_eq!(
        sum(
            &samples,
            "internal_tcp_attempts_total",
            &[("destination_service", "load"), ("process_comm", "loadgen")]
        ),
        f64::from(PROCESSES * PER_PROCESS)
    );
}

/// Connects at a steady pace from a thread until told to stop; returns how many.
fn steady_connects(
    target: SocketAddr,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<u32>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let worker = std::thread::spawn(move || {
        let mut n = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            connect_refused(target);
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        n
    });
    (stop, worker)
}

async fn scaler_restart(kill: bool) {
    let test = if kill {
        "scaler_sigkill"
    } else {
        "scaler_sigterm"
    };
    let (service, ip) = if kill {
        ("restart-kill", "127.101.2.2")
    } else {
        ("restart-term", "127.101.2.1")
    };
    let target = addr(&format!("{ip}:8080"));
    let reference = Scaler::start("reference").await;
    let mut restarted = Scaler::start("restarted").await;
    let (grpc, metrics) = (restarted.grpc, restarted.metrics);
    let agent = Agent::start(
        "agent",
        &map(service, ip, 8080),
        &[reference.grpc, restarted.grpc],
        &[],
    )
    .await;
    let object = scaled_object(NS, service, &[("window", "60s")]);
    let mut keda = restarted.keda().await;
    let mut stream = keda
        .stream_is_active(object.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    stream
        .message()
        .await
        .expect("stream")
        .expect("first message");

    let (stop, worker) = steady_connects(target);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if kill {
        restarted.proc.kill().await;
    } else {
        let status = restarted.proc.terminate().await;
        assert!(status.success(), "{test}: scaler exit {status}");
        // KEDA's stream ended cleanly: KEDA reconnects in 2 s instead of backing off.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => break,
                other => {
                    panic!("{test}: StreamIsActive must end with OK on SIGTERM, got {other:?}")
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let restarted = Scaler::start_on("restarted-again", grpc, metrics, &[]).await;
    agent.wait_streams_up(2.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = f64::from(worker.join().expect("connect worker"));

    eventually(
        &format!("{test}: every count on both replicas"),
        Duration::from_secs(20),
        || async {
            let a = reference.attempts(NS, service).await;
            let b = restarted.attempts(NS, service).await;
            (a == made && b == made).then_some(())
        },
    )
    .await;
    assert_eq!(agent.attempts(NS, service).await, made);
    let mut keda_ref = reference.keda().await;
    let mut keda_new = restarted.keda().await;
    let rate_ref = get_metrics(&mut keda_ref, &object).await;
    let rate_new = get_metrics(&mut keda_new, &object).await;
    assert!(rate_ref > 0.0);
    assert_eq!(
        rate_ref, rate_new,
        "{test}: a restarted replica answers like its peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaler_restarted_with_sigterm_catches_up_exactly() {
    if bpf_available("a_scaler_restarted_with_sigterm_catches_up_exactly") {
        scaler_restart(false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaler_killed_with_sigkill_catches_up_exactly() {
    if bpf_available("a_scaler_killed_with_sigkill_catches_up_exactly") {
        scaler_restart(true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_neither_loses_nor_doubles_and_leaves_nothing_attached() {
    if !bpf_available("an_agent_restart_neither_loses_nor_doubles_and_leaves_nothing_attached") {
        return;
    }
    let target = addr("127.101.3.1:8080");
    let map = map("agent-restart", "127.101.3.1", 8080);
    let scaler = Scaler::start("scaler").await;
    // COLLECT_INTERVAL=60s: after the idle -> active wake, counts stay on the
    // node until the next collect, so the shutdown flush is the only way the
    // last 99 attempts reach the scaler.
    let mut first = Agent::start(
        "agent-1",
        &map,
        &[scaler.grpc],
        &[("COLLECT_INTERVAL", "60s".into())],
    )
    .await;
    let programs = first.program_ids().await;
    assert!(!programs.is_empty(), "the agent exports its program ids");
    assert!(programs.iter().all(|id| program_loaded(*id)));
    connect_refused(target);
    eventually(
        "the first attempt's wake at the scaler",
        Duration::from_secs(10),
        || async { (scaler.attempts(NS, "agent-restart").await == 1.0).then_some(()) },
    )
    .await;
    for _ in 0..99 {
        connect_refused(target);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        scaler.attempts(NS, "agent-restart").await,
        1.0,
        "the 99 attempts after the wake wait on the node for the next collect"
    );
    let status = first.proc.terminate().await;
    assert!(
        status.success(),
        "agent exit {status}:\n{}",
        first.proc.log()
    );
    assert_eq!(
        scaler.attempts(NS, "agent-restart").await,
        100.0,
        "the agent flushes every count before it exits"
    );
    for id in &programs {
        assert!(
            !program_loaded(*id),
            "program {id} still loaded after the agent exited"
        );
    }
    let instances = |samples: &[_]| exact(samples, "itw_scaler_agent_instances", &[]);
    assert_eq!(
        instances(&scrape(scaler.metrics).await),
        Some(1.0),
        "the exited instance is kept for its reconnect"
    );

    // Same node, new instance: its counts add to the old one's, nothing twice,
    // and it replaces the old instance (a new node would be a second one).
    let second = Agent::start(
        "agent-2",
        &map,
        &[scaler.grpc],
        &[("NODE_NAME", "node-agent-1".into())],
    )
    .await;
    assert_eq!(
        instances(&scrape(scaler.metrics).await),
        Some(1.0),
        "the same node's new instance replaced the old one"
    );
    for _ in 0..50 {
        connect_refused(target);
    }
    eventually(
        "150 attempts at the scaler",
        Duration::from_secs(10),
        || async { (scaler.attempts(NS, "agent-restart").await == 150.0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(scaler.attempts(NS, "agent-restart").await, 150.0);
    assert_eq!(second.attempts(NS, "agent-restart").await, 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scaler_replicas_report_the_same_totals() {
    if !bpf_available("two_scaler_replicas_report_the_same_totals") {
        return;
    }
    let target = addr("127.101.4.1:8080");
    let a = Scaler::start("scaler-a").await;
    let b = Scaler::start("scaler-b").await;
    let _agent = Agent::start(
        "agent",
        &map("replicas", "127.101.4.1", 8080),
        &[a.grpc, b.grpc],
        &[],
    )
    .await;
    for _ in 0..500 {
        connect_refused(target);
    }
    eventually(
        "500 attempts on both replicas",
        Duration::from_secs(10),
        || async {
            let (x, y) = (
                a.attempts(NS, "replicas").await,
                b.attempts(NS, "replicas").await,
            );
            (x == 500.0 && y == 500.0).then_some(())
        },
    )
    .await;
    let object = scaled_object(NS, "replicas", &[("window", "60s")]);
    let (mut ka, mut kb) = (a.keda().await, b.keda().await);
    assert_eq!(
        get_metrics(&mut ka, &object).await,
        get_metrics(&mut kb, &object).await
    );
    assert!(is_active(&mut ka, &object).await && is_active(&mut kb, &object).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_very_first_attempt_through_the_seed_query() {
    if !bpf_available("prometheus_sees_the_very_first_attempt_through_the_seed_query")
        || !tool_available("prometheus fallback", "/usr/bin/prometheus")
    {
        return;
    }
    let target = addr("127.101.5.1:8080");
    let scaler = Scaler::start("scaler").await;
    let _agent = Agent::start(
        "agent",
        &map("prom", "127.101.5.1", 8080),
        &[scaler.grpc],
        &[],
    )
    .await;
    let dir = TempDir::new("prometheus");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: itw-scaler\n    static_configs:\n      - targets: ['{}']\n",
            scaler.metrics
        ),
    )
    .expect("prometheus config");
    let web = loopback(free_port());
    let _prometheus = Proc::spawn_with_args(
        "prometheus",
        std::path::Path::new("/usr/bin/prometheus"),
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address={web}"),
            "--log.level=warn".into(),
        ],
        &[],
    );
    let query = |q: &str| {
        let url =
            reqwest::Url::parse_with_params(&format!("http://{web}/api/v1/query"), &[("query", q)])
                .expect("query url");
        async move {
            let body = get(url.as_str()).await?;
            let json: serde_json::Value = serde_json::from_str(&body).ok()?;
            json["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        }
    };
    // Prometheus has scraped the scaler (twice) before anyone connects.
    eventually(
        "prometheus to scrape the scaler",
        Duration::from_secs(60),
        || async {
            (query("count_over_time(up{job=\"itw-scaler\"}[1m])").await? >= 2.0).then_some(())
        },
    )
    .await;
    connect_refused(target);
    let seed = "sum(rate(internal_tcp_attempts_total{destination_namespace=\"e2e\",destination_service=\"prom\"}[1m]))";
    let rate = eventually(
        "the seed query to see the first attempt",
        Duration::from_secs(30),
        || async { query(seed).await.filter(|r| *r > 0.0) },
    )
    .await;
    assert!(rate > 0.0);
}
