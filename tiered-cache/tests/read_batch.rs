//! Reads due at the same moment share one MGET to Redis (`l2/batch.rs`):
//! each still gets its own entry, a key of another type stays one read's
//! miss, a reader cancelled while its batch gathers does not take the
//! others down, and a read with no other in flight goes alone.

mod support;

use std::time::Duration;

use support::{builder_on, cache_on, conn, key, opts, product, redis_key, server};
use tiered_cache::{TieredCache, TieredCacheBuilder};

const KEYS: u64 = 200;

/// A cache whose every read goes to Redis (L1 off), on `server`.
async fn l2_reader(server: &tiered_cache::testkit::RedisServer) -> TieredCache {
    l2_reader_with(server, |builder| builder).await
}

/// [`l2_reader`] with settings of the test's own.
async fn l2_reader_with(
    server: &tiered_cache::testkit::RedisServer,
    tune: impl FnOnce(TieredCacheBuilder) -> TieredCacheBuilder,
) -> TieredCache {
    tune(builder_on(server, "t").l1_max_bytes(0).require_l2(true))
        .build()
        .await
        .expect("cache builds against the test Redis")
}

/// Whether `reader` reads key `id` as its own entry again within 5 s
/// (after a fault: the reconnect, the breaker's rest).
async fn hits_again(reader: &TieredCache, id: u64) -> bool {
    for _ in 0..50 {
        if reader.get(&key(id)).await.map(|p| p.id) == Some(id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn fill(server: &tiered_cache::testkit::RedisServer) {
    let writer = cache_on(server, "t").await;
    for id in 0..KEYS {
        writer.set(&key(id), product(id), &opts()).await.unwrap();
    }
}

/// Reads every key at once, one task each, and returns what each found.
async fn read_all_at_once(cache: &TieredCache) -> Vec<(u64, Option<u64>)> {
    let tasks: Vec<_> = (0..KEYS)
        .map(|id| {
            let cache = cache.clone();
            tokio::spawn(async move { (id, cache.get(&key(id)).await.map(|p| p.id)) })
        })
        .collect();
    let mut found = Vec::new();
    for task in tasks {
        found.push(task.await.expect("a reader task"));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_share_requests_and_each_gets_its_own_entry() {
    let server = server();
    fill(&server).await;
    let reader = l2_reader(&server).await;

    for (id, found) in read_all_at_once(&reader).await {
        assert_eq!(found, Some(id), "key {id} answered with its own entry");
    }
    let s = reader.stats();
    assert_eq!((s.l2_hits, s.misses, s.l2_errors), (KEYS, 0, 0), "{s:?}");
    assert!(
        s.l2_reads_batched >= KEYS / 2,
        "most of {KEYS} reads spawned at once shared a request: {s:?}"
    );
}

#[tokio::test]
async fn a_read_alone_goes_alone() {
    let server = server();
    fill(&server).await;
    let reader = l2_reader(&server).await;

    for id in 0..20 {
        assert_eq!(reader.get(&key(id)).await.map(|p| p.id), Some(id));
    }
    let s = reader.stats();
    assert_eq!((s.l2_hits, s.l2_reads_batched), (20, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_in_a_batch_is_a_miss_and_a_load_replaces_it() {
    let server = server();
    fill(&server).await;
    let list_key = redis_key("t", &key(7));
    let _: () = redis::cmd("DEL")
        .arg(&list_key)
        .query(&mut conn(&server))
        .unwrap();
    let _: u64 = redis::cmd("RPUSH")
        .arg(&list_key)
        .arg("a")
        .query(&mut conn(&server))
        .unwrap();
    let reader = l2_reader(&server).await;

    for (id, found) in read_all_at_once(&reader).await {
        let expected = (id != 7).then_some(id);
        assert_eq!(found, expected, "key {id}");
    }
    let s = reader.stats();
    assert!(s.l2_reads_batched > 0, "the reads were batched: {s:?}");
    assert_eq!(
        (s.l2_hits, s.misses, s.l2_errors),
        (KEYS - 1, 1, 0),
        "the list is one counted miss (MGET reads it as absent, a GET alone \
         as a bad entry); the other reads of its batch are hits: {s:?}"
    );

    let loaded = reader
        .get_or_load(&key(7), &opts(), || async {
            Ok::<_, std::io::Error>(product(7))
        })
        .await
        .expect("the load's value");
    assert_eq!(loaded.id, 7);
    let kind: String = redis::cmd("TYPE")
        .arg(&list_key)
        .query(&mut conn(&server))
        .unwrap();
    assert_eq!(kind, "string", "the load's store replaced the list");
    assert_eq!(reader.get(&key(7)).await.map(|p| p.id), Some(7));
}

/// On a one-thread runtime the order is fixed: X is sent at once (no other
/// read in flight), A opens a batch beside it and yields, B joins A's batch,
/// and the test task, which yielded before A, runs first when the worker is
/// idle and cancels A before A sends. B must still be answered.
#[tokio::test]
async fn a_reader_cancelled_while_its_batch_gathers_does_not_take_the_others_down() {
    let server = server();
    fill(&server).await;
    let reader = l2_reader(&server).await;
    let read = |id| {
        let reader = reader.clone();
        tokio::spawn(async move { reader.get(&key(id)).await.map(|p| p.id) })
    };

    let (x, a, b) = (read(0), read(1), read(2));
    tokio::task::yield_now().await;
    a.abort();
    let found = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("B is answered, not left waiting on a cancelled opener")
        .expect("B's task");
    assert_eq!(found, Some(2));
    assert!(a.await.unwrap_err().is_cancelled(), "A was cancelled first");
    assert_eq!(x.await.expect("X's task"), Some(0));
    let s = reader.stats();
    assert_eq!(
        (s.l2_hits, s.l2_reads_batched, s.l2_errors),
        (2, 1, 0),
        "X went alone, B in the batch A opened: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_a_dead_connection_fails_as_misses_and_reads_recover() {
    let server = server();
    fill(&server).await;
    let reader = l2_reader(&server).await;
    assert!(reader.get(&key(0)).await.is_some(), "connected");

    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut conn(&server))
        .unwrap_or(());
    // Whatever the batch in flight met, no read panics or hangs, and every
    // answer is the key's own entry or a miss.
    for (id, found) in read_all_at_once(&reader).await {
        assert!(found.is_none() || found == Some(id), "key {id}: {found:?}");
    }
    assert!(
        hits_again(&reader, 3).await,
        "the cache reconnected: {:?}",
        reader.stats()
    );
}

/// Redis refusing the batch's MGET (an ACL without it: NOPERM) is about
/// that command: the reads in the batch are counted misses, nothing opens
/// the breaker or skips Redis, and reads one at a time go on as GETs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_misses_not_an_outage() {
    let server = tiered_cache::testkit::RedisServer::start_with(&[
        "--user", "app", "on", ">pw", "~*", "&*", "+@all", "-mget",
    ])
    .expect("redis-server");
    let url = format!("redis://app:pw@127.0.0.1:{}", server.port());
    let writer = TieredCache::builder()
        .namespace("t")
        .redis(url.as_str())
        .build()
        .await
        .expect("build");
    for id in 0..KEYS {
        writer.set(&key(id), product(id), &opts()).await.unwrap();
    }
    let reader = TieredCache::builder()
        .namespace("t")
        .redis(url.as_str())
        .l1_max_bytes(0)
        .build()
        .await
        .expect("build");

    for (id, found) in read_all_at_once(&reader).await {
        assert!(found.is_none() || found == Some(id), "key {id}: {found:?}");
    }
    let s = reader.stats();
    assert!(s.l2_reads_batched > 0, "reads were batched: {s:?}");
    assert!(s.l2_errors > 0, "the refused MGETs are counted: {s:?}");
    assert_eq!(s.l2_hits + s.misses, KEYS, "every read answered: {s:?}");
    assert_eq!((s.breaker_opened, s.l2_skipped), (0, 0), "{s:?}");
    for id in 0..10 {
        assert_eq!(reader.get(&key(id)).await.map(|p| p.id), Some(id));
    }
}

/// Redis frozen (SIGSTOP) with batches in flight: every read ends within
/// its L2 budget as a miss, none waits on a batch's unanswered request,
/// and once Redis answers again reads hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_a_frozen_redis_end_within_the_budget() {
    let server = server();
    fill(&server).await;
    let budget = Duration::from_millis(200);
    let reader = l2_reader_with(&server, |b| b.l2_timeout(budget)).await;
    assert!(reader.get(&key(0)).await.is_some(), "connected");

    server.pause().expect("SIGSTOP");
    let started = std::time::Instant::now();
    let found = tokio::time::timeout(Duration::from_secs(10), read_all_at_once(&reader))
        .await
        .expect("reads end without Redis answering");
    let took = started.elapsed();
    server.resume().expect("SIGCONT");
    assert!(
        found.iter().all(|(_, f)| f.is_none()),
        "no answer from a frozen Redis"
    );
    assert!(
        took < budget + Duration::from_secs(1),
        "{KEYS} reads at once ended with their budget, not with Redis: {took:?}"
    );
    assert!(
        hits_again(&reader, 3).await,
        "reads hit again after Redis resumed: {:?}",
        reader.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_batching_off_concurrent_reads_each_go_alone() {
    let server = server();
    fill(&server).await;
    let reader = l2_reader_with(&server, |b| b.batch_reads(false)).await;

    for (id, found) in read_all_at_once(&reader).await {
        assert_eq!(found, Some(id), "key {id}");
    }
    let s = reader.stats();
    assert_eq!((s.l2_hits, s.l2_reads_batched), (KEYS, 0), "{s:?}");
}
