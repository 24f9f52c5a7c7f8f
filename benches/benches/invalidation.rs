//! Invalidation latency: another instance overwrites a key; how long until
//! this instance returns the new value.
//!
//! One testkit `redis-server`, one 2-worker runtime, three sides measured in
//! the same run with their trials interleaved (they take turns at going first):
//! - `tiered` (ours): two `TieredCache` instances on the Redis with the
//!   backplane on. B holds the key in L1 (checked: its read before the trial
//!   is an L1 hit); A `set`s a new value; B polls `get` until it returns it.
//! - `redis_tracking`: redis-rs's client-side cache (feature `cache-aio`,
//!   RESP3 `CLIENT TRACKING ON`). B is a connection with the cache that
//!   holds the key (checked: its read before the trial is a client-cache
//!   hit); A is a plain connection that SETs the new bytes; B polls GET +
//!   postcard decode until it returns the new value.
//! - `raw_pubsub`: the floor of any cache kept coherent by pub/sub (ours
//!   included), written by hand on raw redis-rs: B keeps decoded values in a
//!   locked `HashMap` and a subscriber task drops a key when a message names
//!   it; A sends SET and PUBLISH in one pipeline (one round trip, no
//!   compare-and-set) and, like every instance of such a cache, is
//!   subscribed to the channel too, so it receives its own message.
//!
//! B's poller is a task started before the write; it yields between reads,
//! so the writer, the connections' drivers and the backplane keep running.
//! Per trial it records, from just before A's write:
//! - `A's write call`: until A's write returned (its ack);
//! - `visible`: until B's first read that returns the new value ended;
//! - `after ack`: the same from when A's write returned (0 if B saw the new
//!   value before A's write returned);
//! - `stale after ack`: whether a read of B that *began* after A's write
//!   returned still gave the old value, and then how long after the ack
//!   that last stale read ended: the stale-read window.
//!
//! A plain `main` rather than criterion: each trial is one event timed
//! once, and the figures wanted are its distribution (p50 / p99 / max over
//! 200 trials); criterion times a repeatable routine by its mean over
//! batches of iterations, and cannot interleave the sides trial by trial.
//!
//! `cargo bench -p tiered-cache-benches --bench invalidation` (about 2 s
//! once built; `-- --quick` runs the same 200 trials).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, TieredCache};

use common::{product, product_bytes, Product};

const TRIALS: usize = 200;
/// A trial whose new value has not shown up by then counts as failed.
const GIVE_UP: Duration = Duration::from_secs(2);
/// Pause between trials, so that one trial's messages are all delivered
/// before the next starts.
const SETTLE: Duration = Duration::from_millis(2);

/// One trial's timings.
#[derive(Debug, Clone, Copy)]
struct Trial {
    /// A's write call, from its start until it returned.
    write: Duration,
    visible: Duration,
    after_ack: Duration,
    /// How long after the ack the last stale read ended, if a read that
    /// began after the ack was stale.
    stale_window: Option<Duration>,
    /// Reads of B during the trial, the final one included.
    reads: u32,
}

/// What the poller saw: when its first read of the new value ended, when
/// its last read of an old value began and ended, and how many reads.
struct Seen {
    at: Instant,
    last_stale: Option<(Instant, Instant)>,
    reads: u32,
}

/// Polls `read` (which returns the value's id) until it gives `want`.
async fn poll_until<F, Fut>(want: u64, mut read: F) -> Option<Seen>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<u64>>,
{
    let deadline = Instant::now() + GIVE_UP;
    let (mut last_stale, mut reads) = (None, 0);
    loop {
        let began = Instant::now();
        let id = read().await;
        let ended = Instant::now();
        reads += 1;
        if id == Some(want) {
            return Some(Seen {
                at: ended,
                last_stale,
                reads,
            });
        }
        last_stale = Some((began, ended));
        if ended > deadline {
            return None;
        }
        tokio::task::yield_now().await;
    }
}

