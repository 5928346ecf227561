//! The `mdm-agent` binary's own command line: errors are one line with a
//! non-zero exit, and the passcode is never taken from argv.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mdm-agent");

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("MDM_COMPANY_PASSCODE")
        .env_remove("MDM_AGENT_STATE_DIR")
        .output()
        .unwrap()
}

#[test]
fn status_of_a_fresh_state_dir_says_not_enrolled() {
    let temp = tempfile::tempdir().unwrap();
    let state = temp.path().join("state");
    let out = agent(&["--state-dir", state.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not enrolled"));
}

#[test]
fn run_without_an_identity_explains_what_to_do() {
    let temp = tempfile::tempdir().unwrap();
    let out = agent(&["--state-dir", temp.path().to_str().unwrap(), "run"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mdm-agent enroll"), "{stderr}");
}

#[test]
fn usage_errors_are_one_line_with_exit_64() {
    for args in [
        vec![
            "enroll",
            "--server",
            "localhost:7443",
            "--email",
            "a@example.com",
        ],
        vec![
            "enroll",
            "--server",
            "x:1",
            "--ca",
            "c",
            "--email",
            "a@example.com",
            "--passcode",
            "Abc123Abc123",
        ],
        vec!["frobnicate"],
    ] {
        let out = agent(&args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[test]
fn enroll_without_a_passcode_source_refuses_before_connecting() {
    let temp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "--state-dir",
            temp.path().to_str().unwrap(),
            "enroll",
            "--server",
            "127.0.0.1:9",
            "--ca",
            "missing.crt",
            "--email",
            "a@example.com",
        ])
        .env_remove("MDM_COMPANY_PASSCODE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--passcode-stdin"), "{stderr}");
}
