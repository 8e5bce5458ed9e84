//! Hashing a shared object by its address, for the per-agent tables keyed
//! by the store's own objects (a series, a Service's zero series): the
//! address names the object for as long as the table holds its `Arc`, and
//! costs no name or hash stored beside the entry.

use std::sync::Arc;

/// Spreads an object's address over a table: allocations are aligned, so
/// the address' low bits, which pick the bucket, are mostly zero. Addresses
/// are the scaler's own, never chosen by a peer. (SplitMix64's finalizer.)
pub(super) fn address_hash<T>(object: &Arc<T>) -> u64 {
    let mut z = Arc::as_ptr(object) as usize as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
