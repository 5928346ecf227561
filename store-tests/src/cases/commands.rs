//! Commands: queueing, superseding, going out, reports, cancel, expiry,
//! and the action log.

use std::sync::Arc;

use mdm_core::model::{Action, ActionStatus, ActionType, Device, FailureCode, now_millis};
use mdm_core::rules::{AgentReport, SUPERSEDED};
use mdm_core::store::{ActionFilter, Canceled, Delivery, NewCommand, Reported, Store};

use crate::all_pages;
use crate::fixtures::{
    command, device, final_action, first, ids, latest_reset, new_command, notification, site,
};

/// A site `st_1` with active devices `dv_1` and `dv_2`.
async fn two_devices(store: &Arc<dyn Store>) -> (Device, Device) {
    store.insert_site(&site("st_1")).await.unwrap();
    let mut phone = device("st_1", "dv_1", "S1");
    let mut laptop = device("st_1", "dv_2", "S2");
    store.enroll_device(&mut phone, None).await.unwrap();
    store.enroll_device(&mut laptop, None).await.unwrap();
    (phone, laptop)
}

async fn queue(store: &Arc<dyn Store>, device: &Device, kind: ActionType, online: bool) -> Action {
    store
        .queue_command(new_command(command(store.as_ref(), device, kind), online))
        .await
        .unwrap()
        .action
}

async fn stored(store: &Arc<dyn Store>, action_id: &str) -> Action {
    store.get_action(action_id).await.unwrap().unwrap()
}

async fn queue_ids(store: &Arc<dyn Store>, device_id: &str) -> Vec<String> {
    ids(&store.queued_actions(device_id).await.unwrap(), |a| {
        &a.action_id
    })
}

/// Online with nothing older waiting, a command is stored as SENT and
/// handed over; offline, or behind an unsent command, it waits PENDING.
pub async fn a_command_goes_out_directly_only_when_online_and_nothing_waits(store: Arc<dyn Store>) {
    let (phone, laptop) = two_devices(&store).await;
    let lock = store
        .queue_command(new_command(
            command(store.as_ref(), &phone, ActionType::Lock),
            true,
        ))
        .await
        .unwrap();
    assert!(lock.direct);
    assert!(lock.superseded.is_empty());
    assert_eq!(lock.action.status, ActionStatus::Sent);
    assert_eq!(stored(&store, &lock.action.action_id).await, lock.action);
    // A SENT command does not hold the next one back.
    let next = store
        .queue_command(new_command(
            command(store.as_ref(), &phone, ActionType::Unenroll),
            true,
        ))
        .await
        .unwrap();
    assert!(next.direct);

    let offline = store
        .queue_command(new_command(
            command(store.as_ref(), &laptop, ActionType::Unenroll),
            false,
        ))
        .await
        .unwrap();
    assert!(!offline.direct);
    assert_eq!(offline.action.status, ActionStatus::Pending);
    assert_eq!(
        stored(&store, &offline.action.action_id).await,
        offline.action
    );
    // Behind an unsent command (that it does not supersede), it waits.
    let behind = store
        .queue_command(new_command(
            command(store.as_ref(), &laptop, ActionType::Lock),
            true,
        ))
        .await
        .unwrap();
    assert!(!behind.direct);
    assert!(behind.superseded.is_empty());
    assert_eq!(behind.action.status, ActionStatus::Pending);
    assert_eq!(
        stored(&store, &behind.action.action_id).await.status,
        ActionStatus::Pending
    );
}

