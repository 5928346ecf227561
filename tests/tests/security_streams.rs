//! Security round 2 (#17): revocation reaches what is already open. An
//! unenrolled device loses its stream and connection even when its agent
//! stopped reading; a revoked admin loses its watches; a revoked certificate
//! no longer escapes the per-source connection limit.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mdm_server::admins::Role;
use mdm_tests::{Credential, TestAgent, TestServer, eventually, eventually_within, pb};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::agent_service_client::AgentServiceClient;
use pb::connect_request::Message as Up;
use pb::device_service_client::DeviceServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel with the smallest HTTP/2 windows, so an agent that stops
/// reading backs the server up after a few dozen commands, not thousands.
async fn narrow_channel(server: &TestServer, cert: &str, key: &str) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server.ca_pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(cert, key));
    Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap()
}

async fn device_online(server: &TestServer, device_id: &str) -> (bool, pb::DeviceStatus) {
    let device = server.get_device(device_id).await.device.unwrap();
    (device.online, device.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unenrolled_device_whose_agent_stopped_reading_goes_offline_and_loses_its_connection() {
    let server = TestServer::start().await;
    let (_, passcode) = mdm_tests::site_with_passcode(&server, "ida@example.com", 0).await;
    let agent = TestAgent::new();
    assert!(
        agent
            .enroll(&server, "ida@example.com", &passcode)
            .await
            .status
            .success()
    );
    let device_id = agent.device_id();
    let cert = std::fs::read_to_string(agent.state_dir.join("device.crt")).unwrap();
    let key = std::fs::read_to_string(agent.state_dir.join("device.key")).unwrap();

    // An agent that says hello, takes the server's hello, then reads nothing.
    let (up, rx) = tokio::sync::mpsc::channel(8);
    up.send(pb::ConnectRequest {
        message: Some(Up::Hello(pb::AgentHello::default())),
    })
    .await
    .unwrap();
    let mut down = AgentServiceClient::new(narrow_channel(&server, &cert, &key).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    down.message().await.unwrap().unwrap();
    eventually("the device is online", || async {
        (device_online(&server, &device_id).await.0).then_some(())
    })
    .await;

    // Enough commands to fill every buffer between the server and the agent.
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut devices = DeviceServiceClient::new(server.admin_channel(&server.owner()).await);
    for _ in 0..400 {
        devices
            .lock_device(pb::LockDeviceRequest {
                device_id: device_id.clone(),
                message: "L".repeat(500),
                ttl: None,
            })
            .await
            .unwrap();
    }
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        tasks_after < tasks_before + 32,
        "commands for a stuck stream must not pile up as tasks: {tasks_before} -> {tasks_after}"
    );

    devices
        .unenroll_device(pb::UnenrollDeviceRequest {
            device_id: device_id.clone(),
        })
        .await
        .unwrap();
    eventually("the unenrolled device is offline", || async {
        (device_online(&server, &device_id).await == (false, pb::DeviceStatus::Unenrolled))
            .then_some(())
    })
    .await;

    // The stream ends (its connection is closed) although the agent never
    // read: what it reads now is what was buffered, then the end.
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match down.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the unenrolled device's stream is still open"
    );
}

async fn watches(
    server: &TestServer,
    credential: &Credential,
    site_id: &str,
) -> (
    tonic::Streaming<pb::WatchActionsResponse>,
    tonic::Streaming<pb::WatchAlertsResponse>,
) {
    let mut log = ActionLogServiceClient::new(server.admin_channel(credential).await);
    let actions = log
        .watch_actions(pb::WatchActionsRequest {
            site_id: site_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let alerts = log
        .watch_alerts(pb::WatchAlertsRequest {
            site_id: site_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (actions, alerts)
}

/// The status a watch ends with, waiting at most a few seconds.
async fn end_of<T: std::fmt::Debug>(watch: &mut tonic::Streaming<T>) -> tonic::Status {
    match tokio::time::timeout(Duration::from_secs(5), watch.message()).await {
        Ok(Err(status)) => status,
        Ok(Ok(next)) => panic!("expected the watch to end, got {next:?}"),
        Err(_) => panic!("the watch is still open 5 s after the change"),
    }
}

#[tokio::test]
async fn revoking_an_admin_or_taking_away_its_site_ends_its_open_watches() {
    let server = TestServer::start().await;
    let (site_id, _) = mdm_tests::site_with_passcode(&server, "jo@example.com", 0).await;
    let revoked = server.add_admin("rev@example.com", Role::SiteAdmin, &[&site_id]);
    let narrowed = server.add_admin("nar@example.com", Role::SiteAdmin, &[&site_id]);
    let (mut revoked_actions, mut revoked_alerts) = watches(&server, &revoked, &site_id).await;
    let (mut narrowed_actions, mut narrowed_alerts) = watches(&server, &narrowed, &site_id).await;
    // Open, and quiet: nothing arrives while the admins may still watch.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), revoked_actions.message())
            .await
            .is_err()
    );

    server.revoke_admin("rev@example.com");
    for status in [
        end_of(&mut revoked_actions).await,
        end_of(&mut revoked_alerts).await,
    ] {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("revoked"), "{}", status.message());
    }

    // The registry file is the source of truth: take the site off the record.
    let path = server.data_dir.join("admins.json");
    let mut registry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for admin in registry["admins"].as_array_mut().unwrap() {
        if admin["email"] == "nar@example.com" {
            admin["sites"] = serde_json::json!([]);
        }
    }
    let staged = path.with_extension("json.new");
    std::fs::write(&staged, serde_json::to_vec(&registry).unwrap()).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    for status in [
        end_of(&mut narrowed_actions).await,
        end_of(&mut narrowed_alerts).await,
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
}

/// Whether a call on `channel` goes through (health needs no identity).
async fn answers(channel: &Channel) -> bool {
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_ok()
}

async fn count_answering(channels: &[Channel]) -> usize {
    let mut count = 0;
    for channel in channels {
        count += usize::from(answers(channel).await);
    }
    count
}

async fn connections_as(server: &TestServer, credential: &Credential, n: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..n {
        // A refused connection may fail at connect or at its first call.
        if let Ok(channel) = server
            .try_channel(Some((&credential.cert_pem, &credential.key_pem)))
            .await
        {
            channels.push(channel);
        }
    }
    channels
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_count_against_the_per_source_connection_limit() {
    let temp = tempfile::tempdir().unwrap();
    let mut config = mdm_server::Config::for_data_dir(temp.path().join("data"));
    config.connections_per_source = 3;
    let server = TestServer::start_with(config).await.unwrap();

    // Valid identities are not counted.
    let owner = connections_as(&server, &server.owner(), 6).await;
    assert_eq!(count_answering(&owner).await, 6);

    // A certificate revoked before connecting is counted like none at all.
    let early = server.add_admin("early@example.com", Role::Owner, &[]);
    server.revoke_admin("early@example.com");
    let revoked = connections_as(&server, &early, 6).await;
    assert_eq!(
        count_answering(&revoked).await,
        3,
        "a revoked certificate got past the per-source limit"
    );
    drop(revoked);

    // Connections opened while valid are counted once revoked; those over
    // the limit are closed.
    let late = server.add_admin("late@example.com", Role::Owner, &[]);
    let open = connections_as(&server, &late, 6).await;
    assert_eq!(count_answering(&open).await, 6);
    server.revoke_admin("late@example.com");
    eventually_within(
        Duration::from_secs(20),
        "connections of a revoked admin over the limit are closed",
        &mut || async { (count_answering(&open).await <= 3).then_some(()) },
    )
    .await;
    // The owner's connections were never touched.
    assert_eq!(count_answering(&owner).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_once_its_certificate_is_no_longer_valid() {
    let temp = tempfile::tempdir().unwrap();
    let mut config = mdm_server::Config::for_data_dir(temp.path().join("data"));
    config.heartbeat_interval = Duration::from_millis(500);
    let server = TestServer::start_with(config).await.unwrap();
    let (_, passcode) = mdm_tests::site_with_passcode(&server, "kim@example.com", 0).await;
    let agent = TestAgent::new();
    assert!(
        agent
            .enroll(&server, "kim@example.com", &passcode)
            .await
            .status
            .success()
    );
    let device_id = agent.device_id();
    let channel = server.device_channel(&agent).await;
    let (up, rx) = tokio::sync::mpsc::channel(8);
    up.send(pb::ConnectRequest {
        message: Some(Up::Hello(pb::AgentHello::default())),
    })
    .await
    .unwrap();
    let mut down = AgentServiceClient::new(channel.clone())
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    down.message().await.unwrap().unwrap();

    // Two renewals rotate the stream's certificate out (a device keeps its
    // newest two). The agent keeps sending heartbeats all along.
    for _ in 0..2 {
        let (_, csr) = mdm_agent::enroll::key_and_csr(&device_id).unwrap();
        AgentServiceClient::new(channel.clone())
            .renew_certificate(pb::RenewCertificateRequest { csr_pem: csr })
            .await
            .unwrap();
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let _ = up
                .send(pb::ConnectRequest {
                    message: Some(Up::Heartbeat(pb::Heartbeat::default())),
                })
                .await;
            match tokio::time::timeout(Duration::from_millis(200), down.message()).await {
                Ok(Ok(Some(_))) | Err(_) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a stream outlived its certificate");
    eventually("the device is offline", || async {
        (!device_online(&server, &device_id).await.0).then_some(())
    })
    .await;
}
