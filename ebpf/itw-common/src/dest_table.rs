//! An open-addressed table of watched destinations laid out in a BPF
//! `ARRAY` (issue #17, prototype: only the capture bench's floor programs
//! and the bench that fills their table use it so far).
//!
//! Why: a hash map lookup is a helper call (plus jhash of the 20-byte key)
//! on every connect the hook sees, watched or not; an array lookup is
//! inlined by the verifier. Here a destination lives in one of
//! [`PROBES`] consecutive slots from its home slot ([`home`]); a lookup
//! compares at most that many slots, each an inlined array lookup and a
//! word-wise compare, and calls nothing.
//!
//! The rules both sides keep:
//! - a slot matches only when its state is [`LIVE`]: the state sits in the
//!   key's last word beside the port, so the one compare covers both;
//! - a slot is [`EMPTY`] until first used and never becomes empty again
//!   (a removed entry's slot is [`DEAD`]), so a lookup that meets an empty
//!   slot may stop: nothing was ever placed beyond it in that window;
//! - an entry that finds no free slot within [`PROBES`] of its home goes to
//!   an overflow hash map, and its home slot gets `home_overflowed`: only a
//!   lookup that ends without a match at such a home pays the hash lookup.
//!
//! What it must never do: call a helper on the lookup path, or loop past
//! [`PROBES`] slots.

use crate::Destination;

/// Slots compared at most per lookup. Four 32-byte slots are two cache
/// lines; at the fill the agent sizes for (at most half the slots live)
/// linear probing places all but a small fraction within it (the bench
/// prints the fraction at 10k Services and 100k endpoints).
pub const PROBES: u32 = 4;

/// Never used: a lookup stops here.
pub const EMPTY: u8 = 0;
/// Holds a watched destination.
pub const LIVE: u8 = 1;
/// Held one once: a lookup goes on past it; the agent reuses it only after
/// every program that may have read it as live has ended.
pub const DEAD: u8 = 2;

/// One slot of the table (32 bytes, so two per cache line when the array's
/// values are, as the kernel lays them out, back to back).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DestSlot {
    /// As [`Destination::addr`].
    pub addr: [u8; 16],
    /// As [`Destination::port`].
    pub port: u16,
    /// [`EMPTY`], [`LIVE`] or [`DEAD`].
    pub state: u8,
    /// Non-zero: an entry whose home is this slot is in the overflow map.
    pub home_overflowed: u8,
    /// As [`crate::Watch`].
    pub dest_id: u32,
    pub generation: u32,
    pub armed: u32,
}

impl DestSlot {
    /// A live slot for `dest`.
    pub fn live(dest: &Destination, dest_id: u32, generation: u32) -> Self {
        Self {
            addr: dest.addr,
            port: dest.port,
            state: LIVE,
            home_overflowed: 0,
            dest_id,
            generation,
            armed: 1,
        }
    }
}

/// The key's five words as a lookup compares them: the address's four, then
/// the port with the state [`LIVE`] (the word a live slot for it holds, with
/// `home_overflowed` masked out by [`TAIL_MASK`]).
#[derive(Clone, Copy)]
pub struct SlotKey {
    words: [u32; 4],
    tail: u32,
}

/// The bits of a slot's fifth word that a match compares: port and state.
#[inline(always)]
fn tail_word(port: u16, state: u8, home_overflowed: u8) -> u32 {
    // Built as the bytes lie in memory, so that the word means the same on
    // either byte order.
    let [p0, p1] = port.to_ne_bytes();
    u32::from_ne_bytes([p0, p1, state, home_overflowed])
}

#[inline(always)]
fn tail_mask() -> u32 {
    tail_word(0xffff, 0xff, 0)
}

#[inline(always)]
fn overflow_mask() -> u32 {
    tail_word(0, 0, 0xff)
}

#[inline(always)]
fn state_mask() -> u32 {
    tail_word(0, 0xff, 0)
}

impl SlotKey {
    #[inline(always)]
    pub fn of(dest: &Destination) -> Self {
        // SAFETY: a Destination is aligned to 4 and starts with its 16
        // address bytes: four whole words.
        let words = unsafe { core::ptr::from_ref(dest).cast::<[u32; 4]>().read() };
        Self {
            words,
            tail: tail_word(dest.port, LIVE, 0),
        }
    }

    /// The home slot's index in a table of `mask + 1` slots.
    #[inline(always)]
    pub fn home(&self, mask: u32) -> u32 {
        mix(self.words[0] ^ self.words[1] ^ self.words[2] ^ self.words[3] ^ self.tail) & mask
    }
}

