//! The TLS side of the one port: a rustls server config (TLS 1.3 only,
//! client certificates optional at the handshake, verified against our CA
//! when presented) and the accept loop that feeds tonic finished handshakes.
//!
//! We run our own accept loop instead of tonic's `tls_config` so that a slow
//! or failing handshake never holds up other clients, TLS 1.3 is enforced,
//! and connection-level limits have one home.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// A handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS material: {0}")]
    Pem(String),
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Builds the acceptor from PEM material.
pub fn acceptor(
    ca_pem: &str,
    server_chain_pem: &str,
    server_key_pem: &str,
) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| TlsError::Pem(e.to_string()))?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let chain = CertificateDer::pem_slice_iter(server_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(server_key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How many connections one source address may hold at once in each of two
/// pools: TLS handshakes in progress, and finished connections without a
/// client certificate (enrollment, health, reflection). Connections that
/// present a valid certificate are not counted once the handshake is done,
/// so anonymous clients behind an address cannot crowd out its admins and
/// devices for longer than a handshake timeout.
#[derive(Debug)]
pub struct SourceLimits {
    limit: usize,
    handshakes: Mutex<HashMap<IpAddr, usize>>,
    anonymous: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it frees the place.
#[derive(Debug)]
pub struct SourceSlot {
    limits: Arc<SourceLimits>,
    source: IpAddr,
    anonymous: bool,
}

impl SourceLimits {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            handshakes: Mutex::default(),
            anonymous: Mutex::default(),
        })
    }

    fn pool(&self, anonymous: bool) -> &Mutex<HashMap<IpAddr, usize>> {
        if anonymous {
            &self.anonymous
        } else {
            &self.handshakes
        }
    }

    fn acquire(self: &Arc<Self>, source: IpAddr, anonymous: bool) -> Option<SourceSlot> {
        let mut pool = self
            .pool(anonymous)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let count = pool.entry(source).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            limits: self.clone(),
            source,
            anonymous,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut pool = self
            .limits
            .pool(self.anonymous)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = pool.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                pool.remove(&self.source);
            }
        }
    }
}

/// A finished TLS connection, holding its source's place while it is open.
#[derive(Debug)]
pub struct Connection {
    stream: TlsStream<TcpStream>,
    _slot: Option<SourceSlot>,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Connection {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// Accepts TCP connections until `stop` turns true, completes each TLS
/// handshake in its own task, and sends finished connections to `ready`.
/// A source over its limits is disconnected at once.
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Arc<SourceLimits>,
    ready: mpsc::Sender<Connection>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(handshake) = limits.acquire(peer.ip(), false) else {
            log_refused(
                peer,
                "too many TLS handshakes in progress from this address",
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let handshaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(handshake);
            match handshaken {
                Ok(Ok(stream)) => {
                    let slot = if stream.get_ref().1.peer_certificates().is_some() {
                        None
                    } else {
                        match limits.acquire(peer.ip(), true) {
                            Some(slot) => Some(slot),
                            None => {
                                return log_refused(
                                    peer,
                                    "too many connections without a client certificate from this address",
                                );
                            }
                        }
                    };
                    let _ = ready
                        .send(Connection {
                            stream,
                            _slot: slot,
                        })
                        .await;
                }
                Ok(Err(error)) => log_refused(peer, &error.to_string()),
                Err(_) => log_refused(peer, "handshake timed out"),
            }
        });
    }
}

fn log_refused(peer: SocketAddr, reason: &str) {
    tracing::debug!(%peer, reason, "connection refused");
}

pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
