//! Self-service enrollment and device identity, end to end with the real
//! `mdm-agent` binary against a real server.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mdm_tests::{
    TestAgent, TestServer, eventually, eventually_within, files_under, pb, site_with_passcode,
};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::agent_service_client::AgentServiceClient;
use pb::enrollment_service_client::EnrollmentServiceClient;
use pb::site_service_client::SiteServiceClient;
use tonic::Code;
use tonic::transport::Channel;

async fn get_device(server: &TestServer, device_id: &str) -> pb::Device {
    server.get_device(device_id).await.device.unwrap()
}

async fn passcode_info(server: &TestServer, site_id: &str) -> pb::CompanyPasscodeInfo {
    SiteServiceClient::new(server.admin_channel(&server.owner()).await)
        .get_company_passcode(pb::GetCompanyPasscodeRequest {
            site_id: site_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A channel that presents the agent's own device certificate.
async fn device_channel(server: &TestServer, agent: &TestAgent) -> Channel {
    let cert = std::fs::read_to_string(agent.state_dir.join("device.crt")).unwrap();
    let key = std::fs::read_to_string(agent.state_dir.join("device.key")).unwrap();
    server.channel(Some((&cert, &key))).await
}

#[tokio::test]
async fn an_agent_enrolls_with_email_and_passcode_and_its_key_never_leaves_it() {
    let server = TestServer::start().await;
    let (site_id, passcode) = site_with_passcode(&server, "alice@example.com", 0).await;
    let agent = TestAgent::new();

    let out = agent.enroll(&server, "Alice@Example.com", &passcode).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let device_id = agent.device_id();
    assert!(
        text(&out.stdout).contains(&format!("Enrolled as device {device_id} in site {site_id}"))
    );

    let status = agent.status().await;
    assert!(status.status.success());
    let status = text(&status.stdout);
    assert!(
        status.contains(&device_id) && status.contains("alice@example.com"),
        "{status}"
    );

    let device = get_device(&server, &device_id).await;
    assert_eq!(device.site_id, site_id);
    assert_eq!(device.user_email, "alice@example.com");
    assert_eq!(device.status(), pb::DeviceStatus::Active);
    assert_eq!(device.serial_number, agent.serial);
    assert_eq!(device.platform(), pb::Platform::Linux);
    assert!(device.enrolled_at.is_some());
    let expires = device.certificate_expires_at.unwrap().seconds;
    let week = 7 * 24 * 3600;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (expires - now - week).abs() < 120,
        "default lifetime is 7 days"
    );
    assert!(!device.online);

    let info = passcode_info(&server, &site_id).await;
    assert_eq!(info.enrollments, 1);
    assert!(info.last_used_at.is_some());
    assert_eq!(info.failed_attempts, 0);

    // The key is the agent's alone: 0600 on the device, nowhere on the server.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(agent.state_dir.join("device.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let key_pem = std::fs::read_to_string(agent.state_dir.join("device.key")).unwrap();
    let key_der = rustls::pki_types::pem::PemObject::from_pem_slice(key_pem.as_bytes())
        .map(|k: rustls::pki_types::PrivateKeyDer<'static>| k.secret_der().to_vec())
        .unwrap();
    for file in files_under(&server.data_dir) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes
                .windows(key_der.len())
                .any(|w| w == key_der.as_slice()),
            "key in {}",
            file.display()
        );
        assert!(
            !text(&bytes).contains(key_pem.lines().nth(1).unwrap()),
            "key in {}",
            file.display()
        );
    }

    // Enrolling again needs --force.
    let again = agent.enroll(&server, "alice@example.com", &passcode).await;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );

    // A renewal CSR naming another device is refused.
    let (_, csr) = mdm_agent::enroll::key_and_csr("dv_someoneelse").unwrap();
    let status = AgentServiceClient::new(device_channel(&server, &agent).await)
        .renew_certificate(pb::RenewCertificateRequest { csr_pem: csr })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("another device"),
        "{}",
        status.message()
    );

    // The device shows up for grpcurl users too.
    let out = server
        .grpcurl(
            Some(&server.owner()),
            &[
                "-d",
                &format!(r#"{{"siteId": "{site_id}"}}"#),
                "mdm.v1.DeviceService/ListDevices",
            ],
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&device_id));
}

