//! The `/metrics` HTTP endpoint both binaries serve on `METRICS_ADDR`.

use std::{future::Future, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::{ConnectInfo, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::{
    exposition::{self, ScrapeView, Scrapers},
    listener::{Guard, GuardedListener, OnClose, PeerAddr},
};

/// Something that can write its metrics for one scrape.
pub trait MetricsSource: Send + Sync + 'static {
    /// Appends every metric family (without the `# EOF` marker) to `out`.
    fn encode(&self, out: &mut String, view: &ScrapeView) -> std::fmt::Result;
}

struct Endpoint {
    source: Arc<dyn MetricsSource>,
    scrapers: Scrapers,
}

/// A router serving `GET /metrics` from `source`. Binaries merge their own
/// routes (health, readiness) into it.
pub fn metrics_router(source: Arc<dyn MetricsSource>) -> Router {
    let endpoint = Arc::new(Endpoint {
        source,
        scrapers: Scrapers::default(),
    });
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(endpoint)
}

async fn metrics(
    State(endpoint): State<Arc<Endpoint>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
) -> Response {
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let is_scraper = headers.contains_key(exposition::SCRAPE_HEADER);
    let view = endpoint.scrapers.begin(peer.ip(), user_agent, is_scraper);
    let mut body = String::with_capacity(16 * 1024);
    let encoded = endpoint
        .source
        .encode(&mut body, &view)
        .and_then(|()| exposition::encode_eof(&mut body));
    match encoded {
        Ok(()) => ([(header::CONTENT_TYPE, exposition::CONTENT_TYPE)], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response(),
    }
}

/// Binds `addr`, naming it in the error (the usual cause is a port in use).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Bind { addr, source })
}

/// Serves `router` until `shutdown` resolves, under the default [`Guard`]
/// (at most 256 connections, closed after 60 s without a byte from the
/// peer), so idle sockets cannot exhaust the process.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::Error> {
    serve_guarded(
        listener,
        Guard::default(),
        Arc::new(|_| {}),
        router,
        shutdown,
    )
    .await
}

/// Serves `router` until `shutdown` resolves, under `guard`; `on_close`
/// learns of each connection the guard closes.
pub async fn serve_guarded(
    listener: TcpListener,
    guard: Guard,
    on_close: OnClose,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::Error> {
    axum::serve(
        GuardedListener::new(listener, guard, on_close),
        router.into_make_service_with_connect_info::<PeerAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(crate::Error::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::{AttemptLabels, AttemptSeries, encode_attempts};
    use tokio::time::Instant;

    struct OneSeries {
        labels: AttemptLabels,
        created: Instant,
    }

    impl MetricsSource for OneSeries {
        fn encode(&self, out: &mut String, view: &ScrapeView) -> std::fmt::Result {
            encode_attempts(
                out,
                view,
                [AttemptSeries {
                    labels: &self.labels,
                    attempts: 1,
                    created: self.created,
                }],
            )
        }
    }

    #[tokio::test]
    async fn serves_openmetrics_and_zero_first_to_scrapers_only() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let created = Instant::now();
        let source = Arc::new(OneSeries {
            labels: AttemptLabels::service("default", "my-svc"),
            created,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics_router(source), async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/metrics");
        let scrape = || {
            client
                .get(&url)
                .header("X-Prometheus-Scrape-Timeout-Seconds", "10")
                .header("User-Agent", "Prometheus/2.42.0")
        };
        let line = "internal_tcp_attempts_total{destination_namespace=\"default\",destination_service=\"my-svc\",destination_pod=\"\",process_comm=\"\"}";

        // The scraper's first scrape: the truth. The series was created before
        // its second scrape began, so it keeps the count after that too.
        let first = scrape().send().await.unwrap();
        assert_eq!(first.headers()["content-type"], exposition::CONTENT_TYPE);
        let body = first.text().await.unwrap();
        assert!(body.contains(&format!("{line} 1\n")), "{body}");
        assert!(body.ends_with("# EOF\n"));
        let body = scrape().send().await.unwrap().text().await.unwrap();
        assert!(body.contains(&format!("{line} 1\n")), "{body}");
        // Plain curl: the truth.
        let body = client.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(body.contains(&format!("{line} 1\n")), "{body}");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    /// #13 item 2: idle sockets neither stay open nor exhaust the server;
    /// once they are closed, scrapes are served again.
    #[tokio::test]
    async fn idle_connections_are_capped_and_closed() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use tokio::io::AsyncReadExt;

        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = Arc::new(OneSeries {
            labels: AttemptLabels::service("default", "my-svc"),
            created: Instant::now(),
        });
        let closed = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let counts = Arc::clone(&closed);
        let on_close: OnClose = Arc::new(move |why| {
            counts[usize::from(why == "idle")].fetch_add(1, SeqCst);
        });
        let guard = Guard {
            max_connections: 2,
            idle_timeout: std::time::Duration::from_millis(300),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_guarded(
            listener,
            guard,
            on_close,
            metrics_router(source),
            async {
                let _ = stopped.await;
            },
        ));
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Every idle socket is closed by the server: the third at once, the
        // first two after the idle timeout.
        for socket in &mut idle {
            let mut byte = [0u8; 1];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut byte))
                    .await;
            assert!(
                matches!(read, Ok(Ok(0) | Err(_))),
                "an idle socket stayed open: {read:?}"
            );
        }
        assert_eq!((closed[0].load(SeqCst), closed[1].load(SeqCst)), (1, 2));
        let body = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.ends_with("# EOF\n"), "{body}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
