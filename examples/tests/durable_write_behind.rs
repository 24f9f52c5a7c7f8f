//! Durable write-behind against real processes: a writer killed with
//! SIGKILL in the middle of 10,000 puts loses none it acknowledged; two
//! instances flushing the same ids (each other's writes included) end with
//! the newest; a put that Redis cannot take is refused, not half-done.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tiered_cache::testkit::RedisServer;
use tiered_cache::write::{WriteBehind, WriteError, WritePolicy};
use tiered_cache::{ErrorKind, TieredCache};
use tiered_cache_examples::sqlite::Table;
use tiered_cache_examples::Counter;

fn durable(consumer: &str) -> WritePolicy {
    WritePolicy::WriteBehind(
        WriteBehind::new()
            .durable(true)
            .consumer(consumer)
            .flush_interval(Duration::from_millis(10))
            .claim_idle(Duration::from_millis(200)),
    )
}

/// Ids whose stored sequence number is below the last acknowledged one.
async fn behind_acked(
    table: &Table<Counter>,
    acked: &HashMap<u64, u64>,
) -> Vec<(u64, u64, Option<u64>)> {
    let mut lost = Vec::new();
    for (id, seq) in acked {
        let stored = stored(table, id).await.map(|c| c.seq);
        if stored.is_none_or(|s| s < *seq) {
            lost.push((*id, *seq, stored));
        }
    }
    lost.sort_unstable();
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writer_loses_no_acknowledged_write_restarted_under_its_name() {
    killed_writer_then("writer").await;
}

/// Another consumer takes over: by `XAUTOCLAIM` what the dead one had
/// taken, and by age what nobody had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writers_acknowledged_writes_are_flushed_by_another_instance() {
    killed_writer_then("survivor").await;
}

/// Kills a writer process at a random point of 10,000 puts, then starts a
/// queue named `consumer` and waits until SQLite has every acknowledged write.
async fn killed_writer_then(consumer: &str) {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("durable-crash");
    let table = db.table::<Counter>();
    let mut child = Command::new(env!("CARGO_BIN_EXE_durable_writer"))
        .args([
            redis.url().as_str(),
            db.path().to_str().expect("utf-8 path"),
            "crash",
            "10000",
            "500",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start durable_writer");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let kill_after = 1_000 + rand::random::<u64>() % 8_000;
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut record = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        if let ["acked", id, seq] = words.as_slice() {
            acked.insert(id.parse().unwrap(), seq.parse().unwrap());
        }
    };
    let mut read = 0;
    tokio::task::block_in_place(|| {
        for line in lines.by_ref() {
            record(&line.expect("a line"));
            read += 1;
            if read == kill_after {
                child.kill().expect("SIGKILL the writer");
                break;
            }
        }
        // What it printed before it died was acknowledged too.
        for line in lines {
            match line {
                Ok(line) => record(&line),
                Err(_) => break,
            }
        }
        child.wait().expect("reap the writer");
    });
    let total: usize = acked.len();
    println!("killed after {kill_after} acknowledged puts ({total} ids)");
    assert!(total > 0);
    let lost_at_kill = behind_acked(&table, &acked).await.len();

    let cache = cache_on(&redis, "crash").await;
    let counters = cache.entity_with(table.clone(), durable(consumer)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lost = behind_acked(&table, &acked).await;
        if lost.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still behind after 30 s: {:?}",
            &lost[..lost.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{lost_at_kill} ids were behind at the kill; 0 after {consumer}'s flush");
    counters.shutdown().await;
}

/// Two instances write the same ids in turn while one's store is held back,
/// so its older writes reach the store late (by its own queue, or by the
/// other's orphan rounds, whichever is first): every id ends with its
/// newest write. (A live queue keeps its stream entries in its own pending
/// list, so the other takes them over only once it stops: the crash tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_flushing_the_same_ids_end_with_the_newest() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("durable-two");
    let probe = Probe::new(db.table::<Counter>());
    let (a, b) = (cache_on(&redis, "two").await, cache_on(&redis, "two").await);
    let on_a = a.entity_with(probe.clone(), durable("a")).unwrap();
    let on_b = b.entity_with(probe.table.clone(), durable("b")).unwrap();

    probe.hold(); // A's flushes wait; B's go through
    let mut newest: HashMap<u64, u64> = HashMap::new();
    for seq in 0..200_u64 {
        let id = seq % 20;
        // Each id gets writes from both, in turn: half of the newest are A's.
        if (seq / 20) % 2 == 0 {
            on_a.put(&id, Counter { seq }).await.unwrap();
        } else {
            on_b.put(&id, Counter { seq }).await.unwrap();
        }
        newest.insert(id, seq);
    }
    until("B flushed its own writes", || b.stats().store_writes >= 100).await;
    probe.release(); // A now flushes its own (older or equal) writes late
    on_a.shutdown().await;
    on_b.shutdown().await;
    for (id, seq) in &newest {
        assert_eq!(
            stored(&probe.table, id).await,
            Some(Counter { seq: *seq }),
            "id {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_put_that_redis_cannot_take_is_refused() {
    let mut redis = RedisServer::start().expect("redis");
    let db = TempDb::new("durable-down");
    let table = db.table::<Counter>();
    let cache = cache_on(&redis, "down").await;
    let counters = cache.entity_with(table.clone(), durable("down")).unwrap();
    counters.put(&1, Counter { seq: 1 }).await.unwrap();
    redis.kill();
    let refused = counters.put(&1, Counter { seq: 2 }).await;
    assert!(
        matches!(&refused, Err(WriteError::Cache(e)) if e.kind() == ErrorKind::L2),
        "{refused:?}"
    );
    assert_eq!(
        counters.get(&1).await.unwrap().map(|c| c.seq),
        Some(1),
        "not cached"
    );
    counters.shutdown().await;
    assert_eq!(stored(&table, &1).await, Some(Counter { seq: 1 }));

    // Without Redis at all, a durable entity is a configuration error.
    let l1_only = TieredCache::builder().build().await.unwrap();
    let refused = l1_only.entity_with(table, durable("none"));
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_dead_letters_are_seen_from_any_instance() {
    let redis = RedisServer::start().expect("redis");
    let db = TempDb::new("durable-dead");
    let probe = Probe::new(db.table::<Counter>());
    let (a, b) = (
        cache_on(&redis, "dead").await,
        cache_on(&redis, "dead").await,
    );
    let policy = WritePolicy::WriteBehind(
        WriteBehind::new()
            .durable(true)
            .flush_interval(Duration::from_millis(5))
            .max_attempts(2)
            .backoff(Duration::from_millis(5), Duration::from_millis(10)),
    );
    let on_a = a.entity_with(probe.clone(), policy.clone()).unwrap();
    let on_b = b.entity_with(probe.clone(), policy).unwrap();
    probe.fail_id(9);
    on_a.put(&9, Counter { seq: 9 }).await.unwrap();
    until("the write became a dead letter", || {
        a.stats().write_dead_letters == 1
    })
    .await;
    let letters = on_b.take_dead_letters().await;
    assert_eq!(letters.len(), 1, "B reads A's dead letter from Redis");
    assert_eq!((letters[0].id, letters[0].version > 0), (9, true));
    assert_eq!(letters[0].value.as_deref(), Some(&Counter { seq: 9 }));
    assert!(on_a.take_dead_letters().await.is_empty(), "taken once");
    probe.heal();
    let letter = letters.into_iter().next().unwrap();
    on_b.replay(letter).await.unwrap();
    on_b.shutdown().await;
    on_a.shutdown().await;
    assert_eq!(stored(&probe.table, &9).await, Some(Counter { seq: 9 }));
}
