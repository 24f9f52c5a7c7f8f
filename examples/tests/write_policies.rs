//! Write policies through the entity handle, against a real Redis and a
//! real SQLite file: cache-aside and write-through across instances, the
//! write-through / slow-load race, and the write-behind queue (coalescing,
//! batching, order per id, retries, dead letters, backpressure, shutdown,
//! and a read after the TTL but before the flush).

mod support;

use std::future::Future;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use support::*;
use tiered_cache::testkit::RedisServer;
use tiered_cache::write::{Entity, Store, WhenFull, WriteBehind, WriteError, WritePolicy};
use tiered_cache::{EntryOptions, ErrorKind, TieredCache};

fn behind(config: WriteBehind) -> WritePolicy {
    WritePolicy::WriteBehind(config)
}

/// Polls `check` until it holds; fails after 10 s.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn price(p: Option<std::sync::Arc<Product>>) -> Option<u64> {
    p.map(|p| p.price_cents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aside_put_invalidates_every_instance() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("aside");
    let table = db.table::<Product>();
    let (a, b) = (
        cache_on(&redis, "aside").await,
        cache_on(&redis, "aside").await,
    );
    let pa = a
        .entity_with(table.clone(), WritePolicy::CacheAside)
        .unwrap();
    let pb = b
        .entity_with(table.clone(), WritePolicy::CacheAside)
        .unwrap();

    pa.put(&1, product("lamp", 100)).await.unwrap();
    assert_eq!(price(pa.get(&1).await.unwrap()), Some(100));
    assert_eq!(price(pb.get(&1).await.unwrap()), Some(100));
    let loads = table.counts().loads.load(SeqCst);
    assert_eq!(price(pb.get(&1).await.unwrap()), Some(100), "a hit");
    assert_eq!(table.counts().loads.load(SeqCst), loads);

    pa.put(&1, product("lamp", 120)).await.unwrap();
    assert_eq!(stored(&table, &1).await.map(|p| p.price_cents), Some(120));
    // The put left nothing in Redis: a new instance loads from the store.
    let c = cache_on(&redis, "aside").await;
    let pc = c
        .entity_with(table.clone(), WritePolicy::CacheAside)
        .unwrap();
    assert_eq!(price(pc.get(&1).await.unwrap()), Some(120));
    assert_eq!(table.counts().loads.load(SeqCst), loads + 1);
    // B drops its copy when the invalidation reaches it.
    eventually("B reads the new price", || async {
        price(pb.get(&1).await.unwrap()) == Some(120)
    })
    .await;
    assert_eq!(a.stats().store_writes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_reads_its_writes_on_every_instance() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("through");
    let table = db.table::<Product>();
    let caches = [
        cache_on(&redis, "through").await,
        cache_on(&redis, "through").await,
    ];
    let [pa, pb] = caches.each_ref().map(|c| {
        c.entity_with(table.clone(), WritePolicy::WriteThrough)
            .unwrap()
    });

    pa.put(&1, product("desk", 100)).await.unwrap();
    assert_eq!(price(pb.get(&1).await.unwrap()), Some(100));
    assert_eq!(
        table.counts().loads.load(SeqCst),
        0,
        "B read the value A wrote to Redis, not the store"
    );

    pa.put(&1, product("desk", 150)).await.unwrap();
    assert_eq!(
        price(pa.get(&1).await.unwrap()),
        Some(150),
        "A reads its write"
    );
    let fresh = cache_on(&redis, "through").await;
    let pf = fresh
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    assert_eq!(
        price(pf.get(&1).await.unwrap()),
        Some(150),
        "from Redis at once"
    );
    assert_eq!(table.counts().loads.load(SeqCst), 0);
    eventually("B drops its older copy", || async {
        price(pb.get(&1).await.unwrap()) == Some(150)
    })
    .await;
    assert_eq!(stored(&table, &1).await.map(|p| p.price_cents), Some(150));

    pa.delete(&1).await.unwrap();
    assert_eq!(pa.get(&1).await.unwrap(), None, "A reads its delete");
    assert_eq!(stored(&table, &1).await, None);
    // The others hold it in L1 until the invalidation reaches them.
    eventually("the delete reaches the other instances", || async {
        pf.get(&1).await.unwrap().is_none() && pb.get(&1).await.unwrap().is_none()
    })
    .await;
    assert_eq!(caches[0].stats().write_fallbacks, 0);
}

/// The `#[cached]` reader of the same name, version and key sees the
/// entity's writes (and the entity sees what the reader cached).
#[tiered_cache::cached(name = "product", key = "{id}", version = 1, cache = cache, skip = [hits])]
async fn product_page(
    cache: &TieredCache,
    hits: &std::sync::atomic::AtomicU64,
    id: u64,
) -> Result<Option<Product>, std::io::Error> {
    hits.fetch_add(1, SeqCst);
    Ok(None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_function_of_the_same_key_reads_the_entity_writes() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("pairing");
    let table = db.table::<Product>();
    let (a, b) = (
        cache_on(&redis, "pairing").await,
        cache_on(&redis, "pairing").await,
    );
    let products = a
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    let body_runs = std::sync::atomic::AtomicU64::new(0);
    products.put(&5, product("chair", 4_000)).await.unwrap();
    let page = product_page(&b, &body_runs, 5).await.unwrap();
    assert_eq!(price(page.map(std::sync::Arc::new)), Some(4_000));
    assert_eq!(body_runs.load(SeqCst), 0, "served from the entity's entry");
    products.put(&5, product("chair", 3_000)).await.unwrap();
    eventually("the reader on B sees the new price", || async {
        product_page(&b, &body_runs, 5)
            .await
            .unwrap()
            .map(|p| p.price_cents)
            == Some(3_000)
    })
    .await;
    assert_eq!(body_runs.load(SeqCst), 0);
}

/// A value Redis will not take (over `max_value_bytes`): the key is
/// invalidated everywhere instead, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_that_cannot_write_redis_invalidates_everywhere() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("through-big");
    let table = db.table::<Product>();
    let build = || async {
        TieredCache::builder()
            .namespace("big")
            .redis(redis.url())
            .require_l2(true)
            .max_value_bytes(200)
            .build()
            .await
            .unwrap()
    };
    let (a, b) = (build().await, build().await);
    let pa = a
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    let pb = b
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    pa.put(&1, product("small", 1)).await.unwrap();
    assert_eq!(price(pb.get(&1).await.unwrap()), Some(1));

    let big = product(&"x".repeat(1000), 2);
    pa.put(&1, big).await.unwrap();
    assert_eq!(a.stats().write_fallbacks, 1);
    assert_eq!(a.stats().oversized_skips, 1);
    eventually("B drops the old value and loads the new one", || async {
        price(pb.get(&1).await.unwrap()) == Some(2)
    })
    .await;
}

/// Redis dead: the store has the write, this instance's L1 forgot the old
/// value, and the caller is told the other instances may not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_with_redis_down_is_never_a_silent_success() {
    let mut redis = RedisServer::start().expect("redis");
    let db = TempDb::new("through-down");
    let table = db.table::<Product>();
    let a = cache_on(&redis, "down").await;
    let pa = a
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    pa.put(&1, product("old", 1)).await.unwrap();
    assert_eq!(price(pa.get(&1).await.unwrap()), Some(1));

    redis.kill();
    let outcome = pa.put(&1, product("new", 2)).await;
    let Err(WriteError::Cache(e)) = outcome else {
        panic!("expected a cache error, got {outcome:?}");
    };
    assert!(e.to_string().contains("saved"), "{e}");
    assert_eq!(a.stats().write_fallbacks, 1);
    assert_eq!(stored(&table, &1).await.map(|p| p.price_cents), Some(2));
    assert_eq!(
        price(pa.get(&1).await.unwrap()),
        Some(2),
        "loaded from the store"
    );
}

