//! Foundation: mutual TLS, admin identity and revocation, health,
//! reflection through the real grpcurl, restart and data-dir safety.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use mdm_server::admins::Role;
use mdm_tests::{TestServer, code, pb};
use pb::site_service_client::SiteServiceClient;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Handshakes, then reads: with TLS 1.3 a refused client certificate shows
/// up as an alert on the first read.
async fn raw_tls(
    server: &TestServer,
    config: rustls::ClientConfig,
) -> std::io::Result<(String, Vec<u8>)> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (_, session) = tls.get_ref();
    let version = format!("{:?}", session.protocol_version());
    let alpn = session.alpn_protocol().unwrap_or_default().to_vec();
    // The HTTP/2 preface makes the server answer with its SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    let mut buf = [0u8; 9];
    tls.read_exact(&mut buf).await?;
    Ok((version, alpn))
}

#[tokio::test]
async fn tls13_handshake_with_and_without_client_certificate() {
    let server = TestServer::start().await;
    let owner = server.owner();

    let (version, alpn) = raw_tls(
        &server,
        client_config(&server.ca_pem(), None, &[&rustls::version::TLS13]),
    )
    .await
    .expect("a client without certificate may connect");
    assert_eq!(version, "Some(TLSv1_3)");
    assert_eq!(alpn, b"h2");

    let with_cert = client_config(
        &server.ca_pem(),
        Some((&owner.cert_pem, &owner.key_pem)),
        &[&rustls::version::TLS13],
    );
    raw_tls(&server, with_cert)
        .await
        .expect("the owner certificate is accepted");
}

#[tokio::test]
async fn tls12_is_refused() {
    let server = TestServer::start().await;
    let result = raw_tls(
        &server,
        client_config(&server.ca_pem(), None, &[&rustls::version::TLS12]),
    )
    .await;
    let error = result.expect_err("TLS 1.2 must be refused");
    assert!(error.to_string().contains("ProtocolVersion"), "{error}");
}

#[tokio::test]
async fn certificate_from_a_foreign_ca_is_refused_at_the_handshake() {
    let server = TestServer::start().await;
    let foreign_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign_ca = rcgen::Issuer::new(params, foreign_key);
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client = rcgen::CertificateParams::new(vec![]).unwrap();
    client.subject_alt_names = vec![rcgen::SanType::Rfc822Name(
        "owner@localhost".try_into().unwrap(),
    )];
    let client_cert = client.signed_by(&client_key, &foreign_ca).unwrap();

    let config = client_config(
        &server.ca_pem(),
        Some((&client_cert.pem(), &client_key.serialize_pem())),
        &[&rustls::version::TLS13],
    );
    let error = raw_tls(&server, config)
        .await
        .expect_err("foreign CA must be refused");
    assert!(
        error.to_string().contains("UnknownCA") || error.to_string().contains("BadCertificate"),
        "unexpected error: {error}"
    );

    // The same through a gRPC client: the call never reaches a service.
    let result = server
        .try_channel(Some((&client_cert.pem(), &client_key.serialize_pem())))
        .await;
    if let Ok(channel) = result {
        let status = SiteServiceClient::new(channel)
            .list_sites(pb::ListSitesRequest::default())
            .await
            .expect_err("foreign certificate must not reach the service");
        assert_ne!(status.code(), Code::Unimplemented);
        assert_ne!(status.code(), Code::Ok);
    }
}

