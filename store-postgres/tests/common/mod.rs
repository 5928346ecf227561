//! A fresh database per test on the server `MDM_TEST_DATABASE_URL` names.
//! (Records to store are `mdm_store_tests::fixtures`.)
#![allow(dead_code, clippy::unwrap_used)]

use mdm_store_postgres::{PgConfig, PgStore};
use tokio_postgres::NoTls;

/// The server to make test databases on. Without one the test is skipped
/// with a note, except in CI (`CI=true`), where that is a failure.
pub fn server_url() -> Option<String> {
    match std::env::var("MDM_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true but MDM_TEST_DATABASE_URL is not set")
        }
        _ => {
            eprintln!(
                "skipped: no PostgreSQL (MDM_TEST_DATABASE_URL); `cargo xtask test` starts one"
            );
            None
        }
    }
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_at = base.find("://").unwrap() + 3;
    let base = match base[authority_at..].find('/') {
        Some(slash) => &base[..authority_at + slash],
        None => base,
    };
    format!("{base}/{name}{query}")
}

/// A database of its own for one test, dropped (with its connections) when
/// the test ends, also when it fails.
#[derive(Debug)]
pub struct TestDb {
    server: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Option<TestDb> {
        Some(Self::on(server_url()?).await)
    }

    /// A database of its own on `server` (a URL of a database there).
    pub async fn on(server: String) -> TestDb {
        let name = format!("mdm_test_{}", uuid::Uuid::now_v7().simple());
        let admin = connect(&server).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb {
            url: with_database(&server, &name),
            server,
            name,
        }
    }

    pub fn config(&self, pool_size: usize) -> PgConfig {
        let mut config = PgConfig::new(self.url.clone());
        config.pool_size = pool_size;
        config
    }

    pub async fn store(&self) -> PgStore {
        PgStore::connect(self.config(8)).await.unwrap()
    }

    /// A plain connection to the test database, for looking behind the store.
    pub async fn raw(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on itself.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                connect(&server)
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}
