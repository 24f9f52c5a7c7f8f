//! The read path against a real Redis: negative caching and TTL jitter.
//! Every test counts what happened (loader calls, the cache's counters,
//! what Redis holds). Single-flight, early refresh and fail-safe, and batch
//! reads have files of their own. Each test runs on a Redis of its own and
//! on a Redis Cluster.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{cache_on, counter, exists, item, redis_key, Backend, DbError, Item, TestRedis};
use tiered_cache::{EntryOptions, TieredCache};

crate::on_both_backends!(
    a_none_is_cached_only_with_a_negative_ttl,
    jitter_spreads_expiries
);

// ---------------------------------------------------------------- negative caching, jitter

/// `try_get_or_load` of `key` with a loader that counts its calls and finds
/// nothing.
async fn load_nothing(
    cache: &TieredCache,
    key: &Item,
    opts: &EntryOptions,
    calls: &Arc<AtomicUsize>,
) -> Option<Arc<String>> {
    let calls = calls.clone();
    cache
        .try_get_or_load(key, opts, move || {
            calls.fetch_add(1, SeqCst);
            std::future::ready(Ok::<_, DbError>(None))
        })
        .await
        .unwrap()
}

async fn a_none_is_cached_only_with_a_negative_ttl(backend: &Backend) {
    let cache = cache_on(backend, "negative").await;
    let (on, off) = (item(1), item(2));
    let calls = counter();

    let negative = EntryOptions::new(Duration::from_secs(60)).negative_ttl(Duration::from_secs(5));
    assert_eq!(load_nothing(&cache, &on, &negative, &calls).await, None);
    assert_eq!(load_nothing(&cache, &on, &negative, &calls).await, None);
    assert_eq!(calls.load(SeqCst), 1, "the second call hit the cached None");
    assert_eq!(cache.stats().negative_hits, 1);
    assert!(
        exists(backend, &redis_key("negative", &on)),
        "the None is in Redis too"
    );
    // Another instance finds it in Redis.
    let other = cache_on(backend, "negative").await;
    assert_eq!(load_nothing(&other, &on, &negative, &calls).await, None);
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(other.stats().negative_hits, 1);

    let calls = counter();
    let plain = EntryOptions::new(Duration::from_secs(60));
    assert_eq!(load_nothing(&cache, &off, &plain, &calls).await, None);
    assert_eq!(load_nothing(&cache, &off, &plain, &calls).await, None);
    assert_eq!(
        calls.load(SeqCst),
        2,
        "without a negative TTL, None is not cached"
    );
    assert!(!exists(backend, &redis_key("negative", &off)));
    assert_eq!(cache.stats().negative_hits, 1);
}

async fn jitter_spreads_expiries(backend: &Backend) {
    let cache = cache_on(backend, "jitter").await;
    let opts = EntryOptions::new(Duration::from_secs(10)).jitter(Duration::from_secs(5));
    let started = Instant::now();
    for n in 0..200 {
        cache.set(&item(n), format!("v{n}"), &opts).await.unwrap();
    }
    let pttls: Vec<i64> = (0..200)
        .map(|n| backend.query(redis::cmd("PTTL").arg(redis_key("jitter", &item::<String>(n)))))
        .collect();
    let elapsed = started.elapsed().as_millis() as i64;
    let (min, max) = (*pttls.iter().min().unwrap(), *pttls.iter().max().unwrap());
    println!(
        "jitter: 200 entries, PTTL min = {min} ms, max = {max} ms, spread = {} ms",
        max - min
    );
    // Each TTL is 10 s plus up to 5 s; PTTL has run down by at most `elapsed`.
    for pttl in &pttls {
        assert!(
            (10_000 - elapsed..=15_000).contains(pttl),
            "PTTL {pttl} ms (elapsed {elapsed} ms)"
        );
    }
    assert!(max - min > 2_000, "spread {} ms", max - min);
}
