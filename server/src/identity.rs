//! Who is calling: extracted once per call from the verified client
//! certificate and handed to the services as a typed extension.
//!
//! rustls has already checked at the handshake that the certificate chains to
//! our CA and is within its validity. Here we check what can change while a
//! connection stays open: expiry and revocation (the admin registry for
//! admins), so a revoked admin is refused on the very next call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::admins::{AdminRegistry, Role};
use crate::pki::{ADMIN_OU, DEVICE_OU, DEVICE_URI_PREFIX};

/// An authenticated administrator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminIdentity {
    pub email: String,
    pub role: Role,
    pub sites: Vec<String>,
}

impl AdminIdentity {
    pub fn is_owner(&self) -> bool {
        self.role == Role::Owner
    }

    pub fn may_manage_site(&self, site_id: &str) -> bool {
        self.is_owner() || self.sites.iter().any(|s| s == site_id)
    }
}

/// An authenticated device, identified by the id in its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub serial: String,
}

/// The parts of a client certificate identity checks need.
#[derive(Debug, Clone)]
struct ClientCert {
    serial_hex: String,
    unit: Option<String>,
    email: Option<String>,
    device_id: Option<String>,
    not_after: i64,
}

/// Certificates parsed lately, by their DER bytes: an admin client sends many
/// calls over one connection, and parsing took a twentieth of the server's
/// CPU in the fan-out benchmark. What can change (expiry, revocation) is
/// checked on every call from the parsed fields.
static PARSED: std::sync::LazyLock<Mutex<HashMap<Vec<u8>, ClientCert>>> =
    std::sync::LazyLock::new(Mutex::default);
const PARSED_CAPACITY: usize = 4096;

/// The DER of the client certificate the caller presented, if any.
pub fn leaf_certificate<T>(request: &Request<T>) -> Option<Vec<u8>> {
    request
        .peer_certs()
        .and_then(|chain| chain.first().map(|leaf| leaf.as_ref().to_vec()))
}

fn parse_client_cert<T>(request: &Request<T>) -> Result<ClientCert, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("this service needs a client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("this service needs a client certificate"))?;
    parse_cached(leaf.as_ref())
}

fn parse_cached(der: &[u8]) -> Result<ClientCert, Status> {
    let parsed = || PARSED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cert) = parsed().get(der) {
        return Ok(cert.clone());
    }
    let cert = parse_der(der)?;
    let mut cache = parsed();
    if cache.len() >= PARSED_CAPACITY {
        cache.clear();
    }
    cache.insert(der.to_vec(), cert.clone());
    Ok(cert)
}

fn parse_der(der: &[u8]) -> Result<ClientCert, Status> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Status::unauthenticated("the client certificate cannot be parsed"))?;
    let unit = cert
        .subject()
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .map(str::to_owned);
    let mut email = None;
    let mut device_id = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::RFC822Name(e) => email = Some(e.to_ascii_lowercase()),
                GeneralName::URI(uri) => {
                    device_id = uri.strip_prefix(DEVICE_URI_PREFIX).map(str::to_owned)
                }
                _ => {}
            }
        }
    }
    Ok(ClientCert {
        serial_hex: hex::encode(cert.raw_serial()),
        unit,
        email,
        device_id,
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Authenticates admin calls against the admin registry.
#[derive(Debug, Clone)]
pub struct AdminAuthenticator {
    registry: Arc<AdminRegistry>,
}

impl AdminAuthenticator {
    pub fn new(registry: Arc<AdminRegistry>) -> Self {
        Self { registry }
    }

    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<AdminIdentity, Status> {
        self.check(parse_client_cert(request)?)
    }

    /// The admin a leaf certificate (DER) proves, as the registry says now.
    pub fn authenticate_der(&self, der: &[u8]) -> Result<AdminIdentity, Status> {
        self.check(parse_cached(der)?)
    }

    fn check(&self, cert: ClientCert) -> Result<AdminIdentity, Status> {
        if cert.unit.as_deref() != Some(ADMIN_OU) {
            return Err(Status::unauthenticated(
                "this service needs an admin certificate",
            ));
        }
        if cert.not_after < now_unix() {
            return Err(Status::unauthenticated("the admin certificate has expired"));
        }
        let record = self
            .registry
            .find_by_serial(&cert.serial_hex)
            .map_err(|e| {
                tracing::error!(error = %e, "admin registry unreadable");
                Status::unavailable("the admin registry cannot be read; see the server log")
            })?
            .ok_or_else(|| Status::unauthenticated("unknown admin certificate"))?;
        if record.revoked_at.is_some() {
            return Err(Status::unauthenticated("the admin certificate is revoked"));
        }
        if cert.email.as_deref() != Some(record.email.as_str()) {
            return Err(Status::unauthenticated(
                "the admin certificate does not match its record",
            ));
        }
        Ok(AdminIdentity {
            email: record.email,
            role: record.role,
            sites: record.sites,
        })
    }

    /// A tonic interceptor that rejects unauthenticated calls and attaches
    /// the [`AdminIdentity`] to the request.
    pub fn interceptor(self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |mut request: Request<()>| {
            let identity = self.authenticate(&request)?;
            request.extensions_mut().insert(identity);
            Ok(request)
        }
    }
}

/// `(device_id, serial_hex)` -> whether that certificate may no longer be
/// used; a store lookup, so asynchronous.
type RevocationCheck = dyn Fn(String, String) -> futures::future::BoxFuture<'static, Result<bool, Status>>
    + Send
    + Sync;

/// Checks device certificates; revocation is looked up by `is_revoked`.
///
/// The interceptor checks what the certificate itself says (kind, expiry);
/// a tonic interceptor cannot wait, so whether the certificate is still the
/// device's is checked by [`DeviceAuthenticator::check_revoked`] at the
/// start of every device call, and again by a stream at every heartbeat.
#[derive(Clone)]
pub struct DeviceAuthenticator {
    is_revoked: Arc<RevocationCheck>,
}

impl std::fmt::Debug for DeviceAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceAuthenticator")
    }
}

