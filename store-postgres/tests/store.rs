//! What only PostgreSQL has: migrations shared by replicas, what a broken
//! connection or a wrong server is told as, records changed behind the
//! store, several stores on one database. The store contract itself is
//! `conformance.rs` (the suite of `mdm-store-tests`).
#![allow(clippy::unwrap_used)]

mod common;

use common::TestDb;
use mdm_core::model::Webhook;
use mdm_core::store::{SiteStore, Store, StoreError};
use mdm_store_postgres::{PgConfig, PgOpenError, PgStore, SCHEMA_VERSION};
use mdm_store_tests::fixtures::site;

#[tokio::test]
async fn a_webhook_set_through_one_store_is_seen_at_once_by_another_on_the_database() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    let other = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    assert!(!other.site_has_webhook("st_1").await.unwrap());
    store
        .update_site(
            "st_1",
            Box::new(|s| {
                s.webhook = Some(Webhook {
                    url: "https://hooks.example/x".into(),
                    secret_sealed: "sealed".into(),
                });
                true
            }),
        )
        .await
        .unwrap();
    assert!(other.site_has_webhook("st_1").await.unwrap());
    assert!(!other.site_has_webhook("st_none").await.unwrap());
    store.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test]
async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let (a, b, c) = tokio::join!(
        PgStore::connect(db.config(2)),
        PgStore::connect(db.config(2)),
        PgStore::connect(db.config(2)),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let raw = db.raw().await;
    let row = raw
        .query_one(
            "SELECT count(*), count(DISTINCT version), max(version) FROM mdm_schema_migrations",
            &[],
        )
        .await
        .unwrap();
    let (rows, distinct, max): (i64, i64, i32) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (rows, distinct),
        (i64::from(SCHEMA_VERSION), i64::from(SCHEMA_VERSION))
    );
    assert_eq!(max, SCHEMA_VERSION as i32);
    // All three work on the same tables.
    a.insert_site(&site("st_1")).await.unwrap();
    assert!(b.get_site("st_1").await.unwrap().is_some());
    assert!(!c.insert_site(&site("st_1")).await.unwrap());
    for store in [a, b, c] {
        store.close().await.unwrap();
    }
    // Reconnecting migrates nothing more.
    PgStore::connect(db.config(1))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let rows: i64 = raw
        .query_one("SELECT count(*) FROM mdm_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, i64::from(SCHEMA_VERSION));

    raw.execute(
        "INSERT INTO mdm_schema_migrations (version) VALUES ($1)",
        &[&(SCHEMA_VERSION as i32 + 1)],
    )
    .await
    .unwrap();
    match PgStore::connect(db.config(1)).await {
        Err(PgOpenError::SchemaTooNew { found, expected }) => {
            assert_eq!((found, expected), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_record_that_does_not_decode_is_corrupt_and_a_closed_store_is_unavailable() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    db.raw()
        .await
        .execute(
            "UPDATE sites SET record = '\\x7b2278'::bytea WHERE site_id = 'st_1'",
            &[],
        )
        .await
        .unwrap();
    assert!(matches!(
        store.get_site("st_1").await,
        Err(StoreError::Corrupt(_))
    ));
    store.close().await.unwrap();
    assert!(matches!(
        store.get_site("st_1").await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn the_server_refuses_a_wrong_database_and_names_no_secret() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let mut config = PgConfig::new(common::with_database(&db.url, "mdm_no_such_database"));
    config.password = Some(zeroize::Zeroizing::new("a-secret-password".into()));
    let error = PgStore::connect(config).await.unwrap_err();
    assert!(matches!(error, PgOpenError::Refused { .. }), "{error:?}");
    assert!(!error.to_string().contains("a-secret-password"), "{error}");
}

#[tokio::test]
async fn a_database_that_is_not_there_is_unreachable_and_named_by_host_and_port_only() {
    // Needs no database: a port nothing listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut config = PgConfig::new(format!(
        "postgres://mdm:url-secret@127.0.0.1:{port}/mdm?sslmode=disable"
    ));
    config.password = Some(zeroize::Zeroizing::new("override-secret".into()));
    config.connect_timeout = std::time::Duration::from_secs(2);
    assert!(!format!("{config:?}").contains("secret"));
    let error = PgStore::connect(config).await.unwrap_err();
    let PgOpenError::Unreachable { target, .. } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(*target, format!("127.0.0.1:{port}"));
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("secret"), "{shown}");
}

#[tokio::test]
async fn sslmode_require_refuses_a_server_without_tls() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let ssl: String = db
        .raw()
        .await
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let result = PgStore::connect(PgConfig::new(format!(
        "{}{separator}sslmode=require",
        db.url
    )))
    .await;
    if ssl == "on" {
        result.unwrap();
        return;
    }
    let error = result.unwrap_err();
    assert!(
        matches!(error, PgOpenError::Unreachable { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("TLS"), "{error}");
    // The default, prefer, falls back to plaintext.
    PgStore::connect(db.config(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_unit_is_unavailable_and_the_next_call_reconnects() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = PgStore::connect(db.config(1)).await.unwrap();
    store.insert_site(&site("st_1")).await.unwrap();
    let raw = db.raw().await;
    let name = db.name.clone();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        raw.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'mdm-server'",
            &[&name],
        )
        .await
        .unwrap()
    });
    let result = store
        .update_site(
            "st_1",
            Box::new(|s| {
                // The row is read; the connection goes before the write.
                std::thread::sleep(std::time::Duration::from_millis(1_000));
                s.display_name = "never stored".into();
                true
            }),
        )
        .await;
    assert_eq!(killer.await.unwrap(), 1);
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    let stored = store.get_site("st_1").await.unwrap().unwrap();
    assert_eq!(stored.display_name, "Site st_1");
}
