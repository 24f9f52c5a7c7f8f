//! P1: an L1 hit through `TieredCache` against a raw moka hit.
//!
//! Groups (each runs its baseline and ours side by side):
//! - `l1_hit/{uniform,zipf1.0}`: `raw_moka_get` (`moka::future::Cache<String,
//!   Arc<Product>>::get`), `raw_moka_u64_get` (`Cache<u64, Arc<Product>>`
//!   keyed by the key's index, as a user of moka alone would write it),
//!   `redis_client_cache_get` (redis-rs's own client-side cache, feature
//!   `cache-aio`: GET + postcard decode on a RESP3 tracked multiplexed
//!   connection whose LRU holds every key, so every GET is answered from
//!   it; checked with its statistics), `tiered_get` and
//!   `tiered_get_or_load` (hits only) on 100k keys, one task.
//! - `l1_hit_2tasks/zipf1.0`: the same on a 2-worker runtime with 2 tasks;
//!   time per operation = wall time / total operations.
//! - `l1_hit_breakdown/{uniform,zipf1.0}`: where `tiered_get`'s extra time
//!   goes. Between raw moka and `tiered_get` sit two mirrors built here:
//!   `moka_l1_config` (moka configured as our L1: weigher, per-entry
//!   expiry, invalidation closures; `Arc<str>` keys; still `Arc<Product>`
//!   values) and `moka_l1_mirror` (that plus our entry wrapper: an
//!   `Arc<Entry>` holding `Arc<dyn Any>`, `Instant::now()`, the freshness
//!   check, the downcast and a striped stats counter), plus
//!   `moka_l1_mirror_fasthash` (the mirror with a fast keyed hasher instead
//!   of moka's default SipHash) and `instant_now`.
//! - `[paired ...]` lines (printed, not criterion): every variant against
//!   raw moka in alternating chunks of 20k reads, the ratio taken within
//!   each round; drifting machine load cancels out of these. Also
//!   `tiered_get` against the u64-keyed moka and the client-side cache,
//!   and `[paired 2 tasks zipf1.0]`: the same with 2 tasks of 10k reads.
//!
//! The client-side cache's `redis-server` is a testkit one on a free port,
//! started with the fixture and stopped by the last target; its connection
//! is driven by a 1-worker runtime of its own (its hits never leave the
//! caller, so that runtime idles while the benches run).

mod common;

use std::hash::BuildHasher;
use std::hash::RandomState;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use moka::future::Cache;
use moka::Expiry;
use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, TieredCache};
use tokio::runtime::Runtime;

use common::mirror::{Entry, FastHash};
use common::{product, Cursor, Product, Sampler, KEYS, STREAM};

/// The loader of the `get_or_load` hit bench: never called (checked).
#[derive(Debug)]
struct NotCalled;

async fn not_called() -> Result<Product, NotCalled> {
    Err(NotCalled)
}

/// Everything the L1 benches read, filled once.
struct Fixture {
    keys: Arc<Vec<Key<Product>>>,
    raw: Cache<String, Arc<Product>>,
    raw_u64: Cache<u64, Arc<Product>>,
    cc: ClientCache,
    cache: TieredCache,
    opts: EntryOptions,
    config: Cache<Arc<str>, Arc<Product>>,
    mirror: Cache<Arc<str>, Arc<Entry>>,
    mirror_fast: Cache<Arc<str>, Arc<Entry>, FastHash>,
}

/// redis-rs's client-side cache, warmed with all 100k products.
struct ClientCache {
    /// Taken (and so killed) by the last target, `stop_redis`.
    server: Mutex<Option<RedisServer>>,
    /// Drives the connection: its socket and the server's invalidation
    /// pushes. Kept alive for the whole process.
    _rt: Runtime,
    conn: redis::aio::MultiplexedConnection,
    /// The Redis key of each product: `raw:{key}`, its plain postcard bytes.
    raw_keys: Arc<Vec<String>>,
    /// The cache's misses once warm: any later miss was a round trip.
    warm_misses: usize,
}

