//! Issue #17, items 5, 6 and 11c: webhooks cannot reach internal networks
//! (at SetWebhook and, after DNS, at delivery; no redirects; failures say
//! nothing about ports), one site's hanging webhook does not hold up
//! another site's mail, and a `{passcode}` in device text is not filled.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mdm_server::destination::Unreachable;
use mdm_tests::{
    TestServer, eventually, eventually_within, files_under, free_port, header, pb,
    site_with_passcode,
};
use pb::action_log_service_client::ActionLogServiceClient;
use pb::device_service_client::DeviceServiceClient;
use pb::enrollment_service_client::EnrollmentServiceClient;
use pb::site_service_client::SiteServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FLAG: &str = "--webhook-allow-private-networks";

fn config() -> mdm_server::Config {
    mdm_server::Config::for_data_dir(tempfile::tempdir().unwrap().keep().join("data"))
}

fn lab_config() -> mdm_server::Config {
    let mut config = config();
    config.webhook_allow_private_networks = true;
    config
}

async fn sites(server: &TestServer) -> SiteServiceClient<tonic::transport::Channel> {
    SiteServiceClient::new(server.admin_channel(&server.owner()).await)
}

async fn set_webhook(server: &TestServer, site_id: &str, url: &str) -> Result<(), tonic::Status> {
    sites(server)
        .await
        .set_webhook(pb::SetWebhookRequest {
            site_id: site_id.into(),
            url: url.into(),
        })
        .await
        .map(|_| ())
}

