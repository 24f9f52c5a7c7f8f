//! A two-tier cache for async services: an in-process L1 ([moka]) in front
//! of a shared L2 (Redis), behind typed, versioned keys.
//!
//! # Design
//!
//! **Read path.** An L1 hit returns an `Arc` of the decoded value: no copy,
//! no decode. The hottest keys are answered from a small direct-mapped
//! table in front of moka (a locked slot read instead of moka's lookup and
//! its bookkeeping); every change to L1 empties the key's slot, so it never
//! serves a replaced or dropped value, and a slot's reference is weak, so it
//! keeps nothing alive that moka let go of. An L1 miss reads Redis and
//! promotes the entry to L1 for its remaining TTL. A miss in both runs the
//! loader once per key in this
//! process (single-flight); every concurrent caller gets its result or its
//! error, and errors are never cached.
//!
//! **Keeping the database safe.** Hits refresh hot entries in the background
//! shortly before they expire (XFetch, probabilistic early refresh), so no
//! caller waits on the loader. An entry can have a `stale` grace window:
//! after expiry it is served while one refresh runs, and served again when
//! the loader fails or exceeds its soft timeout (fail-safe). With
//! [`fleet_lock`](EntryOptions::fleet_lock) an entry is loaded once across
//! every instance, not once per instance: a lock in Redis beside the entry,
//! with a lease, and the others wait for its value (bounded; they load
//! themselves if the holder goes away or Redis fails).
//! [`max_concurrent_loads`](TieredCacheBuilder::max_concurrent_loads) caps
//! the loads of all keys at once, which is what the database sees while
//! Redis is down and L1 is cold.
//!
//! **Correct keys.** A [`Key<V>`](Key) names an entity, a schema version and
//! arguments, and can only yield a `V`. Its encoding is injective, so two
//! different argument tuples never share an entry; a changed schema version
//! reads old entries as misses, never as garbage.
//!
//! **Failure modes.** Redis down, slow or returning errors never fails a read:
//! every Redis command has a timeout, failures are counted in
//! [`stats`](TieredCache::stats) and logged once per incident, and the cache
//! serves from L1 and the loader until Redis answers again. A circuit
//! breaker opens after repeated failures or timeouts: calls then skip Redis
//! at L1 speed until one probe, after a cool-down, finds it well again
//! (see [`BreakerSettings`]); this instance then clears its L1, as it may
//! have missed invalidations. Bytes in Redis
//! that do not decode are a counted miss and are deleted. Connection strings
//! are never logged.
//!
//! **Writes.** Every write to Redis is compare-and-set on the entry's
//! version, a per-key counter beside the entry (same Cluster slot) that only
//! grows. [`set`](TieredCache::set) and
//! [`invalidate`](TieredCache::invalidate) advance it; a load reads it before
//! it calls the loader and stores its value only if it has not moved since.
//! So a slow load that began before a write or an invalidation, on this
//! instance or another, never stores its older value in either tier: its
//! caller still gets the value it loaded, and the refusal is counted
//! (`stats.stale_writes_refused`). `set` writes Redis, then L1, then tells the
//! other instances; `invalidate` deletes in Redis, then drops L1, then tells
//! them. When Redis fails, `set` keeps the value in this instance's L1 only
//! (counted and logged, not an error), and `invalidate` drops it here and
//! returns the error: other instances may serve the old value until their
//! L1 entry expires (bound it with
//! [`l1_ttl_cap`](TieredCacheBuilder::l1_ttl_cap)). A load whose Redis read
//! failed does not write Redis at all.
//!
//! **Write policies per entity.** An [`Entity`] declares its key, its cache
//! options and a [`WritePolicy`]; [`TieredCache::entity`] pairs it with the
//! application's [`Store`]: cache-aside, write-through, or write-behind
//! (bounded, batched, coalescing, retried, with dead letters, and durable on
//! a Redis Stream if asked). Every store write carries the entry's version,
//! so a store can refuse an older one. See [`write`](mod@write).
//!
//! **The default cache of `#[cached]`.** A function names its cache with
//! `cache = expr`; without it, it uses the innermost
//! [`scope`] around the call (a task-local default, like
//! tracing's `with_default`), else the one [`install`]ed
//! for the process. `install` succeeds once: a second call is an error, so
//! two caches never silently share one default. With neither, the function
//! runs uncached (and says so once). [`default_cache`]
//! reads the default the same way.
//!
//! **Tags.** [`invalidate_tag`](TieredCache::invalidate_tag) is O(1): tags
//! carry version counters, and entries stamped with an older version read
//! as misses. [`clear`](TieredCache::clear) does the same for a whole
//! namespace: every entry also carries the namespace's epoch.
//!
//! **Coherence.** Instances sharing a Redis tell each other, over Redis
//! pub/sub, which keys they overwrote or invalidated and which tags they
//! bumped; the others drop those entries from their L1 (without touching
//! Redis again). A write's message leaves with the write: its store script
//! publishes it, so it is out before `set` returns (with sharded pub/sub it
//! follows the write instead). An instance whose subscription was lost
//! clears its L1 when it is back, since it may have missed messages
//! (`stats.backplane_gaps`); until then its L1 serves entries at most up to
//! [`l1_ttl_cap`](TieredCacheBuilder::l1_ttl_cap).
//!
//! **Redis Cluster** (feature `cluster`,
//! `TieredCacheBuilder::redis_cluster`). The same cache on a cluster: each
//! command goes to the master of its keys' slot, and multi-key reads are
//! split per slot by the client, never `CROSSSLOT`; an entry's version
//! counter shares its slot, so the compare-and-set scripts run as they do on
//! one Redis. Resharding and failover are followed by the client; while a
//! shard has no master, its keys are served from L1 and the loader, like any
//! Redis outage. The backplane uses classic pub/sub by default, which the
//! cluster bus carries to every node, and subscribes on one node at a time
//! (a random configured one first, so a fleet spreads over them);
//! `TieredCacheBuilder::backplane_mode(BackplaneMode::Sharded)` switches to
//! sharded pub/sub (`SPUBLISH`, Redis 7), which keeps messages within the
//! channel's shard. `benches/README.md` ("The backplane's knee") measured
//! both and says why classic is the default.
//!
//! # Tour
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tiered_cache::Error> {
//! use std::time::Duration;
//! use tiered_cache::{EntryOptions, Key, TieredCache};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Product { id: u64, name: String }
//!
//! // Add `.redis("redis://127.0.0.1:6379")` for the shared tier.
//! let cache = TieredCache::builder()
//!     .namespace("shop")
//!     .l1_max_bytes(16 << 20)
//!     .default_ttl(Duration::from_secs(300))
//!     .build()
//!     .await?;
//!
//! let key = Key::<Product>::new("product", 1).arg(7);
//! let opts = EntryOptions::new(Duration::from_secs(30 * 60)).tag("products");
//! let product = cache
//!     .get_or_load(&key, &opts, || async {
//!         Ok::<_, std::io::Error>(Product { id: 7, name: "lamp".into() })
//!     })
//!     .await
//!     .expect("the loader does not fail");
//! assert_eq!(product.name, "lamp");
//! assert!(cache.get(&key).await.is_some());
//!
//! cache.invalidate_tag("products").await?;
//! assert!(cache.get(&key).await.is_none());
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), forbid(clippy::panic))]
#![warn(missing_docs, unreachable_pub)]

