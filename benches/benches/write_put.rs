//! P10: `put` throughput per write policy against a store with 1 ms latency.
//!
//! The store is a database over one connection: each call (a `save`, or a
//! whole `save_many` batch) holds it for 1 ms (a thread sleep on the
//! blocking pool: tokio's timer would round 1 ms up to about 2). 16 tasks put distinct ids
//! into one entity on a 2-worker runtime; time per op = wall time / total
//! puts. Write-through and cache-aside wait for the store on every put;
//! write-behind writes the cache (and, durable, a Redis Stream) and returns,
//! the store getting batches of up to 100. The write-behind queue is
//! drained between samples, outside the timing.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::{Deserialize, Serialize};
use tiered_cache::testkit::RedisServer;
use tiered_cache::write::{Entity, EntityCache, Store, WriteBehind, WritePolicy};
use tiered_cache::EntryOptions;

const TASKS: u64 = 16;
const STORE_LATENCY: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    name: String,
    price_cents: u64,
}

impl Entity for Row {
    const NAME: &'static str = "row";
    const VERSION: u32 = 1;
    type Id = u64;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_secs(3600))
    }
}

/// One connection with 1 ms per call, over a map.
#[derive(Default)]
struct SlowDb {
    connection: tokio::sync::Mutex<()>,
    rows: Mutex<HashMap<u64, u64>>,
}

impl SlowDb {
    async fn call(&self, writes: impl IntoIterator<Item = (u64, u64)>) {
        let _connection = self.connection.lock().await;
        // A thread sleep, not tokio's timer, which rounds 1 ms up to ~2.
        tokio::task::spawn_blocking(|| std::thread::sleep(STORE_LATENCY))
            .await
            .expect("the store's wait");
        let mut rows = self.rows.lock().unwrap();
        for (id, version) in writes {
            let v = rows.entry(id).or_default();
            *v = (*v).max(version);
        }
    }
}

impl Store<Row> for Arc<SlowDb> {
    type Error = std::convert::Infallible;
    async fn load(&self, _id: &u64) -> Result<Option<Row>, Self::Error> {
        Ok(None)
    }
    async fn save(&self, id: &u64, _value: &Arc<Row>, version: u64) -> Result<(), Self::Error> {
        self.call([(*id, version)]).await;
        Ok(())
    }
    async fn delete(&self, id: &u64, version: u64) -> Result<(), Self::Error> {
        self.call([(*id, version)]).await;
        Ok(())
    }
    async fn save_many(&self, writes: &[(u64, Arc<Row>, u64)]) -> Result<(), Self::Error> {
        self.call(writes.iter().map(|(id, _, v)| (*id, *v))).await;
        Ok(())
    }
}

fn policies() -> [(&'static str, WritePolicy); 4] {
    let behind = WriteBehind::new()
        .batch_size(100)
        .flush_interval(Duration::from_millis(5))
        .capacity(100_000);
    [
        ("write_through", WritePolicy::WriteThrough),
        ("cache_aside", WritePolicy::CacheAside),
        ("write_behind", WritePolicy::WriteBehind(behind.clone())),
        (
            "write_behind_durable",
            WritePolicy::WriteBehind(behind.durable(true)),
        ),
    ]
}

/// `iters` puts of distinct ids from 16 tasks; the wall time.
async fn put_all(entity: &EntityCache<Row, Arc<SlowDb>>, next: &AtomicU64, iters: u64) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let entity = entity.clone();
            let first = next.fetch_add(iters, Ordering::Relaxed);
            let n = common::share(iters, TASKS, t);
            tokio::spawn(async move {
                for i in 0..n {
                    let id = first + i * TASKS + t;
                    let row = Row {
                        name: "lamp".into(),
                        price_cents: id,
                    };
                    entity.put(&id, row).await.expect("put");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a put task");
    }
    started.elapsed()
}

fn bench_put(c: &mut Criterion) {
    let server = RedisServer::start().expect("a redis-server for the bench");
    let rt = common::multi_thread(2);
    let cache = rt.block_on(common::redis_cache(&server.url(), 64 << 20));
    let mut group = c.benchmark_group("put_store_1ms_16_tasks");
    group.throughput(Throughput::Elements(1));
    let next = AtomicU64::new(0);
    for (name, policy) in policies() {
        let db = Arc::new(SlowDb::default());
        let entity =
            rt.block_on(async { cache.entity_with(Arc::clone(&db), policy).expect("entity") });
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let took = put_all(&entity, &next, iters).await;
                    // Drain outside the timing, so samples do not queue on each other.
                    while entity.pending() > 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    took
                })
            })
        });
        rt.block_on(entity.shutdown());
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion(10, Duration::from_secs(1), Duration::from_secs(4));
    targets = bench_put
}
criterion_main!(benches);
