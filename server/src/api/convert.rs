//! Domain ⇄ proto conversions, and the edge checks every service shares.

use mdm_proto::v1 as pb;
use prost_types::Timestamp;
use tonic::Status;

use crate::error::Error;
use crate::identity::AdminIdentity;
use crate::model::{
    Alert, AlertKind, CompanyPasscodeInfo, Millis, Notification, NotificationState, PasscodeState,
    Site, User,
};

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
        .into()),
    }
}

/// A required id field: present and of a sane shape.
pub fn required_id<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")).into());
    }
    if value.len() > 128 || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::InvalidArgument(format!("{field} {value:?} is not a valid id")).into());
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
        .into())
    }
}

pub fn authorize_owner(identity: &AdminIdentity, action: &str) -> Result<(), Status> {
    if identity.is_owner() {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!("only an owner may {action}")).into())
    }
}

pub fn site(site: Site) -> pb::Site {
    pb::Site {
        site_id: site.site_id,
        display_name: site.display_name,
        failed_attempt_limit: site.failed_attempt_limit,
        created_at: Some(timestamp(site.created_at)),
        reset_passcode_visible_days: site.reset_passcode_visible_days,
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
