//! P8 and P11 (issue 15): a cold key stampeded across instances, and reads
//! while Redis is paused.
//!
//! - `[p11 frozen]` line, before the groups: 64 tasks on a 2-worker runtime
//!   call `get_or_load` for 1 s (half the keys in L1, half never seen)
//!   while Redis is stopped with SIGSTOP; it prints the slowest call
//!   against the L2 budget (250 ms, the default), and the breaker's state;
//!   `[p11 frozen x5]` repeats it on fresh caches, one figure per round.
//!   Beside each round: how long the busiest runtime worker waited for a
//!   CPU around the timeouts (Linux schedstat), which is the machine's
//!   share of a slow call. Run the built bench under `chrt -f 20` to give
//!   the process the CPU and measure the cache's own share alone.
//! - `p11_l1_hit/{raw_moka_get,tiered_get_redis_up,tiered_get_breaker_open}`:
//!   one task reads 10k keys that are in L1: raw moka, ours with Redis up,
//!   ours with Redis paused and the breaker open. P11's "after the breaker
//!   opens, L1 hit speed" is the ratio of the last two.
//! - `p8_stampede/{per_instance,fleet_lock}`: one iteration is 4 instances
//!   x 250 callers of a key none of them has, a loader that sleeps 1 ms;
//!   the mean wall time per stampede, without and with
//!   `EntryOptions::fleet_lock`. The `[p8 ...]` lines print the loader
//!   calls and the Redis commands (INFO commandstats, script-internal
//!   calls included) per stampede.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{BreakerSettings, EntryOptions, Key, TieredCache};

use common::{product, Product, NAMESPACE};

const L1_KEYS: usize = 10_000;
const BUDGET: Duration = Duration::from_millis(250);
/// Rounds of the `[p11 frozen]` measurement.
const FROZEN_ROUNDS: usize = 5;

async fn breaker_cache(url: &str) -> TieredCache {
    TieredCache::builder()
        .namespace(NAMESPACE)
        .redis(url)
        .require_l2(true)
        .l2_timeout(BUDGET)
        // Room for every key a frozen second loads (100k+ calls, half of
        // them new keys) beside the warm ones: the hits measured after it
        // must not have been evicted by them.
        .l1_max_bytes(1 << 30)
        // No probe while the bench runs: the open state is what is measured.
        .breaker(BreakerSettings::default().cool_down(Duration::from_secs(3600)))
        .default_ttl(Duration::from_secs(3600))
        .build()
        .await
        .expect("a cache on the bench Redis")
}

/// One frozen second, as measured.
struct Round {
    /// The slowest call.
    max: Duration,
    calls: u64,
    /// The longest that a plain OS thread sleeping 1 ms at a time overslept
    /// meanwhile: how loaded the machine was.
    lag: Duration,
    /// How long the runtime's busiest worker thread waited for a CPU while
    /// the timed-out calls finished (from 10 ms before the budget to 12 ms
    /// after it), by Linux's schedstat: time the OS, not the process, took.
    worker_wait: Option<Duration>,
    /// From the first to the last end of the tasks' slowest calls (the
    /// calls that waited on the frozen Redis): the work after 64
    /// simultaneous timeouts, done in turn on two workers.
    wave: Duration,
}

impl Round {
    fn over_budget_ms(&self) -> f64 {
        (self.max.as_secs_f64() - BUDGET.as_secs_f64()) * 1e3
    }

    fn describe(&self) -> String {
        let wait = self.worker_wait.map_or("n/a".to_owned(), |w| {
            format!("{:.2}", w.as_secs_f64() * 1e3)
        });
        format!(
            "{:+.2} (lag {:.2}, worker wait {wait}, wave {:.2})",
            self.over_budget_ms(),
            self.lag.as_secs_f64() * 1e3,
            self.wave.as_secs_f64() * 1e3
        )
    }
}

/// Each tokio worker thread's time spent waiting for a CPU so far (the
/// second field of `/proc/self/task/<tid>/schedstat`), by thread id;
/// `None` where the OS does not tell.
fn workers_cpu_wait() -> Option<Vec<(String, Duration)>> {
    let mut waits = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("tokio-rt-worker") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        let nanos: u64 = stat.split_whitespace().nth(1)?.parse().ok()?;
        let tid = task.file_name().to_string_lossy().into_owned();
        waits.push((tid, Duration::from_nanos(nanos)));
    }
    Some(waits)
}

/// The busiest worker's CPU wait over `from..to` (instants from now on).
fn worker_wait_between(from: Instant, to: Instant) -> Option<Duration> {
    std::thread::sleep(from.saturating_duration_since(Instant::now()));
    let before = workers_cpu_wait()?;
    std::thread::sleep(to.saturating_duration_since(Instant::now()));
    let after = workers_cpu_wait()?;
    after
        .iter()
        .filter_map(|(tid, wait)| {
            let (_, was) = before.iter().find(|(t, _)| t == tid)?;
            Some(wait.saturating_sub(*was))
        })
        .max()
}