#[tokio::test]
async fn admin_services_need_an_admin_certificate() {
    let server = TestServer::start().await;
    let anonymous = server.channel(None).await;
    let status = SiteServiceClient::new(anonymous.clone())
        .list_sites(pb::ListSitesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("client certificate"),
        "{}",
        status.message()
    );
    for result in [
        pb::device_service_client::DeviceServiceClient::new(anonymous.clone())
            .list_devices(pb::ListDevicesRequest::default())
            .await
            .map(|_| ()),
        pb::user_service_client::UserServiceClient::new(anonymous.clone())
            .list_users(pb::ListUsersRequest::default())
            .await
            .map(|_| ()),
        pb::action_log_service_client::ActionLogServiceClient::new(anonymous.clone())
            .list_actions(pb::ListActionsRequest::default())
            .await
            .map(|_| ()),
    ] {
        assert_eq!(code(result), Code::Unauthenticated);
    }

    // An admin certificate is not a device certificate.
    let owner = server.owner();
    let admin = server.admin_channel(&owner).await;
    let status = pb::agent_service_client::AgentServiceClient::new(admin)
        .renew_certificate(pb::RenewCertificateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_owner_credential_passes_authentication() {
    let server = TestServer::start().await;
    let channel = server.admin_channel(&server.owner()).await;
    let sites = SiteServiceClient::new(channel)
        .list_sites(pb::ListSitesRequest::default())
        .await
        .expect("the owner may list sites")
        .into_inner();
    assert!(sites.sites.is_empty());
}

#[tokio::test]
async fn a_revoked_admin_is_refused_on_the_next_call_of_an_open_connection() {
    let server = TestServer::start().await;
    // Issued while the server runs: usable at once.
    let alice = server.add_admin("alice@example.com", Role::Owner, &[]);
    let mut client = SiteServiceClient::new(server.admin_channel(&alice).await);
    client
        .list_sites(pb::ListSitesRequest::default())
        .await
        .expect("a freshly issued admin works at once");

    server.revoke_admin("alice@example.com");
    let status = client
        .list_sites(pb::ListSitesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{}", status.message());

    // The owner is unaffected.
    let mut owner = SiteServiceClient::new(server.admin_channel(&server.owner()).await);
    owner
        .list_sites(pb::ListSitesRequest::default())
        .await
        .expect("the owner is unaffected");

    let listing = server
        .admin(mdm_server::config::AdminCommand::List)
        .unwrap();
    let alice_line = listing
        .lines()
        .find(|l| l.starts_with("alice@example.com"))
        .unwrap();
    assert!(alice_line.contains("revoked"), "{listing}");
    let owner_line = listing
        .lines()
        .find(|l| l.starts_with("owner@localhost"))
        .unwrap();
    assert!(owner_line.contains("active"), "{listing}");
}

#[tokio::test]
async fn health_is_serving() {
    let server = TestServer::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel(None).await);
    for service in ["", "mdm.v1.SiteService", "mdm.v1.EnrollmentService"] {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "service {service:?}"
        );
    }
}

#[tokio::test]
async fn restart_keeps_the_ca_and_credentials() {
    let server = TestServer::start().await;
    let ca_before = server.ca_pem();
    let owner = server.owner();
    let server_cert_before = std::fs::read(server.data_dir.join("pki/server.crt")).unwrap();
    let (data_dir, temp) = server.stop().await;

    let server = TestServer::start_in(&data_dir).await.unwrap();
    assert_eq!(server.ca_pem(), ca_before);
    assert_eq!(
        std::fs::read(server.data_dir.join("pki/server.crt")).unwrap(),
        server_cert_before,
        "a later start reuses the server certificate"
    );
    let mut client = SiteServiceClient::new(server.admin_channel(&owner).await);
    client
        .list_sites(pb::ListSitesRequest::default())
        .await
        .expect("the old owner credential still works");
    drop(temp);
}

#[tokio::test]
async fn a_foreign_or_damaged_data_dir_is_refused_and_left_untouched() {
    let temp = tempfile::tempdir().unwrap();
    let foreign = temp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    let error = TestServer::start_in(&foreign).await.err().expect("refused");
    assert!(
        error.to_string().contains("not an mdm-server data dir"),
        "{error}"
    );
    let entries: Vec<_> = std::fs::read_dir(&foreign).unwrap().collect();
    assert_eq!(entries.len(), 1, "nothing was added to a foreign dir");

    let server = TestServer::start().await;
    let (data_dir, _temp) = server.stop().await;
    std::fs::remove_file(data_dir.join("pki/ca.key")).unwrap();
    let error = TestServer::start_in(&data_dir)
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("pki/ca.key"), "{error}");
    assert!(
        !data_dir.join("pki/ca.key").exists(),
        "no silent re-creation"
    );
}

