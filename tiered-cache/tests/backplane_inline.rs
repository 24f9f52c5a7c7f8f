//! A write's backplane message leaves with the write itself: in classic
//! pub/sub, the store script `PUBLISH`es the key's invalidation right after
//! its `SET`s, so the message is out before the writer's call returns
//! (issue 18, invalidation latency). Where the script cannot or did not
//! (sharded pub/sub, a refused `PUBLISH`, a Redis that does not answer, the
//! backplane off), the write falls back to the publisher task, and nothing
//! is announced twice.
//!
//! "Out before the call returned" is checked by causality, not by timing:
//! once the call returns, the test publishes a marker on a second channel;
//! a raw subscriber of both channels must see the key's message before the
//! marker, since Redis runs commands one after another and delivers one
//! subscriber's messages in the order they were published. Those tests run
//! on a current-thread runtime, where the publisher task cannot run
//! between the call's return and the marker: a message left to it always
//! comes after the marker.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use support::{
    builder_on, cache_on, command_calls, conn, item, reset_command_stats, server, until_within,
    TestRedis,
};
use tiered_cache::testkit::RedisServer;
use tiered_cache::write::{Entity, Store, WriteBehind, WritePolicy};
use tiered_cache::{Key, TieredCache};

/// Upper bound on any wait: only there to turn a hang into a failure.
const HANG: Duration = Duration::from_secs(15);

fn backplane_channel(namespace: &str) -> String {
    format!("{namespace}:#backplane")
}

fn marker_channel(namespace: &str) -> String {
    format!("{namespace}:test-marker")
}

/// `c` subscribed to `namespace`'s backplane channel and to the test's
/// marker channel (until the returned handle is dropped); reads time out
/// (a hang fails the test).
fn listen<'a>(c: &'a mut redis::Connection, namespace: &str) -> redis::PubSub<'a> {
    c.set_read_timeout(Some(HANG)).expect("read timeout");
    let mut pubsub = c.as_pubsub();
    pubsub
        .subscribe(&[backplane_channel(namespace), marker_channel(namespace)])
        .expect("SUBSCRIBE");
    pubsub
}

/// Publishes marker `n` (on `publisher`, after the call under test
/// returned), then reads `listener`'s messages up to it: the backplane
/// payloads that were published before the marker.
fn published_before_marker(
    listener: &mut redis::PubSub<'_>,
    publisher: &mut redis::Connection,
    namespace: &str,
    n: u64,
) -> Vec<Vec<u8>> {
    let markers = marker_channel(namespace);
    let marker = format!("marker {n}");
    redis::cmd("PUBLISH")
        .arg(&markers)
        .arg(&marker)
        .query::<u64>(publisher)
        .expect("PUBLISH of the marker");
    let mut before = Vec::new();
    loop {
        let message = listener.get_message().expect("a message (or a hang)");
        let payload: Vec<u8> = message.get_payload().expect("a payload");
        if message.get_channel_name() == markers {
            assert_eq!(payload, marker.as_bytes(), "markers arrive in order");
            return before;
        }
        before.push(payload);
    }
}

/// Whether a backplane message names `key` (a key travels as its bytes).
fn names<V>(payload: &[u8], key: &Key<V>) -> bool {
    let key = key.as_str().as_bytes();
    payload.windows(key.len()).any(|w| w == key)
}

/// Warms `key` into `cache`'s L1 and checks it is served from there.
async fn warm(cache: &TieredCache, key: &Key<u64>, expect: u64) {
    assert_eq!(cache.get(key).await.as_deref(), Some(&expect), "warm read");
    let hits = cache.stats().l1_hits;
    assert_eq!(cache.get(key).await.as_deref(), Some(&expect));
    assert_eq!(cache.stats().l1_hits, hits + 1, "the value sits in L1");
}

/// A sets `key` to 1, B hears of it and then holds 1 in its L1.
async fn a_writes_b_holds(a: &TieredCache, b: &TieredCache, key: &Key<u64>) {
    a.set(key, 1, &support::opts()).await.expect("set");
    until_within(HANG, "B hears A", || b.stats().invalidations_received >= 1).await;
    warm(b, key, 1).await;
}

