//! The circuit breaker around every Redis call (reads, writes, tag
//! versions, publishes, fleet locks).
//!
//! **Closed** (the normal state): calls go to Redis, and their outcomes are
//! counted. It **opens** after [`BreakerSettings::failures`] failures in a
//! row, or when more than [`BreakerSettings::failure_rate`] of the calls in
//! one window failed (once the window saw at least `MIN_CALLS_FOR_RATE`
//! calls). Only connection failures and timeouts count: an error reply is
//! about one command (`OOM`, `NOPERM`, `WRONGTYPE`), Redis answered it, so it
//! counts as Redis being well.
//!
//! **Open**: calls skip Redis at once (counted as `stats.l2_skipped`), so a
//! down or frozen Redis costs a request nothing: it runs at L1 speed, with
//! the loader behind it. After the cool-down, exactly one call goes through
//! as a **probe** (half-open); the others keep skipping. The probe's success
//! closes the breaker, its failure opens it for another cool-down.
//!
//! **On closing, this instance clears its L1** (and forgets the tag versions
//! it knew). While Redis was unreachable, so was the backplane for the peers'
//! invalidations, and this instance's own writes did not reach Redis: what
//! L1 holds may be stale against the fleet. The alternative, verifying each
//! L1 entry's version against Redis on its first hit after the outage, would
//! cost the same Redis round trip per key as the refill, put a generation
//! check on every hit (P1 is about that path), and still miss the tags. A
//! cleared L1 refills from Redis, not from the database: Redis kept its
//! entries.
//!
//! Every transition is counted in [`StatsSnapshot`](crate::StatsSnapshot)
//! (`breaker_opened`, `breaker_probes`, `breaker_closed`, and the gauge
//! `breaker_state`). Opening and closing are logged once each per outage;
//! the probes in between (one per cool-down) only at debug level.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::entry::now_ms;
use crate::error::{Error, ErrorKind};
use crate::events::{Event, Gauge};
use crate::stats::Stats;

/// A failure rate is judged only over windows with at least this many calls:
/// two failures out of three calls is noise, not an outage.
pub(crate) const MIN_CALLS_FOR_RATE: u32 = 20;

/// The longest cool-down or window accepted (timers past it overflow, and
/// more is a mistake).
const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// When the circuit breaker opens and how long it stays open; set through
/// [`TieredCacheBuilder::breaker`](crate::TieredCacheBuilder::breaker).
///
/// ```
/// use std::time::Duration;
/// use tiered_cache::BreakerSettings;
/// let settings = BreakerSettings::default()
///     .failures(3)
///     .failure_rate(0.25, Duration::from_secs(5))
///     .cool_down(Duration::from_millis(500));
/// # let _ = settings;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    failures: u32,
    rate: f64,
    window: Duration,
    cool_down: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            rate: 0.5,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(1),
        }
    }
}

impl BreakerSettings {
    /// Opens after this many failed Redis calls in a row (timeouts
    /// included). At least 1. Default: 5.
    #[must_use]
    pub fn failures(mut self, in_a_row: u32) -> Self {
        self.failures = in_a_row;
        self
    }

    /// Opens when more than `rate` (0 < rate <= 1) of the Redis calls in
    /// one `window` failed, once the window saw at least 20 calls. Default: 0.5 over 10 seconds.
    #[must_use]
    pub fn failure_rate(mut self, rate: f64, window: Duration) -> Self {
        self.rate = rate;
        self.window = window;
        self
    }

    /// How long the breaker stays open before one probe goes to Redis.
    /// More than zero and at most an hour. Default: 1 second.
    #[must_use]
    pub fn cool_down(mut self, cool_down: Duration) -> Self {
        self.cool_down = cool_down;
        self
    }

    /// A `Config` error for nonsense values.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::new(ErrorKind::Config, what));
        if self.failures == 0 {
            return bad("breaker failures must be at least 1 (failed Redis calls in a row before the breaker opens)".to_owned());
        }
        if !(self.rate > 0.0 && self.rate <= 1.0) {
            return bad(format!(
                "the breaker's failure rate must be more than 0 and at most 1 (got {})",
                self.rate
            ));
        }
        for (name, period) in [("window", self.window), ("cool-down", self.cool_down)] {
            if period.is_zero() || period > MAX_PERIOD {
                return bad(format!(
                    "the breaker's {name} must be more than zero and at most {MAX_PERIOD:?} (got {period:?})"
                ));
            }
        }
        Ok(())
    }
}

/// The breaker's state, as the `breaker_state` gauge shows it.
const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// What a Redis call's outcome means to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Redis answered (an error reply about the command included).
    Answered,
    /// The connection failed or Redis did not answer in time.
    Failed,
}

