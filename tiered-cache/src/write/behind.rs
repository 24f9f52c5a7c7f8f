//! The write-behind queue: the newest write per id, waiting for the store,
//! and the worker that flushes it in batches with retries.
//!
//! Writes to one id coalesce while they wait (the last one wins, and it
//! carries the highest version). The worker flushes one batch at a time,
//! so a newer write of an id is never stored before an older one that is
//! still being tried; the versions make the store refuse it anyway.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::durable::Durable;
use super::{DeadLetter, Entity, Store, WhenFull, WriteBehind};
use crate::cache::TieredCache;
use crate::codec::Postcard;
use crate::error::{Error, ErrorKind};
use crate::events::Event;
use crate::options::EntryOptions;
use crate::tiers::{local_version, Committed, Origin};

/// One write waiting for the store: the value (`None`: a delete), its
/// version, and (durable) the stream entries it stands for: its own and
/// those of the older writes it replaced.
#[derive(Debug)]
struct Pending<E> {
    value: Option<Arc<E>>,
    version: u64,
    entries: Vec<String>,
}

impl<E> Clone for Pending<E> {
    fn clone(&self) -> Self {
        Pending {
            value: self.value.clone(),
            version: self.version,
            entries: self.entries.clone(),
        }
    }
}

struct State<E: Entity> {
    /// The newest write of each id not yet taken by the worker.
    waiting: HashMap<E::Id, Pending<E>>,
    /// The ids of `waiting`, oldest first.
    order: VecDeque<E::Id>,
    /// The batch the worker is flushing: reads still see it.
    flushing: HashMap<E::Id, Pending<E>>,
    /// When the oldest waiting write arrived.
    since: Option<Instant>,
    closed: bool,
}

impl<E: Entity> State<E> {
    /// The newest write of `id` the store may not have yet.
    fn newest(&self, id: &E::Id) -> Option<&Pending<E>> {
        self.waiting.get(id).or_else(|| self.flushing.get(id))
    }
}

/// A write-behind queue and its worker; dropped with its last handle, after
/// the worker flushed what was queued.
pub(crate) struct Queue<E: Entity, S: Store<E>> {
    shared: Arc<Shared<E, S>>,
}

struct Shared<E: Entity, S: Store<E>> {
    cache: TieredCache,
    store: Arc<S>,
    config: WriteBehind,
    /// The entity's entry options, built once (`E::options()` may allocate).
    options: EntryOptions,
    state: Mutex<State<E>>,
    /// Wakes the worker: a write arrived, or the queue closed.
    work: Notify,
    /// Wakes writers waiting for room.
    room: Notify,
    /// Wakes the orphan rounds of a durable queue when it closes.
    stop: Notify,
    dead: Mutex<Vec<DeadLetter<E::Id, E>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The Redis Stream that makes the queue durable, if it is.
    durable: Option<Durable>,
}

impl<E: Entity, S: Store<E>> Queue<E, S> {
    /// A queue flushing to `store`, its worker spawned on the current runtime.
    pub(crate) fn start(
        cache: TieredCache,
        store: Arc<S>,
        config: WriteBehind,
        durable: Option<Durable>,
    ) -> Self {
        let shared = Arc::new(Shared {
            cache,
            store,
            config,
            options: E::options(),
            state: Mutex::new(State {
                waiting: HashMap::new(),
                order: VecDeque::new(),
                flushing: HashMap::new(),
                since: None,
                closed: false,
            }),
            work: Notify::new(),
            room: Notify::new(),
            stop: Notify::new(),
            dead: Mutex::new(Vec::new()),
            worker: Mutex::new(None),
            durable,
        });
        if shared.durable.is_some() {
            tokio::spawn(adopt_orphans(Arc::clone(&shared)));
        }
        let worker = tokio::spawn(run(Arc::clone(&shared)));
        *lock(&shared.worker) = Some(worker);
        Queue { shared }
    }

    /// The value a read must see for `id` while its write waits: `Some(None)`
    /// for a pending delete, `None` when nothing is pending.
    pub(crate) fn pending(&self, id: &E::Id) -> Option<Option<Arc<E>>> {
        lock(&self.shared.state)
            .newest(id)
            .map(|pending| pending.value.clone())
    }

