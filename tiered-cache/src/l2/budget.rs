//! One L2 budget per public call: however many Redis commands a call sends
//! (a read and the tag versions it needs, a write and its tag stamps), it
//! waits on Redis at most one `l2_timeout` in all.
//!
//! The deadline is task-local, set where a public call first goes to
//! Redis ([`within`]), and every command takes what is left of it
//! ([`time_left`]). Nested calls keep the outer deadline.

use std::future::Future;
use std::time::{Duration, Instant};

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `call` with an L2 deadline `budget` from now, unless a caller
/// around it set one already (then the same outer deadline is scoped
/// again, so it stays).
///
/// A plain function returning tokio's scope future, not an `async fn`: an
/// `async fn` holding `call` across two await points laid it out three
/// times over (4.4 KB around a 1.4 KB Redis read), and every L2 read
/// paid for moving it.
pub(crate) fn within<F: Future>(
    budget: Duration,
    call: F,
) -> tokio::task::futures::TaskLocalFuture<Instant, F> {
    let deadline = DEADLINE.try_with(|outer| *outer).unwrap_or_else(|_| {
        let now = Instant::now();
        now.checked_add(budget)
            .unwrap_or(now + Duration::from_secs(3600))
    });
    DEADLINE.scope(deadline, call)
}

/// How long the next command may wait: `timeout`, or less when the call's
/// budget ends sooner (zero: nothing is left).
pub(crate) fn time_left(timeout: Duration) -> Duration {
    DEADLINE
        .try_with(|deadline| deadline.saturating_duration_since(Instant::now()))
        .map_or(timeout, |left| left.min(timeout))
}

/// How early a timer that must end by a budget is set. tokio's timer wheel
/// fires a timer at the first millisecond tick at or after its deadline,
/// so a timer of exactly what is left of a budget ends up to 1 ms past it
/// (on a busy runtime the 64 timers of a frozen Redis all fire that late).
const TIMER_TICK: Duration = Duration::from_millis(1);

/// What a timer leaves of a budget for the work that follows it, beyond
/// the tick: a hundredth of what is left, at most [`MAX_RESERVE`]. When
/// Redis hangs, every call in flight times out at once and then falls back
/// (breaker, loader, L1) one after another on a few workers, while the
/// host may not run the process for a moment; measured on two cores, 64
/// such calls ended up to 3 ms past a timer of the whole budget.
const RESERVE_SHARE: u32 = 100;
const MAX_RESERVE: Duration = Duration::from_millis(5);

/// The duration to give a timer for a wait of at most `left`, so that the
/// call ends by then: `left` less one tick and the [reserve](RESERVE_SHARE)
/// (less only a quarter of `left` when that is shorter, so that a short
/// wait is not cut to nothing).
pub(crate) fn timer(left: Duration) -> Duration {
    let reserve = TIMER_TICK + (left / RESERVE_SHARE).min(MAX_RESERVE);
    left.saturating_sub(reserve.min(left / 4))
}

/// [`timer`] for a wait that may as well not happen (what it waits for
/// goes on without the caller): `None` when less than a tick is left, as
/// such a timer could only fire at the next tick, past the budget.
pub(crate) fn timer_if_a_tick_is_left(left: Duration) -> Option<Duration> {
    (left >= TIMER_TICK).then(|| timer(left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_leaves_a_tick_and_a_reserve_and_never_cuts_a_wait_to_nothing() {
        assert_eq!(
            timer(Duration::from_millis(250)),
            Duration::from_micros(246_500)
        );
        assert_eq!(
            timer(Duration::from_secs(2)),
            Duration::from_millis(1_994),
            "the reserve is capped"
        );
        assert_eq!(
            timer(Duration::from_millis(2)),
            Duration::from_micros(1_500)
        );
        assert_eq!(
            timer(Duration::from_micros(400)),
            Duration::from_micros(300)
        );
        assert_eq!(timer(Duration::ZERO), Duration::ZERO);
        assert_eq!(timer_if_a_tick_is_left(Duration::from_micros(900)), None);
        assert_eq!(
            timer_if_a_tick_is_left(Duration::from_millis(4)),
            Some(Duration::from_millis(3))
        );
    }

    #[tokio::test]
    async fn commands_share_the_outer_budget() {
        assert_eq!(
            time_left(Duration::from_secs(5)),
            Duration::from_secs(5),
            "no budget set"
        );
        within(Duration::from_millis(100), async {
            assert!(time_left(Duration::from_secs(5)) <= Duration::from_millis(100));
            within(Duration::from_secs(60), async {
                assert!(
                    time_left(Duration::from_secs(5)) <= Duration::from_millis(100),
                    "the outer one stays"
                );
            })
            .await;
            tokio::time::sleep(Duration::from_millis(120)).await;
            assert_eq!(time_left(Duration::from_secs(5)), Duration::ZERO);
        })
        .await;
    }
}
