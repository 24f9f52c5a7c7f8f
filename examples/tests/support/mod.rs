//! What the write-policy tests share: a test Redis and caches on it, a
//! SQLite file per test, the entities, and `Probe`, a store in front of a
//! SQLite table that can hold writes back, fail them, and record batches.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiered_cache::testkit::RedisServer;
use tiered_cache::write::{Entity, Store};
use tiered_cache::{EntryOptions, TieredCache};
use tiered_cache_examples::sqlite::{Db, StoreError, Table};
use tokio::sync::{watch, Semaphore};

/// The entity of these tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub name: String,
    pub price_cents: u64,
}

pub fn product(name: &str, price_cents: u64) -> Product {
    Product {
        name: name.to_owned(),
        price_cents,
    }
}

impl Entity for Product {
    const NAME: &'static str = "product";
    const VERSION: u32 = 1;
    type Id = u64;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_secs(300)).tag("products")
    }
}

/// A new SQLite file in the temp directory, removed when dropped.
pub struct TempDb {
    pub db: Db,
    path: std::path::PathBuf,
}

impl TempDb {
    pub fn new(name: &str) -> TempDb {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tiered-cache-{name}-{}-{}.db",
            std::process::id(),
            N.fetch_add(1, SeqCst)
        ));
        let _ = std::fs::remove_file(&path);
        TempDb {
            db: Db::open(&path).expect("open SQLite"),
            path,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn table<E: Entity>(&self) -> Table<E> {
        self.db.table::<E>().expect("create the table")
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A cache in `namespace` on `server` (it must reach it).
pub async fn cache_on(server: &RedisServer, namespace: &str) -> TieredCache {
    TieredCache::builder()
        .namespace(namespace)
        .redis(server.url())
        .require_l2(true)
        .build()
        .await
        .expect("cache builds against the test Redis")
}

/// Each write call's ids and versions.
pub type Batches<I> = Arc<Mutex<Vec<Vec<(I, u64)>>>>;

/// A store in front of a SQLite table that the test steers: writes can be
/// held back (`hold`/`release`), made to fail a number of times, and each
/// write call's batch is recorded.
#[derive(Clone)]
pub struct Probe<E: Entity> {
    pub table: Table<E>,
    gate: Arc<watch::Sender<bool>>,
    failures_left: Arc<AtomicU32>,
    fail_ids: Arc<Mutex<Vec<E::Id>>>,
    /// Each write call: the ids and versions it carried, in order.
    pub batches: Batches<E::Id>,
    /// Loads wait this long before reading (a slow database).
    load_delay: Arc<Mutex<Duration>>,
    /// Loads wait for this gate when set.
    load_gate: Arc<Mutex<Option<Arc<Semaphore>>>>,
}

impl<E: Entity> Probe<E> {
    pub fn new(table: Table<E>) -> Probe<E> {
        Probe {
            table,
            gate: Arc::new(watch::Sender::new(true)),
            failures_left: Arc::default(),
            fail_ids: Arc::default(),
            batches: Arc::default(),
            load_delay: Arc::default(),
            load_gate: Arc::default(),
        }
    }

    /// Write calls wait from now until `release`.
    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// The next `n` write calls fail.
    pub fn fail_next(&self, n: u32) {
        self.failures_left.store(n, SeqCst);
    }

    /// Every write call that carries `id` fails.
    pub fn fail_id(&self, id: E::Id) {
        self.fail_ids.lock().unwrap().push(id);
    }

    pub fn heal(&self) {
        self.failures_left.store(0, SeqCst);
        self.fail_ids.lock().unwrap().clear();
    }

    /// Loads wait on the returned gate (add a permit to let one through).
    pub fn hold_loads(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.load_gate.lock().unwrap() = Some(Arc::clone(&gate));
        gate
    }

    pub fn slow_loads(&self, delay: Duration) {
        *self.load_delay.lock().unwrap() = delay;
    }

    pub fn write_calls(&self) -> usize {
        self.batches.lock().unwrap().len()
    }

    /// Every (id, version) written, in the order of the calls.
    pub fn writes(&self) -> Vec<(E::Id, u64)> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    async fn admit(&self, ids: Vec<(E::Id, u64)>) -> Result<(), StoreError> {
        let mut open = self.gate.subscribe();
        let _ = open.wait_for(|open| *open).await;
        let listed = {
            let fail = self.fail_ids.lock().unwrap();
            ids.iter().any(|(id, _)| fail.contains(id))
        };
        let counted = self
            .failures_left
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if listed || counted {
            return Err(StoreError("the database is unavailable (test)".into()));
        }
        self.batches.lock().unwrap().push(ids);
        Ok(())
    }
}

impl<E: Entity> Store<E> for Probe<E> {
    type Error = StoreError;

    async fn load(&self, id: &E::Id) -> Result<Option<E>, StoreError> {
        // Read first, then wait: a slow load that read the old row.
        let row = self.table.load(id).await;
        let gate = self.load_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            drop(gate.acquire().await.expect("load gate"));
        }
        let delay = *self.load_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        row
    }

    async fn save(&self, id: &E::Id, value: &Arc<E>, version: u64) -> Result<(), StoreError> {
        self.admit(vec![(id.clone(), version)]).await?;
        self.table.save(id, value, version).await
    }

    async fn delete(&self, id: &E::Id, version: u64) -> Result<(), StoreError> {
        self.admit(vec![(id.clone(), version)]).await?;
        self.table.delete(id, version).await
    }

    async fn save_many(&self, writes: &[(E::Id, Arc<E>, u64)]) -> Result<(), StoreError> {
        self.admit(writes.iter().map(|(id, _, v)| (id.clone(), *v)).collect())
            .await?;
        self.table.save_many(writes).await
    }

    async fn delete_many(&self, deletes: &[(E::Id, u64)]) -> Result<(), StoreError> {
        self.admit(deletes.to_vec()).await?;
        self.table.delete_many(deletes).await
    }
}

/// Polls `cond` every millisecond until it holds; fails after 20 s.
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The stored value of `id` (`None`: no row, or deleted).
pub async fn stored<E: Entity>(table: &Table<E>, id: &E::Id) -> Option<E> {
    table
        .row(id)
        .await
        .expect("read SQLite")
        .and_then(|(v, _)| v)
}