/// `lowbias32` (Chris Wellons' hash prospector): a full-avalanche 32-bit
/// mix in five cheap instructions, so neighbouring addresses and ports
/// spread over the table. Defined on the words as they lie in memory: the
/// agent and the programs run on the same CPU, so they agree.
#[inline(always)]
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The home slot of `dest` in a table of `mask + 1` slots.
pub fn home(dest: &Destination, mask: u32) -> u32 {
    SlotKey::of(dest).home(mask)
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found<P> {
    /// The live slot holding the destination.
    Hit(P),
    /// Not watched.
    Miss,
    /// Not in the table, but an entry homed where it would be is in the
    /// overflow map: look there.
    Overflow,
}

/// Looks `key` up in a table of `mask + 1` slots, `slot(i)` giving slot
/// `i` (an inlined array lookup in the programs).
///
/// Reads each slot's fields once, the address's last word first: for IPv4
/// destinations (stored IPv4-mapped) it is the word that tells most
/// non-matching slots apart, so a mismatch usually costs one load.
#[inline(always)]
pub fn find<P: Copy>(
    key: &SlotKey,
    mask: u32,
    slot: impl Fn(u32) -> Option<P>,
    read: impl Fn(P) -> ([u32; 4], u32),
) -> Found<P> {
    let home = key.home(mask);
    let mut home_overflowed = false;
    let mut i = 0;
    while i < PROBES {
        let Some(p) = slot((home + i) & mask) else {
            // Only an index past the array: the mask keeps every index in
            // it, so this is a miss the verifier needs spelled out.
            return Found::Miss;
        };
        let (words, tail) = read(p);
        if i == 0 {
            home_overflowed = tail & overflow_mask() != 0;
        }
        if words[3] == key.words[3]
            && tail & tail_mask() == key.tail
            && words[2] == key.words[2]
            && words[1] == key.words[1]
            && words[0] == key.words[0]
        {
            return Found::Hit(p);
        }
        if tail & state_mask() == tail_word(0, EMPTY, 0) {
            break;
        }
        i += 1;
    }
    if home_overflowed {
        Found::Overflow
    } else {
        Found::Miss
    }
}

/// [`find`] over a slot in memory, for a table held as a slice (the
/// agent's mirror, tests).
pub fn find_in(slots: &[DestSlot], dest: &Destination) -> Found<usize> {
    let mask = slots.len() as u32 - 1;
    find(
        &SlotKey::of(dest),
        mask,
        |i| Some(i as usize).filter(|i| *i < slots.len()),
        |i| slot_words(&slots[i]),
    )
}

/// A slot's key words as [`find`] compares them.
#[inline(always)]
pub fn slot_words(slot: &DestSlot) -> ([u32; 4], u32) {
    let words = core::ptr::from_ref(slot).cast::<u32>();
    // SAFETY: a DestSlot is aligned to 8 and starts with the 16 address
    // bytes, then port, state and home_overflowed: five whole words.
    unsafe { (words.cast::<[u32; 4]>().read(), words.add(4).read()) }
}

/// Why an entry was not placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotPlaced {
    /// Every slot of its window is live: it belongs in the overflow map,
    /// and its home slot now says so.
    WindowFull { home: usize },
}

