//! Connections to the server: TLS channels pinned to the server's CA, and
//! fetching that CA by its fingerprint when the admin shared only that.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--server must be HOST:PORT, got {0:?}")]
    BadServer(String),
    #[error("cannot connect to {server}: {source}")]
    Connect {
        server: String,
        source: tonic::transport::Error,
    },
    #[error("cannot reach {server}: {message}")]
    Fetch { server: String, message: String },
    #[error("--ca-fingerprint must look like sha256:64HEXDIGITS")]
    BadFingerprint,
    #[error(
        "the server at {0} did not present a CA with that fingerprint; check the fingerprint with your administrator"
    )]
    FingerprintMismatch(String),
}

/// The host part of HOST:PORT (without IPv6 brackets), for TLS names.
pub fn host_of(server: &str) -> Result<String, ClientError> {
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| ClientError::BadServer(server.to_owned()))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(ClientError::BadServer(server.to_owned()));
    }
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned())
}

/// A channel to `server` that trusts only `ca_pem`, presenting the device
/// identity when given.
pub async fn channel(
    server: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, ClientError> {
    let host = host_of(server)?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let connect = |source| ClientError::Connect {
        server: server.to_owned(),
        source,
    };
    Endpoint::from_shared(format!("https://{server}"))
        .map_err(connect)?
        .tls_config(tls)
        .map_err(connect)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(connect)
}

/// Parses `sha256:HEX` (colons allowed between bytes).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], ClientError> {
    let hex_digits: String = text
        .strip_prefix("sha256:")
        .ok_or(ClientError::BadFingerprint)?
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bytes = hex::decode(hex_digits).map_err(|_| ClientError::BadFingerprint)?;
    bytes.try_into().map_err(|_| ClientError::BadFingerprint)
}

/// `sha256:HEX` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Connects once, accepting whatever chain the server shows, and returns
/// (as PEM) the certificate in it whose SHA-256 is `expected`. Everything
/// after this verifies the server properly against that CA.
pub async fn fetch_ca_by_fingerprint(
    server: &str,
    expected: [u8; 32],
) -> Result<String, ClientError> {
    let host = host_of(server)?;
    let capture = Arc::new(CaptureChain::default());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Fetch {
            server: server.to_owned(),
            message: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let fetch = |message: String| ClientError::Fetch {
        server: server.to_owned(),
        message,
    };
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(server),
    )
    .await
    .map_err(|_| fetch("timed out".into()))?
    .map_err(|e| fetch(e.to_string()))?;
    let name = ServerName::try_from(host).map_err(|e| fetch(e.to_string()))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| fetch(e.to_string()))?;
    let chain = capture
        .chain
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    chain
        .iter()
        .find(|der| Sha256::digest(der.as_ref()).as_slice() == expected)
        .map(|der| pem_of(der.as_ref()))
        .ok_or_else(|| ClientError::FingerprintMismatch(server.to_owned()))
}

fn pem_of(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}

/// Accepts any chain and remembers it; used only to find the CA by fingerprint.
#[derive(Debug, Default)]
struct CaptureChain {
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for CaptureChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        chain.push(end_entity.clone().into_owned());
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
