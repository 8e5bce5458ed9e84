//! Pod names, stored a slice at a time.
//!
//! A large cluster has one pod name per endpoint (100k at 10k Services), and
//! as an `Arc<str>` each was an allocation of its own: 4.4 MiB at 100k, and
//! scattered among the freed buffers of the list that brought them, so the
//! allocator could give little of that list back. Here the names of one
//! EndpointSlice share one text ([`PodNames`]), their common prefix stored
//! once, and a [`PodName`] is a handle to one of them: as wide as the
//! `Arc<str>` it replaces, and it compares, orders, hashes and displays as
//! the name's text.
//!
//! A handle keeps its whole block alive. A source that replaces a slice's
//! block re-sends the targets that point into the old one, so the agent's
//! table moves to the new block and the old one is freed (see
//! [`PodName::same_block`]).

use std::{cmp::Ordering, fmt, hash::Hash, ptr::NonNull, sync::Arc};

/// The pod names of one EndpointSlice, one per address (an address with no
/// pod has none), in one text. The prefix every name shares (a
/// Deployment's pods are `<deployment>-<replica set hash>-<5 characters>`,
/// so most of each name) is stored once.
#[derive(PartialEq, Eq)]
pub struct PodNames {
    /// The shared prefix, then the rest of each name in address order.
    text: Box<str>,
    /// The shared prefix's length.
    shared: u32,
    /// Where each address's rest ends in `text`; it starts where the
    /// previous one ends. An empty rest: no pod (a pod's rest is never
    /// empty, see [`PodNamesBuilder::build`]).
    ends: Box<[u32]>,
}

impl PodNames {
    /// Address `i`'s name as (shared prefix, rest); `None` when it has no
    /// pod (or is out of range).
    pub fn get(&self, i: usize) -> Option<(&str, &str)> {
        let end = *self.ends.get(i)? as usize;
        let start = match i.checked_sub(1) {
            Some(before) => self.ends[before] as usize,
            None => self.shared as usize,
        };
        let rest = self.text.get(start..end).filter(|rest| !rest.is_empty())?;
        Some((self.text.get(..self.shared as usize)?, rest))
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Whether address `i`'s pod is `name`.
    pub fn is(&self, i: usize, name: &str) -> bool {
        self.get(i).is_some_and(|(prefix, rest)| {
            name.len() == prefix.len() + rest.len()
                && name.starts_with(prefix)
                && name.ends_with(rest)
        })
    }
}

impl fmt::Debug for PodNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries((0..self.len()).map(|i| self.get(i).map(|(p, r)| format!("{p}{r}"))))
            .finish()
    }
}

/// Collects a slice's pod names, one per address.
#[derive(Debug, Default)]
pub struct PodNamesBuilder {
    /// Every name whole, in address order.
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
        if u32::try_from(self.text.len() + pod.len()).is_ok() {
            self.text.push_str(pod);
        }
        let end = u32::try_from(self.text.len()).unwrap_or(u32::MAX);
        self.ends.push(end);
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let name = self.text.get(start..end as usize).unwrap_or("");
            start = end as usize;
            name
        })
    }

    /// The block; `previous` instead when it holds exactly these names, so
    /// an update that changes no pod name keeps the handles already given
    /// out valid and allocates nothing.
    pub fn build(self, previous: Option<&Arc<PodNames>>) -> Arc<PodNames> {
        // The longest prefix of every name, shortened so that no name is
        // all prefix (an empty rest means no pod), on a character boundary.
        let mut pods = self.names().filter(|n| !n.is_empty());
        let mut shared = pods.next().map_or(0, |first| first.len() - 1);
        let first = self.names().find(|n| !n.is_empty()).unwrap_or("");
        for name in pods {
            let common = first
                .bytes()
                .zip(name.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            shared = shared.min(common).min(name.len() - 1);
        }
        while !first.is_char_boundary(shared) {
            shared -= 1;
        }
        let mut text = String::with_capacity(self.text.len());
        text.push_str(&first[..shared]);
        let mut ends = Vec::with_capacity(self.ends.len());
        for name in self.names() {
            text.push_str(name.get(shared..).unwrap_or(""));
            ends.push(u32::try_from(text.len()).unwrap_or(u32::MAX));
        }
        let shared = u32::try_from(shared).unwrap_or(0);
        if let Some(previous) = previous
            && previous.shared == shared
            && *previous.ends == *ends
            && *previous.text == *text
        {
            return previous.clone();
        }
        Arc::new(PodNames {
            text: text.into_boxed_str(),
            shared,
            ends: ends.into_boxed_slice(),
        })
    }
}

