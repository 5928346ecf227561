//! Where the database is and how to reach it: the URL, the password kept
//! out of logs, TLS.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use zeroize::Zeroizing;

use crate::PgOpenError;

/// How to reach the database.
///
/// `url` is `postgres://user[:password]@host[:port]/database[?params]`.
/// Besides tokio-postgres's parameters it takes `sslmode` and `sslrootcert`:
///
/// - `disable`: plaintext.
/// - `prefer` (the default, as in libpq): TLS when the server offers it,
///   else plaintext. The certificate is checked only when a CA file is
///   given; without one TLS only keeps passive listeners out.
/// - `require`: TLS or nothing; the certificate is checked as for `prefer`.
/// - `verify-full`: TLS, and the server's certificate must chain to the CA
///   file and name the host in the URL. The CA file is required.
///
/// `allow` is taken as `prefer`; `verify-ca` is refused: say `verify-full`
/// (rustls always checks the name).
#[derive(Clone)]
pub struct PgConfig {
    pub url: String,
    /// Takes the place of a password in the URL; keep the URL free of one
    /// where it can be logged or seen in a process list.
    pub password: Option<Zeroizing<String>>,
    /// PEM CA certificates for TLS; `sslrootcert` in the URL when unset.
    pub ca_file: Option<PathBuf>,
    /// Most connections held open at once.
    pub pool_size: usize,
    /// How long opening one connection may take (`connect_timeout` in the
    /// URL wins), and how long an operation waits for a free one.
    pub connect_timeout: Duration,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            ca_file: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redacted_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tls {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

/// A URL taken apart: what tokio-postgres parses, and what we handle.
pub(crate) struct Parsed {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
    pub ca_file: Option<PathBuf>,
    /// `host:port` of the first host, for messages.
    pub target: String,
}

/// The URL with its password replaced by `***`.
/// Whether the URL carries a password (`postgres://user:password@host`).
pub fn url_has_password(url: &str) -> bool {
    url_password(url).is_some_and(|(start, end)| end > start)
}

/// Checks the settings without connecting (the URL, TLS mode, CA file).
pub fn check_config(config: &PgConfig) -> Result<(), PgOpenError> {
    let parsed = parse(config)?;
    if parsed.tls != Tls::Disable {
        client_config(parsed.tls, parsed.ca_file.as_deref())?;
    }
    Ok(())
}

pub(crate) fn redacted_url(url: &str) -> String {
    match url_password(url) {
        Some((start, end)) => format!("{}***{}", &url[..start], &url[end..]),
        None => url.to_owned(),
    }
}

/// Byte range of the password in `scheme://user:password@host...`.
fn url_password(url: &str) -> Option<(usize, usize)> {
    let rest_at = url.find("://")? + 3;
    let rest = &url[rest_at..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    let colon = rest[..at].find(':')?;
    Some((rest_at + colon + 1, rest_at + at))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(crate) fn parse(config: &PgConfig) -> Result<Parsed, PgOpenError> {
    let url = config.url.as_str();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(PgOpenError::BadUrl(
            "the database URL must start with postgres:// or postgresql://".into(),
        ));
    }
    let secret = url_password(url).map(|(start, end)| &url[start..end]);
    let bad = |message: String| {
        PgOpenError::BadUrl(match secret {
            Some(secret) if !secret.is_empty() => message.replace(secret, "***"),
            _ => message,
        })
    };
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut tls = Tls::Prefer;
    let mut root_cert = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                tls = match value {
                    "disable" => Tls::Disable,
                    "prefer" | "allow" => Tls::Prefer,
                    "require" => Tls::Require,
                    "verify-full" => Tls::VerifyFull,
                    "verify-ca" => {
                        return Err(bad(
                            "sslmode=verify-ca is not supported: use verify-full".into()
                        ));
                    }
                    other => return Err(bad(format!("unknown sslmode {other:?}"))),
                }
            }
            "sslrootcert" => {
                root_cert = Some(PathBuf::from(percent_decode(value).ok_or_else(|| {
                    bad("sslrootcert is not a percent-encoded path".into())
                })?));
            }
            _ => kept.push(pair),
        }
    }
    let rebuilt = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut pg: tokio_postgres::Config = rebuilt
        .parse()
        .map_err(|e: tokio_postgres::Error| bad(format!("invalid database URL: {e}")))?;
    if let Some(password) = &config.password {
        pg.password(password.as_bytes());
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(config.connect_timeout);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("mdm-server");
    }
    pg.ssl_mode(match tls {
        Tls::Disable => SslMode::Disable,
        Tls::Prefer => SslMode::Prefer,
        Tls::Require | Tls::VerifyFull => SslMode::Require,
    });
    let ca_file = config.ca_file.clone().or(root_cert);
    if tls == Tls::VerifyFull && ca_file.is_none() {
        return Err(bad(
            "sslmode=verify-full needs a CA file (ca_file or sslrootcert)".into(),
        ));
    }
    let target = target_of(&pg);
    if pg.get_hosts().is_empty() {
        return Err(bad("the database URL names no host".into()));
    }
    Ok(Parsed {
        config: pg,
        tls,
        ca_file,
        target,
    })
}

fn target_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) if name.contains(':') => format!("[{name}]"),
        Some(Host::Tcp(name)) => name.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// The rustls client configuration for `tls` (not `Disable`).
pub(crate) fn client_config(
    tls: Tls,
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, PgOpenError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgOpenError::Tls(e.to_string()))?;
    let config = match ca_file {
        Some(path) => {
            let bad = |reason: String| PgOpenError::BadCaFile {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no PEM certificate in it".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            debug_assert!(tls != Tls::VerifyFull);
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptionOnly(provider)))
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// libpq's `prefer`/`require` without a root certificate: the handshake's
/// signatures are checked, the certificate is not (there is nothing to
/// check it against).
#[derive(Debug)]
struct EncryptionOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptionOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let mut config =
            PgConfig::new("postgres://mdm:hunter2@db.example:5433/mdm?sslmode=require");
        config.password = Some(Zeroizing::new("override-secret".into()));
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("override-secret"), "{debug}");
        assert!(
            debug.contains("postgres://mdm:***@db.example:5433/mdm"),
            "{debug}"
        );
        let parsed = parse(&config).unwrap();
        assert_eq!(parsed.target, "db.example:5433");
        assert_eq!(parsed.tls, Tls::Require);
        assert_eq!(parsed.config.get_password(), Some(&b"override-secret"[..]));

        let bad = PgConfig::new("postgres://mdm:hunter2@db.example:notaport/mdm");
        let error = parse(&bad).err().unwrap().to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn sslmodes_and_root_certs_are_ours_to_parse() {
        let parsed = parse(&PgConfig::new(
            "postgres://mdm@h/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        ))
        .unwrap();
        assert_eq!(parsed.tls, Tls::VerifyFull);
        assert_eq!(parsed.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(parsed.config.get_application_name(), Some("x"));
        assert_eq!(parsed.target, "h:5432");
        for refused in [
            "postgres://h/db?sslmode=verify-full",
            "postgres://h/db?sslmode=verify-ca",
            "postgres://h/db?sslmode=bogus",
            "host=h dbname=db",
        ] {
            assert!(
                matches!(parse(&PgConfig::new(refused)), Err(PgOpenError::BadUrl(_))),
                "{refused}"
            );
        }
        assert_eq!(
            parse(&PgConfig::new("postgres://h/db")).unwrap().tls,
            Tls::Prefer
        );
    }
}
