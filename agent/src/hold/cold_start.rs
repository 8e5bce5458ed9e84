//! The cold start of one held ClusterIP:port, as its parked clients see it:
//! the first client parked -> an endpoint ready -> the first parked client
//! released -> that client's first byte from the Service (the phases of
//! [`crate::coldstart`]). Observed once per held destination, whatever the
//! number of clients parked there, so a burst of clients does not weigh one
//! cold start many times; each client's own wait stays in
//! `itw_agent_hold_seconds`.
//!
//! Never delays a byte: the first-byte watch only notes the time as the
//! splice reads.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use crate::{
    coldstart::{
        ColdStartMetrics, ENDPOINT_READY_TO_RELEASED, PARKED_TO_ENDPOINT_READY,
        RELEASED_TO_FIRST_BYTE,
    },
    resolve::ServiceRef,
};

#[derive(Debug, Default)]
struct Stamps {
    /// The first client parked.
    parked: Option<Instant>,
    /// The agent learned of a ready endpoint.
    ready: Option<Instant>,
    /// A parked client was released (only the first one counts).
    released: bool,
}

/// One held destination's cold start.
#[derive(Debug)]
pub struct HeldColdStart {
    service: ServiceRef,
    metrics: Arc<ColdStartMetrics>,
    stamps: Mutex<Stamps>,
}

impl HeldColdStart {
    pub fn new(service: ServiceRef, metrics: Arc<ColdStartMetrics>) -> Self {
        Self {
            service,
            metrics,
            stamps: Mutex::new(Stamps::default()),
        }
    }

    fn observe(&self, phase: &'static str, from: Instant, to: Instant) {
        self.metrics.observe(
            &self.service,
            phase,
            to.saturating_duration_since(from).as_secs_f64(),
        );
    }

    /// A client was parked at `at`; the first one starts the cold start.
    pub fn parked(&self, at: Instant) {
        let mut stamps = self.stamps.lock();
        if stamps.parked.is_none() && stamps.ready.is_none() {
            stamps.parked = Some(at);
        }
    }

    /// The agent learned at `at` that the Service has a ready endpoint (and
    /// is releasing the destination).
    pub fn endpoint_ready(&self, at: Instant) {
        let mut stamps = self.stamps.lock();
        if stamps.ready.is_some() {
            return;
        }
        stamps.ready = Some(at);
        if let Some(parked) = stamps.parked {
            drop(stamps);
            self.observe(PARKED_TO_ENDPOINT_READY, parked, at);
        }
    }

    /// A parked client's connection to the Service was made at `at` (its
    /// splice starts now). The first one after an endpoint was ready
    /// observes the release and gets the watch for its first byte.
    pub fn released(self: &Arc<Self>, at: Instant) -> Option<FirstByte> {
        let mut stamps = self.stamps.lock();
        let ready = match (stamps.parked, stamps.ready) {
            (Some(_), Some(ready)) if !stamps.released => ready,
            _ => return None,
        };
        stamps.released = true;
        drop(stamps);
        self.observe(ENDPOINT_READY_TO_RELEASED, ready, at);
        Some(FirstByte {
            cold_start: Arc::clone(self),
            released: at,
        })
    }
}

/// The last phase of a cold start: waits for the released client's first
/// byte from the Service.
#[derive(Debug)]
pub struct FirstByte {
    cold_start: Arc<HeldColdStart>,
    released: Instant,
}

impl FirstByte {
    pub fn arrived(self, at: Instant) {
        self.cold_start
            .observe(RELEASED_TO_FIRST_BYTE, self.released, at);
    }
}