/// The breaker of one cache's Redis tier.
pub(crate) struct Breaker {
    settings: BreakerSettings,
    stats: Arc<Stats>,
    state: AtomicU8,
    in_a_row: AtomicU32,
    /// The current window: its start (Unix ms), calls and failures.
    window_start_ms: AtomicU64,
    window_calls: AtomicU32,
    window_failures: AtomicU32,
    /// When the breaker last opened (Unix ms).
    opened_ms: AtomicU64,
    /// Run when the breaker closes after an outage (clears L1).
    on_close: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("settings", &self.settings)
            .field("state", &self.state.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// Leave to send one call to Redis; from [`Breaker::admit`]. Dropped
/// without a verdict (the caller was cancelled), a probe lets the next
/// call probe instead, so the breaker never stays half-open.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    judged: bool,
}

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings, stats: Arc<Stats>) -> Self {
        Breaker {
            settings,
            stats,
            state: AtomicU8::new(CLOSED),
            in_a_row: AtomicU32::new(0),
            window_start_ms: AtomicU64::new(now_ms()),
            window_calls: AtomicU32::new(0),
            window_failures: AtomicU32::new(0),
            opened_ms: AtomicU64::new(0),
            on_close: OnceLock::new(),
        }
    }

    /// Sets what runs when the breaker closes after an outage (once).
    pub(crate) fn on_close(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_close.set(hook);
    }

    /// Whether a call may go to Redis now. `None`: the breaker is open (or
    /// a probe is out); the call must skip Redis.
    #[inline]
    pub(crate) fn admit(&self) -> Option<Permit<'_>> {
        let state = self.state.load(Relaxed);
        if state == CLOSED {
            return Some(self.permit(false));
        }
        if state == OPEN {
            let reopen_at = self
                .opened_ms
                .load(Relaxed)
                .saturating_add(self.settings.cool_down.as_millis() as u64);
            if now_ms() >= reopen_at
                && self
                    .state
                    .compare_exchange(OPEN, HALF_OPEN, Relaxed, Relaxed)
                    .is_ok()
            {
                self.stats.record(Event::BreakerProbe);
                self.stats.set(Gauge::BreakerState, u64::from(HALF_OPEN));
                // Once per cool-down: debug, not a line per second of an outage.
                tracing::debug!(
                    "the Redis circuit breaker lets one probe through after its cool-down"
                );
                return Some(self.permit(true));
            }
        }
        None
    }

    fn permit(&self, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            probe,
            judged: false,
        }
    }

    fn answered(&self, probe: bool) {
        self.in_a_row.store(0, Relaxed);
        self.count_in_window(false);
        if probe
            && self
                .state
                .compare_exchange(HALF_OPEN, CLOSED, Relaxed, Relaxed)
                .is_ok()
        {
            self.reset_window();
            self.stats.record(Event::BreakerClosed);
            self.stats.set(Gauge::BreakerState, u64::from(CLOSED));
            tracing::info!("the Redis circuit breaker closed after a successful probe; L1 was cleared, as invalidations may have been missed");
            if let Some(hook) = self.on_close.get() {
                hook();
            }
        }
    }

    fn failed(&self, probe: bool) {
        let in_a_row = self.in_a_row.fetch_add(1, Relaxed).saturating_add(1);
        let rate_exceeded = self.count_in_window(true);
        if probe {
            // Still down: another cool-down.
            self.opened_ms.store(now_ms(), Relaxed);
            if self
                .state
                .compare_exchange(HALF_OPEN, OPEN, Relaxed, Relaxed)
                .is_ok()
            {
                self.stats.set(Gauge::BreakerState, u64::from(OPEN));
                tracing::debug!("the Redis circuit breaker's probe failed; it stays open");
            }
            return;
        }
        if in_a_row >= self.settings.failures || rate_exceeded {
            self.open();
        }
    }

    fn open(&self) {
        self.opened_ms.store(now_ms(), Relaxed);
        if self
            .state
            .compare_exchange(CLOSED, OPEN, Relaxed, Relaxed)
            .is_ok()
        {
            self.stats.record(Event::BreakerOpened);
            self.stats.set(Gauge::BreakerState, u64::from(OPEN));
            tracing::warn!(
                cool_down = ?self.settings.cool_down,
                "the Redis circuit breaker opened: calls skip Redis and are served by L1 and the loader until a probe succeeds (see stats.breaker_state)"
            );
        }
    }

    /// Counts a call in the current window (starting a new one when it is
    /// over); whether the window's failure rate now exceeds the limit.
    fn count_in_window(&self, failed: bool) -> bool {
        let now = now_ms();
        let start = self.window_start_ms.load(Relaxed);
        if now.saturating_sub(start) >= self.settings.window.as_millis() as u64
            && self
                .window_start_ms
                .compare_exchange(start, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.window_calls.store(0, Relaxed);
            self.window_failures.store(0, Relaxed);
        }
        let calls = self.window_calls.fetch_add(1, Relaxed).saturating_add(1);
        let failures = if failed {
            self.window_failures.fetch_add(1, Relaxed).saturating_add(1)
        } else {
            self.window_failures.load(Relaxed)
        };
        failed
            && calls >= MIN_CALLS_FOR_RATE
            && f64::from(failures) > self.settings.rate * f64::from(calls)
    }

    fn reset_window(&self) {
        self.window_start_ms.store(now_ms(), Relaxed);
        self.window_calls.store(0, Relaxed);
        self.window_failures.store(0, Relaxed);
    }

    /// Whether the breaker is open now (half-open included).
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.state.load(Relaxed) != CLOSED
    }
}

