//! Cache warming: load a list of keys before traffic arrives (after a
//! deploy, or after a Redis outage), with bounded concurrency, so the
//! database sees at most that many queries at once.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::TieredCache;
use crate::codec::Codec;
use crate::key::Key;
use crate::options::EntryOptions;

/// How far a warm-up has come, as given to
/// [`Warmer::on_progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmProgress {
    /// Keys dealt with so far (loaded, found cached, or failed).
    pub done: u64,
    /// Keys in all.
    pub total: u64,
}

impl WarmProgress {
    /// `done / total` as a percentage (100 for an empty list).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        }
    }
}

/// What a warm-up did, from [`Warmer::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmReport {
    /// Keys in the list.
    pub total: u64,
    /// Keys already cached (in L1 or Redis), not loaded again.
    pub already_cached: u64,
    /// Keys loaded and cached.
    pub loaded: u64,
    /// Keys whose loader failed or timed out (nothing cached for them).
    pub failed: u64,
}

type Progress = Arc<dyn Fn(WarmProgress) + Send + Sync>;

/// A running warm-up's count of finished keys.
struct Tally {
    total: u64,
    done: AtomicU64,
    last_log: Mutex<Instant>,
}

/// A warm-up to run, from [`TieredCache::warm`]; set it up, then
/// [`run`](Self::run) it.
pub struct Warmer<V, C, F> {
    cache: TieredCache,
    keys: Vec<Key<V, C>>,
    loader: Arc<F>,
    options: EntryOptions,
    concurrency: usize,
    jitter: Duration,
    progress: Option<Progress>,
    log_every: Duration,
}

impl<V, C, F> std::fmt::Debug for Warmer<V, C, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warmer")
            .field("keys", &self.keys.len())
            .field("concurrency", &self.concurrency)
            .field("jitter", &self.jitter)
            .finish_non_exhaustive()
    }
}

impl TieredCache {
    /// A warm-up of `keys`: each one not cached yet (in L1 or Redis) is
    /// loaded with `loader` and cached, at most 8 at a time by default.
    /// Keys found in Redis are brought into L1 on the way.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tiered_cache::{EntryOptions, Key, TieredCache};
    /// let cache = TieredCache::builder().build().await.unwrap();
    /// let keys: Vec<Key<u64>> = (0..100).map(|id| Key::new("square", 1).arg(id)).collect();
    /// let report = cache
    ///     .warm(keys, |key: Key<u64>| async move {
    ///         let id: u64 = key.as_str().trim_matches(|c| c == '{' || c == '}')
    ///             .rsplit(':').next().unwrap().parse().unwrap();
    ///         Ok::<_, std::io::Error>(id * id)
    ///     })
    ///     .concurrency(16)
    ///     .on_progress(|p| if p.done == p.total { println!("warm") })
    ///     .run()
    ///     .await;
    /// assert_eq!(report.loaded, 100);
    /// # }
    /// ```
    pub fn warm<V, C, E, F, Fut>(
        &self,
        keys: impl IntoIterator<Item = Key<V, C>>,
        loader: F,
    ) -> Warmer<V, C, F>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        C: Codec,
        E: Send + Sync + 'static,
        F: Fn(Key<V, C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        Warmer {
            cache: self.clone(),
            keys: keys.into_iter().collect(),
            loader: Arc::new(loader),
            options: EntryOptions::default(),
            concurrency: 8,
            jitter: Duration::ZERO,
            progress: None,
            log_every: Duration::from_secs(5),
        }
    }
}

impl<V, C, E, F, Fut> Warmer<V, C, F>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
    E: Send + Sync + 'static,
    F: Fn(Key<V, C>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<V, E>> + Send + 'static,
{
    /// How the loaded entries are cached. Default: the cache's defaults.
    #[must_use]
    pub fn options(mut self, options: EntryOptions) -> Self {
        self.options = options;
        self
    }

    /// The most loader calls at once (at least 1). Default: 8.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Waits a random time up to `max` before each load, so instances
    /// warming together spread their queries. Default: none.
    #[must_use]
    pub fn jitter(mut self, max: Duration) -> Self {
        self.jitter = max;
        self
    }

    /// Called after each key (from the warming task; keep it quick), so a
    /// service can gate its readiness on `done == total`.
    #[must_use]
    pub fn on_progress(mut self, progress: impl Fn(WarmProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }

    /// How often a progress line is logged (at `info`). Default: 5 s.
    #[must_use]
    pub fn log_every(mut self, every: Duration) -> Self {
        self.log_every = every;
        self
    }

    /// Runs the warm-up to its end. A failing key is counted and skipped,
    /// never retried here; the others go on.
    ///
    /// The future is `Send` (proven here, for every loader type), so a
    /// service can spawn its warm-up.
    pub fn run(self) -> impl Future<Output = WarmReport> + Send {
        self.run_to_end()
    }

    async fn run_to_end(self) -> WarmReport {
        // Owned by every load future, so the warm-up can be spawned.
        let this = Arc::new(self);
        let tally = Tally {
            total: this.keys.len() as u64,
            done: AtomicU64::new(0),
            last_log: Mutex::new(Instant::now()),
        };
        let mut report = WarmReport {
            total: tally.total,
            ..WarmReport::default()
        };
        // Which keys are cached already: one batch read per 100 keys.
        let mut missing = Vec::new();
        for start in (0..this.keys.len()).step_by(100) {
            let batch: Vec<Key<V, C>> =
                this.keys[start..(start + 100).min(this.keys.len())].to_vec();
            let found = this.cache.get_many(&batch).await;
            let mut cached = 0;
            for (key, value) in batch.into_iter().zip(found) {
                match value {
                    Some(_) => cached += 1,
                    None => missing.push(key),
                }
            }
            report.already_cached += cached;
            if cached > 0 {
                this.tick(&tally, cached);
            }
        }
        let mut loads = stream::iter(missing)
            .map(|key| {
                let this = Arc::clone(&this);
                async move { this.load_one(key).await }
            })
            .buffer_unordered(this.concurrency);
        while let Some(loaded) = loads.next().await {
            if loaded {
                report.loaded += 1;
            } else {
                report.failed += 1;
            }
            this.tick(&tally, 1);
        }
        tracing::info!(
            total = report.total,
            loaded = report.loaded,
            already_cached = report.already_cached,
            failed = report.failed,
            "cache warm-up finished"
        );
        report
    }

    /// `n` more keys are done: tells the progress callback, and the log
    /// every `log_every`.
    fn tick(&self, tally: &Tally, n: u64) {
        let done = tally.done.fetch_add(n, Ordering::Relaxed) + n;
        let progress = WarmProgress {
            done,
            total: tally.total,
        };
        if let Some(report) = &self.progress {
            report(progress);
        }
        let mut last = tally.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= self.log_every {
            *last = Instant::now();
            tracing::info!(
                done,
                total = tally.total,
                "cache warm-up: {:.0}% done",
                progress.percent()
            );
        }
    }

    /// Loads one key (after its jitter); whether it is now cached.
    async fn load_one(&self, key: Key<V, C>) -> bool {
        if !self.jitter.is_zero() {
            let wait = self.jitter.mul_f64(rand::random::<f64>());
            tokio::time::sleep(wait).await;
        }
        let loader = Arc::clone(&self.loader);
        let owned = key.clone();
        self.cache
            .get_or_load(&key, &self.options, move || loader(owned))
            .await
            .is_ok()
    }
}
