//! The MDM control server as a library: `main` only parses the command line
//! and calls in here; tests call [`run`] on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod admin_cli;
pub mod admins;
pub mod api;
pub mod app;
pub mod config;
pub mod datadir;
pub mod destination;
pub mod error;
pub mod identity;
pub mod migrate;
pub mod notify;
pub mod server;
pub mod site_webhooks;
pub mod tls;
pub mod webhook;

pub use mdm_core::{crypto, fsutil, live, model, pki, throttle};

pub use config::Config;
pub use mdm_store_postgres::PgConfig;
pub use server::run;