impl ClientCache {
    fn stats(&self) -> redis::caching::CacheStatistics {
        self.conn
            .get_cache_statistics()
            .expect("the connection has the client-side cache")
    }

    /// Prints the cache's counters, and a warning when a GET since the
    /// warm-up missed it (then its figures are not all client-cache hits).
    fn check(&self, what: &str) {
        let st = self.stats();
        println!(
            "[client cache {what}] hits={} misses={} (at warm-up end {}) invalidations={}",
            st.hit, st.miss, self.warm_misses, st.invalidate
        );
        if st.miss > self.warm_misses {
            println!(
                "[client cache {what}] WARNING: {} GETs since the warm-up missed the client-side cache \
                 and went to Redis: redis_client_cache_get is not all client-cache hits",
                st.miss - self.warm_misses
            );
        }
    }
}

/// Starts a redis-server, writes every product under its raw key and reads
/// each through a client-side-cache connection twice: the first read
/// fills the cache (a miss), the second must hit it.
fn client_cache(keys: &[Key<Product>]) -> ClientCache {
    let server = RedisServer::start().expect("redis-server for the client-cache baseline");
    let url = server.url();
    let rt = common::multi_thread(1);
    let raw_keys: Arc<Vec<String>> = Arc::new(keys.iter().map(common::raw_key).collect());
    let conn = rt.block_on(async {
        common::populate_raw(&url, keys).await;
        // Twice the keys: the LRU is 32 shards of size / 32 keys each.
        let conn = common::client_cache_connection(&url, 2 * KEYS).await;
        for pass in 0..2 {
            let readers: Vec<_> = (0..16usize)
                .map(|t| {
                    let (mut conn, raw_keys) = (conn.clone(), Arc::clone(&raw_keys));
                    tokio::spawn(async move {
                        for i in (t..raw_keys.len()).step_by(16) {
                            let p = common::get_decode(&mut conn, &raw_keys[i]).await;
                            assert_eq!(p.map(|p| p.id), Some(i as u64), "pass {pass}");
                        }
                    })
                })
                .collect();
            for r in readers {
                r.await.expect("warm-up reader");
            }
        }
        conn
    });
    let st = conn
        .get_cache_statistics()
        .expect("the connection has the client-side cache");
    assert_eq!(
        (st.miss, st.hit),
        (KEYS, KEYS),
        "the client-side cache must miss each key once, then hit it: {st:?}"
    );
    ClientCache {
        server: Mutex::new(Some(server)),
        _rt: rt,
        conn,
        raw_keys,
        warm_misses: st.miss,
    }
}

/// An hour's deadline for the `moka_l1_config` values.
struct HourDeadline;

impl Expiry<Arc<str>, Arc<Product>> for HourDeadline {
    fn expire_after_create(&self, _: &Arc<str>, _: &Arc<Product>, _: Instant) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }
}

/// Mirror of the crate's striped counter (stats.rs).
#[repr(align(128))]
struct Padded(AtomicU64);
static HITS: [Padded; 8] = [const { Padded(AtomicU64::new(0)) }; 8];

#[inline]
fn count_hit() {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! { static STRIPE: usize = NEXT.fetch_add(1, Relaxed) % 8; }
    HITS[STRIPE.with(|s| *s)].0.fetch_add(1, Relaxed);
}

#[inline]
async fn mirror_get<S>(mirror: &Cache<Arc<str>, Arc<Entry>, S>, key: &str) -> Option<Arc<Product>>
where
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    let now = Instant::now();
    let entry = mirror.get(key).await?;
    if now >= entry.fresh_until {
        return None;
    }
    let value = Arc::clone(entry.value.as_ref()?)
        .downcast::<Product>()
        .ok()?;
    count_hit();
    Some(value)
}

/// Built once and shared by every group: moka and an L1-only cache are not
/// tied to a runtime.
static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let keys = common::keys(KEYS);
        let cc = client_cache(&keys);
        common::current_thread().block_on(build_fixture(keys, cc))
    })
}

