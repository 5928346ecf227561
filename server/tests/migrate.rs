//! `migrate`: a sled deployment (a real data dir, written through the
//! store contract) copied into a fresh PostgreSQL database reads back the
//! same through the contract, record for record and list for list; the
//! target keeps working as a store; a second copy into it and a directory
//! that is not a data dir are refused with nothing changed; no error shows
//! the database password.
#![allow(clippy::unwrap_used)]

#[path = "../../store-postgres/tests/common/mod.rs"]
mod common;

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use common::TestDb;
use mdm_core::model::{
    Action, ActionStatus, ActionType, Alert, AlertKind, AuditEntry, CommandPayload, Device,
    DeviceStatus, LatestReset, Millis, Notification, NotificationState, PASSCODE_PLACEHOLDER,
    PasscodeState, Platform, Webhook, now_millis, time_ordered_id,
};
use mdm_core::rules::AgentReport;
use mdm_core::snapshot::SnapshotCounts;
use mdm_core::store::{
    ActionFilter, Canceled, Delivery, DeviceFilter, Enrolled, FailedAttempt, FailedAttemptEntry,
    NewCommand, PageRequest, Queued, Reported, SiteFilter, Store, UsersInserted,
};
use mdm_server::migrate::{MigrateError, MigrationReport, migrate};
use mdm_store_postgres::PgConfig;
use mdm_store_sled::Storage;
use mdm_store_tests::fixtures::{device, notification, passcode, site, user};

const ADMIN: &str = "admin@example.com";
const HASH_A: [u8; 32] = [0xA1; 32];
const HASH_B: [u8; 32] = [0xB2; 32];

/// A new data dir at `root` (as a first start makes it), its database
/// opened as the store.
fn sled_deployment(root: &Path) -> Arc<dyn Store> {
    mdm_server::datadir::initialize(root, "owner@example.com").unwrap();
    let db = mdm_server::datadir::DataDir::new(root).db();
    Arc::new(Storage::open(&db).unwrap())
}

/// A command for `device`, PENDING, due in an hour.
fn command(store: &dyn Store, device: &Device, kind: ActionType, now: Millis) -> Action {
    let mut action = Action::pending(
        store.new_action_id(&device.site_id),
        device,
        kind,
        ADMIN,
        "queued",
        now,
    );
    action.expires_at = now + 3_600_000;
    action.payload = Some(match kind {
        ActionType::Lock => CommandPayload::Lock {
            message: "locked by IT".into(),
        },
        ActionType::ResetPasscode => CommandPayload::ResetPasscode {
            passcode_sealed: "sealed-passcode".into(),
            message: String::new(),
        },
        ActionType::Unenroll => CommandPayload::Unenroll,
    });
    action
}

async fn queue(store: &dyn Store, action: Action, online: bool) -> Queued {
    store
        .queue_command(NewCommand {
            action,
            online,
            notifications: Vec::new(),
            latest_reset: None,
        })
        .await
        .unwrap()
}

/// What the deployment was built with, to look at afterwards.
#[derive(Debug)]
struct Built {
    /// dv_new's lock (SENT) and reset (PENDING), oldest first.
    dv_new_queue: Vec<String>,
    reset_id: String,
    /// dv_b's: SUCCEEDED, CANCELED (by an admin), CANCELED (superseded),
    /// PENDING.
    succeeded: String,
    canceled: String,
    superseded: String,
    dv_b_pending: String,
    unenroll: String,
    lockout_alert: Alert,
    delivered: Notification,
    audit: Vec<AuditEntry>,
}

