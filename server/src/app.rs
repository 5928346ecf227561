//! The domain services, shared by every gRPC module: sites, users and the
//! company passcode (in `sites`, `users`, `company_passcode`). They take and
//! return domain values and `crate::error::Error`, never prost types.

use std::sync::Arc;

use tokio::sync::broadcast;
use zeroize::Zeroizing;

use crate::admins::AdminRegistry;
use crate::config::Config;
use crate::crypto::ServerKeys;
use crate::error::{Error, Result};
use crate::live::LiveStreams;
use crate::model::{Alert, Site};
use crate::pki::CertificateAuthority;
use crate::throttle::Throttle;
use mdm_core::store::Store;

/// Alert subscribers that fall this far behind miss alerts (they can re-list).
const ALERT_CHANNEL_CAPACITY: usize = 1024;
/// Action watchers that fall this far behind are dropped.
const ACTION_CHANNEL_CAPACITY: usize = 4096;

#[derive(Debug)]
pub struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<AdminRegistry>,
    pub(crate) passcode_key: Zeroizing<[u8; 32]>,
    pub(crate) throttle: Throttle,
    /// Counts wrong company passcodes off the response path.
    pub(crate) failed_attempts: crate::failed_attempts::FailedAttempts,
    pub(crate) alerts: broadcast::Sender<Alert>,
    pub(crate) ca: Arc<CertificateAuthority>,
    pub(crate) device_cert_lifetime: std::time::Duration,
    pub(crate) heartbeat_interval: std::time::Duration,
    pub(crate) live: LiveStreams,
    /// Pokes the outbox deliverer.
    pub(crate) outbox_wake: Arc<tokio::sync::Notify>,
    /// Seals reset passcodes at rest.
    pub(crate) secrets: crate::crypto::SecretBox,
    /// Every change of an action, for `WatchActions`.
    pub(crate) action_updates: broadcast::Sender<crate::model::Action>,
    /// Where webhooks may connect.
    pub(crate) webhook_policy: crate::destination::Policy,
    /// Most users one site may have.
    pub(crate) max_users_per_site: usize,
    pub(crate) webhook_presence: crate::webhook::WebhookPresence,
}

impl App {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<AdminRegistry>,
        keys: &ServerKeys,
        ca: Arc<CertificateAuthority>,
        config: &Config,
    ) -> Self {
        let (alerts, _) = broadcast::channel(ALERT_CHANNEL_CAPACITY);
        let outbox_wake = Arc::default();
        Self {
            failed_attempts: crate::failed_attempts::FailedAttempts::new(
                store.clone(),
                registry.clone(),
                alerts.clone(),
                Arc::clone(&outbox_wake),
            ),
            store,
            registry,
            passcode_key: keys.derive("company-passcode/v1"),
            throttle: Throttle::new(config.throttle),
            alerts,
            ca,
            device_cert_lifetime: config.device_cert_lifetime,
            heartbeat_interval: config.heartbeat_interval,
            live: LiveStreams::default(),
            action_updates: broadcast::channel(ACTION_CHANNEL_CAPACITY).0,
            secrets: crate::crypto::SecretBox::new(&keys.derive("reset-passcode/v1")),
            outbox_wake,
            webhook_policy: crate::destination::Policy {
                allow_private: config.webhook_allow_private_networks,
                hosts: config.webhook_hosts.clone(),
            },
            max_users_per_site: config.max_users_per_site,
            webhook_presence: Default::default(),
        }
    }

    pub fn heartbeat_interval(&self) -> std::time::Duration {
        self.heartbeat_interval
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Every change of an action as it happens.
    pub fn subscribe_actions(&self) -> broadcast::Receiver<crate::model::Action> {
        self.action_updates.subscribe()
    }

    /// New security alerts as they are raised.
    pub fn subscribe_alerts(&self) -> broadcast::Receiver<Alert> {
        self.alerts.subscribe()
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
        change: mdm_core::store::Change<'_, Site>,
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
