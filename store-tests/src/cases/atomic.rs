//! A unit that fails stores nothing a reader can see.

use std::sync::Arc;

use mdm_core::model::{ActionType, DeviceStatus};
use mdm_core::store::{ActionFilter, NewCommand, Store, StoreError, UsersInserted};

use crate::fixtures::{
    command, device, first, latest_reset, new_command, notification, passcode, site, user,
};

fn refused<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    assert!(
        matches!(result, Err(StoreError::Backend(_))),
        "not refused: {result:?}"
    );
}

/// A command whose email's id is taken fails whole: no command, no
/// superseded one, no latest reset, no new email.
pub async fn a_command_that_fails_stores_nothing(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let mut phone = device("st_1", "dv_1", "S1");
    store.enroll_device(&mut phone, None).await.unwrap();
    let older = store
        .queue_command(new_command(
            command(store.as_ref(), &phone, ActionType::Lock),
            false,
        ))
        .await
        .unwrap()
        .action;
    let taken = notification("st_1", "already in the outbox");
    store.put_notification(&taken).await.unwrap();

    let reset = command(store.as_ref(), &phone, ActionType::ResetPasscode);
    let reset_id = reset.action_id.clone();
    refused(
        store
            .queue_command(NewCommand {
                action: reset,
                online: false,
                // The second email's id is taken.
                notifications: vec![notification("st_1", "new"), taken.clone()],
                latest_reset: Some(latest_reset(&reset_id)),
            })
            .await,
    );
    // One id twice in the command's own emails fails it too.
    let twice = notification("st_1", "twice");
    let lock = command(store.as_ref(), &phone, ActionType::Lock);
    let lock_id = lock.action_id.clone();
    refused(
        store
            .queue_command(NewCommand {
                action: lock,
                online: true,
                notifications: vec![twice.clone(), twice],
                latest_reset: Some(latest_reset(&lock_id)),
            })
            .await,
    );

    for id in [&reset_id, &lock_id] {
        assert_eq!(store.get_action(id).await.unwrap(), None);
    }
    assert_eq!(
        store.get_action(&older.action_id).await.unwrap(),
        Some(older.clone())
    );
    assert_eq!(
        store.queued_actions("dv_1").await.unwrap(),
        std::slice::from_ref(&older)
    );
    assert_eq!(
        store
            .list_actions(&ActionFilter::site("st_1"), first(10))
            .await
            .unwrap()
            .items,
        [older]
    );
    assert_eq!(*store.get_device("dv_1").await.unwrap().unwrap(), phone);
    assert_eq!(store.pending_notifications().await.unwrap(), [taken]);
}

/// A command for a device that is not stored is refused and stores
/// nothing, its emails neither.
pub async fn a_command_for_a_device_that_is_not_stored_is_refused(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let ghost = device("st_1", "dv_ghost", "G");
    for kind in [ActionType::Lock, ActionType::ResetPasscode] {
        let action = command(store.as_ref(), &ghost, kind);
        let action_id = action.action_id.clone();
        refused(
            store
                .queue_command(NewCommand {
                    action,
                    online: true,
                    notifications: vec![notification("st_1", "to nobody")],
                    latest_reset: (kind == ActionType::ResetPasscode)
                        .then(|| latest_reset(&action_id)),
                })
                .await,
        );
        assert_eq!(store.get_action(&action_id).await.unwrap(), None);
    }
    assert!(store.queued_actions("dv_ghost").await.unwrap().is_empty());
    assert!(
        store
            .list_actions(&ActionFilter::site("st_1"), first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(store.pending_notifications().await.unwrap().is_empty());
    assert_eq!(store.get_device("dv_ghost").await.unwrap(), None);
}

/// A batch with a user id that is taken (by a stored user, or twice in the
/// batch) stores none of its users.
pub async fn a_batch_of_users_that_fails_stores_none(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    let stored = user("st_2", "a@example.com");
    store
        .insert_users("st_2", std::slice::from_ref(&stored), 10)
        .await
        .unwrap();

    let mut clash = user("st_1", "d@example.com");
    clash.user_id = stored.user_id.clone();
    let batch = [user("st_1", "e@example.com"), clash];
    refused(store.insert_users("st_1", &batch, 10).await);
    // The same, one user alone.
    refused(store.insert_users("st_1", &batch[1..], 10).await);
    let first_one = user("st_1", "f@example.com");
    let mut second = user("st_1", "g@example.com");
    second.user_id = first_one.user_id.clone();
    refused(
        store
            .insert_users("st_1", &[first_one.clone(), second], 10)
            .await,
    );

    assert!(
        store
            .list_users("st_1", first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    for email in [
        "d@example.com",
        "e@example.com",
        "f@example.com",
        "g@example.com",
    ] {
        assert_eq!(store.get_user("st_1", email).await.unwrap(), None);
        assert!(store.sites_of_email(email).await.unwrap().is_empty());
    }
    assert_eq!(
        store.get_user_by_id(&stored.user_id).await.unwrap(),
        Some(stored.clone())
    );
    assert_eq!(
        store.get_user_by_id(&first_one.user_id).await.unwrap(),
        None
    );
    // Nothing was counted: the site still takes its full quota.
    let two = [user("st_1", "e@example.com"), user("st_1", "f@example.com")];
    assert_eq!(
        store.insert_users("st_1", &two, 2).await.unwrap(),
        UsersInserted::Inserted {
            existing: Vec::new()
        }
    );
    // A user whose email the site has is skipped, not checked: its id
    // taken does not fail the batch.
    let mut skipped = user("st_1", "e@example.com");
    skipped.user_id = stored.user_id.clone();
    assert_eq!(
        store.insert_users("st_1", &[skipped], 2).await.unwrap(),
        UsersInserted::Inserted { existing: vec![0] }
    );
}

/// An enrollment with a device id that is taken fails whole: the stored
/// device stays as it was, the device it claims to replace stays active,
/// and nothing is counted on the passcode.
pub async fn an_enrollment_that_fails_stores_and_counts_nothing(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
    let mut first_device = device("st_1", "dv_1", "SER1");
    store.enroll_device(&mut first_device, None).await.unwrap();
    let mut abroad = device("st_2", "dv_2", "SER2");
    store.enroll_device(&mut abroad, None).await.unwrap();
    let before = store.get_passcode("st_1").await.unwrap().unwrap();
    assert_eq!(before.enrollments, 1);

    // Taken by another device of the site, proving that one.
    let mut taken = device("st_1", "dv_1", "SER1");
    taken.user_email = "someone.else@example.com".into();
    refused(store.enroll_device(&mut taken, Some("dv_1")).await);
    // Taken by a device of another site.
    let mut elsewhere = device("st_1", "dv_2", "SER3");
    refused(store.enroll_device(&mut elsewhere, None).await);

    let kept = store.get_device("dv_1").await.unwrap().unwrap();
    assert_eq!(*kept, first_device);
    assert_eq!(kept.status, DeviceStatus::Active);
    assert_eq!(*store.get_device("dv_2").await.unwrap().unwrap(), abroad);
    assert_eq!(store.get_passcode("st_1").await.unwrap(), Some(before));
    let listed = store
        .list_devices("st_1", &Default::default(), first(10))
        .await
        .unwrap();
    assert_eq!(listed.items, [first_device]);
    // No trace of the failed one in the serial check either.
    let mut third = device("st_1", "dv_3", "SER3");
    assert_eq!(
        store.enroll_device(&mut third, None).await.unwrap(),
        mdm_core::store::Enrolled::New
    );
}