/// Two sites (one with a webhook), users, passcodes, devices (one
/// replaced, one unenrolled), commands in every state a queue goes
/// through, a reset with its emails and latest reset, audit entries, a
/// lockout with its alert and email, and notifications delivered and failed.
async fn build(store: &dyn Store) -> Built {
    let now = now_millis();
    let st_a = site("st_a");
    let mut st_b = site("st_b");
    st_b.failed_attempt_limit = 2;
    assert!(store.insert_site(&st_a).await.unwrap());
    assert!(store.insert_site(&st_b).await.unwrap());
    // As the server sets one: sites are created without. (sled's
    // `insert_site` does not note a webhook the new site has.)
    store
        .update_site(
            "st_a",
            Box::new(|site| {
                site.webhook = Some(Webhook {
                    url: "https://hooks.example/mdm".into(),
                    secret_sealed: "sealed-secret".into(),
                });
                true
            }),
        )
        .await
        .unwrap();

    let users_a = [
        user("st_a", "ann@example.com"),
        user("st_a", "both@example.com"),
        user("st_a", "cid@example.com"),
    ];
    assert_eq!(
        store.insert_users("st_a", &users_a, 100).await.unwrap(),
        UsersInserted::Inserted { existing: vec![] }
    );
    assert_eq!(
        store
            .insert_users("st_b", &[user("st_b", "both@example.com")], 100)
            .await
            .unwrap(),
        UsersInserted::Inserted { existing: vec![] }
    );
    store
        .replace_passcode(&passcode("st_a", &HASH_A))
        .await
        .unwrap();
    store
        .replace_passcode(&passcode("st_b", &HASH_B))
        .await
        .unwrap();

    // dv_old is replaced by dv_new (the same machine, proven); dv_gone is
    // unenrolled; dv_b is st_b's.
    let mut dv_old = device("st_a", "dv_old", "SER-1");
    assert_eq!(
        store.enroll_device(&mut dv_old, None).await.unwrap(),
        Enrolled::New
    );
    let mut dv_new = device("st_a", "dv_new", "SER-1");
    dv_new.user_email = "ann@example.com".into();
    dv_new.facts.platform = Platform::MacOs;
    assert_eq!(
        store
            .enroll_device(&mut dv_new, Some("dv_old"))
            .await
            .unwrap(),
        Enrolled::Replacing("dv_old".into())
    );
    let mut dv_gone = device("st_a", "dv_gone", "SER-2");
    store.enroll_device(&mut dv_gone, None).await.unwrap();
    let mut dv_b = device("st_b", "dv_b", "SER-3");
    store.enroll_device(&mut dv_b, None).await.unwrap();

    let gone = store
        .update_device(
            "dv_gone",
            Box::new(|d| {
                d.status = DeviceStatus::Unenrolled;
                true
            }),
        )
        .await
        .unwrap()
        .unwrap();
    let mut unenroll = Action::pending(
        store.new_action_id("st_a"),
        &gone,
        ActionType::Unenroll,
        ADMIN,
        "certificate revoked",
        now,
    );
    unenroll.advance(ActionStatus::Succeeded, "the agent is offline", now);
    store.record_action(&unenroll).await.unwrap();

    // dv_new: a lock that went out (SENT) and a reset waiting behind it,
    // with its emails and the device's latest reset.
    let lock = queue(store, command(store, &dv_new, ActionType::Lock, now), false).await;
    let sent = store
        .mark_sent(
            "dv_new",
            std::slice::from_ref(&lock.action.action_id),
            now + 1,
        )
        .await
        .unwrap();
    assert!(matches!(sent.as_slice(), [Delivery::First(_)]));
    let reset = command(store, &dv_new, ActionType::ResetPasscode, now + 2);
    let reset_id = reset.action_id.clone();
    let emails: Vec<Notification> = ["ann@example.com", ADMIN]
        .into_iter()
        .map(|to| {
            let body = format!("The new passcode of your Mac is {PASSCODE_PLACEHOLDER}.");
            let mut email = Notification::pending(
                "st_a",
                "email",
                to.into(),
                "Your passcode was reset".into(),
                body.clone(),
                now + 2,
            );
            email.passcode_of_action = Some(reset_id.clone());
            email.passcode_at = body.find(PASSCODE_PLACEHOLDER);
            email
        })
        .collect();
    let queued = store
        .queue_command(NewCommand {
            action: reset,
            online: false,
            notifications: emails,
            latest_reset: Some(LatestReset {
                passcode_sealed: "sealed-passcode".into(),
                reset_at: now + 2,
                reset_by: ADMIN.into(),
                action_id: reset_id.clone(),
            }),
        })
        .await
        .unwrap();
    assert!(queued.superseded.is_empty() && !queued.direct);

    // dv_b: one lock done, one canceled by an admin, one superseded by the
    // next, which waits.
    let done = queue(store, command(store, &dv_b, ActionType::Lock, now), true).await;
    assert!(done.direct);
    let reported = store
        .apply_reports(
            "dv_b",
            &done.action.action_id,
            &[
                AgentReport::Acknowledged,
                AgentReport::Progress("locking".into()),
                AgentReport::Succeeded("locked".into()),
            ],
            now + 3,
        )
        .await
        .unwrap();
    assert!(matches!(reported, Reported::Applied(steps) if steps.len() == 3));
    let canceled = queue(store, command(store, &dv_b, ActionType::Lock, now), false).await;
    assert!(matches!(
        store
            .cancel_action(&canceled.action.action_id, ADMIN, now + 4)
            .await
            .unwrap(),
        Canceled::Done(_)
    ));
    let superseded = queue(store, command(store, &dv_b, ActionType::Lock, now), false).await;
    let pending = queue(store, command(store, &dv_b, ActionType::Lock, now), false).await;
    assert_eq!(pending.superseded.len(), 1);

    let audit: Vec<AuditEntry> = (0..2)
        .map(|i| AuditEntry {
            at: now + i,
            who: ADMIN.into(),
            what: format!("looked at the device ({i})"),
        })
        .collect();
    for entry in &audit {
        store.append_audit("dv_new", entry).await.unwrap();
    }
    store
        .append_audit(
            "dv_b",
            &AuditEntry {
                at: now,
                who: ADMIN.into(),
                what: "enrolled".into(),
            },
        )
        .await
        .unwrap();

    // Two wrong passcodes lock st_b's out: the alert and its email.
    let attempts: Vec<FailedAttemptEntry> = (0..2)
        .map(|i| FailedAttemptEntry {
            site: st_b.clone(),
            source: format!("192.0.2.{i}"),
            at: now + i,
        })
        .collect();
    let lockout = |site: &mdm_core::model::Site,
                   record: &mdm_core::model::CompanyPasscodeRecord| {
        let alert = Alert {
            alert_id: time_ordered_id(),
            site_id: site.site_id.clone(),
            kind: AlertKind::CompanyPasscodeLockedOut,
            created_at: now,
            details: "the company passcode is locked out".into(),
            failed_attempts: record.failed_attempts,
            source_addresses: record.failed_sources.clone(),
        };
        let email = notification(&site.site_id, "Company passcode locked out");
        (alert, vec![email])
    };
    let outcomes = store
        .record_failed_attempts(&attempts, &lockout)
        .await
        .unwrap();
    let FailedAttempt::LockedOut(lockout_alert) = &outcomes[1] else {
        panic!("not locked out: {outcomes:?}");
    };
    // A duplicate serial alert posted to st_a's webhook.
    let duplicate = Alert {
        alert_id: time_ordered_id(),
        site_id: "st_a".into(),
        kind: AlertKind::DuplicateDeviceSerial,
        created_at: now,
        details: "two active devices claim SER-9".into(),
        failed_attempts: 0,
        source_addresses: Vec::new(),
    };
    let mut hook = notification("st_a", "duplicate serial");
    hook.channel = "webhook".into();
    store.put_alert(&duplicate, &[hook]).await.unwrap();

    let mut delivered = notification("st_a", "Welcome");
    delivered.state = NotificationState::Delivered;
    delivered.attempts = 1;
    delivered.delivered_at = Some(now);
    store.put_notification(&delivered).await.unwrap();
    let mut failed = notification("st_b", "Bounced");
    failed.state = NotificationState::Failed;
    failed.attempts = 7;
    failed.last_error = "550 no such mailbox".into();
    store.put_notification(&failed).await.unwrap();

    Built {
        dv_new_queue: vec![lock.action.action_id, reset_id.clone()],
        reset_id,
        succeeded: done.action.action_id,
        canceled: canceled.action.action_id,
        superseded: superseded.action.action_id,
        dv_b_pending: pending.action.action_id,
        unenroll: unenroll.action_id,
        lockout_alert: (**lockout_alert).clone(),
        delivered,
        audit,
    }
}

