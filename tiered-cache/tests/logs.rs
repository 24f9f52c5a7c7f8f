//! What the cache writes to its logs (`tracing`): Redis trouble once per
//! incident, never a connection string, a password or a cached value.
//!
//! The events are captured by a small subscriber of this file's own, set as
//! the default of the test thread; the tests run on a current-thread
//! runtime, so every task of the cache logs on that thread.

mod support;

use std::fmt::{Debug, Write as _};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use support::{key, Product};
use tiered_cache::testkit::RedisServer;
use tiered_cache::{EntryOptions, Key, TieredCache};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// The password of the ACL user the cache connects as.
const PASSWORD: &str = "pw-7c1e9a";
/// Part of a cached value, to look for in the logs.
const VALUE_MARK: &str = "value-mark-51f2";

/// Every event as one line: `LEVEL message field=value ...`; every span as
/// `SPAN name field=value ...`, and a later record of its fields as
/// `RECORD field=value`. It keeps which span is entered, so that
/// `Span::current()` works as under a real subscriber.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>, Arc<Mutex<Spans>>);

/// The spans made so far (their metadata by id) and the entered ones.
#[derive(Default)]
struct Spans {
    made: Vec<&'static Metadata<'static>>,
    entered: Vec<u64>,
}

impl Lines {
    fn push(&self, line: String) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }

    fn all(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn containing(&self, text: &str) -> usize {
        self.all().iter().filter(|line| line.contains(text)).count()
    }
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl Subscriber for Lines {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut line = format!("SPAN {}", span.metadata().name());
        span.record(&mut Fields(&mut line));
        self.push(line);
        let mut spans = self.1.lock().unwrap_or_else(PoisonError::into_inner);
        spans.made.push(span.metadata());
        Id::from_u64(spans.made.len() as u64)
    }
    fn current_span(&self) -> tracing_core::span::Current {
        let spans = self.1.lock().unwrap_or_else(PoisonError::into_inner);
        match spans.entered.last() {
            Some(&id) => {
                tracing_core::span::Current::new(Id::from_u64(id), spans.made[id as usize - 1])
            }
            None => tracing_core::span::Current::none(),
        }
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut line = "RECORD".to_owned();
        values.record(&mut Fields(&mut line));
        self.push(line);
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = event.metadata().level().to_string();
        event.record(&mut Fields(&mut line));
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }
    fn enter(&self, id: &Id) {
        let mut spans = self.1.lock().unwrap_or_else(PoisonError::into_inner);
        spans.entered.push(id.into_u64());
    }
    fn exit(&self, id: &Id) {
        let mut spans = self.1.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = spans.entered.iter().rposition(|e| *e == id.into_u64()) {
            spans.entered.remove(at);
        }
    }
}

/// A server with an ACL user `app` (password [`PASSWORD`], every key and
/// command, `channels` its pub/sub rights), and a cache connecting as it.
async fn as_acl_user(channels: &str) -> (RedisServer, TieredCache) {
    let password = format!(">{PASSWORD}");
    let server =
        RedisServer::start_with(&["--user", "app", "on", &password, "~*", channels, "+@all"])
            .expect("redis-server");
    let url = format!("redis://app:{PASSWORD}@127.0.0.1:{}", server.port());
    let cache = TieredCache::builder()
        .namespace("logs")
        .redis(url.as_str())
        .build()
        .await
        .expect("build");
    (server, cache)
}

const REDIS_FAILED: &str = "Redis failed";
const REDIS_BACK: &str = "Redis answers again";

fn marked(id: u64) -> Product {
    Product {
        id,
        name: format!("{VALUE_MARK} {id}"),
    }
}

/// `get_or_load` of `key` whose loader returns `marked(id)`.
async fn load(cache: &TieredCache, key: &Key<Product>, id: u64) -> Arc<Product> {
    cache
        .get_or_load(
            key,
            &EntryOptions::new(Duration::from_secs(5 * 60)),
            move || async move { Ok::<_, std::io::Error>(marked(id)) },
        )
        .await
        .expect("the loader stands in for Redis")
}

