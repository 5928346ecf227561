//! The tables, as versioned migrations applied once per database.
//!
//! Each aggregate is one row: the serde record (JSON, as BYTEA: JSONB
//! cannot hold a NUL, and agents send strings of their own) and the
//! columns the store looks rows up or orders them by, kept in step with the
//! record on every write. Text keys are `COLLATE "C"` so that they order
//! byte-wise, as page tokens and UUID v7 ids need.

use crate::PgOpenError;

/// Migration `i` takes the schema from version `i` to `i + 1`. Append only.
#[doc(hidden)]
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sites (
    site_id TEXT COLLATE "C" PRIMARY KEY,
    has_webhook BOOLEAN NOT NULL,
    record BYTEA NOT NULL
);

CREATE TABLE users (
    user_id TEXT COLLATE "C" PRIMARY KEY,
    site_id TEXT COLLATE "C" NOT NULL,
    email TEXT COLLATE "C" NOT NULL,
    record BYTEA NOT NULL,
    UNIQUE (site_id, email)
);
CREATE INDEX users_by_email ON users (email, site_id);

CREATE TABLE passcodes (
    site_id TEXT COLLATE "C" PRIMARY KEY,
    hash BYTEA NOT NULL UNIQUE,
    record BYTEA NOT NULL
);

CREATE TABLE devices (
    device_id TEXT COLLATE "C" PRIMARY KEY,
    site_id TEXT COLLATE "C" NOT NULL,
    serial_number BYTEA NOT NULL,
    status TEXT NOT NULL,
    platform TEXT NOT NULL,
    user_email TEXT COLLATE "C" NOT NULL,
    enrolled_at BIGINT NOT NULL,
    record BYTEA NOT NULL
);
CREATE UNIQUE INDEX devices_by_site ON devices (site_id, device_id);
CREATE INDEX devices_active_by_serial ON devices (site_id, serial_number)
    WHERE status = 'Active';

CREATE TABLE actions (
    action_id TEXT COLLATE "C" PRIMARY KEY,
    site_id TEXT COLLATE "C" NOT NULL,
    device_id TEXT COLLATE "C" NOT NULL,
    action_type TEXT NOT NULL,
    status TEXT NOT NULL,
    created_by TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    queued BOOLEAN NOT NULL,
    expires_at BIGINT NOT NULL,
    record BYTEA NOT NULL
);
CREATE INDEX actions_by_site ON actions (site_id, action_id);
CREATE INDEX actions_by_device ON actions (device_id, action_id);
CREATE INDEX actions_queued_by_device ON actions (device_id, action_id) WHERE queued;
CREATE INDEX actions_queued_by_expiry ON actions (expires_at) WHERE queued;

CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY,
    device_id TEXT COLLATE "C" NOT NULL,
    record BYTEA NOT NULL
);
CREATE INDEX audit_by_device ON audit (device_id, seq);

CREATE TABLE alerts (
    site_id TEXT COLLATE "C" NOT NULL,
    alert_id TEXT COLLATE "C" NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (site_id, alert_id)
);

CREATE TABLE outbox (
    notification_id TEXT COLLATE "C" PRIMARY KEY,
    site_id TEXT COLLATE "C" NOT NULL,
    state TEXT NOT NULL,
    record BYTEA NOT NULL
);
CREATE INDEX outbox_by_site ON outbox (site_id, notification_id);
CREATE INDEX outbox_pending ON outbox (notification_id) WHERE state = 'Pending';
"#,
    r#"
-- The commands not final yet move out of the actions' indexes into a table
-- of their own, so that no index of actions names a column a command's
-- progress changes: its updates are then HOT (no index entries written)
-- where the page has room, which the fill factor keeps. A row is added
-- with a command and removed when it ends, under its device's row lock.
CREATE TABLE open_actions (
    device_id TEXT COLLATE "C" NOT NULL,
    action_id TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (device_id, action_id)
);
CREATE INDEX open_actions_by_expiry ON open_actions (expires_at);
INSERT INTO open_actions (device_id, action_id, expires_at)
    SELECT device_id, action_id, expires_at FROM actions WHERE queued;
DROP INDEX actions_queued_by_device;
DROP INDEX actions_queued_by_expiry;
ALTER TABLE actions SET (fillfactor = 70);
"#,
];

/// Every table of records (all but `mdm_schema_migrations`): what an
/// import fills and finds empty first. A migration that adds a table adds
/// it here (a test compares this with the database's tables).
pub const TABLES: [&str; 9] = [
    "sites",
    "users",
    "passcodes",
    "devices",
    "actions",
    "open_actions",
    "audit",
    "alerts",
    "outbox",
];

/// Lists every queued action in `open_actions` (after a bulk copy).
pub(crate) const OPEN_QUEUED_ACTIONS: &str =
    "INSERT INTO open_actions (device_id, action_id, expires_at)
     SELECT device_id, action_id, expires_at FROM actions WHERE queued";

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Session advisory lock held while migrating, so that replicas starting
/// together migrate once ("mdm" "schm").
const MIGRATION_LOCK: i64 = 0x6d64_6d00_7363_686d;

/// Brings the database to [`SCHEMA_VERSION`], refusing a newer one.
pub(crate) async fn migrate(mut client: deadpool_postgres::Object) -> Result<(), PgOpenError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(migration_error)?;
    let result = migrate_locked(&mut client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    if unlocked.is_err() {
        // A connection that may still hold the lock must not go back to the
        // pool: closing it lets go of the lock.
        drop(deadpool_postgres::Object::take(client));
    }
    result?;
    unlocked.map(drop).map_err(migration_error)
}

async fn migrate_locked(client: &mut deadpool_postgres::Object) -> Result<(), PgOpenError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS mdm_schema_migrations (
                version INTEGER PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(migration_error)?;
    let found: i32 = client
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM mdm_schema_migrations",
            &[],
        )
        .await
        .map_err(migration_error)?
        .get(0);
    let found = u32::try_from(found).unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(PgOpenError::SchemaTooNew {
            found,
            expected: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
        let tx = client.transaction().await.map_err(migration_error)?;
        tx.batch_execute(sql).await.map_err(migration_error)?;
        tx.execute(
            "INSERT INTO mdm_schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(migration_error)?;
        tx.commit().await.map_err(migration_error)?;
        tracing::info!(version, "database schema migrated");
    }
    Ok(())
}

fn migration_error(error: tokio_postgres::Error) -> PgOpenError {
    PgOpenError::Migration(error.to_string())
}
