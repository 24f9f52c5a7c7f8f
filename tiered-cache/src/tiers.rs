//! The tier layer: the only code that holds both tiers. It promotes entries
//! read from Redis into L1 (ticketed, so a promotion never undoes a drop),
//! stores entries in both tiers, and turns bad bytes into counted misses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Codec;
use crate::entry::{self, Meta};
use crate::error::Error;
use crate::events::Event;
use crate::events::LogLimit;
use crate::l1::{later, AnyValue, L1Entry, Looked, Ticket, L1};
use crate::l2::{Announcement, Besides, L2Fault, LockToken, Stored, Versioned, Write, L2};
use crate::options::Resolved;
use crate::stats::Stats;
use crate::tags::{tag_key, TagVersions, EPOCH_KEY, EPOCH_TAG};
use crate::weigh;

/// See [`Tiers::lookup_l1`].
pub(crate) enum L1Lookup<V> {
    /// Fresh: the value, or a cached negative (`None`).
    Hit(Option<Arc<V>>),
    /// A stale value kept by the fail-safe throttle: a miss (counted).
    FailSafe,
    /// Nothing usable: go on to Redis.
    Miss,
}

/// Who writes an entry, for [`Tiers::store`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Origin {
    /// The application (`set`): replaces whatever is there.
    Write,
    /// A load, with what it saw before it called the loader.
    Load(Claim),
}

/// Taken before a load calls its loader: L1's drop counts for the key, and
/// the entry's version in Redis. The load's result is stored only where
/// neither changed since, so a load that began before a write or an
/// invalidation (here or on another instance) never undoes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim {
    l1: Ticket,
    /// `None`: no Redis, or it did not answer; the result then stays out of it.
    l2: Option<u64>,
    /// How long reading Redis took: spent from the call's L2 budget.
    spent: Duration,
    /// The fleet lock this load holds, which its store releases.
    lock: Option<LockToken>,
}

impl Claim {
    /// How long the claim's read took.
    pub(crate) fn spent(&self) -> Duration {
        self.spent
    }

    /// The version the claim's read found in Redis, if it answered.
    pub(crate) fn version(&self) -> Option<u64> {
        self.l2
    }

    /// Whether the load holds the entry's fleet lock.
    pub(crate) fn holds_lock(&self) -> bool {
        self.lock.is_some()
    }

    /// This claim, for a load that holds the entry's fleet lock with `token`.
    pub(crate) fn holding(mut self, token: LockToken) -> Self {
        self.lock = Some(token);
        self
    }

    /// What is left of an L2 budget of `budget` after the claim's read.
    pub(crate) fn budget_left(&self, budget: Duration) -> Duration {
        budget.saturating_sub(self.spent)
    }
}

/// What [`Tiers::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Committed {
    /// Stored in Redis at this version (and in L1, if it has one);
    /// `announced`: the store also announced it on the backplane.
    Stored { version: u64, announced: bool },
    /// Not stored anywhere: a newer write or an invalidation won.
    Refused,
    /// Not in Redis (none, it failed, the value was too large, or the load
    /// had no claim on it); in L1 only, if anywhere.
    NotInRedis,
}

/// The version a write takes before it reaches the application's store,
/// from [`Tiers::reserve`]; its claim lets that write's own cache update
/// through.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reserved {
    pub(crate) version: u64,
    pub(crate) claim: Claim,
}

/// A version for a write that Redis could not number (no Redis, or it
/// failed): the wall clock in microseconds, made strictly increasing in this
/// process. Redis numbers writes the same way (`max(counter + 1, server
/// time in µs)`), so the two stay comparable while the clocks agree.
pub(crate) fn local_version() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = entry::now_ms().saturating_mul(1000);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

impl Committed {
    /// Whether the other instances were told already (by the store script):
    /// if not, and they must be, the caller's backplane tells them.
    pub(crate) fn announced(&self) -> bool {
        matches!(
            self,
            Committed::Stored {
                announced: true,
                ..
            }
        )
    }
}

