//! Per-second attempt counts of one destination, and the scaler clock they are
//! kept in.
//!
//! A window of W seconds at scaler second `c` covers seconds `c-W+1 ..= c`: the
//! current (partial) second and the W-1 before it. Counts are kept sparse
//! (only seconds that had attempts), so an idle destination costs nothing and
//! a busy one costs one bucket per second of history. Nothing here locks or
//! knows about services; [`crate::store`] owns the windows and their locks.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// Window of a trigger that sets none, and the least history the scaler keeps.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// Unix time as the scaler sees it, readable as tokio [`Instant`]s for timers.
///
/// Wall-clock time is read once; after that it advances with tokio's
/// monotonic clock, so windows never jump when the system clock is stepped,
/// and tests drive it with `tokio::time::pause()`/`advance()`.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_unix_ms: i64,
    base: Instant,
}

impl Clock {
    /// The system clock, read now.
    pub fn system() -> Self {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self::starting_at(unix_ms)
    }

    /// A clock that reads `unix_ms` now (tests pin it to a known second).
    pub fn starting_at(unix_ms: i64) -> Self {
        Self {
            base_unix_ms: unix_ms,
            base: Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        let elapsed = Instant::now().saturating_duration_since(self.base);
        self.base_unix_ms
            .saturating_add(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
    }

    /// The current Unix second.
    pub fn now_second(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// The tokio instant at which this clock reads `unix_ms` (now, if that is past).
    pub fn instant_at_ms(&self, unix_ms: i64) -> Instant {
        let ahead = unix_ms.saturating_sub(self.base_unix_ms);
        match u64::try_from(ahead) {
            Ok(ms) => self.base + Duration::from_millis(ms),
            Err(_) => self.base,
        }
    }
}

/// The first second a window of `window_secs` covers at second `now`.
pub fn first_second(now: i64, window_secs: u64) -> i64 {
    let window = i64::try_from(window_secs).unwrap_or(i64::MAX);
    now.saturating_sub(window).saturating_add(1)
}

/// The first second activity counts: one more than the rate's window. With
/// whole-second buckets, the window's seconds `now - window + 1 ..= now`
/// cover between `window - 1` and `window` seconds of real time, so an
/// attempt made at the very end of a second would have left a 1-second
/// window a moment after it was made, and never activated anything. Activity
/// must not miss an attempt: it keeps one more second, so an attempt stays
/// active for at least `window` seconds (at most one more).
pub fn activity_first_second(now: i64, window_secs: u64) -> i64 {
    first_second(now, window_secs.saturating_add(1))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bucket {
    second: i64,
    attempts: u64,
}

/// Sparse per-second attempt counts, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Window {
    buckets: VecDeque<Bucket>,
}

impl Window {
    /// Counts `attempts` in `second`. Seconds normally arrive in order; one
    /// that arrives late (another agent's batch, a snapshot) is slotted in.
    /// True when the second is new to the window (one more bucket held).
    pub fn add(&mut self, second: i64, attempts: u64) -> bool {
        if attempts == 0 {
            return false;
        }
        match self.buckets.back_mut() {
            Some(last) if last.second == second => {
                last.attempts = last.attempts.saturating_add(attempts);
                false
            }
            Some(last) if last.second > second => {
                match self.buckets.binary_search_by_key(&second, |b| b.second) {
                    Ok(i) => {
                        self.buckets[i].attempts =
                            self.buckets[i].attempts.saturating_add(attempts);
                        false
                    }
                    Err(i) => {
                        self.buckets.insert(i, Bucket { second, attempts });
                        true
                    }
                }
            }
            _ => {
                self.buckets.push_back(Bucket { second, attempts });
                true
            }
        }
    }

    /// Forgets every second before `first_kept`; returns how many non-empty
    /// seconds were forgotten.
    pub fn prune(&mut self, first_kept: i64) -> usize {
        let mut forgotten = 0;
        while self.buckets.front().is_some_and(|b| b.second < first_kept) {
            self.buckets.pop_front();
            forgotten += 1;
        }
        if self.buckets.is_empty() && self.buckets.capacity() > 64 {
            self.buckets = VecDeque::new();
        }
        forgotten
    }

    /// Forgets the oldest second, to make room under MAX_WINDOW_BUCKETS.
    pub fn forget_oldest(&mut self) {
        self.buckets.pop_front();
    }

    /// Gives back memory a long history left behind once it has shrunk
    /// (a window that held 15 minutes keeps its allocation otherwise).
    pub fn shrink(&mut self) {
        let len = self.buckets.len();
        if self.buckets.capacity() > 32 && self.buckets.capacity() > 2 * len {
            self.buckets.shrink_to(len + len / 2);
        }
    }

    /// Non-empty seconds held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Attempts in seconds `first..` (the newest seconds are read first, so a
    /// short window over a long history stops early).
    pub fn attempts_since(&self, first: i64) -> u64 {
        self.buckets
            .iter()
            .rev()
            .take_while(|b| b.second >= first)
            .fold(0u64, |sum, b| sum.saturating_add(b.attempts))
    }

    /// `(second, attempts)` of every non-empty second from `first` on, newest first.
    pub fn seconds_since(&self, first: i64) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.buckets
            .iter()
            .rev()
            .take_while(move |b| b.second >= first)
            .map(|b| (b.second, b.attempts))
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buckets.capacity()
    }
}

/// When a window stops exceeding `threshold` if no attempt arrives any more.
///
/// `seconds` are the non-empty seconds inside the window (any order, a second
/// may repeat when several destinations are summed). Returns the Unix second
/// from which the window holds at most `threshold` attempts, or `None` when it
/// already does. Walking from the newest second back, the second at which the
/// running sum first exceeds the threshold is the one whose expiry ends the
/// activity: it leaves the activity window (see [`activity_first_second`])
/// `window_secs` seconds after it ended.
pub fn inactive_from(
    mut seconds: Vec<(i64, u64)>,
    threshold: f64,
    window_secs: u64,
) -> Option<i64> {
    seconds.sort_unstable_by_key(|&(second, _)| std::cmp::Reverse(second));
    let mut sum = 0u64;
    for (second, attempts) in seconds {
        sum = sum.saturating_add(attempts);
        if exceeds(sum, threshold) {
            let window = i64::try_from(window_secs).unwrap_or(i64::MAX);
            return Some(second.saturating_add(window).saturating_add(1));
        }
    }
    None
}

/// The comparison of the activity rule (`store::ServiceEntry::activity`):
/// attempts exceed the threshold.
fn exceeds(attempts: u64, threshold: f64) -> bool {
    // u64 -> f64 rounds above 2^53, far beyond any real window.
    attempts as f64 > threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(seconds: &[(i64, u64)]) -> Window {
        let mut w = Window::default();
        for &(s, a) in seconds {
            w.add(s, a);
        }
        w
    }

    fn contents(w: &Window) -> Vec<(i64, u64)> {
        let mut v: Vec<_> = w.seconds_since(i64::MIN).collect();
        v.reverse();
        v
    }

    #[test]
    fn adds_in_order_merges_same_second_and_slots_in_late_seconds() {
        let w = window(&[
            (100, 1),
            (100, 2),
            (102, 5),
            (101, 7),
            (99, 1),
            (102, 1),
            (101, 1),
        ]);
        assert_eq!(contents(&w), vec![(99, 1), (100, 3), (101, 8), (102, 6)]);
        // Zero attempts leave no bucket.
        let w = window(&[(100, 0)]);
        assert!(w.is_empty());
    }

    #[test]
    fn sums_only_the_seconds_of_the_window() {
        let w = window(&[(90, 4), (95, 1), (99, 2), (100, 3)]);
        // A 1-second window at second 100 is second 100 alone.
        assert_eq!(w.attempts_since(first_second(100, 1)), 3);
        assert_eq!(first_second(100, 1), 100);
        assert_eq!(w.attempts_since(first_second(100, 2)), 5);
        assert_eq!(first_second(100, 10), 91);
        // Activity keeps one second more.
        assert_eq!(activity_first_second(100, 1), 99);
        assert_eq!(activity_first_second(100, 10), 90);
        assert_eq!(w.attempts_since(first_second(100, 10)), 6);
        assert_eq!(w.attempts_since(first_second(100, 11)), 10);
        assert_eq!(w.attempts_since(first_second(120, 10)), 0);
    }

    /// #13 item 4: a window that held a long history gives its memory
    /// back once pruned, and says how many seconds it forgot.
    #[test]
    fn a_pruned_long_history_gives_its_memory_back() {
        let mut w = Window::default();
        for s in 0..1000 {
            assert!(w.add(s, 1));
        }
        assert!(!w.add(999, 1), "a second already held is no new bucket");
        assert!(w.capacity() >= 1000);
        assert_eq!(w.prune(990), 990);
        w.shrink();
        assert_eq!(w.len(), 10);
        assert!(w.capacity() < 64, "capacity {}", w.capacity());
        w.forget_oldest();
        assert_eq!(contents(&w).first(), Some(&(991, 1)));
    }

    #[test]
    fn prune_forgets_old_seconds() {
        let mut w = window(&[(90, 4), (95, 1), (99, 2)]);
        w.prune(95);
        assert_eq!(contents(&w), vec![(95, 1), (99, 2)]);
        w.prune(100);
        assert!(w.is_empty());
    }

    #[test]
    fn inactive_from_is_when_the_exceeding_second_leaves_the_window() {
        // Threshold 0: the newest attempt decides. Second 105 ends at 106
        // and leaves a 10-second activity window when second 116 begins.
        assert_eq!(inactive_from(vec![(100, 1), (105, 1)], 0.0, 10), Some(116));
        // Threshold 2: seconds 105 (1) and 103 (1) sum to 2, not above; 100
        // makes it 5, so activity ends when 100 leaves at 111.
        assert_eq!(
            inactive_from(vec![(105, 1), (100, 3), (103, 1)], 2.0, 10),
            Some(111)
        );
        // Repeated seconds (several ports) add up.
        assert_eq!(inactive_from(vec![(105, 1), (105, 2)], 2.0, 10), Some(116));
        // Not above the threshold: already inactive.
        assert_eq!(inactive_from(vec![(105, 1), (104, 1)], 2.0, 10), None);
        assert_eq!(inactive_from(vec![], 0.0, 10), None);
        // Fractional thresholds compare as numbers.
        assert_eq!(inactive_from(vec![(105, 2)], 1.5, 3), Some(109));
        assert_eq!(inactive_from(vec![(105, 1)], 1.5, 3), None);
    }

    #[tokio::test(start_paused = true)]
    async fn clock_follows_tokio_time() {
        let clock = Clock::starting_at(1_000_500);
        assert_eq!(clock.now_ms(), 1_000_500);
        assert_eq!(clock.now_second(), 1000);
        let at = clock.instant_at_ms(1_002_000);
        tokio::time::advance(Duration::from_millis(1499)).await;
        assert_eq!(clock.now_ms(), 1_001_999);
        assert_eq!(clock.now_second(), 1001);
        assert!(Instant::now() < at);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(Instant::now(), at);
        assert_eq!(clock.now_second(), 1002);
        // A past time maps to no later than now.
        assert!(clock.instant_at_ms(0) <= Instant::now());
    }
}
