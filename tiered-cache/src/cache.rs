//! `TieredCache` and its read path: L1 -> L2 -> loader.
//!
//! Every other module is a step this one calls: `l1` and `l2` store bytes and
//! values, `flight` coalesces loads, `refresh` decides early refreshes, `tags`
//! judges whether an entry was invalidated. Nothing here knows Redis commands.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backplane::{Backplane, Event, Local};
use crate::codec::Codec;
use crate::entry::{self, Meta};
use crate::error::{Error, ErrorKind, LoadError};
use crate::flight::{Flights, Join, Leader, Waiter};
use crate::key::Key;
use crate::l1::{AnyValue, L1Entry, Ticket, L1};
use crate::l2::{L2Config, L2Fault, RedisUrl, L2};
use crate::loader::{Load, Owned, Scoped};
use crate::options::{EntryOptions, Resolved};
use crate::refresh::early_refresh_due;
use crate::stats::{Stats, StatsSnapshot};
use crate::tags::{TagVersions, EPOCH_TAG};

/// The result every caller of one flight shares.
type Outcome<V, E> = Result<Option<Arc<V>>, LoadError<E>>;

/// A two-tier cache: an in-process L1 in front of a shared Redis L2.
///
/// Cheap to clone (an `Arc` inside); clones share everything.
#[derive(Clone, Debug)]
pub struct TieredCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    l1: Option<L1>,
    l2: Option<L2>,
    defaults: EntryOptions,
    max_value_bytes: usize,
    flights: Arc<Flights>,
    stats: Arc<Stats>,
    tags: Arc<TagVersions>,
    /// Tells other instances about invalidations; `None` without Redis or
    /// when turned off.
    backplane: Option<Backplane>,
}

/// Builds a [`TieredCache`]; from [`TieredCache::builder`].
#[must_use]
#[derive(Debug, Clone)]
pub struct TieredCacheBuilder {
    namespace: String,
    l1_max_bytes: u64,
    l1_ttl_cap: Option<Duration>,
    /// Its `Debug` hides the password: the builder derives `Debug`.
    redis_url: Option<RedisUrl>,
    l2_timeout: Duration,
    backplane: bool,
    require_l2: bool,
    max_value_bytes: usize,
    defaults: EntryOptions,
}

impl Default for TieredCacheBuilder {
    fn default() -> Self {
        TieredCacheBuilder {
            namespace: "tc".to_owned(),
            l1_max_bytes: 64 << 20,
            l1_ttl_cap: None,
            redis_url: None,
            l2_timeout: Duration::from_millis(250),
            backplane: true,
            require_l2: false,
            max_value_bytes: 1 << 20,
            defaults: EntryOptions::default(),
        }
    }
}

