//! The tier layer: the only code that holds both tiers. It promotes entries
//! read from Redis into L1 (ticketed, so a promotion never undoes a drop),
//! stores entries in both tiers, and turns bad bytes into counted misses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Codec;
use crate::entry::{self, Meta};
use crate::error::Error;
use crate::l1::{AnyValue, L1Entry, Ticket, L1};
use crate::l2::{L2Fault, L2};
use crate::options::Resolved;
use crate::stats::Stats;
use crate::tags::TagVersions;

/// Both tiers of one cache, and what judging their entries needs.
#[derive(Debug)]
pub(crate) struct Tiers {
    pub(crate) l1: Option<L1>,
    pub(crate) l2: Option<L2>,
    pub(crate) tags: Arc<TagVersions>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) max_value_bytes: usize,
}

impl Tiers {
    /// After a failed refresh, serves the stale value as if fresh for a
    /// short while, never past its grace window, so the loader is not
    /// hammered while it fails.
    pub(crate) async fn throttle_failsafe(&self, key: &str, stale: &Arc<L1Entry>, delay: Duration) {
        let Some(l1) = &self.l1 else { return };
        // Only stand in for the entry that failed to refresh: if the key was
        // invalidated or rewritten during the load, bringing the old value
        // back would undo that (the ticket covers a drop after this look).
        let ticket = l1.ticket(key);
        match l1.get(key).await {
            Some(current) if current.meta.version == stale.meta.version => {}
            _ => return,
        }
        let retry = l1.failsafe_copy(stale, Instant::now() + delay);
        l1.insert_since(key, retry, ticket).await;
    }