    /// How many ids wait (the batch being flushed included).
    pub(crate) fn depth(&self) -> usize {
        let state = lock(&self.shared.state);
        state.waiting.len() + state.flushing.len()
    }

    /// Writes the cache, then queues the store write at the version the
    /// cache gave it (durable: appended to the stream first).
    pub(crate) async fn put(&self, id: &E::Id, value: Option<Arc<E>>) -> Result<(), Error> {
        self.shared.put(id, value).await
    }

    /// Queues a store write (a replayed dead letter's).
    pub(crate) async fn enqueue(
        &self,
        id: E::Id,
        value: Option<Arc<E>>,
        version: u64,
    ) -> Result<(), Error> {
        let entries = match &self.shared.durable {
            Some(durable) => vec![durable.append(&id, value.as_deref(), version).await?],
            None => Vec::new(),
        };
        let pending = Pending {
            value,
            version,
            entries,
        };
        self.shared.enqueue(id, pending).await
    }

    /// Closes the queue and waits until the worker flushed it.
    pub(crate) async fn shutdown(&self) {
        lock(&self.shared.state).closed = true;
        self.shared.work.notify_one();
        self.shared.room.notify_waiters();
        self.shared.stop.notify_waiters();
        let worker = lock(&self.shared.worker).take();
        if let Some(worker) = worker {
            let _ = worker.await;
        }
    }

    pub(crate) async fn take_dead_letters(&self) -> Vec<DeadLetter<E::Id, E>> {
        match &self.shared.durable {
            Some(durable) => durable.take_dead_letters().await,
            None => std::mem::take(&mut *lock(&self.shared.dead)),
        }
    }
}

impl<E: Entity, S: Store<E>> Shared<E, S> {
    async fn put(&self, id: &E::Id, value: Option<Arc<E>>) -> Result<(), Error> {
        self.wait_for_room(id).await?;
        let cache = &self.cache;
        let key = E::key(id);
        // Fresh past its TTL for as long as the write may wait, so a reader
        // elsewhere does not load the older value from the store meanwhile.
        let extra = self.config.horizon();
        let committed = cache
            .store_entry::<E, Postcard>(
                key.as_str(),
                value.clone(),
                &self.options,
                extra,
                Origin::Write,
            )
            .await?;
        let version = match committed {
            Committed::Stored { version, .. } => version,
            _ if !cache.has_l2() => local_version(),
            _ => {
                // Redis kept its older value: drop it everywhere (this
                // handle's reads still see the queued write).
                let _ = cache.invalidate_instead(&key).await;
                local_version()
            }
        };
        if !committed.announced() {
            cache.announce_key(key.as_str());
        }
        let mut entries = Vec::new();
        if let Some(durable) = &self.durable {
            match durable.append(id, value.as_deref(), version).await {
                Ok(entry) => entries.push(entry),
                Err(e) => {
                    // Not accepted: the cache must not keep a value that
                    // no store will get.
                    let _ = cache.invalidate(&key).await;
                    return Err(e);
                }
            }
        }
        let pending = Pending {
            value,
            version,
            entries,
        };
        self.enqueue(id.clone(), pending).await
    }