/// A lock or reset cancels the device's PENDING locks and resets (not
/// SENT ones, not unenrolls, not another device's), in the same unit;
/// with those gone and online, it goes out directly.
pub async fn a_lock_or_reset_supersedes_pending_locks_and_resets_only(store: Arc<dyn Store>) {
    let (phone, laptop) = two_devices(&store).await;
    let sent = queue(&store, &phone, ActionType::Lock, true).await;
    assert_eq!(sent.status, ActionStatus::Sent);
    let reset = queue(&store, &phone, ActionType::ResetPasscode, false).await;
    let unenroll = queue(&store, &phone, ActionType::Unenroll, false).await;
    let laptop_lock = queue(&store, &laptop, ActionType::Lock, false).await;

    let lock = store
        .queue_command(new_command(
            command(store.as_ref(), &phone, ActionType::Lock),
            false,
        ))
        .await
        .unwrap();
    assert_eq!(
        ids(&lock.superseded, |a| &a.action_id),
        std::slice::from_ref(&reset.action_id)
    );
    let canceled = &lock.superseded[0];
    assert_eq!(canceled.status, ActionStatus::Canceled);
    assert!(canceled.failure_reason.starts_with(SUPERSEDED));
    assert!(canceled.failure_reason.contains(&lock.action.action_id));
    assert_eq!(stored(&store, &reset.action_id).await, *canceled);
    assert_eq!(
        queue_ids(&store, "dv_1").await,
        [
            sent.action_id.clone(),
            unenroll.action_id.clone(),
            lock.action.action_id.clone()
        ]
    );
    assert_eq!(stored(&store, &sent.action_id).await, sent);
    assert_eq!(
        stored(&store, &laptop_lock.action_id).await.status,
        ActionStatus::Pending
    );

    // A reset supersedes the pending lock; nothing else waits on the
    // laptop, so online it goes out at once.
    let reset = store
        .queue_command(new_command(
            command(store.as_ref(), &laptop, ActionType::ResetPasscode),
            true,
        ))
        .await
        .unwrap();
    assert_eq!(
        ids(&reset.superseded, |a| &a.action_id),
        std::slice::from_ref(&laptop_lock.action_id)
    );
    assert!(reset.direct);
    assert_eq!(reset.action.status, ActionStatus::Sent);
    assert_eq!(
        queue_ids(&store, "dv_2").await,
        std::slice::from_ref(&reset.action.action_id)
    );
    // An unenroll supersedes nothing.
    let unenroll = store
        .queue_command(new_command(
            command(store.as_ref(), &laptop, ActionType::Unenroll),
            false,
        ))
        .await
        .unwrap();
    assert!(unenroll.superseded.is_empty());
}

/// A reset's emails and the device's latest reset are stored with it.
pub async fn a_reset_stores_its_emails_and_the_latest_reset_with_it(store: Arc<dyn Store>) {
    let (phone, _) = two_devices(&store).await;
    let action = command(store.as_ref(), &phone, ActionType::ResetPasscode);
    let reset = latest_reset(&action.action_id);
    let mails = vec![
        notification("st_1", "your new passcode"),
        notification("st_1", "a copy for the admin"),
    ];
    let queued = store
        .queue_command(NewCommand {
            action,
            online: false,
            notifications: mails.clone(),
            latest_reset: Some(reset.clone()),
        })
        .await
        .unwrap();
    assert!(!queued.direct && queued.superseded.is_empty());
    assert_eq!(
        stored(&store, &queued.action.action_id).await,
        queued.action
    );
    let after = store.get_device("dv_1").await.unwrap().unwrap();
    assert_eq!(after.security.latest_reset, Some(reset));
    // Nothing else of the device changed.
    let mut expected = phone.clone();
    expected.security.latest_reset = after.security.latest_reset.clone();
    assert_eq!(*after, expected);
    assert_eq!(store.pending_notifications().await.unwrap(), mails);
    assert_eq!(
        store
            .get_device("dv_2")
            .await
            .unwrap()
            .unwrap()
            .security
            .latest_reset,
        None
    );
}

