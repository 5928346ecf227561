//! Remote passcode reset and the passcode policy: generating a passcode
//! the site's policy accepts, keeping the latest one sealed for the
//! device's security page, auditing every read of it, and the emails.

use std::time::Duration;

use rand::TryRngCore;
use rand::rngs::OsRng;
use rand::seq::{IndexedRandom, SliceRandom};
use zeroize::Zeroizing;

use super::Domain;
use crate::error::{Error, Result};
use crate::live::StreamSignal;
use crate::model::{
    Action, ActionStatus, ActionType, AuditEntry, CommandPayload, Compliance, Device, DeviceStatus,
    LatestReset, Millis, Notification, PASSCODE_LENGTH_RANGE, PASSCODE_PLACEHOLDER,
    PasscodeComplexity, PasscodePolicy, now_millis,
};
use crate::store::{DeviceFilter, PageRequest};

const DIGITS: &[u8] = b"0123456789";
const LETTERS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ";
const LOWER: &[u8] = b"abcdefghijkmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
const SYMBOLS: &[u8] = b"!#%+-=?@";

/// A passcode that satisfies `policy`, from the OS CSPRNG. At least 8
/// characters even when the policy allows fewer. Every required class is
/// present; positions are shuffled.
pub fn generate_device_passcode(policy: &PasscodePolicy) -> Zeroizing<String> {
    let length = usize::try_from(policy.min_length.max(8)).unwrap_or(8);
    let required: Vec<&[u8]> = match policy.complexity {
        PasscodeComplexity::Numeric => vec![DIGITS],
        PasscodeComplexity::Alphanumeric => vec![DIGITS, LETTERS],
        PasscodeComplexity::Complex => vec![DIGITS, LOWER, UPPER, SYMBOLS],
    };
    let alphabet: Vec<u8> = required.concat();
    let mut rng = OsRng.unwrap_err();
    let mut chars: Zeroizing<Vec<u8>> = Zeroizing::new(
        required
            .iter()
            .map(|class| *class.choose(&mut rng).expect("non-empty class"))
            .collect(),
    );
    while chars.len() < length {
        chars.push(*alphabet.choose(&mut rng).expect("non-empty alphabet"));
    }
    chars.shuffle(&mut rng);
    Zeroizing::new(String::from_utf8_lossy(&chars).into_owned())
}

pub fn validate_policy(policy: &PasscodePolicy) -> Result<()> {
    if !PASSCODE_LENGTH_RANGE.contains(&policy.min_length) {
        return Err(Error::InvalidArgument(format!(
            "policy.min_length must be between {} and {}, got {}",
            PASSCODE_LENGTH_RANGE.start(),
            PASSCODE_LENGTH_RANGE.end(),
            policy.min_length
        )));
    }
    if policy.max_age_days > 3650 {
        return Err(Error::InvalidArgument(
            "policy.max_age_days must be at most 3650 (0 means no limit)".into(),
        ));
    }
    Ok(())
}

/// What an admin sees of a device's security.
#[derive(Debug)]
pub struct SecurityView {
    pub compliance: Option<Compliance>,
    pub compliant: bool,
    pub locked: bool,
    pub latest_reset_passcode: Option<Zeroizing<String>>,
    pub reset_at: Option<Millis>,
    pub reset_by: String,
}

fn device_context(device_id: &str) -> String {
    format!("device:{device_id}")
}

pub(crate) fn command_context(action_id: &str) -> String {
    format!("command:{action_id}")
}

