//! What every bench shares: the `Product` value, the key set, the key
//! samplers and the runtimes. Included with `mod common;` by each bench, so
//! not every bench uses every item.
#![allow(dead_code)]

pub mod mirror;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};
use tiered_cache::Key;

/// Keys in every key set (PERF.md: 100k keys).
pub const KEYS: usize = 100_000;

/// Length of a precomputed index stream; benches cycle through it, so the
/// sampler's own cost is never timed and every variant reads the same keys.
pub const STREAM: usize = 1 << 20;

/// Entity name and schema version of the bench keys.
pub const ENTITY: &str = "product";
pub const VERSION: u32 = 1;

/// A `Product`-like value of about 200 bytes once postcard-encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub id: u64,
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price_cents: u64,
    pub category_id: u32,
    pub stock: u32,
    pub tags: Vec<String>,
}

/// The product with id `id`.
pub fn product(id: u64) -> Product {
    Product {
        id,
        sku: format!("SKU-{id:08}"),
        name: format!("Adjustable desk lamp, model {id}"),
        description: format!(
            "A warm-white LED desk lamp with a weighted base, a two-joint arm and \
             five brightness steps. Batch {id:06}; ships in recyclable packaging."
        ),
        price_cents: 1_999 + id % 5_000,
        category_id: (id % 97) as u32,
        stock: (id % 1_000) as u32,
        tags: vec![
            "lighting".into(),
            "office".into(),
            format!("cat-{}", id % 97),
        ],
    }
}

/// The postcard encoding of `product(id)`.
pub fn product_bytes(id: u64) -> Vec<u8> {
    postcard::to_allocvec(&product(id)).expect("a Product encodes")
}

/// The typed keys `product:v1:0 ..= product:v1:{n-1}`.
pub fn keys(n: usize) -> Vec<Key<Product>> {
    (0..n as u64)
        .map(|i| Key::<Product>::new(ENTITY, VERSION).arg(i))
        .collect()
}

/// How keys are picked.
#[derive(Debug, Clone, Copy)]
pub enum Sampler {
    Uniform,
    /// Zipf with exponent 1.0; hot ranks are scattered over the key set.
    Zipf,
}

impl Sampler {
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Uniform => "uniform",
            Sampler::Zipf => "zipf1.0",
        }
    }

    /// `len` key indices below `n`, from a fixed seed.
    pub fn stream(self, n: usize, len: usize, seed: u64) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(seed);
        match self {
            Sampler::Uniform => (0..len).map(|_| rng.random_range(0..n as u32)).collect(),
            Sampler::Zipf => {
                // Rank 1 is the hottest; map ranks to keys through a random
                // permutation so hot keys are not neighbours in memory.
                let mut perm: Vec<u32> = (0..n as u32).collect();
                perm.shuffle(&mut rng);
                let zipf = Zipf::new(n as f64, 1.0).expect("valid Zipf parameters");
                (0..len)
                    .map(|_| {
                        let rank = zipf.sample(&mut rng) as usize; // 1..=n
                        perm[rank.clamp(1, n) - 1]
                    })
                    .collect()
            }
        }
    }
}

/// Cycles through an index stream.
#[derive(Debug)]
pub struct Cursor<'a> {
    stream: &'a [u32],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(stream: &'a [u32], start: usize) -> Self {
        Cursor {
            stream,
            pos: start % stream.len(),
        }
    }

    #[inline]
    pub fn next_index(&mut self) -> usize {
        let i = self.stream[self.pos];
        self.pos += 1;
        if self.pos == self.stream.len() {
            self.pos = 0;
        }
        i as usize
    }
}

/// A single-threaded runtime: "one task".
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A runtime with one worker per core of this machine (two here).
pub fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Criterion settings that keep `cargo bench -- --quick` to a few minutes on
/// two shared cores; in quick mode `measurement` bounds each bench.
/// (`criterion_group!` applies the command line on top.)
pub fn criterion(samples: usize, warm_up: Duration, measurement: Duration) -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(samples)
        .warm_up_time(warm_up)
        .measurement_time(measurement)
}

/// Splits `iters` operations over `tasks`: how many the task `t` runs.
pub fn share(iters: u64, tasks: u64, t: u64) -> u64 {
    iters / tasks + u64::from(t < iters % tasks)
}

