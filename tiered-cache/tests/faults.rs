//! Redis failing under the cache: killed, restarted, frozen, never there.
//! Reads keep working from L1 and the loader, Redis errors are counted, the
//! same cache uses Redis again once it is back, and a password in the URL
//! never shows up in errors or `Debug` output.
//!
//! Times are printed, and asserted only as generous bounds that catch hangs.

mod support;

use std::error::Error as _;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{key, opts, product, server, Product};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{BreakerSettings, Key, TieredCache};

/// Where the cache in namespace `t` keeps `key` in Redis.
fn redis_key(key: &Key<Product>) -> String {
    support::redis_key("t", key)
}

/// The tests of this file run one at a time: several measure their slowest
/// call (64 tasks on two cores), which another test's 64 tasks on the same
/// cores would make meaningless.
static ONE_TEST_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_TEST_AT_A_TIME.lock().await
}

/// Longest any single cache call may take before we call it a hang.
const HANG: Duration = Duration::from_secs(10);

/// The tests that use it call the cache one call at a time, and check what
/// each call did: the first failure opens the breaker, so the calls after
/// it skip Redis at once (the default, 5 in a row, is tested under load).
async fn cache_at(url: &str) -> TieredCache {
    TieredCache::builder()
        .namespace("t")
        .redis(url)
        .breaker(BreakerSettings::default().failures(1))
        .build()
        .await
        .expect("an unreachable Redis is not fatal at build")
}

/// Whether Redis holds `redis_key`; false while Redis is down (unlike
/// `support::exists`, which fails the test).
fn exists(server: &RedisServer, redis_key: &str) -> bool {
    let Ok(mut conn) = server.connection() else {
        return false;
    };
    redis::cmd("EXISTS")
        .arg(redis_key)
        .query::<u64>(&mut conn)
        .is_ok_and(|n| n == 1)
}

/// [`support::load`] with [`opts`]: whatever Redis does, it neither fails
/// nor hangs.
async fn load(
    cache: &TieredCache,
    key: &Key<Product>,
    calls: &Arc<AtomicUsize>,
    value: Product,
) -> Arc<Product> {
    tokio::time::timeout(HANG, support::load(cache, key, &opts(), calls, value))
        .await
        .expect("get_or_load hung")
}

