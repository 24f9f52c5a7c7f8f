//! Redis Cluster: the testkit's cluster, the cache on it, failover and
//! resharding under load. The read path, tags, batches and the backplane
//! run on a cluster too: their own files run each test on both backends
//! (`support::Backend`). Every test here takes the shared cluster's turn
//! (`Backend::cluster`), as the failover changes who is master.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{subscribers, Backend, DbError, TestRedis};
use tiered_cache::testkit::RedisCluster;
use tiered_cache::{BackplaneMode, EntryOptions, Key, TieredCache};

/// The cluster of a test that holds the shared cluster's turn.
fn cluster_of(backend: &Backend) -> &'static RedisCluster {
    match backend {
        Backend::Cluster(turn) => turn.cluster,
        Backend::Standalone(_) => unreachable!("Backend::cluster() gives a cluster"),
    }
}

/// The shared test cluster forms: 3 masters, each with a replica, all
/// slots served.
#[tokio::test]
async fn the_testkit_cluster_has_three_masters_with_a_replica_each() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    assert_eq!(cluster.urls().len(), 6);
    assert_eq!(cluster.masters().expect("ROLE").len(), 3);
    let slots: Vec<String> = cluster
        .for_each_master(|conn| {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(conn)?;
            Ok(info)
        })
        .expect("CLUSTER INFO");
    for info in slots {
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_size:3"), "{info}");
    }
}

/// The cache on the cluster: a value written by one instance is read by
/// another from Redis, on whichever master owns its slot; an invalidation
/// and a tag bump reach Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_on_the_cluster_writes_reads_and_invalidates() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    let build = || {
        tiered_cache::TieredCache::builder()
            .namespace("cluster-smoke")
            .redis_cluster(cluster.urls())
            .require_l2(true)
            .build()
    };
    let (writer, reader) = (build().await.expect("build"), build().await.expect("build"));
    let opts = support::opts().tag("products");
    for id in 0..50 {
        writer
            .set(&support::key(id), support::product(id), &opts)
            .await
            .expect("set");
    }
    for id in 0..50 {
        assert_eq!(
            reader.get(&support::key(id)).await.as_deref(),
            Some(&support::product(id))
        );
    }
    assert_eq!(reader.stats().l2_hits, 50, "{:?}", reader.stats());
    assert_eq!(reader.stats().l2_errors, 0);
    writer
        .invalidate(&support::key(1))
        .await
        .expect("invalidate");
    writer
        .invalidate_tag("products")
        .await
        .expect("invalidate_tag");
    let fresh = build().await.expect("build");
    assert_eq!(fresh.get(&support::key(1)).await, None);
    assert_eq!(
        fresh.get(&support::key(2)).await,
        None,
        "its tag was bumped"
    );
    assert_eq!(fresh.stats().l2_errors, 0, "{:?}", fresh.stats());
}

