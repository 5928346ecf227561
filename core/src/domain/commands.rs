//! Commands: actions that go to a device. Queued durably per device,
//! delivered at least once over the device's stream, advanced by what the
//! agent reports, expired in the background, canceled or superseded.

use std::time::Duration;

use super::Domain;
use crate::error::{Error, Result};
use crate::live::StreamSignal;
use crate::model::{
    Action, ActionType, CommandPayload, Device, DeviceStatus, LatestReset, Millis, Notification,
    now_millis,
};
use crate::store::{Canceled, NewCommand, Queued, Reported};

pub const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub use crate::model::MAX_COMMAND_TTL;

pub use crate::rules::{AgentReport, SUPERSEDED};
pub use crate::store::Delivery;

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

impl Domain {
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
            self.store.new_action_id(&device.site_id),
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

    /// [`queue_command`](Self::queue_command) with a chosen action id, and
    /// what a reset stores with it (its emails, the device's latest reset).
    ///
    /// When the device's stream is live on this server and no older command
    /// still waits to go out, the command is stored as SENT in the same
    /// unit that queues it and handed to the stream once stored: one
    /// write instead of two, and the stream does not read it back. SENT
    /// is durable before the command goes out either way; if the stream
    /// drops first, the command is still queued and goes out on the next one.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn queue_command_as(
        &self,
        action_id: String,
        device: &Device,
        admin_email: &str,
        action_type: ActionType,
        payload: CommandPayload,
        ttl: Option<Duration>,
    ) -> Result<Action> {
        self.queue_command_with(
            action_id,
            device,
            admin_email,
            action_type,
            payload,
            ttl,
            Vec::new(),
            None,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn queue_command_with(
        &self,
        action_id: String,
        device: &Device,
        admin_email: &str,
        action_type: ActionType,
        payload: CommandPayload,
        ttl: Option<Duration>,
        notifications: Vec<Notification>,
        latest_reset: Option<LatestReset>,
    ) -> Result<Action> {
        let ttl = validate_ttl(ttl)?;
        self.check_command(device, action_type)?;
        let now = now_millis();
        let mut action =
            Action::pending(action_id, device, action_type, admin_email, "queued", now);
        action.expires_at =
            now.saturating_add(Millis::try_from(ttl.as_millis()).unwrap_or(Millis::MAX));
        action.payload = Some(payload);
        let queued = self
            .store
            .queue_command(NewCommand {
                action,
                online: self.live.is_online(&device.device_id),
                notifications,
                latest_reset,
            })
            .await?;
        self.send_queued_command(queued).await
    }

    /// Tells watchers about a stored command and hands it to its stream.
    async fn send_queued_command(&self, queued: Queued) -> Result<Action> {
        let Queued {
            action,
            superseded,
            direct,
        } = queued;
        for older in superseded {
            self.publish(older).await;
        }
        self.publish(action.clone()).await;
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
    pub(crate) async fn publish(&self, action: Action) {
        self.queue_action_webhook(&action).await;
        let _ = self.action_updates.send(action);
    }

    /// The device's commands still to deliver or finish, oldest first.
    pub async fn pending_commands(&self, device_id: &str) -> Result<Vec<Action>> {
        Ok(self.store.queued_actions(device_id).await?)
    }

    pub async fn get_action(&self, action_id: &str) -> Result<Action> {
        self.store
            .get_action(action_id)
            .await?
            .ok_or_else(|| Error::no_such("action", action_id))
    }

    /// Records that these commands are about to go out on the device's
    /// stream, durably before any is sent, so that a command still PENDING
    /// after a crash was never delivered (and may be superseded safely).
    /// Watchers hear of each first delivery before it goes out.
    pub async fn mark_sent(&self, device_id: &str, action_ids: &[String]) -> Result<Vec<Delivery>> {
        let deliveries = self
            .store
            .mark_sent(device_id, action_ids, now_millis())
            .await?;
        for delivery in &deliveries {
            if let Delivery::First(action) = delivery {
                self.publish(action.as_ref().clone()).await;
            }
        }
        Ok(deliveries)
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
        // Durable soon, not at once: if a crash loses a report, the command
        // is still queued, is sent again on reconnect, and the agent's
        // journal replays the same outcome without applying it twice.
        match self
            .store
            .apply_reports(device_id, action_id, &reports, now_millis())
            .await?
        {
            Reported::Unknown => tracing::warn!(
                device_id,
                action_id,
                "report about an unknown command ignored"
            ),
            Reported::OtherDevice => tracing::warn!(
                device_id,
                action_id,
                "report about another device's command ignored"
            ),
            Reported::Applied(steps) => {
                for step in steps {
                    self.publish(step).await;
                }
            }
        }
        Ok(())
    }

    /// Cancels a command the device has not acknowledged yet.
    pub async fn cancel_action(&self, action_id: &str, admin_email: &str) -> Result<Action> {
        match self
            .store
            .cancel_action(action_id, admin_email, now_millis())
            .await?
        {
            Canceled::NotFound => Err(Error::no_such("action", action_id)),
            Canceled::Refused(status) => Err(Error::FailedPrecondition(format!(
                "action {action_id} is {status:?}; only an action the device has not acknowledged can be canceled"
            ))),
            Canceled::Done(action) => {
                self.publish((*action).clone()).await;
                Ok(*action)
            }
        }
    }

    /// Expires every command whose time ran out before the device took it.
    pub async fn expire_due_commands(&self) -> Result<usize> {
        let expired = self.store.expire_due(now_millis()).await?;
        let count = expired.len();
        for action in expired {
            tracing::info!(action_id = %action.action_id, device_id = %action.device_id, "command expired");
            self.publish(action).await;
        }
        Ok(count)
    }
}
