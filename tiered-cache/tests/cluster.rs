//! Redis Cluster: the testkit's cluster, the cache on it, and failover.
//! The read path, tags, batches and the backplane run on a cluster too:
//! their own files run each test on both backends (`support::Backend`).

mod support;

use tiered_cache::testkit::RedisCluster;

/// The shared test cluster forms: 3 masters, each with a replica, all
/// slots served.
#[test]
fn the_testkit_cluster_has_three_masters_with_a_replica_each() {
    let cluster = RedisCluster::shared().expect("redis-server and redis-cli");
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
    let cluster = RedisCluster::shared().expect("redis-server and redis-cli");
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

/// An entry's version counter (`#v`) lives in its entry's hash slot, so the
/// compare-and-set scripts (which touch both) never fail with CROSSSLOT,
/// whatever bytes the key's arguments hold. Redis itself says which slot.
#[test]
fn an_entry_and_its_version_counter_share_a_slot() {
    let cluster = RedisCluster::shared().expect("redis-server and redis-cli");
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