/// The backplane in both pub/sub modes: one instance's overwrite, key
/// invalidation and tag bump each reach the other's L1, with no gap. The
/// subscriptions are where each mode puts them: classic ones count in
/// `PUBSUB NUMSUB`, sharded ones in `PUBSUB SHARDNUMSUB`, and only on the
/// channel's shard (its master: 2 there, none on the other nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_arrive_over_classic_and_sharded_pubsub() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    for mode in [BackplaneMode::Classic, BackplaneMode::Sharded] {
        let namespace = format!("modes-{mode:?}");
        let channel = format!("{namespace}:#backplane");
        let build = || {
            TieredCache::builder()
                .namespace(&namespace)
                .redis_cluster(cluster.urls())
                .backplane_mode(mode)
                .require_l2(true)
                .build()
        };
        let (writer, reader) = (build().await.expect("build"), build().await.expect("build"));
        let sharded: Vec<u64> = backend
            .on_nodes::<(String, u64)>(redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel))
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        let classic = subscribers(&backend, &channel);
        match mode {
            BackplaneMode::Classic => {
                assert_eq!((classic, sharded.iter().sum()), (2, 0), "{mode:?}");
            }
            _ => {
                assert_eq!(classic, 0, "{mode:?}");
                let mut on_nodes = sharded.clone();
                on_nodes.sort_unstable();
                assert_eq!(
                    on_nodes,
                    [0, 0, 0, 0, 0, 2],
                    "{mode:?}: one node holds both"
                );
            }
        }
        let opts = support::opts().tag("products");
        let (one, two) = (support::key(1), support::key(2));
        writer
            .set(&one, support::product(1), &opts)
            .await
            .expect("set");
        writer
            .set(&two, support::product(2), &opts)
            .await
            .expect("set");
        let received = |n: u64| {
            let reader = reader.clone();
            async move {
                support::until("the reader hears the writer", || {
                    reader.stats().invalidations_received >= n
                })
                .await;
            }
        };
        // The two writes' announcements first, so none is taken below for
        // a later one.
        received(2).await;
        for key in [&one, &two] {
            assert!(reader.get(key).await.is_some(), "{mode:?}: in L2, then L1");
        }
        let base = reader.stats().invalidations_received;
        assert_eq!(base, 2, "{mode:?}");
        writer
            .set(&one, support::product(7), &opts)
            .await
            .expect("set");
        received(base + 1).await;
        assert_eq!(
            reader.get(&one).await.as_deref(),
            Some(&support::product(7)),
            "{mode:?}: the overwrite dropped the old copy"
        );
        writer.invalidate(&one).await.expect("invalidate");
        received(base + 2).await;
        assert_eq!(reader.get(&one).await, None, "{mode:?}: invalidated");
        writer
            .invalidate_tag("products")
            .await
            .expect("invalidate_tag");
        received(base + 3).await;
        assert_eq!(reader.get(&two).await, None, "{mode:?}: its tag was bumped");
        let stats = reader.stats();
        assert_eq!(
            (stats.backplane_gaps, stats.l2_errors),
            (0, 0),
            "{mode:?}: {stats:?}"
        );
    }
}

/// An entry's version counter (`#v`) lives in its entry's hash slot, so the
/// compare-and-set scripts (which touch both) never fail with CROSSSLOT,
/// whatever bytes the key's arguments hold. Redis itself says which slot.
#[tokio::test]
async fn an_entry_and_its_version_counter_share_a_slot() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    let mut conn = redis::Client::open(cluster.urls()[0].as_str())
        .and_then(|c| c.get_connection())
        .expect("connection");
    let args = ["", "a:b", "{", "}", "{x}", "%7B", "}{", "é😀", "#v"];
    for (n, arg) in args.iter().enumerate() {
        let key = tiered_cache::Key::<String>::new("e{n}t:ity", 1)
            .arg(arg)
            .arg(n);
        let entry = support::redis_key("ns", &key);
        let mut slot = |k: &str| -> u16 {
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(k)
                .query(&mut conn)
                .expect("CLUSTER KEYSLOT")
        };
        let (entry_slot, version_slot) = (slot(&entry), slot(&format!("{entry}#v")));
        assert_eq!(entry_slot, version_slot, "{entry}");
    }
}

// ---------------------------------------------------------------- failover, resharding

/// Keys of the load tests: `{item:v1:N}` caching the string "vN".
fn load_key(n: u64) -> Key<String> {
    support::item(n)
}

const LOAD_KEYS: u64 = 2_000;

/// What the callers of [`Load`] saw.
#[derive(Debug, Default)]
struct Seen {
    calls: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
}

