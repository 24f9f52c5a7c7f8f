//! Per-entry options: TTL, grace window, tags, timeouts, early refresh.

use std::time::Duration;

/// How one entry is cached and loaded. Unset fields inherit the cache's
/// defaults (see [`TieredCacheBuilder::default_options`](crate::TieredCacheBuilder::default_options)).
///
/// ```
/// use std::time::Duration;
/// use tiered_cache::EntryOptions;
/// let opts = EntryOptions::new(Duration::from_secs(30 * 60))
///     .tags(["products", "category:7"])
///     .stale(Duration::from_secs(600))          // serve stale for 10 min if the DB fails
///     .soft_timeout(Duration::from_millis(50))  // then answer stale, finish the load in the background
///     .jitter(Duration::from_secs(30));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntryOptions {
    ttl: Option<Duration>,
    stale: Option<Duration>,
    negative_ttl: Option<Duration>,
    tags: Vec<String>,
    soft_timeout: Option<Duration>,
    hard_timeout: Option<Duration>,
    early_refresh: Option<f64>,
    jitter: Option<Duration>,
    failsafe_throttle: Option<Duration>,
    fleet_lease: Option<Duration>,
}

impl EntryOptions {
    /// Options with this time to live (sub-second TTLs work in both tiers).
    pub fn new(ttl: Duration) -> Self {
        EntryOptions::default().ttl(ttl)
    }

    /// How long the value is fresh. Default: the cache's `default_ttl` (5 minutes).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// A grace window after expiry during which the old value may still be
    /// served: while one refresh runs (stale-while-revalidate), and when the
    /// loader fails or is slow (fail-safe). Default: none.
    #[must_use]
    pub fn stale(mut self, window: Duration) -> Self {
        self.stale = Some(window);
        self
    }

    /// Caches a loader's `None` for this long (only
    /// [`try_get_or_load`](crate::TieredCache::try_get_or_load)). Default: `None` is not cached.
    #[must_use]
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// Adds one tag; [`invalidate_tag`](crate::TieredCache::invalidate_tag)
    /// drops every entry that carries it. Default: no tags.
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds several tags.
    #[must_use]
    pub fn tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// How long a caller that holds a stale value waits for its refresh before
    /// taking the stale value; the load goes on in the background and its
    /// result is stored. `Duration::ZERO` is pure stale-while-revalidate.
    /// Default: zero.
    #[must_use]
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// The longest a load may run: after it the load is abandoned and the
    /// caller gets the stale value if there is one, else a timeout error.
    /// Default: none.
    #[must_use]
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = Some(timeout);
        self
    }

    /// XFetch's `beta`: how eagerly a hit refreshes the entry in the
    /// background before it expires (probability grows as expiry nears and
    /// with the last load's duration). `0.0` turns it off. Default: 1.0.
    #[must_use]
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.early_refresh = Some(beta);
        self
    }

    /// Adds a random extra of up to `max` to each TTL, so entries written
    /// together do not expire together. Default: none.
    #[must_use]
    pub fn jitter(mut self, max: Duration) -> Self {
        self.jitter = Some(max);
        self
    }

    /// After a failed refresh, how long the stale value is served before the
    /// loader is tried again (never past the grace window). Default: 1 second.
    #[must_use]
    pub fn failsafe_throttle(mut self, delay: Duration) -> Self {
        self.failsafe_throttle = Some(delay);
        self
    }

    /// Loads this entry once across the whole fleet, not once per instance:
    /// the instance that loads holds a lock in Redis (beside the entry,
    /// same Cluster slot) for `lease`, renewed every third of it while its
    /// loader runs, and released when the value is stored. Instances that
    /// find the lock taken wait for the value (woken by the backplane,
    /// checking Redis every third of the lease too) and serve it; they
    /// load themselves when the holder gave up or died (its lease ran
    /// out), when Redis fails or the breaker is open, and when their wait
    /// passes the entry's hard timeout (else the cache's background
    /// timeout). A caller holding a stale value is served it at once.
    /// The lease is how long a holder that died holds the others up:
    /// a little more than the loader's usual time, a few seconds typically
    /// (kept between 100 ms and a day). Default: off (one load per
    /// instance).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tiered_cache::EntryOptions;
    /// let opts = EntryOptions::new(Duration::from_secs(600)).fleet_lock(Duration::from_secs(5));
    /// # let _ = opts;
    /// ```
    #[must_use]
    pub fn fleet_lock(mut self, lease: Duration) -> Self {
        self.fleet_lease = Some(lease);
        self
    }

    /// These options with every unset field taken from `defaults`, and the
    /// library's defaults for what neither sets.
    pub(crate) fn resolve(&self, defaults: &EntryOptions) -> Resolved {
        let pick = |a: Option<Duration>, b: Option<Duration>| a.or(b);
        let mut tags = defaults.tags.clone();
        tags.extend(self.tags.iter().cloned());
        tags.sort();
        tags.dedup();
        Resolved {
            ttl: pick(self.ttl, defaults.ttl).unwrap_or(DEFAULT_TTL),
            stale: pick(self.stale, defaults.stale).unwrap_or(Duration::ZERO),
            negative_ttl: pick(self.negative_ttl, defaults.negative_ttl),
            tags,
            hard_timeout: pick(self.hard_timeout, defaults.hard_timeout),
            jitter: pick(self.jitter, defaults.jitter).unwrap_or(Duration::ZERO),
            failsafe_throttle: pick(self.failsafe_throttle, defaults.failsafe_throttle)
                .unwrap_or(Duration::from_secs(1)),
        }
    }
}

impl EntryOptions {
    /// XFetch beta without resolving the rest (the hit path needs only this).
    #[inline]
    pub(crate) fn beta(&self, defaults: &EntryOptions) -> f64 {
        self.early_refresh
            .or(defaults.early_refresh)
            .unwrap_or(1.0)
            .max(0.0)
    }

    /// The fleet lock's lease, if the entry uses one, within its bounds.
    pub(crate) fn fleet_lease(&self, defaults: &EntryOptions) -> Option<Duration> {
        self.fleet_lease
            .or(defaults.fleet_lease)
            .map(|lease| lease.clamp(MIN_LEASE, MAX_LEASE))
    }

    /// The soft timeout without resolving the rest.
    pub(crate) fn soft_timeout_or_default(&self, defaults: &EntryOptions) -> Duration {
        self.soft_timeout
            .or(defaults.soft_timeout)
            .unwrap_or(Duration::ZERO)
    }
}

const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// Bounds of a fleet lock's lease: renewals every third of it stay sane.
const MIN_LEASE: Duration = Duration::from_millis(100);
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// Options with every field decided.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) ttl: Duration,
    pub(crate) stale: Duration,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) tags: Vec<String>,
    pub(crate) hard_timeout: Option<Duration>,
    pub(crate) jitter: Duration,
    pub(crate) failsafe_throttle: Duration,
}

impl Resolved {
    /// The TTL of one write, with jitter applied.
    pub(crate) fn ttl_with_jitter(&self, base: Duration) -> Duration {
        if self.jitter.is_zero() {
            return base;
        }
        let extra = Duration::try_from_secs_f64(self.jitter.as_secs_f64() * rand::random::<f64>())
            .unwrap_or(self.jitter);
        base.saturating_add(extra)
    }
}
