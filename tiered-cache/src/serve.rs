//! Judging an entry a tier gave: a fresh hit, a hit due for an XFetch
//! refresh, a stale fallback, or nothing usable; and the `#[cached]`
//! shortcut that answers a plain L1 hit with no more than that judgement.

use std::sync::Arc;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::TieredCache;
use crate::codec::Codec;
use crate::events;
use crate::flight::Leader;
use crate::l1::{L1Entry, Looked};
use crate::loader::Load;
use crate::options::EntryOptions;
use crate::refresh::{early_refresh_due, near_expiry};
use crate::tiers::typed;

impl TieredCache {
    /// Judges an entry found in a tier at `now` (when L1 looked at it, or
    /// when L2's read returned it): a fresh hit (maybe starting an early
    /// refresh), a stale fallback, or nothing usable.
    #[inline]
    pub(crate) fn serve<V, C, E, L>(
        &self,
        key: &str,
        options: &EntryOptions,
        entry: &Arc<L1Entry>,
        now: Instant,
        negatives: bool,
        loader: &mut Option<L>,
    ) -> Served<V>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        L: Load<V, E>,
    {
        let value = match self.judge::<V>(options, entry, now, negatives) {
            Judged::Fresh(value) => value,
            Judged::NearExpiry(value) => {
                let beta = options.beta(&self.inner.defaults);
                if early_refresh_due(now, entry.fresh_until, entry.xfetch_delta(), beta) {
                    if let Some(refresh) =
                        self.early_refresh::<V, C, E, L>(key, options, entry, loader)
                    {
                        return refresh;
                    }
                }
                value
            }
            Judged::Stale => return Served::Stale,
            Judged::Miss => return Served::Miss,
        };
        self.count_served(key.as_bytes(), entry, &value);
        Served::Hit(value)
    }

    /// What `entry` is worth at `now`, before any refresh is started: no
    /// side effects, so a caller may look and go another way.
    #[inline]
    fn judge<V: Send + Sync + 'static>(
        &self,
        options: &EntryOptions,
        entry: &L1Entry,
        now: Instant,
        negatives: bool,
    ) -> Judged<V> {
        let Some(value) = typed::<V>(entry) else {
            return Judged::Miss;
        };
        if value.is_none() && !negatives {
            return Judged::Miss;
        }
        let beta = options.beta(&self.inner.defaults);
        if entry.is_calm(now, beta) {
            return Judged::Fresh(value);
        }
        if !entry.is_fresh(now) {
            return if value.is_some() && entry.in_grace(now) {
                Judged::Stale
            } else {
                Judged::Miss
            };
        }
        if near_expiry(now, entry.fresh_until, entry.xfetch_delta(), beta) && entry.may_refresh(now)
        {
            return Judged::NearExpiry(value);
        }
        Judged::Fresh(value)
    }

    /// Counts a hit on `entry` that is being served.
    #[inline]
    fn count_served<V>(&self, key: &[u8], entry: &L1Entry, value: &Option<Arc<V>>) {
        if value.is_none() {
            self.inner
                .tiers
                .stats
                .record_at(events::Event::NegativeHit, key);
        }
        if entry.failsafe {
            self.inner.tiers.stats.record(events::Event::StaleServed);
        }
    }

    /// The answer of a `#[cached]` call when L1 alone gives it: a fresh
    /// entry, not near its expiry (where XFetch may refresh it). `None`
    /// sends the call down the whole read path, which looks again; this
    /// path builds neither the call's `Key` nor its loader, and so answers
    /// the common hit without allocating.
    #[inline]
    pub(crate) async fn plain_l1_hit<V: Send + Sync + 'static>(
        &self,
        key: &[u8],
        options: &EntryOptions,
        negatives: bool,
    ) -> Option<Option<Arc<V>>> {
        let Looked { entry, now } = self.inner.tiers.l1_look(key).await?;
        let Judged::Fresh(value) = self.judge::<V>(options, &entry, now, negatives) else {
            return None;
        };
        self.count_served(key, &entry, &value);
        self.l1_answered(key, &value);
        Some(value)
    }

    /// Counts an answer from L1.
    #[inline]
    pub(crate) fn l1_answered<V>(&self, key: &[u8], value: &Option<Arc<V>>) {
        if value.is_some() {
            self.inner.tiers.stats.record_at(events::Event::L1Hit, key);
        }
        events::answered("l1");
    }
}

/// What an entry found in a tier is worth (see [`TieredCache::judge`]).
enum Judged<V> {
    /// Fresh and far from its expiry: a hit.
    Fresh(Option<Arc<V>>),
    /// Fresh, but near enough to its expiry that XFetch draws for a refresh.
    NearExpiry(Option<Arc<V>>),
    /// Past its freshness, inside its grace window: a fallback.
    Stale,
    Miss,
}

/// What a tier's entry means for a loading read.
pub(crate) enum Served<V> {
    Hit(Option<Arc<V>>),
    /// Fresh, but due for an XFetch refresh that the caller must run
    /// itself (its loader borrows): it leads this flight.
    Refresh(Leader, Option<Arc<V>>),
    Stale,
    Miss,
}