/// 64 tasks calling `get_or_load` on random keys of `0..LOAD_KEYS` until
/// stopped; each checks the value it gets, and counts errors.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    loads: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(cache: &TieredCache) -> Load {
        let (stop, seen, loads) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(Seen::default()),
            Arc::new(AtomicU64::new(0)),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..64u64 {
            let (cache, stop, seen, loads) =
                (cache.clone(), stop.clone(), seen.clone(), loads.clone());
            tasks.spawn(async move {
                let mut x = task.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1; // xorshift
                let opts = EntryOptions::new(Duration::from_secs(300));
                while !stop.load(SeqCst) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = x % LOAD_KEYS;
                    let loads = loads.clone();
                    let got = cache
                        .get_or_load(&load_key(n), &opts, move || async move {
                            loads.fetch_add(1, SeqCst);
                            Ok::<_, DbError>(format!("v{n}"))
                        })
                        .await;
                    seen.calls.fetch_add(1, SeqCst);
                    match got {
                        Ok(v) if *v == format!("v{n}") => {}
                        Ok(_) => {
                            seen.wrong.fetch_add(1, SeqCst);
                        }
                        Err(_) => {
                            seen.errors.fetch_add(1, SeqCst);
                        }
                    }
                    tokio::task::yield_now().await;
                }
            });
        }
        Load {
            stop,
            seen,
            loads,
            tasks,
        }
    }

    async fn stop(mut self) -> Arc<Seen> {
        self.stop.store(true, SeqCst);
        while let Some(done) = self.tasks.join_next().await {
            done.expect("a load task panicked");
        }
        self.seen
    }
}

/// A cache for the load tests: the default L2 timeout, and an L1 that keeps
/// entries 200 ms, so that reads keep going to Redis.
async fn load_cache(cluster: &RedisCluster, namespace: &str) -> TieredCache {
    TieredCache::builder()
        .namespace(namespace)
        .redis_cluster(cluster.urls())
        .l1_ttl_cap(Duration::from_millis(200))
        .require_l2(true)
        .build()
        .await
        .expect("build")
}

/// Writes every load key through a cache of its own.
async fn seed(cluster: &RedisCluster, namespace: &str) {
    let seeder = load_cache(cluster, namespace).await;
    let opts = EntryOptions::new(Duration::from_secs(300));
    for n in 0..LOAD_KEYS {
        seeder
            .set(&load_key(n), format!("v{n}"), &opts)
            .await
            .expect("seed");
    }
}

/// Waits (bounded) until `cache` has served at least 200 calls of `load`
/// from Redis with no new L2 error: it uses L2 again.
async fn until_l2_is_used_again(cache: &TieredCache, load: &Load) -> Duration {
    let started = Instant::now();
    loop {
        let (before, calls) = (cache.stats(), load.seen.calls.load(SeqCst));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let after = cache.stats();
        if after.l2_errors == before.l2_errors
            && after.l2_hits > before.l2_hits
            && load.seen.calls.load(SeqCst) - calls >= 200
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "L2 not used again 30 s after the failover: {after:?}"
        );
    }
}

/// A master is killed while 64 tasks read: no caller sees an error or a
/// wrong value; while its slots have no master the cache serves from L1
/// and the loader; once the replica has taken over it uses Redis again.
/// Another instance, given only the killed node's URL, resubscribes its
/// backplane on a node it learned (a counted gap), and invalidations flow
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_master_under_load_shows_callers_no_error() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    seed(cluster, "failover").await;
    let cache = load_cache(cluster, "failover").await;
    // The peer knows only the node that will be killed (`kill_master` kills
    // the first master): it must learn the others from the cluster.
    let victim = cluster.masters().expect("ROLE")[0];
    let peer = TieredCache::builder()
        .namespace("failover")
        .redis_cluster([cluster.urls()[victim].clone()])
        .require_l2(true)
        .build()
        .await
        .expect("build");
    let load = Load::start(&cache);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        backend_subscribers_on(cluster, victim, "failover:#backplane") >= 1,
        "the peer subscribes on its one configured node"
    );
    let (before, loads_before) = (cache.stats(), load.loads.load(SeqCst));
    let failover = tokio::task::spawn_blocking(move || cluster.kill_master())
        .await
        .expect("join")
        .expect("the replica takes over");
    let during = cache.stats();
    let loads_during = load.loads.load(SeqCst) - loads_before;
    let back_after = until_l2_is_used_again(&cache, &load).await;
    let seen = load.stop().await;
    println!(
        "failover: node {} killed, node {} promoted in {:?}; L2 used again {back_after:?} later; \
         {} calls, {} errors, {} wrong; during it: {} L1 hits, {} L2 hits, {} loads, {} L2 errors",
        failover.killed,
        failover.promoted,
        failover.took,
        seen.calls.load(SeqCst),
        seen.errors.load(SeqCst),
        seen.wrong.load(SeqCst),
        during.l1_hits - before.l1_hits,
        during.l2_hits - before.l2_hits,
        loads_during,
        during.l2_errors - before.l2_errors,
    );
    assert_eq!(seen.errors.load(SeqCst), 0, "errors seen by callers");
    assert_eq!(seen.wrong.load(SeqCst), 0, "wrong values seen by callers");
    assert!(
        during.l1_hits > before.l1_hits,
        "L1 served during the failover"
    );
    assert!(loads_during > 0, "the loader served what L1 did not have");
    assert!(
        during.l2_errors > before.l2_errors,
        "the failover was felt (else this test tests nothing): {during:?}"
    );

    // The peer's subscriber was on the killed node: it resubscribes on a
    // node it learned (a counted gap), and messages flow again.
    support::until("the peer resubscribes", || peer.stats().backplane_gaps >= 1).await;
    let probe = load_key(LOAD_KEYS + 1);
    let opts = EntryOptions::new(Duration::from_secs(300));
    let received = peer.stats().invalidations_received;
    let deadline = Instant::now() + Duration::from_secs(20);
    while peer.stats().invalidations_received == received {
        cache
            .set(&probe, "probe".to_owned(), &opts)
            .await
            .expect("set");
        assert!(
            Instant::now() < deadline,
            "the peer hears nothing after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        subscribers(&backend, "failover:#backplane"),
        2,
        "both subscribed"
    );

    tokio::task::spawn_blocking(move || cluster.restart(failover.killed))
        .await
        .expect("join")
        .expect("the killed node rejoins as a replica");
}

