//! Bad bytes in Redis and a Redis that refuses writes: every read path treats
//! an unusable entry as a counted miss (never an error, never a panic) and
//! removes or overwrites it; an out-of-memory Redis costs the cache nothing
//! but the shared tier.
//!
//! The bad entries are planted with a real Redis (testkit) and read by a
//! cache with an empty L1, so the bytes really go through decoding.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{cache_on, conn, exists, key, opts, product, server, Product};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{BreakerSettings, EntryOptions, Key, TieredCache};

/// Where the cache in namespace `t` keeps `key` in Redis.
fn redis_key<V>(key: &Key<V>) -> String {
    support::redis_key("t", key)
}

/// What is planted under a key before a cache reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bad {
    /// Bytes that were never an entry.
    Garbage,
    /// A valid entry whose format byte is one version older.
    OlderFormat,
    /// A valid entry of another value type under the same entity and version.
    OtherType,
    /// A Redis list under the key (GET answers WRONGTYPE).
    List,
    /// A valid entry cut inside its header.
    TruncatedHeader,
    /// A valid entry cut inside its value bytes.
    TruncatedValue,
}

/// Writes a valid entry for `key` with a cache, then returns its raw bytes.
async fn valid_bytes(server: &RedisServer, key: &Key<Product>) -> Vec<u8> {
    let writer = cache_on(server, "t").await;
    writer.set(key, product(0), &opts()).await.unwrap();
    redis::cmd("GET")
        .arg(redis_key(key))
        .query(&mut conn(server))
        .unwrap()
}

fn put_raw(server: &RedisServer, redis_key: &str, bytes: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(redis_key)
        .arg(bytes)
        .query(&mut conn(server))
        .unwrap();
}

/// Plants `bad` under `key` and returns the Redis key.
async fn plant(bad: Bad, server: &RedisServer, key: &Key<Product>) -> String {
    let rk = redis_key(key);
    match bad {
        Bad::Garbage => put_raw(server, &rk, b"\xde\xad\xbe\xef not an entry"),
        Bad::OlderFormat => {
            let mut bytes = valid_bytes(server, key).await;
            bytes[0] = bytes[0].wrapping_sub(1);
            put_raw(server, &rk, &bytes);
        }
        Bad::OtherType => {
            // Same entity, version and argument, so the same Redis key.
            let as_string = Key::<String>::new("product", 1).arg(key_arg(key));
            assert_eq!(as_string.as_str(), key.as_str());
            let writer = cache_on(server, "t").await;
            writer
                .set(&as_string, "hello".to_owned(), &opts())
                .await
                .unwrap();
        }
        Bad::List => {
            let _: u64 = redis::cmd("RPUSH")
                .arg(&rk)
                .arg("a")
                .arg("b")
                .query(&mut conn(server))
                .unwrap();
        }
        Bad::TruncatedHeader => {
            let bytes = valid_bytes(server, key).await;
            put_raw(server, &rk, &bytes[..20]);
        }
        Bad::TruncatedValue => {
            let bytes = valid_bytes(server, key).await;
            put_raw(server, &rk, &bytes[..bytes.len() - 3]);
        }
    }
    assert!(exists(server, &rk), "planted");
    rk
}

/// The argument of a `key(id)` key: `{product:v1:ID}` -> `ID`.
fn key_arg(key: &Key<Product>) -> String {
    let body = key.as_str().trim_start_matches('{').trim_end_matches('}');
    body.rsplit(':').next().unwrap().to_owned()
}

async fn get_is_a_counted_miss(bad: Bad, server: &RedisServer) {
    let k = key(1);
    let rk = plant(bad, server, &k).await;
    let reader = cache_on(server, "t").await;

    assert!(reader.get(&k).await.is_none(), "{bad:?}: get is a miss");
    let s = reader.stats();
    assert_eq!(
        (s.decode_failures, s.misses, s.l2_hits),
        (1, 1, 0),
        "{bad:?}"
    );
    assert!(!exists(server, &rk), "{bad:?}: deleted from Redis");

    // The next reader meets a plain miss, not another failure.
    let next = cache_on(server, "t").await;
    assert!(next.get(&k).await.is_none());
    assert_eq!(next.stats().decode_failures, 0, "{bad:?}");
}

