//! Command line, environment and config file, merged into one [`Config`].
//!
//! Precedence: flag > environment variable > config file > default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use zeroize::Zeroizing;

use crate::admins::Role;

/// Default data dir, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./mdm-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_OWNER_EMAIL: &str = "owner@localhost";

#[derive(Debug, Parser)]
#[command(
    name = "mdm-server",
    version,
    about = "MDM control server: sites, company passcodes, enrollment, remote passcode reset and lock over gRPC with mutual TLS."
)]
pub struct Cli {
    /// Where the server keeps its database, CA and credentials.
    #[arg(long, global = true, env = "MDM_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of `serve`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (creates the data dir, CA and an owner credential on first start).
    Serve(ServeArgs),
    /// Manage admin credentials; works whether or not the server is running.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Copy this data dir's embedded database into an empty PostgreSQL
    /// database, then check the counts; serve with --database-url after.
    /// The data dir keeps the CA, the server secret and the admin registry,
    /// which a PostgreSQL deployment still uses. Stop the server first.
    Migrate(MigrateArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the hardened systemd unit for the server.
    SystemdUnit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML config file; its keys are the long flag names with '_' for '-'.
    #[arg(long, env = "MDM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7443].
    #[arg(long, env = "MDM_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Extra DNS name or IP address for the server certificate (repeatable).
    #[arg(
        long = "san",
        env = "MDM_SAN",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub sans: Vec<String>,
    /// Log format [default: human].
    #[arg(long, env = "MDM_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Email of the owner credential created on first start [default: owner@localhost].
    #[arg(long, env = "MDM_OWNER_EMAIL", value_name = "EMAIL")]
    pub owner_email: Option<String>,
    /// Lifetime of device certificates, e.g. 7d or 12h [default: 7d].
    #[arg(long, env = "MDM_DEVICE_CERT_LIFETIME", value_parser = parse_duration, value_name = "DURATION")]
    pub device_cert_lifetime: Option<Duration>,
    /// Heartbeat interval of agent streams, e.g. 30s [default: 30s].
    #[arg(long, env = "MDM_HEARTBEAT_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_interval: Option<Duration>,
    /// Per source address: TLS handshakes in progress, and connections without
    /// a client certificate (enrollment), each [default: 64].
    #[arg(long, env = "MDM_CONNECTIONS_PER_SOURCE", value_parser = clap::value_parser!(u32).range(1..=100_000), value_name = "N")]
    pub connections_per_source: Option<u32>,
    /// SMTP relay host; without one, emails are written as .eml files under the data dir.
    #[arg(long, env = "MDM_SMTP_HOST", value_name = "HOST")]
    pub smtp_host: Option<String>,
    /// SMTP port [default: 587 for starttls, 465 for tls, 25 for none].
    #[arg(long, env = "MDM_SMTP_PORT", value_name = "PORT")]
    pub smtp_port: Option<u16>,
    /// starttls (default), tls (implicit) or none (a relay on this machine only).
    #[arg(long, env = "MDM_SMTP_TLS", value_enum)]
    pub smtp_tls: Option<SmtpTls>,
    /// SMTP user name; the password comes from MDM_SMTP_PASSWORD.
    #[arg(long, env = "MDM_SMTP_USERNAME", value_name = "USER")]
    pub smtp_username: Option<String>,
    /// The From address of the server's emails.
    #[arg(long, env = "MDM_SMTP_FROM", value_name = "ADDRESS")]
    pub smtp_from: Option<String>,
    /// PEM CA certificate of the relay, if it is not publicly trusted.
    #[arg(long, env = "MDM_SMTP_CA", value_name = "FILE")]
    pub smtp_ca: Option<PathBuf>,
    /// Let webhooks reach loopback, private, link-local and other internal
    /// addresses (labs and tests only) [default: false].
    #[arg(
        long,
        env = "MDM_WEBHOOK_ALLOW_PRIVATE_NETWORKS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub webhook_allow_private_networks: Option<bool>,
    /// Store everything in this PostgreSQL database instead of the data
    /// dir's embedded one, e.g. postgres://mdm@db.example.com/mdm?sslmode=verify-full.
    /// Give the password in MDM_DATABASE_PASSWORD (a password in a URL on
    /// the command line is refused: process lists show it).
    #[arg(long, env = "MDM_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// PEM CA certificate(s) the database's TLS certificate must chain to.
    #[arg(long, env = "MDM_DATABASE_CA_FILE", value_name = "FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// Most users one site may have; CreateUser and ImportUsers beyond it
    /// are refused [default: 100000].
    #[arg(long, env = "MDM_MAX_USERS_PER_SITE", value_parser = clap::value_parser!(u32).range(1..=100_000_000), value_name = "N")]
    pub max_users_per_site: Option<u32>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The data dir whose database is copied [default: --data-dir, else ./mdm-data].
    #[arg(long, value_name = "DIR")]
    pub from_data_dir: Option<PathBuf>,
    /// The empty PostgreSQL database to copy into, e.g. postgres://mdm@db/mdm;
    /// the password in MDM_DATABASE_PASSWORD.
    #[arg(long, env = "MDM_DATABASE_URL", value_name = "URL")]
    pub to: String,
    /// PEM CA certificate(s) the database's TLS certificate must chain to.
    #[arg(long, env = "MDM_DATABASE_CA_FILE", value_name = "FILE")]
    pub database_ca_file: Option<PathBuf>,
}

impl MigrateArgs {
    /// The target's settings, with the same rules as `serve --database-url`.
    pub fn target(&self) -> Result<mdm_store_postgres::PgConfig, ConfigError> {
        let from_environment = std::env::var("MDM_DATABASE_URL").ok();
        if from_environment.as_deref() != Some(self.to.as_str())
            && mdm_store_postgres::url_has_password(&self.to)
        {
            return Err(ConfigError(
                "--to must not contain a password (process lists show it); put it in MDM_DATABASE_PASSWORD, or the URL in MDM_DATABASE_URL".into(),
            ));
        }
        let mut database = mdm_store_postgres::PgConfig::new(self.to.clone());
        database.password = database_password();
        database.ca_file = self.database_ca_file.clone();
        mdm_store_postgres::check_config(&database).map_err(|e| ConfigError(e.to_string()))?;
        Ok(database)
    }
}

fn database_password() -> Option<Zeroizing<String>> {
    std::env::var("MDM_DATABASE_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .map(Zeroizing::new)
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Issue an admin credential (ca.crt, admin.crt, admin.key) into --out.
    Add {
        /// The admin's email; it is their identity in the action log.
        #[arg(long)]
        email: String,
        /// owner (all sites) or site-admin (the --site ones).
        #[arg(long)]
        role: Role,
        /// A site the site-admin manages (repeatable).
        #[arg(long = "site", value_name = "SITE_ID")]
        sites: Vec<String>,
        /// Directory to write the credential into (created, mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
    /// List admin credentials.
    List,
    /// Revoke every credential of an admin; refused from the next call on.
    Revoke {
        #[arg(long)]
        email: String,
    },
    /// Print ready-to-paste grpcurl flags for a credential directory.
    Grpcurl {
        /// The credential directory [default: the owner credential in the data dir].
        #[arg(long, value_name = "DIR")]
        credential: Option<PathBuf>,
    },
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &[Role::Owner, Role::SiteAdmin]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// The `serve` settings after merging every source.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub sans: Vec<String>,
    pub log_format: LogFormat,
    pub owner_email: String,
    /// How long in-flight calls may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// Per-source throttling of wrong company passcodes.
    pub throttle: crate::throttle::ThrottleConfig,
    /// Lifetime of device certificates; agents renew after two thirds.
    pub device_cert_lifetime: Duration,
    /// How often each side of an agent stream sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// How often expired commands are looked for.
    pub expiry_interval: Duration,
    /// The mail relay; None writes `.eml` files under the data dir.
    pub smtp: Option<SmtpConfig>,
    pub outbox_retry: RetryPolicy,
    /// Per source address: TLS handshakes in progress, and open connections
    /// without a client certificate (each counted separately).
    pub connections_per_source: usize,
    /// Webhooks may reach internal addresses (off outside labs and tests).
    pub webhook_allow_private_networks: bool,
    /// Fixed addresses for webhook host names (lower case), used instead of
    /// DNS and checked like DNS answers; for tests and embedders.
    pub webhook_hosts: std::collections::HashMap<String, Vec<std::net::IpAddr>>,
    /// Most users one site may have.
    pub max_users_per_site: usize,
    /// PostgreSQL instead of the embedded database.
    pub database: Option<mdm_store_postgres::PgConfig>,
}

pub const DEFAULT_CONNECTIONS_PER_SOURCE: usize = 64;
pub const DEFAULT_MAX_USERS_PER_SITE: usize = 100_000;

pub const DEFAULT_DEVICE_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Longest duration any setting takes: ten years. Certificate dates and
/// the agent streams' timers are computed from these durations, and overflow
/// (a panic) far beyond it.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Parses "90s", "15m", "12h", "7d" or plain seconds, at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 12h or 7d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration like 90s, 15m, 12h or 7d"
            ));
        }
    };
    let duration = Duration::from_secs(value.saturating_mul(seconds));
    if duration.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is longer than 3650d"));
    }
    Ok(duration)
}

