//! Counters of what the cache did, cheap enough for the hit path.
//!
//! Hot counters are striped over cache-line-padded slots picked per thread,
//! so two cores hitting the cache do not fight over one cache line.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::events::{Event, Gauge};

const STRIPES: usize = 8;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

/// A counter that many threads add to and few read.
#[derive(Debug, Default)]
pub(crate) struct Counter([Padded; STRIPES]);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0[stripe()].0.fetch_add(n, Relaxed);
    }

    /// Takes `n` away (for a gauge, such as a queue's depth). Stripes wrap
    /// around, so one may go "below zero" while the sum stays right.
    #[inline]
    pub(crate) fn sub(&self, n: u64) {
        self.0[stripe()].0.fetch_add(n.wrapping_neg(), Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, p| sum.wrapping_add(p.0.load(Relaxed)))
    }
}

#[inline]
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

macro_rules! stats {
    (
        counters { $( $(#[$doc:meta])* $name:ident ),* $(,)? }
        gauges { $( $(#[$gdoc:meta])* $gauge:ident ),* $(,)? }
    ) => {
        /// The live counters and gauges of one cache.
        #[derive(Debug, Default)]
        pub(crate) struct Stats {
            $( pub(crate) $name: Counter, )*
            $( pub(crate) $gauge: AtomicU64, )*
            /// Where events go besides these counters (the `metrics` feature).
            pub(crate) export: crate::metrics::Export,
            /// Read counters per entity, when turned on.
            pub(crate) by_entity: crate::entities::ByEntity,
        }

        /// A point-in-time copy of a cache's counters and gauges, from
        /// [`TieredCache::stats`](crate::TieredCache::stats).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
            $( $(#[$gdoc])* pub $gauge: u64, )*
        }

        impl Stats {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $( $name: self.$name.get(), )*
                    $( $gauge: self.$gauge.load(Relaxed), )*
                }
            }
        }
    };
}

stats! {
    counters {
    /// Reads answered from the in-process tier.
    l1_hits,
    /// Reads answered from Redis (and promoted to L1).
    l2_hits,
    /// Reads that found nothing usable in either tier.
    misses,
    /// Reads that found a cached negative (`None`) result.
    negative_hits,
    /// Loader runs started.
    loads,
    /// Loader runs that returned an error (never cached).
    load_errors,
    /// Callers that waited on another caller's load instead of loading.
    coalesced_waits,
    /// Background refreshes started by XFetch before expiry.
    early_refreshes,
    /// Background refreshes started because a caller met a stale entry.
    stale_refreshes,
    /// Stale values returned because a refresh failed, timed out or was running.
    stale_served,
    /// Loads that exceeded their soft or hard timeout, or waited in line
    /// for a load slot (`max_concurrent_loads`) longer than their bound.
    loader_timeouts,
    /// Loads that waited in line for a slot because `max_concurrent_loads`
    /// loads were running.
    loads_queued,
    /// Entries in Redis that could not be decoded (treated as misses and deleted).
    decode_failures,
    /// Redis commands that failed or timed out (the cache degraded around them).
    l2_errors,
    /// Redis commands not sent: the circuit breaker was open, or the call's
    /// L2 budget was spent.
    l2_skipped,
    /// Reads from Redis sent in one pipeline with other reads that were
    /// due at the same moment, on this instance (a batch of n counts n):
    /// how much of the read traffic shares its requests.
    l2_reads_batched,
    /// Loaded values not stored because the key was written or invalidated
    /// (here or on another instance) after the load began: the newer write
    /// stays (compare-and-set).
    stale_writes_refused,
    /// Values not written to Redis because they exceeded the size limit.
    oversized_skips,
    /// Entries dropped because one of their tags was invalidated after they were written.
    tag_stale_drops,
    /// Values read from Redis and returned without a copy in L1: their
    /// first read in the doorkeeper's window (`L1Admission::SecondRead`).
    promotions_deferred,
    /// Invalidations (of a key, a tag, the namespace) received from other
    /// instances over the backplane and applied to L1; counted after they are applied.
    invalidations_received,
    /// Times L1 was cleared because invalidations may have been missed: the
    /// subscription was lost and is back, or a peer could not publish.
    backplane_gaps,
    /// Backplane messages this instance published: by its publisher (each
    /// carries a batch of the invalidations queued meanwhile), or by a
    /// write's store script (one key each).
    backplane_published,
    /// Writes of entities that reached their store (each write of a
    /// write-behind batch counts).
    store_writes,
    /// Entity writes (write-through, write-behind) that Redis did not take
    /// (down, refusing, or the value too large): the key was invalidated
    /// everywhere instead, so no instance keeps the older value.
    write_fallbacks,
    /// Write-behind writes queued (coalesced ones included).
    writes_queued,
    /// Write-behind writes that replaced a waiting write of the same id.
    writes_coalesced,
    /// Write-behind writes refused because the queue was full.
    writes_rejected_full,
    /// Ids waiting in write-behind queues now (a gauge, not a total).
    write_queue_depth,
    /// Write-behind batches handed to a store successfully.
    write_flushes,
    /// Write-behind batches tried again after the store failed them.
    write_retries,
    /// Write-behind writes set aside after their last attempt failed.
    write_dead_letters,
    /// Times the circuit breaker around Redis opened (calls then skip Redis).
    breaker_opened,
    /// Probes the open breaker let through to Redis after its cool-down.
    breaker_probes,
    /// Times the breaker closed again (a probe succeeded); L1 was cleared each time.
    breaker_closed,
    }
    gauges {
    /// The circuit breaker now: 0 closed, 1 open, 2 half-open (a probe is out).
    breaker_state,
    }
}

impl Stats {
    /// Records one `event`.
    #[inline]
    pub(crate) fn record(&self, event: Event) {
        self.record_many(event, 1);
    }

    /// Records one `event` of a read of `key` (its text, or its bytes as a
    /// `#[cached]` call's draft holds them): counted per entity too, when
    /// that is on.
    #[inline]
    pub(crate) fn record_at<K: AsRef<[u8]> + ?Sized>(&self, event: Event, key: &K) {
        self.record_many(event, 1);
        self.by_entity.record(event, key);
    }

    /// Records `n` of `event` at once.
    #[inline]
    pub(crate) fn record_many(&self, event: Event, n: u64) {
        self.counter(event).add(n);
        self.export.count(event, n);
    }

    /// `n` ids left the write-behind queues (their store writes are done).
    pub(crate) fn write_queue_shrank(&self, n: u64) {
        self.write_queue_depth.sub(n);
        self.export.queue_shrank(n);
    }

    /// Sets `gauge` to `value`.
    pub(crate) fn set(&self, gauge: Gauge, value: u64) {
        let slot = match gauge {
            Gauge::BreakerState => &self.breaker_state,
        };
        slot.store(value, Relaxed);
        self.export.set(gauge, value);
    }
}

/// Each event's counter, by name: the one table from which `counter`,
/// the metrics' names and `Event::ALL` come.
macro_rules! counters {
    ($( $event:ident => $field:ident ),* $(,)?) => {
        impl Stats {
            #[inline]
            fn counter(&self, event: Event) -> &Counter {
                match event {
                    $( Event::$event => &self.$field, )*
                }
            }
        }

        impl Event {
            /// Every event, in declaration order (`event as usize` indexes it).
            #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
            pub(crate) const ALL: &'static [Event] = &[$( Event::$event ),*];

            /// The name of the event's counter in [`StatsSnapshot`](crate::StatsSnapshot).
            #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
            pub(crate) fn counter_name(self) -> &'static str {
                match self {
                    $( Event::$event => stringify!($field), )*
                }
            }
        }
    };
}

counters! {
    L1Hit => l1_hits,
    L2Hit => l2_hits,
    Miss => misses,
    NegativeHit => negative_hits,
    Load => loads,
    LoadError => load_errors,
    CoalescedWait => coalesced_waits,
    EarlyRefresh => early_refreshes,
    StaleRefresh => stale_refreshes,
    StaleServed => stale_served,
    LoaderTimeout => loader_timeouts,
    LoadQueued => loads_queued,
    DecodeFailure => decode_failures,
    L2Error => l2_errors,
    L2Skipped => l2_skipped,
    ReadBatched => l2_reads_batched,
    StaleWriteRefused => stale_writes_refused,
    OversizedSkip => oversized_skips,
    TagStaleDrop => tag_stale_drops,
    PromotionDeferred => promotions_deferred,
    InvalidationReceived => invalidations_received,
    BackplaneGap => backplane_gaps,
    BackplanePublished => backplane_published,
    StoreWrite => store_writes,
    WriteFallback => write_fallbacks,
    WriteQueued => writes_queued,
    WriteCoalesced => writes_coalesced,
    WriteRejectedFull => writes_rejected_full,
    WriteQueueGrew => write_queue_depth,
    WriteFlush => write_flushes,
    WriteRetry => write_retries,
    WriteDeadLetter => write_dead_letters,
    BreakerOpened => breaker_opened,
    BreakerProbe => breaker_probes,
    BreakerClosed => breaker_closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_counts_in_its_own_counter() {
        let stats = Stats::default();
        stats.record(Event::L1Hit);
        stats.record_many(Event::InvalidationReceived, 3);
        let s = stats.snapshot();
        assert_eq!((s.l1_hits, s.invalidations_received, s.misses), (1, 3, 0));
    }
}
