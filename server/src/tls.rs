//! The TLS side of the one port: a rustls server config (TLS 1.3 only,
//! client certificates optional at the handshake, verified against our CA
//! when presented) and the accept loop that feeds tonic finished handshakes.
//!
//! We run our own accept loop instead of tonic's `tls_config` so that a slow
//! or failing handshake never holds up other clients, TLS 1.3 is enforced,
//! and connection-level limits have one home.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
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

    /// `source` counts as its IPv6 /64 (one host holds a whole /64).
    fn acquire(self: &Arc<Self>, source: IpAddr, anonymous: bool) -> Option<SourceSlot> {
        let source = crate::throttle::source_key(source);
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

/// For a client certificate (leaf, DER) of an identity that may use the
/// server now (an unrevoked admin, a current certificate of an enrolled
/// device), a check of whether that still holds; None for anything else,
/// which counts like a connection without a certificate. The certificate is
/// parsed once per connection, not at every check.
pub type Authorize = dyn Fn(&[u8]) -> futures::future::BoxFuture<'static, Option<Arc<StillAuthorized>>>
    + Send
    + Sync;
pub type StillAuthorized = dyn Fn() -> futures::future::BoxFuture<'static, bool> + Send + Sync;

/// How often open connections with a certificate are checked again, so a
/// revoked identity stops escaping the per-source limit.
const RECHECK_EVERY: Duration = Duration::from_secs(5);
const RECHECKS_AT_ONCE: usize = 256;

/// The open connections by peer address: a session can close its own
/// connection, and connections whose identity was revoked are counted again.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<SocketAddr, Arc<ConnectionEntry>>>,
}

struct ConnectionEntry {
    source: IpAddr,
    /// While set and true, the connection is not counted.
    still_authorized: Option<Arc<StillAuthorized>>,
    closed: CancellationToken,
    /// A place in the source's pool of connections without a valid identity.
    slot: Mutex<Option<SourceSlot>>,
}

impl std::fmt::Debug for ConnectionEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionEntry")
            .field("source", &self.source)
            .field("authenticated", &self.still_authorized.is_some())
            .finish_non_exhaustive()
    }
}