/// Lets background tasks (the publisher, on this current-thread runtime)
/// run, so that a message they would send twice is sent.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// 200 `set`s on A: each one's message was published before its `set`
/// returned, and only once (the publisher task sends nothing more).
#[tokio::test]
async fn a_sets_message_is_out_before_the_set_returns() {
    const SETS: u64 = 200;
    let server = server();
    let a = cache_on(&server, "inline").await;
    let mut subscriber = conn(&server);
    let mut listener = listen(&mut subscriber, "inline");
    let mut publisher = conn(&server);
    reset_command_stats(&server);
    let mut late = Vec::new();
    for n in 0..SETS {
        let key = item::<u64>(n);
        a.set(&key, n, &support::opts()).await.expect("set");
        let before = published_before_marker(&mut listener, &mut publisher, "inline", n);
        if !before.iter().any(|payload| names(payload, &key)) {
            late.push(n);
        }
    }
    assert!(
        late.is_empty(),
        "{} of {SETS} sets returned before their message was out: {late:?}",
        late.len()
    );
    settle().await;
    assert_eq!(
        command_calls(&server, "publish"),
        2 * SETS,
        "one PUBLISH per set (from its script) and one per marker, none from the publisher"
    );
    assert_eq!(a.stats().backplane_published, SETS);
}

/// An ACL user that may not publish on the channel: the script's
/// `PUBLISH` is refused after its `SET`s ran, and the write stands (the
/// script does not fail). The publisher then tries, is refused too, and
/// the refusals are counted; with no message anywhere, B keeps serving its
/// L1 copy (up to `l1_ttl_cap`, as documented for a refused PUBLISH).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_keeps_the_write() {
    let server =
        RedisServer::start_with(&["--user", "app", "on", ">pw", "~*", "resetchannels", "+@all"])
            .expect("redis-server");
    let url = format!("redis://app:pw@127.0.0.1:{}", server.port());
    let a = TieredCache::builder()
        .namespace("refused")
        .redis(url.as_str())
        .require_l2(true)
        .build()
        .await
        .expect("build");
    // B connects as the default user: it may subscribe.
    let b = cache_on(&server, "refused").await;
    let key = item::<u64>(1);
    b.set(&key, 1, &support::opts()).await.expect("set");
    warm(&b, &key, 1).await;
    reset_command_stats(&server);

    a.set(&key, 2, &support::opts())
        .await
        .expect("a refused PUBLISH is not the write's error");
    let reader = builder_on(&server, "refused")
        .backplane(false)
        .build()
        .await
        .expect("build");
    assert_eq!(
        reader.get(&key).await.as_deref(),
        Some(&2),
        "the script's SETs ran"
    );
    until_within(HANG, "the publisher's refused PUBLISH", || {
        rejected_publishes(&server) >= 2
    })
    .await;
    assert_eq!(
        rejected_publishes(&server),
        2,
        "refused twice: in the script, then from the publisher (once, it does not retry)"
    );
    assert_eq!(
        command_calls(&server, "publish"),
        0,
        "nothing was published"
    );
    assert_eq!(a.stats().backplane_published, 0);
    assert!(a.stats().l2_errors >= 1, "counted: {:?}", a.stats());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.stats().invalidations_received, 0);
    assert_eq!(b.get(&key).await.as_deref(), Some(&1), "B was not told");
}

/// `PUBLISH` calls Redis refused (ACL), from `INFO commandstats`.
fn rejected_publishes(server: &RedisServer) -> u64 {
    let info: String = server.query(redis::cmd("INFO").arg("commandstats"));
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_publish:"))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|field| field.strip_prefix("rejected_calls="))
        })
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// The entity of the write-policy test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Article {
    title: String,
}

impl Entity for Article {
    const NAME: &'static str = "article";
    const VERSION: u32 = 1;
    type Id = u64;
}

/// The application's store, in memory.
#[derive(Default)]
struct Rows(Mutex<HashMap<u64, (Arc<Article>, u64)>>);

impl Store<Article> for Rows {
    type Error = std::convert::Infallible;

    async fn load(&self, id: &u64) -> Result<Option<Article>, Self::Error> {
        let rows = self.0.lock().expect("rows");
        Ok(rows.get(id).map(|(a, _)| (**a).clone()))
    }

    async fn save(&self, id: &u64, value: &Arc<Article>, version: u64) -> Result<(), Self::Error> {
        let mut rows = self.0.lock().expect("rows");
        if rows.get(id).is_none_or(|(_, v)| *v < version) {
            rows.insert(*id, (Arc::clone(value), version));
        }
        Ok(())
    }

    async fn delete(&self, id: &u64, _version: u64) -> Result<(), Self::Error> {
        self.0.lock().expect("rows").remove(id);
        Ok(())
    }
}

