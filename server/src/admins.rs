//! The admin registry: who holds an admin certificate, with which role, and
//! which certificates are revoked.
//!
//! It lives in `admins.json` beside the sled database, not in it: sled lets
//! one process open a database, and `mdm-server admin ...` must work while a
//! server runs on the same data dir. Writers take an exclusive lock on
//! `admins.lock` and replace the file atomically; the server re-reads it when
//! its identity (inode, size, mtime) changes, which it checks on every admin
//! call, so a revocation applies to the very next call.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::fsutil;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Every site, and creating sites.
    Owner,
    /// Only the sites listed on the record.
    SiteAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::SiteAdmin => "site-admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "owner" => Ok(Role::Owner),
            "site-admin" => Ok(Role::SiteAdmin),
            other => Err(format!(
                "unknown role {other:?}: expected owner or site-admin"
            )),
        }
    }
}

/// One issued admin certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    pub email: String,
    pub role: Role,
    #[serde(default)]
    pub sites: Vec<String>,
    /// Hex of the certificate serial number.
    pub serial: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds; set once revoked.
    #[serde(default)]
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    admins: Vec<AdminRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot access the admin registry {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the admin registry {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            inode: meta.ino(),
        }
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    stamp: Option<FileStamp>,
    by_serial: HashMap<String, AdminRecord>,
}

/// Handle on `admins.json`, cheap to query on every call.
#[derive(Debug)]
pub struct AdminRegistry {
    path: PathBuf,
    lock_path: PathBuf,
    snapshot: Mutex<Snapshot>,
}

impl AdminRegistry {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join("admins.json"),
            lock_path: data_dir.join("admins.lock"),
            snapshot: Mutex::new(Snapshot::default()),
        }
    }

    /// The record of the certificate with this serial, re-reading the file
    /// first if it changed since the last call.
    pub fn find_by_serial(&self, serial_hex: &str) -> Result<Option<AdminRecord>, RegistryError> {
        let meta = fs::metadata(&self.path).map_err(|source| self.io(source))?;
        let stamp = FileStamp::of(&meta);
        let mut snapshot = self
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if snapshot.stamp != Some(stamp) {
            let file = self.read()?;
            snapshot.by_serial = file
                .admins
                .into_iter()
                .map(|record| (record.serial.clone(), record))
                .collect();
            snapshot.stamp = Some(stamp);
        }
        Ok(snapshot.by_serial.get(serial_hex).cloned())
    }

    pub fn list(&self) -> Result<Vec<AdminRecord>, RegistryError> {
        Ok(self.read()?.admins)
    }

    /// Admin records that hold a live (unrevoked, unexpired) certificate for `site_id`.
    pub fn admins_of_site(
        &self,
        site_id: &str,
        now: i64,
    ) -> Result<Vec<AdminRecord>, RegistryError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| r.revoked_at.is_none() && r.expires_at > now)
            .filter(|r| r.role == Role::Owner || r.sites.iter().any(|s| s == site_id))
            .collect())
    }

    pub fn add(&self, record: AdminRecord) -> Result<(), RegistryError> {
        self.update(|file| {
            file.admins.push(record);
        })
    }

    /// Revokes every live certificate of `email`; returns how many.
    pub fn revoke(&self, email: &str, now: i64) -> Result<usize, RegistryError> {
        let email = email.to_ascii_lowercase();
        self.update(|file| {
            let mut count = 0;
            for record in file
                .admins
                .iter_mut()
                .filter(|r| r.email == email && r.revoked_at.is_none())
            {
                record.revoked_at = Some(now);
                count += 1;
            }
            count
        })
    }

    /// Creates an empty registry; used when a data dir is initialised.
    pub fn create_empty(&self) -> Result<(), RegistryError> {
        self.write(&RegistryFile::default())
    }

    fn update<T>(&self, change: impl FnOnce(&mut RegistryFile) -> T) -> Result<T, RegistryError> {
        let mut options = OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let lock = options
            .open(&self.lock_path)
            .map_err(|source| self.io(source))?;
        lock.lock().map_err(|source| self.io(source))?;
        let mut file = self.read()?;
        let result = change(&mut file);
        self.write(&file)?;
        // Dropping `lock` closes the file, which releases the lock.
        drop(lock);
        Ok(result)
    }

    fn read(&self) -> Result<RegistryFile, RegistryError> {
        let bytes = fs::read(&self.path).map_err(|source| self.io(source))?;
        serde_json::from_slice(&bytes).map_err(|source| RegistryError::Corrupt {
            path: self.path.clone(),
            source,
        })
    }

    fn write(&self, file: &RegistryFile) -> Result<(), RegistryError> {
        let mut json =
            serde_json::to_vec_pretty(file).map_err(|source| RegistryError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        json.push(b'\n');
        fsutil::write_atomic(&self.path, &json, true).map_err(|source| self.io(source))
    }

    fn io(&self, source: std::io::Error) -> RegistryError {
        RegistryError::Io {
            path: self.path.clone(),
            source,
        }
    }
}
