//! Domain values: what the server stores and reasons about. No prost types
//! here; the `api` modules convert at the edge. Times are Unix milliseconds.

use serde::{Deserialize, Serialize};

pub type Millis = i64;

pub fn now_millis() -> Millis {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as Millis
}

/// Wrong passcodes allowed before lockout, when a site does not say.
pub const DEFAULT_FAILED_ATTEMPT_LIMIT: u32 = 10;
pub const FAILED_ATTEMPT_LIMIT_RANGE: std::ops::RangeInclusive<u32> = 1..=100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub site_id: String,
    pub display_name: String,
    pub failed_attempt_limit: u32,
    pub created_at: Millis,
    /// Days the latest reset passcode stays visible; 0 means always.
    #[serde(default)]
    pub reset_passcode_visible_days: u32,
    #[serde(default)]
    pub passcode_policy: PasscodePolicy,
    #[serde(default)]
    pub webhook: Option<Webhook>,
}

/// Where a site's security events are posted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub url: String,
    /// The signing key, sealed with the server's webhook key.
    pub secret_sealed: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PasscodeComplexity {
    /// Digits only.
    Numeric,
    /// Letters and digits, at least one of each.
    Alphanumeric,
    /// Lower- and upper-case letters, digits and a symbol.
    Complex,
}

/// The passcode rules a site enforces on its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasscodePolicy {
    pub required: bool,
    pub min_length: u32,
    pub complexity: PasscodeComplexity,
    /// 0 means no limit.
    pub max_age_days: u32,
}

impl Default for PasscodePolicy {
    /// A passcode is required; resets generate 8 digits.
    fn default() -> Self {
        Self {
            required: true,
            min_length: 8,
            complexity: PasscodeComplexity::Numeric,
            max_age_days: 0,
        }
    }
}

pub const PASSCODE_LENGTH_RANGE: std::ops::RangeInclusive<u32> = 4..=64;

/// What the agent says about the device's passcode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compliance {
    pub has_passcode: bool,
    pub meets_policy: bool,
    pub reason: String,
}

/// The latest remote passcode reset of a device; the passcode sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatestReset {
    pub passcode_sealed: String,
    pub reset_at: Millis,
    pub reset_by: String,
    pub action_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSecurity {
    pub compliance: Option<Compliance>,
    /// Set by versions up to schema 2's first release; the action log now
    /// answers whether a device was locked. Kept so records stay readable
    /// both ways.
    #[serde(default)]
    pub locked: bool,
    pub latest_reset: Option<LatestReset>,
}

/// One entry of a device's audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: Millis,
    pub who: String,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub user_id: String,
    pub site_id: String,
    /// Lower case.
    pub email: String,
    pub display_name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PasscodeState {
    NotGenerated,
    Enabled,
    Disabled,
    LockedOut,
}

/// How many failure sources a passcode record remembers for alerts.
pub const MAX_REMEMBERED_SOURCES: usize = 32;
/// The longest a command may wait for its device (storage relies on it to
/// know how far back open commands can be).
pub const MAX_COMMAND_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// A site's company passcode as stored: a keyed hash, never the passcode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompanyPasscodeRecord {
    pub site_id: String,
    pub state: PasscodeState,
    /// HMAC-SHA256 of the passcode under the server's passcode key, hex.
    pub hash: String,
    pub generated_at: Millis,
    pub generated_by: String,
    pub failed_attempts: u32,
    pub last_failed_at: Option<Millis>,
    pub last_used_at: Option<Millis>,
    pub enrollments: u32,
    /// Distinct source addresses of failed attempts, oldest first, bounded.
    pub failed_sources: Vec<String>,
    /// A lockout alert (and its notifications) committed with this record
    /// but not yet copied to the alert log and outbox; see `storage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_lockout: Option<PendingLockout>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLockout {
    pub alert: Alert,
    pub notifications: Vec<Notification>,
}

