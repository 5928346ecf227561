//! The sites' webhooks as the domain uses them: setting one (a new signing
//! secret, sealed), queueing an action's changes for it, and posting a
//! queued event. The wire format and the HTTP client are `webhook`'s.

use zeroize::Zeroizing;

use crate::app::App;
use crate::destination::Unreachable;
use crate::error::Result;
use crate::model::{Action, Notification, Webhook, now_millis};
use crate::webhook::{action_event, notification, post, signature, validate_url};

impl App {
    async fn site_has_webhook(&self, site_id: &str) -> bool {
        if let Some(has) = self.webhook_presence.known(site_id) {
            return has;
        }
        match self.store.site_has_webhook(site_id).await {
            Ok(has) => {
                self.webhook_presence.remember(site_id, has);
                has
            }
            Err(_) => false,
        }
    }

    /// Sets (or with an empty url removes) the site's webhook; returns the
    /// new signing secret.
    pub async fn set_webhook(&self, site_id: &str, url: &str) -> Result<Option<Zeroizing<String>>> {
        self.site(site_id).await?;
        let (webhook, secret) = if url.trim().is_empty() {
            (None, None)
        } else {
            validate_url(url.trim(), &self.webhook_policy)?;
            let secret = Zeroizing::new(hex::encode(crate::crypto::os_random::<32>()));
            let webhook = Webhook {
                url: url.trim().to_owned(),
                secret_sealed: self.secrets.seal(&secret, &format!("webhook:{site_id}")),
            };
            (Some(webhook), Some(secret))
        };
        self.change_site(
            site_id,
            Box::new(move |site| {
                site.webhook = webhook;
                true
            }),
        )
        .await?;
        self.webhook_presence.forget(site_id);
        Ok(secret)
    }

    /// Queues an action's change for the site's webhook, if it has one.
    pub(crate) async fn queue_action_webhook(&self, action: &Action) {
        if !self.site_has_webhook(&action.site_id).await {
            return;
        }
        let Ok(Some(site)) = self.store.get_site(&action.site_id).await else {
            return;
        };
        let Some(webhook) = &site.webhook else {
            return;
        };
        let n = notification(
            &site.site_id,
            webhook,
            action_event(action),
            &format!("action {:?}", action.status),
        );
        if let Err(error) = self.store.put_notification(&n).await {
            tracing::error!(%error, "cannot queue a webhook event");
        }
        self.wake_outbox();
    }

    /// Posts one webhook notification. Every failure to reach the receiver
    /// is reported with one generic reason (details go to the log), so the
    /// error an admin sees cannot tell open ports from closed ones.
    pub(crate) async fn post_webhook(&self, n: &Notification) -> std::result::Result<(), String> {
        let site = self.site(&n.site_id).await.map_err(|e| e.to_string())?;
        let webhook = site.webhook.ok_or("the site no longer has a webhook")?;
        let secret = self
            .secrets
            .open(&webhook.secret_sealed, &format!("webhook:{}", site.site_id))
            .ok_or("the webhook secret cannot be unsealed")?;
        let body = n.body_text.clone().into_bytes();
        let signature = signature(&secret, now_millis() / 1000, &body);
        let uri = validate_url(&n.recipient, &self.webhook_policy).map_err(|e| e.to_string())?;
        match post(&self.webhook_policy, uri, body, signature).await {
            Ok(status) if status.is_success() => Ok(()),
            Ok(status) if status.is_redirection() => Err(format!(
                "the webhook receiver answered {status}; redirects are not followed"
            )),
            Ok(status) => Err(format!("the webhook receiver answered {status}")),
            Err(error) => {
                tracing::warn!(
                    notification_id = %n.notification_id,
                    site_id = %n.site_id,
                    %error,
                    "webhook receiver not reached"
                );
                Err(Unreachable::GENERIC.to_owned())
            }
        }
    }
}
