//! P7 and P9 (issue 3): batch reads through both tiers, and a hot key across
//! its expiries with and without XFetch.
//!
//! - `get_many_cold_l1/{1,8}_tasks`: batches of 100 distinct keys out of
//!   100k. `raw_mget_decode` is one MGET of pre-built `raw:` keys plus a
//!   postcard decode of each value; `tiered_get_many` is `get_many` on a
//!   cache whose L1 no longer holds the keys (100 L1 misses, one MGET,
//!   envelope + value decode, promotion into L1): L1 entries are capped at
//!   100 ms and a key comes back only every 1,000 batches. Throughput is in
//!   keys. `tiered_get_many_second_read` is the same with
//!   `L1Admission::SecondRead` (no key comes back within its window, so
//!   nothing is promoted). After the groups, a `[zipf hit ratio]` line:
//!   the share of `get`s over Zipf(1.0) that L1 served, in both admission
//!   modes, with an L1 that holds every key and one of 8 MiB.
//! - `get_many_breakdown/1_task`: where the cold `get_many` time goes:
//!   `raw_mget_decode`, then `mirror_get_many_{siphash,fasthash}` (the same
//!   plus 100 L1 lookups and 100 promotions into a moka configured as our
//!   L1, with moka's default SipHash or a fast keyed hasher), the same
//!   without `support_invalidation_closures`, then ours; and the same
//!   ladder as `[paired get_many 1 task]` lines (alternating chunks of 40
//!   batches, ratios within each round: robust to drifting load).
//! - `xfetch_hot_key/{off,on}`: two tasks on a 2-worker runtime read one key
//!   with `get_or_load` (TTL 200 ms, loader sleeping 5 ms, a `yield_now`
//!   between reads as a stand-in for the rest of a request). Criterion
//!   reports the mean read latency; before it, a fixed 2 s run per variant
//!   prints p50/p90/p98/p99/p99.9/max, the reads slower than 1 ms and than
//!   4.5 ms (a wait on the 5 ms loader) and the loader calls, next to raw
//!   moka read the same way; the cache's own counters (`misses`,
//!   `coalesced_waits`) say how many reads waited on a load.

mod common;

use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, L1Admission, TieredCache};
use tokio::runtime::Runtime;

use common::mirror::{Entry, FastHash};
use common::{product, Product, KEYS};

const BATCH: usize = 100;
const BATCHES: usize = KEYS / BATCH;

/// The keys in a fixed random order, so batch `b` is `keys[b*100..][..100]`.
struct Batches {
    keys: Arc<Vec<Key<Product>>>,
    raw: Arc<Vec<String>>,
}

fn batches(seed: u64) -> Batches {
    let mut keys = common::keys(KEYS);
    keys.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let raw = keys.iter().map(common::raw_key).collect();
    Batches {
        keys: Arc::new(keys),
        raw: Arc::new(raw),
    }
}

/// Runs `iters` batches over `tasks` tasks; each task claims batch numbers
/// from a shared counter in `[from, to)` and calls `read` on each.
async fn run_batches<F, Fut>(tasks: usize, from: usize, to: usize, read: F) -> u64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = usize> + Send,
{
    let next = Arc::new(AtomicUsize::new(from));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (next, read) = (Arc::clone(&next), read.clone());
            tokio::spawn(async move {
                let mut found = 0u64;
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= to {
                        return found;
                    }
                    found += read(b % BATCHES).await as u64;
                }
            })
        })
        .collect();
    let mut found = 0;
    for h in handles {
        found += h.await.expect("bench task");
    }
    found
}

async fn raw_mget(mut conn: redis::aio::MultiplexedConnection, keys: &[String]) -> usize {
    let replies: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
        .arg(keys)
        .query_async(&mut conn)
        .await
        .expect("raw MGET");
    replies
        .iter()
        .flatten()
        .filter_map(|bytes| postcard::from_bytes::<Product>(bytes).ok())
        .count()
}

