//! Domain ⇄ proto conversions, and the edge checks every service shares.

use crate::error::IntoStatus;
use mdm_proto::v1 as pb;
use prost_types::Timestamp;
use tonic::Status;

use crate::error::Error;
use crate::identity::AdminIdentity;
use crate::model::{
    Action, ActionStatus, ActionType, Alert, AlertKind, AuditEntry, Capability, CommandPayload,
    CompanyPasscodeInfo, Compliance, Device, DeviceFacts, DeviceStatus, FailureCode, Millis,
    Notification, NotificationState, PasscodeComplexity, PasscodePolicy, PasscodeState, Platform,
    Site, User,
};
use mdm_core::domain::commands::AgentReport;
use mdm_core::domain::reset::SecurityView;

pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

pub fn timestamp(millis: Millis) -> Timestamp {
    Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn opt_timestamp(millis: Option<Millis>) -> Option<Timestamp> {
    millis.map(timestamp)
}

pub fn page_size(requested: u32) -> Result<usize, Status> {
    match requested as usize {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(Error::InvalidArgument(format!(
            "page_size must be at most {MAX_PAGE_SIZE}, got {n}"
        ))
        .into_status()),
    }
}

/// The page a list request asks for.
pub fn page_request(
    token: &str,
    requested: u32,
) -> Result<mdm_core::store::PageRequest<'_>, Status> {
    Ok(mdm_core::store::PageRequest {
        token,
        limit: page_size(requested)?,
    })
}

/// A required id field: present and of a sane shape.
pub fn required_id<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")).into_status());
    }
    if value.len() > 128 || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(
            Error::InvalidArgument(format!("{field} {value:?} is not a valid id")).into_status(),
        );
    }
    Ok(value)
}

/// The caller may manage `site_id` (owners: every site).
pub fn authorize_site(identity: &AdminIdentity, site_id: &str) -> Result<(), Status> {
    if identity.may_manage_site(site_id) {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "{} is not an admin of site {site_id}",
            identity.email
        ))
        .into_status())
    }
}

/// The caller may see an object of `site_id` it named by id; an object of
/// another site gets the same NOT_FOUND as an id that names nothing, so a
/// site admin cannot learn which ids exist elsewhere.
pub fn authorize_object(
    identity: &AdminIdentity,
    site_id: &str,
    kind: &str,
    id: &str,
) -> Result<(), Status> {
    if identity.may_manage_site(site_id) {
        return Ok(());
    }
    tracing::warn!(admin = %identity.email, kind, id, site_id, "an object of a site the admin does not manage was asked for");
    Err(Error::no_such(kind, id).into_status())
}

pub fn authorize_owner(identity: &AdminIdentity, action: &str) -> Result<(), Status> {
    if identity.is_owner() {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!("only an owner may {action}")).into_status())
    }
}

pub fn site(site: Site) -> pb::Site {
    pb::Site {
        site_id: site.site_id,
        display_name: site.display_name,
        failed_attempt_limit: site.failed_attempt_limit,
        created_at: Some(timestamp(site.created_at)),
        reset_passcode_visible_days: site.reset_passcode_visible_days,
        webhook_url: site.webhook.map(|w| w.url).unwrap_or_default(),
    }
}

pub fn user(user: User) -> pb::User {
    pb::User {
        user_id: user.user_id,
        site_id: user.site_id,
        email: user.email,
        display_name: user.display_name,
        created_at: Some(timestamp(user.created_at)),
    }
}

pub fn passcode_info(info: CompanyPasscodeInfo) -> pb::CompanyPasscodeInfo {
    let state = match info.state {
        PasscodeState::NotGenerated => pb::CompanyPasscodeState::NotGenerated,
        PasscodeState::Enabled => pb::CompanyPasscodeState::Enabled,
        PasscodeState::Disabled => pb::CompanyPasscodeState::Disabled,
        PasscodeState::LockedOut => pb::CompanyPasscodeState::LockedOut,
    };
    pb::CompanyPasscodeInfo {
        state: state.into(),
        generated_at: opt_timestamp(info.generated_at),
        generated_by: info.generated_by,
        failed_attempts: info.failed_attempts,
        failed_attempt_limit: info.failed_attempt_limit,
        last_failed_at: opt_timestamp(info.last_failed_at),
        last_used_at: opt_timestamp(info.last_used_at),
        enrollments: info.enrollments,
    }
}

