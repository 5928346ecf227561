//! Keeps the benchmark code working: a small run (200 agents) against the
//! real server binary. No timing assertions: figures come from
//! `cargo xtask bench` in release.
#![allow(clippy::unwrap_used)]

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_with_200_agents() {
    let report = mdm_tests::bench::run(mdm_tests::bench::BenchOptions {
        agents: 200,
        server_bin: mdm_tests::server_bin(),
        concurrency: 32,
        bench_exe: env!("CARGO_BIN_EXE_mdm-bench").into(),
        database_url: None,
        pgbench: None,
    })
    .await
    .unwrap();
    assert_eq!(report.agents, 200);
    assert_eq!(report.store, "sled");
    assert!(report.postgres.is_none());
    assert!(report.enroll_per_s > 0.0);
    assert!(report.lock.total_s > 0.0 && report.reset.total_s > 0.0);
    assert_eq!(report.actions_stored, 400);
    assert!(report.baseline_fanout_s > 0.0 && report.baseline_push_only_s > 0.0);
    assert!(report.lock.server_cpu_s > 0.0);
    eprintln!("{}", report.table());
}

/// The same on PostgreSQL (`cargo xtask bench --store postgres`), with
/// PostgreSQL's own figures and the `pgbench` baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_on_postgres_with_100_agents() {
    let Some(database_url) = mdm_tests::test_database_url() else {
        return;
    };
    let pgbench = std::env::var_os("MDM_TEST_POSTGRES_BINDIR")
        .map(|bindir| std::path::PathBuf::from(bindir).join("pgbench"))
        .filter(|pgbench| pgbench.is_file());
    let report = mdm_tests::bench::run(mdm_tests::bench::BenchOptions {
        agents: 100,
        server_bin: mdm_tests::server_bin(),
        concurrency: 32,
        bench_exe: env!("CARGO_BIN_EXE_mdm-bench").into(),
        database_url: Some(database_url),
        pgbench: pgbench.clone(),
    })
    .await
    .unwrap();
    assert_eq!(report.store, "postgres");
    assert_eq!(report.actions_stored, 200);
    let figures = report.postgres.clone().unwrap();
    // Every command wrote at least once, in transactions shared or not.
    assert!(
        figures.lock_write_transactions > 0 && figures.reset_write_transactions > 0,
        "{figures:?}"
    );
    assert_eq!(figures.pgbench_insert_tps.is_some(), pgbench.is_some());
    eprintln!("{}", report.table());
}
