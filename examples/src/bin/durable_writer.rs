//! The writer process of `tests/durable_write_behind.rs`: puts `COUNT`
//! writes over `IDS` ids through a durable write-behind entity and prints
//! `acked ID SEQ` once each `put` has returned, until it is killed. Not
//! meant to be run by hand.
//!
//! Usage: `durable_writer REDIS_URL SQLITE_PATH NAMESPACE COUNT IDS`

use std::io::Write;
use std::time::Duration;

use tiered_cache::write::{WriteBehind, WritePolicy};
use tiered_cache::TieredCache;
use tiered_cache_examples::sqlite::Db;
use tiered_cache_examples::Counter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, path, namespace, count, ids] = args.as_slice() else {
        return Err("usage: durable_writer REDIS_URL SQLITE_PATH NAMESPACE COUNT IDS".into());
    };
    let (count, ids): (u64, u64) = (count.parse()?, ids.parse()?);
    let cache = TieredCache::builder()
        .namespace(namespace.as_str())
        .redis(url.as_str())
        .require_l2(true)
        .build()
        .await?;
    let table = Db::open(path)?.table::<Counter>()?;
    let policy = WritePolicy::WriteBehind(
        WriteBehind::new()
            .durable(true)
            .consumer("writer")
            .flush_interval(Duration::from_millis(20)),
    );
    let counters = cache.entity_with(table, policy)?;
    let mut out = std::io::stdout().lock();
    for seq in 0..count {
        let id = seq % ids;
        counters.put(&id, Counter { seq }).await?;
        writeln!(out, "acked {id} {seq}")?;
    }
    out.flush()?;
    counters.shutdown().await;
    writeln!(out, "done")?;
    Ok(())
}
