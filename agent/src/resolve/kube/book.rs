//! The claim book: which object each watched IP:port is attributed to.
//!
//! Every Service claims its ClusterIP:ports and every EndpointSlice its
//! endpoint IP:ports. Almost always one object claims an IP:port; when two do
//! at once (a pod in two Services' slices, a stale slice still listing an IP
//! that a new pod already has), the book keeps them all and attributes the
//! destination to the best [`Rank`]: a winner that does not depend on the
//! order events came in, so a relist rebuilds exactly the map that
//! incremental changes led to. When the winner lets go, the next best takes
//! over at once.
//!
//! The book holds no targets: they are derived from the objects on demand
//! (see [`Claimants`]), so the common case costs one small entry per
//! destination.

use std::collections::HashMap;

use itw_common::Destination;

pub use crate::resolve::socket_addr;
use crate::resolve::{DestMap, MapChange, Target};

/// Who claims a destination: a Service (its ClusterIPs) or an EndpointSlice
/// (its endpoints), by slot in the resolver's tables. Packed in 32 bits
/// because the book holds one per destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Claimant(u32);

impl Claimant {
    const SLICE_BIT: u32 = 1 << 31;

    pub fn service(slot: u32) -> Self {
        debug_assert!(slot < Self::SLICE_BIT);
        Self(slot)
    }

    pub fn slice(slot: u32) -> Self {
        debug_assert!(slot < Self::SLICE_BIT);
        Self(slot | Self::SLICE_BIT)
    }

    /// `Ok(service slot)` or `Err(slice slot)`.
    pub fn split(self) -> Result<u32, u32> {
        if self.0 & Self::SLICE_BIT == 0 {
            Ok(self.0)
        } else {
            Err(self.0 & !Self::SLICE_BIT)
        }
    }
}

/// How strong a claim is; the smallest wins. ClusterIPs first (an apiserver
/// never hands one out twice, so a clash means a stale endpoint), then ready
/// endpoints before not-ready ones (a stale slice lists a leaving pod as not
/// ready), then by name, so the outcome is deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank<'a> {
    pub class: u8,
    pub namespace: &'a str,
    pub service: &'a str,
    /// Empty for a ClusterIP claim.
    pub slice: &'a str,
}

impl Rank<'_> {
    pub const CLUSTER_IP: u8 = 0;
    pub const READY: u8 = 1;
    pub const NOT_READY: u8 = 2;
}

/// The resolver's objects, as the book sees them.
pub trait Claimants {
    /// The claim `claimant` makes on `dest` as the objects are now: its
    /// target and rank, or `None` if it makes none.
    fn claim_of(&self, claimant: Claimant, dest: &Destination) -> Option<(Target, Rank<'_>)>;

    /// The claimant for a log line.
    fn describe(&self, claimant: Claimant) -> String;
}

/// A claim that still stands with a new target or rank.
#[derive(Debug)]
pub struct Renewed<'a> {
    pub target: Target,
    pub rank: Rank<'a>,
    /// Whether the target must be sent again: it changed, or its pod name
    /// moved to another block of names (else only the rank changed).
    pub target_changed: bool,
}

#[derive(Debug, Default)]
pub struct ClaimBook {
    /// The winning claim per destination: exactly the destinations the
    /// source has sent downstream.
    winners: DestMap<Claimant>,
    /// The losing claims of contested destinations (rare).
    others: HashMap<Destination, Vec<Claimant>>,
}

impl ClaimBook {
    pub fn len(&self) -> usize {
        self.winners.len()
    }

    pub fn clear(&mut self) {
        self.winners.clear();
        self.others.clear();
        self.others.shrink_to_fit();
    }

    pub fn winner(&self, dest: &Destination) -> Option<Claimant> {
        self.winners.get(dest).copied()
    }

    /// `claimant` newly claims `dest` with `target` at `rank`.
    pub fn claim(
        &mut self,
        objects: &impl Claimants,
        dest: Destination,
        claimant: Claimant,
        target: Target,
        rank: Rank<'_>,
        out: Option<&mut Vec<MapChange>>,
    ) {
        let Some(&winner) = self.winners.get(&dest) else {
            self.winners.insert(dest, claimant);
            push(out, MapChange::Set(socket_addr(&dest), target));
            return;
        };
        if winner == claimant {
            // Already claimed (the caller re-claims after a change).
            return;
        }
        let beats_winner = match objects.claim_of(winner, &dest) {
            Some((_, winner_rank)) => rank < winner_rank,
            // The winner's object changed and no longer claims this in its
            // new state; its own update will withdraw it.
            None => true,
        };
        let others = self.others.entry(dest).or_default();
        if beats_winner {
            others.push(winner);
            self.winners.insert(dest, claimant);
            log_contest(objects, &dest, claimant, winner);
            push(out, MapChange::Set(socket_addr(&dest), target));
        } else {
            others.push(claimant);
            log_contest(objects, &dest, winner, claimant);
        }
    }

