//! The MDM device agent as a library: enrollment, the connection loop and
//! the platform backends; `main` only parses the command line.
#![forbid(unsafe_code)]

pub mod backend;
pub mod client;
pub mod enroll;
pub mod facts;
pub mod journal;
pub mod run;
pub mod state;
pub mod system;