/// Namespace of the caches in the Redis benches.
pub const NAMESPACE: &str = "bench";

/// The Redis key under which the raw baselines store `key`'s plain postcard
/// bytes (the cache stores its envelope under `bench:{key}`).
pub fn raw_key(key: &Key<Product>) -> String {
    format!("raw:{}", key.as_str())
}

/// Redis timeout of the bench caches: far above any round trip, so that a
/// stall of this shared, noisy machine is measured as a slow hit instead of
/// sending the cache into its degraded mode (misses without Redis), which
/// would make it look faster than it is.
pub const L2_TIMEOUT: Duration = Duration::from_secs(2);

/// An L1-only cache that holds all 100k products for an hour: the L1-hit
/// benches' cache (moka is not tied to a runtime, so it can be shared).
pub async fn l1_only_cache() -> tiered_cache::TieredCache {
    tiered_cache::TieredCache::builder()
        .l1_max_bytes(512 << 20)
        .default_ttl(Duration::from_secs(3600))
        .build()
        .await
        .expect("an L1-only cache")
}

/// L1 entries live this long at most in a "cold L1" cache. In the benches
/// that use one, a key comes back only after far more than 100 ms of other
/// reads, so every read finds it gone from L1 while L1 stays in use:
/// entries are promoted, expire and are evicted as in a busy service whose
/// working set is larger than L1 keeps. (The cap also bounds the freshness
/// `get_many` judges a promoted entry by, so a task stalled longer than
/// this between promoting and returning a key reports it missing: counted,
/// not asserted, on our side.)
pub const L1_CAP: Duration = Duration::from_millis(100);

/// A cache on `url` whose L1 entries are capped at [`L1_CAP`], promoting as
/// `admission` says.
pub async fn cold_l1_cache(
    url: &str,
    admission: tiered_cache::L1Admission,
) -> tiered_cache::TieredCache {
    tiered_cache::TieredCache::builder()
        .namespace(NAMESPACE)
        .redis(url)
        .require_l2(true)
        .l2_timeout(L2_TIMEOUT)
        .l1_max_bytes(256 << 20)
        .l1_ttl_cap(L1_CAP)
        .l1_admission(admission)
        .build()
        .await
        .expect("a cache on the bench Redis")
}

/// A cache on `url` with the given L1 bound (`0` turns L1 off).
pub async fn redis_cache(url: &str, l1_max_bytes: u64) -> tiered_cache::TieredCache {
    tiered_cache::TieredCache::builder()
        .namespace(NAMESPACE)
        .redis(url)
        .require_l2(true)
        .l2_timeout(L2_TIMEOUT)
        .l1_max_bytes(l1_max_bytes)
        .default_ttl(Duration::from_secs(3600))
        .build()
        .await
        .expect("a cache on the bench Redis")
}

/// A raw multiplexed redis-rs connection, the baselines' client.
pub async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("a raw Redis connection")
}

/// A RESP3 multiplexed connection with redis-rs's own client-side cache
/// (feature `cache-aio`) holding up to `size` keys: the server tracks every
/// key this connection reads (`CLIENT TRACKING ON`) and pushes an
/// invalidation when another client writes it; until then a repeated GET is
/// answered from the connection's LRU of raw replies, without a round trip.
pub async fn client_cache_connection(url: &str, size: usize) -> redis::aio::MultiplexedConnection {
    let cache = redis::caching::CacheConfig::new()
        .set_size(std::num::NonZeroUsize::new(size).expect("a cache size above 0"));
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(L2_TIMEOUT))
        .set_cache_config(cache);
    redis::Client::open(format!("{url}/?protocol=resp3"))
        .expect("a Redis URL")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("a RESP3 connection with the client-side cache")
}

