//! The domain services: sites, users, the company passcode, enrollment,
//! commands with their delivery bookkeeping, remote passcode reset, alerts
//! and what they queue in the outbox. They take and return domain values and
//! [`Error`]; the edges (gRPC, the CLI) convert and validate around them.
//!
//! What the domain needs from outside it is a small interface each: the
//! store ([`Store`]), who administers a site ([`SiteAdmins`]), and the live
//! device streams ([`LiveStreams`], in-process here). Delivery of the
//! outbox (SMTP, HTTP) is the server's; the domain only queues and wakes it.

pub mod alerts;
pub mod commands;
pub mod company_passcode;
pub mod devices;
pub mod failed_attempts;
pub mod reset;
pub mod sites;
pub mod users;
pub mod webhook_events;
pub mod webhooks;

pub use alerts::SiteAdmins;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use zeroize::Zeroizing;

use crate::crypto::{SecretBox, ServerKeys};
use crate::error::{Error, Result};
use crate::live::LiveStreams;
use crate::model::{Action, Alert, Site};
use crate::pki::CertificateAuthority;
use crate::store::{Change, Store};
use crate::throttle::{Throttle, ThrottleConfig};

/// Alert subscribers that fall this far behind miss alerts (they can re-list).
const ALERT_CHANNEL_CAPACITY: usize = 1024;
/// Action watchers that fall this far behind are dropped.
const ACTION_CHANNEL_CAPACITY: usize = 4096;

/// The domain's settings, from the server's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub throttle: ThrottleConfig,
    pub device_cert_lifetime: Duration,
    pub heartbeat_interval: Duration,
    /// Most users one site may have.
    pub max_users_per_site: usize,
}

#[derive(Debug)]
pub struct Domain {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) admins: Arc<dyn SiteAdmins>,
    pub(crate) passcode_key: Zeroizing<[u8; 32]>,
    pub(crate) throttle: Throttle,
    /// Counts wrong company passcodes off the response path.
    pub(crate) failed_attempts: failed_attempts::FailedAttempts,
    pub(crate) alerts: broadcast::Sender<Alert>,
    pub(crate) ca: Arc<CertificateAuthority>,
    pub(crate) device_cert_lifetime: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) live: LiveStreams,
    /// Pokes the outbox deliverer.
    pub(crate) outbox_wake: Arc<Notify>,
    /// Seals reset passcodes and webhook secrets at rest.
    pub(crate) secrets: SecretBox,
    /// Every change of an action, for `WatchActions`.
    pub(crate) action_updates: broadcast::Sender<Action>,
    pub(crate) max_users_per_site: usize,
    pub(crate) webhook_presence: webhook_events::WebhookPresence,
}

impl Domain {
    pub fn new(
        store: Arc<dyn Store>,
        admins: Arc<dyn SiteAdmins>,
        keys: &ServerKeys,
        ca: Arc<CertificateAuthority>,
        settings: &Settings,
    ) -> Self {
        let (alerts, _) = broadcast::channel(ALERT_CHANNEL_CAPACITY);
        let outbox_wake = Arc::default();
        Self {
            failed_attempts: failed_attempts::FailedAttempts::new(
                store.clone(),
                admins.clone(),
                alerts.clone(),
                Arc::clone(&outbox_wake),
            ),
            store,
            admins,
            passcode_key: keys.derive("company-passcode/v1"),
            throttle: Throttle::new(settings.throttle),
            alerts,
            ca,
            device_cert_lifetime: settings.device_cert_lifetime,
            heartbeat_interval: settings.heartbeat_interval,
            live: LiveStreams::default(),
            action_updates: broadcast::channel(ACTION_CHANNEL_CAPACITY).0,
            secrets: SecretBox::new(&keys.derive("reset-passcode/v1")),
            outbox_wake,
            max_users_per_site: settings.max_users_per_site,
            webhook_presence: Default::default(),
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The live device streams: where a session registers its stream.
    pub fn live(&self) -> &LiveStreams {
        &self.live
    }

    /// Opens what the domain sealed at rest (webhook secrets, reset
    /// passcodes) for the deliverer.
    pub fn secrets(&self) -> &SecretBox {
        &self.secrets
    }

    /// What the outbox deliverer waits on: notified whenever the domain
    /// queued a notification.
    pub fn outbox_wake(&self) -> Arc<Notify> {
        Arc::clone(&self.outbox_wake)
    }

    /// Wakes the outbox after notifications were queued.
    pub(crate) fn wake_outbox(&self) {
        self.outbox_wake.notify_one();
    }

    /// Every change of an action as it happens.
    pub fn subscribe_actions(&self) -> broadcast::Receiver<Action> {
        self.action_updates.subscribe()
    }

    /// New security alerts as they are raised.
    pub fn subscribe_alerts(&self) -> broadcast::Receiver<Alert> {
        self.alerts.subscribe()
    }

    /// Waits until every counted failed attempt is stored, then stops the
    /// counter: the last step of a shutdown.
    pub async fn close(&self) {
        self.failed_attempts.close().await;
    }

    pub(crate) async fn site(&self, site_id: &str) -> Result<Site> {
        self.store
            .get_site(site_id)
            .await?
            .ok_or_else(|| no_such_site(site_id))
    }

    /// Changes the stored site under the store's unit; the site as changed.
    pub(crate) async fn change_site(
        &self,
        site_id: &str,
        change: Change<'_, Site>,
    ) -> Result<Site> {
        self.store
            .update_site(site_id, change)
            .await?
            .ok_or_else(|| no_such_site(site_id))
    }
}

fn no_such_site(site_id: &str) -> Error {
    Error::NotFound(format!("site {site_id:?} does not exist"))
}
