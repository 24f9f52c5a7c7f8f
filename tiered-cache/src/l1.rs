//! The in-process tier: a moka cache bounded by bytes, holding decoded values.
//!
//! Values are type-erased `Arc`s, so a hit is a refcount bump and a downcast:
//! nothing is copied or decoded. Each entry carries its own deadline (moka's
//! `Expiry`), so it never outlives its Redis entry, and an optional cap keeps
//! it shorter still for instances that might miss an invalidation.
//!
//! Drops are counted (per key stripe, and for whole-cache drops), so that a
//! promotion from Redis that read its bytes *before* a drop cannot put the
//! dropped value back *after* it: see [`L1::ticket`] and [`L1::insert_since`].
//!
//! A tag invalidation raises the tag's *floor*: entries stamped below it are
//! misses. Hits check an entry against the floors only when a floor rose
//! since the entry was last checked (one atomic load otherwise). moka's
//! `invalidate_entries_if` alone is not enough: its sweep (moka 0.12.16,
//! `invalidate_entries` in future/base_cache.rs) peeks one entry past each
//! batch of 384 through the deque's persistent cursor, so that entry is
//! never tested, and reads stop checking once the predicate is retired. The
//! predicate is still registered, to free the memory of most such entries.
//!
//! moka is keyed by a 64-bit keyed hash of the key string, not the string:
//! moka holds its keys in an `Arc`, so a string key costs a hit two
//! dependent reads (the `Arc`, then the string) before the value, and a
//! SipHash of the whole string. Each entry keeps its full key (inline when
//! short) and a hit compares it, so two keys whose hashes collide are two
//! misses, never one key's value served for the other.
//!
//! The hottest keys are answered from a small table in front of moka
//! ([`front`]), which every change to L1 empties.

use std::any::Any;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;
use tokio::sync::Mutex;

use crate::admission::{Doorkeeper, L1Admission};
use crate::entry::Meta;
use crate::refresh::calm_micros;
use crate::tags::TagFloors;
#[cfg(test)]
use crate::tags::MAX_FLOORS;
use crate::weigh;

mod front;

use front::{Found, Front};

/// A decoded value as held in L1.
pub(crate) type AnyValue = Arc<dyn Any + Send + Sync>;

/// One L1 entry: the decoded value (or a cached `None`) and its metadata.
///
/// `repr(C)`, in the order a hit reads them: the value, the check stamp,
/// the freshness, the fail-safe flag and the calm window in the first 64
/// bytes (after the `Arc`'s counts, which a hit touches anyway), then the
/// key and the drop deadline in the next 64; what only writes, refreshes
/// and sweeps read comes after. A hit far from its expiry reads nothing
/// past the first 128 bytes of the allocation.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct L1Entry {
    /// `None` is a cached negative result.
    pub(crate) value: Option<AnyValue>,
    /// The floor generation at which the entry was last found above every
    /// tag floor; `Default` (never checked) for a new entry.
    pub(crate) checked: Checked,
    /// Until then the value is fresh; after it, stale (inside the grace
    /// window). Past `drop_at` when the L1 cap is shorter than the TTL.
    pub(crate) fresh_until: Instant,
    /// A stale value kept "fresh" for a short while after a failed refresh
    /// (the fail-safe throttle): hits on it are counted as stale served.
    pub(crate) failsafe: bool,
    /// How long before `fresh_until` XFetch may draw with `beta` <= 1, in
    /// µs ([`calm_micros`]): a hit before then does no arithmetic beyond one
    /// addition. `u32::MAX`: too long to hold, look at the freshness.
    calm_micros: u32,
    /// The key it was stored under (moka's key is only its hash).
    key: FullKey,
    /// When moka drops the entry: the end of the grace window, or the L1 cap.
    pub(crate) drop_at: Instant,
    pub(crate) weight: u32,
    /// How many times L1 had been cleared when the entry was built.
    clears: u64,
    /// No early refresh starts before this: set after a refresh failed, so
    /// a failing loader is tried at most once per throttle period.
    pub(crate) refresh_after: Option<Instant>,
    /// When the entry was built (a failsafe copy keeps its original's).
    built: Instant,
    pub(crate) meta: Meta,
}

/// What [`L1::look`] found: an entry, and when it was looked at.
#[derive(Debug)]
pub(crate) struct Looked {
    pub(crate) entry: Arc<L1Entry>,
    pub(crate) now: Instant,
}

/// Keys up to this many bytes are kept inside the entry, so checking a hit
/// reads no other memory; longer ones are kept on the heap.
const INLINE_KEY: usize = 46;

/// What an entry's key holds beyond the entry (counted in
/// [`weigh::ENTRY_OVERHEAD`]): a long key's own heap block.
fn key_weight(len: usize) -> usize {
    if len > INLINE_KEY {
        weigh::block(len)
    } else {
        0
    }
}

/// An entry's full key, checked on every hit (see the module docs).
#[derive(Debug, Clone)]
enum FullKey {
    Inline(u8, [u8; INLINE_KEY]),
    Long(Box<str>),
}

