//! Delivering the durable outbox: email over SMTP when configured, else
//! `.eml` files under `<data-dir>/outbox/mail/` so nothing is lost on a
//! fresh install. Failed deliveries are retried with exponential backoff
//! until the retry window closes; every attempt's error stays visible in
//! `ListNotifications`. Deliveries run concurrently, bounded overall, per
//! destination (the mail relay; each site's webhook) and per attempt, so a
//! receiver that hangs holds up its own site only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use zeroize::Zeroizing;

use crate::app::App;
use crate::model::{Millis, Notification, NotificationState, now_millis};

pub use crate::config::{RetryPolicy, SmtpConfig, SmtpTls};

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

/// Deliveries in flight at once, over every destination.
const MAX_IN_FLIGHT: usize = 32;
/// Webhook deliveries in flight at once, over every site; the rest of
/// [`MAX_IN_FLIGHT`] is always there for mail.
const MAX_WEBHOOKS_IN_FLIGHT: usize = 24;
/// Deliveries in flight at once to one site's webhook receiver.
const PER_WEBHOOK: usize = 2;
/// Deliveries in flight at once to the mail relay. The `.eml` directory
/// takes one at a time: parallel writes to a local disk gain nothing and
/// took from the server's calls (ListActions p99 2 → 65 ms while 10,000
/// reset emails were written 8 at a time).
const PER_MAIL_RELAY: usize = 8;
const PER_MAIL_DIR: usize = 1;
/// The outbox is read at least this often, for retries that came due.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// And at most this often on wake-ups.
const MIN_SCAN_GAP: Duration = Duration::from_millis(20);
/// How long deliveries in flight may finish after a stop; the others are
/// cut off and stay pending (delivered again after the restart).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where a notification goes, for the per-destination bound. Each site's
/// webhook is its own destination (also when two sites share a host), so
/// a receiver that hangs holds up its own site only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Destination {
    Mail,
    Webhook { site_id: String },
}

impl Destination {
    fn of(notification: &Notification) -> Self {
        if notification.channel == "webhook" {
            Destination::Webhook {
                site_id: notification.site_id.clone(),
            }
        } else {
            Destination::Mail
        }
    }
}

/// What the deliverer's tasks share.
struct Deliverer {
    app: Arc<App>,
    sink: Sink,
    attempt_timeout: Duration,
}

/// The background deliverer of the outbox.
pub struct Outbox {
    deliverer: Arc<Deliverer>,
    retry: RetryPolicy,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

/// The deliveries in flight, owned by the run loop alone: a notification
/// is started only when it is not in flight, and its outcome is recorded
/// by the same loop before the next scan, so it is never delivered twice
/// at once.
struct InFlight {
    mail_limit: usize,
    tasks: JoinSet<Result<(), String>>,
    started: HashMap<tokio::task::Id, (Notification, Destination)>,
    ids: HashSet<String>,
    per_destination: HashMap<Destination, usize>,
    webhooks: usize,
}

impl InFlight {
    fn new(sink: &Sink) -> Self {
        Self {
            mail_limit: match sink {
                Sink::Smtp { .. } => PER_MAIL_RELAY,
                Sink::Files { .. } => PER_MAIL_DIR,
            },
            tasks: JoinSet::new(),
            started: HashMap::new(),
            ids: HashSet::new(),
            per_destination: HashMap::new(),
            webhooks: 0,
        }
    }

    fn has_room(&self, destination: &Destination) -> bool {
        let limit = match destination {
            Destination::Mail => self.mail_limit,
            Destination::Webhook { .. } => PER_WEBHOOK,
        };
        let here = self.per_destination.get(destination).copied().unwrap_or(0);
        let class_full = matches!(destination, Destination::Webhook { .. })
            && self.webhooks >= MAX_WEBHOOKS_IN_FLIGHT;
        self.tasks.len() < MAX_IN_FLIGHT && here < limit && !class_full
    }

    fn start(&mut self, deliverer: &Arc<Deliverer>, notification: Notification) {
        let destination = Destination::of(&notification);
        *self.per_destination.entry(destination.clone()).or_default() += 1;
        if matches!(destination, Destination::Webhook { .. }) {
            self.webhooks += 1;
        }
        self.ids.insert(notification.notification_id.clone());
        let deliverer = deliverer.clone();
        let n = notification.clone();
        let task = self.tasks.spawn(async move { deliverer.attempt(&n).await });
        self.started.insert(task.id(), (notification, destination));
    }

