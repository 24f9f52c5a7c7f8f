//! Mirrors of the crate's private L1 (same moka configuration, an entry of
//! the same shape), to price each layer of the read path on its own. They
//! copy `tiered-cache/src/l1.rs`; keep them in step when it changes.

use std::any::Any;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

/// Shape of the crate's `L1Entry`.
#[allow(dead_code)] // a hit reads only `value` and `fresh_until`
#[derive(Debug)]
pub struct Entry {
    pub value: Option<Arc<dyn Any + Send + Sync>>,
    pub fresh_until: Instant,
    pub drop_at: Instant,
    pub meta: [u64; 5],
    pub tags: Arc<[(Arc<str>, u64)]>,
    pub weight: u32,
}

impl Entry {
    /// An entry for `value`, fresh and kept for `keep_for`, weighing `weight`.
    pub fn new(value: Arc<dyn Any + Send + Sync>, keep_for: Duration, weight: u32) -> Self {
        let until = Instant::now() + keep_for;
        Entry {
            value: Some(value),
            fresh_until: until,
            drop_at: until,
            meta: [0; 5],
            tags: Arc::from(Vec::new()),
            weight,
        }
    }
}

/// Per-entry deadline, as the crate's L1 sets it.
#[derive(Debug)]
pub struct Deadline;

impl Expiry<Arc<str>, Arc<Entry>> for Deadline {
    fn expire_after_create(&self, _: &Arc<str>, e: &Arc<Entry>, at: Instant) -> Option<Duration> {
        Some(e.drop_at.saturating_duration_since(at))
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        e: &Arc<Entry>,
        at: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.drop_at.saturating_duration_since(at))
    }
}

/// A moka cache configured as the crate's L1, with the hasher `S`.
pub fn l1_like<S>(max_bytes: u64, hasher: S) -> Cache<Arc<str>, Arc<Entry>, S>
where
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_: &Arc<str>, e: &Arc<Entry>| e.weight)
        .expire_after(Deadline)
        .support_invalidation_closures()
        .build_with_hasher(hasher)
}

/// [`l1_like`] without `support_invalidation_closures()` (which also turns
/// on moka's write-order queue), to price that option.
pub fn l1_like_no_closures(max_bytes: u64) -> Cache<Arc<str>, Arc<Entry>> {
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_: &Arc<str>, e: &Arc<Entry>| e.weight)
        .expire_after(Deadline)
        .build()
}

/// A fast keyed hasher (folded 64x64->128 multiply per 8 bytes, seeded per
/// process), standing in for `foldhash`/`ahash` to price moka's default
/// SipHash-1-3. Not a recommendation of this code; of the idea.
#[derive(Debug, Clone)]
pub struct FastHash(u64);

impl Default for FastHash {
    fn default() -> Self {
        FastHash(rand::random::<u64>() | 1)
    }
}

impl BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

/// The hasher of [`FastHash`].
#[derive(Debug)]
pub struct FastHasher(u64);

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xD6E8_FEB8_6659_FD93;

#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let f = u128::from(a) * u128::from(b);
    (f as u64) ^ ((f >> 64) as u64)
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
            h = fold(h ^ word, K1);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            h = fold(h ^ u64::from_le_bytes(b), K1);
        }
        self.0 = h ^ bytes.len() as u64;
    }

    #[inline]
    fn finish(&self) -> u64 {
        fold(self.0, K2)
    }
}
