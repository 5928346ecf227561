//! The pure rules of commands and company passcodes: how a command moves
//! on an agent's report, which older commands a new one supersedes, when a
//! command may be canceled or has expired, how a wrong passcode is counted.
//! Every backend applies them inside its own unit of work, so the rules
//! are written once and the backends only decide how to make them atomic.

use crate::model::{
    Action, ActionStatus, ActionType, CompanyPasscodeRecord, FailureCode, MAX_REMEMBERED_SOURCES,
    Millis, PasscodeState,
};

/// Why an older lock or reset was canceled.
pub const SUPERSEDED: &str = "SUPERSEDED";
pub const SENT_DETAIL: &str = "sent to the device";

/// What an agent reported about one of its commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentReport {
    Acknowledged,
    Progress(String),
    Succeeded(String),
    Failed { code: FailureCode, message: String },
}

/// Moves `action` along by one agent report; false when nothing changed.
pub fn apply_report(action: &mut Action, report: &AgentReport, now: Millis) -> bool {
    if action.status.is_terminal() {
        if action.status == ActionStatus::Canceled
            && matches!(
                report,
                AgentReport::Succeeded(_) | AgentReport::Failed { .. }
            )
        {
            // Record what the device says happened after the cancel.
            action.timeline.push(crate::model::ActionEvent {
                status: action.status,
                at: now,
                detail: format!("reported after cancel: {report:?}"),
            });
            return true;
        }
        return false;
    }
    match report {
        AgentReport::Acknowledged => {
            action.advance(ActionStatus::Acknowledged, "stored by the agent", now)
        }
        AgentReport::Progress(step) => action.advance(ActionStatus::InProgress, step.clone(), now),
        AgentReport::Succeeded(message) => {
            action.advance(ActionStatus::Succeeded, message.clone(), now)
        }
        AgentReport::Failed { code, message } => {
            let status = if *code == FailureCode::Expired {
                ActionStatus::Expired
            } else {
                ActionStatus::Failed
            };
            let changed = action.advance(status, message.clone(), now);
            if changed {
                action.failure_code = Some(*code);
                action.failure_reason = message.clone();
            }
            changed
        }
    }
}

fn supersedes(kind: ActionType) -> bool {
    matches!(kind, ActionType::Lock | ActionType::ResetPasscode)
}

/// What queueing `action` does to the device's queued commands (oldest
/// first): the PENDING locks and resets a new lock or reset supersedes
/// (returned, already canceled), and whether the new one goes straight out
/// as SENT (the device is `online` and no older command waits to go first;
/// `action` is then advanced to SENT).
pub fn plan_queue(
    action: &mut Action,
    queued: Vec<Action>,
    online: bool,
    now: Millis,
) -> (Vec<Action>, bool) {
    let mut superseded = Vec::new();
    let mut older_waits = false;
    for mut older in queued {
        if supersedes(action.action_type)
            && supersedes(older.action_type)
            && older.status == ActionStatus::Pending
            && older.advance(ActionStatus::Canceled, SUPERSEDED, now)
        {
            older.failure_reason = format!("{SUPERSEDED} by {}", action.action_id);
            superseded.push(older);
        } else if older.status == ActionStatus::Pending {
            older_waits = true;
        }
    }
    // Commands go out in queue order: one behind an unsent command waits its turn.
    let direct = online && !older_waits;
    if direct {
        action.advance(ActionStatus::Sent, SENT_DETAIL, now);
    }
    (superseded, direct)
}

/// Marks a PENDING command SENT; false when it is not PENDING.
pub fn mark_sent(action: &mut Action, now: Millis) -> bool {
    action.status == ActionStatus::Pending && action.advance(ActionStatus::Sent, SENT_DETAIL, now)
}

/// Cancels a command the device has not acknowledged; the status that
/// forbids it otherwise.
pub fn cancel(action: &mut Action, by: &str, now: Millis) -> Result<(), ActionStatus> {
    if !matches!(action.status, ActionStatus::Pending | ActionStatus::Sent)
        || action.payload.is_none()
    {
        return Err(action.status);
    }
    action.failure_reason = format!("canceled by {by}");
    action.advance(ActionStatus::Canceled, format!("canceled by {by}"), now);
    Ok(())
}

/// Expires a queued command whose time ran out; false when it has not.
pub fn expire(action: &mut Action, now: Millis) -> bool {
    if action.expires_at > now {
        return false;
    }
    let changed = action.advance(ActionStatus::Expired, "not applied before its expiry", now);
    if changed {
        action.failure_code = Some(FailureCode::Expired);
        action.failure_reason = "expired before the device applied it".into();
    }
    changed
}

/// What counting one wrong passcode does to an enabled record: counted,
/// and locked out when it reaches `limit` (true). A record not enabled is
/// left alone (None).
pub fn count_failed_attempt(
    record: &mut CompanyPasscodeRecord,
    limit: u32,
    now: Millis,
    source: &str,
) -> Option<bool> {
    if record.state != PasscodeState::Enabled {
        return None;
    }
    record.failed_attempts += 1;
    record.last_failed_at = Some(now);
    if !record.failed_sources.iter().any(|s| s == source) {
        if record.failed_sources.len() >= MAX_REMEMBERED_SOURCES {
            record.failed_sources.remove(0);
        }
        record.failed_sources.push(source.to_owned());
    }
    if record.failed_attempts < limit {
        return Some(false);
    }
    record.state = PasscodeState::LockedOut;
    Some(true)
}
