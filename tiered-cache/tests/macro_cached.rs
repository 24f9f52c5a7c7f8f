//! `#[cached]` against a real Redis (testkit): what runs the body, what is
//! cached, which key an entry lands under. Every test counts body calls.
//!
//! Each test has its own functions and counters, so tests may run in
//! parallel; none uses the process-wide default cache (`default_cache.rs`
//! does).

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use support::{builder_on, cache_on, server, Product};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{cached, Key, TieredCache};

async fn setup() -> (RedisServer, TieredCache) {
    let server = server();
    let cache = cache_on(&server, "t").await;
    (server, cache)
}

/// Runs `call` on `n` spawned tasks at once, each with its own handle on
/// `cache`; their answers, in spawn order.
async fn concurrently<T, F, Fut>(cache: &TieredCache, n: usize, call: F) -> Vec<T>
where
    F: Fn(TieredCache) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let callers: Vec<_> = (0..n).map(|_| tokio::spawn(call(cache.clone()))).collect();
    let mut answers = Vec::with_capacity(n);
    for caller in callers {
        answers.push(caller.await.unwrap());
    }
    answers
}

fn product(id: u64, name: &str) -> Product {
    Product {
        id,
        name: name.to_owned(),
    }
}

// ---------------------------------------------------------------- hits