impl TieredCacheBuilder {
    /// Prefix of every Redis key, so services sharing a Redis never collide.
    /// Default: `"tc"`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Bound of the in-process tier, in bytes (entries are weighed by their
    /// encoded size plus a fixed overhead). `0` turns L1 off. Default: 64 MiB.
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1_max_bytes = bytes;
        self
    }

    /// Longest time an entry stays in L1, whatever its TTL: bounds how long an
    /// instance can serve a value whose invalidation it missed. Default: none.
    pub fn l1_ttl_cap(mut self, cap: Duration) -> Self {
        self.l1_ttl_cap = Some(cap);
        self
    }

    /// Redis URL of the shared tier (`redis://[:password@]host:port[/db]`;
    /// `rediss://` with the `tls` feature). Default: none, the cache is L1-only.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(RedisUrl::new(url.into()));
        self
    }

    /// Longest wait for any Redis command; past it the cache serves from L1
    /// and the loader. Default: 250 ms.
    pub fn l2_timeout(mut self, timeout: Duration) -> Self {
        self.l2_timeout = timeout;
        self
    }

    /// Whether this instance tells the others about its invalidations and
    /// listens to theirs over Redis pub/sub, so that no instance keeps
    /// serving from L1 what another one invalidated. Only with a Redis tier.
    /// Turned off, L1 entries are dropped only by their TTL (set
    /// [`l1_ttl_cap`](Self::l1_ttl_cap)), and every L2 read of an entry also
    /// reads its tag versions from Redis. Default: true.
    pub fn backplane(mut self, enabled: bool) -> Self {
        self.backplane = enabled;
        self
    }

    /// Make [`build`](Self::build) fail when Redis is unreachable instead of
    /// starting L1-only and connecting later. Default: false.
    pub fn require_l2(mut self, require: bool) -> Self {
        self.require_l2 = require;
        self
    }

    /// Values whose encoding is larger are kept in L1 only (counted as
    /// `oversized_skips`), never written to Redis. Default: 1 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// TTL of entries written without one. Default: 5 minutes.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.defaults = self.defaults.ttl(ttl);
        self
    }

    /// Options that per-call [`EntryOptions`] fall back to.
    /// Default: `EntryOptions::default()`.
    pub fn default_options(mut self, options: EntryOptions) -> Self {
        self.defaults = options;
        self
    }

    /// Builds the cache. With a Redis URL, checks that Redis answers; when it
    /// does not, the cache starts L1-only and keeps reconnecting (unless
    /// [`require_l2`](Self::require_l2) is set).
    ///
    /// # Errors
    /// An invalid Redis URL or namespace; an unreachable Redis with `require_l2`.
    pub async fn build(self) -> Result<TieredCache, Error> {
        if self.namespace.is_empty() || self.namespace.contains(['{', '}']) {
            return Err(Error::new(
                ErrorKind::Config,
                "the namespace must be non-empty and contain no `{` or `}`",
            ));
        }
        let stats = Arc::new(Stats::default());
        let l2 = match &self.redis_url {
            Some(url) => {
                let config = L2Config {
                    url: url.clone(),
                    namespace: self.namespace.clone(),
                    timeout: self.l2_timeout,
                };
                let l2 = L2::connect(&config, Arc::clone(&stats))?;
                if let Err(fault) = l2.ping().await {
                    if self.require_l2 {
                        return Err(Error::new(
                            ErrorKind::L2,
                            "Redis is not reachable and `require_l2` is set; start Redis or check the URL",
                        )
                        .with_source(fault.into_error()));
                    }
                }
                Some(l2)
            }
            None => None,
        };
        let l1 = (self.l1_max_bytes > 0).then(|| L1::new(self.l1_max_bytes, self.l1_ttl_cap));
        // Without Redis there is no other instance: what this one knows of
        // tag versions is all there is. With Redis, the backplane vouches.
        let tags = Arc::new(TagVersions::new(l2.is_none()));
        let backplane = match &l2 {
            Some(l2) if self.backplane => {
                let local = Local {
                    l1: l1.clone(),
                    tags: Arc::clone(&tags),
                    stats: Arc::clone(&stats),
                };
                // Subscribed before first use, unless the ping above failed.
                let wait = if stats.l2_errors.get() == 0 {
                    self.l2_timeout.max(Duration::from_millis(500)) * 4
                } else {
                    Duration::ZERO
                };
                Some(Backplane::start(l2, local, wait).await)
            }
            _ => None,
        };
        Ok(TieredCache {
            inner: Arc::new(Inner {
                l1,
                l2,
                defaults: self.defaults,
                max_value_bytes: self.max_value_bytes,
                flights: Arc::default(),
                stats,
                tags,
                backplane,
            }),
        })
    }
}

impl TieredCache {
    /// A builder with every setting at its default (L1-only, 64 MiB).
    pub fn builder() -> TieredCacheBuilder {
        TieredCacheBuilder::default()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Total weight (approximate bytes) of the entries in L1, after moka's
    /// pending maintenance has run. 0 when L1 is off.
    pub async fn l1_weighted_size(&self) -> u64 {
        match &self.inner.l1 {
            Some(l1) => l1.weighted_size().await,
            None => 0,
        }
    }

    /// Whether this cache has a Redis tier configured.
    pub fn has_l2(&self) -> bool {
        self.inner.l2.is_some()
    }

    /// The value under `key`, if a fresh one is cached in either tier. A hit
    /// in Redis is promoted to L1 for its remaining TTL. An entry in Redis
    /// that cannot be decoded, or a Redis failure, reads as a miss.
    ///
    /// Concurrent calls on the same key each read the tiers; use
    /// [`get_or_load`](Self::get_or_load) to coalesce loads.
    pub async fn get<V, C>(&self, key: &Key<V, C>) -> Option<Arc<V>>
    where
        V: DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let now = Instant::now();
        if let Some(entry) = self.l1_get(key.as_str()).await {
            if entry.failsafe {
                // A stale value kept through a failing refresh: not fresh,
                // and Redis holds nothing fresher (or the refresh would
                // have found it).
                self.inner.stats.misses.incr();
                return None;
            }
            if entry.is_fresh(now) {
                if let Some(hit) = self.typed_hit::<V>(&entry) {
                    return hit;
                }
            }
        }
        match self.read_l2::<V, C>(key.as_str()).await {
            Some(entry) if entry.is_fresh(Instant::now()) => {
                self.inner.stats.l2_hits.incr();
                typed::<V>(&entry).flatten()
            }
            _ => {
                self.inner.stats.misses.incr();
                None
            }
        }
    }

