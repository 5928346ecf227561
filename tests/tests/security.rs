//! Hardening checks: the permission matrix of every admin and agent RPC,
//! and a brute-force run against one site's company passcode.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mdm_server::admins::Role;
use mdm_tests::{Credential, TestServer, pb, site_with_passcode};
use tonic::Code;
use tonic::transport::Channel;

/// Ids of things in the site under test.
struct Target {
    site: String,
    user: String,
    device: String,
    action: String,
}

const ADMIN_RPCS: [&str; 27] = [
    "CreateSite",
    "GetSite",
    "ListSites",
    "UpdateSite",
    "GenerateCompanyPasscode",
    "GetCompanyPasscode",
    "DisableCompanyPasscode",
    "SetPasscodePolicy",
    "GetPasscodePolicy",
    "SetWebhook",
    "CreateUser",
    "GetUser",
    "ListUsers",
    "DeleteUser",
    "ImportUsers",
    "ListDevices",
    "GetDevice",
    "ResetPasscode",
    "LockDevice",
    "UnenrollDevice",
    "ListActions",
    "GetAction",
    "CancelAction",
    "WatchActions",
    "ListAlerts",
    "WatchAlerts",
    "ListNotifications",
];

async fn call(rpc: &str, channel: Channel, t: &Target) -> Code {
    use pb::action_log_service_client::ActionLogServiceClient as Log;
    use pb::device_service_client::DeviceServiceClient as Devices;
    use pb::site_service_client::SiteServiceClient as Sites;
    use pb::user_service_client::UserServiceClient as Users;
    let site = t.site.clone();
    let result: Result<(), tonic::Status> = match rpc {
        "CreateSite" => Sites::new(channel)
            .create_site(pb::CreateSiteRequest {
                display_name: "x".into(),
                failed_attempt_limit: 0,
            })
            .await
            .map(|_| ()),
        "GetSite" => Sites::new(channel)
            .get_site(pb::GetSiteRequest { site_id: site })
            .await
            .map(|_| ()),
        "ListSites" => Sites::new(channel)
            .list_sites(pb::ListSitesRequest::default())
            .await
            .map(|_| ()),
        "UpdateSite" => Sites::new(channel)
            .update_site(pb::UpdateSiteRequest {
                site_id: site,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GenerateCompanyPasscode" => Sites::new(channel)
            .generate_company_passcode(pb::GenerateCompanyPasscodeRequest { site_id: site })
            .await
            .map(|_| ()),
        "GetCompanyPasscode" => Sites::new(channel)
            .get_company_passcode(pb::GetCompanyPasscodeRequest { site_id: site })
            .await
            .map(|_| ()),
        "DisableCompanyPasscode" => Sites::new(channel)
            .disable_company_passcode(pb::DisableCompanyPasscodeRequest { site_id: site })
            .await
            .map(|_| ()),
        "SetPasscodePolicy" => Sites::new(channel)
            .set_passcode_policy(pb::SetPasscodePolicyRequest {
                site_id: site,
                policy: Some(pb::PasscodePolicy {
                    required: true,
                    min_length: 8,
                    complexity: pb::PasscodeComplexity::Numeric.into(),
                    max_age_days: 0,
                }),
            })
            .await
            .map(|_| ()),
        "GetPasscodePolicy" => Sites::new(channel)
            .get_passcode_policy(pb::GetPasscodePolicyRequest { site_id: site })
            .await
            .map(|_| ()),
        "SetWebhook" => Sites::new(channel)
            .set_webhook(pb::SetWebhookRequest {
                site_id: site,
                url: String::new(),
            })
            .await
            .map(|_| ()),
        "CreateUser" => Users::new(channel)
            .create_user(pb::CreateUserRequest {
                site_id: site,
                email: format!("u{}@example.com", rand_suffix()),
                display_name: String::new(),
            })
            .await
            .map(|_| ()),
        "GetUser" => Users::new(channel)
            .get_user(pb::GetUserRequest {
                user_id: t.user.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "ListUsers" => Users::new(channel)
            .list_users(pb::ListUsersRequest {
                site_id: site,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "DeleteUser" => Users::new(channel)
            .delete_user(pb::DeleteUserRequest {
                user_id: "us_doesnotexist".into(),
            })
            .await
            .map(|_| ()),
        "ImportUsers" => Users::new(channel)
            .import_users(pb::ImportUsersRequest {
                site_id: site,
                csv: format!("email\ni{}@example.com\n", rand_suffix()),
            })
            .await
            .map(|_| ()),
        "ListDevices" => Devices::new(channel)
            .list_devices(pb::ListDevicesRequest {
                site_id: site,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GetDevice" => Devices::new(channel)
            .get_device(pb::GetDeviceRequest {
                device_id: t.device.clone(),
            })
            .await
            .map(|_| ()),
        "ResetPasscode" => Devices::new(channel)
            .reset_passcode(pb::ResetPasscodeRequest {
                device_id: t.device.clone(),
                confirm_user_email: "wrong@example.com".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "LockDevice" => Devices::new(channel)
            .lock_device(pb::LockDeviceRequest {
                device_id: t.device.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "UnenrollDevice" => Devices::new(channel)
            .unenroll_device(pb::UnenrollDeviceRequest {
                device_id: "dv_doesnotexist".into(),
            })
            .await
            .map(|_| ()),
        "ListActions" => Log::new(channel)
            .list_actions(pb::ListActionsRequest {
                site_id: site,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GetAction" => Log::new(channel)
            .get_action(pb::GetActionRequest {
                action_id: t.action.clone(),
            })
            .await
            .map(|_| ()),
        "CancelAction" => Log::new(channel)
            .cancel_action(pb::CancelActionRequest {
                action_id: t.action.clone(),
            })
            .await
            .map(|_| ()),
        "WatchActions" => Log::new(channel)
            .watch_actions(pb::WatchActionsRequest {
                site_id: site,
                device_id: String::new(),
            })
            .await
            .map(|_| ()),
        "ListAlerts" => Log::new(channel)
            .list_alerts(pb::ListAlertsRequest {
                site_id: site,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "WatchAlerts" => Log::new(channel)
            .watch_alerts(pb::WatchAlertsRequest { site_id: site })
            .await
            .map(|_| ()),
        "ListNotifications" => Log::new(channel)
            .list_notifications(pb::ListNotificationsRequest {
                site_id: site,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        other => panic!("unknown rpc {other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn rand_suffix() -> u64 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) as u64
}

#[tokio::test]
async fn every_admin_rpc_enforces_identity_and_site_scope() {
    let server = TestServer::start().await;
    let (site, passcode) = site_with_passcode(&server, "own@example.com", 0).await;
    let (other_site, _) = site_with_passcode(&server, "other@example.com", 0).await;
    let agent = mdm_tests::TestAgent::new();
    assert!(
        agent
            .enroll(&server, "own@example.com", &passcode)
            .await
            .status
            .success()
    );
    let device = agent.device_id();
    let owner = server.owner();
    let action =
        pb::device_service_client::DeviceServiceClient::new(server.admin_channel(&owner).await)
            .lock_device(pb::LockDeviceRequest {
                device_id: device.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .action
            .unwrap()
            .action_id;
    let user = pb::user_service_client::UserServiceClient::new(server.admin_channel(&owner).await)
        .get_user(pb::GetUserRequest {
            site_id: site.clone(),
            email: "own@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .user_id;
    let target = Target {
        site: site.clone(),
        user,
        device,
        action,
    };

    let own: Credential = server.add_admin("own-admin@example.com", Role::SiteAdmin, &[&site]);
    let outsider = server.add_admin("outsider@example.com", Role::SiteAdmin, &[&other_site]);
    let revoked = server.add_admin("revoked@example.com", Role::Owner, &[]);
    server.revoke_admin("revoked@example.com");

    let identities: Vec<(&str, Channel)> = vec![
        ("no cert", server.channel(None).await),
        ("device cert", server.device_channel(&agent).await),
        ("revoked admin", server.admin_channel(&revoked).await),
        (
            "site-admin of another site",
            server.admin_channel(&outsider).await,
        ),
        ("site-admin of this site", server.admin_channel(&own).await),
        ("owner", server.admin_channel(&owner).await),
    ];
    let mut failures = Vec::new();
    let mut table: HashMap<(&str, &str), Code> = HashMap::new();
    for rpc in ADMIN_RPCS {
        for (who, channel) in &identities {
            let code = call(rpc, channel.clone(), &target).await;
            table.insert((rpc, *who), code);
            let ok = match *who {
                "no cert" | "device cert" | "revoked admin" => code == Code::Unauthenticated,
                "site-admin of another site" => match rpc {
                    // Lists only what the caller may see; an unknown id says nothing either way.
                    "ListSites" => code == Code::Ok,
                    // Another site's object is not found, like an id that names nothing.
                    "DeleteUser" | "UnenrollDevice" | "GetUser" | "GetDevice" | "ResetPasscode"
                    | "LockDevice" | "GetAction" | "CancelAction" => code == Code::NotFound,
                    _ => code == Code::PermissionDenied,
                },
                "site-admin of this site" if rpc == "CreateSite" => code == Code::PermissionDenied,
                _ => !matches!(
                    code,
                    Code::Unauthenticated
                        | Code::PermissionDenied
                        | Code::Internal
                        | Code::Unimplemented
                ),
            };
            if !ok {
                failures.push(format!("{rpc} as {who}: {code:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "unexpected codes:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        table[&("ResetPasscode", "owner")],
        Code::FailedPrecondition,
        "wrong confirm email"
    );
    assert_eq!(table[&("GetDevice", "site-admin of this site")], Code::Ok);
}

#[tokio::test]
async fn agent_rpcs_need_a_live_device_certificate() {
    let server = TestServer::start().await;
    let (_, passcode) = site_with_passcode(&server, "dev@example.com", 0).await;
    let agent = mdm_tests::TestAgent::new();
    assert!(
        agent
            .enroll(&server, "dev@example.com", &passcode)
            .await
            .status
            .success()
    );
    let renew = |channel: Channel| async move {
        pb::agent_service_client::AgentServiceClient::new(channel)
            .renew_certificate(pb::RenewCertificateRequest::default())
            .await
            .unwrap_err()
            .code()
    };
    assert_eq!(
        renew(server.channel(None).await).await,
        Code::Unauthenticated
    );
    assert_eq!(
        renew(server.admin_channel(&server.owner()).await).await,
        Code::Unauthenticated
    );
    // A live device with an empty CSR: authenticated, then refused for the CSR.
    assert_eq!(
        renew(server.device_channel(&agent).await).await,
        Code::InvalidArgument
    );
    pb::device_service_client::DeviceServiceClient::new(
        server.admin_channel(&server.owner()).await,
    )
    .unenroll_device(pb::UnenrollDeviceRequest {
        device_id: agent.device_id(),
    })
    .await
    .unwrap();
    assert_eq!(
        renew(server.device_channel(&agent).await).await,
        Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_wrong_passcodes_from_many_addresses_lock_out_exactly_once() {
    let server = TestServer::start().await;
    let (target_site, good) = site_with_passcode(&server, "victim@example.com", 10).await;
    let (other_site, other_good) = site_with_passcode(&server, "bystander@example.com", 10).await;
    let (_, csr) = mdm_agent::enroll::key_and_csr("x").unwrap();
    let ca = server.ca_pem();
    let outcomes: Arc<std::sync::Mutex<HashMap<Code, usize>>> = Arc::default();
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    // 500 sources x 20 attempts.
    for source in 0..500usize {
        let (limit, ca, csr, outcomes) = (limit.clone(), ca.clone(), csr.clone(), outcomes.clone());
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.unwrap();
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                .domain_name("localhost");
            let channel =
                mdm_tests::bench::channel_from(addr, mdm_tests::bench::source_ip(source), tls)
                    .await
                    .unwrap();
            let mut client = pb::enrollment_service_client::EnrollmentServiceClient::new(channel);
            for attempt in 0..20 {
                let code = match client
                    .enroll(pb::EnrollRequest {
                        user_email: "victim@example.com".into(),
                        company_passcode: format!("Wrong{source:04}x{attempt:02}"),
                        csr_pem: csr.clone(),
                        device: Some(pb::DeviceFacts {
                            platform: pb::Platform::Linux.into(),
                            ..Default::default()
                        }),
                    })
                    .await
                {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                *outcomes.lock().unwrap().entry(code).or_default() += 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.values().sum::<usize>(), 10_000);
    assert_eq!(
        outcomes.get(&Code::Ok),
        None,
        "zero enrollments: {outcomes:?}"
    );
    assert!(
        outcomes.get(&Code::ResourceExhausted).copied().unwrap_or(0) > 0,
        "throttling engaged: {outcomes:?}"
    );
    eprintln!("brute force outcomes: {outcomes:?}");

    let owner = server.admin_channel(&server.owner()).await;
    let mut sites = pb::site_service_client::SiteServiceClient::new(owner.clone());
    let info = sites
        .get_company_passcode(pb::GetCompanyPasscodeRequest {
            site_id: target_site.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.state(), pb::CompanyPasscodeState::LockedOut);
    assert_eq!(info.failed_attempts, 10, "locked out at exactly its limit");
    let alerts = pb::action_log_service_client::ActionLogServiceClient::new(owner.clone())
        .list_alerts(pb::ListAlertsRequest {
            site_id: target_site.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(alerts.len(), 1, "exactly one alert");
    let other = sites
        .get_company_passcode(pb::GetCompanyPasscodeRequest {
            site_id: other_site,
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(
        (other.state(), other.failed_attempts),
        (pb::CompanyPasscodeState::Enabled, 0),
        "other sites unaffected"
    );

    // The right passcode is refused now; the other site still enrolls.
    let mut enroll =
        pb::enrollment_service_client::EnrollmentServiceClient::new(server.channel(None).await);
    let request = |email: &str, passcode: &str| pb::EnrollRequest {
        user_email: email.into(),
        company_passcode: passcode.into(),
        csr_pem: csr.clone(),
        device: Some(pb::DeviceFacts {
            platform: pb::Platform::Linux.into(),
            ..Default::default()
        }),
    };
    assert_eq!(
        enroll
            .enroll(request("victim@example.com", &good))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    enroll
        .enroll(request("bystander@example.com", &other_good))
        .await
        .unwrap();
}
