//! The one observability seam: what the cache does is recorded as named
//! events, in one place. Today they feed the counters behind
//! [`stats`](crate::TieredCache::stats); a metrics exporter (the `metrics`
//! feature, to come) hooks in here rather than at each call site. The
//! per-cache "log once per incident" guard lives here too.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::stats::{Counter, Stats};

/// Something the cache did, as counted in [`StatsSnapshot`](crate::StatsSnapshot)
/// (each variant names its counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// `stats.l1_hits`.
    L1Hit,
    /// `stats.l2_hits`.
    L2Hit,
    /// `stats.misses`.
    Miss,
    /// `stats.negative_hits`.
    NegativeHit,
    /// `stats.loads`.
    Load,
    /// `stats.load_errors`.
    LoadError,
    /// `stats.coalesced_waits`.
    CoalescedWait,
    /// `stats.early_refreshes`.
    EarlyRefresh,
    /// `stats.stale_refreshes`.
    StaleRefresh,
    /// `stats.stale_served`.
    StaleServed,
    /// `stats.loader_timeouts`.
    LoaderTimeout,
    /// `stats.loads_queued`.
    LoadQueued,
    /// `stats.decode_failures`.
    DecodeFailure,
    /// `stats.l2_errors`.
    L2Error,
    /// `stats.l2_skipped`.
    L2Skipped,
    /// `stats.stale_writes_refused`.
    StaleWriteRefused,
    /// `stats.oversized_skips`.
    OversizedSkip,
    /// `stats.tag_stale_drops`.
    TagStaleDrop,
    /// `stats.invalidations_received`.
    InvalidationReceived,
    /// `stats.backplane_gaps`.
    BackplaneGap,
    /// `stats.backplane_published`.
    BackplanePublished,
    /// `stats.store_writes`.
    StoreWrite,
    /// `stats.write_fallbacks`.
    WriteFallback,
    /// `stats.writes_queued`.
    WriteQueued,
    /// `stats.writes_coalesced`.
    WriteCoalesced,
    /// `stats.writes_rejected_full`.
    WriteRejectedFull,
    /// `stats.write_queue_depth` up by one.
    WriteQueueGrew,
    /// `stats.write_flushes`.
    WriteFlush,
    /// `stats.write_retries`.
    WriteRetry,
    /// `stats.write_dead_letters`.
    WriteDeadLetter,
    /// `stats.breaker_opened`.
    BreakerOpened,
    /// `stats.breaker_probes`.
    BreakerProbe,
    /// `stats.breaker_closed`.
    BreakerClosed,
}

/// A value the cache sets rather than counts (each variant names its gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gauge {
    /// `stats.breaker_state`.
    BreakerState,
}

impl Stats {
    /// Records one `event`.
    #[inline]
    pub(crate) fn record(&self, event: Event) {
        self.record_many(event, 1);
    }

    /// Records one `event` of a read of `key`: counted per entity too,
    /// when that is on.
    #[inline]
    pub(crate) fn record_at(&self, event: Event, key: &str) {
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

/// A span for one public call, at `debug`: the operation, the entity of its
/// key (never the key itself, which may hold a user's id, and never a
/// value), and the tier that answered, recorded later (see [`answered`]).
/// Without a subscriber that wants it, it costs a level check.
#[inline]
pub(crate) fn op_span(op: &'static str, key: &str) -> tracing::Span {
    tracing::debug_span!(
        "tiered_cache",
        op,
        entity = crate::entities::entity_of(key),
        tier = tracing::field::Empty
    )
}

/// A span for a public call that has no key (a tag, the namespace).
#[inline]
pub(crate) fn op_span_keyless(op: &'static str) -> tracing::Span {
    tracing::debug_span!("tiered_cache", op)
}

/// Records on `span` which tier answered (see [`answered`]). A disabled
/// span is skipped first: recording on one still looks the field up by name.
#[inline]
pub(crate) fn record_tier(span: &tracing::Span, tier: &'static str) {
    if !span.is_disabled() {
        span.record("tier", tier);
    }
}

/// Records on the current call's span which tier answered: `l1`, `l2`,
/// `loader` (this call led a load, or served stale while it ran),
/// `coalesced` (it waited on another caller's load) or `none`.
#[inline]
pub(crate) fn answered(tier: &'static str) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::Span::current().record("tier", tier);
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
    StaleWriteRefused => stale_writes_refused,
    OversizedSkip => oversized_skips,
    TagStaleDrop => tag_stale_drops,
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

/// "Log once per incident" for one cache: lets a line through at most once
/// per `every_ms` (`u64::MAX`: once). Per cache, so one cache's incidents
/// never mute another's; the counters keep the totals.
#[derive(Debug)]
pub(crate) struct LogLimit {
    last_ms: AtomicU64,
    every_ms: u64,
}

impl LogLimit {
    /// At most one line per `every`.
    pub(crate) fn every(every: Duration) -> Self {
        LogLimit {
            last_ms: AtomicU64::new(0),
            every_ms: every.as_millis().min(u128::from(u64::MAX)) as u64,
        }
    }

    /// One line, ever.
    pub(crate) fn once() -> Self {
        LogLimit {
            last_ms: AtomicU64::new(0),
            every_ms: u64::MAX,
        }
    }

    /// Whether a line may be logged now (and, if so, notes it).
    pub(crate) fn allow(&self) -> bool {
        let now = crate::entry::now_ms().max(1);
        let last = self.last_ms.load(Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.every_ms;
        due && self
            .last_ms
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_lets_one_line_through_per_period() {
        let once = LogLimit::once();
        assert!(once.allow());
        assert!(!once.allow());
        let every = LogLimit::every(Duration::from_secs(3600));
        assert!(every.allow());
        assert!(!every.allow());
        assert!(LogLimit::once().allow(), "another cache's limit is its own");
    }

    #[test]
    fn each_event_counts_in_its_own_counter() {
        let stats = Stats::default();
        stats.record(Event::L1Hit);
        stats.record_many(Event::InvalidationReceived, 3);
        let s = stats.snapshot();
        assert_eq!((s.l1_hits, s.invalidations_received, s.misses), (1, 3, 0));
    }
}