impl Config {
    /// Settings for tests and embedders: everything default but the data dir.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            sans: Vec::new(),
            log_format: LogFormat::Human,
            owner_email: DEFAULT_OWNER_EMAIL.to_owned(),
            drain_timeout: Duration::from_secs(10),
            throttle: Default::default(),
            device_cert_lifetime: DEFAULT_DEVICE_CERT_LIFETIME,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            expiry_interval: Duration::from_secs(1),
            smtp: None,
            outbox_retry: Default::default(),
            connections_per_source: DEFAULT_CONNECTIONS_PER_SOURCE,
            webhook_allow_private_networks: false,
            webhook_hosts: Default::default(),
            max_users_per_site: DEFAULT_MAX_USERS_PER_SITE,
            database: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Keys of the TOML config file, parsed but not yet merged or validated.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    san: Option<Vec<String>>,
    log_format: Option<LogFormat>,
    owner_email: Option<String>,
    device_cert_lifetime: Option<String>,
    heartbeat_interval: Option<String>,
    connections_per_source: Option<u32>,
    webhook_allow_private_networks: Option<bool>,
    max_users_per_site: Option<u32>,
    database_url: Option<String>,
    database_ca_file: Option<PathBuf>,
    smtp: Option<FileSmtp>,
}

/// `[smtp]` in the config file. The password only ever comes from the
/// environment (`MDM_SMTP_PASSWORD`), never from a file or argv.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSmtp {
    host: Option<String>,
    port: Option<u16>,
    tls: Option<SmtpTls>,
    username: Option<String>,
    from: Option<String>,
    ca_file: Option<PathBuf>,
}