/// Once Redis is back (after `event`): sets product 100 with `cache` until
/// a raw connection sees it in Redis (the cache has gone back to using
/// Redis), then checks that a fresh instance reads it from there. Returns
/// that instance.
async fn l2_in_use_again(cache: &TieredCache, server: &RedisServer, event: &str) -> TieredCache {
    let started = Instant::now();
    let k = key(100);
    loop {
        cache.set(&k, product(100), &opts()).await.unwrap();
        if exists(server, &redis_key(&k)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "the cache did not use Redis again within 6 s: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("L2 in use again {:?} after {event}", started.elapsed());

    let other = cache_at(&server.url()).await;
    assert_eq!(other.get(&k).await.as_deref(), Some(&product(100)));
    assert_eq!(other.stats().l2_hits, 1);
    other
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_killed_redis_degrades_to_l1_and_the_loader_then_comes_back() {
    let _alone = alone().await;
    let mut server = server();
    let cache = cache_at(&server.url()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    cache.set(&key(1), product(1), &opts()).await.unwrap();
    assert!(exists(&server, &redis_key(&key(1))));
    assert_eq!(cache.stats().l2_errors, 0);

    server.kill();

    // What L1 holds is still served.
    assert_eq!(cache.get(&key(1)).await.as_deref(), Some(&product(1)));
    // A key in no tier comes from the loader, without an error.
    let v = load(&cache, &key(2), &calls, product(2)).await;
    assert_eq!(*v, product(2));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let s = cache.stats();
    assert!(s.l2_errors >= 1, "the failed Redis call is counted: {s:?}");
    // ...and is then kept in L1.
    let v = load(&cache, &key(2), &calls, product(99)).await;
    assert_eq!(*v, product(2));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Writes succeed too (into L1), and plain misses are misses.
    cache.set(&key(3), product(3), &opts()).await.unwrap();
    assert_eq!(cache.get(&key(3)).await.as_deref(), Some(&product(3)));
    assert!(cache.get(&key(4)).await.is_none());
    let s = cache.stats();
    assert_eq!((s.l1_hits, s.loads), (3, 1), "{s:?}");

    // Same port, empty server; the same cache instance.
    server.restart().expect("restart");
    // A second, fresh instance reads what the first wrote, through Redis...
    let other = l2_in_use_again(&cache, &server, "the restart").await;
    // ...and the first reads what the second writes.
    other.set(&key(200), product(200), &opts()).await.unwrap();
    let l2_hits = cache.stats().l2_hits;
    assert_eq!(cache.get(&key(200)).await.as_deref(), Some(&product(200)));
    assert_eq!(cache.stats().l2_hits, l2_hits + 1);
    assert_eq!(other.stats().l2_errors, 0);
}

#[tokio::test]
async fn a_frozen_redis_costs_at_most_the_l2_timeout() {
    let _alone = alone().await;
    let server = server();
    let cache = cache_at(&server.url()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    cache.set(&key(1), product(1), &opts()).await.unwrap();

    server.pause().expect("SIGSTOP");
    let started = Instant::now();
    let v = load(&cache, &key(2), &calls, product(2)).await;
    let took = started.elapsed();
    println!("get_or_load with Redis frozen: {took:?} (l2_timeout 250 ms)");
    assert_eq!(*v, product(2));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        took < Duration::from_secs(2),
        "a frozen Redis made a read hang: {took:?}"
    );
    let s = cache.stats();
    assert!(s.l2_errors >= 1, "the timeout is counted: {s:?}");

    // L1 hits never wait on Redis.
    let started = Instant::now();
    assert_eq!(cache.get(&key(1)).await.as_deref(), Some(&product(1)));
    println!("L1 hit with Redis frozen: {:?}", started.elapsed());
    // A second miss while frozen is bounded too.
    let started = Instant::now();
    let v = load(&cache, &key(3), &calls, product(3)).await;
    let took = started.elapsed();
    println!("second get_or_load with Redis frozen: {took:?}");
    assert_eq!(*v, product(3));
    assert!(took < Duration::from_secs(2), "{took:?}");

    server.resume().expect("SIGCONT");
    l2_in_use_again(&cache, &server, "SIGCONT").await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unreachable_redis_at_build_is_not_fatal() {
    let _alone = alone().await;
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let started = Instant::now();
    let cache = tokio::time::timeout(HANG, cache_at(&url))
        .await
        .expect("build hung");
    println!("build with Redis unreachable: {:?}", started.elapsed());
    assert!(cache.has_l2(), "it keeps trying Redis");

    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let v = load(&cache, &key(1), &calls, product(1)).await;
        assert_eq!(*v, product(1));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "L1 serves after the first load"
    );
    cache.set(&key(2), product(2), &opts()).await.unwrap();
    assert_eq!(cache.get(&key(2)).await.as_deref(), Some(&product(2)));
    let s = cache.stats();
    assert_eq!((s.l1_hits, s.loads), (3, 1), "{s:?}");
    assert!(s.l2_errors >= 1, "{s:?}");
}

/// Display and Debug of an error and of every error in its source chain.
fn error_chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(e);
    while let Some(e) = next {
        text.push_str(&format!("{e}\n{e:?}\n"));
        next = e.source();
    }
    text
}

#[tokio::test]
async fn a_password_in_the_url_never_shows() {
    let _alone = alone().await;
    let port = closed_port();
    for url in [
        format!("redis://:secret@127.0.0.1:{port}"),
        format!("redis://app:secret@127.0.0.1:{port}/0"),
    ] {
        let builder = TieredCache::builder()
            .namespace("t")
            .redis(url.as_str())
            .require_l2(true);
        let shown = format!("{builder:?}");
        assert!(!shown.contains("secret"), "builder Debug: {shown}");

        let err = tokio::time::timeout(HANG, builder.build())
            .await
            .expect("build hung")
            .expect_err("require_l2 with Redis unreachable fails the build");
        assert!(err.is_l2(), "{err:?}");
        let text = error_chain_text(&err);
        println!("{text}");
        assert!(!text.contains("secret"), "error: {text}");
        assert!(err.source().is_some(), "the cause is kept");

        // Without require_l2 the cache builds; its Debug hides the URL too.
        let cache = cache_at(&url).await;
        let shown = format!("{cache:?}");
        assert!(!shown.contains("secret"), "cache Debug: {shown}");
    }

    // An invalid URL is a config error that does not quote it either.
    let err = TieredCache::builder()
        .redis("redis://:secret@127.0.0.1:notaport")
        .build()
        .await
        .expect_err("invalid URL");
    let text = error_chain_text(&err);
    assert!(!text.contains("secret"), "error: {text}");
}

/// An ACL user without pub/sub rights (Redis 7's default for new users)
/// gets NOPERM on every PUBLISH. That is about PUBLISH, not about Redis:
/// every data command still goes to Redis, nothing is skipped, and the
/// backplane is degraded (as with `backplane(false)`), not the tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_is_not_an_outage() {
    let _alone = alone().await;
    let server =
        RedisServer::start_with(&["--user", "app", "on", ">pw", "~*", "resetchannels", "+@all"])
            .expect("redis-server");
    let url = format!("redis://app:pw@127.0.0.1:{}", server.port());
    let cache = TieredCache::builder()
        .namespace("t")
        .redis(url.as_str())
        .l1_max_bytes(0) // every read goes to Redis
        .build()
        .await
        .expect("build");
    for id in 0..100 {
        cache
            .set(&key(id), product(id), &opts())
            .await
            .expect("set"); // publishes
        let got = cache.get(&key(id)).await;
        assert_eq!(
            got.as_deref(),
            Some(&product(id)),
            "read {id} went to Redis"
        );
    }
    let s = cache.stats();
    assert_eq!(s.l2_hits, 100, "{s:?}");
    assert_eq!(s.l2_skipped, 0, "no command was skipped: {s:?}");
    assert!(s.l2_errors >= 1, "the refusals are counted: {s:?}");
}

/// Other error replies are about their command too: with `maxmemory` full
/// and `noeviction`, writes are refused (OOM) while reads go on, every one
/// of them sent to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_do_not_stop_reads() {
    let _alone = alone().await;
    let server = server();
    let cache = TieredCache::builder()
        .namespace("t")
        .redis(server.url())
        .l1_max_bytes(0)
        .build()
        .await
        .expect("build");
    cache.set(&key(1), product(1), &opts()).await.expect("set");
    let mut c = server.connection().expect("connection");
    for (name, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query::<()>(&mut c)
            .expect("CONFIG SET");
    }
    for id in 2..22 {
        cache
            .set(&key(id), product(id), &opts())
            .await
            .expect("a refused write is not an error");
        assert_eq!(cache.get(&key(1)).await.as_deref(), Some(&product(1)));
    }
    let s = cache.stats();
    assert_eq!(s.l2_hits, 20, "{s:?}");
    assert_eq!(s.l2_skipped, 0, "{s:?}");
    assert!(s.l2_errors >= 20, "each refused write is counted: {s:?}");
}

/// One L2 budget per call: a miss whose Redis read was slow does not then
/// wait a whole `l2_timeout` more for its write. The write goes on in the
/// background, and a caller in the meantime gets the loaded value without
/// a second load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_waits_on_redis_at_most_one_l2_timeout_in_all() {
    let _alone = alone().await;
    let server = server();
    let cache = TieredCache::builder()
        .namespace("t")
        .redis(server.url())
        .l2_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("build");
    let calls = Arc::new(AtomicUsize::new(0));
    server.pause().expect("SIGSTOP"); // the read will wait
    let started = Instant::now();
    let reader = {
        let (cache, calls) = (cache.clone(), Arc::clone(&calls));
        let pause = RedisPause(server.pid().expect("running"));
        tokio::spawn(async move {
            cache
                .get_or_load(&key(1), &opts(), move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    pause.stop(); // Redis freezes again before the write
                    Ok::<_, std::io::Error>(product(1))
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.resume().expect("SIGCONT"); // the read is answered after ~1 s
    let v = reader.await.unwrap().expect("loads");
    let took = started.elapsed();
    assert_eq!(*v, product(1));
    println!("a miss with a 1 s read and a frozen write took {took:?}");
    assert!(
        took < Duration::from_millis(2_600),
        "read + write waited {took:?}"
    );
    // The write is still pending: a caller now gets the value, no load
    // (same value and error types: the same flight).
    let again = cache
        .get_or_load(&key(1), &opts(), || async {
            Ok::<_, std::io::Error>(product(9))
        })
        .await
        .expect("the loaded value");
    assert_eq!(*again, product(1));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    server.resume().expect("SIGCONT");
}

/// Freezes the test server (SIGSTOP) from inside a loader.
struct RedisPause(u32);

impl RedisPause {
    fn stop(&self) {
        let sent = std::process::Command::new("kill")
            .arg("-STOP")
            .arg(self.0.to_string())
            .status()
            .expect("kill");
        assert!(sent.success());
    }
}

/// One L2 budget per call: a `set` whose tag version must first be read
/// from a frozen Redis waits one `l2_timeout` in all, not one for the tag
/// read and another for the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_waits_on_a_frozen_redis_at_most_one_l2_timeout() {
    let _alone = alone().await;
    let server = server();
    let timeout = Duration::from_millis(400);
    let cache = TieredCache::builder()
        .namespace("t")
        .redis(server.url())
        .l2_timeout(timeout)
        .build()
        .await
        .expect("build");
    server.pause().expect("SIGSTOP");
    let started = Instant::now();
    let opts = opts().tag("a-tag-this-instance-never-saw");
    cache
        .set(&key(1), product(1), &opts)
        .await
        .expect("set degrades, never fails");
    let took = started.elapsed();
    server.resume().expect("SIGCONT");
    println!("set on a frozen Redis took {took:?} (l2_timeout {timeout:?})");
    assert!(
        took < timeout + Duration::from_millis(150),
        "waited {took:?}"
    );
    assert_eq!(
        cache.get(&key(1)).await.as_deref(),
        Some(&product(1)),
        "kept in L1"
    );
}

/// The tasks of the load tests, as in a busy service.
const TASKS: usize = 64;

/// What a fault test may add to the L2 budget, as the measured worst call on
/// a loaded two-core CI machine (64 tasks and Redis on the same cores).
///
/// P11's target is budget + 2 ms. The cache's own part of it is small: its
/// timers are set a tick early (`l2/budget.rs`), and in the release bench
/// (`[p11 frozen x5]`, recorded in benches/README) the slowest call of a
/// round ended 0.04-0.24 ms past the budget when the machine let it run.
/// What a shared machine adds on top is the OS's scheduling: at a load
/// average of 6-15 on two cores the 64 timed-out calls ended together
/// 5-17 ms late in some debug runs (a plain OS thread oversleeping its
/// 1 ms sleeps by as much meanwhile). So this bound is the hang detector,
/// and the bench's figure is the one against the target.
const SLACK: Duration = Duration::from_millis(50);

/// `get_or_load` of product `id` with a loader that never fails: whatever
/// Redis does, the caller gets the value. False (an error the caller
/// would not get without a cache) fails the test.
async fn read(cache: &TieredCache, id: u64, calls: &Arc<AtomicUsize>) -> bool {
    match cache
        .get_or_load(&key(id), &opts(), support::counting(calls, product(id)))
        .await
    {
        Ok(v) => *v == product(id),
        Err(_) => false,
    }
}

/// 64 tasks, half their reads on 256 keys already in L1, half on keys
/// never read before: Redis killed under
/// them opens the breaker, no caller sees an error, and the same cache
/// uses Redis again after the restart (the breaker's probe closes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_a_killed_redis_opens_the_breaker_and_the_restart_closes_it() {
    let _alone = alone().await;
    let mut server = server();
    let cache = support::builder_on(&server, "t")
        .breaker(BreakerSettings::default().cool_down(Duration::from_millis(200)))
        .build()
        .await
        .expect("build");
    for id in 0..256 {
        cache.set(&key(id), product(id), &opts()).await.unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let hammering = {
        let (cache, calls) = (cache.clone(), Arc::clone(&calls));
        tokio::spawn(support::hammer(
            TASKS,
            Duration::from_secs(4),
            move |task, n| {
                let (cache, calls) = (cache.clone(), Arc::clone(&calls));
                // Every other call a key never read before: Redis (or the
                // breaker) is asked all along.
                let id = if n % 2 == 0 {
                    n % 256
                } else {
                    1_000 + task as u64 * 1_000_000 + n
                };
                async move { read(&cache, id, &calls).await }
            },
        ))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Off the runtime's workers: a blocked worker would stall the tasks
    // queued on it, and the test would measure itself.
    tokio::task::block_in_place(|| server.kill());
    support::until_within(Duration::from_secs(2), "the breaker opens", || {
        cache.stats().breaker_opened >= 1
    })
    .await;
    assert_ne!(cache.stats().breaker_state, 0, "{:?}", cache.stats());
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| server.restart()).expect("restart");
    let restarted = Instant::now();
    while cache.stats().breaker_closed == 0 {
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "no probe closed the breaker: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "the breaker closed {:?} after the restart",
        restarted.elapsed()
    );
    let seen = hammering.await.unwrap();
    let s = cache.stats();
    println!("killed under load: {seen:?}; {s:?}");
    assert_eq!(seen.errors, 0, "no caller got an error");
    assert!(s.l2_skipped > 0, "open, calls skipped Redis: {s:?}");
    assert!(s.breaker_probes >= 1, "{s:?}");
    l2_in_use_again(&cache, &server, "the restart under load").await;
}

/// 64 tasks on 512 keys with Redis frozen (SIGSTOP): no call waits longer
/// than the L2 budget (plus scheduling slack), the breaker opens, and from
/// then on calls do not touch Redis at all: hits at L1 speed, misses
/// straight to the loader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_a_frozen_redis_costs_at_most_the_budget_and_then_nothing() {
    let _alone = alone().await;
    let server = server();
    let budget = Duration::from_millis(250);
    let cache = support::builder_on(&server, "t")
        .l2_timeout(budget)
        // No probe during the test: every call after the opening skips Redis.
        .breaker(BreakerSettings::default().cool_down(Duration::from_secs(600)))
        .build()
        .await
        .expect("build");
    for id in 0..256 {
        cache.set(&key(id), product(id), &opts()).await.unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let reader = |cache: &TieredCache, calls: &Arc<AtomicUsize>, keys: u64| {
        let (cache, calls) = (cache.clone(), Arc::clone(calls));
        move |task: usize, n: u64| {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            async move { read(&cache, (task as u64 * 31 + n) % keys, &calls).await }
        }
    };
    server.pause().expect("SIGSTOP");
    let frozen = support::hammer(TASKS, Duration::from_secs(1), reader(&cache, &calls, 512)).await;
    let s = cache.stats();
    println!("frozen, 64 tasks: {frozen:?} (budget {budget:?}); {s:?}");
    assert_eq!(frozen.errors, 0);
    assert!(
        frozen.max <= budget + SLACK,
        "a call waited {:?} on a frozen Redis (budget {budget:?})",
        frozen.max
    );
    assert_eq!(s.breaker_opened, 1, "{s:?}");
    assert_eq!(s.breaker_state, 1, "{s:?}");

    // Open: L1 hits (keys 0..256, and what the loader put in L1) and
    // loads never wait on Redis, and no command is sent.
    let errors = s.l2_errors;
    let open = support::hammer(
        TASKS,
        Duration::from_millis(500),
        reader(&cache, &calls, 1024),
    )
    .await;
    let s = cache.stats();
    println!("breaker open, 64 tasks: {open:?}; {s:?}");
    assert_eq!(open.errors, 0);
    assert_eq!(s.l2_errors, errors, "no command went to Redis: {s:?}");
    // A call that waited on the frozen Redis would take the whole budget.
    assert!(
        open.max < budget,
        "with the breaker open a call took {:?}",
        open.max
    );
    server.resume().expect("SIGCONT");
}

/// A Redis that answers, but slowly (a delaying proxy): a delay under the
/// budget is served from Redis, and no call waits longer than the budget
/// whatever the delay; a delay over it opens the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_stays_within_the_budget() {
    let _alone = alone().await;
    let server = server();
    let proxy = support::SlowProxy::start(&server).await;
    let budget = Duration::from_millis(250);
    let cache = TieredCache::builder()
        .namespace("t")
        .redis(proxy.url())
        .l2_timeout(budget)
        .l1_max_bytes(0) // every read goes to Redis
        .breaker(BreakerSettings::default().cool_down(Duration::from_secs(600)))
        .build()
        .await
        .expect("build");
    for id in 0..64 {
        cache.set(&key(id), product(id), &opts()).await.unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (cache, calls) = (cache.clone(), Arc::clone(&calls));
        move |task: usize, n: u64| {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            async move { read(&cache, (task as u64 + n) % 64, &calls).await }
        }
    };
    proxy.set_delay(Duration::from_millis(50));
    let slow = support::hammer(TASKS, Duration::from_secs(1), reader.clone()).await;
    let s = cache.stats();
    println!("50 ms slower Redis, 64 tasks: {slow:?}; {s:?}");
    assert_eq!(slow.errors, 0);
    assert!(slow.max <= budget + SLACK, "{:?}", slow.max);
    assert!(s.l2_hits > 0, "served from Redis: {s:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing was loaded: {s:?}");
    assert_eq!(s.breaker_opened, 0, "{s:?}");

    proxy.set_delay(Duration::from_millis(400));
    let slower = support::hammer(TASKS, Duration::from_secs(1), reader).await;
    let s = cache.stats();
    println!("400 ms slower Redis, 64 tasks: {slower:?}; {s:?}");
    assert_eq!(slower.errors, 0);
    assert!(slower.max <= budget + SLACK, "{:?}", slower.max);
    assert_eq!(s.breaker_opened, 1, "timeouts open the breaker: {s:?}");
}

/// A Redis that answers with errors (`maxmemory` full, `noeviction`): under
/// 64 tasks, reads are served from Redis, the refused writes are counted,
/// and the breaker stays closed: an error reply is about its command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_writes_under_load_and_the_breaker_stays_closed() {
    let _alone = alone().await;
    let server = server();
    let cache = TieredCache::builder()
        .namespace("t")
        .redis(server.url())
        .l1_max_bytes(0)
        .build()
        .await
        .expect("build");
    for id in 0..64 {
        cache.set(&key(id), product(id), &opts()).await.unwrap();
    }
    let mut c = server.connection().expect("connection");
    for (name, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1mb")] {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query::<()>(&mut c)
            .expect("CONFIG SET");
    }
    let filler = vec![b'x'; 64 * 1024];
    let full = (0..1000).any(|n| {
        redis::cmd("SET")
            .arg(format!("filler:{n}"))
            .arg(&filler)
            .query::<()>(&mut c)
            .is_err()
    });
    assert!(full, "Redis refuses writes once full");
    let before = cache.stats();
    let seen = {
        let cache = cache.clone();
        support::hammer(TASKS, Duration::from_secs(1), move |task, n| {
            let cache = cache.clone();
            async move {
                let id = (task as u64 + n) % 64;
                if n % 4 == 0 {
                    // A write: refused by Redis, not an error to the caller.
                    cache
                        .set(&key(1000 + id), product(id), &opts())
                        .await
                        .is_ok()
                } else {
                    cache.get(&key(id)).await.as_deref() == Some(&product(id))
                }
            }
        })
        .await
    };
    let s = cache.stats();
    println!("full Redis, 64 tasks: {seen:?}; {s:?}");
    assert_eq!(seen.errors, 0, "every read served, every write accepted");
    let writes = seen.calls / 4;
    assert!(
        s.l2_errors - before.l2_errors >= writes / 2,
        "the refused writes are counted: {s:?}"
    );
    assert_eq!((s.breaker_opened, s.l2_skipped), (0, 0), "{s:?}");
    assert!(!exists(&server, &redis_key(&key(1000))));
}

/// Bounded fallback: with the breaker open and L1 cold, 1,000 callers of
/// 1,000 different keys all go to the loader, but never more than
/// `max_concurrent_loads` at once; the others wait in line and all get
/// their value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_database_sees_at_most_the_load_cap() {
    let _alone = alone().await;
    const CAP: usize = 16;
    let mut server = server();
    let cache = support::builder_on(&server, "t")
        .max_concurrent_loads(CAP)
        .breaker(
            BreakerSettings::default()
                .failures(1)
                .cool_down(Duration::from_secs(600)),
        )
        .build()
        .await
        .expect("build");
    server.kill();
    while cache.stats().breaker_state != 1 {
        // Opens the breaker (a miss of a key the test never reads again).
        let _ = cache.get(&key(1_000_000)).await;
    }
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..1_000)
        .map(|id| {
            let (cache, running, most) = (cache.clone(), Arc::clone(&running), Arc::clone(&most));
            tokio::spawn(async move {
                cache
                    .get_or_load(&key(id), &opts(), move || async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(product(id))
                    })
                    .await
                    .map(|v| *v == product(id))
            })
        })
        .collect();
    for caller in callers {
        assert!(caller.await.unwrap().expect("no caller fails"));
    }
    let s = cache.stats();
    let most = most.load(Ordering::SeqCst);
    println!("1,000 loads with Redis down, cap {CAP}: at most {most} at once; {s:?}");
    assert!(most <= CAP, "{most} loads ran at once (cap {CAP})");
    assert_eq!(
        most, CAP,
        "the cap is reached: the loads did run side by side"
    );
    assert_eq!(s.loads, 1_000, "{s:?}");
    assert!(s.loads_queued > 0, "{s:?}");
    assert_eq!(s.breaker_state, 1, "{s:?}");
}
