//! Unit tests of the spine (`cache.rs`): steps that need a whole
//! `TieredCache` but no Redis.

use super::*;
use crate::entry::Meta;
use crate::loader::Never;

/// What `serve` makes of an entry fresh for `fresh_ms` and kept for
/// `keep_ms`, looked at 5 ms after it was built.
async fn served_later(fresh_ms: u64, keep_ms: u64) -> Served<String> {
    let cache = TieredCache::builder().build().await.expect("L1-only cache");
    let l1 = cache.inner.tiers.l1.as_ref().expect("L1 on");
    let value: AnyValue = Arc::new("old".to_owned());
    let (fresh, keep) = (
        Duration::from_millis(fresh_ms),
        Duration::from_millis(keep_ms),
    );
    let entry = l1.entry("k", Some(value), Meta::default(), fresh, keep, 3);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let options = EntryOptions::new(Duration::from_secs(1));
    let mut loader = None::<Never<String, std::io::Error>>;
    let now = Instant::now();
    cache.serve::<String, crate::codec::Postcard, _, _>(
        "k",
        &options,
        &entry,
        now,
        false,
        &mut loader,
    )
}

#[tokio::test]
async fn an_entry_past_its_expiry_without_a_grace_window_is_a_miss_not_stale() {
    // Read from Redis a moment before its expiry and looked at after it
    // (a slow promotion): serving it "stale" would answer past the TTL
    // of an entry that set no grace window.
    assert!(matches!(served_later(1, 1).await, Served::Miss));
    assert!(matches!(served_later(1, 60_000).await, Served::Stale));
    assert!(matches!(
        served_later(60_000, 60_000).await,
        Served::Hit(Some(_))
    ));
}

#[tokio::test]
async fn a_redis_read_future_stays_small() {
    // Every L2 read moves its future on each poll: the budget's scope must
    // not lay the read out again around itself (it did, 3x, as an `async
    // fn`), and the rare parts (moka's insert, the tag fetch, a bad
    // entry's delete) are boxed out of it.
    let cache = TieredCache::builder().build().await.expect("L1-only cache");
    let tiers = &cache.inner.tiers;
    let read = std::mem::size_of_val(&tiers.read_l2::<String, crate::codec::Postcard>("k"));
    let budgeted = std::mem::size_of_val(
        &tiers.within_budget(tiers.read_l2::<String, crate::codec::Postcard>("k")),
    );
    assert!(
        budgeted <= read + 64,
        "budgeted {budgeted} B vs read {read} B"
    );
    let miss = std::mem::size_of_val(
        &cache.get_from_l2::<String, crate::codec::Postcard>("k", tracing::Span::none()),
    );
    assert!(miss <= 1_032, "get past an L1 miss: {miss} B");
}
