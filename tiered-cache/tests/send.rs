//! Every public future is `Send`, so the cache can be used from
//! `tokio::spawn` and multi-threaded servers. This file fails to compile
//! when one is not.

use std::time::Duration;

use tiered_cache::{EntryOptions, Key, TieredCache};

fn is_send<T: Send>(_: T) {}

#[derive(serde::Serialize, serde::Deserialize)]
struct Product {
    id: u64,
}

#[tokio::test]
async fn futures_are_send() {
    let builder = TieredCache::builder()
        .namespace("send")
        .default_ttl(Duration::from_secs(60));
    is_send(builder.clone().build());

    let cache = builder.build().await.unwrap();
    let key = Key::<Product>::new("product", 1).arg(1);
    let keys = vec![key.clone(), Key::new("product", 1).arg(2)];
    let opts = EntryOptions::new(Duration::from_secs(60)).tag("products");

    is_send(cache.get(&key));
    is_send(cache.get_many(&keys));
    is_send(cache.set(&key, Product { id: 1 }, &opts));
    is_send(cache.invalidate(&key));
    is_send(cache.invalidate_tag("products"));
    is_send(cache.invalidate_tags(["products", "category:7"]));
    is_send(cache.clear());
    is_send(cache.get_or_load(&key, &opts, || async {
        Ok::<_, std::io::Error>(Product { id: 1 })
    }));
    is_send(cache.try_get_or_load(&key, &opts, || async {
        Ok::<_, std::io::Error>(None::<Product>)
    }));
    is_send(cache.l1_weighted_size());
    // An error type that is only `Send + Sync` through a trait object.
    type Boxed = Box<dyn std::error::Error + Send + Sync>;
    is_send(cache.get_or_load(&key, &opts, || async {
        Err::<Product, Boxed>("db down".into())
    }));

    // The futures are also usable where it matters: on a spawned task.
    let task = tokio::spawn(async move {
        cache
            .get_or_load(&key, &opts, || async {
                Ok::<_, std::io::Error>(Product { id: 7 })
            })
            .await
            .map(|p| p.id)
            .ok()
    });
    assert_eq!(task.await.unwrap(), Some(7));
}

/// A `#[cached]` function's future is `Send` too, so it can be spawned.
/// (Known gap: with `Box<dyn Error + Send + Sync>` as the error type, rustc
/// reports "implementation of `Send` is not general enough"; see the note
/// on the reshaping issue.)
#[cfg(feature = "macros")]
#[tokio::test]
async fn cached_functions_are_send() {
    let cache = TieredCache::builder().build().await.unwrap();

    #[tiered_cache::cached(key = "{id}", ttl = "1m", cache = cache)]
    async fn boxed(cache: &TieredCache, id: u64) -> Result<u64, std::io::Error> {
        let _ = cache;
        Ok(id)
    }

    is_send(boxed(&cache, 1));
    let spawned = tokio::spawn(async move { boxed(&cache, 2).await.ok() });
    assert_eq!(spawned.await.unwrap(), Some(2));
}