async fn build_fixture(keys: Vec<Key<Product>>, cc: ClientCache) -> Fixture {
    // With the `metrics` feature: a real recorder, as a service would run
    // it, installed before the cache is built (the cache exports to it).
    #[cfg(feature = "metrics")]
    {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("a Prometheus recorder");
        println!("[metrics] on: a Prometheus recorder is installed");
        std::mem::forget(handle);
    }
    let raw = Cache::builder().max_capacity(2 * KEYS as u64).build();
    let raw_u64 = Cache::builder().max_capacity(2 * KEYS as u64).build();
    let cache = common::l1_only_cache().await;
    let opts = EntryOptions::new(Duration::from_secs(60 * 60));
    let config = Cache::builder()
        .max_capacity(512 << 20)
        .weigher(|_: &Arc<str>, _: &Arc<Product>| 400)
        .expire_after(HourDeadline)
        .support_invalidation_closures()
        .build();
    let mirror = common::mirror::l1_like(512 << 20, RandomState::new());
    let mirror_fast = common::mirror::l1_like(512 << 20, FastHash::default());
    let hour = Duration::from_secs(3600);
    for (i, key) in keys.iter().enumerate() {
        let p = product(i as u64);
        raw.insert(key.as_str().to_owned(), Arc::new(p.clone()))
            .await;
        raw_u64.insert(i as u64, Arc::new(p.clone())).await;
        config
            .insert(Arc::from(key.as_str()), Arc::new(p.clone()))
            .await;
        let entry = Entry::new(Arc::new(p.clone()), hour, 400);
        mirror
            .insert(Arc::from(key.as_str()), Arc::new(entry))
            .await;
        let entry = Entry::new(Arc::new(p.clone()), hour, 400);
        mirror_fast
            .insert(Arc::from(key.as_str()), Arc::new(entry))
            .await;
        cache.set(key, p, &opts).await.expect("set");
    }
    raw.run_pending_tasks().await;
    raw_u64.run_pending_tasks().await;
    config.run_pending_tasks().await;
    mirror.run_pending_tasks().await;
    mirror_fast.run_pending_tasks().await;
    let _ = cache.l1_weighted_size().await; // runs moka's pending tasks
    let mut hits = [0usize; 6];
    for (i, key) in keys.iter().enumerate() {
        hits[0] += usize::from(raw.get(key.as_str()).await.is_some());
        hits[1] += usize::from(config.get(key.as_str()).await.is_some());
        hits[2] += usize::from(mirror_get(&mirror, key.as_str()).await.is_some());
        hits[3] += usize::from(mirror_get(&mirror_fast, key.as_str()).await.is_some());
        hits[4] += usize::from(cache.get(key).await.is_some());
        hits[5] += usize::from(raw_u64.get(&(i as u64)).await.is_some());
    }
    assert_eq!(hits, [KEYS; 6], "every key must be a hit in every variant");
    Fixture {
        keys: Arc::new(keys),
        raw,
        raw_u64,
        cc,
        cache,
        opts,
        config,
        mirror,
        mirror_fast,
    }
}

fn one_task(c: &mut Criterion) {
    let rt = common::current_thread();
    let f = fixture();
    for sampler in [Sampler::Uniform, Sampler::Zipf] {
        let stream = sampler.stream(KEYS, STREAM, 1);
        let mut g = c.benchmark_group(format!("l1_hit/{}", sampler.name()));
        g.throughput(Throughput::Elements(1));
        hit_benches(&mut g, &rt, f, &stream);
        g.finish();
        f.cc.check(&format!("l1_hit/{}", sampler.name()));
    }
    assert_eq!(f.cache.stats().loads, 0, "get_or_load must only have hit");
}

