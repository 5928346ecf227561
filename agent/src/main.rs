//! `mdm-agent`: parse the command line, set up logging, call the library.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mdm_agent::enroll::{CaSource, EnrollOptions};
use mdm_agent::run::{RunOptions, RunOutcome};
use mdm_agent::state::StateDir;
use zeroize::Zeroizing;

#[derive(Debug, Parser)]
#[command(
    name = "mdm-agent",
    version,
    about = "MDM device agent: enroll this device and keep it managed."
)]
struct Cli {
    /// Where the agent keeps its identity and key [default: per OS, e.g. /var/lib/mdm-agent].
    #[arg(long, global = true, env = "MDM_AGENT_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this device with your email and the company passcode.
    Enroll(EnrollArgs),
    /// Show this device's identity.
    Status,
    /// Connect to the server and stay managed (renews the certificate, obeys commands).
    Run(RunArgs),
    /// Print (or with --write, install) the service definition for this OS.
    InstallService {
        /// Write it to its system location instead of printing it (needs root).
        #[arg(long)]
        write: bool,
    },
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

const SYSTEMD_UNIT: &str = include_str!("../../packaging/systemd/mdm-agent.service");
const LAUNCHD_PLIST: &str = include_str!("../../packaging/launchd/com.mdm.agent.plist");
const WINDOWS_NOTES: &str = include_str!("../../packaging/windows/README.md");

fn install_service(write: bool) -> Result<ExitCode, String> {
    let (text, path) = if cfg!(target_os = "macos") {
        (LAUNCHD_PLIST, "/Library/LaunchDaemons/com.mdm.agent.plist")
    } else if cfg!(target_os = "windows") {
        (WINDOWS_NOTES, "")
    } else {
        (SYSTEMD_UNIT, "/etc/systemd/system/mdm-agent.service")
    };
    if !write || path.is_empty() {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {path}: {e} (run as root)"))?;
    println!("wrote {path}; next: systemctl daemon-reload && systemctl enable --now mdm-agent");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// The server, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// The server's CA certificate (PEM), as your administrator shared it.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "ca_fingerprint",
        required_unless_present = "ca_fingerprint"
    )]
    ca: Option<PathBuf>,
    /// The SHA-256 fingerprint of the server's CA, sha256:HEX.
    #[arg(long, value_name = "sha256:HEX")]
    ca_fingerprint: Option<String>,
    /// Your email, as your administrator added you.
    #[arg(long)]
    email: String,
    /// Read the company passcode from standard input (else MDM_COMPANY_PASSCODE, else a hidden prompt).
    #[arg(long)]
    passcode_stdin: bool,
    /// Enroll again even if this device already has an identity; the current
    /// certificate proves it is this device, so the server replaces its record.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Debug, Args)]
struct DeviceArgs {
    /// Report this serial number instead of the hardware one (VMs, containers).
    #[arg(long, env = "MDM_DEVICE_SERIAL", value_name = "SERIAL")]
    device_serial: Option<String>,
    /// How actions are carried out: the real OS, or a simulation.
    #[arg(long, default_value = "system", value_parser = ["system", "simulated"])]
    backend: String,
    /// The local account whose password a remote reset sets (system backend).
    #[arg(long, env = "MDM_MANAGED_USER", value_name = "NAME")]
    managed_user: Option<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    device: DeviceArgs,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = error.print();
                return ExitCode::SUCCESS;
            }
            let rendered = error.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "mdm-agent: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state = StateDir::new(cli.state_dir.unwrap_or_else(StateDir::default_path));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mdm-agent: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Enroll(args) => enroll(args, state).await,
            Command::Status => status(&state),
            Command::Run(args) => run(args, state).await,
            Command::InstallService { write } => install_service(write),
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "mdm-agent",
                    &mut std::io::stdout(),
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("mdm-agent: {message}");
            ExitCode::FAILURE
        }
    }
}

fn read_passcode(from_stdin: bool) -> Result<Zeroizing<String>, String> {
    let passcode = if from_stdin {
        let mut line = Zeroizing::new(String::new());
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the passcode from stdin: {e}"))?;
        Zeroizing::new(line.trim().to_owned())
    } else if let Ok(value) = std::env::var("MDM_COMPANY_PASSCODE") {
        Zeroizing::new(value.trim().to_owned())
    } else if std::io::stdin().is_terminal() {
        Zeroizing::new(
            rpassword::prompt_password("Company passcode: ")
                .map_err(|e| format!("cannot read the passcode: {e}"))?
                .trim()
                .to_owned(),
        )
    } else {
        return Err(
            "no company passcode: use --passcode-stdin, MDM_COMPANY_PASSCODE or a terminal prompt"
                .into(),
        );
    };
    if passcode.is_empty() {
        return Err("the company passcode is empty".into());
    }
    Ok(passcode)
}

async fn enroll(args: EnrollArgs, state: StateDir) -> Result<ExitCode, String> {
    let passcode = read_passcode(args.passcode_stdin)?;
    let ca = match (args.ca, args.ca_fingerprint) {
        (Some(path), _) => CaSource::File(path),
        (None, Some(fingerprint)) => CaSource::Fingerprint(fingerprint),
        (None, None) => return Err("give --ca FILE or --ca-fingerprint sha256:HEX".into()),
    };
    let backend = mdm_agent::backend_by_name(
        &args.device.backend,
        state.root(),
        args.device.managed_user.clone(),
    )
    .ok_or("unknown backend")?;
    let identity = mdm_agent::enroll::enroll(EnrollOptions {
        server: args.server,
        ca,
        email: args.email,
        passcode,
        state: state.clone(),
        serial_override: args.device.device_serial,
        force: args.force,
        backend,
    })
    .await
    .map_err(|e| e.to_string())?;
    println!(
        "Enrolled as device {} in site {}.\nIdentity saved in {}.\nNext: mdm-agent run{}",
        identity.device_id,
        identity.site_id,
        state.root().display(),
        if std::env::var_os("MDM_AGENT_STATE_DIR").is_none() {
            format!(" --state-dir {}", state.root().display())
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn status(state: &StateDir) -> Result<ExitCode, String> {
    let identity = state
        .load()
        .map_err(|e| format!("cannot read {}: {e}", state.root().display()))?;
    let Some(identity) = identity else {
        println!("not enrolled (state dir {})", state.root().display());
        return Ok(ExitCode::from(1));
    };
    let time = |millis: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| millis.to_string())
    };
    println!("device_id:    {}", identity.device_id);
    println!("site_id:      {}", identity.site_id);
    println!("user:         {}", identity.user_email);
    println!("server:       {}", identity.server);
    println!("enrolled_at:  {}", time(identity.enrolled_at));
    println!("renew_after:  {}", time(identity.renew_after));
    println!("cert_expires: {}", time(identity.expires_at));
    println!("state_dir:    {}", state.root().display());
    Ok(ExitCode::SUCCESS)
}

async fn run(args: RunArgs, state: StateDir) -> Result<ExitCode, String> {
    let backend = mdm_agent::backend_by_name(
        &args.device.backend,
        state.root(),
        args.device.managed_user.clone(),
    )
    .ok_or("unknown backend")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let outcome = mdm_agent::run::run(
        RunOptions {
            state,
            backend: std::sync::Arc::from(backend),
            serial_override: args.device.device_serial,
        },
        stop_rx,
    )
    .await
    .map_err(|e| e.to_string())?;
    match outcome {
        RunOutcome::Unenrolled => println!("This device was unenrolled; its identity was removed."),
        RunOutcome::Stopped => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