    /// `claimant` no longer claims `dest`.
    pub fn unclaim(
        &mut self,
        objects: &impl Claimants,
        dest: Destination,
        claimant: Claimant,
        out: Option<&mut Vec<MapChange>>,
    ) {
        if self.winners.get(&dest) != Some(&claimant) {
            self.drop_other(&dest, claimant);
            return;
        }
        match self.best_other(objects, &dest) {
            None => {
                self.winners.remove(&dest);
                push(out, MapChange::Remove(socket_addr(&dest)));
            }
            Some((next, target)) => {
                self.drop_other(&dest, next);
                self.winners.insert(dest, next);
                tracing::debug!(
                    destination = %socket_addr(&dest),
                    left = %objects.describe(claimant),
                    now = %objects.describe(next),
                    "contested destination passes to the next claimant"
                );
                if let Some(target) = target {
                    push(out, MapChange::Set(socket_addr(&dest), target));
                }
            }
        }
    }

    /// `claimant` still claims `dest` but its target or rank changed.
    pub fn reclaim(
        &mut self,
        objects: &impl Claimants,
        dest: Destination,
        claimant: Claimant,
        renewed: Renewed<'_>,
        out: Option<&mut Vec<MapChange>>,
    ) {
        let Renewed {
            target,
            rank,
            target_changed,
        } = renewed;
        let Some(&winner) = self.winners.get(&dest) else {
            // Not claimed (cannot happen when the caller kept the book in
            // step); claiming restores it.
            self.claim(objects, dest, claimant, target, rank, out);
            return;
        };
        if !self.others.contains_key(&dest) {
            if winner == claimant && target_changed {
                push(out, MapChange::Set(socket_addr(&dest), target));
            }
            return;
        }
        // Contested: the change of rank may change the winner.
        let mut best = (claimant, rank, Some(target));
        let candidates = std::iter::once(winner)
            .chain(self.others.get(&dest).into_iter().flatten().copied())
            .filter(|c| *c != claimant);
        for other in candidates {
            if let Some((t, r)) = objects.claim_of(other, &dest)
                && r < best.1
            {
                best = (other, r, Some(t));
            }
        }
        let (best, _, best_target) = best;
        if best == winner {
            if winner == claimant
                && target_changed
                && let Some(target) = best_target
            {
                push(out, MapChange::Set(socket_addr(&dest), target));
            }
            return;
        }
        self.drop_other(&dest, best);
        self.others.entry(dest).or_default().push(winner);
        self.winners.insert(dest, best);
        log_contest(objects, &dest, best, winner);
        if let Some(target) = best_target {
            push(out, MapChange::Set(socket_addr(&dest), target));
        }
    }

    /// The best of the losing claims of `dest`, with its target (`None` if
    /// no loser's object claims it any more in its current state: that
    /// object's own update is under way and will withdraw it).
    fn best_other(
        &self,
        objects: &impl Claimants,
        dest: &Destination,
    ) -> Option<(Claimant, Option<Target>)> {
        let others = self.others.get(dest)?;
        let mut best: Option<(Claimant, Target, Rank<'_>)> = None;
        for &other in others {
            if let Some((t, r)) = objects.claim_of(other, dest)
                && best.as_ref().is_none_or(|(_, _, br)| r < *br)
            {
                best = Some((other, t, r));
            }
        }
        match best {
            Some((c, t, _)) => Some((c, Some(t))),
            None => others.first().map(|c| (*c, None)),
        }
    }

    fn drop_other(&mut self, dest: &Destination, claimant: Claimant) {
        if let Some(list) = self.others.get_mut(dest) {
            list.retain(|c| *c != claimant);
            if list.is_empty() {
                self.others.remove(dest);
            }
        }
    }
}

fn push(out: Option<&mut Vec<MapChange>>, change: MapChange) {
    if let Some(out) = out {
        out.push(change);
    }
}

fn log_contest(objects: &impl Claimants, dest: &Destination, winner: Claimant, loser: Claimant) {
    tracing::debug!(
        destination = %socket_addr(dest),
        winner = %objects.describe(winner),
        also_claimed_by = %objects.describe(loser),
        "destination claimed by two objects; attributed to the first"
    );
}
