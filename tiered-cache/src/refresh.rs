//! When to refresh an entry before it is needed: XFetch early refresh.
//!
//! XFetch (Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache
//! Stampede Prevention", VLDB 2015) refreshes a hit with probability given by
//! `now - delta * beta * ln(rand) >= expiry`, where `delta` is how long the
//! last load took. Refreshes start earlier for slow loads and as expiry
//! nears, so a hot key is reloaded by one background task before it expires
//! and no caller waits.
//!
//! The rest of this module runs loads as a flight's leader: in the caller's
//! task, or in the background while callers are served the cached or stale
//! value (stale-while-revalidate), with the soft and hard timeouts and the
//! fail-safe (a failed load keeps serving the stale value, throttled).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::{Outcome, TieredCache};
use crate::codec::Codec;
use crate::error::{Error, ErrorKind, LoadError};
use crate::events::Event;
use crate::flight::{Leader, Waiter};
use crate::l1::{later, AnyValue, L1Entry};
use crate::loader::Load;
use crate::options::{EntryOptions, Resolved};
use crate::serve::Served;
use crate::tiers::{prepare, typed, Claim, Committed, Origin, Prepared};

/// `-ln(rand)` exceeds this with probability e^-12 (about 6 in a million), so
/// entries further than `delta * beta * CUTOFF` from expiry skip the random
/// draw: the hit path then costs one comparison.
const CUTOFF: f64 = 12.0;

/// Whether a hit at `now` on an entry fresh until `fresh_until`, whose last
/// load took `delta`, should start a background refresh.
#[inline]
pub(crate) fn early_refresh_due(
    now: Instant,
    fresh_until: Instant,
    delta: Duration,
    beta: f64,
) -> bool {
    let Some((remaining, scale)) = refresh_window(now, fresh_until, delta, beta) else {
        return false;
    };
    let draw: f64 = rand::random::<f64>();
    // ln(0) is -inf: a certain refresh, which is XFetch's limit anyway.
    scale * -draw.ln() >= remaining
}

/// Whether a hit at `now` is near enough to the expiry for XFetch's draw
/// (within `delta * beta * CUTOFF`): further away, no refresh can be due
/// and none is drawn for.
#[inline]
pub(crate) fn near_expiry(now: Instant, fresh_until: Instant, delta: Duration, beta: f64) -> bool {
    refresh_window(now, fresh_until, delta, beta).is_some()
}

/// How long before its expiry a hit on an entry whose last load took
/// `load_micros` may draw with `beta` <= 1 (`delta * CUTOFF`), in µs; a
/// hit further away is fresh without a draw. `u32::MAX` when it does not
/// fit (a load of over six minutes): such hits take the whole check.
pub(crate) fn calm_micros(load_micros: u32) -> u32 {
    const WHOLE: u32 = CUTOFF as u32;
    load_micros.saturating_mul(WHOLE)
}

/// The seconds left and XFetch's scale, when the draw is to be made.
#[inline]
fn refresh_window(
    now: Instant,
    fresh_until: Instant,
    delta: Duration,
    beta: f64,
) -> Option<(f64, f64)> {
    if beta <= 0.0 || delta.is_zero() {
        return None;
    }
    let remaining = fresh_until.saturating_duration_since(now).as_secs_f64();
    let scale = delta.as_secs_f64() * beta;
    (remaining <= scale * CUTOFF).then_some((remaining, scale))
}

