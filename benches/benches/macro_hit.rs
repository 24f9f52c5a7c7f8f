//! P2 and P3: a `#[cached]` hit against a hand-written `get_or_load` hit on
//! the same cache (P2), and against the `cached` crate's `#[cached]` hit
//! (P3). Zipf(1.0) over 100k keys, one task, every read a hit.
//!
//! Group `macro_hit/zipf1.0`:
//! - `get_or_load` / `get_or_load_value`: hand-written functions doing what
//!   the macro docs' "Equivalent code" does: build the `Key` from `id`, call
//!   `get_or_load`, and return the `Arc` / a clone of the `Product` (the P2
//!   baselines: what a user without the macro writes);
//! - `tiered_cached_arc` / `tiered_cached_value`: our `#[cached]` returning
//!   `Arc<Product>` (an `Arc` clone per hit) and `Product` (a deep clone);
//! - `cached_crate_arc` / `cached_crate_value`: the `cached` crate's
//!   `#[cached]` (its default store: an unbounded `HashMap` behind an async
//!   `RwLock`, keyed by the `u64` argument) with the same two return types
//!   (the P3 baselines), and `cached_crate_lru_ttl_arc`, its store bounded
//!   in size with a TTL (`max_size`, `ttl_secs`), as our L1 is;
//! - diagnosis: `raw_moka_get` (`moka::future::Cache<String, Arc<Product>>`
//!   with prebuilt keys, as in `l1_hit`: the floor of any moka-backed L1),
//!   `get_or_load_prebuilt_key` (`get_or_load` on the prebuilt keys of
//!   `common::keys`), and `rwlock_hashmap` (the key built per call as ours
//!   does, looked up in a `std` `RwLock<HashMap<String, Arc<Product>>>`:
//!   what a string-keyed L1 without moka would cost).
//!
//! All our variants read the same L1 entries: the macro's `name` and
//! `version` make its keys equal to `common::keys` (checked). Every variant
//! is checked to have only hit (no body or loader ran).
//! Group `macro_hit_parts`: the pieces of a hit (building the key, or
//! cloning a prebuilt prefix and appending the argument; cloning a
//! `Product`).
//! `[pair ...]` lines: all variants run in alternating chunks, and each
//! target's ratio is taken within each round (like `common::paired`, but
//! for any two variants, not only against the first).

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moka::future::Cache;
use tiered_cache::{cached, EntryOptions, Key, TieredCache};

use common::{product, Cursor, Product, Sampler, ENTITY, KEYS, STREAM, VERSION};

/// Body and loader runs of every variant: only the fixture's fill may
/// run them (checked after each group).
static BODY_CALLS: AtomicU64 = AtomicU64::new(0);

fn load_product(id: u64) -> Product {
    BODY_CALLS.fetch_add(1, Relaxed);
    product(id)
}

/// Ours, `Arc` return: a hit hands out the cached `Arc`.
#[cached(name = ENTITY, version = VERSION)]
async fn tiered_cached_arc(id: u64) -> Arc<Product> {
    Arc::new(load_product(id))
}

/// Ours, plain return: a hit clones the `Product`.
#[cached(name = ENTITY, version = VERSION, key_fn = false)]
async fn tiered_cached_value(id: u64) -> Product {
    load_product(id)
}

/// The hand-written equivalent (macro docs, "Equivalent code without
/// `#[cached]`"), returning the `Arc` as `tiered_cached_arc` does.
async fn get_or_load(cache: &TieredCache, opts: &EntryOptions, id: u64) -> Option<Arc<Product>> {
    let key = Key::<Product>::new(ENTITY, VERSION).arg(id);
    cache
        .get_or_load(&key, opts, move || async move {
            Ok::<_, Infallible>(load_product(id))
        })
        .await
        .ok()
}

