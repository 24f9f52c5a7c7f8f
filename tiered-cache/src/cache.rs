//! `TieredCache` and the spine of its read path: L1 -> L2 -> loader.
//!
//! Every other module is a step this one calls: `tiers` promotes and stores
//! entries in both tiers, `serve` judges the entry a tier found, `flight`
//! coalesces loads, `refresh` runs them (XFetch, stale-while-revalidate,
//! fail-safe), `batch` reads many keys, `tags` judges whether an entry was
//! invalidated. The calls that drop keys, tags and the namespace are in
//! `invalidation`. Nothing here knows Redis.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backplane::Backplane;
use crate::builder::TieredCacheBuilder;
use crate::codec::Codec;
use crate::error::{Error, ErrorKind, LoadError};
use crate::events;
use crate::fleet::{FleetWaits, Turn};
use crate::flight::{Flights, Join};
use crate::key::Key;
use crate::l1::{AnyValue, L1Entry, Looked};
use crate::limit::LoadLimit;
use crate::loader::{Load, Owned, Scoped};
use crate::options::EntryOptions;
use crate::serve::Served;
use crate::stats::StatsSnapshot;
use crate::tiers::{prepare, typed, Committed, L1Lookup, Origin, Tiers};
use tracing::Instrument;

/// The result every caller of one flight shares.
pub(crate) type Outcome<V, E> = Result<Option<Arc<V>>, LoadError<E>>;

/// A two-tier cache: an in-process L1 in front of a shared Redis L2.
///
/// Cheap to clone (an `Arc` inside); clones share everything.
#[derive(Clone, Debug)]
pub struct TieredCache {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) tiers: Tiers,
    pub(crate) defaults: EntryOptions,
    pub(crate) flights: Arc<Flights>,
    /// The hard timeout of background loads that set none; also how long a
    /// waiter waits for another caller's load.
    pub(crate) background_timeout: Duration,
    /// Tells other instances about invalidations; `None` without Redis or
    /// when turned off.
    pub(crate) backplane: Option<Backplane>,
    /// The cap on concurrent loader calls, if one is set.
    pub(crate) load_limit: Option<LoadLimit>,
    /// Loads of other instances this one waits on (fleet lock).
    pub(crate) fleet_waits: Arc<FleetWaits>,
}

impl TieredCache {
    pub(crate) fn from_parts(
        tiers: Tiers,
        defaults: EntryOptions,
        background_timeout: Duration,
        backplane: Option<Backplane>,
        load_limit: Option<LoadLimit>,
        fleet_waits: Arc<FleetWaits>,
    ) -> Self {
        TieredCache {
            inner: Arc::new(Inner {
                tiers,
                defaults,
                flights: Arc::default(),
                background_timeout,
                backplane,
                load_limit,
                fleet_waits,
            }),
        }
    }

    /// A builder with every setting at its default (L1-only, 64 MiB).
    pub fn builder() -> TieredCacheBuilder {
        TieredCacheBuilder::default()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.tiers.stats.snapshot()
    }

    /// Read counters per entity, sorted by entity name, when the cache was
    /// built with [`stats_per_entity`](TieredCacheBuilder::stats_per_entity)
    /// (else empty).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tiered_cache::{Key, TieredCache};
    /// let cache = TieredCache::builder().stats_per_entity(true).build().await.unwrap();
    /// let _ = cache.get(&Key::<u64>::new("product", 1).arg(7)).await;
    /// let stats = cache.entity_stats();
    /// assert_eq!((stats[0].entity.as_str(), stats[0].misses), ("product", 1));
    /// # }
    /// ```
    pub fn entity_stats(&self) -> Vec<crate::EntityStats> {
        self.inner.tiers.stats.by_entity.snapshot()
    }

    /// Total weight (approximate bytes) of the entries in L1, after moka's
    /// pending maintenance has run. 0 when L1 is off.
    pub async fn l1_weighted_size(&self) -> u64 {
        match &self.inner.tiers.l1 {
            Some(l1) => l1.weighted_size().await,
            None => 0,
        }
    }

    /// Whether this cache has a Redis tier configured.
    pub fn has_l2(&self) -> bool {
        self.inner.tiers.l2.is_some()
    }

