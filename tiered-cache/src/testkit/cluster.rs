//! A throwaway Redis Cluster: 3 masters and 3 replicas on free loopback
//! ports, made with `redis-cli --cluster create`, stopped when dropped.
//!
//! Forming a cluster takes a few seconds, so a test binary shares one
//! ([`RedisCluster::shared`]); tests on it use distinct namespaces. A test
//! that breaks the cluster on purpose ([`RedisCluster::kill_master`]) waits
//! for it to heal before it returns.

use std::io;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::RedisServer;

/// How long forming or healing the cluster may take before the testkit
/// gives up. A failover takes about 4 s with the 2 s node timeout.
const HEAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A local Redis Cluster of 3 masters and 3 replicas (node timeout 2 s),
/// whose nodes are killed when it is dropped.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tiered_cache::{testkit::RedisCluster, TieredCache};
/// let cluster = RedisCluster::shared().expect("redis-server and redis-cli");
/// let cache = TieredCache::builder().redis_cluster(cluster.urls()).build().await.unwrap();
/// # let _ = cache;
/// # }
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    /// The six nodes, in the order they were created; a killed node stays
    /// in its place, not running.
    nodes: Mutex<Vec<RedisServer>>,
}

/// What [`RedisCluster::kill_master`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failover {
    /// The node that was killed (an index into [`RedisCluster::urls`]).
    pub killed: usize,
    /// Its replica, now the master of its slots.
    pub promoted: usize,
    /// From the kill until every live node said `cluster_state:ok`.
    pub took: Duration,
}

