//! Page tokens: opaque, and good only on the list that made them.

use std::sync::Arc;

use mdm_core::model::ActionType;
use mdm_core::store::{ActionFilter, DeviceFilter, Page, SiteFilter, Store, StoreResult};

use crate::fixtures::{
    alert, device, final_action, first, is_bad_token, next, notification, site, user,
};

/// Each list takes its own tokens (and resumes after the last item it
/// gave) and refuses, as `BadPageToken`, tokens it did not make: garbage,
/// another list's, and its own kind's of another scope (another site's
/// users, another device's actions, one site's notifications for all).
pub async fn page_tokens_work_only_on_the_list_that_made_them(store: Arc<dyn Store>) {
    for site_id in ["st_1", "st_2", "st_3"] {
        store.insert_site(&site(site_id)).await.unwrap();
        store
            .insert_users(
                site_id,
                &[
                    user(site_id, "a@example.com"),
                    user(site_id, "b@example.com"),
                ],
                10,
            )
            .await
            .unwrap();
        for n in 1..=2 {
            let mut d = device(site_id, &format!("dv_{site_id}_{n}"), "");
            store.enroll_device(&mut d, None).await.unwrap();
            for kind in [ActionType::Lock, ActionType::Unenroll] {
                let action = final_action(store.as_ref(), &d, kind, "a@example.com");
                store.record_action(&action).await.unwrap();
            }
        }
        for i in 0..2 {
            store
                .put_alert(&alert(site_id, &format!("alert {i}")), &[])
                .await
                .unwrap();
            store
                .put_notification(&notification(site_id, &format!("mail {i}")))
                .await
                .unwrap();
        }
    }

    fn token<T>(page: StoreResult<Page<T>>) -> String {
        let token = page.unwrap().next_page_token;
        assert!(!token.is_empty(), "a first page of one item of two or more");
        token
    }
    let all_sites = SiteFilter::default();
    let all_devices = DeviceFilter::default();
    let site_actions = ActionFilter::site("st_1");
    let mut device_actions = ActionFilter::site("st_1");
    device_actions.device_id = Some("dv_st_1_1".into());
    let mut other_device_actions = ActionFilter::site("st_1");
    other_device_actions.device_id = Some("dv_st_1_2".into());

    let sites = token(store.list_sites(&all_sites, first(1)).await);
    let users = token(store.list_users("st_1", first(1)).await);
    let devices = token(store.list_devices("st_1", &all_devices, first(1)).await);
    let actions = token(store.list_actions(&site_actions, first(1)).await);
    let of_device = token(store.list_actions(&device_actions, first(1)).await);
    let alerts = token(store.list_alerts("st_1", first(1)).await);
    let mail = token(store.list_notifications(None, None, first(1)).await);
    let site_mail = token(store.list_notifications(Some("st_1"), None, first(1)).await);
    let every = [
        &sites, &users, &devices, &actions, &of_device, &alerts, &mail, &site_mail,
    ];
    let garbage = ["zz-not-hex", "00ff", "00", "ffffffffffffffffffff"];

    // Every list refuses garbage and every token but its own.
    macro_rules! refuses_all_but {
        ($own:expr, |$page:ident| $call:expr) => {
            for bad in garbage
                .iter()
                .copied()
                .chain(every.iter().filter(|t| ***t != *$own).map(|t| t.as_str()))
            {
                let $page = next(bad, 1);
                assert!(
                    is_bad_token($call.await),
                    "{} took the token {bad:?}",
                    stringify!($call)
                );
            }
            let $page = next($own, 1);
            $call.await.expect("a list takes its own token");
        };
    }
    refuses_all_but!(&sites, |page| store.list_sites(&all_sites, page));
    refuses_all_but!(&users, |page| store.list_users("st_1", page));
    refuses_all_but!(&devices, |page| store.list_devices(
        "st_1",
        &all_devices,
        page
    ));
    refuses_all_but!(&actions, |page| store.list_actions(&site_actions, page));
    refuses_all_but!(&of_device, |page| store.list_actions(&device_actions, page));
    refuses_all_but!(&alerts, |page| store.list_alerts("st_1", page));
    refuses_all_but!(&mail, |page| store.list_notifications(None, None, page));
    refuses_all_but!(&site_mail, |page| store.list_notifications(
        Some("st_1"),
        None,
        page
    ));

    // Its own kind, of another scope.
    assert!(is_bad_token(
        store.list_users("st_2", next(&users, 1)).await
    ));
    assert!(is_bad_token(
        store
            .list_devices("st_2", &all_devices, next(&devices, 1))
            .await
    ));
    assert!(is_bad_token(
        store
            .list_actions(&ActionFilter::site("st_2"), next(&actions, 1))
            .await
    ));
    assert!(is_bad_token(
        store
            .list_actions(&other_device_actions, next(&of_device, 1))
            .await
    ));
    assert!(is_bad_token(
        store.list_alerts("st_2", next(&alerts, 1)).await
    ));
    assert!(is_bad_token(
        store
            .list_notifications(Some("st_2"), None, next(&site_mail, 1))
            .await
    ));

    // A token resumes after the last item given.
    let rest = store.list_users("st_1", next(&users, 10)).await.unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].email, "b@example.com");
    let rest = store
        .list_sites(&all_sites, next(&sites, 10))
        .await
        .unwrap();
    let rest: Vec<_> = rest.items.into_iter().map(|s| s.site_id).collect();
    assert_eq!(rest, ["st_2", "st_3"]);
}
