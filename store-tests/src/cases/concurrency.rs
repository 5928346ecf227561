//! What the contract serialises: one device's commands, a site's
//! enrollments and users, the expiry sweep.

use std::collections::HashSet;
use std::sync::Arc;

use mdm_core::model::{ActionStatus, ActionType, Device, now_millis};
use mdm_core::store::{ActionFilter, Enrolled, Queued, Store, UsersInserted};

use crate::all_pages;
use crate::fixtures::{command, device, new_command, passcode, site, user};

async fn join<T: Send + 'static>(
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|joined| joined.expect("a task of the case panicked"))
        .collect()
}

/// Thirty locks and resets queued at once on one device: each sees the
/// ones before, so exactly one is left PENDING and each of the others was
/// superseded exactly once.
pub async fn concurrent_locks_on_one_device_leave_exactly_one_pending(store: Arc<dyn Store>) {
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
        let action = command(store.as_ref(), &phone, kind);
        tokio::spawn(async move {
            store
                .queue_command(new_command(action, false))
                .await
                .unwrap()
        })
    });
    let results: Vec<Queued> = join(calls).await;
    let queue = store.queued_actions("dv_1").await.unwrap();
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert_eq!(queue[0].status, ActionStatus::Pending);
    let superseded: Vec<&str> = results
        .iter()
        .flat_map(|q| q.superseded.iter().map(|a| a.action_id.as_str()))
        .collect();
    assert_eq!(superseded.len(), 29);
    let unique: HashSet<&str> = superseded.iter().copied().collect();
    assert_eq!(unique.len(), 29);
    assert!(!unique.contains(queue[0].action_id.as_str()));
    let mut canceled = ActionFilter::site("st_1");
    canceled.status = Some(ActionStatus::Canceled);
    let listed = all_pages!(7, |page| store.list_actions(&canceled, page));
    let listed: HashSet<&str> = listed.iter().map(|a| a.action_id.as_str()).collect();
    assert_eq!(listed, unique);
}

/// Commands for many devices at once: each device's queue is its own.
pub async fn concurrent_commands_on_many_devices_keep_each_queue_its_own(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let mut devices: Vec<Device> = Vec::new();
    for i in 0..8 {
        let mut d = device("st_1", &format!("dv_{i}"), &format!("S{i}"));
        store.enroll_device(&mut d, None).await.unwrap();
        devices.push(d);
    }
    let calls = (0..40).map(|i| {
        let store = store.clone();
        let action = command(store.as_ref(), &devices[i % 8], ActionType::Lock);
        tokio::spawn(async move {
            store
                .queue_command(new_command(action, false))
                .await
                .unwrap()
        })
    });
    let results = join(calls).await;
    let superseded: usize = results.iter().map(|q| q.superseded.len()).sum();
    assert_eq!(superseded, 32);
    for d in &devices {
        let queue = store.queued_actions(&d.device_id).await.unwrap();
        assert_eq!(queue.len(), 1, "{}: {queue:?}", d.device_id);
        assert_eq!(queue[0].device_id, d.device_id);
    }
    for q in &results {
        assert!(
            q.superseded
                .iter()
                .all(|older| older.device_id == q.action.device_id)
        );
    }
}