pub fn alert(alert: Alert) -> pb::Alert {
    let kind = match alert.kind {
        AlertKind::CompanyPasscodeLockedOut => pb::AlertKind::CompanyPasscodeLockedOut,
        AlertKind::DuplicateDeviceSerial => pb::AlertKind::DuplicateDeviceSerial,
    };
    pb::Alert {
        alert_id: alert.alert_id,
        site_id: alert.site_id,
        kind: kind.into(),
        created_at: Some(timestamp(alert.created_at)),
        details: alert.details,
        failed_attempts: alert.failed_attempts,
        source_addresses: alert.source_addresses,
    }
}

pub fn notification_state(state: NotificationState) -> pb::NotificationState {
    match state {
        NotificationState::Pending => pb::NotificationState::Pending,
        NotificationState::Delivered => pb::NotificationState::Delivered,
        NotificationState::Failed => pb::NotificationState::Failed,
    }
}

pub fn notification(n: Notification) -> pb::Notification {
    pb::Notification {
        notification_id: n.notification_id,
        site_id: n.site_id,
        channel: n.channel,
        recipient: n.recipient,
        subject: n.subject,
        state: notification_state(n.state).into(),
        attempts: n.attempts,
        last_error: n.last_error,
        created_at: Some(timestamp(n.created_at)),
        next_attempt_at: Some(timestamp(n.next_attempt_at)),
        delivered_at: opt_timestamp(n.delivered_at),
    }
}

pub fn platform_from_proto(platform: pb::Platform) -> Platform {
    match platform {
        pb::Platform::Unspecified => Platform::Unspecified,
        pb::Platform::Linux => Platform::Linux,
        pb::Platform::Macos => Platform::MacOs,
        pb::Platform::Windows => Platform::Windows,
        pb::Platform::Android => Platform::Android,
        pb::Platform::Ios => Platform::Ios,
    }
}

pub fn platform(platform: Platform) -> pb::Platform {
    match platform {
        Platform::Unspecified => pb::Platform::Unspecified,
        Platform::Linux => pb::Platform::Linux,
        Platform::MacOs => pb::Platform::Macos,
        Platform::Windows => pb::Platform::Windows,
        Platform::Android => pb::Platform::Android,
        Platform::Ios => pb::Platform::Ios,
    }
}

pub fn action_type_from_proto(action: pb::ActionType) -> Option<ActionType> {
    match action {
        pb::ActionType::Unspecified => None,
        pb::ActionType::ResetPasscode => Some(ActionType::ResetPasscode),
        pb::ActionType::Lock => Some(ActionType::Lock),
        pb::ActionType::Unenroll => Some(ActionType::Unenroll),
    }
}

pub fn action_type(action: ActionType) -> pb::ActionType {
    match action {
        ActionType::ResetPasscode => pb::ActionType::ResetPasscode,
        ActionType::Lock => pb::ActionType::Lock,
        ActionType::Unenroll => pb::ActionType::Unenroll,
    }
}

pub fn device_status_from_proto(status: pb::DeviceStatus) -> Option<DeviceStatus> {
    match status {
        pb::DeviceStatus::Unspecified => None,
        pb::DeviceStatus::Active => Some(DeviceStatus::Active),
        pb::DeviceStatus::Unenrolled => Some(DeviceStatus::Unenrolled),
        pb::DeviceStatus::Replaced => Some(DeviceStatus::Replaced),
    }
}

pub fn device_status(status: DeviceStatus) -> pb::DeviceStatus {
    match status {
        DeviceStatus::Active => pb::DeviceStatus::Active,
        DeviceStatus::Unenrolled => pb::DeviceStatus::Unenrolled,
        DeviceStatus::Replaced => pb::DeviceStatus::Replaced,
    }
}

pub fn action_status_from_proto(status: pb::ActionStatus) -> Option<ActionStatus> {
    match status {
        pb::ActionStatus::Unspecified => None,
        pb::ActionStatus::Pending => Some(ActionStatus::Pending),
        pb::ActionStatus::Sent => Some(ActionStatus::Sent),
        pb::ActionStatus::Acknowledged => Some(ActionStatus::Acknowledged),
        pb::ActionStatus::InProgress => Some(ActionStatus::InProgress),
        pb::ActionStatus::Succeeded => Some(ActionStatus::Succeeded),
        pb::ActionStatus::Failed => Some(ActionStatus::Failed),
        pb::ActionStatus::Expired => Some(ActionStatus::Expired),
        pb::ActionStatus::Canceled => Some(ActionStatus::Canceled),
    }
}

