//! The scale benchmark behind `cargo xtask bench`: thousands of agents in
//! one process, each with its own key, CSR-issued certificate and mTLS
//! connection from its own loopback address, against the real server
//! binary; and the same fan-out against a bare tonic + rustls echo server
//! measured in the same run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pb;
use pb::connect_request::Message as Up;
use pb::connect_response::Message as Down;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub agents: usize,
    pub server_bin: PathBuf,
    /// Concurrent enrollments and admin clients.
    pub concurrency: usize,
    /// The `mdm-bench` binary: the baseline server runs in its own process,
    /// so each side has its own open-file budget.
    pub bench_exe: PathBuf,
    /// Store in this PostgreSQL server (a new database per run) instead of
    /// the embedded store; the URL may hold the password, so it reaches
    /// the server in its environment.
    pub database_url: Option<String>,
    /// `pgbench`, for the insert baseline of a PostgreSQL run.
    pub pgbench: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 - 1.0) * q).round() as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        Self {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
        }
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FanOut {
    /// From the first admin call until every action is SUCCEEDED in the log.
    pub total_s: f64,
    /// Until the last admin call returned.
    pub calls_s: f64,
    /// Until the last agent sent its result.
    pub agents_done_s: f64,
    /// CPU the server used from the first call until every action was SUCCEEDED.
    pub server_cpu_s: f64,
    pub per_action: Latency,
    pub admin_call: Latency,
}

/// PostgreSQL's side of a run on it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PostgresFigures {
    /// Transactions that wrote during each fan-out (transaction ids used).
    pub lock_write_transactions: i64,
    pub lock_write_transactions_per_s: f64,
    pub reset_write_transactions: i64,
    pub reset_write_transactions_per_s: f64,
    /// Transactions rolled back over the whole run (conflicts retried,
    /// refused calls).
    pub rolled_back: i64,
    /// `pgbench`: one-row autocommit inserts from as many clients as the
    /// server's pool, on the same cluster after the server stopped.
    pub pgbench_insert_tps: Option<f64>,
    pub pgbench_clients: usize,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// "sled" or "postgres".
    pub store: String,
    pub postgres: Option<PostgresFigures>,
    pub agents: usize,
    pub enroll_per_s: f64,
    pub enroll: Latency,
    pub connect_ramp_s: f64,
    pub server_rss_before_kb: u64,
    pub server_rss_after_kb: u64,
    pub kb_per_agent: f64,
    pub lock: FanOut,
    pub reset: FanOut,
    pub list_actions_page_100: Latency,
    pub actions_stored: usize,
    /// The same lock fan-out against the baseline server (no storage).
    pub baseline_fanout_s: f64,
    pub baseline_server_cpu_s: f64,
    pub lock_vs_baseline: f64,
    /// The baseline writing one command to every stream itself (no admin calls).
    pub baseline_push_only_s: f64,
    pub lock_vs_push_only: f64,
}

pub fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        ((i / 250) % 250) as u8,
        (i % 250 + 2) as u8,
    ))
}