/// What an admin may see of a site's company passcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompanyPasscodeInfo {
    pub state: PasscodeState,
    pub generated_at: Option<Millis>,
    pub generated_by: String,
    pub failed_attempts: u32,
    pub failed_attempt_limit: u32,
    pub last_failed_at: Option<Millis>,
    pub last_used_at: Option<Millis>,
    pub enrollments: u32,
}

impl CompanyPasscodeInfo {
    pub fn of(site: &Site, record: Option<&CompanyPasscodeRecord>) -> Self {
        match record {
            None => Self {
                state: PasscodeState::NotGenerated,
                generated_at: None,
                generated_by: String::new(),
                failed_attempts: 0,
                failed_attempt_limit: site.failed_attempt_limit,
                last_failed_at: None,
                last_used_at: None,
                enrollments: 0,
            },
            Some(r) => Self {
                state: r.state,
                generated_at: Some(r.generated_at),
                generated_by: r.generated_by.clone(),
                failed_attempts: r.failed_attempts,
                failed_attempt_limit: site.failed_attempt_limit,
                last_failed_at: r.last_failed_at,
                last_used_at: r.last_used_at,
                enrollments: r.enrollments,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertKind {
    CompanyPasscodeLockedOut,
    DuplicateDeviceSerial,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub alert_id: String,
    pub site_id: String,
    pub kind: AlertKind,
    pub created_at: Millis,
    pub details: String,
    pub failed_attempts: u32,
    pub source_addresses: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotificationState {
    Pending,
    Delivered,
    Failed,
}

/// Where a reset email's body shows the passcode, filled in at delivery.
pub const PASSCODE_PLACEHOLDER: &str = "{passcode}";

/// A message waiting in (or delivered from) the durable outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub notification_id: String,
    pub site_id: String,
    /// "email" (or "webhook").
    pub channel: String,
    pub recipient: String,
    pub subject: String,
    pub body_text: String,
    /// The action whose (sealed) reset passcode replaces `{passcode}` in
    /// the body at delivery, so the outbox never holds it in plaintext.
    #[serde(default)]
    pub passcode_of_action: Option<String>,
    /// Byte offset in `body_text` of the one placeholder that gets the
    /// passcode: text around it (a host name, an email) may hold the same
    /// characters and must stay as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passcode_at: Option<usize>,
    pub state: NotificationState,
    pub attempts: u32,
    pub last_error: String,
    pub created_at: Millis,
    pub next_attempt_at: Millis,
    pub delivered_at: Option<Millis>,
}

impl Notification {
    /// A notification waiting for its first delivery attempt, due now.
    pub fn pending(
        site_id: &str,
        channel: &str,
        recipient: String,
        subject: String,
        body_text: String,
        now: Millis,
    ) -> Self {
        Self {
            notification_id: time_ordered_id(),
            site_id: site_id.to_owned(),
            channel: channel.to_owned(),
            recipient,
            subject,
            body_text,
            passcode_of_action: None,
            passcode_at: None,
            state: NotificationState::Pending,
            attempts: 0,
            last_error: String::new(),
            created_at: now,
            next_attempt_at: now,
            delivered_at: None,
        }
    }
}

/// Time-ordered unique id (UUID v7) for records listed by time.
pub fn time_ordered_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Short random id with a type prefix, e.g. `st_k3m9x2q8w4ab`, easy to
/// type in a grpcurl command.
pub fn short_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let bytes: [u8; 12] = crate::crypto::os_random();
    let body: String = bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    format!("{prefix}_{body}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Platform {
    Unspecified,
    Linux,
    MacOs,
    Windows,
    Android,
    Ios,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActionType {
    ResetPasscode,
    Lock,
    Unenroll,
}

/// Whether the device can perform one kind of action, as its agent says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub action: ActionType,
    pub supported: bool,
    pub reason: String,
}

/// What the agent reports about its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFacts {
    pub platform: Platform,
    pub os_version: String,
    pub model: String,
    pub serial_number: String,
    pub hostname: String,
    pub agent_version: String,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceStatus {
    Active,
    Unenrolled,
    Replaced,
}

/// A device certificate the server issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedDeviceCert {
    pub serial: String,
    pub expires_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub device_id: String,
    pub site_id: String,
    pub user_email: String,
    pub facts: DeviceFacts,
    pub status: DeviceStatus,
    pub enrolled_at: Millis,
    pub last_seen: Option<Millis>,
    /// The newest certificate first; the previous one stays valid until it
    /// expires, so an agent keeps working while it switches to the new one.
    pub certificates: Vec<IssuedDeviceCert>,
    pub replaces_device_id: Option<String>,
    pub replaced_by_device_id: Option<String>,
    #[serde(default)]
    pub security: DeviceSecurity,
}

impl Device {
    pub fn accepts_certificate(&self, serial: &str, now: Millis) -> bool {
        self.status == DeviceStatus::Active
            && self
                .certificates
                .iter()
                .any(|c| c.serial == serial && c.expires_at > now)
    }

    pub fn certificate_expires_at(&self) -> Option<Millis> {
        self.certificates.first().map(|c| c.expires_at)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionStatus {
    Pending,
    Sent,
    Acknowledged,
    InProgress,
    Succeeded,
    Failed,
    Expired,
    Canceled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionEvent {
    pub status: ActionStatus,
    pub at: Millis,
    pub detail: String,
}

impl ActionStatus {
    /// Final: no further transition.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ActionStatus::Succeeded
                | ActionStatus::Failed
                | ActionStatus::Expired
                | ActionStatus::Canceled
        )
    }

    /// Position in the forward progression; transitions never go back.
    pub fn rank(self) -> u8 {
        match self {
            ActionStatus::Pending => 0,
            ActionStatus::Sent => 1,
            ActionStatus::Acknowledged => 2,
            ActionStatus::InProgress => 3,
            ActionStatus::Succeeded
            | ActionStatus::Failed
            | ActionStatus::Expired
            | ActionStatus::Canceled => 4,
        }
    }
}

/// Why an action failed, as the agent (or the server) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureCode {
    Unsupported,
    Permission,
    Policy,
    Internal,
    Expired,
}

/// What the device is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandPayload {
    Lock {
        message: String,
    },
    /// The new passcode, sealed with the server's reset-passcode key.
    ResetPasscode {
        passcode_sealed: String,
        message: String,
    },
    Unenroll,
}

/// Events one action's timeline keeps; progress steps beyond it are dropped,
/// leaving room for the final status.
pub const MAX_TIMELINE_EVENTS: usize = 64;

/// A security action on a device, with its status history. Actions that
/// go to the device are also its commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub action_id: String,
    pub site_id: String,
    pub device_id: String,
    pub action_type: ActionType,
    pub status: ActionStatus,
    pub created_by: String,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub timeline: Vec<ActionEvent>,
    pub failure_reason: String,
    #[serde(default)]
    pub failure_code: Option<FailureCode>,
    /// After this moment the command is not applied; 0 when it never went to a device.
    #[serde(default)]
    pub expires_at: Millis,
    #[serde(default)]
    pub payload: Option<CommandPayload>,
}

impl Action {
    /// A new action on `device`, `PENDING` since `now`.
    pub fn pending(
        action_id: String,
        device: &Device,
        action_type: ActionType,
        created_by: &str,
        detail: &str,
        now: Millis,
    ) -> Self {
        Self {
            action_id,
            site_id: device.site_id.clone(),
            device_id: device.device_id.clone(),
            action_type,
            status: ActionStatus::Pending,
            created_by: created_by.to_owned(),
            created_at: now,
            updated_at: now,
            timeline: vec![ActionEvent {
                status: ActionStatus::Pending,
                at: now,
                detail: detail.to_owned(),
            }],
            failure_reason: String::new(),
            failure_code: None,
            expires_at: 0,
            payload: None,
        }
    }

