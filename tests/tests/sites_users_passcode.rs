//! Sites, users and the company passcode over gRPC, as admins use them:
//! through tonic clients with real mutual TLS, and through the real grpcurl.
#![allow(clippy::unwrap_used)]

use mdm_server::admins::Role;
use mdm_tests::{Credential, TestServer, code, pb};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::site_service_client::SiteServiceClient;
use pb::user_service_client::UserServiceClient;
use tonic::Code;
use tonic::transport::Channel;

async fn clients(
    server: &TestServer,
    who: &Credential,
) -> (SiteServiceClient<Channel>, UserServiceClient<Channel>) {
    let channel = server.admin_channel(who).await;
    (
        SiteServiceClient::new(channel.clone()),
        UserServiceClient::new(channel),
    )
}

async fn create_site(sites: &mut SiteServiceClient<Channel>, name: &str, limit: u32) -> pb::Site {
    sites
        .create_site(pb::CreateSiteRequest {
            display_name: name.into(),
            failed_attempt_limit: limit,
        })
        .await
        .unwrap()
        .into_inner()
        .site
        .unwrap()
}

#[tokio::test]
async fn sites_are_created_read_listed_page_by_page_and_updated() {
    let server = TestServer::start().await;
    let (mut sites, _) = clients(&server, &server.owner()).await;
    let first = create_site(&mut sites, "Head office", 0).await;
    assert_eq!(first.failed_attempt_limit, 10, "default limit");
    assert!(first.site_id.starts_with("st_"));
    let mut ids = vec![first.site_id.clone()];
    for n in 0..6 {
        ids.push(
            create_site(&mut sites, &format!("Branch {n}"), 3)
                .await
                .site_id,
        );
    }
    ids.sort();

    let got = sites
        .get_site(pb::GetSiteRequest {
            site_id: first.site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .site
        .unwrap();
    assert_eq!(got, first);

    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = sites
            .list_sites(pb::ListSitesRequest {
                page_size: 3,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.sites.len() <= 3);
        listed.extend(page.sites.into_iter().map(|s| s.site_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, ids, "every site exactly once, in id order");
    assert_eq!(pages, 3);

    let updated = sites
        .update_site(pb::UpdateSiteRequest {
            site_id: first.site_id.clone(),
            display_name: Some("HQ".into()),
            failed_attempt_limit: Some(25),
            reset_passcode_visible_days: None,
        })
        .await
        .unwrap()
        .into_inner()
        .site
        .unwrap();
    assert_eq!(
        (updated.display_name.as_str(), updated.failed_attempt_limit),
        ("HQ", 25)
    );

    // Bad input: clear codes and messages, nothing changed.
    for limit in [101, 1000] {
        let status = sites
            .create_site(pb::CreateSiteRequest {
                display_name: "x".into(),
                failed_attempt_limit: limit,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("failed_attempt_limit"),
            "{}",
            status.message()
        );
    }
    let status = sites
        .update_site(pb::UpdateSiteRequest {
            site_id: first.site_id.clone(),
            failed_attempt_limit: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = sites
        .create_site(pb::CreateSiteRequest {
            display_name: "  ".into(),
            failed_attempt_limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("display_name"));
    let status = sites
        .get_site(pb::GetSiteRequest {
            site_id: "st_nothere".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = sites
        .list_sites(pb::ListSitesRequest {
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = sites
        .list_sites(pb::ListSitesRequest {
            page_size: 0,
            page_token: "zz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("page_token"));
    let again = sites
        .get_site(pb::GetSiteRequest {
            site_id: first.site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .site
        .unwrap();
    assert_eq!(again.failed_attempt_limit, 25);
}

#[tokio::test]
async fn users_are_unique_per_site_ignoring_case_and_import_reports_bad_rows() {
    let server = TestServer::start().await;
    let (mut sites, mut users) = clients(&server, &server.owner()).await;
    let site = create_site(&mut sites, "Site", 0).await;
    let other = create_site(&mut sites, "Other", 0).await;

    let alice = users
        .create_user(pb::CreateUserRequest {
            site_id: site.site_id.clone(),
            email: " Alice@Example.COM ".into(),
            display_name: "Alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(alice.email, "alice@example.com");
    let status = users
        .create_user(pb::CreateUserRequest {
            site_id: site.site_id.clone(),
            email: "ALICE@example.com".into(),
            display_name: "Alice again".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    // The same email in another site is another user.
    users
        .create_user(pb::CreateUserRequest {
            site_id: other.site_id.clone(),
            email: "alice@example.com".into(),
            display_name: "Alice".into(),
        })
        .await
        .unwrap();
    let status = users
        .create_user(pb::CreateUserRequest {
            site_id: site.site_id.clone(),
            email: "no-at-sign".into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("email"), "{}", status.message());
    let status = users
        .create_user(pb::CreateUserRequest {
            site_id: "st_nothere".into(),
            email: "bob@example.com".into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let by_id = users
        .get_user(pb::GetUserRequest {
            user_id: alice.user_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(by_id, alice);
    let by_email = users
        .get_user(pb::GetUserRequest {
            site_id: site.site_id.clone(),
            email: "ALICE@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(by_email, alice);

    let report = users
        .import_users(pb::ImportUsersRequest {
            site_id: site.site_id.clone(),
            csv: "email,display_name\nbob@example.com,Bob\nbroken,Nobody\nalice@example.com,Dup of existing\ncarol@example.com,Carol\nbob@example.com,Dup in file\n".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.imported, 2);
    let refused: Vec<(u32, &str)> = report
        .errors
        .iter()
        .map(|e| (e.line, e.email.as_str()))
        .collect();
    assert_eq!(
        refused,
        vec![
            (3, "broken"),
            (4, "alice@example.com"),
            (6, "bob@example.com")
        ]
    );
    let status = users
        .import_users(pb::ImportUsersRequest {
            site_id: site.site_id.clone(),
            csv: "name\nx\n".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("line 1"), "{}", status.message());

    let listed: Vec<String> = users
        .list_users(pb::ListUsersRequest {
            site_id: site.site_id.clone(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .users
        .into_iter()
        .map(|u| u.email)
        .collect();
    assert_eq!(
        listed,
        vec!["alice@example.com", "bob@example.com", "carol@example.com"]
    );

    users
        .delete_user(pb::DeleteUserRequest {
            user_id: alice.user_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        code(
            users
                .get_user(pb::GetUserRequest {
                    user_id: alice.user_id.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            users
                .delete_user(pb::DeleteUserRequest {
                    user_id: alice.user_id
                })
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn ten_thousand_users_import_in_one_call_and_page_back_exactly_once() {
    let server = TestServer::start().await;
    let (mut sites, mut users) = clients(&server, &server.owner()).await;
    let site = create_site(&mut sites, "Big", 0).await;
    let mut csv = String::from("email,display_name\n");
    for n in 0..10_000 {
        csv.push_str(&format!("user{n:05}@example.com,User {n}\n"));
    }
    let started = std::time::Instant::now();
    let report = users
        .import_users(pb::ImportUsersRequest {
            site_id: site.site_id.clone(),
            csv,
        })
        .await
        .unwrap()
        .into_inner();
    // Reported, not asserted: timing targets belong to `cargo xtask bench`.
    eprintln!("imported 10,000 users in {:?}", started.elapsed());
    assert_eq!(report.imported, 10_000);
    assert!(report.errors.is_empty());

    let mut seen = std::collections::HashSet::new();
    let mut token = String::new();
    loop {
        let page = users
            .list_users(pb::ListUsersRequest {
                site_id: site.site_id.clone(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        for user in page.users {
            assert!(seen.insert(user.email), "listed twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 10_000);
}

#[tokio::test]
async fn the_company_passcode_is_generated_shown_once_regenerated_and_disabled() {
    let server = TestServer::start().await;
    let owner = server.owner();
    let (mut sites, _) = clients(&server, &owner).await;
    let site = create_site(&mut sites, "Site", 0).await;
    let request = || pb::GetCompanyPasscodeRequest {
        site_id: site.site_id.clone(),
    };

    let info = sites
        .get_company_passcode(request())
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.state(), pb::CompanyPasscodeState::NotGenerated);
    assert_eq!(
        code(
            sites
                .disable_company_passcode(pb::DisableCompanyPasscodeRequest {
                    site_id: site.site_id.clone()
                })
                .await
        ),
        Code::FailedPrecondition
    );

    let generated = sites
        .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
            site_id: site.site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let passcode = generated.passcode.clone();
    assert_eq!(passcode.len(), 12);
    assert!(passcode.bytes().all(|b| b.is_ascii_alphanumeric()));
    let info = generated.info.unwrap();
    assert_eq!(info.state(), pb::CompanyPasscodeState::Enabled);
    assert_eq!(info.generated_by, "owner@localhost");
    assert_eq!(
        (
            info.failed_attempts,
            info.failed_attempt_limit,
            info.enrollments
        ),
        (0, 10, 0)
    );
    assert!(info.generated_at.is_some());

    let read = sites
        .get_company_passcode(request())
        .await
        .unwrap()
        .into_inner();
    assert!(
        !format!("{read:?}").contains(&passcode),
        "info never carries the passcode"
    );

    let regenerated = sites
        .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
            site_id: site.site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(regenerated.passcode, passcode);

    let disabled = sites
        .disable_company_passcode(pb::DisableCompanyPasscodeRequest {
            site_id: site.site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(disabled.state(), pb::CompanyPasscodeState::Disabled);
    let info = sites
        .get_company_passcode(request())
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.state(), pb::CompanyPasscodeState::Disabled);

    // No alerts for a site that was never attacked.
    let alerts = ActionLogServiceClient::new(server.admin_channel(&owner).await)
        .list_alerts(pb::ListAlertsRequest {
            site_id: site.site_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(alerts.alerts.is_empty());

    // The passcode state survives a restart.
    let (dir, temp) = server.stop().await;
    let server = TestServer::start_in(&dir).await.unwrap();
    let (mut sites, _) = clients(&server, &owner).await;
    let info = sites
        .get_company_passcode(request())
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.state(), pb::CompanyPasscodeState::Disabled);
    drop(temp);
}

#[tokio::test]
async fn a_site_admin_sees_and_changes_only_their_own_sites() {
    let server = TestServer::start().await;
    let (mut owner_sites, _) = clients(&server, &server.owner()).await;
    let mine = create_site(&mut owner_sites, "Mine", 0).await;
    let theirs = create_site(&mut owner_sites, "Theirs", 0).await;
    let admin = server.add_admin("siteadmin@example.com", Role::SiteAdmin, &[&mine.site_id]);
    let (mut sites, mut users) = clients(&server, &admin).await;

    let listed: Vec<String> = sites
        .list_sites(pb::ListSitesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sites
        .into_iter()
        .map(|s| s.site_id)
        .collect();
    assert_eq!(listed, vec![mine.site_id.clone()]);
    sites
        .get_site(pb::GetSiteRequest {
            site_id: mine.site_id.clone(),
        })
        .await
        .unwrap();
    let generated = sites
        .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
            site_id: mine.site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        generated.info.unwrap().generated_by,
        "siteadmin@example.com"
    );
    users
        .create_user(pb::CreateUserRequest {
            site_id: mine.site_id.clone(),
            email: "u@example.com".into(),
            display_name: String::new(),
        })
        .await
        .unwrap();

    let other = theirs.site_id.clone();
    let denied = [
        code(
            sites
                .get_site(pb::GetSiteRequest {
                    site_id: other.clone(),
                })
                .await,
        ),
        code(
            sites
                .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
                    site_id: other.clone(),
                })
                .await,
        ),
        code(
            sites
                .get_company_passcode(pb::GetCompanyPasscodeRequest {
                    site_id: other.clone(),
                })
                .await,
        ),
        code(
            sites
                .disable_company_passcode(pb::DisableCompanyPasscodeRequest {
                    site_id: other.clone(),
                })
                .await,
        ),
        code(
            sites
                .update_site(pb::UpdateSiteRequest {
                    site_id: other.clone(),
                    ..Default::default()
                })
                .await,
        ),
        code(
            users
                .create_user(pb::CreateUserRequest {
                    site_id: other.clone(),
                    email: "x@example.com".into(),
                    display_name: String::new(),
                })
                .await,
        ),
        code(
            users
                .list_users(pb::ListUsersRequest {
                    site_id: other.clone(),
                    ..Default::default()
                })
                .await,
        ),
        code(
            users
                .import_users(pb::ImportUsersRequest {
                    site_id: other.clone(),
                    csv: "email\nx@example.com\n".into(),
                })
                .await,
        ),
        code(
            sites
                .create_site(pb::CreateSiteRequest {
                    display_name: "New".into(),
                    failed_attempt_limit: 0,
                })
                .await,
        ),
        // A site that does not exist is denied too: no probing for ids.
        code(
            sites
                .get_site(pb::GetSiteRequest {
                    site_id: "st_nothere".into(),
                })
                .await,
        ),
    ];
    assert!(
        denied.iter().all(|c| *c == Code::PermissionDenied),
        "{denied:?}"
    );
    let status = sites
        .get_site(pb::GetSiteRequest {
            site_id: other.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        status.message().contains("siteadmin@example.com"),
        "{}",
        status.message()
    );

    // Nothing changed on the other site.
    let info = owner_sites
        .get_company_passcode(pb::GetCompanyPasscodeRequest { site_id: other })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.state(), pb::CompanyPasscodeState::NotGenerated);
}

#[tokio::test]
async fn grpcurl_drives_the_passcode_lifecycle() {
    let server = TestServer::start().await;
    let owner = server.owner();
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "grpcurl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let created = json(
        server
            .grpcurl(
                Some(&owner),
                &[
                    "-d",
                    r#"{"displayName": "Grpcurl site", "failedAttemptLimit": 5}"#,
                    "mdm.v1.SiteService/CreateSite",
                ],
            )
            .await,
    );
    let site_id = created["site"]["siteId"].as_str().unwrap().to_owned();
    assert_eq!(created["site"]["failedAttemptLimit"], 5);

    let request = format!(r#"{{"siteId": "{site_id}"}}"#);
    let generated = json(
        server
            .grpcurl(
                Some(&owner),
                &["-d", &request, "mdm.v1.SiteService/GenerateCompanyPasscode"],
            )
            .await,
    );
    let passcode = generated["passcode"].as_str().unwrap();
    assert_eq!(passcode.len(), 12);
    assert_eq!(generated["info"]["state"], "COMPANY_PASSCODE_STATE_ENABLED");

    let out = server
        .grpcurl(
            Some(&owner),
            &["-d", &request, "mdm.v1.SiteService/GetCompanyPasscode"],
        )
        .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let info = json(out);
    assert!(!text.contains(passcode));
    assert_eq!(info["info"]["state"], "COMPANY_PASSCODE_STATE_ENABLED");
    assert_eq!(info["info"]["generatedBy"], "owner@localhost");
    assert_eq!(info["info"]["failedAttemptLimit"], 5);

    let disabled = json(
        server
            .grpcurl(
                Some(&owner),
                &["-d", &request, "mdm.v1.SiteService/DisableCompanyPasscode"],
            )
            .await,
    );
    assert_eq!(disabled["info"]["state"], "COMPANY_PASSCODE_STATE_DISABLED");

    let csv =
        r#"{"siteId": "SITE", "csv": "email,display_name\nann@example.com,Ann\nbad-row,X\n"}"#
            .replace("SITE", &site_id);
    let imported = json(
        server
            .grpcurl(
                Some(&owner),
                &["-d", &csv, "mdm.v1.UserService/ImportUsers"],
            )
            .await,
    );
    assert_eq!(imported["imported"], 1);
    assert_eq!(imported["errors"][0]["line"], 3);

    // Unknown site: NOT_FOUND with a message naming it.
    let out = server
        .grpcurl(
            Some(&owner),
            &[
                "-d",
                r#"{"siteId": "st_nothere"}"#,
                "mdm.v1.SiteService/GetCompanyPasscode",
            ],
        )
        .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("st_nothere"),
        "{stderr}"
    );
}
