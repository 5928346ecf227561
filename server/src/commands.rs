//! Commands: actions that go to a device. Queued durably per device,
//! delivered at least once over the device's stream, advanced by what the
//! agent reports, expired in the background, canceled or superseded.

use std::time::Duration;

use crate::app::App;
use crate::error::{Error, Result};
use crate::live::StreamSignal;
use crate::model::{
    Action, ActionEvent, ActionStatus, ActionType, CommandPayload, Device, DeviceStatus,
    FailureCode, Millis, now_millis,
};

pub const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub use crate::model::MAX_COMMAND_TTL;
/// Why an older lock or reset was canceled.
pub const SUPERSEDED: &str = "SUPERSEDED";
const SENT_DETAIL: &str = "sent to the device";

/// What an agent reported about one of its commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentReport {
    Acknowledged,
    Progress(String),
    Succeeded(String),
    Failed { code: FailureCode, message: String },
}

/// Whether a queued command goes out on a stream, decided under the actions lock.
#[derive(Debug)]
pub enum Delivery {
    /// Sent for the first time: now SENT (publish it once committed).
    First(Box<Action>),
    /// Sent before, on an earlier stream, and not finished: send it again.
    Again,
    /// No longer to be delivered: canceled or superseded meanwhile.
    Withdrawn,
}

