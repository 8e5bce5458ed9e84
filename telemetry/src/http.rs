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

use crate::exposition::{self, ScrapeView, Scrapers};

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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
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

/// Serves `router` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::Error> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
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
}
