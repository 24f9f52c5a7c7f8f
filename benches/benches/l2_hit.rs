//! P4/P5: an L2 hit (L1 off) through `TieredCache` against raw redis-rs.
//!
//! A testkit `redis-server` on a free port holds 100k products twice: plain
//! postcard bytes under `raw:{key}` for the baseline, and the cache's
//! envelope under `bench:{key}`. Keys are picked uniformly.
//! - `l2_hit_1_in_flight`: `raw_get_decode` (multiplexed GET + postcard
//!   decode) vs `tiered_get` (`l1_max_bytes(0)`), one task on a
//!   current-thread runtime; and `tiered_get_no_backplane`, the same with
//!   `backplane(false)` (the epoch's version is read beside each entry).
//!   `[paired l2 1 in flight]` lines (printed): the three in alternating
//!   chunks of 2,000 reads, ratios taken within each round.
//! - `l2_hit_64_tasks`: the same with 64 tasks on a 2-worker runtime sharing
//!   one connection each side; time per op = wall time / total ops. Two
//!   steps between them price the L2 tier's plumbing:
//!   `raw_get_decode_outer_timeout` (the raw read inside a
//!   `tokio::time::timeout`) and `manager_get_decode_outer_timeout` (the
//!   same through a `ConnectionManager`, as the tier does it).
//! - P6: `cached_redis_get` is the `cached` crate's `AsyncRedisCache` (its
//!   multiplexed connection, MessagePack values) holding the same products
//!   under its own keys, read by the same 64 tasks.
//! - P5 on first reads: `tiered_get_cold_l1` is `get` with L1 on, its
//!   entries capped at 100 ms, so nearly every read of the uniform stream
//!   over 100k keys is a key L1 does not hold (as on a fresh instance, or
//!   a working set larger than L1): an L2 read and a promotion into L1.
//!   `tiered_get_cold_l1_second_read` is the same with
//!   `L1Admission::SecondRead`, which promotes a key only on its second
//!   read within a window.
//! - `[paired l2 64 tasks]` lines (printed): the seven 64-task variants in
//!   alternating chunks of 12,800 reads, ratios taken within each round.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cached::{AsyncRedisCache, ConcurrentCachedAsync};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{Key, L1Admission, TieredCache};

use common::{Cursor, Product, Sampler, KEYS, STREAM};

const TASKS: u64 = 64;

async fn raw_get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Product> {
    let bytes: Option<Vec<u8>> = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("raw GET");
    postcard::from_bytes(&bytes?).ok()
}

/// A `ConnectionManager` set up as the L2 tier sets it up.
async fn connection_manager(url: &str) -> redis::aio::ConnectionManager {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(common::L2_TIMEOUT))
        .set_response_timeout(Some(common::L2_TIMEOUT))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    redis::Client::open(url)
        .expect("a Redis URL")
        .get_connection_manager_with_config(config)
        .await
        .expect("a connection manager")
}

async fn manager_get(conn: &mut redis::aio::ConnectionManager, key: &str) -> Option<Product> {
    let bytes: Option<Vec<u8>> = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("manager GET");
    postcard::from_bytes(&bytes?).ok()
}

/// The `cached` crate's Redis store, as its users build one.
type CachedStore = Arc<AsyncRedisCache<u64, Product>>;

