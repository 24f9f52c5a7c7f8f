//! Write policies per entity: how a write reaches the application's store
//! (the source of truth) and the cache.
//!
//! An [`Entity`] declares, in one place, its name and schema version (the
//! same two that a `#[cached(name = .., version = ..)]` reader puts in its
//! keys), its id type, how it is cached and its [`WritePolicy`].
//! [`TieredCache::entity`](crate::TieredCache::entity) pairs it with a
//! [`Store`] and gives an [`EntityCache`]: `get` reads through the cache
//! (the store is the loader), `put` and `delete` write by the policy.
//!
//! - [`WritePolicy::CacheAside`]: the store, then an invalidation of the
//!   key in every tier and on every instance.
//! - [`WritePolicy::WriteThrough`]: the store, then the cache
//!   (compare-and-set), so the next read anywhere returns the new value. A
//!   cache that cannot be written is invalidated instead, and counted.
//! - [`WritePolicy::WriteBehind`]: the cache, then a bounded queue that a
//!   worker flushes to the store in batches, coalescing writes to one id,
//!   retrying with backoff, and setting aside writes that keep failing as
//!   [`DeadLetter`]s. With [`WriteBehind::durable`], the queue is also a
//!   Redis Stream, so a crash of this process loses no acknowledged write.
//!
//! Every store write carries the entry's version, which only grows, so a
//! store can refuse an older write (`UPDATE .. WHERE version < ?`): retries,
//! replays and two instances flushing one id never leave an older value.

mod behind;
mod durable;
mod entity;
mod store;

use std::time::Duration;

use crate::cache::TieredCache;
use crate::error::Error;
use crate::events::Event;
use crate::key::Key;
use crate::tiers::Reserved;

pub use entity::{Entity, EntityCache, WarmLoad, WarmLoader};
pub use store::Store;

/// How an entity's writes reach its store and the cache; see the
/// [module docs](self).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub enum WritePolicy {
    /// Write the store, then invalidate the cache everywhere. The default.
    #[default]
    CacheAside,
    /// Write the store, then the cache (read-your-writes on every instance).
    WriteThrough,
    /// Write the cache, then the store in the background.
    WriteBehind(WriteBehind),
}

impl WritePolicy {
    /// The policy's name, for spans.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            WritePolicy::CacheAside => "cache_aside",
            WritePolicy::WriteThrough => "write_through",
            WritePolicy::WriteBehind(config) if config.durable => "write_behind_durable",
            WritePolicy::WriteBehind(_) => "write_behind",
        }
    }
}

/// Settings of a write-behind queue.
///
/// ```
/// use std::time::Duration;
/// use tiered_cache::write::{WhenFull, WriteBehind, WritePolicy};
/// let policy = WritePolicy::WriteBehind(
///     WriteBehind::new()
///         .batch_size(200)
///         .flush_interval(Duration::from_millis(50))
///         .capacity(50_000)
///         .when_full(WhenFull::Error)
///         .max_attempts(8),
/// );
/// # let _ = policy;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct WriteBehind {
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) capacity: usize,
    pub(crate) when_full: WhenFull,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) durable: bool,
    pub(crate) claim_idle: Duration,
    pub(crate) consumer: Option<String>,
}

/// What `put` does when the write-behind queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Wait for room (backpressure). The default.
    #[default]
    Wait,
    /// Return an error of kind [`QueueFull`](crate::ErrorKind::QueueFull).
    Error,
}

impl Default for WriteBehind {
    fn default() -> Self {
        WriteBehind {
            batch_size: 100,
            flush_interval: Duration::from_millis(100),
            capacity: 10_000,
            when_full: WhenFull::Wait,
            max_attempts: 5,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            durable: false,
            claim_idle: Duration::from_secs(30),
            consumer: None,
        }
    }
}

impl WriteBehind {
    /// The defaults: batches of up to 100 writes at least every 100 ms, room
    /// for 10,000 ids, backpressure when full, 5 attempts from 50 ms
    /// backoff (doubling, with jitter, up to 5 s), in memory.
    pub fn new() -> Self {
        WriteBehind::default()
    }

    /// The most writes one flush hands the store (at least 1).
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The longest a write waits before its batch is flushed.
    #[must_use]
    pub fn flush_interval(mut self, every: Duration) -> Self {
        self.flush_interval = every;
        self
    }

