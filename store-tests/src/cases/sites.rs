//! Sites and their users.

use std::sync::Arc;

use mdm_core::model::Webhook;
use mdm_core::store::{SiteFilter, Store, UsersInserted};

use crate::all_pages;
use crate::fixtures::{first, ids, site, user};

fn webhook() -> Webhook {
    Webhook {
        url: "https://hooks.example/x".into(),
        secret_sealed: "sealed".into(),
    }
}

/// `insert_site` stores a site once: a taken id is refused and the stored
/// site stays as it was.
pub async fn a_site_is_stored_once_and_read_back(store: Arc<dyn Store>) {
    let a = site("st_a");
    assert!(store.insert_site(&a).await.unwrap());
    assert_eq!(store.get_site("st_a").await.unwrap(), Some(a.clone()));
    let mut taken = site("st_a");
    taken.display_name = "another".into();
    assert!(!store.insert_site(&taken).await.unwrap());
    assert_eq!(store.get_site("st_a").await.unwrap(), Some(a));
    assert_eq!(store.get_site("st_none").await.unwrap(), None);
    assert_eq!(store.get_site("nul\0").await.unwrap(), None);
}

/// A change is stored and returned; one that returns false is not stored;
/// a site that is not there is None.
pub async fn a_site_change_is_kept_and_a_refused_one_is_not(store: Arc<dyn Store>) {
    store.insert_site(&site("st_b")).await.unwrap();
    let changed = store
        .update_site(
            "st_b",
            Box::new(|s| {
                s.display_name = "renamed".into();
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.display_name, "renamed");
    assert_eq!(store.get_site("st_b").await.unwrap(), Some(changed.clone()));
    store
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
    assert_eq!(store.get_site("st_b").await.unwrap(), Some(changed));
    assert!(
        store
            .update_site("st_none", Box::new(|_| true))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.get_site("st_none").await.unwrap().is_none());
}

/// `site_has_webhook` follows the site: set at insert, set and removed by
/// changes, false for a site that is not there.
pub async fn whether_a_site_has_a_webhook_follows_every_write(store: Arc<dyn Store>) {
    store.insert_site(&site("st_plain")).await.unwrap();
    let mut hooked = site("st_hooked");
    hooked.webhook = Some(webhook());
    store.insert_site(&hooked).await.unwrap();
    assert!(!store.site_has_webhook("st_plain").await.unwrap());
    assert!(store.site_has_webhook("st_hooked").await.unwrap());
    assert!(!store.site_has_webhook("st_none").await.unwrap());

    store
        .update_site(
            "st_plain",
            Box::new(|s| {
                s.webhook = Some(webhook());
                true
            }),
        )
        .await
        .unwrap();
    assert!(store.site_has_webhook("st_plain").await.unwrap());
    // A refused change leaves it as it was.
    store
        .update_site(
            "st_plain",
            Box::new(|s| {
                s.webhook = None;
                false
            }),
        )
        .await
        .unwrap();
    assert!(store.site_has_webhook("st_plain").await.unwrap());
    store
        .update_site(
            "st_hooked",
            Box::new(|s| {
                s.webhook = None;
                true
            }),
        )
        .await
        .unwrap();
    assert!(!store.site_has_webhook("st_hooked").await.unwrap());
}

/// Concurrent changes of one site each see the one before: twenty
/// read-modify-writes of two settings lose none.
pub async fn concurrent_changes_of_a_site_do_not_undo_each_other(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let calls = (0..20).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .update_site(
                    "st_1",
                    Box::new(move |s| {
                        if i % 2 == 0 {
                            s.failed_attempt_limit += 1;
                        } else {
                            s.reset_passcode_visible_days += 1;
                        }
                        true
                    }),
                )
                .await
                .unwrap()
                .unwrap()
        })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap();
    }
    let stored = store.get_site("st_1").await.unwrap().unwrap();
    assert_eq!(
        (
            stored.failed_attempt_limit,
            stored.reset_passcode_visible_days
        ),
        (20, 10)
    );
}

