//! Everything the server keeps in sled: keys, encoding and the schema
//! version. The rest of the server sees operations on domain values only, so
//! another backend can take sled's place.

use std::path::Path;

/// Bumped whenever the layout of keys or values changes incompatibly.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "the database at {path} has schema version {found}, this server needs {expected}; refusing to start"
    )]
    SchemaMismatch {
        path: String,
        found: String,
        expected: u32,
    },
    #[error("no database at {0}")]
    Missing(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// The sled database and its trees.
#[derive(Debug, Clone)]
pub struct Storage {
    db: sled::Db,
    meta: sled::Tree,
}

impl Storage {
    /// Creates a new database and records the schema version.
    pub fn create(path: &Path) -> Result<Self, StorageError> {
        let storage = Self::open_unchecked(path)?;
        storage
            .meta
            .insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes().as_slice())?;
        Ok(storage)
    }

    /// Opens an existing database, refusing one of another schema version.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        if !path.is_dir() {
            return Err(StorageError::Missing(path.display().to_string()));
        }
        let storage = Self::open_unchecked(path)?;
        let found = storage.meta.get(SCHEMA_KEY)?;
        let version = found
            .as_deref()
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes);
        if version != Some(SCHEMA_VERSION) {
            return Err(StorageError::SchemaMismatch {
                path: path.display().to_string(),
                found: version.map_or_else(|| "none".to_owned(), |v| v.to_string()),
                expected: SCHEMA_VERSION,
            });
        }
        Ok(storage)
    }

    fn open_unchecked(path: &Path) -> Result<Self, StorageError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(500))
            .open()?;
        let meta = db.open_tree("meta")?;
        Ok(Self { db, meta })
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }

    #[cfg(test)]
    fn set_schema_version_for_test(&self, version: u32) -> Result<(), StorageError> {
        self.meta
            .insert(SCHEMA_KEY, version.to_be_bytes().as_slice())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_of_another_schema_version_is_refused() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        let storage = Storage::create(&path).expect("create");
        storage
            .set_schema_version_for_test(SCHEMA_VERSION + 1)
            .expect("write");
        storage.flush().expect("flush");
        drop(storage);
        let error = Storage::open(&path).expect_err("refused");
        let message = error.to_string();
        assert!(message.contains("schema version 2"), "{message}");
        assert!(message.contains("refusing to start"), "{message}");
    }

    #[test]
    fn a_missing_database_is_not_created_by_open() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("db");
        assert!(matches!(
            Storage::open(&path),
            Err(StorageError::Missing(_))
        ));
        assert!(!path.exists());
    }
}