const EXPECTED: SnapshotCounts = SnapshotCounts {
    sites: 2,
    users: 4,
    passcodes: 2,
    devices: 4,
    // dv_gone's unenroll, dv_new's lock and reset, dv_b's four locks.
    actions: 7,
    audit_entries: 3,
    alerts: 2,
    // Two reset emails, the lockout email, the webhook post, delivered, failed.
    notifications: 6,
};

/// Every answer the store gives about the deployment, through the
/// contract: each question (named) and its answer.
#[derive(Debug, Default)]
struct Observed(Vec<(String, String)>);

impl Observed {
    fn note(&mut self, question: impl Into<String>, answer: impl Debug) {
        self.0.push((question.into(), format!("{answer:#?}")));
    }

    fn assert_same(&self, other: &Observed) {
        for (mine, theirs) in self.0.iter().zip(&other.0) {
            assert_eq!(mine.0, theirs.0, "the questions differ");
            assert_eq!(mine.1, theirs.1, "{} differs", mine.0);
        }
        assert_eq!(self.0.len(), other.0.len(), "as many answers");
    }
}

/// Pages through a list two items at a time (tokens are a backend's own).
macro_rules! all {
    ($store:expr, |$page:ident| $list:expr) => {{
        let mut items = Vec::new();
        let mut token = String::new();
        loop {
            let $page = PageRequest {
                token: &token,
                limit: 2,
            };
            let page = $list.await.unwrap();
            items.extend(page.items);
            if page.next_page_token.is_empty() {
                break items;
            }
            token = page.next_page_token;
        }
    }};
}

