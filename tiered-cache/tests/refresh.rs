//! Refreshing entries against a real Redis: XFetch early refresh,
//! stale-while-revalidate, fail-safe when the loader fails or is slow,
//! soft and hard timeouts, and the fail-safe throttle. A failed refresh
//! never hides a fresh value or undoes a newer write, and a failing loader
//! is tried about once per throttle period, with or without L1, however
//! many callers. Every test counts what happened (loader calls, the
//! cache's counters).
//!
//! Loads that must overlap are held open until the test has seen every
//! caller join them (a condition, not a sleep), so the counts do not depend
//! on timing. Sleeps only wait for a TTL to pass.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    builder_on, cache_on, counter, exists, failing, item, quick, redis_key, server, stampede,
    until, Caller, DbError, Item,
};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, TieredCache};
use tokio::sync::Notify;

/// Loads `value`, taking `took` (XFetch's delta is the last load's time).
async fn load_slowly(cache: &TieredCache, key: &Key<String>, opts: &EntryOptions, took: Duration) {
    cache
        .get_or_load(key, opts, move || async move {
            tokio::time::sleep(took).await;
            Ok::<_, DbError>("v1".to_owned())
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
            Err::<String, _>(DbError("db down"))
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
                        Err::<String, _>(DbError("db down"))
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
        .get_or_load(&key, &opts, || async {
            Err::<String, _>(DbError("db down"))
        })
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
        .get_or_load(&key, &opts, || async {
            Err::<String, _>(DbError("db down"))
        })
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
            std::future::pending::<Result<String, DbError>>()
        })
        .await
        .expect("the cached value");
    assert_eq!(*hit, "v1");
    assert_eq!(cache.stats().early_refreshes, 1, "the hung refresh started");
    tokio::time::sleep(Duration::from_millis(700)).await; // expired
    opts
}

