//! Single-flight: concurrent callers of one missing key share one load.
//!
//! Each cache instance owns its own table, keyed by the full typed key (the
//! key string plus the value and error types), so unrelated caches or types
//! never coalesce. The leader holds a [`Leader`] guard; waiters watch its
//! channel. If the leader is dropped without finishing (it panicked, or its
//! caller was cancelled), the guard removes the flight and the channel closes:
//! every waiter wakes, and the first to come back takes over the load while
//! the rest join it, so exactly one load runs again.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::fleet::FleetLock;
use tokio::sync::watch;

type Shared = Arc<dyn Any + Send + Sync>;
type FlightKey = (TypeId, Arc<str>);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The in-flight loads of one cache.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<FlightKey, Slot>>,
}

#[derive(Debug, Clone)]
struct Slot {
    id: u64,
    rx: watch::Receiver<Option<Shared>>,
}

/// The outcome of joining a flight.
#[derive(Debug)]
pub(crate) enum Join {
    /// Nobody was loading: the caller loads and must `finish`.
    Leader(Leader),
    /// Someone is loading: wait for their result.
    Waiter(Waiter),
}

/// Held by the one caller that runs the load.
#[derive(Debug)]
pub(crate) struct Leader {
    flights: Arc<Flights>,
    key: FlightKey,
    id: u64,
    tx: watch::Sender<Option<Shared>>,
    /// What lives exactly as long as the load, its store included (a fleet
    /// lock): dropped with the leader, after the flight is removed.
    held: Option<Box<FleetLock>>,
}

/// Held by a caller waiting on someone else's load.
#[derive(Debug)]
pub(crate) struct Waiter {
    rx: watch::Receiver<Option<Shared>>,
}

impl Flights {
    /// Joins the flight for `key` of type `T` (the typed result), or leads one.
    pub(crate) fn join<T: 'static>(self: &Arc<Self>, key: &str) -> Join {
        let key: FlightKey = (TypeId::of::<T>(), Arc::from(key));
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get(&key) {
            return Join::Waiter(Waiter {
                rx: slot.rx.clone(),
            });
        }
        let (tx, rx) = watch::channel(None);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        map.insert(key.clone(), Slot { id, rx });
        Join::Leader(Leader {
            flights: Arc::clone(self),
            key,
            id,
            tx,
            held: None,
        })
    }

    /// Leads a flight for `key` only if none is running (background refresh).
    pub(crate) fn try_lead<T: 'static>(self: &Arc<Self>, key: &str) -> Option<Leader> {
        match self.join::<T>(key) {
            Join::Leader(leader) => Some(leader),
            Join::Waiter(_) => None,
        }
    }

    /// Forgets every flight of `key` (whatever its types): callers from now
    /// on lead a new one; the old leaders' waiters still get their result.
    pub(crate) fn release(&self, key: &str) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if !map.is_empty() {
            map.retain(|(_, k), _| &**k != key);
        }
    }

    fn remove_if_ours(&self, key: &FlightKey, id: u64) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(key).is_some_and(|slot| slot.id == id) {
            map.remove(key);
        }
    }
}

impl Leader {
    /// Keeps `guard` until the load ends (the leader is dropped or finishes).
    pub(crate) fn hold(&mut self, guard: Box<FleetLock>) {
        self.held = Some(guard);
    }

    /// The load's store released the fleet lock it holds (if any) itself,
    /// and `announced` the key too.
    pub(crate) fn lock_released(&mut self, announced: bool) {
        if let Some(lock) = &mut self.held {
            lock.released_by_store(announced);
        }
    }

    /// A waiter on this leader's own flight (for a caller that hands the
    /// load to a background task and waits with a timeout).
    pub(crate) fn subscribe(&self) -> Waiter {
        Waiter {
            rx: self.tx.subscribe(),
        }
    }

    /// Publishes the result to every waiter, and to callers who join from
    /// now on, while the flight stays open (its result is being stored):
    /// dropping the leader then ends it.
    pub(crate) fn publish<T: Send + Sync + 'static>(&self, result: T) {
        self.tx.send_replace(Some(Arc::new(result)));
    }

    /// Publishes the result to every waiter and ends the flight.
    pub(crate) fn finish<T: Send + Sync + 'static>(mut self, result: T) {
        self.flights.remove_if_ours(&self.key, self.id);
        self.tx.send_replace(Some(Arc::new(result)));
        // The result is out: what the load held (a fleet lock) goes now.
        drop(self.held.take());
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // After `finish` this is a no-op; otherwise the load was abandoned and
        // dropping `tx` wakes the waiters so one of them takes over.
        self.flights.remove_if_ours(&self.key, self.id);
    }
}

impl Waiter {
    /// The leader's result, or `None` if the leader gave up without one.
    pub(crate) async fn wait<T: Clone + 'static>(mut self) -> Option<T> {
        let done = self.rx.wait_for(Option::is_some).await.ok()?;
        done.as_ref()?.downcast_ref::<T>().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_get_the_leaders_result() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(leader) = flights.join::<u32>("k") else {
            panic!("first caller leads")
        };
        let Join::Waiter(waiter) = flights.join::<u32>("k") else {
            panic!("second caller waits")
        };
        leader.finish(7u32);
        assert_eq!(waiter.wait::<u32>().await, Some(7));
        assert!(
            matches!(flights.join::<u32>("k"), Join::Leader(_)),
            "flight ended"
        );
    }

    #[tokio::test]
    async fn a_released_key_gets_a_new_leader_and_the_old_waiters_their_result() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(old) = flights.join::<u32>("k") else {
            panic!()
        };
        let Join::Waiter(waiter) = flights.join::<u32>("k") else {
            panic!()
        };
        flights.release("k");
        let Join::Leader(new) = flights.join::<u32>("k") else {
            panic!("a released key is led anew")
        };
        old.finish(1u32);
        assert_eq!(waiter.wait::<u32>().await, Some(1));
        assert!(
            matches!(flights.join::<u32>("k"), Join::Waiter(_)),
            "the new flight stays"
        );
        new.finish(2u32);
    }

    #[tokio::test]
    async fn types_do_not_coalesce() {
        let flights = Arc::new(Flights::default());
        let _a = flights.join::<u32>("k");
        assert!(matches!(flights.join::<u64>("k"), Join::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_waiters_and_the_key() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(leader) = flights.join::<u32>("k") else {
            panic!()
        };
        let Join::Waiter(waiter) = flights.join::<u32>("k") else {
            panic!()
        };
        drop(leader);
        assert_eq!(waiter.wait::<u32>().await, None);
        assert!(matches!(flights.join::<u32>("k"), Join::Leader(_)));
    }
}