fn smtp_config(
    args: &ServeArgs,
    file: Option<FileSmtp>,
) -> Result<Option<SmtpConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let Some(host) = args.smtp_host.clone().or(file.host) else {
        return Ok(None);
    };
    let tls = args.smtp_tls.or(file.tls).unwrap_or(SmtpTls::Starttls);
    let port = args.smtp_port.or(file.port).unwrap_or(match tls {
        SmtpTls::Tls => 465,
        SmtpTls::Starttls => 587,
        SmtpTls::None => 25,
    });
    if port == 0 {
        return Err(ConfigError("smtp port must not be 0".into()));
    }
    if tls == SmtpTls::None && !matches!(host.as_str(), "localhost" | "127.0.0.1" | "::1") {
        return Err(ConfigError(format!(
            "smtp tls = none is only allowed for a relay on this machine, not {host:?}; use starttls or tls"
        )));
    }
    let from = args.smtp_from.clone().or(file.from).ok_or_else(|| {
        ConfigError("smtp needs a from address (--smtp-from or [smtp] from)".into())
    })?;
    let username = args.smtp_username.clone().or(file.username);
    let password = std::env::var("MDM_SMTP_PASSWORD").ok().map(Zeroizing::new);
    if username.is_some() != password.is_some() {
        return Err(ConfigError(
            "smtp authentication needs both a username and MDM_SMTP_PASSWORD".into(),
        ));
    }
    let ca_pem = match args.smtp_ca.clone().or(file.ca_file) {
        Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
            ConfigError(format!(
                "cannot read the smtp CA file {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    let smtp = SmtpConfig {
        host,
        port,
        tls,
        username,
        password,
        from,
        ca_pem,
    };
    Ok(Some(smtp))
}

/// The PostgreSQL settings, if any. The password comes from the URL (in
/// the environment or the config file) or from `MDM_DATABASE_PASSWORD`.
fn database_config(
    args: &ServeArgs,
    file_url: Option<String>,
    file_ca: Option<PathBuf>,
) -> Result<Option<mdm_store_postgres::PgConfig>, ConfigError> {
    let from_environment = std::env::var("MDM_DATABASE_URL").ok();
    let Some(url) = args.database_url.clone().or(file_url) else {
        return Ok(None);
    };
    let on_command_line = args.database_url.is_some() && from_environment != args.database_url;
    if on_command_line && mdm_store_postgres::url_has_password(&url) {
        return Err(ConfigError(
            "--database-url must not contain a password (process lists show it); \
             put it in MDM_DATABASE_PASSWORD, or the whole URL in MDM_DATABASE_URL or the config file"
                .into(),
        ));
    }
    let mut database = mdm_store_postgres::PgConfig::new(url);
    database.password = database_password();
    database.ca_file = args.database_ca_file.clone().or(file_ca);
    mdm_store_postgres::check_config(&database).map_err(|e| ConfigError(e.to_string()))?;
    Ok(Some(database))
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    parse_file_config(&text, &path.display().to_string())
}

/// Parses the text of a TOML config file; `origin` names the file in errors.
pub fn parse_file_config(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().replace('\n', " ");
        ConfigError(format!("config file {origin}: {message}"))
    })
}

