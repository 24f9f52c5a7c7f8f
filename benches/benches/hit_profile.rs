//! Where an L1 hit's cost goes, counted rather than timed: run one variant
//! under cachegrind, once with no reads and once with many, and the
//! difference per read is its instruction count and its cache misses.
//! Those counts repeat from run to run whatever else the machine does,
//! which the timed benches on a shared two-core machine cannot promise.
//!
//! ```sh
//! cargo bench -p tiered-cache-benches --bench hit_profile --no-run
//! for v in raw_moka_string raw_moka_u64 tiered_get tiered_cached cached_crate_lru_ttl; do for n in 0 200000; do   # L1 hits
//! # (raw_redis_get tiered_l2_get with 0 and 20000: an L2 read's CPU, L1 off;
//! #  raw_mget tiered_get_many with 0 and 100000: a batch read's CPU per key,
//! #  MGETs of 100 keys, L1 off)
//!   HIT_PROFILE=$v HIT_READS=$n valgrind --tool=cachegrind --cache-sim=yes \
//!     --cachegrind-out-file=/dev/null target/release/deps/hit_profile-* 2>&1 | grep -E 'I +refs|D1  misses|LLd misses'
//! done; done
//! ```
//!
//! Without `HIT_PROFILE` (as under `cargo bench`) every variant runs natively
//! and prints its time per read: a smoke test, not a measurement.
//!
//! `HIT_PROFILE=raw_redis_get_64|tiered_l2_get_64` (natively, not under
//! valgrind) reads with 64 tasks on a 2-worker runtime, as P5 does, and
//! prints the CPU each read cost this process and the Redis server apart
//! (`/proc/self/stat` and the server's `INFO cpu`): on two cores shared
//! with Redis, the sum is what the throughput is made of.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use tiered_cache::EntryOptions;

use common::{keys, product, Cursor, Product, Sampler, ENTITY, KEYS, VERSION};

/// Body runs of the two `#[cached]` variants: only their fill may run them.
static LOADS: AtomicUsize = AtomicUsize::new(0);

/// P3's pair: ours, as `macro_hit`'s `tiered_cached_arc`.
#[tiered_cache::cached(name = ENTITY, version = VERSION)]
async fn tiered_cached(id: u64) -> Arc<Product> {
    LOADS.fetch_add(1, Relaxed);
    Arc::new(product(id))
}

/// The `cached` crate's bounded TTL store, as `macro_hit`'s
/// `cached_crate_lru_ttl_arc`.
#[cached::proc_macro::cached(max_size = 200_000, ttl_secs = 3600)]
async fn cached_crate_lru_ttl(id: u64) -> Arc<Product> {
    LOADS.fetch_add(1, Relaxed);
    Arc::new(product(id))
}

const VARIANTS: [&str; 11] = [
    "raw_moka_string",
    "raw_moka_u64",
    "tiered_get",
    "tiered_cached",
    "cached_crate_lru_ttl",
    "raw_redis_get",
    "tiered_l2_get",
    "raw_mget",
    "tiered_get_many",
    "raw_set_publish",
    "tiered_set",
];

/// Keys per batch of the `raw_mget` and `tiered_get_many` variants, whose
/// reads count keys (a read of 100 keys is 100 reads).
const BATCH: usize = 100;

/// The L2 variants read this many keys (populating 100k under valgrind
/// would take minutes); every read goes to Redis.
const L2_KEYS: usize = 1_000;

fn main() {
    let reads: usize = std::env::var("HIT_READS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let sampler = match std::env::var("HIT_SAMPLER").as_deref() {
        Ok("uniform") => Sampler::Uniform,
        _ => Sampler::Zipf,
    };
    if let Ok(variant @ ("raw_redis_get_64" | "tiered_l2_get_64")) =
        std::env::var("HIT_PROFILE").as_deref()
    {
        return cpu_at_64_tasks(variant, reads);
    }
    let runtime = common::current_thread();
    match std::env::var("HIT_PROFILE") {
        Ok(variant) => {
            runtime.block_on(run(&variant, reads, sampler));
        }
        Err(_) => {
            for variant in VARIANTS {
                let elapsed = runtime.block_on(run(variant, reads, sampler));
                let per_read = elapsed.as_nanos() / reads.max(1) as u128;
                println!(
                    "[hit_profile {}] {variant}: {per_read} ns/read (native, one run)",
                    sampler.name()
                );
            }
        }
    }
}

