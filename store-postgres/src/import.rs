//! Loading a whole deployment ([`Snapshot`]) into an empty database, as
//! `mdm-server migrate` does when it moves a sled deployment here.
//!
//! One transaction: the tables are locked against writers, found empty,
//! filled with `COPY ... FROM STDIN BINARY` (one stream per table, so a
//! hundred thousand actions take seconds), counted again, and committed
//! only when every count is the snapshot's. Each row's looked-up columns
//! are filled from the record with the same helpers the store's own writes
//! use ([`tag`], [`encode`], [`Action::is_queued`], the passcode hash), and
//! ids are kept as they are: they are opaque to this backend.

use std::pin::Pin;

use mdm_core::model::{Action, Device};
use mdm_core::snapshot::{Snapshot, SnapshotCounts};
use mdm_core::store::{StoreError, StoreResult};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use crate::PgStore;
use crate::db::{Fail, R, encode, tag};
use crate::rows::{ActionRow, DeviceRow};
use crate::schema::{OPEN_QUEUED_ACTIONS, TABLES};
use crate::sites::passcode_hash;

/// Why [`PgStore::import`] stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "the database is not empty: table {table} has rows; an import goes into an empty database only"
    )]
    NotEmpty { table: &'static str },
    /// The rows counted after the copy are not the snapshot's (a record
    /// the snapshot holds twice, say); the transaction was rolled back.
    #[error(
        "the database would hold {imported} {kind} after the import, the snapshot has {expected}; nothing was imported"
    )]
    Mismatch {
        kind: &'static str,
        expected: usize,
        imported: usize,
    },
    #[error("importing failed, nothing was imported: {0}")]
    Store(#[from] StoreError),
}

/// A `COPY ... FROM STDIN BINARY` of one table, in the open transaction.
type Copy = Pin<Box<BinaryCopyInWriter>>;

async fn copy_in(tx: &tokio_postgres::Transaction<'_>, sql: &str, types: &[Type]) -> R<Copy> {
    let sink = tx.copy_in(sql).await?;
    Ok(Box::pin(BinaryCopyInWriter::new(sink, types)))
}

async fn row(copy: &mut Copy, values: &[&(dyn ToSql + Sync)]) -> R<()> {
    copy.as_mut().write(values).await?;
    Ok(())
}

async fn finish(mut copy: Copy) -> R<()> {
    copy.as_mut().finish().await?;
    Ok(())
}

/// The first table (of [`TABLES`]) that has a row.
async fn table_with_rows<C: deadpool_postgres::GenericClient>(c: &C) -> R<Option<&'static str>> {
    for table in TABLES {
        let row = c
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])
            .await?;
        if row.try_get::<_, bool>(0)? {
            return Ok(Some(table));
        }
    }
    Ok(None)
}

async fn count_rows<C: deadpool_postgres::GenericClient>(c: &C) -> R<SnapshotCounts> {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM sites), (SELECT count(*) FROM users),
                    (SELECT count(*) FROM passcodes), (SELECT count(*) FROM devices),
                    (SELECT count(*) FROM actions), (SELECT count(*) FROM audit),
                    (SELECT count(*) FROM alerts), (SELECT count(*) FROM outbox)",
            &[],
        )
        .await?;
    let count = |i: usize| -> R<usize> {
        let n: i64 = row.try_get(i)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    };
    Ok(SnapshotCounts {
        sites: count(0)?,
        users: count(1)?,
        passcodes: count(2)?,
        devices: count(3)?,
        actions: count(4)?,
        audit_entries: count(5)?,
        alerts: count(6)?,
        notifications: count(7)?,
    })
}

async fn copy_devices(tx: &tokio_postgres::Transaction<'_>, devices: &[Device]) -> R<()> {
    let sql = format!("COPY devices ({}) FROM STDIN BINARY", DeviceRow::COLUMNS);
    let mut copy = copy_in(tx, &sql, &DeviceRow::TYPES).await?;
    for device in devices {
        row(
            &mut copy,
            &DeviceRow::of(&device.device_id, device)?.params(),
        )
        .await?;
    }
    finish(copy).await
}

async fn copy_actions(tx: &tokio_postgres::Transaction<'_>, actions: &[Action]) -> R<()> {
    let sql = format!("COPY actions ({}) FROM STDIN BINARY", ActionRow::COLUMNS);
    let mut copy = copy_in(tx, &sql, &ActionRow::TYPES).await?;
    for action in actions {
        row(&mut copy, &ActionRow::of(action)?.params()).await?;
    }
    finish(copy).await?;
    tx.execute(OPEN_QUEUED_ACTIONS, &[]).await?;
    Ok(())
}

