//! Webhooks: a site's security events (alerts, action status changes) are
//! posted as JSON to its URL, signed so the receiver can trust them:
//! `X-MDM-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! The timestamp lets receivers refuse replays. Deliveries go through the
//! outbox like emails, with the same retries.

use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::body::Bytes;
use sha2::Sha256;

use crate::destination::{self, Policy};
use crate::error::{Error, Result};

/// Checks a webhook URL: https, or http to a receiver on this machine; and
/// unless `policy` allows private networks, no host that names an internal
/// address (names are resolved and checked again at every delivery).
pub fn validate_url(url: &str, policy: &Policy) -> Result<http::Uri> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("url {url:?} is not a URL")))?;
    let host = uri
        .host()
        .ok_or_else(|| Error::InvalidArgument(format!("url {url:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip = host.parse::<std::net::IpAddr>().ok();
    let loopback = host.eq_ignore_ascii_case("localhost") || ip.is_some_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if loopback => {}
        _ => {
            return Err(Error::InvalidArgument(format!(
                "url {url:?} must be https:// (plain http only for a receiver on this machine)"
            )));
        }
    }
    if ip.is_none() && destination::is_numeric_host(host) {
        return Err(Error::InvalidArgument(format!(
            "url {url:?}: host {host:?} is neither a DNS name nor an IP address"
        )));
    }
    if !policy.allow_private {
        let reason = match ip {
            Some(ip) => destination::internal_reason(ip),
            None => destination::is_local_name(host).then_some("loopback"),
        };
        if let Some(reason) = reason {
            return Err(Error::InvalidArgument(format!(
                "url {url:?} points to {host}, a {reason} address: webhooks may not reach loopback, private, link-local or other internal networks (a server for a lab can allow them with {})",
                destination::ALLOW_FLAG
            )));
        }
    }
    Ok(uri)
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Resolves the host once, checks every address, connects to one of exactly
/// those addresses and posts. Never follows a redirect.
pub(crate) async fn post(
    policy: &Policy,
    uri: http::Uri,
    body: Vec<u8>,
    signature: String,
) -> std::result::Result<http::StatusCode, String> {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addresses = policy
        .resolve(&host, port)
        .await
        .map_err(|e| e.to_string())?;
    let mut last_error = String::new();
    let mut connected = None;
    for address in addresses {
        match tokio::net::TcpStream::connect(address).await {
            Ok(tcp) => {
                connected = Some(tcp);
                break;
            }
            Err(error) => last_error = format!("connecting to {address}: {error}"),
        }
    }
    let tcp = connected.ok_or(last_error)?;
    let request = http::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.clone(), |a| a.to_string()),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("X-MDM-Signature", signature)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    if https {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        send(hyper_util::rt::TokioIo::new(tls), request).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), request).await
    }
}

/// One request on its own connection. The connection is driven inside this
/// future, so dropping it (the outbox's attempt timeout) closes the socket;
/// the response body is not read (only its status counts).
async fn send<T>(
    io: T,
    request: http::Request<Full<Bytes>>,
) -> std::result::Result<http::StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request);
    tokio::pin!(response);
    tokio::select! {
        response = &mut response => response.map(|r| r.status()).map_err(|e| e.to_string()),
        // A receiver that answers and closes ends the connection in the same
        // poll that hands over the answer: it is there, or the request failed.
        ended = connection => match response.await {
            Ok(response) => Ok(response.status()),
            Err(error) => Err(match ended {
                Err(connection) => connection.to_string(),
                Ok(()) => error.to_string(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_unless_loopback() {
        let lab = Policy {
            allow_private: true,
            ..Policy::default()
        };
        assert!(validate_url("https://hooks.example.com/mdm", &lab).is_ok());
        assert!(validate_url("http://127.0.0.1:9000/hook", &lab).is_ok());
        assert!(validate_url("http://[::1]:9000/hook", &lab).is_ok());
        assert!(validate_url("http://localhost/hook", &lab).is_ok());
        assert!(validate_url("http://hooks.example.com/mdm", &lab).is_err());
        assert!(validate_url("http://10.0.0.1/mdm", &lab).is_err());
        assert!(validate_url("ftp://x/y", &lab).is_err());
        assert!(validate_url("not a url", &lab).is_err());
    }

    #[test]
    fn internal_hosts_are_refused_naming_the_rule_and_the_flag() {
        let policy = Policy::default();
        for url in [
            "http://127.0.0.1:9000/hook",
            "https://127.0.0.2/hook",
            "https://[::1]/hook",
            "https://localhost/hook",
            "https://LocalHost./hook",
            "https://api.localhost/hook",
            "https://10.1.2.3/hook",
            "https://172.16.0.1/hook",
            "https://192.168.1.1/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/hook",
            "https://0.0.0.0/hook",
            "https://[::]/hook",
            "https://224.0.0.1/hook",
            "https://[ff02::1]/hook",
            "https://[fe80::1]/hook",
            "https://[fc00::1]/hook",
            "https://[::ffff:10.0.0.1]/hook",
            "https://[::ffff:127.0.0.1]:8443/hook",
            "https://[64:ff9b::a00:1]/hook",
            "https://[2002:a00:1::1]/hook",
        ] {
            let Err(Error::InvalidArgument(message)) = validate_url(url, &policy) else {
                panic!("{url} accepted");
            };
            assert!(message.contains(destination::ALLOW_FLAG), "{message}");
            assert!(message.contains("internal networks"), "{message}");
        }
        for url in [
            "https://2130706433/hook",
            "https://127.1/hook",
            "https://0x7f.1/",
        ] {
            assert!(validate_url(url, &policy).is_err(), "{url} accepted");
        }
        assert!(validate_url("https://hooks.example.com/mdm", &policy).is_ok());
        assert!(validate_url("https://8.8.8.8/mdm", &policy).is_ok());
        assert!(validate_url("https://[2606:4700:4700::1111]/mdm", &policy).is_ok());
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let a = signature("k", 100, b"{}");
        assert!(a.starts_with("t=100,v1="));
        assert_ne!(a, signature("k", 101, b"{}"));
        assert_ne!(a, signature("k", 100, b"{ }"));
        assert_ne!(a, signature("j", 100, b"{}"));
    }
}