/// Entity puts write their cache entry through the same store script, and
/// announce with it: write-through and write-behind puts each have their
/// message out before `put` returns, once.
#[tokio::test]
async fn an_entity_put_announces_inline() {
    const PUTS: u64 = 30;
    let server = server();
    let a = cache_on(&server, "entity").await;
    let mut subscriber = conn(&server);
    let mut listener = listen(&mut subscriber, "entity");
    let mut publisher = conn(&server);
    reset_command_stats(&server);
    let policies = [
        WritePolicy::WriteThrough,
        WritePolicy::WriteBehind(WriteBehind::new()),
    ];
    let mut n = 0;
    for policy in policies {
        let what = format!("{policy:?}");
        let articles = a
            .entity_with::<Article, _>(Rows::default(), policy)
            .expect("entity");
        for id in 0..PUTS {
            let article = Article {
                title: format!("{what} {id}"),
            };
            articles.put(&id, article).await.expect("put");
            let before = published_before_marker(&mut listener, &mut publisher, "entity", n);
            n += 1;
            assert!(
                before.iter().any(|p| names(p, &Article::key(&id))),
                "{what}: put {id} returned before its message was out"
            );
        }
        articles.shutdown().await;
    }
    settle().await;
    assert_eq!(
        command_calls(&server, "publish"),
        2 * n,
        "one PUBLISH per put (from its script) and one per marker"
    );
}

/// Redis frozen (SIGSTOP) during a `set`: the call returns within its L2
/// budget, successfully (the value is in A's L1), and once Redis runs
/// again B comes to see the new value: the script queued on the socket
/// runs then and announces it, or the publisher does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_while_redis_is_paused_returns_within_its_budget() {
    const TIMEOUT: Duration = Duration::from_millis(200);
    let server = server();
    let build = || async {
        builder_on(&server, "paused")
            .l2_timeout(TIMEOUT)
            .require_l2(true)
            .build()
            .await
            .expect("build")
    };
    let (a, b) = (build().await, build().await);
    let key = item::<u64>(1);
    a_writes_b_holds(&a, &b, &key).await;

    server.pause().expect("SIGSTOP");
    let started = Instant::now();
    let set = a.set(&key, 2, &support::opts()).await;
    let took = started.elapsed();
    tokio::time::sleep(TIMEOUT).await;
    server.resume().expect("SIGCONT");
    set.expect("a Redis that does not answer is not the set's error");
    assert!(
        took < TIMEOUT + Duration::from_millis(300),
        "the set took {took:?} with an L2 budget of {TIMEOUT:?}"
    );
    assert_eq!(a.get(&key).await.as_deref(), Some(&2), "in A's L1");

    let deadline = Instant::now() + HANG;
    while b.get(&key).await.as_deref() != Some(&2) {
        assert!(Instant::now() < deadline, "B never saw the new value");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With the backplane off, a write publishes nothing, from the script or
/// otherwise.
#[tokio::test]
async fn with_the_backplane_off_nothing_is_published() {
    const SETS: u64 = 20;
    let server = server();
    let a = builder_on(&server, "off")
        .backplane(false)
        .require_l2(true)
        .build()
        .await
        .expect("build");
    let mut subscriber = conn(&server);
    let mut listener = listen(&mut subscriber, "off");
    let mut publisher = conn(&server);
    reset_command_stats(&server);
    for n in 0..SETS {
        a.set(&item::<u64>(n), n, &support::opts())
            .await
            .expect("set");
        let before = published_before_marker(&mut listener, &mut publisher, "off", n);
        assert!(before.is_empty(), "set {n} published {before:?}");
    }
    settle().await;
    assert_eq!(command_calls(&server, "publish"), SETS, "the markers only");
    assert_eq!(a.stats().backplane_published, 0);
}

/// Sharded pub/sub on a cluster: a script runs on the entry's shard, and
/// the channel's slot is elsewhere, so the store script publishes nothing;
/// the publisher task `SPUBLISH`es, and B still drops its copy.
#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_sharded_mode_the_publisher_announces() {
    use tiered_cache::BackplaneMode;
    let backend = support::Backend::cluster().await;
    let build = || async {
        builder_on(&backend, "inline-sharded")
            .backplane_mode(BackplaneMode::Sharded)
            .require_l2(true)
            .build()
            .await
            .expect("build")
    };
    let (a, b) = (build().await, build().await);
    let key = item::<u64>(1);
    a_writes_b_holds(&a, &b, &key).await;
    reset_command_stats(&backend);

    a.set(&key, 2, &support::opts()).await.expect("set");
    until_within(HANG, "B hears A again", || {
        b.stats().invalidations_received >= 2
    })
    .await;
    assert_eq!(b.get(&key).await.as_deref(), Some(&2));
    assert_eq!(
        command_calls(&backend, "publish"),
        0,
        "no classic PUBLISH, from a script or otherwise"
    );
    assert_eq!(command_calls(&backend, "spublish"), 1, "one SPUBLISH");
}