    /// How many ids may wait to be flushed (at least 1); writes to an id
    /// already waiting replace its value and take no more room.
    #[must_use]
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(1);
        self
    }

    /// What `put` does when the queue is full.
    #[must_use]
    pub fn when_full(mut self, when: WhenFull) -> Self {
        self.when_full = when;
        self
    }

    /// How many times a batch is tried before its failing writes become
    /// dead letters (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The wait after the first failure, doubled after each (with up to 50%
    /// jitter), never above `max`.
    #[must_use]
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// Keeps the queue in a Redis Stream as well: `put` returns once Redis
    /// holds the write, and writes of a process that died before flushing
    /// them are flushed by the next one, or by another instance, after
    /// `claim_idle`. Needs Redis (and Redis's persistence to outlive a
    /// Redis restart).
    #[must_use]
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// In durable mode, how old an unflushed write must be before a queue
    /// other than its writer's flushes it. Default: 30 s. Too short a time
    /// makes two queues flush one write now and then (harmless: versions).
    #[must_use]
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// In durable mode, this queue's consumer name in the stream's group.
    /// A process restarted under the same name flushes what its previous
    /// run left at once, instead of after `claim_idle`. Default: a random
    /// name per handle.
    #[must_use]
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// The longest a write may wait in memory before the store has it or it
    /// is set aside: one interval, plus every attempt's backoff. A pending
    /// write's cache entry stays fresh at least this much past its TTL, so
    /// a reader on another instance does not load the older value from the
    /// store meanwhile.
    pub(crate) fn horizon(&self) -> Duration {
        let mut total = self.flush_interval;
        let mut wait = self.backoff;
        for _ in 1..self.max_attempts {
            total = total.saturating_add(wait.saturating_add(wait / 2));
            wait = wait.saturating_mul(2).min(self.max_backoff);
        }
        total
    }
}

/// A write-behind write that kept failing: set aside with the store's last
/// error. Read them with [`EntityCache::take_dead_letters`]; hand one back
/// with [`EntityCache::replay`].
#[derive(Debug, Clone)]
pub struct DeadLetter<I, V> {
    /// The entity's id.
    pub id: I,
    /// The value to save, or `None` for a delete.
    pub value: Option<std::sync::Arc<V>>,
    /// The write's version (a replay keeps it, so it never undoes a newer write).
    pub version: u64,
    /// The store's error, as text.
    pub error: String,
    /// How many times the write was tried.
    pub attempts: u32,
}

/// The error of an entity's `put` or `delete`.
#[derive(Debug)]
#[non_exhaustive]
pub enum WriteError<E> {
    /// The store refused or failed the write; the cache was left as before
    /// the write (cache-aside and write-through invalidate it first).
    Store(E),
    /// The cache failed in a way the write cannot hide: the write-behind
    /// queue was full or shut down, or a durable queue could not be written.
    Cache(crate::Error),
}

impl<E: std::fmt::Display> std::fmt::Display for WriteError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Store(e) => write!(f, "the store failed the write: {e}"),
            WriteError::Cache(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for WriteError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WriteError::Store(e) => Some(e),
            WriteError::Cache(e) => Some(e),
        }
    }
}

/// What the write policies need of the cache: a write's version, and the
/// counters of their queues and store writes.
impl TieredCache {
    /// Takes a write's version before it goes to the application's store;
    /// see [`Tiers::reserve`](crate::tiers::Tiers::reserve).
    pub(crate) async fn reserve(&self, key: &str) -> Reserved {
        let tiers = &self.inner.tiers;
        tiers.within_budget(tiers.reserve(key)).await
    }

    pub(crate) fn record(&self, event: Event) {
        self.inner.tiers.stats.record(event);
    }

    pub(crate) fn record_many(&self, event: Event, n: u64) {
        self.inner.tiers.stats.record_many(event, n);
    }

    pub(crate) fn write_queue_shrank(&self, n: u64) {
        self.inner.tiers.stats.write_queue_shrank(n);
    }

    /// The rule for a write whose cache update did not reach Redis although
    /// the cache has one (Redis failed or refused it, the value was too
    /// large, or it did not encode): counted in `write_fallbacks`, and the
    /// key invalidated everywhere instead, so that no instance keeps
    /// reading the value the write replaced. Write-through and write-behind
    /// both follow it.
    ///
    /// # Errors
    /// When the invalidation could not reach Redis either.
    pub(crate) async fn invalidate_instead<V, C>(&self, key: &Key<V, C>) -> Result<(), Error> {
        self.record(Event::WriteFallback);
        self.invalidate(key).await
    }
}
