//! What the benchmark measures of PostgreSQL itself when the server stores
//! in it: the write transactions a fan-out committed, and a `pgbench`
//! insert baseline (one-row autocommit inserts from as many clients as the
//! server's pool) on the same cluster in the same run.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The database's settings without its password, and the password apart,
/// so that neither a child's argv nor a log line holds it.
struct Target {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
}

fn target(url: &str) -> Result<Target> {
    let config: tokio_postgres::Config = url.parse().context("MDM_BENCH_DATABASE_URL")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => bail!("MDM_BENCH_DATABASE_URL must name a TCP host"),
    };
    Ok(Target {
        host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        user: config.get_user().unwrap_or("postgres").to_owned(),
        password: config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    })
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = url
        .parse::<tokio_postgres::Config>()?
        .connect(tokio_postgres::NoTls)
        .await
        .context("connecting to the bench database")?;
    tokio::spawn(connection);
    Ok(client)
}

/// A new empty database for this run on the server at `base_url`; its URL.
pub async fn fresh_database(base_url: &str, purpose: &str) -> Result<String> {
    let name = format!("mdm_bench_{purpose}_{}", std::process::id());
    let client = connect(base_url).await?;
    // Two calls: several statements in one would run in one transaction,
    // where DROP DATABASE is refused.
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await?;
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(crate::database_url(base_url, &name))
}

/// The transaction id the next write transaction will get: the difference
/// of two readings is how many transactions wrote (committed or aborted) in
/// between. Unlike `pg_stat_database`, it is exact at once; reading it
/// writes nothing.
pub async fn next_transaction_id(url: &str) -> Result<i64> {
    let client = connect(url).await?;
    let row = client
        .query_one(
            "SELECT txid_snapshot_xmax(txid_current_snapshot())::text::bigint",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// How many transactions were rolled back in the database so far, as the
/// statistics collector knows it (it lags by up to a second or so).
pub async fn rolled_back(url: &str) -> Result<i64> {
    let client = connect(url).await?;
    let row = client
        .query_one(
            "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// `pgbench` inserting one row per transaction from `clients` connections
/// for `duration`, on a database of its own; its transactions per second.
pub async fn insert_baseline(
    pgbench: &Path,
    base_url: &str,
    clients: usize,
    duration: Duration,
) -> Result<f64> {
    let url = fresh_database(base_url, "insert").await?;
    connect(&url)
        .await?
        .batch_execute(
            "CREATE TABLE bench_insert (id bigserial PRIMARY KEY, device text NOT NULL,
                                        record bytea NOT NULL)",
        )
        .await?;
    let script = tempfile::NamedTempFile::new()?;
    // About the size of one action row: a text key and a small record.
    std::fs::write(
        script.path(),
        "INSERT INTO bench_insert (device, record) VALUES (md5(random()::text), convert_to(repeat(md5(random()::text), 8), 'UTF8'));\n",
    )?;
    let target = target(&url)?;
    let database = url
        .rsplit_once('/')
        .map(|(_, db)| db.split('?').next().unwrap_or(db).to_owned())
        .unwrap_or_default();
    let mut command = tokio::process::Command::new(pgbench);
    command
        .args(["-n", "-M", "prepared", "-j", "2"])
        .arg(format!("--client={clients}"))
        .arg(format!("--time={}", duration.as_secs().max(1)))
        .arg("-f")
        .arg(script.path())
        .args(["-h", &target.host, "-p", &target.port.to_string()])
        .args(["-U", &target.user, &database])
        .kill_on_drop(true);
    if let Some(password) = &target.password {
        command.env("PGPASSWORD", password);
    }
    let out = command.output().await.context("cannot run pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix("tps = ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|tps| tps.parse().ok())
        })
        .with_context(|| format!("no \"tps = \" line in pgbench's output: {stdout}"))
}
