//! The one entry point of generated code, [`cached`], and the [`Returns`]
//! trait that lets it serve every return-type shape.

use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use core::convert::Infallible;

use super::share::Share;
use crate::flight::{Join, Leader};
use crate::key::KeyDraft;
use crate::{EntryOptions, Key, LoadError, TieredCache};

/// What a body yields to the read path: `Arc<V>` (always cached) or
/// `Option<Arc<V>>` (`None` cached only with `negative_ttl`).
pub trait Shape<V>: Clone + Sized {
    /// Whether `None` is a value (negative caching) rather than a miss.
    const NEGATIVES: bool;
    /// The form the read path stores.
    fn into_cached(self) -> Option<Arc<V>>;
    /// The read path's answer in this shape; `None` when it does not fit
    /// (the caller then uses its own body's result).
    fn from_cached(value: Option<Arc<V>>) -> Option<Self>;
}

impl<V> Shape<V> for Arc<V> {
    const NEGATIVES: bool = false;
    fn into_cached(self) -> Option<Arc<V>> {
        Some(self)
    }
    fn from_cached(value: Option<Arc<V>>) -> Option<Self> {
        value
    }
}

impl<V> Shape<V> for Option<Arc<V>> {
    const NEGATIVES: bool = true;
    fn into_cached(self) -> Option<Arc<V>> {
        self
    }
    fn from_cached(value: Option<Arc<V>>) -> Option<Self> {
        Some(value)
    }
}

/// A return type that `#[cached]` can cache, with `V` the cached value (the
/// `V` of the key): splits into a [`Shape`] or the body's error, and is
/// put back together from them.
///
/// | return type | `Shape` | `Err` |
/// |---|---|---|
/// | `V` (`V: Clone`), `Arc<V>` | `Arc<V>` | `Infallible` |
/// | `Option<V>` (`V: Clone`), `Option<Arc<V>>` | `Option<Arc<V>>` | `Infallible` |
/// | `Result<V, E>` (`V: Clone`), `Result<Arc<V>, E>` | `Arc<V>` | `E` |
/// | `Result<Option<V>, E>` (`V: Clone`), `Result<Option<Arc<V>>, E>` | `Option<Arc<V>>` | `E` |
pub trait Returns<V>: Sized {
    /// The body's error type; `Infallible` for a return type that is not a
    /// `Result`.
    type Err;
    /// The form the read path caches.
    type Shape: Shape<V>;
    /// The body's result, as the read path takes it.
    fn split(self) -> Result<Self::Shape, Self::Err>;
    /// The caller's answer.
    fn join(parts: Result<Self::Shape, Self::Err>) -> Self;
}

fn infallible<T>(parts: Result<T, Infallible>) -> T {
    match parts {
        Ok(value) => value,
        Err(never) => match never {},
    }
}

impl<V: Clone> Returns<V> for V {
    type Err = Infallible;
    type Shape = Arc<V>;
    fn split(self) -> Result<Arc<V>, Infallible> {
        Ok(Arc::new(self))
    }
    fn join(parts: Result<Arc<V>, Infallible>) -> Self {
        Arc::unwrap_or_clone(infallible(parts))
    }
}

impl<V> Returns<V> for Arc<V> {
    type Err = Infallible;
    type Shape = Arc<V>;
    fn split(self) -> Result<Arc<V>, Infallible> {
        Ok(self)
    }
    fn join(parts: Result<Arc<V>, Infallible>) -> Self {
        infallible(parts)
    }
}

impl<V: Clone> Returns<V> for Option<V> {
    type Err = Infallible;
    type Shape = Option<Arc<V>>;
    fn split(self) -> Result<Option<Arc<V>>, Infallible> {
        Ok(self.map(Arc::new))
    }
    fn join(parts: Result<Option<Arc<V>>, Infallible>) -> Self {
        infallible(parts).map(Arc::unwrap_or_clone)
    }
}

impl<V> Returns<V> for Option<Arc<V>> {
    type Err = Infallible;
    type Shape = Option<Arc<V>>;
    fn split(self) -> Result<Option<Arc<V>>, Infallible> {
        Ok(self)
    }
    fn join(parts: Result<Option<Arc<V>>, Infallible>) -> Self {
        infallible(parts)
    }
}

