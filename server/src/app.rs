//! The server's application: the domain (`mdm_core::domain`) plus what only
//! the server holds, the admin registry its identities are checked against
//! and the policy for where webhooks may connect.

use std::ops::Deref;
use std::sync::Arc;

use crate::admins::AdminRegistry;
use crate::config::Config;
use crate::crypto::ServerKeys;
use crate::pki::CertificateAuthority;
use mdm_core::domain::{Domain, Settings, SiteAdmins};
use mdm_core::store::Store;

#[derive(Debug)]
pub struct App {
    domain: Domain,
    pub(crate) registry: Arc<AdminRegistry>,
    /// Where webhooks may connect.
    pub(crate) webhook_policy: crate::destination::Policy,
}

impl App {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<AdminRegistry>,
        keys: &ServerKeys,
        ca: Arc<CertificateAuthority>,
        config: &Config,
    ) -> Self {
        let settings = Settings {
            throttle: config.throttle,
            device_cert_lifetime: config.device_cert_lifetime,
            heartbeat_interval: config.heartbeat_interval,
            max_users_per_site: config.max_users_per_site,
        };
        Self {
            domain: Domain::new(store, registry.clone(), keys, ca, &settings),
            registry,
            webhook_policy: crate::destination::Policy {
                allow_private: config.webhook_allow_private_networks,
                hosts: config.webhook_hosts.clone(),
            },
        }
    }
}

/// The RPC modules call the domain's services through the App.
impl Deref for App {
    type Target = Domain;

    fn deref(&self) -> &Domain {
        &self.domain
    }
}

impl SiteAdmins for AdminRegistry {
    fn emails_of_site(&self, site_id: &str, now: i64) -> Result<Vec<String>, String> {
        self.admins_of_site(site_id, now)
            .map(|admins| admins.into_iter().map(|admin| admin.email).collect())
            .map_err(|error| error.to_string())
    }
}
