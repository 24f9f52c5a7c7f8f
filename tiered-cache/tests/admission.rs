//! `L1Admission::SecondRead`: a value read from Redis goes into L1 on its
//! second read within the doorkeeper's window, not its first; what this
//! instance loads or writes goes in at once; an admitted copy is kept
//! coherent like any other; a key back after the window is a first read
//! again. Against a real Redis, with another instance as the writer.

mod support;

use std::time::Duration;

use support::{builder_on, cache_on, counter, counting, item, opts, server, until_within};
use tiered_cache::{L1Admission, TieredCache};

async fn second_read_cache(server: &tiered_cache::testkit::RedisServer, ns: &str) -> TieredCache {
    builder_on(server, ns)
        .require_l2(true)
        .l1_admission(L1Admission::SecondRead)
        .build()
        .await
        .expect("cache on the test Redis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_read_from_redis_enters_l1_on_its_second_read() {
    let server = server();
    let writer = cache_on(&server, "adm1").await;
    let key = item::<String>(1);
    writer
        .set(&key, "v1".to_owned(), &opts())
        .await
        .expect("set");
    // Built after the writes it reads: no backplane message of theirs can
    // arrive late and drop what it keeps.
    let reader = second_read_cache(&server, "adm1").await;

    for read in 1..=3 {
        assert_eq!(
            reader.get(&key).await.as_deref().map(String::as_str),
            Some("v1"),
            "read {read}"
        );
    }
    let s = reader.stats();
    assert_eq!(
        (s.l2_hits, s.l1_hits, s.promotions_deferred),
        (2, 1, 1),
        "first read: Redis, not kept; second: Redis, kept; third: L1"
    );

    // The admitted copy follows the writer's overwrite (backplane).
    writer
        .set(&key, "v2".to_owned(), &opts())
        .await
        .expect("overwrite");
    let mut seen = None;
    for _ in 0..200 {
        seen = reader.get(&key).await;
        if seen.as_deref().map(String::as_str) == Some("v2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        seen.as_deref().map(String::as_str),
        Some("v2"),
        "the overwrite reached the admitted copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_kept_on_its_second_read_and_served_from_l1_on_its_third() {
    let server = server();
    let writer = cache_on(&server, "adm2").await;
    let keys: Vec<_> = (0..100).map(item::<String>).collect();
    for (i, key) in keys.iter().enumerate() {
        writer
            .set(key, format!("v{i}"), &opts())
            .await
            .expect("set");
    }
    let reader = second_read_cache(&server, "adm2").await;
    let want: Vec<Option<String>> = (0..100).map(|i| Some(format!("v{i}"))).collect();
    for round in 1..=3 {
        let got: Vec<Option<String>> = reader
            .get_many(&keys)
            .await
            .into_iter()
            .map(|v| v.map(|v| (*v).clone()))
            .collect();
        assert_eq!(got, want, "round {round}");
    }
    let s = reader.stats();
    assert_eq!(
        (s.l2_hits, s.l1_hits, s.promotions_deferred),
        (200, 100, 100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_and_written_values_enter_l1_at_once() {
    let server = server();
    let cache = second_read_cache(&server, "adm3").await;
    let calls = counter();
    let loaded = item::<String>(1);
    let v = cache
        .get_or_load(&loaded, &opts(), counting(&calls, "loaded".to_owned()))
        .await
        .expect("load");
    assert_eq!(*v, "loaded");
    let written = item::<String>(2);
    cache
        .set(&written, "written".to_owned(), &opts())
        .await
        .expect("set");
    assert!(cache.get(&loaded).await.is_some());
    assert!(cache.get(&written).await.is_some());
    let s = cache.stats();
    assert_eq!((s.l1_hits, s.l2_hits, s.promotions_deferred), (2, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_back_after_the_window_is_a_first_read_again() {
    let server = server();
    let writer = cache_on(&server, "adm4").await;
    let keys: Vec<_> = (0..4_200).map(item::<String>).collect();
    for key in &keys {
        writer.set(key, "v".to_owned(), &opts()).await.expect("set");
    }
    // A small L1: the window is its least, 4,096 keys.
    let reader = builder_on(&server, "adm4")
        .require_l2(true)
        .l1_max_bytes(1 << 20)
        .l1_admission(L1Admission::SecondRead)
        .build()
        .await
        .expect("cache");
    // Key 0, then 4,199 other keys once each: the window fills and clears.
    // (A few of its keys may be admitted early: the doorkeeper's false
    // positives.)
    for chunk in keys.chunks(100) {
        assert!(reader.get_many(chunk).await.iter().all(Option::is_some));
    }
    let before = reader.stats();
    for _ in 0..3 {
        assert!(reader.get(&keys[0]).await.is_some());
    }
    let s = reader.stats();
    assert_eq!(
        (
            s.promotions_deferred - before.promotions_deferred,
            s.l2_hits - before.l2_hits,
            s.l1_hits - before.l1_hits
        ),
        (1, 2, 1),
        "key 0 was forgotten with its window, then kept on its next second read"
    );
    assert!(
        before.promotions_deferred > 3_900,
        "the scan was kept out of L1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_between_the_two_reads_is_what_l1_keeps() {
    let server = server();
    let writer = cache_on(&server, "adm5").await;
    let key = item::<String>(1);
    writer
        .set(&key, "old".to_owned(), &opts())
        .await
        .expect("set");
    let reader = second_read_cache(&server, "adm5").await;
    assert_eq!(
        reader.get(&key).await.as_deref().map(String::as_str),
        Some("old")
    );
    writer
        .set(&key, "new".to_owned(), &opts())
        .await
        .expect("overwrite");
    // Delivered before the second read (a message that came after it would
    // drop the kept copy, rightly, and the third read would go to Redis).
    until_within(Duration::from_secs(5), "the overwrite's message", || {
        reader.stats().invalidations_received >= 1
    })
    .await;
    // The second read is the one kept: it must keep the new value.
    for read in 2..=3 {
        assert_eq!(
            reader.get(&key).await.as_deref().map(String::as_str),
            Some("new"),
            "read {read}"
        );
    }
    let s = reader.stats();
    assert_eq!((s.l2_hits, s.l1_hits, s.promotions_deferred), (2, 1, 1));
}