impl<V: Clone, E> Returns<V> for Result<V, E> {
    type Err = E;
    type Shape = Arc<V>;
    fn split(self) -> Result<Arc<V>, E> {
        self.map(Arc::new)
    }
    fn join(parts: Result<Arc<V>, E>) -> Self {
        parts.map(Arc::unwrap_or_clone)
    }
}

impl<V, E> Returns<V> for Result<Arc<V>, E> {
    type Err = E;
    type Shape = Arc<V>;
    fn split(self) -> Self {
        self
    }
    fn join(parts: Self) -> Self {
        parts
    }
}

impl<V: Clone, E> Returns<V> for Result<Option<V>, E> {
    type Err = E;
    type Shape = Option<Arc<V>>;
    fn split(self) -> Result<Option<Arc<V>>, E> {
        self.map(|v| v.map(Arc::new))
    }
    fn join(parts: Result<Option<Arc<V>>, E>) -> Self {
        parts.map(|v| v.map(Arc::unwrap_or_clone))
    }
}

impl<V, E> Returns<V> for Result<Option<Arc<V>>, E> {
    type Err = E;
    type Shape = Option<Arc<V>>;
    fn split(self) -> Self {
        self
    }
    fn join(parts: Self) -> Self {
        parts
    }
}

/// The error the read path sees from a `#[cached]` body: the body's own
/// error stays with the caller that ran it; waiters get a copy when the
/// type allows.
#[derive(Debug)]
struct Failed<E>(Option<E>);

/// The entry point of generated code: the cached answer for `key`, or the
/// answer of `body` run as its loader through [`TieredCache::load_inline`].
///
/// `key` comes as a draft on the stack: a fresh L1 hit that needs no
/// refresh is answered from it directly, and only a call that goes on
/// builds the [`Key`] (the same text).
///
/// `share` copies a failed load's error for the callers that waited on it
/// (from [`ErrorShare`](super::ErrorShare); `None` when it cannot be
/// copied). `Ok` answers are cached as [`Returns`] says, errors never.
///
/// The body's future lives here, pinned, and the read path only borrows it:
/// if the read path drops its loader early (a hard timeout), this caller
/// finishes the body itself, so every path ends in a value or the body's
/// own error, never a panic:
/// * the read path's value (a hit, this body's load, a stale fallback);
/// * this caller's own result when its body ran (an error is never shared
///   back through the cache, so the caller gets it by value);
/// * a copy of the leader's error, for a waiter, when `share` allows;
/// * the answer of a body that a hard timeout cut off, once it finished;
/// * otherwise the caller goes round again, and runs its own body when its
///   turn comes.
///
/// **One body at a time per key.** A body runs only while its caller holds
/// the key's *turn* (a flight of its own in the cache's table): the loader
/// takes it before the body starts and the caller gives it up when the body
/// has finished, even after a hard timeout cut the load off. So when
/// waiters cannot use the leader's answer (an error that cannot be copied,
/// a hard timeout) they wait for the body still running, take its answer
/// if they can, or else take turns: a failing database sees one query per
/// key at a time, not one per caller.
pub async fn cached<V, R, F, Fut>(
    cache: &TieredCache,
    key: KeyDraft<V>,
    options: &EntryOptions,
    share: Share<R::Err>,
    body: F,
) -> R
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Returns<V>,
    R::Err: Send + Sync + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = R>,
{
    // The common hit first: from L1, before the key's `String` and the
    // loader exist.
    let negatives = <R::Shape as Shape<V>>::NEGATIVES;
    if let Some(hit) = cache
        .plain_l1_hit::<V>(key.as_bytes(), options, negatives)
        .await
    {
        if let Some(shape) = <R::Shape as Shape<V>>::from_cached(hit) {
            return R::join(Ok(shape));
        }
    }
    let key = key.into_key();
    let body = async move { body().await.split() };
    R::join(load(cache, &key, options, share, body).await)
}

/// What the holder of a key's turn leaves for the callers that waited on it.
enum Answer<V, E> {
    Value(Option<Arc<V>>),
    Error(E),
    Nothing,
}