/// Merges flags/env (already in `args`), the config file and defaults.
pub fn resolve(data_dir: Option<PathBuf>, args: &ServeArgs) -> Result<Config, ConfigError> {
    let file = match &args.config {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    resolve_with_file(data_dir, args, file)
}

/// Merges flags/env (already in `args`), a parsed config file and defaults,
/// and validates the result.
pub fn resolve_with_file(
    data_dir: Option<PathBuf>,
    args: &ServeArgs,
    file: FileConfig,
) -> Result<Config, ConfigError> {
    let listen = match (args.listen, file.listen) {
        (Some(addr), _) => addr,
        (None, Some(text)) => text.parse().map_err(|_| {
            ConfigError(format!(
                "config file: listen = {text:?} is not an address like 127.0.0.1:7443"
            ))
        })?,
        (None, None) => DEFAULT_LISTEN.parse().expect("valid default address"),
    };
    let sans = if args.sans.is_empty() {
        file.san.unwrap_or_default()
    } else {
        args.sans.clone()
    };
    for san in &sans {
        validate_san(san)?;
    }
    let owner_email = args
        .owner_email
        .clone()
        .or(file.owner_email)
        .unwrap_or_else(|| DEFAULT_OWNER_EMAIL.to_owned());
    crate::model::validate_email(&owner_email)
        .map_err(|reason| ConfigError(format!("owner email {owner_email:?}: {reason}")))?;
    let data_dir = data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    if data_dir.as_os_str().is_empty() {
        return Err(ConfigError("--data-dir must not be empty".into()));
    }
    Ok(Config {
        data_dir,
        listen,
        sans,
        log_format: args
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Human),
        owner_email: owner_email.to_ascii_lowercase(),
        drain_timeout: Duration::from_secs(10),
        throttle: Default::default(),
        device_cert_lifetime: args
            .device_cert_lifetime
            .or(file
                .device_cert_lifetime
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| ConfigError(format!("config file: device_cert_lifetime {e}")))?)
            .unwrap_or(DEFAULT_DEVICE_CERT_LIFETIME),
        heartbeat_interval: args
            .heartbeat_interval
            .or(file
                .heartbeat_interval
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| ConfigError(format!("config file: heartbeat_interval {e}")))?)
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL),
        expiry_interval: Duration::from_secs(1),
        smtp: smtp_config(args, file.smtp)?,
        outbox_retry: Default::default(),
        connections_per_source: match args.connections_per_source.or(file.connections_per_source) {
            None => DEFAULT_CONNECTIONS_PER_SOURCE,
            Some(0) => {
                return Err(ConfigError(
                    "connections_per_source must be at least 1".into(),
                ));
            }
            Some(n) => n as usize,
        },
        webhook_allow_private_networks: args
            .webhook_allow_private_networks
            .or(file.webhook_allow_private_networks)
            .unwrap_or(false),
        webhook_hosts: Default::default(),
        max_users_per_site: match args.max_users_per_site.or(file.max_users_per_site) {
            None => DEFAULT_MAX_USERS_PER_SITE,
            Some(0) => {
                return Err(ConfigError("max_users_per_site must be at least 1".into()));
            }
            Some(n) => n as usize,
        },
        database: database_config(args, file.database_url, file.database_ca_file)?,
    })
}

