//! The two tiers against a real Redis: read order and promotion, TTLs in both
//! tiers, the L1 bound and cap, invalidation, and how keys look in Redis.
//!
//! Every test starts its own `redis-server` (testkit) and counts what
//! happened: the cache's stats, loader calls, and Redis's own state.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    builder_on, cache_on, command_calls, conn, exists, key, load, product, redis_key,
    reset_command_stats, server, until_within, Product,
};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, TieredCache};

fn pttl(server: &RedisServer, redis_key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(redis_key)
        .query(&mut conn(server))
        .expect("PTTL")
}

#[tokio::test]
async fn reads_go_l1_then_l2_then_loader_and_l2_hits_are_promoted() {
    let server = server();
    let a = cache_on(&server, "t").await;
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));

    a.set(&key(1), product(1), &opts).await.unwrap();
    assert!(
        exists(&server, &redis_key("t", &key(1))),
        "set writes Redis"
    );
    // Built after the write, so A's message about it (backplane) cannot
    // drop what B promotes below.
    let b = cache_on(&server, "t").await;

    // B's L1 is empty: the first read is answered by Redis...
    assert_eq!(b.get(&key(1)).await.as_deref(), Some(&product(1)));
    let s = b.stats();
    assert_eq!((s.l1_hits, s.l2_hits, s.misses), (0, 1, 0));
    // ...and promoted, so the second is answered by B's L1.
    assert_eq!(b.get(&key(1)).await.as_deref(), Some(&product(1)));
    let s = b.stats();
    assert_eq!((s.l1_hits, s.l2_hits, s.misses), (1, 1, 0));
    // A wrote it, so A reads its own L1.
    assert_eq!(a.get(&key(1)).await.as_deref(), Some(&product(1)));
    assert_eq!((a.stats().l1_hits, a.stats().l2_hits), (1, 0));

    // A key in neither tier goes to the loader once; then L1; then, from a
    // third instance, Redis: the loader is not run again.
    let calls = Arc::new(AtomicUsize::new(0));
    let v = load(&b, &key(2), &opts, &calls, product(2)).await;
    assert_eq!(*v, product(2));
    let v = load(&b, &key(2), &opts, &calls, product(99)).await;
    assert_eq!(*v, product(2));
    let s = b.stats();
    assert_eq!((s.l1_hits, s.l2_hits, s.misses, s.loads), (2, 1, 1, 1));
    let c = cache_on(&server, "t").await;
    let v = load(&c, &key(2), &opts, &calls, product(99)).await;
    assert_eq!(*v, product(2));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the loader ran once in all"
    );
    let s = c.stats();
    assert_eq!((s.l1_hits, s.l2_hits, s.misses, s.loads), (0, 1, 0, 0));
}

#[tokio::test]
async fn sub_second_ttls_expire_in_both_tiers() {
    let server = server();
    let a = cache_on(&server, "t").await;
    let b = cache_on(&server, "t").await;
    let ttl = EntryOptions::new(Duration::from_millis(400));

    a.set(&key(1), product(1), &ttl).await.unwrap();
    let rk = redis_key("t", &key(1));
    let left = pttl(&server, &rk);
    assert!(
        left > 0 && left <= 400,
        "Redis got a millisecond TTL, PTTL = {left}"
    );
    // Once A's message about the write has reached B (it would drop what B
    // promotes), B promotes it into its L1 (with what is left of the
    // 400 ms), and reads it from moka, then from L1's front table.
    until_within(Duration::from_secs(5), "A's message", || {
        b.stats().invalidations_received >= 1
    })
    .await;
    for _ in 0..3 {
        assert!(b.get(&key(1)).await.is_some());
    }
    assert_eq!((b.stats().l1_hits, b.stats().l2_hits), (2, 1));

    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!exists(&server, &rk), "Redis expired the entry");
    assert!(a.get(&key(1)).await.is_none(), "A's L1 expired too");
    assert!(b.get(&key(1)).await.is_none(), "B's L1 expired too");
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.l1_hits, sa.l2_hits, sa.misses), (0, 0, 1));
    assert_eq!((sb.l1_hits, sb.l2_hits, sb.misses), (2, 1, 1));

    // get_or_load with a sub-second TTL loads again after expiry.
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let v = load(&a, &key(2), &ttl, &calls, product(2)).await;
        assert_eq!(*v, product(2));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let left = pttl(&server, &redis_key("t", &key(2)));
    assert!(left > 0 && left <= 400, "PTTL = {left}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    load(&a, &key(2), &ttl, &calls, product(2)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "expired, so loaded again");
}

