//! [`TieredCacheBuilder`]: settings, their validation, and the wiring of a
//! cache's parts in `build()`.

use std::sync::Arc;
use std::time::Duration;

use crate::admission::L1Admission;
use crate::backplane::{Backplane, Local};
use crate::breaker::BreakerSettings;
use crate::cache::TieredCache;
use crate::error::{Error, ErrorKind};
use crate::events::LogLimit;
use crate::fleet::FleetWaits;
use crate::l1::L1;
use crate::l2::{L2Config, RedisUrl, Target, L2};
use crate::limit::{LoadLimit, MAX_LOADS};
use crate::options::EntryOptions;
use crate::stats::Stats;
use crate::tags::TagVersions;
use crate::tiers::Tiers;

/// The longest `l2_timeout` accepted: it bounds every Redis command, so
/// more than this is a mistake (and timers past it overflow).
const MAX_L2_TIMEOUT: Duration = Duration::from_secs(3600);

/// The bound of the fail-safe copies kept when L1 is off.
const FAILSAFE_ONLY_BYTES: u64 = 4 << 20;

/// Builds a [`TieredCache`]; from [`TieredCache::builder`].
#[must_use]
#[derive(Debug, Clone)]
pub struct TieredCacheBuilder {
    namespace: String,
    l1_max_bytes: u64,
    l1_ttl_cap: Option<Duration>,
    l1_admission: L1Admission,
    /// Its `Debug` hides passwords: the builder derives `Debug`.
    redis: Option<Target>,
    l2_timeout: Duration,
    background_timeout: Duration,
    backplane: bool,
    /// Sharded pub/sub for the backplane on a cluster.
    sharded_pubsub: bool,
    batch_reads: bool,
    require_l2: bool,
    max_value_bytes: usize,
    breaker: BreakerSettings,
    max_concurrent_loads: Option<usize>,
    stats_per_entity: bool,
    defaults: EntryOptions,
}