    /// The value under `key`, if a fresh one is cached in either tier. A hit
    /// in Redis is promoted to L1 for its remaining TTL. An entry in Redis
    /// that cannot be decoded, or a Redis failure, reads as a miss.
    ///
    /// Concurrent calls on the same key each read the tiers; use
    /// [`get_or_load`](Self::get_or_load) to coalesce loads.
    pub async fn get<V, C>(&self, key: &Key<V, C>) -> Option<Arc<V>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let span = events::op_span("get", key.as_str());
        match self.inner.tiers.lookup_l1::<V>(key.as_str()).await {
            L1Lookup::Hit(hit) => {
                events::record_tier(&span, "l1");
                return hit;
            }
            L1Lookup::FailSafe => {
                events::record_tier(&span, "none");
                return None;
            }
            L1Lookup::Miss => {}
        }
        if self.inner.tiers.l2.is_none() {
            events::record_tier(&span, "none");
            self.inner
                .tiers
                .stats
                .record_at(events::Event::Miss, key.as_str());
            return None;
        }
        // Boxed, so that a hit does not carry (and move) the Redis read's
        // large future.
        Box::pin(self.get_from_l2::<V, C>(key.as_str(), span)).await
    }

    /// `get` past an L1 miss.
    async fn get_from_l2<V, C>(&self, key: &str, span: tracing::Span) -> Option<Arc<V>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let tiers = &self.inner.tiers;
        let found = tiers
            .within_budget(tiers.read_l2::<V, C>(key))
            .instrument(span.clone())
            .await;
        match found {
            Some(entry) if entry.is_fresh(Instant::now()) => {
                events::record_tier(&span, "l2");
                self.inner.tiers.stats.record_at(events::Event::L2Hit, key);
                typed::<V>(&entry).flatten()
            }
            _ => {
                events::record_tier(&span, "none");
                self.inner.tiers.stats.record_at(events::Event::Miss, key);
                None
            }
        }
    }

    /// Stores `value` under `key` in both tiers and tells other instances.
    ///
    /// A Redis failure is counted and logged, not returned: the value is then
    /// in L1 only. A value larger than `max_value_bytes` stays in L1 only.
    ///
    /// # Errors
    /// When the value cannot be encoded by the key's codec.
    pub async fn set<V, C>(
        &self,
        key: &Key<V, C>,
        value: V,
        options: &EntryOptions,
    ) -> Result<(), Error>
    where
        V: Serialize + Send + Sync + 'static,
        C: Codec,
    {
        let committed = self
            .store_entry::<V, C>(
                key.as_str(),
                Some(Arc::new(value)),
                options,
                Duration::ZERO,
                Origin::Write,
            )
            .instrument(events::op_span("set", key.as_str()))
            .await?;
        // After the Redis write: a peer that drops its copy reads the new
        // one. Usually the store script announced it already, before the
        // write was acknowledged.
        if !committed.announced() {
            self.announce_key(key.as_str());
        }
        Ok(())
    }

    /// Encodes and stores an entry in both tiers, within one L2 budget:
    /// `value` (`None`: a cached negative) under `key`, fresh for the
    /// options' TTL plus `extra_ttl`. The Redis write announces the key on
    /// the backplane in the same step where it can; where the result says
    /// it did not ([`Committed::announced`]), the caller announces it.
    pub(crate) async fn store_entry<V, C>(
        &self,
        key: &str,
        value: Option<Arc<V>>,
        options: &EntryOptions,
        extra_ttl: Duration,
        origin: Origin,
    ) -> Result<Committed, Error>
    where
        V: Serialize + Send + Sync + 'static,
        C: Codec,
    {
        let opts = options.resolve(&self.inner.defaults);
        let tiers = &self.inner.tiers;
        let erased: Option<AnyValue> = value.clone().map(|v| v as AnyValue);
        tiers
            .within_budget(async {
                let stamps = tiers.tags.stamps(&opts.tags, tiers.l2.as_ref()).await;
                let prepared = prepare::<V, C>(
                    value.as_deref(),
                    erased.as_ref(),
                    &opts,
                    stamps,
                    Duration::ZERO,
                    opts.ttl.saturating_add(extra_ttl),
                    origin,
                )?;
                let announcement = self.announcement(key);
                Ok(tiers.commit(key, prepared, announcement.as_ref()).await)
            })
            .await
    }

    /// The value under `key`, or the loader's, cached in both tiers.
    ///
    /// Concurrent calls on the same key share one load (single-flight): the
    /// loader runs once per key in this process, and its value or error
    /// reaches every caller. Errors are never cached. A hit may start an
    /// early background refresh (XFetch); an expired entry inside its
    /// `stale` window is served while one refresh runs, and again if the
    /// loader fails or exceeds the soft timeout (fail-safe).
    ///
    /// The loader is `'static` because a load may finish in the background
    /// after the caller has its answer; clone what it needs into it.
    ///
    /// # Errors
    /// [`LoadError::Loader`] with the loader's error (shared by coalesced
    /// callers) when no stale value can stand in; [`LoadError::Cache`] when
    /// the load passed its hard timeout.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tiered_cache::{EntryOptions, Key, TieredCache};
    /// let cache = TieredCache::builder().build().await.unwrap();
    /// let key = Key::<String>::new("greeting", 1).arg("en");
    /// let opts = EntryOptions::new(std::time::Duration::from_secs(60));
    /// let v = cache
    ///     .get_or_load(&key, &opts, || async { Ok::<_, std::io::Error>("hello".to_owned()) })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(*v, "hello");
    /// # }
    /// ```
    pub async fn get_or_load<V, C, E, F, Fut>(
        &self,
        key: &Key<V, C>,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Arc<V>, LoadError<E>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let loader = Owned(move || async move { loader().await.map(|v| Some(Arc::new(v))) });
        match self
            .load_through::<V, C, E, _>(key.as_str(), options, loader, false)
            .instrument(events::op_span("get_or_load", key.as_str()))
            .await
        {
            Ok(Some(v)) => Ok(v),
            Ok(None) => unreachable_none(),
            Err(e) => Err(e),
        }
    }

    /// Like [`get_or_load`](Self::get_or_load) for loaders that may find
    /// nothing: `None` is cached only when the options set a `negative_ttl`,
    /// for that long.
    ///
    /// # Errors
    /// As for [`get_or_load`](Self::get_or_load).
    pub async fn try_get_or_load<V, C, E, F, Fut>(
        &self,
        key: &Key<V, C>,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Option<Arc<V>>, LoadError<E>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
    {
        let loader = Owned(move || async move { loader().await.map(|v| v.map(Arc::new)) });
        self.load_through::<V, C, E, _>(key.as_str(), options, loader, true)
            .instrument(events::op_span("try_get_or_load", key.as_str()))
            .await
    }

    /// The read path for a loader that borrows from its caller, as
    /// `#[cached]` functions do (`&self`, `&str` arguments): like
    /// [`try_get_or_load`](Self::try_get_or_load), with `None` accepted only
    /// when `negatives` is set, but the loader runs in the caller's task. So
    /// the caller that refreshes an entry (XFetch, or a stale entry) waits
    /// for its loader, while every other caller is served the cached or
    /// stale value; a failure still serves the stale value (fail-safe).
    ///
    /// # Errors
    /// As for [`get_or_load`](Self::get_or_load).
    #[doc(hidden)]
    pub async fn load_inline<V, C, E, F, Fut>(
        &self,
        key: &Key<V, C>,
        options: &EntryOptions,
        negatives: bool,
        loader: F,
    ) -> Result<Option<Arc<V>>, LoadError<E>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Arc<V>>, E>>,
    {
        self.load_through::<V, C, E, _>(key.as_str(), options, Scoped(loader), negatives)
            .await
    }

    /// The read path shared by the loading methods.
    pub(crate) async fn load_through<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: L,
        negatives: bool,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        let mut loader = Some(loader);
        match self
            .answer_from_l1::<V, C, E, L>(key, options, negatives, &mut loader)
            .await
        {
            FromL1::Done(outcome) => outcome,
            // Boxed: the rest of the read path is a large future, and a hit
            // should not carry (and move) it.
            FromL1::Go(fallback) => {
                Box::pin(self.load_past_l1::<V, C, E, L>(key, options, loader, negatives, fallback))
                    .await
            }
        }
    }

    /// Step 1 of the read path: an answer from L1, or what L1 had to fall
    /// back on while the rest of the path runs.
    async fn answer_from_l1<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        negatives: bool,
        loader: &mut Option<L>,
    ) -> FromL1<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        let Some(Looked { entry, now }) = self.inner.tiers.l1_look(key.as_bytes()).await else {
            return FromL1::Go(None);
        };
        match self.serve::<V, C, E, L>(key, options, &entry, now, negatives, loader) {
            Served::Hit(hit) => {
                self.l1_answered(key.as_bytes(), &hit);
                FromL1::Done(Ok(hit))
            }
            Served::Refresh(leader, hit) => FromL1::Done(
                Box::pin(
                    self.refresh_in_place::<V, C, E, L>(key, options, loader, leader, entry, hit),
                )
                .await,
            ),
            Served::Stale => FromL1::Go(Some(entry)),
            Served::Miss => FromL1::Go(None),
        }
    }

    /// Steps 2 and 3 of the read path, after L1 had no fresh answer: one
    /// caller per key goes on to Redis and the loader.
    async fn load_past_l1<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        mut loader: Option<L>,
        negatives: bool,
        first_fallback: Option<Arc<L1Entry>>,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        let mut coalesced = false;
        let mut first_fallback = Some(first_fallback);
        loop {
            // 1. L1 (the caller looked already on the first round).
            let mut fallback = match first_fallback.take() {
                Some(fallback) => fallback,
                None => match self
                    .answer_from_l1::<V, C, E, L>(key, options, negatives, &mut loader)
                    .await
                {
                    FromL1::Done(outcome) => return outcome,
                    FromL1::Go(fallback) => fallback,
                },
            };
            // 2. One caller per key goes on to Redis and the loader.
            let mut leader = match self.inner.flights.join::<Outcome<V, E>>(key) {
                Join::Leader(leader) => leader,
                Join::Waiter(waiter) => {
                    if !coalesced {
                        coalesced = true;
                        self.inner.tiers.stats.record(events::Event::CoalescedWait);
                    }
                    match self
                        .wait_for_load::<V, E>(key, waiter, fallback.as_ref(), options)
                        .await
                    {
                        // A loader that may find nothing led (`try_get_or_load`)
                        // and found nothing: this caller wants a value, so it
                        // runs its own loader.
                        Some(Ok(None)) if !negatives => continue,
                        Some(outcome) => {
                            events::answered("coalesced");
                            return outcome;
                        }
                        None => continue, // the leader gave up: try again, maybe lead
                    }
                }
            };
            // Another instance may have refreshed what L1 holds stale. The
            // claim, taken before, lets the load store only if nobody wrote
            // or dropped the key in the meantime.
            let tiers = &self.inner.tiers;
            let (mut found, mut claim) = tiers.within_budget(tiers.read_claimed::<V, C>(key)).await;
            // With a fleet lock: one instance loads, the others wait for its value.
            if let Some(lease) = options.fleet_lease(&self.inner.defaults) {
                if loader.is_some() && found.as_ref().is_none_or(|e| !e.is_fresh(Instant::now())) {
                    // A value to serve while another instance loads.
                    let stale = fallback.clone().or_else(|| {
                        found.clone().filter(|e| {
                            e.in_grace(Instant::now()) && matches!(typed::<V>(e), Some(Some(_)))
                        })
                    });
                    match self
                        .fleet_turn::<V, C>(key, lease, claim, stale.is_some(), options)
                        .await
                    {
                        Turn::Load(lock, fleet_claim) => {
                            claim = fleet_claim;
                            if let Some(lock) = lock {
                                leader.hold(lock);
                            }
                        }
                        Turn::Found(entry) => found = Some(entry),
                        Turn::Stale => {
                            if let Some(stale) = stale {
                                let outcome = self.stale_outcome::<V, E>(&stale);
                                leader.finish::<Outcome<V, E>>(outcome.clone());
                                return outcome;
                            }
                        }
                    }
                }
            }
            if let Some(entry) = found {
                match self.serve::<V, C, E, L>(
                    key,
                    options,
                    &entry,
                    Instant::now(),
                    negatives,
                    &mut loader,
                ) {
                    // This caller already leads the key, so no refresh starts here.
                    Served::Hit(hit) | Served::Refresh(_, hit) => {
                        if hit.is_some() {
                            self.inner.tiers.stats.record_at(events::Event::L2Hit, key);
                        }
                        events::answered("l2");
                        leader.finish::<Outcome<V, E>>(Ok(hit.clone()));
                        return Ok(hit);
                    }
                    Served::Stale => fallback = fallback.or(Some(entry)),
                    Served::Miss => {}
                }
            }
            // 3. The loader.
            let Some(loader) = loader.take() else {
                // `serve` spent the loader on an early refresh that is now
                // running under another flight; wait for it.
                drop(leader);
                continue;
            };
            // The load may run in a task of its own: the answer is said here.
            events::answered("loader");
            return self
                .lead_load::<V, C, E, L>(key, options, loader, leader, fallback, claim)
                .await;
        }
    }
}

/// What L1 gave the read path: its answer, or a stale entry (or nothing)
/// to fall back on while the path goes on.
enum FromL1<V, E> {
    Done(Outcome<V, E>),
    Go(Option<Arc<L1Entry>>),
}

/// `get_or_load` wraps its loader to always return `Some`, and negative
/// results are only served when asked for.
pub(crate) fn unreachable_none<T, E>() -> Result<T, LoadError<E>> {
    Err(LoadError::Cache(Error::new(
        ErrorKind::Codec,
        "internal: a negative entry reached get_or_load",
    )))
}

// The spine's unit tests need a `TieredCache` and its private steps.
#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
