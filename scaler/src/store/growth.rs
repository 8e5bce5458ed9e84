//! How the per-agent tables grow: by an eighth, not by doubling.
//!
//! Every agent instance holds a few tables of about its series' count (200
//! for a node), sized exactly by its snapshot. A Vec that doubles when one
//! more series comes would hold twice the room for the rest of the
//! instance's life; growing by an eighth wastes at most an eighth, and
//! still costs amortised O(1) per push.

/// Room made at least, so that small tables do not grow one entry at a time.
const MIN_GROWTH: usize = 4;

/// Makes room for `additional` more entries in `entries`: exactly that
/// many, or an eighth of its length (at least [`MIN_GROWTH`]) if that is
/// more. An empty table gets exactly what it asks for.
pub(super) fn reserve_by_an_eighth<T>(entries: &mut Vec<T>, additional: usize) {
    if entries.capacity() - entries.len() >= additional {
        return;
    }
    let grow = if entries.is_empty() {
        additional
    } else {
        additional.max(entries.len() / 8).max(MIN_GROWTH)
    };
    entries.reserve_exact(grow);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_grows_by_an_eighth_and_a_small_one_by_four() {
        let mut entries: Vec<u64> = Vec::with_capacity(200);
        entries.extend(0..200);
        reserve_by_an_eighth(&mut entries, 1);
        assert_eq!(entries.capacity(), 225);
        // More than an eighth asked: exactly that.
        reserve_by_an_eighth(&mut entries, 100);
        assert_eq!(entries.capacity(), 300);
        let mut small: Vec<u64> = vec![1];
        small.shrink_to_fit();
        reserve_by_an_eighth(&mut small, 1);
        assert_eq!(small.capacity(), 5);
        // Room left: nothing changes.
        small.push(2);
        reserve_by_an_eighth(&mut small, 1);
        assert_eq!(small.capacity(), 5);
    }

    #[test]
    fn an_empty_table_gets_exactly_what_it_asks_for() {
        let mut entries: Vec<u64> = Vec::new();
        reserve_by_an_eighth(&mut entries, 200);
        assert_eq!(entries.capacity(), 200);
    }
}
