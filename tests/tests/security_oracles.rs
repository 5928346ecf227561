//! Oracles: what a caller can learn from how long a refusal takes, or from
//! which refusal it gets.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use mdm_tests::{TestServer, pb, site_with_passcode};
use pb::enrollment_service_client::EnrollmentServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Enroll attempts per case; each source address makes at most five
/// (the per-source burst), so every attempt reaches the passcode check.
const ROUNDS: usize = 80;

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_passcode_takes_as_long_for_a_known_email_as_for_an_unknown_one() {
    let server = TestServer::start().await;
    // The limit is above the known-email attempts, so the site never locks out.
    let (_, good) = site_with_passcode(&server, "known@example.com", 100).await;
    let (_, csr) = mdm_agent::enroll::key_and_csr("x").unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server.ca_pem()))
        .domain_name("localhost");

    // (email, passcode): known user + wrong passcode, unknown + wrong, unknown + right.
    let cases = [
        ("known@example.com", "Wrong0Pass12"),
        ("nobody@example.com", "Wrong0Pass12"),
        ("nobody@example.com", good.as_str()),
    ];
    let attempts = ROUNDS * cases.len();
    let mut clients = Vec::new();
    for source in 0..attempts.div_ceil(5) {
        let channel: Channel = mdm_tests::bench::channel_from(
            server.addr,
            mdm_tests::bench::source_ip(source),
            tls.clone(),
        )
        .await
        .unwrap();
        clients.push(EnrollmentServiceClient::new(channel));
    }
    let request = |email: &str, passcode: &str| pb::EnrollRequest {
        user_email: email.into(),
        company_passcode: passcode.into(),
        csr_pem: csr.clone(),
        device: Some(pb::DeviceFacts {
            platform: pb::Platform::Linux.into(),
            ..Default::default()
        }),
    };

    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    let mut attempt = 0;
    for round in 0..ROUNDS {
        // Interleaved, in a rotating order, so drift hits every case alike.
        for k in 0..cases.len() {
            let case = (round + k) % cases.len();
            let (email, passcode) = cases[case];
            let client = &mut clients[attempt / 5];
            attempt += 1;
            let started = Instant::now();
            let status = client.enroll(request(email, passcode)).await.unwrap_err();
            samples[case].push(started.elapsed());
            assert_eq!(
                (status.code(), status.message()),
                (Code::PermissionDenied, "enrollment refused"),
                "case {case}"
            );
        }
    }
    let medians: Vec<Duration> = samples.iter_mut().map(|s| median(s)).collect();
    eprintln!(
        "median Enroll refusal over {ROUNDS}: known email + wrong passcode {:?}, unknown + wrong {:?}, unknown + right {:?}",
        medians[0], medians[1], medians[2]
    );
    // Counting a known email's failure on the response path (a write and a
    // flush) made its refusal about 300 µs slower here, in debug builds on two
    // cores; refusals of one kind differ by some 20 µs run to run.
    let tolerance = (medians[1] / 4).max(Duration::from_micros(100));
    assert!(
        medians[0].abs_diff(medians[1]) < tolerance,
        "a known email is told apart by time: {medians:?}"
    );
    assert!(
        medians[2].abs_diff(medians[1]) < tolerance,
        "the right passcode is told apart by time: {medians:?}"
    );
}
