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
//! command of ours can be `CROSSSLOT`: the scripts and the one pipeline
//! (`get_versioned`) touch only keys of one entry, which share a slot
//! (`key.rs`).
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
    /// The seed nodes, each a client for a subscriber connection.
    #[cfg(feature = "cluster")]
    Cluster {
        nodes: Vec<Client>,
        /// The node the next subscriber connects to (round robin).
        next: std::sync::atomic::AtomicUsize,
    },
}

impl Endpoint {
    /// The database the tier uses (always 0 on a cluster).
    pub(crate) fn db(&self) -> i64 {
        match self {
            Endpoint::Single(client) => client.get_connection_info().redis_settings().db(),
            #[cfg(feature = "cluster")]
            Endpoint::Cluster { .. } => 0,
        }
    }

    /// A client for the backplane's next subscriber connection, in RESP2
    /// (`pubsub.rs` says why). On a cluster, any node will do: a classic
    /// `PUBLISH` reaches the subscribers of every node over the cluster
    /// bus. Each call picks the next seed node, so a subscriber that lost
    /// its node (killed, failed over) resubscribes on another.
    pub(crate) fn subscriber(&self) -> Client {
        match self {
            Endpoint::Single(client) => resp2(client),
            #[cfg(feature = "cluster")]
            Endpoint::Cluster { nodes, next } => {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                resp2(&nodes[n % nodes.len()])
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
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(timeout))
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
    use redis::RedisResult;

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

    /// A cluster connection that replaces itself when it keeps failing.
    pub(crate) struct Healing {
        client: ClusterClient,
        config: ClusterConfig,
        current: RwLock<ClusterConnection>,
        /// Since when (Unix ms) every request has failed; 0: the last one
        /// succeeded.
        failing_since_ms: AtomicU64,
    }

    impl Healing {
        /// Runs `request` on the current connection and notes how it ended;
        /// a request dropped unfinished (the tier's timeout) counts as failed.
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
            if result.is_ok() {
                self.failing_since_ms.store(0, Ordering::Relaxed);
            } else {
                self.failed();
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
            let fresh = self
                .client
                .get_pending_async_connection_with_config(self.config.clone());
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
        let nodes = urls.iter().map(open).collect::<Result<Vec<_>, _>>()?;
        let client = ClusterClient::builder(urls.iter().map(RedisUrl::as_secret_str))
            .retries(RETRIES)
            .min_retry_wait(MIN_RETRY_WAIT_MS)
            .max_retry_wait(MAX_RETRY_WAIT_MS)
            .connection_timeout(connect_timeout)
            .response_timeout(timeout)
            .overall_response_timeout(Some(timeout))
            .build()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    "the Redis Cluster URLs are not valid (all nodes need the same user, password, TLS mode and protocol; no unix sockets)",
                )
                .with_source(redact(e))
            })?;
        let config = ClusterConfig::new()
            .set_connection_timeout(connect_timeout)
            .set_response_timeout(timeout);
        let conn = client.get_pending_async_connection_with_config(config.clone());
        let healing = Healing {
            client,
            config,
            current: RwLock::new(conn),
            failing_since_ms: AtomicU64::new(0),
        };
        let endpoint = Endpoint::Cluster {
            nodes,
            next: std::sync::atomic::AtomicUsize::new(0),
        };
        Ok((Conn::Cluster(std::sync::Arc::new(healing)), endpoint))
    }
}