fn hit_benches(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    f: &Fixture,
    stream: &[u32],
) {
    let keys = &f.keys;
    g.bench_function("raw_moka_get", |b| {
        let mut cur = Cursor::new(stream, 0);
        let raw = &f.raw;
        b.to_async(rt).iter(|| {
            let key = keys[cur.next_index()].as_str();
            async move { raw.get(key).await }
        })
    });
    g.bench_function("raw_moka_u64_get", |b| {
        let mut cur = Cursor::new(stream, 0);
        let raw = &f.raw_u64;
        b.to_async(rt).iter(|| {
            let i = cur.next_index() as u64;
            async move { raw.get(&i).await }
        })
    });
    g.bench_function("redis_client_cache_get", |b| {
        // `iter_custom`, so that one connection handle serves every read
        // (as a user holds one) instead of a clone per read.
        let (raw_keys, mut from) = (&f.cc.raw_keys, 0);
        b.to_async(rt).iter_custom(|iters| {
            let mut conn = f.cc.conn.clone();
            let mut cur = Cursor::new(stream, from);
            from += iters as usize;
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let key = raw_keys[cur.next_index()].as_str();
                    std::hint::black_box(common::get_decode(&mut conn, key).await);
                }
                start.elapsed()
            }
        })
    });
    g.bench_function("tiered_get", |b| {
        let mut cur = Cursor::new(stream, 0);
        let cache = &f.cache;
        b.to_async(rt).iter(|| {
            let key = &keys[cur.next_index()];
            async move { cache.get(key).await }
        })
    });
    g.bench_function("tiered_get_or_load", |b| {
        let mut cur = Cursor::new(stream, 0);
        let (cache, opts) = (&f.cache, &f.opts);
        b.to_async(rt).iter(|| {
            let key = &keys[cur.next_index()];
            async move { cache.get_or_load(key, opts, not_called).await.ok() }
        })
    });
}

fn two_tasks(c: &mut Criterion) {
    let rt = common::multi_thread(2);
    let f = fixture();
    let stream = Arc::new(Sampler::Zipf.stream(KEYS, STREAM, 2));
    let mut g = c.benchmark_group("l1_hit_2tasks/zipf1.0");
    g.throughput(Throughput::Elements(1));
    // Each closure does `n` hits starting at `start` in the shared stream;
    // `$i` is the key's index, `$key` the key.
    macro_rules! two_task_bench {
        ($name:literal, $state:expr, |$s:ident, $i:ident, $key:ident| $get:expr) => {
            g.bench_function($name, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let state = $state;
                    let (keys, stream) = (Arc::clone(&f.keys), Arc::clone(&stream));
                    async move {
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..2u64)
                            .map(|t| {
                                #[allow(unused_mut)]
                                let (keys, stream, mut $s) =
                                    (Arc::clone(&keys), Arc::clone(&stream), state.clone());
                                tokio::spawn(async move {
                                    let mut cur = Cursor::new(&stream, t as usize * STREAM / 2);
                                    let mut found = 0u64;
                                    for _ in 0..common::share(iters, 2, t) {
                                        let $i = cur.next_index();
                                        let $key = &keys[$i];
                                        found += u64::from($get.is_some());
                                    }
                                    found
                                })
                            })
                            .collect();
                        let mut found = 0;
                        for t in tasks {
                            found += t.await.expect("bench task");
                        }
                        let elapsed = start.elapsed();
                        assert_eq!(found, iters, "every read must hit");
                        elapsed
                    }
                })
            });
        };
    }
    two_task_bench!("raw_moka_get", f.raw.clone(), |raw, _i, key| raw
        .get(key.as_str())
        .await);
    two_task_bench!("raw_moka_u64_get", f.raw_u64.clone(), |raw, i, _key| raw
        .get(&(i as u64))
        .await);
    two_task_bench!(
        "redis_client_cache_get",
        (f.cc.conn.clone(), Arc::clone(&f.cc.raw_keys)),
        |s, i, _key| common::get_decode(&mut s.0, &s.1[i]).await
    );
    two_task_bench!("tiered_get", f.cache.clone(), |cache, _i, key| cache
        .get(key)
        .await);
    two_task_bench!(
        "tiered_get_or_load",
        (f.cache.clone(), f.opts.clone()),
        |s, _i, key| s.0.get_or_load(key, &s.1, not_called).await.ok()
    );
    g.finish();
    f.cc.check("l1_hit_2tasks/zipf1.0");
    assert_eq!(f.cache.stats().loads, 0, "get_or_load must only have hit");
}

