//! Fleet-wide single-flight: one load per key across every instance, for
//! entries with [`EntryOptions::fleet_lock`](crate::EntryOptions::fleet_lock).
//!
//! Local single-flight leaves one caller per instance; that caller, after
//! its Redis read missed, tries to take the key's lock in Redis (`l2/lock.rs`).
//! The winner loads and stores as usual, holding the lock (renewed every
//! third of its lease) until its value is in Redis. The store's script
//! releases it, leaving a `stored:<version>` marker for the rest of the
//! lease, so an instance whose read missed just before that store, and
//! whose lock attempt comes just after, reads the value instead of loading
//! it again; a load that stores nothing (it failed, lost its
//! compare-and-set, or its caller was cancelled) releases it when the lock
//! is dropped. Either way the key is then announced on the backplane, as
//! `set` does. The others wait:
//! woken by that announcement, or every third of the lease without one,
//! they read Redis again, serve the value once it is there, and take the
//! lock themselves once it is free (the holder gave up, or died and its
//! lease ran out). They load without the lock when Redis fails (the
//! breaker open included) and when their wait passes its bound: never a
//! deadlock, never an unbounded wait. Their Redis commands share one L2
//! budget, however long they wait.
//!
//! The lock is advisory, as any lock on a replicated Redis is (a failover
//! can lose it; see NOTES-wave2 §3): at worst two instances load, and the
//! entry's compare-and-set version keeps the store correct either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::backplane::Event;
use crate::cache::{Inner, TieredCache};
use crate::codec::Codec;
use crate::l1::{later, L1Entry};
use crate::l2::{budget, LockToken, LockTry, L2};
use crate::options::EntryOptions;
use crate::tiers::Claim;

/// The keys this instance waits on another instance's load of, and how to
/// wake the waiter: an announcement of the key on the backplane.
#[derive(Debug, Default)]
pub(crate) struct FleetWaits {
    map: Mutex<HashMap<String, Arc<Notify>>>,
}

impl FleetWaits {
    /// Wakes whoever waits on `key` (the key changed in Redis, or its lock
    /// was released).
    pub(crate) fn wake(&self, key: &str) {
        let waiting = self.lock().remove(key);
        if let Some(notify) = waiting {
            notify.notify_waiters();
        }
    }

    fn watch(&self, key: &str) -> Arc<Notify> {
        Arc::clone(self.lock().entry(key.to_owned()).or_default())
    }

