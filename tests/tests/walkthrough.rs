//! The README walk-through (`scripts/walkthrough.sh`, also what `cargo
//! xtask demo` runs) against the real binaries and grpcurl, so the
//! documented commands keep working.
#![allow(clippy::unwrap_used)]

use mdm_tests::{agent_bin, grpcurl_path, server_bin, workspace_root};

#[test]
fn the_readme_story_runs_end_to_end() {
    let work = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new("bash");
    // The script's server runs on the data dir `mdm-data` in its work dir.
    let database = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(mdm_tests::store_database_for(&work.path().join("mdm-data")));
    if let Some(url) = database {
        command.env("MDM_DATABASE_URL", url);
    }
    let output = command
        .arg(workspace_root().join("scripts/walkthrough.sh"))
        .env("MDM_SERVER_BIN", server_bin())
        .env("MDM_AGENT_BIN", agent_bin())
        .env("GRPCURL", grpcurl_path())
        .env("WORK", work.path())
        .env("AGENTS", "3")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "walkthrough failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "mdm.v1.SiteService",
        "COMPANY_PASSCODE_STATE_ENABLED",
        "Enrolled as device",
        "device locked",
        "latestResetPasscode",
        "To: alice@example.com",
        "COMPANY_PASSCODE_STATE_DISABLED",
        "enrollment refused",
        "identity removed",
        "walkthrough: all steps passed",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}
