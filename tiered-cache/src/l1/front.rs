//! A small direct-mapped table in front of moka that answers hits on the
//! hottest keys at the cost of a locked slot read.
//!
//! A moka hit costs about twice a locked `HashMap` probe: its read log, its
//! access-order deque and the housekeeping that reads run inline (benches/
//! README.md, "Where a `#[cached]` hit's time goes"). A key lives in one slot
//! (the high bits of its L1 hash); a slot holds at most one entry, and only
//! an entry moka itself just handed out.
//!
//! **It never holds what moka dropped or replaced.** Every change L1 makes to
//! a key (insert, replace, invalidate) empties the key's slot *after* moka has
//! changed, and a clear empties every slot. A reader that found an entry in
//! moka offers it with the slot's generation as it was *before* that moka
//! read ([`Front::get`]); every emptying bumps the generation, so an entry
//! read from moka before a drop cannot land here after it. A slot keeps only
//! a [`Weak`] reference: what moka lets go of by itself (size eviction,
//! expiry, a tag's sweep) is gone from here as soon as no reader holds it,
//! so the front keeps no value alive beyond L1's bound, and needs neither
//! moka's eviction listener (which makes moka lock every key it inserts or
//! removes) nor a check that moka still holds what is offered. What a slot
//! can keep is the dead entry's own block (its value already freed), until
//! the slot is emptied or taken: at most [`DEAD_BLOCK`] bytes per slot.
//! Hits from here go through the same checks as moka's (the key, the tag
//! floors and clears, the drop deadline).
//!
//! A hit here is an access moka does not see; every [`TOUCH_EVERY`]th hit of
//! a slot is passed on to moka too, so that its eviction policy still counts
//! the key as read. A slot's entry that was hit since it came in gets a
//! second chance against a colliding key (CLOCK): one key read twice in a row
//! from moka takes the slot only from one that was not read in between.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use super::L1Entry;

/// One in this many hits of a slot is also a moka read (see the module docs).
const TOUCH_EVERY: u8 = 32;

/// The fewest and the most slots; between them, one per KiB of L1's bound
/// (an entry weighs at least 160 bytes, so a full L1 holds at least six
/// entries per slot). A slot is 24 bytes: the most is 3 MiB, for an L1 of
/// 128 MiB or more; with a dead block in every slot, at most a quarter of
/// the bound. On Zipf(1.0) reads of 100k keys, 2^16 slots answered
/// 88 % of reads and 2^17 92 % (a simulation of this table; every read
/// the front misses costs a moka read and an offer).
const MIN_SLOTS: usize = 64;
const MAX_SLOTS: usize = 1 << 17;

/// The most a slot can keep of an entry nobody holds: its `Arc` block.
const DEAD_BLOCK: usize = std::mem::size_of::<L1Entry>() + 16;

// With a dead block in every slot, a quarter of the bound (see `MAX_SLOTS`).
const _: () = assert!(DEAD_BLOCK + 24 <= 1024 / 4);

#[derive(Debug, Default)]
struct Slot {
    /// Empty: `Weak::new()`, which points at nothing.
    entry: Weak<L1Entry>,
    /// Bumped by every emptying of the slot.
    generation: u32,
    /// Hit since it came in or since a colliding key last asked for the slot.
    referenced: bool,
    hits: u8,
}

/// What [`Front::get`] found.
pub(super) enum Found {
    /// The key's entry, not past its drop deadline at `now`. `touch`: pass
    /// this hit on to moka.
    Hit {
        entry: Arc<L1Entry>,
        touch: bool,
        now: Instant,
    },
    /// Not here; offer what moka has with this generation.
    Miss(u32),
}

/// The table (see the module docs).
#[derive(Debug)]
pub(super) struct Front {
    slots: Box<[Mutex<Slot>]>,
    /// `64 - log2(slots)`: a slot is the top bits of the hash.
    pub(super) shift: u32,
}

impl Front {
    /// A table sized for an L1 bounded at `max_bytes`.
    pub(super) fn new(max_bytes: u64) -> Self {
        let wanted = usize::try_from(max_bytes / 1024).unwrap_or(MAX_SLOTS);
        let slots = wanted.clamp(MIN_SLOTS, MAX_SLOTS).next_power_of_two();
        Front {
            slots: (0..slots).map(|_| Mutex::default()).collect(),
            shift: 64 - slots.trailing_zeros(),
        }
    }

    #[inline]
    fn slot(&self, hash: u64) -> MutexGuard<'_, Slot> {
        // No code under a slot's lock can panic; a poisoned lock is usable.
        self.slots[(hash >> self.shift) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry of `key` (whose L1 hash is `hash`) if this table holds it,
    /// someone (moka) still holds it, and its drop deadline has not passed.
    #[inline]
    pub(super) fn get(&self, hash: u64, key: &[u8]) -> Found {
        let mut slot = self.slot(hash);
        let Some(entry) = slot.entry.upgrade() else {
            return Found::Miss(slot.generation);
        };
        let now = Instant::now();
        if !entry.key.is(key) || now >= entry.drop_at {
            let generation = slot.generation;
            drop(slot);
            drop(entry); // maybe the last reference: freed outside the lock
            return Found::Miss(generation);
        }
        slot.referenced = true;
        slot.hits = slot.hits.wrapping_add(1);
        let touch = slot.hits % TOUCH_EVERY == 0;
        Found::Hit { entry, touch, now }
    }

    /// Offers `entry`, just read from moka under `hash`: kept unless the slot
    /// was emptied since `generation` was read, or its live entry was hit
    /// since it came in (then it only loses that mark).
    pub(super) fn offer(&self, hash: u64, generation: u32, entry: &Arc<L1Entry>) {
        let mut slot = self.slot(hash);
        if slot.generation != generation {
            return;
        }
        if slot.referenced && slot.entry.strong_count() > 0 {
            slot.referenced = false;
            return;
        }
        let old = std::mem::replace(&mut slot.entry, Arc::downgrade(entry));
        slot.referenced = false;
        drop(slot);
        drop(old); // maybe a dead block's last reference: freed outside the lock
    }

    /// Empties the slot of `hash`, whatever it holds (see the module docs:
    /// after moka changed).
    pub(super) fn empty(&self, hash: u64) {
        take(self.slot(hash));
    }

    /// Empties every slot.
    pub(super) fn empty_all(&self) {
        for slot in self.slots.iter() {
            take(slot.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// Whether the slot of `hash` holds a live entry.
    #[cfg(test)]
    pub(super) fn holds(&self, hash: u64) -> bool {
        self.slot(hash).entry.strong_count() > 0
    }

    /// How many slots hold a live entry.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.lock().unwrap().entry.strong_count() > 0)
            .count()
    }
}

/// Empties a locked slot and bumps its generation (an offer that read the
/// slot before must not land after), freeing what it held after the lock is
/// let go.
fn take(mut slot: MutexGuard<'_, Slot>) {
    slot.generation = slot.generation.wrapping_add(1);
    let old = std::mem::take(&mut slot.entry);
    drop(slot);
    drop(old);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module's memory figure: a slot is 24 bytes, and the table has
    /// one per KiB of the bound, between the two limits.
    #[test]
    fn slots_are_small_and_sized_by_the_bound() {
        assert!(std::mem::size_of::<Mutex<Slot>>() <= 24);
        assert_eq!(Front::new(0).slots.len(), MIN_SLOTS);
        assert_eq!(Front::new(1 << 20).slots.len(), 1024);
        assert_eq!(Front::new(u64::MAX).slots.len(), MAX_SLOTS);
        assert_eq!(Front::new(u64::MAX).shift, 64 - 17);
    }
}
