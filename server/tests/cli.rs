//! The `mdm-server` binary as an admin runs it: zero-config first start,
//! one-line errors with exit code 64, graceful SIGTERM, admin subcommands.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mdm-server");

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn missing_or_malformed_config_exits_64_with_one_line_and_creates_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["serve", "--config", "nope.toml"],
            "cannot read config file",
        ),
        (
            vec!["serve", "--listen", "not-an-address"],
            "not-an-address",
        ),
        (vec!["serve", "--san", "bad name!"], "--san"),
        (vec!["serve", "--owner-email", "nobody"], "owner email"),
        (vec!["serve", "--bogus"], "--bogus"),
        (vec!["frobnicate"], "frobnicate"),
        (
            vec![
                "serve",
                "--smtp-host",
                "mail.example.com",
                "--smtp-tls",
                "none",
                "--smtp-from",
                "a@example.com",
            ],
            "smtp",
        ),
        (
            vec!["serve", "--smtp-host", "mail.example.com"],
            "from address",
        ),
        (
            vec![
                "serve",
                "--smtp-host",
                "mail.example.com",
                "--smtp-from",
                "not an address",
            ],
            "from address",
        ),
        (
            vec![
                "serve",
                "--smtp-host",
                "mail.example.com",
                "--smtp-from",
                "a@example.com",
                "--smtp-username",
                "u",
            ],
            "MDM_SMTP_PASSWORD",
        ),
    ];
    std::fs::write(
        temp.path().join("bad.toml"),
        "listen = 7443\nunknown_key = true\n",
    )
    .unwrap();
    let mut all = cases;
    all.push((vec!["serve", "--config", "bad.toml"], "bad.toml"));
    for (args, needle) in all {
        let out = run(temp.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one line, got {stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(
        !temp.path().join("mdm-data").exists(),
        "no data dir after a config error"
    );
}

#[test]
fn config_file_values_are_used_and_flags_win() {
    let temp = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        temp.path().join("mdm.toml"),
        format!("data_dir = \"from-file\"\nlisten = \"127.0.0.1:{port}\"\nowner_email = \"boss@example.com\"\n"),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .current_dir(temp.path())
        .args(["serve", "--config", "mdm.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    while !text.contains(" list\n") {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "server exited early: {text}"
        );
        text.push_str(&line);
    }
    assert!(text.contains("boss@example.com"), "{text}");
    assert!(text.contains(&format!("localhost:{port} list")), "{text}");
    assert!(
        temp.path()
            .join("from-file/credentials/owner/admin.key")
            .exists()
    );
    terminate(&mut child);

    // A flag beats the file.
    let out = run(
        temp.path(),
        &[
            "serve",
            "--config",
            "mdm.toml",
            "--owner-email",
            "flag-wins",
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("flag-wins"));
}

fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn zero_config_first_start_prints_the_next_step_and_stops_cleanly_on_sigterm() {
    let temp = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BIN)
        .current_dir(temp.path())
        .args(["serve", "--listen", &listen])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    while !text.contains(" list\n") {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "server exited early: {text}"
        );
        text.push_str(&line);
    }
    assert!(
        text.contains(&format!(
            "grpcurl -cacert ./mdm-data/credentials/owner/ca.crt -cert ./mdm-data/credentials/owner/admin.crt -key ./mdm-data/credentials/owner/admin.key localhost:{port} list"
        )),
        "{text}"
    );
    let data = temp.path().join("mdm-data");
    for file in [
        "db",
        "pki/ca.crt",
        "pki/ca.key",
        "secret.key",
        "admins.json",
        "credentials/owner/admin.key",
    ] {
        assert!(data.join(file).exists(), "{file} missing");
    }
    let status = terminate(&mut child);
    assert!(status.success(), "graceful stop exits 0, got {status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("storage flushed"), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [
            "pki/ca.key",
            "pki/server.key",
            "secret.key",
            "credentials/owner/admin.key",
        ] {
            let mode = std::fs::metadata(data.join(key))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{key} has mode {mode:o}");
        }
    }

    // A second start reuses everything and prints no first-start banner.
    let mut child = Command::new(BIN)
        .current_dir(temp.path())
        .args(["serve", "--listen", &listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("serving") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "second start failed"
        );
    }
    terminate(&mut child);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(!out.contains("First start"), "{out}");
}

#[test]
fn admin_subcommands_manage_credentials_without_a_server() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let out = run(dir, &["admin", "list"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("start the server once"));

    // Initialise through a short serve.
    let port = free_port();
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains(" list\n") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0);
    }
    terminate(&mut child);

    let out = run(
        dir,
        &[
            "admin",
            "add",
            "--email",
            "Site.Admin@Example.com",
            "--role",
            "site-admin",
            "--site",
            "s1",
            "--out",
            "cred",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("grpcurl -cacert cred/ca.crt -cert cred/admin.crt -key cred/admin.key"),
        "{text}"
    );
    for file in ["ca.crt", "admin.crt", "admin.key"] {
        assert!(dir.join("cred").join(file).exists());
    }

    let out = run(
        dir,
        &[
            "admin",
            "add",
            "--email",
            "x@example.com",
            "--role",
            "site-admin",
            "--out",
            "c2",
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--site"));
    let out = run(
        dir,
        &[
            "admin",
            "add",
            "--email",
            "not-an-email",
            "--role",
            "owner",
            "--out",
            "c3",
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    let out = run(
        dir,
        &[
            "admin",
            "add",
            "--email",
            "x@example.com",
            "--role",
            "king",
            "--out",
            "c4",
        ],
    );
    assert_eq!(out.status.code(), Some(64));

    let out = run(
        dir,
        &["admin", "revoke", "--email", "site.admin@example.com"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        dir,
        &["admin", "revoke", "--email", "site.admin@example.com"],
    );
    assert_eq!(out.status.code(), Some(64), "nothing left to revoke");

    let out = run(dir, &["admin", "list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("site.admin@example.com")
                && l.contains("revoked")
                && l.contains("s1")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("owner@localhost") && l.contains("active")),
        "{listing}"
    );
}