#[tokio::test]
async fn promotion_keeps_the_remaining_ttl() {
    let server = server();
    let a = cache_on(&server, "t").await;
    let b = cache_on(&server, "t").await;
    let rk = redis_key("t", &key(1));

    let written = Instant::now();
    a.set(
        &key(1),
        product(1),
        &EntryOptions::new(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(b.get(&key(1)).await.is_some());
    assert_eq!(b.stats().l2_hits, 1, "promoted from Redis after ~1 s");
    // From here on only B's L1 can answer.
    let _: u64 = redis::cmd("DEL")
        .arg(&rk)
        .query(&mut conn(&server))
        .unwrap();

    tokio::time::sleep_until((written + Duration::from_millis(1400)).into()).await;
    assert!(b.get(&key(1)).await.is_some(), "still in B's L1 at 1.4 s");
    assert_eq!(b.stats().l1_hits, 1);

    // The entry's deadline is 2 s after the write; a promotion with a full
    // TTL would keep it in B's L1 until ~3 s.
    tokio::time::sleep_until((written + Duration::from_millis(2400)).into()).await;
    assert!(
        b.get(&key(1)).await.is_none(),
        "B's L1 dropped it at the original deadline"
    );
    let s = b.stats();
    assert_eq!((s.l1_hits, s.l2_hits, s.misses), (1, 1, 1));
}

#[tokio::test]
async fn without_redis_the_cache_is_l1_only() {
    let cache = TieredCache::builder().build().await.unwrap();
    assert!(!cache.has_l2());
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));

    assert!(cache.get(&key(1)).await.is_none());
    cache.set(&key(1), product(1), &opts).await.unwrap();
    assert_eq!(cache.get(&key(1)).await.as_deref(), Some(&product(1)));

    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let v = load(&cache, &key(2), &opts, &calls, product(2)).await;
        assert_eq!(*v, product(2));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    cache.invalidate(&key(1)).await.unwrap();
    assert!(cache.get(&key(1)).await.is_none());

    // A sub-second TTL expires in L1 alone, too.
    cache
        .set(
            &key(3),
            product(3),
            &EntryOptions::new(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    assert!(cache.get(&key(3)).await.is_some());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(cache.get(&key(3)).await.is_none());

    let s = cache.stats();
    assert_eq!(
        (s.l1_hits, s.l2_hits, s.misses, s.loads),
        (1 + 2 + 1, 0, 1 + 1 + 1 + 1, 1)
    );
    assert_eq!((s.l2_errors, s.l2_skipped), (0, 0));
}

#[tokio::test]
async fn l1_max_bytes_zero_turns_l1_off() {
    let server = server();
    let cache = builder_on(&server, "t")
        .l1_max_bytes(0)
        .build()
        .await
        .unwrap();
    cache
        .set(
            &key(1),
            product(1),
            &EntryOptions::new(Duration::from_secs(5 * 60)),
        )
        .await
        .unwrap();
    reset_command_stats(&server);

    for _ in 0..5 {
        assert_eq!(cache.get(&key(1)).await.as_deref(), Some(&product(1)));
    }
    let s = cache.stats();
    assert_eq!((s.l1_hits, s.l2_hits), (0, 5));
    assert_eq!(command_calls(&server, "get"), 5, "every read went to Redis");
    assert_eq!(cache.l1_weighted_size().await, 0);

    // get_or_load also reads Redis every time and loads nothing.
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        load(
            &cache,
            &key(1),
            &EntryOptions::new(Duration::from_secs(5 * 60)),
            &calls,
            product(9),
        )
        .await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(cache.stats().l2_hits, 8);
    // A load's read also reads the entry's version: one MGET of both.
    assert_eq!(command_calls(&server, "get"), 5);
    assert_eq!(command_calls(&server, "mget"), 3);
}

#[tokio::test]
async fn l1_stays_within_its_byte_bound() {
    const BOUND: u64 = 256 * 1024;
    let cache = TieredCache::builder()
        .l1_max_bytes(BOUND)
        .build()
        .await
        .unwrap();
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));
    let value = "x".repeat(200);
    // 10x the bound in value bytes alone.
    let n = (10 * BOUND / 200) as usize;
    let mut max_seen = 0;
    for i in 0..n {
        let key = Key::<String>::new("blob", 1).arg(i);
        cache.set(&key, value.clone(), &opts).await.unwrap();
        if i % 1000 == 999 {
            max_seen = max_seen.max(cache.l1_weighted_size().await);
        }
    }
    let end = cache.l1_weighted_size().await;
    max_seen = max_seen.max(end);
    println!(
        "bound {BOUND} B, {n} values of 200 B: weighted size at end {end} B, max seen {max_seen} B"
    );
    assert!(
        max_seen <= BOUND + BOUND / 10,
        "L1 grew past its bound: {max_seen} > {BOUND} + 10%"
    );
    assert!(
        end >= BOUND / 2,
        "L1 should be filled, not emptied: {end} B of {BOUND} B"
    );
    // Something was evicted: not every value can be in L1.
    let mut present = 0;
    for i in 0..n {
        if cache
            .get(&Key::<String>::new("blob", 1).arg(i))
            .await
            .is_some()
        {
            present += 1;
        }
    }
    assert!(present < n / 5, "{present} of {n} entries still in L1");
}