fn breakdown(c: &mut Criterion) {
    let rt = common::current_thread();
    let f = fixture();
    let mut g = c.benchmark_group("l1_hit_breakdown");
    g.bench_function("instant_now", |b| b.iter(Instant::now));
    g.finish();
    for sampler in [Sampler::Uniform, Sampler::Zipf] {
        let stream = sampler.stream(KEYS, STREAM, 3);
        let keys = &f.keys;
        let mut g = c.benchmark_group(format!("l1_hit_breakdown/{}", sampler.name()));
        g.throughput(Throughput::Elements(1));
        g.bench_function("raw_moka_get", |b| {
            let mut cur = Cursor::new(&stream, 0);
            let raw = &f.raw;
            b.to_async(&rt).iter(|| {
                let key = keys[cur.next_index()].as_str();
                async move { raw.get(key).await }
            })
        });
        g.bench_function("moka_l1_config", |b| {
            let mut cur = Cursor::new(&stream, 0);
            let config = &f.config;
            b.to_async(&rt).iter(|| {
                let key = keys[cur.next_index()].as_str();
                async move { config.get(key).await }
            })
        });
        g.bench_function("moka_l1_mirror", |b| {
            let mut cur = Cursor::new(&stream, 0);
            let mirror = &f.mirror;
            b.to_async(&rt).iter(|| {
                let key = keys[cur.next_index()].as_str();
                async move { mirror_get(mirror, key).await }
            })
        });
        g.bench_function("moka_l1_mirror_fasthash", |b| {
            let mut cur = Cursor::new(&stream, 0);
            let mirror = &f.mirror_fast;
            b.to_async(&rt).iter(|| {
                let key = keys[cur.next_index()].as_str();
                async move { mirror_get(mirror, key).await }
            })
        });
        g.bench_function("tiered_get", |b| {
            let mut cur = Cursor::new(&stream, 0);
            let cache = &f.cache;
            b.to_async(&rt).iter(|| {
                let key = &keys[cur.next_index()];
                async move { cache.get(key).await }
            })
        });
        g.finish();
    }
}

/// Paired ratios (see `common::paired`) of every L1 variant to raw moka:
/// the figures to trust on a noisy machine.
fn paired_ratios(_: &mut Criterion) {
    const CHUNK: usize = 20_000;
    let rt = common::current_thread();
    let f = fixture();
    let keys = &f.keys;
    // A future is built (and may be moved) on every call: its size is work.
    let k = &keys[0];
    println!(
        "[future sizes] raw moka get {} B, moka_l1_mirror get {} B, tiered get {} B, tiered get_or_load {} B",
        std::mem::size_of_val(&f.raw.get(k.as_str())),
        std::mem::size_of_val(&mirror_get(&f.mirror, k.as_str())),
        std::mem::size_of_val(&f.cache.get(k)),
        std::mem::size_of_val(&f.cache.get_or_load(k, &f.opts, not_called)),
    );
    for sampler in [Sampler::Uniform, Sampler::Zipf] {
        let stream = sampler.stream(KEYS, STREAM, 7);
        let names = [
            "raw_moka_get",
            "moka_l1_config",
            "moka_l1_mirror",
            "moka_l1_mirror_fasthash",
            "tiered_get",
            "tiered_get_or_load",
            "raw_moka_u64_get",
            "redis_client_cache_get",
        ];
        // Ours against the other two floors, within each round too.
        let vs = [(4, 6), (4, 7)];
        common::paired_with(
            sampler.name(),
            &names,
            common::paired_rounds(),
            &vs,
            |v, round| {
                rt.block_on(async {
                    let mut cur = Cursor::new(&stream, round * CHUNK);
                    let mut found = 0usize;
                    let mut conn = f.cc.conn.clone();
                    let misses = f.cc.stats().miss;
                    let start = Instant::now();
                    // One loop per variant, so the loop body is the read alone.
                    macro_rules! chunk {
                        (|$i:ident, $key:ident| $read:expr) => {
                            for _ in 0..CHUNK {
                                let $i = cur.next_index();
                                let $key = &keys[$i];
                                found += usize::from(std::hint::black_box($read).is_some());
                            }
                        };
                    }
                    match v {
                        0 => chunk!(|_i, k| f.raw.get(k.as_str()).await),
                        1 => chunk!(|_i, k| f.config.get(k.as_str()).await),
                        2 => chunk!(|_i, k| mirror_get(&f.mirror, k.as_str()).await),
                        3 => chunk!(|_i, k| mirror_get(&f.mirror_fast, k.as_str()).await),
                        4 => chunk!(|_i, k| f.cache.get(k).await),
                        5 => chunk!(|_i, k| f.cache.get_or_load(k, &f.opts, not_called).await.ok()),
                        6 => chunk!(|i, _k| f.raw_u64.get(&(i as u64)).await),
                        _ => chunk!(|i, _k| common::get_decode(&mut conn, &f.cc.raw_keys[i]).await),
                    }
                    let elapsed = start.elapsed();
                    assert_eq!(found, CHUNK, "every read must hit");
                    let missed = f.cc.stats().miss - misses;
                    assert_eq!(
                        missed, 0,
                        "redis_client_cache_get: {missed} GETs missed the client-side cache"
                    );
                    elapsed
                })
            },
        );
    }
    f.cc.check("paired");
}

