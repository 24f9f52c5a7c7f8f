//! What the examples share: a small SQLite store for the write-policy
//! examples and tests.

pub mod sqlite;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiered_cache::write::Entity;
use tiered_cache::EntryOptions;

/// A counter written at a rising sequence number: the durable write-behind
/// example and its crash test check which sequence number reached SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// The sequence number of the write that set it.
    pub seq: u64,
}

impl Entity for Counter {
    const NAME: &'static str = "counter";
    const VERSION: u32 = 1;
    type Id = u64;
    fn options() -> EntryOptions {
        EntryOptions::new(Duration::from_secs(600))
    }
}
