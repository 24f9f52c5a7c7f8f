//! The `metrics` feature: after a scripted sequence of hits, misses, loads,
//! errors and invalidations against a real Redis, the recorder holds the
//! same counts as `stats()`, labelled by namespace, and the load-time
//! histogram has one sample per loader call.

mod support;

use std::collections::HashMap;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use support::counter as counter_of_calls;
use support::*;
use tiered_cache::testkit::RedisServer;

type Recorded = HashMap<(String, String), DebugValue>;

/// Metric name and its labels (`namespace`, then `entity` if any, joined
/// by `/`) → value, from one (destructive) snapshot.
fn read(snapshotter: &metrics_util::debugging::Snapshotter) -> Recorded {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let label = |name: &str| {
                key.labels()
                    .find(|l| l.key() == name)
                    .map(|l| l.value().to_owned())
            };
            let mut labels = label("namespace").unwrap_or_default();
            if let Some(entity) = label("entity") {
                labels = format!("{labels}/{entity}");
            }
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

fn counter(m: &Recorded, name: &str, ns: &str) -> u64 {
    match m.get(&(format!("tiered_cache_{name}_total"), ns.to_owned())) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_metrics_match_the_stats_per_namespace() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let server = RedisServer::start().expect("redis");
    let a = builder_on(&server, "metrics-a")
        .stats_per_entity(true)
        .build()
        .await
        .unwrap();
    let b = cache_on(&server, "metrics-b").await;
    let k1 = item::<String>(1);
    let k2 = item::<String>(2);

    assert!(a.get(&k1).await.is_none()); // a miss
    let loaded = a.get_or_load(&k1, &opts(), quick("one")).await.unwrap(); // a load
    assert_eq!(*loaded, "one");
    assert!(a.get(&k1).await.is_some()); // an L1 hit
    assert!(a.get_or_load(&k1, &opts(), quick("again")).await.is_ok()); // another
    let calls = counter_of_calls();
    assert!(a
        .get_or_load(&k2, &opts(), failing::<String>(&calls))
        .await
        .is_err()); // a load error
    a.invalidate(&k1).await.unwrap();
    assert!(a.get(&k1).await.is_none(), "invalidated: a miss");
    assert!(a.get(&key(3)).await.is_none()); // another entity's miss
    b.set(&k2, "two".to_owned(), &opts()).await.unwrap();
    assert!(b.get(&k2).await.is_some()); // B's own hit

    until("A published its invalidation", || {
        a.stats().backplane_published >= 1
    })
    .await;
    let m = read(&snapshotter);
    let s = a.stats();
    for (name, value) in [
        ("l1_hits", s.l1_hits),
        ("l2_hits", s.l2_hits),
        ("misses", s.misses),
        ("loads", s.loads),
        ("load_errors", s.load_errors),
        ("coalesced_waits", s.coalesced_waits),
        ("l2_errors", s.l2_errors),
        ("stale_writes_refused", s.stale_writes_refused),
        ("backplane_published", s.backplane_published),
    ] {
        assert_eq!(counter(&m, name, "metrics-a"), value, "{name}");
    }
    assert_eq!((s.l1_hits, s.loads, s.load_errors), (2, 2, 1));
    assert!(s.misses >= 2, "{s:?}");
    assert_eq!(counter(&m, "l1_hits", "metrics-b"), 1, "B counts its own");
    assert_eq!(b.stats().l1_hits, 1);
    match m.get(&(
        "tiered_cache_load_seconds".to_owned(),
        "metrics-a".to_owned(),
    )) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 2, "one per loader call"),
        other => panic!("no load-time histogram: {other:?}"),
    }
    match m.get(&(
        "tiered_cache_l2_request_seconds".to_owned(),
        "metrics-a".to_owned(),
    )) {
        Some(DebugValue::Histogram(samples)) => {
            assert!(
                samples.len() >= 5,
                "one per Redis request: {}",
                samples.len()
            );
            assert!(samples.iter().all(|s| s.into_inner() < 5.0), "{samples:?}");
        }
        other => panic!("no L2 latency histogram: {other:?}"),
    }
    match m.get(&(
        "tiered_cache_breaker_state".to_owned(),
        "metrics-a".to_owned(),
    )) {
        Some(DebugValue::Gauge(state)) => assert_eq!(state.into_inner(), 0.0, "closed"),
        None => {} // never set: closed since the start
        other => panic!("breaker_state is not a gauge: {other:?}"),
    }
}