impl DeviceAuthenticator {
    pub fn new(
        is_revoked: impl Fn(String, String) -> futures::future::BoxFuture<'static, Result<bool, Status>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            is_revoked: Arc::new(is_revoked),
        }
    }

    /// The device a leaf certificate (DER) proves, while it is valid.
    pub async fn authenticate_der(&self, der: &[u8]) -> Result<DeviceIdentity, Status> {
        let identity = Self::check_certificate(parse_cached(der)?)?;
        self.check_revoked(&identity).await?;
        Ok(identity)
    }

    /// Refuses a certificate that is no longer one of the device's current ones.
    pub async fn check_revoked(&self, identity: &DeviceIdentity) -> Result<(), Status> {
        if (self.is_revoked)(identity.device_id.clone(), identity.serial.clone()).await? {
            return Err(Status::unauthenticated(
                "the device certificate is revoked; enroll again",
            ));
        }
        Ok(())
    }

    fn check_certificate(cert: ClientCert) -> Result<DeviceIdentity, Status> {
        let device_id = match (cert.unit.as_deref(), cert.device_id) {
            (Some(DEVICE_OU), Some(id)) => id,
            _ => {
                return Err(Status::unauthenticated(
                    "this service needs a device certificate",
                ));
            }
        };
        if cert.not_after < now_unix() {
            return Err(Status::unauthenticated(
                "the device certificate has expired; enroll again",
            ));
        }
        Ok(DeviceIdentity {
            device_id,
            serial: cert.serial_hex,
        })
    }

    pub fn interceptor(self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |mut request: Request<()>| {
            let identity = Self::check_certificate(parse_client_cert(&request)?)?;
            request.extensions_mut().insert(identity);
            Ok(request)
        }
    }
}

/// For a leaf certificate (DER) of an identity that may use the server now
/// (an unrevoked admin, a current certificate of an enrolled device), a
/// check of whether it still may, over the certificate parsed once.
pub async fn authorizer(
    admins: AdminAuthenticator,
    devices: DeviceAuthenticator,
    der: Vec<u8>,
) -> Option<Arc<crate::tls::StillAuthorized>> {
    use futures::FutureExt;
    let cert = parse_cached(&der).ok()?;
    let check: Arc<crate::tls::StillAuthorized> = match cert.unit.as_deref() {
        Some(ADMIN_OU) => Arc::new(move || {
            let authorized = admins.check(cert.clone()).is_ok();
            async move { authorized }.boxed()
        }),
        Some(DEVICE_OU) => Arc::new(move || {
            let (devices, cert) = (devices.clone(), cert.clone());
            async move {
                match DeviceAuthenticator::check_certificate(cert) {
                    Ok(identity) => devices.check_revoked(&identity).await.is_ok(),
                    Err(_) => false,
                }
            }
            .boxed()
        }),
        _ => return None,
    };
    check().await.then_some(check)
}

/// The identity an interceptor attached; its absence is a wiring bug, reported as such.
pub fn admin<T>(request: &Request<T>) -> Result<AdminIdentity, Status> {
    request
        .extensions()
        .get::<AdminIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("this service needs an admin certificate"))
}

pub fn device<T>(request: &Request<T>) -> Result<DeviceIdentity, Status> {
    request
        .extensions()
        .get::<DeviceIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("this service needs a device certificate"))
}
