//! Tag-based invalidation by version counters.
//!
//! Each tag has a version in Redis (`{namespace}:#tag:{tag}`, one key per
//! tag, and every command touches one key, so it works unchanged in Redis
//! Cluster). An entry records the version of each of its tags as it was
//! *before* its value was loaded. Invalidating a tag bumps its version with
//! one single-key script (`l2/scripts/bump_tag.lua`): O(1) whatever the number of entries, no KEYS/SCAN,
//! no huge DEL. A reader treats an entry as a miss when any of its tag stamps
//! is older than the tag's current version; the old entries then expire in
//! Redis on their own TTL. Because the stamp is taken before the load, a slow
//! load that races an invalidation stores an entry that is already stale.
//!
//! # Why counters, not a reverse index
//! A reverse index (a Redis set of the keys of each tag) makes invalidation
//! O(entries): 100,000 keys to read and delete, in batches to keep Redis
//! responsive; every write pays an extra `SADD` (in Cluster, into another
//! slot, so not atomic with the `SET`), and the sets need their own expiry
//! bookkeeping. Counters cost one small key per tag and a few bytes per
//! entry, and invalidating ten entries or ten million is the same command.
//! Their price is that a reader must know current versions; the rest of this
//! module is about knowing them, and the backplane is what keeps them known.
//!
//! # Versions never go backwards
//! A bump sets `max(previous + 1, Redis server time in µs)` rather than
//! `INCR`: if the counter key is lost (Redis restarted empty, `FLUSHALL`,
//! evicted under an `allkeys-*` policy), the next bump still exceeds every
//! version issued before, so an entry stamped with an old version cannot
//! become current again (with `INCR` it would, from the restart on).
//!
//! # What an instance knows
//! Each instance keeps the versions it knows in memory; knowledge only grows.
//! It learns newer versions from its own bumps, from entries it reads (a
//! stamp newer than known) and from the backplane. A tag it does not know is
//! read from Redis (one `MGET` for all of an entry's unknown tags) before an
//! entry is judged, never assumed to be 0: that would accept entries
//! invalidated before this instance started. Known versions are trusted only
//! while they are *live*: while the backplane is subscribed, or when there
//! is no Redis (and so no other instance). When the subscription is lost, or
//! the backplane is off, every judgement reads the versions from Redis first
//! (one more round trip per L2 read of an entry), and on resubscription the
//! table is forgotten along with L1.
//!
//! # The namespace epoch
//! Every entry also carries an implicit tag, [`EPOCH_TAG`] (its counter is
//! `{namespace}:#epoch`). `clear()` bumps it, which makes every entry of the
//! namespace a miss on every instance, without KEYS or SCAN. Tag names that
//! start with a NUL character are reserved for this.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use crate::entry::TagStamp;
use crate::key::escape_into;
use crate::l2::L2;

/// The implicit tag of every entry; `clear()` bumps it.
pub(crate) const EPOCH_TAG: &str = "\0ns";

/// What [`TagVersions`] holds for an epoch version it has not learned.
const UNKNOWN: u64 = u64::MAX;

/// Most tag versions an instance keeps. Per-entity tags (`user:{id}`)
/// would grow the table with every distinct tag seen; past this it is
/// forgotten (with Redis, forgotten versions are read again when needed;
/// without, see [`TagVersions::forgotten`]).
const MAX_KNOWN: usize = 100_000;

/// The tag versions this instance knows.
#[derive(Debug)]
pub(crate) struct TagVersions {
    /// Looked up on every read from Redis: a fast hasher, seeded per
    /// table (tag names may come from users).
    known: RwLock<HashMap<Arc<str>, u64, foldhash::fast::RandomState>>,
    /// The namespace epoch's version, [`UNKNOWN`] until learned: every read
    /// from Redis judges the epoch stamp, so it is kept apart from `known`
    /// (no lock, no hash) and never let go with it.
    epoch: AtomicU64,
    /// Without Redis, the highest version forgotten when the table was
    /// let go: an unknown tag counts as at this version, so entries stamped
    /// before read as stale (a few needless misses) and new stamps and
    /// bumps stay above every older one. With Redis: always 0, as unknown
    /// versions are read from Redis.
    forgotten: AtomicU64,
    /// No Redis: this table is all there is.
    local_only: bool,
    /// Whether `known` is kept current by the backplane (or needs no
    /// keeping, without Redis). When false, versions are re-read from Redis
    /// before they are relied on.
    live: AtomicBool,
}