/// A `cached` Redis store holding product `i` under key `i`, written by
/// 64 tasks through the store itself (its keys and encoding are its own).
async fn cached_store(url: &str, n: usize) -> CachedStore {
    let store: CachedStore = Arc::new(
        AsyncRedisCache::builder("product")
            .namespace("cached-crate")
            .connection_string(url)
            .build()
            .await
            .expect("a cached Redis store"),
    );
    let writers: Vec<_> = (0..64usize)
        .map(|t| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for i in (t..n).step_by(64) {
                    let id = i as u64;
                    store
                        .async_cache_set(id, common::product(id))
                        .await
                        .expect("cached store set");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer task");
    }
    store
}

async fn cached_get(store: &CachedStore, i: usize) -> Option<Product> {
    store
        .async_cache_get(&(i as u64))
        .await
        .expect("cached store GET")
}

struct Sides {
    conn: redis::aio::MultiplexedConnection,
    cache: TieredCache,
}

async fn sides(url: &str) -> Sides {
    let sides = Sides {
        conn: common::raw_connection(url).await,
        cache: common::redis_cache(url, 0).await,
    };
    // Both sides must hit before anything is timed.
    let keys = common::keys(100);
    for key in &keys {
        assert!(raw_get(&mut sides.conn.clone(), &common::raw_key(key))
            .await
            .is_some());
        assert!(sides.cache.get(key).await.is_some());
    }
    sides
}

fn l2_hit(c: &mut Criterion) {
    let server = RedisServer::start().expect("redis-server for the benches");
    let url = server.url();
    let keys = Arc::new(common::keys(KEYS));
    let raw_keys: Arc<Vec<String>> = Arc::new(keys.iter().map(common::raw_key).collect());
    let stream = Arc::new(Sampler::Uniform.stream(KEYS, STREAM, 4));

    // One in flight, on a current-thread runtime that also drives the sockets.
    let rt = common::current_thread();
    rt.block_on(common::populate(&url, &keys));
    let s = rt.block_on(sides(&url));
    let mut g = c.benchmark_group("l2_hit_1_in_flight");
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_get_decode", |b| {
        let mut cur = Cursor::new(&stream, 0);
        b.to_async(&rt).iter(|| {
            let key = raw_keys[cur.next_index()].as_str();
            let mut conn = s.conn.clone();
            async move { raw_get(&mut conn, key).await.expect("raw hit") }
        })
    });
    g.bench_function("tiered_get", |b| {
        let mut cur = Cursor::new(&stream, 0);
        let cache = &s.cache;
        b.to_async(&rt).iter(|| {
            let key = &keys[cur.next_index()];
            async move { cache.get(key).await }
        })
    });
    // The backplane off: this instance cannot vouch for the namespace
    // epoch, whose version is read beside every entry (one pipeline).
    let lone = rt.block_on(async {
        tiered_cache::TieredCache::builder()
            .namespace(common::NAMESPACE)
            .redis(&url)
            .require_l2(true)
            .backplane(false)
            .l2_timeout(common::L2_TIMEOUT)
            .l1_max_bytes(0)
            .default_ttl(Duration::from_secs(3600))
            .build()
            .await
            .expect("a cache without the backplane")
    });
    g.bench_function("tiered_get_no_backplane", |b| {
        let mut cur = Cursor::new(&stream, 0);
        let cache = &lone;
        b.to_async(&rt).iter(|| {
            let key = &keys[cur.next_index()];
            async move { cache.get(key).await }
        })
    });
    g.finish();
    report(&s.cache, "1 in flight");
    report(&lone, "1 in flight, no backplane");
    // P4 paired: the three in alternating chunks, ratios within each round
    // (one in flight is a round trip each, so drift between criterion's
    // groups is as large as the difference measured).
    let one = [&s.cache, &lone];
    common::paired(
        "l2 1 in flight",
        &["raw_get_decode", "tiered_get", "tiered_get_no_backplane"],
        common::paired_rounds(),
        |v, round| {
            rt.block_on(async {
                const READS: usize = 2_000;
                let mut cur = Cursor::new(&stream, round * READS);
                let mut conn = s.conn.clone();
                let start = Instant::now();
                for _ in 0..READS {
                    let i = cur.next_index();
                    let hit = match v {
                        0 => raw_get(&mut conn, &raw_keys[i]).await.is_some(),
                        _ => one[v - 1].get(&keys[i]).await.is_some(),
                    };
                    assert!(hit, "every read must hit");
                }
                start.elapsed()
            })
        },
    );
    drop((s, lone, rt));

    // 64 tasks on a 2-worker runtime.
    let rt = common::multi_thread(2);
    let s = rt.block_on(sides(&url));
    let manager = rt.block_on(connection_manager(&url));
    let store = rt.block_on(cached_store(&url, KEYS));
    assert_eq!(
        rt.block_on(cached_get(&store, 7)),
        Some(common::product(7)),
        "the cached store must hit before anything is timed"
    );
    let mut g = c.benchmark_group("l2_hit_64_tasks");
    g.throughput(Throughput::Elements(1));
    // 64 tasks share `iters` reads; `$read` reads key number `$i`.
    macro_rules! tasks_bench {
        ($name:expr, $state:expr, |$s:ident, $i:ident| $read:expr) => {
            g.bench_function($name, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (state, stream) = ($state, stream.clone());
                    async move {
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..TASKS)
                            .map(|t| {
                                #[allow(unused_mut)]
                                let (mut $s, stream) = (state.clone(), stream.clone());
                                tokio::spawn(async move {
                                    let mut cur = Cursor::new(&stream, t as usize * 7_919);
                                    for _ in 0..common::share(iters, TASKS, t) {
                                        let $i = cur.next_index();
                                        std::hint::black_box($read);
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.expect("bench task");
                        }
                        start.elapsed()
                    }
                })
            });
        };
    }
    tasks_bench!(
        "raw_get_decode",
        (s.conn.clone(), raw_keys.clone()),
        |s, i| raw_get(&mut s.0, &s.1[i]).await.expect("raw hit")
    );
    // Ladder between raw and ours: the raw read inside the outer
    // `tokio::time::timeout` the L2 tier puts around every command, then
    // the same through a `ConnectionManager` (as the L2 tier uses).
    tasks_bench!(
        "raw_get_decode_outer_timeout",
        (s.conn.clone(), raw_keys.clone()),
        |s, i| tokio::time::timeout(common::L2_TIMEOUT, raw_get(&mut s.0, &s.1[i]))
            .await
            .expect("in time")
            .expect("raw hit")
    );
    tasks_bench!(
        "manager_get_decode_outer_timeout",
        (manager.clone(), raw_keys.clone()),
        |s, i| tokio::time::timeout(common::L2_TIMEOUT, manager_get(&mut s.0, &s.1[i]))
            .await
            .expect("in time")
            .expect("raw hit")
    );
    tasks_bench!("tiered_get", (s.cache.clone(), keys.clone()), |s, i| {
        let key: &Key<Product> = &s.1[i];
        s.0.get(key).await
    });
    // P6: the same reads through the `cached` crate's Redis store.
    tasks_bench!("cached_redis_get", store.clone(), |s, i| cached_get(&s, i)
        .await
        .expect("cached store hit"));
    // P5 on first reads: L1 on, but it no longer holds what is read.
    let cold = rt.block_on(common::cold_l1_cache(&url, L1Admission::EveryRead));
    let cold_second = rt.block_on(common::cold_l1_cache(&url, L1Admission::SecondRead));
    for (name, cache) in [
        ("tiered_get_cold_l1", &cold),
        ("tiered_get_cold_l1_second_read", &cold_second),
    ] {
        tasks_bench!(name, (cache.clone(), keys.clone()), |s, i| {
            let key: &Key<Product> = &s.1[i];
            s.0.get(key).await.expect("cold L1: an L2 hit")
        });
    }
    g.finish();
    report(&s.cache, "64 tasks");
    report(&cold, "64 tasks, cold L1");
    report(&cold_second, "64 tasks, cold L1, second read");
    let ctx = Arc::new(Ctx {
        conn: s.conn.clone(),
        manager,
        cache: s.cache.clone(),
        cold: [cold.clone(), cold_second.clone()],
        store,
        keys,
        raw_keys,
        stream,
    });
    let names = [
        "raw_get_decode",
        "raw_get_decode_outer_timeout",
        "manager_get_decode_outer_timeout",
        "tiered_get",
        "cached_redis_get",
        "tiered_get_cold_l1",
        "tiered_get_cold_l1_second_read",
    ];
    // P6 is ours against the `cached` store: tiered_get / cached_redis_get.
    common::paired_with(
        "l2 64 tasks",
        &names,
        common::paired_rounds(),
        &[(3, 4)],
        |v, round| rt.block_on(chunk_64(Arc::clone(&ctx), v, round)),
    );
    report(&s.cache, "64 tasks, after paired");
    report(&cold, "64 tasks, cold L1, after paired");
    report(&cold_second, "64 tasks, cold L1, second read, after paired");
    drop((s, cold, cold_second, rt, server));
}

