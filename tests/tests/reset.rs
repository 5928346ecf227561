//! Remote passcode reset and lock, end to end: server, real agent with the
//! simulated backend, policy and compliance, and the real Linux backend
//! (when the suite runs as root, as CI does).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mdm_tests::{
    TestAgent, TestServer, code, eventually, eventually_within, files_under, pb, site_with_passcode,
};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::site_service_client::SiteServiceClient;
use tonic::Code;

async fn wait_done(server: &TestServer, action_id: &str) -> pb::Action {
    let log = ActionLogServiceClient::new(server.admin_channel(&server.owner()).await);
    eventually_within(Duration::from_secs(30), "the action finishes", &mut || {
        let mut log = log.clone();
        let id = action_id.to_owned();
        async move {
            let action = log
                .get_action(pb::GetActionRequest { action_id: id })
                .await
                .unwrap()
                .into_inner()
                .action
                .unwrap();
            matches!(
                action.status(),
                pb::ActionStatus::Succeeded | pb::ActionStatus::Failed
            )
            .then_some(action)
        }
    })
    .await
}

async fn online_agent(
    server: &TestServer,
    email: &str,
    env: &[(&str, &str)],
) -> (String, TestAgent, tokio::process::Child) {
    let (site_id, passcode) = site_with_passcode(server, email, 0).await;
    let agent = TestAgent::new();
    let mut enroll = agent.command();
    enroll
        .args([
            "enroll",
            "--server",
            &format!("localhost:{}", server.addr.port()),
            "--email",
            email,
            "--backend",
            "simulated",
            "--ca",
        ])
        .arg(server.data_dir.join("pki/ca.crt"))
        .env("MDM_COMPANY_PASSCODE", &passcode);
    for (k, v) in env {
        enroll.env(k, v);
    }
    let out = enroll.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = agent.command();
    run.args(["run", "--backend", "simulated"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        run.env(k, v);
    }
    let child = run.spawn().unwrap();
    let device_id = agent.device_id();
    eventually("the agent is online", || {
        let device_id = device_id.clone();
        async move {
            server
                .get_device(&device_id)
                .await
                .device
                .unwrap()
                .online
                .then_some(())
        }
    })
    .await;
    (site_id, agent, child)
}

fn reset(device_id: &str, confirm: &str, notify_user: bool) -> pb::ResetPasscodeRequest {
    pb::ResetPasscodeRequest {
        device_id: device_id.into(),
        confirm_user_email: confirm.into(),
        notify_user,
        message: "Lost? Call 555-0100".into(),
        ttl: None,
    }
}

#[tokio::test]
async fn a_reset_sets_the_new_passcode_on_the_device_and_the_admin_sees_it_audited() {
    let server = TestServer::start().await;
    let (site_id, agent, _child) = online_agent(&server, "hal@example.com", &[]).await;
    let device_id = agent.device_id();

    let response = server
        .devices()
        .await
        .reset_passcode(reset(&device_id, "HAL@example.com", true))
        .await
        .unwrap()
        .into_inner();
    let passcode = response.passcode.clone();
    assert_eq!(passcode.len(), 8, "default policy: 8 digits");
    assert!(passcode.bytes().all(|b| b.is_ascii_digit()));
    let action = response.action.unwrap();
    assert_eq!(action.r#type(), pb::ActionType::ResetPasscode);

    let done = wait_done(&server, &action.action_id).await;
    assert_eq!(done.status(), pb::ActionStatus::Succeeded, "{done:?}");
    let details: Vec<&str> = done.timeline.iter().map(|e| e.detail.as_str()).collect();
    assert!(
        details.contains(&"passcode set") && details.contains(&"device locked"),
        "{details:?}"
    );
    let simulated = agent.simulated();
    assert_eq!(
        simulated["passcode"],
        passcode.as_str(),
        "the device got exactly the passcode the admin got"
    );
    assert_eq!(simulated["locked"], true);
    assert_eq!(simulated["lock_message"], "Lost? Call 555-0100");

    let seen = eventually("the agent reports the new passcode compliant", || {
        let device_id = device_id.clone();
        let server = &server;
        async move {
            let response = server.get_device(&device_id).await;
            let security = response.device.clone().unwrap().security.unwrap();
            security.compliant.then_some(response)
        }
    })
    .await;
    let security = seen.device.unwrap().security.unwrap();
    assert_eq!(security.latest_reset_passcode, passcode);
    assert!(security.locked);
    assert!(security.compliant, "{security:?}");
    assert_eq!(security.reset_by, "owner@localhost");
    assert!(security.reset_at.is_some());
    assert!(
        seen.audit_trail
            .iter()
            .any(|e| e.who == "owner@localhost" && e.what.contains("viewed"))
    );

    // Emails to the admin and (notify_user) the user; no secret in any subject or in the outbox.
    let outbox = ActionLogServiceClient::new(server.admin_channel(&server.owner()).await)
        .list_notifications(pb::ListNotificationsRequest {
            site_id: site_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .notifications;
    let mut recipients: Vec<&str> = outbox.iter().map(|n| n.recipient.as_str()).collect();
    recipients.sort();
    assert_eq!(recipients, vec!["hal@example.com", "owner@localhost"]);
    assert!(outbox.iter().all(|n| !n.subject.contains(&passcode)));

    // Nowhere in the database or any other file in plaintext; only the
    // delivered emails themselves (.eml, 0600, the fallback sink) carry it.
    let (dir, _temp) = server.stop().await;
    for file in files_under(&dir)
        .into_iter()
        .filter(|f| !f.starts_with(dir.join("outbox/mail")))
    {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes
                .windows(passcode.len())
                .any(|w| w == passcode.as_bytes()),
            "plaintext passcode in {}",
            file.display()
        );
    }
}

#[tokio::test]
async fn the_policy_shapes_generated_passcodes_and_agents_report_compliance_when_it_changes() {
    let server = TestServer::start().await;
    let (site_id, agent, _child) = online_agent(&server, "ida@example.com", &[]).await;
    let device_id = agent.device_id();
    let mut sites = SiteServiceClient::new(server.admin_channel(&server.owner()).await);

    let default = sites
        .get_passcode_policy(pb::GetPasscodePolicyRequest {
            site_id: site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(
        (default.required, default.min_length, default.complexity()),
        (true, 8, pb::PasscodeComplexity::Numeric)
    );

    // A fresh simulated device has no passcode: not compliant.
    eventually("initial compliance", || {
        let device_id = device_id.clone();
        let server = &server;
        async move {
            server
                .get_device(&device_id)
                .await
                .device
                .unwrap()
                .security
                .unwrap()
                .compliance
                .map(|_| ())
        }
    })
    .await;
    let security = server
        .get_device(&device_id)
        .await
        .device
        .unwrap()
        .security
        .unwrap();
    assert!(!security.compliant);
    assert_eq!(security.compliance.unwrap().reason, "no passcode is set");

    let response = server
        .devices()
        .await
        .reset_passcode(reset(&device_id, "ida@example.com", false))
        .await
        .unwrap()
        .into_inner();
    wait_done(&server, &response.action.unwrap().action_id).await;
    eventually("compliant after the reset", || {
        let device_id = device_id.clone();
        let server = &server;
        async move {
            server
                .get_device(&device_id)
                .await
                .device
                .unwrap()
                .security
                .unwrap()
                .compliant
                .then_some(())
        }
    })
    .await;

    // A stricter policy reaches the online agent, which reports it no longer complies.
    let strict = pb::PasscodePolicy {
        required: true,
        min_length: 12,
        complexity: pb::PasscodeComplexity::Complex.into(),
        max_age_days: 90,
    };
    sites
        .set_passcode_policy(pb::SetPasscodePolicyRequest {
            site_id: site_id.clone(),
            policy: Some(strict),
        })
        .await
        .unwrap();
    let reason = eventually("non-compliant under the new policy", || {
        let device_id = device_id.clone();
        let server = &server;
        async move {
            let security = server
                .get_device(&device_id)
                .await
                .device
                .unwrap()
                .security
                .unwrap();
            (!security.compliant).then(|| security.compliance.unwrap().reason)
        }
    })
    .await;
    assert!(reason.contains("12"), "{reason}");

    // The next reset follows the policy.
    let response = server
        .devices()
        .await
        .reset_passcode(reset(&device_id, "ida@example.com", false))
        .await
        .unwrap()
        .into_inner();
    let passcode = response.passcode;
    assert_eq!(passcode.len(), 12);
    assert!(
        passcode.bytes().any(|b| b.is_ascii_lowercase())
            && passcode.bytes().any(|b| b.is_ascii_uppercase())
    );
    assert!(
        passcode.bytes().any(|b| b.is_ascii_digit())
            && passcode.bytes().any(|b| !b.is_ascii_alphanumeric())
    );
    wait_done(&server, &response.action.unwrap().action_id).await;
    assert_eq!(agent.simulated()["passcode"], passcode.as_str());

    for bad in [
        pb::PasscodePolicy {
            min_length: 3,
            complexity: pb::PasscodeComplexity::Numeric.into(),
            ..Default::default()
        },
        pb::PasscodePolicy {
            min_length: 65,
            complexity: pb::PasscodeComplexity::Numeric.into(),
            ..Default::default()
        },
        pb::PasscodePolicy {
            min_length: 8,
            complexity: pb::PasscodeComplexity::Unspecified.into(),
            ..Default::default()
        },
    ] {
        let status = sites
            .set_passcode_policy(pb::SetPasscodePolicyRequest {
                site_id: site_id.clone(),
                policy: Some(bad),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("policy."), "{}", status.message());
    }
}

#[tokio::test]
async fn a_reset_is_refused_for_the_wrong_user_or_an_incapable_device_and_waits_for_an_offline_one()
{
    let server = TestServer::start().await;
    let (_, agent, mut child) = online_agent(&server, "jo@example.com", &[]).await;
    let device_id = agent.device_id();
    let mut devices = server.devices().await;

    let status = devices
        .reset_passcode(reset(&device_id, "someone@example.com", false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("confirm_user_email"),
        "{}",
        status.message()
    );
    assert_eq!(
        code(devices.reset_passcode(reset(&device_id, "", false)).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            devices
                .reset_passcode(reset("dv_nothere", "jo@example.com", false))
                .await
        ),
        Code::NotFound
    );

    // Offline: queued, applied on reconnect.
    child.kill().await.unwrap();
    let response = devices
        .reset_passcode(reset(&device_id, "jo@example.com", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.action.as_ref().unwrap().status(),
        pb::ActionStatus::Pending
    );
    let _child = agent.run();
    let done = wait_done(&server, &response.action.unwrap().action_id).await;
    assert_eq!(done.status(), pb::ActionStatus::Succeeded);
    assert_eq!(agent.simulated()["passcode"], response.passcode.as_str());

    // A device whose agent says it cannot reset: refused up front with its reason.
    let (_, limited, _limited_child) = online_agent(
        &server,
        "kim@example.com",
        &[("MDM_SIMULATED_UNSUPPORTED", "reset_passcode")],
    )
    .await;
    let status = devices
        .reset_passcode(reset(&limited.device_id(), "kim@example.com", false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("MDM_SIMULATED_UNSUPPORTED"),
        "{}",
        status.message()
    );

    // A device that fails: FAILED with the reason code.
    let (_, failing, _failing_child) = online_agent(
        &server,
        "lee@example.com",
        &[("MDM_SIMULATED_FAIL", "permission")],
    )
    .await;
    let response = devices
        .reset_passcode(reset(&failing.device_id(), "lee@example.com", false))
        .await
        .unwrap()
        .into_inner();
    let done = wait_done(&server, &response.action.unwrap().action_id).await;
    assert_eq!(done.status(), pb::ActionStatus::Failed);
    assert_eq!(done.failure_code(), pb::FailureCode::Permission);
    assert!(done.failure_reason.contains("MDM_SIMULATED_FAIL"));
}

/// The real Linux backend, for real: a throwaway local account gets the
/// new password through chpasswd, checked against /etc/shadow.
#[tokio::test]
async fn the_linux_backend_really_sets_the_local_password() {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let tools = ["useradd", "userdel", "chpasswd"].iter().all(|t| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !root || !tools {
        eprintln!(
            "SKIPPED the_linux_backend_really_sets_the_local_password: needs root and useradd/chpasswd (root: {root}, tools: {tools})"
        );
        return;
    }
    let account = format!("mdmt{}", std::process::id() % 100_000);
    let _ = std::process::Command::new("userdel").arg(&account).status();
    assert!(
        std::process::Command::new("useradd")
            .args(["--no-create-home", &account])
            .status()
            .unwrap()
            .success()
    );
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("userdel").arg(&self.0).status();
        }
    }
    let _cleanup = Cleanup(account.clone());
    let mut set_old = std::process::Command::new("chpasswd")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut set_old.stdin.take().unwrap(),
        format!("{account}:OldPassword1\n").as_bytes(),
    )
    .unwrap();
    assert!(set_old.wait().unwrap().success());

    let server = TestServer::start().await;
    let (_, passcode) = site_with_passcode(&server, "ops@example.com", 0).await;
    let agent = TestAgent::new();
    let out = agent
        .enroll_with(
            &server,
            "ops@example.com",
            &passcode,
            &["--backend", "system", "--managed-user", &account],
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = agent.command();
    run.args(["run", "--backend", "system", "--managed-user", &account])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _child = run.spawn().unwrap();
    let device_id = agent.device_id();
    eventually("the agent is online", || {
        let device_id = device_id.clone();
        let server = &server;
        async move {
            server
                .get_device(&device_id)
                .await
                .device
                .unwrap()
                .online
                .then_some(())
        }
    })
    .await;

    let response = server
        .devices()
        .await
        .reset_passcode(reset(&device_id, "ops@example.com", false))
        .await
        .unwrap()
        .into_inner();
    let done = wait_done(&server, &response.action.unwrap().action_id).await;
    assert_eq!(done.status(), pb::ActionStatus::Succeeded, "{done:?}");
    assert!(done.timeline.iter().any(|e| e.detail == "passcode set"));

    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let hash = shadow
        .lines()
        .find(|l| l.starts_with(&format!("{account}:")))
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .to_owned();
    let check = |password: &str| {
        let out = std::process::Command::new("python3")
            .args(["-W", "ignore", "-c", "import crypt,sys; p=sys.stdin.readline().rstrip('\\n'); h=sys.argv[1]; print(crypt.crypt(p, h) == h)"])
            .arg(&hash)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                std::io::Write::write_all(&mut child.stdin.take().unwrap(), format!("{password}\n").as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "True"
    };
    assert!(
        check(&response.passcode),
        "the new passcode opens the account"
    );
    assert!(!check("OldPassword1"), "the old password no longer does");
}