/// Loads fresh keys until the cache reports Redis back (it uses Redis again).
async fn until_back(cache: &TieredCache, lines: &Lines, next_id: &mut u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines.containing(REDIS_BACK) == 0 {
        assert!(Instant::now() < deadline, "Redis never came back");
        *next_id += 1;
        load(cache, &key(*next_id), *next_id).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_trouble_is_logged_once_per_incident_without_secrets_or_values() {
    let lines = Lines::default();
    let _capture = tracing::subscriber::set_default(lines.clone());

    // An ACL user with a password: the URL carries a secret.
    let (mut server, cache) = as_acl_user("&*").await;
    assert!(cache.has_l2());
    load(&cache, &key(1), 1).await;

    // An entry in Redis that does not decode: logged, without its bytes.
    let raw_key = support::redis_key("logs", &key(2));
    redis::cmd("SET")
        .arg(&raw_key)
        .arg(format!("garbage {VALUE_MARK}"))
        .query::<()>(&mut server.connection().expect("connection"))
        .expect("SET");
    assert!(cache.get(&key(2)).await.is_none(), "a bad entry is a miss");
    assert_eq!(cache.stats().decode_failures, 1);
    assert_eq!(lines.containing("unusable"), 1, "{:#?}", lines.all());

    // Incident 1: Redis is down; spaced misses keep trying Redis (before
    // the breaker opens, then as its probes) and fail, but the incident is
    // logged once.
    server.kill();
    let mut id = 100;
    for _ in 0..4 {
        id += 1;
        assert_eq!(load(&cache, &key(id), id).await.id, id);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let errors = cache.stats().l2_errors;
    assert!(errors >= 4, "each spaced miss tried Redis: {errors}");
    assert_eq!(lines.containing(REDIS_FAILED), 1, "{:#?}", lines.all());

    // Back: said once. Incident 2: logged again, once.
    server.restart().expect("restart");
    until_back(&cache, &lines, &mut id).await;
    assert_eq!(lines.containing(REDIS_BACK), 1, "{:#?}", lines.all());
    server.kill();
    for _ in 0..3 {
        id += 1;
        load(&cache, &key(id), id).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(lines.containing(REDIS_FAILED), 2, "{:#?}", lines.all());

    let all = lines.all();
    println!("{} log lines:\n{}", all.len(), all.join("\n"));
    for line in &all {
        assert!(!line.contains(PASSWORD), "a password was logged: {line}");
        assert!(!line.contains("redis://"), "a URL was logged: {line}");
        assert!(!line.contains(VALUE_MARK), "a value was logged: {line}");
    }
}

/// An ACL user without channel rights: every PUBLISH is refused. That is
/// said once, as a degraded backplane, and never as Redis failing.
#[tokio::test]
async fn a_refused_publish_is_logged_once_and_is_not_an_outage() {
    let lines = Lines::default();
    let _capture = tracing::subscriber::set_default(lines.clone());
    let (_server, cache) = as_acl_user("resetchannels").await;
    for id in 0..20 {
        cache
            .set(
                &key(id),
                marked(id),
                &EntryOptions::new(Duration::from_secs(5 * 60)),
            )
            .await
            .expect("set");
        tokio::time::sleep(Duration::from_millis(5)).await; // each set its own PUBLISH
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines.containing("refused PUBLISH") == 0 {
        assert!(Instant::now() < deadline, "{:#?}", lines.all());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cache.stats().l2_errors >= 10, "{:?}", cache.stats());
    assert_eq!(lines.containing("refused PUBLISH"), 1, "{:#?}", lines.all());
    assert_eq!(
        lines.containing("Redis refused a command"),
        1,
        "{:#?}",
        lines.all()
    );
    assert_eq!(lines.containing(REDIS_FAILED), 0, "{:#?}", lines.all());
    for line in lines.all() {
        assert!(!line.contains(PASSWORD), "a password was logged: {line}");
        assert!(!line.contains(VALUE_MARK), "a value was logged: {line}");
    }
}

/// Every public call has a span at `debug` naming the operation, the key's
/// entity and the tier that answered, and never the key's arguments or a
/// value.
#[tokio::test]
async fn spans_name_the_operation_and_the_tier_but_never_keys_or_values() {
    let lines = Lines::default();
    let _capture = tracing::subscriber::set_default(lines.clone());
    let (_server, cache) = as_acl_user("&*").await;
    let opts = EntryOptions::new(Duration::from_secs(5 * 60));
    let secret_id = 4_242_424;
    cache
        .set(&key(secret_id), marked(secret_id), &opts)
        .await
        .expect("set");
    assert!(cache.get(&key(secret_id)).await.is_some());
    assert!(cache.get(&key(secret_id + 7)).await.is_none(), "never set");
    let other = TieredCache::builder()
        .namespace("logs")
        .redis(format!(
            "redis://app:{PASSWORD}@127.0.0.1:{}",
            _server.port()
        ))
        .build()
        .await
        .expect("a second instance");
    assert!(other.get(&key(secret_id)).await.is_some(), "from Redis");
    load(&cache, &key(secret_id + 1), secret_id + 1).await;
    cache.invalidate(&key(secret_id)).await.expect("invalidate");
    cache
        .invalidate_tag("products")
        .await
        .expect("invalidate_tag");

    let all = lines.all();
    for op in ["set", "get", "get_or_load", "invalidate", "invalidate_tag"] {
        let span = format!("SPAN tiered_cache op={op:?}");
        assert!(
            all.iter().any(|l| l.starts_with(&span)),
            "no {op} span: {all:#?}"
        );
    }
    assert!(
        all.iter().any(|l| l.contains("entity=\"product\"")),
        "{all:#?}"
    );
    for tier in ["l1", "l2", "loader", "none"] {
        let record = format!("RECORD tier={tier:?}");
        assert!(
            all.iter().any(|l| l == &record),
            "no {tier} answer: {all:#?}"
        );
    }
    for line in &all {
        assert!(
            !line.contains(&secret_id.to_string()),
            "a key's argument: {line}"
        );
        assert!(!line.contains(VALUE_MARK), "a value was logged: {line}");
        assert!(!line.contains(PASSWORD), "a password was logged: {line}");
    }
}
