//! `rediss://` with the `tls` feature, against a TLS-only redis-server;
//! plain `redis://` needs no switch at all (every other test uses it).

use std::time::Duration;

use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, TieredCache};

#[tokio::test]
async fn rediss_urls_reach_a_tls_only_server() {
    let server = RedisServer::start_tls().expect("a TLS redis-server (needs openssl)");
    assert!(server.url().starts_with("rediss://"));
    let build = || async {
        TieredCache::builder()
            .namespace("tls")
            .redis(server.url())
            .l2_timeout(Duration::from_secs(2))
            .require_l2(true)
            .build()
            .await
            .expect("connects over TLS")
    };
    let (writer, reader) = (build().await, build().await);
    let key = Key::<String>::new("greeting", 1).arg("tls");
    writer
        .set(
            &key,
            "over tls".to_owned(),
            &EntryOptions::new(Duration::from_secs(30)),
        )
        .await
        .expect("set");
    let read = reader
        .get(&key)
        .await
        .expect("the reader finds it in Redis");
    assert_eq!(*read, "over tls");
    let stats = reader.stats();
    assert_eq!((stats.l2_hits, stats.l2_errors), (1, 0), "{stats:?}");
}
