//! When to refresh an entry before it is needed: XFetch early refresh.
//!
//! XFetch (Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache
//! Stampede Prevention", VLDB 2015) refreshes a hit with probability given by
//! `now - delta * beta * ln(rand) >= expiry`, where `delta` is how long the
//! last load took. Refreshes start earlier for slow loads and as expiry
//! nears, so a hot key is reloaded by one background task before it expires
//! and no caller waits. This module only decides; the read path acts.

use std::time::{Duration, Instant};

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
    if beta <= 0.0 || delta.is_zero() {
        return false;
    }
    let remaining = fresh_until.saturating_duration_since(now).as_secs_f64();
    let scale = delta.as_secs_f64() * beta;
    if remaining > scale * CUTOFF {
        return false;
    }
    let draw: f64 = rand::random::<f64>();
    // ln(0) is -inf: a certain refresh, which is XFetch's limit anyway.
    scale * -draw.ln() >= remaining
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
