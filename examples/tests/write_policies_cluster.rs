//! The write policies on a Redis Cluster (3 masters, 3 replicas, from the
//! testkit): write-through read-your-writes across two instances, and two
//! durable write-behind instances writing the same ids, one with its store
//! held back (the stream's XADD, XREADGROUP and XDEL on its own slot).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;
use tiered_cache::testkit::RedisCluster;
use tiered_cache::write::{WriteBehind, WritePolicy};
use tiered_cache::TieredCache;
use tiered_cache_examples::Counter;

async fn cluster_cache(namespace: &str) -> TieredCache {
    let cluster = RedisCluster::shared().expect("a test cluster");
    TieredCache::builder()
        .namespace(namespace)
        .redis_cluster(cluster.urls())
        .require_l2(true)
        // Six servers share two cores with the tests: a roomy budget.
        .l2_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("a cache on the test cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_policies_run_on_a_cluster() {
    // Write-through: B reads what A wrote, from the cluster, not the store.
    let db = TempDb::new("cluster-through");
    let table = db.table::<Product>();
    let (a, b) = (
        cluster_cache("wp-through").await,
        cluster_cache("wp-through").await,
    );
    let on_a = a
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    let on_b = b
        .entity_with(table.clone(), WritePolicy::WriteThrough)
        .unwrap();
    for id in 0..20 {
        on_a.put(&id, product("desk", id)).await.unwrap();
    }
    for id in 0..20 {
        let got = on_b.get(&id).await.unwrap().map(|p| p.price_cents);
        assert_eq!(got, Some(id));
    }
    assert_eq!(
        table
            .counts()
            .loads
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(a.stats().write_fallbacks, 0);

    // Durable write-behind: C's store is held back while C and D write the
    // same ids in turn and D flushes; once C's older writes reach the store
    // late, every id still ends with its newest write (the versions).
    let db = TempDb::new("cluster-durable");
    let probe = Probe::new(db.table::<Counter>());
    let durable = |consumer: &str| {
        WritePolicy::WriteBehind(
            WriteBehind::new()
                .durable(true)
                .consumer(consumer)
                .flush_interval(Duration::from_millis(10))
                .claim_idle(Duration::from_millis(300)),
        )
    };
    let (c, d) = (
        cluster_cache("wp-durable").await,
        cluster_cache("wp-durable").await,
    );
    let on_c = c.entity_with(probe.clone(), durable("c")).unwrap();
    let on_d = d.entity_with(probe.table.clone(), durable("d")).unwrap();
    probe.hold();
    let mut newest = HashMap::new();
    for seq in 0..200_u64 {
        let id = seq % 20;
        if (seq / 20) % 2 == 0 {
            on_c.put(&id, Counter { seq }).await.unwrap();
        } else {
            on_d.put(&id, Counter { seq }).await.unwrap();
        }
        newest.insert(id, seq);
    }
    until("D flushed its writes", || {
        d.stats().store_writes >= 20 && on_d.pending() == 0
    })
    .await;
    probe.release();
    on_c.shutdown().await;
    on_d.shutdown().await;
    for (id, seq) in &newest {
        assert_eq!(
            stored(&probe.table, id).await,
            Some(Counter { seq: *seq }),
            "id {id}"
        );
    }
    assert_eq!(
        c.stats().write_dead_letters + d.stats().write_dead_letters,
        0
    );
}
