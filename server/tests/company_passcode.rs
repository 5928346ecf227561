//! `verify_company_passcode` against a real data dir and sled database:
//! failures, lockout with exactly one alert, persistence, throttling.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mdm_core::domain::company_passcode::Refusal;
use mdm_core::store::PageRequest;
use mdm_server::Config;
use mdm_server::app::App;
use mdm_server::datadir::DataDir;
use mdm_server::model::{NotificationState, PasscodeState};
use mdm_server::server::{open_app, prepare_data_dir};
use mdm_server::throttle::ThrottleConfig;
use mdm_store_sled::Storage;

fn open(dir: &Path, throttle: ThrottleConfig) -> App {
    let mut config = Config::for_data_dir(dir);
    config.throttle = throttle;
    prepare_data_dir(&config).unwrap();
    let data = DataDir::new(dir);
    let storage = Storage::open(&data.db()).unwrap();
    open_app(&data, Arc::new(storage), &config).unwrap()
}

fn lenient() -> ThrottleConfig {
    ThrottleConfig {
        burst: 1000,
        refill_every: Duration::from_millis(1),
    }
}

fn ip(n: u32) -> IpAddr {
    IpAddr::from([127, 0, (n / 250) as u8, (n % 250 + 1) as u8])
}

#[tokio::test]
async fn the_current_passcode_verifies_and_the_old_one_stops_at_once() {
    let temp = tempfile::tempdir().unwrap();
    let app = open(&temp.path().join("d"), lenient());
    let site = app.create_site("Head office", None).await.unwrap();
    app.create_user(&site.site_id, "Alice@Example.com", "Alice")
        .await
        .unwrap();
    let (first, _) = app
        .generate_company_passcode(&site.site_id, "owner@localhost")
        .await
        .unwrap();

    let ok = app
        .verify_company_passcode("alice@example.com", first.expose(), ip(1))
        .await
        .unwrap()
        .expect("the current passcode verifies");
    assert_eq!(ok.site.site_id, site.site_id);
    assert_eq!(ok.user.email, "alice@example.com");
    // Only an enrollment that goes through counts as a use.
    assert!(
        app.company_passcode_info(&site.site_id)
            .await
            .unwrap()
            .last_used_at
            .is_none()
    );

    let (second, info) = app
        .generate_company_passcode(&site.site_id, "owner@localhost")
        .await
        .unwrap();
    assert_ne!(first.expose(), second.expose());
    assert_eq!(info.failed_attempts, 0);
    let refusal = app
        .verify_company_passcode("alice@example.com", first.expose(), ip(1))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refusal, Refusal::WrongPasscode);
    assert_eq!(
        app.company_passcode_info(&site.site_id)
            .await
            .unwrap()
            .failed_attempts,
        1
    );
    assert!(
        app.verify_company_passcode("alice@example.com", second.expose(), ip(1))
            .await
            .unwrap()
            .is_ok()
    );

    // Right passcode, email that is not a user: refused, nothing counted.
    let refusal = app
        .verify_company_passcode("mallory@example.com", second.expose(), ip(1))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refusal, Refusal::NotAUser(site.site_id.clone()));
    assert_eq!(
        app.company_passcode_info(&site.site_id)
            .await
            .unwrap()
            .failed_attempts,
        1
    );

    // Disable: the right passcode no longer works.
    app.disable_company_passcode(&site.site_id, "owner@localhost")
        .await
        .unwrap();
    let refusal = app
        .verify_company_passcode("alice@example.com", second.expose(), ip(1))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refusal, Refusal::Disabled(site.site_id.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wrong_attempts_lock_out_at_exactly_the_limit_with_one_alert() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("d");
    let app = Arc::new(open(&dir, lenient()));
    let site = app.create_site("Branch", Some(5)).await.unwrap();
    let other = app.create_site("Other", None).await.unwrap();
    app.create_user(&site.site_id, "bob@example.com", "Bob")
        .await
        .unwrap();
    app.create_user(&other.site_id, "carol@example.com", "Carol")
        .await
        .unwrap();
    let (good, _) = app
        .generate_company_passcode(&site.site_id, "owner@localhost")
        .await
        .unwrap();
    let (other_good, _) = app
        .generate_company_passcode(&other.site_id, "owner@localhost")
        .await
        .unwrap();
    let mut alerts = app.subscribe_alerts();

    let mut tasks = Vec::new();
    for n in 0..40 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.verify_company_passcode("bob@example.com", "WrongPass123", ip(n))
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().is_err());
    }

    let info = app.company_passcode_info(&site.site_id).await.unwrap();
    assert_eq!(info.state, PasscodeState::LockedOut);
    assert_eq!(info.failed_attempts, 5, "counting stops at the limit");
    let page = app
        .store()
        .list_alerts(
            &site.site_id,
            PageRequest {
                token: "",
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1, "exactly one alert");
    assert_eq!(page.items[0].failed_attempts, 5);
    assert_eq!(page.items[0].source_addresses.len(), 5);
    let streamed = alerts.try_recv().unwrap();
    assert_eq!(streamed, page.items[0]);
    assert!(alerts.try_recv().is_err(), "one alert on the stream too");

    let outbox = app
        .store()
        .list_notifications(
            Some(&site.site_id),
            None,
            PageRequest {
                token: "",
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        outbox.items.len(),
        1,
        "one email per site admin (the owner)"
    );
    assert_eq!(outbox.items[0].recipient, "owner@localhost");
    assert_eq!(outbox.items[0].state, NotificationState::Pending);
    assert!(outbox.items[0].subject.contains("failed-attempt limit"));
    assert!(!outbox.items[0].body_text.contains(good.expose()));

    // The right passcode is refused after lockout; the other site is unaffected.
    let refusal = app
        .verify_company_passcode("bob@example.com", good.expose(), ip(99))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refusal, Refusal::LockedOut(site.site_id.clone()));
    assert!(
        app.verify_company_passcode("carol@example.com", other_good.expose(), ip(99))
            .await
            .unwrap()
            .is_ok()
    );
    assert_eq!(
        app.company_passcode_info(&other.site_id)
            .await
            .unwrap()
            .failed_attempts,
        0
    );

    // Lockout survives a restart.
    let site_id = site.site_id.clone();
    drop(alerts);
    drop(Arc::try_unwrap(app).expect("last handle"));
    let app = open(&dir, lenient());
    let info = app.company_passcode_info(&site_id).await.unwrap();
    assert_eq!(info.state, PasscodeState::LockedOut);
    assert_eq!(info.failed_attempts, 5);
    assert!(
        app.verify_company_passcode("bob@example.com", good.expose(), ip(7))
            .await
            .unwrap()
            .is_err()
    );

    // Only a regenerate re-enables.
    let (fresh, info) = app
        .generate_company_passcode(&site_id, "owner@localhost")
        .await
        .unwrap();
    assert_eq!(info.state, PasscodeState::Enabled);
    assert!(
        app.verify_company_passcode("bob@example.com", fresh.expose(), ip(7))
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test]
async fn one_source_is_throttled_before_it_can_burn_the_limit_and_others_are_not() {
    let temp = tempfile::tempdir().unwrap();
    let app = open(
        &temp.path().join("d"),
        ThrottleConfig {
            burst: 3,
            refill_every: Duration::from_secs(3600),
        },
    );
    let site = app.create_site("Site", Some(10)).await.unwrap();
    app.create_user(&site.site_id, "dan@example.com", "Dan")
        .await
        .unwrap();
    let (good, _) = app
        .generate_company_passcode(&site.site_id, "owner@localhost")
        .await
        .unwrap();
    let attacker = ip(1);
    let mut throttled = 0;
    for _ in 0..20 {
        match app
            .verify_company_passcode("dan@example.com", "AAAAAAAAAAA1", attacker)
            .await
            .unwrap()
        {
            Err(Refusal::Throttled(_)) => throttled += 1,
            Err(Refusal::WrongPasscode) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(throttled, 17);
    let info = app.company_passcode_info(&site.site_id).await.unwrap();
    assert_eq!(
        info.failed_attempts, 3,
        "throttled attempts are not even evaluated"
    );
    assert_eq!(info.state, PasscodeState::Enabled);
    assert!(
        app.verify_company_passcode("dan@example.com", good.expose(), ip(2))
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test]
async fn a_wrong_passcode_for_an_unknown_email_counts_nowhere() {
    let temp = tempfile::tempdir().unwrap();
    let app = open(&temp.path().join("d"), lenient());
    let site = app.create_site("Site", Some(1)).await.unwrap();
    app.generate_company_passcode(&site.site_id, "owner@localhost")
        .await
        .unwrap();
    for n in 0..5 {
        let refusal = app
            .verify_company_passcode("stranger@example.com", "Wrong0000abc", ip(n))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refusal, Refusal::WrongPasscode);
    }
    let info = app.company_passcode_info(&site.site_id).await.unwrap();
    assert_eq!(
        (info.state, info.failed_attempts),
        (PasscodeState::Enabled, 0)
    );
}