/// The upstream side of a splice, noting when its first byte is read.
pub struct Watched<S> {
    inner: S,
    first_byte: Option<FirstByte>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, first_byte: Option<FirstByte>) -> Self {
        Self { inner, first_byte }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && let Some(first_byte) = self.first_byte.take()
        {
            first_byte.arrived(Instant::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::coldstart::tests::series;

    fn held() -> (Arc<HeldColdStart>, Arc<ColdStartMetrics>) {
        let metrics = Arc::new(ColdStartMetrics::default());
        let cold_start = Arc::new(HeldColdStart::new(
            ServiceRef::new("apps", "web"),
            Arc::clone(&metrics),
        ));
        (cold_start, metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_parked_client_tells_each_phase_once() {
        let (cold_start, metrics) = held();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        cold_start.parked(at(0));
        cold_start.parked(at(100));
        // A pod start: 2.2 s after the first client was parked.
        cold_start.endpoint_ready(at(2_200));
        cold_start.endpoint_ready(at(2_300));
        let first = cold_start
            .released(at(2_204))
            .expect("the first release counts");
        assert!(cold_start.released(at(2_205)).is_none(), "only the first");
        first.arrived(at(2_254));
        assert_eq!(
            series(&metrics, "web", PARKED_TO_ENDPOINT_READY),
            vec![
                "itw_agent_cold_start_seconds_sum{} 2.2",
                "itw_agent_cold_start_seconds_count{} 1",
                "itw_agent_cold_start_seconds_bucket{le=\"2.5\",} 1",
                "itw_agent_cold_start_seconds_bucket{le=\"5.0\",} 1",
                "itw_agent_cold_start_seconds_bucket{le=\"10.0\",} 1",
                "itw_agent_cold_start_seconds_bucket{le=\"20.0\",} 1",
                "itw_agent_cold_start_seconds_bucket{le=\"30.0\",} 1",
                "itw_agent_cold_start_seconds_bucket{le=\"60.0\",} 1",
                "itw_agent_cold_start_seconds_bucket{le=\"+Inf\",} 1",
            ]
        );
        let released = series(&metrics, "web", ENDPOINT_READY_TO_RELEASED);
        assert_eq!(released[0], "itw_agent_cold_start_seconds_sum{} 0.004");
        assert_eq!(released[1], "itw_agent_cold_start_seconds_count{} 1");
        assert_eq!(
            released[2],
            "itw_agent_cold_start_seconds_bucket{le=\"0.005\",} 1"
        );
        let first_byte = series(&metrics, "web", RELEASED_TO_FIRST_BYTE);
        assert_eq!(first_byte[0], "itw_agent_cold_start_seconds_sum{} 0.05");
        assert_eq!(first_byte[1], "itw_agent_cold_start_seconds_count{} 1");
        assert_eq!(
            first_byte[2],
            "itw_agent_cold_start_seconds_bucket{le=\"0.05\",} 1"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_parked_client_or_a_ready_endpoint_nothing_is_observed() {
        let (cold_start, metrics) = held();
        let t0 = Instant::now();
        // Released for another reason than a ready endpoint: no phase ends.
        assert!(cold_start.released(t0).is_none());
        // Ready before anyone was parked: nobody waited.
        cold_start.endpoint_ready(t0);
        cold_start.parked(t0);
        assert!(cold_start.released(t0).is_none());
        for phase in [
            PARKED_TO_ENDPOINT_READY,
            ENDPOINT_READY_TO_RELEASED,
            RELEASED_TO_FIRST_BYTE,
        ] {
            assert_eq!(series(&metrics, "web", phase), Vec::<String>::new());
        }
    }

    #[tokio::test]
    async fn the_watched_splice_notes_its_first_byte_and_passes_every_byte() {
        let (cold_start, metrics) = held();
        let t0 = Instant::now();
        cold_start.parked(t0);
        cold_start.endpoint_ready(t0);
        let first_byte = cold_start.released(t0);
        let (ours, mut service) = tokio::io::duplex(64);
        let mut upstream = Watched::new(ours, first_byte);
        upstream.write_all(b"GET").await.unwrap();
        let mut asked = [0u8; 3];
        service.read_exact(&mut asked).await.unwrap();
        assert_eq!(&asked, b"GET");
        assert_eq!(
            series(&metrics, "web", RELEASED_TO_FIRST_BYTE),
            Vec::<String>::new()
        );
        service.write_all(b"OK").await.unwrap();
        let mut answer = [0u8; 2];
        upstream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"OK");
        assert_eq!(
            series(&metrics, "web", RELEASED_TO_FIRST_BYTE)[1],
            "itw_agent_cold_start_seconds_count{} 1"
        );
    }
}