/// The hand-written equivalent of `tiered_cached_value`: clones the value
/// out of the cache's `Arc`.
async fn get_or_load_value(cache: &TieredCache, opts: &EntryOptions, id: u64) -> Option<Product> {
    get_or_load(cache, opts, id).await.map(Arc::unwrap_or_clone)
}

/// Diagnosis: ours without moka (the key built per call, a `std` map).
fn rwlock_hashmap(map: &RwLock<HashMap<String, Arc<Product>>>, id: u64) -> Option<Arc<Product>> {
    let key = Key::<Product>::new(ENTITY, VERSION).arg(id);
    let map = map.read().ok()?;
    map.get(key.as_str()).cloned()
}

/// The `cached` crate, `Arc` return.
#[cached::proc_macro::cached]
async fn cached_crate_arc(id: u64) -> Arc<Product> {
    Arc::new(load_product(id))
}

/// The `cached` crate with a store bounded in size and with a TTL, as
/// our L1 is (an LRU list updated on every hit, under the write lock).
#[cached::proc_macro::cached(max_size = 200_000, ttl_secs = 3600)]
async fn cached_crate_lru_ttl_arc(id: u64) -> Arc<Product> {
    Arc::new(load_product(id))
}

/// The `cached` crate, plain return.
#[cached::proc_macro::cached]
async fn cached_crate_value(id: u64) -> Product {
    load_product(id)
}

struct Fixture {
    keys: Vec<Key<Product>>,
    raw: Cache<String, Arc<Product>>,
    map: RwLock<HashMap<String, Arc<Product>>>,
    cache: TieredCache,
    opts: EntryOptions,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| common::current_thread().block_on(build_fixture()))
}

async fn build_fixture() -> Fixture {
    let keys = common::keys(KEYS);
    let raw = Cache::builder().max_capacity(2 * KEYS as u64).build();
    let cache = common::l1_only_cache().await;
    tiered_cache::install(cache.clone()).expect("the fixture is built once");
    let opts = EntryOptions::new(Duration::from_secs(60 * 60));
    let mut map = HashMap::with_capacity(KEYS);
    for (i, key) in keys.iter().enumerate() {
        let p = product(i as u64);
        raw.insert(key.as_str().to_owned(), Arc::new(p.clone()))
            .await;
        map.insert(key.as_str().to_owned(), Arc::new(p.clone()));
        cache.set(key, p, &opts).await.expect("set");
        // The cached crate fills on a miss: run each body once.
        let _ = cached_crate_arc(i as u64).await;
        let _ = cached_crate_value(i as u64).await;
        let _ = cached_crate_lru_ttl_arc(i as u64).await;
    }
    assert_eq!(BODY_CALLS.swap(0, Relaxed), 3 * KEYS as u64);
    raw.run_pending_tasks().await;
    let _ = cache.l1_weighted_size().await; // runs moka's pending tasks
    assert_eq!(
        tiered_cached_arc_key(7),
        keys[7],
        "the macro reads the same entries"
    );
    let f = Fixture {
        keys,
        raw,
        map: RwLock::new(map),
        cache,
        opts,
    };
    for id in 0..KEYS as u64 {
        let read = [
            f.raw.get(f.keys[id as usize].as_str()).await.is_some(),
            get_or_load(&f.cache, &f.opts, id).await.is_some(),
            get_or_load_value(&f.cache, &f.opts, id).await.is_some(),
            rwlock_hashmap(&f.map, id).is_some(),
            tiered_cached_arc(id).await.id == id,
            tiered_cached_value(id).await.id == id,
            cached_crate_arc(id).await.id == id,
            cached_crate_value(id).await.id == id,
            cached_crate_lru_ttl_arc(id).await.id == id,
        ];
        assert_eq!(read, [true; 9], "key {id} must be a hit in every variant");
    }
    check_hits_only(&f);
    f
}

/// Panics if any read since the fill ran a body or loader.
fn check_hits_only(f: &Fixture) {
    assert_eq!(BODY_CALLS.load(Relaxed), 0, "a body or loader ran: a miss");
    let stats = f.cache.stats();
    assert_eq!(stats.loads, 0, "a load ran: {stats:?}");
}

