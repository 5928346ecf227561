//! The store contract on a real PostgreSQL: every operation, units that
//! fail storing nothing, the per-device and per-passcode serialisation
//! under concurrency, page tokens, and migrations.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{TestDb, command, device, new_command, notification, passcode, site, user};
use mdm_core::model::{
    ActionStatus, ActionType, Alert, AlertKind, AuditEntry, DeviceStatus, FailureCode, LatestReset,
    NotificationState, PasscodeState, Platform, Webhook, now_millis,
};
use mdm_core::rules::{AgentReport, SUPERSEDED};
use mdm_core::store::{
    ActionFilter, Canceled, CommandStore, Delivery, DeviceFilter, DeviceStore, Enrolled,
    FailedAttempt, FailedAttemptEntry, OutboxStore, PageRequest, Reported, SiteFilter, SiteStore,
    Store, StoreError, UsersInserted,
};
use mdm_store_postgres::{PgConfig, PgOpenError, PgStore, SCHEMA_VERSION};

fn bad<T>(result: Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::BadPageToken))
}

fn first(limit: usize) -> PageRequest<'static> {
    PageRequest { token: "", limit }
}

fn next(token: &str, limit: usize) -> PageRequest<'_> {
    PageRequest { token, limit }
}

#[tokio::test]
async fn sites_are_stored_changed_listed_in_id_order_and_know_their_webhook() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    for id in ["st_c", "st_a", "st_b", "st_d"] {
        assert!(store.insert_site(&site(id)).await.unwrap());
    }
    let mut taken = site("st_a");
    taken.display_name = "another".into();
    assert!(!store.insert_site(&taken).await.unwrap());
    assert_eq!(
        store.get_site("st_a").await.unwrap().unwrap().display_name,
        "Site st_a"
    );
    assert_eq!(store.get_site("st_none").await.unwrap(), None);

    assert!(!store.site_has_webhook("st_b").await.unwrap());
    let changed = store
        .update_site(
            "st_b",
            Box::new(|s| {
                s.webhook = Some(Webhook {
                    url: "https://hooks.example/x".into(),
                    secret_sealed: "sealed".into(),
                });
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(changed.webhook.is_some());
    assert!(store.site_has_webhook("st_b").await.unwrap());
    // Another process sharing the database sees it at once.
    let other = db.store().await;
    assert!(other.site_has_webhook("st_b").await.unwrap());
    assert!(!other.site_has_webhook("st_none").await.unwrap());
    let unchanged = store
        .update_site(
            "st_b",
            Box::new(|s| {
                s.display_name = "not written".into();
                false
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unchanged.display_name, "not written");
    assert_eq!(
        store.get_site("st_b").await.unwrap().unwrap().display_name,
        "Site st_b"
    );
    assert!(
        store
            .update_site("st_none", Box::new(|_| true))
            .await
            .unwrap()
            .is_none()
    );

    let page = store
        .list_sites(&SiteFilter::default(), first(3))
        .await
        .unwrap();
    let ids: Vec<_> = page.items.iter().map(|s| s.site_id.as_str()).collect();
    assert_eq!(ids, ["st_a", "st_b", "st_c"]);
    let rest = store
        .list_sites(&SiteFilter::default(), next(&page.next_page_token, 3))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].site_id, "st_d");
    assert_eq!(rest.next_page_token, "");
    let only = SiteFilter {
        only: Some(vec!["st_d".into(), "st_b".into(), "st_none".into()]),
    };
    let ids: Vec<_> = store
        .list_sites(&only, first(10))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.site_id)
        .collect();
    assert_eq!(ids, ["st_b", "st_d"]);
    store.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test]
async fn users_go_in_all_or_none_within_the_quota_and_are_found_by_email() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    let alice = user("st_1", "alice@example.com");
    let batch = [
        user("st_1", "carol@example.com"),
        alice.clone(),
        user("st_1", "bob@example.com"),
        // The same email twice in one batch: the second is skipped.
        user("st_1", "bob@example.com"),
    ];
    assert_eq!(
        store.insert_users("st_1", &batch, 10).await.unwrap(),
        UsersInserted::Inserted { existing: vec![3] }
    );
    let again = [
        user("st_1", "alice@example.com"),
        user("st_1", "dave@example.com"),
    ];
    assert_eq!(
        store.insert_users("st_1", &again, 3).await.unwrap(),
        UsersInserted::OverQuota { users: 3 }
    );
    assert!(
        store
            .get_user("st_1", "dave@example.com")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.insert_users("st_1", &again, 4).await.unwrap(),
        UsersInserted::Inserted { existing: vec![0] }
    );
    store
        .insert_users("st_2", &[user("st_2", "alice@example.com")], 1)
        .await
        .unwrap();

    assert_eq!(
        store.get_user("st_1", "alice@example.com").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        store.get_user_by_id(&alice.user_id).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        store.get_user("st_1", "nobody@example.com").await.unwrap(),
        None
    );
    assert_eq!(
        store.get_user("st_1", "nul\0@example.com").await.unwrap(),
        None
    );
    assert_eq!(
        store.sites_of_email("alice@example.com").await.unwrap(),
        ["st_1", "st_2"]
    );

    let page = store.list_users("st_1", first(2)).await.unwrap();
    let emails: Vec<_> = page.items.iter().map(|u| u.email.as_str()).collect();
    assert_eq!(emails, ["alice@example.com", "bob@example.com"]);
    let page = store
        .list_users("st_1", next(&page.next_page_token, 2))
        .await
        .unwrap();
    let emails: Vec<_> = page.items.iter().map(|u| u.email.as_str()).collect();
    assert_eq!(emails, ["carol@example.com", "dave@example.com"]);
    assert_eq!(page.next_page_token, "");

    assert_eq!(
        store.delete_user(&alice.user_id).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(store.delete_user(&alice.user_id).await.unwrap(), None);
    assert_eq!(
        store.sites_of_email("alice@example.com").await.unwrap(),
        ["st_2"]
    );
}

#[tokio::test]
async fn a_replaced_passcode_stops_working_at_once_and_changes_are_kept() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    assert_eq!(store.get_passcode("st_1").await.unwrap(), None);
    let old = passcode("st_1", b"old hash");
    store.replace_passcode(&old).await.unwrap();
    assert_eq!(store.get_passcode("st_1").await.unwrap(), Some(old.clone()));
    assert_eq!(
        store
            .site_for_passcode_hash(b"old hash")
            .await
            .unwrap()
            .as_deref(),
        Some("st_1")
    );
    let new = passcode("st_1", b"new hash");
    store.replace_passcode(&new).await.unwrap();
    assert_eq!(
        store.site_for_passcode_hash(b"old hash").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .site_for_passcode_hash(b"new hash")
            .await
            .unwrap()
            .as_deref(),
        Some("st_1")
    );
    let disabled = store
        .update_passcode(
            "st_1",
            Box::new(|r| {
                r.state = PasscodeState::Disabled;
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(disabled.state, PasscodeState::Disabled);
    assert_eq!(store.get_passcode("st_1").await.unwrap(), Some(disabled));
    assert!(
        store
            .update_passcode("st_2", Box::new(|_| true))
            .await
            .unwrap()
            .is_none()
    );

    let mut not_hex = passcode("st_1", b"x");
    not_hex.hash = "not hex".into();
    assert!(matches!(
        store.replace_passcode(&not_hex).await,
        Err(StoreError::Corrupt(_))
    ));
}

fn lockout(
    site: &mdm_core::model::Site,
    record: &mdm_core::model::CompanyPasscodeRecord,
) -> (Alert, Vec<mdm_core::model::Notification>) {
    let alert = Alert {
        alert_id: mdm_core::model::time_ordered_id(),
        site_id: site.site_id.clone(),
        kind: AlertKind::CompanyPasscodeLockedOut,
        created_at: now_millis(),
        details: "locked out".into(),
        failed_attempts: record.failed_attempts,
        source_addresses: record.failed_sources.clone(),
    };
    let notifications = vec![
        notification(&site.site_id, "locked out (1)"),
        notification(&site.site_id, "locked out (2)"),
    ];
    (alert, notifications)
}

#[tokio::test]
async fn failed_attempts_count_in_order_and_the_one_at_the_limit_locks_out() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    let mut limited = site("st_1");
    limited.failed_attempt_limit = 3;
    store.insert_site(&limited).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
    let attempt = |site: &mdm_core::model::Site, source: &str| FailedAttemptEntry {
        site: site.clone(),
        source: source.into(),
        at: now_millis(),
    };
    let outcomes = store
        .record_failed_attempts(
            &[
                attempt(&limited, "10.0.0.1"),
                attempt(&site("st_2"), "10.0.0.1"),
                attempt(&limited, "10.0.0.2"),
                attempt(&limited, "10.0.0.1"),
                attempt(&limited, "10.0.0.3"),
            ],
            &lockout,
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 5);
    assert_eq!(outcomes[0], FailedAttempt::Counted { failed_attempts: 1 });
    assert_eq!(outcomes[1], FailedAttempt::NotEnabled);
    assert_eq!(outcomes[2], FailedAttempt::Counted { failed_attempts: 2 });
    let FailedAttempt::LockedOut(alert) = &outcomes[3] else {
        panic!("{:?}", outcomes[3]);
    };
    assert_eq!(alert.failed_attempts, 3);
    assert_eq!(alert.source_addresses, ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(outcomes[4], FailedAttempt::NotEnabled);
    let record = store.get_passcode("st_1").await.unwrap().unwrap();
    assert_eq!(record.state, PasscodeState::LockedOut);
    assert_eq!(record.failed_attempts, 3);
    let alerts = store.list_alerts("st_1", first(10)).await.unwrap().items;
    assert_eq!(alerts, [alert.as_ref().clone()]);
    assert_eq!(store.pending_notifications().await.unwrap().len(), 2);
    assert!(
        store
            .record_failed_attempts(&[], &lockout)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn forty_concurrent_wrong_passcodes_lock_out_exactly_once_at_the_limit() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = Arc::new(PgStore::connect(db.config(20)).await.unwrap());
    let limited = site("st_1");
    assert_eq!(limited.failed_attempt_limit, 10);
    store.insert_site(&limited).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
    let calls = (0..40).map(|i| {
        let store = store.clone();
        let limited = limited.clone();
        tokio::spawn(async move {
            let entry = FailedAttemptEntry {
                site: limited,
                source: format!("10.0.0.{i}"),
                at: now_millis(),
            };
            store
                .record_failed_attempts(&[entry], &lockout)
                .await
                .unwrap()
                .remove(0)
        })
    });
    let outcomes: Vec<FailedAttempt> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let locked: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, FailedAttempt::LockedOut(_)))
        .collect();
    assert_eq!(locked.len(), 1, "{outcomes:?}");
    let mut counted: Vec<u32> = outcomes
        .iter()
        .filter_map(|o| match o {
            FailedAttempt::Counted { failed_attempts } => Some(*failed_attempts),
            _ => None,
        })
        .collect();
    counted.sort_unstable();
    assert_eq!(counted, (1..10).collect::<Vec<_>>());
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == FailedAttempt::NotEnabled)
            .count(),
        30
    );
    assert_eq!(
        store
            .list_alerts("st_1", first(10))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(store.pending_notifications().await.unwrap().len(), 2);
    let record = store.get_passcode("st_1").await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.failed_attempts),
        (PasscodeState::LockedOut, 10)
    );
}