pub fn action_status(status: ActionStatus) -> pb::ActionStatus {
    match status {
        ActionStatus::Pending => pb::ActionStatus::Pending,
        ActionStatus::Sent => pb::ActionStatus::Sent,
        ActionStatus::Acknowledged => pb::ActionStatus::Acknowledged,
        ActionStatus::InProgress => pb::ActionStatus::InProgress,
        ActionStatus::Succeeded => pb::ActionStatus::Succeeded,
        ActionStatus::Failed => pb::ActionStatus::Failed,
        ActionStatus::Expired => pb::ActionStatus::Expired,
        ActionStatus::Canceled => pb::ActionStatus::Canceled,
    }
}

/// Checks and converts the facts an agent reports; strings are bounded so
/// a client cannot make us store megabytes per device.
pub fn device_facts(facts: pb::DeviceFacts) -> Result<DeviceFacts, String> {
    fn bounded(field: &str, value: String) -> Result<String, String> {
        if value.chars().count() > 256 || value.chars().any(char::is_control) {
            return Err(format!("{field} must be at most 256 printable characters"));
        }
        Ok(value)
    }
    if facts.capabilities.len() > 32 {
        return Err("too many capabilities".into());
    }
    let platform = platform_from_proto(facts.platform());
    let capabilities = facts
        .capabilities
        .into_iter()
        .filter_map(|c| {
            let action = action_type_from_proto(c.action())?;
            Some(
                bounded("capability reason", c.reason).map(|reason| Capability {
                    action,
                    supported: c.supported,
                    reason,
                }),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DeviceFacts {
        platform,
        os_version: bounded("os_version", facts.os_version)?,
        model: bounded("model", facts.model)?,
        serial_number: bounded("serial_number", facts.serial_number)?,
        hostname: bounded("hostname", facts.hostname)?,
        agent_version: bounded("agent_version", facts.agent_version)?,
        capabilities,
    })
}

pub fn device(device: Device, online: bool) -> pb::Device {
    let certificate_expires_at = device.certificate_expires_at().map(timestamp);
    pb::Device {
        device_id: device.device_id,
        site_id: device.site_id,
        user_email: device.user_email,
        platform: platform(device.facts.platform).into(),
        os_version: device.facts.os_version,
        hostname: device.facts.hostname,
        online,
        last_seen: opt_timestamp(device.last_seen),
        status: device_status(device.status).into(),
        security: None,
        model: device.facts.model,
        serial_number: device.facts.serial_number,
        agent_version: device.facts.agent_version,
        capabilities: device
            .facts
            .capabilities
            .into_iter()
            .map(|c| pb::DeviceCapability {
                action: action_type(c.action).into(),
                supported: c.supported,
                reason: c.reason,
            })
            .collect(),
        enrolled_at: Some(timestamp(device.enrolled_at)),
        certificate_expires_at,
        replaces_device_id: device.replaces_device_id.unwrap_or_default(),
    }
}

pub fn action(action: Action) -> pb::Action {
    pb::Action {
        action_id: action.action_id,
        site_id: action.site_id,
        device_id: action.device_id,
        r#type: action_type(action.action_type).into(),
        status: action_status(action.status).into(),
        created_by: action.created_by,
        created_at: Some(timestamp(action.created_at)),
        updated_at: Some(timestamp(action.updated_at)),
        timeline: action
            .timeline
            .into_iter()
            .map(|e| pb::ActionEvent {
                status: action_status(e.status).into(),
                at: Some(timestamp(e.at)),
                detail: e.detail,
            })
            .collect(),
        failure_reason: action.failure_reason,
        failure_code: action
            .failure_code
            .map_or(pb::FailureCode::Unspecified, failure_code)
            .into(),
        expires_at: (action.expires_at > 0).then(|| timestamp(action.expires_at)),
    }
}

pub fn failure_code(code: FailureCode) -> pb::FailureCode {
    match code {
        FailureCode::Unsupported => pb::FailureCode::Unsupported,
        FailureCode::Permission => pb::FailureCode::Permission,
        FailureCode::Policy => pb::FailureCode::Policy,
        FailureCode::Internal => pb::FailureCode::Internal,
        FailureCode::Expired => pb::FailureCode::Expired,
    }
}

pub fn failure_code_from_proto(code: pb::FailureCode) -> FailureCode {
    match code {
        pb::FailureCode::Unsupported => FailureCode::Unsupported,
        pb::FailureCode::Permission => FailureCode::Permission,
        pb::FailureCode::Policy => FailureCode::Policy,
        pb::FailureCode::Expired => FailureCode::Expired,
        pb::FailureCode::Internal | pb::FailureCode::Unspecified => FailureCode::Internal,
    }
}

/// The command an action sends to its device, if it is one. A reset
/// command needs its passcode, unsealed by the caller.
pub fn command(action: &Action, passcode: Option<&str>) -> Option<pb::Command> {
    let payload = match action.payload.as_ref()? {
        CommandPayload::Lock { message } => pb::command::Payload::Lock(pb::LockCommand {
            message: message.clone(),
        }),
        CommandPayload::ResetPasscode { message, .. } => {
            pb::command::Payload::ResetPasscode(pb::ResetPasscodeCommand {
                passcode: passcode?.to_owned(),
                message: message.clone(),
            })
        }
        CommandPayload::Unenroll => pb::command::Payload::Unenroll(pb::UnenrollCommand {}),
    };
    Some(pb::Command {
        command_id: action.action_id.clone(),
        r#type: action_type(action.action_type).into(),
        expires_at: Some(timestamp(action.expires_at)),
        payload: Some(payload),
    })
}

/// A proto duration as a std one; negative or absurd values are refused.
pub fn duration(
    field: &str,
    value: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Status> {
    match value {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            Err(Error::InvalidArgument(format!("{field} must not be negative")).into_status())
        }
        Some(d) => Ok(Some(std::time::Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        ))),
    }
}

pub fn millis_of(timestamp: &Timestamp) -> Millis {
    timestamp
        .seconds
        .saturating_mul(1000)
        .saturating_add(Millis::from(
            timestamp.nanos.clamp(0, 999_999_999) / 1_000_000,
        ))
}

/// A lock-screen message: short, printable.
pub fn lock_message(message: String) -> Result<String, Status> {
    if message.chars().count() > 500 || message.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::InvalidArgument(
            "message must be at most 500 printable characters".into(),
        )
        .into_status());
    }
    Ok(message)
}

