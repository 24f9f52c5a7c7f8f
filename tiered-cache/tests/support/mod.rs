//! What the integration tests share: the `Product` value and its keys, the
//! `item` keys, a test Redis and caches on it, loaders that count their
//! calls, what Redis itself says (keys, command counts), and a bounded
//! wait. Included with `mod support;` by each test file, so not every file
//! uses every item.
#![allow(dead_code)]

use std::future::Ready;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, LoadError, TieredCache, TieredCacheBuilder};

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

/// The key of item `id`: `{item:v1:ID}`, for any value type.
pub fn item<V>(id: u64) -> Key<V> {
    Key::new("item", 1).arg(id)
}

/// The key of an item that caches a string.
pub type Item = Key<String>;

/// Five minutes to live, nothing else set.
pub fn opts() -> EntryOptions {
    EntryOptions::new(Duration::from_secs(5 * 60))
}

/// The error of the loaders below (not `Clone`, as a database error often is not).
#[derive(Debug, PartialEq)]
pub struct DbError(pub &'static str);

/// A count of loader calls.
pub fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// A loader that returns `value` at once.
pub fn quick(value: &str) -> impl FnOnce() -> Ready<Result<String, DbError>> {
    let value = value.to_owned();
    move || std::future::ready(Ok(value))
}

/// A loader that counts its call in `calls` and returns `value` at once.
pub fn counting<V>(
    calls: &Arc<AtomicUsize>,
    value: V,
) -> impl FnOnce() -> Ready<Result<V, DbError>> {
    let calls = Arc::clone(calls);
    move || {
        calls.fetch_add(1, SeqCst);
        std::future::ready(Ok(value))
    }
}

/// A loader that counts its call in `calls` and fails with "db down".
pub fn failing<V>(calls: &Arc<AtomicUsize>) -> impl FnOnce() -> Ready<Result<V, DbError>> {
    let calls = Arc::clone(calls);
    move || {
        calls.fetch_add(1, SeqCst);
        std::future::ready(Err(DbError("db down")))
    }
}

/// `get_or_load` of `key` with a [`counting`] loader that returns `value`;
/// it does not fail.
pub async fn load<V>(
    cache: &TieredCache,
    key: &Key<V>,
    opts: &EntryOptions,
    calls: &Arc<AtomicUsize>,
    value: V,
) -> Arc<V>
where
    V: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    cache
        .get_or_load(key, opts, counting(calls, value))
        .await
        .expect("the counting loader does not fail")
}

/// A spawned `get_or_load` caller.
pub type Caller = tokio::task::JoinHandle<Result<Arc<String>, LoadError<DbError>>>;

/// Spawns `n` callers of `key` with `opts`; each one's loader counts a call
/// and holds the load open until the other `n - 1` callers wait on it, then
/// returns `result`.
pub fn stampede(
    cache: &TieredCache,
    key: &Key<String>,
    opts: &EntryOptions,
    n: usize,
    calls: &Arc<AtomicUsize>,
    result: fn() -> Result<String, DbError>,
) -> Vec<Caller> {
    let waits_before = cache.stats().coalesced_waits;
    (0..n)
        .map(|_| {
            let (cache, key, calls, opts) =
                (cache.clone(), key.clone(), calls.clone(), opts.clone());
            tokio::spawn(async move {
                let watcher = cache.clone();
                cache
                    .get_or_load(&key, &opts, move || async move {
                        calls.fetch_add(1, SeqCst);
                        let others = (n - 1) as u64;
                        until("every other caller waits on this load", || {
                            watcher.stats().coalesced_waits - waits_before >= others
                        })
                        .await;
                        result()
                    })
                    .await
            })
        })
        .collect()
}

/// A `redis-server` of this test's own (testkit), killed on drop.
pub fn server() -> RedisServer {
    RedisServer::start().expect("redis-server must be installed to run these tests")
}

