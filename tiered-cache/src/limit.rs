//! The cap on a cache's concurrent loader calls
//! ([`max_concurrent_loads`](crate::TieredCacheBuilder::max_concurrent_loads)).
//!
//! Single-flight makes one load per key; this bounds the loads of many keys
//! at once. It matters most while Redis is down and L1 is cold: every miss
//! then goes to the database, and without a cap the database sees as many
//! queries as there are callers. Callers beyond the cap wait in line, in
//! the order they came (tokio's semaphore is fair), for at most the load's
//! hard timeout (else the cache's background timeout): never unbounded.

use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, ErrorKind};

/// The most loads allowed at once: tokio's semaphore holds no more.
pub(crate) const MAX_LOADS: usize = Semaphore::MAX_PERMITS;

/// The load slots of one cache.
#[derive(Debug)]
pub(crate) struct LoadLimit {
    slots: Semaphore,
    max: usize,
}

impl LoadLimit {
    /// `max` slots; from the builder, which checked `1..=MAX_LOADS`.
    pub(crate) fn new(max: usize) -> Self {
        let max = max.clamp(1, MAX_LOADS);
        LoadLimit {
            slots: Semaphore::new(max),
            max,
        }
    }

    /// A slot, waiting in line at most `bound`. Returns also whether the
    /// caller had to wait.
    pub(crate) async fn slot(&self, bound: Duration) -> Result<(SemaphorePermit<'_>, bool), Error> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok((permit, false));
        }
        match tokio::time::timeout(bound, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok((permit, true)),
            // The semaphore is never closed; treat it as the wait ending.
            Ok(Err(_)) | Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{} loads of other keys were running and none finished within {bound:?}; raise max_concurrent_loads, or look at why the loader is slow",
                    self.max
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn callers_beyond_the_cap_wait_and_the_wait_is_bounded() {
        let limit = LoadLimit::new(1);
        let (first, waited) = limit.slot(Duration::from_secs(1)).await.unwrap();
        assert!(!waited);
        let late = limit.slot(Duration::from_millis(20)).await;
        assert_eq!(late.err().map(|e| e.kind()), Some(ErrorKind::Timeout));
        drop(first);
        let (_, waited) = limit.slot(Duration::from_millis(20)).await.unwrap();
        assert!(!waited);
        assert_eq!(LoadLimit::new(0).max, 1, "never zero slots");
    }
}