impl TieredCache {
    /// Runs the loader as the flight's leader: in the caller's task, or,
    /// with a stale fallback, in the background while the caller takes the
    /// stale value at the soft timeout (stale-while-revalidate, fail-safe).
    pub(crate) async fn lead_load<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: L,
        leader: Leader,
        fallback: Option<Arc<L1Entry>>,
        claim: Claim,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        self.inner.tiers.stats.record_at(Event::Miss, key);
        let opts = options.resolve(&self.inner.defaults);
        let Some(stale) = fallback else {
            return self
                .run_load::<V, C, E, _>(key, opts, loader, leader, None, claim)
                .await;
        };
        self.inner.tiers.stats.record(Event::StaleRefresh);
        let loader = match loader.detach() {
            Ok(detached) => detached,
            Err(scoped) => {
                // A borrowed loader refreshes in this caller's task; a
                // failure still serves the stale value (fail-safe).
                return match self
                    .run_load::<V, C, E, _>(
                        key,
                        opts,
                        scoped,
                        leader,
                        Some(Arc::clone(&stale)),
                        claim,
                    )
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
        let opts = self.in_background(opts);
        tokio::spawn(async move {
            let _ = this
                .run_load::<V, C, E, _>(&key, opts, loader, leader, Some(bg_stale), claim)
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

    /// Starts an XFetch refresh of a fresh entry. An owned loader runs in a
    /// background task and the caller keeps the cached value (`None`); a
    /// borrowed loader cannot, so the caller is told to refresh in its own
    /// task (`Some(Served::Refresh)`) while every other caller keeps hitting.
    pub(crate) fn early_refresh<V, C, E, L>(
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
                self.inner.tiers.stats.record(Event::EarlyRefresh);
                let this = self.clone();
                let (key, opts, stale) = (
                    key.to_owned(),
                    self.in_background(options.resolve(&self.inner.defaults)),
                    Arc::clone(entry),
                );
                tokio::spawn(async move {
                    match this.fresher_in_l2::<V, C>(&key, &stale).await {
                        Ok(value) => leader.finish::<Outcome<V, E>>(Ok(Some(value))),
                        Err(claim) => {
                            let _ = this
                                .run_load::<V, C, E, _>(
                                    &key,
                                    opts,
                                    detached,
                                    leader,
                                    Some(stale),
                                    claim,
                                )
                                .await;
                        }
                    }
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
    pub(crate) async fn refresh_in_place<V, C, E, L>(
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
        self.inner.tiers.stats.record(Event::EarlyRefresh);
        let claim = match self.fresher_in_l2::<V, C>(key, &entry).await {
            Ok(value) => {
                leader.finish::<Outcome<V, E>>(Ok(Some(Arc::clone(&value))));
                return Ok(Some(value));
            }
            Err(claim) => claim,
        };
        let opts = options.resolve(&self.inner.defaults);
        match self
            .run_load::<V, C, E, L>(key, opts, loader, leader, Some(entry), claim)
            .await
        {
            Ok(Some(value)) => Ok(Some(value)),
            _ => Ok(hit),
        }
    }

    /// The options of a load that runs in a background task: with the
    /// cache's `background_timeout` as its hard timeout when the entry sets
    /// none, so a loader that never returns cannot hold its key for ever.
    fn in_background(&self, mut opts: Resolved) -> Resolved {
        opts.hard_timeout = opts.hard_timeout.or(Some(self.inner.background_timeout));
        opts
    }

    /// Stores a load's result, waiting at most what is left of the call's
    /// L2 budget (`l2_timeout`, less what reading Redis took before the
    /// load): a slow Redis write goes on in the background, so no caller
    /// waits on Redis longer than one `l2_timeout`. The flight stays open,
    /// its result published, until the store is done: callers in between
    /// get the result instead of loading again.
    async fn store_within_budget(
        &self,
        key: &str,
        prepared: Prepared,
        mut leader: Leader,
        claim: Claim,
    ) {
        let Some(l2) = &self.inner.tiers.l2 else {
            // L1 only: nothing slow to wait for, no task to spawn.
            self.inner.tiers.commit(key, prepared, None).await;
            drop(leader);
            return;
        };
        let budget = claim.budget_left(l2.timeout());
        // A fleet-locked load's store is announced, to wake the instances
        // that wait on its lock: by the store script where it can.
        let announcement = if claim.holds_lock() {
            self.announcement(key)
        } else {
            None
        };
        let this = self.clone();
        let key = key.to_owned();
        let store = tokio::spawn(async move {
            let committed = this
                .inner
                .tiers
                .commit(&key, prepared, announcement.as_ref())
                .await;
            if let Committed::Stored { announced, .. } = committed {
                // The store script released a fleet lock held with the claim.
                leader.lock_released(announced);
            }
            drop(leader);
        });
        // Less than a tick left: the store goes on without this caller.
        if let Some(wait) = crate::l2::budget::timer_if_a_tick_is_left(budget) {
            let _ = tokio::time::timeout(wait, store).await;
        }
    }

    /// Before an early refresh calls its loader: another instance may have
    /// refreshed the entry already (N replicas would otherwise load a hot
    /// key N times per TTL). A fresher entry in Redis is promoted and its
    /// value returned; otherwise the load's claim.
    async fn fresher_in_l2<V, C>(&self, key: &str, cached: &L1Entry) -> Result<Arc<V>, Claim>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let tiers = &self.inner.tiers;
        let (found, claim) = tiers.within_budget(tiers.read_claimed::<V, C>(key)).await;
        match found {
            Some(entry)
                if entry.is_fresh(Instant::now())
                    && entry.meta.expires_ms > cached.meta.expires_ms =>
            {
                match typed::<V>(&entry) {
                    Some(Some(value)) => Ok(value),
                    _ => Err(claim),
                }
            }
            _ => Err(claim),
        }
    }

    /// Waits on another caller's load. A caller that joined with no stale
    /// value still gets one when the load fails and the leader had found
    /// one meanwhile (in Redis, after this caller looked in L1): fail-safe
    /// reaches every waiter, not only the callers that came later.
    pub(crate) async fn wait_for_load<V, E>(
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
            Some(Err(error)) if fallback.is_none() => match self.inner.tiers.l1_get(key).await {
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
    pub(crate) async fn await_with_fallback<V, E>(
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
            // Bounded: a leader that hangs (a half-open database socket)
            // must not hold its waiters for ever.
            let bound = options
                .resolve(&self.inner.defaults)
                .hard_timeout
                .unwrap_or(self.inner.background_timeout);
            return match tokio::time::timeout(bound, wait).await {
                Ok(outcome) => outcome,
                Err(_) => Some(Err(LoadError::Cache(Error::new(
                    ErrorKind::Timeout,
                    format!("another caller's load of this key did not finish within {bound:?}; set a hard_timeout on the entry or a shorter background_timeout"),
                )))),
            };
        };
        let soft = options.soft_timeout_or_default(&self.inner.defaults);
        match tokio::time::timeout(soft, wait).await {
            Ok(Some(Ok(value))) => Some(Ok(value)),
            Ok(Some(Err(_)) | None) => Some(self.stale_outcome::<V, E>(stale)),
            Err(_) => {
                if leads && !soft.is_zero() {
                    self.inner.tiers.stats.record(Event::LoaderTimeout);
                }
                Some(self.stale_outcome::<V, E>(stale))
            }
        }
    }

    pub(crate) fn stale_outcome<V: Send + Sync + 'static, E>(
        &self,
        stale: &Arc<L1Entry>,
    ) -> Outcome<V, E> {
        self.inner.tiers.stats.record(Event::StaleServed);
        Ok(typed::<V>(stale).flatten())
    }

    /// Calls the loader: in one of the cache's load slots when it caps
    /// concurrent loads (waiting in line within the hard timeout, else the
    /// background timeout), and within the hard timeout, which the wait
    /// counts towards. Returns how long the loader itself took (XFetch's
    /// delta, without the wait).
    async fn call_loader<V, E, L>(
        &self,
        loader: L,
        hard_timeout: Option<Duration>,
    ) -> (Result<Result<Option<Arc<V>>, E>, Error>, Duration)
    where
        L: Load<V, E>,
    {
        let arrived = Instant::now();
        let _slot = match &self.inner.load_limit {
            Some(limit) => {
                let bound = hard_timeout.unwrap_or(self.inner.background_timeout);
                match limit.slot(bound).await {
                    Ok((slot, waited)) => {
                        if waited {
                            self.inner.tiers.stats.record(Event::LoadQueued);
                        }
                        Some(slot)
                    }
                    Err(error) => return (Err(error), Duration::ZERO),
                }
            }
            None => None,
        };
        let started = Instant::now();
        let loaded = match hard_timeout {
            Some(limit) => {
                let deadline = later(arrived, limit);
                tokio::time::timeout_at(deadline.into(), loader.load())
                    .await
                    .map_err(|_| {
                        Error::new(
                            ErrorKind::Timeout,
                            format!("the loader did not finish within its hard timeout of {limit:?}; it was abandoned"),
                        )
                    })
            }
            None => Ok(loader.load().await),
        };
        (loaded, started.elapsed())
    }

    /// Runs the loader as the flight's leader, stores the result, and
    /// publishes it to the waiters. With `stale`, a failure keeps serving the
    /// stale value (fail-safe) and delays the next attempt.
    pub(crate) async fn run_load<V, C, E, L>(
        &self,
        key: &str,
        opts: Resolved,
        loader: L,
        leader: Leader,
        stale: Option<Arc<L1Entry>>,
        claim: Claim,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        // Stamp tags before loading: an invalidation racing the load then
        // makes the stored entry stale instead of being lost. The stamps
        // come out of what the claim's read left of the call's L2 budget.
        let tiers = &self.inner.tiers;
        let stamps = tiers.tags.stamps(&opts.tags, tiers.l2.as_ref());
        let stamps = match &tiers.l2 {
            Some(l2) => crate::l2::budget::within(claim.budget_left(l2.timeout()), stamps).await,
            None => stamps.await,
        };
        self.inner.tiers.stats.record_at(Event::Load, key);
        let (loaded, took) = self.call_loader(loader, opts.hard_timeout).await;
        self.inner.tiers.stats.export.load_time(took);
        let origin = Origin::Load(claim);
        let mut prepared = None;
        let outcome: Outcome<V, E> = match loaded {
            Ok(Ok(Some(value))) => {
                let erased: AnyValue = value.clone();
                let ttl = opts.ttl;
                prepared = prepare::<V, C>(
                    Some(&*value),
                    Some(&erased),
                    &opts,
                    stamps,
                    took,
                    ttl,
                    origin,
                )
                .ok();
                Ok(Some(value))
            }
            Ok(Ok(None)) => {
                if let Some(ttl) = opts.negative_ttl {
                    prepared = prepare::<V, C>(None, None, &opts, stamps, took, ttl, origin).ok();
                }
                Ok(None)
            }
            Ok(Err(e)) => {
                self.inner.tiers.stats.record_at(Event::LoadError, key);
                Err(LoadError::Loader(Arc::new(e)))
            }
            Err(error) => {
                self.inner.tiers.stats.record(Event::LoaderTimeout);
                Err(LoadError::Cache(error))
            }
        };
        if let Some(prepared) = prepared {
            leader.publish::<Outcome<V, E>>(outcome.clone());
            self.store_within_budget(key, prepared, leader, claim).await;
            return outcome;
        }
        if let (Err(_), Some(stale)) = (&outcome, &stale) {
            self.inner
                .tiers
                .throttle_failsafe(key, stale, opts.failsafe_throttle, claim)
                .await;
        }
        leader.finish::<Outcome<V, E>>(outcome.clone());
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_zero_never_refreshes() {
        let now = Instant::now();
        let soon = now + Duration::from_millis(1);
        assert!(!(0..1000).any(|_| early_refresh_due(now, soon, Duration::from_secs(1), 0.0)));
    }

    #[test]
    fn far_from_expiry_never_refreshes() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3600);
        assert!(!(0..1000).any(|_| early_refresh_due(now, later, Duration::from_millis(10), 1.0)));
    }

    #[test]
    fn probability_grows_as_expiry_nears() {
        let now = Instant::now();
        let delta = Duration::from_millis(100);
        let rate = |remaining_ms| {
            let until = now + Duration::from_millis(remaining_ms);
            (0..10_000)
                .filter(|_| early_refresh_due(now, until, delta, 1.0))
                .count()
        };
        let (near, mid, far) = (rate(10), rate(100), rate(400));
        // P = exp(-remaining / delta): ~0.90, ~0.37, ~0.018.
        assert!(near > mid && mid > far, "{near} {mid} {far}");
        assert!((8_500..9_500).contains(&near), "{near}");
        assert!(expired_is_certain(now, delta));
    }

    fn expired_is_certain(now: Instant, delta: Duration) -> bool {
        (0..1000).all(|_| early_refresh_due(now, now, delta, 1.0))
    }
}