/// A ~200-byte struct with strings, as `Product` in the benches.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Row {
    id: u64,
    sku: String,
    description: String,
    price_cents: u64,
    tags: Vec<String>,
}

fn row(i: u64) -> Row {
    Row {
        id: i,
        sku: format!("SKU-{i:08}"),
        description: format!("A warm-white LED desk lamp with a weighted base, batch {i:06}."),
        price_cents: 1_999 + i % 5_000,
        tags: vec!["lighting".into(), format!("cat-{}", i % 97)],
    }
}

/// Fills an L1-only cache bounded at `bound` with ten times its bound in
/// entry weight; returns the weight of one entry.
async fn overfill<V, F>(shape: &str, bound: u64, make: F) -> u64
where
    V: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    F: Fn(u64) -> V,
{
    let cache = TieredCache::builder()
        .l1_max_bytes(bound)
        .build()
        .await
        .unwrap();
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));
    let key = |i: u64| Key::<V>::new(shape, 1).arg(format!("{i:07}"));
    cache.set(&key(0), make(0), &opts).await.unwrap();
    let one = cache.l1_weighted_size().await;
    let n = 10 * bound / one;
    let mut max_seen = 0;
    for i in 1..n {
        cache.set(&key(i), make(i), &opts).await.unwrap();
        if i % 1000 == 0 {
            max_seen = max_seen.max(cache.l1_weighted_size().await);
        }
    }
    let end = cache.l1_weighted_size().await;
    max_seen = max_seen.max(end);
    println!("{shape}: {n} entries of {one} B into {bound} B: {end} B at end, {max_seen} B max");
    assert!(
        max_seen <= bound + bound / 10,
        "{shape}: L1 grew past its bound: {max_seen} > {bound} + 10%"
    );
    assert!(
        end >= bound - bound / 10,
        "{shape}: L1 should stay full: {end} B of {bound} B"
    );
    one
}

/// P12: an entry weighs what its decoded value holds in memory (not its
/// encoding, which is several times smaller for small numbers), and at
/// ten times overfill the weighted size stays within 10% of the bound.
/// (RSS against the bound is measured by the `l1_memory` bench.)
#[tokio::test]
async fn l1_weighs_values_in_memory_and_holds_its_bound_at_10x_overfill() {
    const BOUND: u64 = 2 << 20;
    let one = overfill("row", BOUND, row).await;
    // The Arc'd struct (104 B) and five strings alone come to over 400 B.
    assert!(one > 400 + 600, "a row weighs {one} B");
    let one = overfill("ints", BOUND, |i| {
        (0..100).map(|j| (i + j) % 128).collect::<Vec<u64>>()
    })
    .await;
    // 100 bytes encoded, 800 in memory.
    assert!(one > 800 + 600, "100 u64s weigh {one} B");
    let one = overfill("map", BOUND, |i| {
        (0..16)
            .map(|j| (format!("field-{j:02}"), (i + j) as u32))
            .collect::<std::collections::HashMap<String, u32>>()
    })
    .await;
    // A 32-bucket table of 32-byte slots and 16 string blocks.
    assert!(
        one > 32 * 33 + 16 * 32 + 600,
        "a 16-entry map weighs {one} B"
    );
}

/// A value promoted from Redis weighs what the same value set locally does.
#[tokio::test]
async fn a_promoted_entry_weighs_what_a_set_one_does() {
    let server = server();
    let a = cache_on(&server, "w").await;
    let key = Key::<Vec<u64>>::new("ints", 1).arg(7);
    let value: Vec<u64> = (0..100).collect();
    a.set(&key, value, &EntryOptions::new(Duration::from_secs(60)))
        .await
        .unwrap();
    let b = cache_on(&server, "w").await;
    assert!(b.get(&key).await.is_some());
    assert_eq!(b.stats().l2_hits, 1);
    assert_eq!(b.l1_weighted_size().await, a.l1_weighted_size().await);
}

