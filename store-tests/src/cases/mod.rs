//! The conformance cases: each takes a fresh, empty store (and the cases
//! of `durability`, the guard to reopen it through) and panics when the
//! store breaks the contract. [`crate::store_conformance_suite!`] runs
//! them all; a new case goes into its list there too (a test of this crate
//! checks that none is missing).

mod atomic;
mod commands;
mod concurrency;
mod devices;
mod durability;
mod outbox;
mod pages;
mod passcodes;
mod sites;

pub use atomic::*;
pub use commands::*;
pub use concurrency::*;
pub use devices::*;
pub use durability::*;
pub use outbox::*;
pub use pages::*;
pub use passcodes::*;
pub use sites::*;