pub fn policy(policy: PasscodePolicy) -> pb::PasscodePolicy {
    let complexity = match policy.complexity {
        PasscodeComplexity::Numeric => pb::PasscodeComplexity::Numeric,
        PasscodeComplexity::Alphanumeric => pb::PasscodeComplexity::Alphanumeric,
        PasscodeComplexity::Complex => pb::PasscodeComplexity::Complex,
    };
    pb::PasscodePolicy {
        required: policy.required,
        min_length: policy.min_length,
        complexity: complexity.into(),
        max_age_days: policy.max_age_days,
    }
}

pub fn policy_from_proto(policy: Option<pb::PasscodePolicy>) -> Result<PasscodePolicy, Status> {
    let policy =
        policy.ok_or_else(|| Error::InvalidArgument("policy is required".into()).into_status())?;
    let complexity = match policy.complexity() {
        pb::PasscodeComplexity::Numeric => PasscodeComplexity::Numeric,
        pb::PasscodeComplexity::Alphanumeric => PasscodeComplexity::Alphanumeric,
        pb::PasscodeComplexity::Complex => PasscodeComplexity::Complex,
        pb::PasscodeComplexity::Unspecified => {
            return Err(Error::InvalidArgument(
                "policy.complexity is required: PASSCODE_COMPLEXITY_NUMERIC, _ALPHANUMERIC or _COMPLEX".into(),
            )
            .into_status());
        }
    };
    Ok(PasscodePolicy {
        required: policy.required,
        min_length: policy.min_length,
        complexity,
        max_age_days: policy.max_age_days,
    })
}

pub fn compliance_from_proto(compliance: pb::PasscodeCompliance) -> Compliance {
    Compliance {
        has_passcode: compliance.has_passcode,
        meets_policy: compliance.meets_policy,
        reason: compliance.reason.chars().take(256).collect(),
    }
}

/// Longest command id an agent's report may carry; ours are far shorter.
pub const MAX_REPORT_COMMAND_ID_LEN: usize = 64;
/// Longest progress step or result message kept from an agent; longer ones are cut.
pub const MAX_REPORT_TEXT_CHARS: usize = 512;

