//! The default cache of `#[cached]` functions without `cache = ..`: a
//! `scope` beats `install`, `cache = ..` beats both, a second `install` is
//! an error, and with no cache the body runs uncached.
//!
//! `install` is once per process, so the steps that depend on whether a
//! cache is installed run in order in one test.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use tiered_cache::{cached, default_cache, install, scope, ErrorKind, TieredCache};

static CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "plus-one:{id}")]
async fn plus_one(id: u64) -> u64 {
    CALLS.fetch_add(1, SeqCst);
    id + 1
}

static PINNED_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "pinned:{id}", cache = cache)]
async fn pinned(cache: &TieredCache, id: u64) -> u64 {
    PINNED_CALLS.fetch_add(1, SeqCst);
    id
}

async fn l1_only() -> TieredCache {
    TieredCache::builder().build().await.unwrap()
}

/// Which of `caches` hold `plus_one(id)`'s entry.
async fn holders(caches: &[&TieredCache], id: u64) -> Vec<bool> {
    let mut out = Vec::new();
    for cache in caches {
        out.push(cache.get(&plus_one_key(id)).await.is_some());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_cache() {
    let (a, b, c) = (l1_only().await, l1_only().await, l1_only().await);

    // Nothing installed, no scope: no panic, no error, just uncached.
    assert!(default_cache().is_none());
    assert_eq!(plus_one(1).await, 2);
    assert_eq!(plus_one(1).await, 2);
    assert_eq!(CALLS.load(SeqCst), 2, "uncached without a cache");

    // A scope routes the calls inside it to its cache.
    scope(&a, async {
        assert_eq!(plus_one(1).await, 2);
        assert_eq!(plus_one(1).await, 2);
    })
    .await;
    assert_eq!(CALLS.load(SeqCst), 3, "cached in the scope");
    assert_eq!(holders(&[&a, &b], 1).await, [true, false]);
    assert!(default_cache().is_none(), "the scope ended");

    // Scopes nest: the innermost wins, and the outer one is back after it.
    scope(&a, async {
        scope(&b, async {
            assert_eq!(plus_one(2).await, 3);
        })
        .await;
        assert_eq!(plus_one(3).await, 4);
    })
    .await;
    assert_eq!(holders(&[&a, &b], 2).await, [false, true]);
    assert_eq!(holders(&[&a, &b], 3).await, [true, false]);

    // A second install is an error, and the first cache stays.
    install(a.clone()).unwrap();
    let second = install(b.clone()).unwrap_err();
    assert_eq!(second.kind(), ErrorKind::Config);
    assert!(second.to_string().contains("scope"), "{second}");
    assert_eq!(plus_one(4).await, 5);
    assert_eq!(holders(&[&a, &b], 4).await, [true, false]);

    // A scope beats install; a spawned task does not inherit the scope.
    scope(&b, async {
        assert_eq!(plus_one(5).await, 6);
        tokio::spawn(plus_one(6)).await.unwrap();
    })
    .await;
    assert_eq!(holders(&[&a, &b], 5).await, [false, true]);
    assert_eq!(holders(&[&a, &b], 6).await, [true, false]);

    // `cache = ..` beats both.
    scope(&b, async {
        assert_eq!(pinned(&c, 7).await, 7);
        assert_eq!(pinned(&c, 7).await, 7);
    })
    .await;
    assert_eq!(PINNED_CALLS.load(SeqCst), 1);
    assert!(c.get(&pinned_key(7)).await.is_some());
    assert!(a.get(&pinned_key(7)).await.is_none());
    assert!(b.get(&pinned_key(7)).await.is_none());
}