/// Reads of the warm-up stream before an L1 hit variant's counted reads
/// (`HIT_WARM`, default 400k: about four times the key set).
fn warm_reads() -> usize {
    std::env::var("HIT_WARM")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400_000)
}

/// Fills one variant with every key, then reads `reads` keys of the stream;
/// returns the time the reads took. Every read must hit.
async fn run(variant: &str, reads: usize, sampler: Sampler) -> Duration {
    let stream = sampler.stream(KEYS, reads.max(1), 7);
    let mut cursor = Cursor::new(&stream, 0);
    let keys = keys(KEYS);
    let mut hits = 0_usize;
    let started;
    // An L1 hit variant reads a warm-up stream first, in both runs of the
    // pair (so it cancels out): L1's front and moka's policy then start the
    // counted reads as they would be in a long-running process, not with
    // the keys only the setup has read.
    let warm = sampler.stream(KEYS, warm_reads(), 8);
    macro_rules! l1_reads {
        (|$i:ident| $hit:expr) => {{
            for &index in &warm {
                let $i = index as usize;
                black_box($hit);
            }
            started = Instant::now();
            for _ in 0..reads {
                let $i = cursor.next_index();
                hits += usize::from(black_box($hit));
            }
        }};
    }
    match variant {
        "raw_moka_string" => {
            let raw: Cache<String, Arc<Product>> =
                Cache::builder().max_capacity(KEYS as u64 * 2).build();
            for (i, key) in keys.iter().enumerate() {
                raw.insert(key.as_str().to_owned(), Arc::new(product(i as u64)))
                    .await;
            }
            l1_reads!(|i| raw.get(keys[i].as_str()).await.is_some())
        }
        "raw_moka_u64" => {
            let raw: Cache<u64, Arc<Product>> =
                Cache::builder().max_capacity(KEYS as u64 * 2).build();
            for i in 0..KEYS as u64 {
                raw.insert(i, Arc::new(product(i))).await;
            }
            l1_reads!(|i| raw.get(&(i as u64)).await.is_some())
        }
        "tiered_get" => {
            let cache = common::l1_only_cache().await;
            let opts = EntryOptions::new(Duration::from_secs(3600));
            for (i, key) in keys.iter().enumerate() {
                cache.set(key, product(i as u64), &opts).await.expect("set");
            }
            l1_reads!(|i| cache.get(&keys[i]).await.is_some())
        }
        "tiered_cached" => {
            // Both `#[cached]` variants count into `LOADS`; all variants
            // run in one process under `cargo bench`.
            LOADS.store(0, Relaxed);
            tiered_cache::install(common::l1_only_cache().await).expect("installed once");
            for i in 0..KEYS {
                tiered_cached(i as u64).await;
            }
            l1_reads!(|i| {
                black_box(tiered_cached(i as u64).await);
                true
            });
            assert_eq!(LOADS.load(Relaxed), KEYS, "{variant}: a timed read loaded");
        }
        "cached_crate_lru_ttl" => {
            LOADS.store(0, Relaxed);
            for i in 0..KEYS {
                cached_crate_lru_ttl(i as u64).await;
            }
            l1_reads!(|i| {
                black_box(cached_crate_lru_ttl(i as u64).await);
                true
            });
            assert_eq!(LOADS.load(Relaxed), KEYS, "{variant}: a timed read loaded");
        }
        "raw_set_publish" | "tiered_set" => {
            // Sequential writes of one key: an instance's write, as the
            // invalidation bench's writer makes it (L1 and backplane on),
            // against SET + PUBLISH in one pipeline.
            let server = tiered_cache::testkit::RedisServer::start().expect("redis-server");
            let key = &keys[0];
            let raw_key = common::raw_key(key);
            let mut conn = common::raw_connection(&server.url()).await;
            let cache = common::redis_cache(&server.url(), 64 << 20).await;
            let opts = EntryOptions::new(Duration::from_secs(3600));
            let bytes = common::product_bytes(0);
            started = Instant::now();
            for i in 0..reads {
                if variant == "raw_set_publish" {
                    let _: () = redis::pipe()
                        .set(&raw_key, &bytes)
                        .ignore()
                        .publish("raw:invalidate", &raw_key)
                        .ignore()
                        .query_async(&mut conn)
                        .await
                        .expect("SET + PUBLISH");
                } else {
                    cache.set(key, product(i as u64), &opts).await.expect("set");
                }
                hits += 1;
            }
        }
        "raw_redis_get" | "tiered_l2_get" | "raw_mget" | "tiered_get_many" => {
            let server = tiered_cache::testkit::RedisServer::start().expect("redis-server");
            let keys = Arc::new(common::keys(L2_KEYS));
            common::populate(&server.url(), &keys).await;
            let raw_keys: Vec<String> = keys.iter().map(common::raw_key).collect();
            let mut conn = common::raw_connection(&server.url()).await;
            let cache = common::redis_cache(&server.url(), 0).await;
            started = Instant::now();
            if variant.ends_with("get") {
                for _ in 0..reads {
                    let i = cursor.next_index() % L2_KEYS;
                    let found = if variant == "raw_redis_get" {
                        black_box(common::get_decode(&mut conn, &raw_keys[i]).await).is_some()
                    } else {
                        black_box(cache.get(&keys[i]).await).is_some()
                    };
                    hits += usize::from(found);
                }
            } else {
                for b in 0..reads / BATCH {
                    let at = (b * BATCH) % (L2_KEYS - BATCH);
                    hits += if variant == "raw_mget" {
                        let replies: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                            .arg(&raw_keys[at..at + BATCH])
                            .query_async(&mut conn)
                            .await
                            .expect("MGET");
                        replies
                            .iter()
                            .flatten()
                            .filter_map(|bytes| postcard::from_bytes::<Product>(bytes).ok())
                            .fold(0, |n, p| {
                                black_box(Arc::new(p));
                                n + 1
                            })
                    } else {
                        let got = cache.get_many(&keys[at..at + BATCH]).await;
                        black_box(&got).iter().flatten().count()
                    };
                }
            }
        }
        other => panic!("HIT_PROFILE={other}: not one of {VARIANTS:?}"),
    }
    let elapsed = started.elapsed();
    assert_eq!(hits, reads, "{variant}: every read must be a hit");
    elapsed
}

