//! Cleaning a process name read from kernel memory: every byte after its
//! first NUL zeroed, so that equal names are equal map keys.
//!
//! The eBPF programs run this on every counted connect (the leader's `comm`
//! is read whole, and a name set shorter after a longer one keeps the longer
//! one's tail there). It lives here, not in the programs' crate, so that the
//! host's tests run it; it must stay loop-free on little-endian (what the BPF
//! targets this project builds are) and never panic.

use crate::{COMM_LEN, Comm};

/// Zeroes every byte of `comm` after its first NUL (a name with none is left
/// as it is).
///
/// Word-wise on the two halves: a byte loop keeps sixteen values live and
/// the BPF backend spills them, which costs more than the rest of the
/// program.
#[inline(always)]
pub fn zero_after_nul(comm: &mut Comm) {
    const _: () = assert!(COMM_LEN == 16);
    let ptr = comm.as_mut_ptr().cast::<[u64; 2]>();
    // SAFETY: a Comm is 16 bytes; unaligned accesses of the same memory.
    let [first, second] = unsafe { ptr.read_unaligned() };
    let (first_kept, first_ended) = keep_before_nul(first);
    let second_kept = if first_ended {
        0
    } else {
        keep_before_nul(second).0
    };
    // SAFETY: as above.
    unsafe { ptr.write_unaligned([first_kept, second_kept]) };
}

/// The bytes of `word`, as loaded from memory on this machine, before its
/// first zero byte in memory order (the rest zeroed), and whether it has one.
#[inline(always)]
pub fn keep_before_nul(word: u64) -> (u64, bool) {
    #[cfg(target_endian = "little")]
    {
        keep_before_nul_little(word)
    }
    #[cfg(target_endian = "big")]
    {
        keep_before_nul_big(word)
    }
}

/// [`keep_before_nul`] where memory order is from the least significant
/// byte up (little-endian): a bit trick, no loop.
#[inline(always)]
pub fn keep_before_nul_little(word: u64) -> (u64, bool) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // The high bit of each zero byte; exact for the lowest one (the first in
    // memory), which is the only one used.
    let zeros = word.wrapping_sub(ONES) & !word & HIGHS;
    let first = zeros & zeros.wrapping_neg();
    // All-ones below the first zero byte; all-ones when there is none.
    let keep = (first >> 7).wrapping_sub(1);
    (word & keep, zeros != 0)
}

/// [`keep_before_nul`] where memory order is from the most significant byte
/// down (big-endian).
#[inline(always)]
pub fn keep_before_nul_big(word: u64) -> (u64, bool) {
    let mut keep = 0u64;
    let mut ended = false;
    for i in 0..8 {
        let byte = 0xff00_0000_0000_0000u64 >> (8 * i);
        ended |= word & byte == 0;
        if !ended {
            keep |= byte;
        }
    }
    (word & keep, ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes before the NUL: the values a borrow or sign trick gets wrong.
    const BEFORE: [u8; 6] = [0x01, 0x02, 0x7f, 0x80, 0xff, b'k'];
    /// Bytes after it, which must all end up zero (more NULs among them).
    const AFTER: [u8; 5] = [0x00, 0x01, 0x80, 0xff, b'x'];

    /// Eight bytes in memory order: `before` up to `nul`, a NUL there (none
    /// when `nul` is 8), `after` past it.
    fn bytes(nul: usize, before: u8, after: u8) -> [u8; 8] {
        core::array::from_fn(|i| match i.cmp(&nul) {
            core::cmp::Ordering::Less => before,
            core::cmp::Ordering::Equal => 0,
            core::cmp::Ordering::Greater => after,
        })
    }

    /// What every form must give for `input`: the bytes before the first
    /// NUL, zeros from it on, and whether there was one.
    fn kept(input: [u8; 8]) -> ([u8; 8], bool) {
        let end = input.iter().position(|b| *b == 0);
        let out = core::array::from_fn(|i| {
            if end.is_some_and(|e| i >= e) {
                0
            } else {
                input[i]
            }
        });
        (out, end.is_some())
    }

    fn check_each_nul_position(
        form: fn(u64) -> (u64, bool),
        load: fn([u8; 8]) -> u64,
        store: fn(u64) -> [u8; 8],
    ) {
        for nul in 0..=8 {
            for before in BEFORE {
                for after in AFTER {
                    let input = bytes(nul, before, after);
                    let (word, ended) = form(load(input));
                    assert_eq!(
                        (store(word), ended),
                        kept(input),
                        "{input:02x?} (NUL at {nul})"
                    );
                }
            }
        }
    }

    #[test]
    fn little_endian_keeps_the_bytes_before_each_nul_position() {
        check_each_nul_position(keep_before_nul_little, u64::from_le_bytes, u64::to_le_bytes);
    }

    #[test]
    fn big_endian_keeps_the_bytes_before_each_nul_position() {
        check_each_nul_position(keep_before_nul_big, u64::from_be_bytes, u64::to_be_bytes);
    }

    #[test]
    fn this_machines_form_reads_words_as_loaded_from_memory() {
        check_each_nul_position(keep_before_nul, u64::from_ne_bytes, u64::to_ne_bytes);
    }

    #[test]
    fn a_word_without_nul_is_kept_whole() {
        for word in [u64::MAX, 0x0101_0101_0101_0101, 0x8080_8080_8080_8080] {
            assert_eq!(keep_before_nul_little(word), (word, false));
            assert_eq!(keep_before_nul_big(word), (word, false));
        }
        assert_eq!(keep_before_nul_little(0), (0, true));
        assert_eq!(keep_before_nul_big(0), (0, true));
    }

    #[test]
    fn a_name_keeps_what_is_before_its_first_nul_in_either_half() {
        for nul in 0..=COMM_LEN {
            for after in AFTER {
                let mut comm: Comm = core::array::from_fn(|i| match i.cmp(&nul) {
                    core::cmp::Ordering::Less => b'a' + i as u8,
                    core::cmp::Ordering::Equal => 0,
                    core::cmp::Ordering::Greater => after,
                });
                let want: Comm = core::array::from_fn(|i| if i < nul { b'a' + i as u8 } else { 0 });
                zero_after_nul(&mut comm);
                // With no NUL at all (nul == 16) the name is left whole.
                assert_eq!(comm, want, "NUL at {nul}, then {after:#04x}");
            }
        }
    }
}
