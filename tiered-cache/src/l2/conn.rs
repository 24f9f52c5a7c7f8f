//! What the L2 tier talks to: one Redis, or a Redis Cluster (feature
//! `cluster`), behind one connection type.
//!
//! [`Conn`] is what every command is sent on: a self-reconnecting
//! multiplexed [`ConnectionManager`], or the cluster client's connection,
//! which routes each command to the master that owns its keys, follows
//! `MOVED`/`ASK` (resharding) and finds the new master after a failover.
//! It splits the multi-key commands this tier sends (MGET, UNLINK) per hash
//! slot itself and puts the replies back in key order
//! (redis-1.8.1 `cluster_handling/routing.rs`, `multi_shard`), so no
//! command of ours can be `CROSSSLOT`: the scripts (the store's touches
//! the entry, its version and its fleet lock) and the one pipeline (the
//! write-behind stream's) touch only keys that share a slot (`key.rs`).
//!
//! [`Endpoint`] is what the rest needs to know of the target: the database
//! (part of the backplane's channel name) and where to open a subscriber.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, ProtocolVersion, RedisFuture, Value};

use super::{redact, RedisUrl};
use crate::error::{Error, ErrorKind};

/// Where the shared tier lives.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// One Redis (a primary, or a proxy in front of one).
    Single(RedisUrl),
    /// The seed nodes of a Redis Cluster; the client learns the rest.
    #[cfg(feature = "cluster")]
    Cluster(Vec<RedisUrl>),
}

/// The connection every command of the tier is sent on. Cheap to clone:
/// both kinds are handles to one multiplexed connection (per node).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(std::sync::Arc<cluster::Healing>),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Conn::Cluster(healing) => {
                let healing = std::sync::Arc::clone(healing);
                Box::pin(async move {
                    healing
                        .watch(|mut c| async move { c.req_packed_command(cmd).await })
                        .await
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Conn::Cluster(healing) => {
                let healing = std::sync::Arc::clone(healing);
                Box::pin(async move {
                    healing
                        .watch(|mut c| async move {
                            c.req_packed_commands(pipeline, offset, count).await
                        })
                        .await
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            #[cfg(feature = "cluster")]
            Conn::Cluster(_) => 0,
        }
    }
}

/// What the tier knows of its target besides the connection.
pub(crate) enum Endpoint {
    Single(Box<Client>),
    #[cfg(feature = "cluster")]
    Cluster(std::sync::Arc<cluster::Nodes>),
}

impl Endpoint {
    /// The database the tier uses (always 0 on a cluster).
    pub(crate) fn db(&self) -> i64 {
        match self {
            Endpoint::Single(client) => client.get_connection_info().redis_settings().db(),
            #[cfg(feature = "cluster")]
            Endpoint::Cluster(_) => 0,
        }
    }

    /// A client for the backplane's next subscriber connection, in RESP2
    /// (`pubsub.rs` says why). On a cluster, any node will do: a classic
    /// `PUBLISH` reaches the subscribers of every node over the cluster
    /// bus. Each call picks the next known node (the configured ones, then
    /// those learned with [`L2::learn_nodes`]), so a subscriber that lost
    /// its node (killed, failed over) resubscribes on another.
    pub(crate) fn subscriber(&self) -> Option<Client> {
        match self {
            Endpoint::Single(client) => Some(resp2(client)),
            #[cfg(feature = "cluster")]
            Endpoint::Cluster(nodes) => nodes.next_client(),
        }
    }

    /// A cluster client for a sharded subscriber: RESP3, pushes to `pushes`,
    /// from every node known. `None` on one Redis.
    #[cfg(feature = "cluster")]
    pub(crate) fn sharded_subscriber(
        &self,
        timeout: Duration,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Option<redis::cluster::ClusterClient> {
        match self {
            Endpoint::Single(_) => None,
            Endpoint::Cluster(nodes) => nodes.sharded_client(timeout, pushes),
        }
    }

    /// Whether this is a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        match self {
            Endpoint::Single(_) => false,
            #[cfg(feature = "cluster")]
            Endpoint::Cluster(_) => true,
        }
    }
}

impl super::L2 {
    /// On a cluster, asks it which nodes serve slots now (`CLUSTER SLOTS`),
    /// so that subscribers and replacement connections can reach nodes
    /// beyond the configured ones (one seed URL is enough, even when that
    /// node dies). Keeps what it knew when the cluster does not answer.
    pub(crate) async fn learn_nodes(&self) {
        #[cfg(feature = "cluster")]
        if let Endpoint::Cluster(nodes) = &*self.endpoint {
            let slots = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
            if let Ok(reply) = self.run::<Value>(&slots).await {
                nodes.learn(&reply);
            }
        }
    }
}

/// Opens the connection to `target` without waiting for it: the tier works
/// (L1 only) until Redis answers.
pub(crate) fn connect(target: &Target, timeout: Duration) -> Result<(Conn, Endpoint), Error> {
    let connect_timeout = timeout.max(Duration::from_millis(100));
    match target {
        Target::Single(url) => {
            let client = open(url)?;
            // No response timeout of its own: every command already runs
            // under the call's budget (`L2::guarded`), and a second timer
            // per command cost each read ~300 instructions and a timer
            // wheel entry. (A timeout does not make the manager reconnect
            // either way: it is not an unrecoverable error.)
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(None)
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_secs(2));
            let conn = client
                .get_connection_manager_lazy(manager_config)
                .map_err(|e| {
                    Error::new(ErrorKind::Config, "could not set up the Redis connection")
                        .with_source(redact(e))
                })?;
            Ok((Conn::Single(conn), Endpoint::Single(Box::new(client))))
        }
        #[cfg(feature = "cluster")]
        Target::Cluster(urls) => cluster::connect(urls, timeout, connect_timeout),
    }
}

