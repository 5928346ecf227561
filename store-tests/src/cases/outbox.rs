//! Alerts and the outbox of notifications.

use std::sync::Arc;

use mdm_core::model::{NotificationState, now_millis};
use mdm_core::store::Store;

use crate::all_pages;
use crate::fixtures::{alert, first, ids, notification};

/// Notifications wait in the outbox, oldest first, until they are
/// delivered or given up; storing one again replaces it.
pub async fn notifications_wait_in_the_outbox_until_delivered_oldest_first(store: Arc<dyn Store>) {
    assert!(store.pending_notifications().await.unwrap().is_empty());
    let mut sent = Vec::new();
    for (site_id, subject) in [
        ("st_1", "one"),
        ("st_2", "two"),
        ("st_1", "three"),
        ("st_1", "four"),
        ("st_2", "five"),
    ] {
        let n = notification(site_id, subject);
        store.put_notification(&n).await.unwrap();
        sent.push(n);
    }
    assert_eq!(store.pending_notifications().await.unwrap(), sent);

    let mut delivered = sent[0].clone();
    delivered.state = NotificationState::Delivered;
    delivered.attempts = 1;
    delivered.delivered_at = Some(now_millis());
    store.put_notification(&delivered).await.unwrap();
    let mut given_up = sent[3].clone();
    given_up.state = NotificationState::Failed;
    given_up.attempts = 9;
    given_up.last_error = "refused".into();
    store.put_notification(&given_up).await.unwrap();
    let mut retried = sent[1].clone();
    retried.attempts = 1;
    retried.last_error = "timed out".into();
    retried.next_attempt_at += 60_000;
    store.put_notification(&retried).await.unwrap();

    assert_eq!(
        store.pending_notifications().await.unwrap(),
        [retried.clone(), sent[2].clone(), sent[4].clone()]
    );
    let everything = all_pages!(10, |page| store.list_notifications(None, None, page));
    assert_eq!(
        everything,
        [
            delivered,
            retried,
            sent[2].clone(),
            given_up,
            sent[4].clone()
        ]
    );
}

/// Notifications list oldest first, by site (or all sites) and by state,
/// in pages.
pub async fn notifications_list_by_site_and_state_oldest_first_in_pages(store: Arc<dyn Store>) {
    let mut sent = Vec::new();
    for (i, site_id) in ["st_1", "st_2", "st_1", "st_1", "st_2", "st_1"]
        .into_iter()
        .enumerate()
    {
        let mut n = notification(site_id, &format!("n{i}"));
        if i % 3 == 0 {
            n.state = NotificationState::Delivered;
            n.delivered_at = Some(now_millis());
        }
        store.put_notification(&n).await.unwrap();
        sent.push(n);
    }
    let subjects = |items: &[mdm_core::model::Notification]| ids(items, |n| &n.subject);
    let page = store
        .list_notifications(Some("st_1"), None, first(2))
        .await
        .unwrap();
    assert_eq!(page.items, [sent[0].clone(), sent[2].clone()]);
    assert!(!page.next_page_token.is_empty());
    for limit in [1, 2, 3, 10] {
        let of_st_1 = all_pages!(limit, |page| store.list_notifications(
            Some("st_1"),
            None,
            page
        ));
        assert_eq!(subjects(&of_st_1), ["n0", "n2", "n3", "n5"]);
        let pending = all_pages!(limit, |page| store.list_notifications(
            None,
            Some(NotificationState::Pending),
            page
        ));
        assert_eq!(subjects(&pending), ["n1", "n2", "n4", "n5"]);
        let delivered_here = all_pages!(limit, |page| store.list_notifications(
            Some("st_1"),
            Some(NotificationState::Delivered),
            page
        ));
        assert_eq!(subjects(&delivered_here), ["n0", "n3"]);
        let everything = all_pages!(limit, |page| store.list_notifications(None, None, page));
        assert_eq!(everything, sent);
    }
    let failed = store
        .list_notifications(None, Some(NotificationState::Failed), first(10))
        .await
        .unwrap();
    assert!(failed.items.is_empty() && failed.next_page_token.is_empty());
    assert!(
        store
            .list_notifications(Some("st_none"), None, first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// A site's alerts list newest first, in pages; an alert stored again (a
/// retry) is one alert; its emails go to the outbox with it.
pub async fn alerts_list_newest_first_and_one_stored_again_is_one(store: Arc<dyn Store>) {
    let mut alerts = Vec::new();
    let mut mails = Vec::new();
    for i in 0..4 {
        let a = alert("st_1", &format!("alert {i}"));
        let mail = notification("st_1", &format!("alert mail {i}"));
        store
            .put_alert(&a, std::slice::from_ref(&mail))
            .await
            .unwrap();
        alerts.push(a);
        mails.push(mail);
    }
    let other = alert("st_2", "elsewhere");
    store.put_alert(&other, &[]).await.unwrap();
    // Stored again, with its email: still one of each.
    store
        .put_alert(&alerts[0], std::slice::from_ref(&mails[0]))
        .await
        .unwrap();

    let page = store.list_alerts("st_1", first(2)).await.unwrap();
    assert_eq!(page.items, [alerts[3].clone(), alerts[2].clone()]);
    for limit in [1, 3, 10] {
        let listed = all_pages!(limit, |page| store.list_alerts("st_1", page));
        let expected: Vec<_> = alerts.iter().rev().cloned().collect();
        assert_eq!(listed, expected);
    }
    assert_eq!(
        all_pages!(10, |page| store.list_alerts("st_2", page)),
        [other]
    );
    assert!(
        store
            .list_alerts("st_none", first(2))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(store.pending_notifications().await.unwrap(), mails);
}