/// One pod's name: a handle into its slice's [`PodNames`] (or a block of
/// its own, see [`From<&str>`](#impl-From<%26str>-for-PodName)). It
/// compares, orders, hashes and displays as its text.
///
/// It is an `Arc<PodNames>` and an index, packed into 12 bytes (aligned to
/// 4) so that a [`Target`](super::Target) with a pod takes 24 bytes rather
/// than 32: the agent's table holds one per watched destination (0.9 MB at
/// 110k). The pointer is only ever copied out of the packed field, never
/// borrowed in place.
#[repr(C, packed(4))]
pub struct PodName {
    /// From `Arc::into_raw`: this handle owns one strong count.
    block: NonNull<PodNames>,
    index: u32,
}

// SAFETY: a PodName is an `Arc<PodNames>` (which is Send and Sync: the
// block is never changed after it is built) and an index. The assertion
// below stops the build if a change to PodNames ever makes that untrue.
unsafe impl Send for PodName {}
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Arc<PodNames>>();
};
// SAFETY: as for Send.
unsafe impl Sync for PodName {}

impl PodName {
    /// Address `i`'s name in `block`; `None` when it has no pod.
    pub fn at(block: &Arc<PodNames>, i: usize) -> Option<Self> {
        block.get(i)?;
        let index = u32::try_from(i).ok()?;
        Some(Self::new(block.clone(), index))
    }

    fn new(block: Arc<PodNames>, index: u32) -> Self {
        let raw = Arc::into_raw(block).cast_mut();
        // `Arc::into_raw` never gives a null pointer.
        let block = NonNull::new(raw).unwrap_or_else(|| unreachable!("Arc::into_raw gave null"));
        Self { block, index }
    }

    fn block(&self) -> &PodNames {
        let block = self.block;
        // SAFETY: `block` came from `Arc::into_raw` and this handle holds
        // one strong count until it drops, so the block outlives `&self`.
        unsafe { block.as_ref() }
    }

    /// (shared prefix, rest): the name is the two together.
    fn parts(&self) -> (&str, &str) {
        let index = self.index;
        // `at` and `from` only make handles to names that exist.
        self.block().get(index as usize).unwrap_or(("", ""))
    }

    fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        let (prefix, rest) = self.parts();
        prefix.bytes().chain(rest.bytes())
    }

    pub fn len(&self) -> usize {
        let (prefix, rest) = self.parts();
        prefix.len() + rest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name as a label value.
    pub fn to_label(&self) -> Arc<str> {
        Arc::from(self.to_string())
    }

    /// Whether both handles point into one block (not only equal names):
    /// a target whose name moved to a new block is re-sent, so the old
    /// block can be freed.
    pub fn same_block(&self, other: &Self) -> bool {
        let (mine, theirs) = (self.block, other.block);
        mine == theirs
    }
}

impl Clone for PodName {
    fn clone(&self) -> Self {
        let block = self.block;
        // SAFETY: `block` came from `Arc::into_raw` and is alive (this
        // handle holds a count); the new handle owns the count added here.
        unsafe { Arc::increment_strong_count(block.as_ptr().cast_const()) };
        Self {
            block,
            index: self.index,
        }
    }
}

impl Drop for PodName {
    fn drop(&mut self) {
        let block = self.block;
        // SAFETY: this handle owns one strong count of the block, given
        // back exactly once, here.
        unsafe { Arc::decrement_strong_count(block.as_ptr().cast_const()) };
    }
}

/// A name in a block of its own: for sources with few pods (the static map)
/// and for tests.
impl From<&str> for PodName {
    fn from(name: &str) -> Self {
        let mut builder = PodNamesBuilder::with_capacity(1);
        builder.push(Some(name));
        Self::new(builder.build(None), 0)
    }
}

impl PartialEq for PodName {
    fn eq(&self, other: &Self) -> bool {
        let (mine, theirs) = (self.index, other.index);
        (self.same_block(other) && mine == theirs)
            || (self.len() == other.len() && self.bytes().eq(other.bytes()))
    }
}

impl Eq for PodName {}

impl PartialEq<str> for PodName {
    fn eq(&self, other: &str) -> bool {
        self.len() == other.len() && self.bytes().eq(other.bytes())
    }
}

impl PartialOrd for PodName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// As the names' `str`s order (bytewise).
impl Ord for PodName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.bytes().cmp(other.bytes())
    }
}

