//! The command stream, the durable per-device queue and the action log,
//! with real server and agent processes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use mdm_server::admins::Role;
use mdm_tests::{
    ServerProcess, TestAgent, TestServer, code, eventually, eventually_within, free_port, pb,
    site_with_passcode,
};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::device_service_client::DeviceServiceClient;
use tonic::Code;
use tonic::transport::Channel;

struct Admin {
    devices: DeviceServiceClient<Channel>,
    log: ActionLogServiceClient<Channel>,
}

async fn admin(server: &TestServer) -> Admin {
    let channel = server.admin_channel(&server.owner()).await;
    Admin {
        devices: DeviceServiceClient::new(channel.clone()),
        log: ActionLogServiceClient::new(channel),
    }
}

impl Admin {
    async fn lock(&mut self, device_id: &str, ttl: Option<u64>) -> pb::Action {
        self.devices
            .lock_device(pb::LockDeviceRequest {
                device_id: device_id.into(),
                message: "Call IT".into(),
                ttl: ttl.map(|seconds| prost_types::Duration {
                    seconds: seconds as i64,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .action
            .unwrap()
    }

    async fn action(&mut self, action_id: &str) -> pb::Action {
        self.log
            .get_action(pb::GetActionRequest {
                action_id: action_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .action
            .unwrap()
    }

    async fn wait_status(&mut self, action_id: &str, status: pb::ActionStatus) -> pb::Action {
        let log = self.log.clone();
        let id = action_id.to_owned();
        eventually_within(
            Duration::from_secs(20),
            &format!("action {id} becomes {status:?}"),
            &mut || {
                let mut log = log.clone();
                let id = id.clone();
                async move {
                    let action = log
                        .get_action(pb::GetActionRequest { action_id: id })
                        .await
                        .unwrap()
                        .into_inner()
                        .action
                        .unwrap();
                    (action.status() == status).then_some(action)
                }
            },
        )
        .await
    }
}

/// Every status of a command that went out and succeeded, in order.
const DELIVERED_AND_SUCCEEDED: [pb::ActionStatus; 5] = [
    pb::ActionStatus::Pending,
    pb::ActionStatus::Sent,
    pb::ActionStatus::Acknowledged,
    pb::ActionStatus::InProgress,
    pb::ActionStatus::Succeeded,
];

fn statuses(action: &pb::Action) -> Vec<pb::ActionStatus> {
    let mut out: Vec<pb::ActionStatus> = action.timeline.iter().map(|e| e.status()).collect();
    out.dedup();
    out
}

async fn enrolled_agent(server: &TestServer, email: &str) -> (String, TestAgent) {
    let (site_id, passcode) = site_with_passcode(server, email, 0).await;
    let agent = TestAgent::new();
    let out = agent.enroll(server, email, &passcode).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Connect once so the server learns the agent's capabilities, then go offline.
    let mut child = agent.run();
    let device_id = agent.device_id();
    let server_ref = server;
    eventually("the agent connects", || {
        let device_id = device_id.clone();
        async move {
            let device =
                DeviceServiceClient::new(server_ref.admin_channel(&server_ref.owner()).await)
                    .get_device(pb::GetDeviceRequest { device_id })
                    .await
                    .unwrap()
                    .into_inner()
                    .device
                    .unwrap();
            device.online.then_some(())
        }
    })
    .await;
    child.kill().await.unwrap();
    // Offline for the server too, so a test that starts the agent again
    // and waits for it to be online sees the new stream, not the old one.
    eventually("the server sees the agent go", || async {
        let device = server.get_device(&device_id).await.device.unwrap();
        (!device.online).then_some(())
    })
    .await;
    (site_id, agent)
}

#[tokio::test]
async fn a_command_queued_while_offline_is_delivered_on_connect_and_watchers_see_every_step() {
    let server = TestServer::start().await;
    let (site_id, agent) = enrolled_agent(&server, "amy@example.com").await;
    let device_id = agent.device_id();
    let mut admin = admin(&server).await;
    let mut watch = admin
        .log
        .watch_actions(pb::WatchActionsRequest {
            site_id: site_id.clone(),
            device_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    let queued = admin.lock(&device_id, None).await;
    assert_eq!(queued.status(), pb::ActionStatus::Pending);
    assert_eq!(queued.r#type(), pb::ActionType::Lock);
    let week = queued.expires_at.unwrap().seconds - queued.created_at.unwrap().seconds;
    assert!((week - 7 * 86_400).abs() <= 1, "default TTL is 7 days");
    assert!(agent.applied().is_empty());
    let locked =
        |response: pb::GetDeviceResponse| response.device.unwrap().security.unwrap().locked;
    assert!(
        !locked(server.get_device(&device_id).await),
        "a queued lock does not make the device locked"
    );

    let _child = agent.run();
    let done = admin
        .wait_status(&queued.action_id, pb::ActionStatus::Succeeded)
        .await;
    assert_eq!(statuses(&done), DELIVERED_AND_SUCCEEDED);
    assert!(done.timeline.iter().any(|e| e.detail == "device locked"));
    assert!(locked(server.get_device(&device_id).await));
    assert_eq!(agent.applied(), vec![queued.action_id.clone()]);
    assert_eq!(agent.simulated()["lock_message"], "Call IT");

    // The watcher saw each change, in order.
    let mut seen = Vec::new();
    while seen.last() != Some(&pb::ActionStatus::Succeeded) {
        let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let action = next.action.unwrap();
        assert_eq!(action.action_id, queued.action_id);
        seen.push(action.status());
    }
    seen.dedup();
    assert_eq!(seen, statuses(&done));
}

#[tokio::test]
async fn a_command_for_a_live_device_is_recorded_sent_when_queued_and_applied_once() {
    let server = TestServer::start().await;
    let (_, agent) = enrolled_agent(&server, "liv@example.com").await;
    let device_id = agent.device_id();
    let mut admin = admin(&server).await;
    let _child = agent.run();
    eventually("the agent is online again", || {
        let (server, device_id) = (&server, device_id.clone());
        async move {
            let device = server.get_device(&device_id).await.device.unwrap();
            device.online.then_some(())
        }
    })
    .await;

    // Durable as SENT in the write that queued it, before it goes out.
    let first = admin.lock(&device_id, None).await;
    assert_eq!(first.status(), pb::ActionStatus::Sent);
    assert_eq!(
        statuses(&first),
        vec![pb::ActionStatus::Pending, pb::ActionStatus::Sent]
    );
    let second = admin.lock(&device_id, None).await;
    for action in [&first, &second] {
        let done = admin
            .wait_status(&action.action_id, pb::ActionStatus::Succeeded)
            .await;
        assert_eq!(statuses(&done), DELIVERED_AND_SUCCEEDED);
    }
    // In the order they were queued, each once.
    assert_eq!(
        agent.applied(),
        vec![first.action_id.clone(), second.action_id.clone()]
    );
}

#[tokio::test]
async fn an_accepted_command_survives_a_server_sigkill_and_completes_after_restart() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let port = free_port();
    let process = ServerProcess::start(&data_dir, port).await;
    let server = TestServer::attach(port, &data_dir);
    let (_, agent) = enrolled_agent(&server, "ben@example.com").await;
    let device_id = agent.device_id();
    let queued = admin(&server).await.lock(&device_id, None).await;
    // The RPC returned: the command is durable. Kill without any shutdown.
    process.kill().await;

    let _process = ServerProcess::start(&data_dir, port).await;
    let mut admin = admin(&server).await;
    assert_eq!(
        admin.action(&queued.action_id).await.status(),
        pb::ActionStatus::Pending
    );
    let _child = agent.run();
    admin
        .wait_status(&queued.action_id, pb::ActionStatus::Succeeded)
        .await;
    assert_eq!(agent.applied(), vec![queued.action_id]);
}

#[tokio::test]
async fn an_agent_killed_between_applying_and_reporting_reports_after_restart_and_applies_once() {
    let server = TestServer::start().await;
    let (_, agent) = enrolled_agent(&server, "cat@example.com").await;
    let device_id = agent.device_id();
    let mut admin = admin(&server).await;
    let queued = admin.lock(&device_id, None).await;

    let mut dying = agent.command();
    dying
        .args(["run", "--backend", "simulated"])
        .env("MDM_SIMULATED_EXIT_BEFORE_RESULT", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let status = tokio::time::timeout(Duration::from_secs(20), dying.status())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(3), "the fault injection fired");
    assert_eq!(agent.applied(), vec![queued.action_id.clone()]);
    let midway = admin.action(&queued.action_id).await;
    assert!(
        !midway.status().eq(&pb::ActionStatus::Succeeded),
        "{midway:?}"
    );

    let _child = agent.run();
    admin
        .wait_status(&queued.action_id, pb::ActionStatus::Succeeded)
        .await;
    assert_eq!(
        agent.applied(),
        vec![queued.action_id],
        "applied exactly once"
    );
}

#[tokio::test]
async fn expiry_cancel_and_supersede() {
    let server = TestServer::start().await;
    let (site_id, agent) = enrolled_agent(&server, "dot@example.com").await;
    let device_id = agent.device_id();
    let mut admin = admin(&server).await;

    let short = admin.lock(&device_id, Some(1)).await;
    let expired = admin
        .wait_status(&short.action_id, pb::ActionStatus::Expired)
        .await;
    assert_eq!(expired.failure_code(), pb::FailureCode::Expired);

    let first = admin.lock(&device_id, None).await;
    let canceled = admin
        .log
        .cancel_action(pb::CancelActionRequest {
            action_id: first.action_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!(canceled.status(), pb::ActionStatus::Canceled);
    assert!(canceled.failure_reason.contains("owner@localhost"));
    assert_eq!(
        code(
            admin
                .log
                .cancel_action(pb::CancelActionRequest {
                    action_id: first.action_id.clone()
                })
                .await
        ),
        Code::FailedPrecondition
    );

    let older = admin.lock(&device_id, None).await;
    let newer = admin.lock(&device_id, None).await;
    let superseded = admin.action(&older.action_id).await;
    assert_eq!(superseded.status(), pb::ActionStatus::Canceled);
    assert!(
        superseded.failure_reason.starts_with("SUPERSEDED"),
        "{}",
        superseded.failure_reason
    );
    assert!(superseded.timeline.iter().any(|e| e.detail == "SUPERSEDED"));

    let _child = agent.run();
    admin
        .wait_status(&newer.action_id, pb::ActionStatus::Succeeded)
        .await;
    assert_eq!(
        agent.applied(),
        vec![newer.action_id.clone()],
        "only the newest lock is applied"
    );
    assert_eq!(
        code(
            admin
                .log
                .cancel_action(pb::CancelActionRequest {
                    action_id: newer.action_id
                })
                .await
        ),
        Code::FailedPrecondition,
        "a finished action cannot be canceled"
    );

    let by_status = admin
        .log
        .list_actions(pb::ListActionsRequest {
            site_id,
            status: pb::ActionStatus::Canceled.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(by_status.len(), 2);
}

#[tokio::test]
async fn the_action_log_pages_newest_first_and_returns_each_action_once() {
    let server = TestServer::start().await;
    let (site_id, agent) = enrolled_agent(&server, "eve@example.com").await;
    let device_id = agent.device_id();
    let mut admin = admin(&server).await;
    let mut created = Vec::new();
    for _ in 0..23 {
        created.push(admin.lock(&device_id, None).await.action_id);
    }
    created.reverse();
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .log
            .list_actions(pb::ListActionsRequest {
                site_id: site_id.clone(),
                page_size: 7,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.actions.len() <= 7);
        listed.extend(page.actions.into_iter().map(|a| a.action_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, created, "newest first, each exactly once");
    let per_device = admin
        .log
        .list_actions(pb::ListActionsRequest {
            device_id: device_id.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(per_device.len(), 23);
    let status = admin
        .log
        .list_actions(pb::ListActionsRequest {
            site_id,
            page_size: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn commands_for_unknown_foreign_unenrolled_or_incapable_devices_are_refused() {
    let server = TestServer::start().await;
    let (site_id, agent) = enrolled_agent(&server, "fox@example.com").await;
    let device_id = agent.device_id();
    let mut admin = admin(&server).await;
    let lock = |device_id: &str| pb::LockDeviceRequest {
        device_id: device_id.into(),
        ..Default::default()
    };

    assert_eq!(
        code(admin.devices.lock_device(lock("dv_nothere")).await),
        Code::NotFound
    );
    let status = admin
        .devices
        .lock_device(pb::LockDeviceRequest {
            device_id: device_id.clone(),
            ttl: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Another site's admin.
    let (other_site, _) = site_with_passcode(&server, "x@example.com", 0).await;
    let outsider = server.add_admin("outsider@example.com", Role::SiteAdmin, &[&other_site]);
    let mut their = DeviceServiceClient::new(server.admin_channel(&outsider).await);
    assert_eq!(
        code(their.lock_device(lock(&device_id)).await),
        Code::NotFound
    );
    let mut their_log = ActionLogServiceClient::new(server.admin_channel(&outsider).await);
    assert_eq!(
        code(
            their_log
                .list_actions(pb::ListActionsRequest {
                    site_id: site_id.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::PermissionDenied
    );

    // A device whose agent cannot lock: refused up front with the agent's reason.
    let (_, passcode) = site_with_passcode(&server, "sys@example.com", 0).await;
    let system = TestAgent::new();
    assert!(
        system
            .enroll_with(
                &server,
                "sys@example.com",
                &passcode,
                &["--backend", "system"]
            )
            .await
            .status
            .success()
    );
    let status = admin
        .devices
        .lock_device(lock(&system.device_id()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("cannot"), "{}", status.message());

    // Unenrolled.
    admin
        .devices
        .unenroll_device(pb::UnenrollDeviceRequest {
            device_id: device_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        code(admin.devices.lock_device(lock(&device_id)).await),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn out_of_order_agent_messages_are_ignored_and_a_stream_without_hello_is_refused() {
    use pb::agent_service_client::AgentServiceClient;
    use pb::connect_request::Message as Up;
    use pb::connect_response::Message as Down;
    let server = TestServer::start().await;
    let (_, agent) = enrolled_agent(&server, "gil@example.com").await;
    let device_id = agent.device_id();
    let up = |message: Up| pb::ConnectRequest {
        message: Some(message),
    };

    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(up(Up::Heartbeat(pb::Heartbeat::default())))
        .await
        .unwrap();
    let status = AgentServiceClient::new(server.device_channel(&agent).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("hello"), "{}", status.message());

    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(up(Up::Hello(pb::AgentHello::default())))
        .await
        .unwrap();
    let mut down = AgentServiceClient::new(server.device_channel(&agent).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = down.message().await.unwrap().unwrap();
    assert!(matches!(first.message, Some(Down::Hello(_))));
    for message in [
        Up::Result(pb::CommandResult {
            command_id: "01-unknown".into(),
            succeeded: true,
            ..Default::default()
        }),
        Up::Ack(pb::CommandAck {
            command_id: "no-such-command".into(),
        }),
        Up::Hello(pb::AgentHello::default()),
        Up::Progress(pb::CommandProgress {
            command_id: "x".repeat(500),
            step: "?".into(),
        }),
    ] {
        tx.send(up(message)).await.unwrap();
    }
    // Still up: a new command arrives on this very stream.
    let queued = admin(&server).await.lock(&device_id, None).await;
    let command = loop {
        let next = tokio::time::timeout(Duration::from_secs(10), down.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Down::Command(command)) = next.message {
            break command;
        }
    };
    assert_eq!(command.command_id, queued.action_id);
    assert!(
        matches!(command.payload, Some(pb::command::Payload::Lock(ref lock)) if lock.message == "Call IT")
    );
}
