//! `mdm-agent enroll`: make a key on the device, send a CSR with the user's
//! email and the company passcode, keep the certificate.

use mdm_proto::v1 as pb;
use mdm_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use tonic::Code;
use zeroize::Zeroizing;

use crate::backend::Backend;
use crate::client::{self, ClientError};
use crate::state::{Identity, StateDir};

/// How the agent learns which CA to trust.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// A PEM file the admin handed out.
    File(std::path::PathBuf),
    /// `sha256:HEX` of the CA certificate.
    Fingerprint(String),
}

pub struct EnrollOptions {
    pub server: String,
    pub ca: CaSource,
    pub email: String,
    pub passcode: Zeroizing<String>,
    pub state: StateDir,
    pub serial_override: Option<String>,
    pub force: bool,
    pub backend: Box<dyn Backend>,
}

impl std::fmt::Debug for EnrollOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollOptions")
            .field("server", &self.server)
            .field("email", &self.email)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("this device is already enrolled as {0}; pass --force to enroll it again")]
    AlreadyEnrolled(String),
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "enrollment refused: check your email and the company passcode, or ask your administrator"
    )]
    Refused,
    #[error("too many failed attempts from this address; wait a minute and try again")]
    Throttled,
    #[error("the server answered {0}")]
    Server(String),
    #[error("cannot make a key: {0}")]
    Key(String),
    #[error("cannot write the state dir: {0}")]
    State(std::io::Error),
}

fn now_millis() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn millis_of(timestamp: Option<&prost_types::Timestamp>) -> i64 {
    timestamp.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
}

/// A fresh ECDSA P-256 key and a CSR for it, naming `common_name`.
pub fn key_and_csr(common_name: &str) -> Result<(Zeroizing<String>, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    let csr_pem = csr.pem().map_err(|e| e.to_string())?;
    Ok((Zeroizing::new(key.serialize_pem()), csr_pem))
}

pub async fn enroll(options: EnrollOptions) -> Result<Identity, EnrollError> {
    if !options.force
        && let Ok(Some(existing)) = options.state.load()
    {
        return Err(EnrollError::AlreadyEnrolled(existing.device_id));
    }
    let ca_pem = match &options.ca {
        CaSource::File(path) => {
            std::fs::read_to_string(path).map_err(|source| EnrollError::CaFile {
                path: path.display().to_string(),
                source,
            })?
        }
        CaSource::Fingerprint(text) => {
            let expected = client::parse_fingerprint(text)?;
            client::fetch_ca_by_fingerprint(&options.server, expected).await?
        }
    };
    let (key_pem, csr_pem) = key_and_csr("mdm-agent").map_err(EnrollError::Key)?;
    // Enrolling again (--force) with a current identity proves this is the
    // same device, so the server replaces its record instead of keeping both.
    let current = match (options.state.cert_pem(), options.state.key_pem()) {
        (Ok(cert), Ok(key)) if options.force => Some((cert, key)),
        _ => None,
    };
    let identity = current.as_ref().map(|(c, k)| (c.as_str(), k.as_str()));
    let channel = match client::channel(&options.server, &ca_pem, identity).await {
        Ok(channel) => channel,
        // An identity the server no longer accepts may fail the handshake.
        Err(_) if identity.is_some() => client::channel(&options.server, &ca_pem, None).await?,
        Err(error) => return Err(error.into()),
    };
    let facts = crate::facts::collect(
        options.serial_override.as_deref(),
        options.backend.capabilities(),
    );
    let request = pb::EnrollRequest {
        user_email: options.email.clone(),
        company_passcode: options.passcode.as_str().to_owned(),
        csr_pem,
        device: Some(facts),
    };
    let response = EnrollmentServiceClient::new(channel)
        .enroll(request)
        .await
        .map_err(|status| match status.code() {
            Code::PermissionDenied => EnrollError::Refused,
            Code::ResourceExhausted => EnrollError::Throttled,
            _ => EnrollError::Server(format!("{:?}: {}", status.code(), status.message())),
        })?
        .into_inner();
    let identity = Identity {
        device_id: response.device_id,
        site_id: response.site_id,
        user_email: options.email.trim().to_ascii_lowercase(),
        server: options.server.clone(),
        renew_after: millis_of(response.renew_after.as_ref()),
        expires_at: millis_of(response.expires_at.as_ref()),
        enrolled_at: now_millis(),
    };
    // Trust what the server says its CA is only if it is the one we pinned.
    let ca_to_keep = if response.ca_certificate_pem.trim() == ca_pem.trim() {
        response.ca_certificate_pem
    } else {
        ca_pem
    };
    options
        .state
        .save(
            &identity,
            &key_pem,
            &response.certificate_chain_pem,
            &ca_to_keep,
        )
        .map_err(EnrollError::State)?;
    Ok(identity)
}