/// Runs `$run!(|i| <read of key i through variant v, true on a hit>)`:
/// one expansion per variant, so each read is its own future (a single
/// `async fn` over all variants would give the small ones the size of the
/// largest, which criterion moves on every iteration).
macro_rules! by_variant {
    ($v:expr, $f:ident, $i:ident, $run:ident) => {
        match $v {
            0 => $run!(|$i| get_or_load(&$f.cache, &$f.opts, $i as u64).await.is_some()),
            1 => $run!(|$i| get_or_load_value(&$f.cache, &$f.opts, $i as u64)
                .await
                .is_some()),
            2 => $run!(|$i| tiered_cached_arc($i as u64).await.id == $i as u64),
            3 => $run!(|$i| tiered_cached_value($i as u64).await.id == $i as u64),
            4 => $run!(|$i| cached_crate_arc($i as u64).await.id == $i as u64),
            5 => $run!(|$i| cached_crate_value($i as u64).await.id == $i as u64),
            6 => $run!(|$i| $f.raw.get($f.keys[$i].as_str()).await.is_some()),
            7 => $run!(|$i| $f
                .cache
                .get_or_load(&$f.keys[$i], &$f.opts, || async {
                    Ok::<_, Infallible>(load_product(0))
                })
                .await
                .is_ok()),
            8 => $run!(|$i| rwlock_hashmap(&$f.map, $i as u64).is_some()),
            _ => $run!(|$i| cached_crate_lru_ttl_arc($i as u64).await.id == $i as u64),
        }
    };
}

fn one_task(c: &mut Criterion) {
    let rt = common::current_thread();
    let f = fixture();
    let stream = Sampler::Zipf.stream(KEYS, STREAM, 11);
    let mut g = c.benchmark_group("macro_hit/zipf1.0");
    g.throughput(Throughput::Elements(1));
    for (v, name) in VARIANTS.iter().enumerate() {
        macro_rules! bench {
            (|$i:ident| $read:expr) => {
                g.bench_function(*name, |b| {
                    let mut cur = Cursor::new(&stream, 0);
                    b.to_async(&rt).iter(|| {
                        let $i = cur.next_index();
                        async move { $read }
                    })
                })
            };
        }
        by_variant!(v, f, i, bench);
    }
    g.finish();
    check_hits_only(f);
}

/// Every variant, in the order of `by_variant!`.
const VARIANTS: [&str; 10] = [
    "get_or_load",
    "get_or_load_value",
    "tiered_cached_arc",
    "tiered_cached_value",
    "cached_crate_arc",
    "cached_crate_value",
    "raw_moka_get",
    "get_or_load_prebuilt_key",
    "rwlock_hashmap",
    "cached_crate_lru_ttl_arc",
];

/// The ratios printed by `paired_ratios`: (label, numerator, denominator)
/// as indices into `VARIANTS`; time ratios, lower is better.
const PAIRS: [(&str, usize, usize); 9] = [
    ("P2 arc: tiered_cached_arc / get_or_load", 2, 0),
    ("P2 value: tiered_cached_value / get_or_load_value", 3, 1),
    ("P3 arc: tiered_cached_arc / cached_crate_arc", 2, 4),
    ("P3 value: tiered_cached_value / cached_crate_value", 3, 5),
    (
        "P3 arc, bounded TTL store: tiered_cached_arc / cached_crate_lru_ttl_arc",
        2,
        9,
    ),
    ("get_or_load / raw_moka_get", 0, 6),
    ("raw_moka_get / cached_crate_arc", 6, 4),
    ("rwlock_hashmap / cached_crate_arc", 8, 4),
    ("get_or_load_prebuilt_key / get_or_load", 7, 0),
];