/// Moves `action` along by one agent report; false when nothing changed.
fn apply_report(action: &mut Action, report: &AgentReport, now: Millis) -> bool {
    if action.status.is_terminal() {
        if action.status == ActionStatus::Canceled
            && matches!(
                report,
                AgentReport::Succeeded(_) | AgentReport::Failed { .. }
            )
        {
            // Record what the device says happened after the cancel.
            action.timeline.push(ActionEvent {
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

/// The command's time to live: the default when none is given.
pub fn validate_ttl(ttl: Option<Duration>) -> Result<Duration> {
    let ttl = ttl.unwrap_or(DEFAULT_COMMAND_TTL);
    if ttl.is_zero() || ttl > MAX_COMMAND_TTL {
        return Err(Error::InvalidArgument(format!(
            "ttl must be between 1 second and {} days",
            MAX_COMMAND_TTL.as_secs() / 86_400
        )));
    }
    Ok(ttl)
}

/// A command stored but not yet committed, published or handed to its stream.
#[derive(Debug)]
pub(crate) struct StoredCommand {
    action: Action,
    superseded: Vec<Action>,
    direct: bool,
}

impl App {
    /// Queues a command for a device, durably, and hands it to its stream.
    pub async fn queue_command(
        &self,
        device: &Device,
        admin_email: &str,
        action_type: ActionType,
        payload: CommandPayload,
        ttl: Option<Duration>,
    ) -> Result<Action> {
        self.queue_command_as(
            crate::storage::new_action_id(&device.site_id),
            device,
            admin_email,
            action_type,
            payload,
            ttl,
        )
        .await
    }

    /// Refuses a command the device cannot take: not enrolled, or its
    /// agent said it cannot perform this kind of action (and why).
    pub(crate) fn check_command(
        &self,
        device: &crate::model::Device,
        action_type: ActionType,
    ) -> Result<()> {
        if device.status != DeviceStatus::Active {
            return Err(Error::FailedPrecondition(format!(
                "device {} is not enrolled (status {:?})",
                device.device_id, device.status
            )));
        }
        if let Some(capability) = device
            .facts
            .capabilities
            .iter()
            .find(|c| c.action == action_type)
            && !capability.supported
        {
            return Err(Error::FailedPrecondition(format!(
                "device {} cannot perform {action_type:?}: {}",
                device.device_id,
                if capability.reason.is_empty() {
                    "its agent says it is not supported"
                } else {
                    &capability.reason
                }
            )));
        }
        Ok(())
    }

    /// [`queue_command`](Self::queue_command) with a chosen action id.
    ///
    /// When the device's stream is live on this server and no older command
    /// still waits to go out, the command is stored as SENT in the same
    /// write that queues it and handed to the stream once committed: one
    /// commit instead of two, and the stream does not read it back. SENT
    /// is durable before the command goes out either way; if the stream
    /// drops first, the command is still queued and goes out on the next one.
    pub(crate) async fn queue_command_as(
        &self,
        action_id: String,
        device: &Device,
        admin_email: &str,
        action_type: ActionType,
        payload: CommandPayload,
        ttl: Option<Duration>,
    ) -> Result<Action> {
        let ttl = validate_ttl(ttl)?;
        self.check_command(device, action_type)?;
        let stored =
            self.store_command(action_id, device, admin_email, action_type, payload, ttl)?;
        self.send_stored_command(stored).await
    }

    /// Writes a command (already validated) and supersedes older ones, under
    /// the device's actions lock. The new record goes in first: a crash in
    /// between leaves an older command queued too, never a canceled one
    /// without the command that replaced it.
    pub(crate) fn store_command(
        &self,
        action_id: String,
        device: &Device,
        admin_email: &str,
        action_type: ActionType,
        payload: CommandPayload,
        ttl: Duration,
    ) -> Result<StoredCommand> {
        let device_id = device.device_id.as_str();
        let now = now_millis();
        let mut action =
            Action::pending(action_id, device, action_type, admin_email, "queued", now);
        action.expires_at =
            now.saturating_add(Millis::try_from(ttl.as_millis()).unwrap_or(Millis::MAX));
        action.payload = Some(payload);
        let online = self.live.is_online(device_id);
        let stored = self
            .storage
            .with_device_actions_locked(device_id, |storage| {
                let mut superseded = Vec::new();
                let mut older_waits = false;
                for mut older in storage.queued_actions(device_id)? {
                    if supersedes(action_type)
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
                storage.put_action(&action)?;
                // The command is stored from here on, so this call must not fail: an
                // older one that cannot be marked superseded stays queued instead.
                superseded.retain(|older| match storage.put_action(older) {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::error!(%error, action_id = %older.action_id, "cannot mark a superseded command");
                        false
                    }
                });
                Ok(StoredCommand {
                    action,
                    superseded,
                    direct,
                })
            })?;
        Ok(stored)
    }

    /// Commits a stored command, tells watchers, and hands it to its stream.
    pub(crate) async fn send_stored_command(&self, stored: StoredCommand) -> Result<Action> {
        let StoredCommand {
            action,
            superseded,
            direct,
        } = stored;
        self.commit().await?;
        for older in superseded {
            self.publish(older);
        }
        self.publish(action.clone());
        let device_id = action.device_id.as_str();
        let signal = if direct {
            StreamSignal::Command(Box::new(action.clone()))
        } else {
            StreamSignal::NewCommand {
                action_id: action.action_id.clone(),
            }
        };
        self.live.signal(device_id, signal);
        tracing::info!(action_id = %action.action_id, device_id, kind = ?action.action_type, admin = %action.created_by, "command queued");
        Ok(action)
    }

    /// Tells watchers (and the site's webhook) about a changed action.
    pub(crate) fn publish(&self, action: Action) {
        self.queue_action_webhook(&action);
        let _ = self.action_updates.send(action);
    }

    /// The device's commands still to deliver or finish, oldest first.
    pub fn pending_commands(&self, device_id: &str) -> Result<Vec<Action>> {
        Ok(self.storage.queued_actions(device_id)?)
    }

    pub fn get_action(&self, action_id: &str) -> Result<Action> {
        self.storage
            .get_action(action_id)?
            .ok_or_else(|| Error::no_such("action", action_id))
    }

    /// Records that the command is about to go out on the device's stream.
    /// The caller commits before sending, so that a command still PENDING
    /// after a crash was never delivered (and may be superseded safely).
    pub fn mark_sent(&self, device_id: &str, action_id: &str) -> Result<Delivery> {
        let now = now_millis();
        let updated = self
            .storage
            .update_device_action(device_id, action_id, |action| {
                action.status == ActionStatus::Pending
                    && action.advance(ActionStatus::Sent, SENT_DETAIL, now)
            })?;
        Ok(match updated {
            Some((action, true)) => Delivery::First(Box::new(action)),
            Some((action, false)) if action.is_queued() && action.device_id == device_id => {
                Delivery::Again
            }
            // Canceled or superseded since the queue was read.
            _ => Delivery::Withdrawn,
        })
    }

    /// Applies what the agent of `device_id` reported about `action_id`, in
    /// order, with one write; watchers still see every step. Reports about
    /// other devices' or unknown commands are ignored.
    pub async fn agent_reports(
        &self,
        device_id: &str,
        action_id: &str,
        reports: Vec<AgentReport>,
    ) -> Result<()> {
        let now = now_millis();
        let mut steps = Vec::new();
        let updated = self
            .storage
            .update_device_action(device_id, action_id, |action| {
                for report in &reports {
                    if apply_report(action, report, now) {
                        steps.push(action.clone());
                    }
                }
                !steps.is_empty()
            })?;
        match updated {
            None => tracing::warn!(
                device_id,
                action_id,
                "report about an unknown command ignored"
            ),
            Some((action, _)) if action.device_id != device_id => {
                tracing::warn!(
                    device_id,
                    action_id,
                    "report about another device's command ignored"
                );
            }
            Some((_, true)) => {
                // Not flushed per report (sled flushes within 500 ms): if a
                // crash loses a report, the command is still queued, is sent
                // again on reconnect, and the agent's journal replays the
                // same outcome without applying it twice.
                for step in steps {
                    self.publish(step);
                }
            }
            Some((_, false)) => {}
        }
        Ok(())
    }

    /// Cancels a command the device has not acknowledged yet.
    pub async fn cancel_action(&self, action_id: &str, admin_email: &str) -> Result<Action> {
        let now = now_millis();
        let mut refused = None;
        let updated = self.storage.update_action(action_id, |action| {
            if !matches!(action.status, ActionStatus::Pending | ActionStatus::Sent)
                || action.payload.is_none()
            {
                refused = Some(action.status);
                return false;
            }
            action.failure_reason = format!("canceled by {admin_email}");
            action.advance(
                ActionStatus::Canceled,
                format!("canceled by {admin_email}"),
                now,
            )
        })?;
        let (action, _) = updated.ok_or_else(|| Error::no_such("action", action_id))?;
        if let Some(status) = refused {
            return Err(Error::FailedPrecondition(format!(
                "action {action_id} is {status:?}; only an action the device has not acknowledged can be canceled"
            )));
        }
        self.commit().await?;
        self.publish(action.clone());
        Ok(action)
    }

    /// Expires every command whose time ran out before the device took it.
    pub async fn expire_due_commands(&self) -> Result<usize> {
        let now = now_millis();
        let mut expired = Vec::new();
        for action_id in self.storage.expired_action_ids(now) {
            let updated = self.storage.update_action(&action_id, |action| {
                if action.expires_at > now {
                    return false;
                }
                let changed =
                    action.advance(ActionStatus::Expired, "not applied before its expiry", now);
                if changed {
                    action.failure_code = Some(FailureCode::Expired);
                    action.failure_reason = "expired before the device applied it".into();
                }
                changed
            })?;
            if let Some((action, true)) = updated {
                expired.push(action);
            }
        }
        self.storage.record_open_commands_since()?;
        if !expired.is_empty() {
            self.commit().await?;
        }
        let count = expired.len();
        for action in expired {
            tracing::info!(action_id = %action.action_id, device_id = %action.device_id, "command expired");
            self.publish(action);
        }
        Ok(count)
    }
}
