//! Records to store and small helpers the cases share.

use mdm_core::model::{
    Action, ActionType, Alert, AlertKind, AuditEntry, CommandPayload, CompanyPasscodeRecord,
    Device, DeviceFacts, DeviceStatus, LatestReset, Notification, PasscodeState, Platform, Site,
    User, now_millis, time_ordered_id,
};
use mdm_core::store::{
    CommandStore, FailedAttemptEntry, NewCommand, PageRequest, StoreError, StoreResult,
};

/// A site with the default limit of 10 wrong passcodes and no webhook.
pub fn site(site_id: &str) -> Site {
    Site {
        site_id: site_id.into(),
        display_name: format!("Site {site_id}"),
        failed_attempt_limit: 10,
        created_at: now_millis(),
        reset_passcode_visible_days: 0,
        passcode_policy: Default::default(),
        webhook: None,
    }
}

/// A user of `site_id` with a fresh id.
pub fn user(site_id: &str, email: &str) -> User {
    User {
        user_id: mdm_core::model::short_id("us"),
        site_id: site_id.into(),
        email: email.into(),
        display_name: email.into(),
        created_at: now_millis(),
    }
}

/// An enabled company passcode of `site_id` whose keyed hash is `hash`.
pub fn passcode(site_id: &str, hash: &[u8]) -> CompanyPasscodeRecord {
    CompanyPasscodeRecord {
        site_id: site_id.into(),
        state: PasscodeState::Enabled,
        hash: hex::encode(hash),
        generated_at: now_millis(),
        generated_by: "admin@example.com".into(),
        failed_attempts: 0,
        last_failed_at: None,
        last_used_at: None,
        enrollments: 0,
        failed_sources: Vec::new(),
        pending_lockout: None,
    }
}

/// An active Linux device of `site_id` with serial number `serial`.
pub fn device(site_id: &str, device_id: &str, serial: &str) -> Device {
    Device {
        device_id: device_id.into(),
        site_id: site_id.into(),
        user_email: "user@example.com".into(),
        facts: DeviceFacts {
            platform: Platform::Linux,
            os_version: "6.1".into(),
            model: "test".into(),
            serial_number: serial.into(),
            hostname: "host".into(),
            agent_version: "0.1.0".into(),
            capabilities: Vec::new(),
        },
        status: DeviceStatus::Active,
        enrolled_at: now_millis(),
        last_seen: None,
        certificates: Vec::new(),
        replaces_device_id: None,
        replaced_by_device_id: None,
        security: Default::default(),
    }
}

/// A PENDING command of `kind` for `device`, with an id the store made,
/// due in an hour.
pub fn command<S: CommandStore + ?Sized>(store: &S, device: &Device, kind: ActionType) -> Action {
    let now = now_millis();
    let mut action = Action::pending(
        store.new_action_id(&device.site_id),
        device,
        kind,
        "admin@example.com",
        "queued",
        now,
    );
    action.expires_at = now + 3_600_000;
    action.payload = Some(match kind {
        ActionType::Lock => CommandPayload::Lock {
            message: "locked".into(),
        },
        ActionType::ResetPasscode => CommandPayload::ResetPasscode {
            passcode_sealed: "sealed".into(),
            message: String::new(),
        },
        ActionType::Unenroll => CommandPayload::Unenroll,
    });
    action
}

/// An action of `kind` on `device` that never goes to it (as an unenroll
/// is recorded), created by `by`.
pub fn final_action<S: CommandStore + ?Sized>(
    store: &S,
    device: &Device,
    kind: ActionType,
    by: &str,
) -> Action {
    let mut action = command(store, device, kind);
    action.payload = None;
    action.expires_at = 0;
    action.created_by = by.into();
    action
}

/// `action` to queue, with no emails and no latest reset.
pub fn new_command(action: Action, online: bool) -> NewCommand {
    NewCommand {
        action,
        online,
        notifications: Vec::new(),
        latest_reset: None,
    }
}

/// The latest reset a reset command `action_id` sets.
pub fn latest_reset(action_id: &str) -> LatestReset {
    LatestReset {
        passcode_sealed: "sealed".into(),
        reset_at: now_millis(),
        reset_by: "admin@example.com".into(),
        action_id: action_id.into(),
    }
}

/// A pending email of `site_id` (ids are time-ordered: later ones sort after).
pub fn notification(site_id: &str, subject: &str) -> Notification {
    Notification::pending(
        site_id,
        "email",
        "admin@example.com".into(),
        subject.into(),
        "body".into(),
        now_millis(),
    )
}

/// An alert of `site_id` (ids are time-ordered: later ones sort after).
pub fn alert(site_id: &str, details: &str) -> Alert {
    Alert {
        alert_id: time_ordered_id(),
        site_id: site_id.into(),
        kind: AlertKind::DuplicateDeviceSerial,
        created_at: now_millis(),
        details: details.into(),
        failed_attempts: 0,
        source_addresses: Vec::new(),
    }
}

/// The alert of a lockout and its two emails, as the domain makes them.
pub fn lockout(site: &Site, record: &CompanyPasscodeRecord) -> (Alert, Vec<Notification>) {
    let alert = Alert {
        alert_id: time_ordered_id(),
        site_id: site.site_id.clone(),
        kind: AlertKind::CompanyPasscodeLockedOut,
        created_at: now_millis(),
        details: "locked out".into(),
        failed_attempts: record.failed_attempts,
        source_addresses: record.failed_sources.clone(),
    };
    let notifications = vec![
        notification(&site.site_id, "locked out (1)"),
        notification(&site.site_id, "locked out (2)"),
    ];
    (alert, notifications)
}

/// One wrong passcode against `site` from `source`, now.
pub fn attempt(site: &Site, source: &str) -> FailedAttemptEntry {
    FailedAttemptEntry {
        site: site.clone(),
        source: source.into(),
        at: now_millis(),
    }
}

pub fn audit(what: &str) -> AuditEntry {
    AuditEntry {
        at: now_millis(),
        who: "admin@example.com".into(),
        what: what.into(),
    }
}

/// The first page of a list, `limit` long.
pub fn first(limit: usize) -> PageRequest<'static> {
    PageRequest { token: "", limit }
}

/// The page after `token`, `limit` long.
pub fn next(token: &str, limit: usize) -> PageRequest<'_> {
    PageRequest { token, limit }
}

/// Whether a listing refused its page token.
pub fn is_bad_token<T>(result: StoreResult<T>) -> bool {
    matches!(result, Err(StoreError::BadPageToken))
}

/// Every item of a list, read in pages of `$limit` until the list ends:
/// `all_pages!(2, |page| store.list_sites(&filter, page))`. Each page
/// must hold at most `$limit` items, and only the last an empty token.
#[macro_export]
macro_rules! all_pages {
    ($limit:expr, |$page:ident| $call:expr) => {{
        let limit: usize = $limit;
        let mut items = Vec::new();
        let mut token = String::new();
        let mut pages = 0usize;
        loop {
            let $page = $crate::fixtures::next(&token, limit);
            let page = $call.await.expect("a page of the list");
            pages += 1;
            assert!(
                page.items.len() <= limit,
                "a page of {} items for a limit of {limit}",
                page.items.len()
            );
            assert!(pages <= 10_000, "the list does not end");
            items.extend(page.items);
            if page.next_page_token.is_empty() {
                break items;
            }
            token = page.next_page_token;
        }
    }};
}

/// The ids of `items`, in order.
pub fn ids<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|item| id(item).to_owned()).collect()
}