    /// Forgets `notify` unless another waiter shares it.
    fn unwatch(&self, key: &str, notify: &Arc<Notify>) {
        let mut map = self.lock();
        if map
            .get(key)
            .is_some_and(|n| Arc::ptr_eq(n, notify) && Arc::strong_count(n) <= 2)
        {
            map.remove(key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A held fleet lock. Dropping it stops the renewals, releases the lock
/// (if it is still this holder's, and the load's store did not release
/// it already) and announces the key (unless the store did), in a task:
/// the drop may happen in a cancelled caller.
#[derive(Debug)]
pub(crate) struct FleetLock {
    l2: L2,
    key: String,
    token: LockToken,
    renewals: JoinHandle<()>,
    cache: Weak<Inner>,
    /// The load's store released it (`scripts/store.lua`).
    released: bool,
    /// The load's store announced the key on the backplane too.
    announced: bool,
}

impl FleetLock {
    /// The load's store released the lock (and, if `announced`, told the
    /// other instances): dropping it wakes the local waiters, and announces
    /// unless the store did.
    pub(crate) fn released_by_store(&mut self, announced: bool) {
        self.released = true;
        self.announced = announced;
    }
}

impl Drop for FleetLock {
    fn drop(&mut self) {
        self.renewals.abort();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left: the lease ends it
        };
        let (l2, key, token, released, announced) = (
            self.l2.clone(),
            std::mem::take(&mut self.key),
            self.token,
            self.released,
            self.announced,
        );
        let cache = std::mem::take(&mut self.cache);
        runtime.spawn(async move {
            if !released {
                let _ = l2.unlock(&key, token).await;
            }
            if let Some(inner) = cache.upgrade() {
                // Local waiters (callers who took over a cancelled load)
                // and other instances look again.
                inner.fleet_waits.wake(&key);
                if !announced {
                    TieredCache { inner }.announce(Event::Key(key));
                }
            }
        });
    }
}

/// What a loading caller does after the fleet lock was tried.
pub(crate) enum Turn {
    /// Load, with the lock if it was taken, and this claim.
    Load(Option<Box<FleetLock>>, Claim),
    /// Another instance loaded it: this entry, read from Redis.
    Found(Arc<L1Entry>),
    /// Another instance loads it, and the caller has a stale value to serve.
    Stale,
}

impl TieredCache {
    /// The fleet's turn for a load of `key` whose Redis read (`claim`)
    /// found nothing fresh: take the lock, or wait for its holder's value.
    pub(crate) async fn fleet_turn<V, C>(
        &self,
        key: &str,
        lease: Duration,
        claim: Claim,
        has_stale: bool,
        options: &EntryOptions,
    ) -> Turn
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let tiers = &self.inner.tiers;
        let Some(l2) = &tiers.l2 else {
            return Turn::Load(None, claim);
        };
        let Some(mut seen) = claim.version() else {
            return Turn::Load(None, claim); // Redis failed: no lock to take
        };
        let mut claim = claim;
        let token = LockToken::random();
        let mut spent = claim.spent();
        let bound = options
            .resolve(&self.inner.defaults)
            .hard_timeout
            .unwrap_or(self.inner.background_timeout);
        let deadline = later(Instant::now(), bound);
        let poll = lease / 3;
        // Whether this caller waited since its claim was read: it then
        // reads the value again first, and a lock it takes needs a claim
        // from after the holder's store.
        let mut waited = false;
        // Whether it read the entry again for a store it had missed.
        let mut reread = false;
        let fresh = |e: &Arc<L1Entry>| e.is_fresh(Instant::now());
        loop {
            // Watched before Redis is asked, so no announcement in between is missed.
            let notify = self.inner.fleet_waits.watch(key);
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let asked = Instant::now();
            let left = || l2.timeout().saturating_sub(spent + asked.elapsed());
            if waited {
                // The value only (one GET): the claim is read again only
                // by a caller that goes on to load.
                let found = budget::within(left(), tiers.read_l2::<V, C>(key)).await;
                if let Some(entry) = found.filter(fresh) {
                    self.inner.fleet_waits.unwatch(key, &notify);
                    return Turn::Found(entry);
                }
            }
            let mut taken = budget::within(left(), l2.try_lock(key, token, lease)).await;
            if let Ok(LockTry::Stored(version)) = taken {
                if version > seen && !reread {
                    // The last holder stored the entry after this caller
                    // read it (and released the lock before this caller
                    // asked for it): read it, do not load it again.
                    reread = true;
                    let (found, now) =
                        budget::within(left(), tiers.read_claimed::<V, C>(key)).await;
                    if let Some(entry) = found.filter(fresh) {
                        self.inner.fleet_waits.unwatch(key, &notify);
                        return Turn::Found(entry);
                    }
                    let Some(now_seen) = now.version() else {
                        self.inner.fleet_waits.unwatch(key, &notify);
                        return Turn::Load(None, now);
                    };
                    (claim, seen, waited) = (now, now_seen, false);
                }
                // What that holder stored is nothing this caller can use
                // (it read it, or what replaced it, since): the lock is
                // free to take unless another instance took it meanwhile.
                taken = budget::within(left(), l2.take_over_lock(key, version, token, lease))
                    .await
                    .map(|won| if won { LockTry::Taken } else { LockTry::Held });
            }
            spent += asked.elapsed();
            match taken {
                Ok(LockTry::Taken) => {
                    self.inner.fleet_waits.unwatch(key, &notify);
                    let lock = self.hold(l2, key, token, lease);
                    if !waited {
                        return Turn::Load(Some(lock), claim.holding(token));
                    }
                    // The claim must come from after the holder's store.
                    let left = l2.timeout().saturating_sub(spent);
                    let (found, claim) =
                        budget::within(left, tiers.read_claimed::<V, C>(key)).await;
                    if let Some(entry) = found.filter(fresh) {
                        return Turn::Found(entry); // the lock is released on drop
                    }
                    return Turn::Load(Some(lock), claim.holding(token));
                }
                Ok(LockTry::Held | LockTry::Stored(_)) if has_stale => {
                    self.inner.fleet_waits.unwatch(key, &notify);
                    return Turn::Stale;
                }
                Ok(LockTry::Held | LockTry::Stored(_)) => {}
                // Redis failed, the breaker is open, or the budget is spent.
                Err(_) => {
                    self.inner.fleet_waits.unwatch(key, &notify);
                    return Turn::Load(None, claim);
                }
            }
            waited = true;
            let wake_at = later(Instant::now(), poll).min(deadline);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at.into()) => {}
            }
            self.inner.fleet_waits.unwatch(key, &notify);
            if Instant::now() >= deadline {
                // The holder is slow past this caller's bound: load.
                return Turn::Load(None, claim);
            }
        }
    }

    /// The lock, renewed every third of `lease` until it is dropped. A
    /// renewal that fails stops the renewals: the lock is then lost when
    /// the lease ends, and another instance may load too (the store's
    /// compare-and-set keeps that safe).
    fn hold(&self, l2: &L2, key: &str, token: LockToken, lease: Duration) -> Box<FleetLock> {
        let renewals = {
            let (l2, key) = (l2.clone(), key.to_owned());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    if !matches!(l2.renew_lock(&key, token, lease).await, Ok(true)) {
                        tracing::debug!("a fleet lock could not be renewed; another instance may load the key too");
                        return;
                    }
                }
            })
        };
        Box::new(FleetLock {
            l2: l2.clone(),
            key: key.to_owned(),
            token,
            renewals,
            cache: Arc::downgrade(&self.inner),
            released: false,
            announced: false,
        })
    }
}
