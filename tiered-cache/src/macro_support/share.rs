//! How the waiters of a failed load get its error.

use std::error::Error;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

/// How to copy a failed load's error for the callers that waited on it, if
/// it can be copied.
pub type Share<E> = Option<fn(&E) -> E>;

/// Whether coalesced callers can share a failed load's error, and how:
/// * `E: Clone`: each waiter gets a clone;
/// * else, when `E` converts from a [`SharedError`] and derefs to
///   `dyn Error` (`anyhow::Error`, `Box<dyn Error + Send + Sync>`): each
///   waiter gets a `SharedError` that displays like the leader's error and
///   has the same source chain;
/// * else none: the waiters take turns running their own bodies, one at a
///   time.
///
/// Chosen by method resolution, like [`Part`](super::Part): generated code
/// calls `ErrorShare::<E>::new().share()` where `E` is concrete.
#[derive(Debug)]
pub struct ErrorShare<E>(WrapErrorShare<E>);

/// The second choice of [`ErrorShare`]: wrap the error in a [`SharedError`].
#[derive(Debug)]
pub struct WrapErrorShare<E>(NoErrorShare<E>);

/// The fallback of [`ErrorShare`] for errors that are not `Clone`.
#[derive(Debug)]
pub struct NoErrorShare<E>(PhantomData<fn() -> E>);

impl<E> ErrorShare<E> {
    /// The probe.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        ErrorShare(WrapErrorShare(NoErrorShare(PhantomData)))
    }
}

impl<E: Clone> ErrorShare<E> {
    /// How to copy the error for a waiter.
    pub fn share(&self) -> Share<E> {
        Some(<E as Clone>::clone)
    }
}

impl<E> Deref for ErrorShare<E> {
    type Target = WrapErrorShare<E>;
    fn deref(&self) -> &WrapErrorShare<E> {
        &self.0
    }
}

impl<E> WrapErrorShare<E>
where
    E: From<SharedError> + Deref<Target = dyn Error + Send + Sync + 'static>,
{
    /// How to wrap the error for a waiter.
    pub fn share(&self) -> Share<E> {
        Some(|e| E::from(SharedError::of(&**e)))
    }
}

impl<E> Deref for WrapErrorShare<E> {
    type Target = NoErrorShare<E>;
    fn deref(&self) -> &NoErrorShare<E> {
        &self.0
    }
}

impl<E> NoErrorShare<E> {
    /// The error cannot be copied.
    pub fn share(&self) -> Share<E> {
        None
    }
}

/// What the callers that waited on a failed load get when its error is not
/// `Clone`: the leader's error as it was when the load failed, its message
/// (`Display`, `Debug`) and its [`source`](Error::source) chain, behind an
/// `Arc` that every waiter shares. The caller that ran the body keeps the
/// original.
#[derive(Clone)]
pub struct SharedError(Arc<Rendered>);

struct Rendered {
    display: String,
    debug: String,
    source: Option<SharedError>,
}

impl SharedError {
    /// Longer chains are cut (a chain that loops would never end).
    const MAX_CHAIN: usize = 32;

    /// `error` and its chain, rendered once.
    pub fn of(error: &(dyn Error + 'static)) -> Self {
        Self::chain(error, Self::MAX_CHAIN)
    }

    fn chain(error: &(dyn Error + 'static), depth: usize) -> Self {
        if let Some(shared) = error.downcast_ref::<SharedError>() {
            return shared.clone();
        }
        let source = match (error.source(), depth) {
            (Some(source), 1..) => Some(Self::chain(source, depth - 1)),
            _ => None,
        };
        SharedError(Arc::new(Rendered {
            display: error.to_string(),
            debug: format!("{error:?}"),
            source,
        }))
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.display)
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.debug)
    }
}

impl Error for SharedError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source.as_ref().map(|s| s as &(dyn Error + 'static))
    }
}

/// The parts of a `Result` return type, named through the type as written
/// (aliases like `anyhow::Result<T>` included): the probe above names the
/// error type as `<R as ResultParts>::Err`.
pub trait ResultParts {
    /// The error type.
    type Err;
}

impl<T, E> ResultParts for core::result::Result<T, E> {
    type Err = E;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_share_needs_clone() {
        #[derive(Clone)]
        struct Cloned;
        struct NotCloned;
        assert!(ErrorShare::<Cloned>::new().share().is_some());
        assert!(ErrorShare::<NotCloned>::new().share().is_none());
        type Boxed = Box<dyn Error + Send + Sync>;
        assert!(ErrorShare::<Boxed>::new().share().is_some());
    }

    #[test]
    fn a_shared_error_keeps_the_message_and_the_chain() {
        let io = std::io::Error::other("refused");
        let boxed: Box<dyn Error + Send + Sync> = Box::new(io);
        let copy = ErrorShare::<Box<dyn Error + Send + Sync>>::new()
            .share()
            .unwrap();
        let shared = copy(&boxed);
        assert_eq!(shared.to_string(), "refused");
        assert_eq!(format!("{shared:?}"), format!("{boxed:?}"));
        // a copy of a copy shares the same rendering
        let again = copy(&shared);
        fn inner(e: &(dyn Error + Send + Sync + 'static)) -> *const Rendered {
            Arc::as_ptr(&e.downcast_ref::<SharedError>().unwrap().0)
        }
        assert_eq!(inner(&*again), inner(&*shared));
    }
}
