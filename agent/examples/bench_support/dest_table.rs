//! The capture bench's destination table (`FLOOR_TABLE`, issue #17): filled
//! as the agent would fill it at 10k Services and 100k endpoints, and the
//! bench's two destinations laid out so that a lookup hits or misses at the
//! first slot or only after the last.
//!
//! What the agent watches (and so what the table would hold): every
//! ClusterIP x TCP Service port (the Service, no pod) and every
//! EndpointSlice address x TCP port, ready or not (the pod). Here: 10,000
//! ClusterIPs in 10.96/16 on port 80, every fourth also on 443 (12,500),
//! and 100,000 pod IPs in 10.244/15 (250 per /24) on 8080.

use std::net::Ipv4Addr;

use anyhow::{Context, bail};
use aya::maps::{Array, MapData};
use itw_common::{
    Destination,
    dest_table::{self, DestSlot, PROBES},
};

/// Where the bench's destination sits, relative to its home slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// The watched destination in its home slot: found at the first compare.
    HitFirst,
    /// Live entries for other destinations in the first `PROBES - 1` slots,
    /// the watched one in the last: found at the last compare.
    HitLast,
    /// The other destination's home slot empty: a miss after one compare.
    MissFirst,
    /// Every slot of the other destination's window live: a miss after
    /// `PROBES` compares.
    MissLast,
}

impl Layout {
    pub fn label(self) -> String {
        match self {
            Self::HitFirst => "hit at slot 1".to_owned(),
            Self::HitLast => format!("hit at slot {PROBES}"),
            Self::MissFirst => "miss at slot 1 (empty)".to_owned(),
            Self::MissLast => format!("miss after {PROBES} slots"),
        }
    }

    pub fn hits(self) -> bool {
        matches!(self, Self::HitFirst | Self::HitLast)
    }
}

/// How the fill went: entries by slot of their window, and the ones that
/// would go to the overflow map.
pub struct Fill {
    pub slots: u32,
    pub entries: usize,
    pub at_probe: [usize; PROBES as usize],
    pub overflowed: usize,
}

impl Fill {
    pub fn print(&self) {
        let at: Vec<String> = self
            .at_probe
            .iter()
            .enumerate()
            .map(|(i, n)| format!("slot {}: {n}", i + 1))
            .collect();
        println!(
            "  destination table: {} destinations in {} slots (fill {:.2}, {} MiB); placed at {}; overflowed (hash map): {}",
            self.entries + self.overflowed,
            self.slots,
            (self.entries + self.overflowed) as f64 / f64::from(self.slots),
            (u64::from(self.slots) * std::mem::size_of::<DestSlot>() as u64) >> 20,
            at.join(", "),
            self.overflowed
        );
    }
}

/// The table's size for `max_destinations`: the power of two at or above
/// it, so the table is at most half full at half the setting.
pub fn slots_for(max_destinations: u32) -> u32 {
    max_destinations.next_power_of_two().max(PROBES)
}

/// The Services' and endpoints' destinations the agent would watch.
fn realistic() -> impl Iterator<Item = Destination> {
    let services = (0..10_000u32).flat_map(|i| {
        let ip = [10, 96, (i >> 8) as u8, i as u8];
        let ports: &[u16] = if i % 4 == 0 { &[80, 443] } else { &[80] };
        ports.iter().map(move |p| Destination::v4(ip, *p))
    });
    // 250 pods per /24, 400 /24s: 10.244.0.2 to 10.245.143.251.
    let endpoints = (0..100_000u32).map(|n| {
        let block = n / 250;
        let ip = [
            10,
            244 + (block >> 8) as u8,
            block as u8,
            (n % 250 + 2) as u8,
        ];
        Destination::v4(ip, 8080)
    });
    services.chain(endpoints)
}

/// Fills `map` (of `slots` slots) with the realistic destinations, placed as
/// the agent would place them, leaving the windows of `watched` and `other`
/// to [`apply`]. Writes only the slots it uses.
pub fn fill(
    map: &mut Array<&mut MapData, DestSlot>,
    slots: u32,
    watched: &Destination,
    other: &Destination,
) -> anyhow::Result<Fill> {
    let mask = slots - 1;
    let reserved = reserved_slots(mask, watched, other)?;
    let mut table = vec![DestSlot::default(); slots as usize];
    for &i in &reserved {
        // Taken for the layouts: the fill places around them.
        table[i as usize].state = dest_table::DEAD;
    }
    let mut fill = Fill {
        slots,
        entries: 0,
        at_probe: [0; PROBES as usize],
        overflowed: 0,
    };
    for (id, dest) in realistic().enumerate() {
        let home = dest_table::home(&dest, mask);
        match dest_table::place(&mut table, &dest, id as u32 + 10, 1) {
            Ok(at) => {
                fill.entries += 1;
                fill.at_probe[((at as u32).wrapping_sub(home) & mask) as usize] += 1;
            }
            Err(_) => fill.overflowed += 1,
        }
    }
    for &i in &reserved {
        table[i as usize] = DestSlot::default();
    }
    for (i, slot) in table.iter().enumerate() {
        if *slot != DestSlot::default() {
            map.set(i as u32, slot, 0)
                .with_context(|| format!("writing slot {i} of the destination table"))?;
        }
    }
    Ok(fill)
}

/// The slots of the two destinations' windows, which must not overlap.
fn reserved_slots(
    mask: u32,
    watched: &Destination,
    other: &Destination,
) -> anyhow::Result<Vec<u32>> {
    let window = |d: &Destination| {
        let home = dest_table::home(d, mask);
        (0..PROBES).map(move |i| (home + i) & mask)
    };
    let slots: Vec<u32> = window(watched).chain(window(other)).collect();
    let mut unique = slots.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != slots.len() {
        bail!("the watched and the other destination's windows overlap: pick other addresses");
    }
    Ok(slots)
}

/// Lays the two destinations' windows out for `layout`.
pub fn apply(
    map: &mut Array<&mut MapData, DestSlot>,
    mask: u32,
    layout: Layout,
    watched: &Destination,
    other: &Destination,
) -> anyhow::Result<()> {
    // Live entries for destinations nobody connects to: their address word
    // differs from both, as most neighbours' do.
    let decoy = |k: u32| {
        DestSlot::live(
            &Destination::v4(Ipv4Addr::new(10, 250, 0, k as u8).octets(), 9),
            1_000 + k,
            1,
        )
    };
    let (home, slots): (u32, Vec<DestSlot>) = match layout {
        Layout::HitFirst => (
            dest_table::home(watched, mask),
            vec![DestSlot::live(watched, 1, 1)],
        ),
        Layout::HitLast => (
            dest_table::home(watched, mask),
            (0..PROBES - 1)
                .map(decoy)
                .chain([DestSlot::live(watched, 1, 1)])
                .collect(),
        ),
        Layout::MissFirst => (dest_table::home(other, mask), vec![DestSlot::default()]),
        Layout::MissLast => (
            dest_table::home(other, mask),
            (0..PROBES).map(decoy).collect(),
        ),
    };
    for (i, slot) in slots.iter().enumerate() {
        let at = (home + i as u32) & mask;
        map.set(at, slot, 0)
            .with_context(|| format!("writing slot {at} for {layout:?}"))?;
    }
    Ok(())
}
