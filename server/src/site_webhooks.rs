//! The server's side of site webhooks: checking where a new URL points
//! before the domain stores it, and posting a queued event. The wire format
//! and the HTTP client are `webhook`'s; the events are the domain's.

use zeroize::Zeroizing;

use crate::app::App;
use crate::destination::Unreachable;
use crate::error::Result;
use crate::model::{Notification, now_millis};
use crate::webhook::{post, signature, validate_url};
use mdm_core::domain::webhook_events::secret_context;

impl App {
    /// Sets (or with an empty url removes) the site's webhook; returns the
    /// new signing secret. A site that does not exist is NOT_FOUND before
    /// its URL is judged.
    pub async fn set_site_webhook(
        &self,
        site_id: &str,
        url: &str,
    ) -> Result<Option<Zeroizing<String>>> {
        self.get_site(site_id).await?;
        let url = url.trim();
        if url.is_empty() {
            return self.set_webhook(site_id, None).await;
        }
        validate_url(url, &self.webhook_policy)?;
        self.set_webhook(site_id, Some(url)).await
    }

    /// Posts one webhook notification. Every failure to reach the receiver
    /// is reported with one generic reason (details go to the log), so the
    /// error an admin sees cannot tell open ports from closed ones.
    pub(crate) async fn post_webhook(&self, n: &Notification) -> std::result::Result<(), String> {
        let site = self.get_site(&n.site_id).await.map_err(|e| e.to_string())?;
        let webhook = site.webhook.ok_or("the site no longer has a webhook")?;
        let secret = self
            .secrets()
            .open(&webhook.secret_sealed, &secret_context(&site.site_id))
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
