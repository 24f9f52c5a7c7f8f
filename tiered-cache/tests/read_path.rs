//! The smart read path against a real Redis: single-flight, XFetch early
//! refresh, stale-while-revalidate, fail-safe, timeouts, negative caching,
//! TTL jitter and batch reads. Every test counts what happened (loader
//! calls, the cache's counters, Redis commands from `INFO commandstats`).
//!
//! Loads that must overlap are held open until the test has seen every
//! caller join them (a condition, not a sleep), so the counts do not depend
//! on timing. Sleeps only wait for a TTL to pass.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{builder_on, command_calls, info_stat, redis_key, reset_command_stats, until};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, LoadError, TieredCache};
use tokio::sync::Notify;

#[derive(Debug, PartialEq)]
struct DbError(&'static str);

type Item = Key<String>;

fn item(n: u64) -> Item {
    Key::new("item", 1).arg(n)
}

async fn cache(server: &RedisServer, namespace: &str) -> TieredCache {
    builder_on(server, namespace)
        .require_l2(true)
        .build()
        .await
        .expect("cache builds against the test Redis")
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// Whether Redis holds `key` of the cache in `namespace`.
fn exists(server: &RedisServer, namespace: &str, key: &Item) -> bool {
    common::exists(server, &redis_key(namespace, key))
}

fn quick(value: &str) -> impl FnOnce() -> std::future::Ready<Result<String, DbError>> {
    let value = value.to_owned();
    move || std::future::ready(Ok(value))
}

/// A spawned `get_or_load` caller.
type Caller = tokio::task::JoinHandle<Result<Arc<String>, LoadError<DbError>>>;

// ---------------------------------------------------------------- single-flight

/// Spawns `n` callers of `key` with `opts`; each one's loader counts a call
/// and holds the load open until the other `n - 1` callers wait on it, then
/// returns `result`.
fn stampede(
    cache: &TieredCache,
    key: &Item,
    opts: &EntryOptions,
    n: usize,
    calls: &Arc<AtomicUsize>,
    result: fn() -> Result<String, DbError>,
) -> Vec<Caller> {
    let waits_before = cache.stats().coalesced_waits;
    (0..n)
        .map(|_| {
            let (cache, key, calls, opts) =
                (cache.clone(), key.clone(), calls.clone(), opts.clone());
            tokio::spawn(async move {
                let watcher = cache.clone();
                cache
                    .get_or_load(&key, &opts, move || async move {
                        calls.fetch_add(1, SeqCst);
                        let others = (n - 1) as u64;
                        until("every other caller waits on this load", || {
                            watcher.stats().coalesced_waits - waits_before >= others
                        })
                        .await;
                        result()
                    })
                    .await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_callers_of_a_cold_key_share_one_load() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "stampede").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_secs(60));
    let calls = counter();

    let tasks = stampede(&cache, &key, &opts, 1000, &calls, || Ok("value".to_owned()));
    for task in tasks {
        assert_eq!(*task.await.unwrap().expect("the load succeeds"), "value");
    }

    assert_eq!(
        calls.load(SeqCst),
        1,
        "the loader ran once for 1,000 callers"
    );
    let stats = cache.stats();
    assert_eq!(stats.loads, 1);
    assert_eq!(stats.coalesced_waits, 999);
    assert_eq!(stats.misses, 1, "only the leader counts a miss");
    assert!(exists(&server, "stampede", &key), "the value reached Redis");
    println!(
        "stampede: 1000 callers, loader calls = {}, stats = {stats:?}",
        calls.load(SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_load_reaches_every_caller_and_is_not_cached() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "stampede-err").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_secs(60));
    let calls = counter();

    let tasks = stampede(&cache, &key, &opts, 1000, &calls, || {
        Err(DbError("db down"))
    });
    let mut first: Option<Arc<DbError>> = None;
    for task in tasks {
        let err = task.await.unwrap().expect_err("the load fails");
        let err = Arc::clone(err.loader_error().expect("the loader's own error"));
        assert_eq!(*err, DbError("db down"));
        match &first {
            None => first = Some(err),
            Some(first) => assert!(Arc::ptr_eq(first, &err), "every caller shares one error"),
        }
    }
    assert_eq!(
        calls.load(SeqCst),
        1,
        "the failing loader ran once for 1,000 callers"
    );
    assert_eq!(cache.stats().load_errors, 1);

    // Nothing was cached: not in Redis, not in L1, and the next call loads.
    assert!(!exists(&server, "stampede-err", &key));
    assert!(cache.get(&key).await.is_none());
    let counted = Arc::clone(&calls);
    let v = cache
        .get_or_load(
            &key,
            &EntryOptions::new(Duration::from_secs(60)),
            move || async move {
                counted.fetch_add(1, SeqCst);
                Ok::<_, DbError>("recovered".to_owned())
            },
        )
        .await
        .unwrap();
    assert_eq!(*v, "recovered");
    assert_eq!(calls.load(SeqCst), 2, "the error was not cached");
}

/// A leader that stops (cancelled, or its loader panics) while 50 callers
/// wait on it: every waiter completes and exactly one more load runs.
async fn run_abandoned_leader(panics: bool) {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "abandoned").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_secs(60));
    let calls = counter();
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());

    let leader = {
        let (cache, key, opts) = (cache.clone(), key.clone(), opts.clone());
        let (calls, started, release) = (calls.clone(), started.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&key, &opts, move || async move {
                    calls.fetch_add(1, SeqCst);
                    started.notify_one();
                    release.notified().await;
                    if panics {
                        panic!("the leader's loader panics (expected by the test)");
                    }
                    std::future::pending::<Result<String, DbError>>().await
                })
                .await
        })
    };
    started.notified().await;

    const WAITERS: usize = 50;
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (cache, key, opts, calls) =
                (cache.clone(), key.clone(), opts.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&key, &opts, move || async move {
                        calls.fetch_add(1, SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, DbError>("second".to_owned())
                    })
                    .await
            })
        })
        .collect();
    until("every waiter joins the leader's load", || {
        cache.stats().coalesced_waits >= WAITERS as u64
    })
    .await;

    if panics {
        release.notify_one();
        let err = leader.await.expect_err("the leader's task panicked");
        assert!(err.is_panic());
    } else {
        leader.abort();
        let err = leader.await.expect_err("the leader's task was cancelled");
        assert!(err.is_cancelled());
    }
    for waiter in waiters {
        assert_eq!(
            *waiter.await.unwrap().expect("a waiter took over"),
            "second"
        );
    }
    assert_eq!(
        calls.load(SeqCst),
        2,
        "the abandoned load and exactly one more"
    );
    assert_eq!(cache.stats().loads, 2);
    println!(
        "abandoned leader (panics = {panics}): loader calls = {}, stats = {:?}",
        calls.load(SeqCst),
        cache.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_leader_hands_the_load_to_one_waiter() {
    run_abandoned_leader(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_leader_hands_the_load_to_one_waiter() {
    run_abandoned_leader(true).await;
}

/// Single-flight belongs to one cache: two caches of unrelated namespaces
/// loading the same key at the same time each run their own loader and get
/// their own value. (A process-wide flight table keyed by the key string
/// would hand B the value A loaded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_caches_never_share_a_load() {
    let server = RedisServer::start().expect("redis-server");
    let (a, b) = (
        cache(&server, "tenant-a").await,
        cache(&server, "tenant-b").await,
    );
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));
    let (a_loading, b_loaded) = (Arc::new(Notify::new()), Arc::new(Notify::new()));

    // A's load stays open until B's own loader has run.
    let a_call = {
        let (a, key, opts) = (a.clone(), key.clone(), opts.clone());
        let (a_loading, b_loaded) = (a_loading.clone(), b_loaded.clone());
        tokio::spawn(async move {
            a.get_or_load(&key, &opts, move || async move {
                a_loading.notify_one();
                match tokio::time::timeout(Duration::from_secs(10), b_loaded.notified()).await {
                    Ok(()) => Ok("a".to_owned()),
                    Err(_) => Err(DbError("B never ran its own loader")),
                }
            })
            .await
        })
    };
    a_loading.notified().await;
    let got_b = b
        .get_or_load(&key, &opts, move || async move {
            b_loaded.notify_one();
            Ok::<_, DbError>("b".to_owned())
        })
        .await
        .expect("B's load");
    let got_a = a_call.await.expect("A's caller").expect("A's load");
    assert_eq!((got_a.as_str(), got_b.as_str()), ("a", "b"));
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.loads, sb.loads), (1, 1), "{sa:?} {sb:?}");
    assert_eq!((sa.coalesced_waits, sb.coalesced_waits), (0, 0));
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
    let cache = cache(&server, "xfetch").await;
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
    let cache = cache(&server, "xfetch-off").await;
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
    let cache = cache(&server, "swr").await;
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

