//! Who hears about a security alert: every live admin of its site by email,
//! and the site's webhook.

use crate::admins::AdminRegistry;
use crate::model::{Alert, Notification, Site};

/// The notifications an alert sends, queued with it in one write.
pub(crate) fn notifications(
    registry: &AdminRegistry,
    site: &Site,
    alert: &Alert,
    subject: &str,
) -> Vec<Notification> {
    let mut recipients: Vec<String> =
        match registry.admins_of_site(&site.site_id, alert.created_at / 1000) {
            Ok(admins) => admins.into_iter().map(|a| a.email).collect(),
            Err(error) => {
                tracing::error!(%error, "cannot read the admin registry for alert recipients");
                Vec::new()
            }
        };
    recipients.sort();
    recipients.dedup();
    let webhook = site.webhook.as_ref().map(|webhook| {
        crate::webhook::notification(
            &site.site_id,
            webhook,
            crate::webhook::alert_event(alert),
            "alert",
        )
    });
    recipients
        .into_iter()
        .map(|recipient| {
            Notification::pending(
                &site.site_id,
                "email",
                recipient,
                subject.to_owned(),
                alert.details.clone(),
                alert.created_at,
            )
        })
        .chain(webhook)
        .collect()
}
