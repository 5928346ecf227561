//! The sites' webhooks as the domain uses them: setting one (a new signing
//! secret, sealed) and queueing an action's changes for it. Checking a URL's
//! destination and posting are the server's (they need DNS and HTTP).

use zeroize::Zeroizing;

use super::Domain;
use super::webhook_events::{action_event, notification, secret_context};
use crate::error::Result;
use crate::model::{Action, Webhook};

impl Domain {
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

    /// Sets the site's webhook to `url`, which the edge has checked, or
    /// with `None` removes it; returns the new signing secret.
    pub async fn set_webhook(
        &self,
        site_id: &str,
        url: Option<&str>,
    ) -> Result<Option<Zeroizing<String>>> {
        self.site(site_id).await?;
        let (webhook, secret) = match url {
            None => (None, None),
            Some(url) => {
                let secret = Zeroizing::new(hex::encode(crate::crypto::os_random::<32>()));
                let webhook = Webhook {
                    url: url.to_owned(),
                    secret_sealed: self.secrets.seal(&secret, &secret_context(site_id)),
                };
                (Some(webhook), Some(secret))
            }
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
}