/// Runs one command on `redis` for the test's setup.
fn redis_cmd(redis: &RedisServer, args: &[&str]) {
    let mut conn = redis.connection().expect("a test connection");
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let _: redis::Value = cmd.query(&mut conn).expect("a setup command");
}

/// Redis at `maxmemory` (noeviction) refuses plain writes with OOM, but in
/// 7.0 a script without flags is not checked: the cache's compare-and-set
/// writes still land, and every instance reads the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_while_redis_is_out_of_memory() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("oom");
    let table = db.table::<Product>();
    let (a, b) = (cache_on(&redis, "oom").await, cache_on(&redis, "oom").await);
    let on_a = a
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    let on_b = b
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    on_a.put(&1, product("old", 1)).await.unwrap();
    assert_eq!(price(on_b.get(&1).await.unwrap()), Some(1));

    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis_cmd(&redis, &["SET", "ballast", &"x".repeat(4 << 20)]);
    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory", "1mb"]);
    on_a.put(&1, product("new", 2)).await.unwrap();
    assert_eq!(stored(&table, &1).await.map(|p| p.price_cents), Some(2));
    eventually("B reads the new value", || async {
        price(on_b.get(&1).await.unwrap()) == Some(2)
    })
    .await;
}

/// Redis refusing the cache's scripts (an ACL without EVAL) in the middle
/// of the policies' writes: the store has each write, the older value is
/// deleted from Redis rather than left to be read, and it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_while_redis_refuses_the_cache_scripts() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("noperm");
    let table = db.table::<Product>();
    let (a, b) = (
        cache_on(&redis, "noperm").await,
        cache_on(&redis, "noperm").await,
    );
    let through_a = a
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    let through_b = b
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    through_a.put(&1, product("old", 1)).await.unwrap();
    assert_eq!(price(through_b.get(&1).await.unwrap()), Some(1));

    redis_cmd(&redis, &["ACL", "SETUSER", "default", "-eval", "-evalsha"]);
    through_a.put(&1, product("new", 2)).await.unwrap();
    assert_eq!(a.stats().write_fallbacks, 1);
    assert_eq!(stored(&table, &1).await.map(|p| p.price_cents), Some(2));
    assert_eq!(price(through_a.get(&1).await.unwrap()), Some(2));
    eventually("B drops the old value", || async {
        price(through_b.get(&1).await.unwrap()) == Some(2)
    })
    .await;

    // Write-behind: the queued write reaches the store; Redis's older
    // entry is dropped rather than left to be read.
    let config = WriteBehind::new().flush_interval(Duration::from_millis(5));
    let behind_a = a.entity_with(table.clone(), behind(config)).unwrap();
    behind_a.put(&1, product("queued", 3)).await.unwrap();
    assert_eq!(a.stats().write_fallbacks, 2);
    assert_eq!(
        price(behind_a.get(&1).await.unwrap()),
        Some(3),
        "the writer reads its queue"
    );
    behind_a.shutdown().await;
    assert_eq!(stored(&table, &1).await.map(|p| p.price_cents), Some(3));
    eventually("B reads the flushed value", || async {
        price(through_b.get(&1).await.unwrap()) == Some(3)
    })
    .await;
}

