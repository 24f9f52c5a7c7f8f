//! What a 100-key `get_many` costs on a Redis Cluster (issue 16, lower
//! priority than the backplane's knee): the keys of a batch fall in ~100
//! different hash slots, so the one MGET of a single Redis becomes one
//! sub-command per slot (redis-rs splits it, NOTES-wave2 §4).
//!
//! `get_many_100_l1_off/*`, one caller, L1 off (`l1_max_bytes(0)`, so every
//! call goes to Redis), batches of 100 distinct keys out of 10k:
//! - `standalone_raw_mget`: one MGET on one `redis-server` + decode;
//! - `standalone_tiered`: `get_many` on it;
//! - `cluster_raw_mget`: the same MGET on a redis-rs `ClusterConnection`,
//!   which splits it per slot and sends the parts to their masters at once;
//! - `cluster_raw_gets`: 100 concurrent GETs on the `ClusterConnection`
//!   (redis-rs pipelines them per node on its multiplexed connections),
//!   the nearest a cluster gets to a pipeline across slots;
//! - `cluster_tiered`: `get_many` on the testkit cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tiered_cache::testkit::{RedisCluster, RedisServer};
use tiered_cache::{EntryOptions, Key, TieredCache};

use common::{product, product_bytes, raw_key, Product, NAMESPACE};

const KEYS: usize = 10_000;
const BATCH: usize = 100;
const BATCHES: usize = KEYS / BATCH;

/// Batches of 100 distinct keys, from a fixed shuffle.
struct Batches {
    keys: Vec<Key<Product>>,
    raw: Vec<String>,
}

fn batches() -> Batches {
    let mut keys = common::keys(KEYS);
    keys.shuffle(&mut rand::rngs::StdRng::seed_from_u64(16));
    let raw = keys.iter().map(raw_key).collect();
    Batches { keys, raw }
}

fn decoded(replies: Vec<Option<Vec<u8>>>) -> usize {
    replies
        .iter()
        .flatten()
        .filter_map(|bytes| postcard::from_bytes::<Product>(bytes).ok())
        .count()
}

async fn tiered(build: tiered_cache::TieredCacheBuilder) -> TieredCache {
    build
        .namespace(NAMESPACE)
        .require_l2(true)
        .l2_timeout(common::L2_TIMEOUT)
        .l1_max_bytes(0)
        .default_ttl(Duration::from_secs(3600))
        .build()
        .await
        .expect("a cache on the bench Redis")
}

/// Writes every product under its raw key and through `cache`.
async fn populate(conn: &mut impl redis::aio::ConnectionLike, cache: &TieredCache) {
    let keys = common::keys(KEYS);
    for (i, key) in keys.iter().enumerate() {
        redis::cmd("SET")
            .arg(raw_key(key))
            .arg(product_bytes(i as u64))
            .query_async::<()>(conn)
            .await
            .expect("raw SET");
    }
    let keys = Arc::new(keys);
    let writers: Vec<_> = (0..16usize)
        .map(|t| {
            let (cache, keys) = (cache.clone(), Arc::clone(&keys));
            tokio::spawn(async move {
                let opts = EntryOptions::new(Duration::from_secs(3600));
                for i in (t..keys.len()).step_by(16) {
                    cache
                        .set(&keys[i], product(i as u64), &opts)
                        .await
                        .expect("cache set");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
}

fn cluster_mget(c: &mut Criterion) {
    let server = RedisServer::start().expect("redis-server for the benches");
    let cluster = RedisCluster::shared().expect("redis-server and redis-cli for the test cluster");
    let rt = common::multi_thread(2);
    let b = batches();
    let (mut single, mut clustered, single_cache, cluster_cache) = rt.block_on(async {
        let single = common::raw_connection(&server.url()).await;
        let clustered = redis::cluster::ClusterClient::new(cluster.urls())
            .expect("cluster URLs")
            .get_async_connection()
            .await
            .expect("a cluster connection");
        let single_cache = tiered(TieredCache::builder().redis(server.url())).await;
        let cluster_cache = tiered(TieredCache::builder().redis_cluster(cluster.urls())).await;
        (single, clustered, single_cache, cluster_cache)
    });
    rt.block_on(async {
        populate(&mut single, &single_cache).await;
        populate(&mut clustered, &cluster_cache).await;
    });

    let mut g = c.benchmark_group("get_many_100_l1_off");
    g.throughput(Throughput::Elements(BATCH as u64));
    let batch = |n: u64| (n as usize % BATCHES) * BATCH;
    g.bench_function("standalone_raw_mget", |bench| {
        let mut n = 0u64;
        bench.to_async(&rt).iter(|| {
            n += 1;
            let (mut conn, raw) = (single.clone(), &b.raw[batch(n)..][..BATCH]);
            async move {
                let replies: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(raw)
                    .query_async(&mut conn)
                    .await
                    .expect("MGET");
                assert_eq!(decoded(replies), BATCH);
            }
        });
    });
    g.bench_function("standalone_tiered", |bench| {
        let mut n = 0u64;
        bench.to_async(&rt).iter(|| {
            n += 1;
            let (cache, keys) = (&single_cache, &b.keys[batch(n)..][..BATCH]);
            async move {
                let got = cache.get_many(keys).await;
                assert!(got.iter().all(Option::is_some));
            }
        });
    });
    g.bench_function("cluster_raw_mget", |bench| {
        let mut n = 0u64;
        bench.to_async(&rt).iter(|| {
            n += 1;
            let (mut conn, raw) = (clustered.clone(), &b.raw[batch(n)..][..BATCH]);
            async move {
                let replies: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(raw)
                    .query_async(&mut conn)
                    .await
                    .expect("cluster MGET");
                assert_eq!(decoded(replies), BATCH);
            }
        });
    });
    g.bench_function("cluster_raw_gets", |bench| {
        let mut n = 0u64;
        bench.to_async(&rt).iter(|| {
            n += 1;
            let (conn, raw) = (clustered.clone(), &b.raw[batch(n)..][..BATCH]);
            async move {
                let gets = raw.iter().map(|key| {
                    let mut conn = conn.clone();
                    async move {
                        redis::cmd("GET")
                            .arg(key)
                            .query_async::<Option<Vec<u8>>>(&mut conn)
                            .await
                            .expect("cluster GET")
                    }
                });
                let replies = futures_util::future::join_all(gets).await;
                assert_eq!(decoded(replies), BATCH);
            }
        });
    });
    g.bench_function("cluster_tiered", |bench| {
        let mut n = 0u64;
        bench.to_async(&rt).iter(|| {
            n += 1;
            let (cache, keys) = (&cluster_cache, &b.keys[batch(n)..][..BATCH]);
            async move {
                let got = cache.get_many(keys).await;
                assert!(got.iter().all(Option::is_some));
            }
        });
    });
    g.finish();
    for (name, cache) in [("standalone", &single_cache), ("cluster", &cluster_cache)] {
        let st = cache.stats();
        println!(
            "[cluster_mget {name}] l1_hits={} l2_hits={} misses={} l2_errors={}",
            st.l1_hits, st.l2_hits, st.misses, st.l2_errors
        );
        assert_eq!(st.l2_errors, 0, "{name}: {st:?}");
    }
    drop((rt, server));
}

criterion_group! {
    name = benches;
    config = common::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    targets = cluster_mget
}
criterion_main!(benches);