impl Default for TagVersions {
    /// A table for a cache without Redis: its own bumps are all there is.
    fn default() -> Self {
        Self::new(true)
    }
}

impl TagVersions {
    /// An empty table; `live` says whether what it learns stays current.
    pub(crate) fn new(live: bool) -> Self {
        TagVersions {
            known: RwLock::default(),
            epoch: AtomicU64::new(UNKNOWN),
            forgotten: AtomicU64::new(0),
            local_only: live,
            live: AtomicBool::new(live),
        }
    }

    /// The version of `tag` to use: known, or (unknown) what the table has
    /// forgotten, 0 with Redis.
    fn version_or_floor(&self, tag: &str) -> u64 {
        self.known(tag)
            .unwrap_or_else(|| self.forgotten.load(Ordering::SeqCst))
    }

    /// Marks the table as kept current (subscribed) or not (subscription lost).
    pub(crate) fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
    }

    /// Whether what this table knows is kept current (see [`TagVersions::set_live`]).
    pub(crate) fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// Forgets every version: after missed messages, none can be trusted.
    pub(crate) fn forget_all(&self) {
        self.epoch.store(UNKNOWN, Ordering::SeqCst);
        self.known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The known version of `tag`, if any.
    pub(crate) fn known(&self, tag: &str) -> Option<u64> {
        if tag == EPOCH_TAG {
            let epoch = self.epoch.load(Ordering::SeqCst);
            return (epoch != UNKNOWN).then_some(epoch);
        }
        self.known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tag)
            .copied()
    }

    /// Records that `tag` is at least at `version`; returns true if that is news.
    pub(crate) fn observe(&self, tag: &str, version: u64) -> bool {
        if self.known(tag).is_some_and(|v| v >= version) {
            return false;
        }
        if tag == EPOCH_TAG {
            let raised = self
                .epoch
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |was| {
                    (was == UNKNOWN || was < version).then_some(version)
                });
            // News as for any tag: above what was known, or above 0.
            return match raised {
                Ok(UNKNOWN) => version > 0,
                Ok(was) => was < version,
                Err(_) => false,
            };
        }
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= MAX_KNOWN && !known.contains_key(tag) {
            if self.local_only {
                let highest = known.values().copied().max().unwrap_or(0);
                self.forgotten.fetch_max(highest, Ordering::SeqCst);
            }
            known.clear();
        }
        let slot = known.entry(Arc::from(tag)).or_insert(0);
        let news = *slot < version;
        *slot = (*slot).max(version);
        news
    }

    /// True when no stamp is older than the tag's current version. Versions
    /// this instance cannot vouch for are read from Redis first. When Redis
    /// does not answer, what this instance knows decides: while Redis is
    /// down nobody can bump a tag, and refusing would turn an outage into
    /// a loader stampede (L1 could hold nothing).
    pub(crate) async fn is_current(&self, stamps: &[TagStamp], l2: Option<&L2>) -> bool {
        let unvouched = self.unvouched(stamps.iter().map(|(tag, _)| &**tag));
        if !unvouched.is_empty() {
            // Boxed: the fetch is rare (a tag this instance cannot vouch
            // for) and would otherwise enlarge every tagged read's future.
            Box::pin(self.fetch(&unvouched, l2)).await;
        }
        self.judge(stamps)
    }

    /// True when no stamp is older than the version this instance knows.
    pub(crate) fn judge(&self, stamps: &[TagStamp]) -> bool {
        stamps.iter().all(|(tag, stamp)| {
            let known = self.version_or_floor(tag);
            if *stamp > known {
                self.observe(tag, *stamp);
            }
            *stamp >= known
        })
    }
}

