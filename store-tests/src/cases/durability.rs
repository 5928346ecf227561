//! What is stored is there after the store is closed and opened again
//! (cases that take the guard, to reopen through it).

use std::sync::Arc;

use mdm_core::model::{
    ActionStatus, ActionType, NotificationState, PasscodeState, Webhook, now_millis,
};
use mdm_core::rules::AgentReport;
use mdm_core::store::{
    ActionFilter, DeviceFilter, Enrolled, FailedAttempt, NewCommand, Store, UsersInserted,
};

use crate::StoreGuard;
use crate::all_pages;
use crate::fixtures::{
    attempt, audit, command, device, final_action, latest_reset, lockout, new_command,
    notification, passcode, site, user,
};

async fn reopen(guard: &dyn StoreGuard, store: Arc<dyn Store>) -> Option<Arc<dyn Store>> {
    let reopened = guard.reopen(store).await;
    if reopened.is_none() {
        eprintln!("skipped: this backend cannot be reopened");
    }
    reopened
}

/// Everything written, including what is only durable soon, is there
/// after `close` and a reopen, and the store goes on from it: the queue
/// and expiry of commands, user counts, webhooks, the serial check.
pub async fn everything_stored_is_there_after_a_reopen(
    store: Arc<dyn Store>,
    guard: &dyn StoreGuard,
) {
    let now = now_millis();
    let mut hooked = site("st_1");
    hooked.webhook = Some(Webhook {
        url: "https://hooks.example/x".into(),
        secret_sealed: "sealed".into(),
    });
    hooked.failed_attempt_limit = 2;
    store.insert_site(&hooked).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    let users: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| user("st_1", &format!("{n}@example.com")))
        .collect();
    store.insert_users("st_1", &users, 3).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
    store
        .replace_passcode(&passcode("st_2", b"two"))
        .await
        .unwrap();
    let counted = store
        .record_failed_attempts(&[attempt(&site("st_2"), "10.0.0.1")], &lockout)
        .await
        .unwrap();
    assert_eq!(counted, [FailedAttempt::Counted { failed_attempts: 1 }]);

    let mut a = device("st_1", "dv_a", "SER");
    let mut b = device("st_1", "dv_b", "SER");
    let mut other = device("st_1", "dv_o", "OTHER");
    store.enroll_device(&mut a, None).await.unwrap();
    store.enroll_device(&mut b, None).await.unwrap();
    store.enroll_device(&mut other, None).await.unwrap();
    store
        .update_device(
            "dv_b",
            Box::new(|d| {
                d.status = mdm_core::model::DeviceStatus::Unenrolled;
                true
            }),
        )
        .await
        .unwrap();
    store
        .update_device_soon(
            "dv_a",
            Box::new(|d| {
                d.last_seen = Some(42);
                true
            }),
        )
        .await
        .unwrap();
    store
        .append_audit("dv_a", &audit("enrolled"))
        .await
        .unwrap();
    store.append_audit("dv_a", &audit("seen")).await.unwrap();

    // dv_a: a reset that went out (with its email and latest reset) and
    // was acknowledged, then a pending lock; dv_o: a command due soon.
    let reset = command(store.as_ref(), &a, ActionType::ResetPasscode);
    let reset_id = reset.action_id.clone();
    let mail = notification("st_1", "your new passcode");
    store
        .queue_command(NewCommand {
            action: reset,
            online: true,
            notifications: vec![mail.clone()],
            latest_reset: Some(latest_reset(&reset_id)),
        })
        .await
        .unwrap();
    store
        .apply_reports("dv_a", &reset_id, &[AgentReport::Acknowledged], now)
        .await
        .unwrap();
    let pending_lock = store
        .queue_command(new_command(
            command(store.as_ref(), &a, ActionType::Lock),
            false,
        ))
        .await
        .unwrap()
        .action;
    let mut soon = command(store.as_ref(), &other, ActionType::Lock);
    soon.expires_at = now + 1_000;
    let soon = store
        .queue_command(new_command(soon, false))
        .await
        .unwrap()
        .action;
    let mut recorded = final_action(store.as_ref(), &b, ActionType::Unenroll, "a@example.com");
    recorded.advance(ActionStatus::Succeeded, "unenrolled", now);
    store.record_action(&recorded).await.unwrap();
    let mut delivered = notification("st_2", "delivered");
    store.put_notification(&delivered).await.unwrap();
    delivered.state = NotificationState::Delivered;
    delivered.delivered_at = Some(now);
    store.put_notification(&delivered).await.unwrap();
    let locked_out = store
        .record_failed_attempts(
            &[attempt(&hooked, "10.0.0.1"), attempt(&hooked, "10.0.0.2")],
            &lockout,
        )
        .await
        .unwrap();
    let FailedAttempt::LockedOut(alert) = &locked_out[1] else {
        panic!("{locked_out:?}");
    };

    // What the reads say before, to compare after.
    let sites = all_pages!(10, |page| store.list_sites(&Default::default(), page));
    let listed_users = all_pages!(10, |page| store.list_users("st_1", page));
    let passcodes = (
        store.get_passcode("st_1").await.unwrap(),
        store.get_passcode("st_2").await.unwrap(),
    );
    let devices = all_pages!(10, |page| store.list_devices(
        "st_1",
        &DeviceFilter::default(),
        page
    ));
    let trail = store.list_audit("dv_a", 10).await.unwrap();
    let log = all_pages!(10, |page| store
        .list_actions(&ActionFilter::site("st_1"), page));
    let queue_a = store.queued_actions("dv_a").await.unwrap();
    let queue_o = store.queued_actions("dv_o").await.unwrap();
    let pending = store.pending_notifications().await.unwrap();
    let outbox = all_pages!(10, |page| store.list_notifications(None, None, page));
    let alerts = all_pages!(10, |page| store.list_alerts("st_1", page));
    assert_eq!(devices.len(), 3);
    assert_eq!(log.len(), 4);
    assert_eq!(queue_a.len(), 2);
    assert_eq!(pending.len(), 3);
    assert_eq!(alerts.len(), 1);

    let Some(store) = reopen(guard, store).await else {
        return;
    };
    assert_eq!(
        all_pages!(10, |page| store.list_sites(&Default::default(), page)),
        sites
    );
    assert_eq!(store.get_site("st_1").await.unwrap(), Some(hooked.clone()));
    assert!(store.site_has_webhook("st_1").await.unwrap());
    assert!(!store.site_has_webhook("st_2").await.unwrap());
    assert_eq!(
        all_pages!(10, |page| store.list_users("st_1", page)),
        listed_users
    );
    for u in &users {
        assert_eq!(
            store.get_user_by_id(&u.user_id).await.unwrap().as_ref(),
            Some(u)
        );
    }
    assert_eq!(
        store.sites_of_email("a@example.com").await.unwrap(),
        ["st_1"]
    );
    // The site still has three users: a fourth passes the limit.
    assert_eq!(
        store
            .insert_users("st_1", &[user("st_1", "d@example.com")], 3)
            .await
            .unwrap(),
        UsersInserted::OverQuota { users: 3 }
    );
    assert_eq!(
        (
            store.get_passcode("st_1").await.unwrap(),
            store.get_passcode("st_2").await.unwrap()
        ),
        passcodes
    );
    assert_eq!(
        passcodes.0.as_ref().unwrap().state,
        PasscodeState::LockedOut
    );
    assert_eq!(passcodes.0.as_ref().unwrap().enrollments, 3);
    assert_eq!(
        store
            .site_for_passcode_hash(b"two")
            .await
            .unwrap()
            .as_deref(),
        Some("st_2")
    );
    assert_eq!(
        all_pages!(10, |page| store.list_devices(
            "st_1",
            &DeviceFilter::default(),
            page
        )),
        devices
    );
    assert_eq!(
        store.get_device("dv_a").await.unwrap().unwrap().last_seen,
        Some(42)
    );
    assert_eq!(
        store
            .get_device("dv_a")
            .await
            .unwrap()
            .unwrap()
            .security
            .latest_reset
            .as_ref()
            .map(|r| r.action_id.clone()),
        Some(reset_id.clone())
    );
    assert_eq!(store.list_audit("dv_a", 10).await.unwrap(), trail);
    assert_eq!(
        all_pages!(10, |page| store
            .list_actions(&ActionFilter::site("st_1"), page)),
        log
    );
    assert_eq!(
        store.get_action(&reset_id).await.unwrap().unwrap().status,
        ActionStatus::Acknowledged
    );
    assert_eq!(store.queued_actions("dv_a").await.unwrap(), queue_a);
    assert_eq!(store.queued_actions("dv_o").await.unwrap(), queue_o);
    assert_eq!(store.pending_notifications().await.unwrap(), pending);
    assert_eq!(
        all_pages!(10, |page| store.list_notifications(None, None, page)),
        outbox
    );
    assert_eq!(
        all_pages!(10, |page| store.list_alerts("st_1", page)),
        alerts
    );
    assert_eq!(alerts[0], **alert);

    // It goes on from there: a new lock supersedes the one pending from
    // before, the sweep finds the command due, the serial check finds dv_a.
    let lock = store
        .queue_command(new_command(
            command(store.as_ref(), &a, ActionType::Lock),
            false,
        ))
        .await
        .unwrap();
    assert_eq!(lock.superseded.len(), 1);
    assert_eq!(lock.superseded[0].action_id, pending_lock.action_id);
    let expired = store.expire_due(now + 1_000).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].action_id, soon.action_id);
    let mut c = device("st_1", "dv_c", "SER");
    assert_eq!(
        store.enroll_device(&mut c, None).await.unwrap(),
        Enrolled::AlongsideSameSerial("dv_a".into())
    );

    // And what it wrote after the reopen is there after another.
    let Some(store) = reopen(guard, store).await else {
        return;
    };
    assert_eq!(
        store
            .get_action(&soon.action_id)
            .await
            .unwrap()
            .unwrap()
            .status,
        ActionStatus::Expired
    );
    assert!(store.queued_actions("dv_o").await.unwrap().is_empty());
    let queue: Vec<_> = store
        .queued_actions("dv_a")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action_id)
        .collect();
    assert_eq!(queue, [reset_id, lock.action.action_id]);
    assert!(store.expire_due(now + 1_000).await.unwrap().is_empty());
    assert!(store.get_device("dv_c").await.unwrap().is_some());
    let mut d = device("st_1", "dv_d", "SER");
    assert_eq!(
        store.enroll_device(&mut d, None).await.unwrap(),
        Enrolled::AlongsideSameSerial("dv_c".into())
    );
    store.close().await.unwrap();
}
