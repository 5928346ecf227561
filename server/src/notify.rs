//! Delivering the durable outbox: email over SMTP when configured, else
//! `.eml` files under `<data-dir>/outbox/mail/` so nothing is lost on a
//! fresh install. Failed deliveries are retried with exponential backoff
//! until the retry window closes; every attempt's error stays visible in
//! `ListNotifications`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::{Notify, watch};
use zeroize::Zeroizing;

use crate::app::App;
use crate::model::{Millis, Notification, NotificationState, now_millis};

/// How the server talks to its mail relay.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<Zeroizing<String>>,
    pub from: String,
    /// PEM CA certificate to trust for the relay, besides the public roots.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP: only for a relay on this machine.
    None,
    /// Upgrade with STARTTLS (required).
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

/// Retry schedule of the outbox.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Wait before the first retry; doubles after each failure.
    pub first: Duration,
    /// Longest wait between two attempts.
    pub max: Duration,
    /// After this long a notification is given up as failed.
    pub window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(5),
            max: Duration::from_secs(600),
            window: Duration::from_secs(24 * 3600),
        }
    }
}

enum Sink {
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
    },
    Files {
        dir: PathBuf,
        from: Mailbox,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("smtp: {0}")]
    Config(String),
}

fn millis(duration: Duration) -> Millis {
    Millis::try_from(duration.as_millis()).unwrap_or(Millis::MAX)
}

/// Checks the SMTP settings and builds the sink; an invalid setting stops
/// the server from starting.
fn sink(smtp: Option<&SmtpConfig>, mail_dir: PathBuf) -> Result<Sink, NotifyError> {
    let Some(smtp) = smtp else {
        let from = "mdm-server <mdm@localhost>"
            .parse()
            .map_err(|e| NotifyError::Config(format!("{e}")))?;
        return Ok(Sink::Files {
            dir: mail_dir,
            from,
        });
    };
    let from: Mailbox = smtp.from.parse().map_err(|e| {
        NotifyError::Config(format!("from address {:?} is invalid: {e}", smtp.from))
    })?;
    let mut tls = TlsParameters::builder(smtp.host.clone());
    if let Some(pem) = &smtp.ca_pem {
        let certificate = Certificate::from_pem(pem.as_bytes()).map_err(|e| {
            NotifyError::Config(format!("the CA file is not a PEM certificate: {e}"))
        })?;
        tls = tls.add_root_certificate(certificate);
    }
    let tls = tls
        .build_rustls()
        .map_err(|e| NotifyError::Config(format!("TLS settings: {e}")))?;
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.host.clone())
        .port(smtp.port)
        .timeout(Some(Duration::from_secs(20)))
        .tls(match smtp.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::Starttls => Tls::Required(tls),
            SmtpTls::Tls => Tls::Wrapper(tls),
        });
    if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
        builder = builder.credentials(Credentials::new(user.clone(), password.as_str().to_owned()));
    }
    Ok(Sink::Smtp {
        transport: builder.build(),
        from,
    })
}

/// Validates SMTP settings without connecting (for start-up checks).
pub fn check_config(smtp: Option<&SmtpConfig>) -> Result<(), NotifyError> {
    sink(smtp, PathBuf::new()).map(|_| ())
}

/// The background deliverer of the outbox.
pub struct Outbox {
    app: Arc<App>,
    sink: Sink,
    retry: RetryPolicy,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

impl Outbox {
    pub fn new(
        app: Arc<App>,
        smtp: Option<&SmtpConfig>,
        mail_dir: PathBuf,
        retry: RetryPolicy,
    ) -> Result<Self, NotifyError> {
        let sink = sink(smtp, mail_dir)?;
        match &sink {
            Sink::Smtp { .. } => {
                tracing::info!(relay = ?smtp.map(|s| (&s.host, s.port)), "emails go out over SMTP")
            }
            Sink::Files { dir, .. } => {
                tracing::info!(dir = %dir.display(), "no SMTP relay configured; emails are written as .eml files")
            }
        }
        let wake = app.outbox_wake.clone();
        Ok(Self {
            app,
            sink,
            retry,
            wake,
        })
    }