/// Marking sent: a PENDING command of this device is sent once, then it
/// is sent again while it is not final; anything else (another device's,
/// unknown, canceled, final) is withdrawn. One outcome per id, in order.
pub async fn mark_sent_sends_each_command_once_and_withdraws_the_rest(store: Arc<dyn Store>) {
    let (phone, laptop) = two_devices(&store).await;
    let superseded = queue(&store, &laptop, ActionType::Lock, false).await;
    let waiting = store
        .queue_command(new_command(
            command(store.as_ref(), &laptop, ActionType::Lock),
            false,
        ))
        .await
        .unwrap();
    assert_eq!(waiting.superseded.len(), 1);
    let waiting = waiting.action;
    let phones = queue(&store, &phone, ActionType::Lock, false).await;
    let unsent = queue(&store, &laptop, ActionType::Unenroll, false).await;
    let canceled = queue(&store, &laptop, ActionType::Unenroll, false).await;
    assert!(matches!(
        store
            .cancel_action(&canceled.action_id, "admin@example.com", now_millis())
            .await
            .unwrap(),
        Canceled::Done(_)
    ));
    let outcomes = store
        .mark_sent(
            "dv_2",
            &[
                waiting.action_id.clone(),
                waiting.action_id.clone(),
                phones.action_id.clone(),
                "no-such-action".into(),
                canceled.action_id.clone(),
                superseded.action_id.clone(),
                unsent.action_id.clone(),
            ],
            now_millis(),
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 7);
    let Delivery::First(sent) = &outcomes[0] else {
        panic!("not sent first: {:?}", outcomes[0]);
    };
    assert_eq!(sent.status, ActionStatus::Sent);
    assert_eq!(sent.action_id, waiting.action_id);
    assert_eq!(stored(&store, &waiting.action_id).await, **sent);
    assert!(matches!(outcomes[1], Delivery::Again), "{:?}", outcomes[1]);
    assert!(
        matches!(outcomes[2], Delivery::Withdrawn),
        "{:?}",
        outcomes[2]
    );
    assert!(
        matches!(outcomes[3], Delivery::Withdrawn),
        "{:?}",
        outcomes[3]
    );
    assert!(
        matches!(outcomes[4], Delivery::Withdrawn),
        "{:?}",
        outcomes[4]
    );
    assert!(
        matches!(outcomes[5], Delivery::Withdrawn),
        "{:?}",
        outcomes[5]
    );
    assert!(
        matches!(outcomes[6], Delivery::First(_)),
        "{:?}",
        outcomes[6]
    );
    // The other device's command stays PENDING.
    assert_eq!(
        stored(&store, &phones.action_id).await.status,
        ActionStatus::Pending
    );
    // A later stream sends it again, until it is final.
    let again = store
        .mark_sent(
            "dv_2",
            std::slice::from_ref(&waiting.action_id),
            now_millis(),
        )
        .await
        .unwrap();
    assert!(matches!(again[..], [Delivery::Again]), "{again:?}");
    store
        .apply_reports(
            "dv_2",
            &waiting.action_id,
            &[AgentReport::Succeeded("locked".into())],
            now_millis(),
        )
        .await
        .unwrap();
    let done = store
        .mark_sent(
            "dv_2",
            std::slice::from_ref(&waiting.action_id),
            now_millis(),
        )
        .await
        .unwrap();
    assert!(matches!(done[..], [Delivery::Withdrawn]), "{done:?}");
    assert!(
        store
            .mark_sent("dv_2", &[], now_millis())
            .await
            .unwrap()
            .is_empty()
    );
}