/// 64 tasks of `get_or_load` for 1 s on a frozen Redis: the slowest call,
/// and what the machine did meanwhile (the scheduling of a shared
/// machine, which no code in the process controls).
async fn frozen_round(cache: &TieredCache) -> Round {
    let begun = Instant::now();
    let end = begun + Duration::from_secs(1);
    let canary = std::thread::spawn(move || {
        let mut lag = Duration::ZERO;
        while Instant::now() < end {
            let slept = Instant::now();
            std::thread::sleep(Duration::from_millis(1));
            lag = lag.max(slept.elapsed().saturating_sub(Duration::from_millis(1)));
        }
        lag
    });
    let tail = (
        begun + BUDGET - Duration::from_millis(10),
        begun + BUDGET + Duration::from_millis(12),
    );
    let waits = std::thread::spawn(move || worker_wait_between(tail.0, tail.1));
    let calls = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..64u64)
        .map(|t| {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            tokio::spawn(async move {
                let opts = EntryOptions::new(Duration::from_secs(3600));
                let (mut max, mut ended) = (Duration::ZERO, Instant::now());
                let mut n = 0u64;
                while Instant::now() < end {
                    let id = if n.is_multiple_of(2) {
                        n % L1_KEYS as u64
                    } else {
                        1_000_000 + t * 1_000_000 + n
                    };
                    let key: Key<Product> = Key::new("product", 1).arg(id);
                    let started = Instant::now();
                    let v = cache
                        .get_or_load(&key, &opts, move || async move {
                            Ok::<_, std::convert::Infallible>(product(id))
                        })
                        .await
                        .expect("never fails");
                    let took = started.elapsed();
                    if took > max {
                        (max, ended) = (took, Instant::now());
                    }
                    assert_eq!(v.id, id);
                    n += 1;
                    tokio::task::yield_now().await;
                }
                calls.fetch_add(n, Ordering::Relaxed);
                (max, ended)
            })
        })
        .collect();
    let mut slowest = Vec::new();
    for task in tasks {
        slowest.push(task.await.expect("a task"));
    }
    let max = slowest
        .iter()
        .map(|(max, _)| *max)
        .max()
        .unwrap_or_default();
    // The first wave: the calls that waited on Redis until the timeout
    // (not a later call that went to Redis before the breaker opened).
    let first_wave = begun + BUDGET + BUDGET / 2;
    let wave_ends = slowest
        .iter()
        .filter(|(max, ended)| *max > BUDGET / 2 && *ended < first_wave)
        .map(|(_, ended)| *ended);
    let wave = match (wave_ends.clone().min(), wave_ends.max()) {
        (Some(first), Some(last)) => last - first,
        _ => Duration::ZERO,
    };
    Round {
        max,
        calls: calls.load(Ordering::Relaxed),
        lag: canary.join().expect("the canary thread"),
        worker_wait: waits.join().expect("the schedstat thread"),
        wave,
    }
}

fn p11(c: &mut Criterion) {
    let server = RedisServer::start().expect("redis-server (see README)");
    let rt = common::multi_thread(2);
    let keys: Vec<Key<Product>> = common::keys(L1_KEYS);
    let raw: moka::future::Cache<String, Arc<Product>> =
        moka::future::Cache::new(L1_KEYS as u64 * 2);
    let cache = rt.block_on(async {
        let cache = breaker_cache(&server.url()).await;
        let opts = EntryOptions::new(Duration::from_secs(3600));
        for (i, key) in keys.iter().enumerate() {
            cache.set(key, product(i as u64), &opts).await.expect("set");
            raw.insert(key.as_str().to_owned(), Arc::new(product(i as u64)))
                .await;
        }
        cache
    });
    let mut g = c.benchmark_group("p11_l1_hit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_moka_get", |b| {
        let mut i = 0;
        b.to_async(&rt).iter(|| {
            i = (i + 7919) % L1_KEYS;
            let key = keys[i].as_str();
            let raw = &raw;
            async move { assert!(raw.get(key).await.is_some()) }
        })
    });
    g.bench_function("tiered_get_redis_up", |b| {
        let mut i = 0;
        b.to_async(&rt).iter(|| {
            i = (i + 7919) % L1_KEYS;
            let (key, cache) = (&keys[i], &cache);
            async move { assert!(cache.get(key).await.is_some()) }
        })
    });
    server.pause().expect("SIGSTOP");
    let first = rt.block_on(frozen_round(&cache));
    let s = cache.stats();
    println!(
        "[p11 frozen] 64 tasks, {} get_or_load calls in 1 s on a paused Redis: slowest {:?} against the {BUDGET:?} budget, {}; breaker_state={} opened={} l2_errors={} l2_skipped={}",
        first.calls, first.max, first.describe(),
        s.breaker_state, s.breaker_opened, s.l2_errors, s.l2_skipped
    );
    g.bench_function("tiered_get_breaker_open", |b| {
        let mut i = 0;
        b.to_async(&rt).iter(|| {
            i = (i + 7919) % L1_KEYS;
            let (key, cache) = (&keys[i], &cache);
            async move { assert!(cache.get(key).await.is_some()) }
        })
    });
    g.finish();
    let errors = s.l2_errors;
    assert_eq!(
        cache.stats().l2_errors,
        errors,
        "no command went to Redis while open"
    );
    server.resume().expect("SIGCONT");
    // The slowest call depends on what else the machine runs at that
    // moment: more rounds, each on a fresh cache (its breaker closed) that
    // has read the same keys into L1.
    let mut rounds = vec![first];
    // Kept until the end: a cache dropped during a round would free its L1
    // on a runtime worker (issue 18) and be measured as a slow call.
    let mut kept = Vec::new();
    for _ in 1..FROZEN_ROUNDS {
        let fresh = rt.block_on(async {
            let fresh = breaker_cache(&server.url()).await;
            for key in &keys {
                assert!(fresh.get(key).await.is_some());
            }
            fresh
        });
        server.pause().expect("SIGSTOP");
        rounds.push(rt.block_on(frozen_round(&fresh)));
        server.resume().expect("SIGCONT");
        kept.push(fresh);
    }
    let over: Vec<String> = rounds.iter().map(Round::describe).collect();
    println!(
        "[p11 frozen x{FROZEN_ROUNDS}] per round, ms: the slowest call against the {BUDGET:?} budget (lag: an OS thread's longest oversleep of 1 ms sleeps; worker wait: the busiest runtime worker's wait for a CPU from 10 ms before the budget to 12 ms after; wave: first to last end of the calls that waited on Redis): {}",
        over.join(" ")
    );
    rt.block_on(async move { drop(kept) });
}

