//! A product service over a real SQLite database, one entity per write
//! policy, printing what each write did to the store and the cache:
//!
//! - `Product`: cache-aside (the store, then an invalidation everywhere),
//!   read also by a `#[cached]` function that shares the entity's keys;
//! - `Profile`: write-through (the store, then the cache: every instance
//!   reads the new value);
//! - `ViewCount`: durable write-behind (the cache and a Redis Stream now,
//!   the store in batches).
//!
//! The database file is created on first run (`product-service.db` in the
//! temp directory, or the path given as the first argument). Uses
//! `REDIS_URL` when set, otherwise a throwaway `redis-server`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiered_cache::write::{Entity, WriteBehind, WritePolicy};
use tiered_cache::{cached, EntryOptions, TieredCache};
use tiered_cache_examples::sqlite::{Db, StoreError, Table};

/// A product: cache-aside, 30 minutes, tagged `products`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    name: String,
    price_cents: u64,
}

impl Entity for Product {
    const NAME: &'static str = "product";
    const VERSION: u32 = 1;
    type Id = u64;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_secs(30 * 60)).tag("products")
    }
    fn policy() -> WritePolicy {
        WritePolicy::CacheAside
    }
}

/// A user profile: write-through, so a user reads their own update on
/// whichever instance serves them next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    display_name: String,
}

impl Entity for Profile {
    const NAME: &'static str = "profile";
    const VERSION: u32 = 1;
    type Id = String;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_secs(10 * 60))
    }
    fn policy() -> WritePolicy {
        WritePolicy::WriteThrough
    }
}

/// A product's view count: written on every page view, so write-behind
/// (durable: a crash loses no counted view), flushed in batches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct ViewCount {
    views: u64,
}

impl Entity for ViewCount {
    const NAME: &'static str = "views";
    const VERSION: u32 = 1;
    type Id = u64;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_secs(5 * 60))
    }
    fn policy() -> WritePolicy {
        WritePolicy::WriteBehind(
            WriteBehind::new()
                .durable(true)
                .batch_size(500)
                .flush_interval(Duration::from_millis(200)),
        )
    }
}

/// The product page's reader: the same keys as the `Product` entity
/// (name, version, id), so it sees the entity's writes. Its loader is the
/// table itself.
#[cached(name = "product", key = "{id}", version = 1, ttl = "30m", tags = ["products"], cache = cache, skip = [table])]
async fn product_page(
    cache: &TieredCache,
    table: &Table<Product>,
    id: u64,
) -> Result<Option<Product>, StoreError> {
    use tiered_cache::write::Store;
    table.load(&id).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("product-service.db"));
    let (url, _server) = tiered_cache_examples::redis_url();
    let Some(url) = url else {
        return Err("this example needs Redis (its view counts are durable)".into());
    };
    println!("SQLite database: {}", path.display());
    let db = Db::open(&path)?;
    let cache = TieredCache::builder()
        .namespace("product-service")
        .redis(url)
        .require_l2(true)
        .build()
        .await?;
    let product_table = db.table::<Product>()?;
    let products = cache.entity(product_table.clone())?;
    let profile_table = db.table::<Profile>()?;
    let profiles = cache.entity(profile_table.clone())?;
    let views_table = db.table::<ViewCount>()?;
    let views = cache.entity(views_table.clone())?;

    println!("\n-- Product (cache-aside) --");
    let lamp = Product {
        name: "desk lamp".into(),
        price_cents: 3_900,
    };
    products.put(&7, lamp).await?;
    report(
        "put product 7",
        &cache,
        &product_table.counts().rows_written,
    );
    let page = product_page(&cache, &product_table, 7).await?;
    println!("  the #[cached] reader sees it: {page:?}");
    let again = products.get(&7).await?;
    println!("  the entity handle reads the same entry: {again:?}");
    products
        .put(
            &7,
            Product {
                name: "desk lamp".into(),
                price_cents: 3_500,
            },
        )
        .await?;
    report(
        "put product 7 (new price)",
        &cache,
        &product_table.counts().rows_written,
    );
    let page = product_page(&cache, &product_table, 7).await?;
    println!("  invalidated, so the reader loads the new row: {page:?}");

    println!("\n-- Profile (write-through) --");
    let id = "ada".to_owned();
    profiles
        .put(
            &id,
            Profile {
                display_name: "Ada".into(),
            },
        )
        .await?;
    report(
        "put profile ada",
        &cache,
        &profile_table.counts().rows_written,
    );
    let loads = profile_table.counts().loads.load(Relaxed);
    let read = profiles.get(&id).await?;
    println!(
        "  read back from the cache ({} store loads): {read:?}",
        profile_table.counts().loads.load(Relaxed) - loads
    );

    println!("\n-- ViewCount (durable write-behind) --");
    for n in 1..=1_000 {
        views.put(&7, ViewCount { views: n }).await?;
    }
    println!(
        "  1,000 puts to one id: {} queued, {} coalesced, {} rows in SQLite so far",
        cache.stats().writes_queued,
        cache.stats().writes_coalesced,
        views_table.counts().rows_written.load(Relaxed)
    );
    println!("  read now: {:?}", views.get(&7).await?);
    views.shutdown().await;
    println!(
        "  after shutdown (flushed): {} row write(s) in {} batch(es); SQLite holds {:?}",
        views_table.counts().rows_written.load(Relaxed),
        cache.stats().write_flushes,
        views_table.row(&7).await?.and_then(|(v, _)| v)
    );
    let s = cache.stats();
    println!(
        "\nstats: store writes {} | L1 hits {} | L2 hits {} | misses {} | loads {} | write-through fallbacks {} | dead letters {}",
        s.store_writes, s.l1_hits, s.l2_hits, s.misses, s.loads, s.write_fallbacks, s.write_dead_letters
    );
    Ok(())
}

fn report(what: &str, cache: &TieredCache, rows: &std::sync::atomic::AtomicU64) {
    let s = cache.stats();
    println!(
        "  {what}: {} row(s) written to SQLite so far (stats.store_writes {})",
        rows.load(Relaxed),
        s.store_writes
    );
}
