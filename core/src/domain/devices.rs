//! Self-service enrollment, device certificates (issue, renew, revoke),
//! and the device list.

use std::net::IpAddr;
use std::time::Duration;

use zeroize::Zeroizing;

use super::Domain;
use super::company_passcode::Refusal;
use crate::error::{Error, Result};
use crate::live::StreamSignal;
use crate::model::{
    Action, ActionEvent, ActionStatus, ActionType, Device, DeviceFacts, DeviceStatus,
    IssuedDeviceCert, Millis, now_millis, short_id,
};
use crate::pki::{CsrError, DeviceCsr, parse_device_csr};
use crate::store::{DeviceFilter, Enrolled, Page, PageRequest};

/// An enrollment as the edge hands it to the domain.
pub struct EnrollRequest {
    pub user_email: String,
    pub company_passcode: Zeroizing<String>,
    pub csr_pem: String,
    pub facts: DeviceFacts,
    pub source: IpAddr,
    /// The device the client proved to be by presenting its current
    /// certificate: only that device may be replaced by this enrollment.
    pub proven_device: Option<String>,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("user_email", &self.user_email)
            .field("facts", &self.facts)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A device certificate as sent to the agent.
#[derive(Debug, Clone)]
pub struct DeviceCertificate {
    /// Device certificate, then the CA certificate.
    pub chain_pem: String,
    pub ca_pem: String,
    pub renew_after: Millis,
    pub expires_at: Millis,
}

#[derive(Debug)]
pub struct Enrollment {
    pub device: Device,
    pub certificate: DeviceCertificate,
}

/// Why an enrollment failed; the edge shows one generic refusal for all
/// but throttling, and logs the rest.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("too many failed attempts from this address; try again later")]
    Throttled,
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Internal(#[from] Error),
}

impl From<crate::store::StoreError> for EnrollError {
    fn from(error: crate::store::StoreError) -> Self {
        EnrollError::Internal(error.into())
    }
}

fn millis(duration: Duration) -> Millis {
    Millis::try_from(duration.as_millis()).unwrap_or(Millis::MAX)
}

impl Domain {
    fn issue_device_certificate(
        &self,
        csr: &DeviceCsr,
        device_id: &str,
    ) -> std::result::Result<(DeviceCertificate, IssuedDeviceCert), CsrError> {
        let lifetime = time::Duration::milliseconds(millis(self.device_cert_lifetime));
        let (cert_pem, serial, not_after) = self
            .ca
            .issue_device_cert(csr, device_id, lifetime)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot sign a device certificate");
                CsrError::Invalid
            })?;
        let now = now_millis();
        let expires_at = (not_after.unix_timestamp_nanos() / 1_000_000) as Millis;
        // Renew when two thirds of the lifetime have passed.
        let renew_after = now + (expires_at - now) * 2 / 3;
        Ok((
            DeviceCertificate {
                chain_pem: format!("{cert_pem}{}", self.ca.cert_pem()),
                ca_pem: self.ca.cert_pem().to_owned(),
                renew_after,
                expires_at,
            },
            IssuedDeviceCert { serial, expires_at },
        ))
    }

    /// Enrolls a device: the passcode names the site, the email must be one
    /// of its users, the CSR's key becomes the device's identity.
    pub async fn enroll(
        &self,
        request: EnrollRequest,
    ) -> std::result::Result<Enrollment, EnrollError> {
        // Check the CSR before the passcode: a broken agent must not burn
        // the site's failed-attempt budget.
        let csr = parse_device_csr(&request.csr_pem, None)
            .map_err(|e| EnrollError::Refused(e.to_string()))?;
        let verified = match self
            .verify_company_passcode(
                &request.user_email,
                &request.company_passcode,
                request.source,
            )
            .await?
        {
            Ok(verified) => verified,
            Err(Refusal::Throttled(_)) => return Err(EnrollError::Throttled),
            Err(refusal) => return Err(EnrollError::Refused(refusal.to_string())),
        };
        let device_id = short_id("dv");
        let (certificate, issued) = self
            .issue_device_certificate(&csr, &device_id)
            .map_err(|e| EnrollError::Refused(e.to_string()))?;
        let mut device = Device {
            device_id: device_id.clone(),
            site_id: verified.site.site_id.clone(),
            user_email: verified.user.email.clone(),
            facts: request.facts,
            status: DeviceStatus::Active,
            enrolled_at: now_millis(),
            last_seen: None,
            certificates: vec![issued],
            replaces_device_id: None,
            replaced_by_device_id: None,
            security: Default::default(),
        };
        let enrolled = self
            .store
            .enroll_device(&mut device, request.proven_device.as_deref())
            .await?;
        if let Enrolled::AlongsideSameSerial(other) = &enrolled
            && let Err(error) = self
                .duplicate_serial_alert(&verified.site, &device, other, request.source)
                .await
        {
            // The device is stored: refusing now would leave it without a certificate.
            tracing::error!(%error, "cannot record the duplicate-serial alert");
        }
        let replaced = match enrolled {
            Enrolled::Replacing(old) => {
                // The old record's stream, if any, must not outlive it.
                self.live.signal(&old, StreamSignal::Replaced);
                Some(old)
            }
            _ => None,
        };
        tracing::info!(
            device_id = %device.device_id,
            site_id = %device.site_id,
            user = %device.user_email,
            source = %request.source,
            replaced = ?replaced,
            "device enrolled"
        );
        Ok(Enrollment {
            device,
            certificate,
        })
    }

    /// Records (and notifies the site's admins of) a device that enrolled
    /// with the serial number of another active device without proving it
    /// is that device: a takeover attempt, or a reinstall that lost its
    /// identity. Both stay enrolled; an admin unenrolls the wrong one.
    async fn duplicate_serial_alert(
        &self,
        site: &crate::model::Site,
        device: &Device,
        other_id: &str,
        source: IpAddr,
    ) -> Result<()> {
        let now = now_millis();
        let alert = crate::model::Alert {
            alert_id: crate::model::time_ordered_id(),
            site_id: site.site_id.clone(),
            kind: crate::model::AlertKind::DuplicateDeviceSerial,
            created_at: now,
            details: format!(
                "Device {} (user {}) enrolled in site {} ({}) from {source} with the serial number of the active device {other_id}, without proving it is that device. Both stay enrolled; unenroll the one that is not genuine.",
                device.device_id, device.user_email, site.display_name, site.site_id
            ),
            failed_attempts: 0,
            source_addresses: vec![source.to_string()],
        };
        let notifications = super::alerts::notifications(
            self.admins.as_ref(),
            site,
            &alert,
            &format!(
                "Security alert: a device claims another device's serial number ({})",
                site.display_name
            ),
        );
        self.store.put_alert(&alert, &notifications).await?;
        tracing::warn!(
            site_id = %site.site_id,
            device_id = %device.device_id,
            other_device_id = other_id,
            "a device enrolled with the serial number of an active device"
        );
        let _ = self.alerts.send(alert);
        self.wake_outbox();
        Ok(())
    }

    /// Issues a fresh certificate for a new CSR of an enrolled device.
    pub async fn renew_device_certificate(
        &self,
        device_id: &str,
        csr_pem: &str,
    ) -> Result<DeviceCertificate> {
        let (certificate, issued) = parse_device_csr(csr_pem, Some(device_id))
            .and_then(|csr| self.issue_device_certificate(&csr, device_id))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let now = now_millis();
        let device = self
            .store
            .update_device(
                device_id,
                Box::new(move |device| {
                    if device.status != DeviceStatus::Active {
                        return false;
                    }
                    // Keep the newest and the one before it: the agent may still
                    // be using the old one until it reconnects.
                    device.certificates.retain(|c| c.expires_at > now);
                    device.certificates.insert(0, issued);
                    device.certificates.truncate(2);
                    true
                }),
            )
            .await?
            .filter(|d| d.status == DeviceStatus::Active)
            .ok_or_else(|| Error::Unauthenticated("the device is not enrolled".into()))?;
        tracing::info!(device_id = %device.device_id, "device certificate renewed");
        Ok(certificate)
    }

    /// Whether `serial` is a current certificate of an active device.
    pub async fn device_certificate_valid(&self, device_id: &str, serial: &str) -> Result<bool> {
        Ok(self
            .store
            .get_device(device_id)
            .await?
            .is_some_and(|d| d.accepts_certificate(serial, now_millis())))
    }

    pub async fn get_device(&self, device_id: &str) -> Result<std::sync::Arc<Device>> {
        self.store
            .get_device(device_id)
            .await?
            .ok_or_else(|| Error::no_such("device", device_id))
    }

    pub fn is_online(&self, device_id: &str) -> bool {
        self.live.is_online(device_id)
    }

    pub async fn list_devices(
        &self,
        site_id: &str,
        filter: &DeviceFilter,
        page: PageRequest<'_>,
    ) -> Result<Page<Device>> {
        self.site(site_id).await?;
        Ok(self.store.list_devices(site_id, filter, page).await?)
    }

    /// Records that the device's agent was heard from, with fresh facts.
    pub async fn device_seen(&self, device_id: &str, facts: Option<DeviceFacts>) -> Result<()> {
        let now = now_millis();
        let id = device_id.to_owned();
        self.store.update_device_soon(device_id, Box::new(move |device| {
            let device_id = id.as_str();
            device.last_seen = Some(now);
            if let Some(mut facts) = facts {
                // The serial number is what enrollment checked against the
                // site's other devices; a stream cannot change it afterwards.
                if facts.serial_number != device.facts.serial_number {
                    tracing::warn!(
                        device_id,
                        "the agent reports another serial number than it enrolled with; kept the enrolled one"
                    );
                    facts.serial_number = device.facts.serial_number.clone();
                }
                device.facts = facts;
            }
            true
        })).await?;
        Ok(())
    }

    /// Unenrolls a device: its certificates stop working at once, its open
    /// stream is told to remove the agent's identity and is closed, and the
    /// action is recorded in the action log.
    pub async fn unenroll_device(&self, device_id: &str, admin_email: &str) -> Result<Action> {
        let current = self.get_device(device_id).await?;
        if current.status != DeviceStatus::Active {
            return Err(Error::FailedPrecondition(format!(
                "device {device_id} is not enrolled (status {:?})",
                current.status
            )));
        }
        let mut unenrolled = false;
        let device = self
            .store
            .update_device(
                device_id,
                Box::new(|device| {
                    unenrolled = device.status == DeviceStatus::Active;
                    if unenrolled {
                        device.status = DeviceStatus::Unenrolled;
                    }
                    unenrolled
                }),
            )
            .await?
            .ok_or_else(|| Error::no_such("device", device_id))?;
        if !unenrolled {
            // Another call unenrolled (or replaced) it since the check above.
            return Err(Error::FailedPrecondition(format!(
                "device {device_id} is not enrolled (status {:?})",
                device.status
            )));
        }
        let now = now_millis();
        let mut action = Action::pending(
            self.store.new_action_id(&device.site_id),
            &device,
            ActionType::Unenroll,
            admin_email,
            "certificate revoked",
            now,
        );
        let told = self.live.signal(
            device_id,
            StreamSignal::Unenrolled {
                action_id: action.action_id.clone(),
            },
        );
        let detail = if told {
            "the agent was told on its open stream to remove its identity"
        } else {
            "the agent is offline; its next connection is refused and it removes its identity"
        };
        if told {
            action.timeline.push(ActionEvent {
                status: ActionStatus::Sent,
                at: now,
                detail: "unenroll command sent".into(),
            });
        }
        action.timeline.push(ActionEvent {
            status: ActionStatus::Succeeded,
            at: now,
            detail: detail.into(),
        });
        action.status = ActionStatus::Succeeded;
        self.store.record_action(&action).await?;
        tracing::info!(
            device_id,
            admin = admin_email,
            online = told,
            "device unenrolled"
        );
        Ok(action)
    }
}
