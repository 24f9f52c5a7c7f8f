//! Methods: `&self` with the receiver's field in the key, the cache taken
//! from `self`, a by-value `self: Arc<Self>`, an associated fn, and the
//! generated key builders.
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiered_cache::{cached, Key, TieredCache};

#[derive(Clone, Serialize, Deserialize)]
struct Product {
    id: u64,
}

struct Catalog {
    cache: TieredCache,
    tenant: String,
}

impl Catalog {
    #[cached(key = "{self.tenant}:{id}", cache = self.cache, ttl = "5m")]
    async fn product(&self, id: u64) -> Option<Product> {
        Some(Product { id })
    }

    #[cached(name = "catalog.shared", cache = self.cache)]
    async fn shared(self: Arc<Self>, id: u64) -> Product {
        let _ = &self.tenant;
        Product { id }
    }

    #[cached(key = "{id}", cache = CACHE.get().unwrap(), key_fn = associated_key)]
    async fn associated(id: u64) -> Product {
        Product { id }
    }

    async fn drop_product(&self, id: u64) {
        let key: Key<Product> = self.product_key(id);
        let _ = self.cache.invalidate(&key).await;
        let _: Key<Product> = Catalog::shared_key(id);
        let _: Key<Product> = Self::associated_key(id);
    }
}

static CACHE: std::sync::OnceLock<TieredCache> = std::sync::OnceLock::new();

fn is_send<T: Send>(_: T) {}

#[allow(dead_code)]
fn futures_are_send(catalog: &Catalog, owned: Arc<Catalog>) {
    is_send(catalog.product(1));
    is_send(owned.shared(1));
    is_send(Catalog::associated(1));
    is_send(catalog.drop_product(1));
}

fn main() {}