/// Reports move a command along in order (repeats change nothing); a
/// report for another device's command or an unknown one changes nothing;
/// a result reported after a cancel is recorded on the canceled command.
pub async fn reports_move_a_command_along_in_order(store: Arc<dyn Store>) {
    let (phone, laptop) = two_devices(&store).await;
    let lock = queue(&store, &laptop, ActionType::Lock, true).await;
    let now = now_millis();
    let Reported::Applied(steps) = store
        .apply_reports(
            "dv_2",
            &lock.action_id,
            &[
                AgentReport::Acknowledged,
                AgentReport::Progress("locking\0 the screen".into()),
                AgentReport::Acknowledged,
                AgentReport::Progress("still locking".into()),
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
            ActionStatus::InProgress,
            ActionStatus::Succeeded
        ]
    );
    assert_eq!(stored(&store, &lock.action_id).await, steps[3]);
    assert_eq!(
        steps[1].timeline.last().unwrap().detail,
        "locking\0 the screen"
    );
    assert!(store.queued_actions("dv_2").await.unwrap().is_empty());
    assert!(matches!(
        store
            .apply_reports("dv_1", &lock.action_id, &[AgentReport::Acknowledged], now)
            .await
            .unwrap(),
        Reported::OtherDevice
    ));
    assert!(matches!(
        store
            .apply_reports("dv_2", "no-such-action", &[AgentReport::Acknowledged], now)
            .await
            .unwrap(),
        Reported::Unknown
    ));
    assert!(matches!(
        store
            .apply_reports("dv_2", &lock.action_id, &[AgentReport::Acknowledged], now)
            .await
            .unwrap(),
        Reported::Applied(steps) if steps.is_empty()
    ));
    assert_eq!(stored(&store, &lock.action_id).await, steps[3]);

    // Failures: an expiry the agent saw is EXPIRED, others FAILED.
    let reset = queue(&store, &phone, ActionType::ResetPasscode, true).await;
    let Reported::Applied(failed) = store
        .apply_reports(
            "dv_1",
            &reset.action_id,
            &[AgentReport::Failed {
                code: FailureCode::Unsupported,
                message: "no passcode support".into(),
            }],
            now,
        )
        .await
        .unwrap()
    else {
        panic!("not applied");
    };
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].status, ActionStatus::Failed);
    assert_eq!(failed[0].failure_code, Some(FailureCode::Unsupported));
    assert_eq!(failed[0].failure_reason, "no passcode support");
    assert_eq!(stored(&store, &reset.action_id).await, failed[0]);
    let late = queue(&store, &phone, ActionType::Lock, true).await;
    let Reported::Applied(expired) = store
        .apply_reports(
            "dv_1",
            &late.action_id,
            &[AgentReport::Failed {
                code: FailureCode::Expired,
                message: "too late".into(),
            }],
            now,
        )
        .await
        .unwrap()
    else {
        panic!("not applied");
    };
    assert_eq!(expired[0].status, ActionStatus::Expired);

    // After a cancel, the result the device reports is recorded.
    let canceled = queue(&store, &phone, ActionType::Lock, true).await;
    store
        .cancel_action(&canceled.action_id, "admin@example.com", now)
        .await
        .unwrap();
    let before = stored(&store, &canceled.action_id).await;
    let Reported::Applied(recorded) = store
        .apply_reports(
            "dv_1",
            &canceled.action_id,
            &[AgentReport::Succeeded("locked anyway".into())],
            now,
        )
        .await
        .unwrap()
    else {
        panic!("not applied");
    };
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].status, ActionStatus::Canceled);
    assert_eq!(recorded[0].timeline.len(), before.timeline.len() + 1);
    assert_eq!(stored(&store, &canceled.action_id).await, recorded[0]);
}

/// Only what the device has not acknowledged can be canceled: PENDING and
/// SENT commands; a canceled one leaves the queue.
pub async fn only_commands_the_device_has_not_acknowledged_can_be_canceled(store: Arc<dyn Store>) {
    let (phone, laptop) = two_devices(&store).await;
    let now = now_millis();
    let pending = queue(&store, &phone, ActionType::Unenroll, false).await;
    let sent = queue(&store, &laptop, ActionType::Lock, true).await;
    let acknowledged = queue(&store, &laptop, ActionType::Unenroll, false).await;
    store
        .mark_sent("dv_2", std::slice::from_ref(&acknowledged.action_id), now)
        .await
        .unwrap();
    store
        .apply_reports(
            "dv_2",
            &acknowledged.action_id,
            &[AgentReport::Acknowledged],
            now,
        )
        .await
        .unwrap();
    let mut recorded = final_action(
        store.as_ref(),
        &phone,
        ActionType::Unenroll,
        "a@example.com",
    );
    recorded.advance(ActionStatus::Succeeded, "unenrolled", now);
    store.record_action(&recorded).await.unwrap();

    for action in [&pending, &sent] {
        let Canceled::Done(canceled) = store
            .cancel_action(&action.action_id, "admin@example.com", now)
            .await
            .unwrap()
        else {
            panic!("{} was not canceled", action.action_id);
        };
        assert_eq!(canceled.status, ActionStatus::Canceled);
        assert_eq!(canceled.failure_reason, "canceled by admin@example.com");
        assert_eq!(stored(&store, &action.action_id).await, *canceled);
    }
    assert!(matches!(
        store
            .cancel_action(&acknowledged.action_id, "admin@example.com", now)
            .await
            .unwrap(),
        Canceled::Refused(ActionStatus::Acknowledged)
    ));
    assert!(matches!(
        store
            .cancel_action(&pending.action_id, "admin@example.com", now)
            .await
            .unwrap(),
        Canceled::Refused(ActionStatus::Canceled)
    ));
    assert!(matches!(
        store
            .cancel_action(&recorded.action_id, "admin@example.com", now)
            .await
            .unwrap(),
        Canceled::Refused(ActionStatus::Succeeded)
    ));
    for unknown in ["no-such-action", "nul\0"] {
        assert!(matches!(
            store
                .cancel_action(unknown, "admin@example.com", now)
                .await
                .unwrap(),
            Canceled::NotFound
        ));
    }
    assert!(store.queued_actions("dv_1").await.unwrap().is_empty());
    assert_eq!(
        queue_ids(&store, "dv_2").await,
        std::slice::from_ref(&acknowledged.action_id)
    );
    assert_eq!(
        stored(&store, &acknowledged.action_id).await.status,
        ActionStatus::Acknowledged
    );
}

