//! TLS to the database, against a server that speaks it: set
//! `MDM_TEST_TLS_DATABASE_URL` (a database on a server with `ssl=on` whose
//! certificate names the URL's host) and `MDM_TEST_TLS_CA_FILE` (the CA
//! that signed it). Skipped without them; the default test server has no
//! TLS (`require_refuses_a_server_without_tls` in store.rs covers that side).
#![allow(clippy::unwrap_used)]

mod common;

use common::TestDb;
use mdm_core::store::{SiteStore, Store};
use mdm_store_postgres::{PgConfig, PgOpenError, PgStore};
use mdm_store_tests::fixtures::site;

fn tls_server() -> Option<(String, String)> {
    match (
        std::env::var("MDM_TEST_TLS_DATABASE_URL"),
        std::env::var("MDM_TEST_TLS_CA_FILE"),
    ) {
        (Ok(url), Ok(ca)) if !url.is_empty() && !ca.is_empty() => Some((url, ca)),
        _ => {
            eprintln!(
                "skipped: no TLS PostgreSQL (MDM_TEST_TLS_DATABASE_URL, MDM_TEST_TLS_CA_FILE)"
            );
            None
        }
    }
}

/// Whether the store's open connections to the test database (there is
/// at least one) all use TLS, as the server sees them.
async fn store_connections_use_tls(db: &TestDb) -> bool {
    let row = db
        .raw()
        .await
        .query_one(
            "SELECT count(*), coalesce(bool_and(s.ssl), false)
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = $1 AND a.application_name = 'mdm-server'",
            &[&db.name],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) > 0 && row.get::<_, bool>(1)
}

fn with_sslmode(url: &str, mode: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode={mode}")
}

#[tokio::test]
async fn verify_full_trusts_only_the_given_ca() {
    let Some((server, ca)) = tls_server() else {
        return;
    };
    let db = TestDb::on(server).await;

    let mut config = PgConfig::new(with_sslmode(&db.url, "verify-full"));
    config.ca_file = Some(ca.clone().into());
    let store = PgStore::connect(config).await.unwrap();
    assert!(store.insert_site(&site("st_1")).await.unwrap());
    assert!(store_connections_use_tls(&db).await);
    store.close().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let other_ca = dir.path().join("other.pem");
    let other = rcgen::generate_simple_self_signed(vec!["other.example".into()]).unwrap();
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let mut config = PgConfig::new(with_sslmode(&db.url, "verify-full"));
    config.ca_file = Some(other_ca);
    let error = PgStore::connect(config).await.unwrap_err();
    assert!(
        matches!(error, PgOpenError::Unreachable { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("TLS"), "{error}");

    // sslrootcert in the URL does the same as ca_file.
    let url = with_sslmode(&db.url, "verify-full");
    let store = PgStore::connect(PgConfig::new(format!("{url}&sslrootcert={ca}")))
        .await
        .unwrap();
    assert!(store.get_site("st_1").await.unwrap().is_some());
}

#[tokio::test]
async fn require_without_a_ca_encrypts_without_checking() {
    let Some((server, _)) = tls_server() else {
        return;
    };
    let db = TestDb::on(server).await;
    let store = PgStore::connect(PgConfig::new(with_sslmode(&db.url, "require")))
        .await
        .unwrap();
    assert!(store.insert_site(&site("st_1")).await.unwrap());
    assert!(store_connections_use_tls(&db).await);
}