const KINDS: [ActionType; 3] = [
    ActionType::Lock,
    ActionType::ResetPasscode,
    ActionType::Unenroll,
];
const STATUSES: [ActionStatus; 8] = [
    ActionStatus::Pending,
    ActionStatus::Sent,
    ActionStatus::Acknowledged,
    ActionStatus::InProgress,
    ActionStatus::Succeeded,
    ActionStatus::Failed,
    ActionStatus::Expired,
    ActionStatus::Canceled,
];

async fn observe(store: &dyn Store) -> Observed {
    let mut seen = Observed::default();
    let sites = all!(store, |p| store.list_sites(&SiteFilter::default(), p));
    seen.note("list_sites", &sites);
    let only_b = SiteFilter {
        only: Some(vec!["st_b".into()]),
    };
    seen.note(
        "list_sites only st_b",
        all!(store, |p| store.list_sites(&only_b, p)),
    );
    let mut devices = Vec::new();
    let mut actions = Vec::new();
    for site in ["st_a", "st_b", "st_none"] {
        seen.note(
            format!("get_site {site}"),
            store.get_site(site).await.unwrap(),
        );
        seen.note(
            format!("site_has_webhook {site}"),
            store.site_has_webhook(site).await.unwrap(),
        );
        seen.note(
            format!("get_passcode {site}"),
            store.get_passcode(site).await.unwrap(),
        );
        let users = all!(store, |p| store.list_users(site, p));
        seen.note(format!("list_users {site}"), &users);
        for user in &users {
            seen.note(
                format!("get_user {site} {}", user.email),
                store.get_user(site, &user.email).await.unwrap(),
            );
            seen.note(
                format!("get_user_by_id {}", user.user_id),
                store.get_user_by_id(&user.user_id).await.unwrap(),
            );
            seen.note(
                format!("sites_of_email {}", user.email),
                store.sites_of_email(&user.email).await.unwrap(),
            );
        }
        let filters = [
            DeviceFilter::default(),
            DeviceFilter {
                status: Some(DeviceStatus::Active),
                ..DeviceFilter::default()
            },
            DeviceFilter {
                status: Some(DeviceStatus::Replaced),
                ..DeviceFilter::default()
            },
            DeviceFilter {
                status: Some(DeviceStatus::Unenrolled),
                ..DeviceFilter::default()
            },
            DeviceFilter {
                platform: Some(Platform::MacOs),
                ..DeviceFilter::default()
            },
            DeviceFilter {
                user_email: "ann@example.com".into(),
                ..DeviceFilter::default()
            },
        ];
        for filter in &filters {
            let listed = all!(store, |p| store.list_devices(site, filter, p));
            seen.note(format!("list_devices {site} {filter:?}"), &listed);
            if filter.status.is_none() && filter.platform.is_none() && filter.user_email.is_empty()
            {
                devices.extend(listed);
            }
        }
        let mut filters = vec![ActionFilter::site(site)];
        for kind in KINDS {
            let mut filter = ActionFilter::site(site);
            filter.action_type = Some(kind);
            filters.push(filter);
        }
        for status in STATUSES {
            let mut filter = ActionFilter::site(site);
            filter.status = Some(status);
            filters.push(filter);
        }
        let mut by_admin = ActionFilter::site(site);
        by_admin.created_by = ADMIN.into();
        filters.push(by_admin);
        for filter in &filters {
            let listed = all!(store, |p| store.list_actions(filter, p));
            seen.note(format!("list_actions {filter:?}"), &listed);
            if filter.action_type.is_none()
                && filter.status.is_none()
                && filter.created_by.is_empty()
            {
                actions.extend(listed);
            }
        }
        seen.note(
            format!("list_alerts {site}"),
            all!(store, |p| store.list_alerts(site, p)),
        );
        seen.note(
            format!("list_notifications {site}"),
            all!(store, |p| store.list_notifications(Some(site), None, p)),
        );
    }
    for hash in [&HASH_A[..], &HASH_B[..], &[0; 32][..]] {
        seen.note(
            format!("site_for_passcode_hash {}", hex::encode(hash)),
            store.site_for_passcode_hash(hash).await.unwrap(),
        );
    }
    for device in &devices {
        let id = &device.device_id;
        seen.note(
            format!("get_device {id}"),
            store.get_device(id).await.unwrap(),
        );
        seen.note(
            format!("list_audit {id}"),
            store.list_audit(id, 100).await.unwrap(),
        );
        seen.note(
            format!("list_audit {id} 1"),
            store.list_audit(id, 1).await.unwrap(),
        );
        seen.note(
            format!("queued_actions {id}"),
            store.queued_actions(id).await.unwrap(),
        );
        let mut filter = ActionFilter::site(&device.site_id);
        filter.device_id = Some(id.clone());
        seen.note(
            format!("list_actions of {id}"),
            all!(store, |p| store.list_actions(&filter, p)),
        );
        for kind in KINDS {
            for status in STATUSES {
                seen.note(
                    format!("device_has_action {id} {kind:?} {status:?}"),
                    store.device_has_action(id, &[kind], status).await.unwrap(),
                );
            }
        }
    }
    seen.note(
        "get_device dv_none",
        store.get_device("dv_none").await.unwrap(),
    );
    for action in &actions {
        seen.note(
            format!("get_action {}", action.action_id),
            store.get_action(&action.action_id).await.unwrap(),
        );
    }
    seen.note(
        "get_action of no action",
        store
            .get_action(&uuid::Uuid::now_v7().to_string())
            .await
            .unwrap(),
    );
    seen.note(
        "pending_notifications",
        store.pending_notifications().await.unwrap(),
    );
    seen.note(
        "list_notifications",
        all!(store, |p| store.list_notifications(None, None, p)),
    );
    for state in [
        NotificationState::Pending,
        NotificationState::Delivered,
        NotificationState::Failed,
    ] {
        seen.note(
            format!("list_notifications {state:?}"),
            all!(store, |p| store.list_notifications(None, Some(state), p)),
        );
    }
    seen
}