/// Sweeps at once: each due command is expired by exactly one of them.
pub async fn concurrent_sweeps_expire_each_command_once(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let now = now_millis();
    let mut due = HashSet::new();
    for i in 0..3 {
        let mut d = device("st_1", &format!("dv_{i}"), &format!("S{i}"));
        store.enroll_device(&mut d, None).await.unwrap();
        for _ in 0..4 {
            // Unenrolls supersede nothing: all four stay queued.
            let mut action = command(store.as_ref(), &d, ActionType::Unenroll);
            action.expires_at = now + 1_000;
            due.insert(action.action_id.clone());
            store
                .queue_command(new_command(action, i == 0))
                .await
                .unwrap();
        }
    }
    let sweeps = (0..4).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.expire_due(now + 1_000).await.unwrap() })
    });
    let expired: Vec<String> = join(sweeps)
        .await
        .into_iter()
        .flatten()
        .map(|a| a.action_id)
        .collect();
    assert_eq!(expired.len(), 12, "{expired:?}");
    assert_eq!(expired.into_iter().collect::<HashSet<_>>(), due);
    for i in 0..3 {
        assert!(
            store
                .queued_actions(&format!("dv_{i}"))
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// Ten devices with one serial number enrolling at once: one is new, each
/// other one names a device that enrolled before it, and all ten are
/// counted on the passcode.
pub async fn concurrent_enrollments_with_one_serial_see_each_other(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
    let calls = (0..10).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut d = device("st_1", &format!("dv_{i}"), "SAME");
            let enrolled = store.enroll_device(&mut d, None).await.unwrap();
            (d.device_id, enrolled)
        })
    });
    let outcomes = join(calls).await;
    let new: Vec<_> = outcomes
        .iter()
        .filter(|(_, e)| *e == Enrolled::New)
        .collect();
    assert_eq!(new.len(), 1, "{outcomes:?}");
    let ids: HashSet<&str> = outcomes.iter().map(|(id, _)| id.as_str()).collect();
    for (id, enrolled) in &outcomes {
        match enrolled {
            Enrolled::New => {}
            Enrolled::AlongsideSameSerial(other) => {
                assert!(ids.contains(other.as_str()) && other != id, "{outcomes:?}");
            }
            Enrolled::Replacing(_) => panic!("{outcomes:?}"),
        }
    }
    assert_eq!(
        store
            .get_passcode("st_1")
            .await
            .unwrap()
            .unwrap()
            .enrollments,
        10
    );
}

/// Enrollments of many devices at once each count once on the passcode.
pub async fn concurrent_enrollments_each_count_on_the_passcode(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
    let calls = (0..40).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut d = device("st_1", &format!("dv_{i}"), &format!("SERIAL-{i}"));
            store.enroll_device(&mut d, None).await.unwrap()
        })
    });
    let outcomes = join(calls).await;
    assert!(outcomes.iter().all(|e| *e == Enrolled::New), "{outcomes:?}");
    let record = store.get_passcode("st_1").await.unwrap().unwrap();
    assert_eq!(record.enrollments, 40);
    assert!(record.last_used_at.is_some());
}

/// Users inserted at once against one limit: exactly as many as fit go
/// in; one email inserted at once is stored once.
pub async fn concurrent_user_inserts_keep_the_limit_and_each_email_once(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    let calls = (0..12).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .insert_users("st_1", &[user("st_1", &format!("u{i:02}@example.com"))], 5)
                .await
                .unwrap()
        })
    });
    let outcomes = join(calls).await;
    let inserted = outcomes
        .iter()
        .filter(|o| {
            **o == UsersInserted::Inserted {
                existing: Vec::new(),
            }
        })
        .count();
    assert_eq!(inserted, 5, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .filter(|o| !matches!(o, UsersInserted::Inserted { .. }))
            .all(|o| *o == UsersInserted::OverQuota { users: 5 }),
        "{outcomes:?}"
    );
    let listed = all_pages!(10, |page| store.list_users("st_1", page));
    assert_eq!(listed.len(), 5);

    let calls = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let u = user("st_2", "same@example.com");
            let outcome = store
                .insert_users("st_2", std::slice::from_ref(&u), 10)
                .await
                .unwrap();
            (u, outcome)
        })
    });
    let outcomes = join(calls).await;
    let stored: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| {
            *o == UsersInserted::Inserted {
                existing: Vec::new(),
            }
        })
        .map(|(u, _)| u.clone())
        .collect();
    assert_eq!(stored.len(), 1, "{outcomes:?}");
    assert_eq!(
        store.get_user("st_2", "same@example.com").await.unwrap(),
        Some(stored[0].clone())
    );
    assert_eq!(
        all_pages!(10, |page| store.list_users("st_2", page)).len(),
        1
    );
}
