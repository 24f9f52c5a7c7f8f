//! Generic functions: generic key parts, a generic skipped handle, lifetimes
//! and where clauses. The cached type itself is concrete.
use std::fmt::Display;

use serde::{Deserialize, Serialize};
use tiered_cache::cached;

#[derive(Clone, Serialize, Deserialize)]
struct Product {
    id: String,
}

trait Repo: Sync {
    fn lookup(&self, id: &str) -> Product;
}

#[cached(key = "{id}", skip = [repo])]
async fn get<'a, R, K>(repo: &'a R, id: K) -> Product
where
    R: Repo,
    K: Display + Send,
{
    repo.lookup(&id.to_string())
}

#[cached]
async fn by_display<T: Display + Send + Sync>(id: T) -> String {
    id.to_string()
}

#[allow(dead_code)]
fn is_send<T: Send>(_: T) {}

#[allow(dead_code)]
fn check<R: Repo>(repo: &R) {
    is_send(get(repo, 7u64));
    is_send(by_display("x"));
    // the key builder keeps only the generics its parameters use
    let _ = get_key(7u64);
    let _ = by_display_key(3u8);
}

fn main() {}
