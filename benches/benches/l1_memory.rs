//! P12: what L1 costs in memory against `l1_max_bytes`, at 10x overfill.
//!
//! `cargo bench -p tiered-cache-benches --bench l1_memory` runs every
//! shape, each step in a fresh process of this binary (freed memory is not
//! reliably returned to the OS, so one shape's garbage would hide the next
//! one's growth):
//!
//! 1. `calibrate <shape>`: holds 100k distinct values as `Arc`s in a `Vec`
//!    and reads the RSS growth per value: what one value really costs.
//! 2. `fill <shape> <n>`: an L1-only cache bounded at 64 MiB gets `n`
//!    `set`s of distinct keys, `n` chosen so the values alone come to ten
//!    times the bound (at most 2M); then `l1_weighted_size()` (which runs
//!    moka's pending maintenance) and the RSS growth since the cache was
//!    built, from `/proc/self/statm`; then a `get` of every key counts the
//!    live entries.
//!
//! Shapes: `struct` (the ~200-byte `Product` of the other benches),
//! `vec_u64` (100 `u64`s below 128, one byte each in postcard), `hashmap`
//! (`HashMap<String, u32>`, 16 entries), `btreemap` (`BTreeMap<u32, u64>`,
//! 32 entries) and `tiny` (a `u64`: what an entry costs beyond its value).
//! The table printed at the end is the one in `benches/README.md`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tiered_cache::{EntryOptions, Key, TieredCache};

const BOUND: u64 = 64 << 20;
const OVERFILL: u64 = 10;
const CALIBRATION: usize = 100_000;
const MAX_SETS: u64 = 2_000_000;
const SHAPES: [&str; 5] = ["struct", "vec_u64", "hashmap", "btreemap", "tiny"];

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm's resident field");
    pages * 4096
}

fn vec_u64(i: u64) -> Vec<u64> {
    (0..100).map(|j| (i + j) % 128).collect()
}

fn hashmap(i: u64) -> HashMap<String, u32> {
    (0..16)
        .map(|j| (format!("field-{j:02}"), (i + j) as u32))
        .collect()
}

fn btreemap(i: u64) -> BTreeMap<u32, u64> {
    (0..32).map(|j| (j as u32, i * 32 + j)).collect()
}

fn tiny(i: u64) -> u64 {
    i
}

/// Runs `f` with the shape's value maker.
macro_rules! with_shape {
    ($shape:expr, $f:ident ($($arg:expr),*)) => {
        match $shape {
            "struct" => $f(common::product $(, $arg)*),
            "vec_u64" => $f(vec_u64 $(, $arg)*),
            "hashmap" => $f(hashmap $(, $arg)*),
            "btreemap" => $f(btreemap $(, $arg)*),
            "tiny" => $f(tiny $(, $arg)*),
            other => panic!("unknown shape {other}; one of {SHAPES:?}"),
        }
    };
}

fn calibrate<V>(make: fn(u64) -> V) {
    let mut held: Vec<Arc<V>> = Vec::with_capacity(CALIBRATION);
    let before = rss();
    for i in 0..CALIBRATION as u64 {
        held.push(Arc::new(make(i)));
    }
    let grown = rss() - before;
    // The `Vec` of pointers was allocated before `before`.
    println!("{}", grown / CALIBRATION as u64);
}

fn fill<V>(make: fn(u64) -> V, n: u64)
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let cache = TieredCache::builder()
            .l1_max_bytes(BOUND)
            .default_ttl(Duration::from_secs(3600))
            .build()
            .await
            .expect("an L1-only cache");
        let opts = EntryOptions::default();
        let before = rss();
        let started = Instant::now();
        let mut first = 0;
        for i in 0..n {
            let key = Key::<V>::new("mem", 1).arg(format!("{i:09}"));
            cache.set(&key, make(i), &opts).await.expect("a set");
            if i == 0 {
                first = cache.l1_weighted_size().await;
            }
        }
        let weighted = cache.l1_weighted_size().await;
        let grown = rss() - before;
        let secs = started.elapsed().as_secs_f64();
        let mut live = 0_u64;
        for i in 0..n {
            let key = Key::<V>::new("mem", 1).arg(format!("{i:09}"));
            live += u64::from(cache.get(&key).await.is_some());
        }
        println!("{weighted} {grown} {first} {live} {secs:.1}");
    });
}

fn child(args: &[&str]) -> String {
    let exe = std::env::current_exe().expect("this binary");
    let out = Command::new(exe).args(args).output().expect("a child run");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["calibrate", shape] => with_shape!(*shape, calibrate()),
        ["fill", shape, n] => {
            let n: u64 = n.parse().expect("a count");
            with_shape!(*shape, fill(n))
        }
        rest => {
            let shapes: Vec<&str> = if rest.is_empty() {
                SHAPES.to_vec()
            } else {
                rest.to_vec()
            };
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            println!(
                "bound {} MiB, inserts {OVERFILL}x the bound by calibrated value size",
                BOUND >> 20
            );
            println!(
                "| shape | value (calibrated) | entries set | weight of one entry | weighted / bound | RSS growth / bound | live entries | RSS growth per live entry |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for shape in shapes {
                let per_value: u64 = child(&["calibrate", shape]).parse().expect("bytes");
                // Tiny values: enough to overfill by weight, not by value.
                let n = (OVERFILL * BOUND / per_value.max(1)).min(MAX_SETS);
                let out = child(&["fill", shape, &n.to_string()]);
                let mut fields = out.split_whitespace();
                let weighted: u64 = fields
                    .next()
                    .and_then(|f| f.parse().ok())
                    .expect("weighted");
                let grown: u64 = fields.next().and_then(|f| f.parse().ok()).expect("rss");
                let first: u64 = fields.next().and_then(|f| f.parse().ok()).expect("weight");
                let live: u64 = fields.next().and_then(|f| f.parse().ok()).expect("live");
                let secs = fields.next().unwrap_or("?");
                println!(
                    "| {shape} | {per_value} B | {n} ({secs} s) | {first} B | {:.1} MiB / {} = {:.2} | {:.1} MiB / {} = {:.2} | {live} | {} B |",
                    mib(weighted),
                    BOUND >> 20,
                    weighted as f64 / BOUND as f64,
                    mib(grown),
                    BOUND >> 20,
                    grown as f64 / BOUND as f64,
                    grown / live.max(1),
                );
            }
        }
    }
}
