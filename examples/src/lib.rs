//! What the examples share: a small SQLite store for the write-policy
//! examples and tests.

pub mod sqlite;