/// What the helpers below need of a test Redis: a single server of the
/// test's own, or a [`Backend`] (which may be the binary's shared cluster).
pub trait TestRedis {
    /// A builder for a cache on this Redis, in `namespace`.
    fn builder(&self, namespace: &str) -> TieredCacheBuilder;
    /// Runs `cmd` where its key lives (on a cluster: on the key's master).
    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T;
    /// Runs `cmd` on every master (one on a single Redis), in turn.
    fn on_masters<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Vec<T>;
    /// Runs `cmd` on every node, replicas too (one on a single Redis).
    fn on_nodes<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Vec<T>;
    /// How many MGETs Redis counts for one MGET of `redis_keys`: 1 on a
    /// single Redis; on a cluster, one per hash slot (redis-rs splits it).
    fn mgets_for(&self, redis_keys: &[String]) -> u64;
}

impl TestRedis for RedisServer {
    fn builder(&self, namespace: &str) -> TieredCacheBuilder {
        TieredCache::builder()
            .namespace(namespace)
            .redis(self.url())
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query(&mut conn(self))
            .expect("a query of the test Redis")
    }

    fn on_masters<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Vec<T> {
        vec![self.query(cmd)]
    }

    fn on_nodes<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Vec<T> {
        vec![self.query(cmd)]
    }

    fn mgets_for(&self, redis_keys: &[String]) -> u64 {
        u64::from(!redis_keys.is_empty())
    }
}

/// Where a test's caches keep their L2: a `redis-server` of the test's
/// own, or (feature `cluster`) the test binary's shared Redis Cluster,
/// which one test uses at a time (tests count its commands).
pub enum Backend {
    Standalone(RedisServer),
    #[cfg(feature = "cluster")]
    Cluster(Box<ClusterTurn>),
}

/// The shared cluster, held by one test at a time.
#[cfg(feature = "cluster")]
pub struct ClusterTurn {
    pub cluster: &'static tiered_cache::testkit::RedisCluster,
    conn: std::sync::Mutex<redis::cluster::ClusterConnection>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Backend {
    /// A `redis-server` of this test's own, killed on drop.
    pub fn standalone() -> Self {
        Backend::Standalone(server())
    }

    /// The binary's shared cluster (started on first use), once no other
    /// test of this binary uses it.
    #[cfg(feature = "cluster")]
    pub async fn cluster() -> Self {
        static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let turn = TURN.lock().await;
        let cluster = tiered_cache::testkit::RedisCluster::shared()
            .expect("redis-server and redis-cli must be installed to run these tests");
        let conn = redis::cluster::ClusterClient::new(cluster.urls())
            .and_then(|client| client.get_connection())
            .expect("a test connection to the cluster");
        Backend::Cluster(Box::new(ClusterTurn {
            cluster,
            conn: std::sync::Mutex::new(conn),
            _turn: turn,
        }))
    }

    /// Freezes Redis (every master of a cluster): nothing answers.
    pub fn pause(&self) {
        match self {
            Backend::Standalone(server) => server.pause().expect("SIGSTOP"),
            #[cfg(feature = "cluster")]
            Backend::Cluster(turn) => turn.cluster.pause_masters().expect("SIGSTOP"),
        }
    }

    /// Thaws what [`pause`](Self::pause) froze.
    pub fn resume(&self) {
        match self {
            Backend::Standalone(server) => server.resume().expect("SIGCONT"),
            #[cfg(feature = "cluster")]
            Backend::Cluster(turn) => turn.cluster.resume().expect("SIGCONT"),
        }
    }
}

impl TestRedis for Backend {
    fn builder(&self, namespace: &str) -> TieredCacheBuilder {
        match self {
            Backend::Standalone(server) => server.builder(namespace),
            #[cfg(feature = "cluster")]
            // Six servers (three replicating every write) share the test
            // machine's cores with the tests: a loaded CI machine must not
            // turn into L2 timeouts that the tests would count as misses.
            // A test that sets its own timeout overrides this.
            Backend::Cluster(turn) => TieredCache::builder()
                .namespace(namespace)
                .redis_cluster(turn.cluster.urls())
                .l2_timeout(Duration::from_secs(2)),
        }
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        match self {
            Backend::Standalone(server) => server.query(cmd),
            #[cfg(feature = "cluster")]
            Backend::Cluster(turn) => {
                let mut conn = turn
                    .conn
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                cmd.query(&mut *conn).expect("a query of the test cluster")
            }
        }
    }