/// Sites list in id order, in pages, and `only` keeps the named ones
/// (in id order too, ignoring ids that are not there).
pub async fn sites_list_in_id_order_filtered_and_paged(store: Arc<dyn Store>) {
    for id in ["st_c", "st_a", "st_e", "st_b", "st_d"] {
        store.insert_site(&site(id)).await.unwrap();
    }
    let all = SiteFilter::default();
    let page = store.list_sites(&all, first(3)).await.unwrap();
    assert_eq!(ids(&page.items, |s| &s.site_id), ["st_a", "st_b", "st_c"]);
    assert!(!page.next_page_token.is_empty());
    let rest = store
        .list_sites(&all, crate::fixtures::next(&page.next_page_token, 3))
        .await
        .unwrap();
    assert_eq!(ids(&rest.items, |s| &s.site_id), ["st_d", "st_e"]);
    assert_eq!(rest.next_page_token, "");
    let every = all_pages!(1, |page| store.list_sites(&all, page));
    assert_eq!(
        ids(&every, |s| &s.site_id),
        ["st_a", "st_b", "st_c", "st_d", "st_e"]
    );
    // A page that holds exactly the rest may or may not say more follow;
    // the next one is then empty and ends the list.
    let whole = all_pages!(5, |page| store.list_sites(&all, page));
    assert_eq!(whole.len(), 5);

    let only = SiteFilter {
        only: Some(vec!["st_e".into(), "st_b".into(), "st_none".into()]),
    };
    let listed = all_pages!(1, |page| store.list_sites(&only, page));
    assert_eq!(ids(&listed, |s| &s.site_id), ["st_b", "st_e"]);
    let none = SiteFilter {
        only: Some(Vec::new()),
    };
    assert!(
        store
            .list_sites(&none, first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // A page of no items is empty and ends the list.
    let empty = store.list_sites(&all, first(0)).await.unwrap();
    assert!(empty.items.is_empty() && empty.next_page_token.is_empty());
}

/// Users whose email the site has are skipped (their indexes returned);
/// another site's users do not count.
pub async fn users_go_in_skipping_emails_the_site_has(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    let alice = user("st_1", "alice@example.com");
    let batch = [
        user("st_1", "carol@example.com"),
        alice.clone(),
        user("st_1", "bob@example.com"),
    ];
    assert_eq!(
        store.insert_users("st_1", &batch, 10).await.unwrap(),
        UsersInserted::Inserted {
            existing: Vec::new()
        }
    );
    let again = [
        user("st_1", "dave@example.com"),
        user("st_1", "alice@example.com"),
    ];
    assert_eq!(
        store.insert_users("st_1", &again, 10).await.unwrap(),
        UsersInserted::Inserted { existing: vec![1] }
    );
    // The stored alice is the first one.
    assert_eq!(
        store.get_user("st_1", "alice@example.com").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(store.get_user_by_id(&again[1].user_id).await.unwrap(), None);
    let elsewhere = user("st_2", "alice@example.com");
    assert_eq!(
        store
            .insert_users("st_2", std::slice::from_ref(&elsewhere), 1)
            .await
            .unwrap(),
        UsersInserted::Inserted {
            existing: Vec::new()
        }
    );
    assert_eq!(
        store.get_user("st_2", "alice@example.com").await.unwrap(),
        Some(elsewhere)
    );
    // Nothing new: stored nothing, refused nothing.
    assert_eq!(
        store.insert_users("st_1", &[], 10).await.unwrap(),
        UsersInserted::Inserted {
            existing: Vec::new()
        }
    );
}

/// An email twice in one batch: the first is stored, the later one counts
/// as one the site has, also against the quota.
pub async fn an_email_twice_in_one_batch_is_stored_once(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    let bob = user("st_1", "bob@example.com");
    let bob_again = user("st_1", "bob@example.com");
    let batch = [
        bob.clone(),
        user("st_1", "carol@example.com"),
        bob_again.clone(),
    ];
    // Two users are new: they fit a limit of two.
    assert_eq!(
        store.insert_users("st_1", &batch, 2).await.unwrap(),
        UsersInserted::Inserted { existing: vec![2] }
    );
    assert_eq!(
        store.get_user("st_1", "bob@example.com").await.unwrap(),
        Some(bob.clone())
    );
    assert_eq!(store.get_user_by_id(&bob.user_id).await.unwrap(), Some(bob));
    assert_eq!(
        store.get_user_by_id(&bob_again.user_id).await.unwrap(),
        None
    );
    let listed = all_pages!(10, |page| store.list_users("st_1", page));
    assert_eq!(
        ids(&listed, |u| &u.email),
        ["bob@example.com", "carol@example.com"]
    );
    // The site has two users, not three.
    assert_eq!(
        store
            .insert_users("st_1", &[user("st_1", "dave@example.com")], 3)
            .await
            .unwrap(),
        UsersInserted::Inserted {
            existing: Vec::new()
        }
    );
    assert_eq!(
        store
            .insert_users("st_1", &[user("st_1", "erin@example.com")], 3)
            .await
            .unwrap(),
        UsersInserted::OverQuota { users: 3 }
    );
}

/// A batch that would pass the limit stores nothing and says how many
/// users the site has; emails the site has do not count; each site has
/// its own count, and a deletion makes room.
pub async fn users_over_the_limit_are_refused_whole(store: Arc<dyn Store>) {
    for id in ["st_1", "st_2", "st_3"] {
        store.insert_site(&site(id)).await.unwrap();
    }
    let five: Vec<_> = (0..5)
        .map(|i| user("st_3", &format!("u{i}@example.com")))
        .collect();
    assert_eq!(
        store.insert_users("st_3", &five, 4).await.unwrap(),
        UsersInserted::OverQuota { users: 0 }
    );
    assert!(
        store
            .list_users("st_3", first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    for u in &five {
        assert_eq!(store.get_user_by_id(&u.user_id).await.unwrap(), None);
    }
    assert!(
        store
            .sites_of_email("u0@example.com")
            .await
            .unwrap()
            .is_empty()
    );

    let abc: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| user("st_1", &format!("{n}@example.com")))
        .collect();
    store.insert_users("st_1", &abc, 3).await.unwrap();
    let with_new = [user("st_1", "a@example.com"), user("st_1", "d@example.com")];
    assert_eq!(
        store.insert_users("st_1", &with_new, 3).await.unwrap(),
        UsersInserted::OverQuota { users: 3 }
    );
    assert!(
        store
            .get_user("st_1", "d@example.com")
            .await
            .unwrap()
            .is_none()
    );
    // Only emails it has: nothing new, so within the limit.
    assert_eq!(
        store.insert_users("st_1", &with_new[..1], 3).await.unwrap(),
        UsersInserted::Inserted { existing: vec![0] }
    );
    // Another site counts its own.
    assert!(matches!(
        store
            .insert_users("st_2", &[user("st_2", "a@example.com")], 1)
            .await
            .unwrap(),
        UsersInserted::Inserted { .. }
    ));
    store.delete_user(&abc[0].user_id).await.unwrap().unwrap();
    assert_eq!(
        store.insert_users("st_1", &with_new[1..], 3).await.unwrap(),
        UsersInserted::Inserted {
            existing: Vec::new()
        }
    );
    let listed = all_pages!(2, |page| store.list_users("st_1", page));
    assert_eq!(
        ids(&listed, |u| &u.email),
        ["b@example.com", "c@example.com", "d@example.com"]
    );
    assert_eq!(
        store
            .insert_users("st_1", &[user("st_1", "e@example.com")], 3)
            .await
            .unwrap(),
        UsersInserted::OverQuota { users: 3 }
    );
}

/// Users are found by site and email, by id, and by email across sites
/// (in site id order); a site's users list by email, in pages.
pub async fn users_are_found_by_email_and_id_and_listed_by_email(store: Arc<dyn Store>) {
    for id in ["st_1", "st_2", "st_3"] {
        store.insert_site(&site(id)).await.unwrap();
    }
    let emails = ["dave", "alice", "carol", "bob", "erin"];
    let users: Vec<_> = emails
        .iter()
        .map(|n| user("st_2", &format!("{n}@example.com")))
        .collect();
    store.insert_users("st_2", &users, 10).await.unwrap();
    store
        .insert_users("st_3", &[user("st_3", "alice@example.com")], 10)
        .await
        .unwrap();
    store
        .insert_users("st_1", &[user("st_1", "alice@example.com")], 10)
        .await
        .unwrap();

    let alice = &users[1];
    assert_eq!(
        store.get_user("st_2", "alice@example.com").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        store.get_user_by_id(&alice.user_id).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        store.get_user("st_2", "nobody@example.com").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .get_user("st_none", "alice@example.com")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.get_user("st_2", "nul\0@example.com").await.unwrap(),
        None
    );
    assert_eq!(store.get_user_by_id("us_none").await.unwrap(), None);
    assert_eq!(
        store.sites_of_email("alice@example.com").await.unwrap(),
        ["st_1", "st_2", "st_3"]
    );
    assert_eq!(
        store.sites_of_email("bob@example.com").await.unwrap(),
        ["st_2"]
    );
    assert!(
        store
            .sites_of_email("nobody@example.com")
            .await
            .unwrap()
            .is_empty()
    );

    let page = store.list_users("st_2", first(2)).await.unwrap();
    assert_eq!(
        ids(&page.items, |u| &u.email),
        ["alice@example.com", "bob@example.com"]
    );
    let listed = all_pages!(2, |page| store.list_users("st_2", page));
    assert_eq!(
        ids(&listed, |u| &u.email),
        [
            "alice@example.com",
            "bob@example.com",
            "carol@example.com",
            "dave@example.com",
            "erin@example.com"
        ]
    );
    assert_eq!(listed[0], *alice);
    assert!(
        store
            .list_users("st_none", first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// A deleted user is returned once, then gone from every lookup; the
/// email can be taken again.
pub async fn a_deleted_user_is_gone_from_every_lookup(store: Arc<dyn Store>) {
    store.insert_site(&site("st_1")).await.unwrap();
    store.insert_site(&site("st_2")).await.unwrap();
    let alice = user("st_1", "alice@example.com");
    let bob = user("st_1", "bob@example.com");
    store
        .insert_users("st_1", &[alice.clone(), bob.clone()], 10)
        .await
        .unwrap();
    store
        .insert_users("st_2", &[user("st_2", "alice@example.com")], 10)
        .await
        .unwrap();

    assert_eq!(
        store.delete_user(&alice.user_id).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(store.delete_user(&alice.user_id).await.unwrap(), None);
    assert_eq!(store.delete_user("us_none").await.unwrap(), None);
    assert_eq!(store.get_user_by_id(&alice.user_id).await.unwrap(), None);
    assert_eq!(
        store.get_user("st_1", "alice@example.com").await.unwrap(),
        None
    );
    assert_eq!(
        store.sites_of_email("alice@example.com").await.unwrap(),
        ["st_2"]
    );
    let listed = all_pages!(10, |page| store.list_users("st_1", page));
    assert_eq!(listed, [bob]);

    let again = user("st_1", "alice@example.com");
    assert_eq!(
        store
            .insert_users("st_1", std::slice::from_ref(&again), 2)
            .await
            .unwrap(),
        UsersInserted::Inserted {
            existing: Vec::new()
        }
    );
    assert_eq!(
        store.get_user("st_1", "alice@example.com").await.unwrap(),
        Some(again.clone())
    );
    assert_eq!(store.get_user_by_id(&alice.user_id).await.unwrap(), None);
    assert_eq!(
        store.get_user_by_id(&again.user_id).await.unwrap(),
        Some(again)
    );
}