/// Enrolls a device with the given host name (its facts are what the
/// agent would report) and returns its id.
async fn enroll_device(server: &TestServer, email: &str, passcode: &str, hostname: &str) -> String {
    let (_, csr) = mdm_agent::enroll::key_and_csr("x").unwrap();
    EnrollmentServiceClient::new(server.channel(None).await)
        .enroll(pb::EnrollRequest {
            user_email: email.into(),
            company_passcode: passcode.into(),
            csr_pem: csr,
            device: Some(pb::DeviceFacts {
                platform: pb::Platform::Linux.into(),
                serial_number: format!("SERIAL-{hostname}-{email}"),
                hostname: hostname.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .device_id
}

async fn reset(server: &TestServer, device_id: &str, email: &str) -> String {
    DeviceServiceClient::new(server.admin_channel(&server.owner()).await)
        .reset_passcode(pb::ResetPasscodeRequest {
            device_id: device_id.into(),
            confirm_user_email: email.into(),
            notify_user: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .passcode
}

async fn webhook_notifications(server: &TestServer, site_id: &str) -> Vec<pb::Notification> {
    ActionLogServiceClient::new(server.admin_channel(&server.owner()).await)
        .list_notifications(pb::ListNotificationsRequest {
            site_id: site_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .notifications
        .into_iter()
        .filter(|n| n.channel == "webhook")
        .collect()
}

/// The error of the site's webhook notification once an attempt failed.
async fn first_webhook_error(server: &TestServer, site_id: &str) -> String {
    eventually("a webhook attempt has failed", || async move {
        webhook_notifications(server, site_id)
            .await
            .into_iter()
            .find(|n| n.attempts >= 1)
            .map(|n| {
                assert_eq!(n.state(), pb::NotificationState::Pending, "retried");
                n.last_error
            })
    })
    .await
}

/// A TCP listener on loopback that does `behaviour` with every connection
/// and counts them.
async fn listener<F, Fut>(behaviour: F) -> (u16, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(behaviour(socket));
        }
    });
    (port, accepted)
}

/// Reads one request's head and answers `response`.
async fn answer(mut socket: tokio::net::TcpStream, response: &'static [u8]) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = socket.write_all(response).await;
    let _ = socket.shutdown().await;
}

#[tokio::test]
async fn set_webhook_refuses_internal_hosts_naming_the_rule_and_the_flag() {
    let server = TestServer::start().await;
    let (site_id, _) = site_with_passcode(&server, "ann@example.com", 0).await;
    let port = free_port();
    for url in [
        format!("http://127.0.0.1:{port}/hook"),
        format!("https://127.0.0.2:{port}/hook"),
        "https://localhost/hook".into(),
        "https://api.localhost./hook".into(),
        "https://[::1]/hook".into(),
        "https://10.1.2.3/hook".into(),
        "https://172.16.0.1/hook".into(),
        "https://192.168.1.1/hook".into(),
        "https://169.254.169.254/latest/meta-data/".into(),
        "https://100.64.0.1/hook".into(),
        "https://0.0.0.0/hook".into(),
        "https://[::]/hook".into(),
        "https://224.0.0.1/hook".into(),
        "https://[ff02::1]/hook".into(),
        "https://[fe80::1]/hook".into(),
        "https://[fc00::1]/hook".into(),
        "https://[::ffff:10.0.0.1]/hook".into(),
        "https://[64:ff9b::a00:1]/hook".into(),
    ] {
        let status = set_webhook(&server, &site_id, &url).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(
            status.message().contains("internal networks") && status.message().contains(FLAG),
            "{url}: {}",
            status.message()
        );
    }
    // What an admin's script sees through grpcurl.
    let request =
        format!(r#"{{"siteId": "{site_id}", "url": "https://169.254.169.254/latest/meta-data/"}}"#);
    let out = server
        .grpcurl(
            Some(&server.owner()),
            &["-d", &request, "mdm.v1.SiteService/SetWebhook"],
        )
        .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("InvalidArgument")
            && stderr.contains("link-local")
            && stderr.contains(FLAG),
        "{stderr}"
    );
    // What the C resolver would read as 127.0.0.1.
    for url in ["https://2130706433/hook", "https://127.1/hook"] {
        let status = set_webhook(&server, &site_id, url).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{url}");
    }
    // Nothing was stored.
    let site = sites(&server)
        .await
        .get_site(pb::GetSiteRequest {
            site_id: site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .site
        .unwrap();
    assert_eq!(site.webhook_url, "");
    // Public destinations are fine.
    set_webhook(&server, &site_id, "https://hooks.example.com/mdm")
        .await
        .unwrap();

    // The operator's flag lifts the rule.
    let lab = TestServer::start_with(lab_config()).await.unwrap();
    let (lab_site, _) = site_with_passcode(&lab, "ann@example.com", 0).await;
    set_webhook(&lab, &lab_site, &format!("http://127.0.0.1:{port}/hook"))
        .await
        .unwrap();
    set_webhook(&lab, &lab_site, "https://10.1.2.3/hook")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_name_resolving_to_an_internal_address_is_refused_at_delivery_without_connecting() {
    let (port, accepted) = listener(|socket| async move { drop(socket) }).await;
    let mut config = config();
    // A public-looking name whose DNS answer is loopback (DNS rebinding).
    config.webhook_hosts.insert(
        "hooks.rebind.example".into(),
        vec!["127.0.0.1".parse().unwrap()],
    );
    let server = TestServer::start_with(config).await.unwrap();
    let (site_id, _) = site_with_passcode(&server, "bob@example.com", 1).await;
    set_webhook(
        &server,
        &site_id,
        &format!("https://hooks.rebind.example:{port}/hook"),
    )
    .await
    .unwrap();

    mdm_tests::wrong_passcode(&server, "bob@example.com").await;
    let error = first_webhook_error(&server, &site_id).await;
    assert_eq!(error, Unreachable::GENERIC);
    assert!(!error.contains(&port.to_string()) && !error.contains("127.0.0.1"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no connection attempted"
    );
}

#[tokio::test]
async fn a_failed_delivery_says_nothing_about_ports_or_services() {
    let server = TestServer::start_with(lab_config()).await.unwrap();
    let closed = free_port();
    let (dropping, _) = listener(|socket| async move { drop(socket) }).await;
    let (ssh, _) = listener(|mut socket| async move {
        let _ = socket.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        let _ = socket.shutdown().await;
    })
    .await;
    let mut errors = Vec::new();
    for (i, port) in [closed, dropping, ssh].into_iter().enumerate() {
        let email = format!("carl{i}@example.com");
        let (site_id, _) = site_with_passcode(&server, &email, 1).await;
        set_webhook(&server, &site_id, &format!("http://127.0.0.1:{port}/hook"))
            .await
            .unwrap();
        mdm_tests::wrong_passcode(&server, &email).await;
        errors.push((port, first_webhook_error(&server, &site_id).await));
    }
    for (port, error) in &errors {
        assert_eq!(error, Unreachable::GENERIC, "port {port}");
        assert!(!error.contains(&port.to_string()), "{error}");
    }
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let server = TestServer::start_with(lab_config()).await.unwrap();
    let (target, target_hits) =
        listener(|socket| answer(socket, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")).await;
    let redirect: &'static [u8] = format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{target}/elsewhere\r\ncontent-length: 0\r\n\r\n"
    )
    .into_bytes()
    .leak();
    let (port, hits) = listener(move |socket| answer(socket, redirect)).await;
    let (site_id, _) = site_with_passcode(&server, "dora@example.com", 1).await;
    set_webhook(&server, &site_id, &format!("http://127.0.0.1:{port}/hook"))
        .await
        .unwrap();
    mdm_tests::wrong_passcode(&server, "dora@example.com").await;
    let error = first_webhook_error(&server, &site_id).await;
    assert!(error.contains("redirects are not followed"), "{error}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(target_hits.load(Ordering::SeqCst), 0, "the redirect target");
}

/// The `.eml` files written so far whose text contains `needle`.
fn emails_containing(server: &TestServer, needle: &str) -> Vec<String> {
    let dir = server.data_dir.join("outbox/mail");
    if !dir.exists() {
        return Vec::new();
    }
    files_under(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .filter(|text| text.contains(needle))
        .collect()
}

/// A receiver that accepts and never answers, holding every socket open.
async fn hanging_receiver() -> (u16, Arc<AtomicUsize>) {
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    listener(move |socket| {
        let held = held.clone();
        async move { held.lock().await.push(socket) }
    })
    .await
}

#[tokio::test]
async fn a_hanging_webhook_holds_up_its_own_site_only() {
    let mut config = lab_config();
    config.outbox_retry.attempt_timeout = Duration::from_secs(8);
    config.outbox_retry.first = Duration::from_secs(1);
    let server = TestServer::start_with(config).await.unwrap();

    let (hang_port, hang_accepts) = hanging_receiver().await;
    // Site C has one event for its own hanging receiver.
    let (c_port, c_accepts) = hanging_receiver().await;
    let (site_c, _) = site_with_passcode(&server, "cyd@example.com", 1).await;
    set_webhook(&server, &site_c, &format!("http://127.0.0.1:{c_port}/hook"))
        .await
        .unwrap();
    mdm_tests::wrong_passcode(&server, "cyd@example.com").await;
    let (site_a, passcode_a) = site_with_passcode(&server, "ada@example.com", 0).await;
    let device_a = enroll_device(&server, "ada@example.com", &passcode_a, "ada-desk").await;
    let (_site_b, passcode_b) = site_with_passcode(&server, "ben@example.com", 0).await;
    let device_b = enroll_device(&server, "ben@example.com", &passcode_b, "ben-laptop").await;
    set_webhook(
        &server,
        &site_a,
        &format!("http://127.0.0.1:{hang_port}/hook"),
    )
    .await
    .unwrap();

    // Site A queues several webhook events (each lock, and each superseded one).
    let mut devices = DeviceServiceClient::new(server.admin_channel(&server.owner()).await);
    for _ in 0..3 {
        devices
            .lock_device(pb::LockDeviceRequest {
                device_id: device_a.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(webhook_notifications(&server, &site_a).await.len() >= 3);
    eventually("site A's webhook hangs", || {
        let accepted = hang_accepts.load(Ordering::SeqCst);
        async move { (accepted == 2).then_some(()) }
    })
    .await;

    let started = Instant::now();
    reset(&server, &device_b, "ben@example.com").await;
    eventually_within(
        Duration::from_secs(5),
        "site B's reset email is written while A's webhook hangs",
        &mut || {
            let found = !emails_containing(&server, &device_b).is_empty();
            async move { found.then_some(()) }
        },
    )
    .await;
    let elapsed = started.elapsed();
    println!("site B's reset email took {elapsed:?} while site A's webhook hung");
    let a = webhook_notifications(&server, &site_a).await;
    assert!(
        a.iter().all(|n| n.attempts == 0),
        "A's attempts are in flight"
    );

    // Two more delivery rounds pass: no third delivery to A's receiver (two
    // at a time per site), and none of the hanging ones is started again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        hang_accepts.load(Ordering::SeqCst),
        2,
        "two at a time, each once"
    );
    assert_eq!(c_accepts.load(Ordering::SeqCst), 1, "C's one event, once");

    // The attempts time out, fail with the generic reason and are retried;
    // meanwhile A's other events get their turn.
    let failed = eventually_within(
        Duration::from_secs(20),
        "A's webhook attempts time out",
        &mut || {
            let server = &server;
            let site_a = site_a.clone();
            async move {
                let list = webhook_notifications(server, &site_a).await;
                let failed: Vec<_> = list.into_iter().filter(|n| n.attempts == 1).collect();
                (failed.len() >= 2).then_some(failed)
            }
        },
    )
    .await;
    for n in &failed {
        assert_eq!(n.last_error, Unreachable::GENERIC);
        assert_eq!(n.state(), pb::NotificationState::Pending);
    }
    eventually("A's next attempts reach the receiver", || {
        let accepted = hang_accepts.load(Ordering::SeqCst);
        async move { (accepted >= 4).then_some(()) }
    })
    .await;
}

/// The decoded text/plain part of a raw email (7bit or quoted-printable).
fn plain_part(message: &str) -> String {
    let start = message.find("Content-Type: text/plain").unwrap();
    let part = &message[start..];
    let body_start = part.find("\r\n\r\n").unwrap() + 4;
    let head = &part[..body_start];
    let body = &part[body_start..];
    let body = &body[..body.find("\r\n--").unwrap()];
    if head.contains("quoted-printable") {
        body.replace("=\r\n", "").replace("=3D", "=")
    } else {
        body.to_owned()
    }
}

#[tokio::test]
async fn a_host_name_holding_the_passcode_placeholder_is_not_filled_in() {
    let server = TestServer::start().await;
    let (site_id, passcode) = site_with_passcode(&server, "eve@example.com", 0).await;
    // Long alphanumeric passcodes cannot be mistaken for ids or dates.
    sites(&server)
        .await
        .set_passcode_policy(pb::SetPasscodePolicyRequest {
            site_id,
            policy: Some(pb::PasscodePolicy {
                required: true,
                min_length: 16,
                complexity: pb::PasscodeComplexity::Alphanumeric.into(),
                max_age_days: 0,
            }),
        })
        .await
        .unwrap();
    let device = enroll_device(&server, "eve@example.com", &passcode, "x{passcode}y").await;
    let new_passcode = reset(&server, &device, "eve@example.com").await;

    let message = eventually("the reset email is written", || {
        let mut found = emails_containing(&server, &device);
        async move { found.pop() }
    })
    .await;
    let subject = header(&message, "Subject").unwrap();
    assert!(!subject.contains(&new_passcode), "{subject}");
    assert!(subject.contains("x{passcode}y"), "{subject}");
    let text = plain_part(&message);
    assert_eq!(text.matches(new_passcode.as_str()).count(), 1, "{text}");
    assert!(text.contains("The new passcode is: "), "{text}");
    assert!(text.contains("device x{passcode}y ("), "{text}");
    assert_eq!(
        message.matches(new_passcode.as_str()).count(),
        2,
        "plain and html parts"
    );
}
