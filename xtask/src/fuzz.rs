//! `cargo xtask fuzz [--seconds S] [--target NAME]... [--keep-corpus]`:
//! builds the libFuzzer targets in `fuzz/` on the stable toolchain and runs
//! each for S seconds, then prints execs, coverage and crashes per target.
//!
//! `cargo fuzz` needs nightly only for its sanitizer flags; without a
//! sanitizer (`cargo fuzz run --sanitizer none`) the coverage
//! instrumentation libFuzzer needs is plain `-C` flags that stable rustc
//! accepts. This runner passes the same flags cargo-fuzz passes, builds into
//! `target/fuzz` (so the main build cache stays valid) and runs the binaries
//! itself. Each run starts from a scratch copy of the committed seeds in
//! `target/fuzz/corpus/<target>`, so fuzzing never dirties the tree.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run};

/// What cargo-fuzz 0.12/0.13 passes for `--sanitizer none` on Linux (see its
/// `FuzzProject::cargo`), plus explicit overflow checks (which
/// `-Cdebug-assertions` implies anyway). All are stable `-C`/`--cfg` flags.
/// cargo-fuzz also forces `-Ccodegen-units=1` for speed at run time; we leave
/// it out, because on two cores the build would take several times longer
/// than the runs.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "--cfg",
    "fuzzing",
    "-Clink-dead-code",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

/// A single input taking longer than this is reported as a hang.
const INPUT_TIMEOUT_SECONDS: u32 = 10;

struct Options {
    seconds: u64,
    targets: Vec<String>,
    keep_corpus: bool,
}

/// What one target's run produced.
struct Outcome {
    target: String,
    seconds: f64,
    execs: u64,
    execs_per_second: u64,
    corpus_before: usize,
    corpus_after: Option<u64>,
    coverage: Option<u64>,
    artifacts: Vec<PathBuf>,
    status: std::process::ExitStatus,
    log: PathBuf,
}

pub fn fuzz(args: &[String]) -> Result<()> {
    let all = targets()?;
    let options = parse_args(args, &all)?;
    let fuzz_dir = root().join("fuzz");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("fuzz");
    let triple = host_triple()?;
    let mut rustflags = RUSTFLAGS.join(" ");
    if let Ok(extra) = std::env::var("RUSTFLAGS") {
        rustflags.push(' ');
        rustflags.push_str(&extra);
    }
    // `--target` keeps the instrumentation away from build scripts and proc
    // macros, as cargo-fuzz does.
    run(
        "cargo build --release (fuzz targets, coverage-instrumented)",
        cargo()
            .args(["build", "--release", "--manifest-path"])
            .arg(fuzz_dir.join("Cargo.toml"))
            .args(["--bins", "--target", &triple])
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", &rustflags)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("CARGO_FUZZ", "1"),
    )?;
    let bin_dir = target_dir.join(&triple).join("release");
    let mut outcomes = Vec::new();
    for target in &options.targets {
        outcomes.push(run_target(
            target,
            &bin_dir.join(target),
            &fuzz_dir,
            &target_dir,
            &options,
        )?);
    }
    print_table(&outcomes, options.seconds);
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.artifacts.is_empty() || !o.status.success())
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    for outcome in &failed {
        eprintln!(
            "xtask: {} failed ({}); log: {}",
            outcome.target,
            outcome.status,
            outcome.log.display()
        );
        // The panic and its message, as the target printed them.
        let log = std::fs::read_to_string(&outcome.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
            for line in lines.iter().skip(at).take(2) {
                eprintln!("  {line}");
            }
        }
        for artifact in &outcome.artifacts {
            eprintln!(
                "  crash input: {}\n  reproduce:   {} {}",
                artifact.display(),
                bin_dir.join(&outcome.target).display(),
                artifact.display()
            );
        }
    }
    bail!(
        "{} of {} fuzz targets crashed: {}",
        failed.len(),
        outcomes.len(),
        failed
            .iter()
            .map(|o| o.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn parse_args(args: &[String], all: &[String]) -> Result<Options> {
    let mut options = Options {
        seconds: 60,
        targets: Vec::new(),
        keep_corpus: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().context("--seconds needs a number")?;
                options.seconds = value
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .with_context(|| format!("--seconds {value:?} is not a positive number"))?;
            }
            "--target" => {
                let name = args.next().context("--target needs a name")?;
                if !all.contains(name) {
                    bail!("no fuzz target {name:?}; there are: {}", all.join(", "));
                }
                options.targets.push(name.clone());
            }
            "--keep-corpus" => options.keep_corpus = true,
            other => bail!(
                "unknown argument {other:?}; usage: cargo xtask fuzz [--seconds S] [--target NAME]... [--keep-corpus]"
            ),
        }
    }
    if options.targets.is_empty() {
        options.targets = all.to_vec();
    }
    Ok(options)
}