/// What the Redis half of a store did.
enum L2Store {
    Stored(Stored),
    /// A newer write won.
    Refused,
    /// Not written: no Redis, Redis failed, too large, or no claim on it.
    Skipped,
}

/// An entry encoded for both tiers, ready for [`Tiers::commit`]: the
/// caller's CPU work done, only the tiers' writes left (which a load runs
/// within what is left of its L2 budget, then in the background).
#[derive(Debug)]
pub(crate) struct Prepared {
    meta: Meta,
    bytes: Vec<u8>,
    erased: Option<AnyValue>,
    ttl: Duration,
    keep: Duration,
    /// What the value holds in memory, for its L1 weight.
    size: usize,
    origin: Origin,
}

/// Encodes an entry for [`Tiers::commit`]. `value` is `None` for a negative
/// entry; `erased` is the same value as L1 holds it.
///
/// # Errors
/// When the codec cannot encode the value.
pub(crate) fn prepare<V, C>(
    value: Option<&V>,
    erased: Option<&AnyValue>,
    opts: &Resolved,
    tags: Arc<[entry::TagStamp]>,
    load_time: Duration,
    ttl: Duration,
    origin: Origin,
) -> Result<Prepared, Error>
where
    V: Serialize + Send + Sync + 'static,
    C: Codec,
{
    let ttl = opts.ttl_with_jitter(ttl);
    let stale = if value.is_some() {
        opts.stale
    } else {
        Duration::ZERO
    };
    let keep = ttl.saturating_add(stale);
    let now_ms = entry::now_ms();
    let meta = Meta {
        created_ms: now_ms,
        expires_ms: now_ms.saturating_add(whole_millis(ttl)),
        stale_until_ms: now_ms.saturating_add(whole_millis(keep)),
        load_micros: load_time.as_micros().min(u128::from(u32::MAX)) as u32,
        version: 0,
        tags,
    };
    let mut bytes = entry::encode_header(&meta, C::ID, value.is_none(), 64);
    if let Some(v) = value {
        C::encode(v, &mut bytes)?;
    }
    let size = value.map_or(0, weigh::value_bytes);
    Ok(Prepared {
        meta,
        bytes,
        erased: erased.cloned(),
        ttl,
        keep,
        size,
        origin,
    })
}

/// Whole milliseconds, saturating.
fn whole_millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Both tiers of one cache, and what judging their entries needs.
#[derive(Debug)]
pub(crate) struct Tiers {
    pub(crate) l1: Option<L1>,
    pub(crate) l2: Option<L2>,
    pub(crate) tags: Arc<TagVersions>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) max_value_bytes: usize,
    /// With L1 off: a small L1 that holds only fail-safe copies, so the
    /// fail-safe throttle still keeps a failing loader from being hammered.
    pub(crate) failsafe_only: Option<L1>,
    /// At most one "unusable entry" line every 10 s for this cache.
    pub(crate) bad_entry_log: LogLimit,
}

impl Tiers {
    /// Runs `call` (the Redis part of one public call) within one L2
    /// budget: `l2_timeout` for all its commands together. Returns the
    /// scope future itself (no `async` wrapper around `call`, which would
    /// lay it out again on every L2 read); without L2 the budget is moot.
    pub(crate) fn within_budget<F: std::future::Future>(
        &self,
        call: F,
    ) -> impl std::future::Future<Output = F::Output> {
        let budget = self.l2.as_ref().map_or(Duration::ZERO, |l2| l2.timeout());
        crate::l2::budget::within(budget, call)
    }

    /// What this instance holds in memory: L1, or with L1 off its fail-safe
    /// copies. Invalidations apply to it.
    pub(crate) fn local(&self) -> Option<&L1> {
        self.l1.as_ref().or(self.failsafe_only.as_ref())
    }

