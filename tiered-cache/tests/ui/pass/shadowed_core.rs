//! Generated code names only `::tiered_cache::__private::…` and `::core`:
//! user items called `core`, `std`, `tiered_cache`, `Option`, `Some`, `Ok`,
//! `Arc`, `Duration` or `String` change nothing.
#![allow(dead_code, non_camel_case_types, unused_imports)]

use serde::{Deserialize, Serialize};

mod core {}
mod std {}
mod tiered_cache {}
struct Arc;
struct Duration;
struct OnceLock;
struct Key;
mod __private {}

#[derive(Clone, Serialize, Deserialize)]
struct Product {
    id: u64,
}

#[::tiered_cache::cached(key = "{id}", ttl = "1m", tags = ["t:{id}"], stale = "1h", timeout = "50ms")]
async fn get(id: u64) -> ::core::option::Option<Product> {
    ::core::option::Option::Some(Product { id })
}

#[::tiered_cache::cached(ttl = "1m")]
async fn fallible(id: u64) -> ::core::result::Result<Product, ::std::io::Error> {
    ::core::result::Result::Ok(Product { id })
}

fn main() {}