#[tokio::test]
async fn l1_ttl_cap_shortens_l1_but_not_redis() {
    let server = server();
    let a = cache_on(&server, "t").await;
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));
    a.set(&key(1), product(1), &opts).await.unwrap();
    // Built after A's write, as in the first test.
    let b = builder_on(&server, "t")
        .l1_ttl_cap(Duration::from_millis(300))
        .build()
        .await
        .unwrap();

    assert!(b.get(&key(1)).await.is_some()); // L2, promoted
    assert!(b.get(&key(1)).await.is_some()); // L1 (moka)
    assert!(b.get(&key(1)).await.is_some()); // L1 (its front table)
    assert_eq!((b.stats().l1_hits, b.stats().l2_hits), (2, 1));
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(b.get(&key(1)).await.is_some()); // L1 capped: Redis again
    assert_eq!((b.stats().l1_hits, b.stats().l2_hits), (2, 2));

    // The cap applies to B's own writes too; Redis keeps the full TTL.
    b.set(&key(2), product(2), &opts).await.unwrap();
    assert!(b.get(&key(2)).await.is_some());
    assert!(b.get(&key(2)).await.is_some());
    assert_eq!((b.stats().l1_hits, b.stats().l2_hits), (4, 2));
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(b.get(&key(2)).await.is_some());
    assert_eq!((b.stats().l1_hits, b.stats().l2_hits), (4, 3));
    assert!(pttl(&server, &redis_key("t", &key(2))) > 60_000);
}

/// The cap shortens an entry's stay in L1, not its freshness: reads of a
/// key with a long TTL through a short cap re-read Redis after each cap,
/// but never count as near expiry (no early refresh, no load), even when
/// the reading task stalls longer than the cap between promotion and use.
#[tokio::test]
async fn l1_ttl_cap_does_not_make_entries_look_near_expiry() {
    let server = server();
    let cache = builder_on(&server, "t")
        .l1_ttl_cap(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    let opts = EntryOptions::new(Duration::from_secs(5 * 60)); // XFetch on, beta 1
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_millis(600) {
        // A loader of 15 ms: XFetch refreshes within about that of expiry.
        let counted = Arc::clone(&calls);
        let v = cache
            .get_or_load(&key(1), &opts, move || async move {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
                Ok::<_, std::io::Error>(product(1))
            })
            .await
            .unwrap();
        assert_eq!(v.id, 1);
        reads += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // `get` of a value just promoted, checked after a stall past the cap.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(cache.get(&key(1)).await.is_some(), "fresh in Redis");
    }
    let s = cache.stats();
    println!("{reads} reads through a 20 ms L1 cap: {s:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one load, no refresh");
    assert_eq!(s.early_refreshes, 0, "{s:?}");
    assert!(s.l2_hits >= 10, "the cap sent reads to Redis: {s:?}");
}

#[tokio::test]
async fn invalidate_removes_from_both_tiers() {
    let server = server();
    let a = cache_on(&server, "t").await;
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));
    a.set(&key(1), product(1), &opts).await.unwrap();
    let rk = redis_key("t", &key(1));
    assert!(exists(&server, &rk));

    a.invalidate(&key(1)).await.unwrap();
    assert!(!exists(&server, &rk), "gone from Redis");
    assert!(a.get(&key(1)).await.is_none(), "gone from L1");
    let fresh = cache_on(&server, "t").await;
    assert!(fresh.get(&key(1)).await.is_none());
    assert_eq!((a.stats().l1_hits, a.stats().misses), (0, 1));

    // A loading read after the invalidation runs the loader again.
    let calls = Arc::new(AtomicUsize::new(0));
    let v = load(&a, &key(1), &opts, &calls, product(10)).await;
    assert_eq!(v.id, 10);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_namespace_prefixes_every_redis_key() {
    let server = server();
    let orders = cache_on(&server, "orders").await;
    let billing = cache_on(&server, "billing").await;
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));
    orders.set(&key(1), product(1), &opts).await.unwrap();
    orders.set(&key(2), product(2), &opts).await.unwrap();
    billing.set(&key(1), product(100), &opts).await.unwrap();

    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut conn(&server))
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        // Each entry and its version counter.
        vec![
            "billing:{product:v1:1}".to_owned(),
            "billing:{product:v1:1}#v".to_owned(),
            "orders:{product:v1:1}".to_owned(),
            "orders:{product:v1:1}#v".to_owned(),
            "orders:{product:v1:2}".to_owned(),
            "orders:{product:v1:2}#v".to_owned(),
        ]
    );
    // Same key, different namespaces: different entries.
    let fresh_orders = cache_on(&server, "orders").await;
    assert_eq!(fresh_orders.get(&key(1)).await.unwrap().id, 1);
    let fresh_billing = cache_on(&server, "billing").await;
    assert_eq!(fresh_billing.get(&key(1)).await.unwrap().id, 100);
    assert!(fresh_billing.get(&key(2)).await.is_none());
}

