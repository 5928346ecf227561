//! The server's certificate authority: creates it, loads it, and issues the
//! server, admin and device certificates. Everything here is rcgen + ring,
//! ECDSA P-256.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

/// Organizational unit that marks admin certificates.
pub const ADMIN_OU: &str = "mdm-admin";
/// Organizational unit that marks device certificates.
pub const DEVICE_OU: &str = "mdm-device";
/// URI scheme of the SAN that carries a device id.
pub const DEVICE_URI_PREFIX: &str = "urn:mdm:device:";

const CA_LIFETIME: Duration = Duration::days(3650);
const SERVER_CERT_LIFETIME: Duration = Duration::days(397);
/// Backdating absorbs small clock differences between server and clients.
const BACKDATE: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid name for a certificate: {0}")]
    InvalidName(String),
}

/// A freshly issued certificate with its private key (for credentials the
/// server creates itself: its own, and admins').
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The CA: its certificate and signing key.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new CA. Returns it with its key in PEM, to be written to disk.
    pub fn generate(common_name: &str) -> Result<(Self, Zeroizing<String>), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        let ca = Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues the server's TLS certificate for the given DNS names and IP addresses.
    pub fn issue_server_cert(&self, names: &[String]) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name("mdm-server", None);
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| PkiError::InvalidName(n.clone())),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with_new_key(params, SERVER_CERT_LIFETIME)
    }

    /// Issues an admin client certificate: the email as rfc822Name SAN and
    /// the role in the subject.
    pub fn issue_admin_cert(
        &self,
        email: &str,
        role: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(email, Some(ADMIN_OU));
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 12]), role); // title = role
        params.subject_alt_names = vec![SanType::Rfc822Name(
            email
                .to_owned()
                .try_into()
                .map_err(|_| PkiError::InvalidName(email.to_owned()))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_with_new_key(params, lifetime)
    }

    fn issue_with_new_key(
        &self,
        mut params: CertificateParams,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            serial_hex,
            not_after: params.not_after,
        })
    }
}

fn name(common_name: &str, unit: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mdm");
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// 16 random bytes with the top bit clear, so the DER integer stays positive.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = crate::crypto::os_random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Whether the first certificate in `chain_pem` names exactly `names` (DNS
/// and IP SANs) and stays valid for at least `margin`.
pub fn covers_exactly(chain_pem: &str, names: &[String], margin: Duration) -> bool {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Some(Ok(der)) =
        rustls_pki_types::pem::PemObject::pem_slice_iter(chain_pem.as_bytes()).next()
    else {
        return false;
    };
    let der: rustls_pki_types::CertificateDer<'static> = der;
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return false;
    };
    let expires = cert.validity().not_after.timestamp();
    if expires < (OffsetDateTime::now_utc() + margin).unix_timestamp() {
        return false;
    }
    let mut found: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes)
                        .ok()
                        .map(|b| IpAddr::from(b).to_string()),
                    16 => <[u8; 16]>::try_from(*bytes)
                        .ok()
                        .map(|b| IpAddr::from(b).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => return false,
    };
    let mut wanted = names.to_vec();
    found.sort();
    wanted.sort();
    found == wanted
}

/// Largest CSR we read, PEM.
pub const MAX_CSR_PEM_BYTES: usize = 8 * 1024;

/// Why a certificate signing request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is larger than {MAX_CSR_PEM_BYTES} bytes")]
    TooLarge,
    #[error("the CSR cannot be parsed or its signature is invalid")]
    Invalid,
    #[error("the CSR key must be ECDSA P-256 or Ed25519")]
    WrongKeyType,
    #[error("the CSR names another device")]
    OtherSubject,
}

/// A verified CSR: its public key, ready to be certified.
#[derive(Debug)]
pub struct DeviceCsr {
    public_key: rcgen::PublicKey,
}

/// Parses a PEM CSR, checks its self-signature and key type, and (when
/// `device_id` is given) that it does not name another device.
pub fn parse_device_csr(pem: &str, device_id: Option<&str>) -> Result<DeviceCsr, CsrError> {
    if pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge);
    }
    let csr =
        rcgen::CertificateSigningRequestParams::from_pem(pem).map_err(|_| CsrError::Invalid)?;
    let algorithm = csr.public_key.algorithm();
    let raw_len = rcgen::PublicKeyData::der_bytes(&csr.public_key).len();
    let ok = (*algorithm == rcgen::PKCS_ECDSA_P256_SHA256 && raw_len == 65)
        || (*algorithm == rcgen::PKCS_ED25519 && raw_len == 32);
    if !ok {
        return Err(CsrError::WrongKeyType);
    }
    if let Some(device_id) = device_id {
        let common_name = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .map(|value| match value {
                rcgen::DnValue::Utf8String(s) => s.clone(),
                rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
                other => format!("{other:?}"),
            });
        if let Some(cn) = common_name
            && !cn.is_empty()
            && cn != device_id
        {
            return Err(CsrError::OtherSubject);
        }
    }
    Ok(DeviceCsr {
        public_key: csr.public_key,
    })
}

impl CertificateAuthority {
    /// Issues a device certificate for a verified CSR. The subject and SANs
    /// are ours (device id as URI SAN), never the CSR's.
    pub fn issue_device_cert(
        &self,
        csr: &DeviceCsr,
        device_id: &str,
        lifetime: Duration,
    ) -> Result<(String, String, OffsetDateTime), PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(device_id, Some(DEVICE_OU));
        let uri = format!("{DEVICE_URI_PREFIX}{device_id}");
        params.subject_alt_names = vec![SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|_| PkiError::InvalidName(uri))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok((cert.pem(), serial_hex, params.not_after))
    }
}

/// `sha256:HEX` of the first certificate in `pem`, what
/// `mdm-agent enroll --ca-fingerprint` takes.
pub fn fingerprint(pem: &str) -> Option<String> {
    use sha2::{Digest, Sha256};
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
            .next()?
            .ok()?;
    Some(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(der.as_ref()))
    ))
}