static SQUARE_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "square:{n}", ttl = "1m", cache = cache)]
async fn square(cache: &TieredCache, n: u64) -> u64 {
    SQUARE_CALLS.fetch_add(1, SeqCst);
    n * n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_skip_the_body() {
    let (server, cache) = setup().await;
    assert_eq!(square(&cache, 3).await, 9);
    assert_eq!(square(&cache, 3).await, 9);
    assert_eq!(SQUARE_CALLS.load(SeqCst), 1, "second call is an L1 hit");
    assert_eq!(square(&cache, 4).await, 16);
    assert_eq!(
        SQUARE_CALLS.load(SeqCst),
        2,
        "another argument is another entry"
    );

    // Another instance on the same Redis: an L2 hit, still no body call.
    let other = cache_on(&server, "t").await;
    assert_eq!(square(&other, 3).await, 9);
    assert_eq!(SQUARE_CALLS.load(SeqCst), 2, "second instance reads Redis");
    assert_eq!(other.get(&square_key(3)).await.as_deref(), Some(&9));
}

// ---------------------------------------------------------------- errors

static FALLIBLE_CALLS: AtomicUsize = AtomicUsize::new(0);
static FALLIBLE_FAILS: AtomicBool = AtomicBool::new(true);

#[derive(Debug, PartialEq)]
struct DbError(&'static str); // not Clone on purpose

#[cached(key = "fallible:{id}", cache = cache)]
async fn fallible(cache: &TieredCache, id: u64) -> Result<Product, DbError> {
    FALLIBLE_CALLS.fetch_add(1, SeqCst);
    if FALLIBLE_FAILS.load(SeqCst) {
        return Err(DbError("down"));
    }
    Ok(product(id, "lamp"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_not_cached() {
    let (_server, cache) = setup().await;
    assert_eq!(fallible(&cache, 1).await, Err(DbError("down")));
    assert_eq!(fallible(&cache, 1).await, Err(DbError("down")));
    assert_eq!(FALLIBLE_CALLS.load(SeqCst), 2, "an error is never cached");
    assert!(cache.get(&fallible_key(1)).await.is_none());

    FALLIBLE_FAILS.store(false, SeqCst);
    assert_eq!(fallible(&cache, 1).await, Ok(product(1, "lamp")));
    assert_eq!(fallible(&cache, 1).await, Ok(product(1, "lamp")));
    assert_eq!(FALLIBLE_CALLS.load(SeqCst), 3, "Ok is cached");
}

// ---------------------------------------------------------------- None

static MAYBE_CALLS: AtomicUsize = AtomicUsize::new(0);
static MAYBE_NEG_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "maybe:{id}", cache = cache)]
async fn maybe(cache: &TieredCache, id: u64) -> Option<Product> {
    MAYBE_CALLS.fetch_add(1, SeqCst);
    (id != 0).then(|| product(id, "found"))
}

#[cached(key = "maybe:{id}", name = "maybe-negative", negative_ttl = "1m", cache = cache)]
async fn maybe_negative(cache: &TieredCache, id: u64) -> Option<Product> {
    MAYBE_NEG_CALLS.fetch_add(1, SeqCst);
    (id != 0).then(|| product(id, "found"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_is_cached_only_with_negative_ttl() {
    let (_server, cache) = setup().await;
    assert_eq!(maybe(&cache, 0).await, None);
    assert_eq!(maybe(&cache, 0).await, None);
    assert_eq!(MAYBE_CALLS.load(SeqCst), 2, "None is not cached by default");
    assert_eq!(maybe(&cache, 5).await, Some(product(5, "found")));
    assert_eq!(maybe(&cache, 5).await, Some(product(5, "found")));
    assert_eq!(MAYBE_CALLS.load(SeqCst), 3, "Some is cached");

    assert_eq!(maybe_negative(&cache, 0).await, None);
    assert_eq!(maybe_negative(&cache, 0).await, None);
    assert_eq!(
        MAYBE_NEG_CALLS.load(SeqCst),
        1,
        "None cached with negative_ttl"
    );
}

static FIND_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "find:{id}", negative_ttl = "1m", cache = cache)]
async fn find(cache: &TieredCache, id: u64) -> Result<Option<Product>, String> {
    FIND_CALLS.fetch_add(1, SeqCst);
    match id {
        0 => Ok(None),
        1 => Err("boom".to_owned()),
        id => Ok(Some(product(id, "x"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_of_option() {
    let (_server, cache) = setup().await;
    for _ in 0..2 {
        assert_eq!(find(&cache, 0).await, Ok(None));
        assert_eq!(find(&cache, 2).await, Ok(Some(product(2, "x"))));
        assert_eq!(find(&cache, 1).await, Err("boom".to_owned()));
    }
    assert_eq!(
        FIND_CALLS.load(SeqCst),
        4,
        "None and Some cached once, Err twice"
    );
}

// ---------------------------------------------------------------- version

static V1_CALLS: AtomicUsize = AtomicUsize::new(0);
static V2_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "{id}", name = "versioned", version = 1, cache = cache)]
async fn versioned_v1(cache: &TieredCache, id: u64) -> Product {
    V1_CALLS.fetch_add(1, SeqCst);
    product(id, "v1")
}

#[cached(key = "{id}", name = "versioned", version = 2, cache = cache)]
async fn versioned_v2(cache: &TieredCache, id: u64) -> Product {
    V2_CALLS.fetch_add(1, SeqCst);
    product(id, "v2")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_reads_old_entries_as_misses() {
    let (_server, cache) = setup().await;
    assert_eq!(versioned_v1(&cache, 1).await.name, "v1");
    assert_eq!(
        versioned_v2(&cache, 1).await.name,
        "v2",
        "v1's entry is a miss for v2"
    );
    assert_eq!((V1_CALLS.load(SeqCst), V2_CALLS.load(SeqCst)), (1, 1));
    assert_ne!(versioned_v1_key(1).as_str(), versioned_v2_key(1).as_str());
    assert_eq!(
        versioned_v1(&cache, 1).await.name,
        "v1",
        "v1 still hits its own"
    );
    assert_eq!(V1_CALLS.load(SeqCst), 1);
}

// ---------------------------------------------------------------- tags

static TAGGED_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(
    key = "product:{id}",
    tags = ["products", "category:{cat}"],
    skip = [cat], // a tag, not a key part: the product is the same in any category
    ttl = "10m",
    cache = cache
)]
async fn tagged(cache: &TieredCache, id: u64, cat: u32) -> Product {
    TAGGED_CALLS.fetch_add(1, SeqCst);
    product(id, &format!("cat{cat}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_invalidate() {
    let (_server, cache) = setup().await;
    tagged(&cache, 1, 7).await;
    tagged(&cache, 2, 8).await;
    tagged(&cache, 1, 7).await;
    assert_eq!(TAGGED_CALLS.load(SeqCst), 2);

    cache.invalidate_tag("category:7").await.unwrap();
    tagged(&cache, 1, 7).await;
    tagged(&cache, 2, 8).await;
    assert_eq!(TAGGED_CALLS.load(SeqCst), 3, "only category 7 was dropped");

    cache.invalidate_tag("products").await.unwrap();
    tagged(&cache, 1, 7).await;
    tagged(&cache, 2, 8).await;
    assert_eq!(TAGGED_CALLS.load(SeqCst), 5, "both carry `products`");
}

// ---------------------------------------------------------------- key builder

static KEYED_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "keyed:{id}", cache = cache)]
async fn keyed(cache: &TieredCache, id: u64) -> Product {
    KEYED_CALLS.fetch_add(1, SeqCst);
    product(id, "k")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_builder_invalidates_one_entry() {
    let (_server, cache) = setup().await;
    keyed(&cache, 1).await;
    keyed(&cache, 2).await;
    let key: Key<Product> = keyed_key(1);
    assert_eq!(cache.get(&key).await.as_deref(), Some(&product(1, "k")));
    cache.invalidate(&key).await.unwrap();
    keyed(&cache, 1).await;
    keyed(&cache, 2).await;
    assert_eq!(KEYED_CALLS.load(SeqCst), 3, "only id 1 was invalidated");
}

static LONG_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "long:{name}:{id}", cache = cache)]
async fn long_keyed(cache: &TieredCache, name: &str, id: u64) -> String {
    LONG_CALLS.fetch_add(1, SeqCst);
    format!("{name}/{id}")
}

/// A call writes its key on the stack and moves it to the heap when it is
/// long: either way the entry is the companion's key, hits, and goes with
/// an invalidation of that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_and_long_keys_are_the_companions_keys() {
    let (_server, cache) = setup().await;
    let long = "a:b{c}%".repeat(40); // escaped, ~400 bytes
    for (name, calls_before) in [("short", 0), (long.as_str(), 1)] {
        let key = long_keyed_key(name, 7);
        let want = format!("{name}/7");
        assert_eq!(long_keyed(&cache, name, 7).await, want);
        assert_eq!(long_keyed(&cache, name, 7).await, want, "a hit");
        assert_eq!(LONG_CALLS.load(SeqCst), calls_before + 1);
        assert_eq!(cache.get(&key).await.as_deref(), Some(&want));
        cache.invalidate(&key).await.unwrap();
        assert_eq!(long_keyed(&cache, name, 7).await, want);
        assert_eq!(LONG_CALLS.load(SeqCst), calls_before + 2, "invalidated");
        // Count from here for the next key.
        LONG_CALLS.store(calls_before + 1, SeqCst);
    }
    assert!(long_keyed_key(&long, 7).as_str().len() > 300);
}

// ---------------------------------------------------------------- entity names

static NAMED_CALLS: AtomicUsize = AtomicUsize::new(0);
static ENTITY_NOW: AtomicUsize = AtomicUsize::new(0);
const ENTITIES: [&str; 3] = ["a", "b", "a:b"];

/// The entity name of `named`'s calls: chosen at run time.
fn entity_now() -> &'static str {
    ENTITIES[ENTITY_NOW.load(SeqCst)]
}

#[cached(name = entity_now(), key = "{id}", cache = cache)]
async fn named(cache: &TieredCache, id: u64) -> String {
    NAMED_CALLS.fetch_add(1, SeqCst);
    format!("{}/{id}", entity_now())
}

/// One call site whose entity name changes from call to call: the site
/// keeps the first name's `{entity:v1}` to copy, and every other name
/// still gets its own keys and its own counts (hits answered from L1 by
/// the key's bytes are counted per entity as any other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_site_with_changing_entity_names_keeps_them_apart() {
    let server = server();
    let cache = builder_on(&server, "t")
        .stats_per_entity(true)
        .build()
        .await
        .unwrap();
    let calls = [(0, 1), (1, 1), (0, 1), (2, 1), (1, 1), (0, 2)];
    for (entity, id) in calls {
        ENTITY_NOW.store(entity, SeqCst);
        let expected = format!("{}/{id}", ENTITIES[entity]);
        assert_eq!(named(&cache, id).await, expected);
    }
    assert_eq!(NAMED_CALLS.load(SeqCst), 4, "a/1, b/1, a:b/1 and a/2 ran");
    let hits: Vec<(String, u64)> = cache
        .entity_stats()
        .into_iter()
        .map(|s| (s.entity, s.l1_hits))
        .collect();
    let expected = [("a", 1), ("a%3Ab", 0), ("b", 1)].map(|(e, n)| (e.to_owned(), n));
    assert_eq!(hits, expected);
}

// ---------------------------------------------------------------- XFetch

static HOT_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "hot:{id}", ttl = "400ms", early_refresh = 50.0, cache = cache)]
async fn hot(cache: &TieredCache, id: u64) -> String {
    let n = HOT_CALLS.fetch_add(1, SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    format!("{id}/v{n}")
}

/// Hits on a `#[cached]` function near its expiry still draw for XFetch's
/// early refresh (the hit that answers from L1 alone steps aside there):
/// the entry is reloaded before it expires, and only the first call missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfetch_refreshes_a_cached_function_before_it_expires() {
    let (_server, cache) = setup().await;
    assert_eq!(hot(&cache, 1).await, "1/v0");
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(350);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        seen.push(hot(&cache, 1).await);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let stats = cache.stats();
    assert!(stats.early_refreshes >= 1, "no early refresh: {stats:?}");
    assert!(
        seen.iter().any(|v| v != "1/v0"),
        "the refreshed value was served: {seen:?}"
    );
    assert_eq!(stats.misses, 1, "only the first call missed: {stats:?}");
}

// ---------------------------------------------------------------- methods

static METHOD_CALLS: AtomicUsize = AtomicUsize::new(0);

struct Catalog {
    cache: TieredCache,
    tenant: String,
}

impl Catalog {
    #[cached(key = "{self.tenant}:{id}", cache = self.cache)]
    async fn product(&self, id: u64) -> Product {
        METHOD_CALLS.fetch_add(1, SeqCst);
        product(id, &self.tenant)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_use_their_own_cache_and_fields() {
    let server = RedisServer::start().unwrap();
    let acme = Catalog {
        cache: cache_on(&server, "t").await,
        tenant: "acme".into(),
    };
    let umbrella = Catalog {
        cache: cache_on(&server, "t").await,
        tenant: "umbrella".into(),
    };
    assert_eq!(acme.product(1).await.name, "acme");
    assert_eq!(acme.product(1).await.name, "acme");
    assert_eq!(METHOD_CALLS.load(SeqCst), 1);
    // the entry is in acme's cache, under acme's tenant
    assert!(acme.cache.get(&acme.product_key(1)).await.is_some());
    assert_ne!(
        acme.product_key(1).as_str(),
        umbrella.product_key(1).as_str()
    );
    // another tenant never gets acme's entry
    assert_eq!(umbrella.product(1).await.name, "umbrella");
    assert_eq!(METHOD_CALLS.load(SeqCst), 2);

    // a cache that is not the receiver's is never written
    let (_other_server, unrelated) = setup().await;
    assert!(unrelated.get(&acme.product_key(1)).await.is_none());
}

// ---------------------------------------------------------------- names

static A_CALLS: AtomicUsize = AtomicUsize::new(0);
static B_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "item:{id}", name = "a", cache = cache)]
async fn item_a(cache: &TieredCache, id: u64) -> Product {
    A_CALLS.fetch_add(1, SeqCst);
    product(id, "a")
}

#[cached(key = "item:{id}", name = "b", cache = cache)]
async fn item_b(cache: &TieredCache, id: u64) -> Product {
    B_CALLS.fetch_add(1, SeqCst);
    product(id, "b")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_names_never_share_entries() {
    let (_server, cache) = setup().await;
    assert_eq!(item_a(&cache, 1).await.name, "a");
    assert_eq!(item_b(&cache, 1).await.name, "b");
    assert_eq!(item_a(&cache, 1).await.name, "a");
    assert_eq!(item_b(&cache, 1).await.name, "b");
    assert_eq!((A_CALLS.load(SeqCst), B_CALLS.load(SeqCst)), (1, 1));
}

// ---------------------------------------------------------------- key parts

static PAIR_CALLS: AtomicUsize = AtomicUsize::new(0);
static SLICE_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "{x}:{y}", cache = cache)]
async fn pair(cache: &TieredCache, x: &str, y: &str) -> String {
    PAIR_CALLS.fetch_add(1, SeqCst);
    format!("{x}|{y}")
}

