//! With every log at TRACE, run the story (passcodes generated, a wrong
//! attempt, an enrollment, a remote reset and its emails) and check that no
//! company passcode, reset passcode or private key reaches the logs, and
//! none is stored in plaintext. Its own test binary: it owns the global
//! tracing subscriber.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use mdm_tests::{TestServer, files_under, pb};
use pb::site_service_client::SiteServiceClient;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn secrets_never_reach_logs_or_disk_in_plaintext() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let server = TestServer::start().await;
    let owner = server.admin_channel(&server.owner()).await;
    let mut sites = SiteServiceClient::new(owner.clone());
    let site = sites
        .create_site(pb::CreateSiteRequest {
            display_name: "Secret site".into(),
            failed_attempt_limit: 3,
        })
        .await
        .unwrap()
        .into_inner()
        .site
        .unwrap();
    let mut passcodes: Vec<String> = Vec::new();
    for _ in 0..3 {
        let generated = sites
            .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
                site_id: site.site_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        passcodes.push(generated.passcode);
    }
    sites
        .get_company_passcode(pb::GetCompanyPasscodeRequest {
            site_id: site.site_id.clone(),
        })
        .await
        .unwrap();

    pb::user_service_client::UserServiceClient::new(owner.clone())
        .create_user(pb::CreateUserRequest {
            site_id: site.site_id.clone(),
            email: "una@example.com".into(),
            display_name: String::new(),
        })
        .await
        .unwrap();
    // The device's key is made here, as on a device.
    let (device_key, csr) = mdm_agent::enroll::key_and_csr("device").unwrap();
    let mut enroll =
        pb::enrollment_service_client::EnrollmentServiceClient::new(server.channel(None).await);
    let request = |passcode: &str| pb::EnrollRequest {
        user_email: "una@example.com".into(),
        company_passcode: passcode.into(),
        csr_pem: csr.clone(),
        device: Some(pb::DeviceFacts {
            platform: pb::Platform::Linux.into(),
            ..Default::default()
        }),
    };
    enroll.enroll(request("Wr0ngPasscod")).await.unwrap_err();
    let device = enroll
        .enroll(request(passcodes.last().unwrap()))
        .await
        .unwrap()
        .into_inner();
    let mut devices = pb::device_service_client::DeviceServiceClient::new(owner.clone());
    let reset = devices
        .reset_passcode(pb::ResetPasscodeRequest {
            device_id: device.device_id.clone(),
            confirm_user_email: "una@example.com".into(),
            notify_user: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let shown = devices
        .get_device(pb::GetDeviceRequest {
            device_id: device.device_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown
            .device
            .unwrap()
            .security
            .unwrap()
            .latest_reset_passcode,
        reset.passcode
    );
    passcodes.push(reset.passcode);
    sites
        .disable_company_passcode(pb::DisableCompanyPasscodeRequest {
            site_id: site.site_id.clone(),
        })
        .await
        .unwrap();
    // Let the outbox write the reset emails.
    let mail = server.data_dir.join("outbox/mail");
    mdm_tests::eventually("the reset emails are written", || {
        let count = std::fs::read_dir(&mail).map(|d| d.count()).unwrap_or(0);
        async move { (count >= 2).then_some(()) }
    })
    .await;
    let (data_dir, _temp) = server.stop().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("company passcode generated"),
        "logs were captured"
    );
    assert!(
        logs.contains("passcode reset queued"),
        "the reset was logged"
    );
    assert!(logs.contains("TRACE"), "trace level was on");

    let key_der = rustls::pki_types::pem::PemObject::from_pem_slice(device_key.as_bytes())
        .map(|k: rustls::pki_types::PrivateKeyDer<'static>| k.secret_der().to_vec())
        .unwrap();
    let ca_key = std::fs::read_to_string(data_dir.join("pki/ca.key")).unwrap();
    assert!(
        !logs.contains(device_key.lines().nth(1).unwrap()),
        "a device key reached the logs"
    );
    assert!(
        !logs.contains(ca_key.lines().nth(1).unwrap()),
        "the CA key reached the logs"
    );
    for passcode in &passcodes {
        assert!(
            !logs.contains(passcode.as_str()),
            "a passcode reached the logs"
        );
    }
    for file in files_under(&data_dir) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !contains(&bytes, &key_der),
            "a device key is stored in {}",
            file.display()
        );
        // Delivered emails (.eml, 0600) are the one place a reset passcode is meant to be.
        if file.starts_with(data_dir.join("outbox/mail")) {
            continue;
        }
        for passcode in &passcodes {
            assert!(
                !contains(&bytes, passcode.as_bytes()),
                "a passcode is stored in plaintext in {}",
                file.display()
            );
        }
    }
}