impl Connections {
    /// Closes the connection from `peer` (every call on it ends), if open.
    pub fn close(&self, peer: SocketAddr) {
        if let Some(entry) = self.lock().get(&peer) {
            tracing::info!(%peer, "closing the connection");
            entry.closed.cancel();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<ConnectionEntry>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts every connection whose certificate is no longer authorized
    /// against its source's anonymous pool, closing it when that is full.
    async fn recheck(&self, limits: &Arc<SourceLimits>) {
        let entries: Vec<(SocketAddr, Arc<ConnectionEntry>)> = self
            .lock()
            .iter()
            .map(|(peer, entry)| (*peer, entry.clone()))
            .collect();
        // Checked many at a time: a store on a database answers concurrent
        // device reads with one query.
        let revoked: Vec<(SocketAddr, Arc<ConnectionEntry>)> = futures::stream::iter(entries)
            .map(|(peer, entry)| async move {
                let still_authorized = entry.still_authorized.clone()?;
                let counted = entry
                    .slot
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some();
                (!counted && !still_authorized().await).then_some((peer, entry))
            })
            .buffer_unordered(RECHECKS_AT_ONCE)
            .filter_map(|revoked| async move { revoked })
            .collect()
            .await;
        for (peer, entry) in revoked {
            let mut slot = entry.slot.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_some() {
                continue;
            }
            match limits.acquire(entry.source, true) {
                Some(anonymous) => *slot = Some(anonymous),
                None => {
                    log_refused(
                        peer,
                        "its certificate was revoked and its address has too many connections without a valid one",
                    );
                    entry.closed.cancel();
                }
            }
        }
    }
}

/// A finished TLS connection, holding its source's place while it is open.
/// Once closed through [`Connections::close`] it fails every read and write,
/// so hyper drops it with all its calls, even when the peer reads nothing.
pub struct Connection {
    stream: TlsStream<TcpStream>,
    peer: SocketAddr,
    entry: Arc<ConnectionEntry>,
    connections: Arc<Connections>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut open = self.connections.lock();
        if open
            .get(&self.peer)
            .is_some_and(|entry| Arc::ptr_eq(entry, &self.entry))
        {
            open.remove(&self.peer);
        }
    }
}

impl Connection {
    fn check_open(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed by the server",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check_open(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check_open(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check_open(cx)?;
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
        self.check_open(cx)?;
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

/// What the accept loop needs besides the listener.
pub struct Acceptance {
    pub acceptor: TlsAcceptor,
    pub limits: Arc<SourceLimits>,
    pub connections: Arc<Connections>,
    pub authorize: Arc<Authorize>,
}

impl std::fmt::Debug for Acceptance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptance")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Accepts TCP connections until `stop` turns true, completes each TLS
/// handshake in its own task, and sends finished connections to `ready`.
/// A source over its limits is disconnected at once. A connection counts as
/// authenticated only while its certificate is authorized (checked at the
/// handshake and every few seconds after).
pub async fn accept_loop(
    listener: TcpListener,
    acceptance: Acceptance,
    ready: mpsc::Sender<Connection>,
    mut stop: watch::Receiver<bool>,
) {
    let Acceptance {
        acceptor,
        limits,
        connections,
        authorize,
    } = acceptance;
    let recheck = {
        let (connections, limits, mut stop) = (connections.clone(), limits.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RECHECK_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stopped(&mut stop) => return,
                    _ = every.tick() => {
                        connections.recheck(&limits).await;
                    }
                }
            }
        })
    };
    let _recheck = AbortOnDrop(recheck);
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
        let connections = connections.clone();
        let authorize = authorize.clone();
        tokio::spawn(async move {
            let handshaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(handshake);
            match handshaken {
                Ok(Ok(stream)) => {
                    let leaf = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| leaf.as_ref().to_vec());
                    let still_authorized = match leaf {
                        Some(leaf) => authorize(&leaf).await,
                        None => None,
                    };
                    let slot = if still_authorized.is_some() {
                        None
                    } else {
                        match limits.acquire(peer.ip(), true) {
                            Some(slot) => Some(slot),
                            None => {
                                return log_refused(
                                    peer,
                                    "too many connections without a valid client certificate from this address",
                                );
                            }
                        }
                    };
                    let entry = Arc::new(ConnectionEntry {
                        source: peer.ip(),
                        still_authorized,
                        closed: CancellationToken::new(),
                        slot: Mutex::new(slot),
                    });
                    connections.lock().insert(peer, entry.clone());
                    let closed = Box::pin(entry.closed.clone().cancelled_owned());
                    let _ = ready
                        .send(Connection {
                            stream,
                            peer,
                            entry,
                            connections,
                            closed,
                        })
                        .await;
                }
                Ok(Err(error)) => log_refused(peer, &error.to_string()),
                Err(_) => log_refused(peer, "handshake timed out"),
            }
        });
    }
}

/// Aborts the task when the accept loop ends (also when it is aborted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn log_refused(peer: SocketAddr, reason: &str) {
    tracing::debug!(%peer, reason, "connection refused");
}

pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ipv6_64_shares_the_places_of_one_source() {
        let limits = SourceLimits::new(2);
        let address = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 7, 0, 0, 0, last]);
        let held: Vec<SourceSlot> = (1..=2)
            .map(|i| limits.acquire(address(i), true).expect("room"))
            .collect();
        assert!(
            limits.acquire(address(3), true).is_none(),
            "another address of the same /64 is the same source"
        );
        let other = IpAddr::from([0x2001, 0xdb8, 0, 8, 0, 0, 0, 1]);
        assert!(limits.acquire(other, true).is_some(), "another /64 is not");
        drop(held);
        assert!(limits.acquire(address(3), true).is_some());
    }
}
