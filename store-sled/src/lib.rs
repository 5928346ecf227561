//! The store contract ([`mdm_core::store::Store`]) on embedded sled: the
//! zero-config default. [`Storage`] holds sled's trees, keys and encoding
//! and orders its writes under its own locks; `contract` implements the
//! domain operations on it, durable on return through its group commit.

#![forbid(unsafe_code)]

mod contract;
pub mod storage;

pub use storage::{SCHEMA_VERSION, Storage, StorageError, new_action_id};
