//! The one end-to-end harness every test uses: a real server on
//! `127.0.0.1:0` with a temp data dir, real mutual-TLS clients, the real
//! `grpcurl`, and a bounded [`eventually`].
#![allow(clippy::unwrap_used, missing_debug_implementations)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use mdm_server::admins::Role;
use mdm_server::config::AdminCommand;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use mdm_proto::v1 as pb;

pub mod baseline;
pub mod bench;
pub mod bench_postgres;
pub mod chaos;

/// A channel to `server` from the `i`-th loopback source address.
pub(crate) async fn bench_channel_from(
    server: SocketAddr,
    i: usize,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    bench::channel_from(server, bench::source_ip(i), tls).await
}

/// A TLS client identity as files on disk (what `admin add --out` writes).
#[derive(Debug, Clone)]
pub struct Credential {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Credential {
    pub fn load(dir: &Path) -> Self {
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        Self {
            dir: dir.to_path_buf(),
            ca_pem: read("ca.crt"),
            cert_pem: read("admin.crt"),
            key_pem: read("admin.key"),
        }
    }
}

/// A running server on a loopback port, with its own data dir.
pub struct TestServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), mdm_server::server::ServerError>>>,
}

impl TestServer {
    /// Starts a server on a fresh temp data dir.
    pub async fn start() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let mut server = Self::start_in(&data_dir).await.unwrap();
        server._temp = Some(temp);
        server
    }

    /// Starts a server on a fresh temp data dir whose webhooks may reach
    /// receivers on loopback (`--webhook-allow-private-networks`), for
    /// tests that run their receivers on this machine.
    pub async fn start_allowing_private_webhooks() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut config = mdm_server::Config::for_data_dir(temp.path().join("data"));
        config.webhook_allow_private_networks = true;
        let mut server = Self::start_with(config).await.unwrap();
        server._temp = Some(temp);
        server
    }

    /// A handle on a server running elsewhere (a [`ServerProcess`]), for its
    /// clients and helpers.
    pub fn attach(port: u16, data_dir: &Path) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            data_dir: data_dir.to_path_buf(),
            _temp: None,
            shutdown: None,
            task: None,
        }
    }

    /// Starts a server on `data_dir` (created on first start).
    pub async fn start_in(data_dir: &Path) -> Result<Self, mdm_server::server::ServerError> {
        Self::start_with(mdm_server::Config::for_data_dir(data_dir)).await
    }

    pub async fn start_with(
        mut config: mdm_server::Config,
    ) -> Result<Self, mdm_server::server::ServerError> {
        init_test_tracing();
        if config.database.is_none()
            && let Some(url) = store_database_for(&config.data_dir).await
        {
            config.database = Some(mdm_server::PgConfig::new(url));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data_dir = config.data_dir.clone();
        // Fail fast (and synchronously) on a bad data dir.
        mdm_server::server::prepare_data_dir(&config)?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(mdm_server::run(listener, config, async move {
            let _ = rx.await;
        }));
        let mut server = Self {
            addr,
            data_dir,
            _temp: None,
            shutdown: Some(tx),
            task: Some(task),
        };
        server.wait_serving().await?;
        Ok(server)
    }

    /// Waits until the server accepts connections, or returns why it stopped.
    async fn wait_serving(&mut self) -> Result<(), mdm_server::server::ServerError> {
        let addr = self.addr;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.task.as_ref().is_some_and(|t| t.is_finished()) {
                let task = self.task.take().unwrap();
                task.await.expect("server task did not panic")?;
                panic!("the server stopped right after starting");
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server gracefully and waits for it; keeps the data dir
    /// (and the temp dir guard) so the caller can restart on it.
    pub async fn stop(mut self) -> (PathBuf, Option<tempfile::TempDir>) {
        self.stop_inner().await;
        (self.data_dir.clone(), self._temp.take())
    }

    async fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server stops within 20 s")
                .expect("server task did not panic");
            result.expect("server stopped cleanly");
        }
    }

    pub fn owner(&self) -> Credential {
        Credential::load(&self.data_dir.join("credentials/owner"))
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("pki/ca.crt")).unwrap()
    }

    /// `mdm-server admin ...` against this data dir, in-process.
    pub fn admin(&self, command: AdminCommand) -> Result<String, String> {
        let mut out = Vec::new();
        mdm_server::admin_cli::execute(&self.data_dir, command, &mut out)
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8(out).unwrap())
    }

    /// Issues an admin credential into a directory under the data dir.
    pub fn add_admin(&self, email: &str, role: Role, sites: &[&str]) -> Credential {
        let out = self
            .data_dir
            .join("test-credentials")
            .join(email.replace('@', "_at_"));
        self.admin(AdminCommand::Add {
            email: email.into(),
            role,
            sites: sites.iter().map(|s| s.to_string()).collect(),
            out: out.clone(),
            days: 30,
        })
        .unwrap();
        Credential::load(&out)
    }

    pub fn revoke_admin(&self, email: &str) {
        self.admin(AdminCommand::Revoke {
            email: email.into(),
        })
        .unwrap();
    }

    /// A channel to the server, verifying it against our CA, presenting
    /// `identity` (cert, key PEM) when given.
    pub async fn channel(&self, identity: Option<(&str, &str)>) -> Channel {
        self.try_channel(identity).await.unwrap()
    }

    pub async fn try_channel(
        &self,
        identity: Option<(&str, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca_pem()))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    /// A channel authenticated as `credential`.
    pub async fn admin_channel(&self, credential: &Credential) -> Channel {
        self.channel(Some((&credential.cert_pem, &credential.key_pem)))
            .await
    }

    /// The device service, as the owner.
    pub async fn devices(&self) -> pb::device_service_client::DeviceServiceClient<Channel> {
        pb::device_service_client::DeviceServiceClient::new(self.admin_channel(&self.owner()).await)
    }

    /// `GetDevice` as the owner.
    pub async fn get_device(&self, device_id: &str) -> pb::GetDeviceResponse {
        self.devices()
            .await
            .get_device(pb::GetDeviceRequest {
                device_id: device_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// A channel that presents `agent`'s device certificate.
    pub async fn device_channel(&self, agent: &TestAgent) -> Channel {
        let cert = std::fs::read_to_string(agent.state_dir.join("device.crt")).unwrap();
        let key = std::fs::read_to_string(agent.state_dir.join("device.key")).unwrap();
        self.channel(Some((&cert, &key))).await
    }

    pub fn target(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// Runs the real `grpcurl` with `credential` against this server.
    /// Async, so the in-process server keeps running on a single-threaded test runtime.
    pub async fn grpcurl(&self, credential: Option<&Credential>, args: &[&str]) -> Output {
        let mut command = tokio::process::Command::new(grpcurl_path());
        let ca = self.data_dir.join("pki/ca.crt");
        command.arg("-cacert").arg(&ca);
        if let Some(c) = credential {
            command
                .arg("-cert")
                .arg(c.dir.join("admin.crt"))
                .arg("-key")
                .arg(c.dir.join("admin.key"));
        }
        command.arg("-max-time").arg("20");
        // Flags (with their values) first, then the address, then the method.
        let mut split = 0;
        while split < args.len() && args[split].starts_with('-') {
            let takes_value = matches!(args[split], "-d" | "-H" | "-format" | "-rpc-header");
            split += if takes_value { 2 } else { 1 };
        }
        let (flags, rest) = args.split_at(split.min(args.len()));
        command.args(flags).arg(self.target()).args(rest);
        command.output().await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The real `mdm-agent` binary: `MDM_AGENT_BIN` (set by `cargo xtask
/// test`), else built once here with cargo.
pub fn agent_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("MDM_AGENT_BIN") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(workspace_root())
            .args(["build", "--quiet", "-p", "mdm-agent", "--bin", "mdm-agent"])
            .status()
            .unwrap();
        assert!(status.success(), "building mdm-agent failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        target.join("debug/mdm-agent")
    })
    .clone()
}

/// The real `mdm-server` binary: `MDM_SERVER_BIN` (set by `cargo xtask
/// test`), else built once here with cargo.
pub fn server_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("MDM_SERVER_BIN") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--quiet",
                "-p",
                "mdm-server",
                "--bin",
                "mdm-server",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "building mdm-server failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        target.join("debug/mdm-server")
    })
    .clone()
}