#[tokio::test]
async fn enrolling_replaces_a_proven_device_stays_alongside_a_claimed_serial_and_counts() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();

    let mut first_device = device("st_1", "dv_1", "SER1");
    assert_eq!(
        store.enroll_device(&mut first_device, None).await.unwrap(),
        Enrolled::New
    );
    // Same serial, nothing proven: both stay.
    let mut claimer = device("st_1", "dv_2", "SER1");
    assert_eq!(
        store.enroll_device(&mut claimer, None).await.unwrap(),
        Enrolled::AlongsideSameSerial("dv_1".into())
    );
    // Proven, but another serial: not a replacement.
    let mut other_serial = device("st_1", "dv_3", "SER3");
    assert_eq!(
        store
            .enroll_device(&mut other_serial, Some("dv_1"))
            .await
            .unwrap(),
        Enrolled::New
    );
    // Another site's device with the serial is not a duplicate.
    let mut elsewhere = device("st_2", "dv_4", "SER1");
    assert_eq!(
        store.enroll_device(&mut elsewhere, None).await.unwrap(),
        Enrolled::New
    );
    // No serial: never a duplicate.
    let mut blank_a = device("st_1", "dv_5", "");
    let mut blank_b = device("st_1", "dv_6", "");
    assert_eq!(
        store.enroll_device(&mut blank_a, None).await.unwrap(),
        Enrolled::New
    );
    assert_eq!(
        store.enroll_device(&mut blank_b, None).await.unwrap(),
        Enrolled::New
    );

    let mut replacement = device("st_1", "dv_7", "SER1");
    assert_eq!(
        store
            .enroll_device(&mut replacement, Some("dv_1"))
            .await
            .unwrap(),
        Enrolled::Replacing("dv_1".into())
    );
    assert_eq!(replacement.replaces_device_id.as_deref(), Some("dv_1"));
    let stored = store.get_device("dv_7").await.unwrap().unwrap();
    assert_eq!(*stored, replacement);
    let old = store.get_device("dv_1").await.unwrap().unwrap();
    assert_eq!(old.status, DeviceStatus::Replaced);
    assert_eq!(old.replaced_by_device_id.as_deref(), Some("dv_7"));
    // The replaced device proves nothing any more.
    let mut late = device("st_1", "dv_8", "SER1");
    assert!(matches!(
        store.enroll_device(&mut late, Some("dv_1")).await.unwrap(),
        Enrolled::AlongsideSameSerial(_)
    ));
    // A device id taken fails the unit: nothing counted.
    let before = store.get_passcode("st_1").await.unwrap().unwrap();
    let mut taken = device("st_1", "dv_8", "SER9");
    assert!(store.enroll_device(&mut taken, None).await.is_err());
    let record = store.get_passcode("st_1").await.unwrap().unwrap();
    assert_eq!(record.enrollments, before.enrollments);

    // Seven enrollments on st_1 (st_2 has no passcode).
    assert_eq!(record.enrollments, 7);
    assert!(record.last_used_at.is_some_and(|at| at > 0));
}