    /// Queues a store write; one waiting for the same id is replaced by
    /// the newer of the two (whose entries then stand for both).
    async fn enqueue(&self, id: E::Id, mut pending: Pending<E>) -> Result<(), Error> {
        self.wait_for_room(&id).await?;
        let mut state = lock(&self.state);
        if state.closed {
            return Err(closed());
        }
        match state.waiting.get_mut(&id) {
            Some(waiting) => {
                if waiting.version > pending.version {
                    std::mem::swap(waiting, &mut pending);
                }
                let replaced = std::mem::replace(waiting, pending);
                waiting.entries.extend(replaced.entries);
                self.cache.record(Event::WriteCoalesced);
            }
            None => {
                state.waiting.insert(id.clone(), pending);
                state.order.push_back(id);
                self.cache.record(Event::WriteQueueGrew);
            }
        }
        // The worker sleeps until told: that the queue is no longer empty
        // (its flush interval starts now), or that a batch is full.
        let first = state.since.is_none();
        state.since.get_or_insert_with(Instant::now);
        let full_batch = state.waiting.len() >= self.config.batch_size;
        drop(state);
        self.cache.record(Event::WriteQueued);
        if first || full_batch {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Returns once `id` fits: it waits already, or there is room. Errors
    /// when the queue is full (with [`WhenFull::Error`]) or closed.
    async fn wait_for_room(&self, id: &E::Id) -> Result<(), Error> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let state = lock(&self.state);
                if state.closed {
                    return Err(closed());
                }
                if state.waiting.contains_key(id) || state.waiting.len() < self.config.capacity {
                    return Ok(());
                }
            }
            if self.config.when_full == WhenFull::Error {
                self.cache.record(Event::WriteRejectedFull);
                return Err(Error::new(
                    ErrorKind::QueueFull,
                    format!(
                        "the write-behind queue of `{}` is full ({} ids wait for the store): retry later, raise `capacity`, or use `WhenFull::Wait`",
                        E::NAME,
                        self.config.capacity
                    ),
                ));
            }
            room.await;
        }
    }
}

impl<E: Entity, S: Store<E>> Shared<E, S> {
    /// These writes are done with (stored, or set aside): their stream
    /// entries go.
    async fn finished<'a>(&self, writes: impl IntoIterator<Item = &'a Pending<E>>) {
        let Some(durable) = &self.durable else { return };
        let entries: Vec<String> = writes
            .into_iter()
            .flat_map(|p| p.entries.iter().cloned())
            .collect();
        durable.done(&entries).await;
    }
}

/// Durable queues only: every round, queues the writes found in the stream
/// that no live queue will flush (see [`Durable`]); stops with the queue.
async fn adopt_orphans<E: Entity, S: Store<E>>(shared: Arc<Shared<E, S>>) {
    let Some(durable) = &shared.durable else {
        return;
    };
    let mut first = true;
    loop {
        if lock(&shared.state).closed {
            return;
        }
        for orphan in durable.orphans::<E>(first).await {
            let pending = Pending {
                value: orphan.value,
                version: orphan.version,
                entries: vec![orphan.entry],
            };
            if shared.enqueue(orphan.id, pending).await.is_err() {
                return; // closed
            }
        }
        first = false;
        let _ = tokio::time::timeout(durable.round_every(), shared.stop.notified()).await;
    }
}

impl<E: Entity, S: Store<E>> Drop for Queue<E, S> {
    fn drop(&mut self) {
        // The worker goes on until it flushed what is queued, then stops.
        lock(&self.shared.state).closed = true;
        self.shared.work.notify_one();
        self.shared.stop.notify_waiters();
    }
}

fn closed() -> Error {
    Error::new(
        ErrorKind::Closed,
        "the write-behind queue was shut down: writes after `shutdown` are refused",
    )
}

/// A poisoned lock only means a panic elsewhere; the state is still whole
/// (every change under it is one step).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The worker: waits for a full batch or the flush interval, flushes, and
/// stops once the queue is closed and empty.
async fn run<E: Entity, S: Store<E>>(shared: Arc<Shared<E, S>>) {
    loop {
        let batch = loop {
            let work = shared.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            let wait = {
                let mut state = lock(&shared.state);
                let due = state
                    .since
                    .map(|since| since + shared.config.flush_interval);
                let now = Instant::now();
                if state.waiting.len() >= shared.config.batch_size
                    || state.closed
                    || due.is_some_and(|due| due <= now)
                {
                    break take_batch(&mut state, shared.config.batch_size);
                }
                due.map(|due| due - now)
            };
            match wait {
                Some(wait) => {
                    let _ = tokio::time::timeout(wait, work).await;
                }
                None => work.await,
            }
        };
        if batch.is_empty() {
            // Closed and nothing left.
            shared.room.notify_waiters();
            return;
        }
        flush(&shared, &batch).await;
        lock(&shared.state).flushing.clear();
        shared.cache.write_queue_shrank(batch.len() as u64);
        shared.room.notify_waiters();
    }
}

