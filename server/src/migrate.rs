//! `mdm-server migrate`: copies the database of a data dir (sled) into an
//! empty PostgreSQL database, all of it or nothing.
//!
//! The data dir is opened as the server opens it (which upgrades an older
//! schema and finishes what a crash interrupted), and held, so no server
//! can run on it meanwhile. Every record is read out, the target is
//! connected (its schema migrated) and must be empty, the records go in
//! in one transaction, and the rows are counted again once it committed.
//! Only the database moves: the CA, `secret.key` (the key of the passcode
//! hashes and of everything sealed in the records) and the admin registry
//! stay in the data dir, which the server keeps using. The data dir is
//! then marked (`MIGRATED-TO-POSTGRESQL`): a server started on it without
//! a database URL refuses to serve the stale copy.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mdm_core::snapshot::{Snapshot, SnapshotCounts};
use mdm_core::store::{Store, StoreError};
use mdm_store_postgres::{ImportError, PgConfig, PgOpenError, PgStore};

use crate::datadir::{DataDir, DataDirError};
use mdm_store_sled::{Storage, StorageError};

/// Why a migration stopped. None of these holds the database password:
/// the target is named by `host:port` only.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{path} is not an mdm-server data dir: {reason}; nothing was copied")]
    NotADataDir { path: PathBuf, reason: String },
    #[error("cannot read the database of the data dir at {path}: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: StorageError,
    },
    #[error(transparent)]
    Connect(#[from] PgOpenError),
    #[error(
        "the database at {target} is not empty (table {table} has rows); migrate copies into an empty database only, nothing was copied"
    )]
    TargetNotEmpty { target: String, table: &'static str },
    #[error("copying into the database at {target} failed: {source}")]
    Import {
        target: String,
        #[source]
        source: ImportError,
    },
    #[error("checking the database at {target} failed: {source}")]
    Target {
        target: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "the database at {target} holds {imported} {kind} after the copy, the data dir {exported}"
    )]
    CountMismatch {
        target: String,
        kind: &'static str,
        exported: usize,
        imported: usize,
    },
    #[error("reading the data dir stopped: {0}")]
    Stopped(String),
    #[error(
        "copied to {target}, but cannot mark the data dir as migrated ({path}: {reason}); do not start a server on it without --database-url"
    )]
    Mark {
        target: String,
        path: PathBuf,
        reason: String,
    },
}

/// What a migration copied, and how long it took.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// The records copied, counted in the target after the commit.
    pub counts: SnapshotCounts,
    /// `host:port` of the target.
    pub target: String,
    /// Reading every record out of the data dir.
    pub export: Duration,
    /// Storing them in the target, in its one transaction.
    pub import: Duration,
    /// The whole migration.
    pub total: Duration,
}

impl MigrationReport {
    pub fn seconds(&self) -> f64 {
        self.total.as_secs_f64()
    }
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "copied {} to {} in {:.1} s (read {:.1} s, write {:.1} s)",
            self.counts,
            self.target,
            self.total.as_secs_f64(),
            self.export.as_secs_f64(),
            self.import.as_secs_f64()
        )
    }
}

/// Refuses a directory that is not a data dir, before anything is opened.
fn check_data_dir(dir: &Path) -> Result<DataDir, MigrateError> {
    let not = |reason: String| MigrateError::NotADataDir {
        path: dir.to_path_buf(),
        reason,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(not("it is not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not("it does not exist".into()));
        }
        Err(e) => return Err(not(e.to_string())),
    }
    let data_dir = DataDir::new(dir);
    match data_dir.check_layout() {
        Ok(()) => Ok(data_dir),
        Err(DataDirError::Foreign { missing, .. }) => Err(not(format!("{missing} is missing"))),
        Err(other) => Err(not(other.to_string())),
    }
}

/// Runs blocking sled work off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, MigrateError> + Send + 'static,
) -> Result<T, MigrateError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| MigrateError::Stopped(e.to_string()))?
}