async fn get_or_load_loads_and_overwrites(bad: Bad, server: &RedisServer) {
    let k = key(2);
    plant(bad, server, &k).await;
    let reader = cache_on(server, "t").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let loaded = Product {
        id: 2,
        name: "from the loader".into(),
    };

    let c = Arc::clone(&calls);
    let l = loaded.clone();
    let v = reader
        .get_or_load(&k, &opts(), move || async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(l)
        })
        .await
        .unwrap_or_else(|e| panic!("{bad:?}: get_or_load must not fail: {e:?}"));
    assert_eq!(*v, loaded, "{bad:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{bad:?}: the loader ran");
    let s = reader.stats();
    assert_eq!(
        (s.decode_failures, s.loads, s.l2_hits),
        (1, 1, 0),
        "{bad:?}"
    );

    // Redis now holds the loader's value: a fresh cache reads it from there.
    let check = cache_on(server, "t").await;
    assert_eq!(check.get(&k).await.as_deref(), Some(&loaded), "{bad:?}");
    let s = check.stats();
    assert_eq!((s.l2_hits, s.decode_failures), (1, 0), "{bad:?}");
}

async fn get_many_is_a_miss_for_the_bad_key_only(bad: Bad, server: &RedisServer) {
    let (bad_key, good_key) = (key(3), key(4));
    let rk = plant(bad, server, &bad_key).await;
    cache_on(server, "t")
        .await
        .set(&good_key, product(4), &opts())
        .await
        .unwrap();

    let reader = cache_on(server, "t").await;
    let got = reader.get_many(&[bad_key.clone(), good_key]).await;
    assert!(got[0].is_none(), "{bad:?}: the bad key is a miss");
    assert_eq!(got[1].as_deref(), Some(&product(4)), "{bad:?}");
    let s = reader.stats();
    assert_eq!((s.l2_hits, s.misses), (1, 1), "{bad:?}");

    if bad == Bad::List {
        // MGET answers nil for a key of another Redis type, so get_many
        // cannot tell it from an absent key; the next single-key read
        // counts and deletes it.
        assert!(reader.get(&bad_key).await.is_none());
    }
    assert_eq!(reader.stats().decode_failures, 1, "{bad:?}");
    assert!(!exists(server, &rk), "{bad:?}: deleted from Redis");
}

async fn every_path(bad: Bad) {
    let server = server();
    get_is_a_counted_miss(bad, &server).await;
    get_or_load_loads_and_overwrites(bad, &server).await;
    get_many_is_a_miss_for_the_bad_key_only(bad, &server).await;
}

#[tokio::test]
async fn garbage_bytes() {
    every_path(Bad::Garbage).await;
}

#[tokio::test]
async fn an_older_format_version() {
    every_path(Bad::OlderFormat).await;
}

#[tokio::test]
async fn another_value_type_under_the_same_key() {
    every_path(Bad::OtherType).await;
}

#[tokio::test]
async fn a_key_holding_a_list() {
    every_path(Bad::List).await;
}

#[tokio::test]
async fn an_envelope_cut_in_its_header() {
    every_path(Bad::TruncatedHeader).await;
}

#[tokio::test]
async fn an_envelope_cut_in_its_value() {
    every_path(Bad::TruncatedValue).await;
}

/// Writes ever smaller values until Redis refuses even a tiny write (OOM).
fn fill_until_refused(c: &mut redis::Connection) {
    let mut n = 0u32;
    for size in [32 * 1024, 1024, 16] {
        let filler = vec![b'x'; size];
        loop {
            n += 1;
            assert!(n < 10_000, "Redis never refused a write");
            match redis::cmd("SET")
                .arg(format!("filler:{size}:{n}"))
                .arg(&filler)
                .query::<()>(c)
            {
                Ok(()) => {}
                Err(e) if e.to_string().contains("OOM") => break,
                Err(e) => panic!("unexpected error while filling Redis: {e}"),
            }
        }
    }
}

