//! Batch reads: `get_many` and `get_many_or_load`. L1 first, then one MGET
//! for every L1 miss, then (for the loading form) the loader for what is
//! still missing, all at once, through the same flights as single reads.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::{unreachable_none, Outcome, TieredCache};
use crate::codec::Codec;
use crate::error::LoadError;
use crate::events::Event;
use crate::flight::Join;
use crate::key::Key;
use crate::l1::{L1Entry, Looked};
use crate::loader::{Load, Owned};
use crate::options::EntryOptions;
use crate::serve::Served;
use tracing::Instrument;

use crate::tiers::{typed, Claim, L1Lookup};

impl TieredCache {
    /// The values under `keys`, in order: L1 first, then one MGET for all L1
    /// misses. Missing and undecodable entries are `None`.
    pub async fn get_many<V, C>(&self, keys: &[Key<V, C>]) -> Vec<Option<Arc<V>>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let mut out = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.inner.tiers.lookup_l1::<V>(key.as_str()).await {
                L1Lookup::Hit(hit) => out.push(hit),
                L1Lookup::FailSafe => out.push(None),
                L1Lookup::Miss => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if missing.is_empty() {
            return out;
        }
        let bodies: Vec<&str> = missing.iter().map(|&i| keys[i].as_str()).collect();
        let tiers = &self.inner.tiers;
        let read = tiers
            .within_budget(tiers.read_many::<V, C>(&bodies, false))
            .instrument(crate::events::op_span("get_many", bodies[0]))
            .await;
        for (&i, (entry, _)) in missing.iter().zip(read) {
            match entry.filter(|e| e.is_fresh(Instant::now())) {
                Some(e) => {
                    self.inner
                        .tiers
                        .stats
                        .record_at(Event::L2Hit, keys[i].as_str());
                    out[i] = typed::<V>(&e).flatten();
                }
                None => self
                    .inner
                    .tiers
                    .stats
                    .record_at(Event::Miss, keys[i].as_str()),
            }
        }
        out
    }

    /// The values under `keys`, in order, loading what neither tier holds:
    /// L1 first, then one MGET for all the L1 misses, then `loader` for
    /// each key still missing, all those loads at once.
    ///
    /// Concurrent calls on the same key share one load, whether they come
    /// from this method or from [`get_or_load`](Self::get_or_load): a
    /// missing key is loaded once per process. Hits may start early
    /// refreshes and stale entries are served, as in `get_or_load`.
    ///
    /// # Errors
    /// Per key, as for [`get_or_load`](Self::get_or_load): one key's
    /// failure does not fail the others.
    pub async fn get_many_or_load<V, C, E, F, Fut>(
        &self,
        keys: &[Key<V, C>],
        options: &EntryOptions,
        loader: F,
    ) -> Vec<Result<Arc<V>, LoadError<E>>>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        F: Fn(&Key<V, C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let loader = Arc::new(loader);
        // One key's load, shaped as the single-key read path takes it.
        let load_one = |key: &Key<V, C>| {
            let (loader, key) = (Arc::clone(&loader), key.clone());
            Owned(move || async move { loader(&key).await.map(|v| Some(Arc::new(v))) })
        };
        let mut found: Vec<Option<Outcome<V, E>>> = keys.iter().map(|_| None).collect();
        let mut fallbacks: Vec<Option<Arc<L1Entry>>> = vec![None; keys.len()];
        // 1. L1.
        let mut lookup = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if let Some(Looked { entry, now }) =
                self.inner.tiers.l1_look(key.as_str().as_bytes()).await
            {
                let mut loader = Some(load_one(key));
                match self.serve::<V, C, E, _>(
                    key.as_str(),
                    options,
                    &entry,
                    now,
                    false,
                    &mut loader,
                ) {
                    // Owned loaders refresh in the background: no `Refresh`.
                    Served::Hit(hit) | Served::Refresh(_, hit) => {
                        self.inner.tiers.stats.record_at(Event::L1Hit, key.as_str());
                        found[i] = Some(Ok(hit));
                        continue;
                    }
                    Served::Stale => fallbacks[i] = Some(entry),
                    Served::Miss => {}
                }
            }
            lookup.push(i);
        }
        // 2. One MGET for everything L1 could not answer, with the claims
        // of the loads that may follow.
        let bodies: Vec<&str> = lookup.iter().map(|&i| keys[i].as_str()).collect();
        let tiers = &self.inner.tiers;
        let read = tiers
            .within_budget(tiers.read_many::<V, C>(&bodies, true))
            .await;
        let mut missing = Vec::new();
        for (&i, (entry, claim)) in lookup.iter().zip(read) {
            if let Some(entry) = entry {
                let mut loader = Some(load_one(&keys[i]));
                match self.serve::<V, C, E, _>(
                    keys[i].as_str(),
                    options,
                    &entry,
                    Instant::now(),
                    false,
                    &mut loader,
                ) {
                    Served::Hit(hit) | Served::Refresh(_, hit) => {
                        self.inner
                            .tiers
                            .stats
                            .record_at(Event::L2Hit, keys[i].as_str());
                        found[i] = Some(Ok(hit));
                        continue;
                    }
                    Served::Stale => fallbacks[i] = fallbacks[i].take().or(Some(entry)),
                    Served::Miss => {}
                }
            }
            missing.push((i, claim));
        }
        // 3. The loader for what is still missing, all keys at once.
        let loads = missing.into_iter().map(|(i, claim)| {
            let (fallback, loader) = (fallbacks[i].take(), load_one(&keys[i]));
            async move {
                let outcome = self
                    .load_missing::<V, C, E, _>(keys[i].as_str(), options, loader, fallback, claim)
                    .await;
                (i, outcome)
            }
        });
        for (i, outcome) in futures_util::future::join_all(loads).await {
            found[i] = Some(outcome);
        }
        found
            .into_iter()
            .map(|outcome| match outcome {
                Some(Ok(Some(value))) => Ok(value),
                Some(Err(e)) => Err(e),
                Some(Ok(None)) | None => unreachable_none(),
            })
            .collect()
    }

    /// Loads one key that a batch lookup found in neither tier: joins the
    /// key's flight, or leads it without asking Redis again (the batch's
    /// MGET just did).
    pub(crate) async fn load_missing<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: L,
        fallback: Option<Arc<L1Entry>>,
        claim: Claim,
    ) -> Outcome<V, E>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        match self.inner.flights.join::<Outcome<V, E>>(key) {
            Join::Leader(leader) => {
                // A load of this key may have ended since the batch read L1.
                if let Some(Looked { entry, now }) = self.inner.tiers.l1_look(key.as_bytes()).await
                {
                    if entry.is_fresh(now) {
                        if let Some(hit @ Some(_)) = typed::<V>(&entry) {
                            self.inner.tiers.stats.record_at(Event::L1Hit, key);
                            leader.finish::<Outcome<V, E>>(Ok(hit.clone()));
                            return Ok(hit);
                        }
                    }
                }
                self.lead_load::<V, C, E, L>(key, options, loader, leader, fallback, claim)
                    .await
            }
            Join::Waiter(waiter) => {
                self.inner.tiers.stats.record(Event::CoalescedWait);
                match self
                    .wait_for_load::<V, E>(key, waiter, fallback.as_ref(), options)
                    .await
                {
                    // The leader gave up, or found nothing (a `try_get_or_load`
                    // led): start over on the single-key path.
                    Some(Ok(None)) | None => {
                        self.load_through::<V, C, E, L>(key, options, loader, false)
                            .await
                    }
                    Some(outcome) => outcome,
                }
            }
        }
    }
}
