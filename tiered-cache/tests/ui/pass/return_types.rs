//! Every supported return type; `Arc<T>` values need no `Clone`.
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiered_cache::cached;

#[derive(Clone, Serialize, Deserialize)]
struct Cloned(u64);

#[derive(Serialize, Deserialize)]
struct NotCloned(u64);

#[derive(Debug)]
struct NotClonedError;

#[cached]
async fn plain(id: u64) -> Cloned {
    Cloned(id)
}
#[cached]
async fn plain_arc(id: u64) -> Arc<NotCloned> {
    Arc::new(NotCloned(id))
}
#[cached]
async fn option(id: u64) -> Option<Cloned> {
    Some(Cloned(id))
}
#[cached]
async fn option_arc(id: u64) -> Option<Arc<NotCloned>> {
    None.or(Some(Arc::new(NotCloned(id))))
}
#[cached]
async fn result(id: u64) -> Result<Cloned, NotClonedError> {
    Ok(Cloned(id))
}
#[cached]
async fn result_arc(id: u64) -> Result<Arc<NotCloned>, NotClonedError> {
    Ok(Arc::new(NotCloned(id)))
}
#[cached]
async fn result_option(id: u64) -> Result<Option<Cloned>, String> {
    Ok(Some(Cloned(id)))
}
#[cached]
async fn result_option_arc(id: u64) -> Result<Option<Arc<NotCloned>>, String> {
    Ok(None)
}
#[cached]
async fn tuple(id: u64) -> (u64, String) {
    (id, id.to_string())
}
#[cached]
async fn vec(id: u64) -> Vec<Cloned> {
    vec![Cloned(id)]
}

fn is_send<T: Send>(_: T) {}

fn main() {
    is_send(plain(1));
    is_send(plain_arc(1));
    is_send(option(1));
    is_send(option_arc(1));
    is_send(result(1));
    is_send(result_arc(1));
    is_send(result_option(1));
    is_send(result_option_arc(1));
    is_send(tuple(1));
    is_send(vec(1));
}
