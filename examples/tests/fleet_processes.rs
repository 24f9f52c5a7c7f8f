//! Fleet-wide single-flight across OS processes: 4 processes x 250 callers
//! of one cold key on one real Redis load it once with the fleet lock, and
//! at most once per process without.

use std::io::{BufRead, BufReader, Lines, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use tiered_cache::testkit::RedisServer;

const PROCESSES: usize = 4;

struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    fn start(url: &str, key_id: &str, mode: &str) -> Peer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stampede_peer"))
            .args([url, "stampede", key_id, mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start stampede_peer");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = stdout.next().expect("a line").expect("utf-8");
        assert_eq!(ready, "ready");
        Peer {
            child,
            stdin,
            stdout,
        }
    }

    /// `(loads, served)` once its callers are done.
    fn result(mut self) -> (usize, usize) {
        let line = self.stdout.next().expect("a result").expect("utf-8");
        let words: Vec<&str> = line.split(' ').collect();
        let ["loads", loads, "served", served] = words.as_slice() else {
            panic!("unexpected: {line}");
        };
        assert!(self.child.wait().expect("exit").success());
        (loads.parse().unwrap(), served.parse().unwrap())
    }
}

/// Starts the processes, lets them go together, and sums their loads.
fn stampede(redis: &RedisServer, key_id: &str, mode: &str) -> usize {
    let mut peers: Vec<Peer> = (0..PROCESSES)
        .map(|_| Peer::start(&redis.url(), key_id, mode))
        .collect();
    for peer in &mut peers {
        writeln!(peer.stdin, "go").expect("go");
        peer.stdin.flush().expect("flush");
    }
    let mut loads = 0;
    for peer in peers {
        let (n, served) = peer.result();
        assert_eq!(served, 250, "every caller got the value");
        loads += n;
    }
    loads
}

#[test]
fn four_processes_load_a_cold_key_once_with_the_fleet_lock() {
    let redis = RedisServer::start().expect("redis");
    let with_lock = stampede(&redis, "locked", "lock");
    assert_eq!(with_lock, 1, "one load across 4 processes x 250 callers");
    let without = stampede(&redis, "unlocked", "nolock");
    assert!(
        (1..=PROCESSES).contains(&without),
        "at most one per process: {without}"
    );
    println!("loads with the fleet lock: {with_lock}; without: {without}");
}