    /// The values under `keys`, in order: L1 first, then one MGET for all L1
    /// misses. Missing and undecodable entries are `None`.
    pub async fn get_many<V, C>(&self, keys: &[Key<V, C>]) -> Vec<Option<Arc<V>>>
    where
        V: DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let now = Instant::now();
        let mut out = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.l1_get(key.as_str()).await {
                Some(entry) if entry.is_fresh(now) => {
                    self.inner.stats.l1_hits.incr();
                    out.push(typed::<V>(&entry).flatten());
                }
                _ => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if missing.is_empty() {
            return out;
        }
        let bodies: Vec<&str> = missing.iter().map(|&i| keys[i].as_str()).collect();
        let tickets: Vec<Ticket> = bodies.iter().map(|body| self.ticket(body)).collect();
        let replies = match &self.inner.l2 {
            Some(l2) => l2.mget(&bodies).await.unwrap_or_default(),
            None => Vec::new(),
        };
        let now_ms = entry::now_ms();
        for (n, &i) in missing.iter().enumerate() {
            let bytes = replies.get(n).and_then(Option::as_deref);
            let entry = match bytes {
                Some(bytes) => {
                    self.accept_l2::<V, C>(bodies[n], bytes, now_ms, tickets[n])
                        .await
                }
                None => None,
            };
            match entry.filter(|e| e.is_fresh(Instant::now())) {
                Some(e) => {
                    self.inner.stats.l2_hits.incr();
                    out[i] = typed::<V>(&e).flatten();
                }
                None => self.inner.stats.misses.incr(),
            }
        }
        out
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
        let opts = options.resolve(&self.inner.defaults);
        let stamps = self
            .inner
            .tags
            .stamps(&opts.tags, self.inner.l2.as_ref())
            .await;
        let value: AnyValue = Arc::new(value);
        let typed_value = value.downcast_ref::<V>();
        let stored = self
            .store::<V, C>(
                key.as_str(),
                typed_value,
                Some(&value),
                &opts,
                stamps,
                Duration::ZERO,
                opts.ttl,
            )
            .await;
        if stored.is_ok() {
            // After the Redis write: a peer that drops its copy reads the new one.
            self.announce(Event::Key(key.as_str().to_owned()));
        }
        stored
    }

    /// Removes `key` from both tiers and tells other instances.
    ///
    /// # Errors
    /// When Redis could not be told (the entry is gone from L1 regardless):
    /// other instances may still read the old value until its TTL.
    pub async fn invalidate<V, C>(&self, key: &Key<V, C>) -> Result<(), Error> {
        if let Some(l1) = &self.inner.l1 {
            l1.invalidate(key.as_str()).await;
        }
        let deleted = match &self.inner.l2 {
            Some(l2) => l2.del(&[key.as_str()]).await.map_err(L2Fault::into_error),
            None => Ok(()),
        };
        self.announce(Event::Key(key.as_str().to_owned()));
        deleted
    }