#[tokio::test]
async fn a_running_agent_is_online_and_unenroll_closes_its_stream_and_wipes_it() {
    let mut config =
        mdm_server::Config::for_data_dir(tempfile::tempdir().unwrap().keep().join("d"));
    config.heartbeat_interval = Duration::from_secs(1);
    let server = TestServer::start_with(config).await.unwrap();
    let (site_id, passcode) = site_with_passcode(&server, "bob@example.com", 0).await;
    let agent = TestAgent::new();
    assert!(
        agent
            .enroll(&server, "bob@example.com", &passcode)
            .await
            .status
            .success()
    );
    let device_id = agent.device_id();
    let saved = tempfile::tempdir().unwrap();
    for file in ["identity.json", "device.key", "device.crt", "ca.crt"] {
        std::fs::copy(agent.state_dir.join(file), saved.path().join(file)).unwrap();
    }

    let mut child = agent.run();
    let first_seen = eventually("the agent is online", || {
        let server = &server;
        let device_id = device_id.clone();
        async move {
            let device = get_device(server, &device_id).await;
            (device.online && device.last_seen.is_some()).then(|| device.last_seen.unwrap().seconds)
        }
    })
    .await;
    // Heartbeats move last_seen forward.
    eventually("heartbeats update last_seen", || {
        let server = &server;
        let device_id = device_id.clone();
        async move {
            let device = get_device(server, &device_id).await;
            (device.last_seen.unwrap().seconds > first_seen).then_some(())
        }
    })
    .await;

    let action = server
        .devices()
        .await
        .unenroll_device(pb::UnenrollDeviceRequest {
            device_id: device_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(action.r#type(), pb::ActionType::Unenroll);
    assert_eq!(action.status(), pb::ActionStatus::Succeeded);
    assert!(
        action
            .timeline
            .iter()
            .any(|e| e.status() == pb::ActionStatus::Sent)
    );

    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("the agent stops soon after the unenroll")
        .unwrap();
    assert!(exit.success());
    assert!(agent.identity().is_none(), "identity wiped");
    assert!(!agent.state_dir.join("device.key").exists(), "key wiped");
    let status = agent.status().await;
    assert_eq!(status.status.code(), Some(1));
    assert!(text(&status.stdout).contains("not enrolled"));

    let device = get_device(&server, &device_id).await;
    assert_eq!(device.status(), pb::DeviceStatus::Unenrolled);
    eventually("the device is offline", || {
        let server = &server;
        let device_id = device_id.clone();
        async move { (!get_device(server, &device_id).await.online).then_some(()) }
    })
    .await;

    // In the action log, site-wide and per device.
    let mut log = ActionLogServiceClient::new(server.admin_channel(&server.owner()).await);
    let listed = log
        .list_actions(pb::ListActionsRequest {
            site_id: site_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].action_id, action.action_id);
    assert_eq!(listed[0].created_by, "owner@localhost");
    let got = log
        .get_action(pb::GetActionRequest {
            action_id: action.action_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(got, listed[0]);

    // The old identity is refused everywhere, and an agent holding it removes it.
    let old = TestAgent::new();
    std::fs::create_dir_all(&old.state_dir).unwrap();
    for file in ["identity.json", "device.key", "device.crt", "ca.crt"] {
        std::fs::copy(saved.path().join(file), old.state_dir.join(file)).unwrap();
    }
    let status = AgentServiceClient::new(device_channel(&server, &old).await)
        .renew_certificate(pb::RenewCertificateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{}", status.message());
    let out = tokio::time::timeout(Duration::from_secs(20), old.run().wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("unenrolled"),
        "{}",
        text(&out.stdout)
    );
    assert!(old.identity().is_none());

    let status = server
        .devices()
        .await
        .unenroll_device(pb::UnenrollDeviceRequest { device_id })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn the_agent_renews_its_certificate_and_keeps_working_past_the_old_expiry() {
    let mut config =
        mdm_server::Config::for_data_dir(tempfile::tempdir().unwrap().keep().join("d"));
    config.device_cert_lifetime = Duration::from_secs(6);
    config.heartbeat_interval = Duration::from_secs(1);
    let server = TestServer::start_with(config).await.unwrap();
    let (_, passcode) = site_with_passcode(&server, "carol@example.com", 0).await;
    let agent = TestAgent::new();
    assert!(
        agent
            .enroll(&server, "carol@example.com", &passcode)
            .await
            .status
            .success()
    );
    let device_id = agent.device_id();
    let first_expiry = agent.identity().unwrap()["expires_at"].as_i64().unwrap();
    let first_cert = std::fs::read_to_string(agent.state_dir.join("device.crt")).unwrap();

    let _child = agent.run();
    // Past the first certificate's expiry, the agent is still heard from.
    eventually_within(
        Duration::from_secs(30),
        "the agent is seen after its first certificate expired",
        &mut || {
            let server = &server;
            let device_id = device_id.clone();
            async move {
                let device = get_device(server, &device_id).await;
                let seen = device
                    .last_seen
                    .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000));
                (device.online && seen > first_expiry + 1000).then_some(())
            }
        },
    )
    .await;
    let identity = agent.identity().unwrap();
    assert!(
        identity["expires_at"].as_i64().unwrap() > first_expiry,
        "renewed"
    );
    assert_ne!(
        std::fs::read_to_string(agent.state_dir.join("device.crt")).unwrap(),
        first_cert
    );
    let device = get_device(&server, &device_id).await;
    let server_expiry = device.certificate_expires_at.unwrap();
    assert!(server_expiry.seconds * 1000 > first_expiry);
}

#[tokio::test]
async fn wrong_passcodes_count_toward_lockout_and_a_locked_or_disabled_passcode_refuses() {
    let server = TestServer::start().await;
    let (site_id, passcode) = site_with_passcode(&server, "dan@example.com", 2).await;
    let agent = TestAgent::new();

    for attempt in 1..=2 {
        let out = agent
            .enroll(&server, "dan@example.com", "Wrong0Pass12")
            .await;
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out.stderr).contains("enrollment refused"),
            "{}",
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).contains("Wrong0Pass12"));
        assert_eq!(
            passcode_info(&server, &site_id).await.failed_attempts,
            attempt
        );
    }
    let info = passcode_info(&server, &site_id).await;
    assert_eq!(info.state(), pb::CompanyPasscodeState::LockedOut);
    assert!(info.last_failed_at.is_some());

    let out = agent.enroll(&server, "dan@example.com", &passcode).await;
    assert!(
        text(&out.stderr).contains("enrollment refused"),
        "the right passcode is refused after lockout"
    );
    assert!(agent.identity().is_none());

    let mut log = ActionLogServiceClient::new(server.admin_channel(&server.owner()).await);
    let alerts = log
        .list_alerts(pb::ListAlertsRequest {
            site_id: site_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].kind(), pb::AlertKind::CompanyPasscodeLockedOut);
    assert_eq!(alerts[0].failed_attempts, 2);
    assert_eq!(alerts[0].source_addresses, vec!["127.0.0.1"]);
    let outbox = log
        .list_notifications(pb::ListNotificationsRequest {
            site_id: site_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .notifications;
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].recipient, "owner@localhost");
    // Delivered in the background (to an .eml file here): pending or already out.
    assert_ne!(outbox[0].state(), pb::NotificationState::Failed);

    // Regenerate re-enables; disable turns it off again.
    let mut sites = SiteServiceClient::new(server.admin_channel(&server.owner()).await);
    let fresh = sites
        .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
            site_id: site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .passcode;
    sites
        .disable_company_passcode(pb::DisableCompanyPasscodeRequest {
            site_id: site_id.clone(),
        })
        .await
        .unwrap();
    let out = agent.enroll(&server, "dan@example.com", &fresh).await;
    assert!(text(&out.stderr).contains("enrollment refused"));
    assert!(agent.identity().is_none());
    let devices = server
        .devices()
        .await
        .list_devices(pb::ListDevicesRequest {
            site_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert!(devices.is_empty());
}

fn facts(serial: &str) -> pb::DeviceFacts {
    pb::DeviceFacts {
        platform: pb::Platform::Linux.into(),
        serial_number: serial.into(),
        hostname: "test".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_csrs_and_oversized_requests_are_refused_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let (site_id, passcode) = site_with_passcode(&server, "erin@example.com", 0).await;
    let mut enroll = EnrollmentServiceClient::new(server.channel(None).await);
    let request = |csr_pem: String| pb::EnrollRequest {
        user_email: "erin@example.com".into(),
        company_passcode: passcode.clone(),
        csr_pem,
        device: Some(facts("S1")),
    };

    let p384 = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    };
    let (_, good_csr) = mdm_agent::enroll::key_and_csr("x").unwrap();
    // One base64 character changed inside the signed part: the self-signature no longer holds.
    let tampered = {
        let mut lines: Vec<String> = good_csr.lines().map(str::to_owned).collect();
        let line = &mut lines[2];
        let c = if line.as_bytes()[10] == b'A' {
            "B"
        } else {
            "A"
        };
        line.replace_range(10..11, c);
        lines.join("\n")
    };
    assert_ne!(tampered, good_csr);
    let oversized = format!("{good_csr}{}", "A".repeat(10_000));
    for (case, csr) in [
        ("garbage", "garbage".to_owned()),
        ("empty", String::new()),
        ("p384", p384),
        ("tampered", tampered),
        ("oversized", oversized),
    ] {
        let status = enroll.enroll(request(csr)).await.expect_err(case);
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "enrollment refused");
    }
    let mut no_facts = request(good_csr.clone());
    no_facts.device = None;
    assert_eq!(
        enroll.enroll(no_facts).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // A 2 MiB body is cut off by the decoder limit; the server stays up.
    let mut huge = request(good_csr.clone());
    huge.csr_pem = "A".repeat(2 * 1024 * 1024);
    let status = enroll.enroll(huge).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::PermissionDenied
        ),
        "{status:?}"
    );

    // Nothing stored, and malformed CSRs did not count against the passcode.
    let info = passcode_info(&server, &site_id).await;
    assert_eq!((info.failed_attempts, info.enrollments), (0, 0));
    let listed = server
        .devices()
        .await
        .list_devices(pb::ListDevicesRequest {
            site_id: site_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert!(listed.is_empty());

    // Ed25519 keys are welcome.
    let ed = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    };
    let enrolled = enroll.enroll(request(ed)).await.unwrap().into_inner();
    assert!(enrolled.device_id.starts_with("dv_"));
    assert!(enrolled.certificate_chain_pem.contains("BEGIN CERTIFICATE"));
    assert!(enrolled.renew_after.unwrap().seconds < enrolled.expires_at.unwrap().seconds);
}

/// Alerts of `site_id`, as the owner.
async fn alerts(server: &TestServer, site_id: &str) -> Vec<pb::Alert> {
    pb::action_log_service_client::ActionLogServiceClient::new(
        server.admin_channel(&server.owner()).await,
    )
    .list_alerts(pb::ListAlertsRequest {
        site_id: site_id.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .alerts
}

#[tokio::test]
async fn a_serial_number_alone_takes_over_nothing_and_raises_an_alert() {
    let server = TestServer::start().await;
    let (site_id, passcode) = site_with_passcode(&server, "fay@example.com", 0).await;
    pb::user_service_client::UserServiceClient::new(server.admin_channel(&server.owner()).await)
        .create_user(pb::CreateUserRequest {
            site_id: site_id.clone(),
            email: "mal@example.com".into(),
            display_name: String::new(),
        })
        .await
        .unwrap();
    let victim = TestAgent::new();
    assert!(
        victim
            .enroll(&server, "fay@example.com", &passcode)
            .await
            .status
            .success()
    );
    // Someone else with the company passcode claims the victim's serial,
    // under their own email and under the victim's.
    for email in ["mal@example.com", "fay@example.com"] {
        let claimant = TestAgent::same_hardware_as(&victim);
        assert!(
            claimant
                .enroll(&server, email, &passcode)
                .await
                .status
                .success()
        );
        let claimed = get_device(&server, &claimant.device_id()).await;
        assert_eq!(claimed.status(), pb::DeviceStatus::Active);
        assert_eq!(claimed.replaces_device_id, "");
    }

    let victim_id = victim.device_id();
    let kept = get_device(&server, &victim_id).await;
    assert_eq!(kept.status(), pb::DeviceStatus::Active, "taken over");
    // Past authentication (an empty CSR is refused as such, not the caller).
    let status = AgentServiceClient::new(device_channel(&server, &victim).await)
        .renew_certificate(pb::RenewCertificateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let alerts = alerts(&server, &site_id).await;
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert!(
        alerts
            .iter()
            .all(|a| a.kind() == pb::AlertKind::DuplicateDeviceSerial)
    );
    // Newest first: the first claim names the victim's device.
    assert!(
        alerts[1].details.contains(&victim_id),
        "{}",
        alerts[1].details
    );
}

#[tokio::test]
async fn a_stream_cannot_change_the_serial_number_a_device_enrolled_with() {
    use pb::connect_request::Message as Up;
    let server = TestServer::start().await;
    let (_, passcode) = site_with_passcode(&server, "fay@example.com", 0).await;
    let agent = TestAgent::new();
    assert!(
        agent
            .enroll(&server, "fay@example.com", &passcode)
            .await
            .status
            .success()
    );
    let device_id = agent.device_id();
    let (up, rx) = tokio::sync::mpsc::channel(8);
    up.send(pb::ConnectRequest {
        message: Some(Up::Hello(pb::AgentHello {
            facts: Some(pb::DeviceFacts {
                platform: pb::Platform::Linux.into(),
                serial_number: "SOMEONE-ELSES".into(),
                hostname: "renamed".into(),
                ..Default::default()
            }),
            compliance: None,
        })),
    })
    .await
    .unwrap();
    let mut down = AgentServiceClient::new(device_channel(&server, &agent).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    down.message().await.unwrap().unwrap();
    let device = get_device(&server, &device_id).await;
    assert_eq!(device.hostname, "renamed", "other facts are taken");
    assert_eq!(device.serial_number, agent.serial);
}

#[tokio::test]
async fn re_enrolling_with_the_current_identity_replaces_the_old_record() {
    let server = TestServer::start().await;
    let (site_id, passcode) = site_with_passcode(&server, "fay@example.com", 0).await;
    let agent = TestAgent::new();
    assert!(
        agent
            .enroll(&server, "fay@example.com", &passcode)
            .await
            .status
            .success()
    );
    let old_id = agent.device_id();
    let old_cert = std::fs::read_to_string(agent.state_dir.join("device.crt")).unwrap();
    let old_key = std::fs::read_to_string(agent.state_dir.join("device.key")).unwrap();
    let again = agent
        .enroll_with(
            &server,
            "fay@example.com",
            &passcode,
            &["--backend", "simulated", "--force"],
        )
        .await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    let new_id = agent.device_id();
    assert_ne!(old_id, new_id);

    let old = get_device(&server, &old_id).await;
    assert_eq!(old.status(), pb::DeviceStatus::Replaced);
    let new = get_device(&server, &new_id).await;
    assert_eq!(new.status(), pb::DeviceStatus::Active);
    assert_eq!(new.replaces_device_id, old_id);
    assert!(alerts(&server, &site_id).await.is_empty());

    let status = AgentServiceClient::new(server.channel(Some((&old_cert, &old_key))).await)
        .renew_certificate(pb::RenewCertificateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn an_agent_can_pin_the_ca_by_fingerprint() {
    let server = TestServer::start().await;
    let (_, passcode) = site_with_passcode(&server, "gus@example.com", 0).await;
    let fingerprint = mdm_server::pki::fingerprint(&server.ca_pem()).unwrap();
    let agent = TestAgent::new();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let run = |fp: String| {
        let mut c = tokio::process::Command::new(mdm_tests::agent_bin());
        c.arg("--state-dir")
            .arg(&agent.state_dir)
            .args([
                "enroll",
                "--server",
                &format!("localhost:{}", server.addr.port()),
                "--email",
                "gus@example.com",
                "--ca-fingerprint",
                &fp,
            ])
            .env("MDM_COMPANY_PASSCODE", &passcode)
            .env("MDM_DEVICE_SERIAL", &agent.serial);
        c
    };
    let out = run(wrong).output().await.unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("fingerprint"),
        "{}",
        text(&out.stderr)
    );
    assert!(agent.identity().is_none());

    let out = run(fingerprint).output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(agent.state_dir.join("ca.crt"))
            .unwrap()
            .trim(),
        server.ca_pem().trim()
    );
}
