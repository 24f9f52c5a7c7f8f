//! The default cache of `#[cached]` functions that have no `cache = ..`
//! argument: the cache of the innermost [`scope`] around the call, else the
//! one given to [`install`].

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, ErrorKind};
use crate::TieredCache;

static INSTALLED: OnceLock<TieredCache> = OnceLock::new();

tokio::task_local! {
    static SCOPED: TieredCache;
}

/// Installs `cache` as the process-wide default of `#[cached]` functions
/// that do not name a cache with `cache = ..`. Call it once at startup,
/// before the first such call.
///
/// Which cache a `#[cached]` function uses, first rule that applies:
/// 1. its `cache = ..` argument;
/// 2. the cache of the innermost [`scope`] the call runs in;
/// 3. the cache installed here.
///
/// Until a cache is installed (and outside any [`scope`]), those functions
/// run their body on every call, uncached, and the first such call logs a
/// warning: a missing `install` slows a service down but never breaks it.
///
/// # Errors
/// An error of kind [`ErrorKind::Config`] when a cache is already
/// installed: the first one stays for the life of the process. To use
/// another cache for some calls (a test, a second tenant), run them inside
/// [`scope`] or give the functions `cache = ..`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tiered_cache::Error> {
/// use tiered_cache::{ErrorKind, TieredCache};
///
/// tiered_cache::install(TieredCache::builder().build().await?)?;
/// assert!(tiered_cache::default_cache().is_some());
///
/// let second = tiered_cache::install(TieredCache::builder().build().await?);
/// assert_eq!(second.unwrap_err().kind(), ErrorKind::Config);
/// # Ok(()) }
/// ```
pub fn install(cache: TieredCache) -> Result<(), Error> {
    INSTALLED.set(cache).map_err(|_| {
        Error::new(
            ErrorKind::Config,
            "a cache is already installed: tiered_cache::install works once per process and \
             the first cache stays in use; to use another cache, run the calls inside \
             tiered_cache::scope(&cache, ..) or give the #[cached] functions `cache = ..`",
        )
    })
}

/// Runs `fut` with `cache` as the default of the `#[cached]` functions it
/// calls that have no `cache = ..` argument, in place of the cache given
/// to [`install`] (like tracing's `with_default`, for one future).
///
/// Scopes nest: the innermost one wins. `cache = ..` still beats any scope.
/// The scope belongs to `fut`'s task: a task that `fut` spawns does not
/// inherit it (wrap the spawned future in `scope` too).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tiered_cache::Error> {
/// use tiered_cache::TieredCache;
///
/// let cache = TieredCache::builder().build().await?;
/// assert!(tiered_cache::default_cache().is_none()); // nothing installed
/// tiered_cache::scope(&cache, async {
///     assert!(tiered_cache::default_cache().is_some());
/// })
/// .await;
/// # Ok(()) }
/// ```
pub async fn scope<F: Future>(cache: &TieredCache, fut: F) -> F::Output {
    SCOPED.scope(cache.clone(), fut).await
}

/// The cache a `#[cached]` function without `cache = ..` would use if
/// called here: the innermost [`scope`]'s, else the [`install`]ed one, else
/// `None`.
pub fn default_cache() -> Option<TieredCache> {
    default_ref().map(Cow::into_owned)
}

/// Like [`default_cache`], without a handle of its own for the installed
/// cache.
fn default_ref() -> Option<Cow<'static, TieredCache>> {
    match SCOPED.try_with(TieredCache::clone) {
        Ok(scoped) => Some(Cow::Owned(scoped)),
        Err(_) => INSTALLED.get().map(Cow::Borrowed),
    }
}

/// For generated code: the default cache (see [`install`]), or `None`
/// after logging that `function` runs uncached. The warning is about the
/// process, not a cache, so it is logged once per process.
#[doc(hidden)]
pub fn default_cache_for(function: &'static str) -> Option<Cow<'static, TieredCache>> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let cache = default_ref();
    if cache.is_none() && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            function,
            "#[cached] function called with no cache: it runs uncached (and so does every \
             other #[cached] function without `cache = ..`) until tiered_cache::install(cache) \
             is called, or inside tiered_cache::scope(&cache, ..)"
        );
    }
    cache
}