#[tokio::test]
async fn oversized_values_stay_in_l1_only() {
    let server = server();
    let a = builder_on(&server, "t")
        .max_value_bytes(1024)
        .build()
        .await
        .unwrap();
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));
    let big = Key::<String>::new("blob", 1).arg("big");
    let small = Key::<String>::new("blob", 1).arg("small");

    a.set(&big, "x".repeat(4096), &opts).await.unwrap();
    a.set(&small, "x".repeat(100), &opts).await.unwrap();
    assert_eq!(a.stats().oversized_skips, 1);
    assert_eq!(a.stats().l2_errors, 0, "skipping is not a failure");
    assert!(!exists(&server, &redis_key("t", &big)));
    assert!(exists(&server, &redis_key("t", &small)));

    assert_eq!(a.get(&big).await.map(|v| v.len()), Some(4096), "kept in L1");
    let b = cache_on(&server, "t").await;
    assert!(b.get(&big).await.is_none());
    assert!(b.get(&small).await.is_some());

    // A loaded value over the limit is returned and skipped the same way.
    let huge = Key::<String>::new("blob", 1).arg("loaded");
    let v = a
        .get_or_load(&huge, &opts, || async {
            Ok::<_, std::io::Error>("y".repeat(8192))
        })
        .await
        .unwrap();
    assert_eq!(v.len(), 8192);
    assert_eq!(a.stats().oversized_skips, 2);
    assert!(!exists(&server, &redis_key("t", &huge)));
}

#[tokio::test]
async fn a_redis_key_carries_its_entry_hash_tag() {
    let server = server();
    // A cluster-enabled node only to ask Redis itself for key slots.
    let slots = RedisServer::start_with(&["--cluster-enabled", "yes"]).unwrap();
    let keyslot = |k: &str| -> u64 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(k)
            .query(&mut conn(&slots))
            .unwrap()
    };

    let cache = cache_on(&server, "t").await;
    // Braces in arguments must not end or open the hash tag.
    let k = Key::<Product>::new("product", 1).arg("a}b").arg("{c");
    cache
        .set(
            &k,
            product(1),
            &EntryOptions::new(Duration::from_secs(5 * 60)),
        )
        .await
        .unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut conn(&server))
        .unwrap();
    keys.sort();
    assert_eq!(keys.len(), 2, "the entry and its version: {keys:?}");
    let stored = &keys[0];
    assert_eq!(keys[1], format!("{stored}#v"));
    assert_eq!(stored, &format!("t:{}", k.as_str()));
    let open = stored.find('{').unwrap();
    let close = open + stored[open..].find('}').unwrap();
    assert_eq!(
        &stored[open..=close],
        k.as_str(),
        "the whole body is the tag"
    );
    assert_eq!(stored.matches(['{', '}']).count(), 2);

    // Redis hashes only the tag: auxiliary keys of the entry and the same
    // entry in another namespace share its slot.
    let tag = &stored[open + 1..close];
    let slot = keyslot(stored);
    assert_eq!(slot, keyslot(tag));
    assert_eq!(slot, keyslot(&keys[1]), "the version counter");
    assert_eq!(slot, keyslot(&format!("{stored}:lock")));
    assert_eq!(slot, keyslot(&format!("other:{}:meta", k.as_str())));
}