#[tokio::test]
async fn redis_out_of_memory_degrades_to_l1_and_the_loader() {
    let server =
        RedisServer::start_with(&["--maxmemory", "1mb", "--maxmemory-policy", "noeviction"])
            .expect("redis-server");
    let cache = cache_on(&server, "t").await;

    // Fill Redis until it refuses writes. Freed buffers can bring it back
    // under the limit, so it is topped up before each step below.
    let mut c = conn(&server);
    fill_until_refused(&mut c);

    // `set` succeeds: the value lives in L1, Redis's refusal is counted.
    cache.set(&key(1), product(1), &opts()).await.unwrap();
    let s = cache.stats();
    assert_eq!(s.l2_errors, 1, "the refused SET is counted");
    assert!(!exists(&server, &redis_key(&key(1))));
    assert_eq!(cache.get(&key(1)).await.as_deref(), Some(&product(1)));
    assert_eq!(cache.stats().l1_hits, 1);

    // An OOM reply is about its command: the breaker stays closed and the
    // next commands reach Redis: the GET answers (nil), the loader runs,
    // the SET is refused and counted.
    tokio::time::sleep(Duration::from_millis(700)).await;
    fill_until_refused(&mut c);
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let c = Arc::clone(&calls);
        let v = cache
            .get_or_load(&key(2), &opts(), move || async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(product(2))
            })
            .await
            .expect("an OOM Redis is not an error for the caller");
        assert_eq!(*v, product(2));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the second read hit L1");
    let s = cache.stats();
    assert_eq!(s.l2_errors, 2, "the refused SET of the load is counted");
    assert_eq!((s.loads, s.l1_hits), (1, 2));
    assert!(!exists(&server, &redis_key(&key(2))));
}

/// A codec of the application's own: JSON through serde_json. Failures
/// are reported with `Error::codec`.
struct Json;

impl tiered_cache::Codec for Json {
    const ID: u8 = 42;

    fn encode<V: serde::Serialize + ?Sized>(
        value: &V,
        out: &mut Vec<u8>,
    ) -> tiered_cache::Result<()> {
        serde_json::to_writer(out, value).map_err(tiered_cache::Error::codec)
    }

    fn decode<V: serde::de::DeserializeOwned>(bytes: &[u8]) -> tiered_cache::Result<V> {
        serde_json::from_slice(bytes).map_err(tiered_cache::Error::codec)
    }
}

/// A user codec works end to end, and its decode failure (a `String`
/// stored where a `Product` is read) is a counted miss, then a load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_codec_can_fail_and_its_failure_is_a_counted_miss() {
    let server = server();
    let writer = cache_on(&server, "t").await;
    let as_product = Key::<Product, Json>::new("json", 1).arg(1);
    writer
        .set(&as_product, product(1), &opts())
        .await
        .expect("set");
    let reader = cache_on(&server, "t").await;
    assert_eq!(reader.get(&as_product).await.as_deref(), Some(&product(1)));
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(format!("t:{}", as_product.as_str()))
        .query(&mut conn(&server))
        .expect("GET");
    assert!(
        raw.ends_with(br#"{"id":1,"name":"product 1"}"#),
        "JSON in Redis"
    );

    let as_text = Key::<String, Json>::new("json", 1).arg(2);
    writer
        .set(&as_text, "not a product".to_owned(), &opts())
        .await
        .expect("set");
    let clash = Key::<Product, Json>::new("json", 1).arg(2);
    let reader = cache_on(&server, "t").await;
    assert_eq!(reader.get(&clash).await, None);
    assert_eq!(reader.stats().decode_failures, 1, "{:?}", reader.stats());
    let loaded = reader
        .get_or_load(&clash, &opts(), || async {
            Ok::<_, std::io::Error>(product(2))
        })
        .await
        .expect("the loader stands in");
    assert_eq!(*loaded, product(2));
    let e = tiered_cache::Error::codec(serde_json::from_slice::<u8>(b"x").unwrap_err());
    assert!(e.is_codec() && std::error::Error::source(&e).is_some());
}

/// A runtime for a property test, whose cases each `block_on` it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn any_duration() -> impl proptest::strategy::Strategy<Value = Duration> {
    use proptest::prelude::*;
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(1)),
        (0..u64::MAX, 0..1_000_000_000_u32).prop_map(|(s, n)| Duration::new(s, n)),
        (0..600_000_u64).prop_map(Duration::from_millis),
    ]
}