    /// Drops every entry tagged `tag`, in every tier, in O(1): the tag's
    /// version is bumped and older entries read as misses from then on.
    ///
    /// # Errors
    /// When Redis could not be told; entries then stay valid elsewhere.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<(), Error> {
        let bumped = self.inner.tags.bump(tag, self.inner.l2.as_ref()).await;
        if let Some(l1) = &self.inner.l1 {
            // Without an answer from Redis, drop every local entry of the tag.
            l1.invalidate_tag(tag, *bumped.as_ref().unwrap_or(&u64::MAX));
        }
        self.announce(Event::Tag(tag.to_owned(), bumped.as_ref().ok().copied()));
        bumped.map(drop)
    }

    /// [`invalidate_tag`](Self::invalidate_tag) for each of `tags`.
    ///
    /// # Errors
    /// The first failure to tell Redis; the other tags are still invalidated.
    pub async fn invalidate_tags<I, T>(&self, tags: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let tags: Vec<T> = tags.into_iter().collect();
        let mut outcome = Ok(());
        for tag in &tags {
            let done = self.invalidate_tag(tag.as_ref()).await;
            outcome = outcome.and(done);
        }
        outcome
    }

    /// Invalidates every entry of this cache's namespace, in both tiers and
    /// on every instance, in O(1) and without KEYS or SCAN: the namespace's
    /// epoch, an implicit tag that every entry carries, is bumped, so every
    /// entry written before reads as a miss (Redis drops them on their TTL).
    ///
    /// # Errors
    /// When Redis could not be told: L1 is cleared here (and on the other
    /// instances, if the message gets through), but the entries in Redis
    /// stay valid.
    pub async fn clear(&self) -> Result<(), Error> {
        let bumped = self
            .inner
            .tags
            .bump(EPOCH_TAG, self.inner.l2.as_ref())
            .await;
        if let Some(l1) = &self.inner.l1 {
            l1.clear();
        }
        self.announce(Event::Clear(bumped.as_ref().ok().copied()));
        bumped.map(drop)
    }

    /// Tells the other instances, after this one's Redis write.
    fn announce(&self, event: Event) {
        if let Some(backplane) = &self.inner.backplane {
            backplane.publish(event);
        }
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
    /// let opts = EntryOptions::secs(60);
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

    /// The values under `keys`, in order, loading what neither tier holds:
    /// L1 first, then one MGET for all the L1 misses, then `loader` for
    /// each key still missing, all those loads at once.
    ///
    /// Concurrent calls on the same key share one load, whether they come
    /// from this method or from [`get_or_load`](Self::get_or_load): a
    /// missing key is loaded once per process. Hits may start early
    /// refreshes and stale entries are served, as in `get_or_load`.
    ///
    /// # Errors
    /// Per key, as for [`get_or_load`](Self::get_or_load): one key's
    /// failure does not fail the others.
    pub async fn get_many_or_load<V, C, E, F, Fut>(
        &self,
        keys: &[Key<V, C>],
        options: &EntryOptions,
        loader: F,
    ) -> Vec<Result<Arc<V>, LoadError<E>>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        F: Fn(&Key<V, C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let loader = Arc::new(loader);
        // One key's load, shaped as the single-key read path takes it.
        let load_one = |key: &Key<V, C>| {
            let (loader, key) = (Arc::clone(&loader), key.clone());
            Owned(move || async move { loader(&key).await.map(|v| Some(Arc::new(v))) })
        };
        let mut found: Vec<Option<Outcome<V, E>>> = keys.iter().map(|_| None).collect();
        let mut fallbacks: Vec<Option<Arc<L1Entry>>> = vec![None; keys.len()];
        // 1. L1.
        let mut lookup = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if let Some(entry) = self.l1_get(key.as_str()).await {
                let mut loader = Some(load_one(key));
                match self.serve::<V, C, E, _>(key.as_str(), options, &entry, false, &mut loader) {
                    // Owned loaders refresh in the background: no `Refresh`.
                    Served::Hit(hit) | Served::Refresh(_, hit) => {
                        self.inner.stats.l1_hits.incr();
                        found[i] = Some(Ok(hit));
                        continue;
                    }
                    Served::Stale => fallbacks[i] = Some(entry),
                    Served::Miss => {}
                }
            }
            lookup.push(i);
        }
        // 2. One MGET for everything L1 could not answer.
        let bodies: Vec<&str> = lookup.iter().map(|&i| keys[i].as_str()).collect();
        let tickets: Vec<Ticket> = bodies.iter().map(|body| self.ticket(body)).collect();
        let replies = match &self.inner.l2 {
            Some(l2) if !bodies.is_empty() => l2.mget(&bodies).await.unwrap_or_default(),
            _ => Vec::new(),
        };
        let now_ms = entry::now_ms();
        let mut missing = Vec::new();
        for (n, &i) in lookup.iter().enumerate() {
            let bytes = replies.get(n).and_then(Option::as_deref);
            let entry = match bytes {
                Some(bytes) => {
                    self.accept_l2::<V, C>(bodies[n], bytes, now_ms, tickets[n])
                        .await
                }
                None => None,
            };
            if let Some(entry) = entry {
                let mut loader = Some(load_one(&keys[i]));
                match self.serve::<V, C, E, _>(bodies[n], options, &entry, false, &mut loader) {
                    Served::Hit(hit) | Served::Refresh(_, hit) => {
                        self.inner.stats.l2_hits.incr();
                        found[i] = Some(Ok(hit));
                        continue;
                    }
                    Served::Stale => fallbacks[i] = fallbacks[i].take().or(Some(entry)),
                    Served::Miss => {}
                }
            }
            missing.push(i);
        }
        // 3. The loader for what is still missing, all keys at once.
        let loads = missing.iter().map(|&i| {
            let (fallback, loader) = (fallbacks[i].take(), load_one(&keys[i]));
            async move {
                let outcome = self
                    .load_missing::<V, C, E, _>(keys[i].as_str(), options, loader, fallback)
                    .await;
                (i, outcome)
            }
        });
        for (i, outcome) in futures_util::future::join_all(loads).await {
            found[i] = Some(outcome);
        }
        found
            .into_iter()
            .map(|outcome| match outcome {
                Some(Ok(Some(value))) => Ok(value),
                Some(Err(e)) => Err(e),
                Some(Ok(None)) | None => unreachable_none(),
            })
            .collect()
    }

    /// The read path shared by the loading methods.
    async fn load_through<V, C, E, L>(
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
        let mut coalesced = false;
        loop {
            // 1. L1.
            let mut fallback = None;
            if let Some(entry) = self.l1_get(key).await {
                match self.serve::<V, C, E, L>(key, options, &entry, negatives, &mut loader) {
                    Served::Hit(hit) => {
                        if hit.is_some() {
                            self.inner.stats.l1_hits.incr();
                        }
                        return Ok(hit);
                    }
                    Served::Refresh(leader, hit) => {
                        return self
                            .refresh_in_place::<V, C, E, L>(
                                key,
                                options,
                                &mut loader,
                                leader,
                                entry,
                                hit,
                            )
                            .await;
                    }
                    Served::Stale => fallback = Some(entry),
                    Served::Miss => {}
                }
            }
            // 2. One caller per key goes on to Redis and the loader.
            let leader = match self.inner.flights.join::<Outcome<V, E>>(key) {
                Join::Leader(leader) => leader,
                Join::Waiter(waiter) => {
                    if !coalesced {
                        coalesced = true;
                        self.inner.stats.coalesced_waits.incr();
                    }
                    match self
                        .wait_for_load::<V, E>(key, waiter, fallback.as_ref(), options)
                        .await
                    {
                        Some(outcome) => return outcome,
                        None => continue, // the leader gave up: try again, maybe lead
                    }
                }
            };
            // Another instance may have refreshed what L1 holds stale.
            if let Some(entry) = self.read_l2::<V, C>(key).await {
                match self.serve::<V, C, E, L>(key, options, &entry, negatives, &mut loader) {
                    // This caller already leads the key, so no refresh starts here.
                    Served::Hit(hit) | Served::Refresh(_, hit) => {
                        if hit.is_some() {
                            self.inner.stats.l2_hits.incr();
                        }
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
            return self
                .lead_load::<V, C, E, L>(key, options, loader, leader, fallback)
                .await;
        }
    }

    /// Runs the loader as the flight's leader: in the caller's task, or,
    /// with a stale fallback, in the background while the caller takes the
    /// stale value at the soft timeout (stale-while-revalidate, fail-safe).
    async fn lead_load<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: L,
        leader: Leader,
        fallback: Option<Arc<L1Entry>>,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        self.inner.stats.misses.incr();
        let opts = options.resolve(&self.inner.defaults);
        let Some(stale) = fallback else {
            return self
                .run_load::<V, C, E, _>(key, opts, loader, leader, None)
                .await;
        };
        self.inner.stats.stale_refreshes.incr();
        let loader = match loader.detach() {
            Ok(detached) => detached,
            Err(scoped) => {
                // A borrowed loader refreshes in this caller's task; a
                // failure still serves the stale value (fail-safe).
                return match self
                    .run_load::<V, C, E, _>(key, opts, scoped, leader, Some(Arc::clone(&stale)))
                    .await
                {
                    Ok(value) => Ok(value),
                    Err(_) => self.stale_outcome::<V, E>(&stale),
                };
            }
        };
        let wait = leader.subscribe().wait::<Outcome<V, E>>();
        let this = self.clone();
        let (key, bg_stale) = (key.to_owned(), Arc::clone(&stale));
        tokio::spawn(async move {
            let _ = this
                .run_load::<V, C, E, _>(&key, opts, loader, leader, Some(bg_stale))
                .await;
        });
        match self
            .await_with_fallback(wait, Some(&stale), options, true)
            .await
        {
            Some(outcome) => outcome,
            None => self.stale_outcome::<V, E>(&stale),
        }
    }

    /// Loads one key that a batch lookup found in neither tier: joins the
    /// key's flight, or leads it without asking Redis again (the batch's
    /// MGET just did).
    async fn load_missing<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: L,
        fallback: Option<Arc<L1Entry>>,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        match self.inner.flights.join::<Outcome<V, E>>(key) {
            Join::Leader(leader) => {
                // A load of this key may have ended since the batch read L1.
                if let Some(entry) = self.l1_get(key).await {
                    if entry.is_fresh(Instant::now()) {
                        if let Some(hit @ Some(_)) = typed::<V>(&entry) {
                            self.inner.stats.l1_hits.incr();
                            leader.finish::<Outcome<V, E>>(Ok(hit.clone()));
                            return Ok(hit);
                        }
                    }
                }
                self.lead_load::<V, C, E, L>(key, options, loader, leader, fallback)
                    .await
            }
            Join::Waiter(waiter) => {
                self.inner.stats.coalesced_waits.incr();
                match self
                    .wait_for_load::<V, E>(key, waiter, fallback.as_ref(), options)
                    .await
                {
                    Some(outcome) => outcome,
                    // The leader gave up: start over on the single-key path.
                    None => {
                        self.load_through::<V, C, E, L>(key, options, loader, false)
                            .await
                    }
                }
            }
        }
    }

    /// Judges an entry found in a tier: a fresh hit (maybe starting an early
    /// refresh), a stale fallback, or nothing usable.
    fn serve<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        entry: &Arc<L1Entry>,
        negatives: bool,
        loader: &mut Option<L>,
    ) -> Served<V>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        let Some(value) = typed::<V>(entry) else {
            return Served::Miss;
        };
        if value.is_none() && !negatives {
            return Served::Miss;
        }
        let now = Instant::now();
        if !entry.is_fresh(now) {
            return if value.is_some() {
                Served::Stale
            } else {
                Served::Miss
            };
        }
        let beta = options.beta(&self.inner.defaults);
        let delta = Duration::from_micros(u64::from(entry.meta.load_micros));
        if early_refresh_due(now, entry.fresh_until, delta, beta) {
            if let Some(refresh) = self.early_refresh::<V, C, E, L>(key, options, entry, loader) {
                return refresh;
            }
        }
        if value.is_none() {
            self.inner.stats.negative_hits.incr();
        }
        if entry.failsafe {
            self.inner.stats.stale_served.incr();
        }
        Served::Hit(value)
    }

    /// Starts an XFetch refresh of a fresh entry. An owned loader runs in a
    /// background task and the caller keeps the cached value (`None`); a
    /// borrowed loader cannot, so the caller is told to refresh in its own
    /// task (`Some(Served::Refresh)`) while every other caller keeps hitting.
    fn early_refresh<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        entry: &Arc<L1Entry>,
        loader: &mut Option<L>,
    ) -> Option<Served<V>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        let leader = self.inner.flights.try_lead::<Outcome<V, E>>(key)?;
        match loader.take()?.detach() {
            Ok(detached) => {
                self.inner.stats.early_refreshes.incr();
                let this = self.clone();
                let (key, opts, stale) = (
                    key.to_owned(),
                    options.resolve(&self.inner.defaults),
                    Arc::clone(entry),
                );
                tokio::spawn(async move {
                    let _ = this
                        .run_load::<V, C, E, _>(&key, opts, detached, leader, Some(stale))
                        .await;
                });
                None
            }
            Err(scoped) => {
                *loader = Some(scoped);
                Some(Served::Refresh(leader, typed::<V>(entry).flatten()))
            }
        }
    }

    /// Runs an XFetch refresh in the caller's task (a borrowed loader). On
    /// failure the caller still gets the cached value, which is fresh.
    async fn refresh_in_place<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: &mut Option<L>,
        leader: Leader,
        entry: Arc<L1Entry>,
        hit: Option<Arc<V>>,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        let Some(loader) = loader.take() else {
            return Ok(hit);
        };
        self.inner.stats.early_refreshes.incr();
        let opts = options.resolve(&self.inner.defaults);
        match self
            .run_load::<V, C, E, L>(key, opts, loader, leader, Some(entry))
            .await
        {
            Ok(Some(value)) => Ok(Some(value)),
            _ => Ok(hit),
        }
    }

    /// Waits on another caller's load. A caller that joined with no stale
    /// value still gets one when the load fails and the leader had found
    /// one meanwhile (in Redis, after this caller looked in L1): fail-safe
    /// reaches every waiter, not only the callers that came later.
    async fn wait_for_load<V, E>(
        &self,
        key: &str,
        waiter: Waiter,
        fallback: Option<&Arc<L1Entry>>,
        options: &EntryOptions,
    ) -> Option<Outcome<V, E>>
    where
        V: Send + Sync + 'static,
        E: Send + Sync + 'static,
    {
        let wait = waiter.wait::<Outcome<V, E>>();
        match self
            .await_with_fallback(wait, fallback, options, false)
            .await
        {
            Some(Err(error)) if fallback.is_none() => match self.l1_get(key).await {
                Some(entry) if matches!(typed::<V>(&entry), Some(Some(_))) => {
                    Some(self.stale_outcome::<V, E>(&entry))
                }
                _ => Some(Err(error)),
            },
            outcome => outcome,
        }
    }

    /// Waits for a load; with a stale fallback, at most the soft timeout.
    /// `None` means the leader gave up and the caller should try again.
    /// Only the caller that `leads` the load counts a soft timeout, so
    /// `loader_timeouts` counts slow loads, not their waiting callers.
    async fn await_with_fallback<V, E>(
        &self,
        wait: impl Future<Output = Option<Outcome<V, E>>>,
        fallback: Option<&Arc<L1Entry>>,
        options: &EntryOptions,
        leads: bool,
    ) -> Option<Outcome<V, E>>
    where
        V: Send + Sync + 'static,
        E: Send + Sync + 'static,
    {
        let Some(stale) = fallback else {
            return wait.await;
        };
        let soft = options.soft_timeout_or_default(&self.inner.defaults);
        match tokio::time::timeout(soft, wait).await {
            Ok(Some(Ok(value))) => Some(Ok(value)),
            Ok(Some(Err(_)) | None) => Some(self.stale_outcome::<V, E>(stale)),
            Err(_) => {
                if leads && !soft.is_zero() {
                    self.inner.stats.loader_timeouts.incr();
                }
                Some(self.stale_outcome::<V, E>(stale))
            }
        }
    }

    fn stale_outcome<V: Send + Sync + 'static, E>(&self, stale: &Arc<L1Entry>) -> Outcome<V, E> {
        self.inner.stats.stale_served.incr();
        Ok(typed::<V>(stale).flatten())
    }

    /// Runs the loader as the flight's leader, stores the result, and
    /// publishes it to the waiters. With `stale`, a failure keeps serving the
    /// stale value (fail-safe) and delays the next attempt.
    async fn run_load<V, C, E, L>(
        &self,
        key: &str,
        opts: Resolved,
        loader: L,
        leader: Leader,
        stale: Option<Arc<L1Entry>>,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        // Stamp tags before loading: an invalidation racing the load then
        // makes the stored entry stale instead of being lost.
        let stamps = self
            .inner
            .tags
            .stamps(&opts.tags, self.inner.l2.as_ref())
            .await;
        self.inner.stats.loads.incr();
        let started = Instant::now();
        let loaded = match opts.hard_timeout {
            Some(limit) => tokio::time::timeout(limit, loader.load())
                .await
                .map_err(|_| limit),
            None => Ok(loader.load().await),
        };
        let took = started.elapsed();
        let outcome: Outcome<V, E> = match loaded {
            Ok(Ok(Some(value))) => {
                let typed_value = Some(&*value);
                let erased: AnyValue = value.clone();
                let ttl = opts.ttl;
                let _ = self
                    .store::<V, C>(key, typed_value, Some(&erased), &opts, stamps, took, ttl)
                    .await;
                Ok(Some(value))
            }
            Ok(Ok(None)) => {
                if let Some(ttl) = opts.negative_ttl {
                    let _ = self
                        .store::<V, C>(key, None, None, &opts, stamps, took, ttl)
                        .await;
                }
                Ok(None)
            }
            Ok(Err(e)) => {
                self.inner.stats.load_errors.incr();
                Err(LoadError::Loader(Arc::new(e)))
            }
            Err(limit) => {
                self.inner.stats.loader_timeouts.incr();
                Err(LoadError::Cache(Error::new(
                    ErrorKind::Timeout,
                    format!("the loader did not finish within its hard timeout of {limit:?}; it was abandoned"),
                )))
            }
        };
        if let (Err(_), Some(stale)) = (&outcome, &stale) {
            self.throttle_failsafe(key, stale, opts.failsafe_throttle)
                .await;
        }
        leader.finish::<Outcome<V, E>>(outcome.clone());
        outcome
    }

    /// After a failed refresh, serves the stale value as if fresh for a
    /// short while, never past its grace window, so the loader is not
    /// hammered while it fails.
    async fn throttle_failsafe(&self, key: &str, stale: &Arc<L1Entry>, delay: Duration) {
        let Some(l1) = &self.inner.l1 else { return };
        // Only stand in for the entry that failed to refresh: if the key was
        // invalidated or rewritten during the load, bringing the old value
        // back would undo that (the ticket covers a drop after this look).
        let ticket = l1.ticket(key);
        match l1.get(key).await {
            Some(current) if current.meta.version == stale.meta.version => {}
            _ => return,
        }
        let retry = l1.failsafe_copy(stale, Instant::now() + delay);
        l1.insert_since(key, retry, ticket).await;
    }

    /// Writes an entry to both tiers. `value` is `None` for a negative entry.
    #[allow(clippy::too_many_arguments)]
    async fn store<V, C>(
        &self,
        key: &str,
        value: Option<&V>,
        erased: Option<&AnyValue>,
        opts: &Resolved,
        tags: Arc<[entry::TagStamp]>,
        load_time: Duration,
        ttl: Duration,
    ) -> Result<(), Error>
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
        let now_ms = entry::now_ms();
        let meta = Meta {
            created_ms: now_ms,
            expires_ms: now_ms + ttl.as_millis() as u64,
            stale_until_ms: now_ms + (ttl + stale).as_millis() as u64,
            load_micros: load_time.as_micros().min(u128::from(u32::MAX)) as u32,
            version: now_ms,
            tags,
        };
        let mut bytes = entry::encode_header(&meta, C::ID, value.is_none(), 64);
        let header_len = bytes.len();
        if let Some(v) = value {
            C::encode(v, &mut bytes)?;
        }
        let size = bytes.len() - header_len;
        if let Some(l1) = &self.inner.l1 {
            // A tag bumped (or the namespace cleared) since the stamps were
            // taken, before the load, makes the entry stale already: L1 must
            // not serve it. The ticket covers a bump racing this check.
            let ticket = l1.ticket(key);
            let l2 = self.inner.l2.as_ref();
            if self.inner.tags.is_current(&meta.tags, l2).await {
                let entry = l1.entry(key, erased.cloned(), meta, ttl, ttl + stale, size);
                l1.insert_since(key, entry, ticket).await;
            }
        }
        if let Some(l2) = &self.inner.l2 {
            if bytes.len() > self.inner.max_value_bytes {
                self.inner.stats.oversized_skips.incr();
                // The older value in Redis must not outlive this newer one.
                let _ = l2.del(&[key]).await;
            } else {
                // Failures are counted and logged by the L2 tier.
                let _ = l2.set(key, &bytes, ttl + stale).await;
            }
        }
        Ok(())
    }

    /// Notes L1's drops before a Redis read, so its promotion cannot undo one.
    #[inline]
    fn ticket(&self, key: &str) -> Ticket {
        self.inner
            .l1
            .as_ref()
            .map_or_else(Ticket::default, |l1| l1.ticket(key))
    }

    #[inline]
    async fn l1_get(&self, key: &str) -> Option<Arc<L1Entry>> {
        match &self.inner.l1 {
            Some(l1) => l1.get(key).await,
            None => None,
        }
    }

    #[inline]
    fn typed_hit<V: Send + Sync + 'static>(&self, entry: &L1Entry) -> Option<Option<Arc<V>>> {
        let hit = typed::<V>(entry)?;
        if hit.is_some() {
            self.inner.stats.l1_hits.incr();
        } else {
            self.inner.stats.negative_hits.incr();
        }
        Some(hit)
    }

    /// Reads an entry from Redis and promotes it to L1. Anything unusable
    /// (absent, undecodable, of another type, invalidated by a tag) is `None`.
    async fn read_l2<V, C>(&self, key: &str) -> Option<Arc<L1Entry>>
    where
        V: DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let l2 = self.inner.l2.as_ref()?;
        let ticket = self.ticket(key);
        match l2.get(key).await {
            Ok(Some(bytes)) => {
                self.accept_l2::<V, C>(key, &bytes, entry::now_ms(), ticket)
                    .await
            }
            Ok(None) => None,
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
    async fn accept_l2<V, C>(
        &self,
        key: &str,
        bytes: &[u8],
        now_ms: u64,
        ticket: Ticket,
    ) -> Option<Arc<L1Entry>>
    where
        V: DeserializeOwned + Send + Sync + 'static,
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
        let l2 = self.inner.l2.as_ref();
        if !self.inner.tags.is_current(&envelope.meta.tags, l2).await {
            self.inner.stats.tag_stale_drops.incr();
            return None;
        }
        let value: Option<AnyValue> = match envelope.value {
            Some(raw) => match C::decode::<V>(raw) {
                Ok(v) => Some(Arc::new(v)),
                Err(_) => {
                    self.bad_entry(key, "does not decode as the key's type")
                        .await;
                    return None;
                }
            },
            None => None,
        };
        let fresh_for = Duration::from_millis(envelope.meta.expires_ms.saturating_sub(now_ms));
        let size = envelope.value.map_or(0, <[u8]>::len);
        let entry = match &self.inner.l1 {
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
    async fn bad_entry(&self, key: &str, why: &str) {
        self.inner.stats.decode_failures.incr();
        log_bad_entry(why);
        if let Some(l2) = &self.inner.l2 {
            let _ = l2.del(&[key]).await;
        }
    }
}

/// What a tier's entry means for a loading read.
enum Served<V> {
    Hit(Option<Arc<V>>),
    /// Fresh, but due for an XFetch refresh that the caller must run
    /// itself (its loader borrows): it leads this flight.
    Refresh(Leader, Option<Arc<V>>),
    Stale,
    Miss,
}

/// The entry's value as a `V`: `Some(None)` is a cached negative, `None`
/// means the entry holds another type (a key clash) and counts as a miss.
#[inline]
fn typed<V: Send + Sync + 'static>(entry: &L1Entry) -> Option<Option<Arc<V>>> {
    match &entry.value {
        None => Some(None),
        Some(any) => Arc::clone(any).downcast::<V>().ok().map(Some),
    }
}

fn log_bad_entry(why: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let now = entry::now_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    // At most one line every 10 s: the counter has the totals.
    if now.saturating_sub(last) >= 10_000
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(reason = why, "an entry in Redis was unusable; treated as a miss and deleted (see stats.decode_failures)");
    }
}

/// `get_or_load` wraps its loader to always return `Some`, and negative
/// results are only served when asked for.
fn unreachable_none<T, E>() -> Result<T, LoadError<E>> {
    Err(LoadError::Cache(Error::new(
        ErrorKind::Codec,
        "internal: a negative entry reached get_or_load",
    )))
}
