//! The entity declaration and its typed handle.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::behind::Queue;
use super::durable::Durable;
use super::{DeadLetter, Store, WriteError, WritePolicy};
use crate::cache::TieredCache;
use crate::codec::Postcard;
use crate::error::{Error, ErrorKind, LoadError};
use crate::events::Event;
use crate::key::Key;
use crate::options::EntryOptions;
use crate::tiers::{Committed, Origin, Reserved};
use crate::warm::Warmer;
use tracing::Instrument;

/// One warm-up load of an entity: its value, or the store's error (`None`:
/// the store has no such id).
pub type WarmLoad<E, Err> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<E, Option<Err>>> + Send + 'static>>;

/// The loader of an entity's warm-up ([`EntityCache::warm`]).
pub type WarmLoader<E, Err> = Box<dyn Fn(Key<E>) -> WarmLoad<E, Err> + Send + Sync + 'static>;

/// One kind of record the application stores and caches, declared in one
/// place: its key (name, schema version, id), how it is cached, and how
/// its writes reach the store.
///
/// Its keys are `Key::<Self>::new(NAME, VERSION).arg(id)`, the same a
/// `#[cached(name = NAME, key = "{id}", version = VERSION)]` function
/// builds, so such a reader sees the entity's writes.
///
/// ```
/// use std::time::Duration;
/// use tiered_cache::write::{Entity, WriteBehind, WritePolicy};
/// use tiered_cache::EntryOptions;
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct ViewCount { views: u64 }
///
/// impl Entity for ViewCount {
///     const NAME: &'static str = "views";
///     const VERSION: u32 = 1;
///     type Id = u64;
///     fn options() -> EntryOptions {
///         EntryOptions::new(Duration::from_secs(600)).tag("views")
///     }
///     fn policy() -> WritePolicy {
///         WritePolicy::WriteBehind(WriteBehind::new())
///     }
/// }
/// ```
pub trait Entity: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The entity's name in its keys.
    const NAME: &'static str;
    /// The schema version: bump it when the type changes, and entries of
    /// the old shape read as misses.
    const VERSION: u32;
    /// The id of one record (the key's one argument).
    type Id: fmt::Display + Clone + Eq + Hash + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// How its entries are cached (TTL, tags, grace window...). Unset
    /// fields take the cache's defaults.
    fn options() -> EntryOptions {
        EntryOptions::default()
    }

    /// How its writes reach the store. Default: cache-aside.
    fn policy() -> WritePolicy {
        WritePolicy::CacheAside
    }

    /// The cache key of `id`.
    fn key(id: &Self::Id) -> Key<Self> {
        Key::new(Self::NAME, Self::VERSION).arg(id)
    }
}

/// A typed handle on one entity over its store, from
/// [`TieredCache::entity`]. Cheap to clone; clones share the write-behind
/// queue, which is flushed by [`shutdown`](Self::shutdown) (and in the
/// background until then).
pub struct EntityCache<E: Entity, S: Store<E>> {
    shared: Arc<Shared<E, S>>,
}

struct Shared<E: Entity, S: Store<E>> {
    cache: TieredCache,
    store: Arc<S>,
    options: EntryOptions,
    policy: WritePolicy,
    queue: Option<Queue<E, S>>,
}

impl<E: Entity, S: Store<E>> Clone for EntityCache<E, S> {
    fn clone(&self) -> Self {
        EntityCache {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<E: Entity, S: Store<E>> fmt::Debug for EntityCache<E, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntityCache")
            .field("entity", &E::NAME)
            .field("version", &E::VERSION)
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl TieredCache {
    /// A typed handle on entity `E` over `store`, writing by `E::policy()`.
    /// A write-behind entity starts its flushing worker here (on the current
    /// tokio runtime).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a durable write-behind entity on a cache
    /// without Redis.
    pub fn entity<E: Entity, S: Store<E>>(&self, store: S) -> Result<EntityCache<E, S>, Error> {
        self.entity_with(store, E::policy())
    }

    /// [`entity`](Self::entity) with another policy than the declared one
    /// (settings read at run time, say).
    ///
    /// # Errors
    /// As for [`entity`](Self::entity).
    pub fn entity_with<E: Entity, S: Store<E>>(
        &self,
        store: S,
        policy: WritePolicy,
    ) -> Result<EntityCache<E, S>, Error> {
        let store = Arc::new(store);
        let queue = match &policy {
            WritePolicy::WriteBehind(config) => {
                let durable = match (config.durable, &self.inner.tiers.l2) {
                    (false, _) => None,
                    (true, Some(l2)) => Some(Durable::new(l2.clone(), E::NAME, E::VERSION, config)),
                    (true, None) => return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "entity `{}` is durable write-behind, which keeps its queue in Redis: configure `redis(..)` on the builder, or turn `durable` off",
                            E::NAME
                        ),
                    )),
                };
                Some(Queue::start(
                    self.clone(),
                    Arc::clone(&store),
                    config.clone(),
                    durable,
                ))
            }
            _ => None,
        };
        Ok(EntityCache {
            shared: Arc::new(Shared {
                cache: self.clone(),
                store,
                options: E::options(),
                policy,
                queue,
            }),
        })
    }
}