/// Tag floors: an entry stamped with a tag version below the tag's floor was
/// invalidated; so was an entry of a tag built before the tag's cut (a tag
/// dropped here whose new version is unknown, as when Redis could not bump
/// it: what is there goes, what is built later stays).
#[derive(Debug)]
pub(crate) struct TagFloors {
    /// Bumped after every raise; starts at 1 so that new entries get checked.
    generation: AtomicU64,
    floors: RwLock<FloorMaps>,
}

#[derive(Debug, Default)]
struct FloorMaps {
    /// Per tag: the floor version, and when it was last raised.
    versions: HashMap<Arc<str>, (u64, Instant)>,
    cuts: HashMap<Arc<str>, Instant>,
    /// Every entry with a tag (other than the namespace epoch) built at or
    /// before this is a miss: what stands in for the floors and cuts let go
    /// to keep the table bounded.
    all_tags_cut: Option<Instant>,
}

/// Most floors and cuts kept. Per-entity tags (`user:{id}`) would grow the
/// table with every distinct tag invalidated; past this, the oldest half is
/// let go and replaced by one cut over every tagged entry built before it
/// (a few needless misses, never a stale hit).
pub(crate) const MAX_FLOORS: usize = 10_000;

impl FloorMaps {
    fn len(&self) -> usize {
        self.versions.len() + self.cuts.len()
    }

    /// Keeps the table within [`MAX_FLOORS`].
    fn bound(&mut self) {
        if self.len() <= MAX_FLOORS {
            return;
        }
        let mut times: Vec<Instant> = self.versions.values().map(|(_, at)| *at).collect();
        times.extend(self.cuts.values().copied());
        let middle = times.len() / 2;
        let (_, &mut cut, _) = times.select_nth_unstable(middle);
        self.versions.retain(|_, (_, at)| *at > cut);
        self.cuts.retain(|_, at| *at > cut);
        self.all_tags_cut = Some(self.all_tags_cut.map_or(cut, |c| c.max(cut)));
    }

    fn outdate(&self, tags: &[TagStamp], built: Instant) -> bool {
        let below = |tag: &Arc<str>, version: &u64| {
            self.versions
                .get(tag)
                .is_some_and(|(floor, _)| version < floor)
                || self.cuts.get(tag).is_some_and(|cut| built <= *cut)
                || (self.all_tags_cut.is_some_and(|cut| built <= cut) && &**tag != EPOCH_TAG)
        };
        tags.iter().any(|(tag, version)| below(tag, version))
    }
}

impl TagFloors {
    /// An empty table.
    pub(crate) fn new() -> Self {
        TagFloors {
            generation: AtomicU64::new(1),
            floors: RwLock::default(),
        }
    }

