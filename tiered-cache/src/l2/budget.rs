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
/// around it set one already.
pub(crate) async fn within<F: Future>(budget: Duration, call: F) -> F::Output {
    if DEADLINE.try_with(|_| ()).is_ok() {
        return call.await;
    }
    let now = Instant::now();
    let deadline = now
        .checked_add(budget)
        .unwrap_or(now + Duration::from_secs(3600));
    DEADLINE.scope(deadline, call).await
}

/// How long the next command may wait: `timeout`, or less when the call's
/// budget ends sooner (zero: nothing is left).
pub(crate) fn time_left(timeout: Duration) -> Duration {
    DEADLINE
        .try_with(|deadline| deadline.saturating_duration_since(Instant::now()))
        .map_or(timeout, |left| left.min(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

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
