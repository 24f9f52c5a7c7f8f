//! P1: an L1 hit through `TieredCache` against a raw moka hit.
//!
//! Groups (each runs its baseline and ours side by side):
//! - `l1_hit/{uniform,zipf1.0}`: `raw_moka_get` (`moka::future::Cache<String,
//!   Arc<Product>>::get`), `tiered_get` and `tiered_get_or_load` (hits only)
//!   on 100k keys, one task.
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
//!   each round; drifting machine load cancels out of these.

mod common;

use std::hash::BuildHasher;
use std::hash::RandomState;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use moka::future::Cache;
use moka::Expiry;
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
    cache: TieredCache,
    opts: EntryOptions,
    config: Cache<Arc<str>, Arc<Product>>,
    mirror: Cache<Arc<str>, Arc<Entry>>,
    mirror_fast: Cache<Arc<str>, Arc<Entry>, FastHash>,
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
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| common::current_thread().block_on(build_fixture()))
}

async fn build_fixture() -> Fixture {
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
    let keys = common::keys(KEYS);
    let raw = Cache::builder().max_capacity(2 * KEYS as u64).build();
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
    config.run_pending_tasks().await;
    mirror.run_pending_tasks().await;
    mirror_fast.run_pending_tasks().await;
    let _ = cache.l1_weighted_size().await; // runs moka's pending tasks
    let mut hits = [0usize; 5];
    for key in &keys {
        hits[0] += usize::from(raw.get(key.as_str()).await.is_some());
        hits[1] += usize::from(config.get(key.as_str()).await.is_some());
        hits[2] += usize::from(mirror_get(&mirror, key.as_str()).await.is_some());
        hits[3] += usize::from(mirror_get(&mirror_fast, key.as_str()).await.is_some());
        hits[4] += usize::from(cache.get(key).await.is_some());
    }
    assert_eq!(hits, [KEYS; 5], "every key must be a hit in every variant");
    Fixture {
        keys: Arc::new(keys),
        raw,
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
    // Each closure does `n` hits starting at `start` in the shared stream.
    macro_rules! two_task_bench {
        ($name:literal, $state:expr, |$s:ident, $key:ident| $get:expr) => {
            g.bench_function($name, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let state = $state;
                    let (keys, stream) = (Arc::clone(&f.keys), Arc::clone(&stream));
                    async move {
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..2u64)
                            .map(|t| {
                                let (keys, stream, $s) =
                                    (Arc::clone(&keys), Arc::clone(&stream), state.clone());
                                tokio::spawn(async move {
                                    let mut cur = Cursor::new(&stream, t as usize * STREAM / 2);
                                    let mut found = 0u64;
                                    for _ in 0..common::share(iters, 2, t) {
                                        let $key = &keys[cur.next_index()];
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
    two_task_bench!("raw_moka_get", f.raw.clone(), |raw, key| raw
        .get(key.as_str())
        .await);
    two_task_bench!("tiered_get", f.cache.clone(), |cache, key| cache
        .get(key)
        .await);
    two_task_bench!(
        "tiered_get_or_load",
        (f.cache.clone(), f.opts.clone()),
        |s, key| s.0.get_or_load(key, &s.1, not_called).await.ok()
    );
    g.finish();
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
        ];
        common::paired(
            sampler.name(),
            &names,
            common::paired_rounds(),
            |v, round| {
                rt.block_on(async {
                    let mut cur = Cursor::new(&stream, round * CHUNK);
                    let mut found = 0usize;
                    let start = Instant::now();
                    // One loop per variant, so the loop body is the read alone.
                    macro_rules! chunk {
                        ($key:ident => $read:expr) => {
                            for _ in 0..CHUNK {
                                let $key = &keys[cur.next_index()];
                                found += usize::from(std::hint::black_box($read).is_some());
                            }
                        };
                    }
                    match v {
                        0 => chunk!(k => f.raw.get(k.as_str()).await),
                        1 => chunk!(k => f.config.get(k.as_str()).await),
                        2 => chunk!(k => mirror_get(&f.mirror, k.as_str()).await),
                        3 => chunk!(k => mirror_get(&f.mirror_fast, k.as_str()).await),
                        4 => chunk!(k => f.cache.get(k).await),
                        _ => chunk!(k => f.cache.get_or_load(k, &f.opts, not_called).await.ok()),
                    }
                    let elapsed = start.elapsed();
                    assert_eq!(found, CHUNK, "every read must hit");
                    elapsed
                })
            },
        );
    }
}

criterion_group! {
    name = benches;
    config = common::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    targets = one_task, two_tasks, breakdown, paired_ratios
}
criterion_main!(benches);