/// The server as a separate process, for tests that kill it.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub port: u16,
}

impl ServerProcess {
    /// Starts `mdm-server serve` on `data_dir` and waits until it listens.
    pub async fn start(data_dir: &Path, port: u16) -> Self {
        let database = store_database_for(data_dir).await;
        Self::start_on(data_dir, port, database).await
    }

    /// [`start`](Self::start) on this PostgreSQL database (None: the embedded one).
    pub async fn start_on(data_dir: &Path, port: u16, database_url: Option<String>) -> Self {
        let mut command = tokio::process::Command::new(server_bin());
        if let Some(url) = database_url {
            command.env("MDM_DATABASE_URL", url);
        }
        let child = command
            .args(["serve", "--heartbeat-interval", "1s", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // It listens before it creates its data dir on a first start: wait for both.
        let owner_key = data_dir.join("credentials/owner/admin.key");
        eventually("the server process listens", || {
            let ready = owner_key.exists();
            async move {
                let listening = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok();
                (ready && listening).then_some(())
            }
        })
        .await;
        Self { child, port }
    }

    /// SIGKILL: no shutdown, no flush.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Every file below `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real `mdm-agent` process with its own state dir and serial number.
pub struct TestAgent {
    pub state_dir: PathBuf,
    pub serial: String,
    _temp: tempfile::TempDir,
}

impl Default for TestAgent {
    fn default() -> Self {
        Self::new()
    }
}

impl TestAgent {
    pub fn new() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let serial = format!(
            "SERIAL-{}",
            temp.path().file_name().unwrap().to_string_lossy()
        );
        Self::with_serial(temp, &serial)
    }

    fn with_serial(temp: tempfile::TempDir, serial: &str) -> Self {
        Self {
            state_dir: temp.path().join("state"),
            serial: serial.to_owned(),
            _temp: temp,
        }
    }

    /// Another agent that claims the same hardware serial (a re-install).
    pub fn same_hardware_as(other: &TestAgent) -> Self {
        Self::with_serial(tempfile::tempdir().unwrap(), &other.serial)
    }

    pub fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(agent_bin());
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env("MDM_DEVICE_SERIAL", &self.serial)
            .env_remove("MDM_COMPANY_PASSCODE")
            .env("RUST_LOG", "info")
            .kill_on_drop(true);
        command
    }

    /// `mdm-agent enroll` with the passcode on stdin (simulated backend).
    pub async fn enroll(&self, server: &TestServer, email: &str, passcode: &str) -> Output {
        self.enroll_with(server, email, passcode, &["--backend", "simulated"])
            .await
    }

    pub async fn enroll_with(
        &self,
        server: &TestServer,
        email: &str,
        passcode: &str,
        extra: &[&str],
    ) -> Output {
        self.enroll_at(server.addr.port(), &server.data_dir, email, passcode, extra)
            .await
    }

    /// `mdm-agent enroll` against the server on loopback `port` whose data dir is `data_dir`.
    pub async fn enroll_at(
        &self,
        port: u16,
        data_dir: &Path,
        email: &str,
        passcode: &str,
        extra: &[&str],
    ) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut child = self
            .command()
            .arg("enroll")
            .arg("--server")
            .arg(format!("localhost:{port}"))
            .arg("--ca")
            .arg(data_dir.join("pki/ca.crt"))
            .arg("--email")
            .arg(email)
            .arg("--passcode-stdin")
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{passcode}\n").as_bytes())
            .await
            .unwrap();
        drop(stdin);
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("enroll finishes")
            .unwrap()
    }

