//! `mdm-server`: parse the command line, set up logging, call the library.

use std::process::ExitCode;

use clap::Parser;
use mdm_server::config::{self, Cli, Command, LogFormat};

/// Under fan-out load glibc's allocator took a sixth of the server's CPU
/// (`malloc_consolidate`, arena locks); jemalloc made the 10,000-lock
/// fan-out 12 % faster for 2 KB more per connected agent (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// BSD `EX_USAGE`: bad command line or configuration.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return clap_exit(error),
    };
    match cli.command {
        Command::Serve(args) => {
            let config = match config::resolve(cli.data_dir, &args).and_then(|config| {
                mdm_server::notify::check_config(config.smtp.as_ref())
                    .map_err(|e| config::ConfigError(e.to_string()))?;
                Ok(config)
            }) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("mdm-server: {error}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            init_tracing(config.log_format);
            serve(config)
        }
        Command::Migrate(args) => migrate(cli.data_dir, &args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "mdm-server",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::SystemdUnit => {
            print!(
                "{}",
                include_str!("../../packaging/systemd/mdm-server.service")
            );
            ExitCode::SUCCESS
        }
        Command::Admin(command) => {
            let data_dir = cli
                .data_dir
                .unwrap_or_else(|| config::DEFAULT_DATA_DIR.into());
            match mdm_server::admin_cli::execute(&data_dir, command, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(mdm_server::admin_cli::AdminCliError::Usage(message)) => {
                    eprintln!("mdm-server: {message}");
                    ExitCode::from(EX_USAGE)
                }
                Err(error) => {
                    eprintln!("mdm-server: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(config: mdm_server::Config) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mdm-server: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = shutdown_signal();
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("mdm-server: cannot listen on {}: {error}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        match mdm_server::server::prepare_data_dir(&config) {
            Ok(Some(first)) => print_first_start(&config, &listener, &first),
            Ok(None) => {}
            Err(error) => {
                eprintln!("mdm-server: {error}");
                return ExitCode::FAILURE;
            }
        }
        match mdm_server::run(listener, config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("mdm-server: {error}");
                if error.is_configuration() {
                    ExitCode::from(EX_USAGE)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}

fn migrate(data_dir: Option<std::path::PathBuf>, args: &config::MigrateArgs) -> ExitCode {
    let from = args
        .from_data_dir
        .clone()
        .or(data_dir)
        .unwrap_or_else(|| config::DEFAULT_DATA_DIR.into());
    let target = match args.target() {
        Ok(target) => target,
        Err(error) => {
            eprintln!("mdm-server: {error}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // A one-shot command answers in one line; its log only when asked for.
    if std::env::var_os("RUST_LOG").is_some() {
        init_tracing(LogFormat::Human);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mdm-server: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(mdm_server::migrate::migrate(&from, target)) {
        Ok(report) => {
            println!("{report}");
            println!(
                "Next: mdm-server serve --data-dir {} with MDM_DATABASE_URL set to the same database.",
                from.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("mdm-server: {error}");
            if matches!(
                error,
                mdm_server::migrate::MigrateError::NotADataDir { .. }
                    | mdm_server::migrate::MigrateError::Connect(
                        mdm_store_postgres::PgOpenError::BadUrl(_)
                            | mdm_store_postgres::PgOpenError::BadCaFile { .. }
                            | mdm_store_postgres::PgOpenError::Refused { .. }
                    )
            ) {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn print_first_start(
    config: &mdm_server::Config,
    listener: &tokio::net::TcpListener,
    first: &mdm_server::datadir::FirstStart,
) {
    let port = listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(config.listen.port());
    let host = if config.listen.ip().is_unspecified() || config.listen.ip().is_loopback() {
        "localhost".to_owned()
    } else {
        config.listen.ip().to_string()
    };
    let ca_path = first.owner_credential.join("ca.crt");
    let fingerprint = std::fs::read_to_string(&ca_path)
        .ok()
        .and_then(|pem| mdm_server::pki::fingerprint(&pem))
        .unwrap_or_default();
    println!(
        "First start: created {} with a new CA and an owner credential for {}.\n\
         Owner credential: {}\n\
         CA for agents: {} ({fingerprint})\n\
         Next step, list the API with grpcurl:\n  {} {host}:{port} list",
        config.data_dir.display(),
        first.owner_email,
        first.owner_credential.display(),
        ca_path.display(),
        mdm_server::admin_cli::grpcurl_flags(&first.owner_credential),
    );
}

fn clap_exit(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        _ => {
            let rendered = error.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "mdm-server: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            ExitCode::from(EX_USAGE)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives
/// during start-up is not lost.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
