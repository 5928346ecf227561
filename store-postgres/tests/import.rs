//! Importing a whole deployment: rows exactly as the store's own writes
//! make them, into an empty database only, all or nothing, and fast.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::TestDb;
use mdm_core::model::{
    Action, ActionStatus, ActionType, Alert, AlertKind, AuditEntry, CommandPayload,
    NotificationState, Platform, Webhook, now_millis, time_ordered_id,
};
use mdm_core::snapshot::{DeviceAuditEntry, Snapshot, SnapshotCounts};
use mdm_core::store::{
    CommandStore, DeviceStore, OutboxStore, PageRequest, SiteStore, Store, UsersInserted,
};
use mdm_store_postgres::{ImportError, TABLES};
use mdm_store_tests::fixtures::{device, notification, passcode, site, user};

/// An action id as the sled backend makes them: a UUID v7 whose last four
/// bytes are a tag of the site.
fn sled_style_id(tag: u8) -> String {
    let mut bytes = uuid::Uuid::now_v7().into_bytes();
    bytes[12..].copy_from_slice(&[tag, 0xFF, 0, tag]);
    uuid::Uuid::from_bytes(bytes).to_string()
}

fn action(site_id: &str, device_id: &str, kind: ActionType, status: ActionStatus) -> Action {
    let now = now_millis();
    let mut action = Action::pending(
        sled_style_id(7),
        &device(site_id, device_id, ""),
        kind,
        "admin@example.com",
        "queued",
        now,
    );
    if kind != ActionType::Unenroll {
        action.expires_at = now + 3_600_000;
        action.payload = Some(CommandPayload::Lock {
            message: "locked".into(),
        });
    }
    if status != ActionStatus::Pending {
        action.advance(status, "moved", now + 1);
    }
    action
}

/// Records of every kind and of every state their columns tell apart.
fn snapshot() -> Snapshot {
    let mut hooked = site("st_a");
    hooked.webhook = Some(Webhook {
        url: "https://hooks.example/x".into(),
        secret_sealed: "sealed".into(),
    });
    let mut replaced = device("st_a", "dv_2", "SER-1");
    replaced.status = mdm_core::model::DeviceStatus::Replaced;
    replaced.replaced_by_device_id = Some("dv_3".into());
    let mut mac = device("st_a", "dv_3", "SER-1");
    mac.facts.platform = Platform::MacOs;
    mac.user_email = "ann@example.com".into();
    mac.replaces_device_id = Some("dv_2".into());
    let alert = Alert {
        alert_id: time_ordered_id(),
        site_id: "st_b".into(),
        kind: AlertKind::CompanyPasscodeLockedOut,
        created_at: now_millis(),
        details: "locked out".into(),
        failed_attempts: 3,
        source_addresses: vec!["192.0.2.1".into()],
    };
    let mut delivered = notification("st_a", "delivered");
    delivered.state = NotificationState::Delivered;
    delivered.delivered_at = Some(now_millis());
    let mut failed = notification("st_b", "failed");
    failed.state = NotificationState::Failed;
    failed.last_error = "550".into();
    Snapshot {
        sites: vec![hooked, site("st_b")],
        users: vec![
            user("st_a", "ann@example.com"),
            user("st_a", "bob@example.com"),
            user("st_b", "ann@example.com"),
        ],
        passcodes: vec![passcode("st_a", &[0xA1; 32]), passcode("st_b", &[0xB2; 32])],
        devices: vec![
            device("st_a", "dv_1", "SER-0"),
            replaced,
            mac,
            device("st_b", "dv_4", ""),
        ],
        actions: vec![
            action("st_a", "dv_3", ActionType::Lock, ActionStatus::Pending),
            action(
                "st_a",
                "dv_3",
                ActionType::ResetPasscode,
                ActionStatus::Sent,
            ),
            action("st_a", "dv_1", ActionType::Lock, ActionStatus::Succeeded),
            action("st_a", "dv_1", ActionType::Lock, ActionStatus::Canceled),
            action(
                "st_b",
                "dv_4",
                ActionType::Unenroll,
                ActionStatus::Succeeded,
            ),
        ],
        audit: ["enrolled", "locked", "looked at"]
            .into_iter()
            .enumerate()
            .map(|(i, what)| DeviceAuditEntry {
                device_id: if i == 1 { "dv_1" } else { "dv_3" }.into(),
                entry: AuditEntry {
                    at: now_millis() + i as i64,
                    who: "admin@example.com".into(),
                    what: what.into(),
                },
            })
            .collect(),
        alerts: vec![alert],
        notifications: vec![notification("st_a", "pending"), delivered, failed],
    }
}