    fn on_masters<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Vec<T> {
        match self {
            Backend::Standalone(server) => server.on_masters(cmd),
            #[cfg(feature = "cluster")]
            Backend::Cluster(turn) => turn
                .cluster
                .for_each_master(|conn| cmd.query(conn))
                .expect("a query of every master"),
        }
    }

    fn on_nodes<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Vec<T> {
        match self {
            Backend::Standalone(server) => server.on_nodes(cmd),
            #[cfg(feature = "cluster")]
            Backend::Cluster(turn) => turn
                .cluster
                .for_each_node(|conn| cmd.query(conn))
                .expect("a query of every node"),
        }
    }

    fn mgets_for(&self, redis_keys: &[String]) -> u64 {
        match self {
            Backend::Standalone(server) => server.mgets_for(redis_keys),
            #[cfg(feature = "cluster")]
            Backend::Cluster(_) => {
                let slots: std::collections::HashSet<u16> = redis_keys
                    .iter()
                    .map(|key| self.query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)))
                    .collect();
                slots.len() as u64
            }
        }
    }
}

/// Generates, for each `async fn name(backend: &Backend)` named, a module
/// `name` with two tests: `name::standalone` (on a `redis-server` of its
/// own) and, with the feature `cluster`, `name::cluster` (on the binary's
/// shared cluster). So one test body covers both backends.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn standalone() {
                super::$test(&$crate::support::Backend::standalone()).await;
            }

            #[cfg(feature = "cluster")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cluster() {
                super::$test(&$crate::support::Backend::cluster().await).await;
            }
        }
    )*};
}

/// A builder for a cache in `namespace` on `redis`, for a test to add its
/// own settings to.
pub fn builder_on(redis: &impl TestRedis, namespace: &str) -> TieredCacheBuilder {
    redis.builder(namespace)
}

/// A new cache (empty L1) in `namespace` on `redis`, default settings; it
/// fails the test if it cannot reach that Redis.
pub async fn cache_on(redis: &impl TestRedis, namespace: &str) -> TieredCache {
    builder_on(redis, namespace)
        .require_l2(true)
        .build()
        .await
        .expect("cache builds against the test Redis")
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
pub fn exists(redis: &impl TestRedis, redis_key: &str) -> bool {
    redis.query::<u64>(redis::cmd("EXISTS").arg(redis_key)) == 1
}

/// What `INFO section` says after `field:`, on each master.
fn info_field(redis: &impl TestRedis, section: &str, field: &str) -> Vec<String> {
    let prefix = format!("{field}:");
    redis
        .on_masters::<String>(redis::cmd("INFO").arg(section))
        .iter()
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix(&prefix))
                .map(|value| value.trim().to_owned())
        })
        .collect()
}

/// Calls of `command` (lower case) since the last [`reset_command_stats`],
/// from `INFO commandstats` (`cmdstat_get:calls=5,usec=...`), summed over
/// the masters (replicas replay writes, which would count them twice).
pub fn command_calls(redis: &impl TestRedis, command: &str) -> u64 {
    info_field(redis, "commandstats", &format!("cmdstat_{command}"))
        .iter()
        .map(|stats| {
            let calls = stats.strip_prefix("calls=").expect("calls= first");
            let calls = calls.split(',').next().expect("a call count");
            calls.parse::<u64>().expect("a call count")
        })
        .sum()
}

/// Scripts Redis ran, by text (`EVAL`) or by hash (`EVALSHA`): an
/// `EVALSHA` that Redis answered `NOSCRIPT` (a script's first use on a
/// server, which then goes again by text) ran nothing and is not counted.
pub fn scripts_run(redis: &impl TestRedis) -> u64 {
    let noscript: u64 = info_field(redis, "commandstats", "cmdstat_evalsha")
        .iter()
        .map(|stats| {
            let failed = stats.split("failed_calls=").nth(1).expect("failed_calls=");
            failed
                .split(',')
                .next()
                .expect("a count")
                .parse::<u64>()
                .expect("a count")
        })
        .sum();
    command_calls(redis, "eval") + command_calls(redis, "evalsha") - noscript
}