/// As the name's `str` hashes, whatever its split into prefix and rest.
impl Hash for PodName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for byte in self.bytes() {
            state.write_u8(byte);
        }
        state.write_u8(0xff);
    }
}

impl fmt::Debug for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, rest) = self.parts();
        f.write_str(prefix)?;
        f.write_str(rest)
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

    fn name(block: &Arc<PodNames>, i: usize) -> Option<String> {
        PodName::at(block, i).map(|p| p.to_string())
    }

    #[test]
    fn a_block_gives_each_address_its_name() {
        let names = block(&[Some("web-0"), None, Some("web-12"), Some(""), Some("w")]);
        assert_eq!(names.len(), 5);
        assert_eq!(names.get(5), None);
        assert_eq!(name(&names, 0).as_deref(), Some("web-0"));
        assert_eq!(name(&names, 1), None);
        assert_eq!(name(&names, 2).as_deref(), Some("web-12"));
        assert_eq!(name(&names, 3), None);
        assert_eq!(name(&names, 4).as_deref(), Some("w"));
        assert_eq!(name(&names, 9), None);
        assert!(names.is(2, "web-12"));
        assert!(!names.is(2, "web-1"));
        assert!(!names.is(1, ""));
        assert_eq!(std::mem::size_of::<Option<PodName>>(), 12);
        assert_eq!(std::mem::size_of::<crate::resolve::Target>(), 24);
    }

    #[test]
    fn the_shared_prefix_is_stored_once_and_no_name_is_all_prefix() {
        let deployment = block(&[
            Some("web-7d9f8b6c5d-x2x7q"),
            None,
            Some("web-7d9f8b6c5d-b4k9z"),
            Some("web-7d9f8b6c5d-bb"),
        ]);
        assert_eq!(deployment.shared, 15);
        assert_eq!(&*deployment.text, "web-7d9f8b6c5d-x2x7qb4k9zbb");
        assert_eq!(name(&deployment, 3).as_deref(), Some("web-7d9f8b6c5d-bb"));
        assert_eq!(deployment.get(3), Some(("web-7d9f8b6c5d-", "bb")));

        // One name is a prefix of the others: it keeps one byte of its own.
        let nested = block(&[Some("db-1"), Some("db-10"), Some("db-11")]);
        assert_eq!(nested.shared, 3);
        assert_eq!(
            (0..3).map(|i| name(&nested, i)).collect::<Vec<_>>(),
            vec![
                Some("db-1".into()),
                Some("db-10".into()),
                Some("db-11".into())
            ]
        );
        // Multi-byte characters are not split.
        let wide = block(&[Some("été-a"), Some("été-b"), Some("éa")]);
        assert_eq!(wide.shared, 2);
        assert_eq!(name(&wide, 2).as_deref(), Some("éa"));
        assert_eq!(block(&[None, None]).shared, 0);
        assert_eq!(block(&[Some("solo")]).get(0), Some(("sol", "o")));
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
        assert!(b == *"b-2");
        assert_eq!(&*b.to_label(), "b-2");
        // Order and hash follow the text, not the split.
        let split = block(&[Some("ab-x"), Some("ab-y")]);
        let whole = PodName::from("ab-x");
        assert_eq!(PodName::at(&split, 0).unwrap(), whole);
        let (longer, shorter) = (PodName::from("ab-xa"), PodName::from("ab-"));
        assert!(PodName::at(&split, 0).unwrap() < longer);
        assert!(shorter < PodName::at(&split, 0).unwrap());
        use std::hash::{BuildHasher, RandomState};
        let hasher = RandomState::new();
        assert_eq!(
            hasher.hash_one(PodName::at(&split, 0).unwrap()),
            hasher.hash_one(&whole)
        );
        let set: std::collections::HashSet<PodName> = [b.clone(), b_elsewhere].into();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn each_handle_holds_one_count_of_its_block() {
        let names = block(&[Some("web-0"), Some("web-1")]);
        let a = PodName::at(&names, 0).unwrap();
        let b = PodName::at(&names, 1).unwrap();
        let c = b.clone();
        assert_eq!(Arc::strong_count(&names), 4);
        drop((a, b));
        assert_eq!(Arc::strong_count(&names), 2);
        let moved = std::thread::spawn(move || c.to_string()).join().unwrap();
        assert_eq!(moved, "web-1");
        assert_eq!(Arc::strong_count(&names), 1);
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
            (0..3).map(|i| name(&moved, i)).collect::<Vec<_>>(),
            vec![Some("web-0".into()), Some("web-1".into()), None]
        );
    }
}