/// A slow load of the old row, overtaken by a write-through put: neither
/// tier keeps the older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_beats_a_slower_load_of_the_same_id() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("through-race");
    let probe = Probe::new(db.table::<Product>());
    let (a, b) = (
        cache_on(&redis, "race").await,
        cache_on(&redis, "race").await,
    );
    let pa = a
        .entity_with(probe.clone(), WritePolicy::WriteThrough)
        .unwrap();
    let pb = b
        .entity_with(probe.clone(), WritePolicy::WriteThrough)
        .unwrap();
    pa.put(&1, product("old", 1)).await.unwrap();
    a.invalidate(&Product::key(&1)).await.unwrap();

    let gate = probe.hold_loads();
    let slow = tokio::spawn({
        let pb = pb.clone();
        async move { pb.get(&1).await.unwrap() }
    });
    until("the load read the old row", || {
        probe.table.counts().loads.load(SeqCst) == 1
    })
    .await;
    pa.put(&1, product("new", 2)).await.unwrap();
    gate.add_permits(1);
    assert_eq!(
        price(slow.await.unwrap()),
        Some(1),
        "it began before the put"
    );
    gate.add_permits(100);

    assert_eq!(b.stats().stale_writes_refused, 1, "its store was refused");
    assert_eq!(price(pb.get(&1).await.unwrap()), Some(2));
    assert_eq!(price(pa.get(&1).await.unwrap()), Some(2));
    let fresh = cache_on(&redis, "race").await;
    let pf = fresh
        .entity_with(probe.clone(), WritePolicy::WriteThrough)
        .unwrap();
    assert_eq!(price(pf.get(&1).await.unwrap()), Some(2));
    assert_eq!(
        probe.table.counts().loads.load(SeqCst),
        1,
        "Redis holds the new value"
    );
}

