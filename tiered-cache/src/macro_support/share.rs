//! How the waiters of a failed load get its error.

use std::marker::PhantomData;
use std::ops::Deref;

/// How to copy a failed load's error for the callers that waited on it, if
/// it can be copied.
pub type Share<E> = Option<fn(&E) -> E>;

/// Whether coalesced callers can share a failed load's error: yes when the
/// error type is `Clone` (each waiter gets a clone), else each waiter runs
/// its own call (uncached). Chosen by method resolution, like
/// [`Part`](super::Part): generated code calls
/// `ErrorShare::<E>::new().share()` where `E` is concrete.
#[derive(Debug)]
pub struct ErrorShare<E>(NoErrorShare<E>);

/// The fallback of [`ErrorShare`] for errors that are not `Clone`.
#[derive(Debug)]
pub struct NoErrorShare<E>(PhantomData<fn() -> E>);

impl<E> ErrorShare<E> {
    /// The probe.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        ErrorShare(NoErrorShare(PhantomData))
    }
}

impl<E: Clone> ErrorShare<E> {
    /// How to copy the error for a waiter.
    pub fn share(&self) -> Share<E> {
        Some(<E as Clone>::clone)
    }
}

impl<E> Deref for ErrorShare<E> {
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
    }
}
