//! Company passcodes and the counting of wrong ones.

use std::sync::Arc;

use mdm_core::model::PasscodeState;
use mdm_core::store::{FailedAttempt, Store, StoreError};

use crate::fixtures::{attempt, first, lockout, passcode, site};

/// A replaced passcode stops being found by its hash at once; each site's
/// current one is found by its own; a hash that is not hex is corrupt and
/// changes nothing.
pub async fn a_replaced_passcode_stops_working_at_once(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    assert_eq!(store.get_passcode("st_1").await.unwrap(), None);
    assert_eq!(
        store.site_for_passcode_hash(b"old hash").await.unwrap(),
        None
    );
    let old = passcode("st_1", b"old hash");
    store.replace_passcode(&old).await.unwrap();
    assert_eq!(store.get_passcode("st_1").await.unwrap(), Some(old));
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
    assert_eq!(store.get_passcode("st_1").await.unwrap(), Some(new.clone()));
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
    store
        .replace_passcode(&passcode("st_2", b"second site"))
        .await
        .unwrap();
    assert_eq!(
        store
            .site_for_passcode_hash(b"second site")
            .await
            .unwrap()
            .as_deref(),
        Some("st_2")
    );
    assert_eq!(
        store
            .site_for_passcode_hash(b"new hash")
            .await
            .unwrap()
            .as_deref(),
        Some("st_1")
    );
    // Replacing with the same hash keeps it working.
    let mut same = new.clone();
    same.generated_by = "other@example.com".into();
    store.replace_passcode(&same).await.unwrap();
    assert_eq!(
        store
            .site_for_passcode_hash(b"new hash")
            .await
            .unwrap()
            .as_deref(),
        Some("st_1")
    );

    let mut not_hex = passcode("st_1", b"x");
    not_hex.hash = "not hex".into();
    assert!(matches!(
        store.replace_passcode(&not_hex).await,
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(store.get_passcode("st_1").await.unwrap(), Some(same));
}

/// A change of the record is kept, one that returns false is not, and a
/// site without a passcode is None.
pub async fn a_passcode_change_is_kept_and_a_refused_one_is_not(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
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
    assert_eq!(
        store.get_passcode("st_1").await.unwrap(),
        Some(disabled.clone())
    );
    store
        .update_passcode(
            "st_1",
            Box::new(|r| {
                r.state = PasscodeState::Enabled;
                false
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.get_passcode("st_1").await.unwrap(), Some(disabled));
    assert!(
        store
            .update_passcode("st_2", Box::new(|_| true))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.get_passcode("st_2").await.unwrap(), None);
}

/// Wrong passcodes count in order, per site; the one that reaches the
/// limit locks out and stores the alert and its emails; later ones, and
/// those of a site without an enabled passcode, count nothing.
pub async fn failed_attempts_count_in_order_and_the_one_at_the_limit_locks_out(
    store: Arc<dyn Store>,
) {
    let mut limited = site("st_1");
    limited.failed_attempt_limit = 3;
    store.insert_site(&limited).await.unwrap();
    let unprotected = site("st_2");
    store.insert_site(&unprotected).await.unwrap();
    let disabled = site("st_3");
    store.insert_site(&disabled).await.unwrap();
    let other = site("st_4");
    store.insert_site(&other).await.unwrap();
    store
        .replace_passcode(&passcode("st_1", b"one"))
        .await
        .unwrap();
    let mut off = passcode("st_3", b"three");
    off.state = PasscodeState::Disabled;
    store.replace_passcode(&off).await.unwrap();
    store
        .replace_passcode(&passcode("st_4", b"four"))
        .await
        .unwrap();

    let outcomes = store
        .record_failed_attempts(
            &[
                attempt(&limited, "10.0.0.1"),
                attempt(&unprotected, "10.0.0.1"),
                attempt(&limited, "10.0.0.2"),
                attempt(&other, "10.0.0.9"),
                attempt(&disabled, "10.0.0.1"),
                attempt(&limited, "10.0.0.1"),
                attempt(&limited, "10.0.0.3"),
            ],
            &lockout,
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 7);
    assert_eq!(outcomes[0], FailedAttempt::Counted { failed_attempts: 1 });
    assert_eq!(outcomes[1], FailedAttempt::NotEnabled);
    assert_eq!(outcomes[2], FailedAttempt::Counted { failed_attempts: 2 });
    assert_eq!(outcomes[3], FailedAttempt::Counted { failed_attempts: 1 });
    assert_eq!(outcomes[4], FailedAttempt::NotEnabled);
    let FailedAttempt::LockedOut(alert) = &outcomes[5] else {
        panic!("the third attempt did not lock out: {:?}", outcomes[5]);
    };
    assert_eq!(alert.failed_attempts, 3);
    assert_eq!(alert.source_addresses, ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(outcomes[6], FailedAttempt::NotEnabled);

    let record = store.get_passcode("st_1").await.unwrap().unwrap();
    assert_eq!(record.state, PasscodeState::LockedOut);
    assert_eq!(record.failed_attempts, 3);
    assert!(record.last_failed_at.is_some());
    assert_eq!(record.failed_sources, ["10.0.0.1", "10.0.0.2"]);
    assert!(record.pending_lockout.is_none());
    let disabled_after = store.get_passcode("st_3").await.unwrap().unwrap();
    assert_eq!(disabled_after.failed_attempts, 0);
    assert_eq!(
        store
            .get_passcode("st_4")
            .await
            .unwrap()
            .unwrap()
            .failed_attempts,
        1
    );
    let alerts = store.list_alerts("st_1", first(10)).await.unwrap().items;
    assert_eq!(alerts, [alert.as_ref().clone()]);
    let pending = store.pending_notifications().await.unwrap();
    assert_eq!(pending.len(), 2);
    assert!(pending.iter().all(|n| n.site_id == "st_1"));
    assert!(
        store
            .record_failed_attempts(&[], &lockout)
            .await
            .unwrap()
            .is_empty()
    );
    // A new passcode starts counting afresh.
    store
        .replace_passcode(&passcode("st_1", b"fresh"))
        .await
        .unwrap();
    assert_eq!(
        store
            .record_failed_attempts(&[attempt(&limited, "10.0.0.1")], &lockout)
            .await
            .unwrap(),
        [FailedAttempt::Counted { failed_attempts: 1 }]
    );
}

/// Forty wrong passcodes at once against a limit of ten: nine are counted,
/// exactly one locks out (one alert, its two emails), thirty count nothing.
pub async fn forty_concurrent_wrong_passcodes_lock_out_exactly_once(store: Arc<dyn Store>) {
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
            store
                .record_failed_attempts(&[attempt(&limited, &format!("10.0.0.{i}"))], &lockout)
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
    let locked = outcomes
        .iter()
        .filter(|o| matches!(o, FailedAttempt::LockedOut(_)))
        .count();
    assert_eq!(locked, 1, "{outcomes:?}");
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