#[cached(key = "{ids}", cache = cache)]
async fn total(cache: &TieredCache, ids: &[u64]) -> u64 {
    SLICE_CALLS.fetch_add(1, SeqCst);
    ids.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_injective_over_reference_parameters() {
    let (_server, cache) = setup().await;
    assert_eq!(pair(&cache, "a:b", "c").await, "a:b|c");
    assert_eq!(pair(&cache, "a", "b:c").await, "a|b:c");
    assert_eq!(
        PAIR_CALLS.load(SeqCst),
        2,
        "(a:b, c) and (a, b:c) are two entries"
    );
    assert_eq!(total(&cache, &[1, 2]).await, 3);
    assert_eq!(total(&cache, &[12]).await, 12);
    assert_eq!(total(&cache, &[1, 2]).await, 3);
    assert_eq!(SLICE_CALLS.load(SeqCst), 2);
}

// ---------------------------------------------------------------- Arc

static ARC_CALLS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Serialize, Deserialize)]
struct Big {
    bytes: Vec<u8>, // not Clone: `Arc<Big>` returns need none
}

#[cached(cache = cache)]
async fn big(cache: &TieredCache, n: usize) -> Arc<Big> {
    ARC_CALLS.fetch_add(1, SeqCst);
    Arc::new(Big { bytes: vec![7; n] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arc_returns_share_the_cached_value() {
    let (_server, cache) = setup().await;
    let first = big(&cache, 64).await;
    let second = big(&cache, 64).await;
    assert_eq!(ARC_CALLS.load(SeqCst), 1);
    assert!(
        Arc::ptr_eq(&first, &second),
        "an L1 hit hands out the same Arc"
    );
    assert_eq!(second.bytes.len(), 64);
}

// The default cache (`install`, `scope`) is process-wide state: its tests
// are in `default_cache.rs`, a binary of their own.

// ---------------------------------------------------------------- concurrency

static COLD_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "cold:{id}", cache = cache)]
async fn cold(cache: &TieredCache, id: u64) -> Product {
    COLD_CALLS.fetch_add(1, SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    product(id, "cold")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_load() {
    let (_server, cache) = setup().await;
    let answers = concurrently(&cache, 50, |c| async move { cold(&c, 1).await }).await;
    for answer in answers {
        assert_eq!(answer, product(1, "cold"));
    }
    assert_eq!(COLD_CALLS.load(SeqCst), 1, "one load for 50 callers");
}

static SHARED_ERR_CALLS: AtomicUsize = AtomicUsize::new(0);
static OWN_ERR_CALLS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Clone, PartialEq)]
struct CloneError(u64);

#[cached(key = "shared-err:{id}", cache = cache)]
async fn shared_err(cache: &TieredCache, id: u64) -> Result<Product, CloneError> {
    SHARED_ERR_CALLS.fetch_add(1, SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    Err(CloneError(id))
}

#[cached(key = "own-err:{id}", cache = cache)]
async fn own_err(cache: &TieredCache, id: u64) -> Result<Product, DbError> {
    OWN_ERR_CALLS.fetch_add(1, SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    Err(DbError("down"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_reaches_every_waiter() {
    let (_server, cache) = setup().await;
    let answers = concurrently(&cache, 10, |c| async move { shared_err(&c, 1).await }).await;
    for answer in answers {
        assert_eq!(answer, Err(CloneError(1)));
    }
    assert_eq!(
        SHARED_ERR_CALLS.load(SeqCst),
        1,
        "a `Clone` error is shared by the waiters"
    );

    // An error that cannot be cloned cannot be shared: each waiter runs its
    // own body and gets its own error (never a panic, never a generic error).
    let answers = concurrently(&cache, 10, |c| async move { own_err(&c, 1).await }).await;
    for answer in answers {
        assert_eq!(answer, Err(DbError("down")));
    }
    assert!(OWN_ERR_CALLS.load(SeqCst) >= 1);
}

// One body at a time when waiters cannot share the error: a failing
// database gets one query per key at a time, not one per caller.

static TURN_RUNNING: AtomicUsize = AtomicUsize::new(0);
static TURN_MAX: AtomicUsize = AtomicUsize::new(0);

/// Counts the bodies running at once in `TURN_MAX`.
async fn counted<T>(running: &AtomicUsize, max: &AtomicUsize, answer: T) -> T {
    let now = running.fetch_add(1, SeqCst) + 1;
    max.fetch_max(now, SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    running.fetch_sub(1, SeqCst);
    answer
}

#[derive(Debug, PartialEq)]
struct NotCloneError(u64);

#[cached(key = "turns:{id}", cache = cache)]
async fn turns(cache: &TieredCache, id: u64) -> Result<Product, NotCloneError> {
    counted(&TURN_RUNNING, &TURN_MAX, Err(NotCloneError(id))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_an_unshareable_error_take_turns() {
    let (_server, cache) = setup().await;
    let answers = concurrently(&cache, 16, |c| async move { turns(&c, 1).await }).await;
    for answer in answers {
        assert_eq!(
            answer,
            Err(NotCloneError(1)),
            "each caller gets its own error"
        );
    }
    assert_eq!(TURN_MAX.load(SeqCst), 1, "never two bodies at once");
}

static BOXED_CALLS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
struct Outage(std::io::Error);

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the database is down")
    }
}

impl std::error::Error for Outage {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cached(key = "boxed:{id}", cache = cache)]
async fn boxed(cache: &TieredCache, id: u64) -> Result<Product, BoxError> {
    BOXED_CALLS.fetch_add(1, SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    Err(Outage(refused).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boxed_error_is_shared_with_the_waiters() {
    let (_server, cache) = setup().await;
    // On one task: with a `dyn` error type, rustc cannot prove the
    // future `Send` ("implementation of `Send` is not general enough").
    let calls = (0..16).map(|_| async {
        let e = boxed(&cache, 1).await.unwrap_err();
        (e.to_string(), e.source().map(ToString::to_string))
    });
    for (message, source) in futures_util::future::join_all(calls).await {
        assert_eq!(message, "the database is down");
        assert_eq!(source.as_deref(), Some("refused"), "the chain is kept");
    }
    assert_eq!(BOXED_CALLS.load(SeqCst), 1, "one load for 16 callers");
}

static SLOW_HERD_RUNNING: AtomicUsize = AtomicUsize::new(0);
static SLOW_HERD_MAX: AtomicUsize = AtomicUsize::new(0);
static SLOW_HERD_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "slow-herd:{n}", cache = cache)]
async fn slow_herd(cache: &TieredCache, n: u64) -> u64 {
    SLOW_HERD_CALLS.fetch_add(1, SeqCst);
    counted(&SLOW_HERD_RUNNING, &SLOW_HERD_MAX, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_a_hard_timeout_get_the_finished_body() {
    let server = RedisServer::start().unwrap();
    let cache = builder_on(&server, "t")
        .default_options(
            tiered_cache::EntryOptions::default()
                .hard_timeout(std::time::Duration::from_millis(30)),
        )
        .build()
        .await
        .unwrap();
    let answers = concurrently(&cache, 16, |c| async move { slow_herd(&c, 7).await }).await;
    assert!(answers.iter().all(|a| *a == 7), "{answers:?}");
    assert_eq!(SLOW_HERD_MAX.load(SeqCst), 1, "never two bodies at once");
    assert_eq!(
        SLOW_HERD_CALLS.load(SeqCst),
        1,
        "the waiters get the body that the timeout cut off, once it finished"
    );
}

// ---------------------------------------------------------------- hard timeout

static SLOW_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "slow:{n}", cache = cache)]
async fn slow(cache: &TieredCache, n: u64) -> u64 {
    SLOW_CALLS.fetch_add(1, SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inherited_hard_timeout_never_loses_the_answer() {
    // A #[cached] fn returns its declared type, so a hard timeout cannot
    // turn into an error: the caller finishes its own body (uncached).
    let server = RedisServer::start().unwrap();
    let cache = builder_on(&server, "t")
        .default_options(
            tiered_cache::EntryOptions::default()
                .hard_timeout(std::time::Duration::from_millis(30)),
        )
        .build()
        .await
        .unwrap();
    assert_eq!(slow(&cache, 7).await, 7);
    assert_eq!(
        SLOW_CALLS.load(SeqCst),
        1,
        "the body was finished, not restarted"
    );
}

// ---------------------------------------------------------------- bad entries

static CUBE_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(key = "cube:{n}", ttl = "1m", cache = cache)]
async fn cube(cache: &TieredCache, n: u64) -> u64 {
    CUBE_CALLS.fetch_add(1, SeqCst);
    n * n * n
}

/// Garbage under a `#[cached]` function's key is a miss there too: the body
/// runs, its value replaces the garbage, and the failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_is_a_miss_through_the_macro() {
    let (server, cache) = setup().await;
    let redis_key = format!("t:{}", cube_key(4).as_str());
    redis::cmd("SET")
        .arg(&redis_key)
        .arg(b"\xff\x00garbage".as_slice())
        .query::<()>(&mut support::conn(&server))
        .unwrap();
    assert_eq!(cube(&cache, 4).await, 64);
    assert_eq!(CUBE_CALLS.load(SeqCst), 1, "the body ran instead");
    assert_eq!(cache.stats().decode_failures, 1);
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&redis_key)
        .query(&mut support::conn(&server))
        .unwrap();
    assert_ne!(stored, b"\xff\x00garbage", "the garbage was replaced");
    assert_eq!(cube(&cache, 4).await, 64);
    assert_eq!(CUBE_CALLS.load(SeqCst), 1, "and the new entry hits");
}