/// An L1 hit hands out the very `Arc` that was stored: no decode, no copy,
/// whether the value came from a load, a `set` or a promotion from Redis.
#[tokio::test]
async fn an_l1_hit_is_the_stored_arc_not_a_copy() {
    let server = server();
    let (a, b) = (
        cache_on(&server, "arc").await,
        cache_on(&server, "arc").await,
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let opts = EntryOptions::new(Duration::from_secs(60));

    let loaded = load(&a, &key(1), &opts, &calls, product(1)).await;
    let hit = a.get(&key(1)).await.expect("hit");
    assert!(
        Arc::ptr_eq(&loaded, &hit),
        "a hit after a load is the loaded Arc"
    );

    a.set(&key(2), product(2), &opts).await.expect("set");
    let (x, y) = (a.get(&key(2)).await.unwrap(), a.get(&key(2)).await.unwrap());
    assert!(Arc::ptr_eq(&x, &y), "two hits after a set share one Arc");

    // Let A's message about its set reach B first, or it would (rightly)
    // drop what B promotes.
    support::until("B hears of A's set", || {
        b.stats().invalidations_received >= 1
    })
    .await;
    let promoted = b.get(&key(2)).await.expect("from Redis");
    let again = b.get(&key(2)).await.expect("from L1");
    assert!(
        Arc::ptr_eq(&promoted, &again),
        "the promoted value is decoded once"
    );
    let stats = b.stats();
    assert_eq!((stats.l2_hits, stats.l1_hits), (1, 1), "{stats:?}");
}

/// A key read back to back (so L1's front table answers it) is still
/// reloaded as its TTL passes, and a write or an invalidation in between
/// shows on the next read: nothing in L1 pins an entry.
#[tokio::test]
async fn a_hot_key_follows_its_ttl_writes_and_invalidations() {
    let server = server();
    let cache = cache_on(&server, "hot").await;
    let opts = EntryOptions::new(Duration::from_millis(100));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut ids = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1_000) {
        let next = calls.load(Ordering::SeqCst) as u64 + 1;
        let v = load(&cache, &key(1), &opts, &calls, product(next)).await;
        if ids.last() != Some(&v.id) {
            ids.push(v.id);
        }
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(
        ids.len() >= 5,
        "reloaded only {} times in 1 s: {ids:?}",
        ids.len()
    );
    assert!(cache.stats().l1_hits > 100, "the reads were L1 hits");

    let long = EntryOptions::new(Duration::from_secs(300));
    cache.set(&key(2), product(2), &long).await.unwrap();
    for round in 3..6 {
        for _ in 0..3 {
            assert_eq!(cache.get(&key(2)).await.map(|p| p.id), Some(round - 1));
        }
        cache.set(&key(2), product(round), &long).await.unwrap();
    }
    assert_eq!(cache.get(&key(2)).await.map(|p| p.id), Some(5));
    assert!(cache.get(&key(2)).await.is_some());
    cache.invalidate(&key(2)).await.unwrap();
    assert!(cache.get(&key(2)).await.is_none(), "invalidated");
}

/// Readers on two workers, while one writer overwrites a key 300 times:
/// a read that starts after a write returned never gives an older value,
/// whether it is answered by the front table, by moka, or by Redis with a
/// promotion racing the write (the 5 ms L1 cap keeps L1 turning over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_after_a_write_returns_an_older_value() {
    use std::sync::atomic::AtomicU64;
    let server = server();
    for (name, cap) in [("front", None), ("promote", Some(Duration::from_millis(5)))] {
        let mut builder = builder_on(&server, name).require_l2(true);
        if let Some(cap) = cap {
            builder = builder.l1_ttl_cap(cap);
        }
        let cache = builder.build().await.unwrap();
        let opts = EntryOptions::new(Duration::from_secs(300));
        cache.set(&key(1), product(0), &opts).await.unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (cache, written, done) = (cache.clone(), written.clone(), done.clone());
                tokio::spawn(async move {
                    let mut reads = 0_u64;
                    while done.load(Ordering::SeqCst) == 0 {
                        let floor = written.load(Ordering::SeqCst);
                        let got = cache.get(&key(1)).await.map(|p| p.id);
                        assert!(
                            got.is_some_and(|id| id >= floor),
                            "read {got:?} after write {floor} returned"
                        );
                        reads += 1;
                        tokio::task::yield_now().await;
                    }
                    reads
                })
            })
            .collect();
        for id in 1..=300 {
            cache.set(&key(1), product(id), &opts).await.unwrap();
            written.store(id, Ordering::SeqCst);
        }
        done.store(1, Ordering::SeqCst);
        for reader in readers {
            assert!(reader.await.unwrap() > 0, "{name}: a reader never read");
        }
        let stats = cache.stats();
        assert!(stats.l1_hits > 300, "{name}: few L1 hits: {stats:?}");
        if cap.is_some() {
            assert!(stats.l2_hits > 0, "{name}: nothing was promoted: {stats:?}");
        }
    }
}
