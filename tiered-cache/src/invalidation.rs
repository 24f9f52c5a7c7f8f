//! Invalidation: a key, a tag or the whole namespace, in both tiers, and
//! the backplane messages that tell the other instances.

use tracing::Instrument as _;

use crate::backplane::{Announcement, Event};
use crate::cache::TieredCache;
use crate::error::Error;
use crate::events;
use crate::key::Key;
use crate::tags::EPOCH_TAG;

impl TieredCache {
    /// Tells the other instances to drop `key`, after this one's Redis write.
    pub(crate) fn announce_key(&self, key: &str) {
        self.announce(Event::Key(key.to_owned()));
    }

    /// The backplane message that tells the other instances to drop `key`,
    /// for a store script to send with its write; `None` when the backplane
    /// is off or sharded (the publisher then sends it, after the write).
    pub(crate) fn announcement(&self, key: &str) -> Option<Announcement> {
        self.inner.backplane.as_ref()?.announcement(key)
    }

    /// Removes `key` from both tiers (Redis first) and tells other
    /// instances. A load of `key` that began before this call, here or on
    /// another instance, does not store its value afterwards, and callers
    /// after it no longer wait on such a load here.
    ///
    /// # Errors
    /// When Redis could not be told (the entry is gone from L1 regardless):
    /// other instances may still read the old value until its TTL.
    pub async fn invalidate<V, C>(&self, key: &Key<V, C>) -> Result<(), Error> {
        let tiers = &self.inner.tiers;
        let deleted = tiers
            .within_budget(tiers.invalidate(key.as_str()))
            .instrument(events::op_span("invalidate", key.as_str()))
            .await;
        // A load in flight cannot store any more (its claim is outdated):
        // new callers start their own instead of waiting on it.
        self.inner.flights.release(key.as_str());
        self.announce(Event::Key(key.as_str().to_owned()));
        deleted
    }

    /// Drops every entry tagged `tag`, in every tier, in O(1): the tag's
    /// version is bumped and older entries read as misses from then on.
    ///
    /// # Errors
    /// When Redis could not be told; entries then stay valid elsewhere.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<(), Error> {
        let bumped = self
            .inner
            .tiers
            .tags
            .bump(tag, self.inner.tiers.l2.as_ref())
            .instrument(events::op_span_keyless("invalidate_tag"))
            .await;
        if let Some(l1) = self.inner.tiers.local() {
            match &bumped {
                Ok(version) => l1.invalidate_tag(tag, *version),
                // Without an answer from Redis, drop what is there now.
                Err(_) => l1.drop_tag(tag),
            }
        }
        self.announce(Event::Tag(tag.to_owned(), bumped.as_ref().ok().copied()));
        bumped.map(drop)
    }

    /// [`invalidate_tag`](Self::invalidate_tag) for each of `tags`.
    ///
    /// # Errors
    /// The first failure to tell Redis; the other tags are still invalidated.
    pub async fn invalidate_tags<I, T>(&self, tags: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let tags: Vec<T> = tags.into_iter().collect();
        let mut outcome = Ok(());
        for tag in &tags {
            let done = self.invalidate_tag(tag.as_ref()).await;
            outcome = outcome.and(done);
        }
        outcome
    }

    /// Invalidates every entry of this cache's namespace, in both tiers and
    /// on every instance, in O(1) and without KEYS or SCAN: the namespace's
    /// epoch, an implicit tag that every entry carries, is bumped, so every
    /// entry written before reads as a miss (Redis drops them on their TTL).
    ///
    /// # Errors
    /// When Redis could not be told: L1 is cleared here (and on the other
    /// instances, if the message gets through), but the entries in Redis
    /// stay valid.
    pub async fn clear(&self) -> Result<(), Error> {
        let bumped = self
            .inner
            .tiers
            .tags
            .bump(EPOCH_TAG, self.inner.tiers.l2.as_ref())
            .instrument(events::op_span_keyless("clear"))
            .await;
        if let Some(l1) = self.inner.tiers.local() {
            l1.clear();
        }
        self.announce(Event::Clear(bumped.as_ref().ok().copied()));
        bumped.map(drop)
    }

    /// Tells the other instances, after this one's Redis write.
    pub(crate) fn announce(&self, event: Event) {
        if let Some(backplane) = &self.inner.backplane {
            backplane.publish(event);
        }
    }
}