/// Paired ratios with 2 tasks on a 2-worker runtime (Zipf): each chunk is
/// 2 tasks of `CHUNK / 2` reads, timed from spawn to the last join.
fn paired_two_tasks(_: &mut Criterion) {
    const CHUNK: usize = 20_000;
    let rt = common::multi_thread(2);
    let f = fixture();
    let stream = Arc::new(Sampler::Zipf.stream(KEYS, STREAM, 8));
    let names = [
        "raw_moka_get",
        "raw_moka_u64_get",
        "redis_client_cache_get",
        "tiered_get",
    ];
    let misses = f.cc.stats().miss;
    common::paired_with(
        "2 tasks zipf1.0",
        &names,
        common::paired_rounds(),
        &[(3, 1), (3, 2)],
        |v, round| {
            rt.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..2usize)
                    .map(|t| {
                        let stream = Arc::clone(&stream);
                        tokio::spawn(async move {
                            let f = fixture();
                            let keys = &f.keys;
                            let mut conn = f.cc.conn.clone();
                            let mut cur = Cursor::new(&stream, (round * 2 + t) * CHUNK / 2);
                            let mut found = 0usize;
                            macro_rules! chunk {
                                (|$i:ident| $read:expr) => {
                                    for _ in 0..CHUNK / 2 {
                                        let $i = cur.next_index();
                                        found += usize::from(std::hint::black_box($read).is_some());
                                    }
                                };
                            }
                            match v {
                                0 => chunk!(|i| f.raw.get(keys[i].as_str()).await),
                                1 => chunk!(|i| f.raw_u64.get(&(i as u64)).await),
                                2 => chunk!(
                                    |i| common::get_decode(&mut conn, &f.cc.raw_keys[i]).await
                                ),
                                _ => chunk!(|i| f.cache.get(&keys[i]).await),
                            }
                            found
                        })
                    })
                    .collect();
                let mut found = 0;
                for t in tasks {
                    found += t.await.expect("bench task");
                }
                let elapsed = start.elapsed();
                assert_eq!(found, CHUNK, "every read must hit");
                elapsed
            })
        },
    );
    let missed = f.cc.stats().miss - misses;
    assert_eq!(
        missed, 0,
        "redis_client_cache_get: {missed} GETs missed the client-side cache"
    );
}

/// Stops the client-side cache's redis-server (a static is never dropped).
fn stop_redis(_: &mut Criterion) {
    if let Some(f) = FIXTURE.get() {
        drop(f.cc.server.lock().expect("the server lock").take());
    }
}

criterion_group! {
    name = benches;
    config = common::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    targets = one_task, two_tasks, breakdown, paired_ratios, paired_two_tasks, stop_redis
}
criterion_main!(benches);
