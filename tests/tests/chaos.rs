//! The short crash-restart run: real server and agent processes, SIGKILLs
//! of both under a lock/reset fan-out; every accepted command ends final,
//! none lost, none applied twice. `cargo xtask chaos` is the long version.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mdm_tests::chaos::{ChaosOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_commands_survive_server_and_agent_sigkills() {
    let report = run(ChaosOptions {
        agents: 20,
        server_kills: 4,
        agent_kills: 4,
        simulated_delay: Duration::from_millis(20),
        admin_clients: 2,
    })
    .await
    .unwrap();
    println!("{}", report.table());
    assert!(report.passed(), "{}", report.table());
    assert_eq!(report.server_kills, 4);
    assert_eq!(report.agent_kills, 4);
    assert!(report.accepted > 0, "no command was accepted");
    assert!(report.succeeded > 0, "no command succeeded");
    assert_eq!(report.lost + report.unsettled + report.applied_twice, 0);
}