    /// Forgets a finished task; returns what it was delivering.
    fn finish(&mut self, id: tokio::task::Id) -> Option<Notification> {
        let (notification, destination) = self.started.remove(&id)?;
        self.ids.remove(&notification.notification_id);
        if let Some(count) = self.per_destination.get_mut(&destination) {
            *count -= 1;
            if *count == 0 {
                self.per_destination.remove(&destination);
            }
        }
        if matches!(destination, Destination::Webhook { .. }) {
            self.webhooks -= 1;
        }
        Some(notification)
    }
}

type Finished = Result<(tokio::task::Id, Result<(), String>), tokio::task::JoinError>;

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
        let wake = app.outbox_wake();
        Ok(Self {
            deliverer: Arc::new(Deliverer {
                app,
                sink,
                attempt_timeout: retry.attempt_timeout,
            }),
            retry,
            wake,
        })
    }

    /// Delivers until `stop` turns true. The pending notifications are read
    /// on a wake-up once the last read's backlog is started (at most once per
    /// [`MIN_SCAN_GAP`], so a burst of queued mail costs one read), and once a
    /// second; whenever a delivery ends, the next due ones from the last read
    /// are started within the bounds. Reading decodes every pending record,
    /// so it runs on the blocking pool and not for every wake-up of a busy
    /// outbox (10,000 queued reset emails made it most of a core).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut flight = InFlight::new(&self.deliverer.sink);
        let mut backlog = VecDeque::new();
        let mut last_scan = tokio::time::Instant::now();
        let mut scan = true;
        let mut woken = false;
        loop {
            if scan {
                match self.due(&flight).await {
                    Ok(due) => backlog = due,
                    Err(error) => tracing::error!(%error, "cannot read the outbox"),
                }
                last_scan = tokio::time::Instant::now();
                scan = false;
                woken = false;
            }
            self.start_from(&mut backlog, &mut flight);
            let next_scan = last_scan
                + if woken && backlog.is_empty() {
                    MIN_SCAN_GAP
                } else {
                    SCAN_EVERY
                };
            tokio::select! {
                () = self.wake.notified(), if !woken => woken = true,
                () = tokio::time::sleep_until(next_scan) => scan = true,
                Some(done) = flight.tasks.join_next_with_id(), if !flight.tasks.is_empty() => {
                    self.finished(&mut flight, done).await;
                    while let Some(done) = flight.tasks.try_join_next_with_id() {
                        self.finished(&mut flight, done).await;
                    }
                }
                () = crate::tls::stopped(&mut stop) => break,
            }
        }
        let _ = tokio::time::timeout(STOP_GRACE, async {
            while let Some(done) = flight.tasks.join_next_with_id().await {
                self.finished(&mut flight, done).await;
            }
        })
        .await;
        flight.tasks.shutdown().await;
    }

    /// The notifications due now and not in flight, oldest first. Only this
    /// loop changes a notification once queued, so the list stays true
    /// until its entries are started.
    async fn due(&self, flight: &InFlight) -> crate::error::Result<VecDeque<Notification>> {
        let pending = self.deliverer.app.store().pending_notifications().await?;
        let now = now_millis();
        Ok(pending
            .into_iter()
            .filter(|n| n.next_attempt_at <= now && !flight.ids.contains(&n.notification_id))
            .collect())
    }

    /// Starts what the bounds allow from `backlog`, oldest first; the rest
    /// waits there for a delivery to end.
    fn start_from(&self, backlog: &mut VecDeque<Notification>, flight: &mut InFlight) {
        let mut waiting = VecDeque::new();
        while let Some(notification) = backlog.pop_front() {
            if flight.tasks.len() >= MAX_IN_FLIGHT {
                backlog.push_front(notification);
                break;
            }
            if flight.ids.contains(&notification.notification_id) {
                continue;
            }
            if flight.has_room(&Destination::of(&notification)) {
                flight.start(&self.deliverer, notification);
            } else {
                waiting.push_back(notification);
            }
        }
        waiting.append(backlog);
        *backlog = waiting;
    }

    async fn finished(&self, flight: &mut InFlight, done: Finished) {
        let (id, outcome) = match done {
            Ok((id, outcome)) => (id, outcome),
            Err(error) => {
                tracing::error!(%error, "a notification delivery task failed");
                (
                    error.id(),
                    Err("the delivery failed unexpectedly".to_owned()),
                )
            }
        };
        let Some(notification) = flight.finish(id) else {
            return;
        };
        if let Err(error) = self.record(notification, outcome).await {
            tracing::error!(%error, "cannot record a notification's delivery");
        }
    }

    /// Records one attempt: delivered, or the error and the next attempt
    /// (doubling, capped) until the retry window closes.
    async fn record(
        &self,
        notification: Notification,
        outcome: Result<(), String>,
    ) -> crate::error::Result<()> {
        let mut updated = notification;
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
        self.deliverer
            .app
            .store()
            .put_notification(&updated)
            .await?;
        Ok(())
    }
}

impl Deliverer {
    /// One attempt, cut off after the attempt timeout.
    async fn attempt(&self, notification: &Notification) -> Result<(), String> {
        match tokio::time::timeout(self.attempt_timeout, self.deliver(notification)).await {
            Ok(outcome) => outcome,
            Err(_) if notification.channel == "webhook" => {
                tracing::warn!(
                    id = %notification.notification_id,
                    site_id = %notification.site_id,
                    timeout = ?self.attempt_timeout,
                    "the webhook receiver did not answer in time"
                );
                Err(crate::destination::Unreachable::GENERIC.to_owned())
            }
            Err(_) => Err(format!(
                "the mail relay did not finish within {} s",
                self.attempt_timeout.as_secs()
            )),
        }
    }

    async fn deliver(&self, notification: &Notification) -> Result<(), String> {
        if notification.channel == "webhook" {
            return self.app.post_webhook(notification).await;
        }
        let body = self.render(notification).await?;
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

    /// The body with the reset passcode in the one place the notification
    /// marks for it. Any other `{passcode}` in the text (a device's host
    /// name, a user's email) stays as it is.
    async fn render(&self, notification: &Notification) -> Result<Zeroizing<String>, String> {
        let Some(action_id) = &notification.passcode_of_action else {
            return Ok(Zeroizing::new(notification.body_text.clone()));
        };
        let action = self
            .app
            .get_action(action_id)
            .await
            .map_err(|e| format!("the reset action is gone: {e}"))?;
        let passcode = self
            .app
            .command_passcode(&action)
            .ok_or("the reset passcode cannot be unsealed")?;
        notification
            .with_passcode(&passcode)
            .ok_or_else(|| "the reset email has no place for the passcode".to_owned())
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
