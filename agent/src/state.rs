//! The agent's state dir: its identity, private key (0600, never sent
//! anywhere), certificate chain and the server's CA.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// What the agent knows about itself after enrolling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub device_id: String,
    pub site_id: String,
    pub user_email: String,
    /// host:port as given to `enroll`.
    pub server: String,
    /// Unix milliseconds.
    pub renew_after: i64,
    /// Unix milliseconds.
    pub expires_at: i64,
    pub enrolled_at: i64,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The platform's usual place for the agent's state.
    pub fn default_path() -> PathBuf {
        if let Some(dir) = std::env::var_os("MDM_AGENT_STATE_DIR") {
            return PathBuf::from(dir);
        }
        #[cfg(target_os = "windows")]
        {
            let base = std::env::var_os("ProgramData").unwrap_or_else(|| "C:\\ProgramData".into());
            PathBuf::from(base).join("mdm-agent")
        }
        #[cfg(target_os = "macos")]
        {
            PathBuf::from("/Library/Application Support/mdm-agent")
        }
        #[cfg(not(any(target_os = "windows", target_os = "macos")))]
        {
            if is_root() {
                PathBuf::from("/var/lib/mdm-agent")
            } else if let Some(state) = std::env::var_os("XDG_STATE_HOME") {
                PathBuf::from(state).join("mdm-agent")
            } else if let Some(home) = std::env::var_os("HOME") {
                PathBuf::from(home).join(".local/state/mdm-agent")
            } else {
                PathBuf::from("mdm-agent-state")
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    fn identity_path(&self) -> PathBuf {
        self.root.join("identity.json")
    }
    pub fn key_path(&self) -> PathBuf {
        self.root.join("device.key")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.root.join("device.crt")
    }
    pub fn ca_path(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    pub fn load(&self) -> std::io::Result<Option<Identity>> {
        match fs::read(self.identity_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn key_pem(&self) -> std::io::Result<Zeroizing<String>> {
        fs::read_to_string(self.key_path()).map(Zeroizing::new)
    }
    pub fn cert_pem(&self) -> std::io::Result<String> {
        fs::read_to_string(self.cert_path())
    }
    pub fn ca_pem(&self) -> std::io::Result<String> {
        fs::read_to_string(self.ca_path())
    }

    /// Saves a new or renewed identity: key and certificate first, the
    /// identity file last, each replaced atomically.
    pub fn save(
        &self,
        identity: &Identity,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: &str,
    ) -> std::io::Result<()> {
        create_private_dir(&self.root)?;
        write_atomic(&self.key_path(), key_pem.as_bytes(), true)?;
        write_atomic(&self.cert_path(), cert_pem.as_bytes(), false)?;
        write_atomic(&self.ca_path(), ca_pem.as_bytes(), false)?;
        let mut json = serde_json::to_vec_pretty(identity)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        json.push(b'\n');
        write_atomic(&self.identity_path(), &json, false)
    }

    /// Removes the identity, key and certificates (after an unenroll).
    pub fn wipe(&self) -> std::io::Result<()> {
        for path in [
            self.identity_path(),
            self.key_path(),
            self.cert_path(),
            self.ca_path(),
        ] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(unix)]
pub(crate) fn is_root() -> bool {
    // The effective uid is not in std; /proc/self is owned by it on Linux.
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
pub(crate) fn is_root() -> bool {
    false
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

pub(crate) fn write_atomic(path: &Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(if private { 0o600 } else { 0o644 });
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(tmp, path)
}
