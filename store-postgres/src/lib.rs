#![forbid(unsafe_code)]
//! [`mdm_core::store::Store`] on PostgreSQL.
//!
//! Every operation is one transaction on a pooled connection; a mutating
//! one commits before it returns (synchronously, except the "durable soon"
//! ones, which commit with `synchronous_commit = off`). Concurrent queueing
//! and concurrent agent reports share transactions (`batch`): what each
//! call does is the same as alone, in the order the calls arrived. Operations on one
//! device's commands first lock the device's row (`SELECT ... FOR UPDATE`),
//! which serialises them across every server process sharing the database,
//! then apply [`mdm_core::rules`] in Rust and write. Several servers may
//! share one database: nothing here is cached in the process.

mod batch;
mod commands;
mod config;
mod db;
mod devices;
mod import;
mod outbox;
mod rows;
mod schema;
mod sites;

use std::fmt;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use mdm_core::store::{Store, StoreResult};

pub use config::{PgConfig, check_config, url_has_password};
pub use import::ImportError;
pub use schema::{MIGRATIONS, SCHEMA_VERSION, TABLES};

use db::{Fail, R};

/// Why [`PgStore::connect`] failed. No variant holds the password.
#[derive(Debug, thiserror::Error)]
pub enum PgOpenError {
    /// The URL or another setting is wrong.
    #[error("bad database configuration: {0}")]
    BadUrl(String),
    #[error("cannot use the database CA file {path}: {reason}")]
    BadCaFile { path: String, reason: String },
    #[error("cannot set up TLS for the database: {0}")]
    Tls(String),
    /// No session could be opened: the server is down, unreachable, too
    /// slow, not speaking TLS when it must, or starting up.
    #[error("cannot reach the database at {target}: {reason}")]
    Unreachable { target: String, reason: String },
    /// The server answered and refused: a wrong password, no such
    /// database or role.
    #[error("the database at {target} refused the connection: {reason}")]
    Refused { target: String, reason: String },
    #[error(
        "the database has schema version {found}, newer than this server's {expected}; refusing to start"
    )]
    SchemaTooNew { found: u32, expected: u32 },
    #[error("migrating the database schema failed: {0}")]
    Migration(String),
}

/// The PostgreSQL store: a pool of connections to one database.
pub struct PgStore {
    db: Pooled,
    target: String,
    queue_batches: batch::Combiner<commands::QueueJob>,
    report_batches: batch::Combiner<commands::ReportJob>,
    device_reads: batch::Combiner<devices::DeviceRead>,
    passcode_uses: batch::Combiner<devices::PasscodeUse>,
}

/// The pool, as the tasks that run batches hold it.
#[derive(Clone)]
pub(crate) struct Pooled {
    pool: Pool,
}

impl Pooled {
    pub(crate) async fn client(&self) -> R<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.db.pool.status();
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .field("connections", &status.size)
            .field("max_connections", &status.max_size)
            .finish()
    }
}

impl PgStore {
    /// Connects, and migrates the schema to [`SCHEMA_VERSION`] (once, when
    /// several servers start together). Refuses a database whose schema
    /// is newer than this build.
    pub async fn connect(config: PgConfig) -> Result<PgStore, PgOpenError> {
        let parsed = config::parse(&config)?;
        let target = parsed.target.clone();
        let manager_config = ManagerConfig {
            // A broken connection shows as closed; no test query per checkout.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match parsed.tls {
            config::Tls::Disable => {
                Manager::from_config(parsed.config, tokio_postgres::NoTls, manager_config)
            }
            tls => {
                let client = config::client_config(tls, parsed.ca_file.as_deref())?;
                Manager::from_config(
                    parsed.config,
                    tokio_postgres_rustls::MakeRustlsConnect::new(client),
                    manager_config,
                )
            }
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| PgOpenError::BadUrl(e.to_string()))?;
        let client = pool.get().await.map_err(|e| open_error(e, &target))?;
        schema::migrate(client).await?;
        let db = Pooled { pool };
        Ok(PgStore {
            queue_batches: commands::queue_combiner(db.clone()),
            report_batches: commands::report_combiner(db.clone()),
            device_reads: devices::read_combiner(db.clone()),
            passcode_uses: devices::passcode_use_combiner(db.clone()),
            db,
            target,
        })
    }

    /// `host:port` of the database, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    pub(crate) async fn client(&self) -> R<deadpool_postgres::Object> {
        self.db.client().await
    }

    /// The record of the one row `sql` selects by text `keys` (`$1`, `$2`,
    /// …); none when there is no such row, or no row could have these keys.
    pub(crate) async fn one_record<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        keys: &[&str],
    ) -> StoreResult<Option<T>> {
        if keys.iter().any(|key| db::has_nul(key)) {
            return Ok(None);
        }
        let params: Vec<db::Param<'_>> = keys.iter().map(|key| key as db::Param<'_>).collect();
        async {
            let client = self.client().await?;
            db::query_opt(&client, sql, &params)
                .await?
                .map(|row| db::record(&row))
                .transpose()
        }
        .await
        .map_err(db::Fail::into_store)
    }
}

fn open_error(error: deadpool_postgres::PoolError, target: &str) -> PgOpenError {
    let target = target.to_owned();
    match error {
        deadpool_postgres::PoolError::Backend(error) => match error.as_db_error() {
            Some(db) if !db::is_transient(db.code()) => PgOpenError::Refused {
                target,
                reason: db.message().to_owned(),
            },
            _ => PgOpenError::Unreachable {
                target,
                reason: error.to_string(),
            },
        },
        deadpool_postgres::PoolError::Timeout(_) => PgOpenError::Unreachable {
            target,
            reason: "timed out".into(),
        },
        other => PgOpenError::Unreachable {
            target,
            reason: other.to_string(),
        },
    }
}

#[async_trait]
impl Store for PgStore {
    async fn close(&self) -> StoreResult<()> {
        let flushed: R<()> = async {
            let client = self.client().await?;
            // Committing a transaction that has an id writes a commit record
            // and waits for the WAL up to it, which covers every earlier
            // commit made with synchronous_commit off.
            client
                .batch_execute(
                    "BEGIN; SET LOCAL synchronous_commit = on; SELECT txid_current(); COMMIT",
                )
                .await?;
            Ok(())
        }
        .await;
        self.db.pool.close();
        flushed.map_err(Fail::into_store)
    }
}
