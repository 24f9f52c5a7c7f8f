//! Two instances of a service sharing one Redis: an update on one reaches
//! the other's L1 over the backplane, and each one's stats show what
//! travelled.
//!
//! Uses `REDIS_URL` when set; otherwise it starts a throwaway
//! `redis-server` (the backplane needs Redis).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, TieredCache};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Product {
    id: u64,
    price_cents: u64,
}

/// Stands in for the database both instances read.
#[derive(Default)]
struct Database {
    price_cents: AtomicUsize,
    queries: AtomicUsize,
}

impl Database {
    async fn find(&self, id: u64) -> Result<Product, std::io::Error> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(Product {
            id,
            price_cents: self.price_cents.load(Ordering::Relaxed) as u64,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, _server) = match std::env::var("REDIS_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = RedisServer::start()?;
            println!("started a throwaway redis-server on port {}", server.port());
            (server.url(), Some(server))
        }
    };
    let instance = || {
        TieredCache::builder()
            .namespace("multi-instance-demo")
            .redis(url.clone())
            .l1_ttl_cap(Duration::from_secs(60)) // bounds staleness if a message is ever missed
            .build()
    };
    let (api1, api2) = (instance().await?, instance().await?);
    let db = Arc::new(Database::default());
    db.price_cents.store(1_000, Ordering::Relaxed);
    let key = Key::<Product>::new("product", 1).arg(7);
    let opts = EntryOptions::new(Duration::from_secs(30 * 60)).tag("products");
    api1.clear().await?; // start clean on a shared REDIS_URL
    let read = |cache: &TieredCache| {
        let (cache, key, opts, db) = (cache.clone(), key.clone(), opts.clone(), db.clone());
        async move {
            let p = cache
                .get_or_load(&key, &opts, move || async move { db.find(7).await })
                .await?;
            Ok::<_, Box<dyn std::error::Error>>(p.price_cents)
        }
    };

    println!(
        "api-1 reads: {} (loaded from the database)",
        read(&api1).await?
    );
    println!(
        "api-2 reads: {} (from Redis, now in its L1)",
        read(&api2).await?
    );
    println!("api-2 reads: {} (from its L1)", read(&api2).await?);

    // api-1 changes the price: database first, then the cache.
    db.price_cents.store(1_250, Ordering::Relaxed);
    let before = api2.stats().invalidations_received;
    let started = Instant::now();
    api1.set(
        &key,
        Product {
            id: 7,
            price_cents: 1_250,
        },
        &opts,
    )
    .await?;
    while api2.stats().invalidations_received == before {
        tokio::task::yield_now().await;
    }
    println!(
        "api-1 sets 1250; api-2 dropped its copy {:?} later",
        started.elapsed()
    );
    println!("api-2 reads: {} (from Redis again)", read(&api2).await?);

    // A tag invalidation on api-2 reaches api-1.
    let before = api1.stats().invalidations_received;
    api2.invalidate_tag("products").await?;
    while api1.stats().invalidations_received == before {
        tokio::task::yield_now().await;
    }
    db.price_cents.store(1_100, Ordering::Relaxed);
    println!(
        "api-2 invalidates tag `products`; api-1 reads: {} (reloaded)",
        read(&api1).await?
    );

    for (name, cache) in [("api-1", &api1), ("api-2", &api2)] {
        let s = cache.stats();
        println!(
            "{name}: L1 hits {} | L2 hits {} | misses {} | loads {} | invalidations received {} | gaps {}",
            s.l1_hits, s.l2_hits, s.misses, s.loads, s.invalidations_received, s.backplane_gaps
        );
    }
    println!("database queries: {}", db.queries.load(Ordering::Relaxed));
    Ok(())
}