/// Runs one trial: starts the poller, then `write`, and puts the times
/// together. `None` when the new value did not show up within `GIVE_UP`.
async fn trial<P, W>(poller: P, write: W) -> Option<Trial>
where
    P: std::future::Future<Output = Option<Seen>> + Send + 'static,
    W: std::future::Future<Output = ()>,
{
    let poller = tokio::spawn(poller);
    // Let the poller start reading (the old value) before the write.
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    write.await;
    let ack = Instant::now();
    let seen = poller.await.expect("poller task")?;
    let stale_window = seen
        .last_stale
        .filter(|&(began, _)| began > ack)
        .map(|(_, ended)| ended - ack);
    Some(Trial {
        write: ack - t0,
        visible: seen.at - t0,
        after_ack: seen.at.saturating_duration_since(ack),
        stale_window,
        reads: seen.reads,
    })
}

/// Reads (with `b_read`: B's id for the key, and whether B answered from
/// its local copy) until B holds `v - 1` locally: the copy that trial
/// `v`'s write must make it drop. The last write's invalidation may still
/// be on its way and drop a copy read back once more, hence the retries.
async fn hold_old<F, Fut>(side: &str, v: u64, mut b_read: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (Option<u64>, bool)>,
{
    let mut last = (None, false);
    for _ in 0..1_000 {
        last = b_read().await;
        if last == (Some(v - 1), true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{side}: B must hold the old value locally before trial {v}, read {last:?}");
}

/// Ours: A writes, B (holding the key in L1) reads.
struct Tiered {
    a: TieredCache,
    b: TieredCache,
    key: Key<Product>,
    opts: EntryOptions,
}

impl Tiered {
    async fn new(url: &str) -> Self {
        let t = Tiered {
            a: common::redis_cache(url, 64 << 20).await,
            b: common::redis_cache(url, 64 << 20).await,
            key: Key::<Product>::new("invalidation", 1).arg(0),
            opts: EntryOptions::new(Duration::from_secs(3600)),
        };
        t.a.set(&t.key, product(0), &t.opts).await.expect("set");
        t
    }

    /// B's id for the key, and whether B answered it from L1.
    async fn b_read(&self) -> (Option<u64>, bool) {
        let before = self.b.stats().l1_hits;
        let id = self.b.get(&self.key).await.map(|p| p.id);
        (id, self.b.stats().l1_hits > before)
    }

    async fn trial(&self, v: u64) -> Option<Trial> {
        hold_old("tiered", v, || self.b_read()).await;
        let (b, key) = (self.b.clone(), self.key.clone());
        let poller = async move {
            poll_until(v, || {
                let (b, key) = (&b, &key);
                async move { b.get(key).await.map(|p| p.id) }
            })
            .await
        };
        let write = async {
            self.a
                .set(&self.key, product(v), &self.opts)
                .await
                .expect("set");
        };
        trial(poller, write).await
    }
}

/// redis-rs's tracking: A SETs on a plain connection, B reads through its
/// client-side cache.
struct Tracking {
    a: redis::aio::MultiplexedConnection,
    b: redis::aio::MultiplexedConnection,
    key: String,
}

impl Tracking {
    async fn new(url: &str) -> Self {
        let mut t = Tracking {
            a: common::raw_connection(url).await,
            b: common::client_cache_connection(url, 1_000).await,
            key: "raw:invalidation".to_owned(),
        };
        t.set(0).await;
        t
    }

    async fn set(&mut self, v: u64) {
        redis::cmd("SET")
            .arg(&self.key)
            .arg(product_bytes(v))
            .query_async::<()>(&mut self.a)
            .await
            .expect("SET");
    }

    fn stats(&self) -> redis::caching::CacheStatistics {
        self.b
            .get_cache_statistics()
            .expect("B has the client-side cache")
    }

    /// B's id for the key, and whether B answered it from its cache.
    async fn b_read(&self) -> (Option<u64>, bool) {
        let before = self.stats().hit;
        let id = common::get_decode(&mut self.b.clone(), &self.key)
            .await
            .map(|p| p.id);
        (id, self.stats().hit > before)
    }

    async fn trial(&self, v: u64) -> Option<Trial> {
        hold_old("redis tracking", v, || self.b_read()).await;
        let (b, key) = (self.b.clone(), self.key.clone());
        let poller = async move {
            poll_until(v, || {
                // A handle per read (a few reference counts): the future
                // cannot borrow the closure's own handle mutably.
                let (mut b, key) = (b.clone(), &key);
                async move { common::get_decode(&mut b, key).await.map(|p| p.id) }
            })
            .await
        };
        let mut a = self.a.clone();
        let (key, bytes) = (self.key.clone(), product_bytes(v));
        let write = async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(bytes)
                .query_async::<()>(&mut a)
                .await
                .expect("SET");
        };
        trial(poller, write).await
    }
}

/// The channel of the hand-written pub/sub side.
const CHANNEL: &str = "raw:invalidations";

/// A hand-written pub/sub two-tier read: a local map in front of Redis,
/// dropped from by a subscriber task (see the module docs).
struct PubSub {
    a: redis::aio::MultiplexedConnection,
    b: redis::aio::MultiplexedConnection,
    b_local: Arc<Mutex<HashMap<String, Arc<Product>>>>,
    key: String,
    /// Messages each subscriber has received: A's own, B's.
    heard: Arc<[std::sync::atomic::AtomicU64; 2]>,
}

impl PubSub {
    async fn new(url: &str) -> Self {
        let b_local = Arc::new(Mutex::new(HashMap::new()));
        let heard: Arc<[std::sync::atomic::AtomicU64; 2]> = Arc::new(Default::default());
        for side in 0..2 {
            let client = redis::Client::open(url).expect("a Redis URL");
            let mut sub = client
                .get_async_pubsub()
                .await
                .expect("a pub/sub connection");
            sub.subscribe(CHANNEL).await.expect("SUBSCRIBE");
            let (local, heard) = (Arc::clone(&b_local), Arc::clone(&heard));
            tokio::spawn(async move {
                let mut messages = sub.into_on_message();
                while let Some(msg) = messages.next().await {
                    heard[side].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if side == 1 {
                        let key: String = msg.get_payload().expect("a key");
                        local.lock().expect("B's map").remove(&key);
                    }
                }
            });
        }
        let t = PubSub {
            a: common::raw_connection(url).await,
            b: common::raw_connection(url).await,
            b_local,
            key: "raw:pubsub".to_owned(),
            heard,
        };
        write_and_publish(t.a.clone(), t.key.clone(), 0).await;
        t
    }

    /// B's id for the key, and whether B answered it from its map.
    async fn b_read(&self) -> (Option<u64>, bool) {
        let read = read_through(&self.b_local, self.b.clone(), &self.key).await;
        (read.0.map(|p| p.id), read.1)
    }

    async fn trial(&self, v: u64) -> Option<Trial> {
        hold_old("raw pub/sub", v, || self.b_read()).await;
        let (local, b, key) = (Arc::clone(&self.b_local), self.b.clone(), self.key.clone());
        let poller = async move {
            poll_until(v, || {
                let (local, b, key) = (&local, b.clone(), &key);
                async move { read_through(local, b, key).await.0.map(|p| p.id) }
            })
            .await
        };
        trial(
            poller,
            write_and_publish(self.a.clone(), self.key.clone(), v),
        )
        .await
    }
}

/// A's write on the hand-written side: SET and PUBLISH in one pipeline.
async fn write_and_publish(mut a: redis::aio::MultiplexedConnection, key: String, v: u64) {
    redis::pipe()
        .cmd("SET")
        .arg(&key)
        .arg(product_bytes(v))
        .ignore()
        .cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(&key)
        .ignore()
        .query_async::<()>(&mut a)
        .await
        .expect("SET + PUBLISH");
}

/// B's read on the hand-written side: the map, else GET + decode, kept.
/// Returns the value and whether the map answered.
async fn read_through(
    local: &Mutex<HashMap<String, Arc<Product>>>,
    mut conn: redis::aio::MultiplexedConnection,
    key: &str,
) -> (Option<Arc<Product>>, bool) {
    if let Some(hit) = local.lock().expect("B's map").get(key) {
        return (Some(Arc::clone(hit)), true);
    }
    // (A message that lands between this GET and the insert would leave
    // the old value in the map: the race a hand-written cache usually has,
    // and which costs nothing here, where only the new value is written.)
    let value = common::get_decode(&mut conn, key).await.map(Arc::new);
    if let Some(v) = &value {
        local
            .lock()
            .expect("B's map")
            .insert(key.to_owned(), Arc::clone(v));
    }
    (value, false)
}

fn percentiles(name: &str, what: &str, mut d: Vec<Duration>) {
    d.sort_unstable();
    let ns: Vec<u64> = d.iter().map(|d| d.as_nanos() as u64).collect();
    println!(
        "| {name} | {what} | {:.1?} | {:.1?} | {:.1?} |",
        common::quantile(&ns, 0.5),
        common::quantile(&ns, 0.99),
        ns.last()
            .map_or(Duration::ZERO, |&n| Duration::from_nanos(n)),
    );
}

fn report(name: &str, trials: &[Option<Trial>]) {
    let ok: Vec<Trial> = trials.iter().flatten().copied().collect();
    let failed = trials.len() - ok.len();
    percentiles(name, "A's write call", ok.iter().map(|t| t.write).collect());
    percentiles(
        name,
        "visible (from write start)",
        ok.iter().map(|t| t.visible).collect(),
    );
    percentiles(
        name,
        "after ack (from write return)",
        ok.iter().map(|t| t.after_ack).collect(),
    );
    let windows: Vec<Duration> = ok.iter().filter_map(|t| t.stale_window).collect();
    let stale = windows.len();
    percentiles(
        name,
        &format!("stale-read window, {stale} of {} trials", ok.len()),
        windows,
    );
    let mut reads: Vec<u32> = ok.iter().map(|t| t.reads).collect();
    reads.sort_unstable();
    println!(
        "[invalidation {name}] {} trials, {failed} failed (no new value within {GIVE_UP:?}); \
         B's reads per trial: median {}, max {}",
        trials.len(),
        reads.get(reads.len() / 2).copied().unwrap_or(0),
        reads.last().copied().unwrap_or(0),
    );
    if failed > 0 {
        println!("[invalidation {name}] WARNING: {failed} trials never saw the new value");
    }
}

fn main() {
    let server = RedisServer::start().expect("redis-server for the invalidation bench");
    let url = server.url();
    let rt = common::multi_thread(2);
    rt.block_on(async {
        let tiered = Tiered::new(&url).await;
        let tracking = Tracking::new(&url).await;
        let pubsub = PubSub::new(&url).await;
        // Warm-up trials, not recorded: connections, backplane, allocator.
        let mut v = 1;
        for _ in 0..10 {
            tiered.trial(v).await;
            tracking.trial(v).await;
            pubsub.trial(v).await;
            v += 1;
        }
        let (mut ours, mut theirs, mut floor) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..TRIALS {
            // The three sides take turns at going first.
            for k in 0..3 {
                tokio::time::sleep(SETTLE).await;
                match (i + k) % 3 {
                    0 => ours.push(tiered.trial(v).await),
                    1 => theirs.push(tracking.trial(v).await),
                    _ => floor.push(pubsub.trial(v).await),
                }
            }
            v += 1;
        }
        println!(
            "[invalidation] {TRIALS} interleaved trials per side; another instance overwrites, \
             this one polls until it reads the new value"
        );
        println!("| side | time | p50 | p99 | max |\n|---|---|---|---|---|");
        report("tiered", &ours);
        report("redis_tracking", &theirs);
        report("raw_pubsub", &floor);
        let st = tiered.b.stats();
        println!(
            "[invalidation tiered] B: invalidations_received={} l1_hits={} l2_hits={} misses={} \
             backplane_gaps={} l2_errors={}; A: backplane_published={}",
            st.invalidations_received,
            st.l1_hits,
            st.l2_hits,
            st.misses,
            st.backplane_gaps,
            st.l2_errors,
            tiered.a.stats().backplane_published,
        );
        let cs = tracking.stats();
        println!(
            "[invalidation redis_tracking] B: hits={} misses={} invalidations={}",
            cs.hit, cs.miss, cs.invalidate
        );
        println!(
            "[invalidation raw_pubsub] messages heard: A (its own) {}, B {}",
            pubsub.heard[0].load(std::sync::atomic::Ordering::Relaxed),
            pubsub.heard[1].load(std::sync::atomic::Ordering::Relaxed),
        );
    });
    drop(rt);
    drop(server);
}
