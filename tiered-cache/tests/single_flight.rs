//! Single-flight against a real Redis: a stampede on a cold key runs one
//! load, its error reaches every caller, a leader that is cancelled or
//! panics hands the load to one waiter, two caches never share a load, and
//! the loading methods share flights with one another.
//!
//! Loads that must overlap are held open until the test has seen every
//! caller join them (a condition, not a sleep), so the counts do not depend
//! on timing.

mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use support::{cache_on, counter, exists, item, redis_key, server, stampede, until, DbError};
use tiered_cache::testkit::RedisServer;
use tiered_cache::EntryOptions;
use tokio::sync::Notify;

/// `get_or_load` that joins a `try_get_or_load` whose loader finds nothing
/// gets a value: it runs its own loader (it used to get an internal error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_load_joining_a_load_that_found_nothing_runs_its_own() {
    let server = server();
    let cache = cache_on(&server, "sf-none").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_secs(60));
    let (gate, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let finder = {
        let (cache, key, opts) = (cache.clone(), key.clone(), opts.clone());
        let (gate, started) = (Arc::clone(&gate), Arc::clone(&started));
        tokio::spawn(async move {
            cache
                .try_get_or_load(&key, &opts, move || async move {
                    started.notify_one();
                    gate.notified().await;
                    Ok::<Option<String>, std::io::Error>(None)
                })
                .await
        })
    };
    started.notified().await;
    let wanter = {
        let (cache, key, opts) = (cache.clone(), key.clone(), opts.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&key, &opts, || async {
                    Ok::<_, std::io::Error>("mine".to_owned())
                })
                .await
        })
    };
    until("the second caller waits", || {
        cache.stats().coalesced_waits == 1
    })
    .await;
    gate.notify_one();
    assert!(finder.await.unwrap().expect("no error").is_none());
    let got = wanter
        .await
        .unwrap()
        .expect("a value, not an internal error");
    assert_eq!(*got, "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_callers_of_a_cold_key_share_one_load() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "stampede").await;
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
    assert!(
        exists(&server, &redis_key("stampede", &key)),
        "the value reached Redis"
    );
    println!(
        "stampede: 1000 callers, loader calls = {}, stats = {stats:?}",
        calls.load(SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_load_reaches_every_caller_and_is_not_cached() {
    let server = RedisServer::start().expect("redis-server");
    let cache = cache_on(&server, "stampede-err").await;
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
    assert!(!exists(&server, &redis_key("stampede-err", &key)));
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
    let cache = cache_on(&server, "abandoned").await;
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
        cache_on(&server, "tenant-a").await,
        cache_on(&server, "tenant-b").await,
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