mod admission;
mod backplane;
mod batch;
mod breaker;
mod builder;
mod cache;
mod codec;
mod entities;
mod entry;
mod error;
mod events;
mod fleet;
mod flight;
mod global;
mod invalidation;
mod key;
mod l1;
mod l2;
mod limit;
mod loader;
mod metrics;
mod options;
mod refresh;
mod serve;
mod stats;
mod tags;
mod tiers;
mod warm;
mod weigh;
pub mod write;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use admission::L1Admission;
#[cfg(feature = "cluster")]
pub use backplane::BackplaneMode;
pub use breaker::BreakerSettings;
pub use builder::TieredCacheBuilder;
pub use cache::TieredCache;
pub use codec::{Codec, Postcard};
pub use entities::EntityStats;
pub use error::{Error, ErrorKind, LoadError, Result};
pub use key::Key;
pub use options::EntryOptions;
pub use stats::StatsSnapshot;
pub use warm::{WarmProgress, WarmReport, Warmer};
pub use write::{Entity, EntityCache, Store, WritePolicy};

pub use global::{default_cache, install, scope};
#[cfg(feature = "macros")]
pub use tiered_cache_macros::cached;

#[doc(hidden)]
#[path = "macro_support/mod.rs"]
pub mod __private;

/// The `#[cached]` documentation's examples, compiled and run as doctests
/// here (the macro crate cannot depend on the runtime).
#[cfg(all(doctest, feature = "macros"))]
#[doc = include_str!("../../tiered-cache-macros/src/cached.md")]
pub struct CachedMacroDoctests;

/// The README's examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