    /// After a failed refresh, serves the stale value as if fresh for a
    /// short while, never past its grace window, so the loader is not
    /// hammered while it fails.
    pub(crate) async fn throttle_failsafe(
        &self,
        key: &str,
        stale: &Arc<L1Entry>,
        delay: Duration,
        claim: Claim,
    ) {
        let Some(l1) = self.local() else { return };
        // Only stand in for the entry that failed to refresh: if the key was
        // invalidated or rewritten during the load, bringing the old value
        // back would undo that. The claim's ticket, taken before the load,
        // sees any such drop; an entry in L1 must still be the same one
        // (a promotion of it from Redis included).
        if let Some(current) = l1.get(key).await {
            if current.meta != stale.meta {
                return;
            }
        }
        let retry = l1.failsafe_copy(key, stale, later(Instant::now(), delay));
        l1.insert_since(key, retry, claim.l1).await;
    }

    /// Writes a [`Prepared`] entry to both tiers, Redis first. A load's
    /// result (`Origin::Load`) is stored only where the key was not written
    /// or dropped since its claim: in Redis by compare-and-set on the
    /// entry's version, in L1 by its drop ticket. An application's write
    /// (`Origin::Write`) replaces what is there. With `announce`, a write
    /// to Redis is announced on the backplane in the same step (see
    /// [`Committed::announced`]).
    pub(crate) async fn commit(
        &self,
        key: &str,
        prepared: Prepared,
        announce: Option<&Announcement>,
    ) -> Committed {
        let Prepared {
            mut meta,
            bytes,
            erased,
            ttl,
            keep,
            size,
            origin,
        } = prepared;
        // Where L1 will judge the entry's stamps against versions this
        // instance cannot vouch for (the backplane off), they are read
        // right after the write, in the same round trip.
        let tag_keys: Vec<String> = match &self.l1 {
            Some(_) if !self.tags.live() => meta.tags.iter().map(|(tag, _)| tag_key(tag)).collect(),
            _ => Vec::new(),
        };
        let after: Vec<&str> = tag_keys.iter().map(String::as_str).collect();
        let (stored, versions) = self
            .store_l2(key, &bytes, keep, origin, announce, &after)
            .await;
        let committed = match stored {
            L2Store::Refused => {
                self.stats.record(Event::StaleWriteRefused);
                return Committed::Refused;
            }
            L2Store::Stored(Stored { version, announced }) => {
                meta.version = version;
                Committed::Stored { version, announced }
            }
            L2Store::Skipped => Committed::NotInRedis,
        };
        let Some(l1) = &self.l1 else {
            return committed;
        };
        // A tag bumped (or the namespace cleared) since the stamps were
        // taken, before the load, makes the entry stale already: L1 must
        // not serve it. (A bump racing this check is caught by the load's
        // ticket, or by the floors on the entry's first hit.)
        let current = if versions.len() == meta.tags.len() {
            self.tags
                .learn(meta.tags.iter().map(|(tag, _)| &**tag), versions);
            self.tags.judge(&meta.tags)
        } else {
            self.tags.is_current(&meta.tags, self.l2.as_ref()).await
        };
        if !current {
            return committed;
        }
        let entry = l1.entry(key, erased, meta, ttl, keep, size);
        match origin {
            Origin::Load(claim) => {
                l1.insert_since(key, entry, claim.l1).await;
            }
            Origin::Write => l1.replace(key, entry).await,
        }
        committed
    }

    /// Takes the version of a write that reaches the application's store
    /// before the cache (write-through, cache-aside): the entry leaves both
    /// tiers and its version advances, so a load that began before cannot
    /// store the value it read from the store; the returned claim lets this
    /// write's own cache update through, unless a later write or
    /// invalidation comes first.
    pub(crate) async fn reserve(&self, key: &str) -> Reserved {
        let started = Instant::now();
        let seen = match &self.l2 {
            Some(l2) => l2.invalidate(key).await.ok(),
            None => None,
        };
        if let Some(l1) = self.local() {
            l1.invalidate(key).await;
        }
        // After this write's own drop: only later drops stop its update.
        let claim = Claim {
            l1: self.ticket(key),
            l2: seen,
            spent: started.elapsed(),
            lock: None,
        };
        Reserved {
            version: seen.unwrap_or_else(local_version),
            claim,
        }
    }

