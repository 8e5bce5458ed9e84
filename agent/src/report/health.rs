//! Whether the agent reaches any scaler at all, for `/readyz`.
//!
//! A stream counts as up once its replica has the snapshot (and resends):
//! from then on its counts reach KEDA. The agent is not ready once no stream
//! has been up for `SCALER_NOT_READY_AFTER` (since start, or since the last
//! one went down), so a DaemonSet shows agents that count for nobody; a
//! scaler's rolling restart (another replica up) or a restart shorter than
//! that leaves readiness alone. It never stops counting or reporting.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Streams up, since when none is, and the last failure's text.
#[derive(Debug)]
pub struct ReportHealth {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    up: usize,
    /// Since when no stream has been up (`None` while one is).
    down_since: Option<Instant>,
    last_failure: Option<String>,
}

impl Default for ReportHealth {
    /// No stream up yet: down since now.
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                up: 0,
                down_since: Some(Instant::now()),
                last_failure: None,
            }),
        }
    }
}

impl ReportHealth {
    pub(super) fn stream_up(&self) {
        let mut state = self.state.lock();
        state.up += 1;
        state.down_since = None;
    }

    pub(super) fn stream_down(&self) {
        let mut state = self.state.lock();
        state.up = state.up.saturating_sub(1);
        if state.up == 0 {
            state.down_since = Some(Instant::now());
        }
    }

    /// A failed session's cause, shown by `/readyz` while none is up.
    pub(super) fn failed(&self, cause: &str) {
        self.state.lock().last_failure = Some(cause.to_owned());
    }

    /// Whether a stream to some replica is up now.
    pub fn any_up(&self) -> bool {
        self.state.lock().up > 0
    }

    /// Why the agent is not ready, if no stream has been up for `after`
    /// (zero: never for this reason).
    pub fn unready(&self, after: Duration) -> Option<String> {
        if after.is_zero() {
            return None;
        }
        let state = self.state.lock();
        let down_for = state.down_since?.elapsed();
        if down_for < after {
            return None;
        }
        let cause = state
            .last_failure
            .as_deref()
            .unwrap_or("no replica found or connected yet");
        Some(format!(
            "no stream to any scaler replica up for {}s (SCALER_NOT_READY_AFTER={}): {cause}",
            down_for.as_secs(),
            humantime::format_duration(after)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(300);

    #[tokio::test(start_paused = true)]
    async fn not_ready_only_once_no_stream_has_been_up_for_the_setting() {
        let health = ReportHealth::default();
        tokio::time::advance(AFTER - Duration::from_millis(1)).await;
        assert_eq!(health.unready(AFTER), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            health.unready(AFTER).as_deref(),
            Some(
                "no stream to any scaler replica up for 300s (SCALER_NOT_READY_AFTER=5m): no replica found or connected yet"
            )
        );
        assert_eq!(health.unready(Duration::ZERO), None, "0 turns it off");
        // One replica up: ready at once, however long the others are down.
        health.stream_up();
        health.stream_up();
        assert_eq!(health.unready(AFTER), None);
        health.failed("scaler answered Unauthenticated: bad token");
        health.stream_down();
        tokio::time::advance(AFTER * 2).await;
        assert_eq!(health.unready(AFTER), None, "the other replica is up");
        // The last one down: a restart shorter than the setting is no flap.
        health.stream_down();
        tokio::time::advance(AFTER - Duration::from_secs(1)).await;
        assert_eq!(health.unready(AFTER), None);
        health.stream_up();
        health.stream_down();
        tokio::time::advance(AFTER - Duration::from_secs(1)).await;
        assert_eq!(health.unready(AFTER), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            health.unready(AFTER).as_deref(),
            Some(
                "no stream to any scaler replica up for 300s (SCALER_NOT_READY_AFTER=5m): scaler answered Unauthenticated: bad token"
            )
        );
    }
}