    pub async fn status(&self) -> Output {
        self.command().arg("status").output().await.unwrap()
    }

    /// Starts `mdm-agent run`; the process dies with the handle.
    pub fn run(&self) -> tokio::process::Child {
        self.command()
            .args(["run", "--backend", "simulated"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// What the simulated device looks like now.
    pub fn simulated(&self) -> serde_json::Value {
        std::fs::read(self.state_dir.join("simulated.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::json!({"locked": false, "applied": []}))
    }

    /// Ids of the commands the simulated device applied, in order.
    pub fn applied(&self) -> Vec<String> {
        self.simulated()["applied"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    }

    /// The agent's identity file, when it has one.
    pub fn identity(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.state_dir.join("identity.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn device_id(&self) -> String {
        self.identity().unwrap()["device_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// A site with one user and a fresh company passcode: (site id, passcode).
pub async fn site_with_passcode(
    server: &TestServer,
    email: &str,
    failed_attempt_limit: u32,
) -> (String, String) {
    let channel = server.admin_channel(&server.owner()).await;
    let mut sites = pb::site_service_client::SiteServiceClient::new(channel.clone());
    let site = sites
        .create_site(pb::CreateSiteRequest {
            display_name: "Test site".into(),
            failed_attempt_limit,
        })
        .await
        .unwrap()
        .into_inner()
        .site
        .unwrap();
    pb::user_service_client::UserServiceClient::new(channel)
        .create_user(pb::CreateUserRequest {
            site_id: site.site_id.clone(),
            email: email.into(),
            display_name: String::new(),
        })
        .await
        .unwrap();
    let passcode = sites
        .generate_company_passcode(pb::GenerateCompanyPasscodeRequest {
            site_id: site.site_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .passcode;
    (site.site_id, passcode)
}

/// A real SMTP server (Python's aiosmtpd, installed by `cargo xtask test`)
/// on a loopback port, storing what it receives in a maildir.
pub struct SmtpServer {
    pub port: u16,
    maildir: PathBuf,
    child: Option<tokio::process::Child>,
    _temp: tempfile::TempDir,
}

impl SmtpServer {
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let maildir = temp.path().join("maildir");
        let python_path = std::env::var_os("MDM_TOOLS_PYTHONPATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/tools/python"));
        assert!(
            python_path.join("aiosmtpd").exists(),
            "aiosmtpd is not installed in {}: run `cargo xtask test` (or `cargo xtask tools`) once",
            python_path.display()
        );
        let child = tokio::process::Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .env("PYTHONPATH", &python_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        eventually("the SMTP server listens", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Self {
            port,
            maildir,
            child: Some(child),
            _temp: temp,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Every message received so far, raw.
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else {
            return Vec::new();
        };
        let mut messages: Vec<String> = entries
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        messages.sort();
        messages
    }

    /// Server settings that deliver to this relay, retrying quickly.
    pub fn configure(&self, config: &mut mdm_server::Config) {
        Self::configure_port(self.port, config);
    }

    /// Server settings for a relay on loopback `port`, up or not.
    pub fn configure_port(port: u16, config: &mut mdm_server::Config) {
        config.smtp = Some(mdm_server::notify::SmtpConfig {
            host: "127.0.0.1".into(),
            port,
            tls: mdm_server::notify::SmtpTls::None,
            username: None,
            password: None,
            from: "MDM <mdm@example.com>".into(),
            ca_pem: None,
        });
        config.outbox_retry.first = Duration::from_millis(200);
        config.outbox_retry.max = Duration::from_secs(1);
    }
}

/// A header of a raw email.
pub fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message
        .lines()
        .find(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name)
                && l[name.len()..].starts_with(':')
        })
        .map(|l| l[name.len() + 1..].trim())
}

/// Where `cargo xtask test` installed grpcurl. Missing grpcurl fails the
/// test when tools are required (always under `cargo xtask test` and CI).
pub fn grpcurl_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MDM_GRPCURL") {
        return PathBuf::from(path);
    }
    let path = workspace_root().join("target/tools/bin/grpcurl");
    assert!(
        path.exists(),
        "grpcurl is not installed at {}: run `cargo xtask test` (or `cargo xtask tools`) once",
        path.display()
    );
    path
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Polls `check` until it yields `Some`, for at most 10 seconds.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(Duration::from_secs(10), what, &mut check).await
}

/// Every action `request` selects, following its pages from the first.
pub async fn all_actions(
    client: &mut pb::action_log_service_client::ActionLogServiceClient<Channel>,
    mut request: pb::ListActionsRequest,
) -> Result<Vec<pb::Action>, tonic::Status> {
    let mut actions = Vec::new();
    request.page_token.clear();
    loop {
        let page = client.list_actions(request.clone()).await?.into_inner();
        actions.extend(page.actions);
        if page.next_page_token.is_empty() {
            return Ok(actions);
        }
        request.page_token = page.next_page_token;
    }
}

pub async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, check: &mut F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

fn init_test_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The gRPC code of a failed call, for terse assertions.
pub fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(status) => status.code(),
    }
}

/// The PostgreSQL the suite runs against: `MDM_TEST_DATABASE_URL`, which
/// `cargo xtask test` sets to a throwaway cluster it starts. Without it a
/// test that needs the database is skipped with a note, except in CI
/// (`CI=true`), where a missing database is a failure.
pub fn test_database_url() -> Option<String> {
    match std::env::var("MDM_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "CI=true but MDM_TEST_DATABASE_URL is not set: run the suite with `cargo xtask test`"
            )
        }
        _ => {
            eprintln!(
                "skipped: no PostgreSQL (MDM_TEST_DATABASE_URL); `cargo xtask test` starts one"
            );
            None
        }
    }
}

/// A new empty database named `name` on the suite's PostgreSQL; its URL.
pub async fn create_database(base_url: &str, name: &str) -> String {
    let config: tokio_postgres::Config = base_url.parse().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    drop(client);
    let _ = connection.await;
    database_url(base_url, name)
}

/// `base_url` with its database replaced by `name`.
pub(crate) fn database_url(base_url: &str, name: &str) -> String {
    let (prefix, query) = base_url.split_once('?').unwrap_or((base_url, ""));
    let server = prefix.rsplit_once('/').map_or(prefix, |(server, _)| server);
    if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    }
}

/// Whether the end-to-end tests run on PostgreSQL (`MDM_TEST_STORE=postgres`,
/// which `cargo xtask test` sets for its second pass) instead of the
/// embedded store.
pub fn on_postgres() -> bool {
    std::env::var("MDM_TEST_STORE").as_deref() == Ok("postgres")
}

/// On the PostgreSQL pass: the URL of the database of the deployment in
/// `data_dir`, created on first use. One database per data dir, so a test
/// that restarts a server on its data dir finds its records again.
pub async fn store_database_for(data_dir: &Path) -> Option<String> {
    if !on_postgres() {
        return None;
    }
    let base = test_database_url().expect("MDM_TEST_STORE=postgres needs MDM_TEST_DATABASE_URL");
    let name = {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let absolute = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(absolute);
        format!("mdm_e2e_{hash:016x}")
    };
    let config: tokio_postgres::Config = base.parse().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    if let Err(error) = client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        && error.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
    {
        panic!("cannot create the test database {name}: {error}");
    }
    drop(client);
    let _ = connection.await;
    Some(database_url(&base, &name))
}

/// One wrong company passcode given with `email`, refused as
/// `PERMISSION_DENIED`; with a site limit of 1 this locks the passcode out.
pub async fn wrong_passcode(server: &TestServer, email: &str) {
    let (_, csr) = mdm_agent::enroll::key_and_csr("x").unwrap();
    let status =
        pb::enrollment_service_client::EnrollmentServiceClient::new(server.channel(None).await)
            .enroll(pb::EnrollRequest {
                user_email: email.into(),
                company_passcode: "Wrong1Wrong1".into(),
                csr_pem: csr,
                device: Some(pb::DeviceFacts {
                    platform: pb::Platform::Linux.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}

/// A PostgreSQL cluster of one test's own, which it may stop and start
/// (the suite's shared one must keep running for the others). Built from
/// the binaries `cargo xtask test` found (`MDM_TEST_POSTGRES_BINDIR`), run
/// as `nobody` when the tests run as root, on loopback, trust auth.
pub struct PrivatePostgres {
    bindir: PathBuf,
    root: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// None (with a note, or a panic under `CI=true`) without the binaries.
    pub fn start() -> Option<Self> {
        let Some(bindir) = std::env::var_os("MDM_TEST_POSTGRES_BINDIR").map(PathBuf::from) else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "CI=true but MDM_TEST_POSTGRES_BINDIR is not set: run the suite with `cargo xtask test`"
                );
            }
            eprintln!("skipped: no PostgreSQL binaries (MDM_TEST_POSTGRES_BINDIR)");
            return None;
        };
        let root = std::env::temp_dir().join(format!(
            "mdm-private-postgres-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&root).unwrap();
        let cluster = Self {
            bindir,
            root,
            port: free_port(),
        };
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(&cluster.root)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let initdb = cluster
            .as_owner("initdb")
            .arg("-D")
            .arg(cluster.root.join("data"))
            .args(["-U", "mdm", "-E", "UTF8", "--auth=trust"])
            .output()
            .unwrap();
        assert!(initdb.status.success(), "initdb: {initdb:?}");
        cluster.resume();
        Some(cluster)
    }

    fn as_owner(&self, program: &str) -> std::process::Command {
        let binary = self.bindir.join(program);
        if is_root() {
            let mut command = std::process::Command::new("setpriv");
            command
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(binary);
            command
        } else {
            std::process::Command::new(binary)
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://mdm@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts (again), waiting until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            self.root.display()
        );
        let started = self
            .as_owner("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(self.root.join("data"))
            .arg("-l")
            .arg(self.root.join("log"))
            .arg("-o")
            .arg(options)
            .output()
            .unwrap();
        assert!(started.status.success(), "pg_ctl start: {started:?}");
    }

    /// Stops it (fast: open sessions are cut, as in a crash of the clients' view).
    pub fn stop(&self) {
        let stopped = self
            .as_owner("pg_ctl")
            .args(["stop", "-w", "-m", "fast", "-D"])
            .arg(self.root.join("data"))
            .output()
            .unwrap();
        assert!(stopped.status.success(), "pg_ctl stop: {stopped:?}");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_owner("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.root.join("data"))
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}