/// Moves up to `n` of the oldest waiting writes into `flushing`.
fn take_batch<E: Entity>(state: &mut State<E>, n: usize) -> Vec<(E::Id, Pending<E>)> {
    let mut batch = Vec::with_capacity(n.min(state.waiting.len()));
    while batch.len() < n {
        let Some(id) = state.order.pop_front() else {
            break;
        };
        if let Some(pending) = state.waiting.remove(&id) {
            state.flushing.insert(id.clone(), pending.clone());
            batch.push((id, pending));
        }
    }
    state.since = if state.waiting.is_empty() {
        None
    } else {
        Some(Instant::now())
    };
    batch
}

/// Hands `batch` to the store, retrying with backoff; what still fails
/// after the last attempt is tried one write at a time, and each write
/// that fails then becomes a dead letter.
async fn flush<E: Entity, S: Store<E>>(shared: &Shared<E, S>, batch: &[(E::Id, Pending<E>)]) {
    let config = &shared.config;
    let mut wait = config.backoff;
    for attempt in 1..=config.max_attempts {
        match store_batch(&*shared.store, batch).await {
            Ok(()) => {
                shared.cache.record(Event::WriteFlush);
                shared
                    .cache
                    .record_many(Event::StoreWrite, batch.len() as u64);
                shared.finished(batch.iter().map(|(_, p)| p)).await;
                return;
            }
            Err(_) if attempt < config.max_attempts => {
                shared.cache.record(Event::WriteRetry);
                tokio::time::sleep(jittered(wait)).await;
                wait = wait.saturating_mul(2).min(config.max_backoff);
            }
            Err(_) => {}
        }
    }
    for (id, pending) in batch {
        let one = [(id.clone(), pending.clone())];
        match store_batch(&*shared.store, &one).await {
            Ok(()) => shared.cache.record(Event::StoreWrite),
            Err(error) => set_aside(shared, id, pending, error, config.max_attempts + 1).await,
        }
        shared.finished([pending]).await;
    }
}

/// One store call for the saves of a batch, one for its deletes.
async fn store_batch<E: Entity, S: Store<E>>(
    store: &S,
    batch: &[(E::Id, Pending<E>)],
) -> Result<(), S::Error> {
    let mut saves = Vec::new();
    let mut deletes = Vec::new();
    for (id, pending) in batch {
        match &pending.value {
            Some(value) => saves.push((id.clone(), Arc::clone(value), pending.version)),
            None => deletes.push((id.clone(), pending.version)),
        }
    }
    if !saves.is_empty() {
        store.save_many(&saves).await?;
    }
    if !deletes.is_empty() {
        store.delete_many(&deletes).await?;
    }
    Ok(())
}

/// Records a write that kept failing. Its cache entry goes too, unless a
/// newer write of the id waits: the cache must not go on serving a value
/// the store does not have.
async fn set_aside<E: Entity, S: Store<E>>(
    shared: &Shared<E, S>,
    id: &E::Id,
    pending: &Pending<E>,
    error: S::Error,
    attempts: u32,
) {
    tracing::warn!(
        entity = E::NAME,
        attempts,
        "a write-behind write kept failing and was set aside as a dead letter (see take_dead_letters)"
    );
    let letter = DeadLetter {
        id: id.clone(),
        value: pending.value.clone(),
        version: pending.version,
        error: error.to_string(),
        attempts,
    };
    match &shared.durable {
        Some(durable) => durable.dead_letter(&letter).await,
        None => lock(&shared.dead).push(letter),
    }
    // Counted once it is kept, so whoever sees the count can take it.
    shared.cache.record(Event::WriteDeadLetter);
    let newer = lock(&shared.state).waiting.contains_key(id);
    if !newer {
        let _ = shared.cache.invalidate(&E::key(id)).await;
    }
}

/// `wait` plus up to half of it again, at random, so instances that failed
/// together do not retry together.
fn jittered(wait: Duration) -> Duration {
    wait.saturating_add(wait.mul_f64(rand::random::<f64>() * 0.5))
}
