//! `mdm-bench [--agents N] [--json FILE] --server-bin PATH`: what `cargo
//! xtask bench` runs (in release). With `MDM_BENCH_DATABASE_URL` set the
//! server stores in that PostgreSQL (a new database per run), and
//! `MDM_BENCH_PGBENCH` names the `pgbench` of the insert baseline.

fn main() -> anyhow::Result<()> {
    let mut agents = 2000;
    let mut json = None;
    let mut server_bin = None;
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("--baseline-server") {
        let dir = std::env::args()
            .nth(2)
            .ok_or_else(|| anyhow::anyhow!("--baseline-server DIR"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(mdm_tests::baseline::serve(std::path::Path::new(&dir)));
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agents" => {
                agents = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("--agents N"))?
            }
            "--json" => json = args.next(),
            "--server-bin" => server_bin = args.next(),
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: mdm-bench [--agents N] [--json FILE] --server-bin PATH"
            ),
        }
    }
    raise_open_file_limit();
    let options = mdm_tests::bench::BenchOptions {
        agents,
        server_bin: server_bin
            .ok_or_else(|| anyhow::anyhow!("--server-bin PATH is required"))?
            .into(),
        concurrency: 64,
        bench_exe: std::env::current_exe()?,
        database_url: std::env::var("MDM_BENCH_DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty()),
        pgbench: std::env::var_os("MDM_BENCH_PGBENCH").map(Into::into),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(mdm_tests::bench::run(options))?;
    print!("{}", report.table());
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("bench: wrote {path}");
    }
    Ok(())
}

/// One process holds every agent's connection: lift the soft limit on open
/// files to the hard one.
fn raise_open_file_limit() {
    // `ulimit -n` is a shell builtin; the limit is inherited, so the xtask
    // sets it for us with `prlimit` when available. Report what we have.
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
        && let Some(line) = limits.lines().find(|l| l.starts_with("Max open files"))
    {
        eprintln!(
            "bench: {}",
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
}
