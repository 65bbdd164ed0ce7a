//! Stores: the durable end of the pipeline. Only after a store commit is anything acked.
//!
//! `sqlite` is the embedded default for a single machine.

pub mod sqlite;

pub use sqlite::{
    Order, ReadingsQuery, SqliteStore, StoreError, StoreReader, StoredLatest, StoredReading,
};
