//! Pod names, stored a slice at a time.
//!
//! A large cluster has one pod name per endpoint (100k at 10k Services), and
//! as an `Arc<str>` each was an allocation of its own: 4.4 MiB at 100k, and
//! scattered among the freed buffers of the list that brought them, so the
//! allocator could give little of that list back. Here the names of one
//! EndpointSlice share one text ([`PodNames`]), and a [`PodName`] is a
//! handle to one of them: as wide as the `Arc<str>` it replaces, and it
//! reads, compares, orders and hashes as the name's text, so callers see a
//! `&str`.
//!
//! A handle keeps its whole block alive. A source that replaces a slice's
//! block re-sends the targets that point into the old one, so the agent's
//! table moves to the new block and the old one is freed (see
//! [`PodName::same_block`]).

use std::{fmt, hash::Hash, sync::Arc};

/// The pod names of one EndpointSlice, one per address (an address with no
/// pod has an empty name), in one text.
#[derive(PartialEq, Eq)]
pub struct PodNames {
    text: Box<str>,
    /// Where each address's name ends in `text`; it starts where the
    /// previous one ends.
    ends: Box<[u32]>,
}

impl PodNames {
    /// The name of address `i`; `None` when it has no pod (or is out of range).
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = match i.checked_sub(1) {
            Some(before) => self.ends[before] as usize,
            None => 0,
        };
        self.text.get(start..end).filter(|name| !name.is_empty())
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Every address's name (`None`: no pod), in order.
    pub fn iter(&self) -> impl Iterator<Item = Option<&str>> {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl fmt::Debug for PodNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Collects a slice's pod names, one per address.
#[derive(Debug, Default)]
pub struct PodNamesBuilder {
    text: String,
    ends: Vec<u32>,
}

impl PodNamesBuilder {
    pub fn with_capacity(addresses: usize) -> Self {
        Self {
            text: String::new(),
            ends: Vec::with_capacity(addresses),
        }
    }

    /// Adds the next address's pod name (`None` or empty: no pod). A name
    /// that would take the text past 4 GiB is stored as no pod; a slice
    /// holds at most 1,000 endpoints of at most 253 characters each.
    pub fn push(&mut self, pod: Option<&str>) {
        let pod = pod.unwrap_or("");
        let fits = u32::try_from(self.text.len() + pod.len()).is_ok();
        if fits {
            self.text.push_str(pod);
        }
        let end = u32::try_from(self.text.len()).unwrap_or(u32::MAX);
        self.ends.push(end);
    }

    /// The block; `previous` instead when it holds exactly these names, so
    /// an update that changes no pod name keeps the handles already given
    /// out valid and allocates nothing.
    pub fn build(self, previous: Option<&Arc<PodNames>>) -> Arc<PodNames> {
        if let Some(previous) = previous
            && *previous.ends == *self.ends
            && *previous.text == *self.text
        {
            return previous.clone();
        }
        Arc::new(PodNames {
            text: self.text.into_boxed_str(),
            ends: self.ends.into_boxed_slice(),
        })
    }
}

/// One pod's name: a handle into its slice's [`PodNames`] (or a block of
/// its own, see [`From<&str>`](#impl-From<%26str>-for-PodName)).
#[derive(Clone)]
pub struct PodName {
    block: Arc<PodNames>,
    index: u32,
}

impl PodName {
    /// Address `i`'s name in `block`; `None` when it has no pod.
    pub fn at(block: &Arc<PodNames>, i: usize) -> Option<Self> {
        block.get(i)?;
        Some(Self {
            block: block.clone(),
            index: u32::try_from(i).ok()?,
        })
    }

    pub fn as_str(&self) -> &str {
        // `at` and `from` only make handles to names that exist.
        self.block.get(self.index as usize).unwrap_or("")
    }

    /// Whether both handles point into one block (not only equal names):
    /// a target whose name moved to a new block is re-sent, so the old
    /// block can be freed.
    pub fn same_block(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.block, &other.block)
    }
}

/// A name in a block of its own: for sources with few pods (the static map)
/// and for tests.
impl From<&str> for PodName {
    fn from(name: &str) -> Self {
        let mut builder = PodNamesBuilder::with_capacity(1);
        builder.push(Some(name));
        Self {
            block: builder.build(None),
            index: 0,
        }
    }
}

impl std::ops::Deref for PodName {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for PodName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for PodName {
    fn eq(&self, other: &Self) -> bool {
        (self.same_block(other) && self.index == other.index) || self.as_str() == other.as_str()
    }
}

impl Eq for PodName {}

impl PartialEq<str> for PodName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialOrd for PodName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PodName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for PodName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(names: &[Option<&str>]) -> Arc<PodNames> {
        let mut builder = PodNamesBuilder::with_capacity(names.len());
        for name in names {
            builder.push(*name);
        }
        builder.build(None)
    }

    #[test]
    fn a_block_gives_each_address_its_name() {
        let names = block(&[Some("web-0"), None, Some("web-12"), Some(""), Some("w")]);
        assert_eq!(
            names.iter().collect::<Vec<_>>(),
            vec![Some("web-0"), None, Some("web-12"), None, Some("w")]
        );
        assert_eq!(names.len(), 5);
        assert_eq!(names.get(5), None);
        assert_eq!(PodName::at(&names, 0).as_deref(), Some("web-0"));
        assert_eq!(PodName::at(&names, 1), None);
        assert_eq!(PodName::at(&names, 2).as_deref(), Some("web-12"));
        assert_eq!(PodName::at(&names, 4).as_deref(), Some("w"));
        assert_eq!(PodName::at(&names, 9), None);
        assert_eq!(std::mem::size_of::<Option<PodName>>(), 16);
    }

    #[test]
    fn handles_compare_by_name_whatever_their_block() {
        let one = block(&[Some("a-1"), Some("b-2")]);
        let other = block(&[Some("b-2"), Some("a-1")]);
        let a = PodName::at(&one, 0).unwrap();
        let b = PodName::at(&one, 1).unwrap();
        let b_elsewhere = PodName::at(&other, 0).unwrap();
        assert_eq!(b, b_elsewhere);
        assert!(!b.same_block(&b_elsewhere));
        assert!(a.same_block(&b));
        assert!(a < b);
        assert_eq!(b_elsewhere, PodName::from("b-2"));
        assert_eq!(a.to_string(), "a-1");
        assert_eq!(format!("{b:?}"), "\"b-2\"");
        let set: std::collections::HashSet<PodName> = [b.clone(), b_elsewhere].into();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn the_same_names_keep_the_previous_block() {
        let previous = block(&[Some("web-0"), None, Some("web-1")]);
        let mut same = PodNamesBuilder::with_capacity(3);
        for name in [Some("web-0"), None, Some("web-1")] {
            same.push(name);
        }
        assert!(Arc::ptr_eq(&same.build(Some(&previous)), &previous));

        // The same text split otherwise is other names.
        let mut moved = PodNamesBuilder::with_capacity(3);
        for name in [Some("web-0"), Some("web-1"), None] {
            moved.push(name);
        }
        let moved = moved.build(Some(&previous));
        assert!(!Arc::ptr_eq(&moved, &previous));
        assert_eq!(
            moved.iter().collect::<Vec<_>>(),
            vec![Some("web-0"), Some("web-1"), None]
        );
    }
}