/// Sharded pub/sub through a failover of the channel's own master: the
/// sharded subscribers lose their node, come back on the promoted replica
/// (a counted gap, L1 cleared), and invalidations flow again; no
/// subscription is left on a dead node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_subscribers_follow_a_failover_of_their_master() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    // A namespace whose channel lives on the master `kill_master` kills
    // (the first one): a plain connection to it answers a command on the
    // channel's name as a key instead of MOVED.
    let victim = cluster.masters().expect("ROLE")[0];
    let mut direct = redis::Client::open(cluster.urls()[victim].as_str())
        .and_then(|c| c.get_connection())
        .expect("connection");
    let namespace = (0..1000)
        .map(|n| format!("sfail{n}"))
        .find(|ns| {
            redis::cmd("EXISTS")
                .arg(format!("{ns}:#backplane"))
                .query::<u64>(&mut direct)
                .is_ok()
        })
        .expect("a namespace whose channel the first master owns");
    let build = || {
        TieredCache::builder()
            .namespace(&namespace)
            .redis_cluster(cluster.urls())
            .backplane_mode(BackplaneMode::Sharded)
            .require_l2(true)
            .build()
    };
    let (writer, reader) = (build().await.expect("build"), build().await.expect("build"));
    let key = support::key(1);
    let opts = support::opts();
    writer
        .set(&key, support::product(1), &opts)
        .await
        .expect("set");
    support::until("the first announcement", || {
        reader.stats().invalidations_received >= 1
    })
    .await;
    assert!(reader.get(&key).await.is_some(), "in L1 now");

    let failover = tokio::task::spawn_blocking(move || cluster.kill_master())
        .await
        .expect("join")
        .expect("the replica takes over");
    support::until("the reader resubscribes", || {
        reader.stats().backplane_gaps >= 1
    })
    .await;
    // Messages flow again (the writer's own publishing may need the new
    // topology first: keep writing until the reader hears one).
    let received = reader.stats().invalidations_received;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while reader.stats().invalidations_received == received {
        n += 1;
        let _ = writer.set(&key, support::product(100 + n), &opts).await;
        assert!(
            Instant::now() < deadline,
            "the reader hears nothing after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The writer's subscriber was on the killed node too.
    let channel = format!("{namespace}:#backplane");
    let shard_subscribers = || -> u64 {
        backend
            .on_nodes::<(String, u64)>(redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel))
            .into_iter()
            .map(|(_, n)| n)
            .sum()
    };
    support::until("both subscribed again, on live nodes", || {
        shard_subscribers() == 2
    })
    .await;
    assert!(writer.stats().backplane_gaps >= 1, "{:?}", writer.stats());
    println!(
        "sharded failover: node {} killed, node {} promoted in {:?}; reader gaps {}",
        failover.killed,
        failover.promoted,
        failover.took,
        reader.stats().backplane_gaps
    );
    tokio::task::spawn_blocking(move || cluster.restart(failover.killed))
        .await
        .expect("join")
        .expect("the killed node rejoins as a replica");
}

