//! Quickstart: one cache, a slow "database", and what each tier did.
//!
//! Uses `REDIS_URL` when set. Otherwise it starts a throwaway `redis-server`
//! if one is installed, and runs L1-only if not.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiered_cache::{EntryOptions, Key, TieredCache};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Product {
    id: u64,
    name: String,
    price_cents: u64,
}

/// Stands in for a database: slow, and counts how often it is asked.
#[derive(Default)]
struct Database {
    queries: AtomicUsize,
}

impl Database {
    async fn find_product(&self, id: u64) -> Result<Product, std::io::Error> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Product {
            id,
            name: format!("product #{id}"),
            price_cents: 100 * id,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, _server) = tiered_cache_examples::redis_url();
    let mut builder = TieredCache::builder()
        .namespace("quickstart")
        .l1_max_bytes(8 << 20);
    if let Some(url) = &url {
        builder = builder.redis(url.clone());
    }
    let cache = builder.build().await?;
    let db = Arc::new(Database::default());
    let key = Key::<Product>::new("product", 1).arg(42);
    let opts = EntryOptions::new(Duration::from_secs(60)).tag("products");
    cache.invalidate(&key).await.ok(); // start clean when REDIS_URL is a shared server

    let report = |step: &str, cache: &TieredCache, started: Instant| {
        let s = cache.stats();
        println!(
            "{step:<34} {:>9.1?}  L1 hits {} | L2 hits {} | misses {} | loads {} | DB queries {}",
            started.elapsed(),
            s.l1_hits,
            s.l2_hits,
            s.misses,
            s.loads,
            db.queries.load(Ordering::Relaxed)
        );
    };

    let load = |db: Arc<Database>| move || async move { db.find_product(42).await };

    let t = Instant::now();
    let p = cache.get_or_load(&key, &opts, load(db.clone())).await?;
    report("1. cold read -> loader", &cache, t);

    let t = Instant::now();
    let again = cache.get_or_load(&key, &opts, load(db.clone())).await?;
    report("2. warm read -> L1 hit", &cache, t);
    assert_eq!(p.name, again.name);

    // A second instance of the service: empty L1, same Redis.
    let mut other = TieredCache::builder().namespace("quickstart");
    if let Some(url) = &url {
        other = other.redis(url.clone());
    }
    let other = other.build().await?;
    let t = Instant::now();
    let seen = other.get(&key).await;
    let tier = if seen.is_some() {
        "L2 hit"
    } else {
        "miss (no Redis)"
    };
    report(&format!("3. other instance -> {tier}"), &other, t);

    // 100 concurrent callers of a cold key: one database query.
    let cold = Key::<Product>::new("product", 1).arg(7);
    cache.invalidate(&cold).await.ok();
    let before = db.queries.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (cache, cold, opts, db) = (cache.clone(), cold.clone(), opts.clone(), db.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load(
                    &cold,
                    &opts,
                    move || async move { db.find_product(7).await },
                )
                .await
        }));
    }
    for task in tasks {
        task.await??;
    }
    report("4. 100 callers of a cold key", &cache, t);
    println!(
        "   -> {} database query for 100 concurrent callers",
        db.queries.load(Ordering::Relaxed) - before
    );

    if let Err(e) = cache.invalidate_tag("products").await {
        println!("   (Redis not told: {e})");
    }
    let t = Instant::now();
    let gone = cache.get(&key).await.is_none();
    report("5. after invalidate_tag(products)", &cache, t);
    assert!(gone);

    println!(
        "mode: {}",
        if cache.has_l2() {
            "L1 + Redis"
        } else {
            "L1 only"
        }
    );
    Ok(())
}