fn open(url: &RedisUrl) -> Result<Client, Error> {
    Client::open(url.as_secret_str()).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            "the Redis URL is not valid (expected redis://host:port/db or rediss:// with the `tls` feature)",
        )
        .with_source(redact(e))
    })
}

/// The same server and settings as `client`, spoken in RESP2.
fn resp2(client: &Client) -> Client {
    let info = client.get_connection_info().clone();
    let redis = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP2);
    Client::open(info.set_redis_settings(redis)).unwrap_or_else(|_| client.clone())
}

#[cfg(feature = "cluster")]
mod cluster {
    use std::future::Future;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{PoisonError, RwLock};

    use super::*;
    use crate::entry::now_ms;
    use redis::cluster::{ClusterClient, ClusterConfig};
    use redis::cluster_async::ClusterConnection;
    use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisResult};

    /// After every request has failed for this long, the cluster connection
    /// is replaced by a new one (and again every this long while failing).
    ///
    /// Why: with redis-rs 1.8.1, a cluster connection under load sometimes
    /// stays wedged after a master is killed: every request times out, for
    /// good (tests/cluster.rs saw it in 2 of 4 runs, 30 s and more after the
    /// replica had taken over), while a new connection works at once. Its
    /// topology is refreshed only after errors that point at a new layout
    /// (MOVED, READONLY), never after timeouts. A healthy failover (2 s node
    /// timeout) is over in about 4 s; replacing a connection during one is
    /// harmless.
    const REPLACE_AFTER_MS: u64 = 3_000;

    /// The nodes connections may be opened to: the configured seeds, then
    /// the nodes the cluster said serve slots (same user, password, TLS).
    pub(crate) struct Nodes {
        seeds: Vec<ConnectionInfo>,
        known: RwLock<Vec<ConnectionInfo>>,
        /// The node the next subscriber connects to (round robin). It starts
        /// at a random seed, so that a fleet configured with the same list
        /// spreads its classic subscribers over the seeds instead of
        /// putting them all on the first one, which would then write every
        /// message to every instance alone (`benches/README.md`, "The
        /// backplane's knee").
        next: std::sync::atomic::AtomicUsize,
    }

    impl Nodes {
        fn all(&self) -> Vec<ConnectionInfo> {
            self.known
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }

        pub(super) fn next_client(&self) -> Option<Client> {
            let all = self.all();
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let info = all.get(n % all.len().max(1))?.clone();
            Client::open(info).ok().map(|client| resp2(&client))
        }

        pub(super) fn sharded_client(
            &self,
            timeout: Duration,
            pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
        ) -> Option<ClusterClient> {
            ClusterClient::builder(self.all())
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(pushes)
                .retries(RETRIES)
                .min_retry_wait(MIN_RETRY_WAIT_MS)
                .max_retry_wait(MAX_RETRY_WAIT_MS)
                .connection_timeout(timeout.max(Duration::from_millis(100)))
                .response_timeout(timeout)
                .build()
                .ok()
        }

        /// Learns the nodes of a `CLUSTER SLOTS` reply: the seeds stay
        /// first, then every node named there that is not a seed.
        pub(crate) fn learn(&self, reply: &Value) {
            let mut all = self.seeds.clone();
            for (host, port) in slot_nodes(reply) {
                if all.iter().any(|info| same_node(info.addr(), &host, port)) {
                    continue;
                }
                let mut addr = self.seeds[0].addr().clone();
                match &mut addr {
                    ConnectionAddr::Tcp(h, p)
                    | ConnectionAddr::TcpTls {
                        host: h, port: p, ..
                    } => {
                        *h = host;
                        *p = port;
                    }
                    _ => continue,
                }
                all.push(self.seeds[0].clone().set_addr(addr));
            }
            *self.known.write().unwrap_or_else(PoisonError::into_inner) = all;
        }
    }

    #[cfg(test)]
    impl Nodes {
        pub(crate) fn for_test(urls: &[&str]) -> Nodes {
            let seeds: Vec<ConnectionInfo> = urls
                .iter()
                .map(|url| url.into_connection_info().expect("a valid URL"))
                .collect();
            Nodes {
                known: RwLock::new(seeds.clone()),
                seeds,
                next: std::sync::atomic::AtomicUsize::new(0),
            }
        }

        pub(crate) fn addresses(&self) -> Vec<String> {
            self.all()
                .iter()
                .map(|info| info.addr().to_string())
                .collect()
        }
    }

    fn same_node(addr: &ConnectionAddr, host: &str, port: u16) -> bool {
        match addr {
            ConnectionAddr::Tcp(h, p)
            | ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => h == host && *p == port,
            _ => false,
        }
    }

    /// `(host, port)` of every node in a `CLUSTER SLOTS` reply:
    /// `[[start, end, [host, port, id, ..], [host, port, id, ..]..]..]`.
    fn slot_nodes(reply: &Value) -> Vec<(String, u16)> {
        let Value::Array(ranges) = reply else {
            return Vec::new();
        };
        let mut nodes = Vec::new();
        for range in ranges {
            let Value::Array(parts) = range else { continue };
            for node in parts.iter().skip(2) {
                let Value::Array(node) = node else { continue };
                let host = match node.first() {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(Value::SimpleString(s)) => s.clone(),
                    _ => continue,
                };
                let Some(Value::Int(port)) = node.get(1) else {
                    continue;
                };
                if let (false, Ok(port)) = (host.is_empty() || host == "?", u16::try_from(*port)) {
                    if !nodes.contains(&(host.clone(), port)) {
                        nodes.push((host, port));
                    }
                }
            }
        }
        nodes
    }

    /// How the cluster client is made, so that a replacement is made alike.
    struct Settings {
        timeout: Duration,
        connect_timeout: Duration,
    }

    impl Settings {
        fn client(&self, nodes: Vec<ConnectionInfo>) -> RedisResult<ClusterClient> {
            ClusterClient::builder(nodes)
                .retries(RETRIES)
                .min_retry_wait(MIN_RETRY_WAIT_MS)
                .max_retry_wait(MAX_RETRY_WAIT_MS)
                .connection_timeout(self.connect_timeout)
                .response_timeout(self.timeout)
                .overall_response_timeout(Some(self.timeout))
                .build()
        }

        fn config(&self) -> ClusterConfig {
            ClusterConfig::new()
                .set_connection_timeout(self.connect_timeout)
                .set_response_timeout(self.timeout)
        }
    }

    /// A cluster connection that replaces itself when it keeps failing.
    pub(crate) struct Healing {
        settings: Settings,
        nodes: std::sync::Arc<Nodes>,
        current: RwLock<ClusterConnection>,
        /// Since when (Unix ms) every request has failed; 0: the last one
        /// succeeded.
        failing_since_ms: AtomicU64,
    }

    impl Healing {
        /// Runs `request` on the current connection and notes how it ended:
        /// a connection failure, a timeout, a cluster that cannot serve
        /// (`CLUSTERDOWN`, `TRYAGAIN`), or a request dropped unfinished (the
        /// tier's timeout) counts as failed; an answer, even an error reply
        /// about the command, as working.
        pub(super) async fn watch<T, F, Fut>(&self, request: F) -> RedisResult<T>
        where
            F: FnOnce(ClusterConnection) -> Fut,
            Fut: Future<Output = RedisResult<T>>,
        {
            let conn = self
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let mut outcome = Outcome(self, false);
            let result = request(conn).await;
            outcome.1 = true;
            match &result {
                // An error reply about this command (NOPERM, WRONGTYPE) came
                // over a working connection.
                Ok(_) => self.failing_since_ms.store(0, Ordering::Relaxed),
                Err(e) if super::super::is_about_the_command(e) => {
                    self.failing_since_ms.store(0, Ordering::Relaxed);
                }
                Err(_) => self.failed(),
            }
            result
        }

        fn failed(&self) {
            let now = now_ms().max(1);
            let since = match self.failing_since_ms.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(since) => since,
            };
            if now.saturating_sub(since) < REPLACE_AFTER_MS
                || self
                    .failing_since_ms
                    .compare_exchange(since, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                return; // not yet, or another request replaces it
            }
            // From every node known, not only the seeds: a seed may be the
            // node that died.
            let Ok(client) = self.settings.client(self.nodes.all()) else {
                return;
            };
            let fresh = client.get_pending_async_connection_with_config(self.settings.config());
            *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
            tracing::warn!(
                "every Redis Cluster request failed for {} s; opened a new cluster connection (it reads the topology from the configured nodes)",
                REPLACE_AFTER_MS / 1000
            );
        }
    }

    /// Counts a request that never finished as failed.
    struct Outcome<'a>(&'a Healing, bool);

    impl Drop for Outcome<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.failed();
            }
        }
    }

    /// How often the cluster client itself retries a request (a `MOVED` or
    /// `ASK` after resharding, `TRYAGAIN`, `CLUSTERDOWN` during a failover).
    /// Few and short: the tier's timeout bounds every call anyway, and a
    /// request the caller gave up on should not linger and run much later.
    /// (The client's defaults are 16 retries, each waiting ≥ 1.28 s.)
    const RETRIES: u32 = 3;
    const MIN_RETRY_WAIT_MS: u64 = 20;
    const MAX_RETRY_WAIT_MS: u64 = 200;

    pub(super) fn connect(
        urls: &[RedisUrl],
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<(Conn, Endpoint), Error> {
        if urls.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "redis_cluster needs the URL of at least one cluster node",
            ));
        }
        for url in urls {
            open(url)?; // the same checks and message as for one Redis
        }
        let seeds = urls
            .iter()
            .map(|url| url.as_secret_str().into_connection_info())
            .collect::<RedisResult<Vec<_>>>()
            .map_err(|e| {
                Error::new(ErrorKind::Config, "a Redis Cluster URL is not valid")
                    .with_source(redact(e))
            })?;
        let settings = Settings {
            timeout,
            connect_timeout,
        };
        let client = settings.client(seeds.clone()).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                "the Redis Cluster URLs are not valid (all nodes need the same user, password, TLS mode and protocol; no unix sockets)",
            )
            .with_source(redact(e))
        })?;
        let conn = client.get_pending_async_connection_with_config(settings.config());
        let first = rand::random_range(0..seeds.len());
        let nodes = std::sync::Arc::new(Nodes {
            known: RwLock::new(seeds.clone()),
            seeds,
            next: std::sync::atomic::AtomicUsize::new(first),
        });
        let healing = Healing {
            settings,
            nodes: std::sync::Arc::clone(&nodes),
            current: RwLock::new(conn),
            failing_since_ms: AtomicU64::new(0),
        };
        Ok((
            Conn::Cluster(std::sync::Arc::new(healing)),
            Endpoint::Cluster(nodes),
        ))
    }
}

#[cfg(all(test, feature = "cluster"))]
mod tests {
    use super::cluster::*;
    use redis::Value;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn the_nodes_of_a_cluster_slots_reply_are_learned_after_the_seeds() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("127.0.0.1", 7002),
                node("", 7005), // no known endpoint: skipped
                node("127.0.0.1", 7001),
            ]),
        ]);
        let nodes = Nodes::for_test(&["redis://:pw@127.0.0.1:7004"]);
        nodes.learn(&reply);
        let ports: Vec<String> = nodes.addresses();
        assert_eq!(
            ports,
            ["127.0.0.1:7004", "127.0.0.1:7001", "127.0.0.1:7002"],
            "the seed first, each node once"
        );
        nodes.learn(&Value::Nil);
        assert_eq!(
            nodes.addresses(),
            ["127.0.0.1:7004"],
            "a bad reply leaves the seeds"
        );
    }
}