/// Any duration a caller can pass, in every option and setting: never a
/// panic. Values that make no sense as a setting are a `Config` error at
/// `build`; everything else works (saturating where it must).
#[test]
fn every_duration_in_every_option_is_handled() {
    use proptest::prelude::*;
    let rt = runtime();
    let server = server();
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    let round = AtomicUsize::new(0);
    proptest!(config, |(
        d in proptest::collection::vec(any_duration(), 12),
        l1 in any::<bool>(),
        breaker in any::<bool>(),
        failures in prop_oneof![Just(0_u32), 1..100_u32, any::<u32>()],
        rate in prop_oneof![0.0..=1.0_f64, any::<f64>()],
        loads in prop_oneof![Just(None), Just(Some(0_usize)), (1..64_usize).prop_map(Some), any::<usize>().prop_map(Some)],
    )| {
        let n = round.fetch_add(1, Ordering::Relaxed) as u64;
        rt.block_on(async {
            let mut builder = TieredCache::builder();
            if breaker {
                // Half the cases: any breaker settings (nonsense included).
                builder = builder.breaker(
                    BreakerSettings::default()
                        .failures(failures)
                        .failure_rate(rate, d[10])
                        .cool_down(d[11]),
                );
            }
            if let Some(loads) = loads {
                builder = builder.max_concurrent_loads(loads);
            }
            let built = builder
                .namespace("durations")
                .redis(server.url())
                .l1_max_bytes(if l1 { 1 << 20 } else { 0 })
                .l1_ttl_cap(d[0])
                .default_ttl(d[1])
                .l2_timeout(d[2])
                .build()
                .await;
            let cache = match built {
                Ok(cache) => cache,
                Err(e) => {
                    assert_eq!(e.kind(), tiered_cache::ErrorKind::Config, "{e}");
                    return;
                }
            };
            let opts = EntryOptions::new(d[3])
                .stale(d[4])
                .negative_ttl(d[5])
                .soft_timeout(d[6])
                .hard_timeout(d[7])
                .jitter(d[8])
                .failsafe_throttle(d[9]);
            let k = key(n);
            cache.set(&k, product(n), &opts).await.expect("set encodes");
            let _ = cache.get(&k).await;
            let _ = cache.get_many(&[k.clone(), key(n + 1_000_000)]).await;
            let _ = cache
                .get_or_load(&key(n + 2_000_000), &opts, move || async move {
                    Ok::<_, std::io::Error>(product(n))
                })
                .await;
            let _ = cache
                .try_get_or_load(&key(n + 3_000_000), &opts, || async {
                    Ok::<Option<Product>, std::io::Error>(None)
                })
                .await;
            let _ = cache.invalidate(&k).await;
        });
    });
    for extreme in [Duration::ZERO, Duration::MAX] {
        let built = rt.block_on(
            TieredCache::builder()
                .redis(server.url())
                .l2_timeout(extreme)
                .build(),
        );
        assert_eq!(
            built.err().map(|e| e.kind()),
            Some(tiered_cache::ErrorKind::Config),
            "{extreme:?}"
        );
    }
}

/// Arbitrary bytes stored as an entry, through every read path: a counted
/// miss (or a valid entry, for the rare bytes that are one), never a panic.
#[test]
fn arbitrary_bytes_as_an_entry_are_a_counted_miss_on_every_path() {
    use proptest::prelude::*;
    let rt = runtime();
    let server = server();
    let config = ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    };
    let round = AtomicUsize::new(0);
    proptest!(config, |(bytes in proptest::collection::vec(any::<u8>(), 0..300), path in 0..3_u8)| {
        let n = round.fetch_add(1, Ordering::Relaxed) as u64;
        let k = key(n);
        redis::cmd("SET")
            .arg(redis_key(&k))
            .arg(&bytes)
            .query::<()>(&mut conn(&server))
            .expect("SET");
        rt.block_on(async {
            let cache = cache_on(&server, "t").await;
            let found = match path {
                0 => cache.get(&k).await.is_some(),
                1 => cache.get_many(std::slice::from_ref(&k)).await[0].is_some(),
                _ => {
                    let v = cache
                        .get_or_load(&k, &opts(), move || async move {
                            Ok::<_, std::io::Error>(product(n))
                        })
                        .await
                        .expect("the loader stands in");
                    *v != product(n)
                }
            };
            let s = cache.stats();
            assert!(found || s.decode_failures == 1 || bytes.is_empty(), "{bytes:?}: {s:?}");
            assert!(!found || s.decode_failures == 0, "{bytes:?}: {s:?}");
        });
    });
}