/// The turn's flight result (the flight table wants `Clone`).
type Turn<V, E> = Arc<Answer<V, E>>;

impl<V, E> Answer<V, E> {
    fn of<S: Shape<V>>(own: &Result<S, E>, share: Share<E>) -> Self {
        match (own, share) {
            (Ok(value), _) => Answer::Value(value.clone().into_cached()),
            (Err(e), Some(copy)) => Answer::Error(copy(e)),
            (Err(_), None) => Answer::Nothing,
        }
    }

    fn to_result<S: Shape<V>>(&self, share: Share<E>) -> Option<Result<S, E>> {
        match (self, share) {
            (Answer::Value(value), _) => S::from_cached(value.clone()).map(Ok),
            (Answer::Error(e), Some(copy)) => Some(Err(copy(e))),
            _ => None,
        }
    }
}

/// Takes `key`'s turn, after the body that holds it (if any) has finished.
async fn take_turn<V, E>(cache: &TieredCache, key: &str) -> Leader
where
    V: Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    loop {
        match cache.inner.flights.join::<Turn<V, E>>(key) {
            Join::Leader(turn) => return turn,
            Join::Waiter(waiter) => {
                let _ = waiter.wait::<Turn<V, E>>().await;
            }
        }
    }
}

/// The answer of the body that holds `key`'s turn, once it finishes; `None`
/// when no body runs or it left nothing usable.
async fn turn_answer<V, E>(cache: &TieredCache, key: &str) -> Option<Turn<V, E>>
where
    V: Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    match cache.inner.flights.join::<Turn<V, E>>(key) {
        Join::Leader(_) => None,
        Join::Waiter(waiter) => waiter.wait::<Turn<V, E>>().await,
    }
}

async fn load<V, E, S, Fut>(
    cache: &TieredCache,
    key: &Key<V>,
    options: &EntryOptions,
    share: Share<E>,
    body: Fut,
) -> Result<S, E>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    E: Send + Sync + 'static,
    S: Shape<V>,
    Fut: Future<Output = Result<S, E>>,
{
    let mut body = std::pin::pin!(body);
    loop {
        let mut outcome: Option<Result<S, E>> = None;
        // Held from before this caller's body starts until it has finished.
        let mut turn: Option<Leader> = None;
        let result = {
            let (body, outcome, turn) = (&mut body, &mut outcome, &mut turn);
            let loader = move || async move {
                *turn = Some(take_turn::<V, E>(cache, key.as_str()).await);
                match body.as_mut().await {
                    Ok(value) => {
                        let cached = value.clone().into_cached();
                        *outcome = Some(Ok(value));
                        Ok(cached)
                    }
                    Err(e) => {
                        let for_waiters = share.map(|copy| copy(&e));
                        *outcome = Some(Err(e));
                        Err(Failed(for_waiters))
                    }
                }
            };
            cache
                .load_inline::<V, crate::Postcard, Failed<E>, _, _>(
                    key,
                    options,
                    S::NEGATIVES,
                    loader,
                )
                .await
        };
        let served = match result {
            Ok(value) => S::from_cached(value).map(Ok),
            Err(LoadError::Loader(failed)) if turn.is_none() => match (share, &failed.0) {
                (Some(copy), Some(e)) => Some(Err(copy(e))),
                _ => None,
            },
            Err(_) => None,
        };
        if let Some(turn) = turn {
            // This caller's body ran, or started and was cut off by a hard
            // timeout: finish it, then hand its answer to whoever waits.
            let answer = match (served, outcome) {
                (Some(served), _) => served,
                (None, Some(own)) => own,
                (None, None) => body.as_mut().await,
            };
            turn.finish::<Turn<V, E>>(Arc::new(Answer::of(&answer, share)));
            return answer;
        }
        if let Some(served) = served {
            return served;
        }
        // Nothing usable from the read path: the body that failed or timed
        // out may still be running; take its answer, or go round again.
        if let Some(answer) = turn_answer::<V, E>(cache, key.as_str()).await {
            if let Some(result) = answer.to_result(share) {
                return result;
            }
        }
    }
}