impl RedisCluster {
    /// Starts 6 nodes and makes them one cluster (`--cluster-replicas 1`);
    /// returns once every node says `cluster_state:ok` and every replica
    /// is in sync with its master.
    ///
    /// # Errors
    /// When `redis-server` or `redis-cli` is missing, or the cluster does
    /// not form within 30 s.
    pub fn start() -> io::Result<Self> {
        let nodes = (0..6)
            .map(|_| RedisServer::start_cluster_node())
            .collect::<io::Result<Vec<_>>>()?;
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new(redis_cli())
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("`redis-cli` is needed to form a test cluster (it comes with redis-server): {e}"),
                )
            })?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&output.stdout)
            )));
        }
        let cluster = RedisCluster {
            nodes: Mutex::new(nodes),
        };
        cluster.wait_until_healthy(HEAL_TIMEOUT)?;
        Ok(cluster)
    }

    /// One cluster for the whole test binary, started on first use. Its
    /// nodes are killed when the test process ends (a watchdog process
    /// does it, as statics are never dropped).
    ///
    /// # Errors
    /// As for [`start`](Self::start); every later call returns the same
    /// error.
    pub fn shared() -> io::Result<&'static RedisCluster> {
        static SHARED: OnceLock<Result<RedisCluster, String>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            let cluster = RedisCluster::start().map_err(|e| e.to_string())?;
            cluster.watch_over_this_process();
            Ok(cluster)
        });
        shared.as_ref().map_err(|e| io::Error::other(e.clone()))
    }

    /// `redis://127.0.0.1:{port}` of every node, killed ones included.
    pub fn urls(&self) -> Vec<String> {
        self.nodes().iter().map(RedisServer::url).collect()
    }

    /// The indices (into [`urls`](Self::urls)) of the nodes that are
    /// masters now, from `ROLE`.
    ///
    /// # Errors
    /// When a running node does not answer.
    pub fn masters(&self) -> io::Result<Vec<usize>> {
        let nodes = self.nodes();
        let mut masters = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if node.pid().is_some() && role(node)? == "master" {
                masters.push(i);
            }
        }
        Ok(masters)
    }

    /// Runs `f` with a blocking connection to each running master, in turn
    /// (to read or reset `INFO` counters, which are per node).
    ///
    /// # Errors
    /// The first error of a connection or of `f`.
    pub fn for_each_master<T>(
        &self,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<Vec<T>> {
        let masters = self.masters().map_err(redis::RedisError::from)?;
        let nodes = self.nodes();
        masters
            .into_iter()
            .map(|i| f(&mut nodes[i].connection()?))
            .collect()
    }

    /// Runs `f` with a blocking connection to each running node, masters
    /// and replicas, in turn (pub/sub clients may be on any node).
    ///
    /// # Errors
    /// The first error of a connection or of `f`.
    pub fn for_each_node<T>(
        &self,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<Vec<T>> {
        let nodes = self.nodes();
        nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .map(|n| f(&mut n.connection()?))
            .collect()
    }

    /// Freezes every master (SIGSTOP), as [`RedisServer::pause`] does one
    /// server: nothing answers. Resume within the node timeout (2 s), or
    /// the replicas take over.
    ///
    /// # Errors
    /// When a signal could not be sent.
    pub fn pause_masters(&self) -> io::Result<()> {
        let masters = self.masters()?;
        let nodes = self.nodes();
        masters.into_iter().try_for_each(|i| nodes[i].pause())
    }

    /// Thaws every node paused by [`pause_masters`](Self::pause_masters).
    ///
    /// # Errors
    /// When a signal could not be sent.
    pub fn resume(&self) -> io::Result<()> {
        let nodes = self.nodes();
        nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .try_for_each(RedisServer::resume)
    }

    /// Kills (SIGKILL) the first running master, then waits until its
    /// replica has taken over its slots and every live node says
    /// `cluster_state:ok`. The killed node stays down until
    /// [`restart`](Self::restart).
    ///
    /// # Errors
    /// When no master with a replica is found, or the cluster does not heal
    /// within 30 s.
    pub fn kill_master(&self) -> io::Result<Failover> {
        let master = *self
            .masters()?
            .first()
            .ok_or_else(|| io::Error::other("no running master"))?;
        let replica = self
            .replica_of(master)?
            .ok_or_else(|| io::Error::other("the master has no replica"))?;
        let started = Instant::now();
        self.nodes()[master].kill();
        let deadline = started + HEAL_TIMEOUT;
        while role(&self.nodes()[replica]).ok().as_deref() != Some("master") {
            if Instant::now() > deadline {
                return Err(io::Error::other(
                    "the replica did not take over within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_until_healthy(deadline.saturating_duration_since(Instant::now()))?;
        Ok(Failover {
            killed: master,
            promoted: replica,
            took: started.elapsed(),
        })
    }

    /// Starts a killed node again (same port and cluster config: it rejoins
    /// as a replica) and waits until the cluster is healthy.
    ///
    /// # Errors
    /// When it does not come back, or the cluster does not heal in 30 s.
    pub fn restart(&self, node: usize) -> io::Result<()> {
        {
            let mut nodes = self.nodes();
            let node = nodes
                .get_mut(node)
                .ok_or_else(|| io::Error::other("no such node"))?;
            node.restart()?;
        }
        self.wait_until_healthy(HEAL_TIMEOUT)
    }

    /// Moves `slots` hash slots from master `from` to master `to` (indices
    /// into [`urls`](Self::urls)) with `redis-cli --cluster reshard`, keys
    /// included; returns when it is done and the cluster is healthy.
    ///
    /// # Errors
    /// When redis-cli fails or the cluster does not heal in 30 s.
    pub fn reshard(&self, from: usize, to: usize, slots: u32) -> io::Result<()> {
        let (entry, from_id, to_id) = {
            let nodes = self.nodes();
            let id = |i: usize| -> io::Result<String> {
                let node = nodes
                    .get(i)
                    .ok_or_else(|| io::Error::other("no such node"))?;
                query(node, redis::cmd("CLUSTER").arg("MYID"))
            };
            (
                format!("127.0.0.1:{}", nodes[to].port()),
                id(from)?,
                id(to)?,
            )
        };
        let output = Command::new(redis_cli())
            .args(["--cluster", "reshard", &entry])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster reshard failed: {}",
                String::from_utf8_lossy(&output.stdout)
            )));
        }
        self.wait_until_healthy(HEAL_TIMEOUT)
    }

    /// Waits until every running node says `cluster_state:ok` with all
    /// 16384 slots served, and every running replica's link to its master
    /// is up.
    fn wait_until_healthy(&self, within: Duration) -> io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.healthy() {
                Ok(true) => return Ok(()),
                Ok(false) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(false) => {
                    return Err(io::Error::other(
                        "the test cluster did not become healthy (cluster_state:ok on every node) in time",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn healthy(&self) -> io::Result<bool> {
        let nodes = self.nodes();
        for node in nodes.iter().filter(|n| n.pid().is_some()) {
            let info: String = query(node, redis::cmd("CLUSTER").arg("INFO"))?;
            if field(&info, "cluster_state") != Some("ok")
                || field(&info, "cluster_slots_ok") != Some("16384")
            {
                return Ok(false);
            }
            let replication: String = query(node, redis::cmd("INFO").arg("replication"))?;
            if field(&replication, "role") == Some("slave")
                && field(&replication, "master_link_status") != Some("up")
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The running replica of master `master`, from `INFO replication`.
    fn replica_of(&self, master: usize) -> io::Result<Option<usize>> {
        let nodes = self.nodes();
        let port = nodes[master].port().to_string();
        for (i, node) in nodes.iter().enumerate() {
            if i == master || node.pid().is_none() {
                continue;
            }
            let replication: String = query(node, redis::cmd("INFO").arg("replication"))?;
            if field(&replication, "role") == Some("slave")
                && field(&replication, "master_port") == Some(port.as_str())
            {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    fn nodes(&self) -> MutexGuard<'_, Vec<RedisServer>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns `sh` to kill the nodes (by the pid files they write) once
    /// this process is gone.
    fn watch_over_this_process(&self) {
        let dirs: Vec<String> = self
            .nodes()
            .iter()
            .map(|n| n.dir.display().to_string())
            .collect();
        let script = r#"
            parent=$1; shift
            while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
            for dir in "$@"; do
              [ -f "$dir/redis.pid" ] && kill -9 "$(cat "$dir/redis.pid")" 2>/dev/null
              rm -rf "$dir"
            done
        "#;
        let _ = Command::new("sh")
            .args(["-c", script, "watchdog", &std::process::id().to_string()])
            .args(&dirs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

fn redis_cli() -> String {
    std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned())
}

fn query<T: redis::FromRedisValue>(node: &RedisServer, cmd: &redis::Cmd) -> io::Result<T> {
    let mut conn = node.connection().map_err(io::Error::other)?;
    cmd.query(&mut conn).map_err(io::Error::other)
}

/// `ROLE`'s first element: "master" or "slave".
fn role(node: &RedisServer) -> io::Result<String> {
    let role: Vec<redis::Value> = query(node, &redis::cmd("ROLE"))?;
    match role.first() {
        Some(redis::Value::BulkString(bytes)) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Some(redis::Value::SimpleString(s)) => Ok(s.clone()),
        _ => Err(io::Error::other("unexpected ROLE reply")),
    }
}

/// The value of `name:` in an `INFO`-style reply.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}