/// `expire_due(now)` expires every queued command whose `expires_at` is
/// at or before `now` (`rules::expire`), each once, and nothing else.
pub async fn commands_expire_once_their_time_is_up_to_the_millisecond(store: Arc<dyn Store>) {
    let (phone, laptop) = two_devices(&store).await;
    let now = now_millis();
    let due = |device: &Device, kind: ActionType, at: i64| {
        let mut action = command(store.as_ref(), device, kind);
        action.expires_at = at;
        action
    };
    let pending = store
        .queue_command(new_command(
            due(&laptop, ActionType::Lock, now + 1_000),
            false,
        ))
        .await
        .unwrap()
        .action;
    let sent = store
        .queue_command(new_command(
            due(&phone, ActionType::Unenroll, now + 1_000),
            true,
        ))
        .await
        .unwrap()
        .action;
    assert_eq!(sent.status, ActionStatus::Sent);
    let later = store
        .queue_command(new_command(
            due(&laptop, ActionType::Unenroll, now + 5_000),
            false,
        ))
        .await
        .unwrap()
        .action;
    let canceled = store
        .queue_command(new_command(
            due(&phone, ActionType::Lock, now + 1_000),
            false,
        ))
        .await
        .unwrap()
        .action;
    store
        .cancel_action(&canceled.action_id, "admin@example.com", now)
        .await
        .unwrap();

    assert!(store.expire_due(now).await.unwrap().is_empty());
    assert!(store.expire_due(now + 999).await.unwrap().is_empty());
    // Due at exactly now + 1000: expired at now + 1000.
    let mut expired = store.expire_due(now + 1_000).await.unwrap();
    expired.sort_by(|a, b| a.action_id.cmp(&b.action_id));
    let mut expected = vec![pending.action_id.clone(), sent.action_id.clone()];
    expected.sort();
    assert_eq!(ids(&expired, |a| &a.action_id), expected);
    for action in &expired {
        assert_eq!(action.status, ActionStatus::Expired);
        assert_eq!(action.failure_code, Some(FailureCode::Expired));
        assert_eq!(stored(&store, &action.action_id).await, *action);
    }
    assert!(store.expire_due(now + 1_000).await.unwrap().is_empty());
    assert!(store.expire_due(now + 4_999).await.unwrap().is_empty());
    assert_eq!(
        queue_ids(&store, "dv_2").await,
        std::slice::from_ref(&later.action_id)
    );
    assert!(store.queued_actions("dv_1").await.unwrap().is_empty());
    assert_eq!(
        stored(&store, &canceled.action_id).await.status,
        ActionStatus::Canceled
    );
    let last = store.expire_due(now + 60_000).await.unwrap();
    assert_eq!(
        ids(&last, |a| &a.action_id),
        std::slice::from_ref(&later.action_id)
    );
    assert!(store.queued_actions("dv_2").await.unwrap().is_empty());
}

