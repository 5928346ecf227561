//! The benchmark's yardstick: a bare tonic + rustls mTLS server with no
//! storage, no identity checks beyond the handshake and no action log. It
//! speaks the same `AgentService.Connect` stream and answers the same
//! `DeviceService.LockDevice` call by writing the command straight to the
//! device's stream, so the same fan-out (admin calls in, commands out,
//! agent reports back) shows what the transport alone costs on this
//! machine. It also times a push-only fan-out: one command written to every
//! stream from inside the server, with no admin calls at all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::{Notify, mpsc};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::pb;
use pb::connect_request::Message as Up;
use pb::connect_response::Message as Down;

type StreamTx = mpsc::Sender<Result<pb::ConnectResponse, Status>>;

#[derive(Default)]
struct Echo {
    /// Each agent's stream, by the serial number its hello names.
    streams: Mutex<HashMap<String, StreamTx>>,
    results: AtomicUsize,
    next_command: AtomicU64,
    progress: Notify,
}

impl Echo {
    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, StreamTx>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn command(&self, kind: pb::ActionType) -> pb::Command {
        let id = self.next_command.fetch_add(1, Ordering::Relaxed);
        pb::Command {
            command_id: id.to_string(),
            r#type: kind.into(),
            ..Default::default()
        }
    }
}

fn outbound(command: pb::Command) -> Result<pb::ConnectResponse, Status> {
    Ok(pb::ConnectResponse {
        message: Some(Down::Command(command)),
    })
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
        let serial = match inbound.next().await {
            Some(Ok(pb::ConnectRequest {
                message: Some(Up::Hello(hello)),
            })) => hello.facts.unwrap_or_default().serial_number,
            _ => return Err(Status::invalid_argument("expected a hello")),
        };
        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(Ok(pb::ConnectResponse {
                message: Some(Down::Hello(pb::ServerHello::default())),
            }))
            .await;
        self.0.streams().insert(serial, tx);
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
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tonic::async_trait]
impl pb::device_service_server::DeviceService for EchoService {
    async fn lock_device(
        &self,
        request: Request<pb::LockDeviceRequest>,
    ) -> Result<Response<pb::LockDeviceResponse>, Status> {
        let device_id = request.into_inner().device_id;
        let stream = self
            .0
            .streams()
            .get(&device_id)
            .cloned()
            .ok_or_else(|| Status::not_found("no such stream"))?;
        let command = self.0.command(pb::ActionType::Lock);
        let action = pb::Action {
            action_id: command.command_id.clone(),
            device_id,
            r#type: pb::ActionType::Lock.into(),
            status: pb::ActionStatus::Sent.into(),
            ..Default::default()
        };
        stream
            .send(outbound(command))
            .await
            .map_err(|_| Status::unavailable("stream closed"))?;
        Ok(Response::new(pb::LockDeviceResponse {
            action: Some(action),
        }))
    }