impl Permit<'_> {
    /// The call's outcome.
    pub(crate) fn judge(mut self, verdict: Verdict) {
        self.judged = true;
        match verdict {
            Verdict::Answered => self.breaker.answered(self.probe),
            Verdict::Failed => self.breaker.failed(self.probe),
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.judged {
            // The probe was abandoned: the next call probes.
            let _ = self
                .breaker
                .state
                .compare_exchange(HALF_OPEN, OPEN, Relaxed, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(settings: BreakerSettings) -> Breaker {
        Breaker::new(settings, Arc::new(Stats::default()))
    }

    fn fail(b: &Breaker, n: usize) {
        for _ in 0..n {
            if let Some(p) = b.admit() {
                p.judge(Verdict::Failed);
            }
        }
    }

    #[test]
    fn opens_after_failures_in_a_row_and_answers_reset_the_count() {
        let b = breaker(BreakerSettings::default().failures(3));
        fail(&b, 2);
        b.admit().unwrap().judge(Verdict::Answered);
        fail(&b, 2);
        assert!(!b.is_open(), "an answer in between resets the run");
        fail(&b, 1);
        assert!(b.is_open());
        assert!(b.admit().is_none(), "open: calls skip Redis");
        assert_eq!(b.stats.snapshot().breaker_opened, 1);
        assert_eq!(b.stats.snapshot().breaker_state, 1);
    }

    #[test]
    fn opens_on_a_failure_rate() {
        let b = breaker(
            BreakerSettings::default()
                .failures(1000)
                .failure_rate(0.5, Duration::from_secs(60)),
        );
        let mut calls = 0;
        while let Some(p) = b.admit() {
            p.judge(if calls % 3 == 0 {
                Verdict::Answered
            } else {
                Verdict::Failed
            });
            calls += 1;
            assert!(calls < 1000, "2 of 3 calls failed, yet it stays closed");
        }
        assert_eq!(
            calls, MIN_CALLS_FOR_RATE,
            "judged once the window has enough calls"
        );
    }

    #[test]
    fn one_probe_after_the_cool_down_closes_it_and_clears() {
        let b = breaker(
            BreakerSettings::default()
                .failures(1)
                .cool_down(Duration::from_millis(20)),
        );
        let cleared = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&cleared);
        b.on_close(Box::new(move || {
            seen.fetch_add(1, Relaxed);
        }));
        fail(&b, 1);
        assert!(b.admit().is_none());
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.admit().expect("one probe");
        assert!(b.admit().is_none(), "exactly one probe");
        probe.judge(Verdict::Failed);
        assert!(b.admit().is_none(), "a failed probe reopens it");
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.admit().expect("another probe");
        drop(probe); // abandoned
        let probe = b
            .admit()
            .expect("an abandoned probe lets the next one probe");
        probe.judge(Verdict::Answered);
        assert!(!b.is_open());
        assert_eq!(cleared.load(Relaxed), 1);
        let s = b.stats.snapshot();
        assert_eq!(
            (
                s.breaker_opened,
                s.breaker_probes,
                s.breaker_closed,
                s.breaker_state
            ),
            (1, 3, 1, 0)
        );
    }

    #[test]
    fn nonsense_settings_are_config_errors() {
        assert!(BreakerSettings::default().validate().is_ok());
        for bad in [
            BreakerSettings::default().failures(0),
            BreakerSettings::default().failure_rate(0.0, Duration::from_secs(1)),
            BreakerSettings::default().failure_rate(f64::NAN, Duration::from_secs(1)),
            BreakerSettings::default().failure_rate(1.5, Duration::from_secs(1)),
            BreakerSettings::default().failure_rate(0.5, Duration::ZERO),
            BreakerSettings::default().cool_down(Duration::ZERO),
            BreakerSettings::default().cool_down(Duration::MAX),
        ] {
            let e = bad.validate().expect_err("nonsense");
            assert_eq!(e.kind(), ErrorKind::Config);
        }
    }
}