    /// Delivers until `stop` turns true: on every wake-up and once a second.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(error) = self.deliver_due().await {
                tracing::error!(%error, "outbox delivery round failed");
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = crate::tls::stopped(&mut stop) => return,
            }
        }
    }

    async fn deliver_due(&self) -> crate::error::Result<()> {
        let now = now_millis();
        for notification in self.app.storage().pending_notifications()? {
            if notification.next_attempt_at > now {
                continue;
            }
            let outcome = self.deliver(&notification).await;
            let mut updated = notification.clone();
            updated.attempts += 1;
            let now = now_millis();
            match outcome {
                Ok(()) => {
                    updated.state = NotificationState::Delivered;
                    updated.delivered_at = Some(now);
                    updated.last_error.clear();
                    tracing::info!(id = %updated.notification_id, recipient = %updated.recipient, "notification delivered");
                }
                Err(error) => {
                    updated.last_error = error.chars().take(500).collect();
                    let exponent = updated.attempts.saturating_sub(1).min(20);
                    let wait = self
                        .retry
                        .first
                        .saturating_mul(1 << exponent)
                        .min(self.retry.max);
                    updated.next_attempt_at = now + millis(wait);
                    if now - updated.created_at > millis(self.retry.window) {
                        updated.state = NotificationState::Failed;
                        tracing::error!(id = %updated.notification_id, error = %updated.last_error, "notification given up");
                    } else {
                        tracing::warn!(id = %updated.notification_id, error = %updated.last_error, retry_in = ?wait, "notification not delivered; will retry");
                    }
                }
            }
            self.app.storage().put_notification(&updated)?;
        }
        Ok(())
    }

    async fn deliver(&self, notification: &Notification) -> Result<(), String> {
        if notification.channel == "webhook" {
            return self.app.post_webhook(notification).await;
        }
        let body = self.render(notification)?;
        let from = match &self.sink {
            Sink::Smtp { from, .. } | Sink::Files { from, .. } => from.clone(),
        };
        let to: Mailbox = notification
            .recipient
            .parse()
            .map_err(|e| format!("recipient {:?} is invalid: {e}", notification.recipient))?;
        let html = format!(
            "<!doctype html><html><body><pre style=\"font-family: sans-serif; white-space: pre-wrap\">{}</pre></body></html>",
            escape_html(&body)
        );
        let message = Message::builder()
            .from(from)
            .to(to)
            .subject(notification.subject.clone())
            .multipart(MultiPart::alternative_plain_html(
                body.as_str().to_owned(),
                html,
            ))
            .map_err(|e| format!("cannot build the message: {e}"))?;
        match &self.sink {
            Sink::Smtp { transport, .. } => transport
                .send(message)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Sink::Files { dir, .. } => {
                write_eml(dir, notification, &message.formatted()).map_err(|e| e.to_string())
            }
        }
    }

    /// The body with the reset passcode filled in where the notification
    /// refers to one.
    fn render(&self, notification: &Notification) -> Result<Zeroizing<String>, String> {
        let Some(action_id) = &notification.passcode_of_action else {
            return Ok(Zeroizing::new(notification.body_text.clone()));
        };
        let action = self
            .app
            .get_action(action_id)
            .map_err(|e| format!("the reset action is gone: {e}"))?;
        let passcode = self
            .app
            .command_passcode(&action)
            .ok_or("the reset passcode cannot be unsealed")?;
        Ok(Zeroizing::new(
            notification.body_text.replace("{passcode}", &passcode),
        ))
    }
}

fn write_eml(
    dir: &std::path::Path,
    notification: &Notification,
    bytes: &[u8],
) -> std::io::Result<()> {
    crate::fsutil::create_private_dir(dir)?;
    let name = format!(
        "{}-{}.eml",
        notification.created_at, notification.notification_id
    );
    // The message may carry a reset passcode: owner-only.
    crate::fsutil::write_atomic(&dir.join(name), bytes, true)
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl App {
    /// Wakes the outbox after notifications were queued.
    pub(crate) fn wake_outbox(&self) {
        self.outbox_wake.notify_one();
    }
}
