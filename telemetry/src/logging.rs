//! Log setup: `RUST_LOG` filters (default `info`), `LOG_FORMAT` picks text for
//! people or JSON lines for cluster log pipelines.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Fails on a malformed `RUST_LOG` rather than
/// silently logging nothing.
pub fn init(format: LogFormat) -> Result<(), crate::Error> {
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(directives)?,
        _ => EnvFilter::new("info"),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    // Colour codes only where a person reads them, not in log files.
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|_| crate::Error::LoggingAlreadyInstalled)
}

/// A budget for a warning any peer can provoke (a refused stream, a bad
/// request): at most `max` lines per `period`; the rest are counted and the
/// next line allowed says how many were left out, so logs stay bounded
/// however fast a peer retries.
pub struct LogBudget {
    period: std::time::Duration,
    max: u32,
    state: parking_lot::Mutex<BudgetState>,
}

struct BudgetState {
    started: Option<tokio::time::Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    pub const fn new(max: u32, period: std::time::Duration) -> Self {
        Self {
            period,
            max,
            state: parking_lot::Mutex::new(BudgetState {
                started: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(left out since the last allowed line)` when this line may be
    /// logged; `None` when it is over the budget (and counted).
    pub fn allow(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut state = self.state.lock();
        let fresh = state
            .started
            .is_none_or(|at| now.saturating_duration_since(at) >= self.period);
        if fresh {
            state.started = Some(now);
            state.used = 0;
        }
        if state.used >= self.max {
            state.suppressed = state.suppressed.saturating_add(1);
            return None;
        }
        state.used += 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::LogBudget;

    #[tokio::test(start_paused = true)]
    async fn a_budget_allows_max_lines_per_period_and_counts_the_rest() {
        let budget = LogBudget::new(3, Duration::from_secs(60));
        let first: Vec<_> = (0..5).map(|_| budget.allow()).collect();
        assert_eq!(first, vec![Some(0), Some(0), Some(0), None, None]);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(budget.allow(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(budget.allow(), Some(3));
        assert_eq!(budget.allow(), Some(0));
    }
}