async fn load_within_3s(cache: &TieredCache, key: &Key<String>, opts: &EntryOptions) -> String {
    let load = cache.get_or_load(key, opts, || async { Ok::<_, DbError>("v2".to_owned()) });
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

// ---------------------------------------------------------------- XFetch

/// What a steady read loop saw.
struct SteadyRun {
    reads: usize,
    /// Loader runs, the warm-up included.
    loader_calls: usize,
    /// Loader runs whose caller was still waiting when the load finished.
    awaited: usize,
    /// Each read's latency, sorted.
    latencies: Vec<Duration>,
}

impl SteadyRun {
    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

/// One read whose loader takes 50 ms and records whether its caller was
/// still waiting for it when it finished (a background refresh's caller has
/// long returned by then).
async fn timed_read(
    cache: &TieredCache,
    key: &Item,
    opts: &EntryOptions,
    calls: &Arc<AtomicUsize>,
    awaited: &Arc<AtomicUsize>,
) -> Duration {
    let returned = Arc::new(AtomicBool::new(false));
    let (calls, awaited, caller_returned) = (calls.clone(), awaited.clone(), returned.clone());
    let started = Instant::now();
    let value = cache
        .get_or_load(key, opts, move || async move {
            let n = calls.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !caller_returned.load(SeqCst) {
                awaited.fetch_add(1, SeqCst);
            }
            Ok::<_, DbError>(format!("v{n}"))
        })
        .await
        .expect("the loader does not fail");
    returned.store(true, SeqCst);
    let took = started.elapsed();
    assert!(value.starts_with('v'));
    took
}

/// A warm-up read, then 4 tasks reading `key` every millisecond for `run_for`.
async fn steady_reads(
    cache: &TieredCache,
    key: &Item,
    opts: EntryOptions,
    run_for: Duration,
) -> SteadyRun {
    let (calls, awaited) = (counter(), counter());
    timed_read(cache, key, &opts, &calls, &awaited).await;
    let until = Instant::now() + run_for;
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (cache, key, opts, calls, awaited) = (
                cache.clone(),
                key.clone(),
                opts.clone(),
                calls.clone(),
                awaited.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    latencies.push(timed_read(&cache, &key, &opts, &calls, &awaited).await);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for reader in readers {
        latencies.extend(reader.await.unwrap());
    }
    latencies.sort();
    // A refresh started by the last reads may still be running: let it land.
    let stats = cache.clone();
    until_loads_settle(&stats, &calls).await;
    SteadyRun {
        reads: latencies.len(),
        loader_calls: calls.load(SeqCst),
        awaited: awaited.load(SeqCst),
        latencies,
    }
}

async fn until_loads_settle(cache: &TieredCache, calls: &Arc<AtomicUsize>) {
    until("every started load has finished", || {
        cache.stats().loads as usize == calls.load(SeqCst)
            && cache.stats().loads == cache.stats().early_refreshes + cache.stats().misses
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xfetch_refreshes_a_hot_key_before_it_expires_and_nobody_waits() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "xfetch").await;
    let key = item(1);
    // beta = 1.0 (the default), TTL 1 s, loads take 50 ms.
    let run = steady_reads(
        &cache,
        &key,
        EntryOptions::new(Duration::from_secs(1)),
        Duration::from_millis(3300),
    )
    .await;
    let stats = cache.stats();
    println!(
        "xfetch on: reads = {}, loader calls = {}, awaited loads = {}, early_refreshes = {}, misses = {}, \
         latency p50 = {:?} p99 = {:?} max = {:?}",
        run.reads,
        run.loader_calls,
        run.awaited,
        stats.early_refreshes,
        stats.misses,
        run.percentile(0.5),
        run.percentile(0.99),
        run.latencies.last().unwrap()
    );
    // 3.3 TTLs went by: each expiry was preceded by a background refresh.
    assert!(stats.early_refreshes >= 3, "{stats:?}");
    assert_eq!(stats.misses, 1, "only the warm-up read missed: {stats:?}");
    assert_eq!(run.loader_calls as u64, 1 + stats.early_refreshes);
    // After warm-up, no caller ran or joined a load it had to wait for.
    assert_eq!(run.awaited, 1, "only the warm-up read waited on its loader");
    assert_eq!(stats.coalesced_waits, 0);
    assert_eq!(stats.stale_served, 0);
    assert!(
        *run.latencies.last().unwrap() < Duration::from_secs(5),
        "a read hung"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beta_zero_turns_early_refresh_off() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "xfetch-off").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_secs(1)).early_refresh(0.0);
    let run = steady_reads(&cache, &key, opts, Duration::from_millis(2300)).await;
    let stats = cache.stats();
    println!(
        "xfetch off: reads = {}, loader calls = {}, awaited loads = {}, early_refreshes = {}, misses = {}, \
         coalesced_waits = {}, latency p50 = {:?} p99 = {:?} max = {:?}",
        run.reads,
        run.loader_calls,
        run.awaited,
        stats.early_refreshes,
        stats.misses,
        stats.coalesced_waits,
        run.percentile(0.5),
        run.percentile(0.99),
        run.latencies.last().unwrap()
    );
    assert_eq!(stats.early_refreshes, 0);
    // Without early refresh every expiry makes a caller wait for the loader:
    // the warm-up and at least two expiries.
    assert!(stats.misses >= 3, "{stats:?}");
    assert_eq!(run.loader_calls as u64, stats.misses);
    assert_eq!(
        run.awaited, run.loader_calls,
        "every load had a waiting caller"
    );
}

// ---------------------------------------------------------------- stale and fail-safe

/// Spawns `n` callers of `key` with `opts`; each one's loader counts a call
/// and holds the load open until `release` is notified, then returns "v2".
fn held_loads(
    cache: &TieredCache,
    key: &Item,
    opts: &EntryOptions,
    n: usize,
    calls: &Arc<AtomicUsize>,
    release: &Arc<Notify>,
) -> Vec<Caller> {
    (0..n)
        .map(|_| {
            let (cache, key, opts) = (cache.clone(), key.clone(), opts.clone());
            let (calls, release) = (calls.clone(), release.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&key, &opts, move || async move {
                        calls.fetch_add(1, SeqCst);
                        release.notified().await;
                        Ok::<_, DbError>("v2".to_owned())
                    })
                    .await
            })
        })
        .collect()
}

/// Reads `key` until it is `want` (a load in the background has landed);
/// fails the test with `what` after 20 s (a hang).
async fn until_served(cache: &TieredCache, key: &Item, want: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while cache.get(key).await.as_deref().map(String::as_str) != Some(want) {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_serves_stale_at_once_and_refreshes_once() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "swr").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_millis(300))
        .stale(Duration::from_secs(10))
        .early_refresh(0.0);
    cache.get_or_load(&key, &opts, quick("v1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // the entry is now stale
    let before = cache.stats();

    let calls = counter();
    // The refresh stays open until every caller has its answer.
    let release = Arc::new(Notify::new());
    let callers = held_loads(&cache, &key, &opts, 100, &calls, &release);
    for caller in callers {
        assert_eq!(
            *caller.await.unwrap().unwrap(),
            "v1",
            "served stale without waiting"
        );
    }
    assert_eq!(calls.load(SeqCst), 1, "one refresh for 100 callers");
    let after = cache.stats();
    assert_eq!(after.stale_refreshes - before.stale_refreshes, 1);
    assert_eq!(after.stale_served - before.stale_served, 100);
    assert_eq!(after.loads - before.loads, 1);
    assert_eq!(
        after.loader_timeouts, 0,
        "a zero soft timeout is not a timeout"
    );

    release.notify_one();
    until_served(&cache, &key, "v2", "the refresh never landed").await;
    assert_eq!(calls.load(SeqCst), 1);
    println!(
        "swr: 100 callers, loader calls = 1, stale_served = {}",
        after.stale_served - before.stale_served
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_safe_serves_stale_on_loader_error_and_the_error_after_the_window() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "failsafe").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_millis(300))
        .stale(Duration::from_secs(1))
        .failsafe_throttle(Duration::from_secs(5)) // capped at the end of the window
        .early_refresh(0.0);
    cache.get_or_load(&key, &opts, quick("v1")).await.unwrap();
    let loaded = Instant::now();
    tokio::time::sleep(Duration::from_millis(400)).await;

    let calls = counter();
    let v = cache.get_or_load(&key, &opts, failing(&calls)).await;
    assert_eq!(*v.expect("stale stands in for the error"), "v1");
    assert_eq!(calls.load(SeqCst), 1);
    let stats = cache.stats();
    assert_eq!((stats.load_errors, stats.stale_served), (1, 1), "{stats:?}");

    // Throttled: the stale value is served again without calling the loader.
    let v = cache.get_or_load(&key, &opts, failing(&calls)).await;
    assert_eq!(*v.unwrap(), "v1");
    assert_eq!(
        calls.load(SeqCst),
        1,
        "the failing loader is not retried at once"
    );
    assert_eq!(
        cache.stats().stale_served,
        2,
        "a throttled stale value counts as stale served"
    );
    // `get` returns only fresh values: the throttled stale one is not.
    assert!(cache.get(&key).await.is_none());
    assert_eq!(calls.load(SeqCst), 1, "and `get` never loads");

    // After the grace window (300 ms + 1 s from the write) the error comes through.
    tokio::time::sleep_until((loaded + Duration::from_millis(1400)).into()).await;
    let err = cache
        .get_or_load(&key, &opts, failing(&calls))
        .await
        .expect_err("no stale value is left");
    assert_eq!(**err.loader_error().unwrap(), DbError("db down"));
    assert_eq!(calls.load(SeqCst), 2);
    assert!(!exists(&server, &redis_key("failsafe", &key)));
    println!(
        "fail-safe on error: loader calls = {}, stats = {:?}",
        calls.load(SeqCst),
        cache.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_safe_serves_stale_at_the_soft_timeout_and_times_out_after_the_window() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "soft").await;
    let (slow, late) = (item(1), item(2));
    let opts = EntryOptions::new(Duration::from_millis(300))
        .stale(Duration::from_secs(1))
        .soft_timeout(Duration::from_millis(50))
        .hard_timeout(Duration::from_secs(10))
        .early_refresh(0.0);
    cache.get_or_load(&slow, &opts, quick("v1")).await.unwrap();
    cache.get_or_load(&late, &opts, quick("v1")).await.unwrap();
    let loaded = Instant::now();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = cache.stats();

    // 20 callers of a stale key whose refresh is slow: all get the stale
    // value at the soft timeout; the one load goes on in the background.
    let calls = counter();
    let release = Arc::new(Notify::new());
    let callers = held_loads(&cache, &slow, &opts, 20, &calls, &release);
    for caller in callers {
        assert_eq!(*caller.await.unwrap().unwrap(), "v1");
    }
    let after = cache.stats();
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(after.stale_served - before.stale_served, 20);
    assert_eq!(
        after.loader_timeouts - before.loader_timeouts,
        1,
        "one slow load, counted once: {after:?}"
    );

    // The load finishes in the background and its value is stored.
    release.notify_one();
    until_served(&cache, &slow, "v2", "the background load never landed").await;
    assert_eq!(calls.load(SeqCst), 1);

    // Past the window there is nothing to fall back on: the hard timeout.
    tokio::time::sleep_until((loaded + Duration::from_millis(1400)).into()).await;
    let hard = opts.clone().hard_timeout(Duration::from_millis(100));
    let err = cache
        .get_or_load(&late, &hard, || {
            std::future::pending::<Result<String, DbError>>()
        })
        .await
        .expect_err("no stale value is left");
    assert!(err.is_timeout(), "{err:?}");
    println!(
        "fail-safe on soft timeout: loader calls = {}, stats = {:?}",
        calls.load(SeqCst),
        cache.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_loader_is_retried_about_once_per_throttle_period() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "throttle").await;
    let key = item(1);
    let throttle = Duration::from_millis(200);
    let opts = EntryOptions::new(Duration::from_millis(200))
        .stale(Duration::from_secs(10))
        .failsafe_throttle(throttle)
        .early_refresh(0.0);
    cache.get_or_load(&key, &opts, quick("v1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cache.stats();

    let calls = counter();
    let run_for = Duration::from_millis(1500);
    let started = Instant::now();
    let mut reads = 0u64;
    while started.elapsed() < run_for {
        let counted = calls.clone();
        let v = cache
            .get_or_load(&key, &opts, move || async move {
                counted.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                Err::<String, _>(DbError("db down"))
            })
            .await;
        assert_eq!(*v.expect("stale stands in"), "v1");
        reads += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    until("the last failing load ends", || {
        cache.stats().load_errors - before.load_errors == calls.load(SeqCst) as u64
    })
    .await;
    let after = cache.stats();
    let calls = calls.load(SeqCst) as u64;
    let most = elapsed.as_millis() as u64 / throttle.as_millis() as u64 + 2;
    println!("throttle: {reads} reads over {elapsed:?}, loader calls = {calls} (at most {most}), stale_served = {}", after.stale_served - before.stale_served);
    assert!(
        calls >= 2,
        "the loader is retried after the throttle period"
    );
    assert!(calls <= most, "{calls} loader calls in {elapsed:?}");
    assert_eq!(
        after.stale_served - before.stale_served,
        reads,
        "every read got the stale value"
    );
}

/// A new instance meets a stale entry in Redis while the database is down:
/// every concurrent caller gets the stale value, also those that joined the
/// load before its leader found the entry in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_safe_reaches_callers_that_joined_before_the_stale_value_was_found() {
    let server = RedisServer::start().expect("redis-server");
    let writer = cache_on(&server, "late-stale").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_millis(200))
        .stale(Duration::from_secs(10))
        .early_refresh(0.0);
    writer.get_or_load(&key, &opts, quick("v1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cache = cache_on(&server, "late-stale").await; // empty L1
    let calls = counter();
    let callers = stampede(&cache, &key, &opts, 50, &calls, || Err(DbError("db down")));
    let mut errors = 0;
    for caller in callers {
        match caller.await.unwrap() {
            Ok(v) => assert_eq!(*v, "v1"),
            Err(_) => errors += 1,
        }
    }
    println!(
        "late stale: 50 callers, errors = {errors}, stale_served = {}",
        cache.stats().stale_served
    );
    assert_eq!(errors, 0, "a stale value existed for every caller");
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(cache.stats().stale_served, 50);
}

/// A write or an invalidation that lands while a refresh is failing wins:
/// the fail-safe throttle must not bring the old value back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_refresh_does_not_undo_an_invalidation_or_a_write() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "failsafe-race").await;
    let (dropped, rewritten) = (item(1), item(2));
    let opts = EntryOptions::new(Duration::from_millis(200))
        .stale(Duration::from_secs(10))
        .failsafe_throttle(Duration::from_secs(10))
        .early_refresh(0.0);
    cache
        .get_or_load(&dropped, &opts, quick("old"))
        .await
        .unwrap();
    cache
        .get_or_load(&rewritten, &opts, quick("old"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let calls = counter();
    let release = Arc::new(Notify::new());
    for key in [&dropped, &rewritten] {
        let (calls, release) = (calls.clone(), release.clone());
        let v = cache
            .get_or_load(key, &opts, move || async move {
                calls.fetch_add(1, SeqCst);
                release.notified().await;
                Err::<String, _>(DbError("db down"))
            })
            .await;
        assert_eq!(*v.unwrap(), "old", "stale while the refresh runs");
    }
    cache.invalidate(&dropped).await.unwrap();
    cache
        .set(&rewritten, "new".to_owned(), &opts)
        .await
        .unwrap();
    release.notify_waiters();
    until("both refreshes fail", || cache.stats().load_errors == 2).await;

    // A caller that joins the failing flight in its last microseconds gets
    // its error (it had no stale value); ask again until a value comes.
    loop {
        match cache.get_or_load(&dropped, &opts, quick("reloaded")).await {
            Ok(v) => {
                assert_eq!(*v, "reloaded", "the invalidated value stays gone");
                break;
            }
            Err(e) => assert_eq!(**e.loader_error().unwrap(), DbError("db down")),
        }
    }
    let v = cache.get_or_load(&rewritten, &opts, quick("unused")).await;
    assert_eq!(*v.unwrap(), "new", "the newer write stays");
    assert_eq!(
        calls.load(SeqCst),
        2,
        "only the two failed refreshes ran a loader that counts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hard_timeout_without_stale_is_a_timeout_error() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "hard").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_secs(60)).hard_timeout(Duration::from_millis(100));
    let calls = counter();
    let counted = calls.clone();
    let err = cache
        .get_or_load(&key, &opts, move || async move {
            counted.fetch_add(1, SeqCst);
            std::future::pending::<Result<String, DbError>>().await
        })
        .await
        .expect_err("the load never ends");
    assert!(err.is_timeout(), "{err:?}");
    assert!(err.loader_error().is_none());
    assert_eq!(cache.stats().loader_timeouts, 1);
    assert!(
        !exists(&server, &redis_key("hard", &key)),
        "nothing was cached"
    );
    let counted = calls.clone();
    let v = cache
        .get_or_load(&key, &opts, move || async move {
            counted.fetch_add(1, SeqCst);
            Ok::<_, DbError>("v".to_owned())
        })
        .await;
    assert_eq!(*v.unwrap(), "v");
    assert_eq!(calls.load(SeqCst), 2);
}

// ---------------------------------------------------------------- borrowed loaders

/// A loader that borrows from its caller (as `#[cached]` bodies do) goes
/// through `load_inline`: hits skip it, and a stale entry whose refresh
/// fails is still served (fail-safe) by the caller that ran the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowed_loaders_hit_refresh_in_place_and_fail_safe() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "inline").await;
    let key = item(1);
    let name = String::from("borrowed"); // the loader borrows this
    let calls = counter();
    let opts = EntryOptions::new(Duration::from_millis(200))
        .stale(Duration::from_secs(30))
        .early_refresh(0.0);

    let load = |fail: bool| {
        let (name, calls) = (&name, &calls);
        move || async move {
            calls.fetch_add(1, SeqCst);
            if fail {
                Err(DbError("down"))
            } else {
                Ok(Some(Arc::new(name.clone())))
            }
        }
    };
    let first = cache
        .load_inline(&key, &opts, false, load(false))
        .await
        .expect("loads");
    assert_eq!(first.as_deref().map(String::as_str), Some("borrowed"));
    let hit = cache
        .load_inline(&key, &opts, false, load(false))
        .await
        .expect("hits");
    assert_eq!(hit, first);
    assert_eq!(
        calls.load(SeqCst),
        1,
        "a hit does not run the borrowed loader"
    );

    tokio::time::sleep(Duration::from_millis(300)).await; // now stale
    let served = cache
        .load_inline(&key, &opts, false, load(true))
        .await
        .expect("fail-safe");
    assert_eq!(served.as_deref().map(String::as_str), Some("borrowed"));
    assert_eq!(
        calls.load(SeqCst),
        2,
        "the stale entry was refreshed in place, and failed"
    );
    let s = cache.stats();
    assert!(s.stale_served >= 1 && s.load_errors == 1, "{s:?}");
}

/// XFetch with a borrowed loader: the caller that draws the refresh runs it
/// in its own task; the entry is replaced before it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowed_loaders_refresh_early_in_the_callers_task() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "inline-xfetch").await;
    let key = item(2);
    let calls = counter();
    // A slow first load (large delta) on a short TTL makes a refresh certain near expiry.
    let opts = EntryOptions::new(Duration::from_millis(400)).early_refresh(50.0);
    let load = |delay: u64| {
        let calls = &calls;
        move || async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let n = calls.fetch_add(1, SeqCst);
            Ok::<_, DbError>(Some(Arc::new(format!("v{n}"))))
        }
    };
    cache
        .load_inline(&key, &opts, false, load(20))
        .await
        .expect("first load");
    let deadline = Instant::now() + Duration::from_millis(350);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let v = cache
            .load_inline(&key, &opts, false, load(1))
            .await
            .expect("read");
        seen.push(v.expect("a value").to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = cache.stats();
    assert!(
        s.early_refreshes >= 1,
        "an early refresh ran before expiry: {s:?}"
    );
    assert!(
        seen.iter().any(|v| v != "v0"),
        "the refreshed value was served: {seen:?}"
    );
    assert_eq!(s.misses, 1, "only the first read missed: {s:?}");
}