/// Sum of INFO commandstats calls, without INFO and CONFIG themselves.
fn commands(server: &RedisServer) -> u64 {
    let mut conn = server.connection().expect("connection");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .expect("INFO");
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter(|l| !l.starts_with("info") && !l.starts_with("config"))
        .filter_map(|l| {
            l.split_once(":calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn p8(c: &mut Criterion) {
    let server = RedisServer::start().expect("redis-server (see README)");
    let rt = common::multi_thread(2);
    let caches: Vec<TieredCache> = rt.block_on(async {
        let mut caches = Vec::new();
        for _ in 0..4 {
            caches.push(common::redis_cache(&server.url(), 64 << 20).await);
        }
        // Each instance has read an entry (knows the namespace's epoch).
        let warm: Key<Product> = Key::new("warm", 1).arg(0);
        let opts = EntryOptions::new(Duration::from_secs(3600));
        caches[0].set(&warm, product(0), &opts).await.expect("set");
        for cache in &caches {
            assert!(cache.get(&warm).await.is_some());
        }
        caches
    });
    let next = AtomicU64::new(0);
    let mut g = c.benchmark_group("p8_stampede");
    g.sample_size(10);
    for (name, fleet) in [("per_instance", false), ("fleet_lock", true)] {
        let (loads, stampedes) = (Arc::new(AtomicU64::new(0)), AtomicU64::new(0));
        let mut conn = server.connection().expect("connection");
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut conn)
            .expect("RESETSTAT");
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let first = next.fetch_add(iters, Ordering::Relaxed);
                stampedes.fetch_add(iters, Ordering::Relaxed);
                let (caches, loads) = (caches.clone(), Arc::clone(&loads));
                async move {
                    let mut opts = EntryOptions::new(Duration::from_secs(3600));
                    if fleet {
                        opts = opts.fleet_lock(Duration::from_secs(2));
                    }
                    let started = Instant::now();
                    for n in first..first + iters {
                        let key: Key<Product> = Key::new("stampede", 1).arg(n);
                        let mut callers = Vec::with_capacity(1_000);
                        for cache in &caches {
                            for _ in 0..250 {
                                let (cache, key, opts, loads) =
                                    (cache.clone(), key.clone(), opts.clone(), Arc::clone(&loads));
                                callers.push(tokio::spawn(async move {
                                    cache
                                        .get_or_load(&key, &opts, move || async move {
                                            loads.fetch_add(1, Ordering::Relaxed);
                                            tokio::time::sleep(Duration::from_millis(1)).await;
                                            Ok::<_, std::convert::Infallible>(product(n))
                                        })
                                        .await
                                        .expect("never fails")
                                }));
                            }
                        }
                        for caller in callers {
                            assert_eq!(caller.await.expect("a caller").id, n);
                        }
                    }
                    started.elapsed()
                }
            })
        });
        let stampedes = stampedes.load(Ordering::Relaxed).max(1);
        println!(
            "[p8 {name}] {stampedes} stampedes of 4 x 250 callers, {} loads: {:.3} loads and {:.1} Redis commands per stampede",
            loads.load(Ordering::Relaxed),
            loads.load(Ordering::Relaxed) as f64 / stampedes as f64,
            commands(&server) as f64 / stampedes as f64,
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion(20, Duration::from_millis(500), Duration::from_secs(3));
    targets = p11, p8
}
criterion_main!(benches);