/// Copies every record of `snapshot` into the (empty, locked) tables.
async fn copy_snapshot(tx: &tokio_postgres::Transaction<'_>, snapshot: &Snapshot) -> R<()> {
    let mut copy = copy_in(
        tx,
        "COPY sites (site_id, has_webhook, record) FROM STDIN BINARY",
        &[Type::TEXT, Type::BOOL, Type::BYTEA],
    )
    .await?;
    for site in &snapshot.sites {
        row(
            &mut copy,
            &[&site.site_id, &site.webhook.is_some(), &encode(site)?],
        )
        .await?;
    }
    finish(copy).await?;

    let mut copy = copy_in(
        tx,
        "COPY users (user_id, site_id, email, record) FROM STDIN BINARY",
        &[Type::TEXT, Type::TEXT, Type::TEXT, Type::BYTEA],
    )
    .await?;
    for user in &snapshot.users {
        row(
            &mut copy,
            &[&user.user_id, &user.site_id, &user.email, &encode(user)?],
        )
        .await?;
    }
    finish(copy).await?;

    let mut copy = copy_in(
        tx,
        "COPY passcodes (site_id, hash, record) FROM STDIN BINARY",
        &[Type::TEXT, Type::BYTEA, Type::BYTEA],
    )
    .await?;
    for passcode in &snapshot.passcodes {
        row(
            &mut copy,
            &[
                &passcode.site_id,
                &passcode_hash(passcode)?,
                &encode(passcode)?,
            ],
        )
        .await?;
    }
    finish(copy).await?;

    copy_devices(tx, &snapshot.devices).await?;
    copy_actions(tx, &snapshot.actions).await?;

    // In the snapshot's order: `seq` (the trail's order) counts up as it goes.
    let mut copy = copy_in(
        tx,
        "COPY audit (device_id, record) FROM STDIN BINARY",
        &[Type::TEXT, Type::BYTEA],
    )
    .await?;
    for audit in &snapshot.audit {
        row(&mut copy, &[&audit.device_id, &encode(&audit.entry)?]).await?;
    }
    finish(copy).await?;

    let mut copy = copy_in(
        tx,
        "COPY alerts (site_id, alert_id, record) FROM STDIN BINARY",
        &[Type::TEXT, Type::TEXT, Type::BYTEA],
    )
    .await?;
    for alert in &snapshot.alerts {
        row(
            &mut copy,
            &[&alert.site_id, &alert.alert_id, &encode(alert)?],
        )
        .await?;
    }
    finish(copy).await?;

    let mut copy = copy_in(
        tx,
        "COPY outbox (notification_id, site_id, state, record) FROM STDIN BINARY",
        &[Type::TEXT, Type::TEXT, Type::TEXT, Type::BYTEA],
    )
    .await?;
    // As `outbox::insert_notifications` fills them.
    for notification in &snapshot.notifications {
        row(
            &mut copy,
            &[
                &notification.notification_id,
                &notification.site_id,
                &tag(&notification.state),
                &encode(notification)?,
            ],
        )
        .await?;
    }
    finish(copy).await
}

impl PgStore {
    /// Whether no table holds a row.
    pub async fn is_empty(&self) -> StoreResult<bool> {
        Ok(self.table_with_rows().await?.is_none())
    }

    /// The first table that holds a row, None when the database is empty.
    pub async fn table_with_rows(&self) -> StoreResult<Option<&'static str>> {
        async {
            let client = self.client().await?;
            table_with_rows(&client).await
        }
        .await
        .map_err(Fail::into_store)
    }

    /// How many records of each kind the database holds.
    pub async fn counts(&self) -> StoreResult<SnapshotCounts> {
        async {
            let client = self.client().await?;
            count_rows(&client).await
        }
        .await
        .map_err(Fail::into_store)
    }

    /// Stores every record of `snapshot` in this database, which must be
    /// empty, in one transaction: all of it or (on any error) nothing.
    /// Returns the rows counted inside the transaction before it commits,
    /// which are the snapshot's counts.
    pub async fn import(&self, snapshot: &Snapshot) -> Result<SnapshotCounts, ImportError> {
        let expected = snapshot.counts();
        let outcome: R<Result<SnapshotCounts, ImportError>> = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // Writers (another server sharing the database) wait until the
            // import is done; readers do not.
            tx.batch_execute(&format!(
                "LOCK TABLE {} IN EXCLUSIVE MODE",
                TABLES.join(", ")
            ))
            .await?;
            if let Some(table) = table_with_rows(&tx).await? {
                return Ok(Err(ImportError::NotEmpty { table }));
            }
            copy_snapshot(&tx, snapshot).await?;
            let imported = count_rows(&tx).await?;
            if let Some((kind, expected, imported)) = expected.first_difference(&imported) {
                return Ok(Err(ImportError::Mismatch {
                    kind,
                    expected,
                    imported,
                }));
            }
            // The planner has statistics for the new rows from the start.
            tx.batch_execute(&format!("ANALYZE {}", TABLES.join(", ")))
                .await?;
            tx.commit().await?;
            Ok(Ok(imported))
        }
        .await;
        outcome.map_err(|fail| ImportError::Store(fail.into_store()))?
    }
}
