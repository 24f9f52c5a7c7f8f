//! What the integration tests share: the `Product` value and its keys, a
//! test Redis and caches on it, what Redis itself says (keys, command
//! counts), and a bounded wait. Included with `mod common;` by each test
//! file, so not every file uses every item.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{Key, TieredCache, TieredCacheBuilder};

/// The value most tests cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub id: u64,
    pub name: String,
}

/// Product `id`, named "product {id}".
pub fn product(id: u64) -> Product {
    Product {
        id,
        name: format!("product {id}"),
    }
}

/// The key of product `id`: `{product:v1:ID}`.
pub fn key(id: u64) -> Key<Product> {
    Key::new("product", 1).arg(id)
}

/// A `redis-server` of this test's own (testkit), killed on drop.
pub fn server() -> RedisServer {
    RedisServer::start().expect("redis-server must be installed to run these tests")
}

/// A builder for a cache in `namespace` on `server`, for a test to add its
/// own settings to.
pub fn builder_on(server: &RedisServer, namespace: &str) -> TieredCacheBuilder {
    TieredCache::builder()
        .namespace(namespace)
        .redis(server.url())
}

/// A new cache (empty L1) in `namespace` on `server`, default settings.
pub async fn cache_on(server: &RedisServer, namespace: &str) -> TieredCache {
    builder_on(server, namespace).build().await.expect("build")
}

/// A blocking connection to `server` for setup and assertions.
pub fn conn(server: &RedisServer) -> redis::Connection {
    server.connection().expect("test connection to Redis")
}

/// Where `key` lives in Redis for a cache in `namespace`.
pub fn redis_key<V>(namespace: &str, key: &Key<V>) -> String {
    format!("{namespace}:{}", key.as_str())
}

/// Whether Redis holds `redis_key`.
pub fn exists(server: &RedisServer, redis_key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(redis_key)
        .query::<u64>(&mut conn(server))
        .expect("EXISTS")
        == 1
}

/// What `INFO section` says after `field:`, if it lists the field.
fn info_field(server: &RedisServer, section: &str, field: &str) -> Option<String> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query(&mut conn(server))
        .expect("INFO");
    let prefix = format!("{field}:");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.trim().to_owned())
}

/// Calls of `command` (lower case) since the last [`reset_command_stats`],
/// from `INFO commandstats` (`cmdstat_get:calls=5,usec=...`).
pub fn command_calls(server: &RedisServer, command: &str) -> u64 {
    info_field(server, "commandstats", &format!("cmdstat_{command}")).map_or(0, |stats| {
        let calls = stats.strip_prefix("calls=").expect("calls= first");
        let calls = calls.split(',').next().expect("a call count");
        calls.parse().expect("a call count")
    })
}

/// A counter of `INFO stats` (keyspace_hits, keyspace_misses, ...) since
/// the last [`reset_command_stats`].
pub fn info_stat(server: &RedisServer, field: &str) -> u64 {
    info_field(server, "stats", field).map_or(0, |n| n.parse().expect("a number"))
}

/// `CONFIG RESETSTAT`: zeroes `INFO commandstats` and `INFO stats`.
pub fn reset_command_stats(server: &RedisServer) {
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut conn(server))
        .expect("CONFIG RESETSTAT");
}

/// Polls `cond` every millisecond until it holds; fails the test after 20 s
/// (a hang).
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    until_within(Duration::from_secs(20), what, cond).await;
}

/// Polls `cond` every millisecond until it holds; fails the test after
/// `limit` (a hang).
pub async fn until_within(limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