/// The queue of a device: its commands not final yet, oldest first.
pub async fn queued_actions_are_a_devices_unfinished_commands_oldest_first(store: Arc<dyn Store>) {
    let (phone, laptop) = two_devices(&store).await;
    let now = now_millis();
    let sent = queue(&store, &phone, ActionType::Lock, true).await;
    let unenroll = queue(&store, &phone, ActionType::Unenroll, false).await;
    let reset = queue(&store, &phone, ActionType::ResetPasscode, false).await;
    let done = queue(&store, &phone, ActionType::Unenroll, false).await;
    queue(&store, &laptop, ActionType::Lock, false).await;
    store
        .mark_sent("dv_1", std::slice::from_ref(&done.action_id), now)
        .await
        .unwrap();
    store
        .apply_reports(
            "dv_1",
            &done.action_id,
            &[AgentReport::Succeeded("done".into())],
            now,
        )
        .await
        .unwrap();
    store
        .apply_reports(
            "dv_1",
            &sent.action_id,
            &[AgentReport::Progress("1".into())],
            now,
        )
        .await
        .unwrap();
    let mut recorded = final_action(
        store.as_ref(),
        &phone,
        ActionType::Unenroll,
        "a@example.com",
    );
    recorded.advance(ActionStatus::Succeeded, "unenrolled", now);
    store.record_action(&recorded).await.unwrap();

    let queued = store.queued_actions("dv_1").await.unwrap();
    assert_eq!(
        ids(&queued, |a| &a.action_id),
        [
            sent.action_id.clone(),
            unenroll.action_id.clone(),
            reset.action_id.clone()
        ]
    );
    assert_eq!(queued[0].status, ActionStatus::InProgress);
    assert_eq!(queued[1], unenroll);
    assert_eq!(store.queued_actions("dv_2").await.unwrap().len(), 1);
    assert!(store.queued_actions("dv_none").await.unwrap().is_empty());
}

/// An action final already is stored as it is, and is no command.
pub async fn a_final_action_is_recorded_as_it_is(store: Arc<dyn Store>) {
    let (_, laptop) = two_devices(&store).await;
    let mut unenroll = final_action(
        store.as_ref(),
        &laptop,
        ActionType::Unenroll,
        "a@example.com",
    );
    unenroll.advance(ActionStatus::Succeeded, "unenrolled", now_millis());
    store.record_action(&unenroll).await.unwrap();
    assert_eq!(stored(&store, &unenroll.action_id).await, unenroll);
    assert!(store.queued_actions("dv_2").await.unwrap().is_empty());
    assert!(
        store
            .expire_due(now_millis() + 86_400_000)
            .await
            .unwrap()
            .is_empty()
    );
    let listed = store
        .list_actions(&ActionFilter::site("st_1"), first(10))
        .await
        .unwrap();
    assert_eq!(listed.items, [unenroll]);
    for unknown in ["nul\0", "not-an-id", "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a6"] {
        assert_eq!(store.get_action(unknown).await.unwrap(), None);
    }
}

/// Whether a device has an action of one of some kinds in a status.
pub async fn device_has_action_matches_kind_and_status(store: Arc<dyn Store>) {
    let (phone, laptop) = two_devices(&store).await;
    let lock = queue(&store, &laptop, ActionType::Lock, true).await;
    store
        .apply_reports(
            "dv_2",
            &lock.action_id,
            &[AgentReport::Succeeded("locked".into())],
            now_millis(),
        )
        .await
        .unwrap();
    queue(&store, &phone, ActionType::ResetPasscode, false).await;
    let has = |device_id: &'static str, kinds: &'static [ActionType], status| {
        let store = store.clone();
        async move {
            store
                .device_has_action(device_id, kinds, status)
                .await
                .unwrap()
        }
    };
    assert!(has("dv_2", &[ActionType::Lock], ActionStatus::Succeeded).await);
    assert!(
        has(
            "dv_2",
            &[ActionType::ResetPasscode, ActionType::Lock],
            ActionStatus::Succeeded
        )
        .await
    );
    assert!(
        !has(
            "dv_2",
            &[ActionType::ResetPasscode],
            ActionStatus::Succeeded
        )
        .await
    );
    assert!(!has("dv_2", &[ActionType::Lock], ActionStatus::Pending).await);
    assert!(!has("dv_2", &[], ActionStatus::Succeeded).await);
    assert!(has("dv_1", &[ActionType::ResetPasscode], ActionStatus::Pending).await);
    assert!(!has("dv_1", &[ActionType::Lock], ActionStatus::Succeeded).await);
    assert!(!has("dv_none", &[ActionType::Lock], ActionStatus::Succeeded).await);
}

