//! The durable outbox against a real SMTP server on loopback, and the
//! `.eml` fallback of a fresh install.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mdm_server::admins::Role;
use mdm_tests::{
    SmtpServer, TestAgent, TestServer, eventually, eventually_within, free_port, header, pb,
    site_with_passcode,
};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::device_service_client::DeviceServiceClient;

fn config(smtp: Option<&SmtpServer>) -> mdm_server::Config {
    let mut config =
        mdm_server::Config::for_data_dir(tempfile::tempdir().unwrap().keep().join("data"));
    if let Some(smtp) = smtp {
        smtp.configure(&mut config);
    }
    config
}

async fn notifications(server: &TestServer, site_id: &str) -> Vec<pb::Notification> {
    ActionLogServiceClient::new(server.admin_channel(&server.owner()).await)
        .list_notifications(pb::ListNotificationsRequest {
            site_id: site_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .notifications
}

#[tokio::test]
async fn a_reset_with_notify_user_emails_exactly_the_admin_and_the_user() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start_with(config(Some(&smtp))).await.unwrap();
    let (site_id, passcode) = site_with_passcode(&server, "mia@example.com", 0).await;
    let agent = TestAgent::new();
    assert!(
        agent
            .enroll(&server, "mia@example.com", &passcode)
            .await
            .status
            .success()
    );
    let response = DeviceServiceClient::new(server.admin_channel(&server.owner()).await)
        .reset_passcode(pb::ResetPasscodeRequest {
            device_id: agent.device_id(),
            confirm_user_email: "mia@example.com".into(),
            notify_user: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let messages = eventually("two emails arrive", || {
        let messages = smtp.messages();
        async move { (messages.len() >= 2).then_some(messages) }
    })
    .await;
    assert_eq!(messages.len(), 2);
    let mut to: Vec<&str> = messages.iter().map(|m| header(m, "To").unwrap()).collect();
    to.sort();
    assert_eq!(to, vec!["mia@example.com", "owner@localhost"]);
    for message in &messages {
        assert!(
            message.contains(&response.passcode),
            "the passcode is in the email body"
        );
        assert!(
            !header(message, "Subject")
                .unwrap()
                .contains(&response.passcode),
            "never in the subject"
        );
        assert!(message.contains("text/plain") && message.contains("text/html"));
    }
    eventually("both are marked delivered", || {
        let server = &server;
        let site_id = site_id.clone();
        async move {
            let list = notifications(server, &site_id).await;
            (list.len() == 2
                && list
                    .iter()
                    .all(|n| n.state() == pb::NotificationState::Delivered))
            .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.messages().len(), 2, "exactly two, no duplicates");
}

#[tokio::test]
async fn a_lockout_alert_reaches_every_admin_of_the_site_and_no_one_else() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start_with(config(Some(&smtp))).await.unwrap();
    let (site_id, _) = site_with_passcode(&server, "ned@example.com", 1).await;
    let (other_site, _) = site_with_passcode(&server, "oz@example.com", 1).await;
    server.add_admin("site-admin@example.com", Role::SiteAdmin, &[&site_id]);
    server.add_admin("other-admin@example.com", Role::SiteAdmin, &[&other_site]);

    mdm_tests::wrong_passcode(&server, "ned@example.com").await;
    let messages = eventually("alert emails arrive", || {
        let messages = smtp.messages();
        async move { (messages.len() >= 2).then_some(messages) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.messages().len(), 2);
    let mut to: Vec<&str> = messages.iter().map(|m| header(m, "To").unwrap()).collect();
    to.sort();
    assert_eq!(to, vec!["owner@localhost", "site-admin@example.com"]);
    for message in &messages {
        assert!(
            header(message, "Subject")
                .unwrap()
                .contains("failed-attempt limit exceeded")
        );
        assert!(message.contains("127.0.0.1"), "names the source address");
    }
}

#[tokio::test]
async fn mail_waits_while_the_relay_is_down_and_survives_a_server_restart() {
    let port = free_port();
    let mut config = config(None);
    SmtpServer::configure_port(port, &mut config);
    let data_dir = config.data_dir.clone();
    let server = TestServer::start_with(config.clone()).await.unwrap();
    let (site_id, _) = site_with_passcode(&server, "pat@example.com", 1).await;

    // The relay is down: the alert waits, with the error visible.
    mdm_tests::wrong_passcode(&server, "pat@example.com").await;
    let pending = eventually("a failed attempt is recorded", || {
        let server = &server;
        let site_id = site_id.clone();
        async move {
            let list = notifications(server, &site_id).await;
            list.into_iter()
                .find(|n| n.attempts >= 1 && !n.last_error.is_empty())
        }
    })
    .await;
    assert_eq!(pending.state(), pb::NotificationState::Pending);

    // It comes up: the retry delivers.
    let mut smtp = SmtpServer::start_on(port).await;
    eventually_within(Duration::from_secs(20), "the retry delivers", &mut || {
        let count = smtp.messages().len();
        async move { (count == 1).then_some(()) }
    })
    .await;

    // Down again; a second alert waits; the server restarts; then it is delivered.
    smtp.stop().await;
    let (second_site, _) = site_with_passcode(&server, "quinn@example.com", 1).await;
    mdm_tests::wrong_passcode(&server, "quinn@example.com").await;
    eventually("the second alert is pending", || {
        let server = &server;
        let second_site = second_site.clone();
        async move {
            let list = notifications(server, &second_site).await;
            list.into_iter()
                .find(|n| n.attempts >= 1 && n.state() == pb::NotificationState::Pending)
        }
    })
    .await;
    let (_, _temp) = server.stop().await;
    let smtp = SmtpServer::start_on(port).await;
    let mut config = config;
    config.data_dir = data_dir;
    let _server = TestServer::start_with(config).await.unwrap();
    eventually_within(
        Duration::from_secs(20),
        "the pending alert goes out after the restart",
        &mut || {
            let count = smtp.messages().len();
            async move { (count == 1).then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn without_a_relay_emails_are_written_as_eml_files() {
    let server = TestServer::start().await;
    let (site_id, _) = site_with_passcode(&server, "rex@example.com", 1).await;
    mdm_tests::wrong_passcode(&server, "rex@example.com").await;
    let dir = server.data_dir.join("outbox/mail");
    let file = eventually("an .eml file is written", || {
        let dir = dir.clone();
        async move {
            std::fs::read_dir(&dir)
                .ok()?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "eml"))
        }
    })
    .await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(header(&text, "To"), Some("owner@localhost"));
    assert!(header(&text, "Subject").unwrap().contains("Security alert"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    eventually("marked delivered", || {
        let server = &server;
        let site_id = site_id.clone();
        async move {
            let list = notifications(server, &site_id).await;
            list.iter()
                .all(|n| n.state() == pb::NotificationState::Delivered)
                .then_some(())
        }
    })
    .await;
}

/// A minimal HTTP receiver on loopback: answers 200 and hands over
/// (signature header, body) of every POST.
async fn webhook_receiver() -> (u16, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buffer).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buffer.len() < end + 4 + length {
                        continue;
                    }
                    let signature = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("x-mdm-signature:")
                                .or_else(|| l.strip_prefix("X-MDM-Signature:"))
                        })
                        .unwrap_or_default()
                        .trim()
                        .to_owned();
                    let body =
                        String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]).into_owned();
                    let _ = tx.send((signature, body));
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    buffer.clear();
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_webhook_receives_signed_alerts_and_action_changes() {
    let server = TestServer::start_allowing_private_webhooks().await;
    let (site_id, _) = site_with_passcode(&server, "sam@example.com", 1).await;
    let mut sites = pb::site_service_client::SiteServiceClient::new(
        server.admin_channel(&server.owner()).await,
    );
    let status = sites
        .set_webhook(pb::SetWebhookRequest {
            site_id: site_id.clone(),
            url: "http://hooks.example.com/x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("https"), "{}", status.message());

    let (port, mut received) = webhook_receiver().await;
    let set = sites
        .set_webhook(pb::SetWebhookRequest {
            site_id: site_id.clone(),
            url: format!("http://127.0.0.1:{port}/hook"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.secret.len(), 64);

    mdm_tests::wrong_passcode(&server, "sam@example.com").await;
    let (signature, body) = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .unwrap()
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["type"], "alert");
    assert_eq!(event["site_id"], site_id.as_str());
    assert_eq!(event["data"]["failed_attempts"], 1);
    let timestamp: i64 = signature
        .strip_prefix("t=")
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - timestamp).abs() < 60, "fresh timestamp");
    assert_eq!(
        signature,
        mdm_server::webhook::signature(&set.secret, timestamp, body.as_bytes()),
        "valid signature"
    );
    assert_ne!(
        signature,
        mdm_server::webhook::signature("wrong secret", timestamp, body.as_bytes())
    );
}