/// Copies every record of the data dir at `from_data_dir` into the empty
/// PostgreSQL database `to`: refuses a directory that is not a data dir and
/// a target that holds any row, and checks after the commit that the target
/// holds as many records of each kind as the data dir. The data dir is only
/// read (but upgraded first when its schema is older, as a start would).
pub async fn migrate(from_data_dir: &Path, to: PgConfig) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    let data_dir = check_data_dir(from_data_dir)?;
    let marker = data_dir.migrated_marker();
    let db_path = data_dir.db();
    let source = move |source: StorageError| MigrateError::Source {
        path: data_dir.db(),
        source,
    };
    let opening = source.clone();
    let storage = blocking(move || Storage::open(&db_path).map_err(opening)).await?;

    let store = PgStore::connect(to).await?;
    let target = store.target().to_owned();
    let on_target = |source: StoreError| MigrateError::Target {
        target: target.clone(),
        source,
    };
    // Refused before reading anything out of the data dir; the import
    // checks again under its locks.
    if let Some(table) = store.table_with_rows().await.map_err(on_target)? {
        return Err(MigrateError::TargetNotEmpty {
            target: target.clone(),
            table,
        });
    }

    let exporting = Instant::now();
    let snapshot: Snapshot = blocking(move || {
        let snapshot = storage.export().map_err(source.clone())?;
        // What opening wrote (an upgrade, a finished lockout) is kept; the
        // data dir (and its lock) is let go once everything is read.
        storage.flush().map_err(source)?;
        drop(storage);
        Ok(snapshot)
    })
    .await?;
    let export = exporting.elapsed();
    let exported = snapshot.counts();
    tracing::info!(%exported, seconds = export.as_secs_f64(), "read the data dir");

    let importing = Instant::now();
    match store.import(&snapshot).await {
        Ok(_) => {}
        Err(ImportError::NotEmpty { table }) => {
            return Err(MigrateError::TargetNotEmpty {
                target: target.clone(),
                table,
            });
        }
        Err(source) => {
            return Err(MigrateError::Import {
                target: target.clone(),
                source,
            });
        }
    }
    let import = importing.elapsed();
    drop(snapshot);

    // Counted again from outside the import's transaction, once committed.
    let imported = store.counts().await.map_err(on_target)?;
    store.close().await.map_err(on_target)?;
    if let Some((kind, exported, imported)) = exported.first_difference(&imported) {
        return Err(MigrateError::CountMismatch {
            target,
            kind,
            exported,
            imported,
        });
    }
    let note = format!(
        "The database of this data dir was copied to PostgreSQL at {target} ({} records).\n\
         Servers on this data dir store there now: start them with --database-url.\n\
         `mdm-server serve` without one refuses to start while this file is here; remove it\n\
         only to serve the copy left in db/, as it was at the migration.\n",
        imported.total()
    );
    mdm_core::fsutil::write_atomic(&marker, note.as_bytes(), false).map_err(|e| {
        MigrateError::Mark {
            target: target.clone(),
            path: marker.clone(),
            reason: e.to_string(),
        }
    })?;
    let report = MigrationReport {
        counts: imported,
        target,
        export,
        import,
        total: started.elapsed(),
    };
    tracing::info!(%report, "migration done");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line may run it on any runtime, spawned or not.
    #[test]
    fn a_migration_can_run_on_a_spawned_task() {
        fn spawnable<T: Send + 'static>(_: &T) {}
        let migration = migrate(Path::new("/nonexistent"), PgConfig::new("postgres://h/db"));
        spawnable(&migration);
    }

    #[test]
    fn the_report_is_one_line() {
        let report = MigrationReport {
            counts: SnapshotCounts {
                sites: 2,
                ..SnapshotCounts::default()
            },
            target: "db.example:5432".into(),
            export: Duration::from_millis(1200),
            import: Duration::from_millis(3400),
            total: Duration::from_millis(5000),
        };
        assert_eq!(
            report.to_string(),
            "copied 2 sites, 0 users, 0 company passcodes, 0 devices, 0 actions, \
             0 audit entries, 0 alerts, 0 notifications to db.example:5432 in 5.0 s \
             (read 1.2 s, write 3.4 s)"
        );
    }
}