impl<E: Entity, S: Store<E>> EntityCache<E, S> {
    /// The value of `id`: from the cache, or loaded from the store (once
    /// per id however many callers miss together) and cached. A write still
    /// waiting in this handle's write-behind queue is returned as it is.
    ///
    /// # Errors
    /// The store's error (shared by coalesced callers), or a hard timeout.
    pub async fn get(&self, id: &E::Id) -> Result<Option<Arc<E>>, LoadError<S::Error>> {
        if let Some(pending) = self.shared.queue.as_ref().and_then(|q| q.pending(id)) {
            return Ok(pending);
        }
        let store = Arc::clone(&self.shared.store);
        let owned = id.clone();
        self.shared
            .cache
            .try_get_or_load(&E::key(id), &self.shared.options, move || async move {
                store.load(&owned).await
            })
            .await
    }

    /// Writes `value` as `id` by the entity's policy; see
    /// [`WritePolicy`]. When this returns, a cache-aside or write-through
    /// write is in the store, and a write-behind one is queued (durable: in
    /// Redis).
    ///
    /// # Errors
    /// [`WriteError::Store`] when the store fails a cache-aside or
    /// write-through write (the cache then holds no older value);
    /// [`WriteError::Cache`] when a write-behind queue is full (with
    /// [`WhenFull::Error`](super::WhenFull::Error)) or a durable queue
    /// cannot be written.
    pub async fn put(&self, id: &E::Id, value: E) -> Result<(), WriteError<S::Error>> {
        self.write(id, Some(Arc::new(value))).await
    }

    /// Deletes `id` by the entity's policy, as [`put`](Self::put) writes.
    /// Write-behind leaves a cached "none" in its place until the store has
    /// the delete.
    ///
    /// # Errors
    /// As for [`put`](Self::put).
    pub async fn delete(&self, id: &E::Id) -> Result<(), WriteError<S::Error>> {
        self.write(id, None).await
    }

    async fn write(&self, id: &E::Id, value: Option<Arc<E>>) -> Result<(), WriteError<S::Error>> {
        let op = if value.is_some() { "put" } else { "delete" };
        let span = tracing::debug_span!(
            "tiered_cache",
            op,
            entity = E::NAME,
            policy = self.shared.policy.name()
        );
        self.write_by_policy(id, value).instrument(span).await
    }

    async fn write_by_policy(
        &self,
        id: &E::Id,
        value: Option<Arc<E>>,
    ) -> Result<(), WriteError<S::Error>> {
        match &self.shared.policy {
            WritePolicy::WriteBehind(_) => match &self.shared.queue {
                Some(queue) => queue.put(id, value).await.map_err(WriteError::Cache),
                None => Ok(()),
            },
            WritePolicy::WriteThrough => self.write_through(id, value).await,
            WritePolicy::CacheAside => self.cache_aside(id, value).await,
        }
    }

    /// The store, then an invalidation everywhere. The version is taken
    /// (and the entry dropped) first, and the invalidation after the store
    /// write advances it again: a load that read the store before the write
    /// cannot cache what it read.
    async fn cache_aside(
        &self,
        id: &E::Id,
        value: Option<Arc<E>>,
    ) -> Result<(), WriteError<S::Error>> {
        let (key, _) = self.save_first(id, value.as_ref()).await?;
        let cache = &self.shared.cache;
        cache.invalidate(&key).await.map_err(stale_elsewhere)
    }

    /// The store, then the cache, by compare-and-set on the version taken
    /// before the store write: a slower load, or an older write, loses.
    async fn write_through(
        &self,
        id: &E::Id,
        value: Option<Arc<E>>,
    ) -> Result<(), WriteError<S::Error>> {
        let (key, reserved) = self.save_first(id, value.as_ref()).await?;
        let cache = &self.shared.cache;
        let Some(value) = value else {
            // A delete: the reservation dropped the entry; tell the others.
            return cache.invalidate(&key).await.map_err(stale_elsewhere);
        };
        let origin = Origin::Load(reserved.claim);
        let committed = cache
            .store_entry::<E, Postcard>(
                key.as_str(),
                Some(value),
                &self.shared.options,
                Duration::ZERO,
                origin,
            )
            .await;
        match committed {
            Ok(Committed::Stored {
                announced: true, ..
            }) => Ok(()),
            Ok(Committed::Stored { .. } | Committed::Refused) => {
                cache.announce_key(key.as_str());
                Ok(())
            }
            Ok(Committed::NotInRedis) if !cache.has_l2() => Ok(()),
            // Redis failed, refused the value (too large), or it did not
            // encode: never a silent success. The others must not keep the
            // old value, so the key is invalidated everywhere instead.
            Ok(Committed::NotInRedis) | Err(_) => cache
                .invalidate_instead(&key)
                .await
                .map_err(stale_elsewhere),
        }
    }

