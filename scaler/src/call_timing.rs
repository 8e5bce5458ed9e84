//! Times KEDA's GetMetrics inside the scaler: from the moment hyper hands
//! the request over (on its connection's task, once the headers are decoded)
//! to the moment its answer is built. That includes the time the call's task
//! waits in the serving runtime's queue, which the handler's own timing
//! (`itw_scaler_get_metrics_handler_seconds`) leaves out; what it leaves out
//! is the time before the connection's task read the request and after it
//! wrote the answer.
//!
//! This module only measures: it never changes a call or its answer.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use tonic::{
    codegen::{Service, http},
    server::NamedService,
};

use crate::metrics::ScalerMetrics;

const GET_METRICS_PATH: &str = "/externalscaler.ExternalScaler/GetMetrics";

/// The KEDA service with its GetMetrics calls timed.
#[derive(Clone)]
pub struct TimedGetMetrics<S> {
    inner: S,
    metrics: Arc<ScalerMetrics>,
}

impl<S> TimedGetMetrics<S> {
    pub fn new(inner: S, metrics: Arc<ScalerMetrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<S: NamedService> NamedService for TimedGetMetrics<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S, B> Service<http::Request<B>> for TimedGetMetrics<S>
where
    S: Service<http::Request<B>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = BoxFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timed = request.uri().path() == GET_METRICS_PATH;
        let received = Instant::now();
        let answer = self.inner.call(request);
        if !timed {
            return Box::pin(answer);
        }
        let metrics = Arc::clone(&self.metrics);
        Box::pin(async move {
            let response = answer.await;
            metrics
                .get_metrics_call_time
                .observe(received.elapsed().as_secs_f64());
            response
        })
    }
}
