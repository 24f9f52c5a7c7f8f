//! Cache warming against a real Redis: bounded concurrency, progress to
//! 100%, every key a hit afterwards, cached keys skipped, failures counted.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tiered_cache::testkit::RedisServer;
use tiered_cache::{Key, WarmProgress};

/// A loader that records how many of its calls run at once.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    calls: AtomicUsize,
}

impl Gauge {
    async fn load(&self, id: u64) -> Result<u64, DbError> {
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(now, SeqCst);
        self.calls.fetch_add(1, SeqCst);
        tokio::time::sleep(Duration::from_micros(200)).await;
        self.now.fetch_sub(1, SeqCst);
        if id % 1_000 == 999 {
            return Err(DbError("the row is locked"));
        }
        Ok(id * 2)
    }
}

fn id_of(key: &Key<u64>) -> u64 {
    let body = key.as_str().trim_end_matches('}');
    body.rsplit(':')
        .next()
        .and_then(|id| id.parse().ok())
        .expect("an id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_10k_keys_stays_within_its_concurrency_and_reaches_every_key() {
    let server = RedisServer::start().expect("redis");
    let cache = cache_on(&server, "warm").await;
    let keys: Vec<Key<u64>> = (0..10_000).map(item).collect();
    // 100 are cached already: not loaded again.
    for key in &keys[..100] {
        cache.set(key, id_of(key) * 2, &opts()).await.unwrap();
    }
    let gauge = Arc::new(Gauge::default());
    let seen = Arc::new(Mutex::new(Vec::<WarmProgress>::new()));
    let last = Arc::new(AtomicU64::new(0));
    let report = cache
        .warm(keys.clone(), {
            let gauge = Arc::clone(&gauge);
            move |key: Key<u64>| {
                let gauge = Arc::clone(&gauge);
                async move { gauge.load(id_of(&key)).await }
            }
        })
        .options(opts())
        .concurrency(16)
        .jitter(Duration::from_micros(100))
        .on_progress({
            let (seen, last) = (Arc::clone(&seen), Arc::clone(&last));
            move |p| {
                assert!(p.done >= last.swap(p.done, SeqCst), "progress only grows");
                if p.done % 1_000 == 0 || p.done == p.total {
                    seen.lock().unwrap().push(p);
                }
            }
        })
        .run()
        .await;

    assert!(
        gauge.max.load(SeqCst) <= 16,
        "{} loads at once",
        gauge.max.load(SeqCst)
    );
    assert!(gauge.max.load(SeqCst) > 1, "it did load concurrently");
    assert_eq!(gauge.calls.load(SeqCst), 9_900, "cached keys were skipped");
    assert_eq!((report.total, report.already_cached), (10_000, 100));
    assert_eq!((report.loaded, report.failed), (9_890, 10));
    let end = *seen.lock().unwrap().last().expect("progress was reported");
    assert_eq!(
        (end.done, end.total, end.percent()),
        (10_000, 10_000, 100.0)
    );

    let l1_hits = cache.stats().l1_hits;
    let found = cache.get_many(&keys).await;
    let cached = found.iter().flatten().count();
    assert_eq!(cached, 9_990, "every key but the failed ones");
    assert_eq!(cache.stats().l1_hits - l1_hits, 9_990, "all from L1");

    // A second warm-up finds everything and loads nothing.
    let again = cache
        .warm(keys, |_key: Key<u64>| async {
            Err::<u64, _>(DbError("not called"))
        })
        .run()
        .await;
    assert_eq!(
        (again.already_cached, again.loaded, again.failed),
        (9_990, 0, 10)
    );
}
