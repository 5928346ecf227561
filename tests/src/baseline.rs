//! The benchmark's yardstick: a bare tonic + rustls mTLS server speaking
//! the same `AgentService.Connect` stream, with no storage, no identity
//! checks beyond the handshake, and no action log. Its fan-out (one command
//! to every stream, until every result is back) bounds what the transport
//! alone costs on this machine.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::pb;
use pb::connect_request::Message as Up;
use pb::connect_response::Message as Down;

#[derive(Default)]
struct Echo {
    streams: Mutex<Vec<mpsc::Sender<Result<pb::ConnectResponse, Status>>>>,
    results: AtomicUsize,
    progress: Notify,
}

#[derive(Clone, Default)]
struct EchoService(Arc<Echo>);

type BoxStream = Pin<Box<dyn Stream<Item = Result<pb::ConnectResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for EchoService {
    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<BoxStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(Ok(pb::ConnectResponse {
                message: Some(Down::Hello(pb::ServerHello::default())),
            }))
            .await;
        self.0
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        self.0.progress.notify_waiters();
        let echo = self.0.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                if let Some(Up::Result(_)) = message.message {
                    echo.results.fetch_add(1, Ordering::Relaxed);
                    echo.progress.notify_waiters();
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// (cert PEM, key PEM).
type Pem = (String, String);

/// CA certificate, server identity, one identity per client.
fn pki(clients: usize) -> anyhow::Result<(String, Pem, Vec<Pem>)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate()?;
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?
        .signed_by(&server_key, &issuer)?;
    let mut identities = Vec::with_capacity(clients);
    for i in 0..clients {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec![format!("client{i}.local")])?
            .signed_by(&key, &issuer)?;
        identities.push((cert.pem(), key.serialize_pem()));
    }
    Ok((
        ca_cert.pem(),
        (server.pem(), server_key.serialize_pem()),
        identities,
    ))
}

/// The PKI the baseline uses, as PEM files in `dir`: the parent (clients)
/// and the child (server) share it.
pub fn write_pki(dir: &std::path::Path, clients: usize) -> anyhow::Result<Vec<Pem>> {
    let (ca, (cert, key), identities) = pki(clients)?;
    std::fs::write(dir.join("ca.pem"), ca)?;
    std::fs::write(dir.join("server.pem"), cert)?;
    std::fs::write(dir.join("server.key"), key)?;
    Ok(identities)
}

/// The baseline server, run in its own process (so each side has its own
/// open-file budget): prints `port N`, waits for `n` streams, then for a
/// line on stdin, fans one command out to every stream and prints
/// `elapsed SECONDS` once every result is back.
pub async fn serve(n: usize, pki_dir: &std::path::Path) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let ca = std::fs::read_to_string(pki_dir.join("ca.pem"))?;
    let cert = std::fs::read_to_string(pki_dir.join("server.pem"))?;
    let key = std::fs::read_to_string(pki_dir.join("server.key"))?;
    let echo = EchoService::default();
    let state = echo.0.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("port {}", listener.local_addr()?.port());
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&cert, &key))
        .client_ca_root(Certificate::from_pem(&ca));
    tokio::spawn(
        Server::builder()
            .tls_config(tls)?
            .add_service(pb::agent_service_server::AgentServiceServer::new(echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    wait(&state, n, "streams", |s| {
        s.streams.lock().unwrap_or_else(|p| p.into_inner()).len()
    })
    .await?;
    let started = Instant::now();
    let streams = state
        .streams
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (i, stream) in streams.iter().enumerate() {
        let command = pb::Command {
            command_id: i.to_string(),
            r#type: pb::ActionType::Lock.into(),
            ..Default::default()
        };
        let _ = stream
            .send(Ok(pb::ConnectResponse {
                message: Some(Down::Command(command)),
            }))
            .await;
    }
    wait(&state, n, "results", |s| s.results.load(Ordering::Relaxed)).await?;
    println!("elapsed {}", started.elapsed().as_secs_f64());
    Ok(())
}

async fn wait(
    state: &Echo,
    target: usize,
    what: &str,
    count: fn(&Echo) -> usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let notified = state.progress.notified();
        if count(state) >= target {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "baseline: timed out waiting for {what}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

/// Seconds from sending one command on each of `n` mTLS streams until
/// every result is back, with the server in a child process (`bench_exe
/// --baseline-server`).
pub async fn fan_out_in_child(
    n: usize,
    concurrency: usize,
    bench_exe: &std::path::Path,
) -> anyhow::Result<f64> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    let clients = write_pki(dir.path(), n)?;
    let ca = std::fs::read_to_string(dir.path().join("ca.pem"))?;
    let mut child = tokio::process::Command::new(bench_exe)
        .arg("--baseline-server")
        .arg(n.to_string())
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let mut lines = tokio::io::BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .lines();
    let port: u16 = lines
        .next_line()
        .await?
        .and_then(|l| l.strip_prefix("port ").and_then(|p| p.parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("the baseline server did not start"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut sessions = Vec::with_capacity(n);
    for (i, (cert, key)) in clients.into_iter().enumerate() {
        let limit = limit.clone();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key));
        sessions.push(tokio::spawn(client(addr, i, tls, limit)));
    }
    for session in sessions {
        session.await?;
    }
    stdin.write_all(b"go\n").await?;
    let elapsed: f64 = lines
        .next_line()
        .await?
        .and_then(|l| l.strip_prefix("elapsed ").and_then(|v| v.parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("the baseline server did not report"))?;
    let _ = child.kill().await;
    Ok(elapsed)
}

async fn client(
    addr: SocketAddr,
    i: usize,
    tls: ClientTlsConfig,
    limit: Arc<tokio::sync::Semaphore>,
) -> Option<()> {
    let channel = {
        let _permit = limit.acquire().await.ok()?;
        crate::bench_channel_from(addr, i, tls).await.ok()?
    };
    let (tx, rx) = mpsc::channel(8);
    let _ = tx
        .send(pb::ConnectRequest {
            message: Some(Up::Hello(pb::AgentHello::default())),
        })
        .await;
    let mut inbound = pb::agent_service_client::AgentServiceClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
        .ok()?
        .into_inner();
    tokio::spawn(async move {
        while let Some(Ok(message)) = inbound.next().await {
            if let Some(Down::Command(command)) = message.message {
                let result = pb::CommandResult {
                    command_id: command.command_id,
                    succeeded: true,
                    ..Default::default()
                };
                let _ = tx
                    .send(pb::ConnectRequest {
                        message: Some(Up::Result(result)),
                    })
                    .await;
            }
        }
    });
    Some(())
}