/// Settings that flush only when told (or when a batch fills).
fn on_shutdown() -> WriteBehind {
    WriteBehind::new().flush_interval(Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_coalesces_writes_to_one_id() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("coalesce");
    let probe = Probe::new(db.table::<Product>());
    let cache = cache_on(&redis, "coalesce").await;
    let products = cache
        .entity_with(probe.clone(), behind(on_shutdown()))
        .unwrap();
    for n in 0..100 {
        products.put(&1, product("counter", n)).await.unwrap();
    }
    assert_eq!(price(products.get(&1).await.unwrap()), Some(99));
    assert_eq!(probe.write_calls(), 0, "nothing flushed yet");
    assert_eq!(cache.stats().write_queue_depth, 1);
    products.shutdown().await;

    let writes = probe.writes();
    assert_eq!(writes.len(), 1, "one store write: {writes:?}");
    assert_eq!(
        stored(&probe.table, &1).await.map(|p| p.price_cents),
        Some(99)
    );
    let stats = cache.stats();
    assert_eq!((stats.writes_queued, stats.writes_coalesced), (100, 99));
    assert_eq!((stats.write_flushes, stats.store_writes), (1, 1));
    assert_eq!(stats.write_queue_depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_flushes_in_batches_of_the_set_size() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("batches");
    let probe = Probe::new(db.table::<Product>());
    let cache = cache_on(&redis, "batches").await;
    let products = cache
        .entity_with(probe.clone(), behind(on_shutdown().batch_size(100)))
        .unwrap();
    for id in 0..250 {
        products.put(&id, product("item", id)).await.unwrap();
    }
    products.shutdown().await;
    let sizes: Vec<usize> = probe.batches.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes, [100, 100, 50]);
    assert_eq!(probe.table.all().await.unwrap().len(), 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_keeps_the_order_of_writes_to_one_id() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("order");
    let probe = Probe::new(db.table::<Product>());
    let cache = cache_on(&redis, "order").await;
    let config = WriteBehind::new().flush_interval(Duration::from_millis(1));
    let products = cache.entity_with(probe.clone(), behind(config)).unwrap();
    probe.hold();
    products.put(&1, product("a", 1)).await.unwrap();
    until("the first write is being flushed", || {
        products.pending() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    products.put(&1, product("b", 2)).await.unwrap();
    products.put(&2, product("x", 10)).await.unwrap();
    products.put(&1, product("c", 3)).await.unwrap();
    probe.release();
    products.shutdown().await;

    let writes = probe.writes();
    let of_one: Vec<u64> = writes
        .iter()
        .filter(|(id, _)| *id == 1)
        .map(|w| w.1)
        .collect();
    assert_eq!(of_one.len(), 2, "a, then c (b coalesced): {writes:?}");
    assert!(of_one[0] < of_one[1], "versions grow in write order");
    assert_eq!(
        stored(&probe.table, &1).await.map(|p| p.price_cents),
        Some(3)
    );
    assert_eq!(
        stored(&probe.table, &2).await.map(|p| p.price_cents),
        Some(10)
    );
}

fn quick_retries() -> WriteBehind {
    WriteBehind::new()
        .flush_interval(Duration::from_millis(5))
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_retries_a_failing_store() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("retries");
    let probe = Probe::new(db.table::<Product>());
    let cache = cache_on(&redis, "retries").await;
    let products = cache
        .entity_with(probe.clone(), behind(quick_retries().max_attempts(5)))
        .unwrap();
    probe.fail_next(3);
    products.put(&1, product("lamp", 5)).await.unwrap();
    products.shutdown().await;
    assert_eq!(
        stored(&probe.table, &1).await.map(|p| p.price_cents),
        Some(5)
    );
    let stats = cache.stats();
    assert_eq!((stats.write_retries, stats.write_dead_letters), (3, 0));
    assert!(products.take_dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_sets_aside_writes_that_keep_failing_and_replays_them() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("dead");
    let probe = Probe::new(db.table::<Product>());
    let cache = cache_on(&redis, "dead").await;
    let config = quick_retries()
        .max_attempts(3)
        .flush_interval(Duration::from_millis(50));
    let products = cache.entity_with(probe.clone(), behind(config)).unwrap();
    probe.fail_id(7);
    products.put(&7, product("cursed", 7)).await.unwrap();
    products.put(&8, product("fine", 8)).await.unwrap();
    until("the write became a dead letter", || {
        cache.stats().write_dead_letters == 1
    })
    .await;
    until("the good write was flushed", || products.pending() == 0).await;
    assert_eq!(
        stored(&probe.table, &8).await.map(|p| p.price_cents),
        Some(8)
    );
    assert_eq!(stored(&probe.table, &7).await, None);
    assert_eq!(cache.stats().write_retries, 2);
    // The cache no longer claims what the store does not have.
    assert_eq!(products.get(&7).await.unwrap(), None);

    let letters = products.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    let letter = letters.into_iter().next().unwrap();
    assert_eq!((letter.id, letter.attempts), (7, 4));
    assert!(letter.error.contains("unavailable"), "{}", letter.error);
    assert!(products.take_dead_letters().await.is_empty(), "taken once");

    probe.heal();
    products.replay(letter).await.unwrap();
    products.shutdown().await;
    assert_eq!(
        stored(&probe.table, &7).await.map(|p| p.price_cents),
        Some(7)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_behind_queue_holds_writers_back_or_refuses() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("full");
    let probe = Probe::new(db.table::<Product>());
    let cache = cache_on(&redis, "full").await;
    let config = WriteBehind::new()
        .capacity(4)
        .batch_size(1)
        .flush_interval(Duration::from_millis(1));
    let products = cache
        .entity_with(probe.clone(), behind(config.clone()))
        .unwrap();
    probe.hold();
    products.put(&0, product("first", 0)).await.unwrap();
    until("the first write is being flushed", || {
        cache.stats().write_queue_depth == 1 && products.pending() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for id in 1..=4 {
        products.put(&id, product("wait", id)).await.unwrap();
    }
    let blocked = tokio::spawn({
        let products = products.clone();
        async move { products.put(&5, product("sixth", 5)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished(), "the sixth write waits for room");
    products.put(&2, product("rewrite", 22)).await.unwrap(); // a waiting id: no room needed
    probe.release();
    blocked.await.unwrap().unwrap();
    products.shutdown().await;
    assert_eq!(probe.table.all().await.unwrap().len(), 6);
    assert_eq!(
        stored(&probe.table, &2).await.map(|p| p.price_cents),
        Some(22)
    );

    // The same, refusing instead of waiting.
    let refusing = cache
        .entity_with(probe.clone(), behind(config.when_full(WhenFull::Error)))
        .unwrap();
    probe.hold();
    refusing.put(&10, product("first", 0)).await.unwrap();
    until("the first write is being flushed", || {
        refusing.pending() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for id in 11..=14 {
        refusing.put(&id, product("wait", id)).await.unwrap();
    }
    let full = refusing.put(&15, product("sixth", 5)).await;
    assert!(
        matches!(&full, Err(WriteError::Cache(e)) if e.kind() == ErrorKind::QueueFull),
        "{full:?}"
    );
    assert_eq!(cache.stats().writes_rejected_full, 1);
    assert_eq!(
        refusing.get(&15).await.unwrap(),
        None,
        "a refused write is not cached"
    );
    probe.release();
    refusing.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_everything_and_refuses_later_writes() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("shutdown");
    let probe = Probe::new(db.table::<Product>());
    let cache = cache_on(&redis, "shutdown").await;
    let products = cache
        .entity_with(probe.clone(), behind(on_shutdown()))
        .unwrap();
    for id in 0..20 {
        products.put(&id, product("item", id)).await.unwrap();
    }
    products.delete(&3).await.unwrap();
    products.shutdown().await;
    assert_eq!(probe.table.all().await.unwrap().len(), 19);
    assert_eq!(stored(&probe.table, &3).await, None);
    let late = products.put(&99, product("late", 1)).await;
    assert!(
        matches!(&late, Err(WriteError::Cache(e)) if e.kind() == ErrorKind::Closed),
        "{late:?}"
    );
}

/// An entity that lives 200 ms in the cache.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Brief {
    n: u64,
}

impl Entity for Brief {
    const NAME: &'static str = "brief";
    const VERSION: u32 = 1;
    type Id = u64;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_millis(200))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_the_ttl_but_before_the_flush_sees_the_new_value() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("brief");
    let probe = Probe::new(db.table::<Brief>());
    let (a, b) = (
        cache_on(&redis, "brief").await,
        cache_on(&redis, "brief").await,
    );
    let config = WriteBehind::new()
        .flush_interval(Duration::from_millis(20))
        .backoff(Duration::from_millis(500), Duration::from_secs(2));
    let on_a = a
        .entity_with(probe.clone(), behind(config.clone()))
        .unwrap();
    let on_b = b.entity_with(probe.clone(), behind(config)).unwrap();
    probe
        .table
        .save(&1, &std::sync::Arc::new(Brief { n: 1 }), 1)
        .await
        .unwrap();
    assert_eq!(on_b.get(&1).await.unwrap().map(|v| v.n), Some(1));

    probe.hold();
    on_a.put(&1, Brief { n: 2 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        stored(&probe.table, &1).await,
        Some(Brief { n: 1 }),
        "not flushed"
    );
    assert_eq!(
        on_a.get(&1).await.unwrap().map(|v| v.n),
        Some(2),
        "the writer"
    );
    assert_eq!(
        on_b.get(&1).await.unwrap().map(|v| v.n),
        Some(2),
        "another instance"
    );
    probe.release();
    on_a.shutdown().await;
    assert_eq!(stored(&probe.table, &1).await, Some(Brief { n: 2 }));
}
