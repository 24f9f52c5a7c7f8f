//! Fleet-wide single-flight (`EntryOptions::fleet_lock`): several
//! `TieredCache` instances on one real Redis, as the replicas of a service
//! are, share one load of a cold key; a holder that goes away holds the
//! others up at most its lease; a Redis that fails makes it a local load.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{item, server, Item};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{BreakerSettings, EntryOptions, TieredCache};

const INSTANCES: usize = 4;
const CALLERS: usize = 250;
const LEASE: Duration = Duration::from_secs(2);

fn locked() -> EntryOptions {
    EntryOptions::new(Duration::from_secs(300)).fleet_lock(LEASE)
}

/// Instances that have served a little already (each read an entry from
/// Redis, so it knows the namespace's epoch), as the replicas of a running
/// service have.
async fn instances(server: &RedisServer) -> Vec<TieredCache> {
    let mut all = Vec::new();
    for n in 0..INSTANCES {
        let cache = support::cache_on(server, "fleet").await;
        if n == 0 {
            let warm = EntryOptions::new(Duration::from_secs(300));
            cache
                .set(&item::<String>(1_000_000), "warm".to_owned(), &warm)
                .await
                .expect("set");
        }
        let warm = cache.get(&item::<String>(1_000_000)).await;
        assert_eq!(warm.as_deref().map(String::as_str), Some("warm"));
        all.push(cache);
    }
    all
}

/// The commands that clients sent to Redis while `MONITOR` ran, not those
/// that scripts ran (MONITOR marks those `lua`), without MONITOR's own.
struct Monitor {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(server: &RedisServer) -> Monitor {
        use std::io::{BufRead, Write};
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
        stream.write_all(b"MONITOR\r\n").expect("MONITOR");
        let mut reader = std::io::BufReader::new(stream);
        let mut ok = String::new();
        reader.read_line(&mut ok).expect("+OK");
        assert_eq!(ok.trim(), "+OK");
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        Monitor { lines }
    }

    /// The commands sent by clients so far (waits a moment for the stream).
    fn sent(&self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(100));
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.contains(" lua]"))
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                !l.contains("\"info\"") && !l.contains("\"config\"")
            })
            .cloned()
            .collect()
    }
}

/// Every command Redis ran since the last reset, those that scripts ran
/// included (`INFO commandstats`), without the test's own INFO and CONFIG.
fn commands(server: &RedisServer) -> (u64, Vec<String>) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut support::conn(server))
        .expect("INFO");
    let mut total = 0;
    let mut seen = Vec::new();
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if name == "info" || name == "monitor" || name.starts_with("config") {
            continue;
        }
        let calls: u64 = stats
            .strip_prefix("calls=")
            .and_then(|s| s.split(',').next())
            .and_then(|n| n.parse().ok())
            .expect("calls=N");
        total += calls;
        seen.push(format!("{name}={calls}"));
    }
    (total, seen)
}

/// Whether an instance holds the entry's fleet lock: it holds a token, not
/// nothing and not the `stored:<version>` marker a store leaves.
fn lock_held(server: &RedisServer, lock: &str) -> bool {
    let held: Option<String> = redis::cmd("GET")
        .arg(lock)
        .query(&mut support::conn(server))
        .expect("GET");
    held.is_some_and(|v| !v.starts_with("stored:"))
}

