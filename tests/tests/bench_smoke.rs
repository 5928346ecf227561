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
    })
    .await
    .unwrap();
    assert_eq!(report.agents, 200);
    assert!(report.enroll_per_s > 0.0);
    assert!(report.lock.total_s > 0.0 && report.reset.total_s > 0.0);
    assert_eq!(report.actions_stored, 400);
    assert!(report.baseline_fanout_s > 0.0 && report.baseline_push_only_s > 0.0);
    assert!(report.lock.server_cpu_s > 0.0);
    eprintln!("{}", report.table());
}
