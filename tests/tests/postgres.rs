//! The throwaway PostgreSQL that `cargo xtask test` provisions for the
//! suite: reachable on loopback only, with password authentication.
#![allow(clippy::unwrap_used)]

use tokio_postgres::NoTls;

#[tokio::test]
async fn the_test_database_answers_on_loopback_and_refuses_a_wrong_password() {
    let Some(url) = mdm_tests::test_database_url() else {
        return;
    };
    let config: tokio_postgres::Config = url.parse().unwrap();
    assert!(
        config.get_hosts().iter().all(|host| matches!(
            host,
            tokio_postgres::config::Host::Tcp(name) if name == "127.0.0.1" || name == "localhost" || name == "::1"
        )),
        "the test database must be on loopback"
    );
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    let version: String = client
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version.parse::<u32>().unwrap() >= 140_000, "{version}");

    let mut wrong = config.clone();
    wrong.password("not-the-password");
    let refused = wrong
        .connect(NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    assert!(refused.to_string().contains("password"), "{refused}");
}
