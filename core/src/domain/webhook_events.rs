//! What a site's webhook is sent: the JSON events (alerts, action changes)
//! as outbox notifications, and which sites have a webhook at all.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::{Action, Alert, Notification, Webhook, now_millis, time_ordered_id};

/// The context a site's webhook secret is sealed under.
pub fn secret_context(site_id: &str) -> String {
    format!("webhook:{site_id}")
}

fn event(kind: &str, site_id: &str, data: serde_json::Value) -> String {
    serde_json::json!({
        "id": time_ordered_id(),
        "type": kind,
        "site_id": site_id,
        "created_at": now_millis(),
        "data": data,
    })
    .to_string()
}

pub(crate) fn alert_event(alert: &Alert) -> String {
    event(
        "alert",
        &alert.site_id,
        serde_json::json!({
            "alert_id": alert.alert_id,
            "kind": format!("{:?}", alert.kind),
            "details": alert.details,
            "failed_attempts": alert.failed_attempts,
            "source_addresses": alert.source_addresses,
        }),
    )
}

pub(crate) fn action_event(action: &Action) -> String {
    event(
        "action",
        &action.site_id,
        serde_json::json!({
            "action_id": action.action_id,
            "device_id": action.device_id,
            "type": format!("{:?}", action.action_type),
            "status": format!("{:?}", action.status),
            "created_by": action.created_by,
            "failure_reason": action.failure_reason,
        }),
    )
}

pub(crate) fn notification(
    site_id: &str,
    webhook: &Webhook,
    body: String,
    subject: &str,
) -> Notification {
    Notification::pending(
        site_id,
        "webhook",
        webhook.url.clone(),
        subject.to_owned(),
        body,
        now_millis(),
    )
}

/// How long a site's having a webhook or not is remembered. Each action
/// change asks; on a database that is a round trip per status. A webhook
/// set or removed on this server counts at once, one set through another
/// server sharing the database within this long.
const WEBHOOK_PRESENCE_TTL: Duration = Duration::from_secs(1);

/// Sites remembered at most; beyond, the expired ones are dropped first.
const WEBHOOK_PRESENCE_SITES: usize = 10_000;

/// Which sites have a webhook, as last read from the store.
#[derive(Debug, Default)]
pub(crate) struct WebhookPresence {
    sites: Mutex<HashMap<String, (bool, Instant)>>,
}

impl WebhookPresence {
    pub(crate) fn known(&self, site_id: &str) -> Option<bool> {
        let sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        sites
            .get(site_id)
            .filter(|(_, at)| at.elapsed() < WEBHOOK_PRESENCE_TTL)
            .map(|(has, _)| *has)
    }

    pub(crate) fn remember(&self, site_id: &str, has: bool) {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        if sites.len() >= WEBHOOK_PRESENCE_SITES {
            sites.retain(|_, (_, at)| at.elapsed() < WEBHOOK_PRESENCE_TTL);
            if sites.len() >= WEBHOOK_PRESENCE_SITES {
                sites.clear();
            }
        }
        sites.insert(site_id.to_owned(), (has, Instant::now()));
    }

    pub(crate) fn forget(&self, site_id: &str) {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        sites.remove(site_id);
    }
}