fn get_many(c: &mut Criterion, rt: &Runtime, url: &str) {
    let b = batches(5);
    let conn = rt.block_on(common::raw_connection(url));
    for tasks in [1usize, 8] {
        let mut g = c.benchmark_group(format!("get_many_cold_l1/{tasks}_tasks"));
        g.throughput(Throughput::Elements(BATCH as u64));
        let raw_next = Arc::new(AtomicUsize::new(0));
        g.bench_function("raw_mget_decode", |bench| {
            bench.to_async(rt).iter_custom(|iters| {
                let (conn, raw, raw_next) = (conn.clone(), b.raw.clone(), raw_next.clone());
                async move {
                    let from = raw_next.fetch_add(iters as usize, Ordering::Relaxed);
                    let to = from + iters as usize;
                    let start = Instant::now();
                    let found = run_batches(tasks, from, to, move |n| {
                        let (conn, raw) = (conn.clone(), raw.clone());
                        async move { raw_mget(conn, &raw[n * BATCH..][..BATCH]).await }
                    })
                    .await;
                    let elapsed = start.elapsed();
                    assert_eq!(found, iters * BATCH as u64, "every raw key must hit");
                    elapsed
                }
            })
        });
        for (name, admission) in [
            ("tiered_get_many", L1Admission::EveryRead),
            ("tiered_get_many_second_read", L1Admission::SecondRead),
        ] {
            let cache = rt.block_on(common::cold_l1_cache(url, admission));
            let (next, misses) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicU64::new(0)));
            g.bench_function(name, |bench| {
                bench.to_async(rt).iter_custom(|iters| {
                    let (cache, keys) = (cache.clone(), b.keys.clone());
                    let (next, misses) = (next.clone(), misses.clone());
                    async move {
                        let from = next.fetch_add(iters as usize, Ordering::Relaxed);
                        let to = from + iters as usize;
                        let start = Instant::now();
                        let found = run_batches(tasks, from, to, move |n| {
                            let (cache, keys) = (cache.clone(), keys.clone());
                            async move {
                                let got = cache.get_many(&keys[n * BATCH..][..BATCH]).await;
                                got.iter().filter(|v| v.is_some()).count()
                            }
                        })
                        .await;
                        let elapsed = start.elapsed();
                        misses.fetch_add(iters * BATCH as u64 - found, Ordering::Relaxed);
                        elapsed
                    }
                })
            });
            let st = cache.stats();
            report_cold(
                &format!("{name} {tasks} tasks"),
                &st,
                misses.load(Ordering::Relaxed),
            );
        }
        g.finish();
    }
    zipf_hit_ratios(rt, url);
}

