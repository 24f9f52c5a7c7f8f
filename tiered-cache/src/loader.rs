//! Loaders as the read path runs them: owned ones can finish in the
//! background after their caller has an answer; borrowed ones cannot.
//!
//! `get_or_load` takes `'static` loaders, so stale-while-revalidate, soft
//! timeouts and XFetch refreshes run in background tasks. `#[cached]`
//! functions borrow their arguments and `self`, so their bodies run in the
//! caller's task: the one caller that refreshes waits for it, every other
//! caller is still served the cached or stale value.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

/// A loader of one key: `Ok(None)` is "nothing there" (negative caching).
/// Values come in an `Arc`, the form both tiers and every caller share.
pub(crate) trait Load<V, E>: Sized {
    type Fut: Future<Output = Result<Option<Arc<V>>, E>>;
    /// The loader as a value that may move into a background task.
    type Detached: Load<V, E, Fut: Send + 'static> + Send + 'static;

    fn load(self) -> Self::Fut;

    /// The loader ready for a background task, or itself back when it
    /// borrows from its caller.
    fn detach(self) -> Result<Self::Detached, Self>;
}

/// A `'static` loader: may run in the background.
pub(crate) struct Owned<F>(pub(crate) F);

impl<V, E, F, Fut> Load<V, E> for Owned<F>
where
    V: 'static,
    E: 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<Arc<V>>, E>> + Send + 'static,
{
    type Fut = Fut;
    type Detached = Self;

    fn load(self) -> Fut {
        (self.0)()
    }

    fn detach(self) -> Result<Self, Self> {
        Ok(self)
    }
}

/// A loader that borrows from its caller: runs in the caller's task only.
pub(crate) struct Scoped<F>(pub(crate) F);

impl<V, E, F, Fut> Load<V, E> for Scoped<F>
where
    V: 'static,
    E: 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<Arc<V>>, E>>,
{
    type Fut = Fut;
    type Detached = Never<V, E>;

    fn load(self) -> Fut {
        (self.0)()
    }

    fn detach(self) -> Result<Never<V, E>, Self> {
        Err(self)
    }
}

/// The detached form of a loader that cannot be detached: no value exists.
pub(crate) struct Never<V, E>(Infallible, std::marker::PhantomData<fn() -> (V, E)>);

impl<V: 'static, E: 'static> Load<V, E> for Never<V, E> {
    type Fut = std::future::Pending<Result<Option<Arc<V>>, E>>;
    type Detached = Self;

    fn load(self) -> Self::Fut {
        match self.0 {}
    }

    fn detach(self) -> Result<Self, Self> {
        match self.0 {}
    }
}