    /// Takes the write's version (dropping the entry from both tiers), then
    /// writes the store at it: the first half of cache-aside and
    /// write-through.
    async fn save_first(
        &self,
        id: &E::Id,
        value: Option<&Arc<E>>,
    ) -> Result<(Key<E>, Reserved), WriteError<S::Error>> {
        let key = E::key(id);
        let reserved = self.shared.cache.reserve(key.as_str()).await;
        self.save(id, value, reserved.version).await?;
        self.shared.cache.record(Event::StoreWrite);
        Ok((key, reserved))
    }

    async fn save(
        &self,
        id: &E::Id,
        value: Option<&Arc<E>>,
        version: u64,
    ) -> Result<(), WriteError<S::Error>> {
        let store = &self.shared.store;
        match value {
            Some(value) => store.save(id, value, version).await,
            None => store.delete(id, version).await,
        }
        .map_err(WriteError::Store)
    }

    /// Flushes the write-behind queue and stops its worker: returns once
    /// every queued write reached the store or became a dead letter. Later
    /// `put`s of a write-behind entity fail. Nothing to do for the others.
    pub async fn shutdown(&self) {
        if let Some(queue) = &self.shared.queue {
            queue.shutdown().await;
        }
    }

    /// A warm-up of `ids` from the store (see [`TieredCache::warm`]): each
    /// id not cached yet is loaded and cached with the entity's options. An
    /// id the store does not have counts as failed.
    pub fn warm(
        &self,
        ids: impl IntoIterator<Item = E::Id>,
    ) -> Warmer<E, Postcard, WarmLoader<E, S::Error>> {
        let ids: HashMap<String, E::Id> = ids
            .into_iter()
            .map(|id| (E::key(&id).as_str().to_owned(), id))
            .collect();
        let keys: Vec<Key<E>> = ids.values().map(E::key).collect();
        let ids = Arc::new(ids);
        let store = Arc::clone(&self.shared.store);
        let loader = move |key: Key<E>| -> WarmLoad<E, S::Error> {
            let (ids, store) = (Arc::clone(&ids), Arc::clone(&store));
            Box::pin(async move {
                let Some(id) = ids.get(key.as_str()) else {
                    return Err(None);
                };
                match store.load(id).await {
                    Ok(Some(value)) => Ok(value),
                    Ok(None) => Err(None),
                    Err(e) => Err(Some(e)),
                }
            })
        };
        let loader: WarmLoader<E, S::Error> = Box::new(loader);
        self.shared
            .cache
            .warm(keys, loader)
            .options(self.shared.options.clone())
    }

    /// How many ids wait in this handle's write-behind queue.
    pub fn pending(&self) -> usize {
        self.shared.queue.as_ref().map_or(0, Queue::depth)
    }

    /// The write-behind writes that kept failing, taken out of the list.
    /// In durable mode they come from Redis, so any instance sees every
    /// instance's dead letters.
    pub async fn take_dead_letters(&self) -> Vec<DeadLetter<E::Id, E>> {
        match &self.shared.queue {
            Some(queue) => queue.take_dead_letters().await,
            None => Vec::new(),
        }
    }

    /// Queues a dead letter again, at its own version: if the id was
    /// written since, the store keeps the newer write.
    ///
    /// # Errors
    /// As for [`put`](Self::put).
    pub async fn replay(&self, letter: DeadLetter<E::Id, E>) -> Result<(), WriteError<S::Error>> {
        match &self.shared.queue {
            Some(queue) => queue
                .enqueue(letter.id, letter.value, letter.version)
                .await
                .map_err(WriteError::Cache),
            None => Ok(()),
        }
    }
}

/// The store has the write, but Redis could not be told: say so, since
/// other instances may serve the old value until it expires.
fn stale_elsewhere<E>(cause: Error) -> WriteError<E> {
    WriteError::Cache(
        Error::new(
            ErrorKind::L2,
            "the write was saved in the store, but Redis could not be updated or invalidated: other instances may read the old value until its TTL ends (see stats.l2_errors)",
        )
        .with_source(cause),
    )
}