fn failing(
    calls: &Arc<AtomicUsize>,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<String, DbError>> + Send>> {
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.fetch_add(1, SeqCst);
            Err(DbError("db down"))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_safe_serves_stale_on_loader_error_and_the_error_after_the_window() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "failsafe").await;
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
    assert!(!exists(&server, "failsafe", &key));
    println!(
        "fail-safe on error: loader calls = {}, stats = {:?}",
        calls.load(SeqCst),
        cache.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_safe_serves_stale_at_the_soft_timeout_and_times_out_after_the_window() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "soft").await;
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
    let cache = cache(&server, "throttle").await;
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
    let writer = cache(&server, "late-stale").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_millis(200))
        .stale(Duration::from_secs(10))
        .early_refresh(0.0);
    writer.get_or_load(&key, &opts, quick("v1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cache = self::cache(&server, "late-stale").await; // empty L1
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
    let cache = cache(&server, "failsafe-race").await;
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
    let cache = cache(&server, "hard").await;
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
    assert!(!exists(&server, "hard", &key), "nothing was cached");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_none_is_cached_only_with_a_negative_ttl() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "negative").await;
    let (on, off) = (item(1), item(2));
    let calls = counter();

    let negative = EntryOptions::new(Duration::from_secs(60)).negative_ttl(Duration::from_secs(5));
    assert_eq!(load_nothing(&cache, &on, &negative, &calls).await, None);
    assert_eq!(load_nothing(&cache, &on, &negative, &calls).await, None);
    assert_eq!(calls.load(SeqCst), 1, "the second call hit the cached None");
    assert_eq!(cache.stats().negative_hits, 1);
    assert!(exists(&server, "negative", &on), "the None is in Redis too");
    // Another instance finds it in Redis.
    let other = self::cache(&server, "negative").await;
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
    assert!(!exists(&server, "negative", &off));
    assert_eq!(cache.stats().negative_hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_spreads_expiries() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "jitter").await;
    let opts = EntryOptions::new(Duration::from_secs(10)).jitter(Duration::from_secs(5));
    let started = Instant::now();
    for n in 0..200 {
        cache.set(&item(n), format!("v{n}"), &opts).await.unwrap();
    }
    let mut conn = server.connection().unwrap();
    let mut pipe = redis::pipe();
    for n in 0..200 {
        pipe.cmd("PTTL").arg(redis_key("jitter", &item(n)));
    }
    let pttls: Vec<i64> = pipe.query(&mut conn).unwrap();
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

// ---------------------------------------------------------------- batches

/// Two instances in `namespace` and 100 keys spread over the tiers by
/// `n % 10`: 0..3 written through the first as "l1-{n}" (in its L1 and
/// Redis), 3..7 through the second as "l2-{n}" (in Redis only, from the
/// first's view), 7..10 nowhere. Redis counts commands from zero after.
async fn spread_over_the_tiers(
    server: &RedisServer,
    namespace: &str,
    opts: &EntryOptions,
) -> (TieredCache, TieredCache, Vec<Item>) {
    let cache = cache(server, namespace).await;
    let writer = self::cache(server, namespace).await;
    let keys: Vec<Item> = (0..100).map(item).collect();
    for n in 0..100u64 {
        match n % 10 {
            0..=2 => cache
                .set(&keys[n as usize], format!("l1-{n}"), opts)
                .await
                .unwrap(),
            3..=6 => writer
                .set(&keys[n as usize], format!("l2-{n}"), opts)
                .await
                .unwrap(),
            _ => {}
        }
    }
    reset_command_stats(server);
    (cache, writer, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reads_l1_then_one_mget() {
    let server = RedisServer::start().expect("redis-server");
    let opts = EntryOptions::new(Duration::from_secs(60));
    // n % 10: 0..3 in L1 (and Redis), 3..7 in Redis only, 7..10 nowhere.
    let (cache, _writer, keys) = spread_over_the_tiers(&server, "many", &opts).await;
    let before = cache.stats();

    let got = cache.get_many(&keys).await;

    for (n, value) in got.iter().enumerate() {
        let expected = match n % 10 {
            0..=2 => Some(format!("l1-{n}")),
            3..=6 => Some(format!("l2-{n}")),
            _ => None,
        };
        assert_eq!(value.as_deref().cloned(), expected, "key {n}");
    }
    assert_eq!(
        command_calls(&server, "mget"),
        1,
        "one round trip for the 70 L1 misses"
    );
    assert_eq!(command_calls(&server, "get"), 0);
    assert_eq!(
        info_stat(&server, "keyspace_hits"),
        40,
        "only L1 misses were looked up"
    );
    assert_eq!(info_stat(&server, "keyspace_misses"), 30);
    let after = cache.stats();
    assert_eq!(after.l1_hits - before.l1_hits, 30);
    assert_eq!(after.l2_hits - before.l2_hits, 40);
    assert_eq!(after.misses - before.misses, 30);
}

/// `get_many_or_load`'s future can be spawned.
#[allow(dead_code)]
fn get_many_or_load_is_send(cache: &TieredCache, keys: &[Item]) {
    fn is_send<T: Send>(_: T) {}
    is_send(cache.get_many_or_load(
        keys,
        &EntryOptions::new(Duration::from_secs(1)),
        |_: &Item| async { Ok::<_, DbError>(String::new()) },
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_many_or_load_reads_l1_then_one_mget_then_loads_the_rest_at_once() {
    let server = RedisServer::start().expect("redis-server");
    let opts = EntryOptions::new(Duration::from_secs(60));
    // n % 10: 0..3 in L1, 3..7 in Redis only, 7..10 nowhere (and 9 fails to load).
    let (cache, _writer, keys) = spread_over_the_tiers(&server, "many-load", &opts).await;
    let before = cache.stats();

    let calls = counter();
    let counted = calls.clone();
    let loader = move |key: &Item| {
        let (calls, body) = (counted.clone(), key.as_str().to_owned());
        async move {
            let started = calls.fetch_add(1, SeqCst) + 1;
            // Every load waits for all 30: they can only finish if they run at once.
            until("all 30 loads have started", || calls.load(SeqCst) >= 30).await;
            assert!(started <= 30, "a key was loaded twice");
            if body.ends_with("9}") {
                Err(DbError("no such item"))
            } else {
                Ok(format!("loaded:{body}"))
            }
        }
    };
    let got = cache.get_many_or_load(&keys, &opts, loader.clone()).await;

    for (n, result) in got.iter().enumerate() {
        match (n % 10, result) {
            (0..=2, Ok(v)) => assert_eq!(**v, format!("l1-{n}")),
            (3..=6, Ok(v)) => assert_eq!(**v, format!("l2-{n}")),
            (7 | 8, Ok(v)) => assert_eq!(**v, format!("loaded:{}", keys[n].as_str())),
            (9, Err(e)) => assert_eq!(**e.loader_error().unwrap(), DbError("no such item")),
            (_, other) => panic!("key {n}: unexpected {other:?}"),
        }
    }
    assert_eq!(
        calls.load(SeqCst),
        30,
        "one load per key missing from both tiers"
    );
    assert_eq!(
        command_calls(&server, "mget"),
        1,
        "one round trip for the 70 L1 misses"
    );
    // The only GETs are the store scripts' reads of each entry's version.
    assert_eq!(
        command_calls(&server, "get"),
        command_calls(&server, "eval"),
        "the loads do not ask Redis again"
    );
    assert_eq!(
        command_calls(&server, "eval"),
        20,
        "each loaded value is stored, by one compare-and-set script"
    );
    assert_eq!(
        command_calls(&server, "set"),
        40,
        "each script writes the value and its version"
    );
    let after = cache.stats();
    assert_eq!(after.l1_hits - before.l1_hits, 30);
    assert_eq!(after.l2_hits - before.l2_hits, 40);
    assert_eq!(after.misses - before.misses, 30);
    assert_eq!(after.loads - before.loads, 30);
    assert_eq!(after.load_errors - before.load_errors, 10);

    // Again: everything but the 10 failures is in L1 now; errors were not cached.
    reset_command_stats(&server);
    let calls_before = calls.load(SeqCst);
    let counted = calls.clone();
    let got = cache
        .get_many_or_load(&keys, &opts, move |_: &Item| {
            counted.fetch_add(1, SeqCst);
            async { Err::<String, _>(DbError("still missing")) }
        })
        .await;
    assert_eq!(got.iter().filter(|r| r.is_ok()).count(), 90);
    assert_eq!(calls.load(SeqCst) - calls_before, 10);
    assert_eq!(command_calls(&server, "mget"), 1);
    println!("get_many_or_load: 100 keys, 30 L1, 40 L2, 30 loaded (10 failing); loader calls = 30, MGET = 1, GET = 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_many_or_load_shares_loads_with_concurrent_callers() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "many-flight").await;
    let opts = EntryOptions::new(Duration::from_secs(60));
    let keys: Vec<Item> = (0..10).map(item).collect();
    let calls = counter();
    let batch = |cache: &TieredCache| {
        let (cache, keys, opts, calls) = (cache.clone(), keys.clone(), opts.clone(), calls.clone());
        tokio::spawn(async move {
            let watcher = cache.clone();
            cache
                .get_many_or_load(&keys, &opts, move |key: &Item| {
                    let (calls, watcher, body) =
                        (calls.clone(), watcher.clone(), key.as_str().to_owned());
                    async move {
                        calls.fetch_add(1, SeqCst);
                        // Hold each load until the other batch waits on all ten
                        // keys and the single caller on the first.
                        until("every other caller joins the loads", || {
                            watcher.stats().coalesced_waits >= 11
                        })
                        .await;
                        Ok::<_, DbError>(body)
                    }
                })
                .await
        })
    };
    let (a, b) = (batch(&cache), batch(&cache));
    // Once all ten loads run, a single-key caller joins one of them.
    until("ten loads run", || calls.load(SeqCst) >= 10).await;
    let single = cache
        .get_or_load(&keys[0], &opts, || async {
            Ok::<_, DbError>("single".to_owned())
        })
        .await;
    let (a, b) = (a.await, b.await);
    for results in [a.unwrap(), b.unwrap()] {
        for (key, result) in keys.iter().zip(results) {
            assert_eq!(*result.unwrap(), key.as_str());
        }
    }
    assert_eq!(
        *single.unwrap(),
        keys[0].as_str(),
        "the single caller got the batch's load"
    );
    assert_eq!(
        calls.load(SeqCst),
        10,
        "each key loaded once for both batches"
    );
    assert_eq!(cache.stats().coalesced_waits, 11);
}

/// A loader that borrows from its caller (as `#[cached]` bodies do) goes
/// through `load_inline`: hits skip it, and a stale entry whose refresh
/// fails is still served (fail-safe) by the caller that ran the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowed_loaders_hit_refresh_in_place_and_fail_safe() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache(&server, "inline").await;
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
    let cache = cache(&server, "inline-xfetch").await;
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
