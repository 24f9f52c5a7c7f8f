//! Single-flight across the loading methods.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{cache_on, server};
use tiered_cache::{EntryOptions, Key};
use tokio::sync::Notify;

fn item(id: u64) -> Key<String> {
    Key::new("item", 1).arg(id)
}

/// `get_or_load` that joins a `try_get_or_load` whose loader finds nothing
/// gets a value: it runs its own loader (it used to get an internal error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_load_joining_a_load_that_found_nothing_runs_its_own() {
    let server = server();
    let cache = cache_on(&server, "sf-none").await;
    let key = item(1);
    let opts = EntryOptions::new(Duration::from_secs(60));
    let (gate, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let finder = {
        let (cache, key, opts) = (cache.clone(), key.clone(), opts.clone());
        let (gate, started) = (Arc::clone(&gate), Arc::clone(&started));
        tokio::spawn(async move {
            cache
                .try_get_or_load(&key, &opts, move || async move {
                    started.notify_one();
                    gate.notified().await;
                    Ok::<Option<String>, std::io::Error>(None)
                })
                .await
        })
    };
    started.notified().await;
    let wanter = {
        let (cache, key, opts) = (cache.clone(), key.clone(), opts.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&key, &opts, || async {
                    Ok::<_, std::io::Error>("mine".to_owned())
                })
                .await
        })
    };
    common::until("the second caller waits", || {
        cache.stats().coalesced_waits == 1
    })
    .await;
    gate.notify_one();
    assert!(finder.await.unwrap().expect("no error").is_none());
    let got = wanter
        .await
        .unwrap()
        .expect("a value, not an internal error");
    assert_eq!(*got, "mine");
}
