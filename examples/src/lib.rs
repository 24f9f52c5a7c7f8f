//! What the examples share: a small SQLite store for the write-policy
//! examples and tests.

pub mod sqlite;

use tiered_cache::testkit::RedisServer;

/// `REDIS_URL`, else a throwaway server if `redis-server` is installed
/// (kept running while the returned server lives), else none (L1-only).
pub fn redis_url() -> (Option<String>, Option<RedisServer>) {
    if let Ok(url) = std::env::var("REDIS_URL") {
        println!("using Redis from REDIS_URL");
        return (Some(url), None);
    }
    match RedisServer::start() {
        Ok(server) => {
            println!(
                "REDIS_URL not set: started a throwaway redis-server on port {}",
                server.port()
            );
            (Some(server.url()), Some(server))
        }
        Err(e) => {
            println!("REDIS_URL not set and no redis-server to start ({e}): running L1-only");
            (None, None)
        }
    }
}

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiered_cache::write::Entity;
use tiered_cache::EntryOptions;

/// A counter written at a rising sequence number: the durable write-behind
/// example and its crash test check which sequence number reached SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// The sequence number of the write that set it.
    pub seq: u64,
}

impl Entity for Counter {
    const NAME: &'static str = "counter";
    const VERSION: u32 = 1;
    type Id = u64;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_secs(600))
    }
}