#[tokio::test]
async fn devices_change_list_by_id_with_filters_and_keep_an_audit_trail() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    for (id, platform, email) in [
        ("dv_c", Platform::Linux, "a@example.com"),
        ("dv_a", Platform::Windows, "b@example.com"),
        ("dv_b", Platform::Linux, "b@example.com"),
        ("dv_d", Platform::Linux, "a@example.com"),
    ] {
        let mut d = device("st_1", id, id);
        d.facts.platform = platform;
        d.user_email = email.into();
        store.enroll_device(&mut d, None).await.unwrap();
    }
    let mut elsewhere = device("st_2", "dv_x", "x");
    store.enroll_device(&mut elsewhere, None).await.unwrap();

    let seen = store
        .update_device_soon(
            "dv_a",
            Box::new(|d| {
                d.last_seen = Some(42);
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.last_seen, Some(42));
    let unenrolled = store
        .update_device(
            "dv_d",
            Box::new(|d| {
                d.status = DeviceStatus::Unenrolled;
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unenrolled.status, DeviceStatus::Unenrolled);
    assert_eq!(
        store.get_device("dv_a").await.unwrap().unwrap().last_seen,
        Some(42)
    );
    assert!(
        store
            .update_device("dv_none", Box::new(|_| true))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.get_device("dv_none").await.unwrap().is_none());

    let all = DeviceFilter::default();
    let page = store.list_devices("st_1", &all, first(3)).await.unwrap();
    let ids: Vec<_> = page.items.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(ids, ["dv_a", "dv_b", "dv_c"]);
    let page = store
        .list_devices("st_1", &all, next(&page.next_page_token, 3))
        .await
        .unwrap();
    let ids: Vec<_> = page.items.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!((ids, page.next_page_token.as_str()), (vec!["dv_d"], ""));
    let linux_active = DeviceFilter {
        platform: Some(Platform::Linux),
        status: Some(DeviceStatus::Active),
        user_email: String::new(),
    };
    let ids: Vec<_> = store
        .list_devices("st_1", &linux_active, first(10))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(ids, ["dv_b", "dv_c"]);
    let of_b = DeviceFilter {
        user_email: "b@example.com".into(),
        ..DeviceFilter::default()
    };
    let ids: Vec<_> = store
        .list_devices("st_1", &of_b, first(10))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(ids, ["dv_a", "dv_b"]);

    for what in ["enrolled", "locked", "unlocked"] {
        store
            .append_audit(
                "dv_a",
                &AuditEntry {
                    at: now_millis(),
                    who: "admin@example.com".into(),
                    what: what.into(),
                },
            )
            .await
            .unwrap();
    }
    let trail: Vec<_> = store
        .list_audit("dv_a", 2)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.what)
        .collect();
    assert_eq!(trail, ["unlocked", "locked"]);
    assert!(store.list_audit("dv_b", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn commands_queue_supersede_go_out_report_cancel_and_expire() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    let mut phone = device("st_1", "dv_1", "S1");
    let mut laptop = device("st_1", "dv_2", "S2");
    store.enroll_device(&mut phone, None).await.unwrap();
    store.enroll_device(&mut laptop, None).await.unwrap();

    // Online and nothing waits: straight out as SENT.
    let lock = store
        .queue_command(new_command(command(&store, &phone, ActionType::Lock), true))
        .await
        .unwrap();
    assert!(lock.direct);
    assert_eq!(lock.action.status, ActionStatus::Sent);
    // A SENT lock is not superseded by the next; offline, the new one waits.
    let reset_action = command(&store, &phone, ActionType::ResetPasscode);
    let reset_id = reset_action.action_id.clone();
    let reset = LatestReset {
        passcode_sealed: "sealed".into(),
        reset_at: now_millis(),
        reset_by: "admin@example.com".into(),
        action_id: reset_id.clone(),
    };
    let mail = notification("st_1", "your new passcode");
    let queued = store
        .queue_command(mdm_core::store::NewCommand {
            action: reset_action,
            online: false,
            notifications: vec![mail.clone()],
            latest_reset: Some(reset.clone()),
        })
        .await
        .unwrap();
    assert!(!queued.direct && queued.superseded.is_empty());
    assert_eq!(
        store
            .get_device("dv_1")
            .await
            .unwrap()
            .unwrap()
            .security
            .latest_reset,
        Some(reset)
    );
    assert_eq!(store.pending_notifications().await.unwrap(), [mail]);
    // A new lock supersedes the PENDING reset, and (online) still waits for nothing.
    let second_lock = store
        .queue_command(new_command(command(&store, &phone, ActionType::Lock), true))
        .await
        .unwrap();
    assert_eq!(second_lock.superseded.len(), 1);
    assert_eq!(second_lock.superseded[0].action_id, reset_id);
    assert_eq!(second_lock.superseded[0].status, ActionStatus::Canceled);
    assert!(
        second_lock.superseded[0]
            .failure_reason
            .starts_with(SUPERSEDED)
    );
    assert!(second_lock.direct);
    let stored_reset = store.get_action(&reset_id).await.unwrap().unwrap();
    assert_eq!(stored_reset.status, ActionStatus::Canceled);

    // An offline lock behind nothing pending: PENDING, then marked sent.
    let waiting = store
        .queue_command(new_command(
            command(&store, &laptop, ActionType::Lock),
            false,
        ))
        .await
        .unwrap();
    assert!(!waiting.direct);
    let waiting_id = waiting.action.action_id.clone();
    let queue: Vec<_> = store
        .queued_actions("dv_1")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action_id)
        .collect();
    assert_eq!(
        queue,
        [
            lock.action.action_id.clone(),
            second_lock.action.action_id.clone()
        ]
    );

    let outcomes = store
        .mark_sent(
            "dv_2",
            &[
                waiting_id.clone(),
                waiting_id.clone(),
                lock.action.action_id.clone(),
                "no-such-action".into(),
            ],
            now_millis(),
        )
        .await
        .unwrap();
    assert!(matches!(&outcomes[0], Delivery::First(a) if a.status == ActionStatus::Sent));
    assert!(matches!(outcomes[1], Delivery::Again));
    // Another device's command is not this stream's.
    assert!(matches!(outcomes[2], Delivery::Withdrawn));
    assert!(matches!(outcomes[3], Delivery::Withdrawn));
    let outcomes = store
        .mark_sent("dv_1", std::slice::from_ref(&reset_id), now_millis())
        .await
        .unwrap();
    assert!(matches!(outcomes[0], Delivery::Withdrawn));

    // Reports move a command along, in order.
    let now = now_millis();
    let Reported::Applied(steps) = store
        .apply_reports(
            "dv_2",
            &waiting_id,
            &[
                AgentReport::Acknowledged,
                AgentReport::Progress("locking\0 the screen".into()),
                AgentReport::Acknowledged,
                AgentReport::Succeeded("locked".into()),
            ],
            now,
        )
        .await
        .unwrap()
    else {
        panic!("not applied");
    };
    let statuses: Vec<_> = steps.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [
            ActionStatus::Acknowledged,
            ActionStatus::InProgress,
            ActionStatus::Succeeded
        ]
    );
    let done = store.get_action(&waiting_id).await.unwrap().unwrap();
    assert_eq!(done, steps[2]);
    assert!(store.queued_actions("dv_2").await.unwrap().is_empty());
    assert!(matches!(
        store
            .apply_reports("dv_1", &waiting_id, &[AgentReport::Acknowledged], now)
            .await
            .unwrap(),
        Reported::OtherDevice
    ));
    assert!(matches!(
        store
            .apply_reports("dv_2", "nope", &[AgentReport::Acknowledged], now)
            .await
            .unwrap(),
        Reported::Unknown
    ));
    assert!(matches!(
        store.apply_reports("dv_2", &waiting_id, &[AgentReport::Acknowledged], now).await.unwrap(),
        Reported::Applied(steps) if steps.is_empty()
    ));

    // Cancel: what the device has not acknowledged only.
    assert!(matches!(
        store
            .cancel_action(&waiting_id, "admin@example.com", now)
            .await
            .unwrap(),
        Canceled::Refused(ActionStatus::Succeeded)
    ));
    assert!(matches!(
        store
            .cancel_action("nope", "admin@example.com", now)
            .await
            .unwrap(),
        Canceled::NotFound
    ));
    let Canceled::Done(canceled) = store
        .cancel_action(&lock.action.action_id, "admin@example.com", now)
        .await
        .unwrap()
    else {
        panic!("not canceled");
    };
    assert_eq!(canceled.status, ActionStatus::Canceled);
    assert_eq!(canceled.failure_reason, "canceled by admin@example.com");

    // Expiry: only commands whose time ran out.
    let mut soon = command(&store, &laptop, ActionType::Lock);
    soon.expires_at = now + 1_000;
    let soon = store
        .queue_command(new_command(soon, false))
        .await
        .unwrap()
        .action;
    assert!(store.expire_due(now).await.unwrap().is_empty());
    let expired = store.expire_due(now + 1_000).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].action_id, soon.action_id);
    assert_eq!(expired[0].status, ActionStatus::Expired);
    assert_eq!(expired[0].failure_code, Some(FailureCode::Expired));
    assert!(store.expire_due(now + 2_000).await.unwrap().is_empty());
    // second_lock (expires in an hour) is still queued.
    let queue = store.queued_actions("dv_1").await.unwrap();
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0].action_id, second_lock.action.action_id);

    assert!(
        store
            .device_has_action("dv_2", &[ActionType::Lock], ActionStatus::Succeeded)
            .await
            .unwrap()
    );
    assert!(
        !store
            .device_has_action(
                "dv_2",
                &[ActionType::ResetPasscode],
                ActionStatus::Succeeded
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .device_has_action("dv_2", &[], ActionStatus::Succeeded)
            .await
            .unwrap()
    );

    // An action final already (an unenroll), stored as it is.
    let mut unenroll = command(&store, &laptop, ActionType::Unenroll);
    unenroll.payload = None;
    unenroll.advance(ActionStatus::Succeeded, "unenrolled", now);
    store.record_action(&unenroll).await.unwrap();
    assert_eq!(
        store.get_action(&unenroll.action_id).await.unwrap(),
        Some(unenroll.clone())
    );
    assert!(store.queued_actions("dv_2").await.unwrap().is_empty());
    assert_eq!(store.get_action("nul\0").await.unwrap(), None);

    // A command for a device that is not stored is refused, storing nothing.
    let ghost = device("st_1", "dv_ghost", "G");
    let refused = store
        .queue_command(new_command(
            command(&store, &ghost, ActionType::Lock),
            false,
        ))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Backend(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn actions_list_newest_first_filtered_and_paged() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    let mut a = device("st_1", "dv_a", "A");
    let mut b = device("st_1", "dv_b", "B");
    store.enroll_device(&mut a, None).await.unwrap();
    store.enroll_device(&mut b, None).await.unwrap();
    let mut ids = Vec::new();
    for (device, kind) in [
        (&a, ActionType::Lock),
        (&b, ActionType::Lock),
        (&a, ActionType::Unenroll),
        (&b, ActionType::ResetPasscode),
        (&a, ActionType::Lock),
    ] {
        let mut action = command(&store, device, kind);
        action.payload = None;
        action.created_by = if kind == ActionType::Lock {
            "locker@example.com".into()
        } else {
            "other@example.com".into()
        };
        store.record_action(&action).await.unwrap();
        ids.push(action.action_id);
    }
    let newest_first: Vec<_> = ids.iter().rev().cloned().collect();
    let site = ActionFilter::site("st_1");
    let page = store.list_actions(&site, first(2)).await.unwrap();
    let mut listed: Vec<_> = page.items.iter().map(|a| a.action_id.clone()).collect();
    let mut token = page.next_page_token;
    while !token.is_empty() {
        let page = store.list_actions(&site, next(&token, 2)).await.unwrap();
        listed.extend(page.items.iter().map(|a| a.action_id.clone()));
        token = page.next_page_token;
    }
    assert_eq!(listed, newest_first);

    let mut of_a = ActionFilter::site("st_1");
    of_a.device_id = Some("dv_a".into());
    of_a.action_type = Some(ActionType::Lock);
    let listed: Vec<_> = store
        .list_actions(&of_a, first(10))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|a| a.action_id)
        .collect();
    assert_eq!(listed, [ids[4].clone(), ids[0].clone()]);
    let mut by_other = ActionFilter::site("st_1");
    by_other.created_by = "other@example.com".into();
    by_other.status = Some(ActionStatus::Pending);
    let listed: Vec<_> = store
        .list_actions(&by_other, first(10))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|a| a.action_id)
        .collect();
    assert_eq!(listed, [ids[3].clone(), ids[2].clone()]);
    let mut later = ActionFilter::site("st_1");
    later.created_at_or_after = Some(now_millis() + 60_000);
    assert!(
        store
            .list_actions(&later, first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let mut earlier = ActionFilter::site("st_1");
    earlier.created_before = Some(now_millis() + 60_000);
    assert_eq!(
        store
            .list_actions(&earlier, first(10))
            .await
            .unwrap()
            .items
            .len(),
        5
    );
    assert!(
        store
            .list_actions(&ActionFilter::site("st_2"), first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn a_unit_that_fails_stores_nothing() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    store.insert_site(&site("st_1")).await.unwrap();
    let mut phone = device("st_1", "dv_1", "S1");
    store.enroll_device(&mut phone, None).await.unwrap();
    let older = store
        .queue_command(new_command(
            command(&store, &phone, ActionType::Lock),
            false,
        ))
        .await
        .unwrap()
        .action;
    let taken = notification("st_1", "already in the outbox");
    store.put_notification(&taken).await.unwrap();

    let reset = command(&store, &phone, ActionType::ResetPasscode);
    let reset_id = reset.action_id.clone();
    let failed = store
        .queue_command(mdm_core::store::NewCommand {
            action: reset,
            online: false,
            // The second notification's id is taken: the insert fails.
            notifications: vec![notification("st_1", "new"), taken.clone()],
            latest_reset: Some(LatestReset {
                passcode_sealed: "sealed".into(),
                reset_at: now_millis(),
                reset_by: "admin@example.com".into(),
                action_id: reset_id.clone(),
            }),
        })
        .await;
    assert!(matches!(failed, Err(StoreError::Backend(_))), "{failed:?}");
    assert_eq!(store.get_action(&reset_id).await.unwrap(), None);
    assert_eq!(
        store.get_action(&older.action_id).await.unwrap(),
        Some(older.clone())
    );
    assert_eq!(store.queued_actions("dv_1").await.unwrap(), [older]);
    assert_eq!(
        store
            .get_device("dv_1")
            .await
            .unwrap()
            .unwrap()
            .security
            .latest_reset,
        None
    );
    assert_eq!(store.pending_notifications().await.unwrap(), [taken]);

    // Over quota: no user of the batch is stored.
    store
        .insert_users("st_1", &[user("st_1", "a@example.com")], 2)
        .await
        .unwrap();
    let batch = [user("st_1", "b@example.com"), user("st_1", "c@example.com")];
    assert!(matches!(
        store.insert_users("st_1", &batch, 2).await.unwrap(),
        UsersInserted::OverQuota { users: 1 }
    ));
    assert!(
        store
            .get_user("st_1", "b@example.com")
            .await
            .unwrap()
            .is_none()
    );
    // A user id taken fails the whole batch.
    let mut clash = user("st_1", "d@example.com");
    clash.user_id = store
        .get_user("st_1", "a@example.com")
        .await
        .unwrap()
        .unwrap()
        .user_id;
    let batch = [user("st_1", "e@example.com"), clash];
    assert!(store.insert_users("st_1", &batch, 10).await.is_err());
    assert!(
        store
            .get_user("st_1", "e@example.com")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn concurrent_locks_on_one_device_leave_exactly_one_pending() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = Arc::new(PgStore::connect(db.config(20)).await.unwrap());
    store.insert_site(&site("st_1")).await.unwrap();
    let mut phone = device("st_1", "dv_1", "S1");
    store.enroll_device(&mut phone, None).await.unwrap();
    let calls = (0..30).map(|i| {
        let store = store.clone();
        let kind = if i % 3 == 0 {
            ActionType::ResetPasscode
        } else {
            ActionType::Lock
        };
        let action = command(&store, &phone, kind);
        tokio::spawn(async move {
            store
                .queue_command(new_command(action, false))
                .await
                .unwrap()
        })
    });
    let results: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let queue = store.queued_actions("dv_1").await.unwrap();
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert_eq!(queue[0].status, ActionStatus::Pending);
    // Each command but the survivor was superseded exactly once.
    let superseded: usize = results.iter().map(|q| q.superseded.len()).sum();
    assert_eq!(superseded, 29);
    let mut all = ActionFilter::site("st_1");
    all.status = Some(ActionStatus::Canceled);
    assert_eq!(
        store
            .list_actions(&all, first(100))
            .await
            .unwrap()
            .items
            .len(),
        29
    );
}

#[tokio::test]
async fn the_outbox_keeps_notifications_oldest_first_and_alerts_newest_first() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    let mut sent = Vec::new();
    for (site_id, subject) in [
        ("st_1", "one"),
        ("st_2", "two"),
        ("st_1", "three"),
        ("st_1", "four"),
    ] {
        let n = notification(site_id, subject);
        store.put_notification(&n).await.unwrap();
        sent.push(n);
    }
    let mut delivered = sent[0].clone();
    delivered.state = NotificationState::Delivered;
    delivered.delivered_at = Some(now_millis());
    store.put_notification(&delivered).await.unwrap();
    let pending: Vec<_> = store
        .pending_notifications()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.subject)
        .collect();
    assert_eq!(pending, ["two", "three", "four"]);

    let page = store
        .list_notifications(Some("st_1"), None, first(2))
        .await
        .unwrap();
    assert_eq!(page.items, [delivered.clone(), sent[2].clone()]);
    let page = store
        .list_notifications(Some("st_1"), None, next(&page.next_page_token, 2))
        .await
        .unwrap();
    assert_eq!(
        (page.items, page.next_page_token),
        (vec![sent[3].clone()], String::new())
    );
    let pending_everywhere = store
        .list_notifications(None, Some(NotificationState::Pending), first(10))
        .await
        .unwrap();
    assert_eq!(pending_everywhere.items.len(), 3);
    let delivered_list = store
        .list_notifications(None, Some(NotificationState::Delivered), first(10))
        .await
        .unwrap();
    assert_eq!(delivered_list.items, [delivered]);

    let mut alerts = Vec::new();
    for i in 0..3 {
        let alert = Alert {
            alert_id: mdm_core::model::time_ordered_id(),
            site_id: "st_1".into(),
            kind: AlertKind::DuplicateDeviceSerial,
            created_at: now_millis(),
            details: format!("alert {i}"),
            failed_attempts: 0,
            source_addresses: Vec::new(),
        };
        let mail = notification("st_1", &format!("alert mail {i}"));
        store.put_alert(&alert, &[mail]).await.unwrap();
        alerts.push(alert);
    }
    // Stored again (a retry): still one of each.
    store.put_alert(&alerts[0], &[]).await.unwrap();
    let page = store.list_alerts("st_1", first(2)).await.unwrap();
    assert_eq!(page.items, [alerts[2].clone(), alerts[1].clone()]);
    let page = store
        .list_alerts("st_1", next(&page.next_page_token, 2))
        .await
        .unwrap();
    assert_eq!(page.items, [alerts[0].clone()]);
    assert_eq!(page.next_page_token, "");
    assert!(
        store
            .list_alerts("st_2", first(2))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(store.pending_notifications().await.unwrap().len(), 6);
}

#[tokio::test]
async fn page_tokens_work_only_on_the_list_that_made_them() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = db.store().await;
    for id in ["st_1", "st_2", "st_3"] {
        store.insert_site(&site(id)).await.unwrap();
        store
            .insert_users(
                id,
                &[user(id, "a@example.com"), user(id, "b@example.com")],
                10,
            )
            .await
            .unwrap();
    }
    let sites_token = store
        .list_sites(&SiteFilter::default(), first(1))
        .await
        .unwrap()
        .next_page_token;
    let users_token = store
        .list_users("st_1", first(1))
        .await
        .unwrap()
        .next_page_token;
    assert!(!sites_token.is_empty() && !users_token.is_empty());
    assert!(bad(store
        .list_sites(&SiteFilter::default(), next("zz-not-hex", 1))
        .await));
    assert!(bad(store
        .list_sites(&SiteFilter::default(), next("00ff", 1))
        .await));
    assert!(bad(store
        .list_sites(&SiteFilter::default(), next(&users_token, 1))
        .await));
    // Another site's list of users.
    assert!(bad(store.list_users("st_2", next(&users_token, 1)).await));
    assert!(bad(store.list_users("st_1", next(&sites_token, 1)).await));
    assert!(bad(store.list_alerts("st_1", next(&users_token, 1)).await));
    assert!(bad(store
        .list_devices("st_1", &DeviceFilter::default(), next(&users_token, 1))
        .await));
    assert!(bad(store
        .list_actions(&ActionFilter::site("st_1"), next(&users_token, 1))
        .await));
    assert!(bad(store
        .list_notifications(None, None, next(&users_token, 1))
        .await));
    // The right list takes it.
    let rest = store
        .list_users("st_1", next(&users_token, 1))
        .await
        .unwrap();
    assert_eq!(rest.items[0].email, "b@example.com");
    // A page of zero items is empty and ends the list.
    let none = store
        .list_sites(&SiteFilter::default(), first(0))
        .await
        .unwrap();
    assert!(none.items.is_empty() && none.next_page_token.is_empty());
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