    /// Writes an entry to both tiers. `value` is `None` for a negative entry.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn store<V, C>(
        &self,
        key: &str,
        value: Option<&V>,
        erased: Option<&AnyValue>,
        opts: &Resolved,
        tags: Arc<[entry::TagStamp]>,
        load_time: Duration,
        ttl: Duration,
    ) -> Result<(), Error>
    where
        V: Serialize + Send + Sync + 'static,
        C: Codec,
    {
        let ttl = opts.ttl_with_jitter(ttl);
        let stale = if value.is_some() {
            opts.stale
        } else {
            Duration::ZERO
        };
        let now_ms = entry::now_ms();
        let meta = Meta {
            created_ms: now_ms,
            expires_ms: now_ms + ttl.as_millis() as u64,
            stale_until_ms: now_ms + (ttl + stale).as_millis() as u64,
            load_micros: load_time.as_micros().min(u128::from(u32::MAX)) as u32,
            version: now_ms,
            tags,
        };
        let mut bytes = entry::encode_header(&meta, C::ID, value.is_none(), 64);
        let header_len = bytes.len();
        if let Some(v) = value {
            C::encode(v, &mut bytes)?;
        }
        let size = bytes.len() - header_len;
        if let Some(l1) = &self.l1 {
            // A tag bumped (or the namespace cleared) since the stamps were
            // taken, before the load, makes the entry stale already: L1 must
            // not serve it. The ticket covers a bump racing this check.
            let ticket = l1.ticket(key);
            let l2 = self.l2.as_ref();
            if self.tags.is_current(&meta.tags, l2).await {
                let entry = l1.entry(key, erased.cloned(), meta, ttl, ttl + stale, size);
                l1.insert_since(key, entry, ticket).await;
            }
        }
        if let Some(l2) = &self.l2 {
            if bytes.len() > self.max_value_bytes {
                self.stats.oversized_skips.incr();
                // The older value in Redis must not outlive this newer one.
                let _ = l2.del(&[key]).await;
            } else {
                // Failures are counted and logged by the L2 tier.
                let _ = l2.set(key, &bytes, ttl + stale).await;
            }
        }
        Ok(())
    }

    /// Notes L1's drops before a Redis read, so its promotion cannot undo one.
    #[inline]
    pub(crate) fn ticket(&self, key: &str) -> Ticket {
        self.l1
            .as_ref()
            .map_or_else(Ticket::default, |l1| l1.ticket(key))
    }

    #[inline]
    pub(crate) async fn l1_get(&self, key: &str) -> Option<Arc<L1Entry>> {
        match &self.l1 {
            Some(l1) => l1.get(key).await,
            None => None,
        }
    }

    #[inline]
    pub(crate) fn typed_hit<V: Send + Sync + 'static>(
        &self,
        entry: &L1Entry,
    ) -> Option<Option<Arc<V>>> {
        let hit = typed::<V>(entry)?;
        if hit.is_some() {
            self.stats.l1_hits.incr();
        } else {
            self.stats.negative_hits.incr();
        }
        Some(hit)
    }

    /// Reads an entry from Redis and promotes it to L1. Anything unusable
    /// (absent, undecodable, of another type, invalidated by a tag) is `None`.
    pub(crate) async fn read_l2<V, C>(&self, key: &str) -> Option<Arc<L1Entry>>
    where
        V: DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let l2 = self.l2.as_ref()?;
        let ticket = self.ticket(key);
        match l2.get(key).await {
            Ok(Some(bytes)) => {
                self.accept_l2::<V, C>(key, &bytes, entry::now_ms(), ticket)
                    .await
            }
            Ok(None) => None,
            Err(L2Fault::WrongType) => {
                self.bad_entry(key, "holds another Redis type").await;
                None
            }
            Err(_) => None, // counted and logged by the L2 tier
        }
    }

    /// Turns bytes read from Redis into an L1 entry, or drops them as bad.
    /// `ticket` was taken before the bytes were read: a drop of the key
    /// since then keeps them out of L1 (they are still returned).
    pub(crate) async fn accept_l2<V, C>(
        &self,
        key: &str,
        bytes: &[u8],
        now_ms: u64,
        ticket: Ticket,
    ) -> Option<Arc<L1Entry>>
    where
        V: DeserializeOwned + Send + Sync + 'static,
        C: Codec,
    {
        let envelope = match entry::decode(bytes, C::ID) {
            Ok(envelope) => envelope,
            Err(bad) => {
                self.bad_entry(key, bad.describe()).await;
                return None;
            }
        };
        let keep_for = envelope.meta.remaining(now_ms)?;
        let l2 = self.l2.as_ref();
        if !self.tags.is_current(&envelope.meta.tags, l2).await {
            self.stats.tag_stale_drops.incr();
            return None;
        }
        let value: Option<AnyValue> = match envelope.value {
            Some(raw) => match C::decode::<V>(raw) {
                Ok(v) => Some(Arc::new(v)),
                Err(_) => {
                    self.bad_entry(key, "does not decode as the key's type")
                        .await;
                    return None;
                }
            },
            None => None,
        };
        let fresh_for = Duration::from_millis(envelope.meta.expires_ms.saturating_sub(now_ms));
        let size = envelope.value.map_or(0, <[u8]>::len);
        let entry = match &self.l1 {
            Some(l1) => {
                let entry = l1.entry(key, value, envelope.meta, fresh_for, keep_for, size);
                l1.insert_since(key, Arc::clone(&entry), ticket).await;
                entry
            }
            None => L1::detached(value, envelope.meta, fresh_for, keep_for),
        };
        Some(entry)
    }

    /// A bad entry is a miss: deleted, counted, logged (rate-limited).
    pub(crate) async fn bad_entry(&self, key: &str, why: &str) {
        self.stats.decode_failures.incr();
        log_bad_entry(why);
        if let Some(l2) = &self.l2 {
            let _ = l2.del(&[key]).await;
        }
    }
}

/// The entry's value as a `V`: `Some(None)` is a cached negative, `None`
/// means the entry holds another type (a key clash) and counts as a miss.
#[inline]
pub(crate) fn typed<V: Send + Sync + 'static>(entry: &L1Entry) -> Option<Option<Arc<V>>> {
    match &entry.value {
        None => Some(None),
        Some(any) => Arc::clone(any).downcast::<V>().ok().map(Some),
    }
}

fn log_bad_entry(why: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let now = entry::now_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    // At most one line every 10 s: the counter has the totals.
    if now.saturating_sub(last) >= 10_000
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(reason = why, "an entry in Redis was unusable; treated as a miss and deleted (see stats.decode_failures)");
    }
}