/// This process's CPU time so far (user + system), from `/proc/self/stat`
/// (in clock ticks of 10 ms).
fn own_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// The Redis server's CPU time so far (`used_cpu_user` + `used_cpu_sys`).
fn server_cpu(server: &tiered_cache::testkit::RedisServer) -> Duration {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query(&mut server.connection().expect("a connection"))
        .expect("INFO cpu");
    let secs: f64 = info
        .lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .map(|l| l.split(':').nth(1).unwrap().trim().parse::<f64>().unwrap())
        .sum();
    Duration::from_secs_f64(secs)
}

/// 64 tasks read `reads` keys in all (L1 off); prints CPU per read.
fn cpu_at_64_tasks(variant: &str, reads: usize) {
    const TASKS: usize = 64;
    let server = tiered_cache::testkit::RedisServer::start().expect("redis-server");
    let rt = common::multi_thread(2);
    let keys = Arc::new(common::keys(L2_KEYS));
    rt.block_on(common::populate(&server.url(), &keys));
    let raw_keys: Arc<Vec<String>> = Arc::new(keys.iter().map(common::raw_key).collect());
    let conn = rt.block_on(common::raw_connection(&server.url()));
    let cache = rt.block_on(common::redis_cache(&server.url(), 0));
    let stream = Arc::new(Sampler::Uniform.stream(L2_KEYS, reads.max(TASKS), 7));
    let (client0, server0, started) = (own_cpu(), server_cpu(&server), Instant::now());
    let hits: usize = rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (mut conn, cache) = (conn.clone(), cache.clone());
                let (keys, raw_keys, stream) = (keys.clone(), raw_keys.clone(), stream.clone());
                let raw = variant == "raw_redis_get_64";
                tokio::spawn(async move {
                    let mut hits = 0;
                    for n in (t..stream.len()).step_by(TASKS) {
                        let i = stream[n] as usize % L2_KEYS;
                        hits += usize::from(if raw {
                            common::get_decode(&mut conn, &raw_keys[i]).await.is_some()
                        } else {
                            cache.get(&keys[i]).await.is_some()
                        });
                    }
                    hits
                })
            })
            .collect();
        let mut hits = 0;
        for task in tasks {
            hits += task.await.expect("a reader task");
        }
        hits
    });
    let wall = started.elapsed();
    let (client, redis) = (own_cpu() - client0, server_cpu(&server) - server0);
    assert_eq!(hits, stream.len(), "{variant}: every read must be a hit");
    let per = |d: Duration| d.as_nanos() as f64 / hits as f64 / 1000.0;
    println!(
        "[hit_profile 64 tasks] {variant}: wall {:.2} µs/read, CPU {:.2} µs/read here + {:.2} in Redis (l2_reads_batched {})",
        per(wall),
        per(client),
        per(redis),
        cache.stats().l2_reads_batched
    );
}
