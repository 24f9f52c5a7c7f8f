//! Writes and loads that race on one key: every L2 write is compare-and-set
//! on the entry's version, and a load takes that version before it calls
//! its loader, so a load that began before a `set` or an `invalidate` never
//! stores its older value, in either tier, on any instance.
//!
//! Races are ordered deterministically: a loader that waits on a signal, or
//! a Redis paused with SIGSTOP while commands queue up.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use support::{builder_on, cache_on, conn, item, opts, server, until};
use tiered_cache::{Key, TieredCache};
use tokio::sync::Notify;

/// What each instance, and one that starts now, reads for `key`.
async fn fleet_reads(
    caches: &[&TieredCache],
    fresh: &TieredCache,
    key: &Key<u64>,
) -> Vec<Option<u64>> {
    let mut reads = Vec::new();
    for cache in caches.iter().copied().chain([fresh]) {
        reads.push(cache.get(key).await.map(|v| *v));
    }
    reads
}

/// Starts a load of `value` on `cache` whose loader waits for `gate`; returns
/// once the loader is running.
async fn gated_load(
    cache: &TieredCache,
    key: &Key<u64>,
    value: u64,
) -> (Arc<Notify>, tokio::task::JoinHandle<u64>) {
    let gate = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let (g, s) = (Arc::clone(&gate), Arc::clone(&started));
    let (cache, key) = (cache.clone(), key.clone());
    let load = tokio::spawn(async move {
        let v = cache
            .get_or_load(&key, &opts(), move || async move {
                s.notify_one();
                g.notified().await;
                Ok::<_, std::io::Error>(value)
            })
            .await
            .expect("the loader does not fail");
        *v
    });
    started.notified().await;
    (gate, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_load_never_overwrites_a_newer_set_on_any_instance() {
    let server = server();
    let a = cache_on(&server, "cas-set").await;
    let b = cache_on(&server, "cas-set").await;
    let key = item::<u64>(1);

    let (gate, load) = gated_load(&a, &key, 1).await; // A read the database: 1
    b.set(&key, 2, &opts()).await.expect("set"); // then the application wrote 2
    until("A dropped its copy", || {
        a.stats().invalidations_received >= 1
    })
    .await;
    gate.notify_one();
    assert_eq!(load.await.unwrap(), 1, "the caller gets what its load read");

    let fresh = cache_on(&server, "cas-set").await;
    assert_eq!(fleet_reads(&[&a, &b], &fresh, &key).await, [Some(2); 3]);
    assert!(a.stats().stale_writes_refused >= 1, "{:?}", a.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_load_never_brings_back_an_invalidated_entry() {
    let server = server();
    let a = cache_on(&server, "cas-inval").await;
    let b = cache_on(&server, "cas-inval").await;
    let key = item::<u64>(1);
    b.set(&key, 1, &opts()).await.expect("set");
    a.invalidate(&key).await.expect("invalidate"); // a miss on A from here

    let (gate, load) = gated_load(&a, &key, 1).await; // A reads the database: 1
    b.invalidate(&key).await.expect("invalidate"); // the row changed: dropped
    gate.notify_one();
    assert_eq!(load.await.unwrap(), 1);

    let fresh = cache_on(&server, "cas-inval").await;
    assert_eq!(fleet_reads(&[&a, &b], &fresh, &key).await, [None; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_racing_a_local_set_keeps_the_set() {
    let server = server();
    let a = cache_on(&server, "cas-local").await;
    let key = item::<u64>(1);
    let (gate, load) = gated_load(&a, &key, 1).await;
    a.set(&key, 2, &opts()).await.expect("set");
    gate.notify_one();
    load.await.unwrap();
    let fresh = cache_on(&server, "cas-local").await;
    assert_eq!(fleet_reads(&[&a], &fresh, &key).await, [Some(2); 2]);
}

/// `get` misses L1 and its GET returns 1; meanwhile `set(2)` completes on the
/// same instance. The promotion of 1 must not land over 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_wins_over_a_promotion_that_started_before_it() {
    let server = server();
    let writer = cache_on(&server, "cas-promo").await;
    let key = item::<u64>(1);
    writer.set(&key, 1, &opts()).await.expect("set");
    let a = builder_on(&server, "cas-promo")
        .l2_timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("build");

    server.pause().expect("SIGSTOP");
    let reader = {
        let (a, key) = (a.clone(), key.clone());
        tokio::spawn(async move { a.get(&key).await.map(|v| *v) })
    };
    tokio::time::sleep(Duration::from_millis(100)).await; // its GET is queued first
    let setter = {
        let (a, key) = (a.clone(), key.clone());
        tokio::spawn(async move { a.set(&key, 2, &opts()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.resume().expect("SIGCONT");
    assert_eq!(reader.await.unwrap(), Some(1), "the GET was answered first");
    setter.await.unwrap().expect("set");

    assert_eq!(
        a.get(&key).await.map(|v| *v),
        Some(2),
        "this instance serves the set"
    );
    let fresh = cache_on(&server, "cas-promo").await;
    assert_eq!(
        fresh.get(&key).await.map(|v| *v),
        Some(2),
        "Redis holds the set"
    );
}

/// `invalidate` deletes in Redis before it drops L1: a reader that misses
/// L1 in between can only find nothing in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_racing_an_invalidate_never_brings_the_old_value_back() {
    let server = server();
    let a = cache_on(&server, "cas-drop").await;
    let mut brought_back = 0;
    for id in 0..200 {
        let key = item::<u64>(id);
        a.set(&key, id, &opts()).await.expect("set");
        let reader = {
            let (a, key) = (a.clone(), key.clone());
            tokio::spawn(async move {
                for _ in 0..20 {
                    let _ = a.get(&key).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        a.invalidate(&key).await.expect("invalidate");
        reader.await.unwrap();
        brought_back += usize::from(a.get(&key).await.is_some());
    }
    assert_eq!(
        brought_back, 0,
        "old values served after their invalidate returned"
    );
}

/// Versions only grow per key, whoever writes: every write's version in
/// Redis exceeds the one before, across instances and invalidations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_only_grow() {
    let server = server();
    let a = cache_on(&server, "cas-versions").await;
    let b = cache_on(&server, "cas-versions").await;
    let key = item::<u64>(1);
    let mut c = conn(&server);
    let version = |c: &mut redis::Connection| -> u64 {
        redis::cmd("GET")
            .arg(format!("cas-versions:{}#v", key.as_str()))
            .query::<Option<u64>>(c)
            .expect("GET")
            .unwrap_or(0)
    };
    let mut last = version(&mut c);
    for round in 0..30_u64 {
        let writer = if round % 2 == 0 { &a } else { &b };
        if round % 3 == 0 {
            writer.invalidate(&key).await.expect("invalidate");
        } else {
            writer.set(&key, round, &opts()).await.expect("set");
        }
        let now = version(&mut c);
        assert!(now > last, "round {round}: {now} after {last}");
        last = now;
    }
}

/// Scripts go by hash: a Redis that forgot them (restarted, failed over,
/// `SCRIPT FLUSH`) answers NOSCRIPT once and gets the text, and every
/// write still lands.
#[tokio::test]
async fn writes_survive_a_redis_that_forgot_the_scripts() {
    let server = server();
    let a = cache_on(&server, "cas-noscript").await;
    let b = cache_on(&server, "cas-noscript").await;
    let key = item::<u64>(1);
    let mut c = conn(&server);
    let eval_calls = || {
        (
            support::command_calls(&server, "eval"),
            support::command_calls(&server, "evalsha"),
        )
    };
    a.set(&key, 1, &opts()).await.expect("set");
    let first = eval_calls();
    assert_eq!(first, (1, 1), "unknown by hash, then sent by text once");
    a.set(&key, 2, &opts()).await.expect("set");
    assert_eq!(eval_calls(), (1, 2), "known now: by hash only");

    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut c)
        .expect("SCRIPT FLUSH");
    a.set(&key, 3, &opts())
        .await
        .expect("a set after the flush");
    assert_eq!(eval_calls(), (2, 3), "sent by text again, once");
    assert_eq!(b.get(&key).await.as_deref(), Some(&3), "the write landed");
    a.invalidate(&key)
        .await
        .expect("an invalidate after the flush");
    let fresh = cache_on(&server, "cas-noscript").await;
    assert_eq!(fresh.get(&key).await, None, "the invalidation landed");
    assert_eq!(a.stats().l2_errors, 0, "NOSCRIPT is not an error");

    // Without the backplane the store script goes in one pipeline with the
    // read of its tags' versions: a NOSCRIPT there gets the text too.
    let lone = builder_on(&server, "cas-noscript")
        .backplane(false)
        .build()
        .await
        .expect("build");
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut c)
        .expect("SCRIPT FLUSH");
    let before = eval_calls();
    lone.set(&key, 4, &opts().tag("t"))
        .await
        .expect("a set after the flush");
    assert_eq!(
        eval_calls(),
        (before.0 + 1, before.1 + 1),
        "by hash, then by text"
    );
    assert_eq!(b.get(&key).await.as_deref(), Some(&4), "the write landed");
    assert_eq!(
        lone.get(&key).await.as_deref(),
        Some(&4),
        "and its copy in L1"
    );
    assert_eq!(lone.stats().l1_hits, 1, "{:?}", lone.stats());
    assert_eq!(lone.stats().l2_errors, 0, "NOSCRIPT is not an error");
}

/// Any interleaving of loads, sets and invalidations of one key: once a
/// write (set or invalidate) has returned, no instance reads a value older
/// than it. The "database" is a counter; a load reads it when it starts.
#[test]
fn interleavings_never_leave_an_older_value_readable() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = server();
    let caches = rt.block_on(async {
        vec![
            cache_on(&server, "cas-prop").await,
            cache_on(&server, "cas-prop").await,
        ]
    });
    let round = AtomicU64::new(0);
    let config = ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec((0..3_u8, 0..2_usize, 0..3_u64), 4..12))| {
        let key = item::<u64>(round.fetch_add(1, Ordering::Relaxed));
        rt.block_on(async {
            // The database: the latest value written.
            let db = Arc::new(AtomicU64::new(0));
            let mut floor = 0; // what the last completed write made current
            let mut loads = Vec::new();
            for (op, who, delay_ms) in &ops {
                let cache = caches[*who].clone();
                match op {
                    0 => {
                        let (db, key, delay) = (Arc::clone(&db), key.clone(), *delay_ms);
                        loads.push(tokio::spawn(async move {
                            let _ = cache
                                .get_or_load(&key, &opts(), move || async move {
                                    let seen = db.load(Ordering::SeqCst);
                                    tokio::time::sleep(Duration::from_millis(delay * 5)).await;
                                    Ok::<_, std::io::Error>(seen)
                                })
                                .await;
                        }));
                        tokio::task::yield_now().await;
                    }
                    1 => {
                        let v = db.fetch_add(1, Ordering::SeqCst) + 1;
                        cache.set(&key, v, &opts()).await.expect("set");
                        floor = v;
                    }
                    _ => {
                        let v = db.fetch_add(1, Ordering::SeqCst) + 1;
                        cache.invalidate(&key).await.expect("invalidate");
                        floor = v;
                    }
                }
            }
            for load in loads {
                load.await.unwrap();
            }
            // Let the last messages land, then read everywhere.
            tokio::time::sleep(Duration::from_millis(30)).await;
            for cache in &caches {
                if let Some(v) = cache.get(&key).await {
                    assert!(*v >= floor, "read {} after a write made {floor} current; ops {ops:?}", *v);
                }
            }
        });
    });
}