    /// Bumped after every change: an entry checked at the current value
    /// needs no check again.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Entries stamped with `tag` below `version` are outdated from now on.
    pub(crate) fn raise(&self, tag: &str, version: u64) {
        {
            let mut floors = self.floors.write().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let floor = floors.versions.entry(Arc::from(tag)).or_insert((0, now));
            *floor = (floor.0.max(version), now);
            floors.bound();
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Entries of `tag` built at or before `at` are outdated from now on.
    pub(crate) fn cut(&self, tag: &str, at: Instant) {
        {
            let mut floors = self.floors.write().unwrap_or_else(PoisonError::into_inner);
            let cut = floors.cuts.entry(Arc::from(tag)).or_insert(at);
            *cut = (*cut).max(at);
            floors.bound();
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Forgets every floor (after a clear: nothing is left to hide).
    pub(crate) fn reset(&self) {
        *self.floors.write().unwrap_or_else(PoisonError::into_inner) = FloorMaps::default();
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether an entry with these stamps, built then, was invalidated.
    pub(crate) fn outdates(&self, tags: &[TagStamp], built: Instant) -> bool {
        let floors = self.floors.read().unwrap_or_else(PoisonError::into_inner);
        (floors.len() > 0 || floors.all_tags_cut.is_some()) && floors.outdate(tags, built)
    }

    /// Whether stamps carry `tag` below `version` (for a sweep of L1).
    pub(crate) fn stamped_below(tags: &[TagStamp], tag: &str, version: u64) -> bool {
        tags.iter().any(|(t, v)| &**t == tag && *v < version)
    }

    /// Whether stamps carry `tag` at all (for a sweep of L1).
    pub(crate) fn carries(tags: &[TagStamp], tag: &str) -> bool {
        tags.iter().any(|(t, _)| &**t == tag)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.floors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The Redis key body of the namespace epoch's counter.
pub(crate) const EPOCH_KEY: &str = "#epoch";

/// The Redis key body of a tag's counter.
pub(crate) fn tag_key(tag: &str) -> String {
    if tag == EPOCH_TAG {
        return EPOCH_KEY.to_owned();
    }
    let mut body = String::with_capacity(tag.len() + 6);
    body.push_str("#tag:");
    escape_into(&mut body, tag);
    body
}

impl TagVersions {
    /// The current stamps of the namespace epoch and `tags`, reading from
    /// Redis the versions this instance cannot vouch for. When Redis does not
    /// answer, an unknown tag is stamped 0: such an entry reads as stale once
    /// the tag has ever been bumped, which is safe. Never learns a 0 it did
    /// not read.
    pub(crate) async fn stamps(&self, tags: &[String], l2: Option<&L2>) -> Arc<[TagStamp]> {
        let names = || std::iter::once(EPOCH_TAG).chain(tags.iter().map(String::as_str));
        let unvouched = self.unvouched(names());
        if !unvouched.is_empty() {
            self.fetch(&unvouched, l2).await;
        }
        names()
            .map(|tag| (Arc::from(tag), self.version_or_floor(tag)))
            .collect()
    }

    /// Reads from Redis (one MGET) the versions of `tags` this instance
    /// cannot vouch for, so that [`TagVersions::judge`] can then decide.
    pub(crate) async fn read<'a>(&self, tags: impl Iterator<Item = &'a str>, l2: Option<&L2>) {
        let mut names: Vec<&str> = tags.collect();
        // Entries of a batch mostly carry the same tags in the same order.
        names.dedup();
        names.sort_unstable();
        names.dedup();
        let unvouched = self.unvouched(names.into_iter());
        if !unvouched.is_empty() {
            self.fetch(&unvouched, l2).await;
        }
    }

    /// The tags whose versions must be read from Redis before use: the
    /// unknown ones, or all of them while knowledge is not live.
    fn unvouched<'a>(&self, tags: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        let live = self.live();
        tags.filter(|tag| !live || self.known(tag).is_none())
            .collect()
    }

    /// Reads the versions of `tags` from Redis (one MGET) and learns them; a
    /// tag without a counter is at version 0. Learns nothing when Redis does
    /// not answer (the failure is counted and logged by the L2 tier).
    async fn fetch(&self, tags: &[&str], l2: Option<&L2>) {
        let Some(l2) = l2 else {
            return; // without Redis, what this instance knows is all there is
        };
        let bodies: Vec<String> = tags.iter().map(|tag| tag_key(tag)).collect();
        if let Ok(versions) = l2.tag_versions(&bodies).await {
            self.learn(tags.iter().copied(), versions);
        }
    }

    /// Learns the versions just read from Redis of `tags`, in order.
    pub(crate) fn learn<'a>(&self, tags: impl Iterator<Item = &'a str>, versions: Vec<u64>) {
        for (tag, version) in tags.zip(versions) {
            self.observe(tag, version);
        }
    }

    /// Bumps `tag` in Redis (or locally without Redis) and returns the new version.
    pub(crate) async fn bump(&self, tag: &str, l2: Option<&L2>) -> Result<u64, crate::Error> {
        let version = match l2 {
            Some(l2) => l2
                .bump_tag(&tag_key(tag))
                .await
                .map_err(crate::l2::L2Fault::into_error)?,
            None => self.version_or_floor(tag) + 1,
        };
        self.observe(tag, version);
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_older_than_known_are_stale() {
        let t = TagVersions::default();
        t.observe("a", 2);
        assert!(t.judge(&[(Arc::from("a"), 2)]));
        assert!(!t.judge(&[(Arc::from("a"), 1)]));
        assert!(t.judge(&[(Arc::from("b"), 0)]));
    }

    /// The epoch is kept apart from the other tags: learned, raised only,
    /// forgotten with the rest after missed messages, kept when the table
    /// of the others is let go.
    #[test]
    fn the_epoch_is_known_raised_and_forgotten_like_any_tag() {
        let t = TagVersions::new(false);
        assert_eq!(t.known(EPOCH_TAG), None);
        assert!(!t.observe(EPOCH_TAG, 0), "0 is no news, but now known");
        assert_eq!(t.known(EPOCH_TAG), Some(0));
        assert!(t.observe(EPOCH_TAG, 7));
        assert!(!t.observe(EPOCH_TAG, 5), "never lowered");
        assert_eq!(t.known(EPOCH_TAG), Some(7));
        assert!(t.judge(&[(Arc::from(EPOCH_TAG), 7)]));
        assert!(!t.judge(&[(Arc::from(EPOCH_TAG), 6)]));
        for i in 0..MAX_KNOWN + 1 {
            t.observe(&format!("user:{i}"), 1);
        }
        assert_eq!(t.known(EPOCH_TAG), Some(7), "not let go with the others");
        t.forget_all();
        assert_eq!(t.known(EPOCH_TAG), None);
    }

    #[test]
    fn newer_stamps_teach_the_table() {
        let t = TagVersions::default();
        assert!(t.judge(&[(Arc::from("a"), 5)]));
        assert_eq!(t.known("a"), Some(5));
        assert!(!t.observe("a", 4));
    }

    /// A million distinct tags: the table stays bounded, and without Redis
    /// a forgotten tag never makes an entry stamped before look current.
    #[test]
    fn the_table_stays_bounded_and_forgetting_is_safe() {
        let t = TagVersions::default();
        t.observe("first", 3);
        let old_stamp: TagStamp = (Arc::from("first"), 2);
        assert!(!t.judge(std::slice::from_ref(&old_stamp)));
        for i in 0..1_000_000_u64 {
            t.observe(&format!("user:{i}"), i % 7 + 1);
        }
        assert!(t.known.read().unwrap().len() <= MAX_KNOWN);
        assert!(!t.judge(&[old_stamp]), "forgotten, still stale");
        let fresh = t
            .known("first")
            .map_or(t.forgotten.load(Ordering::SeqCst), |v| v);
        assert!(
            t.judge(&[(Arc::from("first"), fresh)]),
            "a new stamp is current"
        );
    }

    #[test]
    fn forget_all_empties_the_table() {
        let t = TagVersions::default();
        t.observe("a", 3);
        t.forget_all();
        assert_eq!(t.known("a"), None);
    }

    #[test]
    fn only_live_knowledge_is_vouched_for() {
        let t = TagVersions::new(false);
        t.observe("a", 1);
        assert_eq!(t.unvouched(["a", "b"].into_iter()), ["a", "b"]);
        t.set_live(true);
        assert_eq!(t.unvouched(["a", "b"].into_iter()), ["b"]);
    }

    #[tokio::test]
    async fn every_entry_carries_the_epoch_and_clear_outdates_it() {
        let t = TagVersions::default();
        let stamps = t.stamps(&["x".to_owned()], None).await;
        assert_eq!(&*stamps[0].0, EPOCH_TAG);
        assert_eq!(&*stamps[1].0, "x");
        assert!(t.is_current(&stamps, None).await);
        t.bump(EPOCH_TAG, None).await.unwrap();
        assert!(!t.is_current(&stamps, None).await);
    }

    #[test]
    fn the_epoch_has_its_own_counter_key() {
        assert_eq!(tag_key(EPOCH_TAG), "#epoch");
        assert_eq!(tag_key("#epoch"), "#tag:#epoch");
    }
}
