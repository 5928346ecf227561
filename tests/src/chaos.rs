//! Crash-restart run (`cargo xtask chaos`, and a short version in the suite):
//! the real server and real agent processes, a fan-out of locks and resets,
//! and SIGKILLs of the server and of agents at random moments. At the end
//! every command the server accepted must be final, none lost, and no device
//! may have applied any command twice.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use mdm_proto::v1 as pb;
use rand::Rng;
use serde::Serialize;
use tokio::process::Child;
use tokio::sync::Mutex;

use crate::{Credential, TestAgent, TestServer, site_with_passcode};

/// The failure reason an agent reports for a command it was killed in the middle of.
const INTERRUPTED: &str = "stopped while applying";

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub agents: usize,
    pub server_kills: usize,
    pub agent_kills: usize,
    /// How long the simulated device takes per command, so that kills land mid-way.
    pub simulated_delay: Duration,
    /// Concurrent admin clients issuing locks and resets.
    pub admin_clients: usize,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        Self {
            agents: 200,
            server_kills: 20,
            agent_kills: 20,
            simulated_delay: Duration::from_millis(20),
            admin_clients: 4,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct ChaosReport {
    pub agents: usize,
    pub server_kills: usize,
    pub agent_kills: usize,
    /// Lock and reset calls that returned OK.
    pub accepted: usize,
    pub accepted_locks: usize,
    pub accepted_resets: usize,
    /// Calls refused or cut off (server down, restarting, deadline).
    pub calls_not_accepted: usize,
    /// Actions in the log whose call never returned OK (the server died before answering).
    pub stored_unacknowledged: usize,
    pub succeeded: usize,
    /// Superseded by a newer lock or reset before delivery.
    pub canceled: usize,
    pub expired: usize,
    /// The agent was killed while applying: reported failed, not applied again.
    pub interrupted: usize,
    pub failed_other: usize,
    /// Accepted actions missing from the log.
    pub lost: usize,
    /// Actions not final when the run gave up waiting.
    pub unsettled: usize,
    /// Commands some device applied more than once.
    pub applied_twice: usize,
    pub server_restart_ms_max: u64,
    pub server_restart_ms_mean: u64,
    /// From the last kill until every action was final.
    pub settle_secs: f64,
    pub total_secs: f64,
    /// Every broken promise, spelled out.
    pub violations: Vec<String>,
}

impl ChaosReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn table(&self) -> String {
        let rows = [
            ("agents (real mdm-agent processes)", self.agents.to_string()),
            ("server SIGKILLs + restarts", self.server_kills.to_string()),
            ("agent SIGKILLs + restarts", self.agent_kills.to_string()),
            (
                "commands accepted (locks / resets)",
                format!(
                    "{} ({} / {})",
                    self.accepted, self.accepted_locks, self.accepted_resets
                ),
            ),
            (
                "calls not accepted (server down)",
                self.calls_not_accepted.to_string(),
            ),
            (
                "stored, but the answer was lost",
                self.stored_unacknowledged.to_string(),
            ),
            ("SUCCEEDED", self.succeeded.to_string()),
            ("CANCELED (superseded)", self.canceled.to_string()),
            ("EXPIRED", self.expired.to_string()),
            (
                "FAILED: agent killed while applying",
                self.interrupted.to_string(),
            ),
            ("FAILED: other", self.failed_other.to_string()),
            ("lost", self.lost.to_string()),
            ("not final", self.unsettled.to_string()),
            ("applied twice", self.applied_twice.to_string()),
            (
                "server restart to listening (mean / max)",
                format!(
                    "{} / {} ms",
                    self.server_restart_ms_mean, self.server_restart_ms_max
                ),
            ),
            (
                "last kill to all final",
                format!("{:.1} s", self.settle_secs),
            ),
            ("whole run", format!("{:.1} s", self.total_secs)),
        ];
        let mut out = String::new();
        for (name, value) in rows {
            out.push_str(&format!("{name:<44} {value}\n"));
        }
        if self.passed() {
            out.push_str("result: PASS\n");
        } else {
            out.push_str(&format!(
                "result: FAIL ({} violations)\n",
                self.violations.len()
            ));
            for violation in self.violations.iter().take(20) {
                out.push_str(&format!("  - {violation}\n"));
            }
        }
        out
    }
}