    /// The Redis half of [`Tiers::commit`].
    async fn store_l2(
        &self,
        key: &str,
        bytes: &[u8],
        keep: Duration,
        origin: Origin,
        announce: Option<&Announcement>,
        versions_after: &[&str],
    ) -> (L2Store, Vec<u64>) {
        let Some(l2) = &self.l2 else {
            return (L2Store::Skipped, Vec::new());
        };
        let (write, lock) = match origin {
            Origin::Write => (Write::Always, None),
            Origin::Load(Claim {
                l2: Some(seen),
                lock,
                ..
            }) => (Write::IfVersion(seen), lock),
            // Redis did not answer before the load: what it holds is unknown,
            // so the load's value stays out of it.
            Origin::Load(Claim { l2: None, .. }) => return (L2Store::Skipped, Vec::new()),
        };
        if bytes.len() > self.max_value_bytes {
            self.stats.record(Event::OversizedSkip);
            // The older value in Redis must not outlive this newer one.
            let _ = l2.invalidate(key).await;
            return (L2Store::Skipped, Vec::new());
        }
        let besides = Besides {
            lock,
            announce,
            versions_after,
        };
        let mut stored = l2
            .store(key, bytes, keep, write, entry::VERSION_AT, besides)
            .await;
        if let Err(L2Fault::WrongType) = stored {
            // Deleted as a bad entry (nothing was written); then this one
            // takes its place.
            self.bad_entry(key, "holds another Redis type").await;
            stored = l2
                .store(key, bytes, keep, write, entry::VERSION_AT, besides)
                .await;
        }
        match stored {
            Ok((Some(stored), versions)) => (L2Store::Stored(stored), versions),
            Ok((None, _)) => (L2Store::Refused, Vec::new()),
            // Counted and logged by the L2 tier; L1 still gets the value.
            Err(_) => (L2Store::Skipped, Vec::new()),
        }
    }

    /// Removes `key` from Redis (advancing its version, so loads that began
    /// before lose), then from L1: a local reader that misses L1 in between
    /// finds nothing in Redis to bring back.
    pub(crate) async fn invalidate(&self, key: &str) -> Result<(), Error> {
        let deleted = match &self.l2 {
            Some(l2) => match l2.invalidate(key).await {
                Ok(_) => Ok(()),
                // Redis refused the script (an ACL without EVAL, say): a
                // plain delete still takes the older value out. The version
                // stays, but the loads it would stop write by script too.
                Err(L2Fault::Rejected(_)) => l2.del(&[key]).await.map_err(L2Fault::into_error),
                Err(fault) => Err(fault.into_error()),
            },
            None => Ok(()),
        };
        if let Some(l1) = self.local() {
            l1.invalidate(key).await;
        }
        deleted
    }

