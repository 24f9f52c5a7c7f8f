//! Every argument, in expression form where it has one.
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiered_cache::{cached, TieredCache};

mod reexport {
    pub use ::tiered_cache;
}

#[derive(Clone, Serialize, Deserialize)]
struct Product {
    id: u64,
}

const SCHEMA: u32 = 4;
const BETA: f64 = 1.5;

fn product_tags(id: u64) -> String {
    format!("p{id}")
}

#[cached(
    key = (id, region),
    ttl = Duration::from_secs(60),
    tags = ["products", "region:{region}", product_tags(id)],
    version = SCHEMA,
    name = "product",
    cache = cache,
    skip = [cache],
    stale = Duration::from_secs(3600),
    negative_ttl = "30s",
    timeout = Duration::from_millis(100),
    early_refresh = BETA,
    key_fn = product_cache_key,
    crate = reexport::tiered_cache,
)]
async fn product(cache: Arc<TieredCache>, id: u64, region: &str) -> Option<Arc<Product>> {
    let _ = region;
    Some(Arc::new(Product { id }))
}

#[cached(early_refresh = false, key_fn = false, ttl = "1h 30m", cache = &*CACHE)]
async fn no_companion(id: u64) -> Arc<Product> {
    Arc::new(Product { id })
}

static CACHE: std::sync::LazyLock<TieredCache> = std::sync::LazyLock::new(|| unreachable!());

fn is_send<T: Send>(_: T) {}

#[allow(dead_code)]
fn check(cache: Arc<TieredCache>) {
    is_send(product(cache, 1, "eu"));
    is_send(no_companion(1));
    let _ = product_cache_key(1, "eu");
}

fn main() {}