fn validate_san(san: &str) -> Result<(), ConfigError> {
    let ok = san.parse::<std::net::IpAddr>().is_ok()
        || (!san.is_empty()
            && san.len() <= 253
            && san.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
            }));
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "--san {san:?} is neither a DNS name nor an IP address"
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn resolve_text(text: &str) -> Result<Config, ConfigError> {
        resolve_with_file(
            None,
            &ServeArgs::default(),
            parse_file_config(text, "test.toml")?,
        )
    }

    #[test]
    fn durations_take_a_unit_and_stay_within_ten_years() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("3650d").unwrap(), MAX_DURATION);
        for refused in ["0s", "", "7w", "-1d", "d", "3651d", "18446744073709551615"] {
            assert!(parse_duration(refused).is_err(), "{refused:?} accepted");
        }
    }

    /// Inputs that break the `config` fuzz target's invariant (what is
    /// accepted must be usable). Accepted before, they made every enrollment
    /// panic on `now + lifetime` (a date past year 9999) and every agent
    /// stream panic on `interval * 2`.
    #[test]
    fn absurd_durations_in_a_config_file_are_refused() {
        let error = resolve_text("device_cert_lifetime = \"3000000d\"\n").unwrap_err();
        assert!(error.0.contains("device_cert_lifetime"), "{error}");
        let error = resolve_text("heartbeat_interval = \"999999999999999d\"\n").unwrap_err();
        assert!(error.0.contains("heartbeat_interval"), "{error}");
    }

    #[test]
    fn private_webhook_networks_are_off_unless_the_flag_or_the_file_says_so() {
        let serve = |args: &[&str]| {
            let cli = Cli::try_parse_from(["mdm-server", "serve"].iter().chain(args)).unwrap();
            let Command::Serve(args) = cli.command else {
                panic!("not serve");
            };
            args
        };
        let resolved = |args: &ServeArgs, text: &str| {
            resolve_with_file(None, args, parse_file_config(text, "test.toml").unwrap())
                .unwrap()
                .webhook_allow_private_networks
        };
        assert!(!resolved(&serve(&[]), ""));
        assert!(resolved(&serve(&["--webhook-allow-private-networks"]), ""));
        assert!(resolved(
            &serve(&[]),
            "webhook_allow_private_networks = true\n"
        ));
        assert!(!resolved(
            &serve(&["--webhook-allow-private-networks=false"]),
            "webhook_allow_private_networks = true\n"
        ));
        assert!(
            Cli::try_parse_from([
                "mdm-server",
                "serve",
                "--webhook-allow-private-networks=maybe"
            ])
            .is_err()
        );
    }

    #[test]
    fn a_config_file_is_parsed_merged_and_validated() {
        let config = resolve_text(
            "listen = \"0.0.0.0:7443\"\nsan = [\"mdm.example.com\", \"10.0.0.5\"]\nowner_email = \"Owner@Example.com\"\ndevice_cert_lifetime = \"12h\"\n",
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:7443");
        assert_eq!(config.sans, ["mdm.example.com", "10.0.0.5"]);
        assert_eq!(config.owner_email, "owner@example.com");
        assert_eq!(config.device_cert_lifetime, Duration::from_secs(12 * 3600));
        assert_eq!(config.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        let error = resolve_text("colour = \"blue\"\n").unwrap_err();
        assert!(error.0.starts_with("config file test.toml: "), "{error}");
        assert!(resolve_text("san = [\"bad name\"]\n").is_err());
    }
}

/// How the server talks to its mail relay.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<Zeroizing<String>>,
    pub from: String,
    /// PEM CA certificate to trust for the relay, besides the public roots.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP: only for a relay on this machine.
    None,
    /// Upgrade with STARTTLS (required).
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

/// Retry schedule of the outbox.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Wait before the first retry; doubles after each failure.
    pub first: Duration,
    /// Longest wait between two attempts.
    pub max: Duration,
    /// After this long a notification is given up as failed.
    pub window: Duration,
    /// One delivery attempt is cut off after this long.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(5),
            max: Duration::from_secs(600),
            window: Duration::from_secs(24 * 3600),
            attempt_timeout: Duration::from_secs(30),
        }
    }
}
