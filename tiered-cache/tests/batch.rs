//! Batch reads against a real Redis: `get_many` and `get_many_or_load` read
//! L1, then every L1 miss in one MGET, then load what is left at once,
//! sharing loads with concurrent callers. Every test counts what happened
//! (loader calls, the cache's counters, Redis commands from
//! `INFO commandstats`). Each test runs on a Redis of its own and on a
//! Redis Cluster, where one MGET is one per hash slot of its keys.

mod support;

use std::sync::atomic::Ordering::SeqCst;

use std::time::Duration;

use support::{
    cache_on, command_calls, counter, info_stat, item, redis_key, reset_command_stats, scripts_run,
    until, Backend, DbError, Item, TestRedis,
};
use tiered_cache::{EntryOptions, TieredCache};

crate::on_both_backends!(
    get_many_reads_l1_then_one_mget,
    get_many_or_load_reads_l1_then_one_mget_then_loads_the_rest_at_once,
    get_many_or_load_shares_loads_with_concurrent_callers,
);

/// The MGETs Redis counts for one MGET of the entries `keys` of
/// `namespace` whose `n % 10` is 3 or more (the L1 misses of
/// [`spread_over_the_tiers`]).
fn mgets_for_the_l1_misses(backend: &Backend, namespace: &str, keys: &[Item]) -> u64 {
    let misses: Vec<String> = keys
        .iter()
        .enumerate()
        .filter(|(n, _)| n % 10 >= 3)
        .map(|(_, key)| redis_key(namespace, key))
        .collect();
    backend.mgets_for(&misses)
}

/// Two instances in `namespace` and 100 keys spread over the tiers by
/// `n % 10`: 0..3 written through the first as "l1-{n}" (in its L1 and
/// Redis), 3..7 through the second as "l2-{n}" (in Redis only, from the
/// first's view), 7..10 nowhere. Redis counts commands from zero after.
async fn spread_over_the_tiers(
    backend: &Backend,
    namespace: &str,
    opts: &EntryOptions,
) -> (TieredCache, TieredCache, Vec<Item>) {
    let cache = cache_on(backend, namespace).await;
    let writer = cache_on(backend, namespace).await;
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
    // The backplane's messages about these writes drop the keys from the
    // other instance's L1: let them arrive before anything is counted (on
    // a cluster they cross the cluster bus, which takes longer).
    until("each instance heard the other's writes", || {
        cache.stats().invalidations_received >= 40 && writer.stats().invalidations_received >= 30
    })
    .await;
    reset_command_stats(backend);
    (cache, writer, keys)
}

async fn get_many_reads_l1_then_one_mget(backend: &Backend) {
    let opts = EntryOptions::new(Duration::from_secs(60));
    // n % 10: 0..3 in L1 (and Redis), 3..7 in Redis only, 7..10 nowhere.
    let (cache, _writer, keys) = spread_over_the_tiers(backend, "many", &opts).await;
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
        command_calls(backend, "mget"),
        mgets_for_the_l1_misses(backend, "many", &keys),
        "one round trip for the 70 L1 misses"
    );
    assert_eq!(command_calls(backend, "get"), 0);
    assert_eq!(
        info_stat(backend, "keyspace_hits"),
        40,
        "only L1 misses were looked up"
    );
    assert_eq!(info_stat(backend, "keyspace_misses"), 30);
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

async fn get_many_or_load_reads_l1_then_one_mget_then_loads_the_rest_at_once(backend: &Backend) {
    let opts = EntryOptions::new(Duration::from_secs(60));
    // n % 10: 0..3 in L1, 3..7 in Redis only, 7..10 nowhere (and 9 fails to load).
    let (cache, _writer, keys) = spread_over_the_tiers(backend, "many-load", &opts).await;
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
        command_calls(backend, "mget"),
        mgets_for_the_l1_misses(backend, "many-load", &keys),
        "one round trip for the 70 L1 misses"
    );
    // The only GETs are the store scripts' reads of each entry's version.
    assert_eq!(
        command_calls(backend, "get"),
        scripts_run(backend),
        "the loads do not ask Redis again"
    );
    assert_eq!(
        scripts_run(backend),
        20,
        "each loaded value is stored, by one compare-and-set script"
    );
    assert_eq!(
        command_calls(backend, "set"),
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
    reset_command_stats(backend);
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
    let failed: Vec<String> = (9..100)
        .step_by(10)
        .map(|n| redis_key("many-load", &keys[n]))
        .collect();
    assert_eq!(command_calls(backend, "mget"), backend.mgets_for(&failed));
    println!("get_many_or_load: 100 keys, 30 L1, 40 L2, 30 loaded (10 failing); loader calls = 30, MGET = 1, GET = 0");
}

async fn get_many_or_load_shares_loads_with_concurrent_callers(backend: &Backend) {
    let cache = cache_on(backend, "many-flight").await;
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
