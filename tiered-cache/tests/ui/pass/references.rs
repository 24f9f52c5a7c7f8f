//! Reference parameters: `&str`, `&[u64]`, a skipped `&Db` handle, an
//! `impl Trait` handle excluded from the key, and `Debug`-only key parts.
use std::fmt::Display;

use serde::{Deserialize, Serialize};
use tiered_cache::{cached, TieredCache};

#[derive(Clone, Serialize, Deserialize)]
struct Product {
    name: String,
}

struct Db;

impl Db {
    async fn find(&self, name: &str) -> Result<Product, std::io::Error> {
        Ok(Product {
            name: name.to_owned(),
        })
    }
}

#[derive(Debug)]
struct Filter {
    max_price: u32,
}

#[cached(key = "by-name:{name}", skip = [db, cache])]
async fn by_name(cache: &TieredCache, db: &Db, name: &str) -> Result<Product, std::io::Error> {
    let _ = cache;
    db.find(name).await
}

#[cached(key = "{ids}:{filter}", tags = ["names:{ids}"], cache = cache, skip = [cache])]
async fn names(cache: &TieredCache, ids: &[u64], filter: &Filter) -> Vec<String> {
    let _ = filter.max_price;
    ids.iter().map(|id| id.to_string()).collect()
}

#[cached(key = "{name}", skip = [log])]
async fn with_impl(log: impl Display + Send, name: String) -> Option<Product> {
    let _ = log.to_string();
    Some(Product { name })
}

fn is_send<T: Send>(_: T) {}

#[allow(dead_code)]
fn futures_are_send(cache: &TieredCache, db: &Db) {
    is_send(by_name(cache, db, "lamp"));
    is_send(names(cache, &[1, 2], &Filter { max_price: 3 }));
    is_send(with_impl("log", "lamp".to_owned()));
    let _ = by_name_key("lamp");
    let _ = names_key(&[1], &Filter { max_price: 1 });
    let _ = with_impl_key("lamp".to_owned());
}

fn main() {}