#[tokio::test]
async fn grpcurl_lists_and_describes_every_service_through_reflection() {
    let server = TestServer::start().await;
    let owner = server.owner();
    let out = server.grpcurl(Some(&owner), &["list"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    for service in [
        "mdm.v1.ActionLogService",
        "mdm.v1.AgentService",
        "mdm.v1.DeviceService",
        "mdm.v1.EnrollmentService",
        "mdm.v1.SiteService",
        "mdm.v1.UserService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listing.lines().any(|l| l == service),
            "{service} missing from:\n{listing}"
        );
    }

    let out = server
        .grpcurl(Some(&owner), &["describe", "mdm.v1.SiteService"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let description = String::from_utf8(out.stdout).unwrap();
    for rpc in [
        "GenerateCompanyPasscode",
        "GetCompanyPasscode",
        "DisableCompanyPasscode",
        "CreateSite",
    ] {
        assert!(
            description.contains(rpc),
            "{rpc} missing from:\n{description}"
        );
    }

    let out = server.grpcurl(None, &["grpc.health.v1.Health/Check"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));

    // Without a client certificate an admin RPC is refused, with a readable reason.
    let out = server
        .grpcurl(None, &["mdm.v1.SiteService/ListSites"])
        .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
}

#[tokio::test]
async fn clients_that_never_finish_a_handshake_do_not_block_others() {
    let server = TestServer::start().await;
    // 200 connections that send nothing (slow loris), and 5 that send garbage,
    // from four addresses; the admin comes from another.
    let mut idle = Vec::new();
    for i in 0..200 {
        idle.push(connect_from(server.addr, [127, 0, 1, 1 + i % 4]).await);
    }
    for _ in 0..5 {
        let mut junk = connect_from(server.addr, [127, 0, 1, 1]).await;
        junk.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0])
            .await
            .unwrap();
        idle.push(junk);
    }
    // Everyone else is served at once.
    let started = std::time::Instant::now();
    let mut client = SiteServiceClient::new(server.admin_channel(&server.owner()).await);
    client
        .list_sites(pb::ListSitesRequest::default())
        .await
        .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "served while 205 bad clients hang"
    );
    drop(idle);
}

async fn connect_from(server: std::net::SocketAddr, source: [u8; 4]) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    socket.connect(server).await.unwrap()
}

/// A channel from loopback address `source`, with `identity` (or none).
async fn channel_from(
    server: &TestServer,
    source: [u8; 4],
    identity: Option<&mdm_tests::Credential>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server.ca_pem()))
        .domain_name("localhost");
    if let Some(credential) = identity {
        tls = tls.identity(Identity::from_pem(
            &credential.cert_pem,
            &credential.key_pem,
        ));
    }
    mdm_tests::bench::channel_from(server.addr, source.into(), tls).await
}

async fn health(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test]
async fn each_address_gets_a_bounded_number_of_handshakes_and_anonymous_connections() {
    let temp = tempfile::tempdir().unwrap();
    let mut config = mdm_server::Config::for_data_dir(temp.path().join("data"));
    config.connections_per_source = 4;
    let server = TestServer::start_with(config).await.unwrap();
    let owner = server.owner();

    // Four handshakes that never finish fill 127.0.2.1's handshake places.
    let mut loris = Vec::new();
    for _ in 0..4 {
        loris.push(connect_from(server.addr, [127, 0, 2, 1]).await);
    }
    let refused = match channel_from(&server, [127, 0, 2, 1], None).await {
        Err(_) => true,
        Ok(channel) => health(channel).await.is_err(),
    };
    assert!(
        refused,
        "a fifth handshake from the same address is refused"
    );
    // Another address is served meanwhile.
    health(channel_from(&server, [127, 0, 2, 2], None).await.unwrap())
        .await
        .unwrap();
    // Once they go, the address is served again.
    drop(loris);
    mdm_tests::eventually("127.0.2.1 is served again", || async {
        match channel_from(&server, [127, 0, 2, 1], None).await {
            Ok(channel) => health(channel).await.ok(),
            Err(_) => None,
        }
    })
    .await;

    // Four open connections without a client certificate (enrollment) from
    // 127.0.2.3: a fifth is closed after its handshake...
    let mut anonymous = Vec::new();
    for _ in 0..4 {
        let channel = channel_from(&server, [127, 0, 2, 3], None).await.unwrap();
        health(channel.clone()).await.unwrap();
        anonymous.push(channel);
    }
    let fifth = match channel_from(&server, [127, 0, 2, 3], None).await {
        Err(_) => true,
        Ok(channel) => health(channel).await.is_err(),
    };
    assert!(
        fifth,
        "a fifth anonymous connection from the same address is closed"
    );
    // ... but an admin from the same address is not crowded out.
    let admin = channel_from(&server, [127, 0, 2, 3], Some(&owner))
        .await
        .unwrap();
    SiteServiceClient::new(admin)
        .list_sites(pb::ListSitesRequest::default())
        .await
        .unwrap();
    // The anonymous ones that were let in still work.
    for channel in anonymous {
        health(channel).await.unwrap();
    }
}
