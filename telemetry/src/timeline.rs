//! The activation timeline: `trace` events under the [`TARGET`] target at
//! each hand-off between a connect and `StreamIsActive: true`, stamped with
//! [`monotonic_us`]. Off unless `RUST_LOG` names the target
//! (`RUST_LOG=info,itw_timeline=trace`), and then only on the wake path, so a
//! slow activation can be taken apart across the agent, the scaler and the
//! caller without a profiler.

use rustix::time::{ClockId, clock_gettime};

/// The `tracing` target of every timeline event.
pub const TARGET: &str = "itw_timeline";

/// CLOCK_MONOTONIC in microseconds: the clock behind Rust's `Instant` on
/// Linux, readable here as a number so stamps from different processes on
/// one machine compare.
pub fn monotonic_us() -> u64 {
    let now = clock_gettime(ClockId::Monotonic);
    // Monotonic time is never negative.
    now.tv_sec.unsigned_abs() * 1_000_000 + now.tv_nsec.unsigned_abs() / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_microseconds_of_the_clock_behind_instant() {
        let outer = std::time::Instant::now();
        let before = monotonic_us();
        let inner = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let inner = inner.elapsed().as_micros() as u64;
        let after = monotonic_us();
        let outer = outer.elapsed().as_micros() as u64;
        // Stamps taken inside the outer span and around the inner one: a
        // wrong unit or another clock falls outside (1 us for truncation).
        let span = after - before;
        assert!(span + 1 >= inner, "{span} us < inner {inner} us");
        assert!(span <= outer + 1, "{span} us > outer {outer} us");
    }
}
