//! A fresh database per test on the server `MDM_TEST_DATABASE_URL` names,
//! and records to store.
#![allow(dead_code, clippy::unwrap_used)]

use mdm_core::model::{
    Action, ActionType, CommandPayload, CompanyPasscodeRecord, Device, DeviceFacts, DeviceStatus,
    Notification, PasscodeState, Platform, Site, User, now_millis,
};
use mdm_core::store::{CommandStore, NewCommand};
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

pub fn site(site_id: &str) -> Site {
    Site {
        site_id: site_id.into(),
        display_name: format!("Site {site_id}"),
        failed_attempt_limit: 10,
        created_at: now_millis(),
        reset_passcode_visible_days: 0,
        passcode_policy: Default::default(),
        webhook: None,
    }
}

pub fn user(site_id: &str, email: &str) -> User {
    User {
        user_id: mdm_core::model::short_id("us"),
        site_id: site_id.into(),
        email: email.into(),
        display_name: email.into(),
        created_at: now_millis(),
    }
}

pub fn passcode(site_id: &str, hash: &[u8]) -> CompanyPasscodeRecord {
    CompanyPasscodeRecord {
        site_id: site_id.into(),
        state: PasscodeState::Enabled,
        hash: hex::encode(hash),
        generated_at: now_millis(),
        generated_by: "admin@example.com".into(),
        failed_attempts: 0,
        last_failed_at: None,
        last_used_at: None,
        enrollments: 0,
        failed_sources: Vec::new(),
        pending_lockout: None,
    }
}

pub fn device(site_id: &str, device_id: &str, serial: &str) -> Device {
    Device {
        device_id: device_id.into(),
        site_id: site_id.into(),
        user_email: "user@example.com".into(),
        facts: DeviceFacts {
            platform: Platform::Linux,
            os_version: "6.1".into(),
            model: "test".into(),
            serial_number: serial.into(),
            hostname: "host".into(),
            agent_version: "0.1.0".into(),
            capabilities: Vec::new(),
        },
        status: DeviceStatus::Active,
        enrolled_at: now_millis(),
        last_seen: None,
        certificates: Vec::new(),
        replaces_device_id: None,
        replaced_by_device_id: None,
        security: Default::default(),
    }
}

/// A PENDING command for `device`, due in an hour.
pub fn command(store: &PgStore, device: &Device, kind: ActionType) -> Action {
    let now = now_millis();
    let mut action = Action::pending(
        store.new_action_id(&device.site_id),
        device,
        kind,
        "admin@example.com",
        "queued",
        now,
    );
    action.expires_at = now + 3_600_000;
    action.payload = Some(match kind {
        ActionType::Lock => CommandPayload::Lock {
            message: "locked".into(),
        },
        ActionType::ResetPasscode => CommandPayload::ResetPasscode {
            passcode_sealed: "sealed".into(),
            message: String::new(),
        },
        ActionType::Unenroll => CommandPayload::Unenroll,
    });
    action
}

pub fn new_command(action: Action, online: bool) -> NewCommand {
    NewCommand {
        action,
        online,
        notifications: Vec::new(),
        latest_reset: None,
    }
}

pub fn notification(site_id: &str, subject: &str) -> Notification {
    Notification::pending(
        site_id,
        "email",
        "admin@example.com".into(),
        subject.into(),
        "body".into(),
        now_millis(),
    )
}