/// Places `dest` in the first slot of its window that is not live (the
/// agent's placement; `slots.len()` a power of two). Returns the slot's
/// index, or marks the home slot and says the entry must go to the
/// overflow map. The caller writes the changed slot to the kernel.
pub fn place(
    slots: &mut [DestSlot],
    dest: &Destination,
    dest_id: u32,
    generation: u32,
) -> Result<usize, NotPlaced> {
    let mask = slots.len() as u32 - 1;
    let home = home(dest, mask);
    for i in 0..PROBES {
        let at = ((home + i) & mask) as usize;
        if slots[at].state != LIVE {
            let home_overflowed = slots[at].home_overflowed;
            slots[at] = DestSlot {
                home_overflowed,
                ..DestSlot::live(dest, dest_id, generation)
            };
            return Ok(at);
        }
    }
    slots[home as usize].home_overflowed = 1;
    Err(NotPlaced::WindowFull {
        home: home as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> Destination {
        Destination::v4([a, b, c, d], port)
    }

    /// 64 slots: mask 63.
    fn table() -> [DestSlot; 64] {
        [DestSlot::default(); 64]
    }

    #[test]
    fn a_slot_is_32_bytes_with_the_tail_word_after_the_address() {
        assert_eq!(core::mem::size_of::<DestSlot>(), 32);
        assert_eq!(core::mem::align_of::<DestSlot>(), 8);
        assert_eq!(core::mem::offset_of!(DestSlot, port), 16);
        assert_eq!(core::mem::offset_of!(DestSlot, state), 18);
        assert_eq!(core::mem::offset_of!(DestSlot, home_overflowed), 19);
        assert_eq!(core::mem::offset_of!(DestSlot, dest_id), 20);
        assert_eq!(core::mem::offset_of!(DestSlot, armed), 28);
    }

    #[test]
    fn a_placed_destination_is_found_in_its_slot_and_a_neighbour_is_not() {
        let mut slots = table();
        let db = v4(10, 96, 0, 10, 5432);
        let at = place(&mut slots, &db, 7, 1).expect("an empty table has room");
        assert_eq!(at as u32, home(&db, 63));
        assert_eq!(find_in(&slots, &db), Found::Hit(at));
        assert_eq!(slots[at].dest_id, 7);
        assert_eq!(slots[at].armed, 1);
        assert_eq!(find_in(&slots, &v4(10, 96, 0, 10, 5433)), Found::Miss);
        assert_eq!(find_in(&slots, &v4(10, 96, 0, 11, 5432)), Found::Miss);
        let mapped_elsewhere = Destination::new([0; 16], 5432);
        assert_eq!(find_in(&slots, &mapped_elsewhere), Found::Miss);
    }

    #[test]
    fn entries_sharing_a_home_take_the_next_slots_and_the_fifth_overflows() {
        let mut slots = table();
        // Destinations with the same home slot, found by trying ports.
        let first = v4(10, 244, 1, 5, 8080);
        let h = home(&first, 63);
        let same_home: [Destination; 5] = {
            let mut found = [first; 5];
            let mut n = 1;
            let mut port = 1;
            while n < 5 {
                let d = v4(10, 244, 1, 5, port);
                if home(&d, 63) == h && d != first {
                    found[n] = d;
                    n += 1;
                }
                port += 1;
            }
            found
        };
        for (i, d) in same_home[..4].iter().enumerate() {
            let at = place(&mut slots, d, i as u32 + 1, 1).expect("within the window");
            assert_eq!(at as u32, (h + i as u32) & 63);
        }
        for (i, d) in same_home[..4].iter().enumerate() {
            assert_eq!(
                find_in(&slots, d),
                Found::Hit(((h + i as u32) & 63) as usize)
            );
        }
        // A destination that is not there now looks in the overflow map,
        // and only because its home says an entry went there.
        let absent = v4(10, 244, 1, 6, 8080);
        assert_eq!(find_in(&slots, &absent), Found::Miss);
        assert_eq!(
            place(&mut slots, &same_home[4], 5, 1),
            Err(NotPlaced::WindowFull { home: h as usize })
        );
        assert_eq!(find_in(&slots, &same_home[4]), Found::Overflow);
        // Still found in place: the flag is not part of the match.
        assert_eq!(find_in(&slots, &same_home[0]), Found::Hit(h as usize));
    }

    #[test]
    fn a_dead_slot_neither_matches_nor_ends_the_search_and_is_reused() {
        let mut slots = table();
        let a = v4(10, 96, 3, 1, 80);
        let h = home(&a, 63) as usize;
        // Something else homed here first, then removed.
        slots[h] = DestSlot {
            state: DEAD,
            ..DestSlot::live(&a, 1, 1)
        };
        assert_eq!(find_in(&slots, &a), Found::Miss, "a dead copy is no match");
        slots[(h + 1) & 63] = DestSlot::live(&a, 2, 1);
        assert_eq!(find_in(&slots, &a), Found::Hit((h + 1) & 63));
        let b = v4(10, 96, 3, 1, 81);
        let hb = home(&b, 63) as usize;
        slots[hb] = DestSlot {
            state: DEAD,
            ..slots[hb]
        };
        let at = place(&mut slots, &b, 3, 1).expect("room");
        assert_eq!(at, hb, "the dead slot is the first not live");
    }

    #[test]
    fn an_empty_slot_ends_the_search_before_the_bound() {
        let mut slots = table();
        let a = v4(10, 96, 9, 9, 443);
        let h = home(&a, 63) as usize;
        // Placed by hand past an empty slot, which the agent never does:
        // the lookup must not look there.
        slots[(h + 1) & 63] = DestSlot::live(&a, 1, 1);
        assert_eq!(find_in(&slots, &a), Found::Miss);
        slots[h].state = DEAD;
        assert_eq!(find_in(&slots, &a), Found::Hit((h + 1) & 63));
    }

    #[test]
    fn the_home_is_the_same_for_a_v4_key_however_it_was_built() {
        let word = u32::from_ne_bytes([10, 96, 0, 1]);
        assert_eq!(
            home(&Destination::v4_word(word, 53), 0xffff),
            home(&Destination::v4([10, 96, 0, 1], 53), 0xffff)
        );
    }

    #[test]
    fn neighbouring_service_addresses_spread_over_the_table() {
        // 4,096 ClusterIPs in a row (one /20), port 80, into 8,192 slots:
        // as many distinct homes as a uniform hash gives.
        let mut per_slot = [0u8; 8192];
        for n in 0..4096u32 {
            let d = v4(10, 96, (n >> 8) as u8, n as u8, 80);
            per_slot[home(&d, 8191) as usize] += 1;
        }
        let max = per_slot.iter().copied().max().unwrap_or(0);
        let used = per_slot.iter().filter(|n| **n > 0).count();
        // A uniform hash leaves about 8192 * (1 - e^-0.5) = 3,223 homes, the
        // busiest home to 5 or 6 keys (the hash is fixed: exact figures).
        assert_eq!((max, used), (6, 3206));
    }
}
