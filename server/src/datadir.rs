//! The data dir: what lives where, first-start creation, and the checks that
//! refuse a foreign or damaged directory instead of silently re-creating it.
//!
//! ```text
//! <data-dir>/
//!   db/                       sled database (schema version in the `meta` tree)
//!   pki/ca.crt, pki/ca.key    the CA (key 0600)
//!   pki/server.crt, .key      the server's TLS certificate
//!   secret.key                32 random bytes: root of keyed hashes and encryption (0600)
//!   admins.json, admins.lock  the admin registry (see `admins`)
//!   credentials/owner/        ca.crt, admin.crt, admin.key of the first owner
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::admins::{AdminRecord, AdminRegistry, Role};
use crate::fsutil::{create_private_dir, write_atomic};
use crate::pki::CertificateAuthority;
use mdm_store_sled::Storage;

/// Lifetime of admin certificates issued without an explicit one.
pub const DEFAULT_ADMIN_CERT_LIFETIME: Duration = Duration::days(365);

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "{path} exists but is not an mdm-server data dir ({missing} is missing); refusing to touch it: point --data-dir at an empty or new directory, or restore the missing file"
    )]
    Foreign {
        path: PathBuf,
        missing: &'static str,
    },
    #[error("cannot use data dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data dir {path}: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error(transparent)]
    Storage(#[from] mdm_store_sled::StorageError),
    #[error(transparent)]
    Registry(#[from] crate::admins::RegistryError),
}

/// The files of one data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// Files that must exist in an initialised data dir.
const REQUIRED: [&str; 5] = [
    "db",
    "pki/ca.crt",
    "pki/ca.key",
    "secret.key",
    "admins.json",
];

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("db")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("pki/ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("pki/ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("pki/server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("pki/server.key")
    }
    pub fn secret(&self) -> PathBuf {
        self.root.join("secret.key")
    }
    pub fn owner_credential(&self) -> PathBuf {
        self.root.join("credentials/owner")
    }
    pub fn registry(&self) -> AdminRegistry {
        AdminRegistry::new(&self.root)
    }

    /// Whether the directory is absent or empty, i.e. a first start.
    /// Written by `mdm-server migrate` once the database is copied: a
    /// server started on this data dir without a database URL would serve
    /// the copy left behind, and the two deployments would drift apart.
    pub fn migrated_marker(&self) -> PathBuf {
        self.root.join("MIGRATED-TO-POSTGRESQL")
    }

    pub fn is_fresh(&self) -> Result<bool, DataDirError> {
        match fs::read_dir(&self.root) {
            Ok(mut entries) => Ok(entries.next().is_none()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(source) => Err(self.io(source)),
        }
    }

    /// Refuses a directory that has content but not our layout.
    pub fn check_layout(&self) -> Result<(), DataDirError> {
        for file in REQUIRED {
            if !self.root.join(file).exists() {
                return Err(DataDirError::Foreign {
                    path: self.root.clone(),
                    missing: file,
                });
            }
        }
        Ok(())
    }

    pub fn load_ca(&self) -> Result<CertificateAuthority, DataDirError> {
        let cert = self.read_string(&self.ca_cert())?;
        let key = Zeroizing::new(self.read_string(&self.ca_key())?);
        CertificateAuthority::load(&cert, &key).map_err(|e| DataDirError::Damaged {
            path: self.root.clone(),
            message: format!("cannot load the CA: {e}"),
        })
    }

    pub fn load_secret(&self) -> Result<Zeroizing<[u8; 32]>, DataDirError> {
        let bytes = Zeroizing::new(fs::read(self.secret()).map_err(|e| self.io(e))?);
        let secret: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| DataDirError::Damaged {
                path: self.root.clone(),
                message: "secret.key must hold exactly 32 bytes".into(),
            })?;
        Ok(Zeroizing::new(secret))
    }

    /// Issues an admin credential, records it in the registry, and writes
    /// `ca.crt`, `admin.crt` and `admin.key` into `out`.
    pub fn issue_admin_credential(
        &self,
        ca: &CertificateAuthority,
        email: &str,
        role: Role,
        sites: Vec<String>,
        lifetime: Duration,
        out: &Path,
    ) -> Result<AdminRecord, DataDirError> {
        let issued = ca
            .issue_admin_cert(email, role.as_str(), lifetime)
            .map_err(|e| DataDirError::Damaged {
                path: self.root.clone(),
                message: format!("cannot issue an admin certificate: {e}"),
            })?;
        let out_io = |source| DataDirError::Io {
            path: out.to_path_buf(),
            source,
        };
        create_private_dir(out).map_err(out_io)?;
        write_atomic(&out.join("ca.crt"), ca.cert_pem().as_bytes(), true).map_err(out_io)?;
        write_atomic(&out.join("admin.crt"), issued.cert_pem.as_bytes(), true).map_err(out_io)?;
        write_atomic(&out.join("admin.key"), issued.key_pem.as_bytes(), true).map_err(out_io)?;
        let record = AdminRecord {
            email: email.to_owned(),
            role,
            sites,
            serial: issued.serial_hex.clone(),
            issued_at: OffsetDateTime::now_utc().unix_timestamp(),
            expires_at: issued.not_after.unix_timestamp(),
            revoked_at: None,
        };
        self.registry().add(record.clone())?;
        Ok(record)
    }

    /// The server's certificate chain and key for `names`: the stored pair
    /// when it covers exactly those names and has 30 days left, else a new one.
    pub fn server_identity(
        &self,
        ca: &CertificateAuthority,
        names: &[String],
    ) -> Result<(String, Zeroizing<String>), DataDirError> {
        if let (Ok(chain), Ok(key)) = (
            fs::read_to_string(self.server_cert()),
            fs::read_to_string(self.server_key()),
        ) && crate::pki::covers_exactly(&chain, names, Duration::days(30))
        {
            return Ok((chain, Zeroizing::new(key)));
        }
        let issued = ca
            .issue_server_cert(names)
            .map_err(|e| DataDirError::Damaged {
                path: self.root.clone(),
                message: format!("cannot issue the server certificate: {e}"),
            })?;
        let chain = format!("{}{}", issued.cert_pem, ca.cert_pem());
        write_atomic(&self.server_cert(), chain.as_bytes(), true).map_err(|e| self.io(e))?;
        write_atomic(&self.server_key(), issued.key_pem.as_bytes(), true)
            .map_err(|e| self.io(e))?;
        tracing::info!(?names, "issued a new server certificate");
        Ok((chain, issued.key_pem))
    }

    fn read_string(&self, path: &Path) -> Result<String, DataDirError> {
        fs::read_to_string(path).map_err(|source| DataDirError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn io(&self, source: std::io::Error) -> DataDirError {
        DataDirError::Io {
            path: self.root.clone(),
            source,
        }
    }
}

/// What a first start created.
#[derive(Debug)]
pub struct FirstStart {
    pub owner_email: String,
    pub owner_credential: PathBuf,
}

/// Creates a complete data dir at `root`, or nothing at all: everything is
/// built in a sibling temporary directory and renamed into place at the end.
pub fn initialize(root: &Path, owner_email: &str) -> Result<FirstStart, DataDirError> {
    let parent = match root.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |source| DataDirError::Io {
        path: root.to_path_buf(),
        source,
    };
    fs::create_dir_all(&parent).map_err(io)?;
    let staging = tempfile_dir(&parent, root).map_err(io)?;
    let result = populate(&DataDir::new(&staging), owner_email);
    let outcome = result.and_then(|()| {
        // rename(2) replaces an empty directory, so an empty --data-dir made
        // by the admin beforehand is fine.
        fs::rename(&staging, root).map_err(io)
    });
    if let Err(e) = outcome {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    let data_dir = DataDir::new(root);
    Ok(FirstStart {
        owner_email: owner_email.to_owned(),
        owner_credential: data_dir.owner_credential(),
    })
}

fn tempfile_dir(parent: &Path, root: &Path) -> std::io::Result<PathBuf> {
    let base = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mdm-data".into());
    let suffix = u64::from_le_bytes(crate::crypto::os_random());
    let staging = parent.join(format!(".{base}.init-{suffix:016x}"));
    create_private_dir(&staging)?;
    Ok(staging)
}

fn populate(dir: &DataDir, owner_email: &str) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io {
        path: dir.root().to_path_buf(),
        source,
    };
    create_private_dir(&dir.root().join("pki")).map_err(io)?;
    let (ca, ca_key) =
        CertificateAuthority::generate("mdm CA").map_err(|e| DataDirError::Damaged {
            path: dir.root().to_path_buf(),
            message: format!("cannot create the CA: {e}"),
        })?;
    write_atomic(&dir.ca_cert(), ca.cert_pem().as_bytes(), true).map_err(io)?;
    write_atomic(&dir.ca_key(), ca_key.as_bytes(), true).map_err(io)?;
    let secret: Zeroizing<[u8; 32]> = Zeroizing::new(crate::crypto::os_random());
    write_atomic(&dir.secret(), secret.as_slice(), true).map_err(io)?;
    dir.registry().create_empty()?;
    dir.issue_admin_credential(
        &ca,
        owner_email,
        Role::Owner,
        Vec::new(),
        DEFAULT_ADMIN_CERT_LIFETIME,
        &dir.owner_credential(),
    )?;
    let storage = Storage::create(&dir.db())?;
    storage.flush()?;
    Ok(())
}