/// `INSTANCES` x `CALLERS` callers of one cold key; each load takes 50 ms.
/// Returns the loader calls.
async fn stampede(caches: &[TieredCache], key: &Item, opts: &EntryOptions) -> usize {
    let loads = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for cache in caches {
        for _ in 0..CALLERS {
            let (cache, key, opts, loads) =
                (cache.clone(), key.clone(), opts.clone(), Arc::clone(&loads));
            callers.push(tokio::spawn(async move {
                cache
                    .get_or_load(&key, &opts, move || async move {
                        loads.fetch_add(1, SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::io::Error>("loaded".to_owned())
                    })
                    .await
            }));
        }
    }
    for caller in callers {
        let value = caller.await.unwrap().expect("every caller gets the value");
        assert_eq!(*value, "loaded");
    }
    loads.load(SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_of_250_callers_load_a_cold_key_once() {
    let server = server();
    let caches = instances(&server).await;
    support::reset_command_stats(&server);
    let monitor = Monitor::start(&server);
    let loads = stampede(&caches, &item(1), &locked()).await;
    let (total, seen) = commands(&server);
    let sent = monitor.sent();
    println!(
        "fleet lock: {loads} load(s); {} commands sent: {sent:#?}; {total} run by Redis with those of scripts: {seen:?}",
        sent.len()
    );
    assert_eq!(loads, 1, "one load for the whole fleet");
    assert!(sent.len() <= 20, "{} commands: {sent:#?}", sent.len());
    // Every command Redis ran, those the store script ran included (it
    // releases the lock too): issue 15's "at most 20 Redis commands in all".
    assert!(total <= 20, "{total} commands run: {seen:?}");
    assert!(
        !lock_held(&server, "fleet:{item:v1:1}#lock"),
        "the lock is released"
    );

    // Without the lock: one load per instance at most.
    support::reset_command_stats(&server);
    let opts = EntryOptions::new(Duration::from_secs(300));
    let loads = stampede(&caches, &item(2), &opts).await;
    let (total, seen) = commands(&server);
    println!("no fleet lock: {loads} load(s), {total} Redis commands: {seen:?}");
    assert!((1..=INSTANCES).contains(&loads), "{loads}");
}

/// The race of a whole load against another instance's lock attempt: one
/// instance misses the entry, the holder then loads, stores and releases
/// the lock, and only then does the first ask for the lock. It must read
/// the holder's value, not load again. Many rounds of a cold key with an
/// instant loader, so that some rounds hit that window: exactly 1 load in
/// every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_ends_between_a_miss_and_a_lock_attempt_is_not_repeated() {
    const ROUNDS: u64 = 150;
    let server = server();
    let caches = instances(&server).await;
    let mut extra = Vec::new();
    for round in 0..ROUNDS {
        let key: Item = item(100_000 + round);
        let loads = Arc::new(AtomicUsize::new(0));
        let mut callers = Vec::new();
        for cache in &caches {
            for _ in 0..25 {
                let (cache, key, loads) = (cache.clone(), key.clone(), Arc::clone(&loads));
                callers.push(tokio::spawn(async move {
                    cache
                        .get_or_load(&key, &locked(), move || async move {
                            loads.fetch_add(1, SeqCst);
                            Ok::<_, std::io::Error>("loaded".to_owned())
                        })
                        .await
                }));
            }
        }
        for caller in callers {
            assert_eq!(*caller.await.unwrap().expect("the value"), "loaded");
        }
        let loads = loads.load(SeqCst);
        if loads != 1 {
            extra.push((round, loads));
        }
    }
    let l2_hits: u64 = caches.iter().map(|c| c.stats().l2_hits).sum();
    println!("{ROUNDS} rounds: {l2_hits} L2 hits; rounds with other than 1 load: {extra:?}");
    assert!(extra.is_empty(), "rounds (round, loads): {extra:?}");
}

/// The holder's caller is cancelled mid-load (its task aborted): its lock
/// is released, and the other instances' callers finish within the lease
/// plus the L2 budget, with one more load at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_holder_holds_the_others_up_at_most_its_lease() {
    let server = server();
    let caches = instances(&server).await;
    let loads = Arc::new(AtomicUsize::new(0));
    let key: Item = item(7);
    let holder = {
        let (cache, key, loads) = (caches[0].clone(), key.clone(), Arc::clone(&loads));
        tokio::spawn(async move {
            cache
                .get_or_load(&key, &locked(), move || async move {
                    loads.fetch_add(1, SeqCst);
                    std::future::pending::<()>().await;
                    Ok::<_, std::io::Error>("never".to_owned())
                })
                .await
        })
    };
    support::until("the holder loads", || loads.load(SeqCst) == 1).await;
    assert!(
        support::exists(&server, "fleet:{item:v1:7}#lock"),
        "held, in the entry's slot"
    );
    let mut callers = Vec::new();
    for cache in &caches[1..] {
        for _ in 0..CALLERS {
            let (cache, key, loads) = (cache.clone(), key.clone(), Arc::clone(&loads));
            callers.push(tokio::spawn(async move {
                cache
                    .get_or_load(&key, &locked(), move || async move {
                        loads.fetch_add(1, SeqCst);
                        Ok::<_, std::io::Error>("loaded".to_owned())
                    })
                    .await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancelled = Instant::now();
    holder.abort();
    for caller in callers {
        let value = caller.await.unwrap().expect("the others get the value");
        assert_eq!(*value, "loaded");
    }
    let took = cancelled.elapsed();
    println!(
        "after the holder was cancelled: {took:?}, {} loads",
        loads.load(SeqCst)
    );
    assert!(took <= LEASE + Duration::from_millis(250), "{took:?}");
    assert_eq!(loads.load(SeqCst), 2, "one more load, by one instance");
}

/// A holder that dies without releasing (its lock left in Redis, as after a
/// crash): the others load once its lease has run out, not before, and
/// not never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lock_expires_with_its_lease() {
    let server = server();
    let cache = support::cache_on(&server, "fleet").await;
    let lease = Duration::from_millis(600);
    redis::cmd("SET")
        .arg("fleet:{item:v1:9}#lock")
        .arg("a-dead-instance")
        .arg("PX")
        .arg(lease.as_millis() as u64)
        .query::<()>(&mut support::conn(&server))
        .expect("SET");
    let started = Instant::now();
    let loads = support::counter();
    let value = cache
        .get_or_load(
            &item::<String>(9),
            &EntryOptions::new(Duration::from_secs(300)).fleet_lock(lease),
            support::counting(&loads, "loaded".to_owned()),
        )
        .await
        .expect("loads once the lease is over");
    let took = started.elapsed();
    println!("waited {took:?} on a dead holder's lease of {lease:?}");
    assert_eq!(*value, "loaded");
    assert_eq!(loads.load(SeqCst), 1);
    assert!(took >= lease - Duration::from_millis(50), "{took:?}");
    assert!(
        took <= lease + lease / 3 + Duration::from_millis(300),
        "{took:?}"
    );
}

/// With Redis down (the breaker open), a fleet-locked load is a local one:
/// no error, no wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_a_fleet_lock_is_a_local_load() {
    let mut server = server();
    let cache = support::builder_on(&server, "fleet")
        .breaker(BreakerSettings::default().failures(1))
        .build()
        .await
        .expect("build");
    server.kill();
    let loads = support::counter();
    for _ in 0..3 {
        let value = cache
            .get_or_load(
                &item::<String>(3),
                &locked(),
                support::counting(&loads, "v".to_owned()),
            )
            .await
            .expect("no error");
        assert_eq!(*value, "v");
    }
    assert_eq!(loads.load(SeqCst), 1, "then L1");
}

static RATE_LOADS: AtomicUsize = AtomicUsize::new(0);

/// The macro's `fleet_lock` argument: the body runs once for the fleet.
#[tiered_cache::cached(ttl = "5m", fleet_lock = "2s", cache = cache)]
async fn rate(cache: &TieredCache, day: u32) -> u64 {
    RATE_LOADS.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    u64::from(day) * 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_function_with_fleet_lock_runs_once_for_the_fleet() {
    let server = server();
    let caches = instances(&server).await;
    let mut callers = Vec::new();
    for cache in &caches {
        for _ in 0..50 {
            let cache = cache.clone();
            callers.push(tokio::spawn(async move { rate(&cache, 4).await }));
        }
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), 40);
    }
    assert_eq!(RATE_LOADS.load(SeqCst), 1, "one body run for 4 instances");
}

/// An expired entry inside its stale window: the instance that takes the
/// lock refreshes it in the background, and another instance's caller is
/// served the stale value at once instead of waiting or loading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_another_instance_refreshes_the_stale_value_is_served() {
    let server = server();
    let caches = instances(&server).await;
    let (a, b) = (&caches[0], &caches[1]);
    let opts = EntryOptions::new(Duration::from_millis(200))
        .stale(Duration::from_secs(3600))
        .fleet_lock(LEASE);
    let key: Item = item(11);
    a.set(&key, "old".to_owned(), &opts).await.expect("set");
    tokio::time::sleep(Duration::from_millis(300)).await; // expired, still stale-servable
    let loads = Arc::new(AtomicUsize::new(0));
    let refresh = |value: &'static str| {
        let loads = Arc::clone(&loads);
        move || async move {
            loads.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::io::Error>(value.to_owned())
        }
    };
    let got = a
        .get_or_load(&key, &opts, refresh("new"))
        .await
        .expect("stale");
    assert_eq!(*got, "old", "stale-while-revalidate on the holder");
    support::until("a's refresh holds the lock", || {
        support::exists(&server, "fleet:{item:v1:11}#lock")
    })
    .await;
    let started = Instant::now();
    let got = b
        .get_or_load(&key, &opts, refresh("b's"))
        .await
        .expect("stale");
    println!("b served the stale value in {:?}", started.elapsed());
    assert_eq!(*got, "old");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "b did not wait for a's load"
    );
    support::until("a's refresh is stored", || {
        loads.load(SeqCst) == 1 && !lock_held(&server, "fleet:{item:v1:11}#lock")
    })
    .await;
    let got = b
        .get_or_load(&key, &opts, refresh("b's"))
        .await
        .expect("fresh");
    assert_eq!(*got, "new", "b reads a's refresh from Redis");
    assert_eq!(loads.load(SeqCst), 1, "b never loaded");
}