/// What a `#[cached]` hit does that a prebuilt-key `get_or_load` does not.
fn parts(c: &mut Criterion) {
    let stream = Sampler::Zipf.stream(KEYS, STREAM, 12);
    let mut g = c.benchmark_group("macro_hit_parts");
    g.bench_function("key_new_arg", |b| {
        let mut cur = Cursor::new(&stream, 0);
        b.iter(|| Key::<Product>::new(ENTITY, VERSION).arg(cur.next_index() as u64))
    });
    // What the macro could do instead: clone a key prefix built once.
    let prefix = Key::<Product>::new(ENTITY, VERSION);
    g.bench_function("key_prefix_clone_push_arg", |b| {
        let mut cur = Cursor::new(&stream, 0);
        b.iter(|| {
            let mut key = prefix.clone();
            key.push_arg(cur.next_index() as u64);
            key
        })
    });
    let values: Vec<Arc<Product>> = (0..1_000).map(|i| Arc::new(product(i))).collect();
    g.bench_function("product_clone", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % values.len();
            Product::clone(&values[i])
        })
    });
    g.finish();
}

/// Paired ratios: each round runs one chunk of every variant (rotating
/// the order) and takes each pair's ratio within the round, so machine load
/// that drifts over seconds cancels out.
fn paired_ratios(_: &mut Criterion) {
    const CHUNK: usize = 20_000;
    let rt = common::current_thread();
    let f = fixture();
    let stream = Sampler::Zipf.stream(KEYS, STREAM, 13);
    println!(
        "[future sizes] get_or_load fn {} B, tiered_cached_arc {} B, tiered_cached_value {} B, \
         cached_crate_arc {} B",
        std::mem::size_of_val(&get_or_load(&f.cache, &f.opts, 0)),
        std::mem::size_of_val(&tiered_cached_arc(0)),
        std::mem::size_of_val(&tiered_cached_value(0)),
        std::mem::size_of_val(&cached_crate_arc(0)),
    );
    let n = VARIANTS.len();
    let rounds = common::paired_rounds();
    let mut ratios = vec![Vec::with_capacity(rounds); PAIRS.len()];
    let mut per_read = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        let mut times = vec![Duration::ZERO; n];
        for k in 0..n {
            let v = (round + k) % n;
            times[v] = rt.block_on(async {
                let mut cur = Cursor::new(&stream, round * CHUNK);
                let mut found = 0usize;
                let start = Instant::now();
                // One loop per variant, so the loop body is the read alone.
                macro_rules! chunk {
                    (|$i:ident| $read:expr) => {
                        for _ in 0..CHUNK {
                            let $i = cur.next_index();
                            found += usize::from(std::hint::black_box($read));
                        }
                    };
                }
                by_variant!(v, f, i, chunk);
                let elapsed = start.elapsed();
                assert_eq!(found, CHUNK, "every read of {} must hit", VARIANTS[v]);
                elapsed
            });
            per_read[v].push((times[v].as_nanos() / CHUNK as u128) as u64);
        }
        for (r, &(_, num, den)) in ratios.iter_mut().zip(&PAIRS) {
            r.push(times[num].as_secs_f64() / times[den].as_secs_f64());
        }
    }
    for (v, ns) in per_read.iter_mut().enumerate() {
        ns.sort_unstable();
        println!(
            "[pair macro_hit] {rounds} rounds of {CHUNK} reads; {} median {:?} per read",
            VARIANTS[v],
            common::quantile(ns, 0.5)
        );
    }
    for (r, (label, _, _)) in ratios.iter_mut().zip(&PAIRS) {
        r.sort_by(f64::total_cmp);
        let at = |q: f64| r[((r.len() - 1) as f64 * q).round() as usize];
        println!(
            "[pair macro_hit] {label}: median {:.3} (IQR {:.3}-{:.3})",
            at(0.5),
            at(0.25),
            at(0.75)
        );
    }
    check_hits_only(f);
}

criterion_group! {
    name = benches;
    config = common::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    targets = one_task, parts, paired_ratios
}
criterion_main!(benches);
