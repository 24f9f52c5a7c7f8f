//! Early refresh (XFetch) and fail-safe when the loader fails: a failed
//! refresh never hides a fresh value, and a failing loader is tried about
//! once per throttle period, with or without L1, however many callers.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{builder_on, server, until};
use tiered_cache::{EntryOptions, Key, TieredCache};

fn item(id: u64) -> Key<String> {
    Key::new("item", 1).arg(id)
}

#[derive(Debug)]
struct DbDown;

/// Loads `value`, taking `took` (XFetch's delta is the last load's time).
async fn load_slowly(cache: &TieredCache, key: &Key<String>, opts: &EntryOptions, took: Duration) {
    cache
        .get_or_load(key, opts, move || async move {
            tokio::time::sleep(took).await;
            Ok::<_, DbDown>("v1".to_owned())
        })
        .await
        .expect("loads");
}

/// An early refresh that fails leaves the fresh value as it was: `get`
/// still returns it (it used to be replaced by a fail-safe copy, which
/// `get` reads as a miss until TTL + grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_early_refresh_does_not_hide_the_fresh_value() {
    let server = server();
    let cache = builder_on(&server, "refresh-fresh")
        .build()
        .await
        .expect("build");
    let key = item(1);
    // Early refresh is all but certain on every hit: a 2 s TTL, a 200 ms
    // load and a huge beta.
    let opts = EntryOptions::new(Duration::from_secs(2))
        .stale(Duration::from_secs(10))
        .early_refresh(1_000.0);
    load_slowly(&cache, &key, &opts, Duration::from_millis(200)).await;

    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let hit = cache
        .get_or_load(&key, &opts, move || async move {
            c.fetch_add(1, SeqCst);
            Err::<String, _>(DbDown)
        })
        .await
        .expect("the fresh value");
    assert_eq!(*hit, "v1");
    until("the early refresh ran and failed", || {
        cache.stats().load_errors == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(
        cache.get(&key).await.as_deref().map(String::as_str),
        Some("v1")
    );
    assert_eq!(
        cache.get_many(std::slice::from_ref(&key)).await[0]
            .as_deref()
            .map(String::as_str),
        Some("v1")
    );
}

/// 8 callers hammer a key in its grace window whose loader fails, with
/// early refresh on (the default beta) and a slow first load: the loader
/// runs about once per throttle period, not on every XFetch draw.
async fn failing_loader_calls(cache: TieredCache, throttle: Duration) -> (usize, Duration) {
    let key = item(7);
    let opts = EntryOptions::new(Duration::from_millis(300))
        .stale(Duration::from_secs(30))
        .failsafe_throttle(throttle);
    load_slowly(&cache, &key, &opts, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(350)).await; // stale now

    let calls = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let run_for = Duration::from_millis(1500);
    let callers = (0..8).map(|_| {
        let (cache, key, opts, calls) =
            (cache.clone(), key.clone(), opts.clone(), Arc::clone(&calls));
        tokio::spawn(async move {
            while started.elapsed() < run_for {
                let calls = Arc::clone(&calls);
                let got = cache
                    .get_or_load(&key, &opts, move || async move {
                        calls.fetch_add(1, SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        Err::<String, _>(DbDown)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        panic!("the stale value stands in: {e:?} {:?}", cache.stats())
                    });
                assert_eq!(*got, "v1");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    });
    for caller in callers.collect::<Vec<_>>() {
        caller.await.expect("caller");
    }
    (calls.load(SeqCst), started.elapsed())
}

/// Runs [`failing_loader_calls`] with a 300 ms throttle and checks the
/// loader ran about once per period.
async fn assert_throttled(cache: TieredCache) {
    let throttle = Duration::from_millis(300);
    let (calls, elapsed) = failing_loader_calls(cache, throttle).await;
    let most = (elapsed.as_millis() / throttle.as_millis()) as usize + 2;
    println!("{calls} loader calls in {elapsed:?} (at most {most})");
    assert!(calls >= 2, "retried after the throttle: {calls}");
    assert!(calls <= most, "{calls} loader calls in {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refresh_does_not_defeat_the_fail_safe_throttle() {
    let server = server();
    let cache = builder_on(&server, "refresh-throttle").build().await;
    assert_throttled(cache.expect("build")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fail_safe_throttle_holds_with_l1_off() {
    let server = server();
    let cache = builder_on(&server, "refresh-no-l1")
        .l1_max_bytes(0)
        .build()
        .await;
    assert_throttled(cache.expect("build")).await;
}

/// A stale value kept by the fail-safe throttle is not fresh: `get` and
/// `get_many` both read it as a (counted) miss; `get_or_load` serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_get_many_agree_on_a_fail_safe_copy() {
    let server = server();
    let cache = builder_on(&server, "refresh-agree")
        .build()
        .await
        .expect("build");
    let key = item(3);
    let opts = EntryOptions::new(Duration::from_millis(200))
        .stale(Duration::from_secs(30))
        .failsafe_throttle(Duration::from_secs(10))
        .early_refresh(0.0);
    load_slowly(&cache, &key, &opts, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let stale = cache
        .get_or_load(&key, &opts, || async { Err::<String, _>(DbDown) })
        .await
        .expect("fail-safe");
    assert_eq!(*stale, "v1");
    until("the failed refresh is done", || {
        cache.stats().load_errors == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    let before = cache.stats();
    assert_eq!(cache.get(&key).await, None);
    assert_eq!(cache.get_many(std::slice::from_ref(&key)).await, vec![None]);
    let after = cache.stats();
    assert_eq!(after.misses - before.misses, 2, "{after:?}");
    assert_eq!(after.l1_hits, before.l1_hits, "{after:?}");
    let served = cache
        .get_or_load(&key, &opts, || async { Err::<String, _>(DbDown) })
        .await
        .expect("fail-safe");
    assert_eq!(*served, "v1");
}

/// Starts an early refresh of `key` whose loader never returns (a half-open
/// database socket), and lets `key` expire.
async fn hang_a_refresh(cache: &TieredCache, key: &Key<String>) -> EntryOptions {
    let opts = EntryOptions::new(Duration::from_millis(600)).early_refresh(1_000.0);
    load_slowly(cache, key, &opts, Duration::from_millis(50)).await;
    let hit = cache
        .get_or_load(key, &opts, || {
            std::future::pending::<Result<String, DbDown>>()
        })
        .await
        .expect("the cached value");
    assert_eq!(*hit, "v1");
    assert_eq!(cache.stats().early_refreshes, 1, "the hung refresh started");
    tokio::time::sleep(Duration::from_millis(700)).await; // expired
    opts
}

async fn load_within_3s(cache: &TieredCache, key: &Key<String>, opts: &EntryOptions) -> String {
    let load = cache.get_or_load(key, opts, || async { Ok::<_, DbDown>("v2".to_owned()) });
    let v = tokio::time::timeout(Duration::from_secs(3), load)
        .await
        .expect("the key is not locked by the hung refresh")
        .expect("loads");
    (*v).clone()
}

/// A background refresh has a deadline by default: after it, the key is
/// free again and the next caller loads (it used to wait for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_background_refresh_does_not_lock_its_key() {
    let server = server();
    let cache = builder_on(&server, "refresh-hung")
        .background_timeout(Duration::from_millis(300))
        .build()
        .await
        .expect("build");
    let key = item(5);
    let opts = hang_a_refresh(&cache, &key).await;
    assert_eq!(load_within_3s(&cache, &key, &opts).await, "v2");
    assert_eq!(cache.stats().loader_timeouts, 1, "{:?}", cache.stats());
}

/// `invalidate` releases a key whose load hangs: callers after it load anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_releases_a_key_whose_load_hangs() {
    let server = server();
    let cache = builder_on(&server, "refresh-release")
        .build()
        .await
        .expect("build");
    let key = item(6);
    let opts = hang_a_refresh(&cache, &key).await; // 30 s deadline: still hung
    cache.invalidate(&key).await.expect("invalidate");
    assert_eq!(load_within_3s(&cache, &key, &opts).await, "v2");
}
