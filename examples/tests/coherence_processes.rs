//! Coherence between two OS processes: this test's `TieredCache` and one in
//! a `coherence_peer` child process, on one test `redis-server`. Once the
//! other process has applied an invalidation, it reads the new value or a
//! miss, never the old one; in both directions. The time from a call here
//! to the drop there is printed (run with `--nocapture`), never asserted.
//!
//! The peer binary belongs to this package, so Cargo builds it for this
//! test and names it in `CARGO_BIN_EXE_coherence_peer`.

use std::io::{BufRead, BufReader, Lines, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, TieredCache};

const HANG: Duration = Duration::from_secs(15);

fn item(id: u64) -> Key<u64> {
    Key::new("item", 1).arg(id)
}

fn opts() -> EntryOptions {
    EntryOptions::new(Duration::from_secs(300)).tag("items")
}

fn unix_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros()
}

/// The child process and its pipes; killed when dropped.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    fn start(url: &str, namespace: &str) -> Peer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_coherence_peer"))
            .args([url, namespace])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start coherence_peer");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut peer = Peer {
            child,
            stdin,
            stdout,
        };
        assert_eq!(peer.line(), "ready");
        peer
    }

    fn line(&mut self) -> String {
        // Blocking pipe reads: let the runtime move its other tasks away.
        tokio::task::block_in_place(|| {
            self.stdout
                .next()
                .expect("the peer answered")
                .expect("a line")
        })
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to the peer");
        self.stdin.flush().expect("flush");
        self.line()
    }

    /// Waits until the peer applied `n` invalidations; when it saw them.
    fn received(&mut self, n: u64) -> u128 {
        let reply = self.ask(&format!("received {n}"));
        let words: Vec<&str> = reply.split(' ').collect();
        match words.as_slice() {
            ["received", _, micros] => micros.parse().expect("micros"),
            _ => panic!("the peer did not receive {n} invalidations: {reply}"),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn await_received(cache: &TieredCache, n: u64) {
    let deadline = Instant::now() + HANG;
    while cache.stats().invalidations_received < n {
        assert!(Instant::now() < deadline, "no invalidation arrived (hang)");
        tokio::task::yield_now().await;
    }
}

fn report(what: &str, mut micros: Vec<u128>) {
    micros.sort_unstable();
    let n = micros.len();
    println!(
        "{what}: call here -> drop in the other process over {n} runs: median {} µs, p99 {} µs",
        micros[n / 2],
        micros[(n * 99 / 100).min(n - 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_never_serve_the_old_value_after_the_message() {
    let server = RedisServer::start().expect("redis-server must be installed");
    let here = TieredCache::builder()
        .namespace("procs")
        .redis(server.url())
        .build()
        .await
        .expect("build");
    let mut peer = Peer::start(&server.url(), "procs");

    // This process writes; the peer reads.
    let mut expected = 0;
    let mut latencies = Vec::new();
    for round in 0..60_u64 {
        let key = item(round);
        here.set(&key, round, &opts()).await.expect("set");
        expected += 1;
        peer.received(expected);
        assert_eq!(
            peer.ask(&format!("get {round}")),
            format!("value {round} l2")
        );
        assert_eq!(
            peer.ask(&format!("get {round}")),
            format!("value {round} l1")
        );
        let called = unix_micros();
        let (kind, want) = match round % 3 {
            0 => {
                here.set(&key, round + 1_000, &opts()).await.expect("set");
                ("set", format!("value {} l2", round + 1_000))
            }
            1 => {
                here.invalidate(&key).await.expect("invalidate");
                ("invalidate", "miss".to_owned())
            }
            _ => {
                here.invalidate_tag("items").await.expect("invalidate_tag");
                ("invalidate_tag", "miss".to_owned())
            }
        };
        expected += 1;
        latencies.push(peer.received(expected).saturating_sub(called));
        assert_eq!(
            peer.ask(&format!("get {round}")),
            want,
            "{kind}, round {round}"
        );
    }
    report("set / invalidate / invalidate_tag", latencies);

    // The peer writes; this process reads.
    let key = item(1_000_000);
    assert_eq!(peer.ask("set 1000000 1"), "ok");
    await_received(&here, 1).await;
    assert_eq!(here.get(&key).await.as_deref(), Some(&1));
    let l1_hits = here.stats().l1_hits;
    assert_eq!(here.get(&key).await.as_deref(), Some(&1));
    assert_eq!(here.stats().l1_hits, l1_hits + 1, "held in L1 here");
    assert_eq!(peer.ask("set 1000000 2"), "ok");
    await_received(&here, 2).await;
    assert_eq!(here.get(&key).await.as_deref(), Some(&2));
    assert_eq!(peer.ask("tag items"), "ok");
    await_received(&here, 3).await;
    assert_eq!(here.get(&key).await, None);

    // A clear here empties the peer.
    here.set(&key, 3, &opts()).await.expect("set");
    expected += 1;
    peer.received(expected);
    assert_eq!(peer.ask("get 1000000"), "value 3 l2");
    here.clear().await.expect("clear");
    expected += 1;
    peer.received(expected);
    assert_eq!(peer.ask("get 1000000"), "miss");

    // Nothing was lost and no process heard itself.
    assert_eq!(
        peer.ask("stats").split(' ').take(3).collect::<Vec<_>>(),
        ["stats", &expected.to_string(), "0"]
    );
    assert_eq!(here.stats().invalidations_received, 3);
    assert_eq!(here.stats().backplane_gaps, 0);
}