/// What a paired round of the 64-task variants reads with.
struct Ctx {
    conn: redis::aio::MultiplexedConnection,
    manager: redis::aio::ConnectionManager,
    cache: TieredCache,
    /// L1 on but cold: every read, then second reads only.
    cold: [TieredCache; 2],
    store: CachedStore,
    keys: Arc<Vec<Key<Product>>>,
    raw_keys: Arc<Vec<String>>,
    stream: Arc<Vec<u32>>,
}

/// One chunk of variant `v`: 64 tasks, 200 reads each.
async fn chunk_64(ctx: Arc<Ctx>, v: usize, round: usize) -> Duration {
    const PER_TASK: usize = 200;
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS as usize)
        .map(|t| {
            let ctx = Arc::clone(&ctx);
            tokio::spawn(async move {
                let from = (round * TASKS as usize + t) * PER_TASK;
                let mut cur = Cursor::new(&ctx.stream, from);
                let (mut conn, mut manager) = (ctx.conn.clone(), ctx.manager.clone());
                for _ in 0..PER_TASK {
                    let i = cur.next_index();
                    let raw = ctx.raw_keys[i].as_str();
                    let hit = match v {
                        0 => raw_get(&mut conn, raw).await.is_some(),
                        1 => tokio::time::timeout(common::L2_TIMEOUT, raw_get(&mut conn, raw))
                            .await
                            .ok()
                            .flatten()
                            .is_some(),
                        2 => {
                            tokio::time::timeout(common::L2_TIMEOUT, manager_get(&mut manager, raw))
                                .await
                                .ok()
                                .flatten()
                                .is_some()
                        }
                        3 => ctx.cache.get(&ctx.keys[i]).await.is_some(),
                        4 => cached_get(&ctx.store, i).await.is_some(),
                        _ => ctx.cold[v - 5].get(&ctx.keys[i]).await.is_some(),
                    };
                    assert!(hit, "every read must hit");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("bench task");
    }
    start.elapsed()
}

/// Says what the cache did, so a run that measured errors or misses shows it.
fn report(cache: &TieredCache, what: &str) {
    let st = cache.stats();
    println!(
        "[l2_hit {what}] tiered stats: l1_hits={} l2_hits={} misses={} l2_errors={} l2_skipped={} l2_reads_batched={} promotions_deferred={}",
        st.l1_hits, st.l2_hits, st.misses, st.l2_errors, st.l2_skipped, st.l2_reads_batched, st.promotions_deferred
    );
    if st.misses + st.l2_errors > 0 {
        println!("[l2_hit {what}] WARNING: the tiered side missed or failed; its figures are not L2 hits");
    }
}

criterion_group! {
    name = benches;
    config = common::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    targets = l2_hit
}
criterion_main!(benches);