/// The server as a child process that can be killed and started again on
/// the same port and data dir.
struct Server {
    data_dir: PathBuf,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    /// Starts it and waits until it listens; an error if it exits first.
    async fn start(&mut self) -> anyhow::Result<Duration> {
        let binary = crate::server_bin();
        let started = Instant::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = tokio::process::Command::new(binary);
        if let Some(url) = crate::store_database_for(&self.data_dir).await {
            command.env("MDM_DATABASE_URL", url);
        }
        let mut child = command
            .args(["serve", "--heartbeat-interval", "1s", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start mdm-server")?;
        let owner_key = self.data_dir.join("credentials/owner/admin.key");
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the server exited with {status} while starting on its data dir (log: {})",
                    self.log.display()
                );
            }
            let listening = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok();
            if listening && owner_key.exists() {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("the server did not listen within 30 s of starting; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.child = Some(child);
        Ok(started.elapsed())
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, and the exit status it stops with.
    async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("the server is not running")?;
        let pid = child.id().context("the server has no pid")?;
        tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        Ok(tokio::time::timeout(Duration::from_secs(30), child.wait()).await??)
    }
}

struct Device {
    agent: TestAgent,
    device_id: String,
    process: Option<Child>,
}

fn spawn_agent(agent: &TestAgent, delay: Duration) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(agent_log(&agent.state_dir))?;
    Ok(agent
        .command()
        .args(["run", "--backend", "simulated"])
        .env("MDM_SIMULATED_DELAY_MS", delay.as_millis().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lock,
    Reset,
}

#[derive(Default)]
struct Accepted {
    /// action id → (device id, kind)
    actions: HashMap<String, (String, Kind)>,
    not_accepted: usize,
}

const EMAIL: &str = "chaos@example.com";

fn progress(began: Instant, message: String) {
    eprintln!("chaos [{:>6.1} s] {message}", began.elapsed().as_secs_f64());
}

/// Runs the whole thing. Progress goes to stderr.
pub async fn run(options: ChaosOptions) -> anyhow::Result<ChaosReport> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let began = Instant::now();
    let temp = tempfile::tempdir()?;
    let data_dir = temp.path().join("data");
    let mut server = Server {
        data_dir: data_dir.clone(),
        port: crate::free_port(),
        child: None,
        log: temp.path().join("server.log"),
    };
    server.start().await?;
    progress(began, "server started".into());
    let handle = TestServer::attach(server.port, &data_dir);
    let (site_id, passcode) = site_with_passcode(&handle, EMAIL, 10).await;

    progress(began, format!("enrolling {} agents", options.agents));
    let enrolled: Vec<anyhow::Result<Device>> = futures::stream::iter(0..options.agents)
        .map(|_| {
            let (port, data_dir, passcode) = (server.port, data_dir.clone(), passcode.clone());
            async move {
                let agent = TestAgent::new();
                let output = agent
                    .enroll_at(
                        port,
                        &data_dir,
                        EMAIL,
                        &passcode,
                        &["--backend", "simulated"],
                    )
                    .await;
                if !output.status.success() {
                    bail!(
                        "enroll failed: {}",
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                let device_id = agent.device_id();
                Ok(Device {
                    agent,
                    device_id,
                    process: None,
                })
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut devices = enrolled.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    for device in &mut devices {
        device.process = Some(spawn_agent(&device.agent, options.simulated_delay)?);
    }
    let owner = handle.owner();
    wait_online(&handle, &owner, &site_id, options.agents).await?;
    progress(began, format!("{} agents online", options.agents));

    let device_ids: Arc<Vec<String>> =
        Arc::new(devices.iter().map(|d| d.device_id.clone()).collect());
    let devices = Arc::new(Mutex::new(devices));
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(std::sync::Mutex::new(Accepted::default()));
    let mut drivers = Vec::new();
    for _ in 0..options.admin_clients {
        drivers.push(tokio::spawn(drive(
            handle.admin_channel(&owner).await,
            device_ids.clone(),
            stop.clone(),
            accepted.clone(),
        )));
    }

    let agent_kills = AtomicUsize::new(0);
    let agent_killer = async {
        for _ in 0..options.agent_kills {
            let pause = rand::rng().random_range(300..2000);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let mut devices = devices.lock().await;
            let index = rand::rng().random_range(0..devices.len());
            let device = &mut devices[index];
            if let Some(mut process) = device.process.take() {
                let _ = process.kill().await;
            }
            let down = rand::rng().random_range(0..1000);
            tokio::time::sleep(Duration::from_millis(down)).await;
            device.process = Some(spawn_agent(&device.agent, options.simulated_delay)?);
            agent_kills.fetch_add(1, Ordering::Relaxed);
        }
        anyhow::Ok(())
    };
    let mut restarts = Vec::new();
    let server_killer = async {
        for kill in 1..=options.server_kills {
            let pause = rand::rng().random_range(500..2500);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            server.kill().await;
            let down = rand::rng().random_range(0..500);
            tokio::time::sleep(Duration::from_millis(down)).await;
            let took = server
                .start()
                .await
                .with_context(|| format!("restart {kill} after SIGKILL"))?;
            restarts.push(took);
            progress(
                began,
                format!(
                    "server SIGKILL {kill}/{}; listening again {} ms after restart",
                    options.server_kills,
                    took.as_millis()
                ),
            );
        }
        anyhow::Ok(())
    };
    let (agents_done, server_done) = tokio::join!(agent_killer, server_killer);
    stop.store(true, Ordering::Relaxed);
    for driver in drivers {
        let _ = driver.await;
    }
    agents_done?;
    server_done?;
    let last_kill = Instant::now();
    let accepted = std::mem::take(&mut *accepted.lock().unwrap_or_else(|p| p.into_inner()));
    progress(
        began,
        format!(
            "{} commands accepted; waiting for all of them to be final",
            accepted.actions.len()
        ),
    );

    let log = wait_settled(&handle, &owner, &site_id, &accepted).await?;
    let settle = last_kill.elapsed();

    let mut report = ChaosReport {
        agents: options.agents,
        server_kills: restarts.len(),
        agent_kills: agent_kills.load(Ordering::Relaxed),
        accepted: accepted.actions.len(),
        accepted_locks: accepted
            .actions
            .values()
            .filter(|(_, k)| *k == Kind::Lock)
            .count(),
        accepted_resets: accepted
            .actions
            .values()
            .filter(|(_, k)| *k == Kind::Reset)
            .count(),
        calls_not_accepted: accepted.not_accepted,
        server_restart_ms_max: restarts
            .iter()
            .map(|d| d.as_millis() as u64)
            .max()
            .unwrap_or(0),
        server_restart_ms_mean: if restarts.is_empty() {
            0
        } else {
            restarts.iter().map(|d| d.as_millis() as u64).sum::<u64>() / restarts.len() as u64
        },
        settle_secs: settle.as_secs_f64(),
        ..ChaosReport::default()
    };
    let devices = devices.lock().await;
    check(&mut report, &accepted, &log, &devices);

    let status = server.terminate().await?;
    if !status.success() {
        report.violations.push(format!(
            "the server did not stop cleanly on SIGTERM: {status}"
        ));
    }
    report.total_secs = began.elapsed().as_secs_f64();
    Ok(report)
}

/// Issues locks and resets to random devices until told to stop.
async fn drive(
    channel: tonic::transport::Channel,
    device_ids: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::Mutex<Accepted>>,
) {
    let mut client = pb::device_service_client::DeviceServiceClient::new(channel);
    while !stop.load(Ordering::Relaxed) {
        let (device_id, kind) = {
            let mut rng = rand::rng();
            let device = device_ids[rng.random_range(0..device_ids.len())].clone();
            let kind = if rng.random_bool(0.75) {
                Kind::Lock
            } else {
                Kind::Reset
            };
            (device, kind)
        };
        let result = match kind {
            Kind::Lock => {
                let mut request = tonic::Request::new(pb::LockDeviceRequest {
                    device_id: device_id.clone(),
                    message: "chaos".into(),
                    ttl: None,
                });
                request.set_timeout(Duration::from_secs(5));
                client
                    .lock_device(request)
                    .await
                    .map(|r| r.into_inner().action.map(|a| a.action_id))
            }
            Kind::Reset => {
                let mut request = tonic::Request::new(pb::ResetPasscodeRequest {
                    device_id: device_id.clone(),
                    confirm_user_email: EMAIL.into(),
                    notify_user: false,
                    message: "chaos".into(),
                    ttl: None,
                });
                request.set_timeout(Duration::from_secs(5));
                client
                    .reset_passcode(request)
                    .await
                    .map(|r| r.into_inner().action.map(|a| a.action_id))
            }
        };
        {
            let mut accepted = accepted.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(Some(action_id)) => {
                    accepted.actions.insert(action_id, (device_id, kind));
                }
                Ok(None) | Err(_) => accepted.not_accepted += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn admin_client(
    handle: &TestServer,
    owner: &Credential,
) -> anyhow::Result<tonic::transport::Channel> {
    Ok(handle
        .try_channel(Some((&owner.cert_pem, &owner.key_pem)))
        .await?)
}

async fn wait_online(
    handle: &TestServer,
    owner: &Credential,
    site_id: &str,
    expected: usize,
) -> anyhow::Result<()> {
    let mut devices =
        pb::device_service_client::DeviceServiceClient::new(admin_client(handle, owner).await?);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut online = 0;
        let mut page_token = String::new();
        loop {
            let page = devices
                .list_devices(pb::ListDevicesRequest {
                    site_id: site_id.into(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            online += page.devices.iter().filter(|d| d.online).count();
            page_token = page.next_page_token;
            if page_token.is_empty() {
                break;
            }
        }
        if online >= expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {online} of {expected} agents came online within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The site's whole action log.
async fn action_log(
    client: &mut pb::action_log_service_client::ActionLogServiceClient<tonic::transport::Channel>,
    site_id: &str,
) -> anyhow::Result<HashMap<String, pb::Action>> {
    let request = pb::ListActionsRequest {
        site_id: site_id.into(),
        page_size: 1000,
        ..Default::default()
    };
    Ok(crate::all_actions(client, request)
        .await?
        .into_iter()
        .map(|action| (action.action_id.clone(), action))
        .collect())
}

fn is_final(action: &pb::Action) -> bool {
    matches!(
        action.status(),
        pb::ActionStatus::Succeeded
            | pb::ActionStatus::Failed
            | pb::ActionStatus::Canceled
            | pb::ActionStatus::Expired
    )
}

/// Waits until every action in the log is final (or 180 s pass) and returns the log.
async fn wait_settled(
    handle: &TestServer,
    owner: &Credential,
    site_id: &str,
    accepted: &Accepted,
) -> anyhow::Result<HashMap<String, pb::Action>> {
    let mut client = pb::action_log_service_client::ActionLogServiceClient::new(
        admin_client(handle, owner).await?,
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let log = action_log(&mut client, site_id).await?;
        let open = log.values().filter(|a| !is_final(a)).count();
        let missing = accepted
            .actions
            .keys()
            .filter(|id| !log.contains_key(*id))
            .count();
        if (open == 0 && missing == 0) || Instant::now() > deadline {
            return Ok(log);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Holds the log and the devices against the promises.
fn check(
    report: &mut ChaosReport,
    accepted: &Accepted,
    log: &HashMap<String, pb::Action>,
    devices: &[Device],
) {
    let mut applied: HashMap<&str, HashSet<String>> = HashMap::new();
    for device in devices {
        let list = device.agent.applied();
        let unique: HashSet<String> = list.iter().cloned().collect();
        if unique.len() != list.len() {
            let mut seen = HashSet::new();
            for id in &list {
                if !seen.insert(id) {
                    report.applied_twice += 1;
                    report.violations.push(format!(
                        "device {} applied command {id} more than once",
                        device.device_id
                    ));
                }
            }
        }
        applied.insert(device.device_id.as_str(), unique);
    }
    for id in accepted.actions.keys() {
        if !log.contains_key(id) {
            report.lost += 1;
            report.violations.push(format!(
                "accepted action {id} is missing from the action log"
            ));
        }
    }
    report.stored_unacknowledged = log
        .keys()
        .filter(|id| !accepted.actions.contains_key(*id))
        .count();
    for action in log.values() {
        let was_applied = applied
            .get(action.device_id.as_str())
            .is_some_and(|set| set.contains(&action.action_id));
        let id = &action.action_id;
        match action.status() {
            pb::ActionStatus::Succeeded => {
                report.succeeded += 1;
                if !was_applied {
                    report.violations.push(format!(
                        "action {id} is SUCCEEDED but its device never applied it"
                    ));
                }
            }
            pb::ActionStatus::Canceled => report.canceled += 1,
            pb::ActionStatus::Expired => report.expired += 1,
            pb::ActionStatus::Failed if action.failure_reason.contains(INTERRUPTED) => {
                report.interrupted += 1;
            }
            pb::ActionStatus::Failed => {
                report.failed_other += 1;
                report
                    .violations
                    .push(format!("action {id} failed: {}", action.failure_reason));
            }
            other => {
                report.unsettled += 1;
                report
                    .violations
                    .push(format!("action {id} is still {other:?}"));
            }
        }
        let applied_allowed = matches!(action.status(), pb::ActionStatus::Succeeded)
            || action.failure_reason.contains(INTERRUPTED);
        if was_applied && !applied_allowed {
            report.violations.push(format!(
                "action {id} was applied by its device but is {:?} ({})",
                action.status(),
                action.failure_reason
            ));
        }
    }
}

/// Where a chaos agent writes its log: beside its state dir.
fn agent_log(state_dir: &Path) -> PathBuf {
    state_dir.with_file_name("agent.log")
}