/// What `L1Admission::SecondRead` costs in hits: `get` over a Zipf(1.0)
/// stream of the 100k keys (8 tasks, 400k reads) on a fresh cache per
/// mode, with an L1 that holds every key and with one that holds about a
/// tenth of them; prints the share of reads served by L1.
fn zipf_hit_ratios(rt: &Runtime, url: &str) {
    const READS: usize = 400_000;
    const TASKS: usize = 8;
    let stream = Arc::new(common::Sampler::Zipf.stream(KEYS, READS, 11));
    let keys = Arc::new(common::keys(KEYS));
    let mut line = Vec::new();
    for (l1_bytes, l1_name) in [(256u64 << 20, "L1 holds all"), (8 << 20, "L1 of 8 MiB")] {
        for (admission, name) in [
            (L1Admission::EveryRead, "every read"),
            (L1Admission::SecondRead, "second read"),
        ] {
            let ratio = rt.block_on(async {
                let cache = TieredCache::builder()
                    .namespace(common::NAMESPACE)
                    .redis(url)
                    .require_l2(true)
                    .l2_timeout(common::L2_TIMEOUT)
                    .l1_max_bytes(l1_bytes)
                    .l1_admission(admission)
                    .build()
                    .await
                    .expect("a cache on the bench Redis");
                let tasks: Vec<_> = (0..TASKS)
                    .map(|t| {
                        let (cache, keys, stream) = (cache.clone(), keys.clone(), stream.clone());
                        tokio::spawn(async move {
                            for &i in stream.iter().skip(t).step_by(TASKS) {
                                assert!(cache.get(&keys[i as usize]).await.is_some());
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("a reader");
                }
                cache.stats().l1_hits as f64 / READS as f64
            });
            line.push(format!("{l1_name}, {name}: {ratio:.4}"));
        }
    }
    println!(
        "[zipf hit ratio] get over Zipf(1.0) of {KEYS} keys, {READS} reads, {TASKS} tasks, L1 hits per read: {}",
        line.join("; ")
    );
}

/// One variant of the hot-key read.
#[derive(Clone)]
struct Hot {
    cache: TieredCache,
    key: Arc<Key<Product>>,
    opts: Arc<EntryOptions>,
    loads: Arc<AtomicU64>,
}

impl Hot {
    async fn new(url: &str, name: &str, beta: f64) -> Self {
        let hot = Hot {
            cache: common::redis_cache(url, 64 << 20).await,
            key: Arc::new(Key::new("hot", 1).arg(name)),
            opts: Arc::new(EntryOptions::new(Duration::from_millis(200)).early_refresh(beta)),
            loads: Arc::default(),
        };
        hot.read().await; // warm-up: the first read loads
        hot
    }

    #[inline]
    async fn read(&self) -> Arc<Product> {
        let loads = Arc::clone(&self.loads);
        let loader = move || async move {
            loads.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, Infallible>(product(7))
        };
        match self.cache.get_or_load(&self.key, &self.opts, loader).await {
            Ok(v) => v,
            Err(e) => panic!("the loader cannot fail: {e}"),
        }
    }
}

/// Two reader tasks, `yield_now` between reads; each read timed alone.
/// Returns every read's latency in ns, for `per_task` reads per task or,
/// with `per_task == 0`, for `for_time`.
async fn hot_reads<F, Fut>(read: F, per_task: u64, for_time: Duration) -> Vec<u64>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future + Send,
{
    let handles: Vec<_> = (0..2u64)
        .map(|t| {
            let read = read.clone();
            let n = common::share(per_task, 2, t);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(if per_task > 0 { n as usize } else { 1 << 20 });
                let end = Instant::now() + for_time;
                let mut i = 0u64;
                while if per_task > 0 {
                    i < n
                } else {
                    Instant::now() < end
                } {
                    let start = Instant::now();
                    std::hint::black_box(read().await);
                    lat.push(start.elapsed().as_nanos() as u64);
                    i += 1;
                    tokio::task::yield_now().await;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("reader task"));
    }
    all
}

fn print_latencies(name: &str, mut lat: Vec<u64>, loads: Option<u64>, run: Duration) {
    lat.sort_unstable();
    let q = |p| common::quantile(&lat, p);
    // A read that waited on the loader took at least its 5 ms sleep.
    let waited = lat.iter().filter(|&&ns| ns >= 4_500_000).count();
    let slow = lat.iter().filter(|&&ns| ns >= 1_000_000).count();
    let loads = loads.map_or("-".to_owned(), |n| n.to_string());
    println!(
        "[xfetch {name:>9}] {} reads in {run:?} ({} expiries of 200 ms): p50 {:?}  p90 {:?}  p98 {:?}  p99 {:?}  p99.9 {:?}  max {:?}  p99/p50 {:.2}  reads >= 1 ms: {slow}  >= 4.5 ms: {waited}  loader calls: {loads}",
        lat.len(),
        run.as_millis() / 200,
        q(0.5),
        q(0.9),
        q(0.98),
        q(0.99),
        q(0.999),
        lat.last().map_or(Duration::ZERO, |&ns| Duration::from_nanos(ns)),
        q(0.99).as_secs_f64() / q(0.5).as_secs_f64().max(1e-12),
    );
}

fn xfetch(c: &mut Criterion, rt: &Runtime, url: &str) {
    const RUN: Duration = Duration::from_secs(2);
    // Baseline for the latency spread: raw moka, read the same way.
    let moka = moka::future::Cache::<String, Arc<Product>>::new(16);
    rt.block_on(moka.insert("hot".into(), Arc::new(product(7))));
    let lat = rt.block_on(hot_reads(
        {
            let moka = moka.clone();
            move || {
                let moka = moka.clone();
                async move { moka.get("hot").await }
            }
        },
        0,
        RUN,
    ));
    print_latencies("raw moka", lat, None, RUN);

    let mut g = c.benchmark_group("xfetch_hot_key");
    for (name, beta) in [("off", 0.0), ("on", 1.0)] {
        let hot = rt.block_on(Hot::new(url, name, beta));
        let loads_before = hot.loads.load(Ordering::Relaxed);
        let reader = {
            let hot = hot.clone();
            move || {
                let hot = hot.clone();
                async move { hot.read().await }
            }
        };
        let lat = rt.block_on(hot_reads(reader.clone(), 0, RUN));
        let loads = hot.loads.load(Ordering::Relaxed) - loads_before;
        print_latencies(&format!("{name} (tc)"), lat, Some(loads), RUN);
        g.bench_function(name, |b| {
            b.to_async(rt).iter_custom(|iters| {
                let reader = reader.clone();
                async move {
                    let lat = hot_reads(reader, iters, Duration::ZERO).await;
                    // Sum of read latencies: criterion's mean is the mean read.
                    Duration::from_nanos(lat.iter().sum())
                }
            })
        });
        let st = hot.cache.stats();
        println!(
            "[xfetch {name:>9}] whole run: loads={} early_refreshes={} coalesced_waits={} l1_hits={} misses={}",
            st.loads, st.early_refreshes, st.coalesced_waits, st.l1_hits, st.misses
        );
    }
    g.finish();
}

/// What `get_many` does on a cold L1, built from moka and redis-rs alone:
/// 100 L1 lookups (misses), one MGET, a postcard decode and an L1 insert per
/// key, into a moka configured as the crate's L1 (capped like the cache).
async fn mirror_get_many<S>(
    mut conn: redis::aio::MultiplexedConnection,
    l1: &moka::future::Cache<Arc<str>, Arc<Entry>, S>,
    keys: &[Key<Product>],
    raw: &[String],
) -> usize
where
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    let mut missing = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        if l1.get(key.as_str()).await.is_none() {
            missing.push(i);
        }
    }
    let replies: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
        .arg(missing.iter().map(|&i| raw[i].as_str()).collect::<Vec<_>>())
        .query_async(&mut conn)
        .await
        .expect("raw MGET");
    let mut found = 0;
    for (&i, bytes) in missing.iter().zip(&replies) {
        let Some(bytes) = bytes else { continue };
        let Ok(product) = postcard::from_bytes::<Product>(bytes) else {
            continue;
        };
        let key = keys[i].as_str();
        let weight = (key.len() + bytes.len() + 160) as u32;
        let entry = Entry::new(Arc::new(product), common::L1_CAP, weight);
        l1.insert(Arc::from(key), Arc::new(entry)).await;
        found += 1;
    }
    found
}

/// Where `tiered_get_many`'s time goes, one task: the raw baseline, the
/// same work plus L1 lookups and promotion into a moka configured as our L1
/// (with moka's default SipHash, and with a fast keyed hasher), and ours.
fn get_many_breakdown(c: &mut Criterion, rt: &Runtime, url: &str) {
    let b = batches(6);
    let conn = rt.block_on(common::raw_connection(url));
    let mut g = c.benchmark_group("get_many_breakdown/1_task");
    g.throughput(Throughput::Elements(BATCH as u64));
    let next = Arc::new(AtomicUsize::new(0));
    let misses = Arc::new(AtomicU64::new(0));
    // Runs `iters` batches, one task, timing only the reads. `$strict`: every
    // key must be found (the baselines); else misses are counted.
    macro_rules! batches_bench {
        ($name:literal, $strict:literal, $state:expr, |$s:ident, $keys:ident, $raw:ident| $read:expr) => {
            g.bench_function($name, |bench| {
                bench.to_async(rt).iter_custom(|iters| {
                    let state = $state;
                    let (keys, raw, next) = (b.keys.clone(), b.raw.clone(), next.clone());
                    let misses = misses.clone();
                    async move {
                        let from = next.fetch_add(iters as usize, Ordering::Relaxed);
                        let start = Instant::now();
                        let found = run_batches(1, from, from + iters as usize, move |n| {
                            let ($s, keys, raw) = (state.clone(), keys.clone(), raw.clone());
                            async move {
                                let $keys = &keys[n * BATCH..][..BATCH];
                                let $raw = &raw[n * BATCH..][..BATCH];
                                $read
                            }
                        })
                        .await;
                        let elapsed = start.elapsed();
                        if $strict {
                            assert_eq!(found, iters * BATCH as u64, "every key must be found");
                        }
                        misses.fetch_add(iters * BATCH as u64 - found, Ordering::Relaxed);
                        elapsed
                    }
                })
            });
        };
    }
    batches_bench!("raw_mget_decode", true, conn.clone(), |conn, _keys, raw| {
        raw_mget(conn, raw).await
    });
    let siphash = Arc::new(common::mirror::l1_like(256 << 20, RandomState::new()));
    batches_bench!(
        "mirror_get_many_siphash",
        true,
        (conn.clone(), siphash.clone()),
        |s, keys, raw| mirror_get_many(s.0, &s.1, keys, raw).await
    );
    let fast = Arc::new(common::mirror::l1_like(256 << 20, FastHash::default()));
    batches_bench!(
        "mirror_get_many_fasthash",
        true,
        (conn.clone(), fast.clone()),
        |s, keys, raw| mirror_get_many(s.0, &s.1, keys, raw).await
    );
    let plain = Arc::new(common::mirror::l1_like_no_closures(256 << 20));
    batches_bench!(
        "mirror_get_many_no_closures",
        true,
        (conn.clone(), plain.clone()),
        |s, keys, raw| mirror_get_many(s.0, &s.1, keys, raw).await
    );
    let cache = rt.block_on(common::cold_l1_cache(url, L1Admission::EveryRead));
    batches_bench!(
        "tiered_get_many",
        false,
        cache.clone(),
        |cache, keys, _raw| {
            let got = cache.get_many(keys).await;
            got.iter().filter(|v| v.is_some()).count()
        }
    );
    g.finish();
    // The same ladder, paired: chunks of 40 batches, ratios within a round.
    const CHUNK: usize = 40;
    let names = [
        "raw_mget_decode",
        "mirror_get_many_siphash",
        "mirror_get_many_fasthash",
        "mirror_get_many_no_closures",
        "tiered_get_many",
    ];
    let (keys, raw) = (&b.keys, &b.raw);
    common::paired(
        "get_many 1 task",
        &names,
        common::paired_rounds(),
        |v, round| {
            rt.block_on(async {
                let start = Instant::now();
                let mut found = 0;
                for n in (round * CHUNK..(round + 1) * CHUNK).map(|n| n % BATCHES) {
                    let (keys, raw) = (&keys[n * BATCH..][..BATCH], &raw[n * BATCH..][..BATCH]);
                    found += match v {
                        0 => raw_mget(conn.clone(), raw).await,
                        1 => mirror_get_many(conn.clone(), &siphash, keys, raw).await,
                        2 => mirror_get_many(conn.clone(), &fast, keys, raw).await,
                        3 => mirror_get_many(conn.clone(), &plain, keys, raw).await,
                        _ => {
                            let got = cache.get_many(keys).await;
                            got.iter().filter(|v| v.is_some()).count()
                        }
                    };
                }
                let elapsed = start.elapsed();
                if v < 4 {
                    assert_eq!(found, CHUNK * BATCH, "every key must be found");
                }
                elapsed
            })
        },
    );
    let st = cache.stats();
    report_cold("get_many breakdown", &st, misses.load(Ordering::Relaxed));
}

fn read_path(c: &mut Criterion) {
    let server = RedisServer::start().expect("redis-server for the benches");
    let url = server.url();
    let rt = common::multi_thread(2);
    rt.block_on(common::populate(&url, &Arc::new(common::keys(KEYS))));
    get_many(c, &rt, &url);
    get_many_breakdown(c, &rt, &url);
    xfetch(c, &rt, &url);
    drop((rt, server));
}

criterion_group! {
    name = benches;
    config = common::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    targets = read_path
}
criterion_main!(benches);

/// Prints a cold-L1 run's counters and checks that L1 really stayed cold.
fn report_cold(label: &str, st: &tiered_cache::StatsSnapshot, not_found: u64) {
    println!(
        "[{label}] tiered stats: l1_hits={} l2_hits={} misses={} l2_errors={}; keys not found: {not_found}",
        st.l1_hits, st.l2_hits, st.misses, st.l2_errors
    );
    assert_eq!(st.l1_hits, 0, "the L1 must stay cold");
}