/// A site's actions (or one device's) list newest first, in pages, with
/// every filter, also when filters leave gaps between pages.
pub async fn actions_list_newest_first_filtered_and_paged(store: Arc<dyn Store>) {
    let (a, b) = two_devices(&store).await;
    store.insert_site(&site("st_2")).await.unwrap();
    let mut c = device("st_2", "dv_3", "S3");
    store.enroll_device(&mut c, None).await.unwrap();
    let mut log = Vec::new();
    for (i, (device, kind)) in [
        (&a, ActionType::Lock),
        (&b, ActionType::Lock),
        (&a, ActionType::Unenroll),
        (&b, ActionType::ResetPasscode),
        (&a, ActionType::Lock),
        (&a, ActionType::ResetPasscode),
    ]
    .into_iter()
    .enumerate()
    {
        let by = if kind == ActionType::Lock {
            "locker@example.com"
        } else {
            "other@example.com"
        };
        let mut action = final_action(store.as_ref(), device, kind, by);
        action.created_at = 1_000 * (i as i64 + 1);
        if i % 2 == 0 {
            action.advance(ActionStatus::Succeeded, "done", action.created_at);
        }
        store.record_action(&action).await.unwrap();
        log.push(action);
    }
    let mut elsewhere = final_action(store.as_ref(), &c, ActionType::Lock, "locker@example.com");
    elsewhere.created_at = 3_500;
    store.record_action(&elsewhere).await.unwrap();

    // log[i] was created at (i + 1) seconds, its id after log[i - 1]'s.
    let newest_first = |picked: &[usize]| -> Vec<String> {
        picked
            .iter()
            .rev()
            .map(|&i| log[i].action_id.clone())
            .collect()
    };
    let listed = |filter: ActionFilter, limit: usize| {
        let store = store.clone();
        async move {
            let items = all_pages!(limit, |page| store.list_actions(&filter, page));
            ids(&items, |a| &a.action_id)
        }
    };
    let site = ActionFilter::site("st_1");
    let page = store.list_actions(&site, first(2)).await.unwrap();
    assert_eq!(page.items, [log[5].clone(), log[4].clone()]);
    for limit in [1, 2, 4, 10] {
        assert_eq!(
            listed(site.clone(), limit).await,
            newest_first(&[0, 1, 2, 3, 4, 5])
        );
    }

    let mut of_a = ActionFilter::site("st_1");
    of_a.device_id = Some("dv_1".into());
    assert_eq!(listed(of_a.clone(), 1).await, newest_first(&[0, 2, 4, 5]));
    of_a.action_type = Some(ActionType::Lock);
    assert_eq!(listed(of_a.clone(), 1).await, newest_first(&[0, 4]));
    of_a.status = Some(ActionStatus::Succeeded);
    assert_eq!(listed(of_a, 1).await, newest_first(&[0, 4]));

    let mut by_other = ActionFilter::site("st_1");
    by_other.created_by = "other@example.com".into();
    assert_eq!(listed(by_other.clone(), 1).await, newest_first(&[2, 3, 5]));
    by_other.status = Some(ActionStatus::Pending);
    assert_eq!(listed(by_other, 1).await, newest_first(&[3, 5]));
    let mut succeeded = ActionFilter::site("st_1");
    succeeded.status = Some(ActionStatus::Succeeded);
    assert_eq!(listed(succeeded, 1).await, newest_first(&[0, 2, 4]));
    let mut resets = ActionFilter::site("st_1");
    resets.action_type = Some(ActionType::ResetPasscode);
    assert_eq!(listed(resets, 1).await, newest_first(&[3, 5]));

    // Times: from (inclusive) and before (exclusive).
    let mut window = ActionFilter::site("st_1");
    window.created_at_or_after = Some(2_000);
    window.created_before = Some(5_000);
    assert_eq!(listed(window, 1).await, newest_first(&[1, 2, 3]));
    let mut from = ActionFilter::site("st_1");
    from.created_at_or_after = Some(5_000);
    assert_eq!(listed(from, 10).await, newest_first(&[4, 5]));
    let mut before = ActionFilter::site("st_1");
    before.created_before = Some(1_000);
    assert!(listed(before, 10).await.is_empty());
    let mut later = ActionFilter::site("st_1");
    later.created_at_or_after = Some(now_millis());
    assert!(listed(later, 10).await.is_empty());

    assert_eq!(
        listed(ActionFilter::site("st_2"), 10).await,
        [elsewhere.action_id.clone()]
    );
    // A device of another site is not in this site's log.
    let mut foreign = ActionFilter::site("st_1");
    foreign.device_id = Some("dv_3".into());
    assert!(listed(foreign, 10).await.is_empty());
    assert!(listed(ActionFilter::site("st_none"), 10).await.is_empty());
}