/// A counter of `INFO stats` (keyspace_hits, keyspace_misses, ...) since
/// the last [`reset_command_stats`], summed over the masters.
pub fn info_stat(redis: &impl TestRedis, field: &str) -> u64 {
    info_field(redis, "stats", field)
        .iter()
        .map(|n| n.parse::<u64>().expect("a number"))
        .sum()
}

/// How many connections subscribe to `channel`, on all nodes together
/// (`PUBSUB NUMSUB`).
pub fn subscribers(redis: &impl TestRedis, channel: &str) -> u64 {
    redis
        .on_nodes::<(String, u64)>(redis::cmd("PUBSUB").arg("NUMSUB").arg(channel))
        .iter()
        .map(|(_, n)| n)
        .sum()
}

/// `CONFIG RESETSTAT` on every master: zeroes `INFO commandstats` and
/// `INFO stats`.
pub fn reset_command_stats(redis: &impl TestRedis) {
    redis.on_masters::<()>(redis::cmd("CONFIG").arg("RESETSTAT"));
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

/// A TCP proxy in front of a real `redis-server` that holds every chunk of
/// bytes, both ways, for a delay that the test can change while it runs: a
/// slow Redis (or network) that still answers everything, in order.
pub struct SlowProxy {
    port: u16,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Chunks read from clients and sent on to Redis: a pipeline arrives as
    /// one, commands that wait for each other's replies as one each.
    to_redis: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    /// Listens on a free loopback port and forwards to `server`, with no
    /// delay yet. Needs a tokio runtime.
    pub async fn start(server: &RedisServer) -> SlowProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let upstream = format!("127.0.0.1:{}", server.port());
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = Arc::clone(&delay_ms);
        let to_redis = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sent = Arc::clone(&to_redis);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let (delay, sent) = (Arc::clone(&delay), Arc::clone(&sent));
                tokio::spawn(delayed_copy(
                    client_read,
                    server_write,
                    Arc::clone(&delay),
                    Some(sent),
                ));
                tokio::spawn(delayed_copy(server_read, client_write, delay, None));
            }
        });
        SlowProxy {
            port,
            delay_ms,
            to_redis,
            task,
        }
    }

    /// The URL to give the cache.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many chunks of requests clients have sent through so far: the
    /// round trips they made, when each waited for its reply.
    pub fn requests_sent(&self) -> u64 {
        self.to_redis.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on, every chunk read is delivered `delay` later.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read (a
/// constant added latency, not a throttle: chunks read meanwhile are not
/// held up further), counting the chunks in `chunks`.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<std::sync::atomic::AtomicU64>,
    chunks: Option<Arc<std::sync::atomic::AtomicU64>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(chunks) = &chunks {
            chunks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let wait = Duration::from_millis(delay.load(std::sync::atomic::Ordering::SeqCst));
        if tx
            .send((tokio::time::Instant::now() + wait, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// What [`hammer`] saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hammered {
    pub calls: u64,
    pub errors: u64,
    pub max: Duration,
}

/// Runs `tasks` tasks that call `call(task, n)` (n counts each task's
/// calls) back to back for `how_long`; counts the calls and the errors
/// and measures the slowest call.
pub async fn hammer<F, Fut>(tasks: usize, how_long: Duration, call: F) -> Hammered
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let call = Arc::new(call);
    let end = Instant::now() + how_long;
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let call = Arc::clone(&call);
            tokio::spawn(async move {
                let mut seen = Hammered::default();
                let mut n = 0;
                while Instant::now() < end {
                    let started = Instant::now();
                    let ok = call(task, n).await;
                    seen.max = seen.max.max(started.elapsed());
                    seen.calls += 1;
                    seen.errors += u64::from(!ok);
                    n += 1;
                    // As a service's handler does I/O between cache calls:
                    // an L1 hit never yields, and 64 tasks that never yield
                    // would starve the timers of the calls being measured.
                    tokio::task::yield_now().await;
                }
                seen
            })
        })
        .collect();
    let mut all = Hammered::default();
    for handle in handles {
        let seen = handle.await.expect("a hammering task panicked");
        all.calls += seen.calls;
        all.errors += seen.errors;
        all.max = all.max.max(seen.max);
    }
    all
}
