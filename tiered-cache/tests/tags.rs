//! Tag invalidation when things go wrong: a bump Redis could not take, and
//! a fleet that sees millions of distinct tags. Each test runs on a Redis
//! of its own and on a Redis Cluster, where a tag's counter and its entries
//! live in different slots.

mod support;

use std::time::Duration;

use support::{builder_on, item, Backend, TestRedis};
use tiered_cache::{EntryOptions, Key};

crate::on_both_backends!(
    a_failed_tag_bump_drops_what_is_there_and_nothing_later,
    many_distinct_tags_stay_correct_as_the_tables_are_bounded,
    get_many_reads_the_tag_versions_of_a_batch_in_one_round_trip,
);

/// [`support::opts`] with the tag "products".
fn products() -> EntryOptions {
    support::opts().tag("products")
}

/// A bump that fails (Redis paused) drops the tag's entries from L1, as it
/// must, but the entries written after it are cached in L1 as usual: the
/// failure does not keep the tag out of L1 until a restart.
async fn a_failed_tag_bump_drops_what_is_there_and_nothing_later(backend: &Backend) {
    let cache = builder_on(backend, "tags-failed")
        .l2_timeout(Duration::from_millis(100))
        .build()
        .await
        .expect("build");
    cache
        .set(&item::<u64>(1), 1, &products())
        .await
        .expect("set");

    backend.pause();
    assert!(
        cache.invalidate_tag("products").await.is_err(),
        "Redis could not be told"
    );
    let before = cache.stats();
    let _ = cache.get(&item::<u64>(1)).await; // Redis is paused: a miss, not the old L1 entry
    assert_eq!(
        cache.stats().l1_hits,
        before.l1_hits,
        "the tag's entry left L1"
    );
    backend.resume();
    // One timeout does not open the breaker (5 in a row do): Redis is used
    // again at once; the pause only lets the late replies drain.
    tokio::time::sleep(Duration::from_millis(600)).await;

    cache
        .set(&item::<u64>(2), 2, &products())
        .await
        .expect("set");
    let before = cache.stats();
    for _ in 0..10 {
        assert_eq!(cache.get(&item::<u64>(2)).await.as_deref(), Some(&2));
    }
    let after = cache.stats();
    assert_eq!(after.l1_hits - before.l1_hits, 10, "{after:?}");
}

/// Per-entity tags (`user:{id}`): more distinct tags invalidated than L1
/// keeps floors for. The tables stay bounded (unit tests in l1.rs and
/// tags.rs count them with a million tags); here, against Redis, what
/// matters to a user: an entry of an early-invalidated tag stays a miss,
/// and entries written afterwards are L1 hits.
async fn many_distinct_tags_stay_correct_as_the_tables_are_bounded(backend: &Backend) {
    let cache = builder_on(backend, "tags-many")
        .build()
        .await
        .expect("build");
    let user = |id: u64| EntryOptions::new(Duration::from_secs(300)).tag(format!("user:{id}"));
    cache.set(&item(0), 0, &user(0)).await.expect("set");
    for id in 0..12_000 {
        cache
            .invalidate_tag(&format!("user:{id}"))
            .await
            .expect("invalidate_tag");
    }
    assert_eq!(
        cache.get(&item::<u64>(0)).await,
        None,
        "invalidated first, still a miss"
    );
    cache.set(&item(1), 1, &user(1)).await.expect("set");
    let before = cache.stats();
    for _ in 0..10 {
        assert_eq!(cache.get(&item(1)).await.as_deref(), Some(&1));
    }
    assert_eq!(cache.stats().l1_hits - before.l1_hits, 10);
}

/// With the backplane off, tag versions are read from Redis before an entry
/// read from Redis is judged. A batch of 50 entries with 50 distinct tags
/// reads them in one MGET, not one per entry (on a cluster, one MGET is
/// one per slot of its keys: redis-rs splits it, and never sends a
/// CROSSSLOT one).
async fn get_many_reads_the_tag_versions_of_a_batch_in_one_round_trip(backend: &Backend) {
    let writer = builder_on(backend, "tags-batch")
        .build()
        .await
        .expect("build");
    let keys: Vec<Key<u64>> = (0..50).map(item).collect();
    for (id, key) in (0..50).zip(&keys) {
        let opts = EntryOptions::new(Duration::from_secs(300)).tag(format!("category:{id}"));
        writer.set(key, id, &opts).await.expect("set");
    }
    let reader = builder_on(backend, "tags-batch")
        .backplane(false)
        .build()
        .await
        .expect("build");
    support::reset_command_stats(backend);
    let got = reader.get_many(&keys).await;
    assert!(got.iter().all(Option::is_some), "{:?}", reader.stats());
    assert_eq!(reader.stats().l2_errors, 0, "{:?}", reader.stats());
    let entries: Vec<String> = keys
        .iter()
        .map(|key| support::redis_key("tags-batch", key))
        .collect();
    // The namespace's epoch, read beside the entries, and the tags'
    // counters (`tags.rs`, `tag_key`).
    let epoch = ["tags-batch:#epoch".to_owned()];
    let counters: Vec<String> = (0..50)
        .map(|id| format!("tags-batch:#tag:category%3A{id}"))
        .collect();
    assert_eq!(
        support::command_calls(backend, "mget"),
        backend.mgets_for(&entries) + backend.mgets_for(&epoch) + backend.mgets_for(&counters),
        "one MGET for the entries with the epoch's beside it, one for all their tags"
    );
}

