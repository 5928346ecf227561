//! Security round 2 (issue #17): every site's action log lists, a call that
//! fails stores nothing, the data dir is owner-only, and long storage work
//! does not stall other calls.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use mdm_tests::{TestAgent, TestServer, all_actions, eventually, files_under, pb};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::site_service_client::SiteServiceClient;
use pb::user_service_client::UserServiceClient;
use tonic::Code;
use tonic::transport::Channel;

/// The last byte of the site's tag: action ids end with the tag.
fn tag_last_byte(site_id: &str) -> u8 {
    let id = mdm_store_sled::new_action_id(site_id);
    u8::from_str_radix(&id[id.len() - 2..], 16).unwrap()
}

async fn create_site(sites: &mut SiteServiceClient<Channel>, name: &str) -> String {
    sites
        .create_site(pb::CreateSiteRequest {
            display_name: name.into(),
            failed_attempt_limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .site
        .unwrap()
        .site_id
}

/// A user in `site_id`, a fresh company passcode, and an agent enrolled
/// there (not running, so its commands stay queued).
async fn enrolled_agent(server: &TestServer, site_id: &str, email: &str) -> TestAgent {
    let channel = server.admin_channel(&server.owner()).await;
    UserServiceClient::new(channel.clone())
        .create_user(pb::CreateUserRequest {
            site_id: site_id.into(),
            email: email.into(),
            display_name: String::new(),
        })
        .await
        .unwrap();
    let passcode = SiteServiceClient::new(channel)
        .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
            site_id: site_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .passcode;
    let agent = TestAgent::new();
    let out = agent.enroll(server, email, &passcode).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent
}

/// About one site in 256 has a tag ending in 0xFF; its site-wide log used
/// to be an empty range (a panic in a debug build).
#[tokio::test]
async fn list_actions_shows_the_actions_of_a_site_whose_tag_ends_in_0xff() {
    let server = TestServer::start().await;
    let channel = server.admin_channel(&server.owner()).await;
    let mut sites = SiteServiceClient::new(channel.clone());
    // Server-made site ids: the chance of none in 3000 is below 1e-5.
    let mut site_id = None;
    for i in 0..3000 {
        let id = create_site(&mut sites, &format!("Site {i}")).await;
        if tag_last_byte(&id) == 0xFF {
            site_id = Some(id);
            break;
        }
    }
    let site_id = site_id.expect("a site whose tag ends in 0xFF");
    let agent = enrolled_agent(&server, &site_id, "ff@example.com").await;
    let device_id = agent.device_id();
    let lock = server
        .devices()
        .await
        .lock_device(pb::LockDeviceRequest {
            device_id: device_id.clone(),
            message: String::new(),
            ttl: None,
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert!(lock.action_id.ends_with("ff"), "{}", lock.action_id);

    let mut log = ActionLogServiceClient::new(channel);
    let site_wide = all_actions(
        &mut log,
        pb::ListActionsRequest {
            site_id: site_id.clone(),
            page_size: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        site_wide.iter().map(|a| &a.action_id).collect::<Vec<_>>(),
        vec![&lock.action_id],
        "the site-wide log of site {site_id}"
    );
    let by_device = all_actions(
        &mut log,
        pb::ListActionsRequest {
            device_id,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(by_device.len(), 1);
}

/// Notification ids of the site, in every state.
async fn notification_ids(log: &mut ActionLogServiceClient<Channel>, site_id: &str) -> Vec<String> {
    log.list_notifications(pb::ListNotificationsRequest {
        site_id: site_id.into(),
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .notifications
    .into_iter()
    .map(|n| n.notification_id)
    .collect()
}

fn eml_files(data_dir: &Path) -> usize {
    let dir = data_dir.join("outbox/mail");
    if dir.exists() {
        files_under(&dir).len()
    } else {
        0
    }
}

#[tokio::test]
async fn a_reset_with_an_invalid_ttl_stores_nothing() {
    let server = TestServer::start().await;
    let channel = server.admin_channel(&server.owner()).await;
    let site_id = create_site(&mut SiteServiceClient::new(channel.clone()), "Reset").await;
    let agent = enrolled_agent(&server, &site_id, "ttl@example.com").await;
    let device_id = agent.device_id();
    let mut devices = server.devices().await;
    let reset = |ttl: Option<prost_types::Duration>| pb::ResetPasscodeRequest {
        device_id: device_id.clone(),
        confirm_user_email: "ttl@example.com".into(),
        notify_user: true,
        message: String::new(),
        ttl,
    };
    // A first reset that works, so there is a security section to keep.
    devices.reset_passcode(reset(None)).await.unwrap();
    let mut log = ActionLogServiceClient::new(channel);
    let notifications = notification_ids(&mut log, &site_id).await;
    assert_eq!(notifications.len(), 2, "the admin and the user");
    eventually("both emails are written", || async {
        (eml_files(&server.data_dir) == 2).then_some(())
    })
    .await;
    let security = || async {
        server
            .get_device(&device_id)
            .await
            .device
            .unwrap()
            .security
            .unwrap()
    };
    let before = security().await;
    assert!(!before.latest_reset_passcode.is_empty());
    let action_log = log.clone();
    let actions = || {
        let mut log = action_log.clone();
        let device_id = device_id.clone();
        async move {
            all_actions(
                &mut log,
                pb::ListActionsRequest {
                    device_id,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };
    let actions_before = actions().await;

    for (seconds, why) in [(0, "zero"), (31 * 86_400, "over 30 days")] {
        let status = devices
            .reset_passcode(reset(Some(prost_types::Duration { seconds, nanos: 0 })))
            .await
            .expect_err(why);
        assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
        assert!(status.message().contains("ttl"), "{}", status.message());
    }

    assert_eq!(notification_ids(&mut log, &site_id).await, notifications);
    assert_eq!(
        security().await,
        before,
        "the security section is unchanged"
    );
    assert_eq!(actions().await, actions_before, "no action was added");
    assert_eq!(eml_files(&server.data_dir), 2, "no email was written");
}

/// Every file under the data dir is 0600 and every directory 0700, the
/// database's included, after a first start and some writes.
#[cfg(unix)]
#[tokio::test]
async fn every_file_of_the_data_dir_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start().await;
    let channel = server.admin_channel(&server.owner()).await;
    let site_id = create_site(&mut SiteServiceClient::new(channel.clone()), "Modes").await;
    let agent = enrolled_agent(&server, &site_id, "modes@example.com").await;
    server
        .devices()
        .await
        .reset_passcode(pb::ResetPasscodeRequest {
            device_id: agent.device_id(),
            confirm_user_email: "modes@example.com".into(),
            notify_user: false,
            message: String::new(),
            ttl: None,
        })
        .await
        .unwrap();
    eventually("the reset email is written", || async {
        (eml_files(&server.data_dir) == 1).then_some(())
    })
    .await;
    let (data_dir, _temp) = server.stop().await;

    fn walk(path: &Path, wrong: &mut Vec<String>, seen: &mut usize) {
        let metadata = std::fs::symlink_metadata(path).unwrap();
        let mode = metadata.permissions().mode() & 0o777;
        let wanted = if metadata.is_dir() { 0o700 } else { 0o600 };
        *seen += 1;
        if mode != wanted {
            wrong.push(format!("{} is {mode:o}", path.display()));
        }
        if metadata.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                walk(&entry.unwrap().path(), wrong, seen);
            }
        }
    }
    let (mut wrong, mut seen) = (Vec::new(), 0);
    walk(&data_dir, &mut wrong, &mut seen);
    assert!(data_dir.join("db/db").exists() && data_dir.join("db/conf").exists());
    assert!(seen > 10, "walked {seen} entries");
    assert!(wrong.is_empty(), "not owner-only: {wrong:#?}");
}

fn csv_of(emails: impl IntoIterator<Item = String>) -> String {
    let mut csv = String::from("email,display_name\n");
    for email in emails {
        csv.push_str(&email);
        csv.push_str(",\n");
    }
    csv
}

async fn user_emails(users: &mut UserServiceClient<Channel>, site_id: &str) -> Vec<String> {
    let mut emails = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = users
            .list_users(pb::ListUsersRequest {
                site_id: site_id.into(),
                page_size: 1000,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        emails.extend(page.users.into_iter().map(|u| u.email));
        if page.next_page_token.is_empty() {
            return emails;
        }
        page_token = page.next_page_token;
    }
}

/// A site admin cannot grow a site past the server's per-site user limit;
/// a call over it is RESOURCE_EXHAUSTED and stores none of its rows.
#[tokio::test]
async fn imports_and_users_over_the_per_site_limit_store_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let mut config = mdm_server::Config::for_data_dir(temp.path().join("data"));
    config.max_users_per_site = 5;
    let server = TestServer::start_with(config).await.unwrap();
    let site_id = create_site(
        &mut SiteServiceClient::new(server.admin_channel(&server.owner()).await),
        "Quota",
    )
    .await;
    let admin = server.add_admin(
        "siteadmin@example.com",
        mdm_server::admins::Role::SiteAdmin,
        &[&site_id],
    );
    let mut users = UserServiceClient::new(server.admin_channel(&admin).await);
    let import = |csv: String| pb::ImportUsersRequest {
        site_id: site_id.clone(),
        csv,
    };

    let six = csv_of((0..6).map(|i| format!("a{i}@example.com")));
    let status = users.import_users(import(six)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("at most 5") && status.message().contains("nothing was stored"),
        "{}",
        status.message()
    );
    assert!(user_emails(&mut users, &site_id).await.is_empty());

    let report = users
        .import_users(import(csv_of((0..3).map(|i| format!("b{i}@example.com")))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.imported, 3);
    let status = users
        .import_users(import(csv_of((0..3).map(|i| format!("c{i}@example.com")))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(user_emails(&mut users, &site_id).await.len(), 3);

    for i in 0..3 {
        let result = users
            .create_user(pb::CreateUserRequest {
                site_id: site_id.clone(),
                email: format!("d{i}@example.com"),
                display_name: String::new(),
            })
            .await;
        if i < 2 {
            result.unwrap();
        } else {
            assert_eq!(result.unwrap_err().code(), Code::ResourceExhausted);
        }
    }
    let mut stored = user_emails(&mut users, &site_id).await;
    stored.sort();
    assert_eq!(
        stored,
        [
            "b0@example.com",
            "b1@example.com",
            "b2@example.com",
            "d0@example.com",
            "d1@example.com"
        ]
    );
}

/// A 50,000-row import runs off the runtime's worker: a GetSite sent on
/// the same server meanwhile answers long before the import is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_large_import_does_not_stall_other_calls() {
    let server = TestServer::start().await;
    let channel = server.admin_channel(&server.owner()).await;
    let mut sites = SiteServiceClient::new(channel.clone());
    let site_id = create_site(&mut sites, "Big import").await;
    let csv = csv_of((0..50_000).map(|i| format!("u{i:05}@x.io")));
    let mut users = UserServiceClient::new(channel.clone());
    let import_site = site_id.clone();
    let started = Instant::now();
    let import = tokio::spawn(async move {
        let report = users
            .import_users(pb::ImportUsersRequest {
                site_id: import_site,
                csv,
            })
            .await
            .unwrap()
            .into_inner();
        (report, started.elapsed())
    });
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while !import.is_finished() {
        let sent = Instant::now();
        sites
            .get_site(pb::GetSiteRequest {
                site_id: site_id.clone(),
            })
            .await
            .unwrap();
        slowest = slowest.max(sent.elapsed());
        answered += 1;
    }
    let (report, took) = import.await.unwrap();
    assert_eq!(report.imported, 50_000, "{:?}", report.errors.first());
    // A GetSite waiting for the import would take about as long as it.
    assert!(
        answered >= 5 && slowest < took / 4,
        "{answered} GetSite calls during a {took:?} import, the slowest took {slowest:?}"
    );
    assert_eq!(
        user_emails(&mut UserServiceClient::new(channel), &site_id)
            .await
            .len(),
        50_000
    );
}

/// A small tmpfs of our own, unmounted when dropped.
struct Tmpfs {
    path: std::path::PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    /// None when this machine does not let us mount (not root, or in a
    /// container without the right); CI must be able to.
    fn mount(size: &str) -> Option<Self> {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Self {
                path,
                _parent: parent,
            }),
            other => {
                let why = match other {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                    Err(error) => error.to_string(),
                };
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI must be able to mount a small tmpfs for the full-disk test: {why}"
                );
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here ({why}); the full-disk test needs root"
                );
                None
            }
        }
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in [1 << 20, 4096, 1] {
            let bytes = vec![0xA5u8; chunk];
            while file.write_all(&bytes).is_ok() {}
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// A full disk in the middle of an import fails the import whole, and once
/// space is freed the server opens its data dir again with every user it
/// had before and none of the import's.
#[tokio::test]
async fn a_full_disk_fails_an_import_whole_and_the_data_dir_opens_again() {
    let Some(disk) = Tmpfs::mount("64m") else {
        return;
    };
    let data_dir = disk.path.join("data");
    let port = mdm_tests::free_port();
    let process = mdm_tests::ServerProcess::start(&data_dir, port).await;
    let server = TestServer::attach(port, &data_dir);
    let channel = server.admin_channel(&server.owner()).await;
    let site_id = create_site(&mut SiteServiceClient::new(channel.clone()), "Full disk").await;
    let mut users = UserServiceClient::new(channel);
    let before = csv_of((0..100).map(|i| format!("kept{i}@example.com")));
    let report = users
        .import_users(pb::ImportUsersRequest {
            site_id: site_id.clone(),
            csv: before,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.imported, 100);

    let filler = disk.fill();
    let import = csv_of((0..10_000).map(|i| format!("lost{i:05}@x.io")));
    let status = users
        .import_users(pb::ImportUsersRequest {
            site_id: site_id.clone(),
            csv: import.clone(),
        })
        .await
        .expect_err("the disk is full");
    assert!(
        status.message().contains("disk") || status.message().contains("space"),
        "{status:?}"
    );
    // Still running: the import's rows are not visible (or sled refuses reads too).
    let listed = users
        .list_users(pb::ListUsersRequest {
            site_id: site_id.clone(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await;
    match listed {
        Ok(page) => assert!(
            page.get_ref()
                .users
                .iter()
                .all(|u| u.email.starts_with("kept")),
            "{} users",
            page.get_ref().users.len()
        ),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    process.kill().await;

    // Started again before space is freed, it cannot open its database (sled
    // writes a snapshot when it opens) and says so; what that attempt leaves
    // must not stop the start after.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(mdm_tests::server_bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(&data_dir)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("a server on a full disk exits")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("space"), "{stderr}");

    std::fs::remove_file(filler).unwrap();
    let reopened = mdm_store_sled::Storage::open(&data_dir.join("db"));
    assert!(reopened.is_ok(), "the database opens again: {reopened:?}");
    drop(reopened);
    let process = mdm_tests::ServerProcess::start(&data_dir, port).await;
    let channel = server.admin_channel(&server.owner()).await;
    let mut users = UserServiceClient::new(channel);
    let mut emails = user_emails(&mut users, &site_id).await;
    emails.sort();
    let mut kept: Vec<String> = (0..100).map(|i| format!("kept{i}@example.com")).collect();
    kept.sort();
    assert_eq!(
        emails, kept,
        "the users from before, none of the failed import"
    );
    // The same import goes in now.
    let report = users
        .import_users(pb::ImportUsersRequest {
            site_id: site_id.clone(),
            csv: import,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.imported, 10_000);
    process.kill().await;
}

/// Changes of different settings of one site, made at the same time, all
/// stay: none reads the site before another's write and puts back the old
/// value (a webhook removed and then restored by a rename, say).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_of_one_site_do_not_undo_each_other() {
    let server = TestServer::start().await;
    let channel = server.admin_channel(&server.owner()).await;
    let mut sites = SiteServiceClient::new(channel.clone());
    let site_id = create_site(&mut sites, "Round 0").await;
    for round in 1..=40u32 {
        let url = format!("https://hooks.example.com/hook-{round}");
        let (mut a, mut b, mut c) = (sites.clone(), sites.clone(), sites.clone());
        let rename = a.update_site(pb::UpdateSiteRequest {
            site_id: site_id.clone(),
            display_name: Some(format!("Round {round}")),
            ..Default::default()
        });
        let webhook = b.set_webhook(pb::SetWebhookRequest {
            site_id: site_id.clone(),
            url: url.clone(),
        });
        let policy = c.set_passcode_policy(pb::SetPasscodePolicyRequest {
            site_id: site_id.clone(),
            policy: Some(pb::PasscodePolicy {
                min_length: 4 + round,
                complexity: pb::PasscodeComplexity::Numeric.into(),
                ..Default::default()
            }),
        });
        let (renamed, hooked, policed) = tokio::join!(rename, webhook, policy);
        renamed.unwrap();
        hooked.unwrap();
        policed.unwrap();
        let site = sites
            .get_site(pb::GetSiteRequest {
                site_id: site_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .site
            .unwrap();
        let min_length = sites
            .get_passcode_policy(pb::GetPasscodePolicyRequest {
                site_id: site_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .policy
            .unwrap()
            .min_length;
        assert_eq!(
            (
                site.display_name.as_str(),
                site.webhook_url.as_str(),
                min_length
            ),
            (format!("Round {round}").as_str(), url.as_str(), 4 + round),
            "round {round}"
        );
    }
}