fn bounded_text(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_REPORT_TEXT_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// A message of an agent's stream, converted and checked at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    /// Facts and compliance: the first message of every stream.
    Hello {
        facts: Option<DeviceFacts>,
        compliance: Option<Compliance>,
    },
    Heartbeat,
    Compliance(Compliance),
    /// A report about one of the device's commands.
    Report {
        command_id: String,
        report: AgentReport,
    },
    /// Nothing to act on; the text says why, for the log.
    Ignored(&'static str),
}

/// Converts and checks one message of an agent's stream. Only a hello can be
/// refused (facts out of bounds); an empty message, or a report whose command
/// id is oversized, is ignored.
pub fn agent_message(message: pb::ConnectRequest) -> Result<AgentMessage, String> {
    use pb::connect_request::Message as Inbound;
    let (command_id, report) = match message.message {
        None => return Ok(AgentMessage::Ignored("empty message ignored")),
        Some(Inbound::Hello(hello)) => {
            return Ok(AgentMessage::Hello {
                facts: hello.facts.map(device_facts).transpose()?,
                compliance: hello.compliance.map(compliance_from_proto),
            });
        }
        Some(Inbound::Heartbeat(_)) => return Ok(AgentMessage::Heartbeat),
        Some(Inbound::Compliance(compliance)) => {
            return Ok(AgentMessage::Compliance(compliance_from_proto(compliance)));
        }
        Some(Inbound::Ack(ack)) => (ack.command_id, AgentReport::Acknowledged),
        Some(Inbound::Progress(progress)) => (
            progress.command_id,
            AgentReport::Progress(bounded_text(progress.step)),
        ),
        Some(Inbound::Result(result)) => {
            let report = if result.succeeded {
                AgentReport::Succeeded(if result.message.is_empty() {
                    "done".into()
                } else {
                    bounded_text(result.message)
                })
            } else {
                AgentReport::Failed {
                    code: failure_code_from_proto(result.failure_code()),
                    message: bounded_text(result.message),
                }
            };
            (result.command_id, report)
        }
    };
    if command_id.len() > MAX_REPORT_COMMAND_ID_LEN {
        return Ok(AgentMessage::Ignored(
            "report with an oversized command id ignored",
        ));
    }
    Ok(AgentMessage::Report { command_id, report })
}

pub fn security(view: SecurityView) -> pb::DeviceSecurity {
    pb::DeviceSecurity {
        compliant: view.compliant,
        locked: view.locked,
        latest_reset_passcode: view
            .latest_reset_passcode
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        reset_at: opt_timestamp(view.reset_at),
        reset_by: view.reset_by,
        compliance: view.compliance.map(|c| pb::PasscodeCompliance {
            has_passcode: c.has_passcode,
            meets_policy: c.meets_policy,
            reason: c.reason,
        }),
    }
}

pub fn audit_entry(entry: AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        at: Some(timestamp(entry.at)),
        who: entry.who,
        what: entry.what,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pb::connect_request::Message as Inbound;

    fn message(message: Inbound) -> Result<AgentMessage, String> {
        agent_message(pb::ConnectRequest {
            message: Some(message),
        })
    }

    #[test]
    fn agent_messages_are_converted_and_bounded_at_the_edge() {
        assert_eq!(
            agent_message(pb::ConnectRequest::default()).unwrap(),
            AgentMessage::Ignored("empty message ignored")
        );
        assert_eq!(
            message(Inbound::Result(pb::CommandResult {
                command_id: "ac_1".into(),
                succeeded: true,
                ..Default::default()
            }))
            .unwrap(),
            AgentMessage::Report {
                command_id: "ac_1".into(),
                report: AgentReport::Succeeded("done".into())
            }
        );
        assert_eq!(
            message(Inbound::Result(pb::CommandResult {
                command_id: "ac_1".into(),
                succeeded: false,
                failure_code: 99,
                message: "no".into(),
            }))
            .unwrap(),
            AgentMessage::Report {
                command_id: "ac_1".into(),
                report: AgentReport::Failed {
                    code: FailureCode::Internal,
                    message: "no".into()
                }
            }
        );
        let Ok(AgentMessage::Report {
            report: AgentReport::Progress(step),
            ..
        }) = message(Inbound::Progress(pb::CommandProgress {
            command_id: "ac_1".into(),
            step: "é".repeat(100_000),
        }))
        else {
            panic!("progress expected");
        };
        assert_eq!(step.chars().count(), MAX_REPORT_TEXT_CHARS + 1);
        assert!(step.ends_with('…'));
        assert!(matches!(
            message(Inbound::Ack(pb::CommandAck {
                command_id: "a".repeat(MAX_REPORT_COMMAND_ID_LEN + 1),
            })),
            Ok(AgentMessage::Ignored(_))
        ));
        let compliance = pb::PasscodeCompliance {
            reason: "x".repeat(1000),
            ..Default::default()
        };
        let Ok(AgentMessage::Compliance(compliance)) = message(Inbound::Compliance(compliance))
        else {
            panic!("compliance expected");
        };
        assert_eq!(compliance.reason.len(), 256);
        let hello = pb::AgentHello {
            facts: Some(pb::DeviceFacts {
                hostname: "bad\u{7}host".into(),
                ..Default::default()
            }),
            compliance: None,
        };
        assert!(
            message(Inbound::Hello(hello))
                .unwrap_err()
                .contains("hostname")
        );
    }
}