    async fn list_devices(
        &self,
        _: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn get_device(
        &self,
        _: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn reset_passcode(
        &self,
        _: Request<pb::ResetPasscodeRequest>,
    ) -> Result<Response<pb::ResetPasscodeResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn unenroll_device(
        &self,
        _: Request<pb::UnenrollDeviceRequest>,
    ) -> Result<Response<pb::UnenrollDeviceResponse>, Status> {
        Err(Status::unimplemented("baseline"))
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
/// open-file budget). Prints `port N`, then serves. For each line on stdin:
/// `results K` prints `done` once K results in all have come back (the
/// end of an admin-driven fan-out); `push K` writes one command to every
/// stream and prints `pushed SECONDS` once K results in all have come back.
pub async fn serve(pki_dir: &std::path::Path) -> anyhow::Result<()> {
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
            .add_service(pb::agent_service_server::AgentServiceServer::new(
                echo.clone(),
            ))
            .add_service(pb::device_service_server::DeviceServiceServer::new(echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let (verb, count) = line.split_once(' ').unwrap_or((line.as_str(), "0"));
        let target: usize = count.parse()?;
        match verb {
            "results" => {
                wait(&state, target).await?;
                println!("done");
            }
            "push" => {
                let started = Instant::now();
                let streams: Vec<StreamTx> = state.streams().values().cloned().collect();
                for stream in streams {
                    let _ = stream
                        .send(outbound(state.command(pb::ActionType::Lock)))
                        .await;
                }
                wait(&state, target).await?;
                println!("pushed {}", started.elapsed().as_secs_f64());
            }
            other => anyhow::bail!("baseline: unknown request {other:?}"),
        }
    }
    Ok(())
}

async fn wait(state: &Echo, target: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let notified = state.progress.notified();
        if state.results.load(Ordering::Relaxed) >= target {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "baseline: timed out waiting for {target} results"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

/// What the baseline measured.
#[derive(Debug, Clone, Copy)]
pub struct BaselineFanOut {
    /// The same lock fan-out as ours: admin calls until every result is back.
    pub same_fanout_s: f64,
    /// CPU the baseline server used for it.
    pub server_cpu_s: f64,
    /// One command written to every stream from inside the server, until
    /// every result is back.
    pub push_only_s: f64,
}

/// Runs both baseline fan-outs against `n` agent streams, with the server
/// in a child process (`bench_exe --baseline-server DIR`). The agents and
/// the admin clients are the benchmark's own, so both sides do the same
/// work on the wire.
pub async fn fan_outs_in_child(
    n: usize,
    concurrency: usize,
    bench_exe: &std::path::Path,
) -> anyhow::Result<BaselineFanOut> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    let mut clients = write_pki(dir.path(), n + 1)?;
    let (admin_cert, admin_key) = clients.pop().expect("n + 1 identities");
    let ca = std::fs::read_to_string(dir.path().join("ca.pem"))?;
    let mut child = tokio::process::Command::new(bench_exe)
        .arg("--baseline-server")
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
    let tls = |cert: &str, key: &str| {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key))
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let connected = Arc::new(AtomicUsize::new(0));
    let (done, _) = mpsc::unbounded_channel();
    let mut sessions = Vec::with_capacity(n);
    for (i, (cert, key)) in clients.iter().enumerate() {
        let limit = limit.clone();
        let tls = tls(cert, key);
        let (done, connected) = (done.clone(), connected.clone());
        sessions.push(tokio::spawn(async move {
            let channel = {
                let _permit = limit.acquire().await.ok()?;
                crate::bench_channel_from(addr, i, tls).await.ok()?
            };
            tokio::spawn(crate::bench::agent_session(
                channel,
                crate::bench::serial(i),
                done,
                connected,
            ));
            Some(())
        }));
    }
    for session in sessions {
        session.await?;
    }
    crate::bench::until_connected(&connected, n, "every baseline stream is live").await;
    let mut admins = Vec::new();
    for _ in 0..crate::bench::ADMIN_CONNECTIONS {
        let channel = crate::bench_channel_from(addr, n, tls(&admin_cert, &admin_key)).await?;
        admins.push(pb::device_service_client::DeviceServiceClient::new(channel));
    }
    let devices: Vec<String> = (0..n).map(crate::bench::serial).collect();

    let child_pid = child.id().unwrap_or(0);
    eprintln!("bench: baseline lock fan-out to {n} streams");
    let started = Instant::now();
    let cpu_before = crate::bench::cpu_seconds(child_pid);
    let issued = crate::bench::issue_commands(&admins, &devices, "lock").await?;
    anyhow::ensure!(
        issued.len() == n,
        "baseline: only {} of {n} calls succeeded",
        issued.len()
    );
    stdin.write_all(format!("results {n}\n").as_bytes()).await?;
    anyhow::ensure!(
        lines.next_line().await?.as_deref() == Some("done"),
        "the baseline server did not report"
    );
    let same_fanout_s = started.elapsed().as_secs_f64();
    let server_cpu_s = crate::bench::cpu_seconds(child_pid) - cpu_before;

    stdin
        .write_all(format!("push {}\n", 2 * n).as_bytes())
        .await?;
    let push_only_s: f64 = lines
        .next_line()
        .await?
        .and_then(|l| l.strip_prefix("pushed ").and_then(|v| v.parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("the baseline server did not report"))?;
    let _ = child.kill().await;
    Ok(BaselineFanOut {
        same_fanout_s,
        server_cpu_s,
        push_only_s,
    })
}