impl Domain {
    pub async fn set_passcode_policy(
        &self,
        site_id: &str,
        policy: PasscodePolicy,
    ) -> Result<PasscodePolicy> {
        validate_policy(&policy)?;
        let new_policy = policy;
        self.change_site(
            site_id,
            Box::new(move |site| {
                site.passcode_policy = new_policy;
                true
            }),
        )
        .await?;
        // Devices online now learn it at once; the others on their next hello.
        let active = DeviceFilter {
            status: Some(DeviceStatus::Active),
            ..DeviceFilter::default()
        };
        let mut token = String::new();
        loop {
            let page = self
                .store
                .list_devices(
                    site_id,
                    &active,
                    PageRequest {
                        token: &token,
                        limit: 1000,
                    },
                )
                .await?;
            for device in &page.items {
                self.live
                    .signal(&device.device_id, StreamSignal::PolicyChanged);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        Ok(policy)
    }

    pub async fn passcode_policy(&self, site_id: &str) -> Result<PasscodePolicy> {
        Ok(self.site(site_id).await?.passcode_policy)
    }

    /// The policy of the device's site.
    pub async fn device_policy(&self, device_id: &str) -> Result<PasscodePolicy> {
        let site_id = self.get_device(device_id).await?.site_id.clone();
        self.passcode_policy(&site_id).await
    }

    /// Resets a device's passcode: a new passcode the site's policy accepts
    /// is queued for the device (which sets it and locks), kept sealed as
    /// the device's latest reset passcode, and emailed to the admin (and the
    /// device's user when `notify_user`). Returns the action and the passcode.
    #[allow(clippy::too_many_arguments)]
    pub async fn reset_passcode(
        &self,
        device: &Device,
        admin_email: &str,
        confirm_user_email: &str,
        notify_user: bool,
        message: String,
        ttl: Option<Duration>,
    ) -> Result<(Action, Zeroizing<String>)> {
        let device_id = device.device_id.as_str();
        if !confirm_user_email
            .trim()
            .eq_ignore_ascii_case(&device.user_email)
        {
            return Err(Error::FailedPrecondition(format!(
                "confirm_user_email does not match the user of device {device_id}; check the device and its user"
            )));
        }
        // Everything that can refuse the reset is checked before the first write.
        let ttl = super::commands::validate_ttl(ttl)?;
        self.check_command(device, ActionType::ResetPasscode)?;
        let site = self.site(&device.site_id).await?;
        let passcode = generate_device_passcode(&site.passcode_policy);
        let action_id = self.store.new_action_id(&device.site_id);
        let now = now_millis();
        let mut recipients = vec![admin_email.to_owned()];
        if notify_user && device.user_email != admin_email {
            recipients.push(device.user_email.clone());
        }
        let notifications: Vec<Notification> = recipients
            .into_iter()
            .map(|recipient| reset_email(device, &action_id, admin_email, recipient, now))
            .collect();
        let payload = CommandPayload::ResetPasscode {
            passcode_sealed: self.secrets.seal(&passcode, &command_context(&action_id)),
            message,
        };
        let latest_reset = LatestReset {
            passcode_sealed: self.secrets.seal(&passcode, &device_context(device_id)),
            reset_at: now,
            reset_by: admin_email.to_owned(),
            action_id: action_id.clone(),
        };
        // One unit of the store: the command, its emails and the device's
        // latest reset are stored together or not at all.
        let action = self
            .queue_command_with(
                action_id,
                device,
                admin_email,
                ActionType::ResetPasscode,
                payload,
                Some(ttl),
                notifications,
                Some(latest_reset),
            )
            .await?;
        self.wake_outbox();
        tracing::info!(
            action_id = %action.action_id,
            device_id,
            admin = admin_email,
            notify_user,
            "passcode reset queued"
        );
        Ok((action, passcode))
    }

    /// The passcode inside a reset command, for sending it to the device.
    pub fn command_passcode(&self, action: &Action) -> Option<Zeroizing<String>> {
        match &action.payload {
            Some(CommandPayload::ResetPasscode {
                passcode_sealed, ..
            }) => self
                .secrets
                .open(passcode_sealed, &command_context(&action.action_id)),
            _ => None,
        }
    }

    /// Records what the agent says about the device's passcode.
    pub async fn record_compliance(&self, device_id: &str, compliance: Compliance) -> Result<()> {
        self.store
            .update_device_soon(
                device_id,
                Box::new(move |device| {
                    let changed = device.security.compliance.as_ref() != Some(&compliance);
                    device.security.compliance = Some(compliance);
                    changed
                }),
            )
            .await?;
        Ok(())
    }

    /// Whether the device reported a lock (or a reset, which locks) done.
    /// Read from the action log, its one source: storing a flag on the device
    /// record cost every first lock a second write (BENCHMARKS.md).
    async fn device_was_locked(&self, device_id: &str) -> Result<bool> {
        Ok(self
            .store
            .device_has_action(
                device_id,
                &[ActionType::Lock, ActionType::ResetPasscode],
                ActionStatus::Succeeded,
            )
            .await?)
    }

    /// The device's security section as `viewer` may see it. Revealing the
    /// latest reset passcode is recorded in the device's audit trail.
    pub async fn security_view(&self, device: &Device, viewer: &str) -> Result<SecurityView> {
        let security = &device.security;
        let mut view = SecurityView {
            compliant: security.compliance.as_ref().is_some_and(|c| c.meets_policy),
            compliance: security.compliance.clone(),
            locked: security.locked || self.device_was_locked(&device.device_id).await?,
            latest_reset_passcode: None,
            reset_at: None,
            reset_by: String::new(),
        };
        // A latest reset whose action was never stored (a crash right before
        // its commit point) did not happen.
        let latest_reset = match &security.latest_reset {
            Some(latest) if self.store.get_action(&latest.action_id).await?.is_some() => {
                Some(latest)
            }
            _ => None,
        };
        view.reset_at = latest_reset.map(|r| r.reset_at);
        view.reset_by = latest_reset.map(|r| r.reset_by.clone()).unwrap_or_default();
        if let Some(latest) = latest_reset {
            let site = self.site(&device.site_id).await?;
            let days = i64::from(site.reset_passcode_visible_days);
            let hidden = days > 0 && now_millis() - latest.reset_at > days * 86_400_000;
            if !hidden {
                view.latest_reset_passcode = self
                    .secrets
                    .open(&latest.passcode_sealed, &device_context(&device.device_id));
                if view.latest_reset_passcode.is_some() {
                    self.store
                        .append_audit(
                            &device.device_id,
                            &AuditEntry {
                                at: now_millis(),
                                who: viewer.to_owned(),
                                what: format!(
                                    "viewed the latest reset passcode (action {})",
                                    latest.action_id
                                ),
                            },
                        )
                        .await?;
                    tracing::info!(device_id = %device.device_id, viewer, "latest reset passcode viewed");
                }
            }
        }
        Ok(view)
    }

    pub async fn audit_trail(&self, device_id: &str, limit: usize) -> Result<Vec<AuditEntry>> {
        Ok(self.store.list_audit(device_id, limit).await?)
    }
}

fn reset_email(
    device: &Device,
    action_id: &str,
    admin: &str,
    recipient: String,
    now: Millis,
) -> Notification {
    let name = if device.facts.hostname.is_empty() {
        device.device_id.clone()
    } else {
        device.facts.hostname.clone()
    };
    // Device and user text goes before the placeholder, whose position is
    // recorded: the passcode is filled in there and nowhere else.
    let before = format!(
        "{admin} reset the passcode of device {name} ({}), used by {}.\n\nThe new passcode is: ",
        device.device_id, device.user_email
    );
    let after = format!(
        "\n\nThe device sets it and locks as soon as it is online. Follow the action {action_id} in the action log.\n"
    );
    Notification {
        passcode_of_action: Some(action_id.to_owned()),
        passcode_at: Some(before.len()),
        ..Notification::pending(
            &device.site_id,
            "email",
            recipient,
            format!("Device passcode reset: {name}"),
            format!("{before}{PASSCODE_PLACEHOLDER}{after}"),
            now,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(complexity: PasscodeComplexity, min_length: u32) -> PasscodePolicy {
        PasscodePolicy {
            required: true,
            min_length,
            complexity,
            max_age_days: 0,
        }
    }

    #[test]
    fn generated_passcodes_satisfy_their_policy() {
        for _ in 0..2000 {
            let pin = generate_device_passcode(&PasscodePolicy::default());
            assert_eq!(pin.len(), 8);
            assert!(pin.bytes().all(|b| b.is_ascii_digit()));

            let alnum = generate_device_passcode(&policy(PasscodeComplexity::Alphanumeric, 10));
            assert_eq!(alnum.len(), 10);
            assert!(
                alnum.bytes().any(|b| b.is_ascii_digit())
                    && alnum.bytes().any(|b| b.is_ascii_alphabetic())
            );

            let complex = generate_device_passcode(&policy(PasscodeComplexity::Complex, 4));
            assert_eq!(complex.len(), 8, "never shorter than 8");
            assert!(complex.bytes().any(|b| b.is_ascii_digit()));
            assert!(complex.bytes().any(|b| b.is_ascii_lowercase()));
            assert!(complex.bytes().any(|b| b.is_ascii_uppercase()));
            assert!(complex.bytes().any(|b| SYMBOLS.contains(&b)));
        }
    }

    fn device_named(hostname: &str, user_email: &str) -> Device {
        Device {
            device_id: "dv_1".into(),
            site_id: "st_1".into(),
            user_email: user_email.into(),
            facts: crate::model::DeviceFacts {
                platform: crate::model::Platform::Linux,
                os_version: String::new(),
                model: String::new(),
                serial_number: "S".into(),
                hostname: hostname.into(),
                agent_version: String::new(),
                capabilities: Vec::new(),
            },
            status: DeviceStatus::Active,
            enrolled_at: 0,
            last_seen: None,
            certificates: Vec::new(),
            replaces_device_id: None,
            replaced_by_device_id: None,
            security: Default::default(),
        }
    }

    #[test]
    fn the_passcode_goes_into_its_one_place_whatever_the_device_says() {
        let device = device_named("x{passcode}y", "a{passcode}b@example.com");
        let email = reset_email(
            &device,
            "ac_1",
            "admin@example.com",
            "r@example.com".into(),
            0,
        );
        let body = email.with_passcode("S3CRET").unwrap();
        assert_eq!(body.matches("S3CRET").count(), 1, "{}", body.as_str());
        assert!(body.contains("The new passcode is: S3CRET\n"));
        assert!(body.contains("device x{passcode}y (dv_1)"));
        assert!(body.contains("used by a{passcode}b@example.com."));
        assert_eq!(email.subject, "Device passcode reset: x{passcode}y");

        // A record queued before `passcode_at` existed: the last placeholder.
        let legacy = Notification {
            passcode_at: None,
            ..email.clone()
        };
        assert_eq!(
            legacy.with_passcode("S3CRET").unwrap().as_str(),
            body.as_str()
        );
        // A position that does not hold the placeholder fills nothing.
        for at in [0, 1, email.body_text.len(), usize::MAX] {
            let broken = Notification {
                passcode_at: Some(at),
                ..email.clone()
            };
            assert!(broken.with_passcode("S3CRET").is_none());
        }
    }

    #[test]
    fn policies_out_of_range_are_refused() {
        assert!(validate_policy(&policy(PasscodeComplexity::Numeric, 3)).is_err());
        assert!(validate_policy(&policy(PasscodeComplexity::Numeric, 65)).is_err());
        assert!(validate_policy(&policy(PasscodeComplexity::Numeric, 4)).is_ok());
    }
}
