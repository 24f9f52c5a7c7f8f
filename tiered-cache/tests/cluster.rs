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