/// Every row of every table, as JSON text, in key order.
async fn rows(db: &TestDb) -> Vec<(String, Vec<String>)> {
    let raw = db.raw().await;
    let mut all = Vec::new();
    for table in TABLES {
        let rows = raw
            .query(
                &format!("SELECT to_jsonb(t)::text FROM {table} AS t ORDER BY 1"),
                &[],
            )
            .await
            .unwrap();
        all.push((table.to_owned(), rows.iter().map(|r| r.get(0)).collect()));
    }
    all
}

#[tokio::test]
async fn an_import_fills_every_column_as_the_stores_own_writes_do() {
    let Some(written) = TestDb::new().await else {
        return;
    };
    let snapshot = snapshot();
    let store = written.store().await;
    for site in &snapshot.sites {
        assert!(store.insert_site(site).await.unwrap());
    }
    for site in &snapshot.sites {
        let users: Vec<_> = snapshot
            .users
            .iter()
            .filter(|u| u.site_id == site.site_id)
            .cloned()
            .collect();
        assert_eq!(
            store.insert_users(&site.site_id, &users, 10).await.unwrap(),
            UsersInserted::Inserted { existing: vec![] }
        );
    }
    // Enrolled before the passcodes exist, so that they count no enrollment.
    for device in &snapshot.devices {
        let mut device = device.clone();
        store.enroll_device(&mut device, None).await.unwrap();
    }
    for passcode in &snapshot.passcodes {
        store.replace_passcode(passcode).await.unwrap();
    }
    for action in &snapshot.actions {
        store.record_action(action).await.unwrap();
    }
    for audit in &snapshot.audit {
        store
            .append_audit(&audit.device_id, &audit.entry)
            .await
            .unwrap();
    }
    for alert in &snapshot.alerts {
        store.put_alert(alert, &[]).await.unwrap();
    }
    for notification in &snapshot.notifications {
        store.put_notification(notification).await.unwrap();
    }
    assert_eq!(store.counts().await.unwrap(), snapshot.counts());

    let imported = TestDb::new().await.unwrap();
    let target = imported.store().await;
    assert!(target.is_empty().await.unwrap());
    assert_eq!(target.import(&snapshot).await.unwrap(), snapshot.counts());
    assert!(!target.is_empty().await.unwrap());
    let (theirs, ours) = (rows(&written).await, rows(&imported).await);
    for ((table, theirs), (_, ours)) in theirs.iter().zip(&ours) {
        assert!(!theirs.is_empty(), "{table} has rows");
        assert_eq!(theirs, ours, "the rows of {table}");
    }
    // And the store reads them: the partial indexes' conditions hold.
    let queued = target.queued_actions("dv_3").await.unwrap();
    assert_eq!(queued, snapshot.actions[..2].to_vec());
    assert_eq!(target.pending_notifications().await.unwrap().len(), 1);
    assert!(target.site_has_webhook("st_a").await.unwrap());
    assert_eq!(
        target.site_for_passcode_hash(&[0xB2; 32]).await.unwrap(),
        Some("st_b".into())
    );
    store.close().await.unwrap();
    target.close().await.unwrap();
}