impl FullKey {
    fn new(key: &str) -> Self {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes[..key.len()].copy_from_slice(key.as_bytes());
                FullKey::Inline(len, bytes)
            }
            _ => FullKey::Long(key.into()),
        }
    }

    #[inline]
    fn is(&self, key: &[u8]) -> bool {
        match self {
            FullKey::Inline(len, bytes) => &bytes[..usize::from(*len)] == key,
            FullKey::Long(long) => long.as_bytes() == key,
        }
    }
}

/// moka's hasher for keys that are already hashes: passes them through.
#[derive(Debug, Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed with it; fold anything else anyway.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// See [`L1Entry::checked`].
#[derive(Debug, Default)]
pub(crate) struct Checked(AtomicU64);

impl L1Entry {
    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    /// Whether a value past its freshness may still be served as stale:
    /// only inside its grace window. Without one (`stale` unset) an entry
    /// read just before its expiry and looked at just after is a miss, not
    /// a stale answer.
    pub(crate) fn in_grace(&self, now: Instant) -> bool {
        now < self.drop_at
    }

    /// How long the value's last load took: XFetch's delta.
    #[inline]
    pub(crate) fn xfetch_delta(&self) -> Duration {
        Duration::from_micros(u64::from(self.meta.load_micros))
    }

    /// Whether a hit at `now` is fresh and too far from the expiry for
    /// XFetch to draw with `beta`: the common hit's check. `false` says
    /// nothing (the caller then judges the freshness itself).
    #[inline]
    pub(crate) fn is_calm(&self, now: Instant, beta: f64) -> bool {
        beta <= 1.0
            && self.calm_micros != u32::MAX
            && now
                .checked_add(Duration::from_micros(u64::from(self.calm_micros)))
                .is_some_and(|calm_end| calm_end < self.fresh_until)
    }

    /// Whether an early refresh may start now: not on a fail-safe copy (its
    /// retry is its expiry) and not inside a throttle after a failure.
    pub(crate) fn may_refresh(&self, now: Instant) -> bool {
        !self.failsafe && self.refresh_after.is_none_or(|after| now >= after)
    }
}

/// The L1 tier.
#[derive(Debug, Clone)]
pub(crate) struct L1 {
    cache: Cache<u64, Arc<L1Entry>, BuildHasherDefault<PassThrough>>,
    /// Keyed per L1 (a random seed), so that keys cannot be chosen to
    /// collide in moka's table.
    hasher: foldhash::fast::RandomState,
    ttl_cap: Option<Duration>,
    drops: Arc<Drops>,
    floors: Arc<TagFloors>,
    front: Arc<Front>,
    /// With [`L1Admission::SecondRead`]: the keys read once from Redis.
    doorkeeper: Option<Arc<Doorkeeper>>,
}

/// Key drops are counted in this many stripes (a power of two): a drop of
/// one key disturbs only the promotions of keys in its stripe.
const DROP_STRIPES: usize = 64;

/// How many drops happened: of keys, by stripe, and of many entries at once
/// (a clear); and per stripe, the lock that orders key drops and promotions.
#[derive(Debug)]
struct Drops {
    many: AtomicU64,
    keys: [AtomicU64; DROP_STRIPES],
    locks: [Mutex<()>; DROP_STRIPES],
}

/// The drop counts seen before a read of Redis began; see [`L1::insert_since`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ticket {
    many: u64,
    key: u64,
    stripe: usize,
}

/// `now + d`, or about a century from now when that is past what an
/// `Instant` holds (`Duration::MAX` is a valid TTL: "keep it").
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(d.min(CENTURY))
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// The drop stripe of a key with this hash.
#[inline]
fn stripe(hash: u64) -> usize {
    (hash as usize) & (DROP_STRIPES - 1)
}

struct PerEntryDeadline;

impl Expiry<u64, Arc<L1Entry>> for PerEntryDeadline {
    fn expire_after_create(
        &self,
        _key: &u64,
        entry: &Arc<L1Entry>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.drop_at.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &u64,
        entry: &Arc<L1Entry>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        // An update replaces the value, so its own deadline applies.
        Some(entry.drop_at.saturating_duration_since(updated_at))
    }
}