impl Default for TieredCacheBuilder {
    fn default() -> Self {
        TieredCacheBuilder {
            namespace: "tc".to_owned(),
            l1_max_bytes: 64 << 20,
            l1_ttl_cap: None,
            l1_admission: L1Admission::EveryRead,
            redis: None,
            l2_timeout: Duration::from_millis(250),
            background_timeout: Duration::from_secs(30),
            backplane: true,
            sharded_pubsub: false,
            batch_reads: true,
            require_l2: false,
            max_value_bytes: 1 << 20,
            breaker: BreakerSettings::default(),
            max_concurrent_loads: None,
            stats_per_entity: false,
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

    /// Bound of the in-process tier, in bytes (entries are weighed by what
    /// they hold in memory plus a fixed overhead). `0` turns L1 off.
    /// Default: 64 MiB.
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1_max_bytes = bytes;
        self
    }

    /// Counts reads per entity (the entity name of each key), for
    /// [`TieredCache::entity_stats`] and, with the `metrics` feature,
    /// `tiered_cache_entity_<counter>_total{namespace, entity}`. Each read
    /// then also looks its entity up in a small map. Default: off.
    pub fn stats_per_entity(mut self, on: bool) -> Self {
        self.stats_per_entity = on;
        self
    }

    /// Which values read from Redis L1 keeps: every one (the default), or,
    /// with [`L1Admission::SecondRead`], those read a second time while L1
    /// would still have held them. Values this instance loads or writes
    /// always go into L1.
    ///
    /// ```
    /// use tiered_cache::{L1Admission, TieredCache};
    /// // A catalogue scanned in batches: keep only what is read again.
    /// let builder = TieredCache::builder().l1_admission(L1Admission::SecondRead);
    /// # drop(builder);
    /// ```
    pub fn l1_admission(mut self, admission: L1Admission) -> Self {
        self.l1_admission = admission;
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
        self.redis = Some(Target::Single(RedisUrl::new(url.into())));
        self
    }

    /// A Redis Cluster as the shared tier, from the URLs of some of its
    /// nodes (`redis://[:password@]host:port`; the client learns the rest,
    /// and follows resharding and failovers). Every node needs the same
    /// user, password and TLS mode. The backplane (in classic mode)
    /// subscribes on one of these nodes at a time, first a random one, and
    /// moves to the next when it loses it, so give more than one (all the
    /// masters and replicas spread a fleet's subscribers best). Replaces [`redis`](Self::redis).
    /// Default: none, the cache is L1-only.
    #[cfg(feature = "cluster")]
    pub fn redis_cluster<I>(mut self, urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let urls = urls.into_iter().map(|url| RedisUrl::new(url.into()));
        self.redis = Some(Target::Cluster(urls.collect()));
        self
    }

    /// Longest wait for any Redis command; past it the cache serves from L1
    /// and the loader. More than zero and at most an hour, or `build`
    /// fails. Default: 250 ms.
    pub fn l2_timeout(mut self, timeout: Duration) -> Self {
        self.l2_timeout = timeout;
        self
    }

    /// The longest a load may run in the background (an early refresh, a
    /// stale-while-revalidate refresh) when its entry sets no
    /// [`hard_timeout`](EntryOptions::hard_timeout): past it the load is
    /// abandoned and its key free again, so a loader that never returns (a
    /// half-open database socket) cannot hold a key for the life of the
    /// process. Also the longest a caller waits on another caller's load
    /// without a stale value (it then gets a timeout error).
    /// Default: 30 seconds.
    pub fn background_timeout(mut self, timeout: Duration) -> Self {
        self.background_timeout = timeout;
        self
    }

    /// Whether this instance tells the others about its invalidations and
    /// listens to theirs over Redis pub/sub, so that no instance keeps
    /// serving from L1 what another one invalidated. Only with a Redis tier.
    /// Turned off, L1 entries are dropped only by their TTL (set
    /// [`l1_ttl_cap`](Self::l1_ttl_cap)), and every L2 read of an entry also
    /// reads its tag versions from Redis: on one Redis the namespace's
    /// version goes in the same round trip as the entry, and an entry's
    /// own tags cost a second (on a Cluster, where the versions live in
    /// other slots, they are read once the entry is in). Default: true.
    pub fn backplane(mut self, enabled: bool) -> Self {
        self.backplane = enabled;
        self
    }

    /// Which pub/sub the backplane uses on a Redis Cluster: classic
    /// `PUBLISH` (broadcast over the cluster bus to every node) or sharded
    /// `SPUBLISH` (kept within the shard that owns the channel's slot;
    /// Redis 7). No effect on one Redis. `benches/README.md` ("The
    /// backplane's knee") has the figures behind the default.
    /// Default: [`BackplaneMode::Classic`](crate::BackplaneMode::Classic).
    #[cfg(feature = "cluster")]
    pub fn backplane_mode(mut self, mode: crate::BackplaneMode) -> Self {
        self.sharded_pubsub = mode == crate::BackplaneMode::Sharded;
        self
    }

    /// Whether reads from Redis that are due at the same moment share one
    /// request: while a read is in flight, the reads other tasks issue
    /// gather into one MGET (sent when their worker has nothing else ready
    /// to run, or at 32 keys), which costs Redis and this process less CPU
    /// per read under concurrency (`benches/README.md`, "Concurrent reads
    /// share one MGET"). A read with no other in flight goes alone either
    /// way. Counted in `stats.l2_reads_batched`. One difference: MGET reads
    /// a key of another Redis type as absent, so a batched read of one is a
    /// plain miss (the next load's store replaces it) where a GET would
    /// count a bad entry and delete it. No effect on a Redis Cluster, where
    /// every read goes alone. Default: true.
    pub fn batch_reads(mut self, enabled: bool) -> Self {
        self.batch_reads = enabled;
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

    /// When the circuit breaker around Redis opens and how long it stays
    /// open before it probes Redis again (see [`BreakerSettings`]). While it
    /// is open, calls skip Redis at once; when it closes, this instance
    /// clears its L1, as it may have missed invalidations.
    /// Default: `BreakerSettings::default()` (5 failures in a row, or more
    /// than half of at least 20 calls in 10 s; 1 s cool-down).
    pub fn breaker(mut self, settings: BreakerSettings) -> Self {
        self.breaker = settings;
        self
    }

    /// The most loader calls this cache runs at once, over all keys
    /// (single-flight already makes it one per key). Callers beyond it wait
    /// in line, within their entry's hard timeout (else the
    /// [`background_timeout`](Self::background_timeout)); a caller with a
    /// stale value gets it at the soft timeout instead. While Redis is down
    /// and L1 is cold, this is how many queries the database sees at most:
    /// set it to what the database (its connection pool) can take.
    /// At least 1. Default: no cap (the cache cannot know the pool's size).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = tiered_cache::TieredCache::builder()
    ///     .max_concurrent_loads(16)
    ///     .build()
    ///     .await
    ///     .unwrap();
    /// # let _ = cache;
    /// # }
    /// ```
    pub fn max_concurrent_loads(mut self, loads: usize) -> Self {
        self.max_concurrent_loads = Some(loads);
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
        if self.l2_timeout.is_zero() || self.l2_timeout > MAX_L2_TIMEOUT {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "l2_timeout must be more than zero and at most {MAX_L2_TIMEOUT:?} (it bounds every Redis command; got {:?})",
                    self.l2_timeout
                ),
            ));
        }
        if self.namespace.is_empty() || self.namespace.contains(['{', '}']) {
            return Err(Error::new(
                ErrorKind::Config,
                "the namespace must be non-empty and contain no `{` or `}`",
            ));
        }
        self.breaker.validate()?;
        if let Some(loads) = self.max_concurrent_loads {
            if loads == 0 || loads > MAX_LOADS {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("max_concurrent_loads must be at least 1 and at most {MAX_LOADS} (got {loads})"),
                ));
            }
        }
        let stats = Arc::new(Stats::default());
        stats.export.install(&self.namespace);
        if self.stats_per_entity {
            stats.by_entity.enable(&self.namespace);
        }
        let l2 = match &self.redis {
            Some(target) => {
                let config = L2Config {
                    target: target.clone(),
                    namespace: self.namespace.clone(),
                    timeout: self.l2_timeout,
                    breaker: self.breaker,
                    sharded_pubsub: self.sharded_pubsub,
                    batch_reads: self.batch_reads,
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
        let l1 = (self.l1_max_bytes > 0)
            .then(|| L1::new(self.l1_max_bytes, self.l1_ttl_cap, self.l1_admission));
        let failsafe_only = l1
            .is_none()
            .then(|| L1::new(FAILSAFE_ONLY_BYTES, self.l1_ttl_cap, L1Admission::EveryRead));
        // Without Redis there is no other instance: what this one knows of
        // tag versions is all there is. With Redis, the backplane vouches.
        let tags = Arc::new(TagVersions::new(l2.is_none()));
        let fleet_waits = Arc::new(FleetWaits::default());
        let backplane = match &l2 {
            Some(l2) if self.backplane => {
                let local = Local {
                    // Invalidations drop fail-safe copies too.
                    l1: l1.clone().or_else(|| failsafe_only.clone()),
                    tags: Arc::clone(&tags),
                    stats: Arc::clone(&stats),
                    fleet_waits: Arc::clone(&fleet_waits),
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
        if let Some(l2) = &l2 {
            // See `breaker.rs` for why closing clears L1 rather than
            // verifying entries one by one.
            let (local, tags) = (
                l1.clone().or_else(|| failsafe_only.clone()),
                Arc::clone(&tags),
            );
            l2.breaker().on_close(Box::new(move || {
                tags.forget_all();
                if let Some(l1) = &local {
                    l1.clear();
                }
            }));
        }
        let tiers = Tiers {
            l1,
            l2,
            tags,
            stats,
            max_value_bytes: self.max_value_bytes,
            failsafe_only,
            bad_entry_log: LogLimit::every(Duration::from_secs(10)),
        };
        Ok(TieredCache::from_parts(
            tiers,
            self.defaults,
            self.background_timeout,
            backplane,
            self.max_concurrent_loads.map(LoadLimit::new),
            fleet_waits,
        ))
    }
}