/// The URL of `db` with a password in it: its own, or (for a server that
/// trusts local connections) one it ignores. Returns the URL and password.
fn with_password(db: &TestDb) -> (String, String) {
    let url = &db.url;
    let authority = url.find("://").unwrap() + 3;
    let rest = &url[authority..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    if let Some(at) = rest[..end].rfind('@')
        && let Some(colon) = rest[..at].find(':')
    {
        return (url.clone(), rest[colon + 1..at].to_owned());
    }
    let password = "not-the-password-7f3a9c".to_owned();
    let with = match rest[..end].rfind('@') {
        Some(at) => format!(
            "{}{}:{password}{}",
            &url[..authority],
            &rest[..at],
            &rest[at..]
        ),
        None => format!("{}mdm:{password}@{rest}", &url[..authority]),
    };
    (with, password)
}

fn assert_hides(error: &MigrateError, password: &str) {
    for shown in [error.to_string(), format!("{error:?}")] {
        assert!(!shown.contains(password), "{shown}");
    }
}

/// The tables of the database (none before a store connected to it).
async fn tables(db: &TestDb) -> Vec<String> {
    db.raw()
        .await
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()
             ORDER BY tablename",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_deployment_reads_back_the_same_from_postgres_and_a_second_copy_is_refused() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("data");
    let sled = sled_deployment(&root);
    let built = build(&*sled).await;
    let before = observe(&*sled).await;
    sled.close().await.unwrap();
    drop(sled);

    let (url, password) = with_password(&db);
    let report: MigrationReport = migrate(&root, PgConfig::new(url.clone())).await.unwrap();
    assert_eq!(report.counts, EXPECTED, "{report}");
    let shown = report.to_string();
    assert!(shown.starts_with("copied 2 sites, 4 users"), "{shown}");
    assert!(!shown.contains(&password), "{shown}");
    assert!(report.seconds() > 0.0);

    let pg: Arc<dyn Store> = Arc::new(db.store().await);
    let after = observe(&*pg).await;
    before.assert_same(&after);

    // Not the same because both are empty: what was built is there.
    assert!(pg.site_has_webhook("st_a").await.unwrap());
    assert!(!pg.site_has_webhook("st_b").await.unwrap());
    assert_eq!(
        pg.site_for_passcode_hash(&HASH_A).await.unwrap().as_deref(),
        Some("st_a")
    );
    let locked = pg.get_passcode("st_b").await.unwrap().unwrap();
    assert_eq!(locked.state, PasscodeState::LockedOut);
    assert!(locked.pending_lockout.is_none());
    let old = pg.get_device("dv_old").await.unwrap().unwrap();
    assert_eq!(old.status, DeviceStatus::Replaced);
    assert_eq!(old.replaced_by_device_id.as_deref(), Some("dv_new"));
    assert_eq!(
        pg.get_device("dv_gone").await.unwrap().unwrap().status,
        DeviceStatus::Unenrolled
    );
    let dv_new = pg.get_device("dv_new").await.unwrap().unwrap();
    assert_eq!(
        dv_new
            .security
            .latest_reset
            .as_ref()
            .map(|r| r.action_id.clone()),
        Some(built.reset_id.clone())
    );
    let waiting: Vec<(String, ActionStatus)> = pg
        .queued_actions("dv_new")
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.action_id, a.status))
        .collect();
    assert_eq!(
        waiting,
        vec![
            (built.dv_new_queue[0].clone(), ActionStatus::Sent),
            (built.dv_new_queue[1].clone(), ActionStatus::Pending),
        ]
    );
    let statuses = |id: &str| {
        let pg = pg.clone();
        let id = id.to_owned();
        async move { pg.get_action(&id).await.unwrap().unwrap().status }
    };
    assert_eq!(statuses(&built.succeeded).await, ActionStatus::Succeeded);
    assert_eq!(statuses(&built.canceled).await, ActionStatus::Canceled);
    assert_eq!(statuses(&built.superseded).await, ActionStatus::Canceled);
    assert_eq!(statuses(&built.unenroll).await, ActionStatus::Succeeded);
    let succeeded = pg.get_action(&built.succeeded).await.unwrap().unwrap();
    assert_eq!(succeeded.timeline.len(), 5, "{succeeded:?}");
    assert!(
        pg.device_has_action("dv_b", &[ActionType::Lock], ActionStatus::Succeeded)
            .await
            .unwrap()
    );
    let audit: Vec<AuditEntry> = built.audit.iter().rev().cloned().collect();
    assert_eq!(pg.list_audit("dv_new", 10).await.unwrap(), audit);
    let pending = pg.pending_notifications().await.unwrap();
    assert_eq!(pending.len(), 4, "{pending:#?}");
    assert_eq!(
        pending
            .iter()
            .filter(|n| n.passcode_of_action.as_deref() == Some(&built.reset_id))
            .count(),
        2
    );
    let delivered = pg
        .list_notifications(
            None,
            Some(NotificationState::Delivered),
            PageRequest {
                token: "",
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(delivered.items, vec![built.delivered.clone()]);
    let alerts = pg
        .list_alerts(
            "st_b",
            PageRequest {
                token: "",
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(alerts.items, vec![built.lockout_alert.clone()]);

    // A second copy into the same database is refused, changing nothing.
    let again = migrate(&root, PgConfig::new(url)).await.unwrap_err();
    assert!(
        matches!(again, MigrateError::TargetNotEmpty { .. }),
        "{again:?}"
    );
    assert!(again.to_string().contains("not empty"), "{again}");
    assert_hides(&again, &password);
    before.assert_same(&observe(&*pg).await);

    // The copy is a working store: ids made by sled go on with its own.
    let mut dv_b = (*pg.get_device("dv_b").await.unwrap().unwrap()).clone();
    dv_b.last_seen = Some(now_millis());
    let reset = command(&*pg, &dv_b, ActionType::ResetPasscode, now_millis());
    let queued = queue(&*pg, reset, false).await;
    assert_eq!(
        queued
            .superseded
            .iter()
            .map(|a| a.action_id.clone())
            .collect::<Vec<_>>(),
        vec![built.dv_b_pending.clone()],
        "the migrated PENDING lock is superseded by the new reset"
    );
    let sent = pg
        .mark_sent(
            "dv_new",
            std::slice::from_ref(&built.reset_id),
            now_millis(),
        )
        .await
        .unwrap();
    assert!(matches!(sent.as_slice(), [Delivery::First(_)]));
    // The migrated commands expire (their expiry column is filled).
    let expired = pg.expire_due(now_millis() + 7_200_000).await.unwrap();
    let mut expired: Vec<String> = expired.into_iter().map(|a| a.action_id).collect();
    expired.sort();
    let mut expected = vec![
        built.dv_new_queue[0].clone(),
        built.reset_id.clone(),
        queued.action.action_id.clone(),
    ];
    expected.sort();
    assert_eq!(expired, expected);
    pg.close().await.unwrap();
}

#[tokio::test]
async fn a_directory_that_is_not_a_data_dir_is_refused_before_the_database_is_touched() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let empty = temp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let foreign = temp.path().join("foreign");
    std::fs::create_dir_all(foreign.join("db")).unwrap();
    std::fs::write(foreign.join("notes.txt"), "not ours").unwrap();
    let file = temp.path().join("file");
    std::fs::write(&file, "a file").unwrap();
    let missing = temp.path().join("missing");
    let (url, password) = with_password(&db);
    for (dir, reason) in [
        (&empty, "db is missing"),
        (&foreign, "pki/ca.crt is missing"),
        (&file, "not a directory"),
        (&missing, "does not exist"),
    ] {
        let error = migrate(dir, PgConfig::new(url.clone())).await.unwrap_err();
        assert!(
            matches!(&error, MigrateError::NotADataDir { path, .. } if path == dir),
            "{error:?}"
        );
        let shown = error.to_string();
        assert!(shown.contains("is not an mdm-server data dir"), "{shown}");
        assert!(shown.contains(reason), "{shown}");
        assert_hides(&error, &password);
    }
    assert!(!missing.exists(), "nothing was created");
    assert_eq!(
        tables(&db).await,
        Vec::<String>::new(),
        "nothing was created"
    );
    // A data dir a server holds is refused too (sled's lock), also untouched.
    let root = temp.path().join("data");
    let running = sled_deployment(&root);
    let error = migrate(&root, PgConfig::new(url)).await.unwrap_err();
    assert!(matches!(&error, MigrateError::Source { .. }), "{error:?}");
    assert!(
        error.to_string().contains("in use by another process"),
        "{error}"
    );
    assert_eq!(tables(&db).await, Vec::<String>::new());
    drop(running);
}

#[tokio::test]
async fn no_error_shows_the_password() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("data");
    drop(sled_deployment(&root));
    let password = "hunter2-secret";
    let unreachable = PgConfig::new(format!("postgres://mdm:{password}@127.0.0.1:1/mdm"));
    let error = migrate(&root, unreachable).await.unwrap_err();
    assert!(matches!(error, MigrateError::Connect(_)), "{error:?}");
    assert_hides(&error, password);
    let bad = PgConfig::new(format!("postgres://mdm:{password}@127.0.0.1:notaport/mdm"));
    let error = migrate(&root, bad).await.unwrap_err();
    assert_hides(&error, password);
    let mut apart = PgConfig::new("postgres://mdm@127.0.0.1:1/mdm");
    apart.password = Some(zeroize::Zeroizing::new(password.into()));
    let error = migrate(&root, apart).await.unwrap_err();
    assert_hides(&error, password);
}

/// Times a migration of 10,000 devices and 100,000 actions (with their
/// timelines) end to end; `--ignored --nocapture` prints it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a timing: about 25 s in a debug build"]
async fn a_large_deployment_migrates_in_seconds() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("data");
    mdm_server::datadir::initialize(&root, "owner@example.com").unwrap();
    let storage = Storage::open(&mdm_server::datadir::DataDir::new(&root).db()).unwrap();
    let built = std::time::Instant::now();
    let now = now_millis();
    for s in 0..10 {
        let site_id = format!("st_{s:02}");
        storage.insert_site(&site(&site_id)).unwrap();
        for d in 0..1000 {
            let mut device = device(&site_id, &format!("dv_{s:02}_{d:04}"), &format!("S{s}-{d}"));
            storage.enroll_device(&mut device, None).unwrap();
            for a in 0..10 {
                let mut action = command(&storage, &device, ActionType::Lock, now);
                if a < 8 {
                    action.advance(ActionStatus::Sent, "sent", now + 1);
                    action.advance(ActionStatus::Succeeded, "locked", now + 2);
                }
                storage.put_action(&action).unwrap();
            }
        }
    }
    storage.flush().unwrap();
    drop(storage);
    eprintln!("built in {:.1} s", built.elapsed().as_secs_f64());
    let report = migrate(&root, PgConfig::new(db.url.clone())).await.unwrap();
    eprintln!("{report}");
    assert_eq!(report.counts.devices, 10_000);
    assert_eq!(report.counts.actions, 100_000);
}
