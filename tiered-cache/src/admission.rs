//! Which values read from Redis L1 keeps: every one, or only those read
//! again while L1 would still have held them.
//!
//! Promoting a value into L1 costs about as much CPU as reading it from
//! Redis (moka's insert, its housekeeping, and the eviction or expiry that
//! follows). A key read once and never again, or read again only after
//! L1 has turned over, pays that for nothing: a scan, a long tail of cold
//! keys, an L1 whose entries expire before they come back. The doorkeeper
//! (TinyLFU's first stage) remembers the keys it was asked about in a bit
//! set, and admits a key the second time it is asked within a window. The
//! window ends, and the set is cleared, once it has recorded as many keys
//! as L1 holds entries: a key that comes back later would have left L1
//! before its next read anyway.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// When a value read from Redis is promoted into L1
/// ([`TieredCacheBuilder::l1_admission`](crate::TieredCacheBuilder::l1_admission)).
///
/// Values a call loaded or wrote always go into L1; this only governs
/// copies of what another instance stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum L1Admission {
    /// Every value read from Redis goes into L1 (the default): the best hit
    /// ratio when L1 can hold what is read repeatedly.
    #[default]
    EveryRead,
    /// A value read from Redis goes into L1 on its second read within a
    /// window as long as L1 holds entries; a first read returns it without
    /// keeping it (counted in `stats.promotions_deferred`). For scans, long
    /// tails of keys read once, and an L1 that turns over before keys come
    /// back: their promotions cost CPU and evict entries that are reused.
    /// The cost: a key read repeatedly is read from Redis twice, not once,
    /// before L1 serves it.
    SecondRead,
}

/// Bits per key of the largest window: 8 bits and 2 probes give about 5 %
/// false admissions when the window is full.
const BITS_PER_KEY: u64 = 8;
/// The smallest window, in keys: a nearly empty L1 still lets keys that
/// come back soon in.
const MIN_WINDOW: u64 = 1 << 12;
/// The largest window, in keys (a 4 MiB bit set): an L1 bound of
/// `u64::MAX` bytes must not ask for a bit set of that order.
const MAX_WINDOW: u64 = 1 << 22;

/// The keys asked about in the current window, as a two-probe bit set over
/// their 64-bit L1 hash.
#[derive(Debug)]
pub(crate) struct Doorkeeper {
    words: Box<[AtomicU64]>,
    /// Keys recorded in this window.
    recorded: AtomicU64,
    /// The most keys a window holds before its false admissions grow.
    max_window: u64,
}

impl Doorkeeper {
    /// A doorkeeper for an L1 that holds up to `max_entries` entries.
    pub(crate) fn new(max_entries: u64) -> Self {
        let keys = max_entries.clamp(MIN_WINDOW, MAX_WINDOW);
        let bits = (keys * BITS_PER_KEY).next_power_of_two();
        let words = (0..bits / 64).map(|_| AtomicU64::new(0)).collect();
        Doorkeeper {
            words,
            recorded: AtomicU64::new(0),
            max_window: bits / BITS_PER_KEY,
        }
    }

    /// Whether the key with L1 hash `hash` was asked about before in this
    /// window (admit it); if not, it is recorded. `window` is how many keys
    /// a window holds (L1's entry count), bounded by the set's size.
    pub(crate) fn admit(&self, hash: u64, window: u64) -> bool {
        let probes = [hash, hash.rotate_left(32)];
        if probes.iter().all(|&p| self.is_set(p)) {
            return true;
        }
        for p in probes {
            self.set(p);
        }
        let window = window.clamp(MIN_WINDOW, self.max_window);
        if self.recorded.fetch_add(1, Relaxed) + 1 >= window {
            self.reset();
        }
        false
    }

    fn slot(&self, probe: u64) -> (usize, u64) {
        let bit = probe as usize & (self.words.len() * 64 - 1);
        (bit / 64, 1 << (bit % 64))
    }

    fn is_set(&self, probe: u64) -> bool {
        let (word, mask) = self.slot(probe);
        self.words[word].load(Relaxed) & mask != 0
    }

    fn set(&self, probe: u64) {
        let (word, mask) = self.slot(probe);
        self.words[word].fetch_or(mask, Relaxed);
    }

    /// Ends the window. Racing admits may keep or lose a bit: at worst one
    /// key is admitted a read early or late.
    fn reset(&self) {
        self.recorded.store(0, Relaxed);
        for word in self.words.iter() {
            word.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u64) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(7).hash_one(n)
    }

    #[test]
    fn a_key_is_admitted_on_its_second_read() {
        let d = Doorkeeper::new(10_000);
        assert!(!d.admit(hash(1), 10_000));
        assert!(d.admit(hash(1), 10_000));
        assert!(d.admit(hash(1), 10_000));
        assert!(!d.admit(hash(2), 10_000));
    }

    #[test]
    fn a_key_back_after_the_window_is_a_first_read_again() {
        let d = Doorkeeper::new(100_000);
        let window = MIN_WINDOW;
        assert!(!d.admit(hash(0), window));
        // The window fills with other keys and is cleared.
        for n in 1..window {
            d.admit(hash(n), window);
        }
        assert!(!d.admit(hash(0), window), "forgotten with its window");
        assert!(d.admit(hash(0), window));
    }

    #[test]
    fn false_admissions_stay_rare_in_a_full_window() {
        let d = Doorkeeper::new(50_000);
        let window = d.max_window;
        for n in 0..window - 1 {
            d.admit(hash(n), window);
        }
        let strangers = 10_000;
        let admitted = (window..window + strangers)
            .filter(|&n| {
                let h = hash(n);
                d.is_set(h) && d.is_set(h.rotate_left(32))
            })
            .count();
        assert!(
            admitted < strangers as usize / 10,
            "{admitted} of {strangers} never-seen keys would be admitted"
        );
    }

    #[test]
    fn any_l1_bound_gets_a_bounded_bit_set() {
        for max_entries in [0, 1, MIN_WINDOW - 1, 1 << 30, u64::MAX] {
            let d = Doorkeeper::new(max_entries);
            assert!(d.words.len() as u64 * 64 <= MAX_WINDOW * BITS_PER_KEY);
            assert!(d.max_window >= MIN_WINDOW);
            assert!(!d.admit(hash(1), u64::MAX));
            assert!(d.admit(hash(1), 0));
        }
    }
}
