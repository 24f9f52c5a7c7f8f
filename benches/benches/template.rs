//! Profile your own cache: a bench template to copy.
//!
//! It times an L1 hit of `TieredCache` over *your* value type and key set
//! beside the floor under it, a raw `moka::future::Cache<String, Arc<V>>`
//! holding the same values, in one process. It prints criterion's times
//! and paired ratios (`[paired ...]` lines), the figure to trust on a
//! noisy machine. See "Profile your own cache" in `benches/README.md`.
//!
//! To use it in your crate, copy this file to `benches/my_cache.rs` and add:
//!
//! ```toml
//! [dev-dependencies]
//! tiered-cache = "0.1"
//! moka = { version = "0.12", features = ["future"] }
//! criterion = { version = "0.5", features = ["async_tokio", "html_reports"] }
//! tokio = { version = "1", features = ["rt"] }
//! serde = { version = "1", features = ["derive"] }
//!
//! [[bench]]
//! name = "my_cache"
//! harness = false
//! ```
//!
//! then edit the three places marked `EDIT` and run
//! `cargo bench --bench my_cache` (`-- --quick` for a first look).
//! Nothing here needs Redis: an L1 hit never touches it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moka::future::Cache;
use serde::{Deserialize, Serialize};
use tiered_cache::{EntryOptions, Key, TieredCache};

// EDIT 1: your value type, and one value per id. Use the real type (or a
// copy of it): its size and shape are what a hit hands back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Value {
    pub id: u64,
    pub customer: String,
    pub lines: Vec<(u32, u32)>,
    pub total_cents: u64,
}

fn value(id: u64) -> Value {
    Value {
        id,
        customer: format!("customer-{}", id % 9_973),
        lines: (0..(id % 7) as u32).map(|l| (l, l * 3)).collect(),
        total_cents: 1_000 + id % 50_000,
    }
}

// EDIT 2: your key set: how many keys, and how your code names one.
const KEYS: usize = 100_000;

fn key(id: u64) -> Key<Value> {
    Key::<Value>::new("order", 1).arg(id)
}

// EDIT 3: your access pattern, as a stream of key indices. This one sends
// 80 % of reads to a hot 20 % of the keys; for a Zipf law use
// `rand_distr::Zipf`, as `benches/common/mod.rs` does.
fn stream(len: usize) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15_u64; // xorshift64, fixed seed
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let hot = (KEYS / 5) as u64;
    (0..len)
        .map(|_| {
            let r = next();
            if r % 10 < 8 {
                (next() % hot) as u32
            } else {
                (hot + next() % (KEYS as u64 - hot)) as u32
            }
        })
        .collect()
}

/// Reads per paired chunk, and paired rounds (fewer under `--quick`).
const CHUNK: usize = 20_000;

fn rounds() -> usize {
    if std::env::args().any(|a| a == "--quick") {
        8
    } else {
        30
    }
}

struct Fixture {
    keys: Vec<Key<Value>>,
    raw: Cache<String, Arc<Value>>,
    cache: TieredCache,
    stream: Vec<u32>,
}

async fn fixture() -> Fixture {
    let keys: Vec<Key<Value>> = (0..KEYS as u64).map(key).collect();
    let raw = Cache::builder().max_capacity(2 * KEYS as u64).build();
    // Your cache as you build it in production (add `.redis(url)` if you
    // like; hits are served by L1 either way). Big enough to hold every key.
    let cache = TieredCache::builder()
        .l1_max_bytes(1 << 30)
        .default_ttl(Duration::from_secs(3600))
        .build()
        .await
        .expect("the cache");
    let opts = EntryOptions::new(Duration::from_secs(3600));
    for (i, k) in keys.iter().enumerate() {
        let v = value(i as u64);
        raw.insert(k.as_str().to_owned(), Arc::new(v.clone())).await;
        cache.set(k, v, &opts).await.expect("set");
    }
    raw.run_pending_tasks().await;
    // Both sides must hit every key, or the figures below are not hits.
    for k in &keys {
        assert!(raw.get(k.as_str()).await.is_some(), "raw moka lost a key");
        assert!(
            cache.get(k).await.is_some(),
            "the cache lost a key: raise l1_max_bytes"
        );
    }
    Fixture {
        keys,
        raw,
        cache,
        stream: stream(1 << 20),
    }
}

fn hits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let f = &rt.block_on(fixture());
    let keys = &f.keys;
    let at = |pos: &mut usize| {
        let i = f.stream[*pos % f.stream.len()] as usize;
        *pos += 1;
        i
    };

    // Criterion: each variant timed on its own, a few seconds each. Its
    // HTML report (target/criterion/report/index.html) plots them side by
    // side.
    let mut g = c.benchmark_group("my_cache/hit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_moka_get", |b| {
        let mut pos = 0;
        b.to_async(&rt).iter(|| {
            let k = keys[at(&mut pos)].as_str();
            async move { f.raw.get(k).await }
        })
    });
    g.bench_function("tiered_get", |b| {
        let mut pos = 0;
        b.to_async(&rt).iter(|| {
            let k = &keys[at(&mut pos)];
            async move { f.cache.get(k).await }
        })
    });
    g.finish();

    // Paired: each round reads one chunk with every variant back to back
    // (order rotating) and takes the time ratio within the round, so load
    // that drifts over seconds cancels out.
    let names = ["raw_moka_get", "tiered_get"];
    let mut ratios = vec![Vec::new(); names.len()];
    for round in 0..rounds() {
        let mut times = [Duration::ZERO; 2];
        for k in 0..names.len() {
            let v = (round + k) % names.len();
            let mut pos = round * CHUNK;
            times[v] = rt.block_on(async {
                let start = Instant::now();
                for _ in 0..CHUNK {
                    let key = &keys[at(&mut pos)];
                    let hit = match v {
                        0 => f.raw.get(key.as_str()).await.is_some(),
                        _ => f.cache.get(key).await.is_some(),
                    };
                    assert!(std::hint::black_box(hit), "every read must hit");
                }
                start.elapsed()
            });
        }
        for v in 0..names.len() {
            ratios[v].push(times[v].as_secs_f64() / times[0].as_secs_f64());
        }
    }
    for (v, r) in ratios.iter_mut().enumerate().skip(1) {
        r.sort_by(f64::total_cmp);
        let q = |q: f64| r[((r.len() - 1) as f64 * q).round() as usize];
        println!(
            "[paired my_cache] {} / {}: median {:.3} (IQR {:.3}-{:.3}) over {} rounds",
            names[v],
            names[0],
            q(0.5),
            q(0.25),
            q(0.75),
            r.len()
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = hits
}
criterion_main!(benches);