#[tokio::test]
async fn an_import_into_a_database_with_a_row_is_refused_naming_its_table_and_stores_nothing() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    assert!(store.is_empty().await.unwrap());
    assert_eq!(store.table_with_rows().await.unwrap(), None);
    store
        .append_audit(
            "dv_x",
            &AuditEntry {
                at: 1,
                who: "a".into(),
                what: "b".into(),
            },
        )
        .await
        .unwrap();
    assert!(!store.is_empty().await.unwrap());
    let error = store.import(&snapshot()).await.unwrap_err();
    assert!(
        matches!(error, ImportError::NotEmpty { table: "audit" }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("table audit has rows"),
        "{error}"
    );
    assert_eq!(
        store.counts().await.unwrap(),
        SnapshotCounts {
            audit_entries: 1,
            ..SnapshotCounts::default()
        }
    );
}

#[tokio::test]
async fn a_snapshot_that_cannot_go_in_whole_stores_nothing() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    let mut twice = snapshot();
    // A notification twice: the rows of every other table are in when it fails.
    twice.notifications.push(twice.notifications[0].clone());
    let error = store.import(&twice).await.unwrap_err();
    assert!(matches!(error, ImportError::Store(_)), "{error:?}");
    assert!(store.is_empty().await.unwrap(), "{error}");
    // The database is as it was: the same snapshot, whole, goes in after.
    assert_eq!(
        store.import(&snapshot()).await.unwrap(),
        snapshot().counts()
    );
}

#[tokio::test]
async fn the_tables_an_import_checks_are_every_table_of_the_schema() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let _store = db.store().await;
    let mut tables: Vec<String> = db
        .raw()
        .await
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()
             AND tablename <> 'mdm_schema_migrations'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    tables.sort();
    let mut ours: Vec<String> = TABLES.iter().map(|t| (*t).to_owned()).collect();
    ours.sort();
    assert_eq!(tables, ours);
}

/// 10,000 devices and 100,000 actions (with timelines) go in within
/// seconds; printed with `--nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_snapshot_imports_in_seconds() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let built = Instant::now();
    let mut snapshot = Snapshot::default();
    for s in 0..10 {
        let site_id = format!("st_{s:02}");
        snapshot.sites.push(site(&site_id));
        snapshot
            .passcodes
            .push(passcode(&site_id, &[s as u8 + 1; 32]));
        for u in 0..100 {
            snapshot
                .users
                .push(user(&site_id, &format!("user{u}@example.com")));
        }
        for d in 0..1000 {
            let device_id = format!("dv_{s:02}_{d:04}");
            snapshot
                .devices
                .push(device(&site_id, &device_id, &format!("SER-{s}-{d}")));
            for a in 0..10 {
                let status = match a {
                    9 => ActionStatus::Pending,
                    8 => ActionStatus::Sent,
                    7 => ActionStatus::Canceled,
                    _ => ActionStatus::Succeeded,
                };
                let mut action = action(&site_id, &device_id, ActionType::Lock, status);
                if status == ActionStatus::Succeeded {
                    action.advance(ActionStatus::Acknowledged, "stored by the agent", 1);
                }
                snapshot.actions.push(action);
            }
            for a in 0..2 {
                snapshot.audit.push(DeviceAuditEntry {
                    device_id: device_id.clone(),
                    entry: AuditEntry {
                        at: a,
                        who: "admin@example.com".into(),
                        what: "looked".into(),
                    },
                });
            }
            snapshot.notifications.push(notification(&site_id, "reset"));
        }
    }
    let built = built.elapsed();
    let store = db.store().await;
    let started = Instant::now();
    let counts = store.import(&snapshot).await.unwrap();
    let took = started.elapsed();
    eprintln!(
        "imported {counts} in {:.2} s (snapshot built in {:.2} s)",
        took.as_secs_f64(),
        built.as_secs_f64()
    );
    assert_eq!(counts, snapshot.counts());
    assert_eq!(counts.actions, 100_000);
    assert!(took.as_secs() < 120, "{took:?}");
    let queued = store.queued_actions("dv_05_0500").await.unwrap();
    assert_eq!(queued.len(), 2);
    let page = store
        .list_devices(
            "st_09",
            &Default::default(),
            PageRequest {
                token: "",
                limit: 5,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 5);
    store.close().await.unwrap();
}
