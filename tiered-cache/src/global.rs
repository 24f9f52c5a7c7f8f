//! The process-wide cache that `#[cached]` functions use when they have no
//! `cache = ..` argument.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, ErrorKind};
use crate::TieredCache;

static INSTALLED: OnceLock<TieredCache> = OnceLock::new();

/// Installs `cache` as the process-wide cache of `#[cached]` functions that
/// do not name one with `cache = ..`. Call it once at startup, before the
/// first such call.
///
/// The first installed cache stays for the life of the process: a second
/// call is ignored and logs a warning (tests that need their own cache pass
/// `cache = ..` instead).
///
/// Until a cache is installed, those functions run their body on every call,
/// uncached, and the first such call logs a warning: a missing `install` slows
/// a service down but never breaks it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cache = tiered_cache::TieredCache::builder().build().await.unwrap();
/// tiered_cache::install(cache);
/// assert!(tiered_cache::installed().is_some());
/// # }
/// ```
pub fn install(cache: TieredCache) {
    if INSTALLED.set(cache).is_err() {
        tracing::warn!(
            "tiered_cache::install called again: the cache installed first stays in use; \
             give #[cached] functions `cache = ..` to use another one"
        );
    }
}

/// The cache installed with [`install`], if any.
pub fn installed() -> Option<&'static TieredCache> {
    INSTALLED.get()
}

/// The installed cache, or an [`ErrorKind::NotInstalled`] error that says
/// what to do.
///
/// # Errors
/// When [`install`] has not been called yet.
pub fn try_installed() -> Result<&'static TieredCache, Error> {
    INSTALLED.get().ok_or_else(|| {
        Error::new(
            ErrorKind::NotInstalled,
            "no cache is installed: call tiered_cache::install(cache) at startup, \
             or give #[cached] functions `cache = ..`",
        )
    })
}

/// For generated code: the installed cache, or `None` after logging (once
/// per process) that `function` runs uncached.
pub fn installed_for(function: &'static str) -> Option<&'static TieredCache> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let cache = INSTALLED.get();
    if cache.is_none() && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            function,
            "#[cached] function called before tiered_cache::install(cache): it runs uncached \
             (and so does every other #[cached] function without `cache = ..`) until a cache \
             is installed"
        );
    }
    cache
}