/// GET + postcard decode: the raw baselines' read (on a connection with the
/// client-side cache, a hit is answered from its LRU and still decoded).
pub async fn get_decode(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Option<Product> {
    let bytes: Option<Vec<u8>> = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET");
    postcard::from_bytes(&bytes?).ok()
}

/// Writes every product's plain postcard bytes under `raw_key`, by
/// pipelines of 1,000 SETs.
pub async fn populate_raw(url: &str, keys: &[Key<Product>]) {
    let mut conn = raw_connection(url).await;
    for (chunk_no, chunk) in keys.chunks(1_000).enumerate() {
        let mut pipe = redis::pipe();
        for (j, key) in chunk.iter().enumerate() {
            let id = (chunk_no * 1_000 + j) as u64;
            pipe.cmd("SET")
                .arg(raw_key(key))
                .arg(product_bytes(id))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.expect("raw SETs");
    }
}

/// Writes every product twice: plain postcard bytes under `raw_key` (by
/// pipelines of 1,000 SETs) and through the cache (64 writers at once).
pub async fn populate(url: &str, keys: &std::sync::Arc<Vec<Key<Product>>>) {
    populate_raw(url, keys).await;
    let cache = redis_cache(url, 0).await;
    let writers: Vec<_> = (0..64u64)
        .map(|t| {
            let (cache, keys) = (cache.clone(), std::sync::Arc::clone(keys));
            tokio::spawn(async move {
                let opts = tiered_cache::EntryOptions::new(Duration::from_secs(60 * 60));
                for i in (t as usize..keys.len()).step_by(64) {
                    cache
                        .set(&keys[i], product(i as u64), &opts)
                        .await
                        .expect("cache set");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer task");
    }
    let stats = cache.stats();
    assert_eq!(stats.l2_errors, 0, "populating Redis failed: {stats:?}");
}

/// The `q`-quantile (0..=1) of sorted nanoseconds, as a readable duration.
pub fn quantile(sorted_ns: &[u64], q: f64) -> Duration {
    if sorted_ns.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted_ns.len() - 1) as f64 * q).round() as usize;
    Duration::from_nanos(sorted_ns[i])
}

/// Paired measurement for a noisy machine: each round runs one chunk of
/// every variant back to back (in rotating order), and the ratio of each
/// variant to variant 0 is taken within the round, so load that drifts over
/// seconds cancels out. Prints the median ratio and its interquartile range
/// over `rounds`; `run(variant, round)` runs one chunk and returns its time.
pub fn paired(
    label: &str,
    names: &[&str],
    rounds: usize,
    run: impl FnMut(usize, usize) -> Duration,
) {
    paired_with(label, names, rounds, &[], run)
}

/// [`paired`], also printing for each `(a, b)` in `vs` the ratio of
/// variant `a` to variant `b`, taken within each round like the others.
pub fn paired_with(
    label: &str,
    names: &[&str],
    rounds: usize,
    vs: &[(usize, usize)],
    mut run: impl FnMut(usize, usize) -> Duration,
) {
    let n = names.len();
    let mut ratios = vec![Vec::with_capacity(rounds); n];
    let mut base_ns = Vec::with_capacity(rounds);
    let mut vs_ratios = vec![Vec::with_capacity(rounds); vs.len()];
    for round in 0..rounds {
        let mut times = vec![Duration::ZERO; n];
        for k in 0..n {
            let v = (round + k) % n;
            times[v] = run(v, round);
        }
        base_ns.push(times[0].as_nanos() as u64);
        for v in 0..n {
            ratios[v].push(times[v].as_secs_f64() / times[0].as_secs_f64());
        }
        for (r, &(a, b)) in vs_ratios.iter_mut().zip(vs) {
            r.push(times[a].as_secs_f64() / times[b].as_secs_f64());
        }
    }
    base_ns.sort_unstable();
    println!(
        "[paired {label}] {rounds} rounds; {} chunk median {:?}",
        names[0],
        quantile(&base_ns, 0.5)
    );
    let pairs = (1..n).map(|v| (v, 0)).chain(vs.iter().copied());
    let all = ratios.into_iter().skip(1).chain(vs_ratios);
    for ((a, b), mut r) in pairs.zip(all) {
        r.sort_by(f64::total_cmp);
        let at = |q: f64| r[((r.len() - 1) as f64 * q).round() as usize];
        println!(
            "[paired {label}] {} / {}: median {:.3} (IQR {:.3}-{:.3})",
            names[a],
            names[b],
            at(0.5),
            at(0.25),
            at(0.75)
        );
    }
}

/// Rounds of a [`paired`] measurement: fewer under `--quick`.
pub fn paired_rounds() -> usize {
    if std::env::args().any(|a| a == "--quick") {
        8
    } else {
        30
    }
}