/// The targets: one file each in `fuzz/fuzz_targets/`, as cargo-fuzz lays them out.
fn targets() -> Result<Vec<String>> {
    let dir = root().join("fuzz/fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(rustc)
        .arg("-vV")
        .output()
        .context("cannot run rustc -vV")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host triple")
}

/// Copies the committed seeds into a scratch corpus (fresh unless
/// `keep`), which libFuzzer then grows.
fn scratch_corpus(seeds: &Path, scratch: &Path, keep: bool) -> Result<usize> {
    if !keep && scratch.exists() {
        std::fs::remove_dir_all(scratch)
            .with_context(|| format!("removing {}", scratch.display()))?;
    }
    std::fs::create_dir_all(scratch)?;
    let mut count = 0;
    if seeds.is_dir() {
        for entry in std::fs::read_dir(seeds)? {
            let path = entry?.path();
            if path.is_file()
                && let Some(name) = path.file_name()
            {
                std::fs::copy(&path, scratch.join(name))
                    .with_context(|| format!("copying {}", path.display()))?;
                count += 1;
            }
        }
    }
    Ok(count)
}

fn run_target(
    target: &str,
    binary: &Path,
    fuzz_dir: &Path,
    target_dir: &Path,
    options: &Options,
) -> Result<Outcome> {
    let scratch = target_dir.join("corpus").join(target);
    let seeds = scratch_corpus(
        &fuzz_dir.join("corpus").join(target),
        &scratch,
        options.keep_corpus,
    )?;
    let artifacts_dir = target_dir.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts_dir)?;
    let logs = target_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join(format!("{target}.log"));
    eprintln!(
        "xtask: fuzzing {target} for {} s from {seeds} seeds (log: {})",
        options.seconds,
        log.display()
    );
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut artifact_prefix = artifacts_dir.into_os_string();
    artifact_prefix.push("/");
    let status = Command::new(binary)
        .arg(format!("-max_total_time={}", options.seconds))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .arg({
            let mut arg = std::ffi::OsString::from("-artifact_prefix=");
            arg.push(&artifact_prefix);
            arg
        })
        .arg(&scratch)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let stat = |name: &str| {
        text.lines()
            .filter_map(|line| line.strip_prefix(name))
            .filter_map(|rest| rest.trim_start_matches(':').trim().parse::<u64>().ok())
            .next_back()
    };
    // libFuzzer's status lines: "#1234  NEW  cov: 567 ft: 890 corp: 12/345b ...".
    let last_field = |field: &str| {
        text.lines()
            .filter_map(|line| {
                let rest = &line[line.find(field)? + field.len()..];
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .next_back()
    };
    let artifacts = text
        .lines()
        .filter_map(|line| line.split_once("Test unit written to ").map(|(_, p)| p))
        .map(|p| PathBuf::from(p.trim()))
        .collect();
    let execs = stat("stat::number_of_executed_units").unwrap_or(0);
    Ok(Outcome {
        target: target.to_owned(),
        seconds,
        execs,
        execs_per_second: stat("stat::average_exec_per_sec").unwrap_or(0),
        corpus_before: seeds,
        corpus_after: last_field("corp: "),
        coverage: last_field("cov: "),
        artifacts,
        status,
        log,
    })
}

fn print_table(outcomes: &[Outcome], seconds: u64) {
    println!(
        "\nfuzz run: {seconds} s per target\n\n| target | seconds | execs | execs/s | corpus (seeds -> end) | edges covered | crashes |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for o in outcomes {
        let crashes = if o.artifacts.is_empty() && !o.status.success() {
            "failed (see log)".to_owned()
        } else {
            o.artifacts.len().to_string()
        };
        println!(
            "| {} | {:.0} | {} | {} | {} -> {} | {} | {} |",
            o.target,
            o.seconds,
            o.execs,
            o.execs_per_second,
            o.corpus_before,
            o.corpus_after.map_or("?".into(), |n| n.to_string()),
            o.coverage.map_or("?".into(), |n| n.to_string()),
            crashes
        );
    }
}
