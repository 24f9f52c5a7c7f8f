//! The application's source of truth, as the write policies see it.

use std::future::Future;
use std::sync::Arc;

use super::Entity;

/// The source of truth of one entity (a database table, say).
///
/// Every write carries the entry's `version`, which only grows: a store
/// that keeps it beside the row can refuse an older write, so a retried,
/// replayed or reordered write never undoes a newer one:
///
/// ```sql
/// INSERT INTO products (id, body, version) VALUES (?1, ?2, ?3)
/// ON CONFLICT (id) DO UPDATE SET body = ?2, version = ?3 WHERE version < ?3
/// ```
///
/// The methods return `Send` futures (write-behind flushes from a spawned
/// task); write them as `async fn` in the impl.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex};
/// use tiered_cache::write::{Entity, Store};
/// # #[derive(Clone, serde::Serialize, serde::Deserialize)] struct Product { name: String }
/// # impl Entity for Product { const NAME: &'static str = "product"; const VERSION: u32 = 1; type Id = u64; }
///
/// #[derive(Default)]
/// struct Memory(Mutex<HashMap<u64, (Arc<Product>, u64)>>);
///
/// impl Store<Product> for Memory {
///     type Error = std::convert::Infallible;
///     async fn load(&self, id: &u64) -> Result<Option<Product>, Self::Error> {
///         Ok(self.0.lock().unwrap().get(id).map(|(p, _)| (**p).clone()))
///     }
///     async fn save(&self, id: &u64, value: &Arc<Product>, version: u64) -> Result<(), Self::Error> {
///         let mut rows = self.0.lock().unwrap();
///         if rows.get(id).map_or(true, |(_, v)| *v < version) {
///             rows.insert(*id, (Arc::clone(value), version));
///         }
///         Ok(())
///     }
///     async fn delete(&self, id: &u64, _version: u64) -> Result<(), Self::Error> {
///         self.0.lock().unwrap().remove(id);
///         Ok(())
///     }
/// }
/// ```
pub trait Store<E: Entity>: Send + Sync + 'static {
    /// The store's error, returned by `put` and `delete` (and recorded in
    /// dead letters as text).
    type Error: std::fmt::Display + Send + Sync + 'static;

    /// The value of `id`, or `None` when there is none.
    fn load(&self, id: &E::Id) -> impl Future<Output = Result<Option<E>, Self::Error>> + Send;

    /// Saves `value` as `id` at `version`; should do nothing when the store
    /// already holds a newer version.
    fn save(
        &self,
        id: &E::Id,
        value: &Arc<E>,
        version: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Deletes `id`, written at `version`.
    fn delete(
        &self,
        id: &E::Id,
        version: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Saves many at once (one transaction, say). An error fails the whole
    /// batch, which is then retried. Default: one `save` after another.
    fn save_many(
        &self,
        writes: &[(E::Id, Arc<E>, u64)],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        async move {
            for (id, value, version) in writes {
                self.save(id, value, *version).await?;
            }
            Ok(())
        }
    }

    /// Deletes many at once. Default: one `delete` after another.
    fn delete_many(
        &self,
        deletes: &[(E::Id, u64)],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        async move {
            for (id, version) in deletes {
                self.delete(id, *version).await?;
            }
            Ok(())
        }
    }
}
