//! The MDM domain, below every backend and every edge: the records and
//! their ids, OS randomness and the keys derived from the server secret,
//! and private file writes. It knows no sled, SQL, tonic, clap or HTTP;
//! the compiler keeps it that way (none is a dependency).
#![forbid(unsafe_code)]

pub mod crypto;
pub mod domain;
pub mod error;
pub mod fsutil;
pub mod live;
pub mod model;
pub mod pki;
pub mod rules;
pub mod snapshot;
pub mod store;
pub mod throttle;