impl L1 {
    pub(crate) fn new(max_bytes: u64, ttl_cap: Option<Duration>, admission: L1Admission) -> Self {
        let front = Arc::new(Front::new(max_bytes));
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &u64, entry: &Arc<L1Entry>| entry.weight)
            .expire_after(PerEntryDeadline)
            .support_invalidation_closures()
            .build_with_hasher(BuildHasherDefault::default());
        let drops = Arc::new(Drops {
            many: AtomicU64::new(0),
            keys: std::array::from_fn(|_| AtomicU64::new(0)),
            locks: std::array::from_fn(|_| Mutex::new(())),
        });
        let floors = Arc::new(TagFloors::new());
        L1 {
            cache,
            hasher: foldhash::fast::RandomState::default(),
            ttl_cap,
            drops,
            floors,
            front,
            doorkeeper: (admission == L1Admission::SecondRead).then(|| {
                // No entry weighs less than its overhead.
                Arc::new(Doorkeeper::new(max_bytes / weigh::ENTRY_OVERHEAD as u64))
            }),
        }
    }

    /// moka's key for `key`.
    #[inline]
    fn hash(&self, key: &str) -> u64 {
        self.hash_bytes(key.as_bytes())
    }

    /// [`hash`](Self::hash) of a key's bytes: the one definition of both.
    #[inline]
    fn hash_bytes(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The drop stripe of `key`: the low bits of its hash.
    #[inline]
    fn stripe_of(&self, key: &str) -> usize {
        stripe(self.hash(key))
    }

    /// Whether a value of `key` just read from Redis is to be kept here
    /// ([`L1Admission`]): always, or on its second read within a window of
    /// as many keys as L1 holds.
    pub(crate) fn admits(&self, key: &str) -> bool {
        match &self.doorkeeper {
            None => true,
            Some(doorkeeper) => doorkeeper.admit(self.hash(key), self.cache.entry_count()),
        }
    }

    #[inline]
    pub(crate) async fn get(&self, key: &str) -> Option<Arc<L1Entry>> {
        self.look(key.as_bytes()).await.map(|looked| looked.entry)
    }

    /// The entry of `key` (its bytes), and the instant it was looked at: a front hit
    /// has read the clock for the drop deadline already, and the read path
    /// judges freshness at that same instant instead of reading it again.
    #[inline]
    pub(crate) async fn look(&self, key: &[u8]) -> Option<Looked> {
        let hash = self.hash_bytes(key);
        let generation = match self.front.get(hash, key) {
            Found::Hit { entry, touch, now } => {
                if touch {
                    self.touch(hash).await;
                }
                let entry = self.checked(entry)?;
                return Some(Looked { entry, now });
            }
            Found::Miss(generation) => generation,
        };
        let entry = self.cache.get(&hash).await?;
        if !entry.key.is(key) {
            return None; // another key with the same hash
        }
        let entry = self.checked(entry)?;
        self.front.offer(hash, generation, &entry);
        Some(Looked {
            entry,
            now: Instant::now(),
        })
    }

    /// A front hit passed on to moka, so that it counts the key as read.
    #[cold]
    async fn touch(&self, hash: u64) {
        Box::pin(self.cache.get(&hash)).await;
    }

    /// `entry` if no tag floor or clear outdates it.
    #[inline]
    fn checked(&self, entry: Arc<L1Entry>) -> Option<Arc<L1Entry>> {
        let generation = self.floors.generation();
        if entry.checked.0.load(Relaxed) == generation {
            return Some(entry);
        }
        self.check_floors(entry, generation)
    }

    /// A hit after a floor rose or L1 was cleared: a miss if one of its tags
    /// is below its floor, or if it was built before the last clear (a
    /// promotion racing the clear). The entry stays until replaced, swept or
    /// expired; it is not served.
    #[cold]
    fn check_floors(&self, entry: Arc<L1Entry>, generation: u64) -> Option<Arc<L1Entry>> {
        if entry.clears != self.drops.many.load(SeqCst)
            || self.floors.outdates(&entry.meta.tags, entry.built)
        {
            return None;
        }
        entry.checked.0.store(generation, Relaxed);
        Some(entry)
    }

    /// Builds the entry for `value`: fresh for `fresh_for`, kept for `keep_for`
    /// (both from now); the L1 cap shortens its stay, not its freshness (a
    /// capped freshness would make XFetch refresh at every cap, and a value
    /// just promoted look expired to a caller that stalled past the cap).
    /// `size` is what the value holds in memory ([`weigh::value_bytes`]).
    pub(crate) fn entry(
        &self,
        key: &str,
        value: Option<AnyValue>,
        meta: Meta,
        fresh_for: Duration,
        keep_for: Duration,
        size: usize,
    ) -> Arc<L1Entry> {
        let now = Instant::now();
        let fresh_until = later(now, fresh_for.min(keep_for));
        let keep_for = self.ttl_cap.map_or(keep_for, |cap| keep_for.min(cap));
        let weight = (key_weight(key.len()) + weigh::meta_bytes(&meta) + size)
            .saturating_add(weigh::ENTRY_OVERHEAD)
            .min(u32::MAX as usize) as u32;
        Arc::new(L1Entry {
            value,
            fresh_until,
            drop_at: later(now, keep_for),
            calm_micros: calm_micros(meta.load_micros),
            meta,
            weight,
            failsafe: false,
            refresh_after: None,
            checked: Checked::default(),
            clears: self.drops.many.load(SeqCst),
            built: now,
            key: FullKey::new(key),
        })
    }

    /// The copy of `entry` that stands in for it after its refresh failed,
    /// until `retry_at` (never past its own drop), for the fail-safe
    /// throttle. A stale entry is served as if fresh until then (see
    /// [`L1Entry::failsafe`]); a fresh one (an early refresh failed) stays
    /// as fresh as it was, and only its next early refresh waits.
    pub(crate) fn failsafe_copy(
        &self,
        key: &str,
        entry: &L1Entry,
        retry_at: Instant,
    ) -> Arc<L1Entry> {
        let retry_at = retry_at.min(entry.drop_at);
        let stale = !entry.is_fresh(Instant::now());
        Arc::new(L1Entry {
            value: entry.value.clone(),
            fresh_until: if stale { retry_at } else { entry.fresh_until },
            drop_at: entry.drop_at,
            calm_micros: entry.calm_micros,
            meta: entry.meta.clone(),
            weight: entry.weight,
            failsafe: stale || entry.failsafe,
            refresh_after: Some(retry_at),
            checked: Checked::default(),
            // Built now, for this L1 (`entry` may be a detached one): the
            // caller's ticket covers a clear since the load began.
            clears: self.drops.many.load(SeqCst),
            built: entry.built,
            key: FullKey::new(key),
        })
    }

    /// An entry for a cache without L1, never inserted: only its value and
    /// freshness are read. (It has no key, so inserted it would never hit.)
    pub(crate) fn detached(
        value: Option<AnyValue>,
        meta: Meta,
        fresh_for: Duration,
        keep_for: Duration,
    ) -> Arc<L1Entry> {
        let now = Instant::now();
        Arc::new(L1Entry {
            value,
            fresh_until: later(now, fresh_for.min(keep_for)),
            drop_at: later(now, keep_for),
            calm_micros: calm_micros(meta.load_micros),
            meta,
            weight: 0,
            failsafe: false,
            refresh_after: None,
            checked: Checked::default(),
            clears: 0,
            built: now,
            key: FullKey::Inline(0, [0; INLINE_KEY]),
        })
    }

    #[cfg(test)]
    pub(crate) async fn insert(&self, key: &str, entry: Arc<L1Entry>) {
        let hash = self.hash(key);
        if entry.drop_at > Instant::now() {
            self.put(hash, entry).await;
        } else {
            self.remove(hash).await;
        }
    }

    /// Takes note of the drops so far, before reading `key` from Redis.
    #[inline]
    pub(crate) fn ticket(&self, key: &str) -> Ticket {
        let stripe = self.stripe_of(key);
        Ticket {
            many: self.drops.many.load(SeqCst),
            key: self.drops.keys[stripe].load(SeqCst),
            stripe,
        }
    }

    fn dropped_since(&self, ticket: Ticket) -> bool {
        self.drops.many.load(SeqCst) != ticket.many
            || self.drops.keys[ticket.stripe].load(SeqCst) != ticket.key
    }

    /// Inserts `entry` unless `key` may have been dropped since `ticket` was
    /// taken; returns whether it was kept. Without this, a read that fetched
    /// the old value from Redis just before an invalidation arrived would
    /// put it back into L1 just after the drop, and serve it until its TTL.
    ///
    /// The check and the insert hold the key's stripe lock, and so does the
    /// removal in [`L1::invalidate`], which counts the drop first: either the
    /// insert comes first and the removal takes it out, or the check sees
    /// the drop. (Checking again after a plain insert and removing would
    /// leave a moment in which a reader that came after the drop is served
    /// the old value.) A clear takes no lock: an entry built before it is a
    /// miss on its next hit ([`L1::check_floors`]). A drop of a neighbour in
    /// the stripe costs a missed promotion, never a stale hit.
    pub(crate) async fn insert_since(
        &self,
        key: &str,
        entry: Arc<L1Entry>,
        ticket: Ticket,
    ) -> bool {
        if self.dropped_since(ticket) {
            return false;
        }
        let _stripe = self.drops.locks[ticket.stripe].lock().await;
        if self.dropped_since(ticket) {
            return false;
        }
        let hash = self.hash(key);
        if entry.drop_at > Instant::now() {
            self.put(hash, entry).await;
            true
        } else {
            self.remove(hash).await;
            false
        }
    }

    /// moka's insert, then the front's slot emptied (whatever it held for
    /// the key is older). Boxed: moka's future is large, and inline it would
    /// be laid out inside every L2 read's future (which promotes), copied on
    /// each poll of a read that never promotes.
    async fn put(&self, hash: u64, entry: Arc<L1Entry>) {
        Box::pin(self.cache.insert(hash, entry)).await;
        self.front.empty(hash);
    }

    /// moka's invalidate, then the front's slot emptied; boxed for the same
    /// reason as [`L1::put`].
    async fn remove(&self, hash: u64) {
        Box::pin(self.cache.invalidate(&hash)).await;
        self.front.empty(hash);
    }

    /// Puts a newly written `entry` in place of whatever `key` held, and
    /// counts it as a drop: a promotion or a load that read Redis before
    /// this write must not land over it (see [`L1::insert_since`]).
    pub(crate) async fn replace(&self, key: &str, entry: Arc<L1Entry>) {
        let hash = self.hash(key);
        self.drops.keys[stripe(hash)].fetch_add(1, SeqCst);
        let _stripe = self.drops.locks[stripe(hash)].lock().await;
        if entry.drop_at > Instant::now() {
            self.put(hash, entry).await;
        } else {
            self.remove(hash).await;
        }
    }

    pub(crate) async fn invalidate(&self, key: &str) {
        let hash = self.hash(key);
        self.drops.keys[stripe(hash)].fetch_add(1, SeqCst);
        let _stripe = self.drops.locks[stripe(hash)].lock().await;
        // With a colliding key this drops the other key's entry: a miss.
        self.remove(hash).await;
    }

    /// Drops every entry (they are hidden at once, removed lazily).
    pub(crate) fn clear(&self) {
        self.drops.many.fetch_add(1, SeqCst);
        self.cache.invalidate_all();
        // Its entries would be misses anyway (built before the clear); this
        // lets go of the slots' references, dead blocks included, at once.
        self.front.empty_all();
        // No entry is left for a floor to hide, and entries added from now on
        // are judged against current tag versions first. Keeping the floors
        // would be wrong after a Redis restart: counters start again lower.
        // The reset also bumps the generation, after the count above, so a
        // promotion that slipped in during the clear is checked on its next
        // hit and found built before it.
        self.floors.reset();
    }

    /// Drops every entry that carries `tag` at a version below `version`:
    /// at once for reads (the floor), and from memory by moka's sweep.
    /// (Promotions in flight need no ticket here: they are checked against
    /// the floor on their first hit.)
    pub(crate) fn invalidate_tag(&self, tag: &str, version: u64) {
        self.floors.raise(tag, version);
        let tag: Arc<str> = Arc::from(tag);
        let dropped = self.cache.invalidate_entries_if(move |_, entry| {
            TagFloors::stamped_below(&entry.meta.tags, &tag, version)
        });
        if dropped.is_err() {
            // Closures are enabled in `new`; should that ever change, be safe.
            self.clear();
        }
    }

    /// Drops every entry that carries `tag` now, when its new version is not
    /// known (Redis could not bump it): entries built later are unaffected,
    /// unlike a floor at `u64::MAX`, which would keep the tag out of L1 for
    /// good.
    pub(crate) fn drop_tag(&self, tag: &str) {
        let now = Instant::now();
        self.floors.cut(tag, now);
        let tag: Arc<str> = Arc::from(tag);
        let dropped = self.cache.invalidate_entries_if(move |_, entry| {
            entry.built <= now && TagFloors::carries(&entry.meta.tags, &tag)
        });
        if dropped.is_err() {
            self.clear();
        }
    }

    /// Sum of the weights of live entries, after pending maintenance.
    pub(crate) async fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(l1: &L1, key: &str) -> Arc<L1Entry> {
        let value: AnyValue = Arc::new(1_u32);
        let ttl = Duration::from_secs(60);
        l1.entry(key, Some(value), Meta::default(), ttl, ttl, 4)
    }

    /// A hit is calm (fresh, no XFetch draw) only further than `delta * 12`
    /// from the expiry, with `beta` <= 1; a load too long to hold the window
    /// for, or a larger `beta`, always takes the whole check.
    #[test]
    fn a_hit_is_calm_only_outside_every_draw_window() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let with_load = |load_micros: u32| {
            let meta = Meta {
                load_micros,
                ..Meta::default()
            };
            let ttl = Duration::from_secs(60);
            l1.entry("k", Some(Arc::new(1_u32)), meta, ttl, ttl, 4)
        };
        let entry = with_load(1_000_000); // 1 s: the window is 12 s
        let fresh_until = entry.fresh_until;
        let at = |before: u64| fresh_until - Duration::from_millis(before);
        assert!(entry.is_calm(at(12_001), 1.0));
        assert!(entry.is_calm(at(12_001), 0.5));
        assert!(!entry.is_calm(at(11_999), 1.0), "inside the window");
        assert!(!entry.is_calm(at(12_001), 1.5), "a wider window");
        assert!(!entry.is_calm(fresh_until, 0.0), "past the freshness");
        let no_delta = with_load(0);
        assert!(no_delta.is_calm(no_delta.fresh_until - Duration::from_nanos(1), 1.0));
        assert!(!no_delta.is_calm(no_delta.fresh_until, 1.0));
        let slow = with_load(400_000_000); // 400 s: 12 times that is no u32
        assert!(!slow.is_calm(slow.fresh_until - Duration::from_secs(59), 1.0));
    }

    /// The layout the struct's docs promise: counted from the start of the
    /// `Arc`'s block (its two counts come first), what a hit reads ends
    /// within 64 bytes, then the key and the drop deadline within 128.
    #[test]
    fn what_a_hit_reads_is_in_the_first_two_cache_lines() {
        use std::mem::{offset_of, size_of};
        let counts = 2 * size_of::<usize>();
        let end = |offset: usize, size: usize| counts + offset + size;
        assert!(end(offset_of!(L1Entry, calm_micros), 4) <= 64);
        assert!(end(offset_of!(L1Entry, failsafe), 1) <= 64);
        assert!(end(offset_of!(L1Entry, fresh_until), size_of::<Instant>()) <= 64);
        assert!(end(offset_of!(L1Entry, drop_at), size_of::<Instant>()) <= 128);
        assert!(end(offset_of!(L1Entry, key), size_of::<FullKey>()) <= 128);
    }

    #[tokio::test]
    async fn a_promotion_read_before_a_drop_is_not_kept() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let ticket = l1.ticket("k");
        l1.invalidate("k").await; // the drop lands while Redis is being read
        assert!(!l1.insert_since("k", entry(&l1, "k"), ticket).await);
        assert!(l1.get("k").await.is_none());

        let ticket = l1.ticket("k");
        l1.clear();
        assert!(!l1.insert_since("k", entry(&l1, "k"), ticket).await);

        let ticket = l1.ticket("k");
        assert!(l1.insert_since("k", entry(&l1, "k"), ticket).await);
        assert!(l1.get("k").await.is_some());
    }

    #[tokio::test]
    async fn an_entry_built_before_a_clear_is_not_served_after_it() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let ticket = l1.ticket("k");
        let built = entry(&l1, "k");
        // The promotion's check passed just before the clear; its insert
        // lands just after it (the clear takes no key lock).
        assert!(l1.insert_since("k", Arc::clone(&built), ticket).await);
        l1.clear();
        l1.put(l1.hash("k"), built).await;
        assert!(l1.get("k").await.is_none(), "served after the clear");
        let fresh = entry(&l1, "k");
        assert!(l1.insert_since("k", fresh, l1.ticket("k")).await);
        assert!(l1.get("k").await.is_some());
    }

    /// moka's sweep skips one entry per batch of 384; the floors do not.
    #[tokio::test]
    async fn a_tag_invalidation_drops_every_entry_of_the_tag() {
        let l1 = L1::new(64 << 20, None, L1Admission::EveryRead);
        let tagged = |version| Meta {
            tags: vec![(Arc::from("bulk"), version)].into(),
            ..Meta::default()
        };
        let ttl = Duration::from_secs(300);
        for i in 0..5_000_u32 {
            let key = format!("k{i}");
            let value: AnyValue = Arc::new(i);
            l1.insert(&key, l1.entry(&key, Some(value), tagged(1), ttl, ttl, 4))
                .await;
        }
        let value: AnyValue = Arc::new(0_u32);
        l1.insert(
            "newer",
            l1.entry("newer", Some(value), tagged(2), ttl, ttl, 4),
        )
        .await;
        l1.invalidate_tag("bulk", 2);
        l1.cache.run_pending_tasks().await;
        let mut survivors = 0;
        for i in 0..5_000 {
            survivors += usize::from(l1.get(&format!("k{i}")).await.is_some());
        }
        assert_eq!(survivors, 0);
        assert!(
            l1.get("newer").await.is_some(),
            "stamped at the new version"
        );
    }

    #[tokio::test]
    async fn a_write_wins_over_a_promotion_read_before_it() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let ticket = l1.ticket("k");
        let written = entry(&l1, "k");
        l1.replace("k", Arc::clone(&written)).await;
        assert!(!l1.insert_since("k", entry(&l1, "k"), ticket).await);
        assert!(Arc::ptr_eq(&l1.get("k").await.unwrap(), &written));
    }

    /// A million distinct tags invalidated: the floors stay bounded, and an
    /// entry of a tag whose floor was let go is still a miss; entries built
    /// after are hits.
    #[tokio::test]
    async fn floors_stay_bounded_and_letting_go_is_safe() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let tagged = |tag: &str, version| Meta {
            tags: vec![(Arc::from(tag), version)].into(),
            ..Meta::default()
        };
        let ttl = Duration::from_secs(300);
        let value: AnyValue = Arc::new(0_u32);
        l1.insert(
            "old",
            l1.entry("old", Some(value.clone()), tagged("t0", 1), ttl, ttl, 4),
        )
        .await;
        l1.floors.raise("t0", 2);
        for i in 1..1_000_000_u64 {
            l1.floors.raise(&format!("user:{i}"), 2);
        }
        assert!(l1.floors.len() <= MAX_FLOORS, "{}", l1.floors.len());
        assert!(
            l1.get("old").await.is_none(),
            "its floor was let go: still a miss"
        );
        l1.insert(
            "new",
            l1.entry("new", Some(value), tagged("t0", 2), ttl, ttl, 4),
        )
        .await;
        assert!(l1.get("new").await.is_some(), "built after: a hit");
    }

    /// moka sees only the hash: an entry found under another key's hash
    /// (a collision) is a miss for that key, whatever the key's length.
    #[tokio::test]
    async fn a_hash_collision_is_a_miss_not_the_other_keys_value() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let long_a = "a".repeat(INLINE_KEY + 10);
        let long_b = "b".repeat(INLINE_KEY + 10);
        for (a, b) in [("a", "b"), ("ab", "a"), (long_a.as_str(), long_b.as_str())] {
            l1.put(l1.hash(b), entry(&l1, a)).await;
            assert!(l1.get(b).await.is_none(), "{b} served {a}'s entry");
            l1.put(l1.hash(a), entry(&l1, a)).await;
            assert!(l1.get(a).await.is_some(), "{a} is a hit under its own hash");
        }
        let exact = "x".repeat(INLINE_KEY);
        l1.insert(&exact, entry(&l1, &exact)).await;
        assert!(l1.get(&exact).await.is_some());
        assert!(l1.get(&exact[1..]).await.is_none());
    }

    #[tokio::test]
    async fn drops_of_keys_in_other_stripes_do_not_disturb() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let other = (0..1000)
            .map(|i| format!("o{i}"))
            .find(|o| l1.stripe_of(o) != l1.stripe_of("k"))
            .unwrap();
        let ticket = l1.ticket("k");
        l1.invalidate(&other).await;
        assert!(l1.insert_since("k", entry(&l1, "k"), ticket).await);
    }

    /// Reads `key` until the front table answers it; the entry it gives.
    async fn in_front(l1: &L1, key: &str) -> Arc<L1Entry> {
        let hash = l1.hash(key);
        for _ in 0..3 {
            let entry = l1.get(key).await.expect("a hit");
            if let Found::Hit { entry: front, .. } = l1.front.get(hash, key.as_bytes()) {
                assert!(Arc::ptr_eq(&front, &entry));
                return front;
            }
        }
        panic!("{key} never reached the front");
    }

    /// Every change L1 makes to a key empties the key's front slot: what is
    /// read after it is what moka holds then, never the front's old entry.
    #[tokio::test]
    async fn every_change_to_a_key_empties_its_front_slot() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        l1.insert("k", entry(&l1, "k")).await;
        in_front(&l1, "k").await;
        l1.invalidate("k").await;
        assert!(l1.get("k").await.is_none(), "invalidate");

        l1.insert("k", entry(&l1, "k")).await;
        in_front(&l1, "k").await;
        let written = entry(&l1, "k");
        l1.replace("k", Arc::clone(&written)).await;
        assert!(
            Arc::ptr_eq(&l1.get("k").await.unwrap(), &written),
            "replace"
        );

        in_front(&l1, "k").await;
        let promoted = entry(&l1, "k");
        assert!(
            l1.insert_since("k", Arc::clone(&promoted), l1.ticket("k"))
                .await
        );
        assert!(
            Arc::ptr_eq(&l1.get("k").await.unwrap(), &promoted),
            "promotion"
        );

        in_front(&l1, "k").await;
        l1.clear();
        assert_eq!(l1.front.len(), 0, "a clear empties every slot");
        assert!(l1.get("k").await.is_none(), "clear");
    }

    /// A tag's floor and a tag drop hide an entry the front holds; so does
    /// its drop deadline (the L1 cap), although it is still fresh.
    #[tokio::test]
    async fn front_hits_are_checked_like_moka_hits() {
        let l1 = L1::new(
            1 << 20,
            Some(Duration::from_millis(30)),
            L1Admission::EveryRead,
        );
        let tagged = |tag: &str| Meta {
            tags: vec![(Arc::from(tag), 1)].into(),
            ..Meta::default()
        };
        let ttl = Duration::from_secs(60);
        for (key, tag) in [("a", "ta"), ("b", "tb"), ("c", "tc")] {
            let value: AnyValue = Arc::new(1_u32);
            l1.insert(key, l1.entry(key, Some(value), tagged(tag), ttl, ttl, 4))
                .await;
            in_front(&l1, key).await;
        }
        l1.invalidate_tag("ta", 2);
        assert!(l1.get("a").await.is_none(), "below its tag's floor");
        l1.drop_tag("tb");
        assert!(l1.get("b").await.is_none(), "its tag dropped");
        let c = in_front(&l1, "c").await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(c.is_fresh(Instant::now()), "fresh for a minute");
        assert!(l1.get("c").await.is_none(), "past the L1 cap");
    }

    /// An entry read from moka before a change to its key (an invalidate,
    /// a write, a promotion), offered after it, stays out.
    #[tokio::test]
    async fn an_entry_read_before_a_change_is_not_offered_after_it() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let hash = l1.hash("k");
        for change in ["invalidate", "replace", "promote"] {
            l1.insert("k", entry(&l1, "k")).await;
            let Found::Miss(generation) = l1.front.get(hash, b"k") else {
                panic!("{change}: emptied by the insert");
            };
            let read = l1.cache.get(&hash).await.expect("in moka");
            // The change lands between the read and the offer.
            match change {
                "invalidate" => l1.invalidate("k").await,
                "replace" => l1.replace("k", entry(&l1, "k")).await,
                _ => assert!(l1.insert_since("k", entry(&l1, "k"), l1.ticket("k")).await),
            }
            l1.front.offer(hash, generation, &read);
            assert_eq!(l1.front.len(), 0, "{change}: the old entry was kept");
            let now = l1.get("k").await;
            assert!(
                now.is_none_or(|now| !Arc::ptr_eq(&now, &read)),
                "{change}: the old entry was served"
            );
        }
        // Nor when moka let go of it by itself in between: the front keeps
        // it only while the reader does.
        l1.insert("k", entry(&l1, "k")).await;
        let Found::Miss(generation) = l1.front.get(hash, b"k") else {
            panic!("emptied by the insert");
        };
        let read = l1.cache.get(&hash).await.expect("in moka");
        l1.cache.invalidate(&hash).await; // as an eviction would, not through L1
        l1.front.offer(hash, generation, &read);
        drop(read);
        settle_until(&l1, || l1.front.len() == 0).await;
        assert_eq!(l1.front.len(), 0);
        assert!(l1.get("k").await.is_none());
    }

    /// Runs moka's maintenance until `done`, or gives up after about two
    /// seconds (the caller's assertion then fails). moka lets go of a
    /// removed entry only after its map's epoch-based collector has moved
    /// on, which other threads using moka (tests beside this one) can hold
    /// back for a while: one pass is not always enough.
    async fn settle_until(l1: &L1, done: impl Fn() -> bool) {
        for _ in 0..200 {
            l1.cache.run_pending_tasks().await;
            l1.cache.run_pending_tasks().await;
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What moka lets go of by itself (an expiry, a tag's sweep, a size
    /// eviction) leaves the front as well: the front keeps no value alive
    /// that the bound no longer counts.
    #[tokio::test]
    async fn what_moka_lets_go_of_leaves_the_front() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let short = Duration::from_millis(20);
        let value: AnyValue = Arc::new(1_u32);
        l1.insert(
            "gone",
            l1.entry(
                "gone",
                Some(value.clone()),
                Meta::default(),
                short,
                short,
                4,
            ),
        )
        .await;
        in_front(&l1, "gone").await;
        let tagged = Meta {
            tags: vec![(Arc::from("t"), 1)].into(),
            ..Meta::default()
        };
        let ttl = Duration::from_secs(60);
        l1.insert(
            "swept",
            l1.entry("swept", Some(value.clone()), tagged, ttl, ttl, 4),
        )
        .await;
        in_front(&l1, "swept").await;
        l1.insert("k", entry(&l1, "k")).await;
        in_front(&l1, "k").await;
        assert_eq!(l1.front.len(), 3);
        l1.invalidate_tag("t", 2);
        settle_until(&l1, || !l1.front.holds(l1.hash("swept"))).await;
        assert!(!l1.front.holds(l1.hash("swept")), "swept");
        // moka's timer wheel removes what expired once its first level
        // (about 1.07 s) has turned; until then moka counts it in its bound.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        settle_until(&l1, || {
            !l1.front.holds(l1.hash("gone")) && Arc::strong_count(&value) == 1
        })
        .await;
        assert!(!l1.front.holds(l1.hash("gone")), "expired");
        assert!(l1.front.holds(l1.hash("k")), "untouched");
        assert_eq!(Arc::strong_count(&value), 1, "a value kept alive");

        // A size eviction: a small L1 given many more entries than it holds.
        let small = L1::new(64 << 10, None, L1Admission::EveryRead);
        small.insert("first", entry(&small, "first")).await;
        in_front(&small, "first").await;
        for i in 0..2_000 {
            let key = format!("filler{i}");
            small.insert(&key, entry(&small, &key)).await;
        }
        settle_until(&small, || {
            small.front.len() <= small.cache.entry_count() as usize
                && (small.cache.contains_key(&small.hash("first"))
                    || !small.front.holds(small.hash("first")))
        })
        .await;
        if small.cache.get(&small.hash("first")).await.is_none() {
            assert!(!small.front.holds(small.hash("first")), "evicted");
        }
        assert!(small.front.len() <= small.cache.entry_count() as usize);
    }

    /// Two keys in one slot: each read gets its own entry, and the slot
    /// goes to the other key only once the one in it was not read between
    /// two of the other's reads.
    #[tokio::test]
    async fn keys_sharing_a_slot_take_turns_and_never_mix() {
        let l1 = L1::new(1 << 20, None, L1Admission::EveryRead);
        let shift = l1.front.shift;
        let slot = |key: &str| l1.hash(key) >> shift;
        let other = (0..100_000)
            .map(|i| format!("o{i}"))
            .find(|o| slot(o) == slot("k"))
            .expect("a key in the same slot");
        let (k, o) = (entry(&l1, "k"), entry(&l1, &other));
        l1.insert("k", Arc::clone(&k)).await;
        l1.insert(&other, Arc::clone(&o)).await;
        in_front(&l1, "k").await; // and hit: referenced
        for _ in 0..3 {
            assert!(Arc::ptr_eq(&l1.get(&other).await.unwrap(), &o));
            assert!(Arc::ptr_eq(&l1.get("k").await.unwrap(), &k));
        }
        assert!(matches!(
            l1.front.get(l1.hash("k"), b"k"),
            Found::Hit { .. }
        ));
        for _ in 0..2 {
            assert!(Arc::ptr_eq(&l1.get(&other).await.unwrap(), &o));
        }
        assert!(matches!(
            l1.front.get(l1.hash(&other), other.as_bytes()),
            Found::Hit { .. }
        ));
        assert!(Arc::ptr_eq(&l1.get("k").await.unwrap(), &k));
    }
}
