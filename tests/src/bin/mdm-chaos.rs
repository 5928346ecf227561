//! `mdm-chaos [--agents N] [--server-kills N] [--agent-kills N] [--json FILE]`:
//! what `cargo xtask chaos` runs (in release). The server and agent binaries
//! come from `MDM_SERVER_BIN` and `MDM_AGENT_BIN`.

fn main() -> std::process::ExitCode {
    match run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("mdm-chaos: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let mut options = mdm_tests::chaos::ChaosOptions::default();
    let mut json = None;
    let mut args = std::env::args().skip(1);
    let usage = "usage: mdm-chaos [--agents N] [--server-kills N] [--agent-kills N] [--json FILE]";
    while let Some(arg) = args.next() {
        let mut number = || -> anyhow::Result<usize> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a number; {usage}"))
        };
        match arg.as_str() {
            "--agents" => options.agents = number()?,
            "--server-kills" => options.server_kills = number()?,
            "--agent-kills" => options.agent_kills = number()?,
            "--json" => json = args.next(),
            other => anyhow::bail!("unknown argument {other:?}; {usage}"),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(mdm_tests::chaos::run(options))?;
    print!("{}", report.table());
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("chaos: wrote {path}");
    }
    Ok(report.passed())
}
