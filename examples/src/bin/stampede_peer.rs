//! One process of `tests/fleet_processes.rs`: a `TieredCache` whose 250
//! callers ask for one cold key at once, with or without the fleet lock.
//! Prints `ready`, waits for `go` on stdin, then prints
//! `loads N served M` (its own loader calls, and callers that got the
//! value). Not meant to be run by hand.
//!
//! Usage: `stampede_peer REDIS_URL NAMESPACE KEY_ID lock|nolock`

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tiered_cache::{EntryOptions, Key, TieredCache};

const CALLERS: usize = 250;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, namespace, id, mode] = args.as_slice() else {
        return Err("usage: stampede_peer REDIS_URL NAMESPACE KEY_ID lock|nolock".into());
    };
    let cache = TieredCache::builder()
        .namespace(namespace.as_str())
        .redis(url.as_str())
        .require_l2(true)
        .build()
        .await?;
    let mut opts = EntryOptions::new(Duration::from_secs(300));
    if mode == "lock" {
        opts = opts.fleet_lock(Duration::from_secs(2));
    }
    let key: Key<String> = Key::new("stampede", 1).arg(id);
    println!("ready");
    std::io::stdout().flush()?;
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go)?;

    let loads = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (cache, key, opts, loads) =
                (cache.clone(), key.clone(), opts.clone(), Arc::clone(&loads));
            tokio::spawn(async move {
                let loaded = cache
                    .get_or_load(&key, &opts, move || async move {
                        loads.fetch_add(1, SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::io::Error>("the row".to_owned())
                    })
                    .await;
                matches!(loaded.as_deref().map(String::as_str), Ok("the row"))
            })
        })
        .collect();
    let mut served = 0;
    for caller in callers {
        served += usize::from(caller.await?);
    }
    println!("loads {} served {served}", loads.load(SeqCst));
    Ok(())
}