    /// Moves to `status` with a timeline entry; refuses to go backwards or
    /// to leave a final status. Returns whether anything changed.
    pub fn advance(&mut self, status: ActionStatus, detail: impl Into<String>, at: Millis) -> bool {
        if self.status.is_terminal() || status.rank() < self.status.rank() {
            return false;
        }
        if status == self.status && status != ActionStatus::InProgress {
            return false;
        }
        // A device cannot grow its action record without bound with progress steps.
        if status == ActionStatus::InProgress
            && self.timeline.len() >= MAX_TIMELINE_EVENTS.saturating_sub(1)
        {
            return false;
        }
        self.status = status;
        self.updated_at = at;
        self.timeline.push(ActionEvent {
            status,
            at,
            detail: detail.into(),
        });
        true
    }

    /// Whether the command still waits in the device's queue.
    pub fn is_queued(&self) -> bool {
        self.payload.is_some() && !self.status.is_terminal()
    }
}

impl Notification {
    /// `body_text` with `passcode` in place of the placeholder at
    /// `passcode_at`. Records written before `passcode_at` existed have their
    /// one real placeholder last: only server-made text (the action id)
    /// follows it in that template.
    pub fn with_passcode(&self, passcode: &str) -> Option<zeroize::Zeroizing<String>> {
        let body = &self.body_text;
        let at = match self.passcode_at {
            Some(at) => at,
            None => body.rfind(PASSCODE_PLACEHOLDER)?,
        };
        let end = at.checked_add(PASSCODE_PLACEHOLDER.len())?;
        if body.get(at..end)? != PASSCODE_PLACEHOLDER {
            return None;
        }
        let mut filled =
            zeroize::Zeroizing::new(String::with_capacity(body.len() + passcode.len()));
        filled.push_str(body.get(..at)?);
        filled.push_str(passcode);
        filled.push_str(body.get(end..)?);
        Some(filled)
    }
}

/// A pragmatic email check: one '@', non-empty local part, a domain of
/// dot-separated labels, no spaces or control characters.
pub fn validate_email(email: &str) -> Result<(), &'static str> {
    if email.len() > 254 {
        return Err("is longer than 254 characters");
    }
    let (local, domain) = email.split_once('@').ok_or("has no '@'")?;
    if local.is_empty() || local.len() > 64 {
        return Err("has an empty or too long local part");
    }
    if domain.contains('@') {
        return Err("has more than one '@'");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains spaces or control characters");
    }
    if domain.is_empty()
        || domain.split('.').any(|label| {
            label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
    {
        return Err("has an invalid domain");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn progress_steps_cannot_grow_a_timeline_without_bound_and_the_result_still_lands() {
        let device = Device {
            device_id: "dv_1".into(),
            site_id: "st_1".into(),
            user_email: "a@example.com".into(),
            facts: DeviceFacts {
                platform: Platform::Linux,
                os_version: String::new(),
                model: String::new(),
                serial_number: "S1".into(),
                hostname: String::new(),
                agent_version: String::new(),
                capabilities: Vec::new(),
            },
            status: DeviceStatus::Active,
            enrolled_at: 0,
            last_seen: None,
            certificates: Vec::new(),
            replaces_device_id: None,
            replaced_by_device_id: None,
            security: DeviceSecurity::default(),
        };
        let mut action =
            Action::pending("ac_1".into(), &device, ActionType::Lock, "me", "queued", 0);
        for step in 0..1000 {
            action.advance(ActionStatus::InProgress, format!("step {step}"), step);
        }
        assert_eq!(action.timeline.len(), MAX_TIMELINE_EVENTS - 1);
        assert!(action.advance(ActionStatus::Succeeded, "done", 1000));
        assert_eq!(action.timeline.len(), MAX_TIMELINE_EVENTS);
        assert_eq!(action.status, ActionStatus::Succeeded);
    }
}
