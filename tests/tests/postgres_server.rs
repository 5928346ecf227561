//! The server on PostgreSQL: a sled deployment migrated into it keeps its
//! agents; an outage answers UNAVAILABLE and heals by itself; a database
//! down at start is waited for; a bad URL is a usage error.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mdm_proto::v1 as pb;
use mdm_tests::{
    PrivatePostgres, ServerProcess, TestAgent, TestServer, eventually, free_port, server_bin,
    site_with_passcode,
};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::device_service_client::DeviceServiceClient;
use pb::site_service_client::SiteServiceClient;

async fn lock_and_wait(server: &TestServer, device_id: &str) -> String {
    let channel = server.admin_channel(&server.owner()).await;
    let action = DeviceServiceClient::new(channel.clone())
        .lock_device(pb::LockDeviceRequest {
            device_id: device_id.into(),
            message: "migrated".into(),
            ttl: None,
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    wait_succeeded(server, &action.action_id).await;
    action.action_id
}

async fn wait_succeeded(server: &TestServer, action_id: &str) {
    let log = ActionLogServiceClient::new(server.admin_channel(&server.owner()).await);
    eventually(&format!("action {action_id} succeeds"), || {
        let (mut log, action_id) = (log.clone(), action_id.to_owned());
        async move {
            let action = log
                .get_action(pb::GetActionRequest { action_id })
                .await
                .ok()?
                .into_inner()
                .action?;
            (action.status() == pb::ActionStatus::Succeeded).then_some(())
        }
    })
    .await;
}

async fn wait_online(server: &TestServer, device_id: &str) {
    eventually("the agent is online", || {
        let device_id = device_id.to_owned();
        async move {
            let device = server.get_device(&device_id).await.device?;
            device.online.then_some(())
        }
    })
    .await;
}

fn migrate(data_dir: &std::path::Path, url: &str) -> std::process::Output {
    std::process::Command::new(server_bin())
        .arg("migrate")
        .arg("--from-data-dir")
        .arg(data_dir)
        .env("MDM_DATABASE_URL", url)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_deployment_migrated_to_postgresql_keeps_its_agents_and_its_log() {
    let Some(base) = mdm_tests::test_database_url() else {
        return;
    };
    if mdm_tests::on_postgres() {
        return; // starts on sled on purpose; its second pass adds nothing
    }
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let port = free_port();
    let process = ServerProcess::start_on(&data_dir, port, None).await;
    let server = TestServer::attach(port, &data_dir);
    let (_, passcode) = site_with_passcode(&server, "mig@example.com", 0).await;
    let agent = TestAgent::new();
    let enrolled = agent.enroll(&server, "mig@example.com", &passcode).await;
    assert!(enrolled.status.success(), "{enrolled:?}");
    let device_id = agent.device_id();
    let mut child = agent.run();
    wait_online(&server, &device_id).await;
    let on_sled = lock_and_wait(&server, &device_id).await;
    child.kill().await.unwrap();
    // Reports are durable within sled's flush interval.
    tokio::time::sleep(Duration::from_secs(1)).await;
    process.kill().await;

    let url = mdm_tests::create_database(&base, &format!("mdm_migrated_{port}")).await;
    let migrated = migrate(&data_dir, &url);
    let stdout = String::from_utf8_lossy(&migrated.stdout);
    assert!(
        migrated.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    assert!(
        stdout.contains("1 devices") || stdout.contains("1 device"),
        "{stdout}"
    );

    // The copy left in the data dir is not served by mistake.
    let marker = std::fs::read_to_string(data_dir.join("MIGRATED-TO-POSTGRESQL")).unwrap();
    assert!(marker.contains("--database-url"), "{marker}");
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(user, _)| user.split_once(':'))
        .map(|(_, password)| password.to_owned());
    if let Some(password) = &password {
        assert!(!marker.contains(password.as_str()), "{marker}");
    }
    let on_stale_copy = tokio::process::Command::new(server_bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&data_dir)
        .env_remove("MDM_DATABASE_URL")
        .kill_on_drop(true)
        .output();
    let on_stale_copy = tokio::time::timeout(Duration::from_secs(20), on_stale_copy)
        .await
        .expect("a server on a migrated data dir without a database URL refuses to start")
        .unwrap();
    assert_eq!(on_stale_copy.status.code(), Some(64), "{on_stale_copy:?}");
    let stderr = String::from_utf8_lossy(&on_stale_copy.stderr);
    assert!(
        stderr.contains("MIGRATED-TO-POSTGRESQL") && stderr.contains("--database-url"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let _process = ServerProcess::start_on(&data_dir, port, Some(url.clone())).await;
    let mut child = agent.run();
    wait_online(&server, &device_id).await;
    wait_succeeded(&server, &on_sled).await;
    let on_postgres = lock_and_wait(&server, &device_id).await;
    assert_ne!(on_sled, on_postgres);
    child.kill().await.unwrap();

    let again = migrate(&data_dir, &url);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("not empty"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

async fn create_site(server: &TestServer, name: &str) -> Result<pb::Site, tonic::Status> {
    let mut sites = SiteServiceClient::new(server.admin_channel(&server.owner()).await);
    sites
        .create_site(pb::CreateSiteRequest {
            display_name: name.into(),
            failed_attempt_limit: 0,
        })
        .await
        .map(|response| response.into_inner().site.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgresql_is_stopped_calls_answer_unavailable_and_the_server_recovers_by_itself() {
    let Some(postgres) = PrivatePostgres::start() else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let mut config = mdm_server::Config::for_data_dir(temp.path().join("data"));
    config.database = Some(mdm_server::PgConfig::new(postgres.url()));
    let server = TestServer::start_with(config).await.unwrap();
    let before = create_site(&server, "Before").await.unwrap();

    postgres.stop();
    let refused = create_site(&server, "During").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("database"), "{refused:?}");

    postgres.resume();
    let after = eventually("the server reaches the database again", || async {
        create_site(&server, "After").await.ok()
    })
    .await;
    let mut sites = SiteServiceClient::new(server.admin_channel(&server.owner()).await);
    let listed = sites
        .list_sites(pb::ListSitesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sites;
    let names: Vec<&str> = listed.iter().map(|s| s.display_name.as_str()).collect();
    assert_eq!(names.len(), 2, "the refused call stored nothing: {names:?}");
    assert!(listed.iter().any(|s| s.site_id == before.site_id));
    assert!(listed.iter().any(|s| s.site_id == after.site_id));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_at_start_is_waited_for_and_a_bad_url_is_a_usage_error() {
    let Some(postgres) = PrivatePostgres::start() else {
        return;
    };
    let bad = std::process::Command::new(server_bin())
        .args(["serve", "--database-url", "mysql://db.example.com/mdm"])
        .arg("--data-dir")
        .arg(tempfile::tempdir().unwrap().path().join("data"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("postgres://"), "{stderr}");

    let in_argv = std::process::Command::new(server_bin())
        .args([
            "serve",
            "--database-url",
            "postgres://mdm:hunter2@127.0.0.1/mdm",
        ])
        .output()
        .unwrap();
    assert_eq!(in_argv.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&in_argv.stderr);
    assert!(stderr.contains("MDM_DATABASE_PASSWORD"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    postgres.stop();
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let port = free_port();
    let log = temp.path().join("server.log");
    let mut child = tokio::process::Command::new(server_bin())
        .args(["serve", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(&data_dir)
        .env("MDM_DATABASE_URL", postgres.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("the server says it waits for the database", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("not reachable; retrying").then_some(())
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "it keeps waiting");
    postgres.resume();
    let server = TestServer::attach(port, &data_dir);
    eventually("the server serves once the database is up", || async {
        create_site(&server, "Late").await.ok()
    })
    .await;
    child.kill().await.unwrap();
}
