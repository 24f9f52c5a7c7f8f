//! Tag invalidation when things go wrong: a bump Redis could not take, and
//! a fleet that sees millions of distinct tags.

mod support;

use std::time::Duration;

use support::{builder_on, item, server};
use tiered_cache::EntryOptions;

/// [`support::opts`] with the tag "products".
fn products() -> EntryOptions {
    support::opts().tag("products")
}

/// A bump that fails (Redis paused) drops the tag's entries from L1, as it
/// must, but the entries written after it are cached in L1 as usual: the
/// failure does not keep the tag out of L1 until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tag_bump_drops_what_is_there_and_nothing_later() {
    let server = server();
    let cache = builder_on(&server, "tags-failed")
        .l2_timeout(Duration::from_millis(100))
        .build()
        .await
        .expect("build");
    cache
        .set(&item::<u64>(1), 1, &products())
        .await
        .expect("set");

    server.pause().expect("SIGSTOP");
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
    server.resume().expect("SIGCONT");
    // The tier rests 500 ms after a timeout, then uses Redis again.
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