/// With the backplane off, this instance cannot vouch for the namespace
/// epoch, which every entry carries: a read from Redis reads its version
/// after the entry in the same pipeline, so an entry without tags of its
/// own costs one round trip (counted as the request chunks a proxy passes
/// on), on every read path; one with a tag of its own needs a second for
/// that tag. And the version read beside is the one used: after another
/// instance clears the namespace, the entry still in Redis is a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_backplane_an_untagged_read_is_one_round_trip() {
    let server = support::server();
    let proxy = support::SlowProxy::start(&server).await;
    let writer = builder_on(&server, "one-trip")
        .build()
        .await
        .expect("build");
    let plain: Vec<Key<u64>> = (0..10).map(item).collect();
    for (id, key) in (0..10).zip(&plain) {
        writer.set(key, id, &support::opts()).await.expect("set");
    }
    let tagged = item::<u64>(100);
    writer.set(&tagged, 100, &products()).await.expect("set");
    let reader = tiered_cache::TieredCache::builder()
        .namespace("one-trip")
        .redis(proxy.url())
        .backplane(false)
        .l1_max_bytes(0) // every read goes to Redis
        .build()
        .await
        .expect("build");
    assert_eq!(reader.get(&plain[0]).await, Some(std::sync::Arc::new(0)));
    let trips = |before: u64| proxy.requests_sent() - before;

    let before = proxy.requests_sent();
    assert_eq!(reader.get(&plain[1]).await.as_deref(), Some(&1));
    assert_eq!(trips(before), 1, "get of an untagged entry");

    let before = proxy.requests_sent();
    let got = reader.get_many(&plain).await;
    assert!(got.iter().all(Option::is_some), "{:?}", reader.stats());
    assert_eq!(trips(before), 1, "get_many of untagged entries");

    let before = proxy.requests_sent();
    let loaded = reader
        .get_or_load(&plain[2], &support::opts(), || async {
            Ok::<u64, support::DbError>(999)
        })
        .await
        .expect("get_or_load");
    assert_eq!(*loaded, 2, "the entry in Redis, not the loader's");
    assert_eq!(trips(before), 1, "get_or_load of an untagged entry");

    let before = proxy.requests_sent();
    assert_eq!(reader.get(&tagged).await.as_deref(), Some(&100));
    assert_eq!(trips(before), 2, "an entry with a tag of its own");

    // A write whose copy goes into L1: the stamps' versions are read
    // before it (they go into the envelope) and again right after it, in
    // the script's round trip, to judge the copy.
    let lone_writer = tiered_cache::TieredCache::builder()
        .namespace("one-trip")
        .redis(proxy.url())
        .backplane(false)
        .build()
        .await
        .expect("build");
    lone_writer
        .set(&plain[4], 40, &support::opts())
        .await
        .expect("warm up");
    for (key, opts) in [(&plain[5], support::opts()), (&tagged, products())] {
        let before = proxy.requests_sent();
        lone_writer.set(key, 50, &opts).await.expect("set");
        assert_eq!(
            trips(before),
            2,
            "a set: the stamps, then the write and its check"
        );
        let hits = lone_writer.stats().l1_hits;
        assert_eq!(lone_writer.get(key).await.as_deref(), Some(&50));
        assert_eq!(
            lone_writer.stats().l1_hits,
            hits + 1,
            "the copy was judged current"
        );
    }

    writer.clear().await.expect("clear");
    assert_eq!(
        reader.get(&plain[3]).await,
        None,
        "stamped before the clear: stale, by the epoch read beside it"
    );
    assert_eq!(reader.stats().l2_errors, 0, "{:?}", reader.stats());
    assert_eq!(
        lone_writer.stats().l2_errors,
        0,
        "{:?}",
        lone_writer.stats()
    );
}
