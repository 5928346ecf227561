//! With every log at TRACE, no company passcode reaches the logs or the
//! stored files in plaintext. Its own test binary: it owns the global
//! tracing subscriber.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use mdm_tests::{TestServer, pb};
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

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn company_passcodes_never_reach_logs_or_disk_in_plaintext() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let server = TestServer::start().await;
    let mut sites = SiteServiceClient::new(server.admin_channel(&server.owner()).await);
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
    let mut passcodes = Vec::new();
    for _ in 0..3 {
        passcodes.push(
            sites
                .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
                    site_id: site.site_id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .passcode,
        );
    }
    sites
        .get_company_passcode(pb::GetCompanyPasscodeRequest {
            site_id: site.site_id.clone(),
        })
        .await
        .unwrap();
    sites
        .disable_company_passcode(pb::DisableCompanyPasscodeRequest {
            site_id: site.site_id.clone(),
        })
        .await
        .unwrap();
    let (data_dir, _temp) = server.stop().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("company passcode generated"),
        "logs were captured"
    );
    assert!(logs.contains("TRACE"), "trace level was on");
    for passcode in &passcodes {
        assert!(
            !logs.contains(passcode.as_str()),
            "a passcode reached the logs"
        );
        for file in files_under(&data_dir) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes
                    .windows(passcode.len())
                    .any(|w| w == passcode.as_bytes()),
                "a passcode is stored in plaintext in {}",
                file.display()
            );
        }
    }
}
