//! The destinations of a complete map ([`super::ServiceMap`]), sorted by
//! address in one vector.
//!
//! A complete map is built at every start and relist while the agent's
//! table still holds the previous one, so its size is the peak's: as a
//! `BTreeMap` its nodes took about 130 bytes per destination (14.4 MiB at
//! 110k, measured with heaptrack), here an entry takes its 64 bytes and the
//! vector is freed in one piece. A map is built whole and then read, so
//! [`MapDestinations::insert`] and [`MapDestinations::remove`] shift the
//! entries after the one they touch: for small maps and tests; large ones
//! are collected ([`FromIterator`]) and sorted once.

use std::net::SocketAddr;

use super::Target;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDestinations {
    /// Sorted by address, one entry per address.
    entries: Vec<(SocketAddr, Target)>,
}

impl MapDestinations {
    fn position(&self, addr: &SocketAddr) -> Result<usize, usize> {
        self.entries.binary_search_by(|(a, _)| a.cmp(addr))
    }

    pub fn get(&self, addr: &SocketAddr) -> Option<&Target> {
        let i = self.position(addr).ok()?;
        self.entries.get(i).map(|(_, t)| t)
    }

    pub fn contains_key(&self, addr: &SocketAddr) -> bool {
        self.position(addr).is_ok()
    }

    /// Maps `addr` to `target`; returns the target it replaced.
    pub fn insert(&mut self, addr: SocketAddr, target: Target) -> Option<Target> {
        match self.position(&addr) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, target)),
            Err(i) => {
                self.entries.insert(i, (addr, target));
                None
            }
        }
    }

    pub fn remove(&mut self, addr: &SocketAddr) -> Option<Target> {
        let i = self.position(addr).ok()?;
        Some(self.entries.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// In address order.
    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddr, &Target)> {
        self.entries.iter().map(|(a, t)| (a, t))
    }

    pub fn keys(&self) -> impl Iterator<Item = &SocketAddr> {
        self.entries.iter().map(|(a, _)| a)
    }

    pub fn values(&self) -> impl Iterator<Item = &Target> {
        self.entries.iter().map(|(_, t)| t)
    }
}

/// As a `BTreeMap` collects: an address given twice keeps its last target.
impl FromIterator<(SocketAddr, Target)> for MapDestinations {
    fn from_iter<I: IntoIterator<Item = (SocketAddr, Target)>>(iter: I) -> Self {
        let mut entries: Vec<(SocketAddr, Target)> = iter.into_iter().collect();
        // Stable: equal addresses stay in the order given.
        entries.sort_by_key(|(a, _)| *a);
        // `later` is removed when it repeats `kept`'s address; it is the
        // newer of the two, so it takes `kept`'s place first.
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        entries.shrink_to_fit();
        Self { entries }
    }
}

impl IntoIterator for MapDestinations {
    type Item = (SocketAddr, Target);
    type IntoIter = std::vec::IntoIter<(SocketAddr, Target)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<'a> IntoIterator for &'a MapDestinations {
    type Item = (&'a SocketAddr, &'a Target);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (SocketAddr, Target)>,
        fn(&'a (SocketAddr, Target)) -> (&'a SocketAddr, &'a Target),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(a, t)| (a, t))
    }
}

impl std::ops::Index<&SocketAddr> for MapDestinations {
    type Output = Target;

    /// Panics when `addr` is not mapped, as a `BTreeMap` does.
    fn index(&self, addr: &SocketAddr) -> &Target {
        match self.get(addr) {
            Some(target) => target,
            None => panic!("{addr} is not in the map"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::ServiceRef;

    fn target(service: &str, port: u16) -> Target {
        Target {
            service: ServiceRef::new("default", service),
            port,
            pod: None,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn collecting_sorts_by_address_and_keeps_the_last_target_of_a_repeated_address() {
        let map: MapDestinations = [
            (addr("10.0.0.2:80"), target("b", 80)),
            (addr("10.0.0.1:80"), target("a", 80)),
            (addr("10.0.0.2:80"), target("c", 81)),
            (addr("[fd00::1]:80"), target("d", 80)),
            (addr("10.0.0.2:80"), target("e", 82)),
        ]
        .into_iter()
        .collect();
        let all: Vec<_> = map.iter().map(|(a, t)| (*a, t.clone())).collect();
        assert_eq!(
            all,
            vec![
                (addr("10.0.0.1:80"), target("a", 80)),
                (addr("10.0.0.2:80"), target("e", 82)),
                (addr("[fd00::1]:80"), target("d", 80)),
            ]
        );
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn insert_get_and_remove_keep_the_order() {
        let mut map = MapDestinations::default();
        assert_eq!(map.insert(addr("10.0.0.3:80"), target("c", 80)), None);
        assert_eq!(map.insert(addr("10.0.0.1:80"), target("a", 80)), None);
        assert_eq!(map.insert(addr("10.0.0.2:80"), target("b", 80)), None);
        assert_eq!(
            map.insert(addr("10.0.0.1:80"), target("z", 81)),
            Some(target("a", 80))
        );
        assert_eq!(map.get(&addr("10.0.0.1:80")), Some(&target("z", 81)));
        assert_eq!(map[&addr("10.0.0.2:80")], target("b", 80));
        assert!(!map.contains_key(&addr("10.0.0.4:80")));
        assert_eq!(map.remove(&addr("10.0.0.2:80")), Some(target("b", 80)));
        assert_eq!(map.remove(&addr("10.0.0.2:80")), None);
        assert_eq!(
            map.keys().copied().collect::<Vec<_>>(),
            vec![addr("10.0.0.1:80"), addr("10.0.0.3:80")]
        );
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            vec![
                (addr("10.0.0.1:80"), target("z", 81)),
                (addr("10.0.0.3:80"), target("c", 80)),
            ]
        );
    }
}
