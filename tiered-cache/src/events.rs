//! The one observability seam: what the cache does is named here, as
//! events (each one counter of [`stats`](crate::TieredCache::stats), counted
//! in `stats.rs` and exported by `metrics.rs`) and gauges; so are the spans
//! of the public calls and the per-cache "log once per incident" guard.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

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
    /// `stats.l2_reads_batched`.
    ReadBatched,
    /// `stats.stale_writes_refused`.
    StaleWriteRefused,
    /// `stats.oversized_skips`.
    OversizedSkip,
    /// `stats.tag_stale_drops`.
    TagStaleDrop,
    /// `stats.promotions_deferred`.
    PromotionDeferred,
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

/// A span for one public call, at `debug`: the operation, the entity of its
/// key (never the key itself, which may hold a user's id, and never a
/// value), and the tier that answered, recorded later (see [`answered`]).
/// Without a subscriber that wants it, it costs a level check.
#[inline]
pub(crate) fn op_span(op: &'static str, key: &str) -> tracing::Span {
    tracing::debug_span!(
        "tiered_cache",
        op,
        entity = crate::key::entity_of(key),
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
}
