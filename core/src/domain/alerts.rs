//! Who hears about a security alert: every live admin of its site by email,
//! and the site's webhook.

use crate::model::{Alert, Notification, Site};

/// Who administers a site: the recipients of its security alerts. The admin
/// registry lives outside the domain (a file beside the data dir today).
pub trait SiteAdmins: Send + Sync + std::fmt::Debug {
    /// Emails of the admins that hold a live credential for `site_id` at
    /// `now` (Unix seconds), owners included.
    fn emails_of_site(&self, site_id: &str, now: i64) -> Result<Vec<String>, String>;
}

/// The notifications an alert sends, queued with it in one write.
pub(crate) fn notifications(
    admins: &dyn SiteAdmins,
    site: &Site,
    alert: &Alert,
    subject: &str,
) -> Vec<Notification> {
    let mut recipients: Vec<String> =
        match admins.emails_of_site(&site.site_id, alert.created_at / 1000) {
            Ok(emails) => emails,
            Err(error) => {
                tracing::error!(%error, "cannot read the admin registry for alert recipients");
                Vec::new()
            }
        };
    recipients.sort();
    recipients.dedup();
    let webhook = site.webhook.as_ref().map(|webhook| {
        super::webhook_events::notification(
            &site.site_id,
            webhook,
            super::webhook_events::alert_event(alert),
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