    /// Reads `key` from Redis for a load: promotes what is there (like
    /// [`Tiers::read_l2`]) and takes the load's [`Claim`] first.
    pub(crate) async fn read_claimed<V, C>(&self, key: &str) -> (Option<Arc<L1Entry>>, Claim)
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let ticket = self.ticket(key);
        let started = Instant::now();
        let unclaimed = || Claim {
            l1: ticket,
            l2: None,
            spent: started.elapsed(),
            lock: None,
        };
        let Some(l2) = &self.l2 else {
            return (None, unclaimed());
        };
        // A key of another Redis type reads as absent here: the load's
        // store counts and replaces it.
        let beside = self.versions_beside();
        let Ok((mut found, versions)) = l2.mget_versioned_then_versions(&[key], beside).await
        else {
            return (None, unclaimed()); // counted and logged by the L2 tier
        };
        let Some(found) = found.pop() else {
            return (None, unclaimed());
        };
        let read = self.learn_beside(&versions);
        let entry = match found.bytes {
            Some(bytes) => {
                self.accept_l2::<V, C>(key, &bytes, entry::now_ms(), ticket, read)
                    .await
            }
            None => None,
        };
        let claim = Claim {
            l1: ticket,
            l2: Some(found.version),
            spent: started.elapsed(),
            lock: None,
        };
        (entry, claim)
    }

    /// Reads many keys from Redis in one MGET and promotes what is there,
    /// as [`Tiers::read_l2`] does one. With `claims`, each key's claim for a
    /// load comes too (as [`Tiers::read_claimed`]; the MGET reads each
    /// entry's version beside it); without, the claims name no version.
    pub(crate) async fn read_many<V, C>(
        &self,
        keys: &[&str],
        claims: bool,
    ) -> Vec<(Option<Arc<L1Entry>>, Claim)>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let tickets: Vec<Ticket> = keys.iter().map(|key| self.ticket(key)).collect();
        let started = Instant::now();
        let beside = self.versions_beside();
        let (found, versions): (Vec<Versioned>, Vec<u64>) = match &self.l2 {
            Some(_) if keys.is_empty() => Default::default(),
            Some(l2) if claims => l2
                .mget_versioned_then_versions(keys, beside)
                .await
                .unwrap_or_default(),
            Some(l2) => {
                let (found, versions) = l2
                    .mget_then_versions(keys, beside)
                    .await
                    .unwrap_or_default();
                let found = found
                    .into_iter()
                    .map(|bytes| Versioned { bytes, version: 0 })
                    .collect();
                (found, versions)
            }
            None => Default::default(),
        };
        let epoch_read = self.learn_beside(&versions) == TagsRead::Epoch;
        // Every entry's tag versions that must be read, in one MGET, not
        // one per entry (the backplane off, or a gap, or unknown tags);
        // not the epoch's again when it came with the entries.
        let names = found.iter().filter_map(|r| r.bytes.as_deref());
        self.read_tags_of(C::ID, names, epoch_read).await;
        let spent = started.elapsed();
        let now_ms = entry::now_ms();
        let mut out = Vec::with_capacity(keys.len());
        for (n, key) in keys.iter().enumerate() {
            let read = found.get(n);
            let claim = Claim {
                l1: tickets[n],
                l2: read.filter(|_| claims).map(|r| r.version),
                spent,
                lock: None,
            };
            let entry = match read.and_then(|r| r.bytes.as_deref()) {
                Some(bytes) => {
                    self.accept_l2::<V, C>(key, bytes, now_ms, tickets[n], TagsRead::All)
                        .await
                }
                None => None,
            };
            out.push((entry, claim));
        }
        out
    }

    /// Reads from Redis, in one MGET, the versions of the tags of these
    /// stored entries that this instance cannot vouch for (but the epoch's
    /// when `epoch_read`: it was just read).
    async fn read_tags_of<'a>(
        &self,
        codec: u8,
        entries: impl Iterator<Item = &'a [u8]>,
        epoch_read: bool,
    ) {
        let names = entries
            .flat_map(|bytes| entry::tag_names(bytes, codec))
            .filter(|&tag| !(epoch_read && tag == EPOCH_TAG));
        self.tags.read(names, self.l2.as_ref()).await;
    }

    /// The counters a read from Redis reads after its entries in the same
    /// round trip: the namespace epoch's, which every entry carries, when
    /// this instance cannot vouch for it (the backplane off or out of
    /// touch); none otherwise. So an entry without tags of its own costs
    /// one round trip, not two, with or without the backplane.
    fn versions_beside(&self) -> &'static [&'static str] {
        if self.tags.live() {
            &[]
        } else {
            &[EPOCH_KEY]
        }
    }

    /// Learns the versions read by [`Tiers::versions_beside`]'s counters,
    /// and says what was read.
    fn learn_beside(&self, versions: &[u64]) -> TagsRead {
        match versions.first() {
            Some(&epoch) => {
                self.tags.observe(EPOCH_TAG, epoch);
                TagsRead::Epoch
            }
            None => TagsRead::None,
        }
    }

    /// What a plain read (`get`, `get_many`) makes of `key` in L1: one
    /// judgement for both, counted. A fail-safe copy is a counted miss with
    /// nothing to look for in Redis (the failed refresh looked there).
    #[inline]
    pub(crate) async fn lookup_l1<V: Send + Sync + 'static>(&self, key: &str) -> L1Lookup<V> {
        // Only L1 proper: with L1 off, the fail-safe copies are for loads.
        let Some(l1) = &self.l1 else {
            return L1Lookup::Miss;
        };
        let Some(Looked { entry, now }) = l1.look(key.as_bytes()).await else {
            return L1Lookup::Miss;
        };
        if entry.failsafe {
            self.stats.record_at(Event::Miss, key);
            return L1Lookup::FailSafe;
        }
        if !entry.is_fresh(now) {
            return L1Lookup::Miss;
        }
        match self.typed_hit::<V>(key, &entry) {
            Some(hit) => L1Lookup::Hit(hit),
            None => L1Lookup::Miss,
        }
    }

    /// Notes L1's drops before a Redis read, so its promotion cannot undo one.
    #[inline]
    pub(crate) fn ticket(&self, key: &str) -> Ticket {
        self.local()
            .map_or_else(Ticket::default, |l1| l1.ticket(key))
    }

    #[inline]
    pub(crate) async fn l1_get(&self, key: &str) -> Option<Arc<L1Entry>> {
        self.l1_look(key.as_bytes())
            .await
            .map(|looked| looked.entry)
    }

    /// [`l1_get`](Self::l1_get) of a key's bytes, with the instant L1
    /// looked at the entry.
    #[inline]
    pub(crate) async fn l1_look(&self, key: &[u8]) -> Option<Looked> {
        match (&self.l1, &self.failsafe_only) {
            (Some(l1), _) => l1.look(key).await,
            (None, Some(copies)) => copies.look(key).await,
            (None, None) => None,
        }
    }

    #[inline]
    pub(crate) fn typed_hit<V: Send + Sync + 'static>(
        &self,
        key: &str,
        entry: &L1Entry,
    ) -> Option<Option<Arc<V>>> {
        let hit = typed::<V>(entry)?;
        if hit.is_some() {
            self.stats.record_at(Event::L1Hit, key);
        } else {
            self.stats.record_at(Event::NegativeHit, key);
        }
        Some(hit)
    }

    /// Reads an entry from Redis and promotes it to L1. Anything unusable
    /// (absent, undecodable, of another type, invalidated by a tag) is `None`.
    pub(crate) async fn read_l2<V, C>(&self, key: &str) -> Option<Arc<L1Entry>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let l2 = self.l2.as_ref()?;
        // A plain read promotes into L1 proper only.
        let ticket = self
            .l1
            .as_ref()
            .map_or_else(Ticket::default, |l1| l1.ticket(key));
        let read = match self.versions_beside() {
            // The hot path (the backplane on): the GET alone, kept small.
            [] => l2.get(key).await.map(|found| (found, Vec::new())),
            // Boxed: it would enlarge every read's future.
            beside => Box::pin(l2.get_then_versions(key, beside)).await,
        };
        match read {
            Ok((Some(bytes), versions)) => {
                let read = self.learn_beside(&versions);
                self.accept_l2::<V, C>(key, &bytes, entry::now_ms(), ticket, read)
                    .await
            }
            Ok((None, _)) => None,
            Err(L2Fault::WrongType) => {
                self.bad_entry(key, "holds another Redis type").await;
                None
            }
            Err(_) => None, // counted and logged by the L2 tier
        }
    }

    /// Turns bytes read from Redis into an L1 entry, or drops them as bad.
    /// `ticket` was taken before the bytes were read: a drop of the key
    /// since then keeps them out of L1 (they are still returned).
    pub(crate) async fn accept_l2<V, C>(
        &self,
        key: &str,
        bytes: &[u8],
        now_ms: u64,
        ticket: Ticket,
        tags_read: TagsRead,
    ) -> Option<Arc<L1Entry>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let envelope = match entry::decode(bytes, C::ID) {
            Ok(envelope) => envelope,
            Err(bad) => {
                self.bad_entry(key, bad.describe()).await;
                return None;
            }
        };
        let keep_for = envelope.meta.remaining(now_ms)?;
        // What the caller read beside the entry spares a round trip: all
        // the versions this instance cannot vouch for (a batch), or the
        // epoch's, which is all an entry without tags of its own needs.
        let stamps = &envelope.meta.tags;
        let current = match tags_read {
            TagsRead::All => self.tags.judge(stamps),
            TagsRead::Epoch if stamps.iter().all(|(tag, _)| &**tag == EPOCH_TAG) => {
                self.tags.judge(stamps)
            }
            _ => self.tags.is_current(stamps, self.l2.as_ref()).await,
        };
        if !current {
            self.stats.record(Event::TagStaleDrop);
            return None;
        }
        // Asked before decoding: a value L1 will not keep is not weighed.
        let l1 = self.l1.as_ref().filter(|l1| l1.admits(key));
        let mut size = 0;
        let value: Option<AnyValue> = match envelope.value {
            Some(raw) => match C::decode::<V>(raw) {
                Ok(v) => {
                    if l1.is_some() {
                        size = weigh::value_bytes(&v);
                    }
                    Some(Arc::new(v))
                }
                Err(_) => {
                    self.bad_entry(key, "does not decode as the key's type")
                        .await;
                    return None;
                }
            },
            None => None,
        };
        let fresh_for = Duration::from_millis(envelope.meta.expires_ms.saturating_sub(now_ms));
        if l1.is_none() && self.l1.is_some() {
            self.stats.record(Event::PromotionDeferred);
        }
        let entry = match l1 {
            Some(l1) => {
                let entry = l1.entry(key, value, envelope.meta, fresh_for, keep_for, size);
                l1.insert_since(key, Arc::clone(&entry), ticket).await;
                entry
            }
            None => L1::detached(value, envelope.meta, fresh_for, keep_for),
        };
        Some(entry)
    }

    /// A bad entry is a miss: deleted, counted, logged (rate-limited).
    pub(crate) async fn bad_entry(&self, key: &str, why: &str) {
        self.stats.record(Event::DecodeFailure);
        if self.bad_entry_log.allow() {
            // The counter has the totals.
            tracing::warn!(reason = why, "an entry in Redis was unusable; treated as a miss and deleted (see stats.decode_failures)");
        }
        if let Some(l2) = &self.l2 {
            // Boxed: rare, and inline it would enlarge every read's future.
            let _ = Box::pin(l2.del(&[key])).await;
        }
    }
}

/// What a read from Redis learned of tag versions beside its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagsRead {
    /// Nothing: the versions this instance cannot vouch for are read next.
    None,
    /// The namespace epoch's, in the same round trip as the entry.
    Epoch,
    /// Every version the entries need (a batch reads them in one MGET).
    All,
}

/// The entry's value as a `V`: `Some(None)` is a cached negative, `None`
/// means the entry holds another type (a key clash) and counts as a miss.
#[inline]
pub(crate) fn typed<V: Send + Sync + 'static>(entry: &L1Entry) -> Option<Option<Arc<V>>> {
    match &entry.value {
        None => Some(None),
        Some(any) => Arc::clone(any).downcast::<V>().ok().map(Some),
    }
}
