//! A second process for the cross-process coherence test
//! (`examples/tests/coherence_processes.rs`): one `TieredCache` on the given
//! Redis and namespace, driven by one command per line on stdin, answering
//! one line per command on stdout.
//!
//! ```text
//! coherence_peer <redis-url> <namespace>
//!   get <id>            -> "value <v> l1" | "value <v> l2" | "miss"
//!   set <id> <v>        -> "ok"            (tagged "items")
//!   invalidate <id>     -> "ok"
//!   tag <tag>           -> "ok"            (invalidate_tag)
//!   clear               -> "ok"
//!   received <n>        -> "received <count> <unix µs when seen>" once at least
//!                          n invalidations were applied, or "timeout" after 10 s
//!   stats               -> "stats <received> <gaps> <l1 hits> <l2 hits>"
//!   quit
//! ```
//! Items are `Key::<u64>::new("item", 1).arg(id)`.

use std::io::BufRead;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tiered_cache::{EntryOptions, Key, TieredCache};

fn item(id: u64) -> Key<u64> {
    Key::new("item", 1).arg(id)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(namespace)) = (args.next(), args.next()) else {
        return Err("usage: coherence_peer <redis-url> <namespace>".into());
    };
    let cache = TieredCache::builder()
        .namespace(namespace)
        .redis(url)
        .require_l2(true)
        .build()
        .await?;
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    println!("ready");
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["quit"] => break,
            ["get", id] => get(&cache, id.parse()?).await,
            ["set", id, v] => {
                let opts = EntryOptions::new(Duration::from_secs(300)).tag("items");
                cache
                    .set(&item(id.parse()?), v.parse::<u64>()?, &opts)
                    .await?;
                "ok".to_owned()
            }
            ["invalidate", id] => {
                cache.invalidate(&item(id.parse()?)).await?;
                "ok".to_owned()
            }
            ["tag", tag] => {
                cache.invalidate_tag(tag).await?;
                "ok".to_owned()
            }
            ["clear"] => {
                cache.clear().await?;
                "ok".to_owned()
            }
            ["received", n] => received(&cache, n.parse()?).await,
            ["stats"] => {
                let s = cache.stats();
                format!(
                    "stats {} {} {} {}",
                    s.invalidations_received, s.backplane_gaps, s.l1_hits, s.l2_hits
                )
            }
            _ => format!("unknown command: {line}"),
        };
        println!("{reply}");
    }
    Ok(())
}

async fn get(cache: &TieredCache, id: u64) -> String {
    let l1_hits = cache.stats().l1_hits;
    match cache.get(&item(id)).await {
        Some(v) if cache.stats().l1_hits > l1_hits => format!("value {v} l1"),
        Some(v) => format!("value {v} l2"),
        None => "miss".to_owned(),
    }
}

/// Waits (spinning, to time the arrival closely) until `n` invalidations
/// were applied; the counter moves after the L1 drop.
async fn received(cache: &TieredCache, n: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let count = cache.stats().invalidations_received;
        if count >= n {
            let micros = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            return format!("received {count} {micros}");
        }
        if Instant::now() > deadline {
            return "timeout".to_owned();
        }
        tokio::task::yield_now().await;
    }
}