/// A channel from loopback address `source` to `server`.
pub async fn channel_from(
    server: SocketAddr,
    source: IpAddr,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_: http::Uri| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    Endpoint::from_shared(format!("https://localhost:{}", server.port()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(30))
        .connect_with_connector(connector)
        .await
}

/// Waits (at most 5 minutes) until `n` agent sessions say they are connected.
pub(crate) async fn until_connected(connected: &AtomicUsize, n: usize, what: &str) {
    crate::eventually_within(Duration::from_secs(300), what, &mut || {
        let count = connected.load(Ordering::Relaxed);
        async move { (count >= n).then_some(()) }
    })
    .await;
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    // Fields 14 and 15 of /proc/PID/stat, in clock ticks (100 per second
    // on Linux); the command name in field 2 may hold spaces, so count from
    // its closing parenthesis.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
            Some((ticks(11)? + ticks(12)?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// The server's default pool of database connections (`PgConfig`).
const POSTGRES_POOL_SIZE: usize = 16;

/// Admin connections a fan-out uses, and calls in flight on each.
pub const ADMIN_CONNECTIONS: usize = 8;
const CALLS_IN_FLIGHT: usize = 16;

/// The serial number the benchmark gives agent `i`; the baseline server
/// finds an agent's stream by it.
pub fn serial(i: usize) -> String {
    format!("BENCH-{i}")
}

/// One simulated agent on its own stream: acknowledges, reports progress
/// and success for every command, and tells `done` when each finished.
pub async fn agent_session(
    channel: Channel,
    serial: String,
    done: mpsc::UnboundedSender<(String, Instant)>,
    connected: Arc<AtomicUsize>,
) {
    let (tx, rx) = mpsc::channel(32);
    let capabilities = [
        pb::ActionType::Lock,
        pb::ActionType::ResetPasscode,
        pb::ActionType::Unenroll,
    ]
    .iter()
    .map(|a| pb::DeviceCapability {
        action: (*a).into(),
        supported: true,
        reason: String::new(),
    })
    .collect();
    let hello = pb::AgentHello {
        facts: Some(pb::DeviceFacts {
            platform: pb::Platform::Linux.into(),
            agent_version: "bench".into(),
            serial_number: serial,
            capabilities,
            ..Default::default()
        }),
        compliance: None,
    };
    let _ = tx
        .send(pb::ConnectRequest {
            message: Some(Up::Hello(hello)),
        })
        .await;
    let Ok(response) = pb::agent_service_client::AgentServiceClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = response.into_inner();
    while let Some(Ok(message)) = inbound.next().await {
        match message.message {
            Some(Down::Hello(_)) => {
                connected.fetch_add(1, Ordering::Relaxed);
            }
            Some(Down::Command(command)) => {
                let id = command.command_id.clone();
                let send = |m| pb::ConnectRequest { message: Some(m) };
                let _ = tx
                    .send(send(Up::Ack(pb::CommandAck {
                        command_id: id.clone(),
                    })))
                    .await;
                let step = if command.r#type() == pb::ActionType::ResetPasscode {
                    "passcode set"
                } else {
                    "device locked"
                };
                let _ = tx
                    .send(send(Up::Progress(pb::CommandProgress {
                        command_id: id.clone(),
                        step: step.into(),
                    })))
                    .await;
                let _ = tx
                    .send(send(Up::Result(pb::CommandResult {
                        command_id: id.clone(),
                        succeeded: true,
                        ..Default::default()
                    })))
                    .await;
                let _ = done.send((id, Instant::now()));
            }
            _ => {}
        }
    }
}

/// Issues one command of `kind` ("lock" or "reset") per device, as fast as
/// the server takes them: every admin connection with several calls in
/// flight, so concurrent calls share the server's group-committed flushes.
/// Returns (action id, call start, call latency) per accepted call.
pub async fn issue_commands(
    admins: &[pb::device_service_client::DeviceServiceClient<Channel>],
    device_ids: &[String],
    kind: &'static str,
) -> anyhow::Result<Vec<(String, Instant, Duration)>> {
    let per_admin = device_ids.len().div_ceil(admins.len()).max(1);
    let mut calls = Vec::new();
    for (admin, chunk) in admins.iter().zip(device_ids.chunks(per_admin)) {
        let admin = admin.clone();
        let chunk = chunk.to_vec();
        calls.push(tokio::spawn(async move {
            futures::stream::iter(chunk)
                .map(|device_id| {
                    let mut admin = admin.clone();
                    async move {
                        let begun = Instant::now();
                        let action = if kind == "lock" {
                            admin
                                .lock_device(pb::LockDeviceRequest {
                                    device_id,
                                    ..Default::default()
                                })
                                .await
                                .map(|r| r.into_inner().action)
                        } else {
                            admin
                                .reset_passcode(pb::ResetPasscodeRequest {
                                    device_id,
                                    confirm_user_email: "bench@example.com".into(),
                                    ..Default::default()
                                })
                                .await
                                .map(|r| r.into_inner().action)
                        };
                        match action {
                            Ok(Some(action)) => Some((action.action_id, begun, begun.elapsed())),
                            _ => None,
                        }
                    }
                })
                .buffer_unordered(CALLS_IN_FLIGHT)
                .filter_map(|x| async move { x })
                .collect::<Vec<_>>()
                .await
        }));
    }
    let mut accepted = Vec::with_capacity(device_ids.len());
    for call in calls {
        accepted.extend(call.await?);
    }
    Ok(accepted)
}

/// Runs the whole benchmark. Prints progress to stderr.
pub async fn run(options: BenchOptions) -> anyhow::Result<Report> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = options.agents;
    let temp = tempfile::tempdir()?;
    let data_dir = temp.path().join("data");
    let port = crate::free_port();
    let database = match &options.database_url {
        Some(base) => Some(crate::bench_postgres::fresh_database(base, "store").await?),
        None => None,
    };
    let mut server = tokio::process::Command::new(&options.server_bin);
    if let Some(url) = &database {
        server.env("MDM_DATABASE_URL", url);
    }
    let mut server = server
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--heartbeat-interval",
            "60s",
            "--data-dir",
        ])
        .arg(&data_dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let server_pid = server.id().unwrap_or(0);
    let handle = crate::TestServer::attach(port, &data_dir);
    let owner_key = data_dir.join("credentials/owner/admin.key");
    crate::eventually("the server starts", || {
        let ready = owner_key.exists();
        async move {
            (ready
                && tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok())
            .then_some(())
        }
    })
    .await;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let ca = std::fs::read_to_string(data_dir.join("pki/ca.crt"))?;
    let (site_id, passcode) = crate::site_with_passcode(&handle, "bench@example.com", 100).await;
    let mut report = Report {
        store: if database.is_some() {
            "postgres"
        } else {
            "sled"
        }
        .into(),
        postgres: database.as_ref().map(|_| PostgresFigures::default()),
        agents: n,
        ..Default::default()
    };

    // 1. Enrollment.
    eprintln!("bench: enrolling {n} agents");
    let limit = Arc::new(Semaphore::new(options.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let limit = limit.clone();
        let ca = ca.clone();
        let passcode = passcode.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.ok()?;
            let (key, csr) = mdm_agent::enroll::key_and_csr("bench").ok()?;
            let begun = Instant::now();
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .domain_name("localhost");
            let channel = channel_from(addr, source_ip(i), tls).await.ok()?;
            let response = pb::enrollment_service_client::EnrollmentServiceClient::new(channel)
                .enroll(pb::EnrollRequest {
                    user_email: "bench@example.com".into(),
                    company_passcode: passcode,
                    csr_pem: csr,
                    device: Some(pb::DeviceFacts {
                        platform: pb::Platform::Linux.into(),
                        serial_number: serial(i),
                        ..Default::default()
                    }),
                })
                .await
                .ok()?
                .into_inner();
            Some((
                response.device_id,
                response.certificate_chain_pem,
                key,
                begun.elapsed(),
            ))
        }));
    }
    let mut identities = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    for task in tasks {
        if let Some((device_id, cert, key, latency)) = task.await? {
            identities.push((device_id, cert, key));
            latencies.push(latency);
        }
    }
    anyhow::ensure!(
        identities.len() == n,
        "only {} of {n} enrollments succeeded",
        identities.len()
    );
    report.enroll_per_s = n as f64 / started.elapsed().as_secs_f64();
    report.enroll = Latency::of(latencies);

    // 2. Connect ramp and memory.
    eprintln!("bench: connecting {n} agents");
    report.server_rss_before_kb = rss_kb(server_pid);
    let connected = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut connects = Vec::with_capacity(n);
    for (i, (_, cert, key)) in identities.iter().enumerate() {
        let limit = limit.clone();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key.as_str()));
        let done = done_tx.clone();
        let connected = connected.clone();
        connects.push(tokio::spawn(async move {
            let channel = {
                let _permit = limit.acquire().await.ok()?;
                channel_from(addr, source_ip(i), tls).await.ok()?
            };
            tokio::spawn(agent_session(channel, serial(i), done, connected));
            Some(())
        }));
    }
    for connect in connects {
        connect.await?;
    }
    until_connected(&connected, n, "every agent stream is live").await;
    report.connect_ramp_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.server_rss_after_kb = rss_kb(server_pid);
    report.kb_per_agent = report
        .server_rss_after_kb
        .saturating_sub(report.server_rss_before_kb) as f64
        / n as f64;

    // 3 and 4. Fan-outs.
    let owner = handle.owner();
    let mut admins = Vec::new();
    for _ in 0..ADMIN_CONNECTIONS {
        admins.push(pb::device_service_client::DeviceServiceClient::new(
            handle.admin_channel(&owner).await,
        ));
    }
    let device_ids: Vec<String> = identities.iter().map(|(id, _, _)| id.clone()).collect();
    for kind in ["lock", "reset"] {
        eprintln!("bench: {kind} fan-out to {n} devices");
        let transactions_before = match &database {
            Some(url) => crate::bench_postgres::next_transaction_id(url).await?,
            None => 0,
        };
        let started = Instant::now();
        let cpu_before = cpu_seconds(server_pid);
        let calls = issue_commands(&admins, &device_ids, kind).await?;
        let calls_s = started.elapsed().as_secs_f64();
        let mut issued = std::collections::HashMap::new();
        let mut admin_latencies = Vec::new();
        for (id, begun, latency) in calls {
            issued.insert(id, begun);
            admin_latencies.push(latency);
        }
        anyhow::ensure!(
            issued.len() == n,
            "{kind}: only {} of {n} calls succeeded",
            issued.len()
        );
        // The agents report the result right after they saw the command; the
        // action log is then checked to hold every action SUCCEEDED.
        let mut per_action = Vec::with_capacity(n);
        let mut finished = 0;
        while finished < n {
            let (id, at) = tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("agents stopped"))?;
            if let Some(begun) = issued.get(&id) {
                per_action.push(at - *begun);
                finished += 1;
            }
        }
        let agents_done_s = started.elapsed().as_secs_f64();
        let log = pb::action_log_service_client::ActionLogServiceClient::new(
            handle.admin_channel(&owner).await,
        );
        let wanted = if kind == "lock" {
            pb::ActionType::Lock
        } else {
            pb::ActionType::ResetPasscode
        };
        crate::eventually_within(
            Duration::from_secs(120),
            "every action is SUCCEEDED in the log",
            &mut || {
                let mut log = log.clone();
                let site_id = site_id.clone();
                async move {
                    let succeeded = crate::all_actions(
                        &mut log,
                        pb::ListActionsRequest {
                            site_id,
                            r#type: wanted.into(),
                            status: pb::ActionStatus::Succeeded.into(),
                            page_size: 1000,
                            ..Default::default()
                        },
                    )
                    .await
                    .ok()?;
                    (succeeded.len() >= n).then_some(())
                }
            },
        )
        .await;
        let fan = FanOut {
            total_s: started.elapsed().as_secs_f64(),
            server_cpu_s: cpu_seconds(server_pid) - cpu_before,
            calls_s,
            agents_done_s,
            per_action: Latency::of(per_action),
            admin_call: Latency::of(admin_latencies),
        };
        if let (Some(url), Some(figures)) = (&database, report.postgres.as_mut()) {
            let transactions =
                crate::bench_postgres::next_transaction_id(url).await? - transactions_before;
            let per_s = transactions as f64 / fan.total_s.max(1e-9);
            if kind == "lock" {
                figures.lock_write_transactions = transactions;
                figures.lock_write_transactions_per_s = per_s;
            } else {
                figures.reset_write_transactions = transactions;
                figures.reset_write_transactions_per_s = per_s;
            }
        }
        if kind == "lock" {
            report.lock = fan;
        } else {
            report.reset = fan;
        }
    }

    // 5. ListActions pages with 2N actions stored.
    report.actions_stored = 2 * n;
    let mut log = pb::action_log_service_client::ActionLogServiceClient::new(
        handle.admin_channel(&owner).await,
    );
    let mut samples = Vec::new();
    let mut token = String::new();
    for _ in 0..200 {
        let begun = Instant::now();
        let page = log
            .list_actions(pb::ListActionsRequest {
                site_id: site_id.clone(),
                page_size: 100,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        samples.push(begun.elapsed());
        token = page.next_page_token;
    }
    report.list_actions_page_100 = Latency::of(samples);

    // 6. Baseline, after our server and its agent streams are gone (one
    // process holds about 20,000 files).
    let _ = server.kill().await;
    drop(identities);
    if let (Some(url), Some(figures)) = (&database, report.postgres.as_mut()) {
        figures.rolled_back = crate::bench_postgres::rolled_back(url).await?;
        figures.pgbench_clients = POSTGRES_POOL_SIZE;
        if let (Some(pgbench), Some(base)) = (&options.pgbench, &options.database_url) {
            eprintln!("bench: pgbench insert baseline ({POSTGRES_POOL_SIZE} clients, 10 s)");
            figures.pgbench_insert_tps = Some(
                crate::bench_postgres::insert_baseline(
                    pgbench,
                    base,
                    POSTGRES_POOL_SIZE,
                    Duration::from_secs(10),
                )
                .await?,
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("bench: baseline fan-outs to {n} streams (the same admin calls, then push-only)");
    let baseline =
        crate::baseline::fan_outs_in_child(n, options.concurrency, &options.bench_exe).await?;
    report.baseline_fanout_s = baseline.same_fanout_s;
    report.baseline_server_cpu_s = baseline.server_cpu_s;
    report.lock_vs_baseline = report.lock.total_s / baseline.same_fanout_s.max(1e-9);
    report.baseline_push_only_s = baseline.push_only_s;
    report.lock_vs_push_only = report.lock.total_s / baseline.push_only_s.max(1e-9);
    Ok(report)
}

impl Report {
    pub fn table(&self) -> String {
        let l = |x: &Latency| format!("p50 {:.1} ms, p99 {:.1} ms", x.p50_ms, x.p99_ms);
        let fan = |f: &FanOut| {
            format!(
                "{:.2} s to SUCCEEDED (calls done {:.2} s, agents done {:.2} s; server CPU {:.2} s); per action {}; admin call {}",
                f.total_s,
                f.calls_s,
                f.agents_done_s,
                f.server_cpu_s,
                l(&f.per_action),
                l(&f.admin_call)
            )
        };
        let postgres = self.postgres.as_ref().map_or(String::new(), |pg| {
            let per = |tx: i64| tx as f64 / self.agents.max(1) as f64;
            format!(
                "PostgreSQL, lock fan-out    {} write transactions ({:.1} per command), {:.0}/s\n\
                 PostgreSQL, reset fan-out   {} write transactions ({:.1} per command), {:.0}/s\n\
                 PostgreSQL, rolled back     {} transactions in the whole run\n\
                 pgbench one-row inserts     {} ({} clients, same cluster)\n",
                pg.lock_write_transactions,
                per(pg.lock_write_transactions),
                pg.lock_write_transactions_per_s,
                pg.reset_write_transactions,
                per(pg.reset_write_transactions),
                pg.reset_write_transactions_per_s,
                pg.rolled_back,
                pg.pgbench_insert_tps
                    .map_or("not run (no pgbench)".to_owned(), |tps| format!(
                        "{tps:.0} transactions/s"
                    )),
                pg.pgbench_clients,
            )
        });
        format!(
            "store                       {}\n\
             agents                      {}\n\
             enrollment                  {:.0}/s  ({})\n\
             connect ramp                {:.1} s to {} live streams\n\
             server RSS                  {} KB -> {} KB = {:.1} KB per connected agent\n\
             lock fan-out                {}\n\
             reset fan-out               {}\n\
             ListActions page of 100     {} ({} actions stored)\n\
             baseline lock fan-out       {:.2} s (same admin calls and agents, no storage; server CPU {:.2} s)\n\
             lock fan-out / baseline     {:.1}x\n\
             baseline push-only          {:.2} s (commands written by the server itself)\n\
             lock fan-out / push-only    {:.1}x\n\
             {}",
            self.store,
            self.agents,
            self.enroll_per_s,
            l(&self.enroll),
            self.connect_ramp_s,
            self.agents,
            self.server_rss_before_kb,
            self.server_rss_after_kb,
            self.kb_per_agent,
            fan(&self.lock),
            fan(&self.reset),
            l(&self.list_actions_page_100),
            self.actions_stored,
            self.baseline_fanout_s,
            self.baseline_server_cpu_s,
            self.lock_vs_baseline,
            self.baseline_push_only_s,
            self.lock_vs_push_only,
            postgres,
        )
    }
}