/// Subscribers of `channel` on node `node` alone.
fn backend_subscribers_on(cluster: &RedisCluster, node: usize, channel: &str) -> u64 {
    let url = cluster.urls()[node].clone();
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("connection");
    let (_, n): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query(&mut conn)
        .expect("PUBSUB NUMSUB");
    n
}

/// Slots (and their keys) move from one master to another while 64 tasks
/// read: the client follows MOVED and ASK, and no caller sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resharding_under_load_shows_callers_no_error() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    seed(cluster, "reshard").await;
    let cache = load_cache(cluster, "reshard").await;
    let load = Load::start(&cache);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let masters = cluster.masters().expect("ROLE");
    let (from, to) = (masters[0], masters[1]);
    let before = cache.stats();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || cluster.reshard(from, to, 1_000))
        .await
        .expect("join")
        .expect("redis-cli --cluster reshard");
    let took = started.elapsed();
    let back_after = until_l2_is_used_again(&cache, &load).await;
    let seen = load.stop().await;
    let after = cache.stats();
    println!(
        "reshard: 1000 slots moved in {took:?}; {} calls, {} errors, {} wrong; \
         meanwhile {} L2 hits, {} L2 errors; L2 steady {back_after:?} later",
        seen.calls.load(SeqCst),
        seen.errors.load(SeqCst),
        seen.wrong.load(SeqCst),
        after.l2_hits - before.l2_hits,
        after.l2_errors - before.l2_errors,
    );
    assert_eq!(seen.errors.load(SeqCst), 0, "errors seen by callers");
    assert_eq!(seen.wrong.load(SeqCst), 0, "wrong values seen by callers");
    // Move them back, so the cluster keeps its even shape.
    tokio::task::spawn_blocking(move || cluster.reshard(to, from, 1_000))
        .await
        .expect("join")
        .expect("redis-cli --cluster reshard");
}

/// Cluster URLs are redacted like a single Redis's: in the builder's and
/// the cache's `Debug`, and in build errors.
#[tokio::test]
async fn a_password_in_a_cluster_url_never_shows() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port(); // closed once the listener is dropped
    let urls = [
        format!("redis://:secret@127.0.0.1:{port}"),
        format!("redis://:secret@127.0.0.1:{}", port.wrapping_add(1)),
    ];
    let builder = TieredCache::builder()
        .redis_cluster(urls.clone())
        .l2_timeout(Duration::from_millis(200))
        .require_l2(true);
    let shown = format!("{builder:?}");
    assert!(!shown.contains("secret"), "builder Debug: {shown}");
    let err = builder
        .build()
        .await
        .expect_err("require_l2 with no cluster there fails the build");
    assert!(err.is_l2(), "{err:?}");
    let mut text = String::new();
    let mut next: Option<&dyn std::error::Error> = Some(&err);
    while let Some(e) = next {
        text.push_str(&format!("{e}\n{e:?}\n"));
        next = e.source();
    }
    assert!(!text.contains("secret"), "error: {text}");

    let cache = TieredCache::builder()
        .redis_cluster(urls)
        .l2_timeout(Duration::from_millis(200))
        .build()
        .await
        .expect("without require_l2 it builds, L1 only for now");
    assert!(!format!("{cache:?}").contains("secret"));

    let err = TieredCache::builder()
        .redis_cluster(["redis://:secret@127.0.0.1:notaport"])
        .build()
        .await
        .expect_err("invalid URL");
    assert!(!format!("{err} {err:?}").contains("secret"), "{err:?}");
    let err = TieredCache::builder()
        .redis_cluster(Vec::<String>::new())
        .build()
        .await
        .expect_err("no URL");
    println!("{err}");
}
