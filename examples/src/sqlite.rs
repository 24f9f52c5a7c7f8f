//! An entity table in SQLite, as a [`Store`]: one row per id, holding the
//! value as JSON and the version of the write that put it there.
//!
//! Every write is conditional on the version (`WHERE version < ?`), so an
//! older write that arrives late (a retry, a replay, another instance's
//! flush) changes nothing. A delete leaves a tombstone row (a NULL body)
//! at its version for the same reason: without it, an older save arriving
//! after the delete would bring the row back.
//!
//! SQLite through rusqlite (`bundled`: compiled in, nothing to install, no
//! database needed at build time). It is synchronous; each call runs on
//! tokio's blocking pool, one connection behind a mutex, which is what an
//! embedded database wants anyway (one writer at a time).

use std::marker::PhantomData;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use tiered_cache::write::{Entity, Store};

/// A SQLite database file (created on first use), shared by its tables.
#[derive(Clone, Debug)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Db, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The table of entity `E` (created if missing), named after `E::NAME`.
    pub fn table<E: Entity>(&self) -> Result<Table<E>, StoreError> {
        let name = table_name::<E>();
        self.with(|conn| {
            conn.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {name} (
                    id TEXT PRIMARY KEY,
                    body TEXT,
                    version INTEGER NOT NULL
                )"
            ))
        })?;
        Ok(Table {
            db: self.clone(),
            name,
            counts: Arc::default(),
            _entity: PhantomData,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StoreError("the SQLite connection was poisoned".into()))?;
        Ok(f(&mut conn)?)
    }

    /// Runs `f` on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.with(f))
            .await
            .map_err(|e| StoreError(format!("the SQLite task failed: {e}")))?
    }
}

fn table_name<E: Entity>() -> String {
    let clean: String = E::NAME
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{clean}_v{}", E::VERSION)
}

/// What a table was asked to do, for the examples' printouts and the tests.
#[derive(Debug, Default)]
pub struct Counts {
    /// `load` calls.
    pub loads: AtomicU64,
    /// Store calls that write (`save`, `delete`, and each `save_many` /
    /// `delete_many` batch as one).
    pub write_calls: AtomicU64,
    /// Rows written (a batch counts each of its writes).
    pub rows_written: AtomicU64,
}

/// The table of one entity; a [`Store`] for it.
#[derive(Debug)]
pub struct Table<E> {
    db: Db,
    name: String,
    counts: Arc<Counts>,
    _entity: PhantomData<fn() -> E>,
}

impl<E> Clone for Table<E> {
    fn clone(&self) -> Self {
        Table {
            db: self.db.clone(),
            name: self.name.clone(),
            counts: Arc::clone(&self.counts),
            _entity: PhantomData,
        }
    }
}

impl<E: Entity> Table<E> {
    /// What this table was asked to do so far (shared by its clones).
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// The row of `id` as stored: its value (`None`: deleted) and version.
    pub async fn row(&self, id: &E::Id) -> Result<Option<(Option<E>, u64)>, StoreError> {
        let (sql, id) = (
            format!("SELECT body, version FROM {} WHERE id = ?1", self.name),
            id.to_string(),
        );
        let row: Option<(Option<String>, i64)> = self
            .db
            .run(move |conn| {
                conn.query_row(&sql, params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .await?;
        match row {
            None => Ok(None),
            Some((body, version)) => {
                let value = body.map(|b| decode::<E>(&b)).transpose()?;
                Ok(Some((value, version as u64)))
            }
        }
    }

    /// Every live row: id (as text) and value.
    pub async fn all(&self) -> Result<Vec<(String, E)>, StoreError> {
        let sql = format!(
            "SELECT id, body FROM {} WHERE body IS NOT NULL ORDER BY id",
            self.name
        );
        let rows: Vec<(String, String)> = self
            .db
            .run(move |conn| {
                let mut stmt = conn.prepare(&sql)?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await?;
        rows.into_iter()
            .map(|(id, body)| Ok((id, decode::<E>(&body)?)))
            .collect()
    }

    /// Writes rows in one transaction: `(id, body or NULL, version)`.
    async fn write_rows(&self, rows: Vec<(String, Option<String>, u64)>) -> Result<(), StoreError> {
        let n = rows.len() as u64;
        let sql = format!(
            "INSERT INTO {name} (id, body, version) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, version = excluded.version
             WHERE excluded.version > {name}.version",
            name = self.name
        );
        self.db
            .run(move |conn| {
                let tx = conn.transaction()?;
                {
                    let mut stmt = tx.prepare_cached(&sql)?;
                    for (id, body, version) in &rows {
                        stmt.execute(params![id, body, *version as i64])?;
                    }
                }
                tx.commit()
            })
            .await?;
        self.counts.write_calls.fetch_add(1, Ordering::Relaxed);
        self.counts.rows_written.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

fn decode<E: Entity>(body: &str) -> Result<E, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError(format!("a stored row is not valid: {e}")))
}

fn encode<E: Entity>(value: &E) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError(format!("a value did not encode: {e}")))
}

impl<E: Entity> Store<E> for Table<E> {
    type Error = StoreError;

    async fn load(&self, id: &E::Id) -> Result<Option<E>, StoreError> {
        self.counts.loads.fetch_add(1, Ordering::Relaxed);
        Ok(self.row(id).await?.and_then(|(value, _)| value))
    }

    async fn save(&self, id: &E::Id, value: &Arc<E>, version: u64) -> Result<(), StoreError> {
        let row = (id.to_string(), Some(encode(&**value)?), version);
        self.write_rows(vec![row]).await
    }

    async fn delete(&self, id: &E::Id, version: u64) -> Result<(), StoreError> {
        self.write_rows(vec![(id.to_string(), None, version)]).await
    }

    async fn save_many(&self, writes: &[(E::Id, Arc<E>, u64)]) -> Result<(), StoreError> {
        let rows = writes
            .iter()
            .map(|(id, value, version)| Ok((id.to_string(), Some(encode(&**value)?), *version)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write_rows(rows).await
    }

    async fn delete_many(&self, deletes: &[(E::Id, u64)]) -> Result<(), StoreError> {
        let rows = deletes
            .iter()
            .map(|(id, version)| (id.to_string(), None, *version))
            .collect();
        self.write_rows(rows).await
    }
}

/// A SQLite failure, as text (the store's errors reach dead letters as text anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(format!("SQLite: {e}"))
    }
}
